"""The control socket: QMP-like JSON lines over a Unix stream socket, served with trio.

`vtl run --control PATH` serves it for the life of the run (docs/control-socket.md has
the protocol).  It runs in the trio thread of vtl/run/control.py, beside the scheduler's
worker thread, so it never touches a vCPU: it reads the partition's and the scheduler's
state (plain attribute reads, atomic under the GIL), asks for a stop or a reset the way
the signal handlers do, and streams events.

A client is not trusted to behave.  Everything a client can make the VMM hold is bounded:
a line (MAX_LINE, longer ones are skipped with an error), the clients (MAX_CLIENTS, more
are refused), the replies waiting for a client that does not read (REPLY_QUEUE: then we
stop reading from it, which blocks only that client) and the events waiting for it
(EVENT_QUEUE: then events are dropped and counted, never queued without bound and never
waited for on the vCPU thread), and the time spent on requests (PACING), which hold the
GIL the vCPU thread needs.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import socket
import stat
import sys
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Literal, get_args

import trio
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from vmm.errors import VmmError
from vmm.memattr import describe
from vmm.x86 import PINNED_MSRS
from vtl.abi import ABI
from vtl.core.events import Event
from vtl.run.result import RunResult
from vtl.run.scheduler import Scheduler

MAX_LINE = 64 * 1024         # bytes in one request line, newline excluded
MAX_CLIENTS = 8
MAX_DEPTH = 32               # arrays and objects nested in one request (the id included)
REPLY_QUEUE = 16             # replies not yet written to a client before we stop reading it
EVENT_QUEUE = 1024           # events per subscriber waiting to be written; beyond: lost
EVENT_BATCH = 256            # events per write
RECV_SIZE = 16384
SHUTDOWN_GRACE = 1.0         # seconds to flush the last events and the shutdown line
CLOSE_DRAIN = 0.2            # seconds a closing connection's unread input is drained
# After a request took t seconds to handle, no request (of any client) is handled for
# PACING * t: requests hold the GIL the vCPU thread needs between two KVM_RUNs, and a
# client that sends them back to back would otherwise slow the guest several times over
# (query-protections walks every page).  4: requests take at most a fifth of the time.
PACING = 4.0
SUN_PATH_MAX = 107           # sizeof(sockaddr_un.sun_path) - 1 on Linux

# Every event kind the EventLog can emit (the discriminator of vtl.core.events.Event).
EVENT_KINDS: frozenset[str] = frozenset(
    cls.model_fields["kind"].default for cls in get_args(get_args(Event)[0]))
# The kinds emitted only while `EventLog.trace` is on (the scheduler's per-call events): a
# subscriber gets them only if it asked (subscribe {"trace": true}), even when someone
# else turned tracing on.
TRACE_KINDS: frozenset[str] = frozenset({"vtl_call", "vtl_return", "single_step"}) & EVENT_KINDS


class ControlSocketError(VmmError):
    """The control socket cannot be opened (a usage error: `vtl run` exits 2)."""


def _version() -> str:
    try:
        return metadata.version("vtl-kvm")
    except metadata.PackageNotFoundError:
        return "unknown"


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
ErrorClass = Literal["GenericError", "CommandNotFound", "InvalidArgument", "InvalidState",
                     "TooManyClients"]


class CommandError(Exception):
    def __init__(self, cls: ErrorClass, desc: str) -> None:
        super().__init__(desc)
        self.cls = cls
        self.desc = desc


_NO_ID = object()


def _line(obj: dict[str, Any]) -> bytes:
    return (json.dumps(obj, separators=(",", ":"), allow_nan=False) + "\n").encode()


async def _close_gracefully(stream: trio.SocketStream) -> None:
    """Close a client's connection so that what was sent reaches it: end our side first,
    then drop what the client still sends (briefly).  Closing a socket with unread input
    makes the kernel send a reset, and the client would lose the last lines (the
    shutdown event) queued before it."""
    with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_DRAIN):
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, trio.BusyResourceError,
                                 OSError):
            await stream.send_eof()
            while await stream.receive_some(65536):
                pass
    with contextlib.suppress(OSError):
        await stream.aclose()


def _error_line(cls: ErrorClass, desc: str, ident: Any = _NO_ID) -> bytes:
    msg: dict[str, Any] = {"error": {"class": cls, "desc": desc}}
    if ident is not _NO_ID:
        msg["id"] = ident
        try:
            return _line(msg)
        except (ValueError, RecursionError):   # an id that parsed but does not serialize
            del msg["id"]
    return _line(msg)


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
    # command past whoever reads the first (RFC 8259 leaves duplicates undefined).
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise ValueError(f"duplicate key {key[:64]!r}")
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


def _event_line(event: Event) -> bytes:
    # pydantic writes the event's JSON itself (faster than dumping to a dict first).
    data = event.model_dump_json(exclude={"kind", "ts"})
    return f'{{"event":{json.dumps(event.kind)},"data":{data},"timestamp":{event.ts!r}}}\n'.encode()


# --- arguments -------------------------------------------------------------------------------
class _NoArgs(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class _SubscribeArgs(_NoArgs):
    trace: bool = False
    kinds: list[str] | None = Field(default=None, max_length=64)


@dataclass(frozen=True)
class Actions:
    """What the control plane does for a client (vtl/run/control.py provides them)."""
    stop: Callable[[], None]            # end the run as "stopped" (STATUS_STOPPED)
    reset: Callable[[str], None]        # ask for an emulated RESET, by whom; may raise


@dataclass(frozen=True)
class _Command:
    name: str
    args: type[_NoArgs]
    help: str


COMMANDS = [
    _Command("query-commands", _NoArgs, "the commands this server knows"),
    _Command("query-status", _NoArgs, "the run: running or not, each VP's state, VTL1, counters"),
    _Command("query-protections", _NoArgs, "VTL0's memory attributes, register intercepts, pinned MSRs"),
    _Command("subscribe", _SubscribeArgs, "stream events to this client; arguments: trace (per-call "
             "events too), kinds (only these)"),
    _Command("unsubscribe", _NoArgs, "stop streaming events; returns how many were lost"),
    _Command("stop", _NoArgs, "end the run: reason \"stopped\", exit status 5"),
    _Command("reset", _NoArgs, "emulated RESET of the partition (VTL0 boots again)"),
]
COMMAND_NAMES = [c.name for c in COMMANDS]
_BY_NAME = {c.name: c for c in COMMANDS}


# --- events from the vCPU thread -------------------------------------------------------------
class _Feed:
    """One subscriber's events on their way from the emitting (vCPU) thread to trio.

    The vCPU thread only appends to a deque it never lets grow past EVENT_QUEUE (it is the
    one producer, and the consumer only removes) and asks trio, at most once per batch, to
    wake the client's writer.  One run_sync_soon per event would queue without bound in
    trio's own entry queue whenever trio falls behind; this keeps one pending at a time.
    `lost` is written by the producer only; the consumer remembers what it reported.
    """

    def __init__(self, token: trio.lowlevel.TrioToken, wake: Callable[[], None],
                 kinds: frozenset[str] | None, trace: bool, capacity: int) -> None:
        self.queue: deque[Event] = deque()
        self.lost = 0
        self.reported_lost = 0
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


# What a client's writer task is told: a line to write, "events are waiting", or "close".
_EVENTS = object()
_CLOSE = object()


class _Client:
    def __init__(self, server: ControlServer, stream: trio.SocketStream, number: int) -> None:
        self.server = server
        self.stream = stream
        self.number = number
        self.out_send, self.out_recv = trio.open_memory_channel[Any](REPLY_QUEUE)
        self.feed: _Feed | None = None
        self.events_waiting = False     # a wake found the channel full: the writer checks this
        self.cancel = trio.CancelScope()
        self.reading = trio.CancelScope()

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
        feed = self.feed
        if feed is None:
            return
        feed.scheduled = False          # before draining: a later event wakes us again
        while True:
            batch: list[bytes] = []
            total = feed.lost           # one read: the vCPU thread may count on meanwhile
            if total > feed.reported_lost:
                batch.append(_line({"event": "events_lost",
                                    "data": {"count": total - feed.reported_lost, "total": total},
                                    "timestamp": self.server.now()}))
                feed.reported_lost = total
            while feed.queue and len(batch) < EVENT_BATCH:
                batch.append(_event_line(feed.queue.popleft()))
            if not batch:
                return
            await self.stream.send_all(b"".join(batch))
            if self.feed is not feed:   # unsubscribed while we wrote
                return

    def wake(self) -> None:
        """From trio's run_sync_soon: events are waiting for this client."""
        try:
            self.out_send.send_nowait(_EVENTS)
        except trio.WouldBlock:
            self.events_waiting = True   # the writer is busy with replies; it looks after each
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass

    # --- the reader ---------------------------------------------------------------------------
    async def read_loop(self) -> None:
        buf = bytearray()
        skipping = False                # the rest of a line that was too long
        while True:
            data = await self.stream.receive_some(RECV_SIZE)
            if not data:
                return
            start = 0
            while (nl := data.find(b"\n", start)) >= 0:
                piece = data[start:nl]
                start = nl + 1
                if skipping:
                    skipping = False
                    continue
                if len(buf) + len(piece) > MAX_LINE:
                    buf.clear()
                    await self.reply(_error_line("GenericError", f"line longer than {MAX_LINE} bytes: "
                                                 "ignored"))
                    continue
                buf += piece
                line = bytes(buf)
                buf.clear()
                await self.handle_line(line)
            if not skipping:
                buf += data[start:]
                if len(buf) > MAX_LINE:
                    buf.clear()
                    skipping = True
                    await self.reply(_error_line("GenericError", f"line longer than {MAX_LINE} bytes: "
                                                 "ignored up to the next newline"))

    async def reply(self, line: bytes) -> None:
        # Blocks (this client's reader only) while REPLY_QUEUE replies wait for a client
        # that does not read: the kernel's socket buffer then pushes back on the client.
        await self.out_send.send(line)

    async def handle_line(self, raw: bytes) -> None:
        raw = raw.rstrip(b"\r")
        if not raw.strip():
            return
        server = self.server
        async with server.pacing:        # fair (FIFO): a `stop` waits for at most 8 others
            await trio.sleep_until(server.resume_at)
            t0 = time.perf_counter()
            line, after = self._answer(raw)
            # The pause is taken before the next request, not here: the reply (e.g. to
            # `stop`) goes out before what it causes.
            server.resume_at = trio.current_time() + PACING * (time.perf_counter() - t0)
        # Outside the lock: a client that does not read blocks here, and only itself.
        await self.reply(line)
        if after is not None:
            after()

    def _answer(self, raw: bytes) -> tuple[bytes, Callable[[], None] | None]:
        ident: Any = _NO_ID
        after: Callable[[], None] | None = None
        try:
            msg = _parse(raw)
            ident = msg.get("id", _NO_ID)
            cmd, args = _validate(msg)
            result, after = self.server.execute(self, cmd, args)
            out: dict[str, Any] = {"return": result}
            if ident is not _NO_ID:
                out["id"] = ident
            line = _line(out)
        except CommandError as e:
            line = _error_line(e.cls, e.desc, ident)
        except Exception as e:       # a bug here must cost one reply, not the run
            line = _error_line("GenericError", f"internal error: {type(e).__name__}: {str(e)[:200]}", ident)
        return line, after


def _parse(raw: bytes) -> dict[str, Any]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise CommandError("GenericError", "the line is not UTF-8") from None
    try:
        msg = json.loads(text, parse_constant=_reject_constant, parse_float=_finite_number,
                         object_pairs_hook=_unique_keys)
    except RecursionError:
        raise CommandError("GenericError", f"malformed JSON: nested more than {MAX_DEPTH} deep") from None
    except ValueError as e:    # also: a duplicate key, NaN, 1e999, an integer of > 4300 digits
        raise CommandError("GenericError", f"malformed JSON: {str(e)[:200]}") from None
    if _depth(msg) > MAX_DEPTH:
        raise CommandError("GenericError", f"malformed JSON: nested more than {MAX_DEPTH} deep")
    if not isinstance(msg, dict):
        raise CommandError("GenericError", 'expected a JSON object: {"execute": "<command>", '
                           '"arguments": {...}, "id": ...}')
    return msg


def _validate(msg: dict[str, Any]) -> tuple[_Command, BaseModel]:
    extra = sorted(set(msg) - {"execute", "arguments", "id"})
    if extra:
        raise CommandError("GenericError", f"unexpected member {extra[0][:64]!r} (only execute, "
                           "arguments, id)")
    name = msg.get("execute")
    if not isinstance(name, str):
        raise CommandError("GenericError", "'execute' must be a string naming a command")
    cmd = _BY_NAME.get(name)
    if cmd is None:
        raise CommandError("CommandNotFound", f"the command {name[:64]!r} has not been found "
                           "(query-commands lists them)")
    args = msg.get("arguments", {})
    if not isinstance(args, dict):
        raise CommandError("InvalidArgument", "'arguments' must be a JSON object")
    try:
        return cmd, cmd.args.model_validate(args)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "arguments"
        raise CommandError("InvalidArgument", f"{name}: {where}: {err['msg']}") from None


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
        self.result: RunResult | None = None
        self.connections = 0
        self.refused = 0
        self.pacing = trio.Lock()       # one request at a time, after a pause (PACING)
        self.resume_at = 0.0            # trio clock: when the next request may be handled

    def now(self) -> float:
        return self.events.now()

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
                await stream.send_all(_error_line("TooManyClients", why))
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
        return {"vtl": {"version": _version(), "abi": ABI.VTL_ABI_VERSION}, "capabilities": COMMAND_NAMES}

    async def finish(self, result: RunResult) -> None:
        """The run is over: tell every client, give them SHUTDOWN_GRACE to take their last
        events and that line, then drop them."""
        self.result = result
        for client in list(self.clients):
            client.reading.cancel()     # no new command from here on; queued replies still go
        line = _line({"event": "shutdown", "data": {"status": result.status, "reason": result.reason,
                                                   "message": result.message},
                      "timestamp": self.now()})
        for client in list(self.clients):
            for item in (_EVENTS, line, _CLOSE):
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

    # --- commands -------------------------------------------------------------------------------
    def execute(self, client: _Client, cmd: _Command,
                args: BaseModel) -> tuple[dict[str, Any], Callable[[], None] | None]:
        if cmd.name == "query-commands":
            return {"commands": [{"name": c.name, "help": c.help} for c in COMMANDS]}, None
        if cmd.name == "query-status":
            return self.query_status(client), None
        if cmd.name == "query-protections":
            return self.query_protections(), None
        if cmd.name == "subscribe":
            assert isinstance(args, _SubscribeArgs)
            return self.subscribe(client, args)
        if cmd.name == "unsubscribe":
            if client.feed is None:
                raise CommandError("InvalidState", "not subscribed")
            feed = client.feed
            self._unsubscribe(client)
            return {"events_lost": feed.lost}, None
        if cmd.name == "stop":
            return self.stop(), None
        if cmd.name == "reset":
            return self.reset(), None
        raise CommandError("CommandNotFound", f"the command {cmd.name!r} has not been found")

    def _run_state(self) -> str:
        if self.result is not None:
            return "stopped"
        return "stopping" if self.sched.stopping else "running"

    def query_status(self, client: _Client) -> dict[str, Any]:
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
        state = self._run_state()
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
            raise CommandError("InvalidState", "already subscribed (unsubscribe first to change it)")
        kinds = None
        if args.kinds is not None:
            unknown = sorted(set(args.kinds) - EVENT_KINDS)
            if unknown:
                raise CommandError("InvalidArgument", f"subscribe: kinds: unknown event kind "
                                   f"{unknown[0][:64]!r} (known: {', '.join(sorted(EVENT_KINDS))})")
            kinds = frozenset(args.kinds)
            if not args.trace and kinds & TRACE_KINDS:
                raise CommandError("InvalidArgument", f"subscribe: kinds: {min(kinds & TRACE_KINDS)} is a "
                                   "per-call event: subscribe with \"trace\": true to get it")
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
            self.events.remove_listener(feed)
            if feed.trace:
                self.sched.refresh_trace()

    def stop(self) -> dict[str, Any]:
        if self.result is not None or self.sched.stopping:
            return {"already_stopping": True}       # the first stop decides the status
        self.actions.stop()
        return {"already_stopping": False}

    def reset(self) -> dict[str, Any]:
        if self.result is not None or self.sched.stopping:
            raise CommandError("InvalidState", "the run is stopping")
        # "user", as the lifecycle events name a RESET asked for from outside the guest.
        self.actions.reset("user")
        return {}        # asynchronous: a `lifecycle` event (step "reset") follows


@contextlib.asynccontextmanager
async def serving(bound: BoundSocket, sched: Scheduler, actions: Actions) -> AsyncIterator[ControlServer]:
    """Serve `bound` while the body runs; the body calls `finish(result)` when the run is
    over (the clients get their last events and a shutdown line).  The socket file is
    removed by `bound.close()`, which the caller does whatever happens."""
    server = ControlServer(sched, actions, trio.lowlevel.current_trio_token())
    listener = trio.SocketListener(trio.socket.from_stdlib_socket(bound.sock))
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
