"""What a service asks the scheduler to do after handling an exit.

`None` means: resume the vCPU that exited.  Anything else is one of these, and the
scheduler alone turns it into a VP state transition."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from vtl.core.vp import VpState


@dataclass(frozen=True, slots=True)
class Enter:
    """Switch the VP to `state` (e.g. into VTL1 for an intercept)."""
    state: VpState


@dataclass(frozen=True, slots=True)
class EnableVtl1:
    """VTL0 asked for VTL1 (VTL_HC_ENABLE_VTL1): run the enable flow."""


@dataclass(frozen=True, slots=True)
class Step:
    """Single-step VTL0's instruction at `rip` (in the privileged section) with the
    privileged-section pages `pages` (GPAs) executable for that one instruction.
    `blocked_gva`: the first byte within 15 of `rip` that VTL0 may not fetch (None: all
    may be); a step that cannot fetch its instruction ends as a fetch of that byte.
    For the step only, `guard_nr` pages (the first byte of every IDT gate's handler) are
    made NR, so that an event delivered during the step ends it at the handler's first
    fetch, and `guard_nw` pages (the IDT and the page tables that map it and the
    handlers) NW, so that the instruction cannot change where an event goes
    (privileged.PrivilegedSection.plan_step)."""
    rip: int
    pages: tuple[int, ...]
    blocked_gva: int | None = None
    guard_nr: tuple[int, ...] = ()
    guard_nw: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class Reset:
    """An emulated RESET of the partition (vtl/lifecycle/reset.py); `by` says who asked:
    vtl0, vtl1, triple_fault, user."""
    by: str
    detail: str = ""


@dataclass(frozen=True, slots=True)
class Stop:
    """End the run."""
    status: int
    reason: str
    message: str


@dataclass(frozen=True, slots=True)
class StartVp:
    """Start the offline AP `vp_index` (VTL_HC_START_VP, validated): its VTL0 at `rip` in
    long mode on `cr3`, RSP = `rsp`, RDI = `arg`; its VTL1 first when VTL1 is enabled."""
    vp_index: int
    rip: int
    rsp: int
    cr3: int
    arg: int


@dataclass(frozen=True, slots=True)
class Halt:
    """VTL0 of a VP of several executed HLT: the VP idles until another VP wakes it
    (VTL_HC_SEND_IPI) or the run ends; when every VP idles, nothing can wake one."""
    rip: int


@dataclass(frozen=True, slots=True)
class SendIpi:
    """VTL_HC_SEND_IPI, validated: wake `vp_index` from HLT (a wake for a VP that is not
    halted stays pending, as an interrupt does, and ends its next HLT at once)."""
    vp_index: int


@dataclass(frozen=True, slots=True)
class ReadVpRegister:
    """VTL_HC_GET_VP_REGISTER of another VP's VTL0: read once that VP is paused (its
    registers are current only while its vCPU does not run)."""
    vp_index: int
    reg: int


@dataclass(frozen=True, slots=True)
class WithOthersPaused:
    """Carry out `action` (on this VP's thread) with every other VP out of KVM_RUN: a
    change the backend cannot make atomically for running vCPUs (memslot splits)."""
    action: Callable[[], None]


@dataclass(frozen=True, slots=True)
class SaveSnapshot:
    """VTL_HC_SNAPSHOT: save the partition at the top of this VP's loop (a snapshot is
    taken between exits, never inside one: vtl/run/snapshot.py)."""


Outcome = (Enter | EnableVtl1 | Step | Reset | Stop | StartVp | Halt | SendIpi | ReadVpRegister | SaveSnapshot
           | WithOthersPaused | None)

# How a run ended, besides the guest's own status (documented in `vtl run --help`).
STATUS_VMM_ERROR = 1
STATUS_CRASH = 3        # triple fault, emulation failure, halt without status
STATUS_STOPPED_BY_VTL1 = 4
STATUS_STOPPED = 5      # `quit` over the control socket (docs/control-socket.md)
STATUS_TIMEOUT = 124
STATUS_INTERRUPTED = 130   # SIGINT
STATUS_TERMINATED = 143    # SIGTERM
