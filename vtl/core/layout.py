"""Guest-physical layout of a partition and the boot state of each VTL's kernel.

The numbers come from vtl_abi.h; this module turns them into memory contents
(boot info, the VMM's identity page tables, a boot GDT) and vCPU registers.
Everything a VP boots with (boot info, stack) is per VP.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vmm import x86
from vmm.errors import VmmError
from vmm.kvm import VCpu
from vmm.memory import PAGE_SIZE, GuestMemory
from vtl.abi import ABI, abi_ffi, abi_struct
from vtl.core.vtl import Vtl

# Guest memory: the one range (vtl_abi.h), used by the CLI's --mem, PartitionConfig and
# the Partition.  VTL_MEM_MAX is what both kernels' own page tables and VTL1's per-page
# policy cover; the VMM's boot identity maps (fixed ABI areas: PML4 + PDPT + one PD per
# GiB) must hold at least that much.
MEM_MIN, MEM_MAX, MEM_STEP = ABI.VTL_MEM_MIN, ABI.VTL_MEM_MAX, 2 << 20
MEM_RANGE = f"{MEM_MIN >> 20} to {MEM_MAX >> 20} MiB in steps of {MEM_STEP >> 20} MiB"
_VTL0_TABLES = ABI.VTL0_BOOT_GDT_GPA - ABI.VTL0_BOOT_TABLES_GPA
_VTL1_TABLES = ABI.VTL1_BOOT_GDT_OFF - ABI.VTL1_BOOT_TABLES_OFF
if x86.boot_tables_size(MEM_MAX) > min(_VTL0_TABLES, _VTL1_TABLES):
    raise ImportError(f"vtl_abi.h: VTL_MEM_MAX ({MEM_MAX >> 20} MiB) is more than the boot page "
                      "table areas can identity-map")


class LayoutError(VmmError):
    """A partition configuration the guest-physical layout cannot hold."""


def check_mem_size(mem_size: int) -> None:
    """Refuse a guest memory size outside MEM_RANGE (the message names the range)."""
    if not MEM_MIN <= mem_size <= MEM_MAX or mem_size % MEM_STEP:
        got = f"{mem_size >> 20}" if mem_size % (1 << 20) == 0 else f"{mem_size / (1 << 20):.3f}"
        raise LayoutError(f"guest memory must be {MEM_RANGE} (not {got} MiB)")


@dataclass(frozen=True)
class Layout:
    mem_size: int
    vtl1_base: int = ABI.VTL1_BASE
    vtl1_size: int = ABI.VTL1_SIZE

    @property
    def vtl1_end(self) -> int:
        return self.vtl1_base + self.vtl1_size

    def vtl0_ranges(self) -> list[tuple[int, int]]:
        """(gpa, size) of the memory VTL0's VM maps: everything but VTL1's region."""
        return [(0, self.vtl1_base), (self.vtl1_end, self.mem_size - self.vtl1_end)]

    def in_vtl1(self, gpa: int, length: int = 1) -> bool:
        return gpa < self.vtl1_end and gpa + length > self.vtl1_base

    def in_vtl0(self, gpa: int, length: int = 1) -> bool:
        """[gpa, gpa+length) lies entirely in memory VTL0 may use."""
        return 0 <= gpa and length >= 0 and gpa + length <= self.mem_size and not self.in_vtl1(gpa, length)

    def in_memory(self, gpa: int, length: int = 1) -> bool:
        return 0 <= gpa and length >= 0 and gpa + length <= self.mem_size

    # Per-VTL, per-VP addresses
    def boot_info_gpa(self, vtl: Vtl, vp: int) -> int:
        base = ABI.VTL0_BOOT_INFO_GPA if vtl == Vtl.VTL0 else self.vtl1_base + ABI.VTL1_BOOT_INFO_OFF
        return base + vp * ABI.VTL_BOOT_INFO_STRIDE

    def boot_stack_top(self, vtl: Vtl, vp: int) -> int:
        base = ABI.VTL0_BOOT_STACKS_GPA if vtl == Vtl.VTL0 else self.vtl1_base + ABI.VTL1_BOOT_STACKS_OFF
        return base + (vp + 1) * PAGE_SIZE

    def boot_tables_gpa(self, vtl: Vtl) -> int:
        return ABI.VTL0_BOOT_TABLES_GPA if vtl == Vtl.VTL0 else self.vtl1_base + ABI.VTL1_BOOT_TABLES_OFF

    def boot_gdt_gpa(self, vtl: Vtl) -> int:
        return ABI.VTL0_BOOT_GDT_GPA if vtl == Vtl.VTL0 else self.vtl1_base + ABI.VTL1_BOOT_GDT_OFF

    def image_window(self, vtl: Vtl) -> tuple[int, int]:
        if vtl == Vtl.VTL0:
            return ABI.VTL0_IMAGE_MIN, self.vtl1_base
        return self.vtl1_base + ABI.VTL1_IMAGE_MIN_OFF, self.vtl1_end

    @property
    def trust_gpa(self) -> int:
        return self.vtl1_base + ABI.VTL1_TRUST_OFF

    def control_gpa(self, vp: int) -> int:
        return self.vtl1_base + ABI.VTL1_CONTROL_OFF + vp * PAGE_SIZE


def validate(mem_size: int, nr_vps: int) -> None:
    """Refuse a configuration the fixed ABI areas cannot hold (with the reason)."""
    check_mem_size(mem_size)
    if not 1 <= nr_vps <= ABI.VTL1_MAX_VPS:
        raise LayoutError(f"{nr_vps} VPs: a partition has 1 to {ABI.VTL1_MAX_VPS}")


def write_boot_info(mem: GuestMemory, layout: Layout, vtl: Vtl, *, vp: int, nr_vps: int,
                    image_start: int, image_end: int, flags: int = 0, param: int = 0,
                    scenario: str = "", measurement: bytes = b"", trust_count: int = 0,
                    kexec_policy: int = 0, staged: tuple[int, int] = (0, 0), boot_count: int = 0) -> int:
    """Fill VP `vp`'s struct vtl_boot_info for `vtl`; returns its GPA."""
    gpa = layout.boot_info_gpa(vtl, vp)
    size = abi_ffi.sizeof("struct vtl_boot_info")
    mem.fill(gpa, size)
    bi = abi_struct(mem, "struct vtl_boot_info", gpa)
    bi.magic = ABI.VTL_BOOT_MAGIC
    bi.abi_version = ABI.VTL_ABI_VERSION
    bi.vtl, bi.vp_index, bi.nr_vps = int(vtl), vp, nr_vps
    bi.mem_size = layout.mem_size
    bi.vtl1_base, bi.vtl1_size = layout.vtl1_base, layout.vtl1_size
    bi.image_start, bi.image_end = image_start, image_end
    lo, hi = layout.image_window(vtl)
    bi.free_start = max(image_end, lo)
    bi.free_end = hi if vtl == Vtl.VTL1 else layout.vtl1_base
    bi.control_gpa = layout.control_gpa(0) if vtl == Vtl.VTL1 else 0
    bi.flags, bi.param = flags, param
    name = scenario.encode()
    if len(name) >= 48:
        raise LayoutError(f"scenario name {scenario!r} is longer than 47 bytes")
    abi_ffi.memmove(bi.scenario, name, len(name))
    abi_ffi.memmove(bi.measurement, measurement[:32], len(measurement[:32]))
    if vtl == Vtl.VTL1:
        bi.trust_gpa = layout.trust_gpa if trust_count else 0
        bi.trust_count, bi.kexec_policy = trust_count, kexec_policy
    else:
        bi.staged_gpa, bi.staged_size = staged
        bi.boot_count = boot_count
    return gpa


def write_trust_list(mem: GuestMemory, layout: Layout, digests: list[bytes]) -> None:
    """VTL1's allowlist, in its region (boot_info.trust_gpa)."""
    if len(digests) > ABI.VTL_TRUST_MAX or any(len(d) != 32 for d in digests):
        raise LayoutError(f"VTL1's allowlist takes at most {ABI.VTL_TRUST_MAX} digests of 32 bytes")
    mem.write(layout.trust_gpa, b"".join(digests))


def staged_gpa(layout: Layout, size: int) -> int:
    """Where a staged file goes: the top of VTL0's memory, 2 MiB aligned, above VTL1's
    region (so neither kernel's image window holds it)."""
    gpa = (layout.mem_size - size) & ~((2 << 20) - 1)
    if size <= 0 or gpa < layout.vtl1_end:
        raise LayoutError(f"a staged file of {size} bytes does not fit between VTL1's region and "
                          f"the end of the {layout.mem_size >> 20} MiB of guest memory")
    return gpa


def write_boot_tables(mem: GuestMemory, layout: Layout, vtl: Vtl) -> int:
    """The VMM's identity map and boot GDT for `vtl` (shared by its VPs); returns CR3."""
    cr3 = x86.write_identity_tables(mem, layout.boot_tables_gpa(vtl), layout.mem_size)
    x86.write_boot_gdt(mem, layout.boot_gdt_gpa(vtl))
    return cr3


def boot_vcpu(vcpu: VCpu, layout: Layout, vtl: Vtl, vp: int, cr3: int, entry: int) -> None:
    """Put `vcpu` in the documented boot state: long mode, identity map, RDI = boot info."""
    sregs = vcpu.get_sregs()
    x86.set_long_mode(sregs, cr3, layout.boot_gdt_gpa(vtl))
    vcpu.set_sregs(sregs)
    regs = vcpu.get_regs()
    _boot_regs(regs, layout, vtl, vp, entry)
    vcpu.set_regs(regs)


def _boot_regs(regs: Any, layout: Layout, vtl: Vtl, vp: int, entry: int) -> None:
    """struct kvm_regs at a kernel's entry: RDI = boot info, RSP = boot stack, the rest 0."""
    for name in ("rax", "rbx", "rcx", "rdx", "rsi", "rbp", "r8", "r9", "r10", "r11",
                 "r12", "r13", "r14", "r15"):
        setattr(regs, name, 0)
    regs.rip = entry
    regs.rdi = layout.boot_info_gpa(vtl, vp)
    regs.rsp = layout.boot_stack_top(vtl, vp)
    regs.rflags = x86.RFLAGS_RESERVED1


def restart_vcpu(vcpu: VCpu, layout: Layout, vtl: Vtl, vp: int, cr3: int, entry: int) -> None:
    """Start a vCPU that has run at a new kernel's `entry` (a kexec): from its reset state
    (`vcpu.reset_state`, captured when KVM created it: every register, debug register, FPU/XSAVE byte,
    MSR and pending event as KVM defines them at RESET; the TSC runs on), then the kernel
    entry contract (long mode, identity map, boot GDT, RDI = boot info, RSP = boot stack),
    carrying only CR0, CR4, EFER and XCR0 from the old kernel (the CPU configuration the
    pins protect).  docs/lifecycle.md lists the state ("The vCPU at the new entry")."""
    s = vcpu.sregs
    cr0, cr4, efer = int(s.cr0), int(s.cr4), int(s.efer)
    xcr0 = vcpu.get_xcrs().get(0, 1)
    if vcpu.reset_state is None:
        raise VmmError("a vCPU without its reset state cannot be restarted")
    vcpu.load_reset_state(vcpu.reset_state, xcr0=xcr0)
    x86.set_long_mode(s, cr3, layout.boot_gdt_gpa(vtl))
    s.cr0, s.cr4, s.efer = cr0, cr4, efer
    _boot_regs(vcpu.regs, layout, vtl, vp, entry)


def start_vcpu(vcpu: VCpu, layout: Layout, vtl: Vtl, *, cr3: int, rip: int, rsp: int, arg: int) -> None:
    """An AP's first instruction (VTL_HC_START_VP): from the vCPU's reset state, long mode
    on `cr3` with the boot GDT, RIP = `rip`, RSP = `rsp`, RDI = `arg`, the other GPRs 0."""
    if vcpu.reset_state is None:
        raise VmmError("a vCPU without its reset state cannot be started")
    vcpu.load_reset_state(vcpu.reset_state)
    s = vcpu.sregs
    x86.set_long_mode(s, cr3, layout.boot_gdt_gpa(vtl))
    regs = vcpu.regs
    _boot_regs(regs, layout, vtl, 0, rip)
    regs.rsp, regs.rdi = rsp, arg
