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


def default_backend(present: dict[str, bool]) -> str:
    """The attribute backend a partition uses when none is asked for (vmm.memattr's rule)."""
    if present.get("rwx_memory_attributes"):
        return "rwx"
    if present.get("host_mapping_protection"):
        return "host_mapping"
    return "memslot"


def strategies_for(present: dict[str, bool]) -> list[Strategy]:
    backend = default_backend(present)
    ro = present.get("readonly_memslot", False)
    unmapped = present.get("unmapped_gpa_read", False) and present.get("unmapped_gpa_fetch", False)
    msr = present.get("msr_filter", False)
    nw_how = {"rwx": "KVM_SET_MEMORY_ATTRIBUTES NW on VTL0's VM (rwx backend)",
              "host_mapping": "mprotect(PROT_READ) on VTL0's own alias of guest memory "
                              "(host_mapping backend; a write exits as MMIO, memory unchanged)",
              "memslot": "read-only memslots in VTL0's VM (memslot backend)"}[backend]
    nr_how = {"rwx": "KVM_SET_MEMORY_ATTRIBUTES NR",
              "host_mapping": "mprotect(PROT_NONE) on VTL0's alias (host_mapping backend)",
              "memslot": "page left unmapped in VTL0's VM (memslot backend)"}[backend]
    nw_ok = backend != "memslot" or ro
    nr_ok = backend != "memslot" or unmapped
    tables = nw_ok and msr   # NX through locked page tables needs NW and the MSR filter
    return [
        Strategy(protection="VTL1 memory isolation",
                 strategy="VTL1's region has no memslot in VTL0's VM; accesses exit as MMIO / "
                          "emulation failure and are refused with #GP",
                 enforced=unmapped, why="" if unmapped else "unmapped-GPA exits not observed"),
        Strategy(protection="VTL transport",
                 strategy="port I/O synthetic device (VMCALL does not reach userspace here)"
                          if not present.get("vmcall_to_userspace") else "port I/O synthetic device",
                 enforced=present.get("long_mode_pio_exit", False), why=""),
        Strategy(protection="memory no-write (NW)", strategy=nw_how, enforced=nw_ok,
                 why="" if nw_ok else "no read-only memslots on this host"),
        Strategy(protection="memory no-read (NR)", strategy=nr_how, enforced=nr_ok,
                 why="" if nr_ok else "unmapped-GPA exits not observed"),
        Strategy(protection="memory no-execute (NX)",
                 strategy="KVM_SET_MEMORY_ATTRIBUTES NX" if backend == "rwx" else
                 "VTL0 page tables locked read-only by VTL1 + EFER.NXE pinned through the MSR filter",
                 enforced=backend == "rwx",
                 why="" if backend == "rwx" else
                 ("not enforced on this host: NX holds only while VTL0's CR3 stays on the locked tables, "
                  "and CR3 loads are not pinned yet (issue 9)" if tables else
                  "needs NW protections and the MSR filter")),
        Strategy(protection="MSR pinning (LSTAR, STAR, EFER, ...)",
                 strategy="KVM_X86_SET_MSR_FILTER -> userspace WRMSR exit -> intercept to VTL1",
                 enforced=msr, why="" if msr else "MSR filter not available"),
        Strategy(protection="CR0/CR4/CR3, GDTR/IDTR pinning",
                 strategy="no CR-write exits exist: writers live on NR privileged-section pages; "
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
