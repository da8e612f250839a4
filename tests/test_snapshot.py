"""Snapshot and restore on real KVM, by what a user cares about: a hardened partition saved
and restored runs on to the guest's end with its policy digest unchanged; a restore
through another backend still blocks an attack (observed by the VMM); a snapshot that was
corrupted, truncated, of another version, incomplete or over-complete is refused in one
line with nothing run; a state.json edited consistently (its manifest digest recomputed)
to drop a protection is refused by the policy check before anything runs; options that
contradict the snapshot are refused; `--snapshot` never replaces anything; and
`vtl attack --after-restore` blocks the attacks it runs after a restore."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.vtlrun import vtl_cli
from vmm.uapi import ffi
from vtl.core.config import PartitionConfig
from vtl.core.events import EventLog
from vtl.core.partition import Partition
from vtl.lifecycle.snapfile import SnapshotError
from vtl.run import control
from vtl.run.restore import config_of, open_snapshot, restore
from vtl.run.scheduler import Scheduler
from vtl.services.console import Console
from vtl.tools.attack import read_back
from vtl.tools.invariants import check_run

pytestmark = pytest.mark.kvm

SCENARIO = "write-rodata"      # hardens, ends boot, then writes its rodata target


def _save_hardened(images: tuple[Path, Path], path: Path, vps: int = 2, backend: str | None = None,
                   scenario: str = SCENARIO, stop: bool = False) -> tuple[Any, Scheduler]:
    """Boot `scenario`, save at its hardened point to `path` (and stop there if `stop`)."""
    cfg = PartitionConfig(vtl0_image=images[0], vtl1_image=images[1], scenario=scenario, nr_vps=vps,
                          attr_backend=backend)  # type: ignore[arg-type]

    def saving(p: Partition, c: Console | None) -> Scheduler:
        s = Scheduler(p, c)
        s.snapshot_dir, s.snapshot_at, s.snapshot_stop = path, "hardened", stop
        return s

    with Partition(cfg, EventLog()) as p:
        result, sched = control.run(p, None, 60.0, scheduler=saving)
    assert len(sched.snapshots) == 1, (result, sched.snapshot_refused)
    return result, sched


@pytest.fixture(scope="module")
def hardened(guest_images: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A 2-VP partition saved at its hardened point: the directory, the saved policy digest."""
    path = tmp_path_factory.mktemp("snap") / "hardened"
    result, sched = _save_hardened(guest_images, path)
    assert result.reason == "guest_exit" and result.status == 0, result
    return path, sched.snapshots[0]["policy_digest"]


def _copy(src: Path, dst: Path) -> Path:
    """A copy of the snapshot `src`: memory.bin copied sparse (it is 256 MiB of mostly holes)."""
    dst.mkdir()
    for name in ("manifest.json", "state.json"):
        shutil.copyfile(src / name, dst / name)
    subprocess.run(["cp", "--sparse=always", str(src / "memory.bin"), str(dst / "memory.bin")], check=True)
    return dst


def _refused_by_cli(path: Path, *extra: str) -> str:
    """`vtl run --restore path`: exit 1, one line on stderr, no traceback, nothing ran."""
    cp = vtl_cli("run", "--restore", str(path), *extra)
    lines = cp.stderr.splitlines()
    assert cp.returncode == 1, (cp.returncode, cp.stderr)
    assert len(lines) == 1, cp.stderr
    assert "Traceback" not in cp.stderr
    assert cp.stdout == "", cp.stdout           # no guest console line, no summary
    return lines[0]


# --- a restore that runs ------------------------------------------------------------------
def test_hardened_two_vp_partition_restored_runs_to_the_guests_pass(hardened: tuple[Path, str]) -> None:
    path, saved_digest = hardened
    snap = open_snapshot(path)
    p, sched = restore(snap, config=config_of(snap), events=EventLog())
    with p:
        assert len(p.vps) == 2
        result, _ = control.run(p, None, 60.0, scheduler=lambda part, c: sched)
    assert result.reason == "guest_exit" and result.status == 0, result
    assert result.restored_from is not None
    assert result.restored_from["policy_digest"] == saved_digest
    assert result.restored_from["vps"] == 2


def test_restore_through_the_cli_prints_the_guests_pass(hardened: tuple[Path, str]) -> None:
    cp = vtl_cli("run", "--restore", str(hardened[0]), "--json")
    assert cp.returncode == 0, cp.stderr
    doc = json.loads(cp.stdout)
    assert doc["reason"] == "guest_exit" and doc["restored_from"]["policy_digest"] == hardened[1]


@pytest.mark.parametrize("saved_with,restored_with",
                         [("host_mapping", "memslot"), ("memslot", "host_mapping")])
def test_restore_through_another_backend_still_blocks_the_attack(
        guest_images: tuple[Path, Path], tmp_path: Path, saved_with: str, restored_with: str) -> None:
    path = tmp_path / "snap"
    result, _ = _save_hardened(guest_images, path, backend=saved_with, stop=True)
    assert result.reason == "snapshot_saved", result        # the attack did not run there
    snap = open_snapshot(path)
    events = EventLog(trace=True)
    p, sched = restore(snap, config=config_of(snap, restored_with), events=events)
    with p:
        assert p.backend_name == restored_with
        result, sched = control.run(p, None, 60.0, scheduler=lambda part, c: sched)
        changed, checked, _ = read_back(p, list(sched.reports.records))
        _, wrong = check_run(p, events, None)
    assert any(c.startswith("memory ") for c in checked), checked     # the VMM read the target back
    assert changed == [] and wrong == [], (changed, wrong)
    assert result.reason == "guest_exit" and result.status == 0, result
    intercepts: list[Any] = events.of_kind("intercept")
    assert any(i.type == "memory" and i.access == "write" for i in intercepts)


# --- snapshots that are not whole -----------------------------------------------------------
def _flip(name: str, offset: int = 40) -> Callable[[Path], None]:
    def f(d: Path) -> None:
        with open(d / name, "r+b") as fh:
            fh.seek(offset)
            b = fh.read(1)
            fh.seek(offset)
            fh.write(bytes([b[0] ^ 0x01]))
    return f


def _manifest(edit: Callable[[dict[str, Any]], None]) -> Callable[[Path], None]:
    def f(d: Path) -> None:
        m = json.loads((d / "manifest.json").read_text())
        edit(m)
        (d / "manifest.json").write_text(json.dumps(m))
    return f


def _truncate(d: Path) -> None:
    os.truncate(d / "memory.bin", (d / "memory.bin").stat().st_size - 4096)


def _wrong_version(m: dict[str, Any]) -> None:
    m["version"] = 99


def _extra_file(m: dict[str, Any]) -> None:
    m["files"]["extra.bin"] = {"size": 0, "sha256": hashlib.sha256(b"").hexdigest()}


CORRUPTIONS: dict[str, tuple[Callable[[Path], None], str]] = {
    "a byte of manifest.json": (_flip("manifest.json", 20), ""),
    "a byte of state.json": (_flip("state.json", 100), "state.json"),
    "a byte of memory.bin": (_flip("memory.bin", 0x200000 + 0x1234), "memory.bin"),
    "memory.bin truncated": (_truncate, "memory.bin"),
    "a wrong version": (_manifest(_wrong_version), "version"),
    "state.json missing": (lambda d: (d / "state.json").unlink(), "missing"),
    "an extra file in the manifest": (_manifest(_extra_file), "exactly"),
}


@pytest.mark.parametrize("what", list(CORRUPTIONS))
def test_a_snapshot_that_is_not_whole_is_refused_in_one_line(hardened: tuple[Path, str], tmp_path: Path,
                                                            what: str) -> None:
    damage, says = CORRUPTIONS[what]
    d = _copy(hardened[0], tmp_path / "snap")
    damage(d)
    line = _refused_by_cli(d)
    assert says in line, line


# --- a state.json edited consistently: the policy check ------------------------------------------
def _consistent(src: Path, dst: Path, edit: Callable[[dict[str, Any]], None]) -> Path:
    """A copy of `src` whose state.json is edited and whose manifest agrees with it."""
    d = _copy(src, dst)
    st = json.loads((d / "state.json").read_text())
    edit(st["partition"])
    blob = json.dumps(st, sort_keys=True).encode()
    (d / "state.json").write_bytes(blob)
    m = json.loads((d / "manifest.json").read_text())
    m["files"]["state.json"] = {"size": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}
    (d / "manifest.json").write_text(json.dumps(m))
    open_snapshot(d)                    # the file checks pass: only the policy can refuse it
    return d


def _drop_attr_run(p: dict[str, Any]) -> None:
    del p["vtl0_attrs"][1]                              # the kernel text's run


def _ap_cr0_unpinned(p: dict[str, Any]) -> None:
    p["intercept_controls"][1]["cr0_mask"] = 0          # VP1 still "pinned", judging no CR0 bit


def _boot_vp_control_cleared(p: dict[str, Any]) -> None:
    p["intercept_controls"][0] = None


def _section_dropped(p: dict[str, Any]) -> None:
    p["privileged_section"] = None


def _trust_added(p: dict[str, Any]) -> None:
    p["config"]["trust"] = ["ab" * 32]


def _ap_cr0_wp_cleared(p: dict[str, Any]) -> None:
    v = p["vps"][1]["vcpus"]["vtl0"]
    raw = bytearray(base64.b64decode(v["sregs"]))
    ffi.from_buffer("struct kvm_sregs *", raw).cr0 &= ~(1 << 16)
    v["sregs"] = base64.b64encode(bytes(raw)).decode()


def _ap_lstar_moved(p: dict[str, Any]) -> None:
    p["vps"][1]["vcpus"]["vtl0"]["msrs"]["0xc0000082"] = "0x201000"


EDITS: dict[str, Callable[[dict[str, Any]], None]] = {
    "an attribute run dropped": _drop_attr_run,
    "an AP's CR0 intercept mask cleared": _ap_cr0_unpinned,
    "the boot VP's intercept control cleared": _boot_vp_control_cleared,
    "the privileged section dropped": _section_dropped,
    "a digest added to the trust list": _trust_added,
    "CR0.WP cleared in an AP's saved registers": _ap_cr0_wp_cleared,
    "LSTAR moved in an AP's saved MSRs": _ap_lstar_moved,
}


@pytest.mark.parametrize("what", list(EDITS))
def test_a_consistent_edit_dropping_a_protection_is_refused_before_anything_runs(
        hardened: tuple[Path, str], tmp_path: Path, what: str) -> None:
    d = _consistent(hardened[0], tmp_path / "snap", EDITS[what])
    snap = open_snapshot(d)
    events = EventLog()
    with pytest.raises(SnapshotError, match="refused") as e:
        restore(snap, config=config_of(snap), events=events)
    assert "\n" not in str(e.value)
    assert not events.of_kind("vtl_call") and not events.of_kind("guest_exit")


def test_a_consistent_edit_is_refused_by_the_cli_with_nothing_run(hardened: tuple[Path, str],
                                                                  tmp_path: Path) -> None:
    d = _consistent(hardened[0], tmp_path / "snap", _ap_cr0_unpinned)
    assert "policy" in _refused_by_cli(d)


# --- options that contradict the snapshot; --snapshot never replaces -------------------------
def test_options_that_contradict_the_snapshot_are_refused(hardened: tuple[Path, str], tmp_path: Path,
                                                          guest_images: tuple[Path, Path]) -> None:
    other = tmp_path / "other-vtl0.elf"
    other.write_bytes(guest_images[0].read_bytes() + b"\0")
    for extra, says in ((["--vps", "1"], "--vps"), (["--mem", "128"], "--mem"),
                        (["--vtl0-image", str(other)], "vtl0 image")):
        line = _refused_by_cli(hardened[0], *extra)
        assert says in line, (extra, line)


def test_snapshot_onto_an_existing_path_is_a_usage_error_and_nothing_runs(tmp_path: Path) -> None:
    target = tmp_path / "exists"
    target.mkdir()
    cp = vtl_cli("run", "--scenario", SCENARIO, "--snapshot", str(target), "--snapshot-at", "hardened")
    assert cp.returncode == 2, cp.stderr
    assert len(cp.stderr.splitlines()) == 1 and "exists" in cp.stderr
    assert cp.stdout == ""
    assert list(target.iterdir()) == []


# --- vtl attack --after-restore ---------------------------------------------------------------
def test_attacks_after_a_restore_are_blocked() -> None:
    names = ["write-rodata", "clear-cr0-wp", "write-lstar-after-eob", "xvp-step-section",
             "vtl-return-from-vtl0"]
    cp = vtl_cli("attack", "--after-restore", "--vps", "2", "--scenario", *names, "--json")
    assert cp.returncode == 0, cp.stderr
    results = {r["scenario"]: r for r in json.loads(cp.stdout)}
    assert set(results) == set(names)
    for name, r in results.items():
        assert r["outcome"] == "blocked", r
        if name == "vtl-return-from-vtl0":      # refused before any hardening: runs as without
            assert r["restore"] == "not restored: never hardened", r
            continue
        assert r["restore"] == "restored", r
        assert r["saved_policy_digest"] and r["saved_policy_digest"] == r["restored_policy_digest"], r
        assert r["vmm_checked"], r
