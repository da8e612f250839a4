"""The event stream: pydantic models written as JSON lines.

Every event has a timestamp (seconds since the partition was created), the VP
and the VTL it concerns.  Per-call events (vtl_call/vtl_return) are produced
only when someone listens (`EventLog.trace`), so the switch path stays cheap.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import IO, Annotated, Literal

from pydantic import BaseModel, Field, TypeAdapter


class _Event(BaseModel):
    ts: float
    vp: int = 0
    vtl: int = 0


class VtlEnabled(_Event):
    kind: Literal["vtl_enabled"] = "vtl_enabled"
    enabled_vtl: int = 1
    image: str
    sha256: str


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


class ProtectionChanged(_Event):
    """VTL1 changed VTL0's memory attributes (VTL_HC_MODIFY_VTL_PROTECTION)."""
    kind: Literal["protection_changed"] = "protection_changed"
    target_vtl: int = 0
    attributes: str       # e.g. "r-x" (what VTL0 may still do)
    pages: int
    ranges: int
    memslot_ops: int


class SecureIntercept(_Event):
    """VTL0 violated an attribute VTL1 set; VTL1 is entered with reason intercept."""
    kind: Literal["intercept"] = "intercept"
    type: Literal["memory", "msr"]
    access: str           # read | write | execute
    gpa: int | None = None
    gva: int | None = None
    rip: int
    rip_after: bool = False
    msr: int | None = None
    data: int | None = None


class InterceptVerdict(_Event):
    kind: Literal["verdict"] = "verdict"
    verdict: Literal["inject_fault", "allow", "stop", "invalid"]
    vector: int | None = None
    error_code: int | None = None
    detail: str = ""


class GuestExit(_Event):
    kind: Literal["guest_exit"] = "guest_exit"
    status: int
    reason: str


Event = Annotated[VtlEnabled | VtlCall | VtlReturn | GuestFault | RefusedRequest | ProtectionChanged
                  | SecureIntercept | InterceptVerdict | GuestExit,
                  Field(discriminator="kind")]
EVENT_ADAPTER: TypeAdapter[Event] = TypeAdapter(Event)


def parse_event(line: str) -> Event:
    return EVENT_ADAPTER.validate_json(line)


class EventLog:
    """Collects events in memory and optionally writes them as JSON lines."""

    def __init__(self, path: Path | None = None, trace: bool = False) -> None:
        self.t0 = time.monotonic()
        self.events: list[Event] = []
        self._file: IO[str] | None = open(path, "w") if path else None  # noqa: SIM115
        # Per-call events only when a file listens or a caller asks for them.
        self.trace = trace or path is not None

    def now(self) -> float:
        return round(time.monotonic() - self.t0, 6)

    def emit(self, event: Event) -> None:
        self.events.append(event)
        if self._file:
            self._file.write(event.model_dump_json() + "\n")

    def of_kind(self, kind: str) -> list[Event]:
        return [e for e in self.events if e.kind == kind]

    def close(self) -> None:
        if self._file:
            self._file.close()
            self._file = None
