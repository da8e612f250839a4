"""A partition: one KVM VM per enabled VTL over one shared guest memory.

VTL0's VM maps every page except VTL1's region, from the start, through the
attribute backend VTL1 steers (vmm/memattr.py); VTL1's VM is created by the enable
flow (vtl/lifecycle/enable.py) and maps all memory.  Each VirtualProcessor holds one
vCPU per enabled VTL; the scheduler (vtl/run/scheduler.py) decides which of them runs.
"""

from __future__ import annotations

import threading
from dataclasses import replace
from pathlib import Path

from vmm import uapi as u
from vmm.backends import make_backend
from vmm.elf import ElfImage, check_window, load_image, read_image
from vmm.errors import GuestImageError
from vmm.files import read_input
from vmm.kvm import Kvm, VCpu, Vm
from vmm.memory import PAGE_SIZE, GuestMemory
from vmm.regcheck import CpuFeatures, cpuid_entries, probe_cr4_accepted
from vmm.x86 import PINNED_MSRS
from vtl.abi import ABI
from vtl.core import layout as lay
from vtl.core.config import PartitionConfig
from vtl.core.events import EventLog
from vtl.core.privileged import InterceptControl, InterceptControls
from vtl.core.vp import OFFLINE, RUNNING_VTL0, VirtualProcessor
from vtl.core.vtl import Vtl, VtlArray


class Partition:
    def __init__(self, config: PartitionConfig, events: EventLog | None = None, *, boot: bool = True) -> None:
        """`boot`: VTL0 boots from its image (the default).  False: the VMs and vCPUs are
        created but nothing is written to memory or vCPUs, for a restore to fill them
        (vtl/lifecycle/snapshot.py)."""
        lay.validate(config.mem_size, config.nr_vps)
        self.config = config
        self.layout = lay.Layout(config.mem_size)
        self.events = events or EventLog()
        # Parse and place both images before touching KVM: a bad image is a clear error
        # now, not a half-built VM (or a failure at VTL1's enable, deep in a run).
        self.vtl0_image: ElfImage = read_image(config.vtl0_image)
        check_window(self.vtl0_image, *self.layout.image_window(Vtl.VTL0))
        self.vtl1_image: ElfImage | None = None
        if config.vtl1_image is not None:
            self.vtl1_image = read_image(config.vtl1_image)
            check_window(self.vtl1_image, *self.layout.image_window(Vtl.VTL1))
        self.staged = self._stage(config.staged)
        self.kvm = Kvm()
        # What every vCPU's CPUID (the supported one, see new_vcpu) allows in CR4, CR3, XCR0.
        # Widened at VP0's first vCPU by what KVM really accepts in CR4 (new_vcpu).
        self.cpu_features = CpuFeatures.from_cpuid(cpuid_entries(self.kvm.supported_cpuid()))
        self._cr4_probed = False
        self.mem = GuestMemory(config.mem_size)
        self.vms: VtlArray[Vm | None] = VtlArray(lambda _: None)
        # VP0 boots; the APs wait offline until VTL0 starts them (VTL_HC_START_VP).
        self.vps = [VirtualProcessor(i, state=RUNNING_VTL0 if i == 0 else OFFLINE, starts=int(i == 0))
                    for i in range(config.nr_vps)]
        self.vtl1_measurement: str | None = None
        # VTL0's attributes as VTL1 set them, one byte per page (NR/NW/NX bits).
        self.vtl0_attrs = bytearray(config.mem_size // PAGE_SIZE)
        # Held while the backend and vtl0_attrs change (VPs' VTL1s may protect at once).
        self.attr_lock = threading.RLock()
        # Which register writes of VTL0 VTL1 judges (per VP) and VTL0's privileged section
        # (per partition): VTL_HC_SET_INTERCEPT_CONTROL (vtl/core/privileged.py).
        self.intercept_controls = InterceptControls(config.nr_vps)
        # [start, end) of the VTL0 kernel running now (its image; after a kexec, the new one's).
        self.kernel_range = (0, 0)
        # Boots of VTL0 before the current one (resets and kexecs; boot_info.boot_count).
        self.boot_count = 0
        self._closed = False
        try:
            self.build_vtl0(boot=boot)
        except BaseException:
            self.close()
            raise

    # --- construction ------------------------------------------------------------
    def new_vm(self, vtl: Vtl) -> Vm:
        vm = self.kvm.create_vm()
        self.vms[vtl] = vm
        return vm

    def new_vcpu(self, vm: Vm, index: int) -> VCpu:
        """A vCPU with the supported CPUID; its reset state is kept (`reset_state`) so that
        a kexec can start the next kernel from it (`VCpu.reset_state`; layout.restart_vcpu)."""
        vcpu = vm.create_vcpu(index)
        vcpu.set_cpuid(self.kvm.supported_cpuid())
        if not self._cr4_probed:
            accepted = probe_cr4_accepted(vcpu)
            self.cpu_features = replace(self.cpu_features,
                                        cr4_allowed=self.cpu_features.cr4_allowed | accepted)
            self._cr4_probed = True
        vcpu.reset_state = vcpu.capture_reset_state()
        return vcpu

    def _stage(self, path: Path | None) -> tuple[int, bytes]:
        """Read the file to stage in VTL0's memory now: a bad path is a clear error
        before any VM exists.  Written at every VTL0 boot (build_vtl0)."""
        if path is None:
            return 0, b""
        data = read_input(path, "--stage", self.layout.mem_size, GuestImageError)
        return lay.staged_gpa(self.layout, len(data)), data

    def build_vtl0(self, boot: bool = True) -> None:
        """VTL0's VM, vCPUs and boot state from its image (at creation and at a RESET);
        without `boot`, the VM and its vCPUs only (a restore loads memory and state)."""
        img = self.vtl0_image
        self.kernel_range = (img.start, img.end)
        staged_gpa, staged = self.staged
        if boot:
            load_image(img, self.mem, *self.layout.image_window(Vtl.VTL0))
            if staged:
                self.mem.write(staged_gpa, staged)
        vm = self.new_vm(Vtl.VTL0)
        # VTL0's memory is mapped through the attribute backend VTL1 will steer.
        self.backend = make_backend(self.config.attr_backend, vm, self.mem, self.layout.vtl0_ranges())
        # Writes to the pinned MSRs exit to the VMM, which asks VTL1 once it exists.
        vm.enable_cap(u.KVM_CAP_X86_USER_SPACE_MSR, u.KVM_MSR_EXIT_REASON_FILTER)
        self._msr_filter = vm.set_msr_filter(deny_write=list(PINNED_MSRS))
        if not boot:
            for vp in self.vps:
                vp.add_vcpu(Vtl.VTL0, self.new_vcpu(vm, vp.index))
            return
        flags = self.boot_flags()
        cr3 = lay.write_boot_tables(self.mem, self.layout, Vtl.VTL0)
        for vp in self.vps:
            lay.write_boot_info(self.mem, self.layout, Vtl.VTL0, vp=vp.index, nr_vps=len(self.vps),
                                image_start=img.start, image_end=img.end, flags=flags,
                                param=self.config.param, scenario=self.config.scenario,
                                staged=(staged_gpa, len(staged)), boot_count=self.boot_count)
            vcpu = self.new_vcpu(vm, vp.index)
            lay.boot_vcpu(vcpu, self.layout, Vtl.VTL0, vp.index, cr3, img.entry)
            vp.add_vcpu(Vtl.VTL0, vcpu)

    def boot_flags(self) -> int:
        """boot_info.flags for a VTL0 kernel starting now (at boot, or after a kexec): what
        it finds, a VTL1 it may enable or the one that persisted, and the interface it
        hardens itself through (Heki mode)."""
        flags = (ABI.VTL_BOOT_F_VTL1_PERSISTS if self.vtl1_enabled else
                 ABI.VTL_BOOT_F_VTL1_AVAILABLE if self.vtl1_image is not None else 0)
        if self.config.mode == "heki":
            flags |= ABI.VTL_BOOT_F_HEKI
        return flags

    # --- views ----------------------------------------------------------------------
    @property
    def vtl1_enabled(self) -> bool:
        return self.vms[Vtl.VTL1] is not None

    @property
    def intercept_control(self) -> InterceptControl | None:
        """The partition's register intercept control as tools show it (the section, and what
        the boot VP's VTL1 judges); None until VTL1 sets one.  Per VP: `intercept_controls`."""
        return self.intercept_controls.view()

    @intercept_control.setter
    def intercept_control(self, ctl: InterceptControl | None) -> None:
        """The same control on every VP (Heki mode's VM-wide pins), or none (VTL1's end)."""
        self.intercept_controls.set_all(ctl)

    @property
    def backend_name(self) -> str:
        return self.backend.name

    def vtl0_attr(self, gpa: int) -> int:
        """The attributes VTL1 set on VTL0's page at `gpa` (0 outside memory)."""
        return self.vtl0_attrs[gpa // PAGE_SIZE] if 0 <= gpa < self.layout.mem_size else 0

    def vtl0_runs(self) -> list[tuple[int, int, int]]:
        """(start, end, attrs) runs of the whole guest-physical space, VTL1's region as
        attrs -1 (never mapped in VTL0's VM)."""
        out: list[tuple[int, int, int]] = []
        lo, hi = self.layout.vtl1_base // PAGE_SIZE, self.layout.vtl1_end // PAGE_SIZE
        # A copy (one step under the GIL): the control socket asks while the run changes them.
        attrs = bytes(self.vtl0_attrs)
        n = len(attrs)
        i = 0
        while i < n:
            val = -1 if lo <= i < hi else attrs[i]
            j = i + 1
            while j < n and (-1 if lo <= j < hi else attrs[j]) == val:
                j += 1
            out.append((i * PAGE_SIZE, j * PAGE_SIZE, val))
            i = j
        return out

    def close_vm(self, vtl: Vtl) -> None:
        """Destroy `vtl`'s VM and vCPUs (teardown, reset); memory stays."""
        vm = self.vms[vtl]
        if vm is None:
            return
        if vtl == Vtl.VTL0:
            close = getattr(self.backend, "close", None)   # host_mapping gives its alias back
            if close is not None:
                close()
        for vp in self.vps:
            vp.remove_vcpu(vtl)
        vm.close()
        self.vms[vtl] = None

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for vm in self.vms:
            if vm is not None:
                vm.close()
        if hasattr(self, "mem"):
            self.mem.close()
        if hasattr(self, "kvm"):
            self.kvm.close()

    def __enter__(self) -> Partition:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
