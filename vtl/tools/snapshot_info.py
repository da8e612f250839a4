"""`vtl snapshot DIR`: what a snapshot holds, verified whole (every file's digest, the
memory file's included) without building anything (docs/snapshot.md)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from vmm import memfile
from vtl.lifecycle import snapfile
from vtl.lifecycle.snapfile import SnapshotError
from vtl.lifecycle.snapshot import saved_config


def describe(path: Path) -> dict[str, Any]:
    """The snapshot at `path`, checked (SnapshotError in one line if it is not whole)."""
    snap = snapfile.read(path, check_memory=memfile.digest)
    part, run = snap.state.get("partition"), snap.state.get("run")
    if not isinstance(part, dict) or not isinstance(run, dict):
        raise SnapshotError(f"snapshot {path}: {snapfile.STATE} has no partition or run state")
    cfg = saved_config(part)
    prot = part.get("protections") or {}
    mem = path / snapfile.MEMORY
    heki = run.get("heki") if isinstance(run.get("heki"), dict) else None
    return {
        "path": str(path), "format": snap.manifest["format"], "version": snap.manifest["version"],
        "created": snap.manifest.get("created"),
        "mode": cfg.mode, "vps": cfg.nr_vps, "mem_size": cfg.mem_size, "scenario": cfg.scenario or "boot",
        "vtl0_image": str(cfg.vtl0_image), "vtl1_image": str(cfg.vtl1_image) if cfg.vtl1_image else None,
        "vtl1_enabled": part.get("vtl1_enabled"), "vtl1_measurement": part.get("vtl1_measurement"),
        "boot_count": part.get("boot_count"), "kexec_policy": cfg.kexec_policy,
        "trust": [t.hex() for t in cfg.trust],
        "vp_states": [v.get("state") for v in part.get("vps", []) if isinstance(v, dict)],
        "backend": part.get("backend"), "protected_pages": prot.get("protected_pages"),
        "pinned_vps": prot.get("pinned_vps"), "policy_digest": prot.get("policy_digest"),
        "heki_pins": None if heki is None else {"cr0": heki.get("pinned_cr0"), "cr4": heki.get("pinned_cr4")},
        "files": snap.manifest["files"],
        "memory_on_disk": os.stat(mem).st_blocks * 512,
    }


def lines(d: dict[str, Any]) -> list[str]:
    pages = ", ".join(f"{n} {a}" for a, n in (d["protected_pages"] or {}).items()) or "none"
    vtl1 = (f"enabled, SHA-256 {d['vtl1_measurement']}" if d["vtl1_enabled"]
            else "none (Heki mode)" if d["mode"] == "heki" else "not enabled")
    out = [
        f"snapshot      {d['path']} ({d['format']} version {d['version']}, {d['created']}): verified",
        f"partition     {d['mode']} mode, {d['vps']} VP(s) ({', '.join(d['vp_states'])}), "
        f"{d['mem_size'] >> 20} MiB, scenario {d['scenario']}, {d['boot_count']} reboots of VTL0",
        f"images        {d['vtl0_image']}" + (f", {d['vtl1_image']}" if d["vtl1_image"] else ""),
        f"VTL1          {vtl1}; kexec policy {d['kexec_policy']}, {len(d['trust'])} trusted digests",
        f"protections   {pages} (saved through {d['backend']}); pinned VPs {d['pinned_vps']}",
    ]
    if d["heki_pins"] is not None:
        out.append(f"heki pins     CR0 {d['heki_pins']['cr0']:#x}, CR4 {d['heki_pins']['cr4']:#x}")
    out += [f"policy digest {d['policy_digest']}",
            f"memory        {d['mem_size'] >> 20} MiB, {d['memory_on_disk'] / (1 << 20):.1f} MiB on disk"]
    return out
