"""`vtl kexec` as a user runs it: the timeline, the VMM's checks and the exit status."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from tests.vtlrun import REPO, vtl_cli
from vtl.tools.kexec import KexecReport, render


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


def test_an_untrusted_image_is_refused_as_expected_and_passes() -> None:
    """--untrusted: VTL1's refusal is the expected result, so it is a pass (exit 0) that says
    so, with VTL1's own reason (its report, not console text).  One run (each takes seconds:
    VTL1 hashes the whole image before it refuses): the JSON, and the table `vtl kexec`
    prints for the same report (the refusal under teardown, in process:
    tests/test_kexec_guest.py)."""
    cp = vtl_cli("kexec", "--flow", "persist", "--untrusted", "--json")
    assert cp.returncode == 0, cp.stdout[-2000:] + cp.stderr
    rep = json.loads(cp.stdout)
    assert rep["passed"] and rep["expected_refusal"]
    (val,) = [s for s in rep["steps"] if s["step"] == "kexec_validate"]
    assert val["status"] == "VTL_E_POLICY" and val["refusal"] == "not on the allowlist"
    table = render(KexecReport.model_validate(rep))
    assert "FAIL" not in table
    assert table.splitlines()[-1] == \
        "result: PASS: refused as expected (kexec_validate: VTL_E_POLICY (VTL1: not on the allowlist))"


def test_an_image_vtl1_refuses_says_vtl1s_reason(tmp_path: Path) -> None:
    """A VTL0 image without a privileged section under persist: one FAIL line that gives
    VTL1's reason, exit 2."""
    src, lds = tmp_path / "my.s", tmp_path / "my.ld"
    src.write_text(".section .text, \"ax\"\n.globl _start\n_start: xor %eax, %eax\n out %eax, $0xF4\n")
    lds.write_text("ENTRY(_start)\nSECTIONS { . = 0x800000; .text : { *(.text) } "
                   "/DISCARD/ : { *(.note*) *(.comment) } }\n")
    elf = tmp_path / "my.elf"
    subprocess.run(["as", "--64", "-o", str(tmp_path / "my.o"), str(src)], check=True)
    subprocess.run(["ld", "-static", "--build-id=none", "-z", "max-page-size=0x1000", "-T", str(lds), "-o",
                    str(elf), str(tmp_path / "my.o")], check=True)
    cp = vtl_cli("kexec", "--flow", "persist", "--image", str(elf))
    assert cp.returncode == 2, cp.stdout[-2000:] + cp.stderr
    fails = [ln for ln in cp.stdout.splitlines() if ln.strip().startswith("FAIL")]
    why = "VTL1: the image has no privileged section for persist to judge"
    assert len(fails) == 1 and "kexec_validate: VTL_E_INVALID_ARG" in fails[0] and why in fails[0], cp.stdout
    assert cp.stdout.splitlines()[-1].startswith("result: FAIL: VTL1 refused the kexec at kexec_validate")


def test_vtl_run_summary_says_what_happened_to_vtl1() -> None:
    # (Each history as the run records it, persist's too: tests/test_kexec_guest.py; --json
    # prints the run's result, vtl1_history with it.)
    image = str(REPO / "guest_vtl0" / "build" / "vtl0-kexec.elf")
    cp = vtl_cli("run", "--scenario", "kexec-teardown", "--trust", image, "--stage", image, "--quiet")
    assert cp.returncode == 0, cp.stdout[-2000:] + cp.stderr
    assert ("              history: enabled → torn down at a kexec (teardown) → enabled again"
            in cp.stdout.splitlines()), cp.stdout


def test_a_missing_image_is_one_line_and_status_1() -> None:
    cp = vtl_cli("kexec", "--flow", "persist", "--image", "/nonexistent.elf")
    assert cp.returncode == 1
    assert cp.stderr.strip().splitlines() == ["vtl kexec: error: --image /nonexistent.elf: no such file"]
