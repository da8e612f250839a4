"""Guest-physical memory: one memfd that every VM of a partition maps.

The memory is a memfd (shmem, sparse: pages are allocated on first touch) mapped
MAP_SHARED once for the VMM (`GuestMemory.host_addr`, `view`).  `alias()` maps the
same memfd a second time: a VM whose memslots point at an alias sees the same pages,
but `mprotect` on the alias restricts only that VM (and never the VMM or the VMs on
the main mapping).  That is what the host-mapping protection backend
(vmm.memattr.HostMappingBackend) gives the lower VTL's VM.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from typing import Any, Protocol

from vmm.errors import VmmError
from vmm.uapi import MAP_FAILED, MAP_NORESERVE, MAP_SHARED, PROT_READ, PROT_WRITE, ffi, libc

PAGE_SIZE = 4096


class HostMapping(Protocol):
    """What a memslot needs from a host mapping of guest memory (GPA 0 at host_addr)."""
    size: int
    host_addr: int

    def check(self, gpa: int, length: int) -> None: ...


def _check_range(gpa: int, length: int, size: int) -> None:
    if gpa < 0 or length < 0 or gpa + length > size:
        raise VmmError(f"GPA range {gpa:#x}+{length:#x} is outside guest memory (0..{size:#x})")


def _map(fd: int, size: int, what: str) -> int:
    ptr = libc.mmap(ffi.NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_NORESERVE, fd, 0)
    addr = int(ffi.cast("uintptr_t", ptr))
    if addr == MAP_FAILED:
        err = ffi.errno
        raise VmmError(f"cannot map {size >> 20} MiB of guest memory ({what}): "
                       f"{errno.errorcode.get(err, err)} ({os.strerror(err)})")
    return addr


class MemoryAlias:
    """A second host mapping of a GuestMemory: same pages, its own page protections.

    Never touched by the VMM itself (a PROT_NONE page would fault the process): it is
    only handed to KVM as the userspace address of memslots.  Closed with its memory."""

    def __init__(self, mem: GuestMemory) -> None:
        self.size = mem.size
        self.host_addr = _map(mem.fd, mem.size, "alias")
        self._on_close: list[Callable[[], None]] = []

    @property
    def closed(self) -> bool:
        return self.host_addr == 0

    def check(self, gpa: int, length: int) -> None:
        if self.closed:
            raise VmmError("the memory alias is closed")
        _check_range(gpa, length, self.size)

    def mprotect(self, gpa: int, length: int, prot: int) -> int:
        """mprotect(2) on [gpa, gpa+length) of this alias; returns 0 or the errno (callers
        decide what a failure means: ENOMEM is the VMA limit)."""
        self.check(gpa, length)
        if libc.mprotect(ffi.cast("void *", self.host_addr + gpa), length, prot) != 0:
            return int(ffi.errno)
        return 0

    def on_close(self, callback: Callable[[], None]) -> None:
        """Run `callback` when the alias is unmapped (bookkeeping tied to its VMAs)."""
        self._on_close.append(callback)

    def close(self) -> None:
        if self.host_addr:
            libc.munmap(ffi.cast("void *", self.host_addr), self.size)
            self.host_addr = 0
            callbacks, self._on_close = self._on_close, []
            for cb in callbacks:
                cb()


class GuestMemory:
    """`size` bytes of guest RAM starting at GPA 0, backed by one memfd."""

    def __init__(self, size: int, name: str = "guest") -> None:
        if not isinstance(size, int) or size <= 0 or size % PAGE_SIZE:
            raise VmmError(f"guest memory size {size!r} must be a positive multiple of 4 KiB")
        self.size = size
        self.host_addr = 0
        self.fd = -1
        try:
            self.fd = os.memfd_create(name, os.MFD_CLOEXEC)
            os.ftruncate(self.fd, size)
        except OSError as e:
            self._close_fd()
            raise VmmError(f"cannot create {size >> 20} MiB of guest memory: {e.strerror}") from e
        try:
            self.host_addr = _map(self.fd, size, "main mapping")
        except VmmError:
            self._close_fd()
            raise
        self._ptr: Any = ffi.cast("uint8_t *", self.host_addr)
        # A zero-copy view for bulk reads and writes from Python.
        self.view = memoryview(ffi.buffer(self._ptr, size))  # type: ignore[arg-type]
        self.aliases: list[MemoryAlias] = []

    def alias(self) -> MemoryAlias:
        """A new host mapping of the same memory (see MemoryAlias); closed with this memory."""
        if not self.host_addr:
            raise VmmError("guest memory is closed")
        a = MemoryAlias(self)
        self.aliases.append(a)
        return a

    def drop_alias(self, alias: MemoryAlias) -> None:
        """Unmap one alias before the memory itself is closed."""
        alias.close()
        if alias in self.aliases:
            self.aliases.remove(alias)

    def check(self, gpa: int, length: int) -> None:
        _check_range(gpa, length, self.size)

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

    def _close_fd(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def close(self) -> None:
        """Unmap the memory and every alias.  VMs using it must be closed first."""
        for a in getattr(self, "aliases", []):
            a.close()
        if self.host_addr:
            self.view.release()
            libc.munmap(ffi.cast("void *", self.host_addr), self.size)
            self.host_addr = 0
        self._close_fd()
