"""The files a command reads and the files it writes: one rule for both.

Inputs (guest images, `--trust` and `--stage` files, a kexec image) are read whole, and
only from regular files: each is opened with O_NONBLOCK (so that a FIFO cannot block the
open), checked with fstat on the open descriptor (a FIFO, a device, a directory or a
socket is refused in one line: /dev/zero would never end), bounded in size, and its
identity (device, inode) is remembered for the rest of the process.

Outputs (`vtl run --events`, `vtl memmap --png`) are opened without truncating, checked
on the open descriptor, and refused if they are any file this process has read (a symlink
or a hard link to an input is the same file: same device and inode); only then is a
regular file truncated.  An output is a regular file or a character device (/dev/null,
/dev/full, a terminal); a FIFO, a pipe or a socket is refused, because a reader that does
not read would block the run beyond its timeout, and a FIFO nobody reads would block the
open itself.
"""

from __future__ import annotations

import errno
import io
import os
import stat
from pathlib import Path
from typing import IO, Literal, overload

from vmm.errors import VmmError


class InputFileError(VmmError):
    """An input file that cannot be read (missing, not a regular file, too large)."""


class OutputFileError(VmmError):
    """An output file that cannot be written, or that would overwrite an input."""


# (st_dev, st_ino) of every file read through read_input -> how it was named, and its
# absolute path (a match counts only while that path still is the file: an inode number
# a deleted input leaves behind can be reused by an unrelated new file).
_inputs: dict[tuple[int, int], tuple[str, str]] = {}


def _input_at(ident: tuple[int, int]) -> str | None:
    entry = _inputs.get(ident)
    if entry is None:
        return None
    try:
        st = os.stat(entry[1])
    except OSError:
        return None
    return entry[0] if (st.st_dev, st.st_ino) == ident else None


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO or pipe"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def _why(e: OSError) -> str:
    return e.strerror or str(e)


def read_input(path: Path | str, what: str, limit: int,
               error: type[VmmError] = InputFileError) -> bytes:
    """The bytes of the regular file `path`, at most `limit` of them; `what` names it in
    errors (e.g. "--stage"), `error` is the class raised."""
    name = f"{what} {path}" if what else str(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.ENOENT:
            raise error(f"{name}: no such file") from None
        raise error(f"cannot read {name}: {_why(e)}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise error(f"{name} is {_kind(st.st_mode)}, not a regular file")
        if st.st_size > limit:
            raise error(f"{name} is {st.st_size} bytes, more than the {limit} it may have")
        chunks = []
        total = 0
        while total <= limit:             # a file that grows while we read stays bounded
            chunk = os.read(fd, min(1 << 20, limit + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        if total > limit:
            raise error(f"{name} grew past the {limit} bytes it may have while it was read")
        _inputs[(st.st_dev, st.st_ino)] = (name, os.path.abspath(path))
        return b"".join(chunks)
    except OSError as e:
        raise error(f"cannot read {name}: {_why(e)}") from None
    finally:
        os.close(fd)


def _std_files() -> set[tuple[int, int]]:
    out = set()
    for fd in (1, 2):
        try:
            st = os.fstat(fd)
        except OSError:
            continue
        out.add((st.st_dev, st.st_ino))
    return out


@overload
def open_output(path: Path | str, what: str, mode: Literal["w"] = "w") -> IO[str]: ...
@overload
def open_output(path: Path | str, what: str, mode: Literal["wb"]) -> IO[bytes]: ...


def open_output(path: Path | str, what: str, mode: Literal["w", "wb"] = "w") -> IO[str] | IO[bytes]:
    """Open `path` for writing (created, or truncated once it is known not to be an input);
    `what` names it in errors (e.g. "--events").  Raises OutputFileError."""
    name = f"{what} {path}"
    try:
        # No O_TRUNC yet: the checks below run on what the open found.  O_NONBLOCK: a FIFO
        # without a reader fails (ENXIO) instead of blocking.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NONBLOCK | os.O_CLOEXEC, 0o666)
    except OSError as e:
        if e.errno == errno.ENXIO:
            raise OutputFileError(f"{name} is a FIFO or socket nobody reads; {what} takes a "
                                  "regular file or a character device such as /dev/null") from None
        raise OutputFileError(f"cannot write {name}: {_why(e)}") from None
    try:
        st = os.fstat(fd)
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISCHR(st.st_mode)):
            raise OutputFileError(f"{name} is {_kind(st.st_mode)}; {what} takes a regular file or a "
                                  "character device such as /dev/null (a reader that stalls would "
                                  "hold the run beyond its timeout)")
        source = _input_at((st.st_dev, st.st_ino))
        if source is not None:
            raise OutputFileError(f"{name} is the input {source}; refusing to overwrite it")
        if stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) in _std_files():
            raise OutputFileError(f"{name} is the file this command's standard output or error "
                                  "goes to; the two would overwrite each other")
        if stat.S_ISREG(st.st_mode):
            os.ftruncate(fd, 0)
        os.set_blocking(fd, True)
        raw = io.FileIO(fd, "w", closefd=True)
    except OSError as e:
        os.close(fd)
        raise OutputFileError(f"cannot write {name}: {_why(e)}") from None
    except BaseException:
        os.close(fd)
        raise
    buffered = io.BufferedWriter(raw)
    if mode == "wb":
        return buffered
    return io.TextIOWrapper(buffered, encoding="utf-8")
