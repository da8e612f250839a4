"""Register intercepts as data: what VTL1 judges (`InterceptControl`, set by
VTL_HC_SET_INTERCEPT_CONTROL and kept on the Partition) and one decoded register write
of a VTL0 instruction in the privileged section (`RegisterWrite`), checked and ready to
apply or to hand to VTL1 (design §6)."""

from __future__ import annotations

from dataclasses import dataclass

from vmm.memory import PAGE_SIZE
from vtl.abi import ABI

# vtl_intercept.reg and its VTL_ICTL_* flag; CR0_LOW (LMSW, CLTS) is judged as CR0.
REG_FLAGS = {ABI.VTL_REG_CR0: ABI.VTL_ICTL_CR0, ABI.VTL_REG_CR0_LOW: ABI.VTL_ICTL_CR0,
             ABI.VTL_REG_CR3: ABI.VTL_ICTL_CR3, ABI.VTL_REG_CR4: ABI.VTL_ICTL_CR4,
             ABI.VTL_REG_XCR0: ABI.VTL_ICTL_XCR0, ABI.VTL_REG_GDTR: ABI.VTL_ICTL_GDTR,
             ABI.VTL_REG_IDTR: ABI.VTL_ICTL_IDTR, ABI.VTL_REG_LDTR: ABI.VTL_ICTL_LDTR,
             ABI.VTL_REG_TR: ABI.VTL_ICTL_TR}
REG_NAMES = {ABI.VTL_REG_CR0: "cr0", ABI.VTL_REG_CR0_LOW: "cr0_low", ABI.VTL_REG_CR3: "cr3",
             ABI.VTL_REG_CR4: "cr4", ABI.VTL_REG_XCR0: "xcr0", ABI.VTL_REG_GDTR: "gdtr",
             ABI.VTL_REG_IDTR: "idtr", ABI.VTL_REG_LDTR: "ldtr", ABI.VTL_REG_TR: "tr"}
REG_CR2, REG_CR8 = -2, -8      # written by the privileged section, never judged by VTL1


@dataclass(frozen=True, slots=True)
class InterceptControl:
    """VTL1's struct vtl_intercept_control, validated and copied (VTL1 may change its own
    copy afterwards; only a new hypercall changes this one)."""
    flags: int
    cr0_mask: int
    cr4_mask: int
    priv_gpa: int
    priv_pages: int

    @property
    def priv_end(self) -> int:
        return self.priv_gpa + self.priv_pages * PAGE_SIZE

    def in_section(self, gpa: int) -> bool:
        return self.priv_gpa <= gpa < self.priv_end

    def judges(self, reg: int, old: int, new: int) -> bool:
        """Does VTL1 judge this write?  CR0/CR4: only a change of a masked bit."""
        flag = REG_FLAGS.get(reg, 0)
        if not self.flags & flag:
            return False
        if reg in (ABI.VTL_REG_CR0, ABI.VTL_REG_CR0_LOW):
            return bool((old ^ new) & self.cr0_mask)
        if reg == ABI.VTL_REG_CR4:
            return bool((old ^ new) & self.cr4_mask)
        return True


@dataclass(frozen=True, slots=True)
class SegmentLoad:
    """The hidden part LLDT/LTR load from a GDT descriptor (KVM's struct kvm_segment),
    and for LTR where the descriptor's busy bit is written."""
    selector: int
    base: int = 0
    limit: int = 0
    type: int = 0
    present: int = 0
    dpl: int = 0
    db: int = 0
    s: int = 0
    l: int = 0  # noqa: E741 - kvm_segment's name
    g: int = 0
    avl: int = 0
    unusable: int = 1
    busy_gpa: int | None = None     # LTR: GPA of the descriptor's type byte (offset 5)
    busy_writable: bool = True      # ... in a page VTL0 itself may write


@dataclass(frozen=True, slots=True)
class RegisterWrite:
    """A register write by one VTL0 instruction at `rip` (`length` bytes, `insn`), with the
    architectural checks already passed.  `reg` is a VTL_REG_* (or REG_CR2/REG_CR8);
    old/new are the value (GDTR/IDTR: base, LDTR/TR: selector), limits for GDTR/IDTR and
    LDTR/TR; old_base/new_base for LDTR/TR: the base loaded now and the one the new
    descriptor holds, read once (the VMM applies exactly `segment`, what VTL1 judged)."""
    reg: int
    old: int
    new: int
    rip: int
    length: int
    insn: bytes
    old_limit: int = 0
    new_limit: int = 0
    segment: SegmentLoad | None = None
    old_base: int = 0
    new_base: int = 0

    @property
    def name(self) -> str:
        return REG_NAMES.get(self.reg) or {REG_CR2: "cr2", REG_CR8: "cr8"}[self.reg]
