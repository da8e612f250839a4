"""VP runners (vtl/run/runner.py) on real KVM, with two VPs busy making exits the VMM
completes (a refused hypercall, and a refused VTL return: the VMM completes the OUT's I/O
and injects #UD, VCpu.complete_pending_io): requests from another thread are never lost,
a pause really stops a VP, HLT idles a VP until a wake, and AP start-up is bounded."""

from __future__ import annotations

import json
import signal
import statistics
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.vtlrun import SAFETY_TIMEOUT, cli_json, vtl_cli
from vtl.core.config import PartitionConfig
from vtl.core.events import EventLog
from vtl.core.partition import Partition
from vtl.run.result import RunResult
from vtl.run.runner import Kind, RunState
from vtl.run.scheduler import Scheduler

# Requests in the race test: resets in runs of RESETS_PER_RUN, each run ended by a stop
# (300 in all: each reset lands on two VPs busy completing I/O, so every one is a race).
RUNS, RESETS_PER_RUN = 5, 59


@contextmanager
def _running(images: tuple[Path, Path], scenario: str, param: int, vps: int = 2,
             ) -> Iterator[tuple[Scheduler, list[RunResult], threading.Thread]]:
    """A partition running `scenario` on a thread (its VP0; the APs on their own), with
    the kick signal's handler installed as vtl/run/control.py does."""
    cfg = PartitionConfig(vtl0_image=images[0], vtl1_image=None, scenario=scenario, param=param, nr_vps=vps)
    old = signal.signal(signal.SIGUSR1, lambda *_: None)
    try:
        with Partition(cfg, EventLog(keep=100)) as p:
            sched = Scheduler(p)
            out: list[RunResult] = []
            t = threading.Thread(target=lambda: out.append(sched.run()), daemon=True)
            t.start()
            try:
                yield sched, out, t
            finally:
                if t.is_alive():
                    sched.request_stop(124, "timeout", "test cleanup")
                    t.join(SAFETY_TIMEOUT)
    finally:
        signal.signal(signal.SIGUSR1, old)


def _wait_until(cond: object, what: str, run: tuple[threading.Thread, list[RunResult]] | None = None) -> None:
    deadline = time.monotonic() + SAFETY_TIMEOUT
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"never: {what}"
        if run is not None and not run[0].is_alive():
            raise AssertionError(f"the run ended before {what}: {run[1][0] if run[1] else 'no result'}")
        time.sleep(0.002)


def _both_busy(sched: Scheduler) -> bool:
    return all(vp.port_counts[0xF1] > 10 for vp in sched.p.vps)


def test_stop_and_reset_requests_race_io_completion_and_none_is_lost(
        guest_images: tuple[Path, Path]) -> None:
    latencies: list[float] = []
    for _ in range(RUNS):
        with _running(guest_images, "smp-spin", 0) as (sched, out, t):
            _wait_until(lambda: _both_busy(sched), "both VPs spinning", (t, out))   # noqa: B023
            for i in range(RESETS_PER_RUN):
                t0 = time.perf_counter()
                req = sched.request_reset("user")
                assert req.done.wait(SAFETY_TIMEOUT), f"reset {i} was never carried out"
                latencies.append(time.perf_counter() - t0)
                assert req.result is True
            t0 = time.perf_counter()
            sched.request_stop(5, "stopped", "test stop")
            t.join(SAFETY_TIMEOUT)
            assert not t.is_alive(), "the stop was lost"
            latencies.append(time.perf_counter() - t0)
            result = out[0]
            assert result.reason == "stopped" and result.resets == RESETS_PER_RUN
            assert [vp.run_state for vp in result.vps] == ["exited", "exited"]
    assert len(latencies) == RUNS * (RESETS_PER_RUN + 1) == 300
    # Printed, not asserted: a loaded machine may be slow, never lossy (each was honoured).
    print(f"{len(latencies)} requests: median {statistics.median(latencies) * 1e3:.1f} ms, "
          f"max {max(latencies) * 1e3:.1f} ms")


def test_a_paused_vp_makes_no_exit_until_resumed(guest_images: tuple[Path, Path]) -> None:
    with _running(guest_images, "smp-spin", 0) as (sched, out, t):
        _wait_until(lambda: _both_busy(sched), "both VPs spinning", (t, out))
        ap, runner = sched.p.vps[1], sched.runners[1]
        req = runner.post(Kind.PAUSE)
        assert req.done.wait(SAFETY_TIMEOUT) and req.result is True
        assert runner.state is RunState.PAUSED
        frozen = sum(ap.port_counts)
        vp0_before = sum(sched.p.vps[0].port_counts)
        _wait_until(lambda: sum(sched.p.vps[0].port_counts) > vp0_before + 1000, "VP0 runs on")
        assert sum(ap.port_counts) == frozen            # not one exit while paused
        resume = runner.post(Kind.RESUME)
        assert resume.done.wait(SAFETY_TIMEOUT)
        _wait_until(lambda: sum(ap.port_counts) > frozen + 100, "the AP runs again")


def test_vps_idle_in_hlt_until_woken(guest_images: tuple[Path, Path]) -> None:
    # smp-boot: VP0 halts while it waits for the APs, which wake it (VTL_HC_SEND_IPI) and
    # halt for good once idle; the run ends on VP0's exit status, not as "halted".
    doc = cli_json("run", "--no-vtl1", "--vps", "4", "--scenario", "smp-boot")
    assert doc["status"] == 0 and doc["reason"] == "guest_exit"
    vps = doc["vps"]
    assert [v["index"] for v in vps] == [0, 1, 2, 3]
    assert vps[0]["reason"] == "guest_exit" and all(v["reason"] == "partition_stopped" for v in vps[1:])
    # (How many HLTs ran depends on timing: an AP may not reach its idle HLT before VP0 ends.)
    assert doc["events"]["vp_started"] == 3


@pytest.mark.parametrize("vps", [1, 3])
def test_a_run_whose_vps_all_halt_ends_as_halted(guest_images: tuple[Path, Path], vps: int) -> None:
    cp = vtl_cli("run", "--no-vtl1", "--vps", str(vps), "--scenario", "smp-halt", "--json")
    doc = json.loads(cp.stdout)
    assert cp.returncode == 3 and doc["reason"] == "halted"
    assert len(doc["vps"]) == vps


@pytest.mark.parametrize("vps", ["0", "17", "two"])
def test_vps_out_of_range_is_a_usage_error(vps: str) -> None:
    cp = vtl_cli("run", "--vps", vps)
    assert cp.returncode == 2 and "--vps" in cp.stderr and "Traceback" not in cp.stderr


def test_pause_all_freezes_every_vp_a_stop_still_ends_the_run(guest_images: tuple[Path, Path]) -> None:
    with _running(guest_images, "smp-spin", 0) as (sched, out, t):
        _wait_until(lambda: _both_busy(sched), "both VPs spinning", (t, out))
        for req in sched.pause_all():
            assert req.done.wait(SAFETY_TIMEOUT) and req.result is True
        frozen = [sum(vp.port_counts) for vp in sched.p.vps]
        time.sleep(0.2)
        assert [sum(vp.port_counts) for vp in sched.p.vps] == frozen
        assert {r.state for r in sched.runners} == {RunState.PAUSED}
        for req in sched.resume_all():
            assert req.done.wait(SAFETY_TIMEOUT)
        vps = sched.p.vps
        _wait_until(lambda: all(sum(vp.port_counts) > n + 100 for vp, n in zip(vps, frozen, strict=True)),
                    "every VP runs again")
        for req in sched.pause_all():
            assert req.done.wait(SAFETY_TIMEOUT)
        sched.request_stop(5, "stopped", "stopped while paused")
        t.join(SAFETY_TIMEOUT)
        assert not t.is_alive() and out[0].reason == "stopped"
