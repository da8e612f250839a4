"""A hostile or careless user: every misuse gets one clear line (or the quiet exit a
Unix tool gives) and a documented status, never a traceback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.vtlrun import REPO, SAFETY_TIMEOUT, vtl_cli
from vtl.core.config import PartitionConfig
from vtl.core.events import EventLog
from vtl.core.partition import Partition
from vtl.run.scheduler import Scheduler

pytestmark = pytest.mark.kvm
LONG = ("run", "--scenario", "bench-null-call", "--param", "2000000", "--quiet")


def _no_traceback(cp: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in cp.stdout + cp.stderr, cp.stderr


@pytest.mark.parametrize("args,needle", [
    (("run", "--timeout", "nan"), "finite"),
    (("run", "--timeout", "-1"), "positive"),
    (("run", "--param", str(2**64)), "--param must be between"),
    (("bench", "--calls", "1e25"), "not an integer"),
    (("bench", "--calls", str(10**25)), "--calls must be between"),
    (("run", "--mem", "99999999"), "guest memory must be 64 to 4096 MiB"),
])
def test_bad_numbers_are_usage_errors(args: tuple[str, ...], needle: str) -> None:
    cp = vtl_cli(*args)
    assert cp.returncode == 2 and needle in cp.stderr
    _no_traceback(cp)


def test_vtl1_image_outside_its_window_is_refused_before_the_run(guest_images: tuple[Path, Path]) -> None:
    cp = vtl_cli("run", "--vtl1-image", str(guest_images[0]))     # a VTL0 image as VTL1's
    assert cp.returncode == 1 and "outside the window" in cp.stderr
    assert len(cp.stderr.strip().splitlines()) == 1
    _no_traceback(cp)


def test_events_file_that_is_an_image_is_refused_and_the_image_kept(guest_images: tuple[Path, Path],
                                                                     tmp_path: Path) -> None:
    img = tmp_path / "vtl0.elf"
    img.write_bytes(guest_images[0].read_bytes())
    cp = vtl_cli("run", "--vtl0-image", str(img), "--events", str(img))
    assert cp.returncode == 1 and "refusing to overwrite" in cp.stderr
    assert img.read_bytes() == guest_images[0].read_bytes()


def test_events_file_is_not_created_when_the_config_is_bad(tmp_path: Path) -> None:
    ev = tmp_path / "ev.jsonl"
    cp = vtl_cli("run", "--vtl0-image", "/nonexistent.elf", "--events", str(ev))
    assert cp.returncode == 1 and not ev.exists()


def test_full_console_output_is_one_line_and_status_1() -> None:
    with open("/dev/full", "w") as full:
        cp = subprocess.run([sys.executable, "-m", "vtl", "run"], cwd=REPO, text=True, stdout=full,
                            stderr=subprocess.PIPE, timeout=SAFETY_TIMEOUT)
    assert cp.returncode == 1 and "cannot write the console" in cp.stderr
    assert "Traceback" not in cp.stderr and len(cp.stderr.strip().splitlines()) == 1


def test_full_events_file_stops_the_run_with_one_line() -> None:
    cp = vtl_cli(*LONG, "--events", "/dev/full", timeout=SAFETY_TIMEOUT)
    assert cp.returncode == 1 and "cannot write events" in cp.stderr
    _no_traceback(cp)


def test_closed_pipe_ends_quietly_with_141() -> None:
    p = subprocess.Popen([sys.executable, "-m", "vtl", "run"], cwd=REPO, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    assert p.stdout is not None and p.stderr is not None
    p.stdout.readline()
    p.stdout.close()                      # `| head -1`
    err = p.stderr.read()
    assert p.wait(timeout=SAFETY_TIMEOUT) == 141
    assert "Traceback" not in err and "Exception ignored" not in err


@pytest.mark.parametrize("sig,status,reason", [(signal.SIGINT, 130, "interrupted"),
                                               (signal.SIGTERM, 143, "terminated")])
def test_signals_stop_the_guest_with_their_status(sig: int, status: int, reason: str) -> None:
    p = subprocess.Popen([sys.executable, "-m", "vtl", *LONG, "--json"], cwd=REPO, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    time.sleep(2.0)
    p.send_signal(sig)
    out, err = p.communicate(timeout=SAFETY_TIMEOUT)
    assert p.returncode == status, err
    assert f'"reason": "{reason}"' in out and "Traceback" not in err


def test_sigterm_during_bench_floor_leaves_no_child() -> None:
    floor_c = REPO / "bench" / "floor_c"
    assert floor_c.exists(), "make bench"
    p = subprocess.Popen([sys.executable, "-m", "vtl", "bench", "--calls", "3000000", "--intercepts", "0",
                          "--no-protection"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, start_new_session=True)
    time.sleep(3.0)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=SAFETY_TIMEOUT)
    assert p.returncode == 143 and "Traceback" not in err
    time.sleep(0.2)
    left = subprocess.run(["pgrep", "-s", str(p.pid)], capture_output=True, text=True).stdout.split()
    assert not left, f"processes left in the session: {left}"


def test_console_lines_are_tagged_by_the_vmm(guest_images: tuple[Path, Path]) -> None:
    cp = vtl_cli("run")
    guest_lines = [ln for ln in cp.stdout.splitlines() if ln.startswith("[")]
    assert guest_lines and all(ln.startswith(("[vtl0] ", "[vtl1] ")) for ln in guest_lines)
    summary = cp.stdout.split("--- summary ---")[1]
    assert "[vtl" not in summary


def test_stop_racing_the_enable_flow_always_ends_the_run(guest_images: tuple[Path, Path]) -> None:
    old = signal.signal(signal.SIGUSR1, lambda *_: None)     # only to interrupt KVM_RUN
    try:
        _stop_race(guest_images)
    finally:
        signal.signal(signal.SIGUSR1, old)


def _stop_race(guest_images: tuple[Path, Path]) -> None:
    for delay in (0.0, 0.001, 0.003, 0.006, 0.01, 0.02):
        cfg = PartitionConfig(vtl0_image=guest_images[0], vtl1_image=guest_images[1],
                              scenario="bench-null-call", param=10_000_000)
        with Partition(cfg, EventLog()) as p:
            sched = Scheduler(p)
            result: list[object] = []
            t = threading.Thread(target=lambda: result.append(sched.run()))   # noqa: B023
            t.start()
            time.sleep(delay)
            deadline = time.monotonic() + 10
            while t.is_alive() and time.monotonic() < deadline:
                sched.request_stop(124, "timeout", "test stop")
                signal.pthread_kill(t.ident or 0, signal.SIGUSR1)
                time.sleep(0.01)
            t.join(timeout=1)
            assert not t.is_alive()
            assert result and result[0].reason in ("timeout", "guest_exit")   # type: ignore[attr-defined]


def test_attack_with_an_image_without_attack_scenarios_does_not_claim_blocked(tmp_path: Path) -> None:
    # The VTL1 image has no .vtl_scenarios: nothing can be run, nothing is "blocked".
    vtl1 = REPO / "guest_vtl1" / "build" / "vtl1.elf"
    cp = vtl_cli("attack", "--vtl0-image", str(vtl1), "--json")
    assert cp.returncode == 2
    assert '"outcome": "blocked"' not in cp.stdout and '"outcome": "not run"' in cp.stdout


def test_unknown_hypercall_storm_keeps_the_vmm_small() -> None:
    # The guest never stops asking: every refusal is an event (written to the file), but
    # none is kept in memory, so ten times the storm costs no more memory.
    def storm(n: int) -> dict[str, Any]:
        cp = vtl_cli("run", "--scenario", "hypercall-storm", "--param", str(n), "--quiet", "--json",
                     "--events", os.devnull, "--timeout", "500")
        assert cp.returncode == 0, cp.stderr
        doc: dict[str, Any] = json.loads(cp.stdout)
        assert doc["events"]["refused"] >= n
        return doc

    small, big = storm(10_000), storm(100_000)
    assert big["max_rss_mib"] < 200
    assert big["max_rss_mib"] - small["max_rss_mib"] < 10, (small["max_rss_mib"], big["max_rss_mib"])


@pytest.mark.parametrize("delay", [0.3, 1.5, 4.0])
def test_ctrl_c_at_any_point_of_bench_is_130_without_traceback(delay: float) -> None:
    # 0.3 s: start-up and imports; 1.5 s: the Python floor; 4 s: the VTL round trip.
    p = subprocess.Popen([sys.executable, "-m", "vtl", "bench", "--calls", "300000", "--intercepts", "0",
                          "--no-protection"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    time.sleep(delay)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=SAFETY_TIMEOUT)
    assert p.returncode == 130, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
