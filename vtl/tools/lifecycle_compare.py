"""The lifecycle scenarios (kexec, modules, RESET) in either mode, for `vtl compare` and
`vtl kexec --mode heki`: each in a fresh partition, with what it needs (the next kernel
staged and allowlisted, the modules allowlisted, RESET on triple fault), and what the VMM
observed at the end: how many times VTL0 restarted, how the run ended, and what policy
the VMM still holds (protected pages from its attribute map, pins; in Heki mode the
host-owned state: CR pins, immutable pages).  A kexec in Heki mode is a jump inside the
guest the VMM never sees: what it finds of it after the run (vtl/tools/heki_kexec.py)
decides those rows.  The outcome is that observation; the expectation
(vtl/tools/expectations.py) is only compared with it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel

from vtl.core.config import KexecPolicy, PartitionConfig
from vtl.core.events import EventLog
from vtl.core.images import default_kexec_image
from vtl.core.partition import Partition
from vtl.core.trust import trust_digest
from vtl.modes.heki import HekiScheduler, heki_config
from vtl.run import control
from vtl.run.result import RunResult, raise_if_interrupted
from vtl.run.scheduler import Scheduler
from vtl.tools.expectations import (
    LIFECYCLE_OUTLIVED,
    LIFECYCLE_PASSED,
    NOT_APPLICABLE,
    SUCCEEDED,
    category,
    expected_outcome,
)
from vtl.tools.heki_kexec import InGuestKexec, describe, observe

FAILED = "failed"
IN_GUEST = "in-guest jump, not seen by the host"
HELD = "still held by the host: "


class LifecycleResult(BaseModel):
    scenario: str
    mode: str
    category: str
    expected_outcome: str
    expected: str
    outcome: str
    mechanism: str
    as_expected: bool
    reason: str
    guest_status: int
    boots: int
    resets: int
    kexecs: int
    after: dict[str, Any]  # what the VMM holds at the end
    in_guest_kexec: InGuestKexec | None = None  # Heki mode, kexec-*: what the VMM found of the jump


def lifecycle_config(scenario: str, vtl0: Path, vtl1: Path | None,
                     staged: Path | None = None) -> PartitionConfig:
    """What a lifecycle scenario needs to run as designed (tests/test_kexec_guest.py,
    tests/test_modules.py set up the same)."""
    extra: dict[str, Any] = {}
    if scenario.startswith("kexec-"):
        image = staged or default_kexec_image()
        flow = scenario.removeprefix("kexec-")
        policy: KexecPolicy = flow if flow in ("teardown", "persist", "deny") else "teardown"  # type: ignore[assignment]
        extra = {
            "staged": image,
            "trust": [trust_digest(image)] if image.is_file() else [],
            "kexec_policy": policy,
        }
    elif scenario == "module-load":
        build = vtl0.parent
        extra = {
            "trust": [
                trust_digest(build / m) for m in ("module.bin", "module-priv.bin") if (build / m).is_file()
            ]
        }
    elif scenario == "reset-triple-fault":
        extra = {"reset_on_triple_fault": True}
    return PartitionConfig(vtl0_image=vtl0, vtl1_image=vtl1, scenario=scenario, **extra)


def run_lifecycle(scenario: str, mode: str, vtl0: Path, vtl1: Path, timeout: float = 120.0,
                  staged: Path | None = None) -> LifecycleResult:
    cfg = lifecycle_config(scenario, vtl0, vtl1, staged)
    heki = mode == "heki"
    if heki:
        cfg = heki_config(cfg)
    events = EventLog(trace=False, keep=100_000)
    kexec: InGuestKexec | None = None
    with Partition(cfg, events) as p:
        result, sched = control.run(p, None, timeout, scheduler=HekiScheduler if heki else Scheduler)
        raise_if_interrupted(result)
        attrs = bytes(p.vtl0_attrs)
        after: dict[str, Any] = {"protected_pages": sum(1 for a in attrs if a)}
        if isinstance(sched, HekiScheduler):
            s = sched.heki.summary()
            after.update(
                pinned_cr0=s["pinned_cr0"], pinned_cr4=s["pinned_cr4"], immutable_pages=s["pages_immutable"],
                read_only_pages=s["pages_read_only"],
            )
            if scenario.startswith("kexec-"):
                kexec = observe(p, sched.heki.state, events)
        else:
            after.update(vtl1_enabled=result.vtl1_enabled, register_pins=p.intercept_control is not None)
    refusals: list[Any] = events.of_kind("refused")
    missing = [r for r in refusals if r.response in ("VTL_E_DISABLED", "VTL_E_NOT_ENABLED")]
    restarts = f"{result.kexecs} kexec, {result.resets} reset"
    held = _held(after, heki)
    if kexec is not None and kexec.ran:
        outcome, mech = _in_guest_kexec(kexec, result, held)
    elif result.reason == "guest_exit" and result.status == 0:
        outcome, mech = LIFECYCLE_PASSED, f"{restarts}; the last kernel passed; at the end {held}"
    elif result.boot_count and heki and (after.get("pinned_cr0") or after.get("immutable_pages")):
        outcome = LIFECYCLE_OUTLIVED
        mech = (f"{restarts}; the next kernel ended {result.reason} ({result.message}); still held by the "
                f"host: {held}")
    elif missing and result.status != 0:
        r = missing[-1]
        why = r.reason.replace(" (--no-vtl1)", "")
        outcome, mech = NOT_APPLICABLE, f"no VTL1: {why} -> {r.response}; {restarts}; at the end {held}"
    else:
        outcome, mech = FAILED, f"{result.reason}: {result.message}; {restarts}; at the end {held}"
    want, why = expected_outcome(scenario, mode)
    return LifecycleResult(
        scenario=scenario,
        mode=mode,
        category=category(scenario).name,
        expected_outcome=want,
        expected=why,
        outcome=outcome,
        mechanism=mech,
        as_expected=outcome == want,
        reason=result.reason,
        guest_status=result.status,
        boots=result.boot_count,
        resets=result.resets,
        kexecs=result.kexecs,
        after=after,
        in_guest_kexec=kexec,
    )


def _in_guest_kexec(k: InGuestKexec, result: RunResult, held: str) -> tuple[str, str]:
    """A Heki-mode kexec the next kernel ran after: a changed image ran (nothing validated
    it), or the old kernel's policy is still the host's (its immutable text, its pins)."""
    parts = [f"{IN_GUEST} ({result.kexecs} kexecs counted; the run ended {result.reason})", *describe(k)]
    if k.changed:
        outcome = SUCCEEDED
    elif k.old_immutable_pages:
        outcome = LIFECYCLE_OUTLIVED
    else:
        return LIFECYCLE_PASSED, "; ".join([*parts, f"at the end {held}"])
    return outcome, "; ".join([*parts, HELD + held])


def abridge_in_guest(mechanism: str) -> str:
    """_in_guest_kexec's line in a few words, for `vtl compare`'s text table: that the next
    kernel ran, and then what decides the row (nothing validated a changed image; what of
    the old kernel's policy the host still holds)."""
    parts = mechanism.split("; ")
    ran = next((x for x in parts if x.startswith("the next kernel (")), "")
    rip = ran.split("RIP ")[1].split(" ")[0] if "RIP " in ran else "?"
    if any(x.startswith("its image changed") for x in parts):
        return f"in-guest jump; the changed image ran (RIP {rip}): nothing validated it"
    held = next((x for x in parts if x.startswith(HELD)), "").removeprefix(HELD)
    kept = ", ".join(x for x in held.split(", ") if "read-only" not in x)
    return f"in-guest jump; next kernel ran (RIP {rip})" + (f"; host keeps {kept}" if kept else "")


def _held(after: dict[str, Any], heki: bool) -> str:
    if heki:
        return (
            f"CR0 pin {after['pinned_cr0']:#x}, CR4 pin {after['pinned_cr4']:#x}, "
            f"{after['immutable_pages']} immutable pages, {after['read_only_pages']} pages read-only"
        )
    return (
        f"{after['protected_pages']} protected pages, VTL1 {'running' if after['vtl1_enabled'] else 'gone'}"
        f"{', registers pinned' if after['register_pins'] else ''}"
    )


def render_one(r: LifecycleResult) -> str:
    return "\n".join(
        [
            f"vtl kexec --mode {r.mode}: scenario {r.scenario}",
            f"  observed: {r.outcome}: {r.mechanism}",
            f"  {r.mode} should give: {r.expected_outcome}: {r.expected}",
            f"  verdict: {'as expected' if r.as_expected else 'NOT as expected'}",
        ]
    )
