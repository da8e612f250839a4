"""A one-vCPU, 64-bit scratch VM for probes, floors and tests, and a KVM_RUN with a watchdog.

Layout (guest-physical, identity-mapped with 2 MiB pages over the first GiB at least):

    0x2000   page tables (PML4, PDPT, one PD per GiB: 3 pages up to 1 GiB, 6 at 4 GiB)
    0x9000   boot GDT (null, code64, data); the stack grows down from here
    0x10000  code (CODE_GPA), unless told otherwise

Every page of guest memory is mapped read-write in the VM except the `readonly`
ranges (KVM_MEM_READONLY memslots) and the `unmapped` ranges (no memslot): the VMM
can still write there through `mem`, and a caller may map them itself (for instance
through a memory-attribute backend).  Guest page tables cover the first GiB even when
memory is smaller, so accesses past the end of memory reach KVM as unbacked GPAs.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterable, Mapping
from types import TracebackType

from vmm import x86
from vmm.errors import VmmError
from vmm.exits import Interrupted, VcpuExit
from vmm.kvm import Kvm, VCpu, Vm
from vmm.memory import PAGE_SIZE, GuestMemory
from vmm.uapi import ffi

TABLES_GPA = 0x2000
GDT_GPA = 0x9000
STACK_TOP = 0x9000
CODE_GPA = 0x10000
DEFAULT_MEM = 4 << 20

Range = tuple[int, int]   # (gpa, size)
KVM_REGS = frozenset(name for name, _ in ffi.typeof("struct kvm_regs").fields)


def _check_ranges(kind: str, ranges: Iterable[Range], mem_size: int) -> list[Range]:
    out = []
    for gpa, size in ranges:
        if gpa < 0 or size <= 0 or gpa % PAGE_SIZE or size % PAGE_SIZE:
            raise VmmError(f"{kind} range {gpa:#x}+{size:#x} is not a positive, page-aligned range")
        if gpa + size > mem_size:
            raise VmmError(f"{kind} range {gpa:#x}+{size:#x} is outside guest memory (0..{mem_size:#x})")
        out.append((gpa, size))
    return out


def slot_layout(mem_size: int, readonly: Iterable[Range] = (), unmapped: Iterable[Range] = ()
                ) -> list[tuple[int, int, bool]]:
    """The (gpa, size, readonly) memslots covering [0, mem_size) minus `unmapped`, with
    `readonly` ranges read-only; adjacent pages of the same kind share one memslot."""
    ro = _check_ranges("readonly", readonly, mem_size)
    un = _check_ranges("unmapped", unmapped, mem_size)
    marks = sorted([(g, s, "ro") for g, s in ro] + [(g, s, "un") for g, s in un])
    for (g1, s1, _), (g2, _, _) in zip(marks, marks[1:], strict=False):
        if g1 + s1 > g2:
            raise VmmError(f"readonly/unmapped ranges overlap at {g2:#x}")
    slots: list[tuple[int, int, bool]] = []

    def add(gpa: int, end: int, ro_: bool) -> None:
        if end <= gpa:
            return
        if slots and slots[-1][0] + slots[-1][1] == gpa and slots[-1][2] == ro_:
            slots[-1] = (slots[-1][0], end - slots[-1][0], ro_)
        else:
            slots.append((gpa, end - gpa, ro_))

    pos = 0
    for gpa, size, kind in marks:
        add(pos, gpa, False)
        if kind == "ro":
            add(gpa, gpa + size, True)
        pos = gpa + size
    add(pos, mem_size, False)
    return slots


class ScratchVm:
    """A VM with one vCPU in 64-bit mode at `code_gpa`, CPL 0, paging on, RSP = 0x9000.

    Use as a context manager; `kvm` and `mem` are closed only if this object created
    them.  `regs` sets general-purpose registers by kvm_regs field name.  `cr3` skips
    writing the identity tables and boots on the caller's tables instead (the caller's
    `mem` then holds them)."""

    def __init__(self, code: bytes = b"", *, mem_size: int | None = None, code_gpa: int = CODE_GPA,
                 regs: Mapping[str, int] | None = None, readonly: Iterable[Range] = (),
                 unmapped: Iterable[Range] = (), kvm: Kvm | None = None, mem: GuestMemory | None = None,
                 cr3: int | None = None) -> None:
        if mem is not None and mem_size is not None and mem_size != mem.size:
            raise VmmError(f"mem_size {mem_size:#x} differs from the given memory's {mem.size:#x}")
        size = mem.size if mem is not None else (mem_size if mem_size is not None else DEFAULT_MEM)
        layout = slot_layout(size, readonly, unmapped)        # bad ranges fail before any KVM call
        if cr3 is None and TABLES_GPA + x86.boot_tables_size(size) > min(GDT_GPA, code_gpa):
            raise VmmError(f"a {size >> 20} MiB scratch VM needs more page tables than fit below "
                           f"{min(GDT_GPA, code_gpa):#x}")
        if code and (code_gpa < GDT_GPA + PAGE_SIZE or code_gpa + len(code) > size):
            raise VmmError(f"code at {code_gpa:#x}+{len(code):#x} overlaps the boot area or leaves "
                           "guest memory")
        self._own_kvm, self._own_mem = kvm is None, mem is None
        self.kvm = kvm if kvm is not None else Kvm()
        try:
            self.mem = mem if mem is not None else GuestMemory(size)
            self.vm: Vm = self.kvm.create_vm()
            for gpa, length, ro in layout:
                self.vm.map_memory(self.mem, gpa, length, readonly=ro)
            if cr3 is None:
                cr3 = x86.write_identity_tables(self.mem, TABLES_GPA, size)
            x86.write_boot_gdt(self.mem, GDT_GPA)
            if code:
                self.mem.write(code_gpa, code)
            self.vcpu: VCpu = self.vm.create_vcpu(0)
            self.vcpu.set_cpuid(self.kvm.supported_cpuid())
            s = self.vcpu.get_sregs()
            x86.set_long_mode(s, cr3, GDT_GPA)
            self.vcpu.set_sregs(s)
            r = self.vcpu.get_regs()
            r.rip, r.rsp, r.rflags = code_gpa, STACK_TOP, x86.RFLAGS_RESERVED1
            for name, value in (regs or {}).items():
                if name not in KVM_REGS:
                    raise VmmError(f"no register {name!r} in struct kvm_regs")
                if not 0 <= value < 1 << 64:
                    raise VmmError(f"register {name} = {value:#x} is not a 64-bit value")
                setattr(r, name, value)
            self.vcpu.set_regs(r)
        except BaseException:
            self.close()
            raise

    def run(self, timeout: float | None = 1.0) -> VcpuExit | None:
        """One KVM_RUN, decoded; None if the guest did not come back within `timeout`."""
        return run_with_watchdog(self.vcpu, timeout)

    def close(self) -> None:
        """Idempotent (Vm, GuestMemory and Kvm close are)."""
        if hasattr(self, "vm"):
            self.vm.close()
        if self._own_mem and hasattr(self, "mem"):
            self.mem.close()
        if self._own_kvm:
            self.kvm.close()

    def __enter__(self) -> ScratchVm:
        return self

    def __exit__(self, typ: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


scratch_vm = ScratchVm   # reads as `with scratch_vm(code, ...) as s:`


KICK_SIGNAL = signal.SIGUSR1


def watchdog_available() -> bool:
    """True if this thread can kick a vCPU out of KVM_RUN: the main thread can install
    the kick signal's handler; another thread needs one already installed."""
    if threading.current_thread() is threading.main_thread():
        return True
    return callable(signal.getsignal(KICK_SIGNAL))


def run_with_watchdog(vcpu: VCpu, timeout: float | None = 1.0) -> VcpuExit | None:
    """`vcpu.run_once()` that gives up after `timeout` seconds (None: no watchdog).

    Returns the typed exit, or None if the guest never came back to userspace in time
    (a VMCALL that KVM handles in the kernel, a guest spinning without exits).  The
    watchdog is a timer thread that sets immediate_exit and sends SIGUSR1 to this
    thread, whose no-op handler makes KVM_RUN return -EINTR."""
    if timeout is None:
        return vcpu.run_once()
    if not watchdog_available():
        raise VmmError("run_with_watchdog needs the main thread (or a SIGUSR1 handler installed "
                       "there first) to interrupt KVM_RUN")
    fired = threading.Event()
    me = threading.get_ident()

    def kick() -> None:
        fired.set()
        vcpu.run.immediate_exit = 1
        signal.pthread_kill(me, KICK_SIGNAL)

    main = threading.current_thread() is threading.main_thread()
    old = signal.signal(KICK_SIGNAL, lambda *_: None) if main else None
    timer = threading.Timer(timeout, kick)
    timer.start()
    try:
        result = vcpu.run_once()
    finally:
        timer.cancel()
        # The kick may be running right now: wait for it, so that its signal is handled
        # by the no-op handler and not by the disposition restored below.
        timer.join()
        vcpu.run.immediate_exit = 0
        if old is not None:
            signal.signal(KICK_SIGNAL, old)
    if fired.is_set() and isinstance(result, Interrupted):
        return None
    return result
