"""The event stream: pydantic models written as JSON lines.

Every event has a timestamp (seconds since the partition was created), the VP
and the VTL it concerns.  Per-call events (vtl_call/vtl_return) are produced
only when someone listens (`EventLog.trace`), so the switch path stays cheap.

A guest decides how many events a run produces, so the log keeps only a bounded
tail in memory (`keep`) and counts per kind; the file gets every event.
"""

from __future__ import annotations

import collections
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import IO, Annotated, Any, Literal

from pydantic import BaseModel, Field, TypeAdapter

from vmm.errors import VmmError
from vmm.files import OutputFileError, open_output


class _Event(BaseModel):
    ts: float
    vp: int = 0
    vtl: int = 0


class VtlEnabled(_Event):
    kind: Literal["vtl_enabled"] = "vtl_enabled"
    enabled_vtl: int = 1
    image: str
    sha256: str
    trust: list[str] = []               # VTL1's allowlist (hex SHA-256), part of its boot data
    kexec_policy: str = "teardown"


class VtlCall(_Event):
    kind: Literal["vtl_call"] = "vtl_call"
    code: int
    arg: int


class VtlReturn(_Event):
    kind: Literal["vtl_return"] = "vtl_return"
    fast: bool
    status: int


class GuestFault(_Event):
    """A fault the VMM injected into a guest, or a guest crash it observed."""
    kind: Literal["guest_fault"] = "guest_fault"
    vector: int | None = None
    name: str
    error_code: int | None = None
    rip: int
    reason: str


class RefusedRequest(_Event):
    kind: Literal["refused"] = "refused"
    request: str          # what the guest tried (e.g. "vtl_return", "hypercall 0x101")
    reason: str           # why it was refused
    response: str         # what the guest got (e.g. "#UD", "VTL_E_ACCESS_DENIED")
    gpa: int | None = None
    access: str | None = None
    rip: int | None = None


class GuestReport(_Event):
    """A record a guest sent through the report channel (VTL_HC_REPORT)."""
    kind: Literal["report"] = "report"
    report: str           # result | target | msr | status | fault | value | stamps | exec | bytes
    name: str
    value: list[int]
    text: str = ""


class ProtectionChanged(_Event):
    """VTL1 changed VTL0's memory attributes (VTL_HC_MODIFY_VTL_PROTECTION)."""
    kind: Literal["protection_changed"] = "protection_changed"
    target_vtl: int = 0
    attributes: str       # e.g. "r-x" (what VTL0 may still do)
    pages: int
    ranges: int
    backend_ops: int      # memslot changes, mprotect calls or attribute ioctls


class SecureIntercept(_Event):
    """VTL0 violated an attribute VTL1 set, wrote a pinned MSR, or (type register) a
    privileged-section instruction writes a register VTL1 judges; VTL1 is entered with
    reason intercept."""
    kind: Literal["intercept"] = "intercept"
    type: Literal["memory", "msr", "register"]
    access: str           # read | write | execute
    gpa: int | None = None
    gva: int | None = None
    rip: int
    rip_after: bool = False
    msr: int | None = None
    data: int | None = None
    # register intercepts: cr0 | cr0_low | cr3 | cr4 | xcr0 | gdtr | idtr | ldtr | tr
    reg: str | None = None
    old: int | None = None            # the value (GDTR/IDTR: base; LDTR/TR: selector)
    new: int | None = None
    old_limit: int | None = None      # GDTR/IDTR; LDTR/TR: the descriptor limits
    new_limit: int | None = None
    old_base: int | None = None       # LDTR/TR: loaded now, and what the new descriptor holds
    new_base: int | None = None
    insn_len: int | None = None


class InterceptControlSet(_Event):
    """VTL1 set which register writes of VTL0 it judges (VTL_HC_SET_INTERCEPT_CONTROL)."""
    kind: Literal["intercept_control"] = "intercept_control"
    flags: int
    cr0_mask: int
    cr4_mask: int
    priv_gpa: int
    priv_pages: int


class RegisterWritten(_Event):
    """The VMM wrote a VTL0 register for a privileged-section instruction: `how` is
    "direct" (VTL1 does not judge this write) or "allowed" (VTL1's verdict)."""
    kind: Literal["register_write"] = "register_write"
    reg: str              # cr0 | cr0_low | cr2 | cr3 | cr4 | cr8 | xcr0 | gdtr | idtr | ldtr | tr
    old: int
    new: int
    old_limit: int | None = None
    new_limit: int | None = None
    rip: int
    how: Literal["direct", "allowed"]


class SingleStepped(_Event):
    """The VMM single-stepped one VTL0 instruction of the privileged section on a temporary
    mapping (only while someone listens, like vtl_call; `RunResult.single_steps` counts
    them all)."""
    kind: Literal["single_step"] = "single_step"
    rip: int
    next_rip: int
    exit: str             # debug (the step ended normally) or the exit that ended it


class InterceptVerdict(_Event):
    kind: Literal["verdict"] = "verdict"
    verdict: Literal["inject_fault", "allow", "stop", "invalid"]
    vector: int | None = None
    error_code: int | None = None
    detail: str = ""


class Lifecycle(_Event):
    """A step of a lifecycle flow (design §7): kexec validation and jump, VTL1's
    teardown, VTL0's restart, RESET, module validation/load/unload, VTL1's enable.
    `before`/`after`: the protections and pins the VMM holds and reads from KVM
    (vtl/lifecycle/protections.py); `duration_us`: the step alone, without the snapshots."""
    kind: Literal["lifecycle"] = "lifecycle"
    step: str
    by: str                             # vtl0 | vtl1 | vmm | user
    status: int | None = None           # VTL_* status the step ended with, when it has one
    detail: str = ""
    duration_us: float
    before: dict[str, Any] | None = None
    after: dict[str, Any] | None = None


class HekiConfigure(_Event):
    """Heki mode: a KVM_HC_LOCK_CR_UPDATE pinned bits (KVM_CAP_HEKI_CONFIGURE's exit in the
    RFC v3 patches): `reason` KVM_HEKI_EXIT_REASON_CR0 (1) or _CR4 (2), `cr_pinned` the bits
    this call pinned (after the patch drops CR4 bits the host's CR4 lacks)."""
    kind: Literal["heki_configure"] = "heki_configure"
    reason: int
    cr_pinned: int
    requested: int              # a1 as the guest gave it
    pinned_total: int           # the VM-wide mask after the call


class HekiDenial(_Event):
    """Heki mode: a MOV to CR0/CR4 would clear a pinned bit (KVM_CAP_HEKI_DENIAL's exit):
    the guest gets #GP(0), the CR is unchanged."""
    kind: Literal["heki_denial"] = "heki_denial"
    reason: int                 # KVM_HEKI_EXIT_REASON_CR0 / _CR4
    cr_value: int               # the denied value
    pinned: int                 # the pinned bits it would clear some of
    rip: int


class HekiHypercall(_Event):
    """Heki mode: one KVM_HC_LOCK_CR_UPDATE / KVM_HC_PROTECT_MEMORY and what it returned
    (`ret` as the guest's RAX reads it, signed); for page lists, what was applied."""
    kind: Literal["heki_hypercall"] = "heki_hypercall"
    nr: int
    args: list[int]
    ret: int
    reason: str = ""            # why an error
    lists: int = 0
    entries: int = 0
    pages: int = 0
    rip: int = 0                # after the call: which kernel asked (an in-guest kexec is not seen)


class HekiNotEnforced(_Event):
    """Heki mode: the guest asked for a protection this host cannot give (no-execute needs
    an EPT/MBEC attribute): what the patch does instead, and why."""
    kind: Literal["heki_not_enforced"] = "heki_not_enforced"
    what: str
    why: str
    pages: int = 0


class VpStarted(_Event):
    """An AP started (VTL_HC_START_VP): where its VTL0 begins; `vtl1`: its VTL1 initialises first."""
    kind: Literal["vp_started"] = "vp_started"
    rip: int
    rsp: int
    cr3: int
    vtl1: bool


class GuestExit(_Event):
    kind: Literal["guest_exit"] = "guest_exit"
    status: int
    reason: str


Event = Annotated[VtlEnabled | VtlCall | VtlReturn | GuestFault | RefusedRequest | GuestReport
                  | ProtectionChanged | InterceptControlSet | RegisterWritten | SingleStepped
                  | SecureIntercept | InterceptVerdict | Lifecycle | VpStarted | GuestExit
                  | HekiConfigure | HekiDenial | HekiHypercall | HekiNotEnforced,
                  Field(discriminator="kind")]
EVENT_ADAPTER: TypeAdapter[Event] = TypeAdapter(Event)


def parse_event(line: str) -> Event:
    return EVENT_ADAPTER.validate_json(line)


class EventSinkError(VmmError):
    """The events file could not be written (disk full, closed pipe, ...)."""


class EventLog:
    """Counts events per kind, keeps the last `keep` in memory and writes every event
    as a JSON line to the file given to `open_file`."""

    def __init__(self, trace: bool = False, keep: int = 10_000) -> None:
        self.t0 = time.monotonic()
        self.recent: collections.deque[Event] = collections.deque(maxlen=keep)
        self.counts: Counter[str] = Counter()
        self._file: IO[str] | None = None
        # Per-call events only when a file listens or a caller asks for them.
        self.trace = trace
        self._emit_lock = threading.RLock()     # a listener may emit (RLock)
        self._init_listeners()

    def open_file(self, path: Path) -> None:
        """Start writing JSON lines to `path` (opened now, truncating it; never a file this
        process read, nor a FIFO: vmm/files.py)."""
        try:
            self._file = open_output(path, "--events")
        except OutputFileError as e:
            raise EventSinkError(str(e)) from None
        self.trace = True

    def now(self) -> float:
        return round(time.monotonic() - self.t0, 6)

    def emit(self, event: Event) -> None:
        """From any VP's thread: one event at a time, so counts, the tail and the file's
        lines stay whole and in one order."""
        with self._emit_lock:
            self.counts[event.kind] += 1
            self.recent.append(event)
            if self._file is not None:
                try:
                    self._file.write(event.model_dump_json() + "\n")
                except OSError as e:
                    self._file = None      # do not try again: the error is reported once
                    raise EventSinkError(f"cannot write events: {e.strerror}") from None
            if self._listeners:
                self._notify(event)

    @property
    def events(self) -> list[Event]:
        """The events still held in memory (the last `keep`)."""
        return list(self.recent)

    def of_kind(self, kind: str) -> list[Event]:
        return [e for e in list(self.recent) if e.kind == kind]   # a copy: VPs append meanwhile

    def close(self) -> None:
        if self._file is not None:
            f, self._file = self._file, None
            try:
                f.close()
            except OSError as e:
                raise EventSinkError(f"cannot write events: {e.strerror}") from None

    # --- listeners (e.g. the control socket, vtl/run/controlsock.py) -----------------------
    # emit() runs on the vCPU thread; listeners are added and removed from others.  The
    # tuple of listeners is replaced, never changed in place, so emit() reads it without a
    # lock.  A listener must not block (it runs between two KVM_RUNs) and its errors are
    # counted, never raised into the run.

    def _init_listeners(self) -> None:
        self._listeners: tuple[Callable[[Event], None], ...] = ()
        self._listener_lock = threading.Lock()
        self._tracing_listeners: list[Callable[[Event], None]] = []
        self._trace_before = False        # `trace` before the first tracing listener came
        self.listener_errors = 0

    def add_listener(self, fn: Callable[[Event], None], trace: bool = False) -> None:
        """Call `fn(event)` for every event from now on, on the emitting thread.  `trace`:
        this listener also wants per-call events, so `trace` is on while it listens (the
        scheduler reads `trace` through Scheduler.refresh_trace)."""
        with self._listener_lock:
            self._listeners = (*self._listeners, fn)
            if trace:
                if not self._tracing_listeners:
                    self._trace_before = self.trace
                self._tracing_listeners.append(fn)
                self.trace = True

    def remove_listener(self, fn: Callable[[Event], None]) -> None:
        """Stop calling `fn` (no-op if it does not listen).  Once no tracing listener is
        left, `trace` is what it was before the first one came (or on, if a file opened
        since)."""
        with self._listener_lock:
            if fn not in self._listeners:
                return
            rest = list(self._listeners)
            rest.remove(fn)
            self._listeners = tuple(rest)
            if fn in self._tracing_listeners:
                self._tracing_listeners.remove(fn)
                if not self._tracing_listeners:
                    self.trace = self._trace_before or self._file is not None

    def _notify(self, event: Event) -> None:
        for fn in self._listeners:
            try:
                fn(event)
            except Exception:      # a broken listener must not end the run it watches
                self.listener_errors += 1
