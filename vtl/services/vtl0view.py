"""Guest memory as VTL0 may see it: every read the VMM makes on VTL0's behalf
(instruction bytes, instruction operands, descriptor tables, the page tables themselves)
goes through VTL0's own page tables and reaches only memory VTL0 may read: never VTL1's
region, never a page VTL1 made NR for VTL0, never past guest memory.  A read that the CPU
would fault gets the fault the CPU would raise (#PF with its error code and CR2, #GP(0)
or #SS(0) for a non-canonical address); a read of memory VTL0 may not read gets the
VMM's refusal, #GP(0) (docs/abi.md, Refusals), whatever that memory holds: so nothing
VTL0 observes depends on bytes it could not read itself.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any

from vmm import paging
from vmm.memattr import NR, NW
from vmm.memory import PAGE_SIZE
from vmm.regcheck import CR0_WP, CR4_LA57, CR4_SMAP, CR4_SMEP, canonical
from vmm.x86 import EFER_NXE, RFLAGS_AC, VEC_GP, VEC_PF
from vtl.core.partition import Partition

VEC_SS = 12
PF_P, PF_W, PF_U, PF_I = 1, 2, 4, 16


class Access(Enum):
    READ = "read"             # an explicit data read by the instruction (privilege: CPL)
    SYSTEM = "system"         # an implicit supervisor read (GDT, IDT)
    SYSTEM_WRITE = "system write"   # an implicit supervisor write (the TSS busy bit)
    FETCH = "fetch"


@dataclass(frozen=True, slots=True)
class Fault:
    """What VTL0 gets instead of the access: `refusal` marks the VMM's own #GP(0) for
    memory VTL0 may not touch (as opposed to the fault the CPU itself raises)."""
    vector: int
    error_code: int | None
    reason: str
    cr2: int | None = None
    refusal: bool = False


@dataclass(frozen=True, slots=True)
class Context:
    """The parts of VTL0's vCPU state a translation depends on."""
    cr3: int
    cpl: int
    cr0: int
    cr4: int
    efer: int
    rflags: int

    @classmethod
    def of(cls, vcpu: Any) -> Context:
        s = vcpu.sregs
        return cls(int(s.cr3), int(s.cs.selector) & 3, int(s.cr0), int(s.cr4), int(s.efer),
                   int(vcpu.regs.rflags))


def gp(reason: str, *, refusal: bool = False) -> Fault:
    return Fault(VEC_GP, 0, reason, refusal=refusal)


class Vtl0View:
    def __init__(self, partition: Partition) -> None:
        self.p = partition
        self.mem, self.layout = partition.mem, partition.layout

    # --- what VTL0 may touch, by GPA --------------------------------------------------
    def readable(self, gpa: int, length: int = 1) -> bool:
        """[gpa, gpa+length) is VTL0 memory and no page of it is NR."""
        if not self.layout.in_vtl0(gpa, length):
            return False
        attrs = self.p.vtl0_attrs
        return not any(attrs[g] & NR for g in range(gpa // PAGE_SIZE, (gpa + length - 1) // PAGE_SIZE + 1))

    def writable(self, gpa: int, length: int = 1) -> bool:
        if not self.readable(gpa, length):
            return False
        attrs = self.p.vtl0_attrs
        return not any(attrs[g] & NW for g in range(gpa // PAGE_SIZE, (gpa + length - 1) // PAGE_SIZE + 1))

    def _table_readable(self, gpa: int) -> bool:
        return self.readable(gpa, 8)

    def walk(self, cr3: int, gva: int) -> paging.Translation:
        """vmm.paging.walk through tables VTL0 may read (raises PageFault)."""
        return paging.walk(self.mem, cr3, gva, readable=self._table_readable)

    # --- translation with the CPU's checks ----------------------------------------------
    def translate(self, ctx: Context, gva: int, access: Access, *, stack: bool = False) -> int | Fault:
        """The GPA of `gva` for this access, or the fault: #GP(0)/#SS(0) for a
        non-canonical address, #PF as the CPU would raise it, the VMM's #GP(0) refusal
        for page tables VTL0 may not read.  The GPA itself is not checked here."""
        if not canonical(gva, bool(ctx.cr4 & CR4_LA57)):
            return Fault(VEC_SS if stack else VEC_GP, 0, f"address {gva:#x} is not canonical")
        write = access is Access.SYSTEM_WRITE
        fetch = access is Access.FETCH
        user_access = ctx.cpl == 3 and access in (Access.READ, Access.FETCH)
        code = (PF_W if write else 0) | (PF_U if user_access else 0) | (PF_I if fetch else 0)
        try:
            t = self.walk(ctx.cr3, gva)
        except paging.PageFault as e:
            if e.kind == "unreadable":
                return gp(f"VTL0's page tables for {gva:#x} are in memory VTL0 may not read", refusal=True)
            return Fault(VEC_PF, code, f"page fault at {gva:#x} ({e})", cr2=gva)
        why = ""
        if user_access and not t.user:
            why = "a supervisor page at CPL3"
        elif fetch and t.nx and ctx.efer & EFER_NXE:
            why = "a fetch from an NX page"
        elif fetch and not user_access and t.user and ctx.cr4 & CR4_SMEP:
            why = "a supervisor fetch from a user page (SMEP)"
        elif not fetch and not user_access and t.user and ctx.cr4 & CR4_SMAP \
                and (access is not Access.READ or not ctx.rflags & RFLAGS_AC):
            why = "a supervisor access to a user page (SMAP)"
        elif write and not t.writable and ctx.cr0 & CR0_WP:
            why = "a write to a read-only page"
        if why:
            return Fault(VEC_PF, code | PF_P, f"page fault at {gva:#x}: {why}", cr2=gva)
        return t.gpa

    def read(self, ctx: Context, gva: int, length: int, access: Access = Access.READ, *,
             stack: bool = False) -> bytes | Fault:
        """`length` bytes at `gva` that VTL0 may read, or the fault of the first that it
        may not (every page is checked before any byte is read)."""
        parts: list[tuple[int, int]] = []
        addr, left = gva, length
        while left > 0:
            gpa = self.translate(ctx, addr, access, stack=stack)
            if isinstance(gpa, Fault):
                return gpa
            chunk = min(left, PAGE_SIZE - (addr & (PAGE_SIZE - 1)))
            if not self.readable(gpa, chunk):
                return self.refusal(gpa, "read")
            parts.append((gpa, chunk))
            addr = (addr + chunk) & ((1 << 64) - 1)
            left -= chunk
        return b"".join(self.mem.read(g, n) for g, n in parts)

    def refusal(self, gpa: int, what: str) -> Fault:
        if self.layout.in_vtl1(gpa):
            where = "VTL1 memory"
        elif not self.layout.in_memory(gpa):
            where = "an unbacked guest-physical address"
        else:
            where = "a page VTL1 made no-access for VTL0"
        return gp(f"VTL0 {what} of {where} (GPA {gpa:#x})", refusal=True)


class InsnBytes:
    """The fetch callback for vmm.decode at `rip`: byte i is read only from pages VTL0
    may fetch (by its page tables) that are either the privileged section (`in_section`)
    or memory VTL0 may read.  The first refused byte is remembered (`blocked_gva`), and
    which privileged-section pages the bytes came from (`section_pages`)."""

    def __init__(self, view: Vtl0View, ctx: Context, rip: int, in_section: Callable[[int], bool]) -> None:
        self.view, self.ctx, self.rip, self.in_section = view, ctx, rip, in_section
        self.data = bytearray()
        self.blocked_gva: int | None = None
        self.section_pages: list[int] = []
        self._page_gva = -1
        self._page_gpa = 0

    def __call__(self, i: int) -> int | None:
        while len(self.data) <= i:
            if self.blocked_gva is not None:
                return None
            gva = (self.rip + len(self.data)) & ((1 << 64) - 1)
            page = gva & ~(PAGE_SIZE - 1)
            if page != self._page_gva:
                gpa = self.view.translate(self.ctx, gva, Access.FETCH)
                if isinstance(gpa, Fault):
                    self.blocked_gva = gva
                    return None
                base = gpa & ~(PAGE_SIZE - 1)
                if self.in_section(base):
                    if base not in self.section_pages:
                        self.section_pages.append(base)
                elif not self.view.readable(base, PAGE_SIZE):
                    self.blocked_gva = gva
                    return None
                self._page_gva, self._page_gpa = page, base
            self.data.append(self.view.mem.read(self._page_gpa + (gva & (PAGE_SIZE - 1)), 1)[0])
        return self.data[i]

    def scan(self, n: int = 15) -> None:
        """Read ahead up to `n` bytes (to learn every page an instruction there may use)."""
        self(n - 1)
