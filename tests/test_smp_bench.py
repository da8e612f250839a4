"""`vtl bench --vps`: the null-call round trip with several VPs calling at once, beside
floors with as many threads, from one run (figures are printed by `vtl bench`; this test
checks that they are there and come from every VP, not what they are)."""

from __future__ import annotations

from pathlib import Path

from tests.vtlrun import cli_json


def test_bench_vps_measures_every_vp_count_on_both_paths_beside_floors(
        guest_images: tuple[Path, Path]) -> None:
    b = cli_json("bench", "--calls", "500", "--intercepts", "0", "--no-protection", "--lifecycle", "0",
                 "--vps", "1,2", "--smp-calls", "500", "--restores", "0")
    smp = b["smp"]
    assert [p["vps"] for p in smp["points"]] == [1, 2]
    for p in smp["points"]:
        for path in ("c_path", "python_path"):
            m = p[path]
            assert m["vps"] == p["vps"] and m["calls"] >= 500
            assert m["median_ns"] > 0 and m["aggregate_per_s"] > 0
        assert p["c_path"]["switch_path"] == "C" and p["python_path"]["switch_path"] == "Python"
        assert p["python_floor"]["threads"] == p["vps"] and p["python_floor"]["aggregate_per_s"] > 0
    assert smp["scaling_2vps"] > 0 and isinstance(smp["meets_target"], bool)
    assert b["switch_path"].startswith("C")
