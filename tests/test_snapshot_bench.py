"""`vtl bench --restores N`: a hardened cold boot to its `--snapshot-at hardened` save, the
save, the snapshot's size, then N clones restored from that one snapshot, from one run (the
figures are printed by `vtl bench`; this test checks that they are there and hang
together, never what they are)."""

from __future__ import annotations

import pytest

from tests.vtlrun import cli_json, vtl_cli
from vtl.tools.bench import BenchReport, bench_steps, render_bench
from vtl.tools.cli import build_parser

pytestmark = pytest.mark.kvm


def test_bench_restores_reports_restore_time_beside_a_cold_boot() -> None:
    b = cli_json("bench", "--calls", "100", "--intercepts", "0", "--no-protection", "--lifecycle", "0",
                 "--smp-calls", "0", "--restores", "2")
    s = b["snapshot"]
    assert s["scenario"] == "harden" and s["vps"] == 1
    assert s["restores"] == 2
    for key in ("restore", "verify", "rebuild"):
        t = s[key]
        assert t["samples"] == 2, key
        assert 0 < t["min_ms"] <= t["median_ms"] <= t["max_ms"], (key, t)
    for key in ("cold_boot", "save"):
        t = s[key]
        assert t["samples"] >= 1 and 0 < t["min_ms"] <= t["median_ms"] <= t["max_ms"], (key, t)
    # A restore is its two parts (per clone, so the medians add up only roughly).
    assert s["restore"]["max_ms"] <= s["verify"]["max_ms"] + s["rebuild"]["max_ms"] + 0.01
    assert s["speedup"] == pytest.approx(s["cold_boot"]["median_ms"] / s["restore"]["median_ms"], rel=0.01)
    # memory.bin is sparse: on disk, a part of the partition's memory (a hardened boot touches
    # a few MiB of 256).
    assert s["memory_bytes"] == 256 << 20 and 0 < s["disk_bytes"] < s["memory_bytes"]
    assert s["state_bytes"] > 0
    assert s["clone_run"].startswith("PASS")

    text = render_bench(BenchReport.model_validate(b))
    assert "Snapshot and restore (scenario harden" in text
    assert "floor: cold boot to the save point" in text and "faster than a cold boot" in text


def test_restores_option() -> None:
    parser = build_parser()
    assert parser.parse_args(["bench"]).restores == 5
    assert parser.parse_args(["bench", "--restores", "0"]).restores == 0
    assert bench_steps(restores=0) + 1 == bench_steps(restores=3)
    for bad in ("-1", "101", "x"):
        cp = vtl_cli("bench", "--restores", bad)
        assert cp.returncode == 2 and "--restores" in cp.stderr and "Traceback" not in cp.stderr, cp.stderr
