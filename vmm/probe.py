"""Behavioural probes of the host's KVM: what it does, not only what it advertises.

Each probe boots a few instructions in a scratch VM and looks at the exit.  Used
by `vtl caps`; knows nothing of VTLs.
"""

from __future__ import annotations

from dataclasses import dataclass

from vmm import uapi as u
from vmm import x86
from vmm.errors import KvmIoctlError, VmmError
from vmm.exits import (
    Debug,
    EmulationFailure,
    IoOut,
    MemoryFault,
    Mmio,
    MsrWrite,
    Unknown,
    VcpuExit,
    complete_mmio_read,
)
from vmm.kvm import Kvm, kvm_device, kvm_unavailable_reason
from vmm.memory import PAGE_SIZE as PAGE
from vmm.scratch import ScratchVm, run_with_watchdog, watchdog_available

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


def scratch_vm(code: bytes, *, readonly_page: bool = False) -> ScratchVm:
    """The probes' VM: [0, RO_PAGE) mapped, optionally one read-only page at RO_PAGE,
    nothing else (UNMAPPED lies beyond guest memory)."""
    if readonly_page:
        return ScratchVm(code, mem_size=MEM, code_gpa=CODE, readonly=[(RO_PAGE, PAGE)],
                         unmapped=[(RO_PAGE + PAGE, MEM - RO_PAGE - PAGE)])
    return ScratchVm(code, mem_size=MEM, code_gpa=CODE, unmapped=[(RO_PAGE, MEM - RO_PAGE)])


# Instruction bytes (64-bit mode).
OUT_F0 = bytes.fromhex("e6f0")                      # out 0xf0, al
HLT = bytes.fromhex("f4")


def _mov_store_abs(addr: int) -> bytes:             # mov [addr32], rax
    return bytes.fromhex("48890425") + addr.to_bytes(4, "little")


def _mov_load_abs(addr: int) -> bytes:              # mov rax, [addr32]
    return bytes.fromhex("488b0425") + addr.to_bytes(4, "little")


def _jmp_abs(addr: int) -> bytes:                   # mov rax, imm64; jmp rax
    return bytes.fromhex("48b8") + addr.to_bytes(8, "little") + bytes.fromhex("ffe0")


def _describe(e: VcpuExit | None) -> str:
    return "no exit within the watchdog's timeout" if e is None else f"exit {e}"


def probe_long_mode_pio() -> ProbeResult:
    with scratch_vm(OUT_F0 + HLT) as s:
        e = run_with_watchdog(s.vcpu)
        ok = isinstance(e, IoOut) and e.port == 0xF0
        rip = s.vcpu.sync.regs.rip
    after = "after" if rip == CODE + 2 else "at"
    return ProbeResult("long_mode_pio_exit", ok,
                       f"64-bit guest OUT exits to userspace (RIP reported {after} the OUT)" if ok
                       else f"unexpected {_describe(e)}")


def probe_sync_regs(kvm: Kvm) -> ProbeResult:
    v = kvm.check_extension(u.KVM_CAP_SYNC_REGS)
    want = u.KVM_SYNC_X86_REGS | u.KVM_SYNC_X86_SREGS | u.KVM_SYNC_X86_EVENTS
    return ProbeResult("sync_regs", v & want == want, f"KVM_CAP_SYNC_REGS = {v:#x}")


def probe_readonly_memslot() -> ProbeResult:
    code = bytes.fromhex("48b8efbeadde00000000") + _mov_store_abs(RO_PAGE) + HLT  # mov rax, 0xdeadbeef
    with scratch_vm(code, readonly_page=True) as s:
        s.mem.write_u64(RO_PAGE, 0x1111)
        e = run_with_watchdog(s.vcpu)
        ok = (isinstance(e, Mmio) and e.is_write and e.gpa == RO_PAGE
              and s.mem.read_u64(RO_PAGE) == 0x1111)
    return ProbeResult("readonly_memslot", ok,
                       "guest write to a KVM_MEM_READONLY slot exits as MMIO write, memory unchanged"
                       if ok else f"write to read-only slot gave {_describe(e)}")


def probe_unmapped_read() -> ProbeResult:
    with scratch_vm(_mov_load_abs(UNMAPPED) + HLT) as s:
        e = run_with_watchdog(s.vcpu)
        ok = isinstance(e, Mmio) and not e.is_write and e.gpa == UNMAPPED
    return ProbeResult("unmapped_gpa_read", ok, "read of an unmapped GPA exits as MMIO read" if ok
                       else _describe(e))


def probe_unmapped_fetch() -> ProbeResult:
    with scratch_vm(_jmp_abs(UNMAPPED)) as s:
        e = run_with_watchdog(s.vcpu)
        ok = isinstance(e, EmulationFailure) and s.vcpu.sync.regs.rip == UNMAPPED
    return ProbeResult("unmapped_gpa_fetch", ok,
                       "instruction fetch from an unmapped GPA exits as emulation failure, RIP at target"
                       if ok else _describe(e))


def probe_msr_filter(kvm: Kvm) -> ProbeResult:
    cap = kvm.check_extension(u.KVM_CAP_X86_USER_SPACE_MSR)
    if not cap or not kvm.check_extension(u.KVM_CAP_X86_MSR_FILTER):
        return ProbeResult("msr_filter", False, "KVM_CAP_X86_USER_SPACE_MSR or _MSR_FILTER missing")
    # wrmsr(LSTAR, 0): ecx = LSTAR, eax = edx = 0
    code = bytes.fromhex("b9") + x86.MSR_LSTAR.to_bytes(4, "little") + bytes.fromhex("31c031d20f30") + HLT
    with scratch_vm(code) as s:
        s.vm.enable_cap(u.KVM_CAP_X86_USER_SPACE_MSR, u.KVM_MSR_EXIT_REASON_FILTER)
        s.vm.set_msr_filter(deny_write=[x86.MSR_LSTAR])
        e = run_with_watchdog(s.vcpu)
        ok = isinstance(e, MsrWrite) and e.index == x86.MSR_LSTAR
    return ProbeResult("msr_filter", ok, "filtered WRMSR (LSTAR) exits to userspace as KVM_EXIT_X86_WRMSR"
                       if ok else _describe(e))


def probe_single_step() -> ProbeResult:
    with scratch_vm(bytes.fromhex("90") + OUT_F0) as s:
        try:
            s.vcpu.set_single_step(True)
        except KvmIoctlError as e:
            return ProbeResult("single_step", False, str(e))
        ex = run_with_watchdog(s.vcpu)
        ok = isinstance(ex, Debug)
    return ProbeResult("single_step", ok, "KVM_SET_GUEST_DEBUG single-step gives KVM_EXIT_DEBUG"
                       if ok else _describe(ex))


def probe_vmcall() -> ProbeResult:
    code = bytes.fromhex("b8ffff0000" "0f01c1") + OUT_F0 + HLT   # mov eax, 0xffff; vmcall; out
    with scratch_vm(code) as s:
        e = run_with_watchdog(s.vcpu, timeout=0.5)
    if isinstance(e, Unknown) and e.reason == u.KVM_EXIT_HYPERCALL:
        return ProbeResult("vmcall_to_userspace", True, "VMCALL exits as KVM_EXIT_HYPERCALL")
    if e is None:
        return ProbeResult("vmcall_to_userspace", False, "a guest VMCALL never came back to userspace")
    return ProbeResult("vmcall_to_userspace", False,
                       f"VMCALL is handled in the kernel (next exit: {e.name}); userspace never sees it")


def probe_translate() -> ProbeResult:
    alias = 1 << 30  # PDPT[1] aliases GiB 0, so GVA alias+x -> GPA x (not an identity answer)
    with scratch_vm(OUT_F0) as s:
        s.mem.write_u64(0x3000 + 8, s.mem.read_u64(0x3000))
        try:
            e = run_with_watchdog(s.vcpu)
            if not isinstance(e, IoOut):
                return ProbeResult("kvm_translate", False, f"probe guest did not run: {_describe(e)}")
            valid, gpa = s.vcpu.translate(alias + CODE)
        except KvmIoctlError as err:
            return ProbeResult("kvm_translate", False, str(err))
    ok = valid and gpa == CODE
    return ProbeResult("kvm_translate", ok, "KVM_TRANSLATE works" if ok
                       else "KVM_TRANSLATE returns invalid: the VMM walks guest page tables itself")


def _skip_to(s: ScratchVm, rip: int) -> None:
    regs = s.vcpu.get_regs()
    regs.rip = rip
    s.vcpu.set_regs(regs)


def probe_host_mapping() -> ProbeResult:
    """Protections through mprotect on the VM's own alias of guest memory (design §2):
    a write to a PROT_READ page, a read of a PROT_NONE page and a fetch from one must all
    come back to userspace with memory unchanged.  Accepted forms: MMIO exits and emulation
    failure (this host), or KVM_RUN -EFAULT with KVM_EXIT_MEMORY_FAULT (mainline EPT)."""
    from vmm.memattr import NR, NW, NX, HostMappingBackend  # memattr uses this module lazily

    name = "host_mapping_protection"
    nw_page, nr_page, nx_page = RO_PAGE, RO_PAGE + PAGE, RO_PAGE + 2 * PAGE
    store = _mov_store_abs(nw_page)
    load = _mov_load_abs(nr_page)
    code = bytes.fromhex("48b8efbeadde00000000") + store + OUT_F0 + load + bytes.fromhex("e6f1") \
        + _jmp_abs(nx_page)
    at_store, after_store = CODE + 10, CODE + 10 + len(store)
    at_load = after_store + 2
    after_load = at_load + len(load)
    timeout = 1.0 if watchdog_available() else None
    forms: set[str] = set()
    with ScratchVm(code, mem_size=MEM, code_gpa=CODE, unmapped=[(RO_PAGE, MEM - RO_PAGE)]) as s:
        backend = HostMappingBackend(s.vm, s.mem, [(RO_PAGE, MEM - RO_PAGE)])
        s.mem.write_u64(nw_page, 0x1111)
        s.mem.write(nx_page, HLT)
        backend.set_range(nw_page, PAGE, NW)
        backend.set_range(nr_page, 2 * PAGE, NR | NW | NX)
        # 1: write to the PROT_READ page
        e = run_with_watchdog(s.vcpu, timeout)
        if isinstance(e, Mmio) and e.is_write and e.gpa == nw_page and s.vcpu.sync.regs.rip == after_store:
            forms.add("MMIO")
        elif isinstance(e, MemoryFault) and e.write and e.gpa == nw_page and s.vcpu.sync.regs.rip == at_store:
            forms.add("memory fault")
            _skip_to(s, after_store)
        else:
            return ProbeResult(name, False, f"write to a PROT_READ alias page gave {_describe(e)}")
        if s.mem.read_u64(nw_page) != 0x1111:
            return ProbeResult(name, False, "a write to a PROT_READ alias page reached memory")
        if not isinstance(e := run_with_watchdog(s.vcpu, timeout), IoOut):
            return ProbeResult(name, False, f"guest did not continue after the write: {_describe(e)}")
        # 2: read of the PROT_NONE page
        e = run_with_watchdog(s.vcpu, timeout)
        if isinstance(e, Mmio) and not e.is_write and e.gpa == nr_page:
            forms.add("MMIO")
            complete_mmio_read(s.vcpu, bytes(e.length))
        elif isinstance(e, MemoryFault) and e.gpa == nr_page and not e.write \
                and s.vcpu.sync.regs.rip == at_load:
            forms.add("memory fault")
            _skip_to(s, after_load)
        else:
            return ProbeResult(name, False, f"read of a PROT_NONE alias page gave {_describe(e)}")
        if not isinstance(e := run_with_watchdog(s.vcpu, timeout), IoOut):
            return ProbeResult(name, False, f"guest did not continue after the read: {_describe(e)}")
        # 3: fetch from a PROT_NONE page
        e = run_with_watchdog(s.vcpu, timeout)
        if isinstance(e, EmulationFailure) and s.vcpu.sync.regs.rip == nx_page:
            forms.add("emulation failure")
        elif isinstance(e, MemoryFault) and e.gpa == nx_page:
            forms.add("memory fault")
        else:
            return ProbeResult(name, False, f"fetch from a PROT_NONE alias page gave {_describe(e)}")
        # The VMM's own mapping is unaffected.
        s.mem.write_u64(nw_page, 0x2222)
        if s.mem.read_u64(nw_page) != 0x2222:
            return ProbeResult(name, False, "the VMM's mapping lost access to a protected page")
    return ProbeResult(name, True, "mprotect on the VM's own alias of guest memory: NW (PROT_READ) and "
                       f"NR (PROT_NONE) violations exit as {', '.join(sorted(forms))}; memory unchanged, "
                       "the VMM's mapping unaffected")


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
            ProbeResult("kvm", True, f"{kvm_device()}, API {u.KVM_API_VERSION}"),
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
            probe_host_mapping(),
            ProbeResult("hyperv", bool(kvm.check_extension(u.KVM_CAP_HYPERV)),
                        f"KVM_CAP_HYPERV = {kvm.check_extension(u.KVM_CAP_HYPERV)}"),
            ProbeResult("cr_write_exits", False,
                        "no KVM uAPI reports guest MOV to CR0/CR4 to userspace (mainline has none)"),
        ]
    finally:
        kvm.close()
    return results
