"""VTL0's private registers through KVM: reading them (VTL_HC_GET_VP_REGISTER, the old
value of a register intercept, tools reading a target back) and applying a register
write of a privileged-section instruction (directly, or on VTL1's ALLOW verdict).

A write goes to KVM the way it can be refused: CR0/CR2/CR3/CR4/CR8, GDTR/IDTR and
LDTR/TR with KVM_SET_SREGS (on a copy of the synced sregs, which are then updated, so
the synced view stays the vCPU's state), XCR0 with KVM_SET_XCRS.  A value KVM refuses
(EINVAL) becomes #GP(0) in VTL0 at the instruction, never a VMM error.  Then RIP moves
past the instruction.
"""

from __future__ import annotations

import errno

from vmm import uapi as u
from vmm.errors import KvmIoctlError
from vmm.kvm import VCpu
from vmm.uapi import ffi
from vtl.abi import ABI
from vtl.core.partition import Partition
from vtl.core.privileged import REG_CR2, REG_CR8, RegisterWrite
from vtl.services.vtl0view import Fault, gp

SREGS_SIZE = ffi.sizeof("struct kvm_sregs")
MASK64 = (1 << 64) - 1
TSS_BUSY = 0x02          # type bit 1 of a TSS descriptor: 9 (available) -> 11 (busy)
_SEGMENT_FIELDS = ("base", "limit", "selector", "type", "present", "dpl", "db", "s", "l", "g", "avl",
                   "unusable")


def read_register(vcpu: VCpu, reg: int) -> tuple[int, int] | None:
    """VTL0's `reg` (a VTL_REG_*) as (value, limit): the limit is GDTR/IDTR's, else 0.
    None for a register that cannot be read (CR0_LOW: a kind of write, not a register).
    From the synced state, which is current while the vCPU is not running."""
    r, s = vcpu.regs, vcpu.sregs
    simple = {ABI.VTL_REG_RIP: r.rip, ABI.VTL_REG_RSP: r.rsp, ABI.VTL_REG_RFLAGS: r.rflags,
              ABI.VTL_REG_CR0: s.cr0, ABI.VTL_REG_CR3: s.cr3, ABI.VTL_REG_CR4: s.cr4,
              ABI.VTL_REG_EFER: s.efer, ABI.VTL_REG_LDTR: s.ldt.selector, ABI.VTL_REG_TR: s.tr.selector}
    if reg in simple:
        return int(simple[reg]), 0
    if reg == ABI.VTL_REG_GDTR:
        return int(s.gdt.base), int(s.gdt.limit)
    if reg == ABI.VTL_REG_IDTR:
        return int(s.idt.base), int(s.idt.limit)
    if reg == ABI.VTL_REG_XCR0:
        return read_xcr0(vcpu), 0
    hidden = {ABI.VTL_REG_GDTR_LIMIT: s.gdt.limit, ABI.VTL_REG_IDTR_LIMIT: s.idt.limit,
              ABI.VTL_REG_LDTR_BASE: s.ldt.base, ABI.VTL_REG_LDTR_LIMIT: s.ldt.limit,
              ABI.VTL_REG_TR_BASE: s.tr.base, ABI.VTL_REG_TR_LIMIT: s.tr.limit}
    if reg in hidden:
        return int(hidden[reg]), 0
    return None


def read_xcr0(vcpu: VCpu) -> int:
    """XCR0 (1, x87 only, where KVM has no XCRs to give: a host without XSAVE)."""
    try:
        return vcpu.get_xcrs().get(0, 1)
    except KvmIoctlError:
        return 1


class Registers:
    def __init__(self, partition: Partition) -> None:
        self.p = partition

    def apply(self, vcpu: VCpu, w: RegisterWrite, *, allowed: bool) -> Fault | None:
        """Write `w` into VTL0's vCPU and move RIP past the instruction; or the fault VTL0
        gets instead (nothing written, RIP at the instruction).  `allowed`: VTL1 judged
        and allowed this write (for LTR, that covers setting the busy bit in a GDT page
        VTL0 itself may not write)."""
        reg = w.reg
        if reg == ABI.VTL_REG_XCR0:
            try:
                vcpu.set_xcrs({0: w.new})
            except KvmIoctlError as e:
                return gp(f"KVM refused XCR0 = {w.new:#x} ({errno.errorcode.get(e.errno, e.errno)})")
        else:
            seg = w.segment
            if reg == ABI.VTL_REG_TR and seg is not None and seg.busy_gpa is not None \
                    and not seg.busy_writable and not allowed:
                return gp(f"LTR {w.new:#x}: the TSS descriptor's busy bit is in a GDT page VTL0 may "
                          "not write", refusal=True)
            s = ffi.new("struct kvm_sregs *")
            ffi.memmove(s, ffi.addressof(vcpu.sregs), SREGS_SIZE)
            if reg in (ABI.VTL_REG_CR0, ABI.VTL_REG_CR0_LOW):
                s.cr0 = w.new
            elif reg == ABI.VTL_REG_CR3:
                s.cr3 = w.new
            elif reg == ABI.VTL_REG_CR4:
                s.cr4 = w.new
            elif reg == REG_CR2:
                s.cr2 = w.new
            elif reg == REG_CR8:
                s.cr8 = w.new
            elif reg in (ABI.VTL_REG_GDTR, ABI.VTL_REG_IDTR):
                table = s.gdt if reg == ABI.VTL_REG_GDTR else s.idt
                table.base, table.limit = w.new, w.new_limit
            elif reg in (ABI.VTL_REG_LDTR, ABI.VTL_REG_TR) and seg is not None:
                target = s.ldt if reg == ABI.VTL_REG_LDTR else s.tr
                for name in _SEGMENT_FIELDS:
                    setattr(target, name, getattr(seg, name))
            else:
                raise AssertionError(f"no way to apply {w}")
            try:
                vcpu.set_sregs(s)
            except KvmIoctlError as e:
                return gp(f"KVM refused {w.name} = {w.new:#x} ({errno.errorcode.get(e.errno, e.errno)})")
            ffi.memmove(ffi.addressof(vcpu.sregs), s, SREGS_SIZE)
            if reg == REG_CR8:
                # Without an in-kernel APIC, every KVM_RUN loads CR8 from kvm_run.cr8.
                vcpu.run.cr8 = w.new
            if reg == ABI.VTL_REG_TR and seg is not None and seg.busy_gpa is not None:
                mem = self.p.mem
                mem.write(seg.busy_gpa, bytes([mem.read(seg.busy_gpa, 1)[0] | TSS_BUSY]))
        vcpu.regs.rip = (w.rip + w.length) & MASK64
        vcpu.run.kvm_dirty_regs |= u.KVM_SYNC_X86_REGS
        return None
