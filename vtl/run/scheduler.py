"""The VP scheduler: runs the active vCPU of each VP and switches VTLs.

This is the only place that decides which vCPU of a VP runs next.  A switch
moves the shared state of DESIGN section 4 through the synced registers in
kvm_run (KVM_CAP_SYNC_REGS), so it adds no ioctl:

  shared:  RAX RBX RCX RDX RSI RDI RBP R8-R15, CR2
  private: RSP RIP RFLAGS, CR0/CR3/CR4, EFER, segments, GDTR/IDTR (each vCPU's own)
  not moved: FPU/XMM (the guests are built without them; see docs/abi.md)
"""

from __future__ import annotations

import errno
import os
import time
from collections import Counter
from collections.abc import Callable

from pydantic import BaseModel

from vmm import paging
from vmm import uapi as u
from vmm.errors import VmmError
from vmm.kvm import VCpu
from vmm.memattr import NR, NW
from vmm.uapi import ffi, libc
from vmm.x86 import VEC_GP, VEC_UD, VECTOR_NAMES
from vtl.abi import ABI
from vtl.events import GuestExit, GuestFault, RefusedRequest, VtlCall, VtlReturn
from vtl.hypercalls import Hypercalls
from vtl.intercepts import Intercepts
from vtl.partition import Partition, VirtualProcessor

EXIT_NAMES = {v: k[len("KVM_EXIT_"):].lower() for k, v in vars(u).items()
              if k.startswith("KVM_EXIT_") and k not in ("KVM_EXIT_IO_IN", "KVM_EXIT_IO_OUT")}
PORT_NAMES = {ABI.VTL_PORT_CONSOLE: "console", ABI.VTL_PORT_CALL: "vtl_call",
              ABI.VTL_PORT_RETURN: "vtl_return", ABI.VTL_PORT_RETURN_FAST: "vtl_return_fast",
              ABI.VTL_PORT_HYPERCALL: "hypercall", ABI.VTL_PORT_EXIT: "exit"}

EXIT_IO = u.KVM_EXIT_IO
SYNC_REGS, SYNC_SREGS = u.KVM_SYNC_X86_REGS, u.KVM_SYNC_X86_SREGS
VTL_ENTRY_CALL, VTL_ENTRY_NONE = ABI.VTL_ENTRY_CALL, ABI.VTL_ENTRY_NONE
VTL_ENTRY_INTERCEPT = ABI.VTL_ENTRY_INTERCEPT
PORT_RETURN_FAST = ABI.VTL_PORT_RETURN_FAST
memmove = ffi._backend.memmove   # skips cffi's Python-level wrapper on the switch path

# How a run ended, besides the guest's own status.
STATUS_CRASH = 3        # triple fault, emulation failure, halt without status
STATUS_TIMEOUT = 124
MAX_LINE = 4096


class RunResult(BaseModel):
    status: int
    reason: str             # guest_exit | triple_fault | crash | halted | timeout
    message: str
    wall_s: float
    vtl_calls: int
    vtl_returns: int
    vtl_switches: int
    exits: dict[str, int]
    vtl1_enabled: bool
    vtl1_measurement: str | None
    bench_stamps: list[int] | None = None
    bench_batch: int | None = None
    tsc_khz: int | None = None


def _printable(raw: bytes) -> str:
    # Guest output is untrusted: no terminal escapes reach the user's terminal.
    return "".join(c if (c.isprintable() or c == "\t") else f"\\x{ord(c):02x}"
                   for c in raw.decode("latin-1"))


class Scheduler:
    def __init__(self, partition: Partition, console: Callable[[str], None] | None = None) -> None:
        self.p = partition
        self.events = partition.events
        self._trace = self.events.trace
        self.console = console or (lambda line: None)
        self.console_lines: list[str] = []
        self._line: dict[int, bytearray] = {0: bytearray(), 1: bytearray()}
        self.exit_counts: Counter[str] = Counter()     # non-I/O exits by name
        self.port_counts = [0] * 65536                 # I/O exits by port
        self.vtl_calls = 0
        self.vtl_returns = 0
        self.result: RunResult | None = None
        self._stop_reason: str | None = None
        self._t0 = 0.0
        self.hypercalls = Hypercalls(self)
        self.intercepts = Intercepts(self)
        self._io: dict[int, Callable[[VirtualProcessor, VCpu], None]] = {
            ABI.VTL_PORT_CONSOLE: self._on_console,
            ABI.VTL_PORT_CALL: self._on_vtl_call,
            ABI.VTL_PORT_RETURN: self._on_vtl_return,
            ABI.VTL_PORT_RETURN_FAST: self._on_vtl_return,
            ABI.VTL_PORT_HYPERCALL: self.hypercalls.handle,
            ABI.VTL_PORT_EXIT: self._on_exit_port,
        }
        self.bench_stamps: list[int] | None = None
        self.bench_batch: int | None = None

    # --- the loop ------------------------------------------------------------------
    def run(self) -> RunResult:
        self._t0 = time.perf_counter()
        vp = self.p.vps[0]
        ioctl, kvm_run, null = libc.ioctl, u.KVM_RUN, ffi.NULL
        handlers = self._io
        port_counts = self.port_counts
        try:
            while self.result is None:
                vcpu = vp.current
                if ioctl(vcpu.fd, kvm_run, null) < 0:
                    self._run_failed(vp, vcpu, ffi.errno)
                    continue
                words = vcpu.words
                if words[2] == EXIT_IO:
                    io = words[8]                       # direction | size << 8 | port << 16
                    port = io >> 16
                    port_counts[port] += 1
                    handler = handlers.get(port)
                    if handler is not None and io & 0xFF == u.KVM_EXIT_IO_OUT:
                        handler(vp, vcpu)
                    else:
                        self._unknown_port(vp, vcpu)
                else:
                    self._other_exit(vp, vcpu, words[2])
        finally:
            self._flush_console()
        assert self.result is not None
        return self.result

    def stop(self, reason: str) -> None:
        """Ask the loop to stop (any thread): the next KVM_RUN returns at once."""
        self._stop_reason = reason
        for vp in self.p.vps:
            for vcpu in vp.vcpus.values():
                vcpu.run.immediate_exit = 1

    def _finish(self, status: int, reason: str, message: str, vp: int = 0, vtl: int = 0) -> None:
        self.events.emit(GuestExit(ts=self.events.now(), vp=vp, vtl=vtl, status=status, reason=reason))
        tsc = None
        if self.bench_stamps:
            tsc = self.p.vps[0].vcpus[0].tsc_khz()
        self.result = RunResult(
            status=status, reason=reason, message=message,
            wall_s=round(time.perf_counter() - self._t0, 6),
            vtl_calls=self.vtl_calls, vtl_returns=self.vtl_returns,
            vtl_switches=self.vtl_calls + self.vtl_returns,
            exits=self.exits_by_reason(), vtl1_enabled=self.p.vtl1_enabled,
            vtl1_measurement=self.p.vtl1_measurement,
            bench_stamps=self.bench_stamps, bench_batch=self.bench_batch, tsc_khz=tsc)

    def exits_by_reason(self) -> dict[str, int]:
        out = dict(self.exit_counts)
        for port, n in enumerate(self.port_counts):
            if n:
                out[f"io:{PORT_NAMES.get(port, hex(port))}"] = n
        return out

    def _run_failed(self, vp: VirtualProcessor, vcpu: VCpu, err: int) -> None:
        if err in (errno.EINTR, errno.EAGAIN):
            if self._stop_reason is not None:
                vcpu.run.immediate_exit = 0
                self._finish(STATUS_TIMEOUT, "timeout", self._stop_reason, vp.index, vp.active_vtl)
            return
        raise VmmError(f"KVM_RUN on VP{vp.index} VTL{vp.active_vtl} failed: "
                       f"{errno.errorcode.get(err, err)} ({os.strerror(err)})")

    # --- VTL switch (hot path) ----------------------------------------------------------
    def _on_vtl_call(self, vp: VirtualProcessor, vcpu: VCpu) -> None:
        sw = vp.switch
        if vp.active_vtl or vcpu.cs.selector & 3 or sw is None:
            return self._refuse_vtl_call(vp, vcpu)
        r0 = vcpu.regs
        ctl = sw.ctl
        ctl.entry_reason = sw.reason = VTL_ENTRY_CALL
        ctl.vtl0_rax = r0.rax
        ctl.vtl0_rcx = r0.rcx
        memmove(sw.lo1, sw.lo0, 48)
        memmove(sw.hi1, sw.hi0, 72)
        cr2 = sw.cr2_0[0]
        if cr2 != sw.cr2_1[0]:
            sw.cr2_1[0] = cr2
            sw.dirty1[0] = SYNC_REGS | SYNC_SREGS
        else:
            sw.dirty1[0] = SYNC_REGS
        vp.active_vtl = 1
        vp.current = sw.v1
        self.vtl_calls += 1
        if self._trace:
            self.events.emit(VtlCall(ts=self.events.now(), vp=vp.index, vtl=0,
                                     code=ctl.vtl0_rax, arg=ctl.vtl0_rcx))

    def _refuse_vtl_call(self, vp: VirtualProcessor, vcpu: VCpu) -> None:
        if vp.active_vtl != 0:
            return self._refuse_fault(vp, vcpu, "vtl_call", "VTL call from VTL1 (the highest VTL)", VEC_UD)
        if vcpu.cs.selector & 3:
            return self._refuse_fault(vp, vcpu, "vtl_call", "VTL call from CPL3", VEC_GP, 0)
        return self._refuse_status(vp, vcpu, "vtl_call", "VTL1 is not enabled", ABI.VTL_E_NOT_ENABLED)

    def _on_vtl_return(self, vp: VirtualProcessor, vcpu: VCpu) -> None:
        sw = vp.switch
        if vp.active_vtl != 1 or vcpu.cs.selector & 3 or sw is None:
            return self._refuse_vtl_return(vp, vcpu)
        v0 = sw.v0
        fast = vcpu.words[8] >> 16 == PORT_RETURN_FAST
        if sw.reason == VTL_ENTRY_INTERCEPT:
            self.vtl_returns += 1
            return self.intercepts.complete(vp)
        if sw.reason == VTL_ENTRY_NONE:
            # End of the enable flow: VTL0's registers are untouched but for the status.
            v0.regs.rax = ABI.VTL_OK
            sw.dirty0[0] = SYNC_REGS
        else:
            memmove(sw.lo0, sw.lo1, 48)
            memmove(sw.hi0, sw.hi1, 72)
            if not fast:
                r0, ctl = v0.regs, sw.ctl
                r0.rax = ctl.vtl0_rax
                r0.rcx = ctl.vtl0_rcx
            cr2 = sw.cr2_1[0]
            if cr2 != sw.cr2_0[0]:
                sw.cr2_0[0] = cr2
                sw.dirty0[0] = SYNC_REGS | SYNC_SREGS
            else:
                sw.dirty0[0] = SYNC_REGS
        vp.active_vtl = 0
        vp.current = v0
        self.vtl_returns += 1
        if self._trace:
            self.events.emit(VtlReturn(ts=self.events.now(), vp=vp.index, vtl=1, fast=fast,
                                       status=v0.regs.rax))

    def _refuse_vtl_return(self, vp: VirtualProcessor, vcpu: VCpu) -> None:
        if vp.active_vtl != 1:
            return self._refuse_fault(vp, vcpu, "vtl_return", "VTL return from VTL0", VEC_UD)
        return self._refuse_fault(vp, vcpu, "vtl_return", "VTL return from CPL3", VEC_GP, 0)

    # --- other ports ----------------------------------------------------------------
    def _on_console(self, vp: VirtualProcessor, vcpu: VCpu) -> None:
        run = vcpu.run
        byte = vcpu.run_buf[run.io.data_offset]
        buf = self._line[vp.active_vtl]
        if byte == b"\n":
            self._emit_line(buf)
        elif len(buf) < MAX_LINE:
            buf += byte

    def _emit_line(self, buf: bytearray) -> None:
        line = _printable(bytes(buf))
        buf.clear()
        self.console_lines.append(line)
        self.console(line)

    def _flush_console(self) -> None:
        for buf in self._line.values():
            if buf:
                self._emit_line(buf)

    def _on_exit_port(self, vp: VirtualProcessor, vcpu: VCpu) -> None:
        run = vcpu.run
        size = run.io.size
        data = bytes(vcpu.run_buf[run.io.data_offset:run.io.data_offset + size])
        status = int.from_bytes(data, "little")
        self._finish(status, "guest_exit", f"VTL{vp.active_vtl} reported exit status {status:#x}",
                     vp.index, vp.active_vtl)

    def _unknown_port(self, vp: VirtualProcessor, vcpu: VCpu) -> None:
        run = vcpu.run
        if run.io.direction == u.KVM_EXIT_IO_IN:
            # No device here: reads float high, as on an empty ISA bus.
            off = run.io.data_offset
            vcpu.run_buf[off:off + run.io.size * run.io.count] = b"\xff" * (run.io.size * run.io.count)

    # --- refusals -------------------------------------------------------------------
    def _refuse_status(self, vp: VirtualProcessor, vcpu: VCpu, request: str, reason: str,
                       status: int) -> None:
        vcpu.regs.rax = status
        vcpu.run.kvm_dirty_regs |= u.KVM_SYNC_X86_REGS
        self.events.emit(RefusedRequest(ts=self.events.now(), vp=vp.index, vtl=vp.active_vtl,
                                        request=request, reason=reason,
                                        response=ABI.names("VTL_E_").get(status, str(status)),
                                        rip=vcpu.regs.rip))

    def _refuse_fault(self, vp: VirtualProcessor, vcpu: VCpu, request: str, reason: str,
                      vector: int, error_code: int | None = None, *, at_port_insn: bool = True,
                      gpa: int | None = None, access: str | None = None) -> None:
        """Refuse by injecting a fault.  For a port instruction the fault is reported at the
        OUT itself, as hardware would report an I/O permission fault."""
        vcpu.complete_pending_io()
        rip = vcpu.regs.rip
        if at_port_insn:
            rip -= self._port_insn_len(vcpu, rip)
            vcpu.regs.rip = rip
            vcpu.run.kvm_dirty_regs |= u.KVM_SYNC_X86_REGS
        vcpu.inject_exception(vector, error_code)
        name = VECTOR_NAMES.get(vector, str(vector)) + ("" if error_code is None else f"({error_code})")
        ts = self.events.now()
        self.events.emit(RefusedRequest(ts=ts, vp=vp.index, vtl=vp.active_vtl, request=request,
                                        reason=reason, response=name, gpa=gpa, access=access, rip=rip))
        self.events.emit(GuestFault(ts=ts, vp=vp.index, vtl=vp.active_vtl, vector=vector, name=name,
                                    error_code=error_code, rip=rip, reason=reason))

    def _port_insn_len(self, vcpu: VCpu, rip_after: int) -> int:
        """Length of the OUT that ended at `rip_after`: E6/E7 ib (2), EE/EF (1), +0x66."""
        try:
            b = paging.read_virt(self.p.mem, vcpu.sregs.cr3, rip_after - 3, 3)
        except Exception:
            return 2
        port = vcpu.run.io.port
        if b[1] in (0xE6, 0xE7) and b[2] == port:
            return 3 if b[0] == 0x66 else 2
        if b[2] in (0xEE, 0xEF):
            return 2 if b[1] == 0x66 else 1
        return 2

    # --- non-I/O exits -----------------------------------------------------------------
    def _other_exit(self, vp: VirtualProcessor, vcpu: VCpu, reason: int) -> None:
        name = EXIT_NAMES.get(reason, str(reason))
        self.exit_counts[name] += 1
        run = vcpu.run
        vtl = vp.active_vtl
        rip = vcpu.regs.rip
        if reason == u.KVM_EXIT_MMIO:
            return self._on_mmio(vp, vcpu)
        if reason == u.KVM_EXIT_X86_WRMSR and vtl == 0:
            return self.intercepts.msr(vp, vcpu)
        if reason == u.KVM_EXIT_MEMORY_FAULT and vtl == 0:
            return self._on_memory_fault(vp, vcpu)
        if reason == u.KVM_EXIT_INTERNAL_ERROR and run.internal.suberror == u.KVM_INTERNAL_ERROR_EMULATION:
            if self._on_fetch_fault(vp, vcpu):
                return
            insn = bytes(run.emulation_failure.insn_bytes[0:run.emulation_failure.insn_size])
            return self._crash(vp, "crash", f"VTL{vtl} instruction at RIP {rip:#x} could not be "
                               f"emulated (bytes {insn.hex() or 'unavailable'})", rip)
        if reason == u.KVM_EXIT_SHUTDOWN:
            return self._crash(vp, "triple_fault", f"VTL{vtl} triple-faulted (KVM_EXIT_SHUTDOWN) "
                               f"near RIP {rip:#x}", rip)
        if reason == u.KVM_EXIT_HLT:
            return self._crash(vp, "halted", f"VTL{vtl} halted at RIP {rip:#x} without reporting "
                               "an exit status", rip)
        if reason == u.KVM_EXIT_INTR and self._stop_reason is not None:
            return self._finish(STATUS_TIMEOUT, "timeout", self._stop_reason, vp.index, vtl)
        if reason == u.KVM_EXIT_INTR:
            return
        detail = ""
        if reason == u.KVM_EXIT_FAIL_ENTRY:
            detail = f" (hardware reason {run.fail_entry.hardware_entry_failure_reason:#x})"
        elif reason == u.KVM_EXIT_INTERNAL_ERROR:
            detail = f" (suberror {run.internal.suberror})"
        self._crash(vp, "crash", f"VTL{vtl} stopped with unexpected exit {name}{detail} at RIP {rip:#x}", rip)

    def _crash(self, vp: VirtualProcessor, reason: str, message: str, rip: int) -> None:
        self.events.emit(GuestFault(ts=self.events.now(), vp=vp.index, vtl=vp.active_vtl,
                                    name=reason.replace("_", " "), rip=rip, reason=message))
        self._finish(STATUS_CRASH, reason, message, vp.index, vp.active_vtl)

    def _on_mmio(self, vp: VirtualProcessor, vcpu: VCpu) -> None:
        run = vcpu.run
        gpa, write = run.mmio.phys_addr, bool(run.mmio.is_write)
        access = "write" if write else "read"
        if vp.active_vtl == 0 and self.p.vtl1_enabled and self.p.layout.in_vtl0(gpa):
            attrs = self.p.protection.get(gpa)
            if attrs & (NW if write else NR):
                return self.intercepts.memory(
                    vp, vcpu, gpa, ABI.VTL_ACCESS_WRITE if write else ABI.VTL_ACCESS_READ,
                    size=run.mmio.len, data=int.from_bytes(bytes(run.mmio.data), "little"),
                    rip_after=write)
        if vp.active_vtl == 0 and self.p.layout.in_vtl1(gpa):
            why = "VTL0 access to VTL1 memory"
        else:
            why = f"VTL{vp.active_vtl} access to unbacked guest-physical address"
        if not write:
            for i in range(8):
                run.mmio.data[i] = 0xFF
        # The access never reaches memory; the fault follows the instruction (see vtl_abi.h).
        self._refuse_fault(vp, vcpu, f"memory {access}", why, VEC_GP, 0, at_port_insn=False,
                           gpa=gpa, access=access)

    def _on_fetch_fault(self, vp: VirtualProcessor, vcpu: VCpu) -> bool:
        """Instruction fetch from a GPA this VTL's VM does not map: refuse with #GP."""
        rip = vcpu.regs.rip
        try:
            gpa = paging.walk(self.p.mem, vcpu.sregs.cr3, rip).gpa
        except Exception:
            return False
        layout = self.p.layout
        if vp.active_vtl == 0 and self.p.vtl1_enabled and layout.in_vtl0(gpa) \
                and self.p.protection.get(gpa) & NR:
            self.intercepts.memory(vp, vcpu, gpa, ABI.VTL_ACCESS_EXECUTE)
            return True
        if vp.active_vtl == 0 and layout.in_vtl1(gpa):
            why = "VTL0 instruction fetch from VTL1 memory"
        elif gpa >= layout.mem_size:
            why = f"VTL{vp.active_vtl} instruction fetch from unbacked guest-physical address"
        else:
            return False
        vcpu.inject_exception(VEC_GP, 0)
        ts = self.events.now()
        self.events.emit(RefusedRequest(ts=ts, vp=vp.index, vtl=vp.active_vtl, request="instruction fetch",
                                        reason=why, response="#GP(0)", gpa=gpa, access="execute", rip=rip))
        self.events.emit(GuestFault(ts=ts, vp=vp.index, vtl=vp.active_vtl, vector=VEC_GP, name="#GP(0)",
                                    error_code=0, rip=rip, reason=why))
        return True


    def _on_memory_fault(self, vp: VirtualProcessor, vcpu: VCpu) -> None:
        """rwx hosts: KVM_EXIT_MEMORY_FAULT carries the access type; RIP is at the access."""
        mf = vcpu.run.memory_fault
        flags = int(mf.flags)
        access = (ABI.VTL_ACCESS_EXECUTE if flags & u.KVM_MEMORY_EXIT_FLAG_EXEC else
                  ABI.VTL_ACCESS_WRITE if flags & u.KVM_MEMORY_EXIT_FLAG_WRITE else ABI.VTL_ACCESS_READ)
        if not self.p.vtl1_enabled or not self.p.layout.in_vtl0(int(mf.gpa)):
            return self._crash(vp, "crash", f"memory fault at GPA {int(mf.gpa):#x} with no VTL1 to ask",
                               vcpu.regs.rip)
        self.intercepts.memory(vp, vcpu, int(mf.gpa), access, size=int(mf.size))


def run_partition(partition: Partition, console: Callable[[str], None] | None = None) -> RunResult:
    return Scheduler(partition, console).run()
