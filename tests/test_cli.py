"""The CLI as a user and a script see it: --json outputs, errors as one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.vtlrun import cli_json, vtl_cli
from vmm.elf import read_image
from vtl.core.images import scenarios

pytestmark = pytest.mark.kvm


def test_scenarios_json_lists_what_the_image_carries(guest_images: tuple[Path, Path]) -> None:
    listed = cli_json("scenarios")
    names = [s["name"] for s in listed]
    assert names == [s.name for s in scenarios(read_image(guest_images[0]))]
    assert {"boot", "write-vtl1-memory", "triple-fault"} <= set(names)
    assert all(s["description"] for s in listed)


def test_caps_json_reports_each_mechanism_and_a_strategy_per_protection() -> None:
    caps = cli_json("caps")
    mech = {m["name"]: m for m in caps["mechanisms"]}
    assert mech["kvm"]["present"] is True
    for name in ("sync_regs", "readonly_memslot", "msr_filter", "vmcall_to_userspace",
                 "rwx_memory_attributes", "cr_write_exits", "kvm_translate"):
        assert isinstance(mech[name]["present"], bool) and mech[name]["detail"], name
    for s in caps["strategies"]:
        assert s["strategy"]
        if not s["enforced"]:
            assert s["why"], f"{s['protection']} is not enforced but does not say why"


def test_bench_json_has_three_figures_and_ratios() -> None:
    b = cli_json("bench", "--calls", "1000", "--intercepts", "200", "--no-protection", "--lifecycle", "0",
                 "--smp-calls", "0", "--restores", "0")
    for key in ("vtl_round_trip", "python_floor", "c_floor"):
        assert b[key]["median_ns"] > 0, key
    assert b["ratio_to_python_floor"] == pytest.approx(
        b["vtl_round_trip"]["median_ns"] / b["python_floor"]["median_ns"], abs=1e-3)
    assert b["intercept_allow_round_trip"]["calls"] >= 200 and b["protection"] is None


@pytest.mark.parametrize("args,message", [
    (("run", "--vtl0-image", "/nonexistent.elf"), "no such file"),
])
def test_bad_input_is_one_clear_line(args: tuple[str, ...], message: str) -> None:
    cp = vtl_cli(*args)
    assert cp.returncode == 1
    assert message in cp.stderr and "Traceback" not in cp.stderr


def test_no_kvm_device_is_one_sentence_for_every_command() -> None:
    for cmd in (("run",), ("caps",), ("bench", "--calls", "100")):
        cp = vtl_cli(*cmd, env={"VTL_KVM_DEVICE": "/nonexistent/kvm"})
        assert cp.returncode == 1, cmd
        assert "has no KVM" in cp.stderr and "Traceback" not in cp.stderr


# A few attacks of each kind through the command itself: a memory write, an MSR, a refusal
# by VTL1's policy, a cross-VP attack given the 2 VPs it declares.  That every attack the
# image carries is blocked, each run as `vtl attack` runs it, is tests/test_attacks.py's and
# tests/test_xvp_attacks.py's.
ATTACKS = ("write-kernel-text", "clear-efer-nxe", "ask-text-writable", "xvp-pte-during-lock")


def test_attack_json_observes_each_attack_blocked() -> None:
    cp = vtl_cli("attack", "--json", "--scenario", *ATTACKS)
    assert cp.returncode == 0, cp.stdout[-2000:] + cp.stderr[-2000:]
    rows = json.loads(cp.stdout)
    assert sorted(r["scenario"] for r in rows) == sorted(ATTACKS)     # in the image's order
    assert {r["outcome"] for r in rows} == {"blocked"}, rows
    by = {r["scenario"]: r for r in rows}
    assert "write intercept on GPA" in by["write-kernel-text"]["mechanism"]
    checked = by["write-kernel-text"]["vmm_checked"]
    assert checked and checked[0].startswith("memory")
    assert "MSR filter" in by["clear-efer-nxe"]["mechanism"]
    # the MSR read back from KVM, then the checks of the run's own record (invariants.py)
    assert [c for c in by["clear-efer-nxe"]["vmm_checked"] if c.startswith("MSR")] == ["MSR 0xc0000080"]
    assert "from VP1" in by["xvp-pte-during-lock"]["mechanism"]
    assert "VTL_E_IMMUTABLE" in by["ask-text-writable"]["mechanism"]
    assert all(r["changed"] == [] and r["expected"] for r in rows), rows


def test_attack_table_has_a_row_per_attack_and_a_summary() -> None:
    cp = vtl_cli("attack", "--scenario", "write-kernel-text", "xvp-pte-during-lock")
    assert cp.returncode == 0, cp.stdout[-2000:] + cp.stderr[-2000:]
    lines = cp.stdout.splitlines()
    assert lines[0].split()[:3] == ["scenario", "expected", "outcome"]
    assert lines[0].endswith("mechanism / what the VMM observed")
    text, xvp = lines[1], lines[2]
    assert text.startswith("write-kernel-text ") and "blocked: text is r-x, immutable" in text
    assert "  blocked  " in text and "write intercept on GPA" in text and "from VP" not in text
    assert xvp.startswith("xvp-pte-during-lock ") and "  blocked  " in xvp and "from VP1 -> VTL1 #PF" in xvp
    assert lines[-1].startswith("2 attack scenarios: 2 blocked; each in a fresh partition")


def test_memmap_shows_sections_and_draws_a_png(tmp_path: Path) -> None:
    png = tmp_path / "map.png"
    cp = vtl_cli("memmap", "--png", str(png), "--json")
    assert cp.returncode == 0, cp.stderr
    regions = json.loads(cp.stdout)["regions"]
    labels = {(r["label"], r["vtl0"]) for r in regions}
    assert {("kernel text", "r-x"), ("privileged section", "---"), ("rodata", "r--"),
            ("page tables (locked)", "r--"), ("VTL1 region", "none")} <= labels
    assert ("kernel text", "---") not in labels       # the section VTL1 locked apart is not text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
