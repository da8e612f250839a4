"""The README's worked example is what the build gives: the same VTL1 measurement, the same
console and summary as a fresh `vtl run` (all but the wall time and the checkout's path)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.vtlrun import REPO, vtl_cli
from vmm.elf import read_image
from vmm.measure import loaded_image_sha256

README = (REPO / "README.md").read_text()


def _example(command: str) -> list[str]:
    """The indented output block that follows `    $ COMMAND` in the README."""
    lines = README.splitlines()
    start = lines.index(f"    $ {command}") + 1
    out = []
    for line in lines[start:]:
        if line and not line.startswith("    "):
            break
        if line.startswith("    $ "):
            break
        out.append(line[4:])
    while out and not out[-1]:
        out.pop()
    return out


def test_every_measurement_in_the_readme_is_the_one_the_build_gives(guest_images: tuple[Path, Path]) -> None:
    want = loaded_image_sha256(read_image(guest_images[1]))
    full = re.findall(r"(?:measurement|SHA-256)[ :]+([0-9a-f]{64})", README)
    short = re.findall(r"measurement of a fresh launch: ([0-9a-f]{8,63})…", README)
    assert full, "the README shows no VTL1 measurement"
    assert set(full) == {want}, f"README shows {set(full)}, the build measures {want}"
    assert all(want.startswith(s) for s in short), (short, want)


def _normalise(line: str) -> str:
    line = line.replace(str(REPO), "/work/main")
    return re.sub(r"^(wall time\s+)\S+ s$", r"\1… s", line)


@pytest.mark.kvm
def test_the_worked_example_is_a_fresh_vtl_run() -> None:
    cp = vtl_cli("run")
    assert cp.returncode == 0, cp.stderr
    got = [_normalise(line) for line in cp.stdout.rstrip("\n").splitlines()]
    shown = [_normalise(line) for line in _example("vtl run")]
    assert shown == got, "README's `vtl run` example differs from a fresh run:\n" + "\n".join(got)
