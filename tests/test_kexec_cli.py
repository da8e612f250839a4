"""`vtl kexec` as a user runs it: the timeline, the VMM's checks and the exit status."""

from __future__ import annotations

import json

from tests.vtlrun import vtl_cli


def test_teardown_flow_passes_with_a_timeline_of_every_step() -> None:
    cp = vtl_cli("kexec", "--flow", "teardown", "--json")
    assert cp.returncode == 0, cp.stderr + cp.stdout[-2000:]
    rep = json.loads(cp.stdout)
    assert rep["passed"] and all(c["ok"] for c in rep["checks"])
    steps = [s["step"] for s in rep["steps"]]
    # The order a person reads in the timeline: validate, jump, VTL1's end, the restart,
    # then the new kernel's own VTL1.
    order = [steps.index(s) for s in ("kexec_validate", "kexec_jump", "vtl1_teardown", "vtl0_restart")]
    assert order == sorted(order)
    assert "vtl1_enable" in steps[order[-1]:]
    teardown = rep["steps"][order[2]]
    assert teardown["before"]["vtl1_enabled"] and not teardown["after"]["vtl1_enabled"]
    assert teardown["after"]["protected_pages"] == {} and teardown["after"]["intercept_control"] is None
    assert all(s["duration_us"] > 0 for s in rep["steps"])


def test_an_untrusted_image_fails_the_flow_with_status_2_and_says_why() -> None:
    cp = vtl_cli("kexec", "--flow", "teardown", "--untrusted")
    assert cp.returncode == 2, cp.stderr
    assert "FAIL" in cp.stdout and "VTL_E_POLICY" in cp.stdout and "Traceback" not in cp.stderr


def test_a_missing_image_is_one_line_and_status_1() -> None:
    cp = vtl_cli("kexec", "--flow", "persist", "--image", "/nonexistent.elf")
    assert cp.returncode == 1
    assert cp.stderr.strip().splitlines() == ["vtl kexec: error: --image /nonexistent.elf: no such file"]
