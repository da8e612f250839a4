"""VTL0 restarts at a new kernel's entry (VTL_HC_VTL0_RESTART, the end of a kexec).

VTL1 asked for it while serving VTL0's KEXEC_JUMP and has already protected what it
wants protected (persist); with the teardown flag VTL1 ends first.  VTL0's vCPU starts
from its reset state with the boot state at the new entry and CR0/CR4/EFER/XCR0 carried
over (docs/lifecycle.md, "The vCPU at the new entry"), and a boot info that names the new
kernel's image, its scenario and parameter, and boot_count + 1."""

from __future__ import annotations

from vtl.core import layout as lay
from vtl.core.partition import Partition
from vtl.core.vp import RestartRequest
from vtl.core.vtl import Vtl
from vtl.lifecycle.teardown import teardown_vtl1


def restart_vtl0(p: Partition, req: RestartRequest) -> None:
    if req.teardown:
        teardown_vtl1(p)
    p.boot_count += 1
    p.kernel_range = (req.image_start, req.image_end)
    layout = p.layout
    cr3 = lay.write_boot_tables(p.mem, layout, Vtl.VTL0)
    flags = p.boot_flags()
    staged_gpa, staged = p.staged
    for vp in p.vps:
        lay.write_boot_info(p.mem, layout, Vtl.VTL0, vp=vp.index, nr_vps=len(p.vps),
                            image_start=req.image_start, image_end=req.image_end, flags=flags,
                            param=req.param, scenario=req.scenario, staged=(staged_gpa, len(staged)),
                            boot_count=p.boot_count)
        vcpu = vp.vcpus[Vtl.VTL0]
        assert vcpu is not None
        lay.restart_vcpu(vcpu, layout, Vtl.VTL0, vp.index, cr3, req.entry)
