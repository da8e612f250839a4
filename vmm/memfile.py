"""A guest memory file: guest-physical memory byte for byte (offset = GPA), sparse.

As Firecracker's memory file: the file is exactly the memory's size, and pages that
were never written or are all zero are holes, so a 256 MiB partition that touched a few
MiB takes a few MiB of disk.  Populated extents of the memfd are found with SEEK_DATA /
SEEK_HOLE (shmem keeps untouched pages as holes); zero pages inside them are skipped
too.  Loading reads only the file's data extents into fresh (zero) memory.

The digest is canonical in the memory's contents and costs what the data costs, not what
the memory's size does: SHA-256 over the size, then, for every 64 KiB chunk that is not
all zero, its offset and its bytes, in order.  A hole and a chunk of zeros are the same
memory, so a copy that fills the holes (`cp` without `--sparse`, `scp`) has the same
digest, and data written into a hole changes it.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from typing import BinaryIO

from vmm.errors import VmmError
from vmm.memory import GuestMemory

CHUNK = 1 << 16                   # the unit of zero-skipping and hashing
_ZERO = bytes(CHUNK)


class MemoryFileError(VmmError):
    """A memory file that cannot be this memory's (size) or cannot be read."""


def _extents(fd: int, size: int) -> list[tuple[int, int]]:
    """[start, end) data extents of `fd` up to `size` (the whole range if the filesystem
    cannot tell holes)."""
    out: list[tuple[int, int]] = []
    off = 0
    try:
        while off < size:
            try:
                start = os.lseek(fd, off, os.SEEK_DATA)
            except OSError as e:
                if e.errno == 6:              # ENXIO: no data past off
                    break
                raise
            if start >= size:
                break
            end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
            out.append((start, end))
            off = end
    except OSError:
        return [(0, size)]
    return out


class _Digest:
    """The canonical digest (module doc), fed chunk by chunk in offset order."""

    def __init__(self, size: int) -> None:
        self.h = hashlib.sha256(size.to_bytes(8, "little"))
        self.last = -1

    def chunk(self, off: int, data: memoryview | bytes) -> bool:
        """Feed the chunk at `off` (CHUNK aligned); False if it is all zero (not hashed)."""
        if data == _ZERO[:len(data)]:
            return False
        assert off > self.last
        self.last = off
        self.h.update(off.to_bytes(8, "little"))
        self.h.update(data)
        return True

    def hexdigest(self) -> str:
        return self.h.hexdigest()


def _chunks(fd: int, size: int) -> list[int]:
    """The CHUNK-aligned offsets that may hold data (those overlapping a data extent)."""
    offs: list[int] = []
    for start, end in _extents(fd, size):
        off = start - start % CHUNK
        if offs and off <= offs[-1]:
            off = offs[-1] + CHUNK
        offs.extend(range(off, end, CHUNK))
    return offs


def save(mem: GuestMemory, f: BinaryIO) -> str:
    """Write `mem` to the regular file `f` (empty, opened for writing); returns the digest."""
    view = mem.view
    size = mem.size
    d = _Digest(size)
    fd = f.fileno()
    os.ftruncate(fd, size)            # holes everywhere; data written where it is
    for off in _chunks(mem.fd, size):
        chunk = view[off:min(off + CHUNK, size)]
        if d.chunk(off, chunk):
            os.pwrite(fd, chunk, off)
    return d.hexdigest()


def _read(fd: int, size: int, into: Callable[[int, int], memoryview]) -> str:
    """Read every chunk of the memory file that may hold data into `into(off, n)` and
    return the digest of what was read (the bytes hashed are the bytes read)."""
    d = _Digest(size)
    for off in _chunks(fd, size):
        want = min(CHUNK, size - off)
        dst = into(off, want)
        if os.preadv(fd, [dst], off) != want:
            raise MemoryFileError("the memory file ended early (truncated while read)")
        d.chunk(off, dst)
    return d.hexdigest()


def digest(f: BinaryIO, size: int) -> str:
    """The digest of the memory file `f` of `size` bytes (only its data extents are read)."""
    buf = memoryview(bytearray(CHUNK))
    return _read(f.fileno(), size, lambda off, n: buf[:n])


def load(mem: GuestMemory, f: BinaryIO) -> str:
    """Read the memory file `f` into `mem` (fresh: all zero) and return its digest, in one
    pass: the bytes hashed are the bytes loaded, so a file changed after a check cannot
    slip past it.  Its size must be the memory's; only data extents are read."""
    fd = f.fileno()
    size = os.fstat(fd).st_size
    if size != mem.size:
        raise MemoryFileError(f"the memory file is {size} bytes, the partition's memory {mem.size}")
    view = mem.view
    return _read(fd, size, lambda off, n: view[off:off + n])
