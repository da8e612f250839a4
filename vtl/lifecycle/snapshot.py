"""A partition saved whole and rebuilt from it (docs/snapshot.md).

`partition_state` is everything of a `Partition` the guest or VTL1 can have changed,
as plain JSON: the config it was launched with (the trust list and kexec policy
among it) and the digests of the files it names, VTL0's attribute map, the backend
and the runs it applied, every VP's register intercept control and the privileged
section, the MSR filter, VTL1's measurement, the boot count and the current kernel,
every VP's state and counters, and every vCPU of every VTL (vmm/vcpustate.py), with
the protection record (vtl/lifecycle/protections.py) at the instant of the save.

`restore_partition` rebuilds one: VTL0's VM and vCPUs as at launch but nothing
booted, the memory file loaded, VTL0's attributes applied again through the backend
in use (which may differ from the saved one: the map is VTL1's policy, the backend only
how this host enforces it), VTL1's VM over all memory with its vCPUs, every vCPU's
state, the intercept controls.  Then the protection record is taken again and its
policy digest must equal the saved one (and the whole digest too, through the same
backend) before anything runs: a partition restored without its protections is
refused, never run.

The protection record's digest is what a lifecycle step compares; a snapshot carries
more policy than that, so `policy_record` is saved beside it and taken again from the
rebuilt partition, and every field must be equal too: every VP's register intercept
control (not only the boot VP's), the privileged section, VTL1's state and measurement,
the kernel range APs may start in, a VP's pending restart, the launch options that are
policy (the trust list and its kexec policy, reset on triple fault) with the digests of
the files the rebuilt partition names, and every VP's pinned VTL0 registers as KVM holds
them (control registers, descriptor tables, XCR0, the pinned MSRs).  So a state.json
edited to drop any of them, its manifest made consistent, is refused like a corrupt one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vmm import vcpustate
from vmm.elf import PF_W
from vmm.errors import VmmError
from vmm.measure import loaded_image_sha256
from vmm.memattr import valid_attributes
from vmm.memory import PAGE_SIZE, GuestMemory
from vmm.regcheck import cpuid_entries
from vmm.x86 import PINNED_MSRS
from vtl.abi import abi_struct
from vtl.core.config import PartitionConfig
from vtl.core.events import EventLog
from vtl.core.partition import Partition
from vtl.core.privileged import InterceptControl
from vtl.core.vp import IN_VTL1_CALL, IN_VTL1_ENABLE, OFFLINE, RUNNING_VTL0, RestartRequest, VpState
from vtl.core.vtl import Vtl
from vtl.lifecycle.protections import protections
from vtl.lifecycle.snapfile import SnapshotError

# The VP states a snapshot holds (an intercept being judged and a stopped VP are not
# saved: the run layer waits for the first to end and refuses the second).
SAVED_STATES: dict[str, VpState] = {"running_vtl0": RUNNING_VTL0, "in_vtl1/enable": IN_VTL1_ENABLE,
                                    "in_vtl1/call": IN_VTL1_CALL, "offline": OFFLINE}
_STATE_KEYS = {v: k for k, v in SAVED_STATES.items()}
_CTL_FIELDS = ("flags", "cr0_mask", "cr4_mask", "priv_gpa", "priv_pages")


def state_key(state: VpState) -> str | None:
    """How a VP state is saved; None for one a snapshot cannot hold."""
    return _STATE_KEYS.get(state)


def _file_sha256(path: Path | None) -> str | None:
    if path is None:
        return None
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError as e:
        raise SnapshotError(f"cannot read {path}: {e.strerror}") from None


def cpuid_digest(p: Partition) -> str:
    """The CPUID every vCPU was given (the host's supported one): a snapshot restores only
    where it is the same, since the guest has seen it.  KVM_GET_SUPPORTED_CPUID reports the
    APIC ID of the host CPU the ioctl ran on (leaf 1 EBX[31:24], leaf 0xB/0x1F EDX): not
    a feature, so not compared."""
    out = []
    for fn, idx, a, b, c, d in cpuid_entries(p.kvm.supported_cpuid()):
        if fn == 1:
            b &= 0x00FFFFFF
        elif fn in (0xB, 0x1F):
            d = 0
        out.append((fn, idx, a, b, c, d))
    return hashlib.sha256(repr(sorted(out)).encode()).hexdigest()


def _config_json(c: PartitionConfig) -> dict[str, Any]:
    d = c.model_dump(mode="python")
    d["trust"] = [t.hex() for t in c.trust]
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in d.items()}


def _ctl_json(ctl: InterceptControl | None) -> dict[str, int] | None:
    return None if ctl is None else {f: getattr(ctl, f) for f in _CTL_FIELDS}


def _attr_runs(p: Partition) -> list[list[int]]:
    """VTL0's attribute map as [start, end, attrs] runs of protected pages."""
    return [[s, e, a] for s, e, a in p.vtl0_runs() if a > 0]


def _pinned_registers(vcpu: Any) -> dict[str, int]:
    """A VTL0 vCPU's registers that VTL1 pins, as KVM holds them (KVM_GET_*: after a save's
    flush, or after a restore's load, they are the vCPU's whole state)."""
    sr = vcpu.get_sregs()
    out = {"cr0": int(sr.cr0), "cr3": int(sr.cr3), "cr4": int(sr.cr4), "efer": int(sr.efer)}
    for name in ("gdt", "idt"):
        t = getattr(sr, name)
        out[f"{name}r"], out[f"{name}r_limit"] = int(t.base), int(t.limit)
    for name in ("ldt", "tr"):
        seg = getattr(sr, name)
        out[name], out[f"{name}_base"] = int(seg.selector), int(seg.base)
        out[f"{name}_limit"] = int(seg.limit)
    out["xcr0"] = int(vcpu.get_xcrs().get(0, 0))
    for index, value in sorted(vcpu.get_msrs(sorted(PINNED_MSRS)).items()):
        out[f"msr_{PINNED_MSRS[index].lower()}"] = int(value)
    return out


def _files(c: PartitionConfig) -> dict[str, str | None]:
    """The SHA-256 of the files a partition names (each read once)."""
    return {"vtl0_image": _file_sha256(c.vtl0_image), "vtl1_image": _file_sha256(c.vtl1_image),
            "staged": _file_sha256(c.staged)}


def policy_record(p: Partition, files: dict[str, str | None] | None = None) -> dict[str, Any]:
    """Every piece of policy `p` carries beyond the protection record's digest (the module
    doc), as plain JSON: saved with a snapshot, compared whole after a restore."""
    c = p.config
    ctls = p.intercept_controls
    return {
        "intercept_controls": [_ctl_json(ctls.of(i)) for i in range(len(p.vps))],
        "privileged_section": list(ctls.section) if ctls.section is not None else None,
        "vtl1_enabled": p.vtl1_enabled,
        "vtl1_measurement": p.vtl1_measurement,
        "kernel_range": list(p.kernel_range),
        "launch": {"mode": c.mode, "nr_vps": c.nr_vps, "mem_size": c.mem_size,
                   "trust": [t.hex() for t in c.trust], "kexec_policy": c.kexec_policy,
                   "reset_on_triple_fault": c.reset_on_triple_fault},
        "files": files if files is not None else _files(c),
        "restarts": [None if (r := vp.restart) is None else
                     [r.entry, r.teardown, r.image_start, r.image_end, r.param, r.scenario] for vp in p.vps],
        "vtl0_registers": [None if (v := vp.vcpus[Vtl.VTL0]) is None else _pinned_registers(v)
                           for vp in p.vps],
    }


def partition_state(p: Partition, extra_policy: object = None) -> dict[str, Any]:
    """The partition now.  Every VP must be out of KVM_RUN (paused, or this thread's)."""
    c = p.config
    vps = []
    for vp in p.vps:
        key = state_key(vp.state)
        if key is None:
            raise SnapshotError(f"VP{vp.index} is {vp.state}: a snapshot cannot hold that state")
        r = vp.restart
        vps.append({
            "index": vp.index, "state": key, "vtl1_up": vp.vtl1_up, "starts": vp.starts,
            "restart": None if r is None else {"entry": r.entry, "teardown": r.teardown,
                                               "image_start": r.image_start, "image_end": r.image_end,
                                               "param": r.param, "scenario": r.scenario},
            "counters": {"vtl_calls": vp.vtl_calls, "vtl_returns": vp.vtl_returns,
                         "fast_switches": vp.fast_switches, "exits": dict(vp.exit_counts),
                         "ports": {str(i): n for i, n in enumerate(vp.port_counts) if n}},
            "vcpus": {f"vtl{int(vtl)}": vcpustate.save(vcpu).to_json()
                      for vtl in Vtl if (vcpu := vp.vcpus[vtl]) is not None},
        })
    ctls = p.intercept_controls
    files = _files(c)
    return {
        "config": _config_json(c),
        "files": files,
        "cpuid_sha256": cpuid_digest(p),
        "vtl1_enabled": p.vtl1_enabled,
        "vtl1_measurement": p.vtl1_measurement,
        "boot_count": p.boot_count,
        "kernel_range": list(p.kernel_range),
        "vtl0_attrs": _attr_runs(p),
        "backend": p.backend_name,
        "backend_runs": [[s, e, a] for s, e, a in p.backend.runs() if a],
        "intercept_controls": [_ctl_json(ctls.of(i)) for i in range(len(p.vps))],
        "privileged_section": list(ctls.section) if ctls.section is not None else None,
        "msr_filter": sorted(PINNED_MSRS.values()),
        "vps": vps,
        "protections": protections(p, extra_policy),
        "policy": policy_record(p, files),      # after the vCPUs' save (flushed): KVM holds it all
    }


# --- restore ---------------------------------------------------------------------------
def _int(d: Any, key: str, lo: int = 0, hi: int = 1 << 64) -> int:
    v = d.get(key) if isinstance(d, dict) else None
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v < hi:
        raise SnapshotError(f"snapshot state: {key} is missing or out of range")
    return v


def saved_config(st: dict[str, Any], backend: str | None = None) -> PartitionConfig:
    """The config the saved partition `st` was launched with (`backend`: the one to restore
    through instead, None: the saved one's kind)."""
    raw = st.get("config")
    if not isinstance(raw, dict):
        raise SnapshotError("snapshot state: no config")
    try:
        d = dict(raw)
        d["trust"] = [bytes.fromhex(t) for t in d.get("trust", [])]
        if backend is not None:
            d["attr_backend"] = backend
        return PartitionConfig(**d)
    except (TypeError, ValueError) as e:
        msg = str(e).splitlines()
        raise SnapshotError(f"snapshot state: a bad config ({msg[0] if msg else e})") from None


def check_files(st: dict[str, Any], config: PartitionConfig) -> None:
    """The images and staged file the partition names are the ones it was saved with."""
    files = st.get("files")
    if not isinstance(files, dict):
        raise SnapshotError("snapshot state: no file digests")
    for key, path in (("vtl0_image", config.vtl0_image), ("vtl1_image", config.vtl1_image),
                      ("staged", config.staged)):
        want = files.get(key)
        have = _file_sha256(path) if path is not None else None
        if want != have:
            raise SnapshotError(f"the {key.replace('_', ' ')} {path} is not the one the snapshot was saved "
                                f"with (SHA-256 {str(have)[:16]}…, saved {str(want)[:16]}…)")


def restore_partition(st: dict[str, Any], load_memory: Callable[[GuestMemory], None],
                      config: PartitionConfig, events: EventLog | None = None) -> Partition:
    """Rebuild the saved partition `st` under `config` (saved_config, checked by the caller
    against what was asked), its memory from `load_memory`.  Nothing has run; the caller
    then loads the run's state and calls `verify` before anything runs.  On a refusal
    every VM is closed and SnapshotError says why."""
    p = Partition(config, events, boot=False)
    try:
        _rebuild(p, st, load_memory)
    except BaseException:
        p.close()
        raise
    return p


def _rebuild(p: Partition, st: dict[str, Any], load_memory: Callable[[GuestMemory], None]) -> None:
    if st.get("cpuid_sha256") != cpuid_digest(p):
        raise SnapshotError("the snapshot was saved on a host whose KVM offers another CPUID")
    saved_vps = st.get("vps")
    if not isinstance(saved_vps, list) or len(saved_vps) != len(p.vps):
        raise SnapshotError("snapshot state: the VP list does not match the config's VP count")
    if st.get("msr_filter") != sorted(PINNED_MSRS.values()):
        raise SnapshotError("the snapshot's MSR filter is not the one this vtl sets")
    try:
        load_memory(p.mem)
    except (OSError, VmmError) as e:
        raise SnapshotError(f"cannot load the memory file: {getattr(e, 'strerror', None) or e}") from None
    p.boot_count = _int(st, "boot_count", 0, 1 << 32)
    kr = st.get("kernel_range")
    if not (isinstance(kr, list) and len(kr) == 2 and all(isinstance(x, int) for x in kr)
            and p.layout.in_vtl0(kr[0], max(kr[1] - kr[0], 1))):
        raise SnapshotError("snapshot state: the kernel range is not VTL0 memory")
    p.kernel_range = (kr[0], kr[1])
    _load_attrs(p, st.get("vtl0_attrs"))
    _load_controls(p, st.get("intercept_controls"), st.get("privileged_section"))
    # Memory before VTL1's VM exists: nothing but the VMM touches it yet.
    if st.get("vtl1_enabled") is True:
        _rebuild_vtl1(p, st.get("vtl1_measurement"))
    elif st.get("vtl1_enabled") is not False:
        raise SnapshotError("snapshot state: vtl1_enabled is not a boolean")
    for vp, saved in zip(p.vps, saved_vps, strict=True):
        _load_vp(p, vp.index, saved)


def _load_attrs(p: Partition, runs: Any) -> None:
    if not isinstance(runs, list):
        raise SnapshotError("snapshot state: no attribute map")
    lo, hi = p.layout.vtl1_base, p.layout.vtl1_end
    for run in runs:
        if not (isinstance(run, list) and len(run) == 3 and all(isinstance(x, int) for x in run)):
            raise SnapshotError("snapshot state: an attribute run is malformed")
        s, e, a = run
        if not (0 <= s < e <= p.layout.mem_size and s % PAGE_SIZE == 0 and e % PAGE_SIZE == 0
                and (e <= lo or s >= hi) and a > 0 and valid_attributes(a)):
            raise SnapshotError(f"snapshot state: attribute run {s:#x}-{e:#x} = {a!r} is not VTL0 memory "
                                "or not an attribute")
        with p.attr_lock:
            p.backend.set_range(s, e - s, a)
            p.vtl0_attrs[s // PAGE_SIZE:e // PAGE_SIZE] = bytes([a]) * ((e - s) // PAGE_SIZE)


def _load_controls(p: Partition, ctls: Any, section: Any) -> None:
    if not isinstance(ctls, list) or len(ctls) != len(p.vps):
        raise SnapshotError("snapshot state: the intercept controls do not match the VP count")
    by_vp: list[InterceptControl | None] = []
    for c in ctls:
        if c is None:
            by_vp.append(None)
            continue
        by_vp.append(InterceptControl(*(_int(c, f) for f in _CTL_FIELDS)))
    sec: tuple[int, int] | None = None
    if section is not None:
        if not (isinstance(section, list) and len(section) == 2 and all(isinstance(x, int) for x in section)
                and section[1] > 0 and p.layout.in_vtl0(section[0], section[1] * PAGE_SIZE)):
            raise SnapshotError("snapshot state: the privileged section is not VTL0 memory")
        sec = (section[0], section[1])
    p.intercept_controls.load(by_vp, sec)


def _rebuild_vtl1(p: Partition, measurement: Any) -> None:
    """VTL1's VM as the enable flow builds it (vtl/lifecycle/enable.py), its memory
    already in place."""
    if p.vtl1_image is None:
        raise SnapshotError("the snapshot has VTL1 enabled but its config has no VTL1 image")
    img = p.vtl1_image
    if measurement != loaded_image_sha256(img):
        raise SnapshotError("snapshot state: VTL1's measurement is not the VTL1 image's")
    # The measured code must be what is in memory: every segment VTL1 cannot write (its
    # text and rodata) byte for byte as the image loads it, so a memory file that carries
    # other VTL1 code under the saved measurement is refused.
    for seg in img.segments:
        if seg.flags & PF_W or not seg.filesz:
            continue
        if p.mem.read(seg.gpa, seg.filesz) != img.data[seg.offset:seg.offset + seg.filesz]:
            raise SnapshotError(f"VTL1's code at {seg.gpa:#x} in the memory file is not its measured "
                                "image's: "
                                "refused")
    p.vtl1_measurement = measurement
    vm = p.new_vm(Vtl.VTL1)
    vm.map_memory(p.mem, 0, p.layout.mem_size)
    for vp in p.vps:
        vcpu = p.new_vcpu(vm, vp.index)
        vp.ctl = abi_struct(p.mem, "struct vtl_control", p.layout.control_gpa(vp.index))
        vp.add_vcpu(Vtl.VTL1, vcpu)


def _load_vp(p: Partition, index: int, saved: Any) -> None:
    vp = p.vps[index]
    if not isinstance(saved, dict) or saved.get("index") != index:
        raise SnapshotError(f"snapshot state: VP{index} is missing")
    state = SAVED_STATES.get(saved.get("state"))  # type: ignore[arg-type]
    if state is None:
        raise SnapshotError(f"snapshot state: VP{index}'s state {saved.get('state')!r} is not one a "
                            "snapshot holds")
    if state.vtl == Vtl.VTL1 and not p.vtl1_enabled:
        raise SnapshotError(f"snapshot state: VP{index} is in VTL1, which is not enabled")
    if index == 0 and state is OFFLINE:
        raise SnapshotError("snapshot state: the boot VP is offline (nothing could start it)")
    vp.state = state
    vp.current = None
    vp.vtl1_up = saved.get("vtl1_up") is True
    vp.starts = _int(saved, "starts", 0, 1 << 32)
    r = saved.get("restart")
    if r is not None:
        if not isinstance(r, dict) or not isinstance(r.get("scenario"), str) or len(r["scenario"]) > 64:
            raise SnapshotError(f"snapshot state: VP{index}'s restart request is malformed")
        req = RestartRequest(_int(r, "entry"), r.get("teardown") is True, _int(r, "image_start"),
                             _int(r, "image_end"), _int(r, "param"), r["scenario"])
        why = req.problem(p.layout.image_window(Vtl.VTL0))
        if why is not None or index != 0 or state is not IN_VTL1_CALL:
            raise SnapshotError(f"snapshot state: VP{index}'s restart request cannot be applied "
                                f"({why or 'only the boot VP in a VTL call has one'})")
        vp.restart = req
    counters = saved.get("counters")
    if isinstance(counters, dict):
        vp.vtl_calls = _int(counters, "vtl_calls")
        vp.vtl_returns = _int(counters, "vtl_returns")
        vp.fast_switches = _int(counters, "fast_switches")
        for k, n in (counters.get("exits") or {}).items():
            if isinstance(k, str) and isinstance(n, int) and len(vp.exit_counts) < 256:
                vp.exit_counts[k] = n
        for k, n in (counters.get("ports") or {}).items():
            if isinstance(k, str) and k.isdigit() and int(k) < 65536 and isinstance(n, int):
                vp.port_counts[int(k)] = n
    vcpus = saved.get("vcpus")
    if not isinstance(vcpus, dict):
        raise SnapshotError(f"snapshot state: VP{index} has no vCPUs")
    want = {f"vtl{int(vtl)}" for vtl in Vtl if vp.vcpus[vtl] is not None}
    if set(vcpus) != want:
        raise SnapshotError(f"snapshot state: VP{index}'s vCPUs {sorted(vcpus)} are not the partition's "
                            f"{sorted(want)}")
    for vtl in Vtl:
        vcpu = vp.vcpus[vtl]
        if vcpu is None:
            continue
        try:
            vcpustate.load(vcpu, vcpustate.VcpuState.from_json(vcpus[f"vtl{int(vtl)}"]))
        except VmmError as e:
            raise SnapshotError(f"VP{index} VTL{int(vtl)}: {e}") from None


def verify(p: Partition, st: dict[str, Any], extra: object) -> dict[str, Any]:
    """The rebuilt partition's protection record against the saved one (returned when
    they agree; SnapshotError when they do not)."""
    saved = st.get("protections")
    if not isinstance(saved, dict):
        raise SnapshotError("snapshot state: no protection record")
    now = protections(p, extra)
    if now["policy_digest"] != saved.get("policy_digest"):
        raise SnapshotError(f"the restored partition's policy (digest {now['policy_digest'][:16]}…) is not "
                            f"the saved one ({str(saved.get('policy_digest'))[:16]}…): refused")
    if now["backend"] == saved.get("backend") and now["digest"] != saved.get("digest"):
        raise SnapshotError(f"the {now['backend']} backend applied other protections than at the save: "
                            "refused")
    regs, saved_regs = now.get("vtl0_registers"), saved.get("vtl0_registers")
    if regs != saved_regs:
        raise SnapshotError(f"VP0's VTL0 control registers after the restore {regs} are not the saved "
                            f"{saved_regs}: refused")
    saved_policy = st.get("policy")
    if not isinstance(saved_policy, dict):
        raise SnapshotError("snapshot state: no policy record")
    where = _difference(policy_record(p), saved_policy)
    if where is not None:
        raise SnapshotError(f"the restored partition's policy ({where}) is not the saved one: refused")
    return now


def _difference(now: Any, saved: Any, where: str = "") -> str | None:
    """The first place two policy records differ ("intercept_controls[1].cr0_mask"), or None."""
    if isinstance(now, dict) and isinstance(saved, dict):
        for k in sorted(set(now) | set(saved), key=str):
            d = _difference(now.get(k), saved.get(k), f"{where}.{k}" if where else str(k))
            if d is not None:
                return d
        return None
    if isinstance(now, list) and isinstance(saved, list) and len(now) == len(saved):
        for i, (a, b) in enumerate(zip(now, saved, strict=True)):
            d = _difference(a, b, f"{where}[{i}]")
            if d is not None:
                return d
        return None
    return None if now == saved else where


def restored_summary(p: Partition, st: dict[str, Any], path: Path) -> dict[str, Any]:
    """What a restore rebuilt, for tools and events: the digests compared and the backends."""
    saved = st["protections"]
    return {"path": str(path), "policy_digest": saved["policy_digest"], "digest": saved["digest"],
            "saved_backend": saved["backend"], "backend": p.backend_name,
            "vtl1_enabled": p.vtl1_enabled, "vps": len(p.vps), "boot_count": p.boot_count}

