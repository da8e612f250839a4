"""Helpers for tests that run partitions in-process or through the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vtl.core.config import Backend, KexecPolicy, Mode, PartitionConfig
from vtl.core.events import EventLog, GuestExit, GuestReport
from vtl.core.partition import Partition
from vtl.modes.heki import HekiScheduler, heki_config
from vtl.run import control
from vtl.run.result import RunResult
from vtl.run.scheduler import Scheduler
from vtl.services.console import Console
from vtl.services.reports import Report
from vtl.tools.attack import AttackResult, attack_scenarios, run_attack

REPO = Path(__file__).resolve().parent.parent
# How long a test lets a command or a partition run before it calls it hung.  Generous on
# purpose: a loaded 2-core machine (CI, or a developer running two suites) runs the
# emulated guests several times slower, and no test may fail for being slow there.  Tests
# that are *about* a timeout pass their own.
SAFETY_TIMEOUT = 600.0
RUN_TIMEOUT = 300.0


@dataclass
class Run:
    result: RunResult
    console: list[str]                             # for people (and failure messages), not verdicts
    reports: list[Report]                          # what the guests reported (VTL_HC_REPORT)
    events: EventLog
    partition: Partition      # closed: only config/layout/images remain usable
    memory: dict[tuple[int, int], bytes]
    attack_targets: dict[int, tuple[int, bytes]]   # target GPA -> (old value, memory after the run)
    attr_map: bytes                                # VTL0 attributes per page at the end
    memslot_runs: list[tuple[int, int, int]]       # (start, end, attrs) the backend applied, at the end

    def of_kind(self, kind: str) -> list[Report]:
        return [r for r in self.reports if r.kind == kind]

    def report(self, kind: str, name: str) -> Report:
        found = [r for r in self.reports if r.kind == kind and r.name == name]
        assert found, f"no {kind} report named {name!r}: {[(r.kind, r.name) for r in self.reports]}"
        return found[-1]

    def passed(self) -> bool:
        """The run ended with the guest's exit status 0 and its own PASS report."""
        results = self.of_kind("result")
        return (self.result.reason == "guest_exit" and self.result.status == 0
                and bool(results) and results[-1].value[0] == 0)


def run_scenario(images: tuple[Path, Path], scenario: str = "", *, vtl1: bool = True, param: int = 0,
                 timeout: float = RUN_TIMEOUT, snapshot: list[tuple[int, int]] | None = None,
                 backend: Backend | None = None, trust: list[bytes] | None = None,
                 kexec_policy: KexecPolicy = "teardown", staged: Path | None = None,
                 reset_on_triple_fault: bool = False, mode: Mode = "vtl", vps: int = 1) -> Run:
    """Run a scenario in a fresh partition; `snapshot` ranges of guest memory are copied
    before the partition is closed.  `mode="heki"`: one VM, the VMM as KVM with Heki.
    `vps`: the partition's VPs (docs/smp.md)."""
    cfg = PartitionConfig(vtl0_image=images[0], vtl1_image=images[1] if vtl1 else None,
                          scenario=scenario, param=param, attr_backend=backend, trust=trust or [],
                          nr_vps=vps,
                          kexec_policy=kexec_policy, staged=staged,
                          reset_on_triple_fault=reset_on_triple_fault)
    if mode == "heki":
        cfg = heki_config(cfg)
    events = EventLog(trace=True, keep=100_000)
    console = Console(cfg.nr_vps, keep=10_000)
    with Partition(cfg, events) as p:
        result, sched = control.run(p, console, timeout,
                                    scheduler=HekiScheduler if mode == "heki" else Scheduler)
        mem = {(gpa, n): p.mem.read(gpa, n) for gpa, n in (snapshot or [])}
        reports = list(sched.reports.records)
        targets = {}
        for r in reports:
            if r.kind == "target" and p.layout.in_memory(r.value[0], 8):
                targets[r.value[0]] = (r.value[2], p.mem.read(r.value[0], 8))
        attr_map = bytes(p.vtl0_attrs)
        runs = p.backend.runs()
    return Run(result, list(console.tail), reports, events, p, mem, targets, attr_map, runs)


_SHARED_RUNS: dict[tuple[Path, Path, str, int], Run] = {}


def shared_run(images: tuple[Path, Path], scenario: str, param: int = 0) -> Run:
    """`run_scenario(images, scenario, param=param)`, once per test session: for tests that
    only read the run and would otherwise boot the same partition again (the `harden` boot,
    the scenarios test_policy.py reads in two tests)."""
    key = (images[0], images[1], scenario, param)
    if key not in _SHARED_RUNS:
        _SHARED_RUNS[key] = run_scenario(images, scenario, param=param)
    return _SHARED_RUNS[key]


def vtl_cli(*args: str, env: dict[str, str] | None = None,
            timeout: float = SAFETY_TIMEOUT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vtl", *args], cwd=REPO, text=True,
                          capture_output=True, timeout=timeout, env={**os.environ, **(env or {})})


def cli_json(*args: str) -> Any:
    cp = vtl_cli(*args, "--json")
    return json.loads(cp.stdout)


def control_sock_path(tmp_path: Path) -> Path:
    """A path for `--control`: sun_path holds 107 bytes and pytest's tmp_path can be long."""
    path = tmp_path / "c.sock"
    if len(os.fsencode(path)) > 107:
        path = Path(f"/tmp/vtl-ctl-{os.getpid()}-{time.monotonic_ns()}.sock")
    return path


def wait_for_path(path: Path, seconds: float = 15.0) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.01)


@dataclass(frozen=True)
class AttackRun:
    """One `run_attack` (what `vtl attack` runs for a scenario): its result, and the run's
    events, which hold the guests' reports and each VP's exit as the VMM logged them."""
    result: AttackResult
    events: EventLog

    def of_kind(self, kind: str) -> list[GuestReport]:
        """The guests' reports of `kind` (result, target, msr, status, fault, value, ...)."""
        return [e for e in self.events.of_kind("report") if isinstance(e, GuestReport) and e.report == kind]

    def report(self, kind: str, name: str) -> GuestReport:
        found = [r for r in self.of_kind(kind) if r.name == name]
        assert found, f"no {kind} report named {name!r}: {[(r.report, r.name) for r in self.of_kind(kind)]}"
        return found[-1]

    def passed(self) -> bool:
        """As Run.passed: the run ended with the guest's exit status 0 and its own PASS report."""
        exits = [e for e in self.events.of_kind("guest_exit") if isinstance(e, GuestExit)]
        results = self.of_kind("result")
        return (bool(exits) and exits[0].reason == "guest_exit" and exits[0].status == 0
                and bool(results) and results[-1].value[0] == 0)


_ATTACK_RUNS: dict[tuple[Path, Path, str, int, int, int], AttackRun] = {}


def attack_run(images: tuple[Path, Path], scenario: str, *, vps: int = 1, param: int = 0,
               keep: int = 10_000) -> AttackRun:
    """`run_attack(scenario)` in a fresh partition, as `vtl attack` runs it (its expectation,
    an event log keeping the last `keep` events, the default of `vtl attack`'s), once per
    test session for the same arguments: tests/test_attacks.py, test_g9_policy.py and
    test_xvp_attacks.py assert on the same run."""
    key = (images[0], images[1], scenario, vps, param, keep)
    if key not in _ATTACK_RUNS:
        expected = dict(attack_scenarios(images[0])).get(scenario, "")
        events = EventLog(trace=True, keep=keep)
        result = run_attack(scenario, expected, images[0], images[1], vps=vps, param=param, events=events)
        _ATTACK_RUNS[key] = AttackRun(result, events)
    return _ATTACK_RUNS[key]
