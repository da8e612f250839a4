"""Refusing a guest request the way hardware or Hyper-V would: a status in RAX, or a
fault injected into the requesting vCPU.  Every refusal is an event."""

from __future__ import annotations

from collections.abc import Callable

from vmm import paging
from vmm import uapi as u
from vmm.errors import VmmError
from vmm.kvm import VCpu
from vmm.memory import GuestMemory
from vmm.x86 import VECTOR_NAMES
from vtl.abi import ABI
from vtl.core.events import EventLog, GuestFault, RefusedRequest
from vtl.core.layout import Layout
from vtl.core.vp import VirtualProcessor
from vtl.core.vtl import Vtl

STATUS_NAMES = ABI.names("VTL_E_")


def fault_name(vector: int, error_code: int | None) -> str:
    return VECTOR_NAMES.get(vector, str(vector)) + ("" if error_code is None else f"({error_code})")


class Refusals:
    def __init__(self, mem: GuestMemory, layout: Layout, events: EventLog,
                 vtl0_readable: Callable[[int, int], bool] | None = None) -> None:
        """`vtl0_readable(gpa, length)`: memory VTL0 may read (default: VTL0's region;
        the scheduler passes one that also refuses the pages VTL1 made NR)."""
        self.mem, self.layout, self.events = mem, layout, events
        self.vtl0_readable = vtl0_readable or layout.in_vtl0

    def status(self, vp: VirtualProcessor, vcpu: VCpu, request: str, reason: str, status: int) -> None:
        """Answer with `status` in RAX."""
        vcpu.regs.rax = status
        vcpu.run.kvm_dirty_regs |= u.KVM_SYNC_X86_REGS
        self.events.emit(RefusedRequest(ts=self.events.now(), vp=vp.index, vtl=vp.active_vtl,
                                        request=request, reason=reason,
                                        response=STATUS_NAMES.get(status, str(status)),
                                        rip=vcpu.regs.rip))

    def fault(self, vp: VirtualProcessor, vcpu: VCpu, request: str, reason: str, vector: int,
              error_code: int | None = None, *, at_port_insn: bool = True, gpa: int | None = None,
              access: str | None = None) -> None:
        """Refuse by injecting a fault.  For a port instruction the fault is reported at the
        OUT itself, as hardware would report an I/O permission fault."""
        vcpu.complete_pending_io()
        rip = vcpu.regs.rip
        if at_port_insn:
            rip -= self._port_insn_len(vp.active_vtl, vcpu, rip)
            vcpu.regs.rip = rip
            vcpu.run.kvm_dirty_regs |= u.KVM_SYNC_X86_REGS
        vcpu.inject_exception(vector, error_code)
        self.injected(vp, vector, error_code, rip, reason, request=request, gpa=gpa, access=access)

    def injected(self, vp: VirtualProcessor, vector: int, error_code: int | None, rip: int, reason: str,
                 *, request: str | None = None, gpa: int | None = None, access: str | None = None,
                 vtl: Vtl | None = None) -> None:
        """The events of a fault already queued on VP `vp`'s vCPU of `vtl` (default: the
        VTL that made the request; a verdict from VTL1 names VTL0)."""
        name = fault_name(vector, error_code)
        ts = self.events.now()
        vtl = vp.active_vtl if vtl is None else vtl
        if request is not None:
            self.events.emit(RefusedRequest(ts=ts, vp=vp.index, vtl=vtl, request=request,
                                            reason=reason, response=name, gpa=gpa, access=access, rip=rip))
        self.events.emit(GuestFault(ts=ts, vp=vp.index, vtl=vtl, vector=vector, name=name,
                                    error_code=error_code, rip=rip, reason=reason))

    def _port_insn_len(self, vtl: Vtl, vcpu: VCpu, rip_after: int) -> int:
        """Length of the OUT that ended at `rip_after`: E6/E7 ib (2), EE/EF (1), +0x66.
        Only what the VTL itself may read is read, page tables included (for VTL0: never
        VTL1's memory, never an NR page, so not its privileged section either)."""
        readable = self.vtl0_readable if vtl == Vtl.VTL0 else self.layout.in_memory
        cr3 = vcpu.sregs.cr3
        try:
            b = b""
            for addr in range(rip_after - 3, rip_after):
                t = paging.walk(self.mem, cr3, addr, readable=lambda gpa: readable(gpa, 8))
                if not readable(t.gpa, 1):
                    return 2
                b += self.mem.read(t.gpa, 1)
        except VmmError:          # an unmapped RIP: assume the 2-byte immediate form
            return 2
        port = vcpu.run.io.port
        if b[1] in (0xE6, 0xE7) and b[2] == port:
            return 3 if b[0] == 0x66 else 2
        if b[2] in (0xEE, 0xEF):
            return 2 if b[1] == 0x66 else 1
        return 2
