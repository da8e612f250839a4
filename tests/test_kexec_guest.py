"""Issue 10, the guest half, on real KVM: kexec of VTL1-authenticated images (teardown,
persist, deny) and emulated RESET, driven by the built-in kernels.

The verdicts are what the VMM observes: memory read back after the run, VTL0's attribute
map, the Lifecycle events with the protection and pin snapshots the VMM takes around each
step, the register intercepts and verdicts, VTL1's measurement in VtlEnabled events.  The
guests' reports only say where to look (TARGET, EXEC, REGISTER) and what they were told.
The next kernel is the built-in VTL0 kernel linked at 8 MiB (guest_vtl0/build/
vtl0-kexec.elf), staged in VTL0's memory and placed by the old kernel's ELF loader."""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import pytest

from tests.vtlrun import Run, run_scenario
from vmm.elf import read_image
from vmm.measure import loaded_image_sha256
from vmm.memattr import NR, NW, NX
from vtl.abi import ABI, abi_ffi
from vtl.core.trust import trust_digest
from vtl.lifecycle.protections import unprotected

pytestmark = pytest.mark.kvm

EXEC_MARK = 0x45584543554D4521


def _kexec_image(images: tuple[Path, Path]) -> Path:
    return images[0].parent / "vtl0-kexec.elf"


@cache
def _syms(path: Path) -> dict[str, int]:
    return read_image(path).symbols()


def _steps(run: Run, step: str) -> list[Any]:
    return [e for e in run.events.of_kind("lifecycle") if e.step == step]  # type: ignore[union-attr]


def _passed(run: Run) -> Run:
    assert run.passed(), "\n".join(run.console[-20:])
    assert "attack_succeeded" not in {r.name for r in run.of_kind("value")}
    return run


def _vtl1_report(run: Run, kind: str, name: str) -> list[Any]:
    return [r for r in run.reports if r.vtl == 1 and r.kind == kind and r.name == name]


def _kexec(images: tuple[Path, Path], scenario: str, policy: str, *, trusted: bool = True,
           snapshot: list[tuple[int, int]] | None = None) -> Run:
    image = _kexec_image(images)
    return run_scenario(images, scenario, staged=image, kexec_policy=policy,  # type: ignore[arg-type]
                        trust=[trust_digest(image)] if trusted else [], snapshot=snapshot)


@pytest.fixture(scope="module")
def teardown_run(guest_images: tuple[Path, Path]) -> Run:
    """kexec-teardown once for the two tests that read it."""
    return _kexec(guest_images, "kexec-teardown", "teardown")


def test_vtl1_measures_the_placed_segments_as_the_vmm_measures_the_elf(
        guest_images: tuple[Path, Path], teardown_run: Run) -> None:
    # Teardown: VTL1 validates, ends itself; the new kernel finds no VTL1, no protection.
    image = _kexec_image(guest_images)
    run = _passed(teardown_run)
    assert run.result.vtl1_history == ["enabled", "torn down at a kexec (teardown)", "enabled again"]
    (m,) = _vtl1_report(run, "bytes", "kexec_measurement")
    assert m.data == trust_digest(image) == bytes.fromhex(loaded_image_sha256(read_image(image)))
    assert [e.status for e in _steps(run, "kexec_validate")] == [ABI.VTL_OK]
    assert run.report("value", "kexec_priv_gpa").value[0] == _syms(image)["_priv_start"]


def test_kexec_teardown_leaves_nothing_of_vtl1_and_a_fresh_one_can_start(
        guest_images: tuple[Path, Path], teardown_run: Run) -> None:
    old_text = _syms(guest_images[0])["_text_start"]
    run = _passed(teardown_run)
    (teardown,) = _steps(run, "vtl1_teardown")
    (restart,) = _steps(run, "vtl0_restart")
    assert teardown.before["vtl1_enabled"] and unprotected(teardown.after)
    assert teardown.after["vtl1_region_zero"]
    assert restart.after["boot_count"] == 1 and "0x800000" in restart.detail
    # The new kernel read VTL1's region (the VMM emulates it while no VTL1 exists): zeros.
    assert run.report("value", "vtl1_region_nonzero").value[0] == 0
    assert run.report("bytes", "vtl1_region_image").data == bytes(2048)
    # The old kernel's immutable text took a write from the new one: protections gone.
    (target,) = [r for r in run.of_kind("target") if r.name == "old_kernel_text"]
    assert target.value[0] == old_text
    old, after = run.attack_targets[old_text]
    assert after != old.to_bytes(8, "little")
    # A new VTL1, measured as a fresh launch.
    fresh = loaded_image_sha256(read_image(guest_images[1]))
    enabled = run.events.of_kind("vtl_enabled")
    assert len(enabled) == 2 and all(e.sha256 == fresh for e in enabled)  # type: ignore[union-attr]
    assert run.report("bytes", "vtl1_measurement").data.hex() == fresh
    assert run.report("value", "boot_count").value[0] == 1


def test_kexec_persist_protects_the_new_kernel_before_its_first_instruction(
        guest_images: tuple[Path, Path]) -> None:
    image = _kexec_image(guest_images)
    syms, old = _syms(image), _syms(guest_images[0])
    marker = syms["exec_marker"]
    flags_gpa = ABI.VTL0_BOOT_INFO_GPA + abi_ffi.offsetof("struct vtl_boot_info", "flags")
    run = _passed(_kexec(guest_images, "kexec-persist", "persist", snapshot=[(marker, 8), (flags_gpa, 8)]))
    assert not _steps(run, "vtl1_teardown")
    # The new kernel's boot info (read back by the VMM) says that VTL1 persisted, not that
    # one may be enabled; its enable request was refused as already enabled.
    flags = int.from_bytes(run.memory[(flags_gpa, 8)], "little")
    assert flags == ABI.VTL_BOOT_F_VTL1_PERSISTS
    refused = [e for e in run.events.of_kind("refused")
               if e.response == "VTL_E_ALREADY_ENABLED"]  # type: ignore[union-attr]
    assert len(refused) == 1 and run.result.vtl1_history == ["enabled", "kept across a kexec (persist)"]
    (jump,) = _steps(run, "kexec_jump")
    (restart,) = _steps(run, "vtl0_restart")
    assert jump.status == ABI.VTL_OK
    # What the VMM held when the new kernel started: VTL1 alive, its new privileged section
    # judged, the new text (and only it) r-x.
    at_start = restart.before
    assert at_start["vtl1_enabled"]
    ctl = at_start["intercept_control"]
    assert ctl["priv_gpa"] == syms["_priv_start"] and ctl["flags"] == ABI.VTL_ICTL_ALL
    text_pages = (syms["_priv_start"] - syms["_text_start"]) >> 12
    assert at_start["protected_pages"]["r-x"] == text_pages
    # The new kernel's first act: a write to its own text, refused; memory unchanged.
    (tgt,) = [r for r in run.of_kind("target") if r.name == "kernel_text"]
    assert syms["_text_start"] <= tgt.value[0] < syms["_priv_start"]
    before, after = run.attack_targets[tgt.value[0]]
    assert after == before.to_bytes(8, "little")
    # CR0.WP, still pinned before the new kernel locked anything: a register intercept
    # VTL1 denied, and CR0 from KVM keeps WP.
    events: list[Any] = run.events.of_kind("intercept")
    icpt = [e for e in events if e.reg == "cr0"]
    assert icpt and icpt[0].new & (1 << 16) == 0
    verdicts = [(v.verdict, v.vector) for v in run.events.of_kind("verdict")]  # type: ignore[union-attr]
    assert ("inject_fault", 13) in verdicts
    assert restart.after["vtl0_registers"]["cr0"] & (1 << 16)
    # The old kernel's protections are gone, the new kernel's are in force.
    assert run.attr_map[old["_text_start"] >> 12] == NX
    assert run.attr_map[syms["_text_start"] >> 12] == NW
    assert run.attr_map[syms["_priv_start"] >> 12] == NR | NW | NX
    # Planted code in its data never ran.
    assert run.memory[(marker, 8)] != EXEC_MARK.to_bytes(8, "little")
    assert run.report("fault", "exec_data_page").value[:2] == [14, 0x11]


def test_kexec_deny_refuses_every_path_and_changes_nothing(guest_images: tuple[Path, Path]) -> None:
    image = _kexec_image(guest_images)
    marker = _syms(guest_images[0])["exec_marker"]
    run = _passed(_kexec(guest_images, "kexec-deny", "deny", snapshot=[(marker, 8)]))
    # VTL1 said why each jump was refused (its STATUS reports, in the run's VTL1 history).
    assert run.result.vtl1_history == ["enabled",
                                       "kexec refused: VTL_E_POLICY (VTL1: the kexec policy is deny)",
                                       "kexec refused: VTL_E_POLICY (VTL1: no validated image)"]
    st = {k: run.report("status", k).value[1] for k in
          ("validate_tampered", "validate_trusted", "jump_denied", "kexec_unload", "jump_unvalidated")}
    assert st == {"validate_tampered": ABI.VTL_E_POLICY, "validate_trusted": ABI.VTL_OK,
                  "jump_denied": ABI.VTL_E_POLICY, "kexec_unload": ABI.VTL_OK,
                  "jump_unvalidated": ABI.VTL_E_POLICY}
    # VTL1 measured the tampered image differently, the trusted one as the VMM does.
    tampered, trusted = _vtl1_report(run, "bytes", "kexec_measurement")
    assert trusted.data == trust_digest(image) != tampered.data
    # Sealed while validated, given back after: from VTL1 (values) and the VMM's map.
    assert run.report("value", "tampered_page_attrs").value[0] == NX
    assert run.report("value", "sealed_page_attrs").value[0] == NW | NX
    assert run.report("value", "unloaded_page_attrs").value[0] == NX
    seg0 = _syms(image)["_text_start"]
    assert run.attr_map[seg0 >> 12] == NX
    (tgt,) = [r for r in run.of_kind("target") if r.name == "validated_segment"]
    before, after = run.attack_targets[tgt.value[0]]
    assert after == before.to_bytes(8, "little")
    assert run.memory[(marker, 8)] != EXEC_MARK.to_bytes(8, "little")
    assert not _steps(run, "vtl0_restart") and not _steps(run, "vtl1_teardown")
    assert run.result.boot_count == 0


def test_an_image_not_on_the_allowlist_is_refused_and_its_pages_given_back(
        guest_images: tuple[Path, Path]) -> None:
    image = _kexec_image(guest_images)
    run = _kexec(guest_images, "kexec-teardown", "teardown", trusted=False)
    assert run.result.status == 1 and not run.passed()
    assert run.report("status", "kexec_validate").value[1] == ABI.VTL_E_POLICY
    assert [e.status for e in _steps(run, "kexec_validate")] == [ABI.VTL_E_POLICY]
    assert not _steps(run, "kexec_jump") and not _steps(run, "vtl0_restart")
    for seg in read_image(image).segments:          # rw- NX again, as hardening left them
        assert run.attr_map[seg.gpa >> 12] == NX


def test_malformed_and_unsealable_requests_are_refused_with_nothing_sealed(
        guest_images: tuple[Path, Path]) -> None:
    image = _kexec_image(guest_images)
    syms = _syms(guest_images[0])
    run = _passed(_kexec(guest_images, "kexec-bad-requests", "teardown"))
    invalid = ["bad_no_segments", "bad_too_many_segments", "bad_misaligned", "bad_overlapping", "bad_filesz",
               "bad_entry_not_x", "bad_in_vtl1", "bad_huge", "bad_reserved", "bad_scenario",
               "bad_request_in_vtl1"]
    for key in invalid:
        assert run.report("status", key).value[1] == ABI.VTL_E_INVALID_ARG, key
    for key in ("bad_kernel_text", "bad_page_table", "bad_tail_not_zero", "validate_twice", "unload_twice"):
        assert run.report("status", key).value[1] == ABI.VTL_E_POLICY, key
    assert run.report("status", "valid").value[1] == ABI.VTL_OK
    # The VMM's map: the old kernel's text still r-x, the image's pages rw- NX again.
    assert run.attr_map[syms["_text_start"] >> 12] == NW
    assert run.report("value", "text_attrs").value[0] == NW
    assert run.report("value", "table_attrs").value[0] == NW | NX
    for seg in read_image(image).segments:
        assert run.attr_map[seg.gpa >> 12] == NX
    # VTL1 reports a measurement only for an image it could measure whole: the valid one
    # (the one with a byte past its file size was refused while measuring).
    assert len(_vtl1_report(run, "bytes", "kexec_measurement")) == 1
    # VTL1 said why it refused each request (a STATUS report named after the call, with its
    # reason); the VMM refused VTL1 nothing (no other STATUS of VTL1's).
    own = [r for r in run.of_kind("status") if r.vtl == 1]
    assert all(r.name in ("kexec_validate", "kexec_unload") and r.text for r in own), own
    refused = [e for e in _steps(run, "kexec_validate") if e.status != ABI.VTL_OK]
    assert [r.value[1] for r in own if r.name == "kexec_validate"] == [e.status for e in refused]
    assert {"request: entry not in an executable segment", "request: scenario not NUL-terminated",
            "bytes past a segment's file size"} <= {r.text for r in own}


@pytest.mark.parametrize("scenario,triple", [("reset-request", False), ("reset-triple-fault", True)])
def test_reset_ends_all_guest_policy_and_the_next_boot_is_clean(guest_images: tuple[Path, Path],
                                                                scenario: str, triple: bool) -> None:
    rodata = _syms(guest_images[0])["rodata_target"]
    run = _passed(run_scenario(guest_images, scenario, reset_on_triple_fault=triple))
    (reset,) = _steps(run, "reset")
    assert reset.by == ("triple_fault" if triple else "vtl0")
    assert reset.before["vtl1_enabled"] and reset.before["protected_pages"]
    assert unprotected(reset.after) and reset.after["vtl1_region_zero"] and reset.after["boot_count"] == 1
    assert [r.value[0] for r in run.of_kind("value") if r.name == "boot_count"] == [0, 1]
    assert run.report("value", "vtl1_region_nonzero").value[0] == 0
    old, after = run.attack_targets[rodata]         # immutable before the reset, writable after
    assert after != old.to_bytes(8, "little")
    fresh = loaded_image_sha256(read_image(guest_images[1]))
    assert [e.sha256 for e in run.events.of_kind("vtl_enabled")] == [fresh, fresh]  # type: ignore[union-attr]


def test_without_reset_on_triple_fault_the_run_ends_hardened(guest_images: tuple[Path, Path]) -> None:
    run = run_scenario(guest_images, "reset-triple-fault")
    assert run.result.reason == "triple_fault" and not _steps(run, "reset")
