"""Helpers for tests that run partitions in-process or through the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
    return Run(result, sched.console_lines, events, p, mem)


def vtl_cli(*args: str, env: dict[str, str] | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vtl.cli", *args], cwd=REPO, text=True,
                          capture_output=True, timeout=timeout, env={**os.environ, **(env or {})})


def cli_json(*args: str) -> Any:
    cp = vtl_cli(*args, "--json")
    return json.loads(cp.stdout)
