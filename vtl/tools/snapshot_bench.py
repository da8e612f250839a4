"""The cost of a snapshot and of a restore (`vtl bench`, "Snapshot"), against a cold
boot measured in the same run.

A cold boot: the built-in `harden` scenario (VTL1 enabled, VTL0's sections protected,
its page tables locked and its registers pinned, END_OF_BOOT, then PASS at once) with
`--snapshot-at hardened`, which saves the partition at the top of VP0's loop right after
END_OF_BOOT succeeded.  Its time is from creating the `Partition` to the start of that
save (the save's Lifecycle event: its time less its duration); the save's own time is its
record's.  `boots` cold boots are made; the first one's snapshot is kept.

Then `restores` clones of that one snapshot, each a fresh Partition: `open_snapshot`
(verify: the manifest, state.json's SHA-256, memory.bin's size) and `restore` (rebuild:
VMs and vCPUs, memory.bin's data read and hashed in one pass, the attributes applied
again, the run's state, the protection record compared with the saved one), then closed.  The
first clone is then run to its end, to show a clone is a partition that runs (not timed).

A restore and a cold boot end at the same point, a hardened partition ready to run, so
the cold boot is the floor a restore is compared with.  The snapshot was just written:
its files are in the page cache, as they are for clones made on the host that saved.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from pydantic import BaseModel

from vmm.errors import VmmError
from vtl.core.config import PartitionConfig
from vtl.core.events import EventLog, Lifecycle
from vtl.core.images import default_vtl0_image, default_vtl1_image
from vtl.core.partition import Partition
from vtl.lifecycle import snapfile
from vtl.run import control
from vtl.run.restore import config_of, open_snapshot, restore
from vtl.run.result import raise_if_interrupted
from vtl.run.scheduler import Scheduler
from vtl.services.console import Console

SCENARIO = "harden"        # hardens (END_OF_BOOT) and reports PASS at once
BOOTS = 3


class Timing(BaseModel):
    median_ms: float
    min_ms: float
    max_ms: float
    samples: int


class SnapshotCosts(BaseModel):
    scenario: str
    vps: int
    cold_boot: Timing            # Partition created -> the --snapshot-at hardened save starts
    save: Timing                 # the save itself (the record's duration)
    memory_bytes: int            # the partition's memory (memory.bin's size)
    disk_bytes: int              # memory.bin on disk (st_blocks * 512: it is sparse)
    state_bytes: int             # state.json
    restores: int
    restore: Timing              # verify + rebuild: a partition ready to run
    verify: Timing               # open_snapshot: reading and hashing the files
    rebuild: Timing              # restore(): VMs, memory, state, the policy compared
    speedup: float               # cold boot median / restore median
    clone_run: str               # the first clone run to its end


def _timing(ms: list[float]) -> Timing:
    return Timing(median_ms=round(statistics.median(ms), 3), min_ms=round(min(ms), 3),
                  max_ms=round(max(ms), 3), samples=len(ms))


def _saving(path: Path) -> Callable[[Partition, Console | None], Scheduler]:
    def build(p: Partition, c: Console | None) -> Scheduler:
        s = Scheduler(p, c)
        s.snapshot_dir, s.snapshot_at = path, "hardened"
        return s
    return build


def _given(sched: Scheduler) -> Callable[[Partition, Console | None], Scheduler]:
    """control.run's factory for a clone's scheduler (restore built it)."""
    return lambda _p, _c: sched


def cold_boot(config: PartitionConfig, path: Path) -> tuple[float, float]:
    """One cold boot that saves at `path` once hardened: (boot ms, save ms)."""
    events = EventLog(keep=100_000)
    t0 = time.monotonic()
    with Partition(config, events) as p:
        result, sched = control.run(p, None, 60.0, scheduler=_saving(path))
        raise_if_interrupted(result)
    saves = [e for e in events.of_kind("lifecycle") if isinstance(e, Lifecycle) and e.step == "snapshot_save"]
    if result.status != 0 or not saves or not sched.snapshots:
        raise VmmError(f"{config.scenario} saved no snapshot at END_OF_BOOT: {result.message}")
    ev = saves[0]
    save_us = ev.duration_us or 0.0
    started = events.t0 + ev.ts - save_us / 1e6
    return (started - t0) * 1e3, save_us / 1e3


def snapshot_costs(restores: int = 5, boots: int = BOOTS, vps: int = 1) -> SnapshotCosts:
    config = PartitionConfig(vtl0_image=default_vtl0_image(), vtl1_image=default_vtl1_image(),
                             scenario=SCENARIO, nr_vps=vps)
    with tempfile.TemporaryDirectory(prefix="vtl-bench-snapshot-") as tmp:
        boot_ms: list[float] = []
        save_ms: list[float] = []
        for i in range(max(1, boots)):
            b, s = cold_boot(config, Path(tmp) / f"boot{i}")
            boot_ms.append(b)
            save_ms.append(s)
        path = Path(tmp) / "boot0"
        mem = os.stat(path / snapfile.MEMORY)
        state_bytes = os.stat(path / snapfile.STATE).st_size

        verify_ms: list[float] = []
        rebuild_ms: list[float] = []
        clone_run = ""
        for i in range(max(1, restores)):
            t0 = time.perf_counter()
            snap = open_snapshot(path)
            t1 = time.perf_counter()
            p, sched = restore(snap, config=config_of(snap))
            t2 = time.perf_counter()
            with p:
                if i == 0:
                    result, _ = control.run(p, None, 60.0, scheduler=_given(sched))
                    raise_if_interrupted(result)
                    if result.status != 0:
                        raise VmmError(f"a clone restored from the snapshot did not pass: {result.message}")
                    clone_run = f"PASS: {result.message}"
            verify_ms.append((t1 - t0) * 1e3)
            rebuild_ms.append((t2 - t1) * 1e3)
    total = [v + r for v, r in zip(verify_ms, rebuild_ms, strict=True)]
    boot = _timing(boot_ms)
    rest = _timing(total)
    return SnapshotCosts(scenario=SCENARIO, vps=vps, cold_boot=boot, save=_timing(save_ms),
                         memory_bytes=mem.st_size, disk_bytes=mem.st_blocks * 512, state_bytes=state_bytes,
                         restores=len(total), restore=rest, verify=_timing(verify_ms),
                         rebuild=_timing(rebuild_ms),
                         speedup=round(boot.median_ms / rest.median_ms, 2), clone_run=clone_run)


def format_snapshot(c: SnapshotCosts) -> str:
    def row(name: str, t: Timing, extra: str = "") -> str:
        return (f"  {name:<40} {t.median_ms:9.2f} ms  (min {t.min_ms:.2f}, max {t.max_ms:.2f}, "
                f"n {t.samples}){extra}")

    mib = 1 << 20
    disk = (f"memory.bin {c.disk_bytes / mib:.1f} MiB of {c.memory_bytes / mib:.0f} MiB "
            f"({100 * c.disk_bytes / c.memory_bytes:.1f}%, sparse), "
            f"state.json {c.state_bytes / 1024:.0f} KiB")
    lines = [row("floor: cold boot to the save point", c.cold_boot, "  Partition created -> hardened"),
             row("save (state.json + memory.bin)", c.save),
             f"  {'snapshot on disk':<40} {disk}",
             row("restore (verify + rebuild)", c.restore,
                 f"  = {c.speedup:.1f}x faster than a cold boot"),
             row("  verify (manifest, state.json SHA-256)", c.verify),
             row("  rebuild (VMs, memory+hash, policy)", c.rebuild),
             f"  first clone run to its end: {c.clone_run}"]
    return "\n".join(lines)
