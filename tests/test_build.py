"""The guest build: the same sources give byte-identical images in any directory."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
IMAGES = ("guest_vtl0/build/vtl0.elf", "guest_vtl1/build/vtl1.elf")
# What `make guests` reads: the Makefile, the guest sources and the ABI header.
SOURCES = ("guest_vtl0", "guest_vtl1", "guest_lib", "vtl/abi")


def _copy_sources(dest: Path) -> Path:
    dest.mkdir(parents=True)
    shutil.copy2(REPO / "Makefile", dest / "Makefile")
    for d in SOURCES:
        shutil.copytree(REPO / d, dest / d, ignore=shutil.ignore_patterns("build", "__pycache__"))
    return dest


def _make_guests(tree: Path) -> None:
    # A clean environment: no MAKEFLAGS from a surrounding `make test`, no CFLAGS of the user's.
    env = {k: v for k, v in os.environ.items()
           if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS", "CFLAGS", "LDFLAGS")}
    cp = subprocess.run(["make", "-s", "guests"], cwd=tree, env=env, capture_output=True, text=True,
                        timeout=300)
    assert cp.returncode == 0, cp.stdout + cp.stderr


def test_guest_images_are_identical_when_built_in_two_directories(tmp_path: Path) -> None:
    # Different depths and name lengths, so that any absolute path would show.
    a = _copy_sources(tmp_path / "a")
    b = _copy_sources(tmp_path / "a-much-longer-directory-name" / "nested" / "tree")
    _make_guests(a)
    _make_guests(b)
    for image in IMAGES:
        da, db = (a / image).read_bytes(), (b / image).read_bytes()
        assert da == db, f"{image} differs between {a} and {b}"
        assert str(tmp_path).encode() not in da, f"{image} contains its build directory"
