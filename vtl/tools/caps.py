"""`vtl caps`: the host's KVM mechanisms and, for each protection of DESIGN sections 5-6,
the strategy this project uses on this host.

Mechanisms are of three kinds, shown apart: behaviour *probed* now in a scratch VM,
*capabilities* KVM states (KVM_CHECK_EXTENSION), and *facts* of the uAPI that no probe
can change (there is no CR-write exit).  A strategy is reported as enforced only when
the project implements it and the mechanisms it rests on were observed here; every row
says why.
"""

from __future__ import annotations

from pydantic import BaseModel

from vmm.probe import probe_all


class Mechanism(BaseModel):
    name: str
    present: bool
    detail: str
    kind: str = "probe"        # probe | capability | fact


# Results that are not behaviour observed in a VM.
CAPABILITIES = {"kvm", "sync_regs", "vcpu_events", "memslots", "rwx_memory_attributes", "hyperv"}
FACTS = {"cr_write_exits"}
# The VMM half of register pinning (decode, register intercepts, single-step) exists.
REGISTER_INTERCEPTS_BUILT = True


def _kind(name: str) -> str:
    return "fact" if name in FACTS else "capability" if name in CAPABILITIES else "probe"


class Strategy(BaseModel):
    protection: str
    strategy: str
    enforced: bool
    why: str


class HekiPart(BaseModel):
    part: str
    kind: str          # real | stand-in | not enforced on this host | not protected by Heki
    enforced: bool
    how: str


class Caps(BaseModel):
    mechanisms: list[Mechanism]
    strategies: list[Strategy]
    heki_mode: list[HekiPart] = []     # vtl run --mode heki (docs/heki-mode.md)


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
    step = present.get("single_step", False)
    nw_how = {"rwx": "KVM_SET_MEMORY_ATTRIBUTES NW on VTL0's VM (rwx backend)",
              "host_mapping": "mprotect(PROT_READ) on VTL0's own alias of guest memory "
                              "(host_mapping backend; a write exits as MMIO, memory unchanged)",
              "memslot": "read-only memslots in VTL0's VM (memslot backend)"}[backend]
    nr_how = {"rwx": "KVM_SET_MEMORY_ATTRIBUTES NR",
              "host_mapping": "mprotect(PROT_NONE) on VTL0's alias (host_mapping backend)",
              "memslot": "page left unmapped in VTL0's VM (memslot backend)"}[backend]
    basis = {"rwx": "probe rwx_memory_attributes", "host_mapping": "probe host_mapping_protection",
             "memslot": "probes readonly_memslot, unmapped_gpa_read/fetch"}[backend]
    nw_ok = backend != "memslot" or ro
    nr_ok = backend != "memslot" or unmapped
    # CR/descriptor-table pinning: an NR page's fetch exits with RIP at the target (decoded by
    # the VMM), and the section's other instructions are single-stepped.
    regs_ok = REGISTER_INTERCEPTS_BUILT and nr_ok and step and present.get("unmapped_gpa_fetch", False)
    nx_ok = backend == "rwx" or (nw_ok and msr and regs_ok)
    return [
        Strategy(protection="VTL1 memory isolation",
                 strategy="VTL1's region has no memslot in VTL0's VM; accesses exit as MMIO / "
                          "emulation failure and are refused with #GP",
                 enforced=unmapped, why="probes unmapped_gpa_read/fetch: the exits were observed" if unmapped
                 else "not enforced on this host: unmapped-GPA exits not observed"),
        Strategy(protection="VTL transport",
                 strategy="port I/O synthetic device" + ("" if present.get("vmcall_to_userspace") else
                                                         " (VMCALL does not reach userspace here)"),
                 enforced=present.get("long_mode_pio_exit", False),
                 why="probe long_mode_pio_exit: a 64-bit OUT exits to userspace"
                 if present.get("long_mode_pio_exit") else "not enforced on this host: no PIO exits"),
        Strategy(protection="memory no-write (NW)", strategy=nw_how, enforced=nw_ok,
                 why=basis if nw_ok else "not enforced on this host: no read-only memslots"),
        Strategy(protection="memory no-read (NR)", strategy=nr_how, enforced=nr_ok,
                 why=basis if nr_ok else "not enforced on this host: unmapped-GPA exits not observed"),
        Strategy(protection="MSR pinning (EFER, LSTAR, STAR, CSTAR, SFMASK, SYSENTER_*, APIC_BASE)",
                 strategy="KVM_X86_SET_MSR_FILTER -> userspace WRMSR exit -> MSR intercept to VTL1; a value "
                          "KVM refuses becomes #GP",
                 enforced=msr, why="probe msr_filter: a filtered WRMSR exited" if msr
                 else "not enforced on this host: MSR filter not available"),
        Strategy(protection="CR0/CR3/CR4, XCR0, GDTR/IDTR/LDTR/TR pinning",
                 strategy="no CR-write exit exists (fact cr_write_exits): VTL0 keeps these writes in a "
                          "privileged section VTL1 makes NR after scanning VTL0's executable pages; a "
                          "fetch there is decoded by the VMM and becomes a register intercept VTL1 "
                          "judges (masks as the TLFS's CR intercept control); other instructions there "
                          "are single-stepped",
                 enforced=regs_ok,
                 why="probes unmapped_gpa_fetch (RIP at the target) and single_step, with NR from the "
                     f"{backend} backend; in force once VTL1 sets its intercept control at lock"
                 if regs_ok else "not enforced on this host: " + (
                     "needs NR fetch exits and single-step" if REGISTER_INTERCEPTS_BUILT else
                     "the VMM's privileged-instruction decoding is not built yet")),
        Strategy(protection="memory no-execute (NX)",
                 strategy="KVM_SET_MEMORY_ATTRIBUTES NX" if backend == "rwx" else
                 "VTL0's page-table NX bits: VTL1 checks W^X over every mapping and locks the tables "
                 "NW; EFER pinned by the MSR filter; CR3 pinned to the locked roots by register "
                 "intercepts",
                 enforced=nx_ok,
                 why="probe rwx_memory_attributes" if backend == "rwx" else
                 ("holds only while CR3 is pinned: the register-intercept row above is enforced, and "
                  "the built-in VTL1 pins CR3 from lock" if nx_ok else
                  "not enforced on this host: NX rests on NW page tables, the MSR filter and CR3 "
                  "pinning, and one of them is missing")),
    ]


def probe_caps() -> Caps:
    mechs = [Mechanism(name=r.name, present=r.present, detail=r.detail, kind=_kind(r.name))
             for r in probe_all()]
    from vtl.modes.heki import heki_parts

    present = {m.name: m.present for m in mechs}
    return Caps(mechanisms=mechs, strategies=strategies_for(present),
                heki_mode=[HekiPart.model_validate(x) for x in heki_parts(present, default_backend(present))])


def render_caps(caps: Caps) -> str:
    w = max(len(m.name) for m in caps.mechanisms)
    lines: list[str] = []
    for kind, title in (("probe", "Host KVM behaviour (probed now, in scratch VMs):"),
                        ("capability", "What KVM states (KVM_CHECK_EXTENSION):"),
                        ("fact", "Facts of the KVM uAPI (not probed: no mechanism exists):")):
        rows = [m for m in caps.mechanisms if m.kind == kind]
        if rows:
            lines += ([""] if lines else []) + [title]
            lines += [f"  {'yes' if m.present else 'no ':<3}  {m.name:<{w}}  {m.detail}" for m in rows]
    lines += ["", "Protections and the strategy used on this host:"]
    for s in caps.strategies:
        state = "enforced" if s.enforced else "NOT ENFORCED"
        lines.append(f"  {s.protection}: {state}")
        lines.append(f"      strategy: {s.strategy}")
        lines.append(f"      why: {s.why}")
    if caps.heki_mode:
        lines += ["", "Heki mode (vtl run --mode heki): the real mechanism and the stand-ins:"]
        for h in caps.heki_mode:
            lines.append(f"  {h.part}: {h.kind}")
            lines.append(f"      {h.how}")
    return "\n".join(lines)
