"""The control socket (docs/control-socket.md): a real client over the real Unix socket
against a real, long-running guest, speaking QMP byte by byte (tests/test_qmp.py drives it
with QEMU's own qemu.qmp and qmp-shell).  The run happens in the test's main thread (it
installs signal handlers); the client talks to it from a thread, like an operator would."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import pytest

from tests.vtlrun import REPO, RUN_TIMEOUT, SAFETY_TIMEOUT, control_sock_path, vtl_cli, wait_for_path
from vtl.abi import ABI
from vtl.core.config import PartitionConfig
from vtl.core.events import EventLog, GuestExit, VtlCall
from vtl.core.partition import Partition
from vtl.run import control, controlsock
from vtl.run.result import RunResult
from vtl.run.scheduler import Scheduler
from vtl.services.outcomes import STATUS_STOPPED

pytestmark = pytest.mark.kvm


class Client:
    """A QMP client on the plain socket module: JSON objects one per line out, lines in."""

    def __init__(self, path: Path, timeout: float = 60.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(os.fspath(path))
        self.buf = b""
        self.raw_lines: list[bytes] = []           # every line as it came, CRLF included
        self.events: list[dict[str, Any]] = []     # events seen while waiting for replies

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def line(self) -> dict[str, Any] | None:
        while b"\n" not in self.buf:
            data = self.sock.recv(65536)
            if not data:
                return None
            self.buf += data
        raw, self.buf = self.buf.split(b"\n", 1)
        self.raw_lines.append(raw + b"\n")
        msg = json.loads(raw)
        assert isinstance(msg, dict)
        return msg

    def reply(self) -> dict[str, Any]:
        """The next reply (events before it are kept in `events`)."""
        while True:
            msg = self.line()
            assert msg is not None, "connection closed before the reply"
            if "event" in msg:
                self.events.append(msg)
                continue
            return msg

    def cmd(self, execute: str, ident: Any = None, **arguments: Any) -> dict[str, Any]:
        msg: dict[str, Any] = {"execute": execute}
        if arguments:
            msg["arguments"] = arguments
        if ident is not None:
            msg["id"] = ident
        self.send_raw(json.dumps(msg).encode() + b"\n")
        return self.reply()

    def ok(self, execute: str, **arguments: Any) -> Any:
        r = self.cmd(execute, ident=execute, **arguments)
        assert "return" in r and r.get("id") == execute, r
        return r["return"]

    def close(self) -> None:
        self.sock.close()


def _connect(path: Path, negotiate: bool = True) -> tuple[Client, dict[str, Any]]:
    c = Client(path)
    greeting = c.line()
    assert greeting is not None
    if negotiate and "QMP" in greeting:
        assert c.ok("qmp_capabilities") == {}
    return c, greeting


@contextmanager
def _partition(images: tuple[Path, Path], scenario: str, param: int,
               events: EventLog | None = None) -> Iterator[Partition]:
    cfg = PartitionConfig(vtl0_image=images[0], vtl1_image=images[1], scenario=scenario, param=param)
    with Partition(cfg, events or EventLog(keep=1000)) as p:
        yield p


def _run_with_client(p: Partition, path: Path, client: Callable[[], None],
                     timeout: float = RUN_TIMEOUT) -> tuple[RunResult, Scheduler]:
    """Run `p` with the control socket at `path` in this thread, `client` in another; a
    client that fails still ends the run (by `quit`), and its failure is raised here."""
    failure: list[BaseException] = []

    def body() -> None:
        try:
            wait_for_path(path)
            client()
        except BaseException as e:
            failure.append(e)
            try:
                c, _ = _connect(path)
                c.cmd("quit")
            except OSError:
                pass

    t = threading.Thread(target=body, daemon=True)
    t.start()
    result, sched = control.run(p, None, timeout, control_path=path)
    t.join(30)
    assert not t.is_alive(), "the client thread hung"
    if failure:
        raise failure[0]
    return result, sched


def _stamp(msg: dict[str, Any]) -> tuple[int, int]:
    ts = msg["timestamp"]
    assert set(ts) == {"seconds", "microseconds"} and 0 <= ts["microseconds"] < 1_000_000, ts
    return ts["seconds"], ts["microseconds"]


# ---- the commands ---------------------------------------------------------------------------
def test_status_protections_events_and_quit(guest_images: tuple[Path, Path], tmp_path: Path) -> None:
    """bench-intercept-allow hardens first (attributes, locked tables, register intercepts)
    and then makes ~2M intercepted writes: long enough to look at it while it runs."""
    path = control_sock_path(tmp_path)
    seen: dict[str, Any] = {}

    def client() -> None:
        c, greeting = _connect(path)
        seen["greeting"], seen["greeting_raw"] = greeting, c.raw_lines[0]
        seen["commands"] = [x["name"] for x in c.ok("query-commands")]
        seen["version"] = c.ok("query-version")
        # Hardened once VTL1 has set the intercept control and the guest writes its audit page.
        deadline = time.monotonic() + 30
        while True:
            prot = c.ok("vtl-query-protections")
            st = c.ok("vtl-query-status")
            if prot["intercept_control"] is not None and st["events"].get("intercept", 0) > 0:
                break
            assert time.monotonic() < deadline, (prot, st)
            time.sleep(0.05)
        seen["status"], seen["prot"] = st, prot
        seen["qmp_status"] = c.ok("query-status")
        seen["cpus"] = c.ok("query-cpus-fast")
        # Events: intercepts and their verdicts stream in, in order, with timestamps.
        assert c.ok("vtl-subscribe", kinds=["intercept", "verdict"]) == {"trace": False,
                                                                         "kinds": ["intercept", "verdict"]}
        got = [c.line() for _ in range(20)]
        seen["events"] = got
        seen["now"] = time.time()
        lost = c.ok("vtl-unsubscribe")["events_lost"]
        assert isinstance(lost, int)
        seen["status2"] = c.ok("vtl-query-status")
        assert c.ok("quit") == {}
        with suppress(BrokenPipeError):         # the run may be over already
            c.send_raw(b'{"execute": "quit", "id": 2}\n')
        # Then the last lines: the second quit's reply if it came before the run ended (the
        # first end decides), SHUTDOWN carrying the result, and EOF.
        tail = []
        while (msg := c.line()) is not None:
            tail.append(msg)
        seen["tail"] = tail
        seen["raw"] = c.raw_lines

    with _partition(guest_images, "bench-intercept-allow", 2_000_000) as p:
        result, sched = _run_with_client(p, path, client)
        vtl1_measurement = p.vtl1_measurement

    # QMP's greeting: QEMU's VersionInfo holding vtl-kvm's version, no capability offered.
    version = controlsock.version_info()
    assert seen["greeting"] == {"QMP": {"version": version, "capabilities": []}}
    assert version["package"].startswith("vtl-kvm ") and set(version["qemu"]) == {"major", "minor", "micro"}
    assert seen["version"] == version
    assert seen["commands"] == controlsock.COMMAND_NAMES
    assert {"qmp_capabilities", "query-status", "stop", "cont", "system_reset", "quit", "query-cpus-fast",
            "query-commands", "query-version", "vtl-query-protections",
            "vtl-subscribe"} <= set(seen["commands"])
    # Output is ASCII, each message a line ending in CRLF.
    assert all(line.endswith(b"\r\n") and line.isascii() for line in seen["raw"]), seen["raw"][:3]

    assert seen["qmp_status"] == {"running": True, "singlestep": False, "status": "running"}
    cpus = seen["cpus"]                         # one VP, VTL0 and VTL1
    assert [(x["cpu-index"], x["vp"], x["vtl"]) for x in cpus] == [(0, 0, 0), (1, 0, 1)]
    assert all(x["target"] == "x86_64" and x["thread-id"] > 0 for x in cpus)
    assert cpus[0]["thread-id"] == cpus[1]["thread-id"]     # both VTLs of a VP on its thread
    assert all(x["created"] for x in cpus) and sum(x["active"] for x in cpus) == 1
    st = seen["status"]
    assert st["status"] == "running" and st["running"] is True
    assert st["scenario"] == "bench-intercept-allow" and st["param"] == 2_000_000
    assert st["vtl1"] == {"available": True, "enabled": True, "measurement": vtl1_measurement}
    assert len(st["vtl1"]["measurement"]) == 64
    assert [vp["index"] for vp in st["vps"]] == [0]
    assert st["vps"][0]["state"] in ("running_vtl0", "in_vtl1") and st["vps"][0]["active_vtl"] in (0, 1)
    assert st["run_time_s"] > 0 and st["vtl_calls"] > 0 and st["clients"] == 1
    assert st["subscription"] is None
    assert seen["status2"]["vtl_returns"] > st["vtl_returns"]     # it kept running meanwhile

    prot = seen["prot"]
    assert prot["backend"] == p.backend_name
    runs = prot["vtl0"]
    assert runs[0]["start"] == 0 and runs[-1]["end"] == p.layout.mem_size
    assert all(a["end"] == b["start"] for a, b in zip(runs, runs[1:], strict=False))
    accesses = {r["access"] for r in runs}
    assert {"r-x", "r--", "rw-"} <= accesses            # text, read-only data, the rest NX
    vtl1 = [r for r in runs if r["vtl1_region"]]
    assert [(r["start"], r["end"]) for r in vtl1] == [(p.layout.vtl1_base, p.layout.vtl1_end)]
    assert prot["applied"]
    ictl = prot["intercept_control"]
    assert ictl["flags"] and "cr0" in ictl["registers"] and ictl["priv_pages"] > 0
    assert {m["name"] for m in prot["pinned_msrs"]} >= {"EFER", "LSTAR"}

    events = seen["events"]
    assert {e["event"] for e in events} <= {"intercept", "verdict", "events_lost"}
    assert any(e["event"] == "intercept" and e["data"]["type"] == "memory" for e in events)
    # QMP's timestamps: seconds and microseconds since the epoch, in order, and recent.
    stamps = [_stamp(e) for e in events if e["event"] != "events_lost"]
    assert stamps == sorted(stamps)
    assert abs(stamps[-1][0] - seen["now"]) < 60

    assert result.status == STATUS_STOPPED == 5 and result.reason == "stopped"
    tail = seen["tail"]
    assert tail and tail[-1]["event"] == "SHUTDOWN"
    for msg in tail:
        assert msg.get("event") or msg == {"return": {}, "id": 2}, msg
    assert tail[-1]["data"] == {"guest": False, "reason": "host-qmp-quit", "exit-status": 5,
                                "exit-reason": "stopped", "message": result.message}
    assert not path.exists()
    assert not sched.events._listeners            # every subscriber is gone with its client


def test_per_call_events_only_for_the_subscriber_that_asks(guest_images: tuple[Path, Path],
                                                            tmp_path: Path) -> None:
    """bench-null-call makes 2M null VTL calls: vtl_call/vtl_return are emitted only while a
    subscriber asked for trace, and only that subscriber gets them."""
    path = control_sock_path(tmp_path)
    events = EventLog(keep=0)                  # trace off, as in `vtl run` without --events
    seen: dict[str, Any] = {}

    def client() -> None:
        plain, _ = _connect(path)
        assert plain.ok("vtl-subscribe") == {"trace": False, "kinds": None}
        bad = plain.cmd("vtl-subscribe")
        assert bad["error"] == {"class": "GenericError",
                                "desc": "already subscribed (vtl-unsubscribe first to change it)"}, bad
        seen["trace_before"] = events.trace
        traced, _ = _connect(path)
        r = traced.cmd("vtl-subscribe", ident=1, kinds=["vtl_call"])
        assert r["error"]["class"] == "GenericError" and "trace" in r["error"]["desc"], r
        assert traced.ok("vtl-subscribe", trace=True, kinds=["vtl_call", "vtl_return"])["trace"] is True
        calls: list[dict[str, Any]] = []
        while len(calls) < 50:
            msg = traced.line()
            assert msg is not None
            assert msg["event"] in ("vtl_call", "vtl_return", "events_lost"), msg
            if msg["event"] == "vtl_call":
                calls.append(msg)
        seen["calls"] = calls
        seen["trace_on"] = events.trace
        seen["sub"] = traced.ok("vtl-query-status")["subscription"]
        traced.ok("vtl-unsubscribe")
        seen["trace_off"] = events.trace
        plain.ok("query-status")                # events that reached `plain` meanwhile: kept
        seen["plain_events"] = plain.events
        plain.ok("quit")
        seen["tail"] = list(iter(plain.line, None))      # the last events, then SHUTDOWN
        plain.close()
        traced.close()

    with _partition(guest_images, "bench-null-call", 2_000_000, events) as p:
        result, sched = _run_with_client(p, path, client)
    assert seen["trace_before"] is False
    assert seen["trace_on"] is True and seen["trace_off"] is False and sched._trace is False
    assert all(e["data"]["code"] == ABI.VTL_CALL_NOP and e["data"]["vtl"] == 0 for e in seen["calls"])
    assert seen["sub"]["trace"] is True and seen["sub"]["kinds"] == ["vtl_call", "vtl_return"]
    assert not [e for e in seen["plain_events"] if e["event"] in controlsock.TRACE_KINDS]
    assert result.reason == "stopped"
    tail = seen["tail"]
    assert [m["event"] for m in tail[-2:]] == ["guest_exit", "SHUTDOWN"], tail
    assert tail[-2]["data"]["status"] == STATUS_STOPPED and tail[-2]["data"]["reason"] == "stopped"


def test_event_listener_api_is_thread_safe_and_keeps_trace_semantics() -> None:
    """EventLog's listeners without KVM: trace is held while a tracing listener listens,
    restored after; a failing listener is counted and never raised into emit()."""
    log = EventLog(keep=10)
    got: list[str] = []

    def broken(_e: object) -> None:
        raise RuntimeError("boom")

    log.add_listener(got.append)         # type: ignore[arg-type]
    log.add_listener(broken, trace=True)  # type: ignore[arg-type]
    assert log.trace is True
    log.emit(VtlCall(ts=0.0, code=1, arg=2))
    log.emit(GuestExit(ts=0.1, status=0, reason="guest_exit"))
    assert [e.kind for e in got] == ["vtl_call", "guest_exit"]    # type: ignore[attr-defined]
    assert log.listener_errors == 2 and log.counts["vtl_call"] == 1
    log.remove_listener(broken)          # type: ignore[arg-type]
    assert log.trace is False
    log.remove_listener(broken)          # type: ignore[arg-type]  # twice: a no-op
    log.remove_listener(got.append)      # type: ignore[arg-type]
    log.emit(VtlCall(ts=0.2, code=1, arg=2))
    assert len(got) == 2
    traced = EventLog(trace=True)
    traced.add_listener(got.append, trace=True)   # type: ignore[arg-type]
    traced.remove_listener(got.append)            # type: ignore[arg-type]
    assert traced.trace is True                   # it was on before: it stays on

    # Many threads adding and removing while one emits: nothing lost from the log itself.
    log2 = EventLog(keep=0)
    stop = threading.Event()

    def churn() -> None:
        while not stop.is_set():
            fn: Callable[[Any], None] = lambda e: None  # noqa: E731
            log2.add_listener(fn, trace=True)
            log2.remove_listener(fn)

    threads = [threading.Thread(target=churn) for _ in range(4)]
    for t in threads:
        t.start()
    for i in range(20000):
        log2.emit(VtlCall(ts=float(i), code=0, arg=0))
    stop.set()
    for t in threads:
        t.join()
    assert log2.counts["vtl_call"] == 20000 and log2.listener_errors == 0
    assert not log2._listeners and log2.trace is False


def test_qemu_events_go_to_every_negotiated_client_and_never_before(guest_images: tuple[Path, Path],
                                                                     tmp_path: Path) -> None:
    """Two VPs spinning (no VTL1): one client's stop and another's cont reach every client
    past the negotiation, as QEMU broadcasts its events; a client still negotiating gets
    none, and after qmp_capabilities its reply comes first."""
    path = control_sock_path(tmp_path)
    seen: dict[str, Any] = {}

    def client() -> None:
        a, _ = _connect(path)
        b, _ = _connect(path)
        late, _ = _connect(path, negotiate=False)
        assert a.ok("stop") == {}
        assert b.ok("query-status")["status"] == "paused"
        assert b.ok("cont") == {}
        assert a.ok("query-status")["status"] == "running"
        seen["a"], seen["b"] = list(a.events), list(b.events)
        late.send_raw(b'{"execute": "qmp_capabilities", "id": "late"}')
        seen["late_first"] = late.line()          # nothing came before the reply
        assert late.ok("stop") == {}
        assert late.ok("cont") == {}
        seen["late"] = late.events
        late.ok("quit")
        seen["tails"] = [[m.get("event") for m in iter(x.line, None)] for x in (a, b, late)]

    cfg = PartitionConfig(vtl0_image=guest_images[0], vtl1_image=None, scenario="smp-spin", param=0, nr_vps=2)
    with Partition(cfg, EventLog(keep=100)) as p:
        result, _ = _run_with_client(p, path, client)

    # Each event before the reply of the command that caused it, to every client.
    assert [e["event"] for e in seen["a"]] == ["STOP", "RESUME"], seen["a"]
    assert [e["event"] for e in seen["b"]] == ["STOP", "RESUME"], seen["b"]
    assert seen["late_first"] == {"return": {}, "id": "late"}
    assert [e["event"] for e in seen["late"]] == ["STOP", "RESUME"]
    # a and b also got late's STOP and RESUME, then SHUTDOWN; every one ends with SHUTDOWN.
    assert seen["tails"] == [["STOP", "RESUME", "SHUTDOWN"]] * 2 + [["SHUTDOWN"]], seen["tails"]
    assert result.reason == "stopped"


# ---- hostile clients ------------------------------------------------------------------------
def test_hostile_clients_get_errors_and_the_run_goes_on(guest_images: tuple[Path, Path],
                                                        tmp_path: Path) -> None:
    """hypercall-storm refuses an unknown hypercall per iteration, each a `refused` event:
    a firehose for a subscriber that never reads."""
    path = control_sock_path(tmp_path)
    seen: dict[str, Any] = {}

    def client() -> None:
        # Before the negotiation only qmp_capabilities runs (QEMU's words), and no event comes.
        c, _ = _connect(path, negotiate=False)
        early = {name: c.cmd(name, ident=name) for name in ("query-status", "query-commands", "no-such")}
        c.send_raw(b"{oops}\n")
        early["garbage"] = c.reply()
        assert c.ok("qmp_capabilities") == {}
        early["again"] = c.cmd("qmp_capabilities", ident="again")
        other, _ = _connect(path, negotiate=False)
        early["enable"] = other.cmd("qmp_capabilities", ident=9, enable=["oob"])
        other.close()
        seen["early"] = early

        deadline = time.monotonic() + 20
        while c.ok("vtl-query-status")["exits"].get("io:hypercall", 0) == 0:     # the storm is on
            assert time.monotonic() < deadline
            time.sleep(0.02)
        errors: dict[str, list[dict[str, Any]]] = {}

        def bad(name: str, raw: bytes) -> None:
            """Send `raw`, then a request that works: everything before its reply answers `raw`."""
            c.send_raw(raw + b'{"execute": "query-status", "id": "sync"}\n')
            got = []
            while (r := c.reply()).get("id") != "sync":
                got.append(r)
            assert got and all("error" in r for r in got), (name, got)
            errors[name] = got

        bad("garbage", b"this is not json\n")
        # A request cut short waits for the rest, as QEMU's does; a control character resets
        # the parser (qmp-spec.rst: "Forcing the JSON parser into known-good state").
        bad("truncated", b'{"execute": "query-status"\n\x1b')
        bad("not-object", b"[1, 2, 3]\n")
        bad("number", b"42\n")
        bad("no-execute", b'{"arguments": {}}\n')
        bad("execute-not-string", b'{"execute": 7}\n')
        bad("extra-member", b'{"execute": "query-status", "foo": 1}\n')
        bad("exec-oob", b'{"exec-oob": "query-status"}\n')          # no "oob" capability
        bad("unknown", b'{"execute": "no-such-command", "id": 1}\n')
        bad("args-not-object", b'{"execute": "vtl-subscribe", "arguments": [true]}\n')
        bad("args-wrong-type", b'{"execute": "vtl-subscribe", "arguments": {"trace": "yes"}, "id": "t"}\n')
        bad("args-item-type", b'{"execute": "vtl-subscribe", "arguments": {"kinds": [1]}}\n')
        bad("args-too-many", b'{"execute": "vtl-subscribe", "arguments": {"kinds": ['
            + b",".join([b'"refused"'] * 65) + b"]}}\n")
        bad("args-unknown", b'{"execute": "query-status", "arguments": {"verbose": true}}\n')
        bad("kinds-unknown", b'{"execute": "vtl-subscribe", "arguments": {"kinds": ["nope"]}}\n')
        bad("nan", b'{"execute": "query-status", "id": NaN}\n')
        bad("not-utf8", b'{"execute": "\x80\xc3"}\n')
        bad("byte-ff", b'{"execute": "\xff"}\n')     # a lexical error, then the stray `"}`
        bad("deep", b"[" * 100_000 + b"\n")            # longer than a request may be, too
        bad("deep-short", b'{"id": ' + b"[" * 30_000 + b"]" * 30_000 + b', "execute": "x"}\n')
        bad("huge-int", b'{"execute": "query-status", "id": ' + b"9" * 5000 + b"}\n")
        bad("unsubscribe-first", b'{"execute": "vtl-unsubscribe"}\n')
        # A second "execute" used to win (the last key): a `quit` smuggled behind a query.
        bad("duplicate-execute", b'{"execute": "query-status", "execute": "quit", "id": 2}\n')
        bad("duplicate-argument", b'{"execute": "vtl-subscribe", "arguments": {"trace": false, '
                                  b'"trace": true}}\n')
        bad("id-inf", b'{"execute": "query-status", "id": 1e999}\n')    # was an internal ValueError
        bad("id-too-deep", b'{"execute": "query-status", "id": ' + b"[" * 40 + b"]" * 40 + b"}\n")
        bad("reset-args", b'{"execute": "system_reset", "arguments": {"x": 1}}\n')
        # A request of 1 MiB without a newline for a while: one error, then skipped to the newline.
        c.send_raw(b"x" * (1 << 20))
        r = c.reply()
        assert r["error"]["class"] == "GenericError" and "longer than" in r["error"]["desc"], r
        c.send_raw(b'y" }\n')                           # the end of that line: ignored
        c.send_raw(b"\r\n   \n\t")                       # whitespace between requests: ignored
        seen["errors"] = errors
        assert c.ok("query-status")["running"] is True   # the same connection still works

        # The id comes back as it was sent, whatever JSON value it is.
        idents: list[Any] = [0, -1.5, "s", None, True, [1, {"a": []}], {"x": {"y": "z"}}, 2**70,
                             "\u00e9\u2603"]
        seen["idents"] = []
        for ident in idents:
            c.send_raw(json.dumps({"execute": "query-status", "id": ident}).encode() + b"\n")
            seen["idents"].append((ident, c.reply()))
        # Framing as QEMU's streamer: requests back to back with no newline (as qemu.qmp
        # sends them), one cut across writes and lines, brackets inside strings.
        c.send_raw(b'{"execute":"query-status","id":"a"}{"execute":"query-version","id":"b"}')
        seen["back_to_back"] = [c.reply(), c.reply()]
        for piece in (b'{"exe', b'cute": "query-st', b'atus",\n "id"', b': "}{][\\', b'"x"\n', b"}"):
            c.send_raw(piece)
            time.sleep(0.01)
        seen["cut"] = c.reply()

        # 20 more clients: 7 fit beside `c` (8 at most), the rest are told and cut off.
        extra: list[Client] = []
        refused: list[dict[str, Any]] = []
        for _ in range(20):
            x = Client(path)
            first = x.line()
            assert first is not None
            if "error" in first:
                refused.append(first)
                assert x.line() is None              # then closed
                x.close()
            else:
                assert x.ok("qmp_capabilities") == {}
                extra.append(x)
        seen["accepted"], seen["refused"] = len(extra), refused

        # A subscriber that never reads, with per-call tracing off: the VMM drops and counts.
        slow = extra[0]
        slow.send_raw(b'{"execute": "vtl-subscribe", "id": "s"}\n')
        s0 = c.ok("vtl-query-status")
        time.sleep(2.0)
        s1 = c.ok("vtl-query-status")
        seen["s0"], seen["s1"] = s0, s1
        # Now read: the subscribe reply, events, and an events_lost notice with the count.
        got_lost = 0
        deadline = time.monotonic() + 20
        while not got_lost:
            msg = slow.line()
            assert msg is not None and time.monotonic() < deadline
            if msg.get("event") == "events_lost":
                got_lost = msg["data"]["total"]
        seen["lost_event"] = got_lost
        lost = slow.ok("vtl-unsubscribe")["events_lost"]
        seen["lost"] = lost
        # Half a message, then the client vanishes; a client that connects and says nothing.
        extra[1].send_raw(b'{"execute": "query-st')
        for x in extra:
            x.close()
        time.sleep(0.2)
        st = c.ok("vtl-query-status")
        seen["final"] = st
        again, _ = _connect(path)                 # slots are free again
        again.close()
        c.ok("quit")

    with _partition(guest_images, "hypercall-storm", 1 << 40) as p:
        result, sched = _run_with_client(p, path, client, timeout=RUN_TIMEOUT)

    early = seen["early"]
    for name in ("query-status", "query-commands", "no-such"):
        assert early[name] == {"error": {"class": "CommandNotFound", "desc": controlsock.NEGOTIATION_FIRST},
                               "id": name}, early[name]
    assert early["garbage"]["error"]["class"] == "GenericError"
    assert early["again"] == {"error": {"class": "CommandNotFound", "desc": controlsock.NEGOTIATION_DONE},
                              "id": "again"}
    assert early["enable"] == {"error": {"class": "GenericError", "desc": "Capability oob not available"},
                               "id": 9}

    errors = {name: got[0] for name, got in seen["errors"].items()}
    assert {name for name, got in seen["errors"].items() if len(got) != 1} == {"byte-ff"}
    assert len(seen["errors"]["byte-ff"]) == 2
    assert errors["unknown"] == {"error": {"class": "CommandNotFound",
                                           "desc": "The command no-such-command has not been found"}, "id": 1}
    # Every other error is GenericError with a line for people in QEMU's words, never
    # pydantic's text nor an internal error.
    for name, got in seen["errors"].items():
        for r in got:
            desc = r["error"]["desc"]
            cls = "CommandNotFound" if name == "unknown" else "GenericError"
            assert r["error"]["class"] == cls, (name, r)
            assert "internal error" not in desc and "Input should" not in desc and "pydantic" not in desc, r
            assert "\n" not in desc and len(desc) < 400, r
            assert "id" not in r or name in ("deep-short", "unknown", "args-wrong-type"), (name, r)
    wanted = {
        "truncated": "JSON parse error, invalid byte 0x1b",
        "not-object": "QMP input must be a JSON object",
        "number": "QMP input must be a JSON object",
        "no-execute": "QMP input lacks member 'execute'",
        "execute-not-string": "QMP input member 'execute' must be a string",
        "extra-member": "QMP input member 'foo' is unexpected",
        "exec-oob": "QMP input member 'exec-oob' is unexpected",
        "args-not-object": "QMP input member 'arguments' must be an object",
        "args-wrong-type": "Invalid parameter type for 'trace', expected: boolean",
        "args-item-type": "Invalid parameter type for 'kinds[0]', expected: string",
        "args-too-many": "Parameter 'kinds' has more than 64 elements",
        "args-unknown": "Parameter 'verbose' is unexpected",
        "reset-args": "Parameter 'x' is unexpected",
        "kinds-unknown": "Parameter 'kinds' has an unknown event kind 'nope'",
        "unsubscribe-first": "not subscribed",
        "not-utf8": "JSON parse error, the request is not UTF-8",
        "deep": "nested more than 32 deep",
        "deep-short": "nested more than 32 deep",
        "id-too-deep": "nested more than 32 deep",
        "duplicate-execute": "duplicate key 'execute'",
        "id-inf": "1e999 is out of range",
        "huge-int": "4300 digits",
    }
    for name, text in wanted.items():
        assert text in errors[name]["error"]["desc"], (name, errors[name])
    assert errors["args-wrong-type"]["id"] == "t"
    for ident, r in seen["idents"]:
        assert r == {"return": {"running": True, "singlestep": False, "status": "running"}, "id": ident}, r
    assert [r["id"] for r in seen["back_to_back"]] == ["a", "b"]
    assert seen["back_to_back"][1]["return"] == controlsock.version_info()
    assert seen["cut"]["id"] == '}{]["x' and seen["cut"]["return"]["status"] == "running"
    assert seen["accepted"] == controlsock.MAX_CLIENTS - 1
    assert len(seen["refused"]) == 20 - (controlsock.MAX_CLIENTS - 1)
    assert all(r == {"error": {"class": "GenericError", "desc": "too many clients (at most 8)"}}
               for r in seen["refused"])
    # The guest kept going the whole time.
    exits = [s["exits"]["io:hypercall"] for s in (seen["s0"], seen["s1"], seen["final"])]
    assert exits == sorted(exits) and exits[0] < exits[1] < exits[2]
    assert seen["s1"]["events"]["refused"] > seen["s0"]["events"]["refused"]
    assert seen["lost"] >= seen["lost_event"] > 0
    assert seen["final"]["clients"] == 1 and seen["final"]["running"] is True
    assert seen["final"]["clients_refused"] == len(seen["refused"])
    assert result.reason == "stopped" and result.status == STATUS_STOPPED
    assert not path.exists()


# ---- the socket file, through the CLI -------------------------------------------------------
LONG = ("run", "--scenario", "hypercall-storm", "--param", str(1 << 40), "--quiet")


def test_control_path_that_is_not_a_stale_socket_is_a_usage_error(tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_text("keep me")
    cp = vtl_cli("run", "--control", str(f))
    assert cp.returncode == 2 and "not a socket" in cp.stderr and len(cp.stderr.splitlines()) == 1, cp.stderr
    assert f.read_text() == "keep me"
    link = tmp_path / "link"
    link.symlink_to(f)
    for what in (tmp_path, link):                 # a directory, a symlink: never replaced
        cp = vtl_cli("run", "--control", str(what))
        assert cp.returncode == 2 and "not a socket" in cp.stderr, cp.stderr
    assert link.is_symlink()
    cp = vtl_cli("run", "--control", str(tmp_path / "missing" / "c.sock"))
    assert cp.returncode == 2 and "does not exist" in cp.stderr and "Traceback" not in cp.stderr
    cp = vtl_cli("run", "--control", "/tmp/" + "x" * 200)
    assert cp.returncode == 2 and "too long" in cp.stderr
    # A socket somebody listens on is theirs.
    path = control_sock_path(tmp_path)
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    live.bind(os.fspath(path))
    live.listen(1)
    try:
        cp = vtl_cli("run", "--control", str(path))
        assert cp.returncode == 2 and "another process" in cp.stderr, cp.stderr
        assert path.exists()
    finally:
        live.close()
        path.unlink()


def test_stale_socket_is_replaced_and_removed_after_the_run(tmp_path: Path) -> None:
    path = control_sock_path(tmp_path)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(os.fspath(path))
    stale.close()                                  # the file stays, nobody listens
    assert path.exists()
    cp = vtl_cli("run", "--quiet", "--control", str(path))
    assert cp.returncode == 0, cp.stderr
    assert not path.exists()


@pytest.mark.parametrize("how,status", [("sigterm", 143), ("sigint", 130), ("timeout", 124), ("quit", 5)])
def test_socket_file_is_removed_however_the_run_ends(tmp_path: Path, how: str, status: int) -> None:
    path = control_sock_path(tmp_path)
    extra = ("--timeout", "2") if how == "timeout" else ("--timeout", "600")
    p = subprocess.Popen([sys.executable, "-m", "vtl", *LONG, *extra, "--json", "--control", str(path)],
                         cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_path(path)
        assert os.stat(path).st_mode & 0o777 == 0o600
        c, _ = _connect(path)
        assert c.ok("query-status")["running"] is True
        if how == "sigterm":
            p.send_signal(signal.SIGTERM)
        elif how == "sigint":
            p.send_signal(signal.SIGINT)
        elif how == "quit":
            c.ok("quit")
        out, err = p.communicate(timeout=SAFETY_TIMEOUT)
        c.close()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == status, err
    assert json.loads(out)["status"] == status and "Traceback" not in err
    assert not path.exists()


# ---- reset ----------------------------------------------------------------------------------
def test_reset_over_the_socket_clears_everything_and_vtl0_boots_again(guest_images: tuple[Path, Path],
                                                                      tmp_path: Path) -> None:
    """bench-intercept-allow hardens (attributes, locked tables, register intercepts, VTL1
    pinning the MSRs) and then runs long; `system_reset` ends VTL1 and every protection, and
    VTL0 boots again from its image (and hardens again: the same scenario)."""
    path = control_sock_path(tmp_path)
    seen: dict[str, Any] = {}

    def client() -> None:
        c, _ = _connect(path)
        deadline = time.monotonic() + 30
        while c.ok("vtl-query-protections")["intercept_control"] is None:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        seen["before"] = c.ok("vtl-query-status")
        c.ok("vtl-subscribe", kinds=["lifecycle", "vtl_enabled"])
        assert c.ok("system_reset") == {}
        events: list[dict[str, Any]] = list(c.events)
        while not any(e["event"] == "vtl_enabled" for e in events):
            msg = c.line()
            assert msg is not None
            events.append(msg)
        seen["events"] = events
        seen["after"] = c.ok("vtl-query-status")
        c.ok("quit")
        tail = [m for m in iter(c.line, None)]
        assert tail[-1]["event"] == "SHUTDOWN"

    with _partition(guest_images, "bench-intercept-allow", 2_000_000) as p:
        result, sched = _run_with_client(p, path, client, timeout=RUN_TIMEOUT)

    before, after = seen["before"], seen["after"]
    assert before["boot_count"] == 0 and before["resets"] == 0 and before["vtl1"]["enabled"]
    events = seen["events"]
    steps = [(e["event"], e["data"].get("step")) for e in events]
    resets = [e for e in events if e["event"] == "lifecycle" and e["data"]["step"] == "reset"]
    assert len(resets) == 1, steps
    # QEMU's RESET, to every client, as QEMU words a reset asked for by system_reset.
    qemu_resets = [e for e in events if e["event"] == "RESET"]
    assert [e["data"] for e in qemu_resets] == [{"guest": False, "reason": "host-qmp-system-reset",
                                                 "by": "user"}]
    assert qemu_resets[0]["timestamp"] == resets[0]["timestamp"]
    r = resets[0]["data"]
    assert r["by"] == "user"
    assert r["before"]["vtl1_enabled"] and r["before"]["intercept_control"] is not None
    assert r["before"]["protected_pages"] and r["before"]["msr_pins"]
    # Everything VTL1 set is gone with it, its memory zeroed; VTL0 is on its second boot.
    assert not r["after"]["vtl1_enabled"] and r["after"]["vtl1_measurement"] is None
    assert r["after"]["intercept_control"] is None and not r["after"]["protected_pages"]
    assert not r["after"]["backend_protected_runs"] and not r["after"]["msr_pins"]
    assert r["after"]["vtl1_region_zero"] and r["after"]["boot_count"] == 1
    # Then VTL0 booted again and enabled a new VTL1, measured the same.
    enabled = [e for e in events if e["event"] == "vtl_enabled"]
    assert enabled and _stamp(enabled[-1]) > _stamp(resets[0])
    assert enabled[-1]["data"]["sha256"] == before["vtl1"]["measurement"]
    assert after["boot_count"] == 1 and after["resets"] == 1 and after["running"] is True
    assert result.reason == "stopped" and result.resets == 1 and result.boot_count == 1
    assert not path.exists()
