"""The control socket: QMP (QEMU's docs/interop/qmp-spec.rst) over a Unix stream socket,
served with trio.

`vtl run --control PATH` serves it for the life of the run (docs/control-socket.md has
the protocol).  QEMU's tools connect to it as they connect to QEMU (qemu.qmp's QMPClient,
qmp-shell): a greeting, capabilities negotiation, QEMU's commands with QEMU's meaning
(`query-status`, `stop`/`cont` pause and resume every VP, `system_reset`, `quit`,
`query-cpus-fast`, ...), QEMU's events (STOP, RESUME, RESET, SHUTDOWN), and beside them
the project's own commands, all named `vtl-...`.

It runs in the trio thread of vtl/run/control.py, beside the VPs' threads, so it never
touches a vCPU: it reads the partition's and the scheduler's state (plain attribute
reads, atomic under the GIL), posts requests to the VPs (pause, resume, reset) and asks
for the run's end the way the signal handlers do, and streams events.

A client is not trusted to behave.  Everything a client can make the VMM hold is bounded:
a request (MAX_LINE, longer ones are skipped with an error; MAX_DEPTH nesting), the
clients (MAX_CLIENTS, more are refused), the replies waiting for a client that does not
read (REPLY_QUEUE: then we stop reading from it, which blocks only that client) and the
events waiting for it (EVENT_QUEUE: then events are dropped and counted, never queued
without bound and never waited for on a VP's thread), and the time spent on requests
(PACING), which hold the GIL the VPs need.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import math
import os
import re
import socket
import stat
import sys
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Literal, get_args

import trio
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic_core import ErrorDetails

from vmm.errors import VmmError
from vmm.memattr import describe
from vmm.x86 import PINNED_MSRS
from vtl.core.events import Event, Lifecycle
from vtl.run.result import RunResult
from vtl.run.runner import QueueFull, Request
from vtl.run.scheduler import Scheduler, SnapshotRefused

MAX_LINE = 64 * 1024         # bytes in one request (its newline, if any, excluded)
MAX_CLIENTS = 8
MAX_DEPTH = 32               # arrays and objects nested in one request (the id included)
REPLY_QUEUE = 16             # replies not yet written to a client before we stop reading it
EVENT_QUEUE = 1024           # events per client waiting to be written (each kind); beyond: lost
EVENT_BATCH = 256            # events per write
RECV_SIZE = 16384
SHUTDOWN_GRACE = 1.0         # seconds to flush the last events and SHUTDOWN
CLOSE_DRAIN = 0.2            # seconds a closing connection's unread input is drained
# After a request took t seconds to handle, no request (of any client) is handled for
# PACING * t: requests hold the GIL the VPs need between two KVM_RUNs, and a client that
# sends them back to back would otherwise slow the guest several times over
# (vtl-query-protections walks every page).  4: requests take at most a fifth of the time.
PACING = 4.0
SUN_PATH_MAX = 107           # sizeof(sockaddr_un.sun_path) - 1 on Linux
PATH_MAX = 4095              # bytes in a file name the kernel takes (PATH_MAX - 1)
# vtl-snapshot-save waits at most this long for VP0 to save (it saves between two
# KVM_RUNs, paused or not; a 256 MiB partition takes well under a second here).
SAVE_TIMEOUT = 60.0
TARGET = "x86_64"            # QEMU's SysEmuTarget of every vCPU here

# Every event kind the EventLog can emit (the discriminator of vtl.core.events.Event):
# the project's events, which a client gets after vtl-subscribe, under these names.
EVENT_KINDS: frozenset[str] = frozenset(
    cls.model_fields["kind"].default for cls in get_args(get_args(Event)[0]))
# The kinds emitted only while `EventLog.trace` is on (the scheduler's per-call events): a
# subscriber gets them only if it asked (vtl-subscribe {"trace": true}), even when someone
# else turned tracing on.
TRACE_KINDS: frozenset[str] = frozenset({"vtl_call", "vtl_return", "single_step"}) & EVENT_KINDS


class ControlSocketError(VmmError):
    """The control socket cannot be opened (a usage error: `vtl run` exits 2)."""


@functools.cache
def _version() -> str:
    try:
        return metadata.version("vtl-kvm")
    except metadata.PackageNotFoundError:
        return "unknown"


def version_info() -> dict[str, Any]:
    """query-version's reply and the greeting's `version`: QEMU's VersionInfo, holding
    vtl-kvm's own version (this is not a QEMU release; docs/control-socket.md).  A part
    that is not a number ("0.1.0.dev3", "unknown") ends the triple; the rest are 0."""
    v = _version()
    triple = [0, 0, 0]
    for i, part in enumerate(v.split(".")[:3]):
        digits = re.match(r"\d+", part)
        if digits is None:
            break
        triple[i] = int(digits.group())
    return {"qemu": {"major": triple[0], "minor": triple[1], "micro": triple[2]}, "package": f"vtl-kvm {v}"}


# --- the socket file -----------------------------------------------------------------------
def check_path(path: Path) -> bool:
    """Can a control socket be created at `path`?  True if a stale socket (nobody accepts
    on it) is there and will be replaced.  Raises ControlSocketError otherwise."""
    raw = os.fsencode(path)
    if len(raw) > SUN_PATH_MAX:
        raise ControlSocketError(f"--control {path}: too long for a Unix socket path "
                                 f"({len(raw)} bytes, at most {SUN_PATH_MAX})")
    parent = path.parent
    if not parent.is_dir():
        raise ControlSocketError(f"--control {path}: directory {parent} does not exist")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    except OSError as e:
        raise ControlSocketError(f"--control {path}: {e.strerror}") from None
    if not stat.S_ISSOCK(st.st_mode):
        # Never replace a file, a directory or a symlink: a typo must not delete data.
        raise ControlSocketError(f"--control {path}: exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(os.fspath(path))
    except (ConnectionRefusedError, FileNotFoundError):
        return True                          # left behind by a run that did not clean up
    except OSError as e:
        raise ControlSocketError(f"--control {path}: exists and cannot be probed ({e.strerror or e}); "
                                 "refusing to replace it") from None
    finally:
        probe.close()
    raise ControlSocketError(f"--control {path}: another process is listening on it")


class BoundSocket:
    """A listening control socket and its file; `close()` closes it and removes the file,
    if the file is still this socket (never one that replaced it)."""

    def __init__(self, path: Path) -> None:
        stale = check_path(path)
        if stale:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # The socket is bound and listening under a private name in the same directory and
        # only then renamed to PATH, so that a client which sees PATH can connect: a client
        # that polls for the file (as QMP clients do) never meets a socket that refuses it
        # between bind() and listen().
        # (Where the private name would be too long for a socket address, PATH is bound directly.)
        temp = path.with_name(f".vtl{os.getpid()}.sock")
        if len(os.fsencode(temp)) > len(os.fsencode(path)) and len(os.fsencode(temp)) >= 100:
            temp = path
        # Only our user may connect: the socket can stop and reset the guest.  The umask
        # makes the file 0600 from its creation (a chmod after bind leaves a window).
        old_umask = os.umask(0o177)
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp)
            self.sock.bind(os.fspath(temp))
            self.sock.listen(MAX_CLIENTS * 2)
            self.sock.setblocking(False)
            st = os.lstat(temp)
            self._ident = (st.st_dev, st.st_ino)
            if temp != path:
                os.rename(temp, path)
        except OSError as e:
            self.sock.close()
            with contextlib.suppress(OSError):
                os.unlink(temp)
            raise ControlSocketError(f"--control {path}: cannot bind ({e.strerror or e})") from None
        finally:
            os.umask(old_umask)
        self._closed = False

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.sock.close()
        try:
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == self._ident:
                os.unlink(self.path)
        except OSError:
            pass


# --- errors and messages -------------------------------------------------------------------
# QEMU's error classes (qapi/error.json) that apply here: an unknown command is
# CommandNotFound (so is any command but qmp_capabilities before the negotiation, and
# qmp_capabilities after it, as QEMU has it); every other error is GenericError.
ErrorClass = Literal["GenericError", "CommandNotFound"]
NEGOTIATION_FIRST = "Expecting capabilities negotiation with 'qmp_capabilities'"
NEGOTIATION_DONE = "Capabilities negotiation is already complete, command ignored"


class CommandError(Exception):
    def __init__(self, cls: ErrorClass, desc: str) -> None:
        super().__init__(desc)
        self.cls = cls
        self.desc = desc


def _generic(desc: str) -> CommandError:
    return CommandError("GenericError", desc)


def _clip(text: str, limit: int = 64) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _one_line(text: str) -> str:
    return " ".join(text.split())[:400]


def _snapshot_target(path: str) -> Path:
    """vtl-snapshot-save's `path` as an absolute path (relative ones are the run's working
    directory's): a new directory in an existing one.  Checked here, where the error is
    the client's, before VP0 is asked (snapfile.write checks existence again, atomically)."""
    if not path:
        raise _generic("Parameter 'path' is empty")
    try:
        raw = os.fsencode(path)
    except UnicodeEncodeError:
        raise _generic("Parameter 'path' is not a file name (an unpaired surrogate)") from None
    if b"\0" in raw:
        raise _generic("Parameter 'path' is not a file name (a NUL byte)")
    target = Path(os.path.abspath(path))
    if len(os.fsencode(target)) > PATH_MAX:
        raise _generic(f"Parameter 'path' is longer than {PATH_MAX} bytes")
    shown = _clip(os.fsdecode(target), 200)
    if os.path.lexists(target):
        raise _generic(f"{shown} already exists (a snapshot is written to a new directory)")
    if not os.path.isdir(target.parent):          # False on any error (EACCES too)
        raise _generic(f"{_clip(os.fsdecode(target.parent), 200)} is not a directory")
    return target


_NO_ID = object()


def _line(obj: dict[str, Any]) -> bytes:
    # The server's output is ASCII (json escapes the rest) and ends with CRLF (qmp-spec.rst).
    return (json.dumps(obj, separators=(",", ":"), allow_nan=False) + "\r\n").encode()


def _reply_line(result: Any, ident: Any) -> bytes:
    msg: dict[str, Any] = {"return": result}
    if ident is not _NO_ID:
        msg["id"] = ident
    return _line(msg)


def _error_line(cls: ErrorClass, desc: str, ident: Any = _NO_ID) -> bytes:
    msg: dict[str, Any] = {"error": {"class": cls, "desc": desc}}
    if ident is not _NO_ID:
        msg["id"] = ident
        try:
            return _line(msg)
        except (ValueError, RecursionError):   # an id that parsed but does not serialize
            del msg["id"]
    return _line(msg)


def timestamp(t: float) -> dict[str, int]:
    """QMP's event timestamp: seconds and microseconds since the Unix epoch."""
    seconds = math.floor(t)
    micro = round((t - seconds) * 1e6)
    if micro >= 1_000_000:
        seconds, micro = seconds + 1, micro - 1_000_000
    return {"seconds": int(seconds), "microseconds": int(micro)}


async def _close_gracefully(stream: trio.SocketStream) -> None:
    """Close a client's connection so that what was sent reaches it: end our side first,
    then drop what the client still sends (briefly).  Closing a socket with unread input
    makes the kernel send a reset, and the client would lose the last lines (SHUTDOWN)
    queued before it."""
    with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_DRAIN):
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, trio.BusyResourceError,
                                 OSError):
            await stream.send_eof()
            while await stream.receive_some(65536):
                pass
    with contextlib.suppress(OSError):
        await stream.aclose()


# --- from bytes to requests ------------------------------------------------------------------
_NOT_SPACE = re.compile(rb"[^ \t\r\n]")
# What ends a run of ordinary bytes: outside strings (brackets, a quote, a newline, a
# control character or 0xFE/0xFF), in a string (its end, an escape, any control byte), in
# a top-level word (its newline, or a byte that is a lexical error).
_IN_STRUCT = re.compile(rb'[][{}"\n\x00-\x08\x0b\x0c\x0e-\x1f\xfe\xff]')
_IN_STRING = re.compile(rb'["\\\x00-\x1f\xfe\xff]')
_IN_WORD = re.compile(rb"[\n\x00-\x08\x0b\x0c\x0e-\x1f\xfe\xff]")
_OPEN, _CLOSE_BRACKETS, _QUOTE, _BACKSLASH, _NEWLINE = b"{[", b"}]", 0x22, 0x5C, 0x0A


class Framer:
    """Splits a client's bytes into requests, as QEMU's JSON streamer does.  A request is
    one JSON object (or array) however it is cut into writes and lines, and the next may
    follow at once: qemu.qmp sends no newline.  Anything else at the top level (a number, a
    word) is a request up to the next newline (it is an error, but only one).

    A control character other than tab, CR and LF, or a byte 0xFE/0xFF, is a lexical
    error: one error for a run of them, and what came before in the request is dropped
    (the spec's way for a client to get the parser back into a known state).  A request
    longer than MAX_LINE or nested deeper than MAX_DEPTH is one error and is skipped to its
    end: where its brackets close, or the next newline, whichever comes first.

    `feed` returns the complete requests (bytes) and errors (CommandError) in order.  Its
    memory is bounded (MAX_LINE); its time is linear, and the reader paces it (PACING)."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.active = False         # inside a request
        self.word = False           # ... that is a top-level word, not an object or array
        self.depth = 0
        self.in_string = False
        self.escape = False
        self.skipping = False       # the rest of a request that was too long or too deep
        self.bad_run = False        # the last thing seen was a lexical error

    def _reset(self) -> None:
        self.buf.clear()
        self.active = self.word = self.in_string = self.escape = self.skipping = False
        self.depth = 0

    def _bad(self, out: list[bytes | CommandError], byte: int) -> None:
        if not self.bad_run:
            out.append(_generic(f"JSON parse error, invalid byte {byte:#04x}: the request so far is dropped"))
        self.bad_run = True
        self._reset()

    def _skip(self, out: list[bytes | CommandError], desc: str) -> None:
        out.append(_generic(desc))
        self.skipping = True
        self.buf.clear()

    def _keep(self, out: list[bytes | CommandError], data: bytes, start: int, end: int) -> None:
        if self.skipping or start == end:
            return
        if len(self.buf) + (end - start) > MAX_LINE:
            self._skip(out, f"request longer than {MAX_LINE} bytes: ignored")
            return
        self.buf += data[start:end]

    def _done(self, out: list[bytes | CommandError]) -> None:
        if not self.skipping:
            out.append(bytes(self.buf))
        self._reset()

    def feed(self, data: bytes) -> list[bytes | CommandError]:
        out: list[bytes | CommandError] = []
        pos, n = 0, len(data)
        while pos < n:
            if not self.active:
                m = _NOT_SPACE.search(data, pos)
                if m is None:
                    break
                pos = m.start()
                c = data[pos]
                if c < 0x20 or c >= 0xFE:
                    self._bad(out, c)
                    pos += 1
                    continue
                self.bad_run = False
                self.active = True
                if c in _OPEN:
                    self.depth = 1
                    self._keep(out, data, pos, pos + 1)
                    pos += 1
                else:
                    self.word = True
                continue
            if self.word:
                m = _IN_WORD.search(data, pos)
                end = m.start() if m is not None else n
                self._keep(out, data, pos, end)
                if m is None:
                    break
                c = data[end]
                pos = end + 1
                if c == _NEWLINE:
                    self._done(out)
                else:
                    self._bad(out, c)
                continue
            if self.escape:                         # the byte after a backslash in a string
                c = data[pos]
                self.escape = False
                if c < 0x20 or c >= 0xFE:
                    self._bad(out, c)
                else:
                    self._keep(out, data, pos, pos + 1)
                pos += 1
                continue
            m = (_IN_STRING if self.in_string else _IN_STRUCT).search(data, pos)
            end = m.start() if m is not None else n
            self._keep(out, data, pos, end)
            if m is None:
                break
            pos = end
            c = data[pos]
            if self.in_string:
                if c == _QUOTE:
                    self.in_string = False
                elif c == _BACKSLASH:
                    self.escape = True
                else:                                # a control byte, 0xFE or 0xFF in a string
                    self._bad(out, c)
                    pos += 1
                    continue
            elif c == _QUOTE:
                self.in_string = True
            elif c in _OPEN:
                self.depth += 1
                if self.depth > MAX_DEPTH and not self.skipping:
                    self._skip(out, f"JSON parse error, nested more than {MAX_DEPTH} deep")
            elif c in _CLOSE_BRACKETS:
                self.depth -= 1
            elif c == _NEWLINE:
                if self.skipping:                    # a skipped request ends at a newline too
                    self._reset()
                    pos += 1
                    continue
            else:
                self._bad(out, c)
                pos += 1
                continue
            self._keep(out, data, pos, pos + 1)
            pos += 1
            if self.depth == 0:
                self._done(out)
        return out


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite_number(text: str) -> float:
    # 1e999 parses to inf, which no reply could echo (JSON has no inf): refused like NaN.
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:32]} is out of range")
    return value


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # The last of two equal keys would win silently: a second "execute" could smuggle a
    # command past whoever reads the first (RFC 8259 leaves duplicates undefined, the QMP
    # spec says "unpredictable results").
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise ValueError(f"duplicate key {_clip(key)!r}")
        obj[key] = value
    return obj


def _depth(value: Any) -> int:
    """How deeply `value` nests arrays and objects (iteratively: no recursion to exhaust)."""
    deepest, todo = 0, [(value, 1)]
    while todo:
        v, d = todo.pop()
        if isinstance(v, dict | list):
            deepest = max(deepest, d)
            todo.extend((x, d + 1) for x in (v.values() if isinstance(v, dict) else v))
    return deepest


def _parse(raw: bytes) -> dict[str, Any]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _generic("JSON parse error, the request is not UTF-8") from None
    try:
        msg = json.loads(text, parse_constant=_reject_constant, parse_float=_finite_number,
                         object_pairs_hook=_unique_keys)
    except RecursionError:
        raise _generic(f"JSON parse error, nested more than {MAX_DEPTH} deep") from None
    except ValueError as e:    # also: a duplicate key, NaN, 1e999, an integer of > 4300 digits
        raise _generic(f"JSON parse error, {str(e)[:200]}") from None
    if _depth(msg) > MAX_DEPTH:
        raise _generic(f"JSON parse error, nested more than {MAX_DEPTH} deep")
    if not isinstance(msg, dict):
        raise _generic("QMP input must be a JSON object")
    return msg


# --- commands and their arguments ------------------------------------------------------------
class _NoArgs(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class _CapabilitiesArgs(_NoArgs):
    enable: list[str] | None = Field(default=None, max_length=16)


class _SubscribeArgs(_NoArgs):
    trace: bool = False
    kinds: list[str] | None = Field(default=None, max_length=64)


class _SnapshotSaveArgs(_NoArgs):
    path: str


@dataclass(frozen=True)
class _Command:
    name: str
    args: type[_NoArgs] = _NoArgs
    # stop and cont wait for the VPs; they are handled one at a time, after the pacing.
    run_state: bool = False
    # Waits for a VP to do the work (vtl-snapshot-save): answered after the pacing, outside
    # its lock, so that other clients' requests go on meanwhile.
    waits: bool = False


COMMANDS = [
    # QEMU's, with QEMU's meaning (qapi/*.json).
    _Command("qmp_capabilities", _CapabilitiesArgs),
    _Command("query-version"),
    _Command("query-commands"),
    _Command("query-status"),
    _Command("query-cpus-fast"),
    _Command("stop", run_state=True),
    _Command("cont", run_state=True),
    _Command("system_reset"),
    _Command("quit"),
    # The project's own: every name starts with "vtl-", which QEMU's never do.
    _Command("vtl-query-status"),
    _Command("vtl-query-protections"),
    _Command("vtl-subscribe", _SubscribeArgs),
    _Command("vtl-unsubscribe"),
    _Command("vtl-snapshot-save", _SnapshotSaveArgs, waits=True),
]
COMMAND_NAMES = [c.name for c in COMMANDS]
_BY_NAME = {c.name: c for c in COMMANDS}

_EXPECTED = {"bool_type": "boolean", "string_type": "string", "list_type": "array", "int_type": "integer",
             "dict_type": "object", "model_type": "object"}


def _argument_error(err: ErrorDetails) -> str:
    """One line for people, in QEMU's words, from pydantic's first error (never its text)."""
    name = ""
    for part in err["loc"]:
        name += f"[{part}]" if isinstance(part, int) else (f".{part}" if name else str(part))
    name = _clip(name) or "arguments"
    kind = err["type"]
    if kind == "extra_forbidden":
        return f"Parameter '{name}' is unexpected"
    if kind == "missing":
        return f"Parameter '{name}' is missing"
    if kind in _EXPECTED:
        return f"Invalid parameter type for '{name}', expected: {_EXPECTED[kind]}"
    if kind == "too_long":
        return f"Parameter '{name}' has more than {err.get('ctx', {}).get('max_length', '?')} elements"
    return f"Parameter '{name}' has an invalid value"


def _validate(msg: dict[str, Any], negotiated: bool) -> tuple[_Command, BaseModel]:
    for key, value in msg.items():
        if key == "execute":
            if not isinstance(value, str):
                raise _generic("QMP input member 'execute' must be a string")
        elif key == "arguments":
            if not isinstance(value, dict):
                raise _generic("QMP input member 'arguments' must be an object")
        elif key != "id":
            raise _generic(f"QMP input member '{_clip(key)}' is unexpected")
    if "execute" not in msg:
        raise _generic("QMP input lacks member 'execute'")
    name = msg["execute"]
    if not negotiated and name != "qmp_capabilities":
        raise CommandError("CommandNotFound", NEGOTIATION_FIRST)
    cmd = _BY_NAME.get(name)
    if cmd is None:
        raise CommandError("CommandNotFound", f"The command {_clip(name)} has not been found")
    try:
        return cmd, cmd.args.model_validate(msg.get("arguments", {}))
    except ValidationError as e:
        raise _generic(_argument_error(e.errors()[0])) from None


@dataclass(frozen=True)
class Actions:
    """What the control plane does for a client (vtl/run/control.py provides them)."""
    quit: Callable[[], None]                # end the run as "stopped" (STATUS_STOPPED)
    reset: Callable[[str], Request]         # post an emulated RESET, by whom; may raise QueueFull


# How QEMU's events read what happened here: (guest, reason), reason a ShutdownCause.
# The run's end (RunResult.reason) as SHUTDOWN:
SHUTDOWN_CAUSES: dict[str, tuple[bool, str]] = {
    "guest_exit": (True, "guest-shutdown"),          # the guest's exit status
    "stopped_by_vtl1": (True, "guest-shutdown"),     # VTL1, the guest's own secure kernel
    "triple_fault": (True, "guest-reset"),           # as QEMU with -no-reboot
    "crash": (True, "guest-panic"),
    "halted": (True, "guest-panic"),                 # every VP halted, nothing can wake one
    "stopped": (False, "host-qmp-quit"),             # quit
    "interrupted": (False, "host-signal"),           # SIGINT
    "terminated": (False, "host-signal"),            # SIGTERM
    "timeout": (False, "host-signal"),               # the run's own timer, as timeout(1)'s signal
    "vmm_error": (False, "host-error"),
}
# A RESET (the `by` of its lifecycle event) as RESET:
RESET_CAUSES: dict[str, tuple[bool, str]] = {
    "user": (False, "host-qmp-system-reset"),
    "vtl0": (True, "guest-reset"),                   # VTL_HC_RESET
    "vtl1": (True, "guest-reset"),
    "triple_fault": (True, "guest-reset"),           # --reset-on-triple-fault
}
HOST_ERROR = (False, "host-error")


# --- events from the VPs' threads ------------------------------------------------------------
class _Feed:
    """One listener's events on their way from the emitting (VP) thread to trio.

    The emitting thread only appends to a deque it never lets grow past `capacity` (the
    consumer only removes) and asks trio, at most once per batch, to run `wake`.  One
    run_sync_soon per event would queue without bound in trio's own entry queue whenever
    trio falls behind; this keeps one pending at a time.  `lost` is written by the
    producers only.
    """

    def __init__(self, token: trio.lowlevel.TrioToken, wake: Callable[[], None],
                 kinds: frozenset[str] | None, trace: bool, capacity: int) -> None:
        self.queue: deque[Event] = deque()
        self.lost = 0
        self.kinds = kinds
        self.trace = trace
        self.capacity = capacity
        self.scheduled = False
        self._token = token
        self._wake = wake

    def __call__(self, event: Event) -> None:        # on the emitting thread: never blocks
        kind = event.kind
        if (self.kinds is not None and kind not in self.kinds) or (not self.trace and kind in TRACE_KINDS):
            return
        if len(self.queue) >= self.capacity:
            self.lost += 1
            return
        self.queue.append(event)
        if not self.scheduled:
            self.scheduled = True
            with contextlib.suppress(trio.RunFinishedError):
                self._token.run_sync_soon(self._wake)


def _wait_all(requests: Sequence[Request]) -> None:
    """In a worker thread: until every VP has acknowledged (a VP that exits acknowledges
    what it had queued, so this ends with the run at the latest)."""
    for r in requests:
        r.done.wait()


# What a client's writer task is told: a line to write, "events are waiting", or "close".
_EVENTS = object()
_CLOSE = object()


class _Client:
    def __init__(self, server: ControlServer, stream: trio.SocketStream, number: int) -> None:
        self.server = server
        self.stream = stream
        self.number = number
        self.out_send, self.out_recv = trio.open_memory_channel[Any](REPLY_QUEUE)
        self.negotiated = False
        self.feed: _Feed | None = None
        # QEMU's events (STOP, RESUME, RESET) for this client: at most EVENT_QUEUE, beyond
        # that dropped and counted like the subscription's.
        self.qmp_events: deque[bytes] = deque()
        self.qmp_lost = 0
        self.feed_lost_before = 0       # what earlier subscriptions lost
        self.reported_lost = 0
        self.wake_pending = False       # an _EVENTS is in the channel
        self.events_waiting = False     # a wake found the channel full: the writer checks this
        self.cancel = trio.CancelScope()
        self.reading = trio.CancelScope()

    def lost_total(self) -> int:
        feed = self.feed
        return self.qmp_lost + self.feed_lost_before + (feed.lost if feed is not None else 0)

    # --- the writer: the only task that writes to the stream, so lines never interleave ---
    async def write_loop(self) -> None:
        async for item in self.out_recv:
            if item is _CLOSE:
                return
            if item is not _EVENTS:
                await self.stream.send_all(item)
            if item is _EVENTS or self.events_waiting:
                self.events_waiting = False
                await self._write_events()

    async def _write_events(self) -> None:
        self.wake_pending = False
        server = self.server
        while True:
            feed = self.feed
            if feed is not None:
                feed.scheduled = False      # before draining: a later event wakes us again
            batch: list[bytes] = []
            total = self.lost_total()       # one read: the VPs' threads may count on meanwhile
            if total > self.reported_lost:
                batch.append(server.event_line("events_lost", {"count": total - self.reported_lost,
                                                               "total": total}))
                self.reported_lost = total
            while self.qmp_events and len(batch) < EVENT_BATCH:
                batch.append(self.qmp_events.popleft())
            while feed is not None and feed.queue and len(batch) < EVENT_BATCH:
                batch.append(server.project_event_line(feed.queue.popleft()))
            if not batch:
                return
            # A feed dropped while this is written (vtl-unsubscribe) gives nothing more: the
            # loop reads self.feed again.
            await self.stream.send_all(b"".join(batch))

    def wake(self) -> None:
        """Events are waiting for this client (on the trio thread)."""
        if self.wake_pending:
            return
        try:
            self.out_send.send_nowait(_EVENTS)
            self.wake_pending = True
        except trio.WouldBlock:
            self.events_waiting = True   # the writer is busy with replies; it looks after each
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass

    def push_event(self, line: bytes) -> None:
        if len(self.qmp_events) >= EVENT_QUEUE:
            self.qmp_lost += 1
            return
        self.qmp_events.append(line)
        self.wake()

    # --- the reader ---------------------------------------------------------------------------
    async def read_loop(self) -> None:
        framer = Framer()
        server = self.server
        while True:
            data = await self.stream.receive_some(RECV_SIZE)
            if not data:
                return
            async with server.pacing:     # splitting bytes into requests is paced like requests
                await trio.sleep_until(server.resume_at)
                t0 = time.perf_counter()
                items = framer.feed(data)
                server.resume_at = trio.current_time() + PACING * (time.perf_counter() - t0)
            for item in items:
                if isinstance(item, CommandError):
                    await self.reply(_error_line(item.cls, item.desc))
                else:
                    await self.handle_request(item)

    async def reply(self, line: bytes) -> None:
        # Blocks (this client's reader only) while REPLY_QUEUE replies wait for a client
        # that does not read: the kernel's socket buffer then pushes back on the client.
        await self.out_send.send(line)

    async def handle_request(self, raw: bytes) -> None:
        server = self.server
        async with server.pacing:        # fair (FIFO): a `quit` waits for at most 8 others
            await trio.sleep_until(server.resume_at)
            t0 = time.perf_counter()
            line, later, after = self._answer(raw)
            # The pause is taken before the next request, not here: the reply goes out
            # before what it causes.
            server.resume_at = trio.current_time() + PACING * (time.perf_counter() - t0)
        if later is not None:
            line = await later()
        # Outside the lock: a client that does not read blocks here, and only itself.
        await self.reply(line)
        if after is not None:
            after()

    def _answer(self, raw: bytes) -> tuple[bytes, Callable[[], Awaitable[bytes]] | None,
                                           Callable[[], None] | None]:
        ident: Any = _NO_ID
        try:
            msg = _parse(raw)
            ident = msg.get("id", _NO_ID)
            cmd, args = _validate(msg, self.negotiated)
            if cmd.run_state:
                return b"", lambda: self.server.run_state_command(cmd.name, ident), None
            if cmd.waits:
                return b"", lambda: self.server.waiting_command(cmd, args, ident), None
            result, after = self.server.execute(self, cmd, args)
            return _reply_line(result, ident), None, after
        except CommandError as e:
            return _error_line(e.cls, e.desc, ident), None, None
        except Exception as e:       # a bug here must cost one reply, not the run
            return _error_line("GenericError", f"internal error: {type(e).__name__}: {str(e)[:200]}",
                               ident), None, None


# --- the server ------------------------------------------------------------------------------
class ControlServer:
    def __init__(self, sched: Scheduler, actions: Actions, token: trio.lowlevel.TrioToken) -> None:
        self.sched = sched
        self.p = sched.p
        self.events = sched.events
        self.actions = actions
        self.token = token
        self.clients: set[_Client] = set()
        self.started = time.monotonic()
        # Event times are the EventLog's (seconds since the partition was made): this is
        # that origin on the Unix epoch, which QMP's timestamps count from.
        self.epoch0 = time.time() - (time.monotonic() - self.events.t0)
        self.result: RunResult | None = None
        self.connections = 0
        self.refused = 0
        self.pacing = trio.Lock()       # one request at a time, after a pause (PACING)
        self.resume_at = 0.0            # trio clock: when the next request may be handled
        self.run_state_lock = trio.Lock()   # stop and cont, one at a time, each to its end
        self.paused = False             # stopped (QMP's stop): every VP acknowledged its pause
        self.quitting = False
        self.pending_reset: Request | None = None
        self.pending_save: Request | None = None     # vtl-snapshot-save: one at a time
        # RESETs, from the lifecycle events (whoever asked for them), become QEMU's RESET.
        self._lifecycle = _Feed(token, self._on_lifecycle, frozenset({"lifecycle"}), False, 64)

    def now(self) -> float:
        return self.events.now()

    def start(self) -> None:
        self.events.add_listener(self._lifecycle)

    def close(self) -> None:
        self.events.remove_listener(self._lifecycle)

    # --- events -------------------------------------------------------------------------------
    def event_line(self, name: str, data: dict[str, Any] | None = None, ts: float | None = None) -> bytes:
        msg: dict[str, Any] = {"event": name}
        if data is not None:                # QEMU leaves `data` out of an event that has none
            msg["data"] = data
        msg["timestamp"] = timestamp(self.epoch0 + (self.now() if ts is None else ts))
        return _line(msg)

    def project_event_line(self, event: Event) -> bytes:
        # pydantic writes the event's JSON itself (faster than dumping to a dict first);
        # the server's output is ASCII.
        data = event.model_dump_json(exclude={"kind", "ts"})
        if not data.isascii():
            data = json.dumps(json.loads(data), separators=(",", ":"))
        stamp = json.dumps(timestamp(self.epoch0 + event.ts), separators=(",", ":"))
        return f'{{"event":{json.dumps(event.kind)},"data":{data},"timestamp":{stamp}}}\r\n'.encode()

    def broadcast(self, name: str, data: dict[str, Any] | None = None, ts: float | None = None) -> None:
        """A QEMU event to every client past the negotiation (as QEMU: no subscription)."""
        line = self.event_line(name, data, ts)
        for client in list(self.clients):
            if client.negotiated:
                client.push_event(line)

    def _on_lifecycle(self) -> None:
        feed = self._lifecycle
        feed.scheduled = False
        while feed.queue:
            event = feed.queue.popleft()
            if isinstance(event, Lifecycle) and event.step == "reset":
                guest, reason = RESET_CAUSES.get(event.by, HOST_ERROR)
                self.broadcast("RESET", {"guest": guest, "reason": reason, "by": event.by}, event.ts)

    # --- connections ---------------------------------------------------------------------------
    async def serve(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        while True:
            try:
                stream = await listener.accept()
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                return
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    await trio.sleep(0.1)         # out of fds: keep serving who is connected
                    continue
                raise
            self.connections += 1
            if len(self.clients) >= MAX_CLIENTS or self.result is not None:
                self.refused += 1
                nursery.start_soon(self._refuse, stream)
            else:
                client = _Client(self, stream, self.connections)
                self.clients.add(client)
                nursery.start_soon(self._run_client, client)

    async def _refuse(self, stream: trio.SocketStream) -> None:
        why = "the run is over" if self.result is not None else f"too many clients (at most {MAX_CLIENTS})"
        with trio.move_on_after(1.0):
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                await stream.send_all(_error_line("GenericError", why))
        with contextlib.suppress(OSError):
            await stream.aclose()

    async def _run_client(self, client: _Client) -> None:
        # Neither task lets an exception out of the nursery: two at once would come out as
        # an exception group that no handler here expects.  Either side failing, or the
        # writer ending, ends the connection; the reader ending (EOF) first lets the writer
        # flush what is queued.
        try:
            with client.cancel:
                client.out_send.send_nowait(_line(self.greeting()))
                async with trio.open_nursery() as n:
                    async def read() -> None:
                        with client.reading:
                            if await self._guarded(client, client.read_loop):
                                await client.out_send.send(_CLOSE)
                            else:
                                n.cancel_scope.cancel()

                    n.start_soon(read)
                    await self._guarded(client, client.write_loop)
                    n.cancel_scope.cancel()
        finally:
            self._unsubscribe(client)
            self.clients.discard(client)
            await _close_gracefully(client.stream)

    async def _guarded(self, client: _Client, loop: Callable[[], Awaitable[None]]) -> bool:
        """Run one of a client's loops; False if it failed (the client went away, or a bug,
        which costs this client and not the run)."""
        try:
            await loop()
            return True
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            return False
        except Exception as e:
            print(f"vtl: control socket: client {client.number} dropped: internal error: "
                  f"{type(e).__name__}: {e}", file=sys.stderr)
            return False

    def greeting(self) -> dict[str, Any]:
        return {"QMP": {"version": version_info(), "capabilities": []}}

    async def finish(self, result: RunResult) -> None:
        """The run is over: tell every client (SHUTDOWN after the events still queued for
        it), give them SHUTDOWN_GRACE to take those lines, then drop them."""
        self.result = result
        for client in list(self.clients):
            client.reading.cancel()     # no new command from here on; queued replies still go
        guest, reason = SHUTDOWN_CAUSES.get(result.reason, HOST_ERROR)
        line = self.event_line("SHUTDOWN", {"guest": guest, "reason": reason, "exit-status": result.status,
                                            "exit-reason": result.reason, "message": result.message})
        for client in list(self.clients):
            for item in (_EVENTS, line, _CLOSE) if client.negotiated else (_CLOSE,):
                try:
                    client.out_send.send_nowait(item)
                except trio.WouldBlock:
                    client.events_waiting = True
                    break
                except (trio.ClosedResourceError, trio.BrokenResourceError):
                    break
        with trio.move_on_after(SHUTDOWN_GRACE):
            while self.clients:
                await trio.sleep(0.01)
        for client in list(self.clients):
            client.cancel.cancel()
        for client in list(self.clients):
            self._unsubscribe(client)

    # --- the run's state ---------------------------------------------------------------------
    def ending(self) -> bool:
        """The run is ending or over: quit, a signal, the timeout, or a VP that stopped."""
        return (self.result is not None or self.quitting or self.sched.stopping
                or any(vp.state.name == "stopped" for vp in self.p.vps))

    def run_state(self) -> str:
        """QEMU's RunState of the run: running, paused (stop) or shutdown (ending)."""
        if self.ending():
            return "shutdown"
        return "paused" if self.paused else "running"

    async def run_state_command(self, name: str, ident: Any) -> bytes:
        async with self.run_state_lock:
            try:
                return _reply_line(await self.stop() if name == "stop" else self.cont(), ident)
            except CommandError as e:
                return _error_line(e.cls, e.desc, ident)

    async def stop(self) -> dict[str, Any]:
        """QEMU's stop: pause every VP, reply once each acknowledged (out of KVM_RUN, at a
        point where nothing is half done), STOP before the reply.  Paused already, or the
        run ending: nothing to do, no event (as QEMU)."""
        if self.paused or self.ending():
            return {}
        try:
            requests = self.sched.pause_all()
        except QueueFull as e:
            raise _generic(f"cannot pause: {e}") from None
        await trio.to_thread.run_sync(_wait_all, requests, abandon_on_cancel=True)
        if self.ending():
            return {}                       # SHUTDOWN follows instead
        self.paused = True
        self.broadcast("STOP")
        return {}

    def cont(self) -> dict[str, Any]:
        """QEMU's cont: resume what stop paused, RESUME before the reply."""
        if self.ending():
            raise _generic("the run is ending: there is nothing to continue")
        if not self.paused:
            return {}
        self.paused = False
        try:
            self.sched.resume_all()
        except QueueFull as e:
            raise _generic(f"cannot resume: {e}") from None
        self.broadcast("RESUME")
        return {}

    async def waiting_command(self, cmd: _Command, args: BaseModel, ident: Any) -> bytes:
        try:
            assert cmd.name == "vtl-snapshot-save" and isinstance(args, _SnapshotSaveArgs)
            return _reply_line(await self.snapshot_save(args), ident)
        except CommandError as e:
            return _error_line(e.cls, e.desc, ident)

    async def snapshot_save(self, args: _SnapshotSaveArgs) -> dict[str, Any]:
        """vtl-snapshot-save: ask VP0 for a snapshot at `path` (Scheduler.request_snapshot)
        and reply with the save's record.  VP0 saves at the top of its loop, with every
        other VP paused for the save, whether the run is running or stopped (`stop`); the
        run's pause state is what it was.  The wait is a worker thread's, bounded by
        SAVE_TIMEOUT; one save at a time (a second is refused at once)."""
        target = _snapshot_target(args.path)
        if self.ending():
            raise _generic("the run is ending: there is nothing to save")
        pending = self.pending_save
        if pending is not None and not pending.done.is_set():
            raise _generic("a snapshot is being saved already (one at a time)")
        try:
            req = self.sched.request_snapshot(target, by="user")
        except QueueFull as e:
            raise _generic(f"cannot save: {e}") from None
        self.pending_save = req
        finished = await trio.to_thread.run_sync(functools.partial(req.done.wait, SAVE_TIMEOUT),
                                                 abandon_on_cancel=True)
        if not finished:
            raise _generic(f"the snapshot {target} is not saved after {SAVE_TIMEOUT:.0f} s "
                           "(VP0 may still write it)")
        result = req.result
        if isinstance(result, SnapshotRefused):
            raise _generic(f"cannot save the snapshot: {_one_line(str(result))}")
        if not isinstance(result, dict):
            raise _generic("the run ended before the snapshot was saved")
        return {"path": result["path"], "policy-digest": result["policy_digest"],
                "memory-sha256": result["memory_sha256"], "duration-us": result["duration_us"],
                "by": result["by"]}

    def system_reset(self) -> dict[str, Any]:
        """QEMU's system_reset: ask for an emulated RESET and reply at once; RESET follows
        when VP0 has carried it out (while paused: after cont).  One pending at a time, as
        QEMU's reset request is one flag."""
        if self.ending():
            raise _generic("the run is ending")
        pending = self.pending_reset
        if pending is not None and not pending.done.is_set():
            return {}
        try:
            # "user", as the lifecycle events name a RESET asked for from outside the guest.
            self.pending_reset = self.actions.reset("user")
        except QueueFull as e:
            raise _generic(f"cannot reset: {e}") from None
        return {}

    def quit(self) -> tuple[dict[str, Any], Callable[[], None] | None]:
        if self.ending():
            return {}, None                 # the first end decides the status
        self.quitting = True
        return {}, self.actions.quit        # after the reply is queued: it goes out before SHUTDOWN

    # --- commands -------------------------------------------------------------------------------
    def execute(self, client: _Client, cmd: _Command,
                args: BaseModel) -> tuple[Any, Callable[[], None] | None]:
        match cmd.name:
            case "qmp_capabilities":
                assert isinstance(args, _CapabilitiesArgs)
                return self.qmp_capabilities(client, args)
            case "query-version":
                return version_info(), None
            case "query-commands":
                return [{"name": name} for name in COMMAND_NAMES], None
            case "query-status":
                state = self.run_state()
                return {"running": state == "running", "singlestep": False, "status": state}, None
            case "query-cpus-fast":
                return self.query_cpus_fast(), None
            case "system_reset":
                return self.system_reset(), None
            case "quit":
                return self.quit()
            case "vtl-query-status":
                return self.vtl_query_status(client), None
            case "vtl-query-protections":
                return self.query_protections(), None
            case "vtl-subscribe":
                assert isinstance(args, _SubscribeArgs)
                return self.subscribe(client, args)
            case "vtl-unsubscribe":
                if client.feed is None:
                    raise _generic("not subscribed")
                feed = client.feed
                self._unsubscribe(client)
                return {"events_lost": feed.lost}, None
        raise CommandError("CommandNotFound", f"The command {cmd.name} has not been found")

    def qmp_capabilities(self, client: _Client,
                         args: _CapabilitiesArgs) -> tuple[dict[str, Any], Callable[[], None] | None]:
        if client.negotiated:
            raise CommandError("CommandNotFound", NEGOTIATION_DONE)
        if args.enable:                     # the greeting offers none (no "oob")
            raise _generic(f"Capability {_clip(', '.join(args.enable))} not available")

        def negotiated() -> None:
            # After the reply is queued: no event comes before it.
            client.negotiated = True

        return {}, negotiated

    def query_cpus_fast(self) -> list[dict[str, Any]]:
        """QEMU's CpuInfoFast per vCPU: one per VP and VTL (VTL0's first, so that cpu-index
        n < VPs is VP n's VTL0), both of a VP on the VP's thread; the rest is the project's."""
        p, sched = self.p, self.sched
        vtls = (0, 1) if p.vtl1_image is not None else (0,)
        per_vp = []
        for vp, runner in zip(p.vps, sched.runners, strict=True):
            per_vp.append((vp, runner, vp.state, sum(vp.port_counts) + sum(vp.exit_counts.values())))
        out = []
        for vtl in vtls:
            for vp, runner, st, exits in per_vp:
                tid = runner.native_id
                out.append({
                    "cpu-index": vtl * len(per_vp) + vp.index,
                    "qom-path": f"/machine/vp[{vp.index}]/vtl[{vtl}]",
                    "thread-id": tid if tid is not None else -1,
                    "target": TARGET,
                    "vp": vp.index,
                    "vtl": vtl,
                    "created": vp.vcpus[vtl] is not None,     # VTL1's: from its enable to a teardown
                    "active": st.vtl is not None and int(st.vtl) == vtl,
                    "state": st.name,
                    "run-state": runner.state.value,
                    "exits": exits,                           # the VP's (both its entries)
                    "vtl-calls": vp.vtl_calls,
                    "vtl-returns": vp.vtl_returns,
                })
        return out

    def vtl_query_status(self, client: _Client) -> dict[str, Any]:
        p, sched = self.p, self.sched
        vps = []
        for vp, runner in zip(p.vps, sched.runners, strict=True):
            st = vp.state                 # one read: the state object is replaced, never changed
            entry: dict[str, Any] = {"index": vp.index, "state": st.name, "description": str(st),
                                     "active_vtl": int(st.vtl) if st.vtl is not None else None,
                                     "run_state": runner.state.value,
                                     "vtl_calls": vp.vtl_calls, "vtl_returns": vp.vtl_returns}
            if st.entry is not None:
                entry["entry"] = st.entry.name.lower()
            if st.name == "stopped":
                entry["exit"] = {"status": st.status, "reason": st.reason, "message": st.message}
            vps.append(entry)
        state = self.run_state()
        feed = client.feed
        return {
            "status": state,
            "running": state == "running",
            "run_time_s": round(time.monotonic() - self.started, 6),
            "scenario": p.config.scenario or "boot",
            "param": p.config.param,
            "backend": p.backend_name,
            "vps": vps,
            "vtl1": {"available": p.vtl1_image is not None, "enabled": p.vtl1_enabled,
                     "measurement": p.vtl1_measurement},
            "vtl_calls": sched.vtl_calls,
            "vtl_returns": sched.vtl_returns,
            "single_steps": sched.stepper.count,
            "register_intercepts": sched.intercepts.register_count,
            "boot_count": p.boot_count,   # VTL0 boots before the current one (resets + kexecs)
            "resets": sched.resets,
            "kexecs": sched.kexecs,
            "exits": sched.exits_by_reason(),
            "events": dict(self.events.counts),
            "clients": len(self.clients),
            "clients_refused": self.refused,
            "subscription": None if feed is None else {
                "trace": feed.trace, "kinds": sorted(feed.kinds) if feed.kinds is not None else None,
                "events_lost": feed.lost},
            "events_lost": client.lost_total(),
        }

    def query_protections(self) -> dict[str, Any]:
        p = self.p
        lo, hi = p.layout.vtl1_base, p.layout.vtl1_end
        vtl0: list[dict[str, Any]] = []
        for start, end, attrs in p.vtl0_runs():
            if attrs < 0:       # VTL1's own region: never mapped in VTL0's VM
                vtl0.append({"start": start, "end": end, "pages": (end - start) >> 12,
                             "vtl1_region": True, "access": None, "attrs": None})
            else:
                vtl0.append({"start": start, "end": end, "pages": (end - start) >> 12,
                             "vtl1_region": False, "access": describe(attrs), "attrs": attrs})
        applied = [{"start": s, "end": e, "pages": (e - s) >> 12, "access": describe(a), "attrs": a}
                   for s, e, a in p.backend.runs()]
        msrs = [{"index": i, "name": n} for i, n in sorted(PINNED_MSRS.items())]
        ctl = p.intercept_control
        ictl = None
        if ctl is not None:
            ictl = {"flags": ctl.flags, "registers": ctl.registers, "cr0_mask": ctl.cr0_mask,
                    "cr4_mask": ctl.cr4_mask, "priv_gpa": ctl.priv_gpa, "priv_pages": ctl.priv_pages}
        return {
            "backend": p.backend_name,
            "vtl1_region": {"start": lo, "end": hi},
            "vtl0": vtl0,                 # what VTL1 set, as the VMM holds it
            "applied": applied,           # what the backend applied to VTL0's VM
            "intercept_control": ictl,    # None until VTL1 sets it
            # The VPs whose register writes VTL1 judges (what it judges is per VP: docs/smp.md).
            "pinned_vps": [vp.index for vp in p.vps if p.intercept_controls.pinned(vp.index)],
            # Writes to these MSRs exit to the VMM (KVM's MSR filter); while VTL1 is enabled
            # each is an intercept VTL1 judges (pinned), before that the VMM applies it.
            "msr_filter": msrs,
            "pinned_msrs": msrs if p.vtl1_enabled else [],
        }

    def subscribe(self, client: _Client,
                  args: _SubscribeArgs) -> tuple[dict[str, Any], Callable[[], None] | None]:
        if client.feed is not None:
            raise _generic("already subscribed (vtl-unsubscribe first to change it)")
        kinds = None
        if args.kinds is not None:
            unknown = sorted(set(args.kinds) - EVENT_KINDS)
            if unknown:
                raise _generic(f"Parameter 'kinds' has an unknown event kind '{_clip(unknown[0])}' "
                               f"(known: {', '.join(sorted(EVENT_KINDS))})")
            kinds = frozenset(args.kinds)
            if not args.trace and kinds & TRACE_KINDS:
                raise _generic(f"Parameter 'kinds': {min(kinds & TRACE_KINDS)} is a per-call event: "
                               "subscribe with \"trace\": true to get it")
        feed = _Feed(self.token, client.wake, kinds, args.trace, EVENT_QUEUE)

        def start() -> None:
            # After the reply is queued, so that no event overtakes it.
            if client.feed is None and self.result is None:
                client.feed = feed
                self.events.add_listener(feed, trace=feed.trace)
                if feed.trace:
                    self.sched.refresh_trace()

        return {"trace": args.trace, "kinds": sorted(kinds) if kinds is not None else None}, start

    def _unsubscribe(self, client: _Client) -> None:
        feed, client.feed = client.feed, None
        if feed is not None:
            client.feed_lost_before += feed.lost
            self.events.remove_listener(feed)
            if feed.trace:
                self.sched.refresh_trace()


@contextlib.asynccontextmanager
async def serving(bound: BoundSocket, sched: Scheduler, actions: Actions) -> AsyncIterator[ControlServer]:
    """Serve `bound` while the body runs; the body calls `finish(result)` when the run is
    over (the clients get their last events and SHUTDOWN).  The socket file is removed by
    `bound.close()`, which the caller does whatever happens."""
    server = ControlServer(sched, actions, trio.lowlevel.current_trio_token())
    listener = trio.SocketListener(trio.socket.from_stdlib_socket(bound.sock))
    server.start()
    try:
        async with trio.open_nursery() as nursery:
            async def accept() -> None:
                try:
                    await server.serve(listener, nursery)
                except Exception as e:     # stop serving, never end the run
                    print(f"vtl: control socket {bound.path}: stopped serving: {type(e).__name__}: {e}",
                          file=sys.stderr)

            nursery.start_soon(accept)
            try:
                yield server
            finally:
                with contextlib.suppress(OSError):
                    await listener.aclose()
                if server.result is None:   # the body failed before finish(): drop everyone now
                    for client in list(server.clients):
                        client.cancel.cancel()
                        server._unsubscribe(client)
                nursery.cancel_scope.cancel()
    finally:
        server.close()
