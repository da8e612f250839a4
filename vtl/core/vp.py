"""A virtual processor: one vCPU per enabled VTL, and the one state that says which runs.

A VP's state (design §10, as Firecracker's vCPU state machine) is exactly one of:

  running VTL0                        VTL0's vCPU runs
  in VTL1 (entry: enable)             VTL1 initialises; its first VTL return completes
                                      VTL0's VTL_HC_ENABLE_VTL1
  in VTL1 (entry: call)               VTL0 made a VTL call
  in VTL1 (entry: intercept, pending) VTL1 judges `pending`; its VTL return applies the verdict
  offline                             an AP not started yet (or again, after a RESET
                                      or a kexec): no vCPU runs
  stopped (status, reason, message)   the run is over

The scheduler (vtl/run/scheduler.py) is the only code that changes it, through one
transition function; everything else reads it.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

from vmm import uapi as u
from vmm.kvm import VCpu
from vtl.abi import ABI, abi_ffi
from vtl.core.privileged import RegisterWrite
from vtl.core.vtl import Vtl, VtlArray


class Entry(IntEnum):
    """Why VTL1 was entered (written to vtl_control.entry_reason)."""
    ENABLE = ABI.VTL_ENTRY_NONE
    CALL = ABI.VTL_ENTRY_CALL
    INTERCEPT = ABI.VTL_ENTRY_INTERCEPT


@dataclass(frozen=True, slots=True)
class PendingIntercept:
    """A secure intercept delivered to VTL1 and not answered yet."""
    type: int                   # VTL_INTERCEPT_*
    access: int                 # VTL_ACCESS_*
    gpa: int
    size: int
    data: int
    rip: int
    rip_after: bool             # reported after the instruction retired
    regs: tuple[tuple[str, int], ...]   # VTL0's registers at the exit, for a precise rewind
    msr: int = 0
    gva: int | None = None      # memory: the linear address, when known
    write: RegisterWrite | None = None  # register: the write VTL1 judges


SCENARIO_SIZE = len(abi_ffi.new("struct vtl_restart *").scenario)   # bytes, NUL included


@dataclass(frozen=True, slots=True)
class RestartRequest:
    """VTL1's struct vtl_restart, validated and copied (VTL_HC_VTL0_RESTART)."""
    entry: int
    teardown: bool
    image_start: int
    image_end: int
    param: int
    scenario: str

    def problem(self, window: tuple[int, int]) -> str | None:
        """Why this request cannot be applied in VTL0's image window (the one rule for the
        hypercall and for a request a snapshot carries), or None."""
        lo, hi = window
        if not (lo <= self.image_start <= self.entry < self.image_end <= hi):
            return (f"entry {self.entry:#x} / image {self.image_start:#x}-{self.image_end:#x} outside "
                    f"VTL0's image window {lo:#x}-{hi:#x}")
        if len(self.scenario.encode()) >= SCENARIO_SIZE:
            return "scenario name too long"
        return None


@dataclass(frozen=True, slots=True)
class VpState:
    name: str                   # running_vtl0 | in_vtl1 | stopped
    vtl: Vtl | None             # whose vCPU runs; None once stopped
    entry: Entry | None = None
    pending: PendingIntercept | None = None
    # stopped only
    status: int = 0
    reason: str = ""
    message: str = ""

    def __str__(self) -> str:
        if self.name == "in_vtl1":
            return f"in VTL1 ({self.entry.name.lower() if self.entry is not None else '?'})"
        return self.name.replace("_", " ")


# The states the switch path uses are singletons: the hot path compares identities.
RUNNING_VTL0 = VpState("running_vtl0", Vtl.VTL0)
IN_VTL1_ENABLE = VpState("in_vtl1", Vtl.VTL1, Entry.ENABLE)
IN_VTL1_CALL = VpState("in_vtl1", Vtl.VTL1, Entry.CALL)
# An AP before its boot VP starts it (VTL_HC_START_VP), and after a RESET or kexec: no
# vCPU runs; its runner waits (vtl/run/runner.py).
OFFLINE = VpState("offline", None)


def in_vtl1_intercept(pending: PendingIntercept) -> VpState:
    return VpState("in_vtl1", Vtl.VTL1, Entry.INTERCEPT, pending)


def stopped(status: int, reason: str, message: str) -> VpState:
    return VpState("stopped", None, status=status, reason=reason, message=message)


@dataclass(slots=True)
class SyncView:
    """One vCPU's registers as KVM syncs them into kvm_run, resolved once: each cffi
    attribute hop costs a wrapper object, and the VTL switch copies through these."""
    vcpu: VCpu
    # [rax..rdi] at offset 0 (48 bytes) and [rbp..r15] at 56 (72 bytes); RSP at 48 is private.
    lo: Any
    hi: Any
    dirty: Any                  # uint64_t * to kvm_run.kvm_dirty_regs
    cr2: Any                    # uint64_t * to the synced CR2

    @classmethod
    def of(cls, vcpu: VCpu) -> SyncView:
        ffi = u.ffi
        base = ffi.cast("uint8_t *", ffi.addressof(vcpu.run.s.regs, "regs"))
        return cls(vcpu, base, base + 56, ffi.cast("uint64_t *", ffi.addressof(vcpu.run, "kvm_dirty_regs")),
                   ffi.cast("uint64_t *", ffi.addressof(vcpu.sregs, "cr2")))


@dataclass(slots=True)
class VirtualProcessor:
    index: int
    state: VpState = RUNNING_VTL0
    vcpus: VtlArray[VCpu | None] = field(default_factory=lambda: VtlArray(lambda _: None))
    sync: VtlArray[SyncView | None] = field(default_factory=lambda: VtlArray(lambda _: None))
    ctl: Any = None                     # struct vtl_control * in VTL1's memory, once enabled
    current: VCpu | None = None         # the vCPU of state.vtl (None once stopped)
    # VTL_HC_VTL0_RESTART: what VTL1 asked for, applied at its VTL return.
    restart: RestartRequest | None = None
    # VTL1 on this VP has made its first VTL return (initialised); False again at its end.
    vtl1_up: bool = False
    # Times this VP was started (VP0 boots started; an AP counts each VTL_HC_START_VP).
    starts: int = 0
    # This VP's counters (each written only by the VP's own thread; the run sums them).
    vtl_calls: int = 0
    vtl_returns: int = 0
    fast_switches: int = 0              # of those, switched by the C path (vtl/run/fastpath.c)
    port_counts: list[int] = field(default_factory=lambda: [0] * 65536)   # I/O exits by port
    exit_counts: Counter[str] = field(default_factory=Counter)           # other exits by name

    def add_vcpu(self, vtl: Vtl, vcpu: VCpu) -> None:
        self.vcpus[vtl] = vcpu
        self.sync[vtl] = SyncView.of(vcpu)
        if self.current is None and vtl == self.state.vtl:
            self.current = vcpu

    def remove_vcpu(self, vtl: Vtl) -> None:
        """Forget `vtl`'s vCPU (its VM is being destroyed); VTL1's control page goes with it."""
        vcpu = self.vcpus[vtl]
        self.vcpus[vtl] = None
        self.sync[vtl] = None
        if vtl == Vtl.VTL1:
            self.ctl = None
            self.restart = None
            self.vtl1_up = False
        if self.current is vcpu:
            self.current = None

    @property
    def active_vtl(self) -> Vtl:
        """The VTL whose vCPU ran last (VTL0 once stopped from VTL0, ...)."""
        return self.state.vtl if self.state.vtl is not None else Vtl.VTL0
