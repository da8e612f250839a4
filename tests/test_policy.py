"""Issue 3 acceptance on real KVM: VTL1's memory policy over VTL0, one test per attack
scenario.  Each asserts what a user cares about: the target memory as the VMM sees it
after the run, the intercept (GPA, access type) VTL1 received, the fault VTL0 saw, and
the events."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.vtlrun import Run, shared_run
from vmm.memattr import NW, NX
from vtl.abi import ABI

pytestmark = pytest.mark.kvm


def _run(images: tuple[Path, Path], scenario: str, param: int = 0) -> Run:
    run = shared_run(images, scenario, param=param)      # the same run for each test that reads it
    assert run.result.status == 0, "\n".join(run.console[-15:])
    result = run.report("result", scenario)
    assert run.passed() and result.vtl == 0 and result.value[0] == 0, result
    # Every scenario here hardens first; each status VTL0 checked is VTL_OK but the refusal
    # the scenario is about.
    assert run.report("status", "lock_page_tables").value[1] == ABI.VTL_OK
    for r in run.of_kind("status"):
        assert (r.vtl, r.value[1]) == (0, EXPECTED_REFUSALS.get(r.name, ABI.VTL_OK)), r
    return run


# STATUS reports whose refusal is the point of the scenario.
EXPECTED_REFUSALS = {"protect_text_rw": ABI.VTL_E_IMMUTABLE, "protect_data_rwx": ABI.VTL_E_POLICY,
                     "protect_pages_past_end": ABI.VTL_E_OUT_OF_RANGE}


def _kinds(run: Run, kind: str) -> list:  # type: ignore[type-arg]
    return run.events.of_kind(kind)


# scenario -> the name of its TARGET and FAULT reports
BLOCKED_WRITES = {"write-kernel-text": "kernel_text", "write-rodata": "rodata",
                  "write-ro-after-init": "ro_after_init", "modify-page-table": "page_table_entry",
                  "ask-text-writable": "kernel_text"}


@pytest.mark.parametrize("scenario", list(BLOCKED_WRITES))
def test_blocked_write_leaves_memory_unchanged_and_reaches_vtl1(
        guest_images: tuple[Path, Path], scenario: str) -> None:
    run = _run(guest_images, scenario)
    assert len(run.attack_targets) == 1
    (gpa, (old, after)), = run.attack_targets.items()
    target = run.report("target", BLOCKED_WRITES[scenario])
    assert (target.vtl, target.value[0], target.value[1]) == (0, gpa, 8)
    assert after == old.to_bytes(8, "little"), "the VMM sees the target changed"
    intercepts = _kinds(run, "intercept")
    assert [(i.type, i.access, i.gpa) for i in intercepts] == [("memory", "write", gpa)]
    assert intercepts[0].rip_after  # memslot host: reported after the instruction
    verdicts = _kinds(run, "verdict")
    assert [(v.verdict, v.vector, v.error_code) for v in verdicts] == [("inject_fault", 14, 0x3)]
    faults = [f for f in _kinds(run, "guest_fault") if f.vtl == 0]
    assert [(f.vector, f.error_code) for f in faults] == [(14, 0x3)]
    # VTL0 saw #PF(P|W) at the target (the fault's CR2 is the target's address).
    fault = run.report("fault", BLOCKED_WRITES[scenario])
    assert fault.vtl == 0 and fault.value[0:2] == [14, 0x3] and fault.value[3] == gpa
    assert "attack_succeeded" not in {r.name for r in run.of_kind("value")}
    assert run.attr_map[gpa >> 12] & NW


def test_ro_after_init_is_writable_during_boot_only(guest_images: tuple[Path, Path]) -> None:
    run = _run(guest_images, "write-ro-after-init")
    assert run.report("value", "ro_after_init_boot_write").value[0] == 0x2222
    assert run.report("status", "end_of_boot").value[:2] == [ABI.VTL_CALL_END_OF_BOOT, ABI.VTL_OK]
    assert run.report("value", "ro_after_init_pages").vtl == 1      # VTL1 made them read-only
    (old, after), = run.attack_targets.values()
    assert old == 0x2222 and after == (0x2222).to_bytes(8, "little")


def test_exec_from_data_page_faults_in_the_cpu(guest_images: tuple[Path, Path]) -> None:
    run = _run(guest_images, "exec-data-page")
    planted = run.report("exec", "data_page")
    page = planted.value[1]
    assert planted.value[0] == page                 # identity-mapped
    assert run.attr_map[page >> 12] == NX           # VTL1's view: rw-
    assert not _kinds(run, "intercept")             # the guest's own NX bit stopped it
    fault = run.report("fault", "exec_data_page")   # #PF(P|I/D) at the planted code
    assert fault.value[0:2] == [14, 0x11] and fault.value[2] == fault.value[3] == planted.value[0]


def test_page_tables_are_locked_read_only(guest_images: tuple[Path, Path]) -> None:
    run = _run(guest_images, "modify-page-table")
    locked = sum(1 for a in run.attr_map if a == NW | NX)
    tables = run.report("value", "locked_table_pages")   # VTL1's count of VTL0's table pages
    assert tables.vtl == 1 and 11 <= tables.value[0] <= locked
    (gpa, _), = run.attack_targets.items()
    assert run.attr_map[gpa >> 12] == NW | NX and locked >= 11


def test_vtl1_refuses_to_make_a_writable_page_executable(guest_images: tuple[Path, Path]) -> None:
    run = _run(guest_images, "ask-writable-executable")
    assert run.report("status", "protect_data_rwx").value[:2] == [ABI.VTL_CALL_PROTECT, ABI.VTL_E_POLICY]
    assert run.report("value", "data_page_attrs").value[0] == NX      # still rw- per VTL1
    # Nowhere in VTL0's memory is a page both writable and executable per VTL1's map.
    assert all(a & (NW | NX) for a in run.attr_map[:0x1000000 >> 12])


def test_page_list_past_the_end_is_refused_whole(guest_images: tuple[Path, Path]) -> None:
    run = _run(guest_images, "protect-list-past-end")
    assert run.report("status", "protect_pages_past_end").value[:2] == [ABI.VTL_CALL_PROTECT_PAGES,
                                                                        ABI.VTL_E_OUT_OF_RANGE]
    assert run.report("value", "data_page_attrs").value[0] == NX
    assert run.report("value", "last_page_attrs").value[0] == NX
    assert run.attr_map[-1] == NX                  # the valid last page was not applied either


def test_clearing_efer_nxe_is_an_msr_intercept_and_gp(guest_images: tuple[Path, Path]) -> None:
    run = _run(guest_images, "clear-efer-nxe")
    (i,) = _kinds(run, "intercept")
    assert (i.type, i.msr, i.access) == ("msr", 0xC0000080, "write")
    assert not i.data & (1 << 11)
    assert [(v.verdict, v.vector) for v in _kinds(run, "verdict")] == [("inject_fault", 13)]
    msr = run.report("msr", "efer")
    assert msr.value[0] == 0xC0000080 and msr.value[1] & (1 << 11)      # NXE set before the attack
    assert run.report("fault", "wrmsr_efer").value[:2] == [13, 0]


def test_allowed_intercepts_complete_the_write(guest_images: tuple[Path, Path]) -> None:
    run = _run(guest_images, "bench-intercept-allow", param=200)
    verdicts = _kinds(run, "verdict")
    assert len(verdicts) == 200 and {v.verdict for v in verdicts} == {"allow"}
    assert {i.access for i in _kinds(run, "intercept")} == {"write"}
    assert run.report("value", "last_value").value[0] == 0xC8
    stamps = run.report("stamps", "intercept_allow")
    assert stamps.value[0] == 100 and len(stamps.u64s()) == 3
    assert stamps.u64s() == sorted(stamps.u64s())


def test_protection_changes_are_events_with_memslot_costs(guest_images: tuple[Path, Path]) -> None:
    run = _run(guest_images, "harden")
    changes = _kinds(run, "protection_changed")
    assert changes and all(c.vtl == 1 and c.target_vtl == 0 for c in changes)
    text = changes[0]
    assert text.attributes == "r-x" and text.ranges == 1 and 1 <= text.backend_ops <= 4
