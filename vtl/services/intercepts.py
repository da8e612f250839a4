"""Secure intercepts: a VTL0 access that VTL1's attributes forbid, or a write to a pinned
MSR, stops VTL0 and enters VTL1 with entry reason VTL_ENTRY_INTERCEPT.  VTL1 answers
with a verdict in vtl_control.intercept: inject a fault into VTL0, allow (the VMM
completes the access on the backing memory or the MSR), or stop the partition.

How precise the report is depends on how the violation reached the VMM:
  read  (memslot: unmapped page -> MMIO read exit)     RIP at the instruction; a fault
        verdict rewinds the emulated load, so the fault is precise.
  write (memslot: read-only slot -> MMIO write exit)   KVM reports it after the
        instruction retired: VTL_ICPT_F_RIP_AFTER, the write never reaches memory, a
        fault is delivered with RIP at the next instruction.
  fetch (unmapped page -> emulation failure)           RIP at the target, precise.
  rwx hosts (KVM_EXIT_MEMORY_FAULT)                    precise for all three.
  wrmsr (MSR filter -> KVM_EXIT_X86_WRMSR)             precise; denial is KVM's #GP(0).
  register (a privileged-section instruction, decoded  precise: RIP at the instruction, insn_len
        by vtl/services/privileged.py)                 and insn_bytes its decoded bytes; ALLOW
                                                       writes the register and moves RIP past it.
"""

from __future__ import annotations

from typing import Literal

from vmm import uapi as u
from vmm.errors import KvmIoctlError, VmmError
from vmm.kvm import VCpu
from vmm.memory import PAGE_SIZE
from vmm.regcheck import CR4_LA57, canonical, check_wrmsr
from vmm.x86 import VEC_GP, VEC_PF, VECTOR_NAMES
from vtl.abi import ABI, abi_ffi
from vtl.core.events import EventLog, InterceptVerdict, RegisterWritten, SecureIntercept
from vtl.core.partition import Partition
from vtl.core.privileged import RegisterWrite
from vtl.core.vp import PendingIntercept, VirtualProcessor, in_vtl1_intercept
from vtl.core.vtl import Vtl
from vtl.services.outcomes import STATUS_STOPPED_BY_VTL1, Enter, Outcome, Stop
from vtl.services.refusals import Refusals
from vtl.services.registers import Registers
from vtl.services.vtl0view import Fault, Vtl0View

GPR_ORDER = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
             "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")
ACCESS_NAMES = {ABI.VTL_ACCESS_READ: "read", ABI.VTL_ACCESS_WRITE: "write", ABI.VTL_ACCESS_EXECUTE: "execute"}
# Vectors VTL1 may choose, and which of them push an error code.
# Not 3 (#BP) and 4 (#OF): only INT3 and INTO raise them, as software exceptions, whose
# delivery needs an instruction length a verdict does not have (VM entry refuses one of 0
# where IA32_VMX_MISC[30] is clear).
INJECTABLE = {0, 1, 5, 6, 7, 8, 10, 11, 12, 13, 14, 16, 17, 18, 19, 21}
WITH_ERROR_CODE = {8, 10, 11, 12, 13, 14, 17, 21}
MSG_SIZE = abi_ffi.sizeof("struct vtl_intercept")


def verdict_problem(verdict: int, vector: int, has_ec: int, ec: int, cr2: int, *,
                    la57: bool = False) -> str | None:
    """Why VTL1's answer (vtl_intercept.verdict .. fault_cr2) is not one hardware would take,
    or None.  Every field is checked, for every verdict: the fault fields are reserved (0)
    unless the verdict injects a fault; a fault is an exception vector the CPU can deliver
    (0-31 but NMI, #BP and #OF, 9, 15, 20 and 22-31), with an error code exactly when it pushes
    one; the code's bits 31:16 are reserved (VM entry refuses them), #DF and #AC push 0,
    #PF's reserved bits 14:8 are 0 and #CP's code is 1-6 (bit 15 ENCL aside); CR2 is for
    #PF only and is a canonical linear address."""
    if verdict not in (ABI.VTL_VERDICT_INJECT_FAULT, ABI.VTL_VERDICT_ALLOW, ABI.VTL_VERDICT_STOP):
        return f"verdict {verdict:#x} is not VTL_VERDICT_INJECT_FAULT, _ALLOW or _STOP"
    if verdict != ABI.VTL_VERDICT_INJECT_FAULT:
        if vector or has_ec or ec or cr2:
            return (f"fault fields set with verdict {verdict} (vector {vector:#x}, has_error_code "
                    f"{has_ec:#x}, error code {ec:#x}, CR2 {cr2:#x}): reserved (0) unless injecting")
        return None
    name = VECTOR_NAMES.get(vector, f"vector {vector:#x}")
    if vector not in INJECTABLE:
        return f"{name} is not an exception VTL1 may inject"
    if has_ec not in (0, 1):
        return f"fault_has_error_code {has_ec:#x} is neither 0 nor 1"
    if bool(has_ec) != (vector in WITH_ERROR_CODE):
        return f"{name} {'pushes' if vector in WITH_ERROR_CODE else 'has no'} error code, " \
               f"fault_has_error_code is {has_ec}"
    if not has_ec and ec:
        return f"error code {ec:#x} given for {name}, which has none"
    if ec >> 16:
        return f"{name} error code {ec:#x} sets reserved bits 31:16"
    if vector in (8, 17) and ec:
        return f"{name} error code {ec:#x}: it is always 0"
    if vector == VEC_PF and ec & 0x7F00:
        return f"#PF error code {ec:#x} sets reserved bits 14:8"
    if vector == 21 and not 1 <= ec & 0x7FFF <= 6:
        return f"#CP error code {ec:#x} is not one of 1-6"
    if vector != VEC_PF and cr2:
        return f"CR2 {cr2:#x} given for {name}: only #PF sets CR2"
    if not canonical(cr2, la57):
        return f"CR2 {cr2:#x} is not a canonical address"
    return None


def _regs(vcpu: VCpu) -> tuple[tuple[str, int], ...]:
    r = vcpu.regs
    return tuple((n, int(getattr(r, n))) for n in (*GPR_ORDER, "rip", "rflags"))


class Intercepts:
    def __init__(self, partition: Partition, events: EventLog, refusals: Refusals,
                 registers: Registers | None = None, view: Vtl0View | None = None) -> None:
        self.p, self.events, self.refuse = partition, events, refusals
        self.registers = registers or Registers(partition)
        self.view = view or Vtl0View(partition)
        self.count = 0
        self.register_count = 0

    # --- delivery -------------------------------------------------------------------
    def memory(self, vp: VirtualProcessor, vcpu: VCpu, gpa: int, access: int, *, size: int = 0,
               data: int = 0, rip_after: bool = False, gva: int | None = None) -> Outcome:
        """`gva`: the linear address when it is not RIP (an execute intercept for the
        rest of an instruction that crosses into an NR page)."""
        return self._deliver(vp, vcpu, PendingIntercept(ABI.VTL_INTERCEPT_MEMORY, access, gpa, size, data,
                                                        vcpu.regs.rip, rip_after, _regs(vcpu), gva=gva))

    def register(self, vp: VirtualProcessor, vcpu: VCpu, w: RegisterWrite) -> Outcome:
        """A privileged-section instruction writes a register VTL1 judges."""
        return self._deliver(vp, vcpu, PendingIntercept(ABI.VTL_INTERCEPT_REGISTER, ABI.VTL_ACCESS_WRITE,
                                                        0, 0, 0, w.rip, False, _regs(vcpu), write=w))

    def msr(self, vp: VirtualProcessor, vcpu: VCpu, index: int, value: int) -> Outcome:
        if not self.p.vtl1_enabled:
            # No VTL1 to ask: the VMM applies the write (the filter only exists to ask VTL1).
            self._write_msr(vp, vcpu, index, value)
            return None
        return self._deliver(vp, vcpu, PendingIntercept(ABI.VTL_INTERCEPT_MSR, ABI.VTL_ACCESS_WRITE, 0, 8,
                                                        value, vcpu.regs.rip, False, _regs(vcpu), msr=index))

    def _write_msr(self, vp: VirtualProcessor, vcpu: VCpu, index: int, value: int) -> None:
        """Complete a filtered WRMSR as the guest's own write: a value the CPU refuses
        (vmm.regcheck.check_wrmsr: reserved bits, non-canonical, EFER.LME changed under
        paging) or that KVM refuses becomes the #GP hardware would raise, never a VMM error.
        KVM_SET_MSRS writes as the host, which KVM checks less than a guest's WRMSR: a value
        only the host may write (EFER without LME while paging) would leave a state KVM
        refuses at the vCPU's next register sync (KVM_RUN -EINVAL)."""
        run = vcpu.run
        s = vcpu.sregs
        try:
            old = vcpu.get_msrs([index]).get(index, 0)
            problem = check_wrmsr(index, value, old=old, cr0=int(s.cr0), cr4=int(s.cr4),
                                  features=self.p.cpu_features)
            if problem is None:
                vcpu.set_msrs({index: value})
        except KvmIoctlError:
            problem = "KVM refused the value"
        if problem is not None:
            run.msr.error = 1          # KVM injects #GP(0) at the WRMSR
            self.refuse.injected(vp, VEC_GP, 0, int(vcpu.regs.rip), problem, request=f"wrmsr {index:#x}",
                                 vtl=Vtl.VTL0)
            return
        run.msr.error = 0

    def _deliver(self, vp: VirtualProcessor, vcpu: VCpu, p: PendingIntercept) -> Outcome:
        ctl = vp.ctl
        assert ctl is not None and vp.active_vtl == Vtl.VTL0
        s = vcpu.sregs
        m = ctl.intercept
        abi_ffi.memmove(abi_ffi.addressof(m), bytes(MSG_SIZE), MSG_SIZE)
        m.type, m.access, m.gpa, m.rip = p.type, p.access, p.gpa, p.rip
        m.size, m.data, m.msr = p.size, p.data, p.msr
        m.flags = ABI.VTL_ICPT_F_RIP_AFTER if p.rip_after else 0
        gva = p.gva if p.gva is not None else p.rip if p.access == ABI.VTL_ACCESS_EXECUTE else None
        if gva is not None and p.type == ABI.VTL_INTERCEPT_MEMORY:
            m.gva = gva
            m.flags |= ABI.VTL_ICPT_F_GVA_VALID
        w = p.write
        if w is not None:
            # The bytes VTL0 ran (from its privileged section, which VTL1 may read anyway).
            insn = w.insn[:16]
            m.insn_len = w.length
            m.reg, m.old_value, m.new_value = w.reg, w.old, w.new
            m.old_limit, m.new_limit = w.old_limit & 0xFFFFFFFF, w.new_limit & 0xFFFFFFFF
            m.old_base, m.new_base = w.old_base, w.new_base
        else:
            insn = b"" if p.rip_after else self._vtl0_bytes(s.cr3, p.rip, 15)
        m.insn_bytes[0:len(insn)] = insn
        regs = dict(p.regs)
        for i, name in enumerate(GPR_ORDER):
            m.gprs[i] = regs[name]
        m.cr0, m.cr3, m.cr4, m.efer = s.cr0, s.cr3, s.cr4, s.efer
        ctl.entry_reason = ABI.VTL_ENTRY_INTERCEPT
        self.count += 1
        if w is not None:
            self.register_count += 1
        kind: Literal["memory", "msr", "register"] = (
            "memory" if p.type == ABI.VTL_INTERCEPT_MEMORY else "msr" if p.type == ABI.VTL_INTERCEPT_MSR
            else "register")
        if w is not None:
            segment = w.reg in (ABI.VTL_REG_LDTR, ABI.VTL_REG_TR)
            limits = segment or w.reg in (ABI.VTL_REG_GDTR, ABI.VTL_REG_IDTR)
            event = SecureIntercept(
                ts=self.events.now(), vp=vp.index, vtl=0, type=kind, access="write", rip=p.rip,
                reg=w.name, old=w.old, new=w.new, old_limit=w.old_limit if limits else None,
                new_limit=w.new_limit if limits else None, old_base=w.old_base if segment else None,
                new_base=w.new_base if segment else None, insn_len=w.length)
        else:
            event = SecureIntercept(
                ts=self.events.now(), vp=vp.index, vtl=0, type=kind, access=ACCESS_NAMES[p.access],
                gpa=p.gpa if kind == "memory" else None, gva=gva if kind == "memory" else None,
                rip=p.rip, rip_after=p.rip_after, msr=p.msr if kind == "msr" else None,
                data=p.data if p.access == ABI.VTL_ACCESS_WRITE else None)
        self.events.emit(event)
        return Enter(in_vtl1_intercept(p))

    def _vtl0_bytes(self, cr3: int, gva: int, length: int) -> bytes:
        """Up to `length` instruction bytes at `gva`, stopping at the first byte VTL0 itself
        may not read (VTL1's memory, NR pages, unmapped): the VMM reads nothing for VTL0
        that VTL0 could not."""
        out = bytearray()
        while len(out) < length:
            addr = gva + len(out)
            try:
                gpa = self.view.walk(cr3, addr).gpa       # through tables VTL0 may read
            except VmmError:
                break
            chunk = min(length - len(out), PAGE_SIZE - (addr & (PAGE_SIZE - 1)))
            if not self.view.readable(gpa, chunk):
                break
            out += self.p.mem.read(gpa, chunk)
        return bytes(out)

    # --- VTL1's answer --------------------------------------------------------------
    def complete(self, vp: VirtualProcessor, p: PendingIntercept) -> Outcome:
        """VTL1 made its VTL return: apply the verdict to VTL0 (whose registers were never
        handed to VTL1's vCPU, so they come back exactly as they were).  A verdict with any
        field hardware would not take (verdict_problem) is applied to nothing: the partition
        stops as VTL1's doing, with the reason."""
        m = vp.ctl.intercept
        verdict, vector = int(m.verdict), int(m.fault_vector)
        has_ec, ec, cr2 = int(m.fault_has_error_code), int(m.fault_error_code), int(m.fault_cr2)
        v0 = vp.vcpus[Vtl.VTL0]
        assert v0 is not None
        ev = self.events
        what = f"{p.write.name} register" if p.write is not None else \
            "MSR" if p.type == ABI.VTL_INTERCEPT_MSR else ACCESS_NAMES[p.access]
        problem = verdict_problem(verdict, vector, has_ec, ec, cr2, la57=bool(int(v0.sregs.cr4) & CR4_LA57))
        if problem is not None:
            ev.emit(InterceptVerdict(ts=ev.now(), vp=vp.index, vtl=1, verdict="invalid", detail=problem))
            return Stop(STATUS_STOPPED_BY_VTL1, "stopped_by_vtl1", f"VTL1 stopped the partition: its verdict "
                        f"on the {what} intercept at RIP {p.rip:#x} is invalid ({problem})")
        if verdict == ABI.VTL_VERDICT_STOP:
            ev.emit(InterceptVerdict(ts=ev.now(), vp=vp.index, vtl=1, verdict="stop"))
            return Stop(STATUS_STOPPED_BY_VTL1, "stopped_by_vtl1", f"VTL1 stopped the partition on a "
                        f"{what} intercept at RIP {p.rip:#x}")
        ec_or_none = ec if has_ec else None
        if p.write is not None:
            return self._complete_register(vp, v0, p.write, verdict, vector, ec_or_none, cr2)
        if verdict == ABI.VTL_VERDICT_ALLOW:
            refused = self._allow(vp, v0, p)
            if refused is None:
                ev.emit(InterceptVerdict(ts=ev.now(), vp=vp.index, vtl=1, verdict="allow"))
                return None
            verdict_name: Literal["inject_fault", "allow"] = "allow"
            detail, vector, ec_or_none = f"{refused}: #GP(0) instead", VEC_GP, 0
        else:
            verdict_name, detail = "inject_fault", ""
        self._inject(v0, p, vector, ec_or_none, cr2)
        ev.emit(InterceptVerdict(ts=ev.now(), vp=vp.index, vtl=1, verdict=verdict_name, vector=vector,
                                 error_code=ec_or_none, detail=detail))
        self.refuse.injected(vp, vector, ec_or_none, int(v0.regs.rip),
                             f"VTL1 denied a {what} intercept", vtl=Vtl.VTL0)
        return None

    def _complete_register(self, vp: VirtualProcessor, v0: VCpu, w: RegisterWrite, verdict: int,
                           vector: int, ec: int | None, cr2: int) -> Outcome:
        """ALLOW: write the register and move RIP past the instruction (a value KVM refuses
        is #GP(0) instead); INJECT_FAULT: the fault at the instruction, nothing written."""
        ev = self.events
        if verdict == ABI.VTL_VERDICT_ALLOW:
            fault = self.registers.apply(v0, w, allowed=True)
            if fault is None:
                ev.emit(InterceptVerdict(ts=ev.now(), vp=vp.index, vtl=1, verdict="allow"))
                self.written(vp, w, "allowed")
                return None
            ev.emit(InterceptVerdict(ts=ev.now(), vp=vp.index, vtl=1, verdict="allow", vector=fault.vector,
                                     error_code=fault.error_code, detail=f"{fault.reason}: #GP(0) instead"))
            self.inject(vp, v0, fault, w.rip)
            return None
        fault = Fault(vector, ec, f"VTL1 denied a {w.name} write", cr2=cr2 if vector == VEC_PF else None)
        ev.emit(InterceptVerdict(ts=ev.now(), vp=vp.index, vtl=1, verdict="inject_fault", vector=fault.vector,
                                 error_code=fault.error_code))
        self.inject(vp, v0, fault, w.rip)
        return None

    def written(self, vp: VirtualProcessor, w: RegisterWrite, how: Literal["direct", "allowed"]) -> None:
        limits = w.reg in (ABI.VTL_REG_GDTR, ABI.VTL_REG_IDTR)
        self.events.emit(RegisterWritten(
            ts=self.events.now(), vp=vp.index, vtl=0, reg=w.name, old=w.old, new=w.new, rip=w.rip,
            old_limit=w.old_limit if limits else None, new_limit=w.new_limit if limits else None, how=how))

    def inject(self, vp: VirtualProcessor, v0: VCpu, fault: Fault, rip: int,
               request: str | None = None) -> None:
        """Deliver `fault` to VTL0 at `rip` (the instruction; RIP is not moved): #PF with
        its CR2.  The events name the request when the VMM itself refused it."""
        if fault.cr2 is not None:
            v0.sregs.cr2 = fault.cr2
            v0.run.kvm_dirty_regs |= u.KVM_SYNC_X86_SREGS
        v0.inject_exception(fault.vector, fault.error_code)
        self.refuse.injected(vp, fault.vector, fault.error_code, rip, fault.reason, request=request,
                             vtl=Vtl.VTL0)

    def _allow(self, vp: VirtualProcessor, v0: VCpu, p: PendingIntercept) -> str | None:
        run = v0.run
        if p.type == ABI.VTL_INTERCEPT_MSR:
            self._write_msr(vp, v0, p.msr, p.data)
            return None
        if p.access == ABI.VTL_ACCESS_WRITE:
            if p.rip_after:   # memslot: KVM handed us the write; do it on the backing memory
                self.p.mem.write(p.gpa, p.data.to_bytes(8, "little")[:p.size])
            return None
        if p.access == ABI.VTL_ACCESS_READ:
            data = self.p.mem.read(p.gpa, p.size)
            for i, b in enumerate(data):
                run.mmio.data[i] = b
            return None
        return "allowing an instruction fetch needs a temporary mapping, not supported yet"

    def _inject(self, v0: VCpu, p: PendingIntercept, vector: int, ec: int | None, cr2: int) -> None:
        run = v0.run
        if p.type == ABI.VTL_INTERCEPT_MSR and vector == VEC_GP and ec == 0:
            run.msr.error = 1         # KVM injects #GP(0) at the WRMSR itself
            return
        if p.type == ABI.VTL_INTERCEPT_MSR:
            run.msr.error = 0         # finish the exit without the write, then rewind
        v0.complete_pending_io()
        if p.type == ABI.VTL_INTERCEPT_MSR or (p.access == ABI.VTL_ACCESS_READ and not p.rip_after):
            r = v0.regs
            for name, value in p.regs:   # undo the emulated load: a precise fault
                setattr(r, name, value)
            run.kvm_dirty_regs |= u.KVM_SYNC_X86_REGS
        if vector == VEC_PF:
            v0.sregs.cr2 = cr2
            run.kvm_dirty_regs |= u.KVM_SYNC_X86_SREGS
        v0.inject_exception(vector, ec)
