"""Guest-physical memory: one anonymous shared mapping that every VM of a partition maps."""

from __future__ import annotations

from typing import Any

from vmm.errors import VmmError
from vmm.uapi import MAP_ANONYMOUS, MAP_FAILED, MAP_NORESERVE, MAP_SHARED, PROT_READ, PROT_WRITE, ffi, libc

PAGE_SIZE = 4096


class GuestMemory:
    """`size` bytes of guest RAM starting at GPA 0, backed by one host mapping."""

    def __init__(self, size: int) -> None:
        if size <= 0 or size % PAGE_SIZE:
            raise VmmError(f"guest memory size {size:#x} must be a positive multiple of 4 KiB")
        ptr = libc.mmap(ffi.NULL, size, PROT_READ | PROT_WRITE,
                        MAP_SHARED | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
        if int(ffi.cast("uintptr_t", ptr)) == MAP_FAILED:
            raise VmmError(f"cannot map {size >> 20} MiB of guest memory: {ffi.errno}")
        self.size = size
        self.host_addr = int(ffi.cast("uintptr_t", ptr))
        self._ptr: Any = ffi.cast("uint8_t *", ptr)
        # A zero-copy view for bulk reads and writes from Python.
        self.view = memoryview(ffi.buffer(self._ptr, size))  # type: ignore[arg-type]

    def check(self, gpa: int, length: int) -> None:
        if gpa < 0 or length < 0 or gpa + length > self.size:
            raise VmmError(f"GPA range {gpa:#x}+{length:#x} is outside guest memory "
                           f"(0..{self.size:#x})")

    def read(self, gpa: int, length: int) -> bytes:
        self.check(gpa, length)
        return bytes(self.view[gpa:gpa + length])

    def write(self, gpa: int, data: bytes) -> None:
        self.check(gpa, len(data))
        self.view[gpa:gpa + len(data)] = data

    def fill(self, gpa: int, length: int, byte: int = 0) -> None:
        self.check(gpa, length)
        ffi.memmove(self._ptr + gpa, bytes([byte]) * length, length) if length else None

    def read_u64(self, gpa: int) -> int:
        return int.from_bytes(self.read(gpa, 8), "little")

    def write_u64(self, gpa: int, value: int) -> None:
        self.write(gpa, (value & (2**64 - 1)).to_bytes(8, "little"))

    def cast(self, ctype: str, gpa: int, length: int) -> Any:
        """A cffi pointer of `ctype` to guest memory at `gpa` (bounds-checked)."""
        self.check(gpa, length)
        return ffi.cast(ctype, self._ptr + gpa)

    def close(self) -> None:
        if self.host_addr:
            self.view.release()
            libc.munmap(ffi.cast("void *", self.host_addr), self.size)
            self.host_addr = 0
