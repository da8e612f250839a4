"""A guest memory file: guest-physical memory byte for byte (offset = GPA), sparse.

As Firecracker's memory file: the file is exactly the memory's size, and pages that
were never written or are all zero are holes, so a 256 MiB partition that touched a few
MiB takes a few MiB of disk.  Populated extents of the memfd are found with SEEK_DATA /
SEEK_HOLE (shmem keeps untouched pages as holes); zero pages inside them are skipped
too.  Loading reads only the file's data extents into fresh (zero) memory.

The digest is SHA-256 over the whole file as `sha256sum` reads it, holes as zeros.
"""

from __future__ import annotations

import hashlib
import os
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


def save(mem: GuestMemory, f: BinaryIO) -> str:
    """Write `mem` to the regular file `f` (empty, opened for writing); returns the digest."""
    view = mem.view
    size = mem.size
    h = hashlib.sha256()
    fd = f.fileno()
    os.ftruncate(fd, size)            # holes everywhere; data written where it is
    done = 0
    for start, end in _extents(mem.fd, size):
        start -= start % CHUNK
        for off in range(start, end, CHUNK):
            if off < done:
                continue
            _hash_zeros(h, off - done)
            n = min(CHUNK, size - off)
            chunk = view[off:off + n]
            h.update(chunk)
            if chunk != _ZERO[:n]:
                os.pwrite(fd, chunk, off)
            done = off + n
    _hash_zeros(h, size - done)
    return h.hexdigest()


def _hash_zeros(h: hashlib._Hash, n: int) -> None:
    while n > 0:
        k = min(n, CHUNK)
        h.update(_ZERO[:k])
        n -= k


def digest(f: BinaryIO, size: int) -> str:
    """SHA-256 of the memory file `f` (holes hashed as zeros without reading them)."""
    h = hashlib.sha256()
    fd = f.fileno()
    done = 0
    buf = bytearray(CHUNK)
    for start, end in _extents(fd, size):
        _hash_zeros(h, start - done)
        off = start
        while off < end:
            n = os.preadv(fd, [memoryview(buf)[:min(CHUNK, end - off)]], off)
            if n <= 0:
                raise MemoryFileError("the memory file ended early (truncated while read)")
            h.update(memoryview(buf)[:n])
            off += n
        done = end
    _hash_zeros(h, size - done)
    return h.hexdigest()


def load(mem: GuestMemory, f: BinaryIO) -> str:
    """Read the memory file `f` into `mem` (fresh: all zero) and return the SHA-256 of
    what was read, in one pass: the bytes hashed are the bytes loaded, so a file changed
    after a check cannot slip past it.  Its size must be the memory's; only data extents
    are read."""
    fd = f.fileno()
    size = os.fstat(fd).st_size
    if size != mem.size:
        raise MemoryFileError(f"the memory file is {size} bytes, the partition's memory {mem.size}")
    view = mem.view
    h = hashlib.sha256()
    done = 0
    for start, end in _extents(fd, size):
        _hash_zeros(h, start - done)
        off = start
        while off < end:
            n = os.preadv(fd, [view[off:min(end, off + (CHUNK << 4))]], off)
            if n <= 0:
                raise MemoryFileError("the memory file ended early (truncated while read)")
            h.update(view[off:off + n])
            off += n
        done = end
    _hash_zeros(h, size - done)
    return h.hexdigest()
