"""Helpers for tests that run partitions in-process or through the CLI."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmm.memattr import MemslotBackend
from vtl import control
from vtl.events import EventLog
from vtl.partition import Partition, PartitionConfig
from vtl.scheduler import RunResult

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Run:
    result: RunResult
    console: list[str]
    events: EventLog
    partition: Partition      # closed: only config/layout/images remain usable
    memory: dict[tuple[int, int], bytes]
    attack_targets: dict[int, tuple[int, bytes]]   # target GPA -> (old value, memory after the run)
    attr_map: bytes                                # VTL0 attributes per page at the end
    memslot_runs: list[tuple[int, int, int]]       # (start, end, attrs) in VTL0's VM at the end


ATTACK_RE = re.compile(r"ATTACK target=(0x[0-9a-f]+) old=(0x[0-9a-f]+)")


def run_scenario(images: tuple[Path, Path], scenario: str = "", *, vtl1: bool = True, param: int = 0,
                 timeout: float = 30.0, snapshot: list[tuple[int, int]] | None = None) -> Run:
    """Run a scenario in a fresh partition; `snapshot` ranges of guest memory are copied
    before the partition is closed."""
    cfg = PartitionConfig(vtl0_image=images[0], vtl1_image=images[1] if vtl1 else None,
                          scenario=scenario, param=param)
    events = EventLog(trace=True)
    with Partition(cfg, events) as p:
        result, sched = control.run(p, None, timeout)
        mem = {(gpa, n): p.mem.read(gpa, n) for gpa, n in (snapshot or [])}
        targets = {}
        for line in sched.console_lines:
            m = ATTACK_RE.search(line)
            if m:
                gpa = int(m.group(1), 16)
                targets[gpa] = (int(m.group(2), 16), p.mem.read(gpa, 8))
        attr_map = bytes(p.protection.map)
        backend = p.protection.backend
        runs = backend.runs() if isinstance(backend, MemslotBackend) else []
    return Run(result, sched.console_lines, events, p, mem, targets, attr_map, runs)


def vtl_cli(*args: str, env: dict[str, str] | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vtl.cli", *args], cwd=REPO, text=True,
                          capture_output=True, timeout=timeout, env={**os.environ, **(env or {})})


def cli_json(*args: str) -> Any:
    cp = vtl_cli(*args, "--json")
    return json.loads(cp.stdout)
