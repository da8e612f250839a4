"""The privileged section: register pinning on a host without CR-write exits (design
§6).

VTL1 names VTL0's privileged section and the register writes it judges with
VTL_HC_SET_INTERCEPT_CONTROL (`set_control`), and keeps the section NR for VTL0.  Every
VTL0 instruction fetch there faults to the VMM (`fetch`), which decodes the instruction
at RIP (vmm/decode.py), reading only from the section itself and from memory VTL0 may
read, through VTL0's page tables (vtl0view.InsnBytes):

  * MOV to CR0/CR2/CR3/CR4/CR8, LMSW, CLTS, LGDT, LIDT, LLDT, LTR, XSETBV: the VMM makes
    the CPU's checks (#UD, #GP(0) at CPL3, reserved bits, canonical bases, descriptor
    types, the operand read through VTL0's page tables: vmm/regcheck.py) and raises
    what the CPU would; then a write VTL1 judges (`InterceptControl.judges`) becomes a
    register intercept, any other is applied (services/registers.py) and RIP moves on;
  * any other instruction is single-stepped on a temporary mapping (a `Step` outcome,
    carried out by the scheduler: vtl/run/step.py);
  * bytes the decoder needed but VTL0 may not fetch end as that fetch would
    (`blocked_fetch`: #PF, a memory intercept for an NR page, #GP(0) for VTL1's memory).

The section is decoded only in 64-bit mode (the only mode the decoder knows); a fetch
there in any other mode gets #GP(0).
"""

from __future__ import annotations

from collections.abc import Callable

from vmm import paging
from vmm.decode import MASK32, MASK64, NotPrivileged, Op, Privileged, Truncated, decode
from vmm.exits import EmulationFailure, MemoryFault, VcpuExit
from vmm.kvm import VCpu
from vmm.memattr import NR, NW
from vmm.memory import PAGE_SIZE
from vmm.regcheck import (
    CR0_PE,
    CR0_TS,
    CR4_LA57,
    CR4_OSXSAVE,
    canonical,
    check_cr0,
    check_cr3,
    check_cr4,
    check_cr8,
    check_table_base,
    check_xcr0,
    normalize_cr0,
    normalize_cr3,
)
from vmm.x86 import EFER_LMA, VEC_GP, VEC_UD
from vtl.abi import ABI, abi_ffi
from vtl.core.events import EventLog, InterceptControlSet
from vtl.core.partition import Partition
from vtl.core.privileged import REG_CR2, REG_CR8, InterceptControl, RegisterWrite, SegmentLoad
from vtl.core.vp import VirtualProcessor
from vtl.services.intercepts import GPR_ORDER, Intercepts
from vtl.services.outcomes import Outcome, Step
from vtl.services.registers import Registers, read_xcr0
from vtl.services.vtl0view import Access, Context, Fault, InsnBytes, Vtl0View, gp

CONTROL_SIZE = abi_ffi.sizeof("struct vtl_intercept_control")
VEC_NP = 11
# CR0 and CR4 bits the architecture defines: masks naming any other bit are refused.
CR0_MASK_BITS = 0xE005003F
CR4_MASK_BITS = 0x13FF7FFF
CR_REG = {0: ABI.VTL_REG_CR0, 2: REG_CR2, 3: ABI.VTL_REG_CR3, 4: ABI.VTL_REG_CR4, 8: REG_CR8}
LDT_TYPE, TSS_AVAILABLE, TSS_BUSY_TYPE = 0x2, 0x9, 0xB


class PrivilegedSection:
    def __init__(self, partition: Partition, events: EventLog, intercepts: Intercepts,
                 registers: Registers | None = None, view: Vtl0View | None = None) -> None:
        self.p, self.events, self.intercepts = partition, events, intercepts
        self.registers = registers or intercepts.registers
        self.view = view or intercepts.view
        # Heki mode: the host judges register writes instead of VTL1 (None: VTL1 does).
        self.host_judge: Callable[[VirtualProcessor, RegisterWrite], Fault | None] | None = None
        # ... and [start, end) ranges it judges beside the intercept control's section (Heki
        # mode: the staged image's, for the kernel an in-guest kexec starts).
        self.host_sections: tuple[tuple[int, int], ...] = ()
        # The last step plan and every input it was computed from (see _delivery).
        self._plan: tuple[tuple[int, ...], list[tuple[int, bytes]], dict[int, int],
                          tuple[tuple[int, ...], tuple[int, ...]] | str] | None = None

    # --- VTL_HC_SET_INTERCEPT_CONTROL -------------------------------------------------
    def set_control(self, vp: VirtualProcessor, gpa: int) -> tuple[int, str]:
        """Validate VTL1's struct vtl_intercept_control at `gpa` (copied once, from VTL1's
        own memory) and make it the calling VP's, its section the partition's
        (InterceptControls); (status, reason)."""
        lay = self.p.layout
        if not (lay.vtl1_base <= gpa and gpa + CONTROL_SIZE <= lay.vtl1_end):
            return int(ABI.VTL_E_INVALID_ARG), f"the control at {gpa:#x} is not in VTL1 memory"
        raw = bytearray(self.p.mem.read(gpa, CONTROL_SIZE))        # one copy; VTL1 may change its own
        c = abi_ffi.from_buffer("struct vtl_intercept_control *", raw)
        flags, reserved0 = int(c.flags), int(c.reserved0)
        cr0_mask, cr4_mask = int(c.cr0_mask), int(c.cr4_mask)
        priv_gpa, pages = int(c.priv_gpa), int(c.priv_pages)
        if flags & ~ABI.VTL_ICTL_ALL or reserved0:
            return int(ABI.VTL_E_INVALID_ARG), f"flags {flags:#x} or reserved0 {reserved0:#x} invalid"
        for name, mask, bits, flag in (("cr0", cr0_mask, CR0_MASK_BITS, ABI.VTL_ICTL_CR0),
                                       ("cr4", cr4_mask, CR4_MASK_BITS, ABI.VTL_ICTL_CR4)):
            if mask & ~bits:
                return int(ABI.VTL_E_INVALID_ARG), f"{name}_mask {mask:#x} names undefined bits"
            if mask and not flags & flag:
                return int(ABI.VTL_E_INVALID_ARG), f"{name}_mask {mask:#x} without VTL_ICTL_{name.upper()}"
        if pages == 0:
            if priv_gpa:
                return int(ABI.VTL_E_INVALID_ARG), "priv_gpa without priv_pages"
        elif priv_gpa % PAGE_SIZE:
            return int(ABI.VTL_E_MISALIGNED), f"priv_gpa {priv_gpa:#x} is not page aligned"
        elif pages > lay.mem_size // PAGE_SIZE or priv_gpa + pages * PAGE_SIZE > lay.mem_size:
            return int(ABI.VTL_E_OUT_OF_RANGE), f"{pages} pages at {priv_gpa:#x} run past guest memory"
        elif lay.in_vtl1(priv_gpa, pages * PAGE_SIZE):
            return int(ABI.VTL_E_OVERLAPS_VTL1), f"{pages} pages at {priv_gpa:#x} touch VTL1's region"
        self.p.intercept_controls.set(vp.index, InterceptControl(flags, cr0_mask, cr4_mask, priv_gpa, pages))
        self.events.emit(InterceptControlSet(ts=self.events.now(), vp=vp.index, vtl=1, flags=flags,
                                             cr0_mask=cr0_mask, cr4_mask=cr4_mask, priv_gpa=priv_gpa,
                                             priv_pages=pages))
        return int(ABI.VTL_OK), ""

    def in_section(self, gpa: int) -> bool:
        if self.p.intercept_controls.in_section(gpa):
            return True
        return any(lo <= gpa < hi for lo, hi in self.host_sections)

    # --- the fetch fault --------------------------------------------------------------
    def fetch(self, vp: VirtualProcessor, vcpu: VCpu) -> Outcome:
        """VTL0 fetched its instruction at RIP from the privileged section (the caller
        checked).  RIP is at the instruction."""
        s, r = vcpu.sregs, vcpu.regs
        rip = int(r.rip)
        if not (s.efer & EFER_LMA and s.cs.l):
            return self._fault(vp, vcpu, rip, gp("privileged-section code outside 64-bit mode", refusal=True),
                               "privileged section")
        ctx = Context.of(vcpu)
        insn = InsnBytes(self.view, ctx, rip, self.in_section)
        gprs = [int(getattr(r, n)) for n in GPR_ORDER]
        d = decode(insn, rip=rip, gprs=gprs, fs_base=int(s.fs.base), gs_base=int(s.gs.base))
        if isinstance(d, Truncated):
            assert insn.blocked_gva is not None
            return self.blocked_fetch(vp, vcpu, insn.blocked_gva)
        if isinstance(d, NotPrivileged):
            insn.scan()
            return self.plan_step(vp, vcpu, rip, insn)
        if not isinstance(d, Privileged):             # TooLong
            return self._fault(vp, vcpu, rip, gp(f"instruction longer than 15 bytes ({d.length})"),
                               "privileged instruction")
        w = self._prepare(vcpu, ctx, d, bytes(insn.data[:d.length]), gprs)
        if isinstance(w, Fault):
            return self._fault(vp, vcpu, rip, w, d.op.value if d.op is not Op.MOV_CR else f"mov to cr{d.cr}")
        if self.host_judge is not None:       # a mode whose host owns the policy (vtl/modes/heki.py)
            denied = self.host_judge(vp, w)
            if denied is not None:
                return self._fault(vp, vcpu, rip, denied, w.name)
        elif self.p.intercept_controls.judges(vp.index, w.reg, w.old, w.new):   # this VP's VTL1
            return self.intercepts.register(vp, vcpu, w)
        fault = self.registers.apply(vcpu, w, allowed=False)
        if fault is not None:
            return self._fault(vp, vcpu, rip, fault, w.name)
        self.intercepts.written(vp, w, "direct")
        return None

    def blocked_fetch(self, vp: VirtualProcessor, vcpu: VCpu, gva: int) -> Outcome:
        """VTL0's instruction at RIP needs the byte at `gva`, which VTL0 may not fetch:
        what that fetch gets (RIP stays at the instruction)."""
        rip = int(vcpu.regs.rip)
        gpa = self.view.translate(Context.of(vcpu), gva, Access.FETCH)
        if isinstance(gpa, Fault):
            return self._fault(vp, vcpu, rip, gpa, "instruction fetch")
        lay = self.p.layout
        if lay.in_vtl0(gpa) and self.p.vtl0_attr(gpa) & NR:
            # An NR page (the privileged section too, for an instruction that starts
            # outside it): an execute intercept, as for any fetch from such a page.
            return self.intercepts.memory(vp, vcpu, gpa, ABI.VTL_ACCESS_EXECUTE, gva=gva)
        return self._fault(vp, vcpu, rip, self.view.refusal(gpa, "instruction fetch"), "instruction fetch")

    def _fault(self, vp: VirtualProcessor, vcpu: VCpu, rip: int, fault: Fault, request: str) -> Outcome:
        self.intercepts.inject(vp, vcpu, fault, rip, request=request)
        return None

    # --- the CPU's checks, and what the instruction writes -------------------------------
    def _prepare(self, vcpu: VCpu, ctx: Context, d: Privileged, insn: bytes,
                 gprs: list[int]) -> RegisterWrite | Fault:
        s = vcpu.sregs
        rip = int(vcpu.regs.rip)
        features = self.p.cpu_features
        if d.lock:
            return Fault(VEC_UD, None, f"{d.op.value} with a LOCK prefix")
        if d.op is Op.XSETBV and not s.cr4 & CR4_OSXSAVE:
            return Fault(VEC_UD, None, "XSETBV with CR4.OSXSAVE clear")
        if d.op is Op.MOV_CR and d.cr not in CR_REG:
            return Fault(VEC_UD, None, f"MOV to CR{d.cr}: no such register")
        if ctx.cpl != 0:
            return gp(f"{d.op.value} at CPL{ctx.cpl}")

        def write(reg: int, old: int, new: int, old_limit: int = 0, new_limit: int = 0,
                  segment: SegmentLoad | None = None, old_base: int = 0, new_base: int = 0) -> RegisterWrite:
            return RegisterWrite(reg, old, new, rip, d.length, insn, old_limit, new_limit, segment,
                                 old_base, new_base)

        def operand(n: int) -> bytes | Fault:
            assert d.mem is not None and d.address is not None
            return self.view.read(ctx, d.address, n, Access.READ, stack=d.mem.stack)

        cr0, cr3, cr4, efer = int(s.cr0), int(s.cr3), int(s.cr4), int(s.efer)
        if d.op is Op.MOV_CR:
            assert d.reg is not None and d.cr is not None
            value = gprs[d.reg]
            reg = CR_REG[d.cr]
            if reg == ABI.VTL_REG_CR0:
                why = check_cr0(value, cr4=cr4, efer=efer)
                return gp(why) if why else write(reg, cr0, normalize_cr0(value))
            if reg == ABI.VTL_REG_CR3:
                why = check_cr3(value, cr4=cr4, features=features)
                return gp(why) if why else write(reg, cr3, normalize_cr3(value, cr4))
            if reg == ABI.VTL_REG_CR4:
                why = check_cr4(value, old=cr4, cr0=cr0, cr3=cr3, efer=efer, features=features)
                return gp(why) if why else write(reg, cr4, value)
            if reg == REG_CR8:
                why = check_cr8(value)
                return gp(why) if why else write(reg, int(s.cr8), value)
            return write(reg, int(s.cr2), value)
        if d.op in (Op.LMSW, Op.CLTS):
            if d.op is Op.CLTS:
                new = cr0 & ~CR0_TS
            else:
                if d.reg is not None:
                    src = gprs[d.reg] & 0xFFFF
                else:
                    raw = operand(2)
                    if isinstance(raw, Fault):
                        return raw
                    src = int.from_bytes(raw, "little")
                new = (cr0 & ~0xF) | (src & 0xF) | (cr0 & CR0_PE)      # LMSW never clears PE
            return write(ABI.VTL_REG_CR0_LOW, cr0, new)
        if d.op in (Op.LGDT, Op.LIDT):
            raw = operand(10)
            if isinstance(raw, Fault):
                return raw
            limit, base = int.from_bytes(raw[:2], "little"), int.from_bytes(raw[2:], "little")
            what = "GDT" if d.op is Op.LGDT else "IDT"
            why = check_table_base(base, cr4=cr4, what=what)
            if why:
                return gp(why)
            reg, table = (ABI.VTL_REG_GDTR, s.gdt) if d.op is Op.LGDT else (ABI.VTL_REG_IDTR, s.idt)
            return write(reg, int(table.base), base, old_limit=int(table.limit), new_limit=limit)
        if d.op in (Op.LLDT, Op.LTR):
            if d.reg is not None:
                sel = gprs[d.reg] & 0xFFFF
            else:
                raw = operand(2)
                if isinstance(raw, Fault):
                    return raw
                sel = int.from_bytes(raw, "little")
            seg = self._descriptor(ctx, vcpu, sel, ltr=d.op is Op.LTR)
            if isinstance(seg, Fault):
                return seg
            reg, old = (ABI.VTL_REG_TR, s.tr) if d.op is Op.LTR else (ABI.VTL_REG_LDTR, s.ldt)
            return write(reg, int(old.selector), sel, old_limit=int(old.limit), new_limit=seg.limit,
                         segment=seg, old_base=int(old.base), new_base=seg.base)
        # XSETBV
        index = gprs[1] & MASK32
        value = (gprs[2] & MASK32) << 32 | (gprs[0] & MASK32)
        why = check_xcr0(value, features, index)
        return gp(why) if why else write(ABI.VTL_REG_XCR0, read_xcr0(vcpu), value)

    def _descriptor(self, ctx: Context, vcpu: VCpu, sel: int, *, ltr: bool) -> SegmentLoad | Fault:
        """What LLDT/LTR load for selector `sel`: its 16-byte system descriptor from VTL0's
        GDT, checked as the CPU checks it (#GP(sel), #NP(sel), #GP(0) for a null TR)."""
        what = "LTR" if ltr else "LLDT"
        err = sel & 0xFFFC
        if sel & ~3 == 0:
            if ltr:
                return gp("LTR with a null selector")
            return SegmentLoad(selector=sel)                       # LDTR unusable
        if sel & 4:
            return Fault(VEC_GP, err, f"{what} {sel:#x}: selector in the LDT")
        gdt = vcpu.sregs.gdt
        off = sel & ~7
        if off + 15 > gdt.limit:
            return Fault(VEC_GP, err, f"{what} {sel:#x}: beyond the GDT limit {int(gdt.limit):#x}")
        addr = (int(gdt.base) + off) & ((1 << 64) - 1)
        raw = self.view.read(ctx, addr, 16, Access.SYSTEM)
        if isinstance(raw, Fault):
            return raw
        d0, d1 = int.from_bytes(raw[:8], "little"), int.from_bytes(raw[8:], "little")
        typ, s_bit, dpl, present = (d0 >> 40) & 0xF, (d0 >> 44) & 1, (d0 >> 45) & 3, (d0 >> 47) & 1
        want = TSS_AVAILABLE if ltr else LDT_TYPE
        if s_bit or typ != want or (d1 >> 40) & 0x1F:
            return Fault(VEC_GP, err, f"{what} {sel:#x}: descriptor type {typ:#x} (s={s_bit}) is not "
                         f"{'an available 64-bit TSS' if ltr else 'an LDT'}")
        if not present:
            return Fault(VEC_NP, err, f"{what} {sel:#x}: descriptor not present")
        base = ((d0 >> 16) & 0xFFFFFF) | ((d0 >> 56) & 0xFF) << 24 | (d1 & 0xFFFFFFFF) << 32
        if not canonical(base, bool(ctx.cr4 & CR4_LA57)):
            return Fault(VEC_GP, err, f"{what} {sel:#x}: base {base:#x} is not canonical")
        g = (d0 >> 55) & 1
        limit = (d0 & 0xFFFF) | ((d0 >> 48) & 0xF) << 16
        if g:
            limit = limit << 12 | 0xFFF
        busy_gpa, busy_writable = None, True
        if ltr:
            # LTR marks the descriptor busy: an implicit supervisor write, checked now so
            # that a fault comes before anything changes.
            gpa = self.view.translate(ctx, addr + 5, Access.SYSTEM_WRITE)
            if isinstance(gpa, Fault):
                return gpa
            busy_gpa, busy_writable = gpa, self.view.writable(gpa)
        return SegmentLoad(selector=sel, base=base, limit=limit, type=TSS_BUSY_TYPE if ltr else typ,
                           present=1, dpl=dpl, db=(d0 >> 54) & 1, s=0, l=(d0 >> 53) & 1, g=g,
                           avl=(d0 >> 52) & 1, unusable=0, busy_gpa=busy_gpa, busy_writable=busy_writable)

    # --- single-step safety -----------------------------------------------------------
    def plan_step(self, vp: VirtualProcessor, vcpu: VCpu, rip: int, insn: InsnBytes) -> Outcome:
        """The Step for a non-privileged instruction of the section, or why not.

        While the section is mapped for a step, nothing but that one instruction may run.
        On this host a step that raises an exception (or an INT n, an interrupt, a #DB
        from DR7) also runs the first instruction of the handler: so every handler is made
        NR for the step (`guard_nr`), and an event delivered during it ends the step at the
        handler's first fetch (the scheduler then resumes VTL0 there, the section NR
        again).  A gate, IDT or stack in the pages the step maps cannot be guarded and
        refuses the step; so does a pending NMI/SMI.  What the CPU reads to deliver an
        event is judged as the CPU will read it during the step: guest memory itself,
        through VTL0's page tables, with the opened pages readable (never through VTL0's
        view, which hides the NR section).  The IDT and every page-table page of those
        translations are made NW for the step (`guard_nw`), so that the instruction
        cannot rewrite a gate or a mapping and then fault through it."""
        ev = vcpu.sync.events
        if ev.exception.injected or ev.exception.pending or ev.interrupt.injected or ev.nmi.injected:
            return None           # deliver the event first, with the section NR; the fetch comes back
        if ev.nmi.pending or ev.smi.pending:
            return self._fault(vp, vcpu, rip, gp("an NMI or SMI is pending: no single step", refusal=True),
                               "single step")
        plan = self._delivery(vcpu, set(insn.section_pages))
        if isinstance(plan, str):
            return self._fault(vp, vcpu, rip, gp(plan, refusal=True), "single step")
        guard_nr, guard_nw = plan
        return Step(rip, tuple(insn.section_pages), insn.blocked_gva, guard_nr, guard_nw)

    def event_delivered(self, vcpu: VCpu, step: Step, exit: VcpuExit) -> bool:
        """Did the step end at the first fetch of a guarded handler (an event was delivered
        while the section was mapped, and none of its handler ran)?"""
        # A fetch from a protected page is an emulation failure on this host, and a
        # KVM_EXIT_MEMORY_FAULT at that page on an EPT host.
        if not step.guard_nr or not isinstance(exit, (EmulationFailure, MemoryFault)):
            return False
        rip = int(vcpu.regs.rip)
        if rip == step.rip:
            return False
        try:
            gpa = paging.walk(self.p.mem, int(vcpu.sregs.cr3), rip,
                              readable=lambda g: self.p.layout.in_vtl0(g, 8)).gpa
        except paging.PageFault:
            return False
        page = gpa & ~(PAGE_SIZE - 1)
        if isinstance(exit, MemoryFault) and exit.gpa & ~(PAGE_SIZE - 1) != page:
            return False
        return page in step.guard_nr

    def unsteppable(self, vp: VirtualProcessor, vcpu: VCpu, step: Step, exit: VcpuExit) -> Outcome:
        """The step of the instruction at `step.rip` ended in an emulation failure at that
        instruction, with every byte of it fetchable: this host cannot execute it (INT3,
        INT n, ICEBP, SYSENTER).  Nothing ran; VTL0 gets #UD at the instruction, as from a
        CPU without that instruction, never a crash of the partition."""
        raw = getattr(exit, "insn", b"") or b""
        return self._fault(vp, vcpu, step.rip,
                           Fault(VEC_UD, None, f"the instruction at {step.rip:#x} in the privileged section "
                                 f"(bytes {raw[:15].hex() or 'unknown'}) cannot be single-stepped on this "
                                 "host", refusal=True), "single step")

    def guarded_access(self, vp: VirtualProcessor, vcpu: VCpu, step: Step, exit: VcpuExit,
                       page: int) -> Outcome:
        """The stepped instruction wrote a page guarded for the step (the IDT, a page table
        of the delivery, a handler's page) that VTL0 itself may write: the write is
        dropped and VTL0 gets #GP(0), after the instruction as for every refused write."""
        why = (f"a single-stepped instruction of the privileged section at {step.rip:#x} writes "
               f"GPA page {page:#x}, which exception delivery reads (IDT, page tables, handlers)")
        if isinstance(exit, MemoryFault):
            # RIP is at the instruction; nothing was written.
            return self._fault(vp, vcpu, step.rip, gp(why, refusal=True), "single step")
        self.intercepts.refuse.fault(vp, vcpu, "single step", why, VEC_GP, 0, at_port_insn=False,
                                     gpa=page, access="write")
        return None

    def _delivery(self, vcpu: VCpu, opened: set[int]) -> tuple[tuple[int, ...], tuple[int, ...]] | str:
        """(pages to make NR, pages to make NW) for a step that maps `opened`, or why the
        step may not be made.  The plan is a function of the registers in `key`, the guest
        memory it read (IDT, TSS, every page-table entry of its walks) and the attributes
        of the pages it looked at: the last plan is reused only while every one of those
        inputs is byte for byte what it was (steps are frequent: every `ret` of the
        section)."""
        if not opened:
            return (), ()
        s = vcpu.sregs
        key = (int(s.cr3), int(s.idt.base), int(s.idt.limit), int(s.tr.base), int(s.tr.limit),
               int(s.cr4) & CR4_LA57, *sorted(opened))
        mem, attrs = self.p.mem, self.p.vtl0_attrs
        last = self._plan
        if last is not None and last[0] == key and all(attrs[pg] == a for pg, a in last[2].items()) \
                and all(mem.read(g, len(b)) == b for g, b in last[1]):
            return last[3]
        reads: list[tuple[int, bytes]] = []
        seen: dict[int, int] = {}
        plan = self._plan_delivery(vcpu, opened, reads, seen)
        self._plan = (key, reads, {pg: attrs[pg] for pg in seen}, plan)
        return plan

    def _plan_delivery(self, vcpu: VCpu, opened: set[int], reads: list[tuple[int, bytes]],
                       seen: dict[int, int]) -> tuple[tuple[int, ...], tuple[int, ...]] | str:
        """_delivery's work; `reads` collects (GPA, bytes) of every memory read it depends
        on, `seen` the page frames whose attributes it looked at."""
        s = vcpu.sregs
        lay, mem, attrs = self.p.layout, self.p.mem, self.p.vtl0_attrs
        cr3 = int(s.cr3)
        tables: set[int] = set()
        cache: dict[int, int | None] = {}
        for frame in opened:
            seen[frame // PAGE_SIZE] = 0

        def raw(gpa: int) -> bool:       # what the CPU can read during the step: VTL0 memory
            return lay.in_vtl0(gpa, 8)

        def page_of(gva: int) -> int | None:
            """The GPA page of `gva` as the CPU translates it in the step, or None."""
            gva &= MASK64
            vpage = gva & ~(PAGE_SIZE - 1)
            if vpage not in cache:
                try:
                    t = paging.walk(mem, cr3, vpage, readable=raw)
                except paging.PageFault:
                    cache[vpage] = None
                else:
                    for e in t.entries:
                        tables.add(e & ~(PAGE_SIZE - 1))
                        reads.append((e, mem.read(e, 8)))
                    g = t.gpa & ~(PAGE_SIZE - 1)
                    cache[vpage] = g if lay.in_vtl0(g, PAGE_SIZE) else None
            return cache[vpage]

        def read(gva: int, n: int, check: bool = True) -> bytes | str | None:
            """n bytes at `gva` as the CPU reads them in the step (None: it cannot; a str:
            they lie in a page the step maps)."""
            out = bytearray()
            while n > 0:
                chunk = min(n, PAGE_SIZE - (gva & (PAGE_SIZE - 1)))
                g = page_of(gva)
                if g is None:
                    return None
                if check and g in opened:
                    return f"{g:#x}"
                data = mem.read(g + (gva & (PAGE_SIZE - 1)), chunk)
                reads.append((g + (gva & (PAGE_SIZE - 1)), data))
                out += data
                gva, n = (gva + chunk) & MASK64, n - chunk
            return bytes(out)

        base, limit = int(s.idt.base), int(s.idt.limit)
        count = min(256, (limit + 1) // 16)
        raw_idt = bytearray()
        for v in range(0, count, 16):                # 16 gates at a time
            n = min(16, count - v)
            got = read(base + 16 * v, 16 * n)
            if isinstance(got, str):
                return (f"VTL0's IDT at {base:#x} lies in the privileged-section page {got} a single "
                        "step would map: the step is refused")
            raw_idt += got if got is not None else bytes(16 * n)   # unreadable: no gate the CPU can use
        idt_pages = {g for v in range(0, count) for g in (page_of(base + 16 * v),) if g is not None}
        tss_base, tss_limit = int(s.tr.base), int(s.tr.limit)

        def stack(slot: int) -> int | None:          # TSS RSP0 (slot 0) or ISTn (slot 3 + n)
            off = 4 + 8 * slot
            if off + 8 > tss_limit + 1:
                return None
            got = read(tss_base + off, 8, check=False)
            return int.from_bytes(got, "little") if isinstance(got, bytes) else None

        guard_nr: set[int] = set()
        for v in range(count):
            lo = int.from_bytes(raw_idt[16 * v:16 * v + 8], "little")
            hi = int.from_bytes(raw_idt[16 * v + 8:16 * v + 16], "little")
            if not (lo >> 47) & 1 or (lo >> 40) & 0xF not in (0xE, 0xF):
                continue
            target = (lo & 0xFFFF) | ((lo >> 48) & 0xFFFF) << 16 | (hi & 0xFFFFFFFF) << 32
            g = page_of(target)
            if g is None:
                continue                             # the fetch faults: another gate, checked too
            if g in opened:
                return (f"VTL0's IDT vector {v} leads to {target:#x}, in the privileged-section page "
                        f"{g:#x} a single step would map: the step is refused")
            ist = (lo >> 32) & 7
            for slot in (0, 3 + ist) if ist else (0,):
                top = stack(slot)
                if top is None:
                    continue
                for a in (top - 8, top - 64):
                    sg = page_of(a)
                    if sg is not None and sg in opened:
                        return (f"VTL0's IDT vector {v} delivers on a stack at {top:#x}, in the "
                                f"privileged-section page {sg:#x} a single step would map: the step "
                                "is refused")
            seen[g // PAGE_SIZE] = 0
            if not attrs[g // PAGE_SIZE] & NR:
                guard_nr.add(g)
        for frame in tables | idt_pages:
            seen[frame // PAGE_SIZE] = 0
        guard_nw = {g for g in tables | idt_pages
                    if lay.in_vtl0(g, PAGE_SIZE) and g not in opened and not attrs[g // PAGE_SIZE] & NW
                    and g not in guard_nr}
        return tuple(sorted(guard_nr)), tuple(sorted(guard_nw))
