"""The cost of each lifecycle step (`vtl bench`, "Lifecycle"): every kexec flow, a RESET
and a module load, run `repeats` times on the built-in guests; each step's time comes
from its Lifecycle event (the step alone, without the VMM's before/after snapshots).

The floor, measured in the same run: what KVM charges for a VM's whole life (create,
map all memory, create a vCPU, close; vmm/floor.py).  A VTL1 enable, a teardown and a
RESET each pay about one of those; the rest is ours (loading and measuring an image,
zeroing VTL1's 16 MiB, re-applying protections) or the guest's (VTL1 hashing and sealing
segments inside a VTL call).
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from typing import Any

from pydantic import BaseModel

from vmm.elf import read_image
from vmm.floor import VmLifecycleFloor, vm_lifecycle_floor
from vtl.core.config import PartitionConfig
from vtl.core.events import EventLog
from vtl.core.images import REPO, default_kexec_image, default_vtl0_image, default_vtl1_image, scenarios
from vtl.core.partition import Partition
from vtl.core.trust import trust_digest
from vtl.run import control
from vtl.run.result import raise_if_interrupted
from vtl.tools.kexec import FLOWS, run_flow

MODULE = REPO / "guest_vtl0" / "build" / "module.bin"


class StepCost(BaseModel):
    flow: str
    step: str
    by: str
    median_us: float
    min_us: float
    max_us: float
    samples: int


class LifecycleCosts(BaseModel):
    floor: VmLifecycleFloor
    repeats: int
    steps: list[StepCost]
    not_measured: dict[str, str] = {}


def _run_scenario(scenario: str, trust: list[bytes], **kw: Any) -> list[Any]:
    cfg = PartitionConfig(vtl0_image=default_vtl0_image(), vtl1_image=default_vtl1_image(), scenario=scenario,
                          trust=trust, **kw)
    events = EventLog(keep=100_000)
    with Partition(cfg, events) as p:
        result, _ = control.run(p, None, 60.0)
        raise_if_interrupted(result)
    if result.status != 0:
        raise RuntimeError(f"{scenario}: {result.message}")
    return events.of_kind("lifecycle")


def lifecycle_costs(repeats: int = 3) -> LifecycleCosts:
    floor = vm_lifecycle_floor()
    samples: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    missing: dict[str, str] = {}
    known = {s.name for s in scenarios(read_image(default_vtl0_image()))}
    kexec_image = default_kexec_image()

    def collect(flow: str, events: list[Any]) -> None:
        for e in events:
            samples[(flow, e.step, e.by)].append(e.duration_us)

    for flow in FLOWS:
        if f"kexec-{flow}" not in known or not kexec_image.is_file():
            missing[f"kexec {flow}"] = f"no kexec-{flow} scenario or no {kexec_image}"
            continue
        for _ in range(repeats):
            rep = run_flow(flow, default_vtl0_image(), default_vtl1_image(), kexec_image)
            if not rep.passed:
                missing[f"kexec {flow}"] = "the flow's checks failed: " + "; ".join(
                    c.what for c in rep.checks if not c.ok)
                break
            for s in rep.steps:
                samples[(f"kexec {flow}", s.step, s.by)].append(s.duration_us)
    extra: list[tuple[str, str, list[bytes], dict[str, Any]]] = [
        ("reset", "reset-request", [], {}),
        ("module", "module-load", [trust_digest(MODULE)] if MODULE.is_file() else [], {}),
    ]
    for name, scenario, trust, kw in extra:
        if scenario not in known:
            missing[name] = f"the VTL0 image has no {scenario} scenario"
            continue
        try:
            for _ in range(repeats):
                collect(name, _run_scenario(scenario, trust, **kw))
        except RuntimeError as e:
            missing[name] = str(e)
    steps = [StepCost(flow=flow, step=step, by=by, median_us=round(statistics.median(v), 1),
                      min_us=round(min(v), 1), max_us=round(max(v), 1), samples=len(v))
             for (flow, step, by), v in samples.items()]
    return LifecycleCosts(floor=floor, repeats=repeats, steps=steps, not_measured=missing)


def format_lifecycle(c: LifecycleCosts | dict[str, Any]) -> str:
    if isinstance(c, dict):
        c = LifecycleCosts.model_validate(c)
    f = c.floor
    lines = [f"  floor: KVM VM life (create, map {f.mem_bytes >> 20} MiB, vCPU, close) "
             f"{f.median_us / 1000:.2f} ms (p10 {f.p10_us / 1000:.2f}, p90 {f.p90_us / 1000:.2f})"]
    wf = max([len(s.flow) for s in c.steps] + [4])
    ws = max([len(s.step) for s in c.steps] + [4])
    for s in c.steps:
        lines.append(f"  {s.flow:<{wf}}  {s.step:<{ws}}  {s.by:<4}  {s.median_us / 1000:8.2f} ms  "
                     f"(min {s.min_us / 1000:.2f}, max {s.max_us / 1000:.2f}, n {s.samples})  "
                     f"= {s.median_us / f.median_us:.1f}x the floor")
    for what, why in c.not_measured.items():
        lines.append(f"  not measured: {what}: {why}")
    return "\n".join(lines)

