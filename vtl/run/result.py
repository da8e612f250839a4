"""How a run ended, as tools and `vtl run --json` see it."""

from __future__ import annotations

from pydantic import BaseModel


class RunResult(BaseModel):
    status: int
    # guest_exit | triple_fault | crash | halted | stopped_by_vtl1 | timeout | interrupted
    # | terminated | vmm_error
    reason: str
    message: str
    wall_s: float
    vtl_calls: int
    vtl_returns: int
    vtl_switches: int
    exits: dict[str, int]
    vtl1_enabled: bool
    vtl1_measurement: str | None
    backend: str
