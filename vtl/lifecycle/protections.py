"""What a lifecycle step changes: the protections and pins of a partition, as the VMM
holds them and as it reads them from KVM and the host kernel.

(A *snapshot* is something else: the whole partition saved to a directory,
vtl/lifecycle/snapshot.py.)  The protection record is a plain dict (it goes into
events, the control socket and `vtl kexec --json`).  `digest` covers everything that
is policy (VTL0's attribute map, the runs the backend applied, the register intercept
control, whether VTL1 judges the pinned MSRs, a mode's own policy), so two records are
"the same protections and pins" exactly when their digests match (the deny flow
compares them whole; a restore compares the saved one with the rebuilt partition's).
The registers are read from KVM's vCPU state.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from typing import Any

from vmm import uapi as u
from vmm.memattr import describe
from vmm.memory import PAGE_SIZE
from vmm.x86 import PINNED_MSRS
from vtl.core.events import Lifecycle
from vtl.core.partition import Partition
from vtl.core.vtl import Vtl


def protections(p: Partition, extra: object = None) -> dict[str, Any]:
    """The protection record of `p` now.  `extra`: policy a mode holds outside the
    partition (Heki's pins and page permissions), in the digest too."""
    # VTL1 never sets attributes in its own region, so counting the whole map is exact.
    pages = {describe(a): n for a in range(1, 8) if (n := p.vtl0_attrs.count(a))}
    applied = [(s, e, a) for s, e, a in p.backend.runs() if a]
    ctl = p.intercept_control
    control = None if ctl is None else {
        "flags": ctl.flags, "cr0_mask": ctl.cr0_mask, "cr4_mask": ctl.cr4_mask,
        "priv_gpa": ctl.priv_gpa, "priv_pages": ctl.priv_pages}
    # The VPs whose register writes VTL1 judges (each VP's own control; docs/smp.md).
    pinned_vps = [vp.index for vp in p.vps if p.intercept_controls.pinned(vp.index)]
    msr_pins = sorted(PINNED_MSRS.values()) if p.vtl1_enabled else []
    # The policy as VTL1 (or a mode) set it, whatever backend applies it; `digest` adds
    # what this backend applied (equal only through the same backend).
    # Every VP's own control (what VTL1 judges is per VP), not only the one tools show.
    controls = [None if (c := p.intercept_controls.of(i)) is None else
                (c.flags, c.cr0_mask, c.cr4_mask, c.priv_gpa, c.priv_pages) for i in range(len(p.vps))]
    policy = hashlib.sha256(bytes(p.vtl0_attrs))
    section = p.intercept_controls.section
    policy.update(repr((control, controls, section, pinned_vps, msr_pins, extra)).encode())
    h = hashlib.sha256(bytes(p.vtl0_attrs))
    h.update(repr((applied, control, controls, pinned_vps, msr_pins)).encode())
    if extra is not None:
        h.update(repr(extra).encode())
    out: dict[str, Any] = {
        "vtl1_enabled": p.vtl1_enabled,
        "vtl1_measurement": p.vtl1_measurement,
        "boot_count": p.boot_count,
        "protected_pages": dict(sorted(pages.items())),
        "backend": p.backend_name,
        "backend_protected_runs": len(applied),
        "backend_protected_pages": sum((e - s) // PAGE_SIZE for s, e, _ in applied),
        "intercept_control": control,
        "pinned_vps": pinned_vps,
        "msr_pins": msr_pins,
        "digest": h.hexdigest(),
        "policy_digest": policy.hexdigest(),
    }
    if not p.vtl1_enabled:         # what VTL0 would read there now (zeros after a teardown)
        out["vtl1_region_zero"] = p.mem.read(p.layout.vtl1_base, p.layout.vtl1_size).count(0) \
            == p.layout.vtl1_size
    vm = p.vms[Vtl.VTL0]
    if vm is not None:             # what KVM was told: VTL0's memslots, read-only ones
        out["kvm_memslots"] = len(vm.slots)
        out["kvm_readonly_memslots"] = sum(1 for _, _, f in vm.slots.values() if f & u.KVM_MEM_READONLY)
    vp = p.vps[0]
    vcpu = vp.vcpus[Vtl.VTL0]
    if vcpu is not None:
        s = vcpu.sregs             # KVM's synced state of the stopped vCPU
        out["vtl0_registers"] = {"cr0": int(s.cr0), "cr3": int(s.cr3), "cr4": int(s.cr4),
                                 "efer": int(s.efer)}
    return out


def unprotected(snap: dict[str, Any]) -> bool:
    """No protection and no pin left (a teardown's or a reset's end state)."""
    return (not snap["vtl1_enabled"] and not snap["protected_pages"] and not snap["backend_protected_runs"]
            and snap["intercept_control"] is None and not snap["msr_pins"])


def record_step(p: Partition, step: str, by: str, action: Callable[[], Any], *, vp: int = 0, vtl: int = 0,
                detail: str = "") -> Any:
    """Run `action` as lifecycle step `step`, emitting a Lifecycle event with the state
    before and after; the duration covers the action only."""
    before = protections(p)
    t0 = time.perf_counter()
    out = action()
    dt = (time.perf_counter() - t0) * 1e6
    p.events.emit(Lifecycle(ts=p.events.now(), vp=vp, vtl=vtl, step=step, by=by, detail=detail,
                            duration_us=round(dt, 1), before=before, after=protections(p)))
    return out
