"""The memslot backend splits a slot by deleting it and creating its pieces (KVM cannot
resize one): a vCPU that touched the range in between found no memory there, and a
2-VP boot through memslots triple-faulted now and then.  Every memslot change a VTL1
asks for is now made with every other VP out of KVM_RUN (WithOthersPaused)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from vtl.core.config import PartitionConfig
from vtl.core.events import EventLog
from vtl.core.partition import Partition
from vtl.run import control
from vtl.run.runner import RunState
from vtl.run.scheduler import Scheduler
from vtl.services.console import Console

OUT_OF_KVM_RUN = {RunState.PAUSED, RunState.OFFLINE, RunState.HALTED, RunState.EXITED}


def test_memslot_changes_are_made_with_every_other_vp_out_of_kvm_run(guest_images: tuple[Path, Path]) -> None:
    cfg = PartitionConfig(vtl0_image=guest_images[0], vtl1_image=guest_images[1], scenario="write-rodata",
                          nr_vps=2, attr_backend="memslot")
    seen: list[list[RunState]] = []

    def make(p: Partition, c: Console | None) -> Scheduler:
        s = Scheduler(p, c)
        apply = p.backend.set_range

        def checked(gpa: int, size: int, attrs: int) -> Any:
            me = threading.get_ident()
            seen.append([r.state for r in s.runners if r.ident is not None and r.ident != me])
            return apply(gpa, size, attrs)
        p.backend.set_range = checked  # type: ignore[method-assign]
        return s

    with Partition(cfg, EventLog()) as p:
        result, _ = control.run(p, None, 300, scheduler=make)
    assert result.reason == "guest_exit" and result.status == 0, result.message
    during_run = [states for states in seen if states]
    assert during_run, "no memslot change was made while another VP existed"
    assert all(set(states) <= OUT_OF_KVM_RUN for states in during_run), during_run
