"""VTL_HC_VTL0_RESTART's argument checks: VTL1 is trusted, but a bad request (a buggy or
someone else's VTL1) gets a status and leaves no restart pending, never an exception.
The hypercall handler is called directly on a real partition; the flows it starts are
tested end to end in tests/test_kexec_guest.py."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from vtl.abi import ABI, abi_ffi, abi_struct
from vtl.core.config import PartitionConfig
from vtl.core.events import EventLog
from vtl.core.partition import Partition
from vtl.core.vp import IN_VTL1_CALL, RUNNING_VTL0
from vtl.services.hypercalls import Hypercalls
from vtl.services.protection import Vtl0Protection
from vtl.services.refusals import Refusals
from vtl.services.reports import Reports

pytestmark = pytest.mark.kvm


def _call(p: Partition, gpa: int, state: Any = IN_VTL1_CALL, on: int = 0) -> tuple[int, Any]:
    events = EventLog()
    hc = Hypercalls(p, events, Refusals(p.mem, p.layout, events, lambda *_: True), Reports(p, events),
                    Vtl0Protection(p))
    vp = p.vps[on]
    vp.state = state
    vp.restart = None
    reply = hc.vtl0_restart(vp, SimpleNamespace(regs=SimpleNamespace(rdi=gpa)))  # type: ignore[arg-type]
    return reply.status, vp.restart


def _request(p: Partition, **fields: Any) -> int:
    gpa = p.layout.vtl1_base + 0x50000
    p.mem.fill(gpa, abi_ffi.sizeof("struct vtl_restart"))
    r = abi_struct(p.mem, "struct vtl_restart", gpa)
    values = {"entry": 0x800000, "image_start": 0x800000, "image_end": 0x900000, "flags": 0, "param": 7}
    values.update(fields)
    for k, v in values.items():
        setattr(r, k, v)
    name = fields.get("scenario", b"after")
    abi_ffi.memmove(r.scenario, name, len(name))
    return gpa


@pytest.fixture
def partition(guest_images: tuple[Path, Path]) -> Any:
    with Partition(PartitionConfig(vtl0_image=guest_images[0], vtl1_image=guest_images[1])) as p:
        yield p


def test_a_good_request_is_copied(partition: Partition) -> None:
    status, req = _call(partition, _request(partition, flags=ABI.VTL_RESTART_F_TEARDOWN))
    assert status == ABI.VTL_OK
    assert (req.entry, req.teardown, req.param, req.scenario) == (0x800000, True, 7, "after")


@pytest.mark.parametrize(("fields", "want"), [
    ({"flags": 2}, ABI.VTL_E_INVALID_ARG),                                  # unknown flag
    ({"entry": 0x900000}, ABI.VTL_E_INVALID_ARG),                           # entry past the image
    ({"entry": 0x7FF000}, ABI.VTL_E_INVALID_ARG),                           # entry before it
    ({"image_start": 0x1000, "entry": 0x1000}, ABI.VTL_E_INVALID_ARG),       # below VTL0's window
    ({"image_end": ABI.VTL1_BASE + 0x1000}, ABI.VTL_E_INVALID_ARG),          # into VTL1's region
    ({"entry": 1 << 63, "image_end": (1 << 64) - 1}, ABI.VTL_E_INVALID_ARG),  # huge values
    ({"scenario": b"x" * 48}, ABI.VTL_E_INVALID_ARG),                        # not NUL-terminated
])
def test_bad_fields_are_refused_with_nothing_pending(partition: Partition, fields: dict[str, Any],
                                                      want: int) -> None:
    status, req = _call(partition, _request(partition, **fields))
    assert status == want and req is None


def test_the_request_must_be_in_vtl1_memory_and_inside_a_call(partition: Partition) -> None:
    gpa = _request(partition)
    for bad in (0x100000, partition.layout.vtl1_end - 8, partition.layout.mem_size, (1 << 64) - 1):
        status, req = _call(partition, bad)
        assert status == ABI.VTL_E_OUT_OF_RANGE and req is None, hex(bad)
    status, req = _call(partition, gpa, state=RUNNING_VTL0)
    assert status == ABI.VTL_E_INVALID_ARG and req is None


def test_only_the_boot_vp_asks_for_the_restart(guest_images: tuple[Path, Path]) -> None:
    """The next kernel starts on the boot VP (docs/smp.md, "Cross-VP attacks"): an AP's VTL1
    asking is refused, nothing pending."""
    with Partition(PartitionConfig(vtl0_image=guest_images[0], vtl1_image=guest_images[1], nr_vps=2)) as p:
        status, req = _call(p, _request(p), on=1)
        assert status == ABI.VTL_E_INVALID_ARG and req is None
        assert _call(p, _request(p), on=0)[0] == ABI.VTL_OK
