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


VM_STEPS = {"vtl1_enable", "vtl1_teardown", "vtl0_restart", "reset"}


class StepCost(BaseModel):
    step: str
    by: str
    kind: str                   # vm | vtl_call (see _kind)
    flows: list[str]
    median_us: float
    min_us: float
    max_us: float
    samples: int


class LifecycleCosts(BaseModel):
    floor: VmLifecycleFloor
    repeats: int
    steps: list[StepCost]
    not_measured: dict[str, str] = {}


def _run_scenario(scenario: str, trust: list[bytes]) -> list[Any]:
    cfg = PartitionConfig(vtl0_image=default_vtl0_image(), vtl1_image=default_vtl1_image(), scenario=scenario,
                          trust=trust)
    events = EventLog(keep=100_000)
    with Partition(cfg, events) as p:
        result, _ = control.run(p, None, 60.0)
        raise_if_interrupted(result)
    if result.status != 0:
        raise RuntimeError(f"{scenario}: {result.message}")
    return events.of_kind("lifecycle")


def lifecycle_costs(repeats: int = 3) -> LifecycleCosts:
    floor = vm_lifecycle_floor()
    samples: dict[tuple[str, str], list[float]] = defaultdict(list)
    flows: dict[tuple[str, str], set[str]] = defaultdict(set)
    missing: dict[str, str] = {}
    known = {s.name for s in scenarios(read_image(default_vtl0_image()))}
    kexec_image = default_kexec_image()

    def collect(flow: str, events: list[Any]) -> None:
        for e in events:
            samples[(e.step, e.by)].append(e.duration_us)
            flows[(e.step, e.by)].add(flow)

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
            for st in rep.steps:
                # The jump is a different step per policy (teardown, persist, refused).
                key = (f"{st.step} ({flow})" if st.step == "kexec_jump" else st.step, st.by)
                samples[key].append(st.duration_us)
                flows[key].add(f"kexec {flow}")
    extra: list[tuple[str, str, list[bytes]]] = [
        ("reset", "reset-request", []),
        ("module", "module-load", [trust_digest(MODULE)] if MODULE.is_file() else []),
    ]
    for name, scenario, trust in extra:
        if scenario not in known:
            missing[name] = f"the VTL0 image has no {scenario} scenario"
            continue
        try:
            for _ in range(repeats):
                collect(name, _run_scenario(scenario, trust))
        except RuntimeError as e:
            missing[name] = str(e)
    steps = [StepCost(step=step, by=by, flows=sorted(flows[(step, by)]), kind=_kind(step),
                      median_us=round(statistics.median(v), 1), min_us=round(min(v), 1),
                      max_us=round(max(v), 1), samples=len(v))
             for (step, by), v in samples.items()]
    return LifecycleCosts(floor=floor, repeats=repeats, steps=steps, not_measured=missing)


def _kind(step: str) -> str:
    """What a step's cost is made of: a VM built or destroyed by the VMM, or a VTL call
    whose work is VTL1's (hashing, sealing, scanning)."""
    return "vm" if step.split()[0] in VM_STEPS else "vtl_call"


def format_lifecycle(c: LifecycleCosts | dict[str, Any], null_call_ns: float | None = None) -> str:
    """One row per step (the same step in several flows is one row).  VM steps are set
    against the KVM VM-life floor; VTL calls against the null VTL call of the same run."""
    if isinstance(c, dict):
        c = LifecycleCosts.model_validate(c)
    f = c.floor
    lines = [f"  floors: KVM VM life (create, map {f.mem_bytes >> 20} MiB, vCPU, close) "
             f"{f.median_us / 1000:.2f} ms (p10 {f.p10_us / 1000:.2f}, p90 {f.p90_us / 1000:.2f})"
             + (f"; null VTL call {null_call_ns / 1000:.1f} µs" if null_call_ns else "")]
    ws = max([len(s.step) for s in c.steps] + [4])
    for s in sorted(c.steps, key=lambda s: (s.kind, s.median_us)):
        if s.kind == "vm":
            vs = f"= {s.median_us / f.median_us:.1f}x a VM's life"
        elif null_call_ns:
            vs = f"= {s.median_us * 1000 / null_call_ns:,.0f}x a null VTL call"
        else:
            vs = ""
        lines.append(f"  {s.step:<{ws}}  {s.by:<4}  {s.median_us / 1000:9.2f} ms  "
                     f"(min {s.min_us / 1000:.2f}, max {s.max_us / 1000:.2f}, n {s.samples})  {vs}  "
                     f"[{', '.join(s.flows)}]")
    for what, why in c.not_measured.items():
        lines.append(f"  not measured: {what}: {why}")
    return "\n".join(lines)
