"""The C switch path (vtl/run/fastpath.c) against the Python one, on real KVM: the same
guest sees the same registers and the VMM counts the same, and the C path really carries
the calls (the run says how many switches it made)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.vtlrun import vtl_cli
from vtl.run import fastpath

pytestmark = pytest.mark.skipif(not fastpath.AVAILABLE, reason=f"C switch path {fastpath.DESCRIPTION}")


def _run(scenario: str, fast: bool, *extra: str) -> dict[str, Any]:
    cp = vtl_cli("run", "--scenario", scenario, "--json", "--quiet", *extra,
                 env={"VTL_FASTPATH": "1" if fast else "0"})
    assert cp.returncode == 0, cp.stderr
    doc: dict[str, Any] = json.loads(cp.stdout)
    return doc


def _values(doc: dict[str, Any]) -> list[tuple[str, str, list[int]]]:
    return [(r["kind"], r["name"], r["value"]) for r in doc["reports"]]


def test_registers_across_a_vtl_call_are_the_same_on_both_paths(guest_images: tuple[Path, Path]) -> None:
    # vtl-call-state: every shared register carries a pattern into VTL1 and another back,
    # RSP/RIP/RFLAGS/CR3 stay private; VTL1 reads VTL0's private registers from KVM.
    c, py = _run("vtl-call-state", True), _run("vtl-call-state", False)
    assert c["fast_switches"] > 0 and py["fast_switches"] == 0
    assert py["switch_path"].startswith("off")
    assert _values(c) == _values(py)
    assert c["exits"] == py["exits"] and c["vtl_calls"] == py["vtl_calls"]


def test_null_calls_go_through_the_c_path_and_count_as_in_python(guest_images: tuple[Path, Path]) -> None:
    n = 3000
    c = _run("bench-null-call", True, "--param", str(n))
    py = _run("bench-null-call", False, "--param", str(n))
    assert c["vtl_calls"] == py["vtl_calls"] >= n
    assert c["exits"] == py["exits"]
    # All but the enable flow's first return and the lifecycle calls (none here) are the C path's.
    assert c["fast_switches"] >= 2 * n


def test_per_call_events_turn_the_c_path_off(guest_images: tuple[Path, Path], tmp_path: Path) -> None:
    events = tmp_path / "events.jsonl"
    doc = _run("bench-null-call", True, "--param", "200", "--events", str(events))
    assert doc["fast_switches"] == 0
    kinds = [json.loads(line)["kind"] for line in events.read_text().splitlines()]
    assert kinds.count("vtl_call") == doc["vtl_calls"]
