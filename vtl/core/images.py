"""Where the built-in guest images live, and the scenario table a VTL0 image carries."""

from __future__ import annotations

import difflib
import os
from pathlib import Path

from pydantic import BaseModel

from vmm.elf import ElfImage
from vmm.errors import GuestImageError
from vtl.abi import abi_ffi

REPO = Path(__file__).resolve().parents[2]
SCENARIO_SECTION = ".vtl_scenarios"


def default_vtl0_image() -> Path:
    return Path(os.environ.get("VTL_VTL0_IMAGE", REPO / "guest_vtl0" / "build" / "vtl0.elf"))


def default_vtl1_image() -> Path:
    return Path(os.environ.get("VTL_VTL1_IMAGE", REPO / "guest_vtl1" / "build" / "vtl1.elf"))


def default_kexec_image() -> Path:
    """The built-in next kernel for kexec flows: VTL0's kernel linked at 8 MiB."""
    return Path(os.environ.get("VTL_KEXEC_IMAGE", REPO / "guest_vtl0" / "build" / "vtl0-kexec.elf"))


class Scenario(BaseModel):
    name: str
    description: str


def _cstr(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace")


def scenarios(image: ElfImage) -> list[Scenario]:
    """The scenarios listed in the image's .vtl_scenarios section (empty if none)."""
    data = image.section(SCENARIO_SECTION)
    if not data:
        return []
    size = abi_ffi.sizeof("struct vtl_scenario_desc")
    if len(data) % size:
        raise GuestImageError(f"{image.path}: {SCENARIO_SECTION} is {len(data)} bytes, "
                              f"not a multiple of struct vtl_scenario_desc ({size})")
    out = []
    for off in range(0, len(data), size):
        d = abi_ffi.from_buffer("struct vtl_scenario_desc *", data[off:off + size])
        out.append(Scenario(name=_cstr(bytes(abi_ffi.buffer(d.name))),
                            description=_cstr(bytes(abi_ffi.buffer(d.description)))))
    return out


class UnknownScenario(GuestImageError):
    """A scenario name the image does not have (a usage error: the CLI exits 2)."""


def near_names(name: str, known: list[str]) -> str:
    """'did you mean 'a' or 'b'? ' for the names nearest `name` (difflib), or ''."""
    quoted = [repr(c) for c in difflib.get_close_matches(name, known, n=3, cutoff=0.6)]
    if not quoted:
        return ""
    return f"did you mean {', '.join(quoted[:-1])}{' or ' if len(quoted) > 1 else ''}{quoted[-1]}? "


def check_scenario(image: ElfImage, name: str) -> None:
    """Refuse `name` if the image lists scenarios and it is not one of them, in one line
    that suggests the nearest names (difflib) instead of listing them all.  "" (the
    default boot) and images without a scenario table are accepted."""
    known = [s.name for s in scenarios(image)]
    if not name or not known or name in known:
        return
    raise UnknownScenario(f"scenario {name!r} is not in {image.path}; {near_names(name, known)}"
                          f"`vtl scenarios` lists all {len(known)}")
