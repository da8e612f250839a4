"""Human-readable summaries of runs."""

from __future__ import annotations

from vtl.core.config import PartitionConfig
from vtl.run.result import RunResult


def run_summary_lines(result: RunResult, scenario: str, config: PartitionConfig) -> list[str]:
    verdict = "PASS" if result.status == 0 else "FAIL"
    heki = config.mode == "heki"
    if heki:
        vtl1 = "none: Heki mode, the VMM in the role of KVM with the Heki patches (docs/heki-mode.md)"
    elif result.vtl1_enabled:
        vtl1 = f"enabled, SHA-256 {result.vtl1_measurement} ({config.vtl1_image})"
    elif config.vtl1_image is None:
        vtl1 = "disabled (--no-vtl1)"
    else:
        vtl1 = "not enabled by the guest"
    if config.vtl1_image is not None:
        trusted = ", ".join(d[:16] + "…" for d in result.trust) or "nothing (--trust)"
        vtl1 += f"\n              allowlist: {trusted}; kexec policy {result.kexec_policy}"
    if result.kexecs or result.resets or any(h.startswith("kexec") for h in result.vtl1_history):
        # What happened to VTL1 across the run's kexecs and resets.
        more = f", and {result.vtl1_history_omitted} more" if result.vtl1_history_omitted else ""
        vtl1 += "\n              history: " + (" → ".join(result.vtl1_history) or "never enabled") + more
    exits = ", ".join(f"{k} {v}" for k, v in sorted(result.exits.items(), key=lambda kv: -kv[1]))
    vps: list[str] = []
    if len(result.vps) > 1:         # one line per VP: where it ended, its VTL1, its pins
        for v in result.vps:
            how = f"{v.state} ({v.reason})" if v.reason else v.state
            started = f"started {v.starts}x" if v.starts > 1 else "started"
            what = [started if v.starts else "never started"]
            if v.vtl1_up:
                what.append("VTL1 up")
            if v.pinned:
                what.append("registers pinned")
            what.append(f"{v.vtl_calls} VTL calls, {v.exits} exits")
            vps.append(f"{'VPs' if not vps else '':<14}vp{v.index:<3} {how:<30} {', '.join(what)}")
    return [
        "",
        "--- summary ---",
        f"result        {verdict}: {result.message} ({result.reason})",
        f"scenario      {scenario}",
        f"VTL1          {vtl1}",
        f"protections   {result.backend} backend (VTL0's memory as "
        f"{'the host-owned Heki policy' if heki else 'VTL1'} sets it; `vtl caps`)",
        *([f"lifecycle     {result.boot_count} reboots of VTL0 ({result.resets} resets, "
            f"{result.kexecs} kexecs)"] if result.boot_count else []),
        *vps,
        *_snapshot_lines(result),
        f"VTL switches  {result.vtl_switches} ({result.vtl_calls} calls, {result.vtl_returns} returns"
        f"{_switch_path(result)})",
        f"exits         {exits or 'none'}",
        f"wall time     {result.wall_s:.3f} s",
    ]


def _switch_path(result: RunResult) -> str:
    if not result.vtl_switches:
        return ""
    if result.fast_switches:
        return f"; {result.fast_switches} by the C switch path"
    return f"; switch path {result.switch_path}" if result.switch_path.startswith(("off", "not")) else ""


def _snapshot_lines(result: RunResult) -> list[str]:
    out = []
    r = result.restored_from
    if r is not None:
        through = r["backend"] if r["backend"] == r["saved_backend"] else \
            f"{r['backend']} (saved through {r['saved_backend']})"
        out.append(f"{'restored':<14}from {r['path']} in {r['duration_us'] / 1000:.1f} ms through {through}; "
                   f"policy digest {r['policy_digest'][:16]}… equal to the saved one")
    if result.snapshot_missed is not None:
        out.append(f"{'snapshot':<14}none: {result.snapshot_missed}")
    for i, s in enumerate(result.snapshots):
        out.append(f"{'' if i else 'snapshot':<14}{s['path']} ({s['by']}, VP{s['vp']}) "
                   f"in {s['duration_us'] / 1000:.1f} ms; policy digest {s['policy_digest'][:16]}…")
    return out
