"""Snapshot flows on real KVM (docs/snapshot.md): a scenario that snapshots itself
mid-way, a snapshot after a persist kexec, a Heki-mode partition's pins and page
permissions.  Each restored partition is judged by what the VMM observes in it (memory
read back, registers from KVM), never by the guest's word."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vtl.core.events import EventLog
from vtl.core.vtl import Vtl
from vtl.modes.heki import HekiScheduler
from vtl.run import control
from vtl.run.restore import config_of, open_snapshot, restore
from vtl.run.result import RunResult
from vtl.run.scheduler import Scheduler
from vtl.services.console import Console

from .vtlrun import REPO, vtl_cli

KEXEC_IMAGE = REPO / "guest_vtl0" / "build" / "vtl0-kexec.elf"


Targets = dict[int, tuple[int, int]]


def _restored_run(path: Path, backend: str | None = None) -> tuple[RunResult, Targets, dict[str, Any]]:
    """Restore `path` in-process and run it to its end; returns the result, every attack
    target the restored guest named as (old, value read back by the VMM), the saved state."""
    snap = open_snapshot(path)
    cfg = config_of(snap, backend)
    factory = HekiScheduler if cfg.mode == "heki" else Scheduler
    p, sched = restore(snap, config=cfg, events=EventLog(keep=1000), console=Console(cfg.nr_vps, keep=100),
                       scheduler=factory)
    with p:
        result, _ = control.run(p, None, 300, None, scheduler=lambda _p, _c: sched)
        targets = {r.value[0]: (r.value[2], p.mem.read_u64(r.value[0]))
                   for r in sched.reports.of_kind("target")}
        heki = sched.heki.state.policy() if isinstance(sched, HekiScheduler) else None
    return result, targets, {"state": snap.state, "heki": heki,
                             "values": {r.name: r.value[0] for r in sched.reports.of_kind("value")}}


def _save(tmp_path: Path, *args: str) -> tuple[Path, dict[str, Any]]:
    snap = tmp_path / "snap"
    cp = vtl_cli("run", "--quiet", "--json", "--snapshot", str(snap), *args)
    assert cp.returncode == 0, cp.stderr
    doc = json.loads(cp.stdout)
    assert len(doc["snapshots"]) == 1 and Path(doc["snapshots"][0]["path"]) == snap
    return snap, doc


def test_a_scenario_that_snapshots_itself_finds_everything_intact_after_restore(tmp_path: Path) -> None:
    snap, saved = _save(tmp_path, "--scenario", "snapshot-self", "--vps", "2")
    # `vtl snapshot` verifies it whole and shows what a restore must reproduce.
    info = vtl_cli("snapshot", str(snap), "--json")
    assert info.returncode == 0, info.stderr
    shown = json.loads(info.stdout)
    assert shown["policy_digest"] == saved["snapshots"][0]["policy_digest"] and shown["vps"] == 2
    assert shown["memory_on_disk"] < shown["mem_size"] // 16        # sparse
    result, targets, st = _restored_run(snap)
    assert result.reason == "guest_exit" and result.status == 0, result.message
    assert result.restored_from is not None
    assert result.restored_from["policy_digest"] == saved["snapshots"][0]["policy_digest"]
    # The restored guest attacked rodata: the VMM reads it back unchanged.
    assert targets and all(old == now for old, now in targets.values())
    # VTL_HC_SNAPSHOT returned twice: RDX = 1 in the restored VTL0, 0 in the one that saved.
    assert st["values"]["restored"] == 1
    assert any(r["name"] == "restored" and r["value"][0] == 0 for r in saved["reports"])


def test_without_a_snapshot_directory_the_guest_is_refused_and_told(tmp_path: Path) -> None:
    cp = vtl_cli("run", "--quiet", "--json", "--scenario", "snapshot-self")
    doc = json.loads(cp.stdout)
    assert cp.returncode == 1 and doc["snapshots"] == []
    status = [r for r in doc["reports"] if r["kind"] == "status" and r["name"] == "snapshot"]
    assert status and status[0]["value"][1] != 0


def test_a_snapshot_after_a_persist_kexec_restores_with_the_new_kernel_protected(tmp_path: Path) -> None:
    snap, saved = _save(tmp_path, "--scenario", "kexec-persist", "--kexec-policy", "persist",
                        "--stage", str(KEXEC_IMAGE), "--trust", str(KEXEC_IMAGE), "--snapshot-at", "kexec")
    state = json.loads((snap / "state.json").read_text())["partition"]
    assert state["boot_count"] == 1 and state["vtl1_enabled"]
    lo, hi = state["kernel_range"]
    assert lo >= 8 << 20              # the kexec'd kernel (linked at 8 MiB) is the current one
    # Its text is protected in the saved map: r-x pages inside the new kernel's range.
    assert any(s >= lo and e <= hi for s, e, _ in state["vtl0_attrs"])
    for backend in ("memslot",):        # through another backend than saved (host_mapping)
        result, targets, _ = _restored_run(snap, backend)
        assert result.reason == "guest_exit" and result.status == 0, (backend, result.message)
        assert result.kexecs == 1 and result.vtl1_history == ["enabled", "kept across a kexec (persist)"]
        assert all(old == now for old, now in targets.values())


def test_heki_mode_saves_and_restores_its_pins_and_page_permissions(tmp_path: Path) -> None:
    snap, saved = _save(tmp_path, "--mode", "heki", "--scenario", "write-rodata", "--snapshot-at", "hardened")
    heki_saved = json.loads((snap / "state.json").read_text())["run"]["heki"]
    assert heki_saved["pinned_cr0"] and heki_saved["perms"]          # pins and protections were saved
    for backend in ("host_mapping", "memslot"):
        result, targets, st = _restored_run(snap, backend)
        assert result.reason == "guest_exit" and result.status == 0, result.message
        assert result.restored_from is not None
        assert result.restored_from["policy_digest"] == saved["snapshots"][0]["policy_digest"]
        pinned_cr0, pinned_cr4 = st["heki"][1], st["heki"][2]
        assert (pinned_cr0, pinned_cr4) == (heki_saved["pinned_cr0"], heki_saved["pinned_cr4"])
        # The rodata write after the restore: Heki's #PF, memory read back unchanged.
        assert targets and all(old == now for old, now in targets.values())


def test_a_restored_vcpu_has_the_saved_control_registers(tmp_path: Path) -> None:
    """Read from KVM after the restore, before anything runs: CR0/CR3/CR4/EFER of every
    VP's VTL0 and VTL1 are the saved ones."""
    from vmm.vcpustate import VcpuState

    snap, _ = _save(tmp_path, "--scenario", "write-rodata", "--vps", "2", "--snapshot-at", "hardened")
    opened = open_snapshot(snap)
    p, _sched = restore(opened, config=config_of(opened))
    with p:
        for vp, saved in zip(p.vps, opened.state["partition"]["vps"], strict=True):
            for vtl in Vtl:
                vcpu = vp.vcpus[vtl]
                assert vcpu is not None
                want = VcpuState.from_json(saved["vcpus"][f"vtl{int(vtl)}"])
                now = vcpu.get_sregs()
                for reg in ("cr0", "cr3", "cr4", "efer"):
                    assert int(getattr(now, reg)) == want.sreg(reg), (vp.index, vtl, reg)
                assert int(vcpu.get_regs().rip) == want.reg("rip")


def test_a_forged_snapshot_with_other_vtl1_code_under_its_measurement_is_refused(tmp_path: Path) -> None:
    """The manifest is rewritten to match (a consistent forgery, not corruption): the
    restore still refuses, since VTL1's read-only segments in memory must be its image's."""
    from vmm import memfile
    from vmm.elf import PF_X, read_image

    snap, _ = _save(tmp_path, "--scenario", "write-rodata", "--snapshot-at", "hardened")
    seg = next(s for s in read_image(REPO / "guest_vtl1" / "build" / "vtl1.elf").segments if s.flags & PF_X)
    with open(snap / "memory.bin", "r+b") as f:
        f.seek(seg.gpa + 16)
        byte = f.read(1)
        f.seek(seg.gpa + 16)
        f.write(bytes([byte[0] ^ 0xFF]))
    manifest = json.loads((snap / "manifest.json").read_text())
    with open(snap / "memory.bin", "rb") as f:
        manifest["files"]["memory.bin"]["sha256"] = memfile.digest(f, manifest["files"]["memory.bin"]["size"])
    (snap / "manifest.json").write_text(json.dumps(manifest))
    cp = vtl_cli("run", "--restore", str(snap))
    assert cp.returncode == 1 and cp.stdout == ""
    assert cp.stderr.count("\n") == 1 and "VTL1's code" in cp.stderr and "Traceback" not in cp.stderr


def test_a_snapshot_taken_inside_a_vtl_call_resumes_vtl1_where_it_was(tmp_path: Path) -> None:
    """Saved (the control socket's path: request_snapshot) while VP0's VTL1 hashes a kexec
    image for seconds inside KEXEC_VALIDATE: the VP is in VTL1 with a lifecycle step in
    flight.  The restored VTL1 finishes the validation, the kexec happens, the new kernel
    passes, and the VTL calls are counted once across the save."""
    from vtl.abi import ABI
    from vtl.core.config import PartitionConfig
    from vtl.core.events import Event
    from vtl.core.partition import Partition
    from vtl.core.trust import trust_list
    from vtl.lifecycle.snapfile import STATE

    cfg = PartitionConfig(vtl0_image=REPO / "guest_vtl0" / "build" / "vtl0.elf",
                          vtl1_image=REPO / "guest_vtl1" / "build" / "vtl1.elf", scenario="kexec-persist",
                          kexec_policy="persist", staged=KEXEC_IMAGE, trust=trust_list([str(KEXEC_IMAGE)]))
    events = EventLog(trace=True, keep=100)
    holder: dict[str, Any] = {}

    def make(p: Partition, c: Console | None) -> Scheduler:
        holder["s"] = Scheduler(p, c)
        return holder["s"]

    def on_event(e: Event) -> None:
        if e.kind == "vtl_call" and e.code == ABI.VTL_CALL_KEXEC_VALIDATE and "req" not in holder:
            holder["req"] = holder["s"].request_snapshot(tmp_path / "mid")

    events.add_listener(on_event, trace=True)
    with Partition(cfg, events) as p:
        result, _ = control.run(p, None, 300, None, scheduler=make)
    assert result.status == 0, result.message
    assert isinstance(holder["req"].result, dict), holder["req"].result
    st = json.loads((tmp_path / "mid" / STATE).read_text())
    assert st["partition"]["vps"][0]["state"] == "in_vtl1/call"
    assert list(st["run"]["steps"].values())[0][0] == "kexec_validate"
    again, targets, _ = _restored_run(tmp_path / "mid")
    assert again.status == 0 and again.reason == "guest_exit", again.message
    assert again.kexecs == 1 and again.vtl_calls == result.vtl_calls
    assert all(old == now for old, now in targets.values())


def test_heki_attacks_after_a_restore_come_out_as_heki_gives() -> None:
    cp = vtl_cli("attack", "--mode", "heki", "--after-restore", "--scenario", "clear-cr0-wp", "write-rodata",
                 "--json")
    assert cp.returncode == 0, cp.stderr
    results = json.loads(cp.stdout)
    assert [r["restore"] for r in results] == ["restored", "restored"]
    assert all(r["outcome"] == "blocked" and r["as_expected"] for r in results)
    assert all(r["saved_policy_digest"] == r["restored_policy_digest"] for r in results)


def test_any_field_of_a_consistent_state_changed_is_a_clean_refusal_or_a_restore(tmp_path: Path) -> None:
    """A hostile state.json (its digest recomputed, so the manifest passes): 150 seeded
    changes of one field each to another type or an out-of-range value.  Each restore is
    refused with an error the CLI prints in one line, or succeeds; never anything else
    (a traceback)."""
    import hashlib
    import random

    from vmm.errors import VmmError

    src, _ = _save(tmp_path, "--scenario", "write-rodata", "--vps", "2", "--snapshot-at", "hardened")
    base = json.loads((src / "state.json").read_text())
    leaves: list[list[Any]] = []

    def walk(o: Any, path: list[Any]) -> None:
        if isinstance(o, dict):
            for k, v in o.items():
                walk(v, path + [k])
        elif isinstance(o, list):
            for i, v in enumerate(o):
                walk(v, path + [i])
        else:
            leaves.append(path)
    walk(base, [])
    rng = random.Random(17)
    d = tmp_path / "hostile"
    d.mkdir()
    (d / "memory.bin").symlink_to(src / "memory.bin")
    for _ in range(150):
        path = rng.choice(leaves)
        st = json.loads(json.dumps(base))
        o = st
        for k in path[:-1]:
            o = o[k]
        o[path[-1]] = rng.choice(["x", -1, 1 << 70, None, [], {}, True, 3.5])
        blob = json.dumps(st).encode()
        (d / "state.json").write_bytes(blob)
        m = json.loads((src / "manifest.json").read_text())
        m["files"]["state.json"] = {"size": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}
        (d / "manifest.json").write_text(json.dumps(m))
        try:
            snap = open_snapshot(d)
            cfg = config_of(snap)
            factory = HekiScheduler if cfg.mode == "heki" else Scheduler
            p, _sched = restore(snap, config=cfg, scheduler=factory)
            p.close()
        except (VmmError, ValueError, OSError, RuntimeError):
            pass


def test_a_snapshot_at_vtl1_up_holds_an_offline_ap_and_restores(tmp_path: Path) -> None:
    """--snapshot-at vtl1: saved once VTL1 came up on the boot VP, before any hardening,
    the AP not started yet; the restored run starts it and the attack on VTL1's memory
    is still refused (the VMM reads VTL1's memory back unchanged)."""
    snap, saved = _save(tmp_path, "--scenario", "read-vtl1-memory", "--vps", "2", "--snapshot-at", "vtl1")
    state = json.loads((snap / "state.json").read_text())["partition"]
    assert [v["state"] for v in state["vps"]] == ["running_vtl0", "offline"] and state["vtl1_enabled"]
    result, targets, _ = _restored_run(snap)
    assert result.reason == "guest_exit" and result.status == 0, result.message
    assert all(old == now for old, now in targets.values())
