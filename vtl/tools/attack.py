"""`vtl attack`: every attack scenario in a fresh partition, classified by what the VMM
observed, never by a stored expectation nor by the attacking guest's console.

Observed: the memory targets the guest named through the report channel, read back by
the VMM after the run; the MSR targets, read from KVM after the run; the intercepts,
verdicts and refusals on the event stream; the statuses VTL1 gave (reports).  What
only the guest can see (a #PF inside VTL0) is labelled as guest-reported.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel

from vmm.elf import read_image
from vtl.abi import ABI
from vtl.core.config import Backend, PartitionConfig
from vtl.core.events import EventLog
from vtl.core.images import scenarios
from vtl.core.partition import Partition
from vtl.core.vtl import Vtl
from vtl.run import control
from vtl.run.result import raise_if_interrupted
from vtl.services.reports import Report

# (scenario, what a hardened partition should do) -- the expectation column only.
ATTACKS = [
    ("write-kernel-text", "blocked: text is r-x, immutable"),
    ("write-rodata", "blocked: rodata is r--, immutable"),
    ("write-ro-after-init", "blocked after END_OF_BOOT"),
    ("exec-data-page", "blocked: data is NX"),
    ("modify-page-table", "blocked: page tables r-- once locked"),
    ("clear-efer-nxe", "blocked: EFER pinned"),
    ("read-vtl1-memory", "blocked: VTL1 memory not mapped for VTL0"),
    ("write-vtl1-memory", "blocked: VTL1 memory not mapped for VTL0"),
    ("exec-vtl1-memory", "blocked: VTL1 memory not mapped for VTL0"),
    ("ask-text-writable", "refused by VTL1 (immutable)"),
    ("ask-writable-executable", "refused by VTL1 (W^X)"),
    ("protect-list-past-end", "refused whole (out of range)"),
    ("vtl-return-from-vtl0", "refused: #UD"),
    ("vtl1-hypercall-from-vtl0", "refused: VTL_E_ACCESS_DENIED"),
]
STATUS_NAMES = ABI.names("VTL_E_")


class AttackResult(BaseModel):
    scenario: str
    expected: str
    # blocked | detected after the fact | not enforced on this host | succeeded | not run | error
    outcome: str
    mechanism: str
    guest_status: int
    vmm_checked: list[str]      # what the VMM read back itself (memory targets, MSRs)


def run_attack(scenario: str, expected: str, vtl0: Path, vtl1: Path, backend: Backend | None = None,
               timeout: float = 30.0) -> AttackResult:
    events = EventLog(trace=True)
    cfg = PartitionConfig(vtl0_image=vtl0, vtl1_image=vtl1, scenario=scenario, attr_backend=backend)
    with Partition(cfg, events) as p:
        result, sched = control.run(p, None, timeout)
        raise_if_interrupted(result)
        reports = sched.reports.records
        changed, checked = _read_back(p, reports)
        backend_name = p.backend_name
    mechanism = _mechanism(events, reports, backend_name)
    if changed:
        outcome, mechanism = "succeeded", "changed: " + ", ".join(changed)
    elif result.reason != "guest_exit" or result.status != 0:
        outcome, mechanism = "error", result.message
    else:
        outcome = "blocked"
    return AttackResult(scenario=scenario, expected=expected, outcome=outcome, mechanism=mechanism,
                        guest_status=result.status, vmm_checked=checked)


def _read_back(p: Partition, reports: list[Report]) -> tuple[list[str], list[str]]:
    """Compare every target the guest named with what the VMM reads now."""
    changed, checked = [], []
    for r in reports:
        if r.kind == "target":
            gpa, length, old = r.value[0], r.value[1], r.value[2]
            if not (1 <= length <= 8 and p.layout.in_memory(gpa, length)):
                continue
            now = int.from_bytes(p.mem.read(gpa, length), "little")
            checked.append(f"memory {gpa:#x}")
            if now != old & ((1 << 8 * length) - 1):
                changed.append(f"memory at {gpa:#x} now {now:#x} (was {old:#x})")
        elif r.kind == "msr":
            vcpu = p.vps[r.vp].vcpus[Vtl.VTL0] if r.vp < len(p.vps) else None
            if vcpu is None:
                continue
            msr = vcpu.get_msrs([r.value[0]]).get(r.value[0])
            checked.append(f"MSR {r.value[0]:#x}")
            if msr is not None and msr != r.value[1]:
                changed.append(f"MSR {r.value[0]:#x} now {msr:#x} (was {r.value[1]:#x})")
    return changed, checked


def _mechanism(events: EventLog, reports: list[Report], backend: str) -> str:
    # A refused status is VTL1's policy unless the VMM itself refused (a `refused` event).
    by_vmm = {r.response for r in events.of_kind("refused")}  # type: ignore[union-attr]
    statuses = [STATUS_NAMES.get(r.value[1], str(r.value[1])) for r in reports
                if r.kind == "status" and r.value[1] != 0]
    statuses = [s for s in statuses if s not in by_vmm]
    policy = f"VTL1 policy: {statuses[0]}" if statuses else ""
    return "; then ".join(x for x in (policy, _enforcement(events, reports, backend)) if x) or "none observed"


def _enforcement(events: EventLog, reports: list[Report], backend: str) -> str:
    icpt: list[Any] = events.of_kind("intercept")
    verdicts: list[Any] = events.of_kind("verdict")
    if icpt:
        i, v = icpt[-1], verdicts[-1] if verdicts else None
        what = f"MSR {i.msr:#x}" if i.type == "msr" else f"GPA {i.gpa:#x}"
        via = "MSR filter" if i.type == "msr" else f"{backend} backend"
        answer = "no verdict" if v is None else (
            {14: "#PF", 13: "#GP"}.get(v.vector, f"vector {v.vector}") if v.verdict == "inject_fault"
            else v.verdict)
        return f"{via}: {i.access} intercept on {what} -> VTL1 {answer}"
    refused: list[Any] = events.of_kind("refused")
    if refused:
        r = refused[-1]
        return f"VMM refusal: {r.reason} -> {r.response}"
    faults = [r for r in reports if r.kind == "fault" and r.value[0] == 14 and r.value[1] & 0x10]
    if faults:
        return ("CPU #PF(fetch) inside VTL0 (guest-reported): NX in VTL0 page tables locked r-- by VTL1, "
                "EFER.NXE pinned")
    return ""


def run_all(vtl0: Path, vtl1: Path, backend: Backend | None = None) -> list[AttackResult]:
    known = {s.name for s in scenarios(read_image(vtl0))}
    out = []
    for name, expected in ATTACKS:
        if name not in known:
            out.append(AttackResult(scenario=name, expected=expected, outcome="not run",
                                    mechanism=f"{vtl0} has no scenario {name!r}", guest_status=0,
                                    vmm_checked=[]))
            continue
        out.append(run_attack(name, expected, vtl0, vtl1, backend))
    return out


def render(results: list[AttackResult]) -> str:
    w = max(len(r.scenario) for r in results)
    we = max(len(r.expected) for r in results)
    lines = [f"{'scenario':<{w}}  {'expected':<{we}}  {'outcome':<9}  mechanism / intercept that decided it"]
    for r in results:
        lines.append(f"{r.scenario:<{w}}  {r.expected:<{we}}  {r.outcome:<9}  {r.mechanism}")
    blocked = sum(r.outcome == "blocked" for r in results)
    lines.append(f"\n{blocked}/{len(results)} blocked; outcomes observed by the VMM in fresh partitions "
                 "(targets read back, events, reports)")
    return "\n".join(lines)
