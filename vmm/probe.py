"""Behavioural probes of the host's KVM: what it does, not only what it advertises.

Each probe boots a few instructions in a scratch VM and looks at the exit.  Used
by `vtl caps`; knows nothing of VTLs.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from vmm import uapi as u
from vmm import x86
from vmm.errors import KvmIoctlError, VmmError, kvm_unavailable_reason
from vmm.kvm import Kvm, VCpu, Vm
from vmm.memory import GuestMemory

CODE = 0x10000
DATA = 0x20000
RO_PAGE = 0x200000        # a read-only memslot
UNMAPPED = 0x400000       # no memslot
MEM = 4 << 20


@dataclass
class ProbeResult:
    name: str
    present: bool
    detail: str


@dataclass
class _Scratch:
    kvm: Kvm
    mem: GuestMemory
    vm: Vm
    vcpu: VCpu


@contextmanager
def scratch_vm(code: bytes, *, readonly_page: bool = False) -> Iterator[_Scratch]:
    kvm = Kvm()
    mem = GuestMemory(MEM)
    vm = kvm.create_vm()
    try:
        vm.map_memory(mem, 0, RO_PAGE)
        if readonly_page:
            vm.map_memory(mem, RO_PAGE, 0x1000, readonly=True)
        cr3 = x86.write_identity_tables(mem, 0x2000, MEM)
        x86.write_boot_gdt(mem, 0x9000)
        mem.write(CODE, code)
        vcpu = vm.create_vcpu(0)
        vcpu.set_cpuid(kvm.supported_cpuid())
        s = vcpu.get_sregs()
        x86.set_long_mode(s, cr3, 0x9000)
        vcpu.set_sregs(s)
        r = vcpu.get_regs()
        r.rip, r.rsp, r.rflags = CODE, 0x9000, x86.RFLAGS_RESERVED1
        vcpu.set_regs(r)
        yield _Scratch(kvm, mem, vm, vcpu)
    finally:
        vm.close()
        mem.close()
        kvm.close()


def run_once(vcpu: VCpu, timeout: float = 1.0) -> int | None:
    """One KVM_RUN with a watchdog; returns the exit reason, or None if the guest never
    came back to userspace within `timeout`."""
    fired = threading.Event()
    me = threading.get_ident()

    def kick() -> None:
        fired.set()
        vcpu.run.immediate_exit = 1
        signal.pthread_kill(me, signal.SIGUSR1)

    old = signal.signal(signal.SIGUSR1, lambda *_: None) if threading.current_thread() is \
        threading.main_thread() else None
    timer = threading.Timer(timeout, kick)
    timer.start()
    try:
        rc = vcpu.kvm_run()
    finally:
        timer.cancel()
        vcpu.run.immediate_exit = 0
        if old is not None:
            signal.signal(signal.SIGUSR1, old)
    if rc < 0 or fired.is_set():
        return None
    return int(vcpu.run.exit_reason)


# Instruction bytes (64-bit mode).
OUT_F0 = bytes.fromhex("e6f0")                      # out 0xf0, al
HLT = bytes.fromhex("f4")


def _mov_store_abs(addr: int) -> bytes:             # mov [addr32], rax
    return bytes.fromhex("48890425") + addr.to_bytes(4, "little")


def _mov_load_abs(addr: int) -> bytes:              # mov rax, [addr32]
    return bytes.fromhex("488b0425") + addr.to_bytes(4, "little")


def _jmp_abs(addr: int) -> bytes:                   # mov rax, imm64; jmp rax
    return bytes.fromhex("48b8") + addr.to_bytes(8, "little") + bytes.fromhex("ffe0")


def probe_long_mode_pio() -> ProbeResult:
    with scratch_vm(OUT_F0 + HLT) as s:
        reason = run_once(s.vcpu)
        ok = reason == u.KVM_EXIT_IO and s.vcpu.run.io.port == 0xF0
        rip = s.vcpu.sync.regs.rip
    after = "after" if rip == CODE + 2 else "at"
    return ProbeResult("long_mode_pio_exit", ok,
                       f"64-bit guest OUT exits to userspace (RIP reported {after} the OUT)" if ok
                       else f"unexpected exit {reason}")


def probe_sync_regs(kvm: Kvm) -> ProbeResult:
    v = kvm.check_extension(u.KVM_CAP_SYNC_REGS)
    want = u.KVM_SYNC_X86_REGS | u.KVM_SYNC_X86_SREGS | u.KVM_SYNC_X86_EVENTS
    return ProbeResult("sync_regs", v & want == want, f"KVM_CAP_SYNC_REGS = {v:#x}")


def probe_readonly_memslot() -> ProbeResult:
    code = bytes.fromhex("48b8efbeadde00000000") + _mov_store_abs(RO_PAGE) + HLT  # mov rax, 0xdeadbeef
    with scratch_vm(code, readonly_page=True) as s:
        s.mem.write_u64(RO_PAGE, 0x1111)
        reason = run_once(s.vcpu)
        run = s.vcpu.run
        ok = (reason == u.KVM_EXIT_MMIO and run.mmio.is_write == 1 and run.mmio.phys_addr == RO_PAGE
              and s.mem.read_u64(RO_PAGE) == 0x1111)
    return ProbeResult("readonly_memslot", ok,
                       "guest write to a KVM_MEM_READONLY slot exits as MMIO write, memory unchanged"
                       if ok else f"write to read-only slot gave exit {reason}")


def probe_unmapped_read() -> ProbeResult:
    with scratch_vm(_mov_load_abs(UNMAPPED) + HLT) as s:
        reason = run_once(s.vcpu)
        ok = reason == u.KVM_EXIT_MMIO and s.vcpu.run.mmio.is_write == 0
    return ProbeResult("unmapped_gpa_read", ok, "read of an unmapped GPA exits as MMIO read" if ok
                       else f"exit {reason}")


def probe_unmapped_fetch() -> ProbeResult:
    with scratch_vm(_jmp_abs(UNMAPPED)) as s:
        reason = run_once(s.vcpu)
        run = s.vcpu.run
        ok = (reason == u.KVM_EXIT_INTERNAL_ERROR and run.internal.suberror == u.KVM_INTERNAL_ERROR_EMULATION
              and s.vcpu.sync.regs.rip == UNMAPPED)
    return ProbeResult("unmapped_gpa_fetch", ok,
                       "instruction fetch from an unmapped GPA exits as emulation failure, RIP at target"
                       if ok else f"exit {reason}")


def probe_msr_filter(kvm: Kvm) -> ProbeResult:
    cap = kvm.check_extension(u.KVM_CAP_X86_USER_SPACE_MSR)
    if not cap or not kvm.check_extension(u.KVM_CAP_X86_MSR_FILTER):
        return ProbeResult("msr_filter", False, "KVM_CAP_X86_USER_SPACE_MSR or _MSR_FILTER missing")
    # wrmsr(LSTAR, 0): ecx = LSTAR, eax = edx = 0
    code = bytes.fromhex("b9") + x86.MSR_LSTAR.to_bytes(4, "little") + bytes.fromhex("31c031d20f30") + HLT
    with scratch_vm(code) as s:
        s.vm.enable_cap(u.KVM_CAP_X86_USER_SPACE_MSR, u.KVM_MSR_EXIT_REASON_FILTER)
        s.vm.set_msr_filter(deny_write=[x86.MSR_LSTAR])
        reason = run_once(s.vcpu)
        ok = reason == u.KVM_EXIT_X86_WRMSR and s.vcpu.run.msr.index == x86.MSR_LSTAR
    return ProbeResult("msr_filter", ok, "filtered WRMSR (LSTAR) exits to userspace as KVM_EXIT_X86_WRMSR"
                       if ok else f"exit {reason}")


def probe_single_step() -> ProbeResult:
    with scratch_vm(bytes.fromhex("90") + OUT_F0) as s:
        try:
            s.vcpu.set_single_step(True)
        except KvmIoctlError as e:
            return ProbeResult("single_step", False, str(e))
        reason = run_once(s.vcpu)
        ok = reason == u.KVM_EXIT_DEBUG
    return ProbeResult("single_step", ok, "KVM_SET_GUEST_DEBUG single-step gives KVM_EXIT_DEBUG"
                       if ok else f"exit {reason}")


def probe_vmcall() -> ProbeResult:
    code = bytes.fromhex("b8ffff0000" "0f01c1") + OUT_F0 + HLT   # mov eax, 0xffff; vmcall; out
    with scratch_vm(code) as s:
        reason = run_once(s.vcpu, timeout=0.5)
    if reason == u.KVM_EXIT_HYPERCALL:
        return ProbeResult("vmcall_to_userspace", True, "VMCALL exits as KVM_EXIT_HYPERCALL")
    if reason is None:
        return ProbeResult("vmcall_to_userspace", False, "a guest VMCALL never came back to userspace")
    return ProbeResult("vmcall_to_userspace", False,
                       f"VMCALL is handled in the kernel (next exit: {reason}); userspace never sees it")


def probe_translate() -> ProbeResult:
    alias = 1 << 30  # PDPT[1] aliases GiB 0, so GVA alias+x -> GPA x (not an identity answer)
    with scratch_vm(OUT_F0) as s:
        s.mem.write_u64(0x3000 + 8, s.mem.read_u64(0x3000))
        try:
            assert run_once(s.vcpu) == u.KVM_EXIT_IO
            valid, gpa = s.vcpu.translate(alias + CODE)
        except KvmIoctlError as e:
            return ProbeResult("kvm_translate", False, str(e))
    ok = valid and gpa == CODE
    return ProbeResult("kvm_translate", ok, "KVM_TRANSLATE works" if ok
                       else "KVM_TRANSLATE returns invalid: the VMM walks guest page tables itself")


def probe_memory_attributes(kvm: Kvm) -> ProbeResult:
    v = kvm.check_extension(u.KVM_CAP_MEMORY_ATTRIBUTES)
    rwx = u.KVM_MEMORY_ATTRIBUTE_NR | u.KVM_MEMORY_ATTRIBUTE_NW | u.KVM_MEMORY_ATTRIBUTE_NX
    return ProbeResult("rwx_memory_attributes", v & rwx == rwx,
                       f"KVM_CAP_MEMORY_ATTRIBUTES = {v:#x} (RWX attributes need bits 0-2)")


def probe_all() -> list[ProbeResult]:
    """Every probe; raises KvmUnavailable (via Kvm()) if /dev/kvm cannot be used."""
    reason = kvm_unavailable_reason()
    if reason:
        raise VmmError(reason)
    kvm = Kvm()
    try:
        results = [
            ProbeResult("kvm", True, f"/dev/kvm, API {u.KVM_API_VERSION}"),
            probe_long_mode_pio(),
            probe_sync_regs(kvm),
            probe_readonly_memslot(),
            probe_unmapped_read(),
            probe_unmapped_fetch(),
            probe_msr_filter(kvm),
            probe_single_step(),
            ProbeResult("vcpu_events", bool(kvm.check_extension(u.KVM_CAP_VCPU_EVENTS)),
                        "exception injection through KVM_SET_VCPU_EVENTS / synced events"),
            ProbeResult("memslots", True, f"{kvm.check_extension(u.KVM_CAP_NR_MEMSLOTS)} memslots per VM"),
            probe_vmcall(),
            probe_translate(),
            probe_memory_attributes(kvm),
            ProbeResult("hyperv", bool(kvm.check_extension(u.KVM_CAP_HYPERV)),
                        f"KVM_CAP_HYPERV = {kvm.check_extension(u.KVM_CAP_HYPERV)}"),
            ProbeResult("cr_write_exits", False,
                        "no KVM uAPI reports guest MOV to CR0/CR4 to userspace (mainline has none)"),
        ]
    finally:
        kvm.close()
    return results
