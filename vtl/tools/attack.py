"""`vtl attack`: every attack scenario of a VTL0 image, each in a fresh partition,
classified by what the VMM observed, never by a stored expectation nor by the attacking
guest's own word.

Observed after each run, by the VMM itself: every memory target the guest named through
the report channel (read back from guest memory), every MSR and register target (read
from KVM: MSRs, sregs, XCR0), every planted-code marker (read back: did the attacker's
code run?), plus the intercepts, verdicts and refusals on the event stream and the
statuses the guest was given, and the run's own record (vtl/tools/invariants.py:
END_OF_BOOT only with every VP pinned, nothing of VTL1 after a RESET, a validated kexec
image equal to the trusted file, ...).  What only the guest can see (a #PF inside VTL0) is
labelled as guest-reported and never decides an outcome.

Each attack runs with what its description declares (docs/smp.md, "Cross-VP attacks"):
at least its VPs ("--vps N+"), the built-in next kernel staged and trusted ("staged"),
its kexec policy.

Outcomes: blocked (nothing changed); detected after the fact (something changed and
VTL1 then stopped the partition); not enforced on this host (something changed where
the host lacks the mechanism, with why); succeeded (something changed); error (the
scenario did not finish and nothing changed); not run (the image lacks it).

`after_restore` (`vtl attack --after-restore`, docs/snapshot.md): the fresh partition
saves a snapshot once its hardening has ended (END_OF_BOOT accepted) and its run ends
right there, every VP stopped before its next instruction (Scheduler.snapshot_stop); it
is closed, a new partition is restored from the snapshot (restore's own checks, the
policy digest among them) into the same event log, and the attack runs on to its end
in the restored partition, where everything above is observed.  A scenario that never
reaches the hardened point (or whose save is refused) runs as without the option and
says so.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from contextlib import AbstractContextManager, ExitStack, nullcontext
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from vmm.elf import read_image
from vmm.x86 import VECTOR_NAMES
from vtl.abi import ABI
from vtl.core.config import Backend, PartitionConfig
from vtl.core.events import EventLog
from vtl.core.images import Scenario, UnknownScenario, default_kexec_image, near_names, scenarios
from vtl.core.partition import Partition
from vtl.core.trust import trust_digest
from vtl.core.vtl import Vtl
from vtl.lifecycle.snapfile import SnapshotError
from vtl.run import control
from vtl.run.restore import config_of, open_snapshot, restore
from vtl.run.result import RunResult, raise_if_interrupted
from vtl.run.scheduler import Scheduler
from vtl.services.console import Console
from vtl.services.reports import Report
from vtl.tools.expectations import BLOCKED, category
from vtl.tools.invariants import check_run
from vtl.tools.progress import QUIET, Step

# What a hardened partition should do, for the scenarios whose description does not say.
EXPECTED = {
    "write-kernel-text": "blocked: text is r-x, immutable",
    "write-rodata": "blocked: rodata is r--, immutable",
    "write-ro-after-init": "blocked after END_OF_BOOT",
    "exec-data-page": "blocked: data is NX",
    "modify-page-table": "blocked: page tables r-- once locked",
    "clear-efer-nxe": "blocked: EFER pinned",
    "read-vtl1-memory": "blocked: VTL1 memory not mapped for VTL0",
    "write-vtl1-memory": "blocked: VTL1 memory not mapped for VTL0",
    "exec-vtl1-memory": "blocked: VTL1 memory not mapped for VTL0",
    "ask-text-writable": "refused by VTL1 (immutable)",
    "ask-writable-executable": "refused by VTL1 (W^X)",
    "protect-list-past-end": "refused whole (out of range)",
    "vtl-return-from-vtl0": "refused: #UD",
    "vtl-call-from-user": "refused: #GP",
    "vtl1-hypercall-from-vtl0": "refused: VTL_E_ACCESS_DENIED",
    # VTL calls and hypercalls with bad arguments (DESIGN section 9).
    "unknown-call-code": "refused by VTL1: VTL_E_INVALID_CODE",
    "unknown-hypercall": "refused: VTL_E_INVALID_CODE",
    "enable-twice": "refused: VTL_E_ALREADY_ENABLED",
}
STATUS_NAMES = ABI.names("VTL_E_")
REG_NAMES = {v: k[len("VTL_REG_"):] for k, v in ABI.constants.items() if k.startswith("VTL_REG_")}
# Registers whose writes only the privileged-section scheme can stop on this host.
PINNED_BY_INTERCEPT_CONTROL = {ABI.VTL_REG_CR0, ABI.VTL_REG_CR3, ABI.VTL_REG_CR4, ABI.VTL_REG_XCR0,
                               ABI.VTL_REG_GDTR, ABI.VTL_REG_IDTR, ABI.VTL_REG_LDTR, ABI.VTL_REG_TR,
                               ABI.VTL_REG_LDTR_BASE, ABI.VTL_REG_TR_BASE}


class AttackResult(BaseModel):
    scenario: str
    expected: str
    # blocked | detected after the fact | not enforced on this host | succeeded | error | not run
    outcome: str
    mechanism: str
    guest_status: int
    vmm_checked: list[str]      # what the VMM read back itself
    changed: list[str]          # what it found changed
    mode: str = "vtl"           # vtl | heki (docs/heki-mode.md)
    category: str = ""          # vtl/tools/expectations.py
    expected_outcome: str = BLOCKED   # what the mode's design should give (never the verdict)
    as_expected: bool = False   # the observed outcome is the expected one for this mode
    # --after-restore: "restored" (the attack ran on in a partition restored from the
    # hardened snapshot), "not restored: ..." (why it ran as without), "" (not asked).
    restore: str = ""
    attempts_before_save: int = 0       # intercepts and VMM refusals before the save
    saved_policy_digest: str | None = None      # the snapshot's (the save's record)
    restored_policy_digest: str | None = None   # the rebuilt partition's, taken at the restore


def attack_scenarios(vtl0: Path, max_vps: int | None = None) -> list[tuple[str, str]]:
    """(name, expectation) of every attack the image carries: a description starting
    with "attack: ", or one of the refusal scenarios the VMM itself answers.  `max_vps`:
    only those that need no more VPs than that (Heki mode and `vtl compare` run one)."""
    out = []
    for s in scenarios(read_image(vtl0)):
        if max_vps is not None and s.min_vps > max_vps:
            continue
        if s.description.startswith("attack: ") or s.name in EXPECTED:
            out.append((s.name, EXPECTED.get(s.name, s.description.removeprefix("attack: "))))
    return out


def scenario_needs(vtl0: Path, scenario: str) -> Scenario | None:
    """What the scenario declares it needs of its partition (vtl/core/images.py)."""
    return next((s for s in scenarios(read_image(vtl0)) if s.name == scenario), None)


def run_attack(scenario: str, expected: str, vtl0: Path, vtl1: Path, backend: Backend | None = None,
               timeout: float = 120.0, vps: int = 1, param: int = 0,
               events: EventLog | None = None, after_restore: bool = False) -> AttackResult:
    """One attack in a fresh partition.  `param`: the scenario's boot_info.param (the
    cross-VP attacks' control run is 1); `events`: the log to record into (tests read it);
    `after_restore`: the attack runs on in a partition restored from the snapshot its
    hardened point saved (the module doc)."""
    # The timeout only catches a scenario that never ends; the slowest (kexec) take ~8 s here
    # and several times that on a loaded machine, which must not turn into an "error".
    # Each attack gets what its description declares (docs/smp.md, "Cross-VP attacks"): at
    # least its VPs, and the built-in next kernel staged and trusted, with its kexec policy.
    needs = scenario_needs(vtl0, scenario)
    staged = default_kexec_image() if needs is not None and needs.staged else None
    events = events if events is not None else EventLog(trace=True)
    cfg = PartitionConfig(vtl0_image=vtl0, vtl1_image=vtl1, scenario=scenario, attr_backend=backend,
                          nr_vps=max(vps, needs.min_vps if needs is not None else 1), param=param,
                          staged=staged, trust=[trust_digest(staged)] if staged is not None else [],
                          kexec_policy=(needs.kexec_policy if needs is not None else None) or "teardown")
    with ExitStack() as stack:
        p = stack.enter_context(Partition(cfg, events))
        try:
            p, result, sched, extra = run_partition(stack, p, events, timeout, backend, after_restore)
        except SnapshotError as e:
            return _result(scenario, expected, "error", f"the restore was refused: {e}", 0, [], [],
                           restore=f"not restored: {e}")
        reports = list(sched.reports.records)
        changed, checked, unenforced = read_back(p, reports)
        run_checked, wrong = check_run(p, events, staged)
        checked += run_checked
        changed += wrong
        backend_name = p.backend_name
        many = len(p.vps) > 1
    mechanism = _mechanism(events, reports, backend_name, many)
    if changed and unenforced:
        outcome, mechanism = "not enforced on this host", "; ".join(unenforced)
    elif changed and result.reason == "stopped_by_vtl1":
        outcome = "detected after the fact"
    elif changed:
        outcome, mechanism = "succeeded", "changed: " + "; ".join(changed)
    elif result.reason != "guest_exit" or result.status != 0:
        outcome, mechanism = "error", result.message
    else:
        outcome = "blocked"
    return _result(scenario, expected, outcome, mechanism, result.status, checked, changed, **extra)


def _result(scenario: str, expected: str, outcome: str, mechanism: str, status: int, checked: list[str],
            changed: list[str], **extra: Any) -> AttackResult:
    return AttackResult(scenario=scenario, expected=expected, outcome=outcome, mechanism=mechanism,
                        guest_status=status, vmm_checked=checked, changed=changed,
                        category=category(scenario).name, as_expected=outcome == BLOCKED, **extra)


def run_partition(stack: ExitStack, p: Partition, events: EventLog, timeout: float, backend: Backend | None,
                  after_restore: bool, scheduler: type[Scheduler] = Scheduler
                  ) -> tuple[Partition, RunResult, Scheduler, dict[str, Any]]:
    """An attack's run: whole in `p`, or (`after_restore`) on in a partition restored from
    the snapshot `p` saves at its hardened point (run_after_restore; a refused restore is a
    SnapshotError).  Returns the partition to observe, the result, the scheduler and the
    record's restore fields."""
    if not after_restore:
        result, sched = control.run(p, None, timeout, scheduler=scheduler)
        raise_if_interrupted(result)
        return p, result, sched, {}
    tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="vtl-attack-")))
    return run_after_restore(stack, p, events, timeout, tmp / "snapshot", backend, scheduler)


def run_after_restore(stack: ExitStack, p: Partition, events: EventLog, timeout: float, path: Path,
                      backend: Backend | None, scheduler: type[Scheduler] = Scheduler
                      ) -> tuple[Partition, RunResult, Scheduler, dict[str, Any]]:
    """Run `p` until its hardened point, where it saves to `path` and its run ends; then
    the rest of the run in a partition restored from `path` (entered into `stack`), both
    with `scheduler` (a mode's: Heki mode's saves and restores the host-owned policy).
    Returns the partition to observe, the run's result and scheduler, and the record's
    restore fields.  A run that never saved has run whole in `p`."""
    def saving(part: Partition, console: Console | None) -> Scheduler:
        s = scheduler(part, console)
        s.snapshot_dir, s.snapshot_at, s.snapshot_stop = path, "hardened", True
        return s

    result, sched = control.run(p, None, timeout, scheduler=saving)
    raise_if_interrupted(result)
    if not sched.snapshots or result.reason != "snapshot_saved":
        why = ("the save at the hardened point was refused: " + sched.snapshot_refused
               if sched.snapshot_refused is not None else "never hardened")
        return p, result, sched, {"restore": f"not restored: {why}"}
    saved = sched.snapshots[0]["policy_digest"]
    evs = events.events
    save_at = next((i for i, e in enumerate(evs) if e.kind == "lifecycle" and e.step == "snapshot_save"), 0)
    attempts = sum(1 for e in evs[:save_at] if e.kind in ("intercept", "refused"))
    p.close()       # nothing of it is read again: everything observed is the restored one's
    snap = open_snapshot(path)
    restored, rsched = restore(snap, config=config_of(snap, backend), events=events, scheduler=scheduler)
    stack.enter_context(restored)
    after = next((e.after for e in reversed(events.events)
                  if e.kind == "lifecycle" and e.step == "snapshot_restore"), None) or {}
    result, rsched = control.run(restored, None, timeout, scheduler=lambda part, console: rsched)
    raise_if_interrupted(result)
    return restored, result, rsched, {"restore": "restored", "attempts_before_save": attempts,
                                      "saved_policy_digest": saved,
                                      "restored_policy_digest": after.get("policy_digest")}


def _registers(p: Partition, vp: int) -> dict[int, tuple[int, int]]:
    """VTL0's registers as KVM holds them now: VTL_REG_* -> (value, limit)."""
    vcpu = p.vps[vp].vcpus[Vtl.VTL0] if vp < len(p.vps) else None
    if vcpu is None:
        return {}
    s = vcpu.get_sregs()
    regs = {ABI.VTL_REG_CR0: (s.cr0, 0), ABI.VTL_REG_CR3: (s.cr3, 0), ABI.VTL_REG_CR4: (s.cr4, 0),
            ABI.VTL_REG_EFER: (s.efer, 0), ABI.VTL_REG_GDTR: (s.gdt.base, s.gdt.limit),
            ABI.VTL_REG_IDTR: (s.idt.base, s.idt.limit), ABI.VTL_REG_LDTR: (s.ldt.selector, 0),
            ABI.VTL_REG_TR: (s.tr.selector, 0), ABI.VTL_REG_LDTR_BASE: (s.ldt.base, s.ldt.limit),
            ABI.VTL_REG_TR_BASE: (s.tr.base, s.tr.limit)}
    get_xcrs = getattr(vcpu, "get_xcrs", None)
    if get_xcrs is not None:
        regs[ABI.VTL_REG_XCR0] = (get_xcrs().get(0, 0), 0)
    return {k: (int(v), int(lim)) for k, (v, lim) in regs.items()}


def read_back(p: Partition, reports: list[Report]) -> tuple[list[str], list[str], list[str]]:
    """Compare every target the guest named with what the VMM reads now.  Returns what
    changed, what was checked, and why a change is not enforced on this host."""
    changed: list[str] = []
    checked: list[str] = []
    unenforced: list[str] = []
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
        elif r.kind == "register":
            reg, old, old_limit = r.value[0], r.value[1], r.value[2]
            held = _registers(p, r.vp).get(reg)
            name = REG_NAMES.get(reg, str(reg))
            if held is None:
                continue
            checked.append(name)
            limited = reg in (ABI.VTL_REG_GDTR, ABI.VTL_REG_IDTR, ABI.VTL_REG_LDTR_BASE, ABI.VTL_REG_TR_BASE)
            if held[0] != old or (limited and held[1] != old_limit):
                changed.append(f"{name} now {held[0]:#x}" + (f"/{held[1]:#x}" if limited else "")
                               + f" (was {old:#x})")
                if reg in PINNED_BY_INTERCEPT_CONTROL and getattr(p, "intercept_control", None) is None:
                    unenforced.append(f"{name} changed: VTL1 set no register intercept control (this host "
                                      "reports no CR/descriptor-table writes; the privileged-section "
                                      "scheme was not in force)")
        elif r.kind == "exec" and r.value[2]:
            marker, want = r.value[2], r.value[3]
            if not p.layout.in_memory(marker, 8):
                continue
            checked.append(f"code marker {marker:#x}")
            if p.mem.read_u64(marker) == want:
                changed.append(f"planted code at {r.value[0]:#x} ran (marker {marker:#x} = {want:#x})")
    return changed, checked, unenforced


def _mechanism(events: EventLog, reports: list[Report], backend: str, many: bool = False) -> str:
    # A refused status is VTL1's policy unless the VMM itself refused (a `refused` event).
    by_vmm = {r.response for r in events.of_kind("refused")}  # type: ignore[union-attr]
    statuses = [STATUS_NAMES.get(r.value[1], str(r.value[1])) for r in reports
                if r.kind == "status" and r.value[1] != 0]
    statuses = [s for s in statuses if s not in by_vmm]
    policy = f"VTL1 policy: {statuses[0]}" if statuses else ""
    return "; then ".join(x for x in (policy, _enforcement(events, reports, backend, many)) if x) \
        or "none observed"


def _judged(events: EventLog) -> list[tuple[Any, Any]]:
    """(intercept, its verdict or None) in order; each VP's verdict follows its own
    intercept, whatever other VPs were judged meanwhile."""
    pairs: list[tuple[Any, Any]] = []
    open_: dict[int, int] = {}
    for e in events.events:
        if e.kind == "intercept":
            open_[e.vp] = len(pairs)
            pairs.append((e, None))
        elif e.kind == "verdict" and e.vp in open_:
            k = open_.pop(e.vp)
            pairs[k] = (pairs[k][0], e)
    return pairs


def _enforcement(events: EventLog, reports: list[Report], backend: str, many: bool = False) -> str:
    """What stopped it; `many`: the partition has several VPs, say which VP it was on."""
    pairs = _judged(events)
    if pairs:
        # What stopped the attack: the last intercept VTL1 refused (or the last one judged,
        # if it refused none), on whichever VP it came.
        i, v = next((p for p in reversed(pairs) if p[1] is not None and p[1].verdict != "allow"), pairs[-1])
        if i.type == "msr":
            what, via = f"MSR {i.msr:#x}", "MSR filter"
        elif i.type == "memory":
            what, via = f"GPA {i.gpa:#x}", f"{backend} backend"
        else:
            what = f"{(i.reg or 'register').upper()} {i.old:#x} -> {i.new:#x}" if i.old is not None \
                else (i.reg or "register").upper()
            if getattr(i, "new_base", None) is not None:
                what += f" (base {i.old_base:#x} -> {i.new_base:#x})"
            via = "privileged section"
        answer = "no verdict" if v is None else (
            VECTOR_NAMES.get(v.vector, f"vector {v.vector}") if v.verdict == "inject_fault" else v.verdict)
        return f"{via}: {i.access} intercept on {what}{f' from VP{i.vp}' if many else ''} -> VTL1 {answer}"
    refused: list[Any] = events.of_kind("refused")
    if refused:
        r = refused[-1]
        return f"VMM refusal: {r.reason} -> {r.response}"
    resets: list[Any] = [e for e in events.of_kind("lifecycle") if getattr(e, "step", "") == "reset"]
    if resets:
        r = resets[-1]
        return (f"RESET ({r.by} on VP{r.vp}): VTL1 ended with every protection and pin, its memory "
                "zeroed, nothing of it after (the VMM's record)")
    return guest_reported_fault(reports, "VTL0", "NX in VTL0 page tables locked r-- by VTL1, EFER.NXE pinned",
                                "")


def guest_reported_fault(reports: list[Report], where: str, nx_why: str, after: str) -> str:
    """What the guest's own reports say stopped it, labelled guest-reported (they never
    decide an outcome): a #PF on a fetch (NX, for `nx_why`), or the last fault it took."""
    faults = [r for r in reports if r.kind == "fault"]
    if any(r.value[0] == 14 and r.value[1] & 0x10 for r in faults):
        return f"CPU #PF(fetch) inside {where} (guest-reported): {nx_why}"
    if faults:
        f = faults[-1]
        return (f"CPU {VECTOR_NAMES.get(f.value[0], f'vector {f.value[0]}')} inside {where} before any exit "
                f"(guest-reported){after}")
    return ""


def run_all(vtl0: Path, vtl1: Path, backend: Backend | None = None,
            progress: Callable[[int], AbstractContextManager[Step]] | None = None,
            only: list[str] | None = None,
            run: Callable[[str, str], AttackResult] | None = None, vps: int = 1,
            max_vps: int | None = None, after_restore: bool = False) -> list[AttackResult]:
    """Every attack of the image (or those named in `only`), in the image's order;
    `progress(total)` gives the Step told of each; `run(name, expected)` runs one (default:
    run_attack in VTL mode, each with the VPs it declares, at least `vps`;
    vtl/tools/heki_attack.py passes Heki mode's, with `max_vps` 1: its partitions have one);
    `after_restore`: each runs on after a save and restore of its hardened partition."""
    found = attack_scenarios(vtl0, max_vps)
    if only:
        names = [name for name, _ in found]
        unknown = [n for n in only if n not in names]
        wider = {name for name, _ in attack_scenarios(vtl0)} if max_vps is not None else set()
        if unknown and unknown[0] in wider:
            raise UnknownScenario(f"{unknown[0]!r} needs more than {max_vps} VP"
                                  f"{'s' if max_vps != 1 else ''} (a cross-VP attack, docs/smp.md): "
                                  "not run in this mode")
        if unknown:
            raise UnknownScenario(f"{unknown[0]!r} is not an attack scenario of {vtl0}; "
                                  f"{near_names(unknown[0], names)}`vtl scenarios` lists all (attacks "
                                  "are described 'attack: ...')")
        found = [(name, expected) for name, expected in found if name in only]
    if not found:
        return [AttackResult(scenario="(none)", expected="", outcome="not run",
                             mechanism=f"{vtl0} carries no attack scenarios", guest_status=0,
                             vmm_checked=[], changed=[])]
    results = []
    with (progress or (lambda n: nullcontext(QUIET)))(len(found)) as step:
        for name, expected in found:
            step(name)
            results.append(run(name, expected) if run is not None
                           else run_attack(name, expected, vtl0, vtl1, backend, vps=vps,
                                           after_restore=after_restore))
            step(name, results[-1].outcome)
    return results


def render(results: list[AttackResult]) -> str:
    w = max(len(r.scenario) for r in results)
    we = min(48, max(len(r.expected) for r in results))
    wo = max(len(r.outcome) for r in results)
    restores = any(r.restore for r in results)
    wr = max([len("restore")] + [len(_restore_cell(r)) for r in results]) if restores else 0
    rh = f"{'restore':<{wr}}  " if restores else ""
    lines = [f"{'scenario':<{w}}  {'expected':<{we}}  {'outcome':<{wo}}  {rh}"
             "mechanism / what the VMM observed"]
    for r in results:
        exp = r.expected if len(r.expected) <= we else r.expected[:we - 1] + "…"
        rc = f"{_restore_cell(r):<{wr}}  " if restores else ""
        lines.append(f"{r.scenario:<{w}}  {exp:<{we}}  {r.outcome:<{wo}}  {rc}{r.mechanism}")
    counts: dict[str, int] = {}
    for r in results:
        counts[r.outcome] = counts.get(r.outcome, 0) + 1
    summary = ", ".join(f"{n} {k}" for k, n in sorted(counts.items(), key=lambda kv: -kv[1]))
    lines.append(f"\n{len(results)} attack scenarios: {summary}; each in a fresh partition, outcomes "
                 "observed by the VMM (targets, MSRs and registers read back, code markers, events)")
    if restores:
        lines.append(restore_summary(results))
    return "\n".join(lines)


def _restore_cell(r: AttackResult) -> str:
    if r.restore != "restored":
        return r.restore
    n = r.attempts_before_save
    return "restored" + (f" ({n} attempt{'s' if n != 1 else ''} before the save)" if n else "")


def restore_summary(results: list[AttackResult]) -> str:
    """--after-restore: how many ran on in a restored partition, and the digests compared."""
    restored = [r for r in results if r.restore == "restored"]
    equal = sum(1 for r in restored if r.saved_policy_digest == r.restored_policy_digest)
    not_restored: dict[str, int] = {}
    for r in results:
        if r.restore != "restored":
            not_restored[r.restore] = not_restored.get(r.restore, 0) + 1
    rest = "".join(f"; {n} {k}" for k, n in not_restored.items())
    return (f"after a restore: {len(restored)} attacks ran on in a partition restored from the snapshot of "
            f"their hardened partition ({sum(1 for r in restored if r.outcome == BLOCKED)} blocked), the "
            f"policy digest after the restore equal to the saved one in {equal} of {len(restored)}{rest}")
