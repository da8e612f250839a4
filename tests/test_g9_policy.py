"""Issue 9, the guest half, on real KVM: VTL1's policy holds against an independent
attacker.  Each test runs a VTL0 attack scenario in a fresh partition and checks what the
VMM observed (memory and markers read back, intercepts and verdicts, VTL1's reports),
not only the attacking guest's word.  The register and MSR attacks are asserted on the
runs of tests/test_attacks.py (tests/vtlrun.py attack_run: what `vtl attack` runs, its
events holding the guests' reports), not on runs of their own.

Register attacks need the VMM half (VTL_HC_SET_INTERCEPT_CONTROL and the decoding of the
privileged section).  Where the VMM lacks it, VTL1 says so (VALUE register_pinning = 0)
and these tests check the honest outcome instead: the attack lands and `vtl attack` calls
it not enforced on this host."""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import TypeVar

import pytest

from tests.vtlrun import AttackRun, Run, attack_run, run_scenario, shared_run
from vmm.elf import read_image
from vmm.memattr import NW, NX
from vtl.abi import ABI

pytestmark = pytest.mark.kvm


@cache
def _pinning(images: tuple[Path, Path]) -> bool:
    run = shared_run(images, "harden")
    assert run.passed()
    return bool(run.report("value", "register_pinning").value[0])


R = TypeVar("R", Run, AttackRun)


def _passed(run: R) -> R:
    if isinstance(run, Run):
        assert run.result.status == 0, "\n".join(run.console[-15:])
    else:
        assert run.result.guest_status == 0, run.result
    assert run.passed() and "attack_succeeded" not in {r.name for r in run.of_kind("value")}
    return run


def _marker(images: tuple[Path, Path]) -> int:
    return read_image(images[0]).symbols()["exec_marker"]


# ---- confused deputy: VTL1 writes VTL0 memory only where VTL0 itself may write ----
DEPUTIES = {"confused-deputy-rodata": ("rodata", "get_measurement_into_rodata", ABI.VTL_CALL_GET_MEASUREMENT),
            "confused-deputy-text": ("kernel_text", "reg_probe_into_text", ABI.VTL_CALL_REG_PROBE),
            "confused-deputy-page-table": ("page_table_entry", "get_measurement_into_pte",
                                           ABI.VTL_CALL_GET_MEASUREMENT)}


@pytest.mark.parametrize("scenario", list(DEPUTIES))
def test_vtl1_is_no_deputy_for_writes_vtl0_may_not_make(guest_images: tuple[Path, Path],
                                                        scenario: str) -> None:
    target_name, status_name, code = DEPUTIES[scenario]
    run = _passed(run_scenario(guest_images, scenario))
    target = run.report("target", target_name)
    (old, after), = run.attack_targets.values()
    assert after == old.to_bytes(8, "little"), "VTL1 wrote into the target"
    assert run.attr_map[target.value[0] >> 12] & NW          # VTL0 itself may not write there
    assert run.report("status", status_name).value[:2] == [code, ABI.VTL_E_ACCESS_DENIED]
    assert not run.events.of_kind("intercept")               # refused by VTL1's check, not by a fault
    assert run.report("value", "echo_rcx").value[0] == 0x1235


# ---- no stale grant; W^X between the lock and END_OF_BOOT ----
def test_an_audit_grant_does_not_survive_the_page_becoming_immutable_text(
        guest_images: tuple[Path, Path]) -> None:
    run = _passed(run_scenario(guest_images, "stale-audit-text"))
    assert run.report("status", "protect_audit_text_page").value[1] == ABI.VTL_OK
    assert run.report("status", "audit_immutable_text").value[1] == ABI.VTL_E_IMMUTABLE
    (old, after), = run.attack_targets.values()
    assert after == old.to_bytes(8, "little")
    icpt = run.events.of_kind("intercept")
    assert [(i.type, i.access) for i in icpt] == [("memory", "write")] * 2  # type: ignore[union-attr]
    assert [(v.verdict, v.vector) for v in run.events.of_kind("verdict")] == [("inject_fault", 14)] * 2  # type: ignore[union-attr]


def test_an_executable_page_stays_unwritable_after_the_lock(guest_images: tuple[Path, Path]) -> None:
    marker = _marker(guest_images)
    run = _passed(run_scenario(guest_images, "exec-page-writable-before-eob", snapshot=[(marker, 8)]))
    assert run.report("value", "module_result").value[0] == 0x1111
    assert run.report("status", "protect_module_rw").value[1] == ABI.VTL_E_POLICY
    assert run.report("value", "module_page_attrs").value[0] == NW      # still r-x per VTL1
    planted = run.report("exec", "module_page")
    assert planted.value[2] == marker
    assert int.from_bytes(run.memory[(marker, 8)], "little") != planted.value[3], "the new code ran"
    (old, after), = run.attack_targets.values()
    assert after == old.to_bytes(8, "little")
    assert run.report("fault", "module_page").value[:2] == [14, 0x3]
    assert run.report("value", "module_result_after").value[0] == 0x1111


@pytest.mark.parametrize("scenario", ["exec-data-page", "mov-cr-outside-section"])
def test_planted_code_outside_the_text_never_runs(guest_images: tuple[Path, Path], scenario: str) -> None:
    marker = _marker(guest_images)
    run = _passed(run_scenario(guest_images, scenario, snapshot=[(marker, 8)]))
    planted = run.report("exec", "data_page")
    assert planted.value[2] == marker and planted.value[3]
    assert int.from_bytes(run.memory[(marker, 8)], "little") != planted.value[3]
    assert run.report("fault", "exec_data_page").value[:2] == [14, 0x11]    # NX in the locked tables
    assert run.attr_map[planted.value[1] >> 12] == NX


# ---- MSRs ----
MSR_ATTACKS = {"clear-efer-lme": (0xC0000080, "efer"), "clear-efer-sce": (0xC0000080, "efer"),
               "lstar-non-canonical": (0xC0000082, "lstar"), "write-lstar-after-eob": (0xC0000082, "lstar")}


@pytest.mark.parametrize("scenario", list(MSR_ATTACKS))
def test_pinned_msrs_are_refused_by_vtl1(guest_images: tuple[Path, Path], scenario: str) -> None:
    index, name = MSR_ATTACKS[scenario]
    run = _passed(attack_run(guest_images, scenario))
    assert run.report("msr", name).value[0] == index
    icpt = run.events.of_kind("intercept")
    assert [(i.type, i.msr) for i in icpt] == [("msr", index)]  # type: ignore[union-attr]
    assert [(v.verdict, v.vector) for v in run.events.of_kind("verdict")] == [("inject_fault", 13)]  # type: ignore[union-attr]
    assert run.report("fault", f"wrmsr_{name}").value[:2] == [13, 0]
    assert run.result.outcome == "blocked" and f"MSR {index:#x}" in run.result.vmm_checked


def test_lmsw_cannot_clear_pe(guest_images: tuple[Path, Path]) -> None:
    run = _passed(attack_run(guest_images, "lmsw-clear-pe"))
    assert run.report("fault", "write_cr0").value[:2] == [13, 0]
    assert run.result.outcome == "blocked" and "CR0" in run.result.vmm_checked


# ---- registers: pinned where the VMM decodes the privileged section ----
REGISTER_ATTACKS = {"clear-cr0-wp": "write_cr0", "clear-cr4-smep": "write_cr4", "clear-cr4-smap": "write_cr4",
                    "clear-cr4-umip": "write_cr4", "load-own-cr3": "write_cr3",
                    "load-own-cr3-writable-text": "write_cr3", "lidt-own": "lidt", "lgdt-own": "lgdt",
                    "lldt": "lldt", "ltr": "ltr", "xsetbv": "xsetbv"}


@pytest.mark.parametrize("scenario", list(REGISTER_ATTACKS))
def test_register_attack(guest_images: tuple[Path, Path], scenario: str) -> None:
    run = attack_run(guest_images, scenario)
    r = run.result
    if _pinning(guest_images):
        assert r.outcome == "blocked", (r.outcome, r.mechanism, r.changed)
        _passed(run)
        assert run.report("fault", REGISTER_ATTACKS[scenario]).value[0] == 13
        assert run.report("value", "register_pinning").value[0] == 1
    else:
        # No register pinning on this VMM: the write happens, and the tools say why.
        assert r.outcome in ("not enforced on this host", "error"), (r.outcome, r.mechanism)
        assert r.guest_status == 1


def test_fuzz_registers(guest_images: tuple[Path, Path]) -> None:
    if not _pinning(guest_images):
        run = run_scenario(guest_images, "fuzz-registers", param=100)
        assert run.result.status == 1 and run.report("value", "register_pinning").value[0] == 0
        return
    run = _passed(run_scenario(guest_images, "fuzz-registers", param=1000))
    v = {r.name: r.value[0] for r in run.of_kind("value") if r.vtl == 0}
    assert v["attempts"] >= 900 and v["violations"] == 0 and v["restore_faults"] == 0
    assert 0 < v["faults"] < v["attempts"]          # some refused, some (unpinned, same value) allowed
    assert run.report("value", "seed").value[0]
