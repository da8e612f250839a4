"""Typed vCPU exits, in the spirit of rust-vmm kvm-ioctls' `VcpuExit`.

`decode(vcpu)` turns the mmapped `kvm_run` after a successful KVM_RUN into one frozen
value per exit kind; `from_result(vcpu, rc)` also covers a KVM_RUN that returned
-errno (EINTR/EAGAIN are `Interrupted`, -EFAULT/-EHWPOISON with
KVM_EXIT_MEMORY_FAULT is a `MemoryFault`, anything else a `RunError`).

The values copy what they need out of `kvm_run`, so they stay valid after the next
KVM_RUN.  This costs a few object allocations per exit: the run loop's hot path keeps
reading `VCpu.words` / `VCpu.run` directly; everything else (probes, tests, rare
exits, tools) should use these types.  Every kind has a short `name` for counters.

Completing an exit that expects data back (IN, MMIO read, RDMSR, WRMSR's error bit)
goes through `complete_io_in`, `complete_mmio_read` and `complete_msr`, which write
the answer into `kvm_run` where the next KVM_RUN picks it up.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, TypeAlias

from vmm import uapi as u
from vmm.errors import VmmError


class VCpu(Protocol):
    """What decoding needs of a vCPU: its mmapped kvm_run (a Protocol, so that this module
    does not import vmm.kvm, which imports it)."""
    run: Any
    run_buf: Any

# Linux's EHWPOISON (asm-generic/errno.h); Python's errno module does not export it.
EHWPOISON = getattr(errno, "EHWPOISON", 133)

# "KVM_EXIT_X86_WRMSR" -> "x86_wrmsr": names for exits this module has no type for.
KVM_EXIT_NAMES: dict[int, str] = {
    v: k[len("KVM_EXIT_"):].lower() for k, v in vars(u).items()
    if k.startswith("KVM_EXIT_") and isinstance(v, int)
    and k not in ("KVM_EXIT_IO_IN", "KVM_EXIT_IO_OUT")}


@dataclass(frozen=True, slots=True)
class IoOut:
    """OUT/OUTS: `data` holds size * count bytes (count > 1 for REP OUTS)."""
    port: int
    size: int
    data: bytes
    name: ClassVar[str] = "io_out"

    @property
    def count(self) -> int:
        return len(self.data) // self.size if self.size else 0

    @property
    def value(self) -> int:
        """The first element as a little-endian integer (what a plain OUT wrote)."""
        return int.from_bytes(self.data[:self.size], "little")


@dataclass(frozen=True, slots=True)
class IoIn:
    """IN/INS: answer with `complete_io_in(vcpu, data)` (size * count bytes) before the next run."""
    port: int
    size: int
    count: int
    name: ClassVar[str] = "io_in"


@dataclass(frozen=True, slots=True)
class Mmio:
    """An access KVM could not satisfy from a memslot: unmapped GPA, a write to a
    read-only memslot, or (host-mapping protections) a page the host mapping forbids.
    `data` is what the guest wrote (empty for reads; answer those with
    `complete_mmio_read`)."""
    gpa: int
    length: int
    is_write: bool
    data: bytes
    name: ClassVar[str] = "mmio"


@dataclass(frozen=True, slots=True)
class MsrWrite:
    """A WRMSR KVM handed to userspace (MSR filter, unknown MSR): `reason` is one of
    KVM_MSR_EXIT_REASON_*.  Set `complete_msr(vcpu, error=True)` to make it #GP."""
    index: int
    data: int
    reason: int = 0
    name: ClassVar[str] = "msr_write"


@dataclass(frozen=True, slots=True)
class MsrRead:
    index: int
    reason: int = 0
    name: ClassVar[str] = "msr_read"


@dataclass(frozen=True, slots=True)
class MemoryFault:
    """KVM_EXIT_MEMORY_FAULT: on mainline it arrives with KVM_RUN = -EFAULT (or
    -EHWPOISON); with the RWX attribute series it is how an attribute violation exits.
    RIP is at the faulting instruction."""
    gpa: int
    size: int
    flags: int
    name: ClassVar[str] = "memory_fault"

    @property
    def read(self) -> bool:
        return bool(self.flags & u.KVM_MEMORY_EXIT_FLAG_READ)

    @property
    def write(self) -> bool:
        return bool(self.flags & u.KVM_MEMORY_EXIT_FLAG_WRITE)

    @property
    def exec(self) -> bool:
        return bool(self.flags & u.KVM_MEMORY_EXIT_FLAG_EXEC)


@dataclass(frozen=True, slots=True)
class EmulationFailure:
    """KVM_EXIT_INTERNAL_ERROR / KVM_INTERNAL_ERROR_EMULATION.  A fetch from a GPA the
    VM cannot read lands here with RIP at the target; `insn` is empty unless KVM
    attached the instruction bytes (it cannot when the fetch itself failed)."""
    insn: bytes
    name: ClassVar[str] = "emulation_failure"


@dataclass(frozen=True, slots=True)
class InternalError:
    """KVM_EXIT_INTERNAL_ERROR with any other suberror (KVM_INTERNAL_ERROR_*)."""
    suberror: int
    data: tuple[int, ...] = ()
    name: ClassVar[str] = "internal_error"


@dataclass(frozen=True, slots=True)
class Shutdown:
    """Triple fault (or a shutdown the guest asked for)."""
    name: ClassVar[str] = "shutdown"


@dataclass(frozen=True, slots=True)
class Hlt:
    name: ClassVar[str] = "hlt"


@dataclass(frozen=True, slots=True)
class Debug:
    """KVM_EXIT_DEBUG (single step, breakpoints): `exception` is the vector (1 = #DB)."""
    exception: int
    pc: int
    dr6: int
    dr7: int
    name: ClassVar[str] = "debug"


@dataclass(frozen=True, slots=True)
class Interrupted:
    """KVM_EXIT_INTR, or KVM_RUN returning -EINTR/-EAGAIN: a signal or immediate_exit
    brought the vCPU back; nothing happened in the guest that needs handling."""
    name: ClassVar[str] = "intr"


@dataclass(frozen=True, slots=True)
class FailEntry:
    """VM entry failed; `reason` is the hardware entry-failure reason."""
    reason: int
    cpu: int = 0
    name: ClassVar[str] = "fail_entry"


@dataclass(frozen=True, slots=True)
class Unknown:
    """An exit reason this module has no type for; `name` is KVM's own lower-case name."""
    reason: int

    @property
    def name(self) -> str:
        return KVM_EXIT_NAMES.get(self.reason, f"exit_{self.reason}")


@dataclass(frozen=True, slots=True)
class RunError:
    """KVM_RUN returned -errno for a reason that is not an exit (kvm_run is stale)."""
    errno: int
    name: ClassVar[str] = "run_error"

    def __str__(self) -> str:
        return f"KVM_RUN failed: {errno.errorcode.get(self.errno, self.errno)} ({os.strerror(self.errno)})"


VcpuExit: TypeAlias = (IoOut | IoIn | Mmio | MsrWrite | MsrRead | MemoryFault | EmulationFailure
                       | InternalError | Shutdown | Hlt | Debug | Interrupted | FailEntry | Unknown
                       | RunError)

_HLT, _SHUTDOWN, _INTERRUPTED = Hlt(), Shutdown(), Interrupted()


def _data_offset(vcpu: VCpu, offset: int, length: int) -> int:
    """kvm_run.io.data_offset, checked to lie inside the mmapped run area."""
    if offset < 0 or offset + length > len(vcpu.run_buf):
        raise VmmError(f"KVM reported I/O data at offset {offset:#x}+{length} outside kvm_run "
                       f"({len(vcpu.run_buf):#x} bytes)")
    return offset


def decode(vcpu: VCpu) -> VcpuExit:
    """The exit in `vcpu.run` after a KVM_RUN that returned 0."""
    run = vcpu.run
    reason = int(run.exit_reason)
    if reason == u.KVM_EXIT_IO:
        io = run.io
        size, count, port = int(io.size), int(io.count), int(io.port)
        if io.direction == u.KVM_EXIT_IO_OUT:
            off = _data_offset(vcpu, int(io.data_offset), size * count)
            return IoOut(port, size, bytes(vcpu.run_buf[off:off + size * count]))
        return IoIn(port, size, count)
    if reason == u.KVM_EXIT_MMIO:
        m = run.mmio
        length = min(int(m.len), 8)
        write = bool(m.is_write)
        return Mmio(int(m.phys_addr), length, write, bytes(m.data[0:length]) if write else b"")
    if reason == u.KVM_EXIT_X86_WRMSR:
        return MsrWrite(int(run.msr.index), int(run.msr.data), int(run.msr.reason))
    if reason == u.KVM_EXIT_X86_RDMSR:
        return MsrRead(int(run.msr.index), int(run.msr.reason))
    if reason == u.KVM_EXIT_MEMORY_FAULT:
        mf = run.memory_fault
        return MemoryFault(int(mf.gpa), int(mf.size), int(mf.flags))
    if reason == u.KVM_EXIT_INTERNAL_ERROR:
        sub = int(run.internal.suberror)
        if sub == u.KVM_INTERNAL_ERROR_EMULATION:
            ef = run.emulation_failure
            # flags is only meaningful when KVM counted it as a data word (ndata >= 1).
            has_bytes = ef.ndata >= 1 and ef.flags & u.KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES
            return EmulationFailure(bytes(ef.insn_bytes[0:min(int(ef.insn_size), 15)]) if has_bytes else b"")
        n = min(int(run.internal.ndata), 16)
        return InternalError(sub, tuple(int(run.internal.data[i]) for i in range(n)))
    if reason == u.KVM_EXIT_HLT:
        return _HLT
    if reason == u.KVM_EXIT_SHUTDOWN:
        return _SHUTDOWN
    if reason == u.KVM_EXIT_INTR:
        return _INTERRUPTED
    if reason == u.KVM_EXIT_DEBUG:
        d = run.debug.arch
        return Debug(int(d.exception), int(d.pc), int(d.dr6), int(d.dr7))
    if reason == u.KVM_EXIT_FAIL_ENTRY:
        fe = run.fail_entry
        return FailEntry(int(fe.hardware_entry_failure_reason), int(fe.cpu))
    return Unknown(reason)


def from_result(vcpu: VCpu, rc: int) -> VcpuExit:
    """The exit for a KVM_RUN that returned `rc` (0 or -errno, as `VCpu.kvm_run`).

    Only -EFAULT/-EHWPOISON come with an exit (KVM_EXIT_MEMORY_FAULT); for every other
    error api.rst says exit_reason is stale.  A caller that cannot rule out a stale
    KVM_EXIT_MEMORY_FAULT from an earlier exit clears exit_reason before KVM_RUN, as
    `VCpu.run_once` does."""
    if rc == 0:
        return decode(vcpu)
    err = -rc
    if err in (errno.EINTR, errno.EAGAIN):
        return _INTERRUPTED
    if err in (errno.EFAULT, EHWPOISON) and vcpu.run.exit_reason == u.KVM_EXIT_MEMORY_FAULT:
        mf = vcpu.run.memory_fault
        return MemoryFault(int(mf.gpa), int(mf.size), int(mf.flags))
    return RunError(err)


# --- answering exits that expect data ---------------------------------------------------
def complete_io_in(vcpu: VCpu, data: bytes) -> None:
    """The bytes an IN/INS reads: exactly size * count of the pending IoIn."""
    io = vcpu.run.io
    if vcpu.run.exit_reason != u.KVM_EXIT_IO or io.direction != u.KVM_EXIT_IO_IN:
        raise VmmError("complete_io_in: the vCPU's last exit is not an IN")
    want = int(io.size) * int(io.count)
    if len(data) != want:
        raise VmmError(f"complete_io_in: IN of {io.count} x {io.size} bytes needs {want} bytes, "
                       f"got {len(data)}")
    off = _data_offset(vcpu, int(io.data_offset), want)
    vcpu.run_buf[off:off + want] = data


def complete_mmio_read(vcpu: VCpu, data: bytes) -> None:
    """The bytes an MMIO read returns: exactly the access length."""
    m = vcpu.run.mmio
    if vcpu.run.exit_reason != u.KVM_EXIT_MMIO or m.is_write:
        raise VmmError("complete_mmio_read: the vCPU's last exit is not an MMIO read")
    if len(data) != m.len:
        raise VmmError(f"complete_mmio_read: the read is {m.len} bytes, got {len(data)}")
    for i, b in enumerate(data):
        m.data[i] = b


def complete_msr(vcpu: VCpu, *, error: bool = False, data: int = 0) -> None:
    """Finish an MSR exit: `error` makes KVM inject #GP; `data` is what RDMSR returns."""
    if vcpu.run.exit_reason not in (u.KVM_EXIT_X86_RDMSR, u.KVM_EXIT_X86_WRMSR):
        raise VmmError("complete_msr: the vCPU's last exit is not an MSR exit")
    if not 0 <= data < 1 << 64:
        raise VmmError(f"complete_msr: MSR value {data:#x} is not 64 bits")
    vcpu.run.msr.error = 1 if error else 0
    if vcpu.run.exit_reason == u.KVM_EXIT_X86_RDMSR:
        vcpu.run.msr.data = data
