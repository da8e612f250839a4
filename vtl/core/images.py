"""Where the built-in guest images live, and the scenario table a VTL0 image carries."""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import cast

from pydantic import BaseModel

from vmm.elf import ElfImage
from vmm.errors import GuestImageError
from vtl.abi import abi_ffi
from vtl.core.config import KexecPolicy

REPO = Path(__file__).resolve().parents[2]
SCENARIO_SECTION = ".vtl_scenarios"


def default_vtl0_image() -> Path:
    return Path(os.environ.get("VTL_VTL0_IMAGE", REPO / "guest_vtl0" / "build" / "vtl0.elf"))


def default_vtl1_image() -> Path:
    return Path(os.environ.get("VTL_VTL1_IMAGE", REPO / "guest_vtl1" / "build" / "vtl1.elf"))


def default_kexec_image() -> Path:
    """The built-in next kernel for kexec flows: VTL0's kernel linked at 8 MiB."""
    return Path(os.environ.get("VTL_KEXEC_IMAGE", REPO / "guest_vtl0" / "build" / "vtl0-kexec.elf"))


# What a scenario needs of its partition, declared at the end of its description in
# parentheses (docs/smp.md, "Cross-VP attacks"): "--vps N+" (at least N VPs), "staged" (the
# built-in next kernel staged in VTL0 memory and on VTL1's allowlist, as `vtl run --stage
# FILE --trust FILE`), "teardown" / "persist" / "deny" (VTL1's kexec policy).  `vtl attack`
# gives each attack what it declares; `vtl run` users pass the same options themselves.
_NEEDS = re.compile(r"\(([^()]*)\)\s*$")
_VPS = re.compile(r"^--vps (\d+)\+$")
POLICIES = ("teardown", "persist", "deny")


class Scenario(BaseModel):
    name: str
    description: str

    def _needs(self) -> list[str]:
        m = _NEEDS.search(self.description)
        return [t.strip() for t in m.group(1).split(",")] if m else []

    @property
    def min_vps(self) -> int:
        """The VPs it needs (1 unless it declares "--vps N+")."""
        for t in self._needs():
            if m := _VPS.match(t):
                return max(1, int(m.group(1)))
        return 1

    @property
    def staged(self) -> bool:
        """It needs the built-in next kernel staged and trusted ("staged")."""
        return "staged" in self._needs()

    @property
    def kexec_policy(self) -> KexecPolicy | None:
        """The kexec policy it declares, if any."""
        return next((cast(KexecPolicy, t) for t in self._needs() if t in POLICIES), None)


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
