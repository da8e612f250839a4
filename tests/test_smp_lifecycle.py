"""kexec and RESET with several VPs (issue 16, item 5): the flow stops every VP and restarts
the boot VP at the new kernel, with the APs offline until that kernel starts them.  What
the VMM observed: RunResult.vps (starts, VTL1 up, registers pinned, at the end)."""

from __future__ import annotations

import json
from pathlib import Path

from tests.vtlrun import vtl_cli


def _kexec(flow: str) -> dict:  # type: ignore[type-arg]
    cp = vtl_cli("kexec", "--flow", flow, "--vps", "4", "--json")
    doc = json.loads(cp.stdout)
    assert cp.returncode == 0 and doc["passed"], doc["checks"]
    assert doc["result"]["kexecs"] == 1 and [v["index"] for v in doc["result"]["vps"]] == [0, 1, 2, 3]
    return doc["result"]  # type: ignore[no-any-return]


def test_persist_kexec_with_four_vps_restarts_every_ap_under_the_same_vtl1(
        guest_images: tuple[Path, Path]) -> None:
    # The new kernel starts the APs again (through the VTL1 that persisted, whose section is
    # locked: each AP's CR4 set-up is judged by the VMM, as KVM would take it natively) and
    # each pins its own registers.
    vps = _kexec("persist")["vps"]
    assert all(v["starts"] == 2 and v["vtl1_up"] and v["pinned"] for v in vps[1:])


def test_teardown_kexec_with_four_vps_clears_every_vps_pins(guest_images: tuple[Path, Path]) -> None:
    # Every AP was started and pinned by the old kernel; the teardown ends VTL1 on every VP
    # and with it every pin; the new kernel (which only enables a new VTL1) starts none.
    vps = _kexec("teardown")["vps"]
    assert all(v["starts"] == 1 and not v["pinned"] for v in vps)
    assert not any(v["vtl1_up"] for v in vps[1:])


def test_a_reset_with_several_vps_leaves_no_pin_and_every_ap_offline(guest_images: tuple[Path, Path]) -> None:
    cp = vtl_cli("run", "--vps", "3", "--scenario", "reset-request", "--json")
    doc = json.loads(cp.stdout)
    assert cp.returncode == 0, doc["message"]
    assert doc["resets"] == 1
    assert all(v["starts"] == 1 and not v["pinned"] and not v["vtl1_up"] for v in doc["vps"][1:])


def test_memmap_with_two_vps_shows_each_vps_own_pins(guest_images: tuple[Path, Path]) -> None:
    # What VTL1 judges is each VP's (its own lock), read from the VMM's intercept controls;
    # the control registers from KVM.
    cp = vtl_cli("memmap", "--vps", "2", "--json")
    doc = json.loads(cp.stdout)
    assert cp.returncode == 0
    vps = doc["vps"]
    assert [v["index"] for v in vps] == [0, 1]
    for v in vps:
        assert {"cr0", "cr4", "idtr"} <= set(v["judged"])
        assert v["cr0"] & (1 << 16)            # WP, as the VP left it under VTL1's pin
