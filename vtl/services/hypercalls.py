"""Hypercalls from guests to the VMM (VTL_PORT_HYPERCALL).

RAX = code; RDI, RSI, RDX = arguments; result RAX = status, RDX = value.  The
source VTL is the VM the exit came from, so it cannot be forged.  Every argument
is untrusted: bad input gets a status code, never an exception.

A handler returns a `Reply` (status, and the reason when it refuses) or an outcome
for the scheduler (`EnableVtl1`).  A new hypercall is one handler and one table row.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from vmm import uapi as u
from vmm.kvm import VCpu
from vmm.memattr import describe
from vmm.x86 import VEC_GP
from vtl.abi import ABI, abi_ffi
from vtl.core.events import EventLog, ProtectionChanged
from vtl.core.partition import Partition
from vtl.core.vp import IN_VTL1_CALL, OFFLINE, RestartRequest, VirtualProcessor
from vtl.core.vtl import Vtl
from vtl.services.outcomes import (
    EnableVtl1,
    Outcome,
    ReadVpRegister,
    Reset,
    SaveSnapshot,
    SendIpi,
    StartVp,
    WithOthersPaused,
)
from vtl.services.privileged import PrivilegedSection
from vtl.services.protection import Vtl0Protection
from vtl.services.refusals import STATUS_NAMES, Refusals
from vtl.services.registers import read_register
from vtl.services.reports import Reports


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    reason: str = ""         # why, when status is an error


Handler = Callable[[VirtualProcessor, VCpu],
                   "Reply | EnableVtl1 | Reset | StartVp | SendIpi | ReadVpRegister | SaveSnapshot "
                   "| WithOthersPaused"]
RESTART_SIZE = abi_ffi.sizeof("struct vtl_restart")
START_VP_SIZE = abi_ffi.sizeof("struct vtl_start_vp")
VTL0_ONLY, VTL1_ONLY, ANY_VTL = frozenset({Vtl.VTL0}), frozenset({Vtl.VTL1}), frozenset(Vtl)


class Hypercalls:
    def __init__(self, partition: Partition, events: EventLog, refusals: Refusals, reports: Reports,
                 protection: Vtl0Protection, privileged: PrivilegedSection | None = None) -> None:
        self.p, self.events, self.refuse = partition, events, refusals
        self.reports, self.protection, self.privileged = reports, protection, privileged
        # code -> (handler, VTLs allowed to call it)
        self.table: dict[int, tuple[Handler, frozenset[Vtl]]] = {
            ABI.VTL_HC_ENABLE_VTL1: (self.enable_vtl1, VTL0_ONLY),
            ABI.VTL_HC_REPORT: (self.report, ANY_VTL),
            ABI.VTL_HC_GET_VP_REGISTER: (self.get_vp_register, VTL1_ONLY),
            ABI.VTL_HC_MODIFY_VTL_PROTECTION: (self.modify_vtl_protection, VTL1_ONLY),
            ABI.VTL_HC_RESET: (self.reset, ANY_VTL),
            ABI.VTL_HC_START_VP: (self.start_vp, ANY_VTL),
            ABI.VTL_HC_SEND_IPI: (self.send_ipi, ANY_VTL),
            ABI.VTL_HC_SNAPSHOT: (self.snapshot, VTL0_ONLY),
            ABI.VTL_HC_VTL0_RESTART: (self.vtl0_restart, VTL1_ONLY),
        }
        if privileged is not None:
            self.table[ABI.VTL_HC_SET_INTERCEPT_CONTROL] = (self.set_intercept_control, VTL1_ONLY)

    def handle(self, vp: VirtualProcessor, vcpu: VCpu) -> Outcome:
        regs = vcpu.regs
        vtl = vp.active_vtl
        if vcpu.sregs.cs.selector & 3:
            self.refuse.fault(vp, vcpu, "hypercall", "hypercall from CPL3", VEC_GP, 0)
            return None
        code = regs.rax
        entry = self.table.get(code)
        if entry is None:
            self.refuse.status(vp, vcpu, f"hypercall {code:#x}", "unknown hypercall code",
                               ABI.VTL_E_INVALID_CODE)
            return None
        handler, allowed = entry
        if vtl not in allowed:
            self.refuse.status(vp, vcpu, f"hypercall {code:#x}",
                               f"hypercall {code:#x} is not available to VTL{int(vtl)}",
                               ABI.VTL_E_ACCESS_DENIED)
            return None
        reply = handler(vp, vcpu)
        if not isinstance(reply, Reply):           # an outcome for the scheduler
            return reply
        self.answer(vp, vcpu, code, reply)
        return None

    def enable_vtl1(self, vp: VirtualProcessor, vcpu: VCpu) -> Reply | EnableVtl1:
        if self.p.vtl1_image is None:
            return Reply(int(ABI.VTL_E_DISABLED), "VTL1 is disabled for this partition (--no-vtl1)")
        if self.p.vtl1_enabled:
            return Reply(int(ABI.VTL_E_ALREADY_ENABLED), "VTL1 is already enabled")
        if any(other.state is not OFFLINE for other in self.p.vps[1:]):
            # Their VTL1 would never have initialised: VTL1 starts on every VP, then the APs.
            return Reply(int(ABI.VTL_E_BUSY), "APs are running: enable VTL1 before starting them")
        # On success VTL1 runs next; VTL0's RAX is set when VTL1 first returns.
        return EnableVtl1()

    def reset(self, vp: VirtualProcessor, vcpu: VCpu) -> Reset:
        return Reset(f"vtl{int(vp.active_vtl)}", "VTL_HC_RESET")

    def start_vp(self, vp: VirtualProcessor, vcpu: VCpu) -> Reply | StartVp:
        """Validate and copy a struct vtl_start_vp; the scheduler starts the AP (whether it
        is still offline is the scheduler's to decide: VTL_E_BUSY)."""
        vtl, gpa = vp.active_vtl, vcpu.regs.rdi
        if vtl == Vtl.VTL0 and self.p.vtl1_enabled:
            return Reply(int(ABI.VTL_E_ACCESS_DENIED),
                         "VTL1 is enabled: VTL1 starts the APs (VTL_CALL_START_AP)")
        lay = self.p.layout
        if not (lay.in_memory(gpa, START_VP_SIZE) and self.reports.readable(vtl, gpa, START_VP_SIZE)):
            return Reply(int(ABI.VTL_E_OUT_OF_RANGE), f"struct vtl_start_vp at {gpa:#x} is not memory "
                         f"VTL{int(vtl)} may read")
        raw = self.p.mem.read(gpa, START_VP_SIZE)            # copied once, then checked
        r = abi_ffi.from_buffer("struct vtl_start_vp *", bytearray(raw))
        index, rip, rsp, cr3 = int(r.vp_index), int(r.rip), int(r.rsp), int(r.cr3)
        start, end = self.p.kernel_range
        if not 1 <= index < len(self.p.vps):
            return Reply(int(ABI.VTL_E_INVALID_ARG), f"no AP {index} (APs are 1 to {len(self.p.vps) - 1})")
        if r.flags:
            return Reply(int(ABI.VTL_E_INVALID_ARG), f"unknown flags {r.flags:#x}")
        if not start <= rip < end:
            return Reply(int(ABI.VTL_E_INVALID_ARG), f"rip {rip:#x} is outside the running VTL0 kernel "
                         f"{start:#x}-{end:#x}")
        if not lay.in_vtl0(rsp - 8, 8):
            return Reply(int(ABI.VTL_E_INVALID_ARG), f"rsp {rsp:#x} is not in VTL0 memory")
        if cr3 & 0xFFF or not lay.in_vtl0(cr3, 4096):
            return Reply(int(ABI.VTL_E_INVALID_ARG), f"cr3 {cr3:#x} is not a page of VTL0 memory")
        return StartVp(index, rip, rsp, cr3, int(r.arg))

    def send_ipi(self, vp: VirtualProcessor, vcpu: VCpu) -> Reply | SendIpi:
        target = vcpu.regs.rdi
        if target >= len(self.p.vps):
            return Reply(int(ABI.VTL_E_INVALID_ARG), f"no VP {target}")
        return SendIpi(int(target))

    def snapshot(self, vp: VirtualProcessor, vcpu: VCpu) -> Reply | SaveSnapshot:
        """Whether a snapshot can be taken (a directory, none taken yet) is the scheduler's
        to decide: it holds the run's snapshot settings."""
        return SaveSnapshot()

    def vtl0_restart(self, vp: VirtualProcessor, vcpu: VCpu) -> Reply:
        """Validate and copy VTL1's struct vtl_restart; the scheduler applies it at VTL1's
        VTL return (vtl/lifecycle/restart.py)."""
        gpa = vcpu.regs.rdi
        if vp.state is not IN_VTL1_CALL:
            return Reply(int(ABI.VTL_E_INVALID_ARG), "VTL_HC_VTL0_RESTART outside a VTL call VTL1 serves")
        if vp.index != 0:
            # The next kernel starts on the boot VP, the APs offline: asked for on an AP, the
            # restart would take the boot VP from wherever it is (inside VTL1 perhaps).
            return Reply(int(ABI.VTL_E_INVALID_ARG), f"VTL_HC_VTL0_RESTART from VP{vp.index}: the next "
                         "kernel starts on the boot VP, which asks for it")
        lay = self.p.layout
        if not lay.vtl1_base <= gpa <= lay.vtl1_end - RESTART_SIZE:      # wholly in VTL1's region
            return Reply(int(ABI.VTL_E_OUT_OF_RANGE), "struct vtl_restart is not in VTL1's memory")
        raw = self.p.mem.read(gpa, RESTART_SIZE)             # copied once, then checked
        r = abi_ffi.from_buffer("struct vtl_restart *", bytearray(raw))
        name = bytes(abi_ffi.buffer(r.scenario))
        lo, hi = self.p.layout.image_window(Vtl.VTL0)
        if r.flags & ~ABI.VTL_RESTART_F_TEARDOWN:
            return Reply(int(ABI.VTL_E_INVALID_ARG), f"unknown restart flags {r.flags:#x}")
        if b"\0" not in name:
            return Reply(int(ABI.VTL_E_INVALID_ARG), "scenario is not NUL-terminated")
        req = RestartRequest(int(r.entry), bool(r.flags & ABI.VTL_RESTART_F_TEARDOWN),
                             int(r.image_start), int(r.image_end), int(r.param),
                             name.split(b"\0", 1)[0].decode("utf-8", "replace"))
        why = req.problem((lo, hi))
        if why is not None:
            return Reply(int(ABI.VTL_E_INVALID_ARG), why)
        vp.restart = req
        return Reply(int(ABI.VTL_OK))

    def report(self, vp: VirtualProcessor, vcpu: VCpu) -> Reply:
        status = self.reports.receive(vp.index, vp.active_vtl, vcpu.regs.rdi)
        return Reply(status, self.reports.last_error if status != ABI.VTL_OK else "")

    def get_vp_register(self, vp: VirtualProcessor, vcpu: VCpu) -> Reply | ReadVpRegister:
        regs = vcpu.regs
        index, reg = regs.rdi, regs.rsi
        if index >= len(self.p.vps):
            return Reply(int(ABI.VTL_E_INVALID_ARG), f"no VP {index}")
        if index != vp.index:
            # Another VP's VTL0 may be running: the scheduler pauses it, then reads.
            return ReadVpRegister(int(index), int(reg))
        # This VP's VTL0 vCPU is stopped while its VTL1 runs, so its synced state is current.
        return self.vp_register_reply(vp, vcpu, index, reg)

    def vp_register_reply(self, vp: VirtualProcessor, vcpu: VCpu, index: int, reg: int) -> Reply:
        """Read VP `index`'s VTL0 register `reg` into the caller's RDX (the VP is not running)."""
        target = self.p.vps[index].vcpus[Vtl.VTL0]
        assert target is not None
        value = read_register(target, reg)       # GDTR/IDTR: the base; LDTR/TR: the selector
        if value is None:
            return Reply(int(ABI.VTL_E_INVALID_ARG), f"unknown register {reg}")
        vcpu.regs.rdx = value[0]
        return Reply(int(ABI.VTL_OK))

    def answer(self, vp: VirtualProcessor, vcpu: VCpu, code: int, reply: Reply) -> None:
        """Give `reply` to the caller of hypercall `code` (a refusal is an event)."""
        if reply.status != ABI.VTL_OK:
            why = reply.reason or STATUS_NAMES.get(reply.status, str(reply.status))
            self.refuse.status(vp, vcpu, f"hypercall {code:#x}", why, reply.status)
            return
        vcpu.regs.rax = reply.status
        vcpu.run.kvm_dirty_regs |= u.KVM_SYNC_X86_REGS

    def set_intercept_control(self, vp: VirtualProcessor, vcpu: VCpu) -> Reply:
        assert self.privileged is not None
        status, reason = self.privileged.set_control(vp, vcpu.regs.rdi)
        return Reply(status, reason)

    def modify_vtl_protection(self, vp: VirtualProcessor, vcpu: VCpu) -> Reply | WithOthersPaused:
        if len(self.p.vps) > 1 and not self.p.backend.atomic:
            # Memslots are split by deleting and re-creating: no other VP may run meanwhile.
            def action() -> None:
                self.answer(vp, vcpu, ABI.VTL_HC_MODIFY_VTL_PROTECTION, self._modify(vp, vcpu))
            return WithOthersPaused(action)
        return self._modify(vp, vcpu)

    def _modify(self, vp: VirtualProcessor, vcpu: VCpu) -> Reply:
        regs = vcpu.regs
        out = self.protection.modify(regs.rdi, vp.active_vtl)
        regs.rdx = out.next_index
        if out.pages:
            self.events.emit(ProtectionChanged(
                ts=self.events.now(), vp=vp.index, vtl=vp.active_vtl, target_vtl=0,
                attributes=describe(out.attributes), pages=out.pages, ranges=out.ranges,
                backend_ops=out.ops))
        return Reply(out.status, out.reason)
