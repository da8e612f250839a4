"""vmm.exits: typed exits decoded from what real tiny guests make KVM report."""

from __future__ import annotations

import errno

import pytest

from vmm import exits, x86
from vmm import uapi as u
from vmm.errors import VmmError
from vmm.exits import (
    Debug,
    EmulationFailure,
    Hlt,
    Interrupted,
    IoIn,
    IoOut,
    MemoryFault,
    Mmio,
    MsrRead,
    MsrWrite,
    RunError,
    Shutdown,
    Unknown,
)
from vmm.scratch import CODE_GPA as CODE
from vmm.scratch import scratch_vm

pytestmark = pytest.mark.kvm

HLT = bytes.fromhex("f4")
P = 4096
RO_PAGE = 0x200000        # a read-only memslot when asked for
UNMAPPED = 0x400000       # just past the scratch VM's 4 MiB of memory


def _mov_rax(value: int) -> bytes:                    # mov rax, imm64
    return bytes.fromhex("48b8") + value.to_bytes(8, "little")


def test_out_then_hlt() -> None:
    # mov al, 0x5a; out 0xf0, al; mov dx, 0x3f8; mov ax, 0x1234; out dx, ax; hlt
    code = bytes.fromhex("b05a" "e6f0" "66baf803" "66b83412" "66ef") + HLT
    with scratch_vm(code) as s:
        e = s.run()
        assert e == IoOut(0xF0, 1, b"\x5a") and e.name == "io_out" and e.value == 0x5A and e.count == 1
        e = s.run()
        assert e == IoOut(0x3F8, 2, b"\x34\x12") and e.value == 0x1234
        e = s.run()
        assert isinstance(e, Hlt) and e.name == "hlt"


def test_in_is_answered_through_complete_io_in() -> None:
    # in al, 0xf1; out 0xf2, al
    with scratch_vm(bytes.fromhex("e4f1" "e6f2") + HLT) as s:
        e = s.run()
        assert e == IoIn(0xF1, 1, 1) and e.name == "io_in"
        with pytest.raises(VmmError, match="needs 1 bytes"):
            exits.complete_io_in(s.vcpu, b"\x01\x02")
        exits.complete_io_in(s.vcpu, b"\x42")
        assert s.run() == IoOut(0xF2, 1, b"\x42")
        with pytest.raises(VmmError, match="not an IN"):
            exits.complete_io_in(s.vcpu, b"\x42")


def test_write_to_a_readonly_memslot_is_an_mmio_write_with_the_data() -> None:
    code = _mov_rax(0x1122334455667788) + bytes.fromhex("48890425") + RO_PAGE.to_bytes(4, "little") + HLT
    with scratch_vm(code, readonly=[(RO_PAGE, P)]) as s:
        s.mem.write_u64(RO_PAGE, 0xAAAA)
        e = s.run()
        assert e == Mmio(RO_PAGE, 8, True, (0x1122334455667788).to_bytes(8, "little"))
        assert e.name == "mmio" and s.mem.read_u64(RO_PAGE) == 0xAAAA


def test_read_of_an_unmapped_gpa_is_an_mmio_read_answered_by_the_vmm() -> None:
    # mov eax, [UNMAPPED]; out 0xf3, eax
    code = bytes.fromhex("8b0425") + UNMAPPED.to_bytes(4, "little") + bytes.fromhex("e7f3") + HLT
    with scratch_vm(code) as s:
        e = s.run()
        assert e == Mmio(UNMAPPED, 4, False, b"")
        with pytest.raises(VmmError, match="is 4 bytes"):
            exits.complete_mmio_read(s.vcpu, b"\x00")
        exits.complete_mmio_read(s.vcpu, b"\x0d\xf0\xad\xba")
        assert s.run() == IoOut(0xF3, 4, b"\x0d\xf0\xad\xba")


def test_fetch_from_an_unmapped_gpa_is_an_emulation_failure_at_the_target() -> None:
    code = _mov_rax(UNMAPPED) + bytes.fromhex("ffe0")   # jmp rax
    with scratch_vm(code) as s:
        e = s.run()
        assert isinstance(e, EmulationFailure) and e.name == "emulation_failure"
        assert s.vcpu.sync.regs.rip == UNMAPPED


def test_filtered_wrmsr_and_rdmsr_exit_to_userspace() -> None:
    lstar = x86.MSR_LSTAR.to_bytes(4, "little")
    # mov ecx, LSTAR; mov eax, 0x11223344; mov edx, 0x55667788; wrmsr; rdmsr; out 0xf4, eax
    code = (bytes.fromhex("b9") + lstar + bytes.fromhex("b844332211" "ba88776655" "0f30" "0f32" "e7f4")
            + HLT)
    with scratch_vm(code) as s:
        s.vm.enable_cap(u.KVM_CAP_X86_USER_SPACE_MSR, u.KVM_MSR_EXIT_REASON_FILTER)
        s.vm.set_msr_filter(deny_write=[x86.MSR_LSTAR], deny_read=[x86.MSR_LSTAR])
        e = s.run()
        assert e == MsrWrite(x86.MSR_LSTAR, 0x5566778811223344, u.KVM_MSR_EXIT_REASON_FILTER)
        assert e.name == "msr_write"
        exits.complete_msr(s.vcpu)                       # accept (the VMM would record it)
        e = s.run()
        assert e == MsrRead(x86.MSR_LSTAR, u.KVM_MSR_EXIT_REASON_FILTER) and e.name == "msr_read"
        with pytest.raises(VmmError, match="64 bits"):
            exits.complete_msr(s.vcpu, data=-1)
        exits.complete_msr(s.vcpu, data=0xCAFEF00D)
        assert s.run() == IoOut(0xF4, 4, (0xCAFEF00D).to_bytes(4, "little"))


def test_single_step_is_a_debug_exit_per_instruction() -> None:
    with scratch_vm(bytes.fromhex("90" "90") + HLT) as s:
        s.vcpu.set_single_step(True)
        e = s.run()
        assert isinstance(e, Debug) and e.exception == x86.VEC_DB and e.name == "debug"
        assert e.pc == CODE + 1


def test_a_fault_with_no_idt_is_a_triple_fault_shutdown() -> None:
    with scratch_vm(bytes.fromhex("0f0b")) as s:          # ud2, and the IDT limit is 0
        e = s.run()
        assert isinstance(e, Shutdown) and e.name == "shutdown"


def test_immediate_exit_is_interrupted() -> None:
    with scratch_vm(HLT) as s:
        s.vcpu.run.immediate_exit = 1
        e = s.run()
        s.vcpu.run.immediate_exit = 0
        assert isinstance(e, Interrupted) and e.name == "intr"
        assert isinstance(s.run(), Hlt)


def test_errors_memory_faults_and_unknown_reasons() -> None:
    """KVM_RUN -errno: this host never returns -EFAULT with a memory fault (its
    violations exit as MMIO), so the kvm_run contents of such a return are written by
    hand, as a mainline EPT host would leave them."""
    with scratch_vm(HLT) as s:
        run = s.vcpu.run
        run.exit_reason = u.KVM_EXIT_IO                    # stale: not a memory fault
        e = exits.from_result(s.vcpu, -errno.EFAULT)
        assert e == RunError(errno.EFAULT) and "EFAULT" in str(e) and e.name == "run_error"
        assert isinstance(exits.from_result(s.vcpu, -errno.EAGAIN), Interrupted)
        run.exit_reason = u.KVM_EXIT_MEMORY_FAULT
        run.memory_fault.flags = u.KVM_MEMORY_EXIT_FLAG_WRITE
        run.memory_fault.gpa, run.memory_fault.size = 0x123000, 0x1000
        e = exits.from_result(s.vcpu, -errno.EFAULT)
        assert e == MemoryFault(0x123000, 0x1000, u.KVM_MEMORY_EXIT_FLAG_WRITE)
        assert isinstance(e, MemoryFault) and e.write and not e.read and not e.exec
        assert e.name == "memory_fault"
        assert exits.from_result(s.vcpu, -errno.EINVAL) == RunError(errno.EINVAL)
        run.exit_reason = u.KVM_EXIT_HYPERCALL
        assert exits.decode(s.vcpu) == Unknown(u.KVM_EXIT_HYPERCALL)
        assert Unknown(u.KVM_EXIT_HYPERCALL).name == "hypercall" and Unknown(999).name == "exit_999"
        with pytest.raises(VmmError, match="not an MMIO read"):
            exits.complete_mmio_read(s.vcpu, b"")
        with pytest.raises(VmmError, match="not an MSR exit"):
            exits.complete_msr(s.vcpu)
        # run_once clears a stale exit reason before it enters the guest.
        run.exit_reason = u.KVM_EXIT_MEMORY_FAULT
        assert isinstance(s.run(), Hlt)


def test_every_exit_kind_has_a_distinct_short_name() -> None:
    examples: list[exits.VcpuExit] = [
        IoOut(1, 1, b"\x00"), IoIn(1, 1, 1), Mmio(0, 1, False, b""), MsrWrite(1, 0), MsrRead(1),
        MemoryFault(0, 1, 0), EmulationFailure(b""), exits.InternalError(2), Shutdown(), Hlt(),
        Debug(1, 0, 0, 0), Interrupted(), exits.FailEntry(0), Unknown(999), RunError(errno.EIO)]
    names = [e.name for e in examples]
    assert len(set(names)) == len(names) and all(isinstance(n, str) and n for n in names)
    with pytest.raises(AttributeError):
        IoOut(1, 1, b"\x00").port = 2  # type: ignore[misc]
