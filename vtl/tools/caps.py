"""`vtl caps`: the host's KVM mechanisms (measured by vmm/probe.py) and, for each
protection of DESIGN sections 5-6, the strategy this project uses on this host.

A strategy is reported as enforced only when the project implements it *and* the
mechanism it rests on was observed working here; otherwise the row says why not.
"""

from __future__ import annotations

from pydantic import BaseModel

from vmm.probe import probe_all


class Mechanism(BaseModel):
    name: str
    present: bool
    detail: str


class Strategy(BaseModel):
    protection: str
    strategy: str
    enforced: bool
    why: str


class Caps(BaseModel):
    mechanisms: list[Mechanism]
    strategies: list[Strategy]


def strategies_for(present: dict[str, bool]) -> list[Strategy]:
    rwx = present.get("rwx_memory_attributes", False)
    ro = present.get("readonly_memslot", False)
    unmapped = present.get("unmapped_gpa_read", False) and present.get("unmapped_gpa_fetch", False)
    msr = present.get("msr_filter", False)
    tables = ro and msr   # NX through locked page tables needs both
    return [
        Strategy(protection="VTL1 memory isolation",
                 strategy="VTL1's region has no memslot in VTL0's VM; accesses exit as MMIO / "
                          "emulation failure and are refused with #GP",
                 enforced=unmapped, why="" if unmapped else "unmapped-GPA exits not observed"),
        Strategy(protection="VTL transport",
                 strategy="port I/O synthetic device (VMCALL does not reach userspace here)"
                          if not present.get("vmcall_to_userspace") else "port I/O synthetic device",
                 enforced=present.get("long_mode_pio_exit", False), why=""),
        Strategy(protection="guest address translation",
                 strategy="software walk of the guest's page tables (vmm/paging.py)"
                          + ("" if present.get("kvm_translate") else "; KVM_TRANSLATE returns invalid"),
                 enforced=True, why=""),
        Strategy(protection="memory no-write (NW)",
                 strategy="KVM_SET_MEMORY_ATTRIBUTES NW on VTL0's VM" if rwx
                 else "read-only memslots in VTL0's VM (memslot backend)",
                 enforced=rwx or ro, why="" if (rwx or ro) else "no read-only memslots on this host"),
        Strategy(protection="memory no-read (NR)",
                 strategy="KVM_SET_MEMORY_ATTRIBUTES NR" if rwx else "page left unmapped in VTL0's VM",
                 enforced=rwx or unmapped,
                 why="" if (rwx or unmapped) else "unmapped-GPA exits not observed"),
        Strategy(protection="memory no-execute (NX)",
                 strategy="KVM_SET_MEMORY_ATTRIBUTES NX" if rwx else
                 "VTL0 page tables locked read-only by VTL1 + EFER.NXE pinned through the MSR filter "
                 "(holds while CR3 stays on the locked tables: CR3 loads are not pinned on this host)",
                 enforced=rwx or tables,
                 why="" if (rwx or tables) else "needs read-only memslots and the MSR filter"),
        Strategy(protection="MSR pinning (LSTAR, STAR, EFER, ...)",
                 strategy="KVM_X86_SET_MSR_FILTER -> userspace WRMSR exit -> intercept to VTL1",
                 enforced=msr, why="" if msr else "MSR filter not available"),
        Strategy(protection="CR0/CR4/CR3, GDTR/IDTR pinning",
                 strategy="no CR-write exits exist: writers live on unmapped privileged-section pages; "
                          "a fetch there is decoded and judged by VTL1",
                 enforced=False, why="not enforced on this host: no KVM uAPI reports CR/descriptor-table "
                 "writes, and the privileged-section scheme is not implemented yet"),
    ]


def probe_caps() -> Caps:
    mechs = [Mechanism(name=r.name, present=r.present, detail=r.detail) for r in probe_all()]
    return Caps(mechanisms=mechs, strategies=strategies_for({m.name: m.present for m in mechs}))


def render_caps(caps: Caps) -> str:
    w = max(len(m.name) for m in caps.mechanisms)
    lines = ["Host KVM mechanisms (probed now):"]
    for m in caps.mechanisms:
        lines.append(f"  {'yes' if m.present else 'no ':<3}  {m.name:<{w}}  {m.detail}")
    lines += ["", "Protections and the strategy used on this host:"]
    for s in caps.strategies:
        state = "enforced" if s.enforced else "NOT ENFORCED"
        lines.append(f"  {s.protection}: {state}")
        lines.append(f"      strategy: {s.strategy}")
        if s.why:
            lines.append(f"      why: {s.why}")
    return "\n".join(lines)
