"""Hypercalls from guests to the VMM (VTL_PORT_HYPERCALL).

RAX = code; RDI, RSI, RDX = arguments; result RAX = status, RDX = value.  The
source VTL is the VM the exit came from, so it cannot be forged.  Every
argument is untrusted: bad input gets a status code, never an exception.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from vmm import uapi as u
from vmm.kvm import VCpu
from vmm.memattr import describe
from vmm.x86 import VEC_GP
from vtl.abi import ABI
from vtl.events import ProtectionChanged

if TYPE_CHECKING:
    from vtl.partition import VirtualProcessor
    from vtl.scheduler import Scheduler

MAX_BENCH_STAMPS = 1 << 21

Handler = Callable[["VirtualProcessor", VCpu], "int | None"]


class Hypercalls:
    def __init__(self, sched: Scheduler) -> None:
        self.s = sched
        self.detail = ""        # why the last handler refused, for the event
        # code -> (handler, VTLs allowed to call it)
        self.table: dict[int, tuple[Handler, frozenset[int]]] = {
            ABI.VTL_HC_ENABLE_VTL1: (self.enable_vtl1, frozenset({0})),
            ABI.VTL_HC_BENCH_REPORT: (self.bench_report, frozenset({0})),
            ABI.VTL_HC_GET_VP_REGISTER: (self.get_vp_register, frozenset({1})),
            ABI.VTL_HC_MODIFY_VTL_PROTECTION: (self.modify_vtl_protection, frozenset({1})),
        }

    def handle(self, vp: VirtualProcessor, vcpu: VCpu) -> None:
        regs = vcpu.regs
        if vcpu.sregs.cs.selector & 3:
            return self.s._refuse_fault(vp, vcpu, "hypercall", "hypercall from CPL3", VEC_GP, 0)
        code = regs.rax
        entry = self.table.get(code)
        if entry is None:
            return self.s._refuse_status(vp, vcpu, f"hypercall {code:#x}", "unknown hypercall code",
                                         ABI.VTL_E_INVALID_CODE)
        handler, allowed = entry
        if vp.active_vtl not in allowed:
            return self.s._refuse_status(vp, vcpu, f"hypercall {code:#x}",
                                         f"hypercall {code:#x} is not available to VTL{vp.active_vtl}",
                                         ABI.VTL_E_ACCESS_DENIED)
        self.detail = ""
        status = handler(vp, vcpu)
        if status is not None:
            if status != ABI.VTL_OK:
                return self.s._refuse_status(vp, vcpu, f"hypercall {code:#x}",
                                             self.detail or ABI.names("VTL_E_").get(status, str(status)),
                                             status)
            regs.rax = status
            vcpu.run.kvm_dirty_regs |= u.KVM_SYNC_X86_REGS

    def enable_vtl1(self, vp: VirtualProcessor, vcpu: VCpu) -> int | None:
        status = self.s.p.enable_vtl1(vp)
        # On success VTL1 now runs; VTL0's RAX is set when VTL1 first returns.
        return None if status == ABI.VTL_OK else status

    def bench_report(self, vp: VirtualProcessor, vcpu: VCpu) -> int:
        regs = vcpu.regs
        gpa, count, batch = regs.rdi, regs.rsi, regs.rdx
        if not (0 < count <= MAX_BENCH_STAMPS) or not (0 < batch < 1 << 32):
            return int(ABI.VTL_E_INVALID_ARG)
        if not self.s.p.layout.in_vtl0(gpa, count * 8):
            return int(ABI.VTL_E_OUT_OF_RANGE)
        raw = self.s.p.mem.read(gpa, count * 8)
        self.s.bench_stamps = [int.from_bytes(raw[i:i + 8], "little") for i in range(0, len(raw), 8)]
        self.s.bench_batch = batch
        return int(ABI.VTL_OK)

    def get_vp_register(self, vp: VirtualProcessor, vcpu: VCpu) -> int:
        regs = vcpu.regs
        index, reg = regs.rdi, regs.rsi
        if index >= len(self.s.p.vps):
            return int(ABI.VTL_E_INVALID_ARG)
        # VTL0's vCPU is stopped while VTL1 runs, so its synced state is current.
        target = self.s.p.vps[index].vcpus[0].sync
        values = {
            ABI.VTL_REG_RIP: target.regs.rip, ABI.VTL_REG_RSP: target.regs.rsp,
            ABI.VTL_REG_RFLAGS: target.regs.rflags, ABI.VTL_REG_CR0: target.sregs.cr0,
            ABI.VTL_REG_CR3: target.sregs.cr3, ABI.VTL_REG_CR4: target.sregs.cr4,
            ABI.VTL_REG_EFER: target.sregs.efer,
        }
        if reg not in values:
            return int(ABI.VTL_E_INVALID_ARG)
        regs.rdx = values[reg]
        return int(ABI.VTL_OK)

    def modify_vtl_protection(self, vp: VirtualProcessor, vcpu: VCpu) -> int:
        regs = vcpu.regs
        out = self.s.p.protection.modify(regs.rdi, vp.active_vtl)
        regs.rdx = out.next_index
        if out.pages:
            self.s.events.emit(ProtectionChanged(
                ts=self.s.events.now(), vp=vp.index, vtl=vp.active_vtl, target_vtl=0,
                attributes=describe(out.attributes), pages=out.pages, ranges=out.ranges,
                memslot_ops=out.ops))
        if out.status != ABI.VTL_OK:
            self.detail = out.reason
        return out.status
