"""Cross-VP attacks (docs/smp.md, "Cross-VP attacks"): what only a second VP can do while
the boot VP is inside VTL1, each a scenario of the VTL0 image that `vtl attack` runs with
the VPs it declares.  Every verdict is the VMM's: targets, markers and the attacking VP's
registers read back after the run (vtl/tools/attack.py), the run's own record checked by
vtl/tools/invariants.py, and the events the VMM logged (which VP was where, and when).

Each attack is one short run (`run_attack`, what `vtl attack` runs); the control runs
(boot_info.param = 1: the scenario leaves the protection out) show that the same
read-back sees the attack succeed, so these tests can fail; the checks a control run
cannot reach cheaply are tested on made-up records instead.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from tests.vtlrun import attack_run, vtl_cli
from vmm.elf import read_image
from vtl.abi import ABI
from vtl.core.events import EventLog, Lifecycle, VpStarted, VtlCall, VtlReturn
from vtl.core.images import Scenario, UnknownScenario, default_kexec_image
from vtl.tools import invariants
from vtl.tools.attack import AttackResult, attack_scenarios, run_all, run_attack

XVP = ["xvp-kexec-rewrite", "xvp-pte-during-lock", "xvp-protect-window", "xvp-input-change",
       "xvp-step-section", "xvp-lifecycle-race", "xvp-unlocked-ap-cr0", "xvp-reset-in-vtl1",
       "smp-eob-unlocked"]
OK, POLICY = ABI.VTL_OK, ABI.VTL_E_POLICY


def _ev(events: EventLog, kind: str, **match: Any) -> list[Any]:
    return [e for e in events.events if e.kind == kind and all(getattr(e, k) == v for k, v in match.items())]


def _value(events: EventLog, name: str, vp: int | None = None) -> int:
    found = [e for e in _ev(events, "report", name=name) if vp is None or e.vp == vp]
    assert found, f"no report {name!r}"
    return int(found[-1].value[0])


def _verdicts(events: EventLog, vp: int) -> list[tuple[Any, Any]]:
    """(intercept, verdict) pairs of one VP, in order."""
    out, pending = [], None
    for e in events.events:
        if e.vp != vp:
            continue
        if e.kind == "intercept":
            pending = e
        elif e.kind == "verdict" and pending is not None:
            out.append((pending, e))
            pending = None
    return out


@pytest.fixture(scope="module")
def attacks(guest_images: tuple[Path, Path]) -> dict[str, tuple[AttackResult, EventLog]]:
    """Every cross-VP attack once, with 2 VPs (vtl attack --vps 2), its events kept."""
    out = {}
    for name in XVP:
        run = attack_run(guest_images, name, vps=2, keep=200_000)
        out[name] = (run.result, run.events)
    return out


@pytest.mark.kvm
@pytest.mark.parametrize("name", XVP)
def test_cross_vp_attack_is_blocked_as_the_vmm_observes(guest_images: tuple[Path, Path],
                                                         attacks: dict[str, tuple[AttackResult, EventLog]],
                                                         name: str) -> None:
    r, _ = attacks[name]
    assert r.expected == dict(attack_scenarios(guest_images[0]))[name]
    assert r.outcome == "blocked" and r.as_expected, (r.outcome, r.mechanism, r.changed)
    assert r.changed == [] and r.vmm_checked, r
    assert r.category == "cross-VP"


@pytest.mark.kvm
def test_kexec_image_rewritten_during_validation(attacks: dict[str, tuple[AttackResult, EventLog]]) -> None:
    r, ev = attacks["xvp-kexec-rewrite"]
    target = _value(ev, "rewrite_gpa")
    # VTL1 validated the image, and what it validated is the trusted file (read back).
    validate = _ev(ev, "lifecycle", step="kexec_validate")
    assert [e.status for e in validate] == [OK]
    assert any(c.startswith("validated kexec image") for c in r.vmm_checked), r.vmm_checked
    # VP1's rewrite came while VTL1 was hashing (after VP0's call began, before it ended)
    # and was a write intercept VTL1 answered with #PF.
    call = _ev(ev, "vtl_call", vp=0, code=ABI.VTL_CALL_KEXEC_VALIDATE)[-1]
    hits = [(i, v) for i, v in _verdicts(ev, 1) if i.type == "memory" and i.gpa == target]
    assert hits and all(v.verdict == "inject_fault" and v.vector == 14 for _, v in hits)
    assert call.ts < hits[0][0].ts < validate[0].ts
    assert f"write intercept on GPA {target:#x} from VP1 -> VTL1 #PF" in r.mechanism


@pytest.mark.kvm
def test_page_table_edited_during_the_lock(attacks: dict[str, tuple[AttackResult, EventLog]]) -> None:
    r, ev = attacks["xvp-pte-during-lock"]
    pte = next(e.value[0] for e in _ev(ev, "report", name="page_table_entry"))
    assert f"memory {pte:#x}" in r.vmm_checked and any(c.startswith("code marker") for c in r.vmm_checked)
    # The first lock (the yardstick) refused, the second accepted; VP1's edit fell inside
    # the second: an intercept VTL1 answered with #PF once the lock held.
    locks = _ev(ev, "lifecycle", step="lock_page_tables", vp=0)
    assert [e.status for e in locks] == [POLICY, OK]
    second = _ev(ev, "vtl_call", vp=0, code=ABI.VTL_CALL_LOCK_PAGE_TABLES)[1]
    hits = [(i, v) for i, v in _verdicts(ev, 1) if i.type == "memory" and i.gpa == pte]
    assert len(hits) == 1 and hits[0][1].vector == 14
    assert second.ts < hits[0][0].ts < locks[1].ts
    assert f"write intercept on GPA {pte:#x} from VP1 -> VTL1 #PF" in r.mechanism


@pytest.mark.kvm
def test_no_write_lands_once_the_protect_call_returned(
        attacks: dict[str, tuple[AttackResult, EventLog]]) -> None:
    r, ev = attacks["xvp-protect-window"]
    page = next(e.value[0] for e in _ev(ev, "report", name="window_page"))
    assert _value(ev, "ap_landed") >= 4               # VP1 was writing when VP0 asked
    hits = [(i, v) for i, v in _verdicts(ev, 1) if i.type == "memory" and i.gpa == page]
    assert len(hits) == 1 and hits[0][1].vector == 14   # its next write: VTL1's #PF
    # ... and never a VMM refusal of the write (an exit judged by a map lagging the backend)
    assert not [e for e in _ev(ev, "refused", vp=1) if e.gpa == page]
    assert f"write intercept on GPA {page:#x} from VP1 -> VTL1 #PF" in r.mechanism


@pytest.mark.kvm
def test_a_flipped_page_list_is_served_as_copied(attacks: dict[str, tuple[AttackResult, EventLog]]) -> None:
    r, ev = attacks["xvp-input-change"]
    ok, immutable = _value(ev, "protect_pages_ok"), _value(ev, "protect_pages_immutable")
    assert ok + immutable == 16 and _value(ev, "protect_pages_other") == 0
    # The VMM applied exactly one rw- page per accepted call (the data page VTL1 copied),
    # and the text never became writable: the write into it is VTL1's #PF.
    applied = [e for e in _ev(ev, "protection_changed") if e.attributes == "rw-" and e.pages == 1]
    assert len(applied) == ok
    assert _value(ev, "text_attrs") == ABI.VTL_MEM_NW
    assert "write intercept on GPA" in r.mechanism and "from VP0 -> VTL1 #PF" in r.mechanism


@pytest.mark.kvm
def test_the_section_while_another_vp_is_stepped(attacks: dict[str, tuple[AttackResult, EventLog]]) -> None:
    r, ev = attacks["xvp-step-section"]
    steps = _ev(ev, "single_step", vp=0)
    cr0 = [(i, v) for i, v in _verdicts(ev, 1) if i.type == "register" and i.reg == "cr0"]
    assert len(steps) >= 40 and cr0 and all(v.vector == 13 for _, v in cr0)
    # VP1's attempts interleave with VP0's steps: each judged, none ran unjudged.
    assert any(steps[0].ts < i.ts < steps[-1].ts for i, _ in cr0)
    assert not _ev(ev, "register_write", vp=1, reg="cr0")
    assert "CR0" in r.vmm_checked and "write intercept on CR0" in r.mechanism and "from VP1" in r.mechanism


@pytest.mark.kvm
def test_lifecycle_calls_from_two_vps_at_once(attacks: dict[str, tuple[AttackResult, EventLog]]) -> None:
    r, ev = attacks["xvp-lifecycle-race"]
    steps = [(e.step, e.vp, e.status) for e in _ev(ev, "lifecycle")
             if e.step in ("kexec_jump", "vtl0_restart", "end_of_boot")]
    # VP1's own jump refused; VP0's jump restarted VTL0 (on VP0's request)...
    assert ("kexec_jump", 1, POLICY) in steps and ("kexec_jump", 0, OK) in steps
    assert [s for s in steps if s[0] == "vtl0_restart"] == [("vtl0_restart", 0, None)]
    # ... while VP1 was inside VTL1 with a call the old kernel made: VTL1 never served it
    # (no return from VP1 before the restart took it offline), and no END_OF_BOOT of VP1's
    # was ever accepted.
    jump = _ev(ev, "vtl_call", vp=0, code=ABI.VTL_CALL_KEXEC_JUMP)[-1]
    restart = _ev(ev, "lifecycle", step="vtl0_restart")[0]
    calls = [e for e in _ev(ev, "vtl_call", vp=1) if jump.ts < e.ts < restart.ts]
    assert calls, "VP1 made no VTL call during VP0's jump"
    assert not [e for e in _ev(ev, "vtl_return", vp=1) if calls[-1].ts < e.ts < restart.ts]
    assert not [s for s in steps if s[0] == "end_of_boot" and s[1] == 1 and s[2] == OK]
    # The next kernel's boot was its own: it started VP1 again, every VP locked, boot ended.
    after = [e for e in ev.events if e.ts > restart.ts]
    assert [e.vp for e in after if e.kind == "vp_started"] == [1]
    assert [(e.vp, e.status) for e in after if e.kind == "lifecycle" and e.step == "lock_page_tables"] == [
        (0, OK), (1, OK)]
    assert [(e.vp, e.status) for e in after if e.kind == "lifecycle" and e.step == "end_of_boot"] == [(0, OK)]
    assert "VTL_E_POLICY" in r.mechanism and "from VP0 -> VTL1 #PF" in r.mechanism


@pytest.mark.kvm
def test_an_unlocked_ap_holds_the_boot_open(attacks: dict[str, tuple[AttackResult, EventLog]]) -> None:
    r, ev = attacks["xvp-unlocked-ap-cr0"]
    eob = _ev(ev, "lifecycle", step="end_of_boot")
    assert [(e.vp, e.status) for e in eob] == [(0, POLICY), (0, POLICY), (0, OK)]
    assert eob[-1].after["pinned_vps"] == [0, 1] and "END_OF_BOOT's pins" in r.vmm_checked
    # During the boot the unlocked AP's CR0.WP clear was applied (VTL0 is trusted then), and
    # its lock with WP clear refused; after END_OF_BOOT the same write is VTL1's #GP.
    direct = _ev(ev, "register_write", vp=1, reg="cr0", how="direct")
    assert any(not w.new & (1 << 16) for w in direct) and all(w.ts < eob[-1].ts for w in direct)
    ap_locks = _ev(ev, "lifecycle", step="lock_page_tables", vp=1)
    assert [e.status for e in ap_locks] == [POLICY, OK]
    late = [(i, v) for i, v in _verdicts(ev, 1) if i.type == "register" and i.ts > eob[-1].ts]
    assert len(late) == 1 and late[0][1].vector == 13
    assert "CR0" in r.vmm_checked and "write intercept on CR0" in r.mechanism and "from VP1" in r.mechanism


@pytest.mark.kvm
def test_reset_while_the_other_vp_is_in_vtl1(attacks: dict[str, tuple[AttackResult, EventLog]]) -> None:
    r, ev = attacks["xvp-reset-in-vtl1"]
    reset = _ev(ev, "lifecycle", step="reset")
    assert [(e.vp, e.by) for e in reset] == [(1, "vtl0")]
    assert reset[0].after["vtl1_region_zero"] and not reset[0].after["vtl1_enabled"]
    # VP0 was inside its VTL_CALL_SHA256 (called, not returned) when VP1's RESET came.
    call = _ev(ev, "vtl_call", vp=0, code=ABI.VTL_CALL_SHA256)[-1]
    assert call.ts < reset[0].ts
    assert not [e for e in _ev(ev, "vtl_return", vp=0) if call.ts < e.ts]
    assert {"reset's end state", "VTL returns after the reset", "memory 0x1000000"} <= set(r.vmm_checked)
    assert r.mechanism.startswith("RESET (vtl0 on VP1)")


@pytest.mark.kvm
def test_end_of_boot_with_an_ap_never_locked(attacks: dict[str, tuple[AttackResult, EventLog]]) -> None:
    r, ev = attacks["smp-eob-unlocked"]
    assert [e.status for e in _ev(ev, "lifecycle", step="end_of_boot")] == [POLICY]
    assert r.mechanism == "VTL1 policy: VTL_E_POLICY"


# --- the control runs: the protection left out, the same read-back sees the attack --------------
@pytest.mark.kvm
@pytest.mark.parametrize("name,seen", [
    ("xvp-pte-during-lock", "planted code at"),          # no lock: the edit lands, the code runs
    ("xvp-protect-window", "memory at"),                 # no protect call: VP1's writes land
    ("xvp-step-section", "CR0 now"),                     # nothing locked: VP1's CR0.WP clear applies
    ("xvp-unlocked-ap-cr0", "CR0 now"),                  # the AP never locks: after boot it clears WP
    ("xvp-reset-in-vtl1", "memory at 0x2100000"),        # no RESET: VTL1's call writes its output
])
def test_control_run_without_the_protection_is_seen_as_succeeded(guest_images: tuple[Path, Path], name: str,
                                                                 seen: str) -> None:
    r = run_attack(name, "", *guest_images, vps=2, param=1)
    assert r.outcome in ("succeeded", "not enforced on this host"), (r.outcome, r.mechanism)
    assert any(c.startswith(seen) for c in r.changed), r.changed


# --- vtl attack gives an attack the VPs it declares ----------------------------------------------
@pytest.mark.kvm
def test_vtl_attack_runs_a_cross_vp_attack_with_the_vps_it_declares() -> None:
    cp = vtl_cli("attack", "--scenario", "xvp-protect-window", "--json")     # no --vps: 1 asked
    assert cp.returncode == 0, cp.stdout[-2000:] + cp.stderr[-2000:]
    (row,) = json.loads(cp.stdout)
    assert row["outcome"] == "blocked" and "from VP1" in row["mechanism"], row


def test_scenarios_declare_what_they_need() -> None:
    s = Scenario(name="x", description="attack: y (--vps 2+, staged, persist)")
    assert (s.min_vps, s.staged, s.kexec_policy) == (2, True, "persist")
    plain = Scenario(name="x", description="attack: write kernel text after boot (VTL1: r-x, immutable)")
    assert (plain.min_vps, plain.staged, plain.kexec_policy) == (1, False, None)


def test_one_vp_modes_leave_the_cross_vp_attacks_out(guest_images: tuple[Path, Path]) -> None:
    one = {n for n, _ in attack_scenarios(guest_images[0], max_vps=1)}
    every = {n for n, _ in attack_scenarios(guest_images[0])}
    # Every attack `vtl attack` runs is tests/test_attacks.py's (one VP) or one of these.
    assert every - one == set(XVP) and "write-kernel-text" in one
    with pytest.raises(UnknownScenario, match="needs more than 1 VP"):
        run_all(guest_images[0], guest_images[1], only=["xvp-step-section"], max_vps=1,
                run=lambda n, e: pytest.fail("ran"))


# --- the run checks on made-up records (what a control run cannot reach cheaply) ---------------
def _life(ts: float, step: str, vp: int = 0, status: int | None = OK, after: dict[str, Any] | None = None,
          ) -> Lifecycle:
    return Lifecycle(ts=ts, vp=vp, step=step, by="vtl0", status=status, duration_us=1.0, after=after)


def _log(*events: Any) -> EventLog:
    log = EventLog(trace=True)
    for e in events:
        log.emit(e)
    return log


NOTHING = {"vtl1_enabled": False, "protected_pages": {}, "backend_protected_runs": 0,
           "intercept_control": None, "msr_pins": [], "vtl1_region_zero": True}


def test_check_end_of_boot_with_an_unpinned_vp_is_wrong() -> None:
    log = _log(VpStarted(ts=1, vp=1, rip=0, rsp=0, cr3=0, vtl1=True),
               _life(2, "end_of_boot", after={"pinned_vps": [0]}))
    checked, wrong = invariants.check_run(SimpleNamespace(), log, None)  # type: ignore[arg-type]
    assert wrong == ["END_OF_BOOT accepted with VP1 online and unpinned (pinned: [0])"]
    ok = _log(VpStarted(ts=1, vp=1, rip=0, rsp=0, cr3=0, vtl1=True),
              _life(2, "end_of_boot", after={"pinned_vps": [0, 1]}))
    assert invariants.check_run(SimpleNamespace(), ok, None)[1] == []  # type: ignore[arg-type]


def test_check_vtl1_left_after_a_reset_is_wrong() -> None:
    log = _log(_life(1, "reset", status=None, after={**NOTHING, "protected_pages": {"r--": 1},
                                                      "vtl1_region_zero": False}))
    wrong = invariants.check_run(SimpleNamespace(), log, None)[1]  # type: ignore[arg-type]
    assert wrong == ["protections or pins left after the reset", "VTL1's memory not zeroed by the reset"]


def test_check_a_return_from_before_the_reset_is_wrong() -> None:
    log = _log(VtlCall(ts=1, vp=0, code=ABI.VTL_CALL_SHA256, arg=0),
               _life(2, "reset", status=None, after=NOTHING),
               VtlReturn(ts=3, vp=0, vtl=1, fast=False, status=0))
    assert invariants.check_run(SimpleNamespace(), log, None)[1] == [  # type: ignore[arg-type]
        "a VTL return on VP0 from a VTL1 call made before the last reset or kexec"]
    fresh = _log(_life(2, "reset", status=None, after=NOTHING), _life(3, "vtl1_enable", status=None),
                 VtlReturn(ts=4, vp=0, vtl=1, fast=False, status=0))
    assert invariants.check_run(SimpleNamespace(), fresh, None)[1] == []  # type: ignore[arg-type]


def test_check_a_kexec_asked_for_on_an_ap_is_wrong() -> None:
    log = _log(_life(1, "vtl0_restart", vp=1, status=None))
    assert invariants.check_run(SimpleNamespace(), log, None)[1] == [  # type: ignore[arg-type]
        "VTL0 restarted at a new kernel on VP1's request (an AP)"]


def test_check_a_validated_image_that_changed_is_wrong() -> None:
    staged = default_kexec_image()
    if not staged.exists():
        pytest.skip("make guests builds the kexec image")
    image = read_image(staged)
    mem = bytearray(max(s.gpa + s.memsz for s in image.segments) + 0x2000)
    for s in image.segments:
        mem[s.gpa:s.gpa + s.filesz] = image.data[s.offset:s.offset + s.filesz]
    p = SimpleNamespace(mem=SimpleNamespace(read=lambda gpa, n: bytes(mem[gpa:gpa + n])))
    log = _log(_life(1, "kexec_validate"))
    checked, wrong = invariants.check_run(p, log, staged)  # type: ignore[arg-type]
    assert wrong == [] and checked[-1].startswith("validated kexec image")
    at = image.segments[0].gpa + 64
    mem[at] ^= 0xFF
    wrong = invariants.check_run(p, log, staged)[1]  # type: ignore[arg-type]
    assert wrong and wrong[0].startswith(f"validated kexec image at {at:#x} now")
    unloaded = _log(_life(1, "kexec_validate"), _life(2, "kexec_unload"))
    assert invariants.check_run(p, unloaded, staged)[1] == []  # type: ignore[arg-type]
