"""VTL1's end (kexec teardown, RESET): all guest-owned policy ends with it.

VTL1's VM and vCPUs are destroyed, every VTL0 protection is removed (VTL0's memory
back to RWX through the attribute backend), the register intercept control is gone
(so the privileged section is ordinary code again) and VTL1's region is zeroed before
VTL0 can see it, as the TLFS's ZeroMemoryOnReset.  The pinned MSRs stay filtered in
VTL0's VM; with no VTL1 the VMM applies those writes (vtl/services/intercepts.py)."""

from __future__ import annotations

from vtl.core.partition import Partition
from vtl.core.vtl import Vtl


def clear_vtl0_protections(p: Partition) -> None:
    for gpa, size in p.layout.vtl0_ranges():
        if size > 0:
            p.backend.set_range(gpa, size, 0)
    p.vtl0_attrs[:] = bytes(len(p.vtl0_attrs))
    p.intercept_control = None


def teardown_vtl1(p: Partition) -> None:
    """End VTL1 and everything it set; a no-op for VTL0 when VTL1 never existed."""
    p.close_vm(Vtl.VTL1)
    p.vtl1_measurement = None
    clear_vtl0_protections(p)
    p.mem.fill(p.layout.vtl1_base, p.layout.vtl1_size)
