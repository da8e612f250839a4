"""A vCPU's whole architectural state as KVM holds it, saved and loaded for a snapshot.

What is saved (KVM's api.rst; the same set QEMU and Firecracker save for an x86 vCPU
without an in-kernel LAPIC): the general registers, the special registers (control
registers, segments, descriptor tables, EFER, APIC base), the pending events (exception,
NMI, interrupt shadow, SIPI vector, SMM), the debug registers, the FPU/SSE/AVX image
(KVM_GET_XSAVE), the XCRs, every MSR KVM lists in KVM_GET_MSR_INDEX_LIST (the pinned
ones among them, the TSC included) and the MP state.

A vCPU that exited to userspace may owe KVM the completion of the exit (a port I/O or
MMIO access, `complete_userspace_io`), and its owner may have left registers in kvm_run's
synced copy for the next KVM_RUN.  Neither is visible to KVM_GET_*: `flush` first runs
KVM_RUN with immediate_exit, which applies the synced registers and completes the access
without entering the guest (api.rst, KVM_RUN), so what is saved is the state the guest
would resume from, and a restored vCPU never repeats or loses an instruction.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

from vmm import uapi as u
from vmm.errors import VmmError
from vmm.kvm import VCpu
from vmm.uapi import ffi

# The raw structs, by name: a saved state of another size is not this build's (refused).
_STRUCTS = {"regs": "struct kvm_regs", "sregs": "struct kvm_sregs", "events": "struct kvm_vcpu_events",
            "debugregs": "struct kvm_debugregs", "xsave": "struct kvm_xsave"}
SIZES = {k: ffi.sizeof(v) for k, v in _STRUCTS.items()}
MAX_MSRS = 4096          # KVM lists a few hundred; a saved state with more is not KVM's


class VcpuStateError(VmmError):
    """A saved vCPU state that is not one this build (or this host's KVM) can load."""


@dataclass(frozen=True)
class VcpuState:
    regs: bytes
    sregs: bytes
    events: bytes
    debugregs: bytes
    xsave: bytes
    xcrs: dict[int, int]
    msrs: dict[int, int]
    mp_state: int

    def to_json(self) -> dict[str, Any]:
        def b64(b: bytes) -> str:
            return base64.b64encode(b).decode()
        return {"regs": b64(self.regs), "sregs": b64(self.sregs), "events": b64(self.events),
                "debugregs": b64(self.debugregs), "xsave": b64(self.xsave),
                "xcrs": {f"{k:#x}": f"{v:#x}" for k, v in self.xcrs.items()},
                "msrs": {f"{k:#x}": f"{v:#x}" for k, v in self.msrs.items()},
                "mp_state": self.mp_state}

    @classmethod
    def from_json(cls, d: Any) -> VcpuState:
        """Parse what to_json wrote; anything else is a VcpuStateError naming the field."""
        if not isinstance(d, dict):
            raise VcpuStateError("a vCPU state is not an object")
        raw: dict[str, bytes] = {}
        for name, size in SIZES.items():
            try:
                raw[name] = base64.b64decode(d[name], validate=True)
            except (KeyError, TypeError, ValueError):
                raise VcpuStateError(f"vCPU state: {name} missing or not base64") from None
            if len(raw[name]) != size:
                raise VcpuStateError(f"vCPU state: {name} is {len(raw[name])} bytes, "
                                     f"{_STRUCTS[name]} is {size}")
        return cls(raw["regs"], raw["sregs"], raw["events"], raw["debugregs"], raw["xsave"],
                   _u64_map(d.get("xcrs"), "xcrs", u.KVM_MAX_XCRS), _u64_map(d.get("msrs"), "msrs", MAX_MSRS),
                   _mp_state(d.get("mp_state")))

    def sreg(self, field: str) -> int:
        """One field of the saved special registers (cr0, cr3, cr4, efer, ...)."""
        s = ffi.new("struct kvm_sregs *")
        ffi.memmove(s, self.sregs, len(self.sregs))
        return int(getattr(s, field))

    def reg(self, field: str) -> int:
        r = ffi.new("struct kvm_regs *")
        ffi.memmove(r, self.regs, len(self.regs))
        return int(getattr(r, field))


def _u64_map(d: Any, what: str, limit: int) -> dict[int, int]:
    if not isinstance(d, dict) or len(d) > limit:
        raise VcpuStateError(f"vCPU state: {what} is not a map of at most {limit} entries")
    out: dict[int, int] = {}
    for k, v in d.items():
        try:
            key, val = int(k, 16), int(v, 16)
        except (TypeError, ValueError):
            raise VcpuStateError(f"vCPU state: {what} entry {k!r} is not hex") from None
        if not (0 <= key < 1 << 32 and 0 <= val < 1 << 64):
            raise VcpuStateError(f"vCPU state: {what} entry {k!r} out of range")
        out[key] = val
    return out


def _mp_state(v: Any) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < 16:
        raise VcpuStateError(f"vCPU state: mp_state {v!r} is not a KVM_MP_STATE_*")
    return v


def flush(vcpu: VCpu) -> None:
    """Apply what the owner left in kvm_run's synced registers and complete a pending
    exit, without entering the guest; kvm_run's synced copy is fresh afterwards."""
    vcpu.complete_pending_io()


def save(vcpu: VCpu) -> VcpuState:
    """The vCPU's state (flushed first).  The vCPU must not be running (its owner's
    thread is paused or it is this thread's)."""
    flush(vcpu)

    def raw(obj: Any) -> bytes:
        return bytes(ffi.buffer(obj))
    return VcpuState(raw(vcpu.get_regs()), raw(vcpu.get_sregs()), raw(vcpu.get_events()),
                     raw(vcpu.get_debugregs()), vcpu.get_xsave(), vcpu.get_xcrs(),
                     vcpu.get_msrs(vcpu.vm.kvm.msr_index_list()), vcpu.get_mp_state())


def load(vcpu: VCpu, st: VcpuState) -> None:
    """Put a vCPU that has not run (created with its CPUID set) in `st`, in the order KVM
    needs: MSRs before the special registers (EFER's dependants), XCRs before XSAVE (the
    image's features must be enabled), events last.  kvm_run's synced copy is refreshed at
    the end, so an owner that copies registers through it sees the loaded state.  KVM's
    refusal of a value (a CR4 bit or an MSR this host's KVM does not take) is a
    VcpuStateError naming it; the vCPU is then unusable and its owner discards it."""
    try:
        s = ffi.new("struct kvm_sregs *")
        ffi.memmove(s, st.sregs, len(st.sregs))
        _load_msrs(vcpu, st.msrs)
        vcpu.set_sregs(s)
        r = ffi.new("struct kvm_regs *")
        ffi.memmove(r, st.regs, len(st.regs))
        vcpu.set_regs(r)
        vcpu.set_xcrs(st.xcrs)
        vcpu.set_xsave(st.xsave)
        d = ffi.new("struct kvm_debugregs *")
        ffi.memmove(d, st.debugregs, len(st.debugregs))
        vcpu.set_debugregs(d)
        vcpu.set_mp_state(st.mp_state)
        e = ffi.new("struct kvm_vcpu_events *")
        ffi.memmove(e, st.events, len(st.events))
        e.flags &= ~u.KVM_VCPUEVENT_VALID_PAYLOAD
        vcpu.set_events(e)
    except VcpuStateError:
        raise
    except VmmError as err:
        raise VcpuStateError(f"KVM refused the saved vCPU state: {err}") from None
    vcpu.run.kvm_dirty_regs = 0
    flush(vcpu)


def _load_msrs(vcpu: VCpu, msrs: dict[int, int]) -> None:
    """The MSRs that differ from the new vCPU's, one ioctl; on a refusal, find the one."""
    now = vcpu.get_msrs(list(msrs))
    changed = {i: v for i, v in msrs.items() if now.get(i) != v}
    if not changed:
        return
    try:
        vcpu.set_msrs(changed)
    except VmmError:
        for i, v in changed.items():
            try:
                vcpu.set_msrs({i: v})
            except VmmError:
                raise VcpuStateError(f"KVM refused MSR {i:#x} = {v:#x} of the saved state") from None
