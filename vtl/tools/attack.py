"""`vtl attack`: every attack scenario in a fresh partition, classified by what was
observed (guest verdict, the VMM's own check of the target memory, the intercepts,
verdicts and refusals on the event stream), never by a stored expectation."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from vtl import control
from vtl.events import EventLog
from vtl.partition import Partition, PartitionConfig


def _of(events: EventLog, kind: str) -> list[Any]:
    return list(events.of_kind(kind))

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
TARGET_RE = re.compile(r"ATTACK target=(0x[0-9a-f]+) old=(0x[0-9a-f]+)")
STATUS_RE = re.compile(r"-> (VTL_E_[A-Z0-9_]+)")


class AttackResult(BaseModel):
    scenario: str
    expected: str
    # blocked | detected after the fact | not enforced on this host | succeeded | error
    outcome: str
    mechanism: str
    guest_status: int
    memory_checked: bool    # the VMM compared the target memory itself


def run_attack(scenario: str, expected: str, vtl0: Path, vtl1: Path, timeout: float = 30.0) -> AttackResult:
    events = EventLog(trace=True)
    with Partition(PartitionConfig(vtl0_image=vtl0, vtl1_image=vtl1, scenario=scenario), events) as p:
        result, sched = control.run(p, None, timeout)
        changed = []
        for line in sched.console_lines:
            m = TARGET_RE.search(line)
            if m and p.mem.read(int(m.group(1), 16), 8) != int(m.group(2), 16).to_bytes(8, "little"):
                changed.append(m.group(1))
        backend = p.protection.kind
    console = sched.console_lines
    checked = any(TARGET_RE.search(line) for line in console)
    mechanism = _mechanism(events, console, backend)
    succeeded = bool(changed) or any("ATTACK-RESULT succeeded" in line for line in console)
    if succeeded:
        outcome = "succeeded"
        mechanism = f"target changed at {', '.join(changed)}" if changed else "the guest saw the attack work"
    elif result.status == 0:
        outcome = "blocked"
    else:
        outcome = "error"
        mechanism = result.message
    return AttackResult(scenario=scenario, expected=expected, outcome=outcome, mechanism=mechanism,
                        guest_status=result.status, memory_checked=checked)


def _mechanism(events: EventLog, console: list[str], backend: str) -> str:
    statuses = [m.group(1) for line in console if (m := STATUS_RE.search(line))]
    policy = f"VTL1 policy: {statuses[0]}" if statuses else ""
    rest = _enforcement(events, console, backend)
    return "; then ".join(x for x in (policy, rest) if x) or "none observed"


def _enforcement(events: EventLog, console: list[str], backend: str) -> str:
    icpt = _of(events, "intercept")
    verdicts = _of(events, "verdict")
    if icpt:
        i, v = icpt[-1], verdicts[-1] if verdicts else None
        what = f"MSR {i.msr:#x}" if i.type == "msr" else f"GPA {i.gpa:#x}"
        slot = "read-only memslot" if i.access == "write" else "unmapped"
        via = "MSR filter" if i.type == "msr" else f"{backend} backend ({slot})"
        answer = f"{v.verdict} {v.vector if v.vector is not None else ''}".strip() if v else "no verdict"
        return f"{via}: {i.access} intercept on {what} -> VTL1 {answer}".replace("inject_fault 14", "#PF") \
            .replace("inject_fault 13", "#GP")
    refused = _of(events, "refused")
    if refused:
        r = refused[-1]
        return f"VMM refusal: {r.reason} -> {r.response}"
    if any("#PF (14)" in line and "err=0x11" in line for line in console):
        return "CPU #PF(fetch): NX in VTL0 page tables locked r-- by VTL1, EFER.NXE pinned"
    return ""


def run_all(vtl0: Path, vtl1: Path) -> list[AttackResult]:
    return [run_attack(s, e, vtl0, vtl1) for s, e in ATTACKS]


def render(results: list[AttackResult]) -> str:
    w = max(len(r.scenario) for r in results)
    we = max(len(r.expected) for r in results)
    lines = [f"{'scenario':<{w}}  {'expected':<{we}}  {'outcome':<9}  mechanism / intercept that decided it"]
    for r in results:
        lines.append(f"{r.scenario:<{w}}  {r.expected:<{we}}  {r.outcome:<9}  {r.mechanism}")
    blocked = sum(r.outcome == "blocked" for r in results)
    lines.append(f"\n{blocked}/{len(results)} blocked; outcomes are observed in fresh partitions "
                 "(guest verdict, VMM memory check, events)")
    return "\n".join(lines)
