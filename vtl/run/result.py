"""How a run ended, as tools and `vtl run --json` see it."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel


class VpSummary(BaseModel):
    """One VP at the end of a run."""
    index: int
    state: str                  # running VTL0 | in VTL1 (...) | offline | stopped
    run_state: str              # its runner's: offline | running | paused | exited
    reason: str                 # why it stopped ("" if it did not)
    vtl_calls: int
    vtl_returns: int
    exits: int
    requests: int               # requests its runner served (pause, stop, reset, start)
    starts: int = 0             # times it was started (VP0: 1; an AP: each VTL_HC_START_VP)
    vtl1_up: bool = False       # its VTL1 initialised (made its first VTL return) and still exists
    pinned: bool = False        # VTL1 judges its VTL0's register writes (its own intercept control)


class RunResult(BaseModel):
    status: int
    # guest_exit | triple_fault | crash | halted | stopped_by_vtl1 | timeout | interrupted
    # | terminated | stopped (the control socket's `quit`) | vmm_error
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
    single_steps: int = 0           # privileged-section instructions the VMM single-stepped
    register_intercepts: int = 0    # register writes VTL1 was asked to judge
    boot_count: int = 0             # VTL0 boots before the last one (resets + kexecs)
    resets: int = 0                 # emulated RESETs (guest, triple fault, user)
    kexecs: int = 0                 # VTL0 restarts at a new kernel (VTL_HC_VTL0_RESTART)
    trust: list[str] = []           # VTL1's allowlist (hex SHA-256) as provisioned
    kexec_policy: str = "teardown"
    # What happened to VTL1, in order: "enabled", "kept across a kexec (persist)", "torn down
    # at a kexec (teardown)", "torn down by a RESET (<by>)", "kexec refused: <status>
    # (VTL1: <why>)"; at most VTL1_HISTORY_MAX entries, the rest counted.
    vtl1_history: list[str] = []
    vtl1_history_omitted: int = 0
    fast_switches: int = 0          # VTL switches made by the C switch path (vtl/run/fastpath.c)
    switch_path: str = ""           # which path switched VTLs: C, or Python and why
    ended_on_vp: int = 0            # the VP whose stop ended the run (the others followed)
    vps: list[VpSummary] = []
    # Snapshots this run saved (path, by, policy digest, memory SHA-256, duration), and the
    # one it was restored from (path, digests compared, backends, duration): docs/snapshot.md.
    snapshots: list[dict[str, Any]] = []
    restored_from: dict[str, Any] | None = None
    # --snapshot-at that saved nothing: why (the point never reached, or the save refused).
    snapshot_missed: str | None = None


VTL1_HISTORY_MAX = 32


class RunInterrupted(Exception):
    """A signal stopped a run a tool needed whole (bench, attack, memmap): the tool ends
    with the signal's status instead of reporting a half run."""

    def __init__(self, result: RunResult) -> None:
        super().__init__(result.message)
        self.status = result.status


def raise_if_interrupted(result: RunResult) -> RunResult:
    if result.reason in ("interrupted", "terminated"):
        raise RunInterrupted(result)
    return result
