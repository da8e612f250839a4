"""`vtl attack --mode heki`: the same attack scenarios on one VM with the VMM as KVM with
the Heki patches (docs/heki-mode.md), each in a fresh partition, classified by what the VMM
observed (vtl/tools/attack.py's read_back: memory read back, registers and MSRs from KVM,
code markers), then compared with what Heki's design should give for the scenario's
category (vtl/tools/expectations.py).  The comparison is the verdict: "succeeded" is the
expected outcome of an attack Heki does not cover.

Outcomes: blocked (nothing changed); succeeded (something changed); not enforced on this
host (only planted code ran, in pages Heki asked no-exec for, which needs MBEC); not
applicable (the scenario needs VTL1: the VMM refused its VTL request, nothing changed);
error (the scenario did not finish and nothing changed).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, ExitStack
from pathlib import Path
from typing import Any

from vtl.core.config import Backend, PartitionConfig
from vtl.core.events import EventLog
from vtl.core.partition import Partition
from vtl.lifecycle.snapfile import SnapshotError
from vtl.modes.heki import HekiScheduler, heki_config
from vtl.services.reports import Report
from vtl.tools.attack import (
    AttackResult,
    guest_reported_fault,
    read_back,
    restore_summary,
    run_all,
    run_partition,
)
from vtl.tools.expectations import (
    BLOCKED,
    NOT_APPLICABLE,
    NOT_ENFORCED,
    SUCCEEDED,
    category,
    needs_vtl1_refusal,
)
from vtl.tools.progress import Step

VTL1_MISSING = ("VTL_E_DISABLED", "VTL_E_NOT_ENABLED")


def run_heki_attack(scenario: str, vtl0: Path, backend: Backend | None = None,
                    timeout: float = 120.0, after_restore: bool = False) -> AttackResult:
    """One attack in a fresh Heki-mode partition; `after_restore`: it runs on in a partition
    restored from the snapshot its hardened point saved (pins and page permissions carried:
    docs/snapshot.md), as `vtl attack --after-restore` does in VTL mode."""
    events = EventLog(trace=True)
    cfg = heki_config(PartitionConfig(vtl0_image=vtl0, scenario=scenario, attr_backend=backend))
    with ExitStack() as stack:
        p = stack.enter_context(Partition(cfg, events))
        try:
            p, result, sched, extra = run_partition(stack, p, events, timeout, backend, after_restore,
                                                    HekiScheduler)
        except SnapshotError as e:
            return AttackResult(scenario=scenario, expected="", outcome="error", mechanism=str(e),
                                guest_status=0, vmm_checked=[], changed=[], mode="heki",
                                category=category(scenario).name, restore=f"not restored: {e}")
        reports = list(sched.reports.records)
        changed, checked, _ = read_back(p, reports)
        backend_name = p.backend_name
    refusals: list[Any] = events.of_kind("refused")
    responses = {r.response for r in refusals}
    not_enforced: list[Any] = events.of_kind("heki_not_enforced")
    noexec = [e for e in not_enforced if "exec" in e.what]
    markers_only = bool(changed) and all(c.startswith("planted code") for c in changed)
    if changed and markers_only and noexec:
        outcome = NOT_ENFORCED
        mechanism = (f"{'; '.join(changed)}: {noexec[-1].why}")
    elif changed:
        outcome, mechanism = SUCCEEDED, "changed: " + "; ".join(changed) + "; nothing of Heki covers it"
    elif result.status != 0 and needs_vtl1_refusal(responses):
        r = next(r for r in reversed(refusals) if r.response in VTL1_MISSING)
        outcome = NOT_APPLICABLE
        why = r.reason.replace(" (--no-vtl1)", "").replace("disabled for this partition",
                                                           "not in a Heki-mode partition")
        mechanism = f"no VTL1 in Heki mode: {why} -> {r.response}; nothing changed"
    elif result.reason != "guest_exit" or result.status != 0:
        outcome, mechanism = "error", result.message
    else:
        outcome, mechanism = BLOCKED, heki_mechanism(events, reports, backend_name)
    cat = category(scenario)
    return AttackResult(scenario=scenario, expected=f"{cat.heki}: {cat.why}", outcome=outcome,
                        mechanism=mechanism, guest_status=result.status, vmm_checked=checked,
                        changed=changed, mode="heki", category=cat.name, expected_outcome=cat.heki,
                        as_expected=outcome == cat.heki, **extra)


def heki_mechanism(events: EventLog, reports: list[Report], backend: str) -> str:
    """What stopped an attack in Heki mode, from the event stream (the host's decisions)."""
    denials: list[Any] = events.of_kind("heki_denial")
    if denials:
        d = denials[-1]
        cr = 0 if d.reason == 1 else 4
        return (f"Heki CR pin: MOV to CR{cr} {d.cr_value:#x} clears pinned {d.pinned:#x} -> #GP(0) "
                "(stand-in for KVM's CR masks: the privileged section judged by the host)")
    refused: list[Any] = events.of_kind("refused")
    for r in reversed(refused):
        if r.reason.startswith("heki: write"):
            return (f"Heki page permissions (KVM_HC_PROTECT_MEMORY, {backend} backend): "
                    f"{r.reason.removeprefix('heki: ')} -> {r.response} from the host, no exit to a policy")
    if refused and "privileged section" in refused[-1].reason:
        r = refused[-1]
        return (f"the mode's stand-in (the privileged section; in-KVM Heki has none): {r.reason} -> "
                f"{r.response}")
    if refused:
        r = refused[-1]
        return f"the CPU's own checks (decoded by the VMM, not Heki's): {r.reason} -> {r.response}"
    return guest_reported_fault(reports, "the guest", "NX in the kernel's own page tables, which Heki does "
                                "not lock", ", not Heki's") or "none observed"


def run_all_heki(vtl0: Path, backend: Backend | None = None,
                 progress: Callable[[int], AbstractContextManager[Step]] | None = None,
                 only: list[str] | None = None, after_restore: bool = False) -> list[AttackResult]:
    # Heki mode is one VM with one VP: the cross-VP attacks (which need VTL1 on every VP)
    # have no counterpart there.
    def one(name: str, _expected: str) -> AttackResult:
        return run_heki_attack(name, vtl0, backend, after_restore=after_restore)
    return run_all(vtl0, vtl0, backend, progress, only, run=one, max_vps=1)


def verdict(r: AttackResult) -> str:
    if r.expected_outcome == "no expectation":
        return "NO EXPECTATION"
    return "as expected" if r.as_expected else "NOT as expected"


def render_heki(results: list[AttackResult]) -> str:
    w = max(len(r.scenario) for r in results)
    we = max(len(r.expected_outcome) for r in results)
    wo = max(len(r.outcome) for r in results)
    wv = max(len(verdict(r)) for r in results)
    lines = [f"{'scenario':<{w}}  {'Heki should':<{we}}  {'observed':<{wo}}  {'verdict':<{wv}}  "
             "mechanism / what the VMM observed"]
    for r in results:
        lines.append(f"{r.scenario:<{w}}  {r.expected_outcome:<{we}}  {r.outcome:<{wo}}  {verdict(r):<{wv}}  "
                     f"{r.mechanism}")
    counts: dict[str, int] = {}
    for r in results:
        counts[r.outcome] = counts.get(r.outcome, 0) + 1
    summary = ", ".join(f"{n} {k}" for k, n in sorted(counts.items(), key=lambda kv: -kv[1]))
    ok = sum(r.as_expected for r in results)
    lines.append(f"\n{len(results)} attack scenarios in Heki mode (one VM, the VMM as KVM with the Heki "
                 f"patches): {summary}; {ok} as Heki's design gives (vtl/tools/expectations.py), "
                 f"{len(results) - ok} not.  Outcomes observed by the VMM (targets, MSRs and registers read "
                 "back, code markers, events); \"succeeded\" is expected where Heki covers nothing")
    if any(r.restore for r in results):
        lines.append(restore_summary(results))
    return "\n".join(lines)
