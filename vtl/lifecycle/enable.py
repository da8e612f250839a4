"""The guest-initiated enable flow (VTL_HC_ENABLE_VTL1, design §4).

VTL0 asks; the VMM clears VTL1's region, loads and measures the VTL1 image,
creates VTL1's VM (which maps all memory) with one vCPU per VP, and hands each VP
its vtl_control page.  VTL1's region was never mapped in VTL0's VM.  The VP that
asked then runs VTL1 with entry reason NONE (the scheduler's transition)."""

from __future__ import annotations

from vmm.elf import load_image
from vmm.measure import loaded_image_sha256
from vtl.abi import ABI, abi_struct
from vtl.core import layout as lay
from vtl.core.events import VtlEnabled
from vtl.core.partition import Partition
from vtl.core.vp import VirtualProcessor
from vtl.core.vtl import Vtl

KEXEC_POLICIES = {"teardown": ABI.VTL_KEXEC_POLICY_TEARDOWN, "persist": ABI.VTL_KEXEC_POLICY_PERSIST,
                  "deny": ABI.VTL_KEXEC_POLICY_DENY}


def enable_vtl1(p: Partition, asking: VirtualProcessor) -> None:
    """Build VTL1.  The caller has checked that an image is configured and VTL1 is off."""
    img = p.vtl1_image
    assert img is not None and not p.vtl1_enabled
    layout = p.layout
    p.mem.fill(layout.vtl1_base, layout.vtl1_size)
    load_image(img, p.mem, *layout.image_window(Vtl.VTL1))
    # What is loaded (entry, each PT_LOAD's placement, flags and bytes; docs/abi.md), not the file.
    p.vtl1_measurement = loaded_image_sha256(img)
    vm = p.new_vm(Vtl.VTL1)
    vm.map_memory(p.mem, 0, layout.mem_size)
    cr3 = lay.write_boot_tables(p.mem, layout, Vtl.VTL1)
    # VTL1's boot data: its allowlist and kexec policy, as provisioned at launch.
    lay.write_trust_list(p.mem, layout, p.config.trust)
    policy = KEXEC_POLICIES[p.config.kexec_policy]
    for vp in p.vps:
        lay.write_boot_info(p.mem, layout, Vtl.VTL1, vp=vp.index, nr_vps=len(p.vps),
                            image_start=img.start, image_end=img.end,
                            measurement=bytes.fromhex(p.vtl1_measurement),
                            trust_count=len(p.config.trust), kexec_policy=policy)
        vcpu = p.new_vcpu(vm, vp.index)
        lay.boot_vcpu(vcpu, layout, Vtl.VTL1, vp.index, cr3, img.entry)
        ctl = abi_struct(p.mem, "struct vtl_control", layout.control_gpa(vp.index))
        ctl.entry_reason = ABI.VTL_ENTRY_NONE
        ctl.vp_index = vp.index
        vp.ctl = ctl
        vp.add_vcpu(Vtl.VTL1, vcpu)
    p.events.emit(VtlEnabled(ts=p.events.now(), vp=asking.index, vtl=0, image=str(img.path),
                             sha256=p.vtl1_measurement, trust=[d.hex() for d in p.config.trust],
                             kexec_policy=p.config.kexec_policy))
