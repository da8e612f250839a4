"""Emulated RESET of the whole partition (VTL_HC_RESET, a VTL0 triple fault with
--reset-on-triple-fault, or `reset` on the control socket).

All guest-owned policy ends with the guest: VTL1 is torn down (its memory zeroed before
VTL0 can see it), every protection and pin is cleared, and VTL0's VM is built again
from its image, so KVM's vCPU state (registers, MSRs, pending events) is the reset
state, not a reconstruction of it.  Guest memory outside the image is left as it was,
as a reset leaves RAM."""

from __future__ import annotations

from vtl.core.partition import Partition
from vtl.core.vtl import Vtl
from vtl.lifecycle.teardown import teardown_vtl1


def reset_partition(p: Partition) -> None:
    teardown_vtl1(p)
    p.close_vm(Vtl.VTL0)
    p.boot_count += 1
    p.build_vtl0()
