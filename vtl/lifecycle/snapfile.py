"""The snapshot directory: a versioned format with a manifest of SHA-256 digests.

In the spirit of Firecracker's snapshot (a memory file plus a versioned state file),
a snapshot is a directory of three files (docs/snapshot.md):

  manifest.json  {"format": "vtl-snapshot", "version": 1, "created": ISO time,
                  "files": {name: {"size": bytes, "sha256": hex}}}: written last
  state.json     the partition and the run (vtl/lifecycle/snapshot.py, vtl/run/snapshot.py)
  memory.bin     guest memory, offset = GPA, sparse (vmm/memfile.py)

It is written into a temporary directory beside the target and renamed into place only
when complete, so a directory that exists is a whole snapshot or nothing of ours; the
target must not exist (a snapshot never replaces anything).  Reading checks, before any
VM exists: the format and version, that the manifest names exactly these files, each
file's size and digest, and that state.json parses.  Every refusal is one line
(SnapshotError).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from vmm import memfile
from vmm.errors import VmmError
from vmm.memory import GuestMemory

FORMAT = "vtl-snapshot"
VERSION = 1
MANIFEST, STATE, MEMORY = "manifest.json", "state.json", "memory.bin"
FILES = (STATE, MEMORY)
# state.json holds registers, VPs and maps, never guest-sized data: a bound on what a
# snapshot someone hands us can make the VMM read into memory.
MAX_STATE = 16 << 20
MAX_MANIFEST = 64 << 10
# What memory.bin's "sha256" covers (vmm/memfile.py): the size, then every 64 KiB chunk
# that is not all zero with its offset; not `sha256sum`'s, which would cost a hash of every
# byte of a mostly empty memory.
MEMORY_DIGEST = "sha256 of size and non-zero 64 KiB chunks"


class SnapshotError(VmmError):
    """A snapshot that cannot be written here or cannot be restored (one line)."""


def write(path: Path, state: dict[str, Any], mem: GuestMemory) -> dict[str, Any]:
    """Write a snapshot of `state` and `mem` at `path` (which must not exist); returns the
    manifest."""
    path = Path(path)
    try:
        exists = os.path.lexists(path)
        os.fsencode(path)
    except (ValueError, UnicodeError):           # a NUL byte, an unpaired surrogate
        raise SnapshotError(f"{str(path)!r} is not a path a snapshot can be written to") from None
    if exists:
        raise SnapshotError(f"{path} already exists (a snapshot is written to a new directory)")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise SnapshotError(f"{parent} is not a directory")
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=parent))
    except OSError as e:
        raise SnapshotError(f"cannot write a snapshot in {parent}: {e.strerror}") from None
    try:
        files: dict[str, dict[str, Any]] = {}
        blob = json.dumps(state, sort_keys=True).encode()
        if len(blob) > MAX_STATE:
            raise SnapshotError(f"the state is {len(blob)} bytes, more than the format's {MAX_STATE}")
        files[STATE] = {"size": len(blob), "sha256": _sha256(blob)}
        (tmp / STATE).write_bytes(blob)
        with open(tmp / MEMORY, "wb") as f:
            files[MEMORY] = {"size": mem.size, "sha256": memfile.save(mem, f), "digest": MEMORY_DIGEST}
            f.flush()
            os.fsync(f.fileno())
        manifest = {"format": FORMAT, "version": VERSION,
                    "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                    "files": files}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        os.rename(tmp, path)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise SnapshotError(f"cannot write the snapshot {path}: {e.strerror or e}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _open_regular(path: Path, what: str) -> BinaryIO:
    """Open `path` for reading and check the file opened (not the name) is regular: a FIFO
    or device swapped in is refused without blocking on it (O_NONBLOCK, then fstat)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise SnapshotError(f"{what}: {path.name} is missing") from None
    except OSError as e:
        raise SnapshotError(f"{what}: cannot read {path}: {e.strerror}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise SnapshotError(f"{what}: {path.name} is not a regular file")
    return os.fdopen(fd, "rb")


def _read_small(path: Path, limit: int, what: str) -> bytes:
    with _open_regular(path, what) as f:
        try:
            data = f.read(limit + 1)
        except OSError as e:
            raise SnapshotError(f"{what}: cannot read {path}: {e.strerror}") from None
    if len(data) > limit:
        raise SnapshotError(f"{what}: {path.name} is more than {limit} bytes")
    return data


class Snapshot:
    """A snapshot directory, verified: `manifest`, `state`, and the memory file to load."""

    def __init__(self, path: Path, manifest: dict[str, Any], state: dict[str, Any]) -> None:
        self.path, self.manifest, self.state = path, manifest, state

    @property
    def memory_path(self) -> Path:
        return self.path / MEMORY

    def load_memory(self, mem: GuestMemory) -> None:
        """Load memory.bin into `mem`, hashing what it loads: a file that no longer matches
        the manifest (corrupt, or changed since `read`) is refused."""
        with _open_regular(self.memory_path, f"snapshot {self.path}") as f:
            digest = memfile.load(mem, f)
        if digest != self.manifest["files"][MEMORY]["sha256"]:
            raise SnapshotError(f"snapshot {self.path}: {MEMORY} does not match its SHA-256 in the manifest "
                                "(corrupt)")


def read(path: Path, check_memory: Callable[[BinaryIO, int], str] | None = None) -> Snapshot:
    """Open and verify the snapshot at `path` (see the module doc); nothing is built.
    memory.bin's size is checked here, its digest as it is loaded (Snapshot.load_memory,
    one pass); `check_memory` (memfile.digest) hashes it here too."""
    path = Path(path)
    what = f"snapshot {path}"
    if not path.is_dir():
        raise SnapshotError(f"{what}: not a directory" if path.exists() else f"{what}: no such directory")
    raw = _read_small(path / MANIFEST, MAX_MANIFEST, what)
    try:
        manifest = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise SnapshotError(f"{what}: {MANIFEST} is not JSON (corrupt)") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise SnapshotError(f"{what}: {MANIFEST} is not a {FORMAT} manifest")
    version = manifest.get("version")
    if version != VERSION:
        raise SnapshotError(f"{what}: format version {version!r}, this vtl reads version {VERSION}")
    files = manifest.get("files")
    if not isinstance(files, dict) or sorted(files) != sorted(FILES):
        raise SnapshotError(f"{what}: the manifest must list exactly {', '.join(FILES)}")
    for name in FILES:
        entry = files[name]
        if not (isinstance(entry, dict) and isinstance(entry.get("size"), int)
                and isinstance(entry.get("sha256"), str)):
            raise SnapshotError(f"{what}: the manifest's entry for {name} is malformed")
    if files[MEMORY].get("digest") != MEMORY_DIGEST:
        raise SnapshotError(f"{what}: the manifest's digest of {MEMORY} is not the {MEMORY_DIGEST!r} this "
                            "vtl checks")
    blob = _read_small(path / STATE, MAX_STATE, what)
    _check(what, STATE, len(blob), _sha256(blob), files[STATE])
    with _open_regular(path / MEMORY, what) as f:
        size = os.fstat(f.fileno()).st_size
        if size != files[MEMORY]["size"]:
            raise SnapshotError(f"{what}: {MEMORY} is {size} bytes, the manifest says "
                                f"{files[MEMORY]['size']} (truncated?)")
        if check_memory is not None:
            try:
                _check(what, MEMORY, size, check_memory(f, size), files[MEMORY])
            except OSError as e:
                raise SnapshotError(f"{what}: cannot read {MEMORY}: {e.strerror}") from None
    try:
        state = json.loads(blob)
    except (ValueError, UnicodeDecodeError):
        raise SnapshotError(f"{what}: {STATE} is not JSON") from None
    if not isinstance(state, dict):
        raise SnapshotError(f"{what}: {STATE} is not an object")
    return Snapshot(path, manifest, state)


def _check(what: str, name: str, size: int, digest: str, entry: dict[str, Any]) -> None:
    if size != entry["size"]:
        raise SnapshotError(f"{what}: {name} is {size} bytes, the manifest says {entry['size']} (truncated?)")
    if digest != entry["sha256"]:
        raise SnapshotError(f"{what}: {name} does not match its SHA-256 in the manifest (corrupt)")
