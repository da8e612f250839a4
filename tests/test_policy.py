"""Issue 3 acceptance on real KVM: VTL1's memory policy over VTL0, one test per attack
scenario.  Each asserts what a user cares about: the target memory as the VMM sees it
after the run, the intercept (GPA, access type) VTL1 received, the fault VTL0 saw, and
the events."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.vtlrun import Run, run_scenario
from vmm.memattr import NW, NX

pytestmark = pytest.mark.kvm


def _run(images: tuple[Path, Path], scenario: str, param: int = 0) -> Run:
    run = run_scenario(images, scenario, param=param)
    assert run.result.status == 0, "\n".join(run.console[-15:])
    assert f"PASS: {scenario}" in run.console[-1]
    return run


def _kinds(run: Run, kind: str) -> list:  # type: ignore[type-arg]
    return run.events.of_kind(kind)


@pytest.mark.parametrize("scenario", ["write-kernel-text", "write-rodata", "write-ro-after-init",
                                      "modify-page-table", "ask-text-writable"])
def test_blocked_write_leaves_memory_unchanged_and_reaches_vtl1(
        guest_images: tuple[Path, Path], scenario: str) -> None:
    run = _run(guest_images, scenario)
    assert len(run.attack_targets) == 1
    (gpa, (old, after)), = run.attack_targets.items()
    assert after == old.to_bytes(8, "little"), "the VMM sees the target changed"
    intercepts = _kinds(run, "intercept")
    assert [(i.type, i.access, i.gpa) for i in intercepts] == [("memory", "write", gpa)]
    assert intercepts[0].rip_after  # memslot host: reported after the instruction
    verdicts = _kinds(run, "verdict")
    assert [(v.verdict, v.vector, v.error_code) for v in verdicts] == [("inject_fault", 14, 0x3)]
    faults = [f for f in _kinds(run, "guest_fault") if f.vtl == 0]
    assert [(f.vector, f.error_code) for f in faults] == [(14, 0x3)]
    assert any("#PF (14) err=0x3" in line for line in run.console)
    assert run.attr_map[gpa >> 12] & NW


def test_ro_after_init_is_writable_during_boot_only(guest_images: tuple[Path, Path]) -> None:
    run = _run(guest_images, "write-ro-after-init")
    assert any("boot-time write to ro_after_init landed (0x2222)" in line for line in run.console)
    (old, after), = run.attack_targets.values()
    assert old == 0x2222 and after == (0x2222).to_bytes(8, "little")


def test_exec_from_data_page_faults_in_the_cpu(guest_images: tuple[Path, Path]) -> None:
    run = _run(guest_images, "exec-data-page")
    line = next(entry for entry in run.console if "ATTACK exec=" in entry)
    page = int(line.split("=")[1], 16)
    assert run.attr_map[page >> 12] == NX           # VTL1's view: rw-
    assert not _kinds(run, "intercept")             # the guest's own NX bit stopped it
    assert any("execute data page: #PF (14) err=0x11" in entry for entry in run.console)


def test_page_tables_are_locked_read_only(guest_images: tuple[Path, Path]) -> None:
    run = _run(guest_images, "modify-page-table")
    locked = sum(1 for a in run.attr_map if a == NW | NX)
    assert any("table pages read-only" in line for line in run.console)
    (gpa, _), = run.attack_targets.items()
    assert run.attr_map[gpa >> 12] == NW | NX and locked >= 11


def test_vtl1_refuses_to_make_a_writable_page_executable(guest_images: tuple[Path, Path]) -> None:
    run = _run(guest_images, "ask-writable-executable")
    assert any("-> VTL_E_POLICY" in line for line in run.console)
    # Nowhere in VTL0's memory is a page both writable and executable per VTL1's map.
    assert all(a & (NW | NX) for a in run.attr_map[:0x1000000 >> 12])


def test_page_list_past_the_end_is_refused_whole(guest_images: tuple[Path, Path]) -> None:
    run = _run(guest_images, "protect-list-past-end")
    assert any("-> VTL_E_OUT_OF_RANGE" in line for line in run.console)
    assert run.attr_map[-1] == NX                  # the valid last page was not applied either


def test_clearing_efer_nxe_is_an_msr_intercept_and_gp(guest_images: tuple[Path, Path]) -> None:
    run = _run(guest_images, "clear-efer-nxe")
    (i,) = _kinds(run, "intercept")
    assert (i.type, i.msr, i.access) == ("msr", 0xC0000080, "write")
    assert not i.data & (1 << 11)
    assert [(v.verdict, v.vector) for v in _kinds(run, "verdict")] == [("inject_fault", 13)]
    assert any("wrmsr EFER: #GP (13)" in line for line in run.console)


def test_allowed_intercepts_complete_the_write(guest_images: tuple[Path, Path]) -> None:
    run = _run(guest_images, "bench-intercept-allow", param=200)
    verdicts = _kinds(run, "verdict")
    assert len(verdicts) == 200 and {v.verdict for v in verdicts} == {"allow"}
    assert {i.access for i in _kinds(run, "intercept")} == {"write"}
    assert any("last value 0xc8" in line for line in run.console)


def test_protection_changes_are_events_with_memslot_costs(guest_images: tuple[Path, Path]) -> None:
    run = _run(guest_images, "harden")
    changes = _kinds(run, "protection_changed")
    assert changes and all(c.vtl == 1 and c.target_vtl == 0 for c in changes)
    text = changes[0]
    assert text.attributes == "r-x" and text.ranges == 1 and 1 <= text.backend_ops <= 4
