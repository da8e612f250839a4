"""The guest build: the same sources give byte-identical images in any directory; the
measurement (vmm/measure.py) is the documented hash of what the loader copies."""

from __future__ import annotations

import hashlib
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

from vmm.elf import read_image
from vmm.measure import loaded_image_sha256

REPO = Path(__file__).resolve().parent.parent
# `make guests` builds them all; the allowlists name the kexec image's and the modules'
# digests, so they too must be the same bytes in any directory.
IMAGES = ("guest_vtl0/build/vtl0.elf", "guest_vtl1/build/vtl1.elf", "guest_vtl0/build/vtl0-kexec.elf",
          "guest_vtl0/build/module.bin", "guest_vtl0/build/module-priv.bin")
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
    assert len((a / "guest_vtl0/build/module.bin").read_bytes()) == 4096
    assert read_image(a / "guest_vtl0/build/vtl0-kexec.elf").entry == 0x800000


# ---- the measurement: SHA-256 of what is loaded (docs/abi.md, "Measurement") ----------------

def _independent_measurement(data: bytes) -> str:
    """The documented format, recomputed from the ELF program headers alone (no vmm code)."""
    (entry, phoff) = struct.unpack_from("<QQ", data, 24)
    (phentsize, phnum) = struct.unpack_from("<HH", data, 54)
    loads = []
    for i in range(phnum):
        p_type, p_flags, p_offset, _vaddr, p_paddr, p_filesz, p_memsz, _align = \
            struct.unpack_from("<IIQQQQQQ", data, phoff + i * phentsize)
        if p_type == 1 and p_memsz > 0:     # PT_LOAD that loads something
            loads.append((p_paddr, p_offset, p_filesz, p_memsz, p_flags))
    h = hashlib.sha256(entry.to_bytes(8, "little"))
    for gpa, off, filesz, memsz, flags in sorted(loads):
        h.update(gpa.to_bytes(8, "little") + filesz.to_bytes(8, "little") + memsz.to_bytes(8, "little")
                 + flags.to_bytes(4, "little"))
        h.update(data[off:off + filesz])
    return h.hexdigest()


def test_measurement_matches_an_independent_computation(guest_images: tuple[Path, Path]) -> None:
    for path in guest_images:
        data = path.read_bytes()
        # The built-in images have more than one PT_LOAD and a .bss tail (memsz > filesz).
        assert loaded_image_sha256(read_image(path)) == _independent_measurement(data)


def test_measurement_covers_loaded_bytes_only(guest_images: tuple[Path, Path], tmp_path: Path) -> None:
    path = guest_images[1]
    data = path.read_bytes()
    base = loaded_image_sha256(read_image(path))
    # Bytes the loader does not copy (here: appended to the file) change the file's hash only.
    padded = tmp_path / "padded.elf"
    padded.write_bytes(data + b"not loaded")
    assert hashlib.sha256(padded.read_bytes()).hexdigest() != hashlib.sha256(data).hexdigest()
    assert loaded_image_sha256(read_image(padded)) == base
    # One loaded byte, the entry point, or a segment's size changes the measurement.
    phoff = struct.unpack_from("<Q", data, 32)[0]
    seg_off = struct.unpack_from("<Q", data, phoff + 8)[0]
    flipped = bytearray(data)
    flipped[seg_off + 100] ^= 1
    entry = bytearray(data)
    struct.pack_into("<Q", entry, 24, struct.unpack_from("<Q", data, 24)[0] + 1)
    memsz = bytearray(data)
    struct.pack_into("<Q", memsz, phoff + 40, struct.unpack_from("<Q", data, phoff + 40)[0] + 8)
    for name, variant in (("byte", flipped), ("entry", entry), ("memsz", memsz)):
        p = tmp_path / f"{name}.elf"
        p.write_bytes(bytes(variant))
        assert loaded_image_sha256(read_image(p)) != base, name


def test_docs_snippet_recomputes_the_measurement(guest_images: tuple[Path, Path], tmp_path: Path) -> None:
    """The Python snippet in docs/abi.md ("Measurement") gives what the VMM computes."""
    doc = (REPO / "docs" / "abi.md").read_text()
    section = doc.split("## Measurement", 1)[1]
    snippet = section.split("```python\n", 1)[1].split("```", 1)[0]
    script = tmp_path / "measure.py"
    script.write_text(snippet)
    for path in guest_images:
        cp = subprocess.run([sys.executable, str(script), str(path)], capture_output=True, text=True,
                            timeout=300)
        assert cp.returncode == 0, cp.stderr
        assert cp.stdout.strip() == loaded_image_sha256(read_image(path))
