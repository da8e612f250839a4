"""`vtl attack --mode heki` and `vtl compare` on real KVM (docs/compare.md).

What a user relies on: in Heki mode the attacks Heki covers are blocked and those it does
not cover succeed, as the VMM observes them (registers and MSRs read from KVM, memory
read back), and the command says that this is what Heki's design gives; `vtl compare`
puts both modes' observed outcomes side by side with where they differ, and its costs
beside the floors of the same run.  Scenarios are restricted to keep the suite short."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.vtlrun import vtl_cli

pytestmark = pytest.mark.kvm


def _by_name(rows: list[dict]) -> dict[str, dict]:  # type: ignore[type-arg]
    return {r["scenario"]: r for r in rows}


def test_attack_mode_heki_blocks_what_heki_covers_and_not_the_rest() -> None:
    cp = vtl_cli("attack", "--mode", "heki", "--json", "--scenario", "clear-cr4-smep", "write-rodata",
                 "lidt-own", "write-lstar-after-eob", "read-vtl1-memory")
    assert cp.returncode == 0, cp.stdout[-2000:] + cp.stderr[-2000:]    # every outcome as Heki gives it
    rows = _by_name(json.loads(cp.stdout))
    assert all(r["mode"] == "heki" for r in rows.values())
    for name in ("clear-cr4-smep", "write-rodata"):
        r = rows[name]
        assert r["outcome"] == "blocked" and r["changed"] == [] and r["vmm_checked"], r
    smep = rows["clear-cr4-smep"]["mechanism"]
    assert "Heki CR pin" in smep and "#GP(0)" in smep
    assert "MEM_ATTR_WRITE" in rows["write-rodata"]["mechanism"]
    # Not pinned by Heki: IDTR read from KVM changed, LSTAR read from KVM changed.
    assert rows["lidt-own"]["outcome"] == "succeeded"
    assert any(c.startswith("IDTR now") for c in rows["lidt-own"]["changed"])
    assert rows["write-lstar-after-eob"]["outcome"] == "succeeded"
    assert any(c.startswith("MSR 0xc0000082 now") for c in rows["write-lstar-after-eob"]["changed"])
    assert rows["read-vtl1-memory"]["outcome"] == "not applicable"
    assert all(r["as_expected"] for r in rows.values())


def test_attack_mode_heki_table_says_succeeded_is_what_heki_gives() -> None:
    cp = vtl_cli("attack", "--mode", "heki", "--scenario", "load-own-cr3")
    assert cp.returncode == 0, cp.stderr[-2000:]
    line = next(ln for ln in cp.stdout.splitlines() if ln.startswith("load-own-cr3"))
    assert "succeeded" in line and "as expected" in line and "CR3" in line
    assert "Traceback" not in cp.stderr


def test_compare_json_both_modes_costs_floors_and_png(tmp_path: Path) -> None:
    png = tmp_path / "compare.png"
    cp = vtl_cli("compare", "--json", "--scenario", "clear-cr0-wp", "load-own-cr3", "reset-request",
                 "--ops", "200", "--calls", "1000", "--png", str(png))
    assert cp.returncode == 0, cp.stderr[-3000:]
    assert cp.stderr == ""                           # no progress bar without a terminal, no traceback
    doc = json.loads(cp.stdout)
    rows = _by_name(doc["scenarios"])
    assert set(rows) == {"clear-cr0-wp", "load-own-cr3", "reset-request"}
    cr0, cr3, reset = rows["clear-cr0-wp"], rows["load-own-cr3"], rows["reset-request"]
    assert cr0["vtl"]["outcome"] == cr0["heki"]["outcome"] == "blocked" and not cr0["differ"]
    assert cr3["vtl"]["outcome"] == "blocked" and cr3["heki"]["outcome"] == "succeeded" and cr3["differ"]
    assert "CR3 now" in cr3["heki"]["mechanism"]                      # read from KVM after the run
    assert reset["vtl"]["outcome"] == "ran to the end"                # VTL1's policy ends with the guest
    assert reset["heki"]["outcome"] == "policy outlived the kernel"   # KVM keeps it across the reset
    assert "immutable" in reset["heki"]["mechanism"]
    assert doc["summary"]["differ"] == 2
    costs = {c["key"]: c for c in doc["costs"]}
    for key in ("hardened_boot", "null_call", "cr_write_allowed", "cr_write_refused", "memory_violation",
                "protect_contiguous", "protect_alternating"):
        assert costs[key]["vtl"]["median_ns"] > 0 and costs[key]["heki"]["median_ns"] > 0, key
    floors = {f["key"]: f for f in doc["floors"]}
    assert {"python_floor", "inkernel_loop", "inkernel_mov_cr0", "inkernel_cpuid"} <= set(floors)
    # The stand-in's CR write leaves the kernel; an in-kernel CR exit does not: the table shows both.
    cr = costs["cr_write_allowed"]
    assert cr["heki_in_kvm_ns"] is not None and cr["heki"]["median_ns"] > floors["python_floor"]["median_ns"]
    assert floors["inkernel_mov_cr0"]["median_ns"] < floors["python_floor"]["median_ns"]
    assert doc["partition"]["vtl"]["vms"] == 2 and doc["partition"]["heki"]["vms"] == 1
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_unknown_scenario_is_a_usage_error() -> None:
    cp = vtl_cli("compare", "--scenario", "clear-cr0-wpp")
    assert cp.returncode == 2 and "clear-cr0-wp" in cp.stderr and "Traceback" not in cp.stderr


def test_memmap_kexec_and_bench_take_mode_heki() -> None:
    mm = json.loads(vtl_cli("memmap", "--mode", "heki", "--json").stdout)
    labels = {r["label"]: r["vtl0"] for r in mm["regions"]}
    # text and rodata read-only as the backend enforces them (executable: no MBEC), the
    # stand-in's section no access, data writable
    assert mm["mode"] == "heki" and labels["kernel text"] == "r-x" and labels["rodata"] == "r-x"
    assert labels["privileged section"] == "---" and labels["data + bss"] == "rwx"
    assert "MBEC" in mm["nx_enforced_by"]
    cp = vtl_cli("kexec", "--mode", "heki", "--flow", "persist", "--json")
    assert cp.returncode == 0, cp.stderr[-2000:]
    k = json.loads(cp.stdout)
    # No kexec flow in Heki: the kernel jumps itself, the VMM counts nothing, finds the next
    # kernel running (RIP) and the old kernel's pins and immutable text still the host's.
    assert k["outcome"] == "policy outlived the kernel" and k["as_expected"] and k["kexecs"] == 0
    assert k["in_guest_kexec"]["ran"] and k["in_guest_kexec"]["page_lists_refused"]
    assert k["after"]["pinned_cr0"] and k["after"]["immutable_pages"]   # the pins stay with KVM
    cp = vtl_cli("bench", "--mode", "heki", "--calls", "1000", "--json")
    assert cp.returncode == 0, cp.stderr[-2000:]
    b = json.loads(cp.stdout)
    costs = {c["key"]: c for c in b["costs"]}
    assert costs["null_call"]["heki"]["median_ns"] > 0 and costs["null_call"]["vtl"] is None
    assert {"python_floor", "inkernel_mov_cr0"} <= {f["key"] for f in b["floors"]}
