"""SMP with VTL1 (docs/smp.md): VTL1 on every VP, VTL1 starting the APs, per-VP register pins.

Every verdict here is the VMM's own record: the reports with the VP and VTL the VMM tagged
them with, the VpStarted events, each VP's summary (`RunResult.vps`: started, VTL1 up,
pinned) and each VP's intercept control as the VMM holds it.  Each test is one short run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.vtlrun import Run, run_scenario, vtl_cli
from vtl.abi import ABI
from vtl.core.config import PartitionConfig
from vtl.core.events import parse_event
from vtl.core.privileged import InterceptControl, InterceptControls
from vtl.run.result import RunResult
from vtl.tools.summary import run_summary_lines

OK, BUSY, POLICY, INVALID = ABI.VTL_OK, ABI.VTL_E_BUSY, ABI.VTL_E_POLICY, ABI.VTL_E_INVALID_ARG


def _status(run: Run, name: str, *, vtl: int = 0) -> Any:
    found = [r for r in run.reports if r.kind == "status" and r.name == name and r.vtl == vtl]
    assert found, f"no STATUS {name!r} from VTL{vtl}: {[(r.kind, r.name, r.vtl) for r in run.reports]}"
    return found[-1]


def _events(run: Run, kind: str) -> list[Any]:
    return list(run.events.of_kind(kind))


def _started(run: Run) -> list[int]:
    return [e.vp for e in _events(run, "vp_started")]


# --- the default boot on four VPs (through the CLI: what a user runs) --------------------------
@pytest.fixture(scope="module")
def boot4(tmp_path_factory: pytest.TempPathFactory,
          guest_images: tuple[Path, Path]) -> tuple[dict[str, Any], list[Any]]:
    events = tmp_path_factory.mktemp("smp") / "events.jsonl"
    cp = vtl_cli("run", "--vps", "4", "--json", "--events", str(events))
    assert cp.returncode == 0, cp.stderr[-3000:]
    return json.loads(cp.stdout), [parse_event(line) for line in events.read_text().splitlines()]


@pytest.mark.kvm
def test_vtl_run_vps_4_boots_vtl1_on_every_vp(boot4: tuple[dict[str, Any], list[Any]]) -> None:
    doc, events = boot4
    assert doc["status"] == 0 and doc["reason"] == "guest_exit" and doc["vtl1_enabled"], doc["message"]
    vps = doc["vps"]
    assert [v["index"] for v in vps] == [0, 1, 2, 3]
    # The VMM saw each VP start once and each VP's VTL1 make its first VTL return.
    assert all(v["starts"] == 1 and v["vtl1_up"] for v in vps), vps
    assert sorted(e.vp for e in events if e.kind == "vp_started") == [1, 2, 3]
    assert all(e.vtl1 for e in events if e.kind == "vp_started")
    # "vtl1_up" from VTL1 on every VP, as the VMM tagged the reports (not what they claim).
    up = [(r["vp"], r["value"][0]) for r in doc["reports"] if r["name"] == "vtl1_up" and r["vtl"] == 1]
    assert sorted(up) == [(0, 0), (1, 1), (2, 2), (3, 3)]
    # VTL1 started the APs (VTL_CALL_START_AP) and every AP called its own VTL1.
    starts = [r for r in doc["reports"] if r["name"] == "start_ap" and r["vtl"] == 0]
    assert [r["value"][:2] for r in starts] == [[ABI.VTL_CALL_START_AP, OK]] * 3
    echoes = sorted(r["vp"] for r in doc["reports"] if r["name"] == "ap_echo" and r["value"][1] == OK)
    assert echoes == [1, 2, 3]
    assert all(v["vtl_calls"] >= 2 for v in vps[1:])          # its lock and its echo, on that VP


@pytest.mark.kvm
def test_every_vp_locks_its_own_registers_before_end_of_boot(boot4: tuple[dict[str, Any], list[Any]]) -> None:
    doc, events = boot4
    assert all(v["pinned"] for v in doc["vps"]), doc["vps"]   # each VP's own intercept control
    locks = sorted(r["vp"] for r in doc["reports"] if r["name"] == "ap_lock_page_tables"
                   and r["value"][1] == OK)
    assert locks == [1, 2, 3]
    # One VTL_HC_SET_INTERCEPT_CONTROL per VP, each from that VP's VTL1, naming one section.
    sets = [e for e in events if e.kind == "intercept_control"]
    assert sorted(e.vp for e in sets) == [0, 1, 2, 3] and all(e.vtl == 1 for e in sets)
    assert len({(e.priv_gpa, e.priv_pages) for e in sets}) == 1
    steps = [e for e in events if e.kind == "lifecycle" and e.step in ("lock_page_tables", "end_of_boot")]
    assert [(e.step, e.vp, e.status) for e in steps] == [
        ("lock_page_tables", 0, OK), ("lock_page_tables", 1, OK), ("lock_page_tables", 2, OK),
        ("lock_page_tables", 3, OK), ("end_of_boot", 0, OK)]
    assert steps[-1].before["pinned_vps"] == [0, 1, 2, 3]


@pytest.mark.kvm
def test_the_summary_lists_every_vp(boot4: tuple[dict[str, Any], list[Any]],
                                    guest_images: tuple[Path, Path]) -> None:
    doc, _ = boot4
    result = RunResult.model_validate(doc)
    lines = run_summary_lines(result, "boot", PartitionConfig(vtl0_image=guest_images[0],
                                                             vtl1_image=guest_images[1], nr_vps=4))
    vp_lines = [line for line in lines if line.startswith("VPs") or line.lstrip().startswith("vp")]
    assert len(vp_lines) == 4 and vp_lines[0].startswith("VPs"), lines
    for i, line in enumerate(vp_lines):
        assert f"vp{i}" in line and "VTL1 up" in line and "registers pinned" in line, line


# --- VTL1 starts the APs: hostile requests -------------------------------------------------------
@pytest.fixture(scope="module")
def hostile(guest_images: tuple[Path, Path]) -> Run:
    return run_scenario(guest_images, "smp-start-hostile", vps=3)


@pytest.mark.kvm
def test_vtl0_may_not_start_a_vp_itself_once_vtl1_is_enabled(hostile: Run) -> None:
    assert hostile.passed(), hostile.console[-30:]
    r = _status(hostile, "start_vp_direct")
    assert r.value[:2] == [ABI.VTL_HC_START_VP, ABI.VTL_E_ACCESS_DENIED]
    refused = [e for e in _events(hostile, "refused")
               if e.request == f"hypercall {ABI.VTL_HC_START_VP:#x}" and e.vtl == 0]
    assert refused and "VTL_CALL_START_AP" in refused[0].reason


@pytest.mark.parametrize("key,status,why", [
    ("start_ap_bad_index", INVALID, "no such AP"),
    ("start_ap_boot_vp", INVALID, "no such AP"),
    ("start_ap_flags", INVALID, "unknown flags"),
    ("start_ap_rip_data", POLICY, "rip is not in the text VTL1 protected"),
    ("start_ap_rip_vtl1", INVALID, "outside VTL0 memory"),
    ("start_ap_rip_priv", POLICY, "rip is not in the text VTL1 protected"),
    ("start_ap_rsp_vtl1", INVALID, "outside VTL0 memory"),
    ("start_ap_rsp_rodata", POLICY, "rsp is not on memory VTL0 may write"),
    ("start_ap_cr3_vtl1", INVALID, "outside VTL0 memory"),
    ("start_ap_cr3_not_root", POLICY, "cr3 is not the root VTL1 locked"),
    ("start_ap_unreadable", INVALID, "request not readable"),
    ("start_ap_again", BUSY, "VTL_HC_START_VP refused"),
    ("start_ap_after_eob", POLICY, "boot is over"),
])
@pytest.mark.kvm
def test_hostile_start_requests_get_their_status(hostile: Run, key: str, status: int, why: str) -> None:
    r = _status(hostile, key)
    assert r.value[:2] == [ABI.VTL_CALL_START_AP, status], r
    # VTL1's own STATUS report, with its reason, for each refusal (in order of the calls).
    vtl1 = [x for x in hostile.reports if x.kind == "status" and x.vtl == 1 and x.name == "start_ap"]
    assert any(x.value[1] == status and why in x.text for x in vtl1), [(x.value, x.text) for x in vtl1]


@pytest.mark.kvm
def test_refused_aps_stay_offline(hostile: Run) -> None:
    """Only the one good request started a VP: VP1 once (the second request was BUSY, the VMM's
    refusal of VTL1's hypercall), VP2 never, whatever was asked for it."""
    assert _started(hostile) == [1]
    vps = {v.index: v for v in hostile.result.vps}
    assert vps[1].starts == 1 and vps[1].vtl1_up and vps[1].pinned
    assert vps[2].starts == 0 and not vps[2].vtl1_up and vps[2].vtl_calls == 0 and vps[2].exits == 0
    busy = [e for e in _events(hostile, "refused")
            if e.request == f"hypercall {ABI.VTL_HC_START_VP:#x}" and e.vtl == 1]
    assert [b.reason for b in busy] == ["VP1 is already started"]
    started = _events(hostile, "vp_started")[0]
    assert started.vtl1 and started.rsp > started.rip      # the request VTL1 copied and passed on


# --- END_OF_BOOT waits for every online AP's lock ------------------------------------------------
@pytest.mark.kvm
def test_end_of_boot_is_refused_while_an_online_ap_has_not_locked(guest_images: tuple[Path, Path]) -> None:
    run = run_scenario(guest_images, "smp-eob-unlocked", vps=3)
    assert run.passed(), run.console[-30:]
    assert _status(run, "end_of_boot").value[:2] == [ABI.VTL_CALL_END_OF_BOOT, POLICY]
    # VTL1's reason, as the VMM recorded it from VTL1 on the boot VP: value[2] = the AP.
    why = _status(run, "end_of_boot", vtl=1)
    assert why.vp == 0 and why.value[1:3] == [POLICY, 2] and "has not locked" in why.text
    eob = [e for e in _events(run, "lifecycle") if e.step == "end_of_boot"]
    assert [e.status for e in eob] == [POLICY] and eob[0].after["pinned_vps"] == [0, 1]
    # The AP's pins as the VMM holds them: VP2's VTL1 never set an intercept control.
    ctls = run.partition.intercept_controls
    assert ctls.of(2) is None and ctls.of(1) is not None and ctls.of(0) is not None
    assert [v.pinned for v in run.result.vps] == [True, True, False]
    assert all(v.vtl1_up for v in run.result.vps)


# --- without VTL1, the boot VP starts the APs itself ---------------------------------------------
@pytest.mark.kvm
def test_smp_boot_without_vtl1_uses_the_hypercall(guest_images: tuple[Path, Path]) -> None:
    run = run_scenario(guest_images, "smp-boot", vps=3)
    assert run.passed(), run.console[-30:]
    assert sorted(_started(run)) == [1, 2] and not any(e.vtl1 for e in _events(run, "vp_started"))
    assert [r.value[:2] for r in run.reports if r.name == "start_vp"] == [[ABI.VTL_HC_START_VP, OK]] * 2
    assert not any(v.vtl1_up or v.pinned for v in run.result.vps)


# --- the rule, without KVM -----------------------------------------------------------------------
def test_intercept_controls_judge_per_vp_over_one_section() -> None:
    c = InterceptControls(3)
    ctl = InterceptControl(ABI.VTL_ICTL_ALL, 1 << 16, 1 << 20, 0x20C000, 1)
    c.set(0, ctl)
    assert c.judges(0, ABI.VTL_REG_CR3, 1, 2) and not c.judges(1, ABI.VTL_REG_CR3, 1, 2)
    assert c.in_section(0x20C000) and c.in_section(0x20CFFF) and not c.in_section(0x20D000)
    assert c.pinned(0) and not c.pinned(1) and c.view() == ctl
    c.set(1, InterceptControl(0, 0, 0, 0, 0))             # VP1 judges nothing, and names no section
    assert not c.pinned(1) and c.section is None and c.judges(0, ABI.VTL_REG_CR3, 1, 2)
    c.set(2, ctl)
    assert c.section == (0x20C000, 1) and c.judges(2, ABI.VTL_REG_CR0, 0, 1 << 16)
    c.set_all(None)                                       # VTL1's end
    assert c.view() is None and not any(c.pinned(i) for i in range(3)) and not c.in_section(0x20C000)
