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

    @property
    def registers(self) -> list[str]:
        """The registers whose writes VTL1 judges, by name (cr0, cr3, ..., msr)."""
        return [n.removeprefix("VTL_ICTL_").lower() for n, v in sorted(ABI.constants.items())
                if n.startswith("VTL_ICTL_") and n != "VTL_ICTL_ALL" and self.flags & v]

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


class InterceptControls:
    """VTL_HC_SET_INTERCEPT_CONTROL's state for a partition, and its one rule.

    What VTL1 judges is per VP: registers are private to each VP, and the TLFS's
    HvX64RegisterCrInterceptControl is a register of each VP, so the hypercall sets the
    calling VP's flags and masks (an AP whose VTL1 has pinned nothing yet has its writes
    applied as before any lock).  The privileged section is per partition: it is memory,
    NR for VTL0 on every VP, so there is one, named by the last control that set it (every
    VP's lock names the same one; a control with no pages removes it)."""

    def __init__(self, nr_vps: int) -> None:
        self._by_vp: list[InterceptControl | None] = [None] * nr_vps
        self._section: tuple[int, int] | None = None         # (priv_gpa, priv_pages)

    def set(self, vp: int, ctl: InterceptControl) -> None:
        """VP `vp`'s VTL1 set `ctl`: its judging for that VP, its section for all."""
        self._by_vp[vp] = ctl
        self._section = (ctl.priv_gpa, ctl.priv_pages) if ctl.priv_pages else None

    def set_all(self, ctl: InterceptControl | None) -> None:
        """One control for every VP (Heki mode, whose KVM pins are VM-wide), or none (VTL1's
        end: teardown, reset)."""
        self._by_vp = [ctl] * len(self._by_vp)
        self._section = (ctl.priv_gpa, ctl.priv_pages) if ctl is not None and ctl.priv_pages else None

    def load(self, by_vp: list[InterceptControl | None], section: tuple[int, int] | None) -> None:
        """Every VP's control and the section as a snapshot saved them (`of`, `section`)."""
        if len(by_vp) != len(self._by_vp):
            raise ValueError(f"{len(by_vp)} intercept controls for {len(self._by_vp)} VPs")
        self._by_vp = list(by_vp)
        self._section = section

    def of(self, vp: int) -> InterceptControl | None:
        """What VTL1 judges on VP `vp` (its control as set, the section aside)."""
        return self._by_vp[vp]

    def pinned(self, vp: int) -> bool:
        """Does VTL1 judge any register write of VP `vp`?"""
        ctl = self._by_vp[vp]
        return ctl is not None and ctl.flags != 0

    @property
    def section(self) -> tuple[int, int] | None:
        return self._section

    def in_section(self, gpa: int) -> bool:
        s = self._section
        return s is not None and s[0] <= gpa < s[0] + s[1] * PAGE_SIZE

    def judges(self, vp: int, reg: int, old: int, new: int) -> bool:
        """Does VTL1 judge this write of VP `vp`'s VTL0?"""
        ctl = self._by_vp[vp]
        return ctl is not None and ctl.judges(reg, old, new)

    def view(self) -> InterceptControl | None:
        """The partition's control as the tools show it: the section, and what the lowest VP
        with a control judges (the boot VP's once it locked); None when no VP has one and
        there is no section."""
        first = next((c for c in self._by_vp if c is not None), None)
        s = self._section
        if first is None:
            return None if s is None else InterceptControl(0, 0, 0, s[0], s[1])
        gpa, pages = s if s is not None else (0, 0)
        return InterceptControl(first.flags, first.cr0_mask, first.cr4_mask, gpa, pages)


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
