"""Every exit that is not the switch path's port I/O, decoded into a typed exit
(vmm.exits) and handed to the service that owns it.  A new exit kind goes here.

Memory exits from VTL0 are secure intercepts when VTL1 restricted the page, and
refusals (#GP) when VTL0 touched VTL1's region or memory that does not exist.  A fetch
from VTL0's privileged section goes to the privileged-instruction service
(vtl/services/privileged.py), whose `Step` outcome the scheduler carries out.
"""

from __future__ import annotations

from vmm import exits as ex
from vmm import paging
from vmm import uapi as u
from vmm.errors import VmmError
from vmm.kvm import VCpu
from vmm.memattr import NR, NW
from vmm.memory import PAGE_SIZE
from vmm.x86 import VEC_GP
from vtl.abi import ABI
from vtl.core.events import GuestFault
from vtl.core.partition import Partition
from vtl.core.vp import VirtualProcessor
from vtl.core.vtl import Vtl
from vtl.services.intercepts import Intercepts
from vtl.services.outcomes import STATUS_CRASH, Halt, Outcome, Reset, Stop
from vtl.services.privileged import PrivilegedSection
from vtl.services.refusals import Refusals
from vtl.services.vtl0view import Access, Context, Fault, InsnBytes

MAX_INSN = 15


class ExitDispatcher:
    def __init__(self, partition: Partition, refusals: Refusals, intercepts: Intercepts,
                 privileged: PrivilegedSection | None = None) -> None:
        self.p, self.refuse, self.intercepts = partition, refusals, intercepts
        self.privileged = privileged or PrivilegedSection(partition, partition.events, intercepts)
        self.view = self.privileged.view
        self.events = partition.events

    def dispatch(self, vp: VirtualProcessor, vcpu: VCpu, exit: ex.VcpuExit) -> Outcome:
        vtl = vp.active_vtl
        rip = int(vcpu.regs.rip)
        match exit:
            case ex.Mmio():
                return self._mmio(vp, vcpu, exit)
            case ex.MsrWrite() if vtl == Vtl.VTL0:
                return self.intercepts.msr(vp, vcpu, exit.index, exit.data)
            case ex.MemoryFault() if vtl == Vtl.VTL0:
                return self._memory_fault(vp, vcpu, exit)
            case ex.EmulationFailure():
                is_fetch, outcome = self._fetch_fault(vp, vcpu)
                if is_fetch:
                    return outcome
                return self.crash(vp, "crash", f"VTL{int(vtl)} instruction at RIP {rip:#x} could not be "
                                   f"emulated (bytes {exit.insn.hex() or 'unavailable'})", rip)
            case ex.Shutdown() if vtl == Vtl.VTL0 and self.p.config.reset_on_triple_fault:
                return Reset("triple_fault", f"VTL0 triple-faulted near RIP {rip:#x}")
            case ex.Shutdown():
                return self.crash(vp, "triple_fault", f"VTL{int(vtl)} triple-faulted (KVM_EXIT_SHUTDOWN) "
                                   f"near RIP {rip:#x}", rip)
            case ex.Hlt() if vtl == Vtl.VTL0 and len(self.p.vps) > 1:
                return Halt(rip)
            case ex.Hlt():
                return self.crash(vp, "halted", f"VTL{int(vtl)} halted at RIP {rip:#x} without reporting "
                                   "an exit status", rip)
            case ex.FailEntry():
                detail = f" (hardware reason {exit.reason:#x})"
            case ex.InternalError():
                detail = f" (suberror {exit.suberror})"
            case ex.RunError():
                raise VmmError(f"{exit} on VP{vp.index} VTL{int(vtl)}")
            case _:
                detail = ""
        return self.crash(vp, "crash", f"VTL{int(vtl)} stopped with unexpected exit {exit.name}{detail} "
                           f"at RIP {rip:#x}", rip)

    def crash(self, vp: VirtualProcessor, reason: str, message: str, rip: int) -> Stop:
        self.events.emit(GuestFault(ts=self.events.now(), vp=vp.index, vtl=vp.active_vtl,
                                    name=reason.replace("_", " "), rip=rip, reason=message))
        return Stop(STATUS_CRASH, reason, message)

    def _mmio(self, vp: VirtualProcessor, vcpu: VCpu, m: ex.Mmio) -> Outcome:
        access = "write" if m.is_write else "read"
        vtl = vp.active_vtl
        if vtl == Vtl.VTL0 and self.p.vtl1_enabled and self.p.layout.in_vtl0(m.gpa):
            if self.p.vtl0_attr(m.gpa) & (NW if m.is_write else NR):
                return self.intercepts.memory(
                    vp, vcpu, m.gpa, ABI.VTL_ACCESS_WRITE if m.is_write else ABI.VTL_ACCESS_READ,
                    size=m.length, data=int.from_bytes(m.data, "little"), rip_after=m.is_write)
        if vtl == Vtl.VTL0 and self.p.layout.in_vtl1(m.gpa):
            lay = self.p.layout
            if not self.p.vtl1_enabled and lay.vtl1_base <= m.gpa and m.gpa + m.length <= lay.vtl1_end:
                # No VTL1: its region is VTL0's memory, one emulated access at a time.
                if m.is_write:
                    self.p.mem.write(m.gpa, m.data)
                else:
                    ex.complete_mmio_read(vcpu, self.p.mem.read(m.gpa, m.length))
                return None
            why = "VTL0 access to VTL1 memory"
        else:
            why = f"VTL{int(vtl)} access to unbacked guest-physical address"
        if not m.is_write:
            ex.complete_mmio_read(vcpu, b"\xff" * vcpu.run.mmio.len)
        # The access never reaches memory; the fault follows the instruction (see vtl_abi.h).
        self.refuse.fault(vp, vcpu, f"memory {access}", why, VEC_GP, 0, at_port_insn=False,
                          gpa=m.gpa, access=access)
        return None

    def _fetch_fault(self, vp: VirtualProcessor, vcpu: VCpu) -> tuple[bool, Outcome]:
        """Instruction fetch from a GPA this VTL's VM does not map: for VTL0, the
        privileged section's decode (or single step), an intercept when VTL1 made the page
        NR, else #GP.  An instruction that starts in memory VTL0 may fetch and runs into
        memory it may not fetch is that second fetch.  (False, None): not a fetch fault
        but a real emulation failure."""
        rip = int(vcpu.regs.rip)
        vtl = vp.active_vtl
        try:
            if vtl == Vtl.VTL0:
                gpa = self.view.walk(vcpu.sregs.cr3, rip).gpa    # through tables VTL0 may read
            else:
                gpa = paging.walk(self.p.mem, vcpu.sregs.cr3, rip).gpa
        except VmmError:
            return False, None
        layout = self.p.layout
        if vtl == Vtl.VTL0 and self.privileged.in_section(gpa):
            return True, self.privileged.fetch(vp, vcpu)
        if vtl == Vtl.VTL0 and self.p.vtl1_enabled and layout.in_vtl0(gpa) and self.p.vtl0_attr(gpa) & NR:
            return True, self.intercepts.memory(vp, vcpu, gpa, ABI.VTL_ACCESS_EXECUTE)
        if vtl == Vtl.VTL0 and layout.in_vtl1(gpa):
            why = "VTL0 instruction fetch from VTL1 memory"
        elif gpa >= layout.mem_size:
            why = f"VTL{int(vtl)} instruction fetch from unbacked guest-physical address"
        elif vtl == Vtl.VTL0:
            blocked = self._crossing(vcpu, rip)
            if blocked is None:
                return False, None
            return True, self.privileged.blocked_fetch(vp, vcpu, blocked)
        else:
            return False, None
        vcpu.inject_exception(VEC_GP, 0)
        self.refuse.injected(vp, VEC_GP, 0, rip, why, request="instruction fetch", gpa=gpa, access="execute")
        return True, None

    def _crossing(self, vcpu: VCpu, rip: int) -> int | None:
        """The first byte of [rip, rip+15) VTL0 may not fetch, when RIP's own page is one
        it may (an instruction running into an NR page, VTL1's region or a hole)."""
        insn = InsnBytes(self.view, Context.of(vcpu), rip, lambda _gpa: False)
        insn.scan(MAX_INSN)
        if insn.blocked_gva is None or insn.blocked_gva == rip:
            return None
        # Only a fault the CPU would see on the fetch itself: a byte whose page does not
        # translate is a #PF the CPU raises before KVM ever exits, not an emulation failure.
        t = self.view.translate(Context.of(vcpu), insn.blocked_gva, Access.FETCH)
        return None if isinstance(t, Fault) and not t.refusal else insn.blocked_gva

    def _memory_fault(self, vp: VirtualProcessor, vcpu: VCpu, mf: ex.MemoryFault) -> Outcome:
        """KVM_EXIT_MEMORY_FAULT: the rwx backend (flags say the access), or a host-mapping
        protection on an EPT host (KVM_RUN -EFAULT, flags without the access type: it is
        derived from the page's attributes and RIP).  RIP is at the access, not after."""
        vcpu.run.exit_reason = u.KVM_EXIT_UNKNOWN    # never mistake it for a later -EFAULT's
        if not self.p.vtl1_enabled or not self.p.layout.in_vtl0(mf.gpa):
            return self.crash(vp, "crash", f"memory fault at GPA {mf.gpa:#x} with no VTL1 to ask",
                               int(vcpu.regs.rip))
        if mf.exec or mf.write or mf.read:
            access = (ABI.VTL_ACCESS_EXECUTE if mf.exec else
                      ABI.VTL_ACCESS_WRITE if mf.write else ABI.VTL_ACCESS_READ)
        else:
            try:
                fetch = self.view.walk(vcpu.sregs.cr3, int(vcpu.regs.rip)).gpa // PAGE_SIZE \
                    == mf.gpa // PAGE_SIZE
            except VmmError:
                fetch = False
            access = (ABI.VTL_ACCESS_EXECUTE if fetch else ABI.VTL_ACCESS_READ
                      if self.p.vtl0_attr(mf.gpa) & NR else ABI.VTL_ACCESS_WRITE)
        if access == ABI.VTL_ACCESS_EXECUTE and self.privileged.in_section(mf.gpa):
            return self.privileged.fetch(vp, vcpu)
        return self.intercepts.memory(vp, vcpu, mf.gpa, access, size=mf.size)
