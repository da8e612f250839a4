"""The VMM's RESET on real KVM, driven by a guest that needs no lifecycle code: an
emulated RESET on every triple fault (--reset-on-triple-fault) and what each leaves
behind.  A RESET from the user is tested over the control socket
(tests/test_control_socket.py), the guest-driven flows in tests/test_lifecycle*.py."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from tests.vtlrun import run_scenario
from vtl.lifecycle.protections import unprotected


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_triple_fault_resets_again_and_again_without_leaking(guest_images: tuple[Path, Path]) -> None:
    # The "triple-fault" scenario faults at every boot: with reset-on-triple-fault each boot
    # is followed by a RESET until the timeout.  Every reset rebuilds VTL0's VM; none may
    # leave a VM, a vCPU or a mapping behind.
    before = _fds()
    run = run_scenario(guest_images, "triple-fault", timeout=3.0, reset_on_triple_fault=True)
    assert run.result.reason == "timeout", run.result.message
    resets: list[Any] = run.events.of_kind("lifecycle")
    resets = [e for e in resets if e.step == "reset"]
    assert len(resets) >= 3 and run.result.resets == len(resets)
    assert [e.after["boot_count"] for e in resets[:3]] == [1, 2, 3]
    assert all(e.by == "triple_fault" and unprotected(e.after) for e in resets)
    assert run.result.boot_count == len(resets)
    assert _fds() <= before + 2, "a reset left file descriptors (VMs, vCPUs) open"


def test_without_the_option_a_triple_fault_ends_the_run(guest_images: tuple[Path, Path]) -> None:
    run = run_scenario(guest_images, "triple-fault")
    assert run.result.reason == "triple_fault" and run.result.resets == 0
