"""The ELF loader: a broken image is refused with a sentence naming the problem, before any
byte of guest memory changes; a valid one lands exactly where its segments say."""

from __future__ import annotations

import random
import struct
from pathlib import Path

import pytest

from tests.vtlrun import vtl_cli
from vmm.elf import load_image, read_image
from vmm.errors import GuestImageError
from vmm.memory import GuestMemory

PHDR = 64  # built-in images have their program headers right after the ELF header


def _patch(data: bytes, off: int, fmt: str, value: int) -> bytes:
    b = bytearray(data)
    struct.pack_into(fmt, b, off, value)
    return bytes(b)


def _broken(vtl0: bytes) -> dict[str, tuple[bytes, str]]:
    phoff = struct.unpack_from("<Q", vtl0, 32)[0]
    return {
        "empty": (b"", "not an ELF file"),
        "text": (b"#!/bin/sh\necho hi\n", "not an ELF file"),
        "truncated header": (vtl0[:40], "truncated"),
        "32-bit": (_patch(vtl0, 4, "B", 1), "32-bit"),
        "big-endian": (_patch(vtl0, 5, "B", 2), "big-endian"),
        "aarch64": (_patch(vtl0, 18, "<H", 183), "not x86-64"),
        "PIE": (_patch(vtl0, 16, "<H", 3), "shared object or PIE"),
        "relocatable": (_patch(vtl0, 16, "<H", 1), "relocatable"),
        "no program headers": (_patch(vtl0, 56, "<H", 0), "no valid program header table"),
        "program headers past EOF": (_patch(vtl0, 32, "<Q", len(vtl0)), "no valid program header table"),
        "filesz > memsz": (_patch(vtl0, phoff + 32, "<Q", 1 << 40), "filesz"),
        "segment past EOF": (_patch(vtl0, phoff + 8, "<Q", len(vtl0) - 16), "truncated"),
        "entry outside text": (_patch(vtl0, 24, "<Q", 0x10), "entry point"),
        "segment at 2^60": (_patch(vtl0, phoff + 24, "<Q", 1 << 60), "beyond physical addresses"),
    }


@pytest.fixture(scope="module")
def vtl0_bytes(guest_images: tuple[Path, Path]) -> bytes:
    return guest_images[0].read_bytes()


@pytest.mark.parametrize("case", list(_broken(b"\0" * 4096)))
def test_broken_images_are_refused_with_the_reason(vtl0_bytes: bytes, tmp_path: Path, case: str) -> None:
    data, reason = _broken(vtl0_bytes)[case]
    path = tmp_path / "bad.elf"
    path.write_bytes(data)
    with pytest.raises(GuestImageError, match=reason) as e:
        read_image(path)
    assert "bad.elf" in str(e.value)


def test_segments_outside_the_window_leave_memory_unchanged(guest_images: tuple[Path, Path]) -> None:
    img = read_image(guest_images[0])
    mem = GuestMemory(64 << 20)
    try:
        mem.fill(0, mem.size, 0xA5)
        with pytest.raises(GuestImageError, match="outside the window"):
            load_image(img, mem, 0x100000, img.segments[-1].gpa + 1)   # last segment sticks out
        assert mem.read(0, mem.size) == b"\xA5" * mem.size
    finally:
        mem.close()


def test_valid_image_lands_where_its_segments_say(guest_images: tuple[Path, Path]) -> None:
    img = read_image(guest_images[0])
    mem = GuestMemory(64 << 20)
    try:
        mem.fill(0, mem.size, 0xA5)
        load_image(img, mem, 0x100000, 0x1000000)
        for s in img.segments:
            assert mem.read(s.gpa, s.filesz) == img.data[s.offset:s.offset + s.filesz]
            assert mem.read(s.gpa + s.filesz, s.memsz - s.filesz) == bytes(s.memsz - s.filesz)  # bss
        assert mem.read(0, 0x100000) == b"\xA5" * 0x100000
        assert "_start" in img.symbols() and img.section(".vtl_scenarios")
    finally:
        mem.close()


def test_random_corruption_never_escapes_as_another_exception(vtl0_bytes: bytes, tmp_path: Path) -> None:
    """2,000 seeded mutations of the headers: each image either parses or is refused cleanly."""
    rng = random.Random(1234)
    path = tmp_path / "fuzz.elf"
    refused = 0
    for _ in range(2000):
        b = bytearray(vtl0_bytes[:rng.choice([64, 300, 4096, len(vtl0_bytes)])])
        for _ in range(rng.randint(1, 6)):
            off = rng.randrange(min(len(b), 64 + 56 * 4))
            b[off] = rng.randrange(256)
        path.write_bytes(b)
        try:
            read_image(path)
        except GuestImageError:
            refused += 1
    assert refused > 100


@pytest.mark.kvm
def test_vtl_run_with_a_broken_vtl1_image_is_one_line_and_exit_1(
        guest_images: tuple[Path, Path], tmp_path: Path) -> None:
    bad = tmp_path / "vtl1.elf"
    bad.write_bytes(_patch(guest_images[1].read_bytes(), 18, "<H", 183))
    cp = vtl_cli("run", "--vtl1-image", str(bad), "--quiet")
    assert cp.returncode == 1
    assert "Traceback" not in cp.stderr
    assert "vtl1.elf is for machine 183" in cp.stderr
