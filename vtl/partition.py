"""A partition: one KVM VM per enabled VTL over one shared guest memory.

VTL0's VM maps every page except VTL1's region, from the start; VTL1's VM is
created by the guest-initiated enable flow (VTL_HC_ENABLE_VTL1) and maps all
memory.  A VirtualProcessor holds one vCPU per enabled VTL; the scheduler
(vtl/scheduler.py) decides which of them runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from vmm import uapi as u
from vmm.elf import ElfImage, load_image, read_image
from vmm.errors import VmmError
from vmm.kvm import Kvm, VCpu, Vm
from vmm.memory import GuestMemory
from vmm.x86 import PINNED_MSRS
from vtl.abi import ABI, abi_struct
from vtl.events import EventLog, VtlEnabled
from vtl.layout import Layout, boot_vcpu, validate_mem_size, write_boot_info
from vtl.protection import Vtl0Protection


class PartitionConfig(BaseModel):
    vtl0_image: Path
    vtl1_image: Path | None = None          # None: VTL1 cannot be enabled
    mem_size: int = Field(default=256 << 20, description="guest memory in bytes")
    nr_vps: int = Field(default=1, ge=1, le=1)  # APs are not started yet
    scenario: str = ""
    param: int = Field(default=0, ge=0)
    attr_backend: Literal["memslot", "rwx"] | None = None   # None: probe the host


@dataclass(slots=True)
class SwitchPath:
    """Everything a VTL switch touches, resolved once (cffi attribute hops are not free)."""
    v0: VCpu
    v1: VCpu
    ctl: Any                      # struct vtl_control * in VTL1's memory
    # Byte pointers into each vCPU's synced kvm_regs for the shared-state copy:
    # [rax..rdi] at offset 0 (48 bytes) and [rbp..r15] at 56 (72 bytes); RSP at 48 is private.
    lo0: Any
    hi0: Any
    lo1: Any
    hi1: Any
    # uint64_t views of kvm_dirty_regs and of the synced CR2 of each vCPU
    dirty0: Any
    dirty1: Any
    cr2_0: Any
    cr2_1: Any
    # The entry reason VTL1 was last given.  Kept here, not read back from
    # vtl_control, which VTL1 may scribble on.
    reason: int = ABI.VTL_ENTRY_NONE

    @classmethod
    def build(cls, v0: VCpu, v1: VCpu, ctl: Any) -> SwitchPath:
        ffi = u.ffi

        def ptrs(v: VCpu) -> tuple[Any, Any, Any, Any]:
            base = ffi.cast("uint8_t *", ffi.addressof(v.run.s.regs, "regs"))
            return (base, base + 56, ffi.cast("uint64_t *", ffi.addressof(v.run, "kvm_dirty_regs")),
                    ffi.cast("uint64_t *", ffi.addressof(v.sregs, "cr2")))
        lo0, hi0, d0, c0 = ptrs(v0)
        lo1, hi1, d1, c1 = ptrs(v1)
        return cls(v0, v1, ctl, lo0, hi0, lo1, hi1, d0, d1, c0, c1)


@dataclass(slots=True)
class VirtualProcessor:
    index: int
    current: VCpu                                  # the vCPU that runs next
    vcpus: dict[int, VCpu] = field(default_factory=dict)
    active_vtl: int = 0
    switch: SwitchPath | None = None               # set when VTL1 is enabled

    @property
    def control(self) -> Any:
        return self.switch.ctl if self.switch else None

    def activate(self, vtl: int) -> None:
        self.active_vtl = vtl
        self.current = self.vcpus[vtl]


class Partition:
    def __init__(self, config: PartitionConfig, events: EventLog | None = None) -> None:
        validate_mem_size(config.mem_size)
        self.config = config
        self.layout = Layout(config.mem_size)
        self.events = events or EventLog()
        # Parse both images before touching KVM: a bad image is a clear error, not a half-built VM.
        self.vtl0_image: ElfImage = read_image(config.vtl0_image)
        self.vtl1_image: ElfImage | None = read_image(config.vtl1_image) if config.vtl1_image else None
        self.kvm = Kvm()
        self.mem = GuestMemory(config.mem_size)
        self.vms: dict[int, Vm] = {}
        self.vps: list[VirtualProcessor] = []
        self.vtl1_measurement: str | None = None
        self._closed = False
        try:
            self._build_vtl0()
        except BaseException:
            self.close()
            raise

    # --- construction ------------------------------------------------------------
    def _new_vm(self, vtl: int, ranges: list[tuple[int, int]]) -> Vm:
        vm = self.kvm.create_vm()
        for gpa, size in ranges:
            if size > 0:
                vm.map_memory(self.mem, gpa, size)
        self.vms[vtl] = vm
        return vm

    def _new_vcpu(self, vm: Vm, index: int) -> VCpu:
        vcpu = vm.create_vcpu(index)
        vcpu.set_cpuid(self.kvm.supported_cpuid())
        return vcpu

    def _build_vtl0(self) -> None:
        img = self.vtl0_image
        lo, hi = self.layout.image_window(0)
        load_image(img, self.mem, lo, hi)
        vm = self._new_vm(0, [])
        # VTL0's memory is mapped through the attribute backend VTL1 will steer.
        self.protection = Vtl0Protection(vm, self.mem, self.layout, self.config.attr_backend)
        # Writes to the pinned MSRs exit to the VMM, which asks VTL1 once it exists.
        vm.enable_cap(u.KVM_CAP_X86_USER_SPACE_MSR, u.KVM_MSR_EXIT_REASON_FILTER)
        self._msr_filter = vm.set_msr_filter(deny_write=list(PINNED_MSRS))
        flags = ABI.VTL_BOOT_F_VTL1_AVAILABLE if self.vtl1_image else 0
        for i in range(self.config.nr_vps):
            write_boot_info(self.mem, self.layout, 0, vp=i, nr_vps=self.config.nr_vps,
                            image_start=img.start, image_end=img.end, flags=flags,
                            param=self.config.param, scenario=self.config.scenario)
            vcpu = self._new_vcpu(vm, i)
            boot_vcpu(vcpu, self.mem, self.layout, 0, img.entry)
            self.vps.append(VirtualProcessor(i, vcpu, {0: vcpu}))

    @property
    def vtl1_enabled(self) -> bool:
        return 1 in self.vms

    def enable_vtl1(self, vp: VirtualProcessor) -> int:
        """The enable flow: create VTL1's VM and vCPUs, load and measure the image, and
        make VTL1 the VP's active VTL with entry reason NONE.  Returns a VTL_* status."""
        if self.vtl1_image is None:
            return int(ABI.VTL_E_DISABLED)
        if self.vtl1_enabled:
            return int(ABI.VTL_E_ALREADY_ENABLED)
        img = self.vtl1_image
        lo, hi = self.layout.image_window(1)
        self.mem.fill(self.layout.vtl1_base, self.layout.vtl1_size)
        load_image(img, self.mem, lo, hi)
        self.vtl1_measurement = img.sha256
        vm = self._new_vm(1, [(0, self.layout.mem_size)])
        for p in self.vps:
            write_boot_info(self.mem, self.layout, 1, vp=p.index, nr_vps=len(self.vps),
                            image_start=img.start, image_end=img.end,
                            measurement=bytes.fromhex(img.sha256))
            vcpu = self._new_vcpu(vm, p.index)
            boot_vcpu(vcpu, self.mem, self.layout, 1, img.entry)
            p.vcpus[1] = vcpu
            ctl = abi_struct(self.mem, "struct vtl_control", self.layout.control_gpa(p.index))
            ctl.entry_reason = ABI.VTL_ENTRY_NONE
            ctl.vp_index = p.index
            p.switch = SwitchPath.build(p.vcpus[0], vcpu, ctl)
        vp.activate(1)
        self.events.emit(VtlEnabled(ts=self.events.now(), vp=vp.index, vtl=0,
                                    image=str(img.path), sha256=img.sha256))
        return int(ABI.VTL_OK)

    def memslot_count(self) -> dict[int, int]:
        return {vtl: len(vm.slots) for vtl, vm in self.vms.items()}

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for vm in self.vms.values():
            vm.close()
        self.vms.clear()
        if hasattr(self, "mem"):
            self.mem.close()
        if hasattr(self, "kvm"):
            self.kvm.close()

    def __enter__(self) -> Partition:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class PartitionError(VmmError):
    pass
