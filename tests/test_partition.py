"""Issue 2 acceptance on real KVM: boot, enable flow, VTL switching, refusals, crashes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.test_build import _independent_measurement
from tests.vtlrun import Run, run_scenario, vtl_cli
from vtl.abi import ABI
from vtl.core.events import parse_event

pytestmark = pytest.mark.kvm

VTL1_TARGET = ABI.VTL1_BASE + ABI.VTL1_IMAGE_MIN_OFF


ECHO_RCX = 0x1234 + 1    # VTL_CALL_ECHO's answer to the guests' argument


def _passed(run: Run, name: str) -> None:
    assert run.result.reason == "guest_exit", run.result.message
    result = run.report("result", name)
    assert result.vtl == 0 and result.value[0] == 0, (result, "\n".join(run.console[-15:]))
    assert run.passed() and run.result.status == 0


def _status(run: Run, name: str) -> int:
    """The status a VTL0 STATUS report says the guest received."""
    r = run.report("status", name)
    assert r.vtl == 0
    return r.value[1]


def _echo_served(run: Run) -> None:
    """After a refusal the guest's VTL_CALL_ECHO was still served (VTL0's reports)."""
    assert _status(run, "echo") == ABI.VTL_OK
    assert run.report("value", "echo_rcx").value[0] == ECHO_RCX


def test_boot_enables_vtl1_and_reports_its_measurement(guest_images: tuple[Path, Path]) -> None:
    run = run_scenario(guest_images)
    _passed(run, "boot")
    # The documented measurement of what is loaded, computed by the test itself.
    want = _independent_measurement(guest_images[1].read_bytes())
    assert run.result.vtl1_enabled and run.result.vtl1_measurement == want
    enabled = run.events.of_kind("vtl_enabled")
    assert len(enabled) == 1 and enabled[0].sha256 == want  # type: ignore[union-attr]
    # VTL1 got the measurement in its boot info, and VTL0 the same through VTL1
    # (VTL_CALL_GET_MEASUREMENT): one BYTES report from each VTL.
    measured = [r for r in run.of_kind("bytes") if r.name == "vtl1_measurement"]
    assert sorted(r.vtl for r in measured) == [0, 1]
    assert all(r.data == bytes.fromhex(want) for r in measured)
    assert _status(run, "enable_vtl1") == ABI.VTL_OK and _status(run, "nop") == ABI.VTL_OK
    assert _status(run, "get_measurement") == ABI.VTL_OK
    _echo_served(run)
    # The VMM tags console lines with their VTL; the guests do not tag them themselves.
    assert any(line.startswith("[vtl0] ") for line in run.console)
    assert any(line.startswith("[vtl1] ") for line in run.console)
    assert not any(line.startswith(("[vtl0] [vtl", "[vtl1] [vtl")) for line in run.console)
    assert run.result.vtl_calls >= 3 and run.result.vtl_returns == run.result.vtl_calls + 1


def test_vtl_call_shares_gprs_and_keeps_private_state(guest_images: tuple[Path, Path]) -> None:
    run = run_scenario(guest_images, "vtl-call-state",
                       snapshot=[(ABI.VTL1_BASE + ABI.VTL1_CONTROL_OFF, 32)])
    _passed(run, "vtl-call-state")
    value = {r.name: r.value[0] for r in run.of_kind("value") if r.vtl == 0}
    assert value["isolation_violations"] == 0 and value["shared_reg_mismatches"] == 0
    assert value["vtl1_entry_reason"] == ABI.VTL_ENTRY_CALL
    assert value["vtl1_ctl_rax"] == ABI.VTL_CALL_REG_PROBE
    assert value["vtl0_cr3"] != value["vtl1_cr3"] and value["vtl0_rsp"] != value["vtl1_rsp"]
    assert ABI.VTL1_BASE <= value["vtl1_rip"] < ABI.VTL1_BASE + ABI.VTL1_SIZE
    calls = [e for e in run.events.of_kind("vtl_call") if e.code == ABI.VTL_CALL_REG_PROBE]  # type: ignore[union-attr]
    assert len(calls) == 1
    # The VMM entered VTL1 with reason "call" and VTL0's RAX/RCX in vtl_control.
    ctl = run.memory[(ABI.VTL1_BASE + ABI.VTL1_CONTROL_OFF, 32)]
    reason = int.from_bytes(ctl[0:4], "little")
    rax, rcx = int.from_bytes(ctl[8:16], "little"), int.from_bytes(ctl[16:24], "little")
    assert reason == ABI.VTL_ENTRY_CALL
    assert (rax, rcx) == (calls[0].code, calls[0].arg)  # type: ignore[union-attr]
    assert value["vtl1_ctl_rcx"] == rcx
    returns = run.events.of_kind("vtl_return")
    assert any(r.fast for r in returns)  # type: ignore[union-attr]


@pytest.mark.parametrize("scenario,access,key", [("read-vtl1-memory", "read", "read_vtl1"),
                                                 ("write-vtl1-memory", "write", "write_vtl1"),
                                                 ("exec-vtl1-memory", "execute", "exec_vtl1")])
def test_vtl0_access_to_vtl1_memory_is_refused(guest_images: tuple[Path, Path], scenario: str,
                                               access: str, key: str) -> None:
    run = run_scenario(guest_images, scenario, snapshot=[(VTL1_TARGET, 64)])
    _passed(run, scenario)
    assert run.report("fault", key).value[:2] == [13, 0]      # the guest saw #GP(0)
    _echo_served(run)
    # Memory unchanged: still the VTL1 image's first bytes.
    from vmm.elf import read_image
    img = read_image(guest_images[1])
    seg = min(img.segments, key=lambda s: s.gpa)
    assert seg.gpa == VTL1_TARGET
    assert run.memory[(VTL1_TARGET, 64)] == img.data[seg.offset:seg.offset + 64]
    refused = [e for e in run.events.of_kind("refused") if e.access == access]  # type: ignore[union-attr]
    assert refused and refused[0].gpa == VTL1_TARGET and refused[0].response == "#GP(0)"  # type: ignore[union-attr]
    faults = run.events.of_kind("guest_fault")
    assert any(f.vector == 13 for f in faults)  # type: ignore[union-attr]


# scenario: the VMM's response (refusal event), then what the guest reported (kind, name, value[:2])
BAD_REQUESTS = {
    "vtl-return-from-vtl0": ("#UD", "fault", "vtl_return", [6, 0]),
    "vtl-call-from-user": ("#GP(0)", "fault", "vtl_call_from_user", [13, 0]),
    "unknown-hypercall": ("VTL_E_INVALID_CODE", "status", "hypercall_0x7777",
                          [0x7777, ABI.VTL_E_INVALID_CODE]),
    "vtl1-hypercall-from-vtl0": ("VTL_E_ACCESS_DENIED", "status", "get_vp_register",
                                 [ABI.VTL_HC_GET_VP_REGISTER, ABI.VTL_E_ACCESS_DENIED]),
    "enable-twice": ("VTL_E_ALREADY_ENABLED", "status", "enable_vtl1_again",
                     [ABI.VTL_HC_ENABLE_VTL1, ABI.VTL_E_ALREADY_ENABLED]),
    "call-without-vtl1": ("VTL_E_NOT_ENABLED", "status", "call_before_enable",
                          [ABI.VTL_CALL_ECHO, ABI.VTL_E_NOT_ENABLED]),
}


@pytest.mark.parametrize("scenario", list(BAD_REQUESTS))
def test_bad_requests_get_a_defined_refusal_and_service_continues(
        guest_images: tuple[Path, Path], scenario: str) -> None:
    response, kind, name, seen = BAD_REQUESTS[scenario]
    run = run_scenario(guest_images, scenario)
    _passed(run, scenario)
    assert run.report(kind, name).value[:2] == seen
    _echo_served(run)
    if scenario == "vtl-call-from-user":
        # The fault was taken at the user-mode OUT (CPL3 code segment, RIP at the user code).
        assert run.report("value", "fault_cs").value[0] & 3 == 3
        assert run.report("fault", name).value[2] == run.report("value", "user_code").value[0]
    kinds = [e.kind for e in run.events.events]
    refused = [e for e in run.events.of_kind("refused") if e.response == response]  # type: ignore[union-attr]
    if scenario == "vtl-call-from-user" and not refused:
        # The CPU's own I/O permission check may fire before any exit: then the
        # guest saw #GP without the VMM being involved, which the guest checked.
        pass
    else:
        assert refused, run.events.events
        # After the refusal the guest made a VTL call that VTL1 served.
        after = kinds[kinds.index("refused"):]
        assert "vtl_call" in after and "vtl_return" in after


def test_unknown_vtl_call_code_is_refused_by_vtl1(guest_images: tuple[Path, Path]) -> None:
    run = run_scenario(guest_images, "unknown-call-code")
    _passed(run, "unknown-call-code")
    assert run.report("status", "call_0x7777").value[:2] == [0x7777, ABI.VTL_E_INVALID_CODE]
    _echo_served(run)
    rets = run.events.of_kind("vtl_return")
    assert any(r.status == ABI.VTL_E_INVALID_CODE for r in rets)  # type: ignore[union-attr]


def test_no_vtl1_refuses_enable(guest_images: tuple[Path, Path]) -> None:
    run = run_scenario(guest_images, vtl1=False)
    _passed(run, "boot")
    assert _status(run, "enable_vtl1") == ABI.VTL_E_DISABLED
    assert not [r for r in run.reports if r.vtl == 1]
    assert not run.result.vtl1_enabled and run.result.vtl_switches == 0
    assert any(e.response == "VTL_E_DISABLED" for e in run.events.of_kind("refused"))  # type: ignore[union-attr]


def test_triple_fault_ends_with_clear_message(guest_images: tuple[Path, Path]) -> None:
    cp = vtl_cli("run", "--scenario", "triple-fault")
    assert cp.returncode == 3
    assert "triple-faulted" in cp.stdout and "Traceback" not in cp.stdout + cp.stderr


def test_not_an_elf_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "kernel.elf"
    bad.write_text("#!/bin/sh\necho not a kernel\n")
    cp = vtl_cli("run", "--vtl0-image", str(bad))
    assert cp.returncode == 1
    assert "not an ELF" in cp.stderr and "Traceback" not in cp.stderr


def test_missing_kvm_is_one_clear_sentence(guest_images: tuple[Path, Path]) -> None:
    cp = vtl_cli("run", env={"VTL_KVM_DEVICE": "/nonexistent/kvm"})
    assert cp.returncode == 1
    assert "does not exist" in cp.stderr and "Traceback" not in cp.stderr
    assert len(cp.stderr.strip().splitlines()) == 1


def test_run_json_and_events_file(guest_images: tuple[Path, Path], tmp_path: Path) -> None:
    events = tmp_path / "events.jsonl"
    cp = vtl_cli("run", "--json", "--events", str(events))
    assert cp.returncode == 0, cp.stderr
    doc = json.loads(cp.stdout)
    assert doc["status"] == 0 and doc["vtl1_enabled"] and doc["vtl_switches"] >= 6
    assert doc["exits"]["io:vtl_call"] == doc["vtl_calls"]
    parsed = [parse_event(line) for line in events.read_text().splitlines()]
    kinds = {e.kind for e in parsed}
    assert {"vtl_enabled", "vtl_call", "vtl_return", "guest_exit"} <= kinds
    assert all(e.ts >= 0 for e in parsed)


def test_timeout_stops_a_running_guest(guest_images: tuple[Path, Path]) -> None:
    cp = vtl_cli("run", "--scenario", "bench-null-call", "--param", "2000000", "--timeout", "1")
    assert cp.returncode == 124, cp.stdout + cp.stderr
    assert "timeout" in cp.stdout
