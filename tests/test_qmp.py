"""QEMU's own QMP tools against `vtl run --control` (docs/control-socket.md): qemu.qmp's
QMPClient and qmp-shell, as they are, drive a real run on real KVM.  The run is the CLI in a
subprocess, as a person would start it; the tools talk to its socket from this process."""

from __future__ import annotations

import ast
import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import EventListener, ExecuteError, QMPClient

from tests.vtlrun import REPO, SAFETY_TIMEOUT, control_sock_path, wait_for_path
from vtl.run import controlsock

pytestmark = pytest.mark.kvm

QMP_SHELL = Path(sys.executable).with_name("qmp-shell")     # qemu.qmp's console script
WAIT = 60.0       # seconds a reply, an event or a counter may take on a loaded 2-core machine
# Runs that go on until told: two VPs spinning on refused hypercalls (no VTL1), or one VP
# making null VTL calls into VTL1.  The latter on the Python switch path (VTL_FASTPATH=0):
# the C path counts the calls it makes on its own and hands the counts to the VMM only
# when it returns to Python (a pause, a request, another exit), so while it runs the VP's
# VTL-call counters lag (docs/control-socket.md, query-cpus-fast).
SPIN = ("--no-vtl1", "--vps", "2", "--scenario", "smp-spin", "--param", "0")
NULL_CALLS = ("--scenario", "bench-null-call", "--param", "2000000")     # its most: ~50 s here
PYTHON_SWITCH = {"VTL_FASTPATH": "0"}


@contextmanager
def _vtl_run(tmp_path: Path, *args: str,
             env: dict[str, str] | None = None) -> Iterator[tuple[subprocess.Popen[str], Path]]:
    path = control_sock_path(tmp_path)
    proc = subprocess.Popen([sys.executable, "-m", "vtl", "run", "--quiet", "--json", "--timeout", "600",
                             "--control", str(path), *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})
    try:
        wait_for_path(path)
        yield proc, path
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def _ended(proc: subprocess.Popen[str]) -> tuple[int, dict[str, Any]]:
    out, err = proc.communicate(timeout=SAFETY_TIMEOUT)
    assert "Traceback" not in err, err
    return proc.returncode, json.loads(out)


class Events:
    """Every event a QMPClient got, in order, and a way to wait for the next of a name."""

    def __init__(self, qmp: QMPClient) -> None:
        self.listener = EventListener()
        qmp.register_listener(self.listener)
        self.log: list[dict[str, Any]] = []

    async def next(self, name: str) -> dict[str, Any]:
        while True:
            event = dict(await asyncio.wait_for(self.listener.get(), WAIT))
            self.log.append(event)
            if event["event"] == name:
                return event

    def rest(self) -> list[dict[str, Any]]:
        self.log += [dict(e) for e in self.listener.clear()]
        return self.log


async def _exits(qmp: QMPClient) -> list[int]:
    cpus = await qmp.execute("query-cpus-fast")
    assert isinstance(cpus, list)
    return [c["exits"] for c in cpus if c["vtl"] == 0]


async def _until_moving(qmp: QMPClient, since: list[int], key: str = "exits") -> None:
    """Until every VP's counter `key` (query-cpus-fast, VTL0's entries) passed `since`."""
    deadline = time.monotonic() + WAIT
    while True:
        cpus = await qmp.execute("query-cpus-fast")
        assert isinstance(cpus, list)
        now = [c[key] for c in cpus if c["vtl"] == 0]
        if all(n > s for n, s in zip(now, since, strict=True)):
            return
        assert time.monotonic() < deadline, (key, since, now)
        await asyncio.sleep(0.05)


async def _error(qmp: QMPClient, cmd: str, args: dict[str, Any] | None = None) -> tuple[str, str]:
    with pytest.raises(ExecuteError) as e:
        await qmp.execute(cmd, args)
    return e.value.error_class, e.value.error.error.desc


async def _drive_spin(path: Path, pid: int) -> dict[str, Any]:
    qmp = QMPClient("vtl-test")
    events = Events(qmp)
    await qmp.connect(os.fspath(path))          # the greeting, then qmp_capabilities
    assert qmp.greeting is not None
    seen: dict[str, Any] = {"version": dict(qmp.greeting.QMP.version),
                            "capabilities": list(qmp.greeting.QMP.capabilities)}
    x = qmp.execute
    seen["status"] = await x("query-status")
    seen["query-version"] = await x("query-version")
    commands = await x("query-commands")
    assert isinstance(commands, list)
    seen["commands"] = [c["name"] for c in commands]
    await _until_moving(qmp, [0, 0])            # both VPs spin
    seen["cpus"] = await x("query-cpus-fast")
    seen["tids"] = {int(t) for t in os.listdir(f"/proc/{pid}/task")}
    seen["subscribe"] = await x("vtl-subscribe", {"kinds": ["lifecycle", "vp_started"]})

    # stop: every VP paused, STOP; nothing the VMM sees of the guest moves.
    seen["stop"] = await x("stop")
    seen["STOP"] = await events.next("STOP")
    seen["paused"] = await x("query-status")
    frozen, vframe = await _exits(qmp), (await x("vtl-query-status"))["exits"]  # type: ignore[index]
    await asyncio.sleep(1.0)
    seen["frozen"] = (frozen, await _exits(qmp))
    seen["vframe"] = (vframe, (await x("vtl-query-status"))["exits"])  # type: ignore[index]
    cpus = await x("query-cpus-fast")
    assert isinstance(cpus, list)
    seen["run_states"] = {c["run-state"] for c in cpus}
    seen["stop_again"] = await x("stop")        # paused already: nothing happens, no second STOP

    # cont: RESUME, and the VPs run on.
    seen["cont"] = await x("cont")
    seen["RESUME"] = await events.next("RESUME")
    seen["running"] = await x("query-status")
    await _until_moving(qmp, frozen)
    seen["cont_again"] = await x("cont")

    # system_reset: VP0 boots again and starts the AP again.
    seen["before_reset"] = await x("vtl-query-status")
    seen["reset"] = await x("system_reset")
    seen["RESET"] = await events.next("RESET")
    seen["vp_started"] = await events.next("vp_started")
    seen["after_reset"] = await x("vtl-query-status")

    seen["bad_argument"] = await _error(qmp, "system_reset", {"force": True})
    seen["bad_type"] = await _error(qmp, "vtl-subscribe", {"trace": "yes"})
    seen["unknown"] = await _error(qmp, "no-such-command")
    seen["again"] = await _error(qmp, "qmp_capabilities")

    seen["quit"] = await x("quit")
    seen["SHUTDOWN"] = await events.next("SHUTDOWN")
    with suppress(EOFError):                    # the server hung up after quit, as QEMU does
        await qmp.disconnect()
    seen["events"] = events.rest()
    return seen


def test_qemu_qmp_client_drives_a_run(tmp_path: Path) -> None:
    with _vtl_run(tmp_path, *SPIN) as (proc, path):
        seen = asyncio.run(_drive_spin(path, proc.pid))
        status, doc = _ended(proc)

    version = controlsock.version_info()
    assert seen["version"] == version == seen["query-version"] and seen["capabilities"] == []
    assert seen["commands"] == controlsock.COMMAND_NAMES
    assert seen["status"] == {"running": True, "singlestep": False, "status": "running"}
    cpus = seen["cpus"]
    assert [(c["cpu-index"], c["vp"], c["vtl"], c["target"]) for c in cpus] == [
        (0, 0, 0, "x86_64"), (1, 1, 0, "x86_64")]
    assert [c["qom-path"] for c in cpus] == ["/machine/vp[0]/vtl[0]", "/machine/vp[1]/vtl[0]"]
    # thread-id: each VP's own thread, a thread of the vtl process (the kernel's TID).
    tids = [c["thread-id"] for c in cpus]
    assert len(set(tids)) == 2 and set(tids) <= seen["tids"], (tids, seen["tids"])
    assert all(c["state"] == "running_vtl0" and c["active"] and c["created"] for c in cpus)
    assert seen["subscribe"] == {"trace": False, "kinds": ["lifecycle", "vp_started"]}

    assert seen["stop"] == {} and "data" not in seen["STOP"]
    assert set(seen["STOP"]["timestamp"]) == {"seconds", "microseconds"}
    assert seen["paused"] == {"running": False, "singlestep": False, "status": "paused"}
    before, after = seen["frozen"]
    assert before == after and all(n > 0 for n in before), seen["frozen"]
    assert seen["vframe"][0] == seen["vframe"][1]
    assert seen["run_states"] == {"paused"}
    assert seen["stop_again"] == {} and seen["cont"] == {} and seen["cont_again"] == {}
    assert seen["running"] == {"running": True, "singlestep": False, "status": "running"}

    assert seen["reset"] == {}
    assert seen["RESET"]["data"] == {"guest": False, "reason": "host-qmp-system-reset", "by": "user"}
    assert seen["vp_started"]["data"]["vp"] == 1
    assert seen["before_reset"]["resets"] == 0 and seen["after_reset"]["resets"] == 1
    assert seen["after_reset"]["boot_count"] == 1

    assert seen["bad_argument"] == ("GenericError", "Parameter 'force' is unexpected")
    assert seen["bad_type"] == ("GenericError", "Invalid parameter type for 'trace', expected: boolean")
    assert seen["unknown"] == ("CommandNotFound", "The command no-such-command has not been found")
    assert seen["again"] == ("CommandNotFound", controlsock.NEGOTIATION_DONE)

    assert seen["quit"] == {}
    assert seen["SHUTDOWN"]["data"] == {"guest": False, "reason": "host-qmp-quit", "exit-status": 5,
                                        "exit-reason": "stopped",
                                        "message": "ended by quit over the control socket"}
    names = [e["event"] for e in seen["events"]]
    assert names.count("STOP") == 1 and names.count("RESUME") == 1 and names.count("RESET") == 1
    assert names.index("STOP") < names.index("RESUME") < names.index("RESET") < names.index("SHUTDOWN")
    assert names[-1] == "SHUTDOWN"
    lifecycle = [e for e in seen["events"] if e["event"] == "lifecycle" and e["data"]["step"] == "reset"]
    assert len(lifecycle) == 1 and lifecycle[0]["data"]["by"] == "user"
    stamps = [(e["timestamp"]["seconds"], e["timestamp"]["microseconds"]) for e in seen["events"]]
    assert stamps == sorted(stamps) and abs(stamps[-1][0] - time.time()) < 600

    # quit ends the run as "stopped", exit status 5.
    assert status == 5 and doc["status"] == 5 and doc["reason"] == "stopped"
    assert doc["resets"] == 1


async def _drive_null_calls(path: Path) -> dict[str, Any]:
    qmp = QMPClient("vtl-test")
    events = Events(qmp)
    await qmp.connect(os.fspath(path))
    x = qmp.execute
    seen: dict[str, Any] = {}
    await _until_moving(qmp, [0], key="vtl-calls")     # VTL1 enabled, the calls going
    seen["cpus"] = await x("query-cpus-fast")

    assert await x("stop") == {}
    await events.next("STOP")
    frozen = (await x("vtl-query-status"))["vtl_calls"]  # type: ignore[index]
    cpus = await x("query-cpus-fast")
    # system_reset while paused: accepted now, carried out when the run continues.
    seen["reset"] = await x("system_reset")
    await asyncio.sleep(1.0)
    seen["paused_calls"] = (frozen, (await x("vtl-query-status"))["vtl_calls"])  # type: ignore[index]
    seen["paused_cpus"] = (cpus, await x("query-cpus-fast"))
    seen["paused_resets"] = (await x("vtl-query-status"))["resets"]  # type: ignore[index]
    assert await x("cont") == {}
    await events.next("RESUME")
    seen["RESET"] = await events.next("RESET")
    seen["resets"] = (await x("vtl-query-status"))["resets"]  # type: ignore[index]

    # quit while paused ends the run.
    await _until_moving(qmp, [0], key="vtl-calls")
    assert await x("stop") == {}
    seen["quit"] = await x("quit")
    seen["SHUTDOWN"] = await events.next("SHUTDOWN")
    with suppress(EOFError):
        await qmp.disconnect()
    seen["events"] = [e["event"] for e in events.rest()]
    return seen


def test_stop_freezes_vtl_calls_reset_waits_for_cont_quit_ends_a_paused_run(tmp_path: Path) -> None:
    with _vtl_run(tmp_path, *NULL_CALLS, env=PYTHON_SWITCH) as (proc, path):
        seen = asyncio.run(_drive_null_calls(path))
        status, doc = _ended(proc)

    cpus = seen["cpus"]                 # one VP: its VTL0 and VTL1, on one thread
    assert [(c["cpu-index"], c["vp"], c["vtl"]) for c in cpus] == [(0, 0, 0), (1, 0, 1)]
    assert cpus[0]["thread-id"] == cpus[1]["thread-id"] > 0
    assert cpus[0]["created"] and cpus[1]["created"]
    frozen, later = seen["paused_calls"]
    assert frozen == later > 0
    before, after = seen["paused_cpus"]
    assert [c["vtl-calls"] for c in before] == [c["vtl-calls"] for c in after]
    assert all(c["run-state"] == "paused" for c in after)
    assert seen["reset"] == {} and seen["paused_resets"] == 0
    assert seen["RESET"]["data"]["reason"] == "host-qmp-system-reset" and seen["resets"] == 1
    assert seen["quit"] == {} and seen["SHUTDOWN"]["data"]["reason"] == "host-qmp-quit"
    events = seen["events"]
    assert events.index("RESUME") < events.index("RESET") and events[-1] == "SHUTDOWN"
    assert status == 5 and doc["reason"] == "stopped" and doc["resets"] == 1


def _shell_output(text: str) -> list[Any]:
    """What qmp-shell printed after each prompt: replies as JSON, events as Python dicts."""
    out: list[Any] = []
    for piece in text.split("(QEMU) ")[1:]:
        for line in piece.splitlines():
            line = line.strip()
            if line:
                out.append(json.loads(line) if line.startswith('{"') else ast.literal_eval(line))
    return out


def test_qmp_shell_drives_a_run(tmp_path: Path) -> None:
    """qmp-shell, the console script of qemu.qmp, typed at through a pipe: an empty line
    prints the events that came."""
    script = "\n".join(["query-status", "stop", "query-status", "", "cont", "query-status", "",
                        "query-cpus-fast", "stop force=true", "vtl-query-status", "quit", ""])
    with _vtl_run(tmp_path, *SPIN) as (proc, path):
        shell = subprocess.run([str(QMP_SHELL), str(path)], input=script, capture_output=True, text=True,
                               timeout=SAFETY_TIMEOUT, env={**os.environ, "HOME": str(tmp_path)})
        status, doc = _ended(proc)
    assert shell.returncode == 0, shell.stderr
    v = controlsock.version_info()["qemu"]
    assert f"Connected to QEMU {v['major']}.{v['minor']}.{v['micro']}" in shell.stdout, shell.stdout
    out = _shell_output(shell.stdout)
    running = {"return": {"running": True, "singlestep": False, "status": "running"}}
    paused = {"return": {"running": False, "singlestep": False, "status": "paused"}}
    assert out[:3] == [running, {"return": {}}, paused], shell.stdout
    assert out[3]["event"] == "STOP"
    assert out[4:6] == [{"return": {}}, running]
    assert out[6]["event"] == "RESUME"
    cpus = out[7]["return"]
    assert [c["cpu-index"] for c in cpus] == [0, 1] and all(c["target"] == "x86_64" for c in cpus)
    assert out[8] == {"error": {"class": "GenericError", "desc": "Parameter 'force' is unexpected"}}
    assert out[9]["return"]["status"] == "running" and out[9]["return"]["resets"] == 0
    assert out[10] == {"return": {}} and len(out) == 11, out
    assert status == 5 and doc["reason"] == "stopped"


# A hardened run that goes on for a few seconds after END_OF_BOOT (MOV to CR4 of its own
# value, each single-stepped by the VMM) and then reports PASS on its own.
HARDENED_CR4 = ("--scenario", "bench-cr4-write", "--param", "10000")


def _passed(doc: dict[str, Any]) -> bool:
    results = [r for r in doc["reports"] if r["kind"] == "result"]
    return (doc["status"] == 0 and doc["reason"] == "guest_exit" and bool(results)
            and results[-1]["value"][0] == 0)


async def _next_step(events: Events, step: str) -> dict[str, Any]:
    """The next `lifecycle` event of `step` (a subscriber to "lifecycle")."""
    while True:
        event = await events.next("lifecycle")
        if event["data"]["step"] == step:
            return event


async def _save(qmp: QMPClient, path: Path) -> Any:
    try:
        return await qmp.execute("vtl-snapshot-save", {"path": os.fspath(path)})
    except ExecuteError as e:
        return (e.error_class, e.error.error.desc)


async def _drive_snapshot(path: Path, snap: Path) -> dict[str, Any]:
    qmp = QMPClient("vtl-test")
    events = Events(qmp)
    await qmp.connect(os.fspath(path))
    x = qmp.execute
    commands = await x("query-commands")
    assert isinstance(commands, list)
    seen: dict[str, Any] = {"commands": [c["name"] for c in commands]}
    await x("vtl-subscribe", {"kinds": ["lifecycle"]})
    # This scenario's lifecycle steps: vtl1_enable, lock_page_tables, end_of_boot (the last
    # may have come before the subscription, on a slow connect).
    status = await x("vtl-query-status")
    assert isinstance(status, dict)
    if status["events"].get("lifecycle", 0) < 3:
        await _next_step(events, "end_of_boot")

    # stop, save, cont: the save changes nothing of the pause.
    assert await x("stop") == {}
    await events.next("STOP")
    seen["save"] = await x("vtl-snapshot-save", {"path": os.fspath(snap)})
    seen["save_event"] = await _next_step(events, "snapshot_save")
    seen["paused_after"] = await x("query-status")
    cpus = await x("query-cpus-fast")
    assert isinstance(cpus, list)
    seen["run_states"] = {c["run-state"] for c in cpus}

    # Refused, and the run goes on: the path exists, bad arguments.
    seen["exists"] = await _error(qmp, "vtl-snapshot-save", {"path": os.fspath(snap)})
    seen["missing"] = await _error(qmp, "vtl-snapshot-save")
    seen["bad_type"] = await _error(qmp, "vtl-snapshot-save", {"path": 7})
    seen["extra"] = await _error(qmp, "vtl-snapshot-save", {"path": os.fspath(snap) + "-x", "force": True})
    seen["empty"] = await _error(qmp, "vtl-snapshot-save", {"path": ""})
    seen["nul"] = await _error(qmp, "vtl-snapshot-save", {"path": os.fspath(snap) + "\0x"})
    seen["no_parent"] = await _error(qmp, "vtl-snapshot-save", {"path": os.fspath(snap / "a" / "b")})
    seen["paused_still"] = await x("query-status")

    # One save at a time: a second client's save while the first is written is refused
    # at once (a save hashes all 256 MiB of memory: ~100 ms or more, the second request
    # comes a few ms after the first).
    other = QMPClient("vtl-test-2")
    await other.connect(os.fspath(path))
    first = asyncio.ensure_future(_save(qmp, snap.with_name("one")))
    await asyncio.sleep(0.02)
    second = await _save(other, snap.with_name("two"))
    seen["concurrent"] = [await first, second]
    await other.disconnect()

    assert await x("cont") == {}
    await events.next("RESUME")
    seen["running"] = await x("query-status")
    await qmp.disconnect()
    return seen


def test_snapshot_save_over_qmp_then_restore(tmp_path: Path) -> None:
    snap = tmp_path / "snap"
    with _vtl_run(tmp_path, *HARDENED_CR4) as (proc, path):
        seen = asyncio.run(_drive_snapshot(path, snap))
        status, doc = _ended(proc)

    assert "vtl-snapshot-save" in seen["commands"] == controlsock.COMMAND_NAMES
    save = seen["save"]
    assert set(save) == {"path", "policy-digest", "memory-sha256", "duration-us", "by"}
    assert save["path"] == os.fspath(snap) and save["by"] == "user" and save["duration-us"] > 0
    assert len(save["policy-digest"]) == 64 and len(save["memory-sha256"]) == 64
    ev = seen["save_event"]["data"]
    assert ev["step"] == "snapshot_save" and ev["by"] == "user"
    assert ev["after"]["policy_digest"] == save["policy-digest"]
    assert seen["paused_after"]["status"] == "paused" and seen["run_states"] == {"paused"}
    assert sorted(os.listdir(snap)) == ["manifest.json", "memory.bin", "state.json"]

    exists = f"{snap} already exists (a snapshot is written to a new directory)"
    assert seen["exists"] == ("GenericError", exists)
    assert seen["missing"] == ("GenericError", "Parameter 'path' is missing")
    assert seen["bad_type"] == ("GenericError", "Invalid parameter type for 'path', expected: string")
    assert seen["extra"] == ("GenericError", "Parameter 'force' is unexpected")
    assert seen["empty"] == ("GenericError", "Parameter 'path' is empty")
    assert seen["nul"] == ("GenericError", "Parameter 'path' is not a file name (a NUL byte)")
    assert seen["no_parent"] == ("GenericError", f"{snap / 'a'} is not a directory")
    assert seen["paused_still"]["status"] == "paused"
    ok = [r for r in seen["concurrent"] if isinstance(r, dict)]
    refused = [r for r in seen["concurrent"] if not isinstance(r, dict)]
    busy = ("GenericError", "a snapshot is being saved already (one at a time)")
    assert len(ok) == 1 and refused == [busy], seen["concurrent"]
    assert seen["running"]["status"] == "running"

    # The run went on to its own PASS; it lists the saves it made.
    assert status == 0 and _passed(doc), doc["message"]
    assert [s["path"] for s in doc["snapshots"]][0] == os.fspath(snap)
    assert doc["snapshots"][0]["policy_digest"] == save["policy-digest"]

    # The saved partition, restored, runs to the same PASS under the same policy.
    restored = subprocess.run([sys.executable, "-m", "vtl", "run", "--quiet", "--json", "--timeout", "600",
                               "--restore", os.fspath(snap)], cwd=REPO, capture_output=True, text=True,
                              timeout=SAFETY_TIMEOUT)
    assert "Traceback" not in restored.stderr, restored.stderr
    rdoc = json.loads(restored.stdout)
    assert restored.returncode == 0 and _passed(rdoc), rdoc["message"]
    assert rdoc["restored_from"]["path"] == os.fspath(snap)
    assert rdoc["restored_from"]["policy_digest"] == save["policy-digest"]
    assert rdoc["restored_from"]["vtl1_enabled"] is True
