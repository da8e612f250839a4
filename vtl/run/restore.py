"""Restore a run from a snapshot directory (docs/snapshot.md): the partition, then the
run's own state (runners, reports, a mode's policy), then the protection check, all
before the first instruction runs.

    snap = open_snapshot(path)              # format, version, digests: nothing built yet
    p, sched = restore(snap, ...)           # rebuilt and verified; run it with control.run

The scheduler is a mode's (`scheduler`: the class the snapshot's mode runs with), since
a mode's policy (Heki's pins and page permissions) lives in its scheduler and is part of
the digest that must equal the saved one.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vtl.core.config import PartitionConfig
from vtl.core.events import EventLog, Lifecycle
from vtl.core.partition import Partition
from vtl.lifecycle import snapfile
from vtl.lifecycle.snapfile import Snapshot, SnapshotError
from vtl.lifecycle.snapshot import check_files, restore_partition, restored_summary, saved_config, verify
from vtl.run.scheduler import Scheduler
from vtl.services.console import Console

SchedulerFactory = Callable[[Partition, Console | None], Scheduler]


def open_snapshot(path: Path) -> Snapshot:
    """Read and verify `path` (every file's size and SHA-256, the format version)."""
    snap = snapfile.read(path)
    for key in ("partition", "run"):
        if not isinstance(snap.state.get(key), dict):
            raise SnapshotError(f"snapshot {path}: {snapfile.STATE} has no {key} state")
    return snap


def config_of(snap: Snapshot, backend: str | None = None) -> PartitionConfig:
    """The saved partition's config (`backend`: restore through this one instead)."""
    return saved_config(snap.state["partition"], backend)


def mode_of(snap: Snapshot) -> str:
    return config_of(snap).mode


def restore(snap: Snapshot, *, config: PartitionConfig, events: EventLog | None = None,
            console: Console | None = None, scheduler: SchedulerFactory = Scheduler
            ) -> tuple[Partition, Scheduler]:
    """Rebuild `snap` under `config` (config_of, with the backend the caller chose) and
    check it; on a refusal nothing is left open and SnapshotError says why in one line."""
    t0 = time.perf_counter()
    st = snap.state["partition"]
    check_files(st, config)
    p = restore_partition(st, snap.load_memory, config, events)
    try:
        sched = scheduler(p, console)
        try:
            sched.load_run_state(snap.state["run"])
        except (ValueError, TypeError, KeyError) as e:
            raise SnapshotError(f"snapshot state: the run's state is malformed ({e})") from None
        record = verify(p, st, sched.policy_extra())
        dt = (time.perf_counter() - t0) * 1e6
        summary: dict[str, Any] = {**restored_summary(p, st, snap.path), "duration_us": round(dt, 1)}
        sched.restored_from = summary
        p.events.emit(Lifecycle(ts=p.events.now(), step="snapshot_restore", by="user",
                                detail=f"restored from {snap.path} through {p.backend_name}",
                                duration_us=round(dt, 1), before=st["protections"], after=record))
    except BaseException:
        p.close()
        raise
    return p, sched
