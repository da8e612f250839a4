"""`vtl bench`: the VTL0 -> VTL1 -> VTL0 null-call round trip against two floors
measured in the same run (vmm/floor.py): a Python loop alternating KVM_RUN
between two VMs doing only port-I/O exits (same binding, no VTL logic), and the
same loop in C.  All three are timed the same way: the guest stamps RDTSC every
BATCH round trips; the figure is the median over batches.
"""

from __future__ import annotations

import os
import platform
import statistics
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from vmm.elf import read_image
from vmm.errors import VmmError
from vmm.floor import FloorResult, c_floor, python_floor
from vtl.core.config import PartitionConfig
from vtl.core.images import REPO, default_vtl0_image, default_vtl1_image, scenarios
from vtl.core.partition import Partition
from vtl.run import control, fastpath
from vtl.run.result import raise_if_interrupted
from vtl.tools.lifecycle_bench import format_lifecycle, lifecycle_costs
from vtl.tools.progress import QUIET, Step
from vtl.tools.protect_bench import format_costs, protection_costs
from vtl.tools.smp_bench import SmpBench, render_smp, run_smp_bench
from vtl.tools.snapshot_bench import SnapshotCosts, format_snapshot, snapshot_costs

TARGET_RATIO = 1.3
C_FLOOR = REPO / "bench" / "floor_c"


class VtlRoundTrip(BaseModel):
    median_ns: float
    p10_ns: float
    p90_ns: float
    mean_ns: float
    wall_mean_ns: float
    calls: int
    batch: int


class BenchReport(BaseModel):
    host: str
    calls: int
    vtl_round_trip: VtlRoundTrip
    python_floor: FloorResult
    c_floor: FloorResult | None
    ratio_to_python_floor: float
    ratio_to_c_floor: float | None
    target_ratio_to_python_floor: float = TARGET_RATIO
    meets_target: bool
    intercept_allow_round_trip: VtlRoundTrip | None = None
    cr_write_round_trip: VtlRoundTrip | None = None   # a CR write VTL1 allows (privileged section)
    scan: ScanCost | None = None
    not_measured: dict[str, str] = {}            # what the images cannot measure, and why
    protection: dict[str, Any] | None = None     # vtl/protect_bench.py
    lifecycle: dict[str, Any] | None = None      # vtl/tools/lifecycle_bench.py
    smp: SmpBench | None = None                  # vtl/tools/smp_bench.py
    snapshot: SnapshotCosts | None = None        # vtl/tools/snapshot_bench.py
    switch_path: str = ""                        # the path the null call above was measured on


class ScanCost(BaseModel):
    """VTL1's scan at lock of everything VTL0 can execute for privileged encodings."""
    bytes_scanned: int
    ns: float
    ns_per_mib: float


def _percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def measure_vtl_round_trip(calls: int, vtl0: Path | None = None, vtl1: Path | None = None,
                           scenario: str = "bench-null-call", vps: int = 1) -> VtlRoundTrip:
    """Per-operation cost from the guest's RDTSC batches: a null VTL call, or (scenario
    bench-intercept-allow) a VTL0 write that becomes an intercept VTL1 allows."""
    config = PartitionConfig(vtl0_image=vtl0 or default_vtl0_image(),
                             vtl1_image=vtl1 or default_vtl1_image(),
                             scenario=scenario, param=calls, nr_vps=vps)
    with Partition(config) as partition:
        result, sched = control.run(partition, None, timeout=max(60.0, calls * 1e-3))
        raise_if_interrupted(result)
        vcpu = partition.vps[0].vcpus[0]
        khz = vcpu.tsc_khz() if vcpu is not None else 0
    stamped = sched.reports.of_kind("stamps")
    if result.status != 0 or not stamped or not khz:
        raise VmmError(f"{scenario} did not report timings: {result.message}")
    stamps, batch = stamped[-1].u64s(), stamped[-1].value[0]
    if len(stamps) < 2 or batch <= 0:
        raise VmmError(f"{scenario} reported {len(stamps)} stamps of {batch} operations")
    per = [(b - a) * 1e6 / khz / batch for a, b in zip(stamps, stamps[1:], strict=False)]
    return VtlRoundTrip(median_ns=statistics.median(per), p10_ns=_percentile(per, 0.1),
                        p90_ns=_percentile(per, 0.9), mean_ns=statistics.fmean(per),
                        wall_mean_ns=result.wall_s * 1e9 / max(1, result.vtl_calls),
                        calls=(len(stamps) - 1) * batch, batch=batch)


def measure_scan(vtl0: Path | None = None, vtl1: Path | None = None) -> ScanCost:
    """VTL1 reports how long its lock-time scan took (VALUE scan_ticks, TSC) over how many
    executable bytes (VALUE scan_bytes) during the `harden` scenario."""
    config = PartitionConfig(vtl0_image=vtl0 or default_vtl0_image(), vtl1_image=vtl1 or default_vtl1_image(),
                             scenario="harden")
    with Partition(config) as partition:
        result, sched = control.run(partition, None, timeout=60.0)
        raise_if_interrupted(result)
        vcpu = partition.vps[0].vcpus[0]
        khz = vcpu.tsc_khz() if vcpu is not None else 0
    values = {r.name: r.value[0] for r in sched.reports.of_kind("value") if r.vtl == 1}
    if result.status != 0 or "scan_ticks" not in values or not values.get("scan_bytes") or not khz:
        raise VmmError(f"VTL1 reported no scan timing (scan_ticks, scan_bytes): {result.message}")
    ns = values["scan_ticks"] * 1e6 / khz
    mib = values["scan_bytes"] / (1 << 20)
    return ScanCost(bytes_scanned=values["scan_bytes"], ns=ns, ns_per_mib=ns / mib)


def _has_scenario(name: str) -> bool:
    return name in {s.name for s in scenarios(read_image(default_vtl0_image()))}


def bench_steps(intercepts: int = 2000, protection: bool = True, lifecycle_repeats: int = 1,
                smp_points: int = 0, restores: int = 5) -> int:
    """How many times run_bench with these arguments tells its Step of a new piece of work."""
    return 4 + 2 * bool(intercepts) + bool(protection) + bool(lifecycle_repeats) + smp_points + bool(restores)


def run_bench(calls: int, intercepts: int = 2000, protection: bool = True,
              lifecycle_repeats: int = 1, step: Step = QUIET, smp_calls: int = 0,
              vp_counts: tuple[int, ...] = (1, 2, 4), restores: int = 5) -> BenchReport:
    step("Python floor")
    pyf = python_floor(calls)
    step(f"{calls} null VTL calls")
    vtl = measure_vtl_round_trip(calls)
    missing: dict[str, str] = {}
    icpt = cr = None
    if intercepts:
        step(f"{intercepts} allowed intercepts")
        icpt = measure_vtl_round_trip(intercepts, scenario="bench-intercept-allow")
        step(f"{intercepts} allowed CR writes")
        if _has_scenario("bench-cr-write"):
            cr = measure_vtl_round_trip(intercepts, scenario="bench-cr-write")
        else:
            missing["cr_write_round_trip"] = "the VTL0 image has no bench-cr-write scenario"
    step("VTL1's lock-time scan")
    try:
        scan: ScanCost | None = measure_scan()
    except VmmError as e:
        scan, missing["scan"] = None, str(e)
    if protection:
        step("protecting 1k/16k/64k pages per backend")
    prot = protection_costs() if protection else None
    if lifecycle_repeats:
        step(f"lifecycle flows x{lifecycle_repeats}")
    life = lifecycle_costs(lifecycle_repeats).model_dump() if lifecycle_repeats else None
    if restores:
        step(f"hardened cold boots and saves, {restores} restores")
    snap = snapshot_costs(restores) if restores else None
    def cr_write(vps: int) -> tuple[float, float]:
        m = measure_vtl_round_trip(max(200, intercepts // 4), scenario="bench-cr-write", vps=vps)
        return m.median_ns, m.p90_ns

    smp = (run_smp_bench(smp_calls, vp_counts, C_FLOOR, step,
                         cr_write if intercepts and _has_scenario("bench-cr-write") else None)
           if smp_calls else None)
    # Built by the set-up command (`make bench`); never built behind the user's back.
    step("C floor")
    cf = c_floor(calls, C_FLOOR) if C_FLOOR.exists() else None
    ratio = vtl.median_ns / pyf.median_ns
    return BenchReport(host=f"{platform.node()} {os.uname().release}", calls=calls, vtl_round_trip=vtl,
                       python_floor=pyf, c_floor=cf, ratio_to_python_floor=round(ratio, 3),
                       ratio_to_c_floor=round(vtl.median_ns / cf.median_ns, 3) if cf else None,
                       meets_target=ratio <= TARGET_RATIO, intercept_allow_round_trip=icpt,
                       cr_write_round_trip=cr, scan=scan, not_measured=missing, protection=prot,
                       lifecycle=life, smp=smp, snapshot=snap, switch_path=fastpath.DESCRIPTION)


def render_bench(r: BenchReport) -> str:
    def row(name: str, median: float, p10: float, p90: float, extra: str = "") -> str:
        return f"  {name:<34} {median / 1000:8.2f} µs   (p10 {p10 / 1000:.2f}, p90 {p90 / 1000:.2f}){extra}"

    v, p = r.vtl_round_trip, r.python_floor
    lines = [f"VTL round trip vs floors, {r.calls} calls, median over batches of {v.batch} ({r.host}; "
             f"switch path: {r.switch_path})",
             row("VTL0->VTL1->VTL0 null call", v.median_ns, v.p10_ns, v.p90_ns),
             row("floor: Python KVM_RUN ping-pong", p.median_ns, p.p10_ns, p.p90_ns)]
    if r.c_floor:
        c = r.c_floor
        lines.append(row("floor: C KVM_RUN ping-pong", c.median_ns, c.p10_ns, c.p90_ns))
    lines.append(f"  ratio to Python floor: {r.ratio_to_python_floor:.2f}x "
                 f"(target <= {r.target_ratio_to_python_floor}x: {'met' if r.meets_target else 'NOT met'})")
    if r.ratio_to_c_floor is not None:
        lines.append(f"  ratio to C floor:      {r.ratio_to_c_floor:.2f}x")
    else:
        lines.append("  C floor: not built (make -C bench)")
    if r.intercept_allow_round_trip:
        i = r.intercept_allow_round_trip
        lines += ["", f"Secure intercept that VTL1 allows ({i.calls} writes to an audited page):",
                  row("VTL0 write -> intercept -> VTL1 -> allow", i.median_ns, i.p10_ns, i.p90_ns,
                      f"  = {i.median_ns / v.median_ns:.1f}x a null VTL call")]
    if r.cr_write_round_trip:
        w = r.cr_write_round_trip
        lines += ["", f"A CR write VTL1 allows ({w.calls} MOV to CR3 of the locked root, privileged "
                      "section):",
                  row("VTL0 MOV CR3 -> decode -> VTL1 -> allow", w.median_ns, w.p10_ns, w.p90_ns,
                      f"  = {w.median_ns / v.median_ns:.1f}x a null VTL call")]
    if r.scan:
        s = r.scan
        lines += ["", f"VTL1's lock-time scan of VTL0's executable memory ({s.bytes_scanned} bytes, every "
                  f"byte offset): {s.ns / 1e6:.2f} ms = {s.ns_per_mib / 1e6:.2f} ms per MiB"]
    for what, why in r.not_measured.items():
        lines.append(f"  not measured: {what}: {why}")
    if r.protection:
        lines += ["", "Cost of VTL1 protecting VTL0 pages (VTL_HC_MODIFY_VTL_PROTECTION backends):",
                  format_costs(r.protection)]
    if r.lifecycle:
        lines += ["", f"Lifecycle steps (each flow {r.lifecycle['repeats']} times; the step alone, from its "
                  "event):", format_lifecycle(r.lifecycle, v.median_ns)]
    if r.snapshot:
        sn = r.snapshot
        lines += ["", f"Snapshot and restore (scenario {sn.scenario}: hardened, saved at END_OF_BOOT by "
                  f"--snapshot-at hardened; {sn.cold_boot.samples} cold boots, {sn.restores} clones of one "
                  "snapshot):", format_snapshot(sn)]
    if r.smp:
        lines += ["", render_smp(r.smp)]
    return "\n".join(lines)
