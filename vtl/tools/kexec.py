"""`vtl kexec`: run one kexec flow on the built-in guests (or yours) and show its timeline.

A flow is a VTL0 scenario of the image ("kexec-teardown", "kexec-persist",
"kexec-deny") run with VTL1's kexec policy of the same name, the next kernel staged in
VTL0's memory (`--image`, default the built-in kernel linked at 8 MiB) and, unless
`--untrusted`, that kernel on VTL1's allowlist.  The timeline is the run's Lifecycle
events (vtl/lifecycle/protections.py): each step, who did it, how long it took, the
protections and pins before and after, read by the VMM from its own maps and from KVM.

The checks are what the VMM observes, never the guest's word: snapshots taken by the VMM
at each step, memory read back after the run, registers and MSRs read from KVM, code
markers, and a fresh measurement of the VTL1 image computed here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

from vmm.elf import read_image
from vmm.measure import loaded_image_sha256
from vtl.abi import ABI
from vtl.core.config import Backend, PartitionConfig
from vtl.core.events import EventLog, Lifecycle
from vtl.core.images import scenarios
from vtl.core.partition import Partition
from vtl.core.trust import trust_digest
from vtl.lifecycle.protections import unprotected
from vtl.run import control
from vtl.run.result import RunResult, raise_if_interrupted
from vtl.services.console import Console
from vtl.tools.attack import read_back

Flow = Literal["teardown", "persist", "deny"]
FLOWS: tuple[Flow, ...] = ("teardown", "persist", "deny")
STATUS_NAMES = {**ABI.names("VTL_E_"), 0: "VTL_OK"}


class Step(BaseModel):
    t_ms: float
    step: str
    by: str
    status: str | None
    duration_us: float
    detail: str
    before: dict[str, Any] | None
    after: dict[str, Any] | None
    refusal: str | None = None      # VTL1's reason for a refused step (its STATUS report)


class Check(BaseModel):
    ok: bool
    what: str
    observed: str


class KexecReport(BaseModel):
    flow: Flow
    scenario: str
    image: str
    image_sha256: str
    trusted: bool
    kexec_policy: str
    result: RunResult
    steps: list[Step]
    checks: list[Check]
    passed: bool
    expected_refusal: bool          # --untrusted: VTL1's refusal of the image is the pass
    refused: str | None             # "step: STATUS (VTL1: why)" when VTL1 refused the flow
    console_tail: list[str]


def run_flow(flow: Flow, vtl0: Path, vtl1: Path, image: Path, *, trusted: bool = True,
             extra_trust: list[bytes] | None = None, backend: Backend | None = None,
             timeout: float = 30.0, vps: int = 1) -> KexecReport:
    scenario = f"kexec-{flow}"
    known = {s.name for s in scenarios(read_image(vtl0))}
    if scenario not in known:
        raise ValueError(f"{vtl0} has no scenario {scenario!r}: a VTL0 image for `vtl kexec` carries "
                         "kexec-teardown, kexec-persist and kexec-deny (docs/writing-guests.md)")
    digest = trust_digest(image)
    trust = ([digest] if trusted else []) + list(extra_trust or [])
    cfg = PartitionConfig(vtl0_image=vtl0, vtl1_image=vtl1, scenario=scenario, attr_backend=backend,
                          trust=trust, kexec_policy=flow, staged=image, nr_vps=vps)
    events = EventLog(trace=False, keep=100_000)
    console = Console(cfg.nr_vps, keep=40)
    with Partition(cfg, events) as p:
        result, sched = control.run(p, console, timeout)
        raise_if_interrupted(result)
        reports = list(sched.reports.records)
        changed, checked, _ = read_back(p, reports)
    fresh = loaded_image_sha256(read_image(vtl1))
    lifecycle: list[Any] = events.of_kind("lifecycle")
    # VTL1 says why it refused a kexec call through the report channel (guest_vtl1/lifecycle.c).
    why = [r for r in reports if r.vtl == 1 and r.kind == "status" and r.name.startswith("kexec_")]
    steps = [_step(e, why) for e in lifecycle]
    expected_refusal = not trusted
    refused = _refused(steps) if flow != "deny" or expected_refusal else None
    if expected_refusal:
        checks = _refusal_checks(result, lifecycle, refused)
    elif refused is not None:
        checks = [Check(ok=False, what="VTL1 accepted the image and the jump", observed=refused)]
    else:
        checks = _checks(flow, result, lifecycle, fresh, changed, checked)
    passed = all(c.ok for c in checks)
    return KexecReport(flow=flow, scenario=scenario, image=str(image), image_sha256=digest.hex(),
                       trusted=trusted, kexec_policy=flow, result=result, steps=steps, checks=checks,
                       passed=passed, expected_refusal=expected_refusal, refused=refused,
                       console_tail=list(console.tail))


def _step(e: Lifecycle, why: list[Any]) -> Step:
    """One timeline row; a refused kexec call takes VTL1's reason (the first unused STATUS
    report of VTL1 with the step's name and status)."""
    refusal = None
    if e.step.startswith("kexec_") and e.status not in (None, ABI.VTL_OK):
        match = next((r for r in why if r.name == e.step and r.value[1] == e.status), None)
        if match is not None:
            why.remove(match)
            refusal = match.text
    return Step(t_ms=round(e.ts * 1000, 3), step=e.step, by=e.by,
                status=None if e.status is None else STATUS_NAMES.get(e.status, str(e.status)),
                duration_us=e.duration_us, detail=e.detail, before=e.before, after=e.after, refusal=refusal)


def _refused(steps: list[Step]) -> str | None:
    """The first kexec call VTL1 refused, with its reason (in the deny flow with a trusted
    image the refusals are the flow's checks instead)."""
    s = next((s for s in steps
              if s.step in ("kexec_validate", "kexec_jump") and s.status not in (None, "VTL_OK")), None)
    if s is None:
        return None
    return f"{s.step}: {s.status} (VTL1: {s.refusal or 'gave no reason'})"


def _refusal_checks(result: RunResult, lc: list[Any], refused: str | None) -> list[Check]:
    """--untrusted: the image is not on VTL1's allowlist, so the pass is VTL1's refusal with
    nothing changed."""
    val = [e for e in lc if e.step == "kexec_validate"]
    same = bool(val) and all(e.before["digest"] == e.after["digest"] for e in val)
    restarts = [e for e in lc if e.step == "vtl0_restart"]
    return [
        Check(ok=refused is not None and refused.startswith("kexec_validate"),
              what="VTL1 refused to validate the image that is not on its allowlist",
              observed=refused or "not refused"),
        Check(ok=same, what="every protection and pin is as before the validation (compared whole)",
              observed=f"{val[0].before['digest'][:16]}… -> {val[-1].after['digest'][:16]}…" if val
              else "no validation step"),
        Check(ok=not restarts and result.kexecs == 0, what="VTL0 never restarted",
              observed=f"{result.kexecs} kexec(s)"),
    ]


def _first(events: list[Any], step: str) -> Any:
    return next((e for e in events if e.step == step), None)


def _checks(flow: Flow, result: RunResult, lc: list[Any], fresh: str, changed: list[str],
            checked: list[str]) -> list[Check]:
    out: list[Check] = []
    guest_ok = result.reason == "guest_exit" and result.status == 0
    out.append(Check(ok=guest_ok, what="the last kernel ran its scenario to the end",
                     observed=f"{result.reason}, status {result.status}: {result.message}"))
    restarts = [e for e in lc if e.step == "vtl0_restart"]
    if flow == "teardown":
        td = _first(lc, "vtl1_teardown")
        after = td.after if td is not None else None
        clean = after is not None and unprotected(after) and not after.get("kvm_readonly_memslots")
        out.append(Check(ok=clean,
                         what="after VTL1's teardown no protection or pin remains (VMM maps, backend, KVM "
                              "memslots, register intercept control, MSR pins)",
                         observed=_summary(after) if after else "no teardown step"))
        zero = bool(after and after.get("vtl1_region_zero"))
        out.append(Check(ok=zero, what="VTL1's memory reads as zeros once it is gone",
                         observed="all zero" if zero else "not zero / no step"))
        enables = [e for e in lc if e.step == "vtl1_enable"]
        again = [e for e in enables if restarts and e.ts > restarts[0].ts]
        got = again[0].after.get("vtl1_measurement") if again and again[0].after else None
        out.append(Check(ok=got == fresh, what="the new kernel enabled VTL1 again with the measurement of a "
                         "fresh launch", observed=f"{got or 'not enabled again'} (fresh: {fresh[:16]}…)"))
    if flow in ("teardown", "persist"):
        r = restarts[0] if restarts else None
        out.append(Check(ok=r is not None and result.kexecs == 1,
                         what="VTL0 restarted at the new kernel's entry",
                         observed=r.detail if r is not None else "no restart"))
    if flow == "persist":
        r = restarts[0] if restarts else None
        after = r.after if r is not None else None
        ok = bool(after and after["vtl1_enabled"] and after["protected_pages"].get("r-x")
                  and after["intercept_control"])
        out.append(Check(ok=ok, what="before the new kernel's first instruction VTL1 still runs, its text "
                         "is r-x and its privileged section judged", observed=_summary(after)))
        out.append(Check(ok=bool(checked) and not changed,
                         what="the new kernel's writes to protected memory and pinned registers were "
                              "blocked (read back by the VMM)",
                         observed=_read_back_line(changed, checked)))
    if flow == "deny":
        kx = [e for e in lc if e.step.startswith("kexec_")]
        same = bool(kx) and kx[0].before["digest"] == kx[-1].after["digest"]
        out.append(Check(ok=same, what="every protection and pin is as before the flow (compared whole)",
                         observed=f"{kx[0].before['digest'][:16]}… -> {kx[-1].after['digest'][:16]}…"
                         if kx else "no kexec step"))
        jumps = [e for e in kx if e.step == "kexec_jump"]
        out.append(Check(ok=bool(jumps) and all(e.status not in (None, 0) for e in jumps) and not restarts,
                         what="every jump was refused and VTL0 never restarted",
                         observed=", ".join(STATUS_NAMES.get(e.status, str(e.status)) for e in jumps)
                         or "no jump"))
        out.append(Check(ok=bool(checked) and not changed,
                         what="the validated image could not be changed and planted code did not run "
                              "(read back by the VMM)",
                         observed=_read_back_line(changed, checked)))
    return out


def _read_back_line(changed: list[str], checked: list[str]) -> str:
    return "; ".join(changed) or f"unchanged: {', '.join(checked) or 'nothing named'}"


def _summary(snap: dict[str, Any] | None) -> str:
    """One line for people: protections per kind, pins, VTL1."""
    if snap is None:
        return "-"
    pages = ", ".join(f"{k} {n}" for k, n in snap["protected_pages"].items()) or "no protection"
    pins = []
    if snap["intercept_control"]:
        pins.append("registers")
    if snap["msr_pins"]:
        pins.append("MSRs")
    vtl1 = f"VTL1 {snap['vtl1_measurement'][:8]}…" if snap["vtl1_enabled"] else "no VTL1"
    return f"{pages}; pins: {', '.join(pins) or 'none'}; {vtl1}"


def render(rep: KexecReport) -> str:
    lines = [f"vtl kexec --flow {rep.flow}: {rep.image}",
             f"  next kernel SHA-256 {rep.image_sha256} ({'on' if rep.trusted else 'not on'} VTL1's "
             f"allowlist), VTL1 policy {rep.kexec_policy}, scenario {rep.scenario}", ""]
    w = max([len(s.step) for s in rep.steps] + [4])
    lines.append(f"  {'t (ms)':>9}  {'step':<{w}}  {'by':<4}  {'status':<18}  {'took':>9}  "
                 "protections and pins before -> after")
    for s in rep.steps:
        took = f"{s.duration_us / 1000:.2f} ms"
        lines.append(f"  {s.t_ms:>9.1f}  {s.step:<{w}}  {s.by:<4}  {s.status or '-':<18}  {took:>9}  "
                     f"{_summary(s.before)}")
        lines.append(f"  {'':>9}  {'':<{w}}  {'':<4}  {'':<18}  {'':>9}  -> {_summary(s.after)}")
        if s.detail:
            lines.append(f"  {'':>9}  {'':<{w}}  {'':<4}  {'':<18}  {'':>9}     ({s.detail})")
        if s.refusal:
            lines.append(f"  {'':>9}  {'':<{w}}  {'':<4}  {'':<18}  {'':>9}     VTL1: {s.refusal}")
    lines.append("")
    lines.append("checks (observed by the VMM):")
    for c in rep.checks:
        lines.append(f"  {'ok  ' if c.ok else 'FAIL'}  {c.what}: {c.observed}")
    lines.append("")
    if rep.expected_refusal:
        verdict = (f"PASS: refused as expected ({rep.refused})" if rep.passed else
                   f"FAIL: the untrusted image was not refused as expected ({rep.refused or 'not refused'})")
    elif rep.refused is not None:
        verdict = f"FAIL: VTL1 refused the kexec at {rep.refused}"
    else:
        verdict = f"{'PASS' if rep.passed else 'FAIL'} ({rep.result.message}"
        verdict += f"; {rep.result.kexecs} kexec, {rep.result.boot_count} reboot(s) of VTL0, " \
                   f"{rep.result.wall_s:.3f} s)"
    lines.append(f"result: {verdict}")
    return "\n".join(lines)
