"""The VMM's lifecycle flows on real KVM, driven by guests that need no lifecycle code:
an emulated RESET on every triple fault (--reset-on-triple-fault), the control flow that
requests one from outside (Scheduler.request_reset), and what each leaves behind."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

from tests.vtlrun import run_scenario
from vtl.core.config import PartitionConfig
from vtl.core.events import EventLog
from vtl.core.partition import Partition
from vtl.lifecycle.state import unprotected
from vtl.run import control


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


def test_reset_requested_from_outside_tears_down_vtl1_and_reboots(guest_images: tuple[Path, Path]) -> None:
    # A long benchmark holds VTL1 enabled and VTL0 busy; a reset from another thread (what
    # the control socket does) must end VTL1, zero its memory and boot VTL0 from its image.
    cfg = PartitionConfig(vtl0_image=guest_images[0], vtl1_image=guest_images[1], scenario="bench-null-call",
                          param=3_000_000)
    events = EventLog(keep=10_000)
    with Partition(cfg, events) as p:
        holder: dict[str, Any] = {}

        def later() -> None:
            time.sleep(0.5)
            sched = holder.get("sched")
            if sched is not None:
                sched.request_reset("user")

        orig = control.Scheduler
        class Capturing(orig):  # type: ignore[misc, valid-type]
            def __init__(self, *a: Any, **kw: Any) -> None:
                super().__init__(*a, **kw)
                holder["sched"] = self
        control.Scheduler = Capturing  # type: ignore[misc]
        try:
            t = threading.Thread(target=later)
            t.start()
            result, _ = control.run(p, None, timeout=6.0)
            t.join()
        finally:
            control.Scheduler = orig  # type: ignore[misc]
    steps: list[Any] = events.of_kind("lifecycle")
    resets = [e for e in steps if e.step == "reset"]
    assert resets and resets[0].by == "user", [e.step for e in steps]
    r = resets[0]
    assert r.before["vtl1_enabled"] and not r.after["vtl1_enabled"]
    assert unprotected(r.after) and r.after["vtl1_region_zero"]
    # VTL0 booted again from its image and enabled a new VTL1 with the same measurement.
    enables = [e for e in steps if e.step == "vtl1_enable"]
    assert len(enables) >= 2 and enables[-1].ts > r.ts
    assert enables[-1].after["vtl1_measurement"] == enables[0].after["vtl1_measurement"]
    assert result.boot_count >= 1
