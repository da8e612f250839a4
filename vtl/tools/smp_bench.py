"""`vtl bench` with several VPs: the null-call round trip with 1, 2, 4 VPs calling at once,
each beside floors with as many threads (vmm/floor.py), on the C switch path and on the
Python one; and what pausing the other VPs costs (a single step with N VPs).

Every figure comes from the guests' RDTSC stamps (one STAMPS report per VP, the VMM
records which VP sent it): a VP's round trip is the median over its batches; the
aggregate rate counts the calls made while every VP was calling (the batches between the
last VP's first stamp and the first VP's last stamp) over that window (KVM gives the
vCPUs of a VM one TSC).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from functools import partial
from pathlib import Path

from pydantic import BaseModel

from vmm.errors import VmmError
from vmm.floor import ParallelFloor, c_floor_parallel, python_floor_parallel
from vtl.core.config import PartitionConfig
from vtl.core.images import default_vtl0_image, default_vtl1_image
from vtl.core.partition import Partition
from vtl.run import control
from vtl.run.result import raise_if_interrupted
from vtl.run.scheduler import Scheduler
from vtl.tools.progress import QUIET, Step

SCALING_TARGET = 1.5            # 2 VPs' aggregate rate over 1 VP's, on a 2-core host


class SmpCalls(BaseModel):
    vps: int
    switch_path: str            # "C" or "Python"
    median_ns: float            # median over the VPs of each VP's median round trip
    aggregate_per_s: float
    calls: int                  # per VP


class SmpPoint(BaseModel):
    vps: int
    c_path: SmpCalls | None
    python_path: SmpCalls
    python_floor: ParallelFloor
    c_floor: ParallelFloor | None


class StepCost(BaseModel):
    """A CR write VTL1 allows, from the privileged section (a decoded MOV, then the `ret`
    single-stepped), with `vps` VPs: each step pauses the other VPs first."""
    vps: int
    median_ns: float
    p90_ns: float


class SmpBench(BaseModel):
    points: list[SmpPoint]
    step_costs: list[StepCost] = []
    scaling_2vps: float | None          # aggregate with 2 VPs / with 1 VP (the C path if built)
    scaling_target: float = SCALING_TARGET
    meets_target: bool | None


def measure_calls(vps: int, calls: int, fast: bool, vtl0: Path | None = None,
                  vtl1: Path | None = None) -> SmpCalls:
    cfg = PartitionConfig(vtl0_image=vtl0 or default_vtl0_image(), vtl1_image=vtl1 or default_vtl1_image(),
                          scenario="bench-smp-null-call", param=calls, nr_vps=vps)
    with Partition(cfg) as p:
        result, sched = control.run(p, None, timeout=max(120.0, calls * vps * 1e-3),
                                    scheduler=partial(Scheduler, fastpath=fast))
        raise_if_interrupted(result)
        vcpu = p.vps[0].vcpus[0]
        khz = vcpu.tsc_khz() if vcpu is not None else 0
    stamped = [r for r in sched.reports.of_kind("stamps") if r.name == "null_call" and r.vtl == 0]
    if result.status != 0 or len({r.vp for r in stamped}) != vps or not khz:
        raise VmmError(f"bench-smp-null-call with {vps} VPs: {len({r.vp for r in stamped})} VPs reported "
                       f"timings ({result.reason}: {result.message})")
    series = [r.u64s() for r in stamped]
    batch = stamped[0].value[0]
    medians = []
    for st in series:
        per = [(b - a) * 1e6 / khz / batch for a, b in zip(st, st[1:], strict=False)]
        medians.append(statistics.median(per))
    # The window in which every VP was calling (they start as each is handed the work):
    # the calls of the batches inside it, over its length.
    lo, hi = max(st[0] for st in series), min(st[-1] for st in series)
    inside = sum(batch for st in series for a, b in zip(st, st[1:], strict=False) if lo <= a and b <= hi)
    if hi <= lo or not inside:
        raise VmmError(f"bench-smp-null-call with {vps} VPs: the VPs' calls did not overlap "
                       "(raise --smp-calls)")
    total = sum((len(st) - 1) * batch for st in series)
    span_s = (hi - lo) / (khz * 1e3)
    return SmpCalls(vps=vps, switch_path="C" if result.fast_switches else "Python",
                    median_ns=statistics.median(medians), aggregate_per_s=inside / span_s,
                    calls=total // vps)


def run_smp_bench(calls: int, vp_counts: tuple[int, ...] = (1, 2, 4), c_floor: Path | None = None,
                  step: Step = QUIET,
                  cr_write: Callable[[int], tuple[float, float]] | None = None) -> SmpBench:
    """`cr_write(vps)`: (median, p90) ns of an allowed CR write with that many VPs (vtl bench
    passes its bench-cr-write measurement)."""
    from vtl.run import fastpath

    points = []
    for n in vp_counts:
        step(f"{n} VP{'s' if n > 1 else ''}: null calls and floors")
        cpath = measure_calls(n, calls, True) if fastpath.AVAILABLE else None
        pypath = measure_calls(n, calls, False)
        pyf = python_floor_parallel(calls, n)
        cf = c_floor_parallel(calls, c_floor, n) if c_floor is not None and c_floor.exists() else None
        points.append(SmpPoint(vps=n, c_path=cpath, python_path=pypath, python_floor=pyf, c_floor=cf))
    steps = []
    if cr_write is not None:
        for n in vp_counts:
            median, p90 = cr_write(n)
            steps.append(StepCost(vps=n, median_ns=median, p90_ns=p90))
    by = {p.vps: (p.c_path or p.python_path) for p in points}
    scaling = round(by[2].aggregate_per_s / by[1].aggregate_per_s, 3) if 1 in by and 2 in by else None
    return SmpBench(points=points, step_costs=steps, scaling_2vps=scaling,
                    meets_target=None if scaling is None else scaling >= SCALING_TARGET)


def render_smp(b: SmpBench) -> str:
    lines = ["Null VTL calls with several VPs calling at once (per VP: median round trip; all: calls/s)"]
    head = f"  {'VPs':>3}  {'C path':>20}  {'Python path':>20}  {'Python floor':>20}  {'C floor':>20}"
    lines.append(head)

    def cell(m: SmpCalls | ParallelFloor | None) -> str:
        if m is None:
            return f"{'-':>20}"
        return f"{m.median_ns / 1000:6.2f} µs {m.aggregate_per_s / 1000:7.1f}k/s"

    for p in b.points:
        lines.append(f"  {p.vps:>3}  {cell(p.c_path)}  {cell(p.python_path)}  {cell(p.python_floor)}  "
                     f"{cell(p.c_floor)}")
    if b.step_costs:
        one = b.step_costs[0].median_ns
        lines.append("  An allowed CR write from the privileged section (its `ret` single-stepped: the "
                     "other VPs paused):")
        for c in b.step_costs:
            lines.append(f"  {c.vps:>3}  {c.median_ns / 1000:8.2f} µs (p90 {c.p90_ns / 1000:.2f})"
                         f"  {c.median_ns / one:.2f}x one VP's")
    if b.scaling_2vps is not None:
        lines.append(f"  2 VPs / 1 VP aggregate: {b.scaling_2vps:.2f}x (target >= {b.scaling_target}x: "
                     f"{'met' if b.meets_target else 'NOT met'})")
    return "\n".join(lines)
