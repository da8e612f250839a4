"""While the privileged section is mapped for a single step, nothing but the one stepped
instruction runs (issue 14, item 1): not an exception handler, not a #DB handler, not a
gate the CPU reads from the section itself, not a gate the instruction rewrites before it
faults; and an instruction this host cannot step is #UD, not a crash.

A test-only VTL0 with a one-page privileged section (tests/v9guest.py) whose test VTL1
judges CR4 (mask PGE) and denies every write: so a MOV to CR4 that ran unjudged is seen
in VTL0's CR4, read from KVM after the run.  The attacks point a gate at the section's
`mov %rdi, %cr4` with RDI = CR4 | PGE."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.v9guest import DENY_GP, HAVE_BINUTILS, IDT, PRIV, SEL_TSS, TAIL, TSS, Guest, GuestRun, run_guest
from vmm import regcheck as rc
from vtl.abi import ABI

pytestmark = [pytest.mark.kvm, pytest.mark.skipif(not HAVE_BINUTILS, reason="needs binutils (as, ld)")]

CR4 = 0x620
PGE = rc.CR4_PGE
NR_ALL = 7
GP0, UD = (13, 0), (6, 0)
MEM = 256 << 20
NO_VECTOR = (1 << 64) - 1             # the test partition's memory: GVA MEM is not mapped (boot tables)


def _setup(g: Guest) -> None:
    """VTL1 judges CR4.PGE (and denies, policy DENY_GP) and makes the section NR."""
    g.control(ABI.VTL_ICTL_CR4, 0, PGE)
    g.protect(PRIV, NR_ALL)


def _gate(g: Guest, at: str, handler: str) -> None:
    g.asm(f"        lea {at}, %rdi; lea {handler}(%rip), %rax; call write_gate")


def _ok(r: GuestRun) -> None:
    res = r.run.result
    assert (res.reason, res.status) == ("guest_exit", 0), (res, r.run.console[-20:])


def _cr4_kept(r: GuestRun) -> None:
    assert r.sregs.cr4 == CR4, f"CR4 {int(r.sregs.cr4):#x}: the section's MOV to CR4 ran unjudged"


@pytest.mark.parametrize("backend", ["host_mapping", "memslot"])
def test_an_exception_in_a_step_stops_at_its_handler_before_it_runs(tmp_path: Path, backend: str) -> None:
    """#PF from a stepped load and #UD from a stepped INTO: delivered through VTL0's
    gates, the step ends at the handler's first byte (nothing of it ran with the section
    mapped), and the handler then runs as usual and sees the fault hardware raised."""
    g = Guest()
    _setup(g)
    pf = g.try_("p_load", 0x7FFF_0000_0000)
    ud = g.try_("p_into")
    ok = g.try_("p_nops")
    r = run_guest(tmp_path, g, backend=backend)  # type: ignore[arg-type]
    _ok(r)
    assert r.run.result.backend == backend
    assert r.fault(pf) == (14, 0) and r.results[pf][2:] == (r.symbols["p_load"], 0x7FFF_0000_0000)
    assert r.fault(ud) == UD and r.results[ud][2] == r.symbols["p_into"]
    assert r.fault(ok) is None
    steps = {s.rip: s for s in r.events("single_step")}
    assert steps[r.symbols["p_load"]].exit == "event"
    assert steps[r.symbols["p_load"]].next_rip == r.symbols["isr14"]     # its first byte: not run
    assert steps[r.symbols["p_into"]].exit == "event"
    assert steps[r.symbols["p_into"]].next_rip == r.symbols["isr6"]


def test_an_idt_inside_the_section_refuses_the_step(tmp_path: Path) -> None:
    """The reported hole: an IDT whose #UD gate lies in the section page (NR for VTL0, so
    VTL0's view cannot read it) and leads to the section's MOV to CR4.  The step of a
    `ud2` there would map the page, the CPU would read the gate and run the MOV unjudged.
    Now the step is refused (#GP(0) through gate 13, outside the section) and CR4 stays."""
    g = Guest()
    base = TAIL - 16 * 13                      # gates 0-12 in the section, 13 in the next page
    _gate(g, f"{base + 16 * 6:#x}", "p_cr4")
    _gate(g, f"{TAIL:#x}", "isr13")
    g.asm(f"""
        sub $16, %rsp; movw ${16 * 14 - 1}, (%rsp); movabs ${base:#x}, %rax; mov %rax, 2(%rsp)
        lidt (%rsp); add $16, %rsp""")
    _setup(g)
    attack = g.try_("p_ud2", CR4 | PGE, policy=DENY_GP)
    g.asm("        lidt idtr(%rip)")
    r = run_guest(tmp_path, g)
    _ok(r)
    _cr4_kept(r)
    assert r.fault(attack) == GP0 and r.results[attack][2] == r.symbols["p_ud2"]
    assert any("IDT at" in e.reason and "privileged-section page" in e.reason for e in r.events("refused"))


def test_a_gate_into_the_section_refuses_the_step(tmp_path: Path) -> None:
    """A gate (#DB here) that leads into the page the step maps: refused, #GP(0)."""
    g = Guest()
    _gate(g, "idt+16*1(%rip)", "p_cr4")
    _setup(g)
    attack = g.try_("p_nops", CR4 | PGE, policy=DENY_GP)
    g.asm("        call setup_idt")
    r = run_guest(tmp_path, g)
    _ok(r)
    _cr4_kept(r)
    assert r.fault(attack) == GP0
    assert any("IDT vector 1 leads" in e.reason for e in r.events("refused"))


def test_an_ist_stack_inside_the_section_refuses_the_step(tmp_path: Path) -> None:
    """Gate 6 delivers on IST1, and the TSS's IST1 points into the section page the step
    maps: refused (#GP(0)), whatever the handler."""
    g = Guest()
    g.asm(f"""
        lgdt gdtr_new(%rip); mov ${SEL_TSS:#x}, %ax; ltr %ax
        movabs ${PRIV + 0x800:#x}, %rax; mov %rax, {TSS + 0x24:#x}
        movb $1, idt+16*6+4(%rip)""")
    _setup(g)
    attack = g.try_("p_ud2")
    g.asm(f"        movb $0, idt+16*6+4(%rip); movq $0, {TSS + 0x24:#x}")
    after = g.try_("p_ud2")
    r = run_guest(tmp_path, g)
    _ok(r)
    assert r.fault(attack) == GP0 and r.fault(after) == UD
    assert any("delivers on a stack" in e.reason for e in r.events("refused"))


def test_a_gate_changed_between_two_steps_is_seen(tmp_path: Path) -> None:
    """The VMM reuses a step's plan only while everything it read is unchanged: a gate
    VTL0 rewrites (outside the section) after one step is judged at the next."""
    g = Guest()
    _setup(g)
    before = g.try_("p_nops")
    _gate(g, "idt+16*6(%rip)", "p_cr4")
    attack = g.try_("p_ud2", CR4 | PGE, policy=DENY_GP)
    g.asm("        call setup_idt")
    after = g.try_("p_ud2")
    r = run_guest(tmp_path, g)
    _ok(r)
    _cr4_kept(r)
    assert r.fault(before) is None and r.fault(attack) == GP0 and r.fault(after) == UD
    assert any("IDT vector 6 leads" in e.reason for e in r.events("refused"))


def test_a_step_that_rewrites_a_gate_and_then_faults_changes_nothing(tmp_path: Path) -> None:
    """`rep movsb` in the section copies a gate #PF -> the section's MOV to CR4 over
    VTL0's own (writable) gate 14 and then reads past the end of mapped memory (#PF
    inside the step).  The IDT is NW for the step: the write is refused (#GP(0)) and the
    gate, and CR4, stay as they were."""
    g = Guest()
    src = MEM - 16
    _gate(g, f"{src:#x}", "p_cr4")             # the forged gate, just below unmapped memory
    _setup(g)
    g.asm("        mov $32, %ecx")
    attack = g.try_("p_movsb", IDT + 16 * 14, src, policy=DENY_GP)
    gate = g.store(f"{IDT + 16 * 14:#x}")
    r = run_guest(tmp_path, g)
    _ok(r)
    _cr4_kept(r)
    lo = r.value(gate)
    target = (lo & 0xFFFF) | ((lo >> 48) & 0xFFFF) << 16
    assert target == r.symbols["isr14"], f"gate 14 now leads to {target:#x}"
    assert any("exception delivery reads" in e.reason for e in r.events("refused"))
    assert r.fault(attack) == GP0


def _no_handler_ran_in_a_step(r: GuestRun) -> None:
    """No step ended after an instruction of an IDT handler (each one's first byte)."""
    handlers = {r.symbols[f"isr{v}"] for v in range(32)}
    for s in r.events("single_step"):
        assert s.exit == "event" or not any(0 < s.next_rip - h <= 15 for h in handlers), s


def test_a_dr7_breakpoint_with_its_gate_in_the_section_is_judged(tmp_path: Path) -> None:
    """A code breakpoint (DR0/DR7) on an instruction of the section, and gate 1 (#DB)
    pointing at the section's MOV to CR4: the #DB is delivered with the section NR (on
    this host a code breakpoint fires before the fetch), so the MOV is decoded and judged
    like any other (VTL1 denies: #GP(0)); CR4 stays."""
    g = Guest()
    _gate(g, "idt+16*1(%rip)", "p_cr4")
    _setup(g)
    g.asm("        lea p_nops(%rip), %rax; mov %rax, %dr0; mov $0x1, %eax; mov %rax, %dr7")
    db = g.try_("p_nops", CR4 | PGE, policy=DENY_GP)
    g.asm("        xor %eax, %eax; mov %rax, %dr7; call setup_idt")
    after = g.try_("p_nops")
    r = run_guest(tmp_path, g)
    _ok(r)
    _cr4_kept(r)
    _no_handler_ran_in_a_step(r)
    assert r.fault(db) == GP0 and r.results[db][2] == r.symbols["p_cr4"]
    assert [(int(m.reg), int(m.new_value)) for m in r.log] == [(ABI.VTL_REG_CR4, CR4 | PGE)]
    assert r.fault(after) is None


def test_tf_into_the_section_runs_no_handler_in_the_step(tmp_path: Path) -> None:
    """IRETQ into the section with RFLAGS.TF set: the trap after the stepped instruction
    never runs a handler with the section mapped, and with gate 1 into the section the
    step is refused."""
    g = Guest()
    _setup(g)
    iret = """
        mov %rsp, %rax
        pushq $0x10; pushq %rax; pushfq; orq $0x100, (%rsp); pushq $0x8
        lea p_nops(%rip), %rax; pushq %rax
        iretq"""
    plain = g.slot()
    g.asm(f"""
        movq $-1, last_vector(%rip)
        mov %rsp, recover_rsp(%rip); lea 1f(%rip), %rax; mov %rax, recover_rip(%rip)
        lea 1f(%rip), %rax; pushq %rax
        {iret}
1:      pushfq; andq $~0x100, (%rsp); popfq
        mov last_vector(%rip), %rax; mov %rax, results+{32 * plain}(%rip)""")
    _gate(g, "idt+16*1(%rip)", "p_cr4")
    evil = g.slot()
    g.asm(f"""
        movq $-1, last_vector(%rip); movabs ${CR4 | PGE:#x}, %rdi; mov ${DENY_GP}, %r12
        mov %rsp, recover_rsp(%rip); lea 2f(%rip), %rax; mov %rax, recover_rip(%rip)
        lea 2f(%rip), %rax; pushq %rax
        {iret}
2:      pushfq; andq $~0x100, (%rsp); popfq
        mov last_vector(%rip), %rax; mov %rax, results+{32 * evil}(%rip)
        call setup_idt""")
    r = run_guest(tmp_path, g)
    _ok(r)
    _cr4_kept(r)
    _no_handler_ran_in_a_step(r)
    assert r.value(evil) == 13            # the step refused: #GP(0)
    assert r.value(plain) in (1, NO_VECTOR)
    assert any(s.rip == r.symbols["p_nops"] for s in r.events("single_step"))


@pytest.mark.parametrize("fn", ["p_int3", "p_int1", "p_int80", "p_sysenter"])
def test_an_instruction_the_host_cannot_step_is_ud_not_a_crash(tmp_path: Path, fn: str) -> None:
    g = Guest()
    _setup(g)
    s = g.try_(fn)
    after = g.try_("p_nops")
    r = run_guest(tmp_path, g)
    _ok(r)
    assert r.fault(s) in (UD, (3, 0), (1, 0), GP0), r.fault(s)
    assert r.results[s][2] in (r.symbols[fn], r.symbols[fn] + 1, r.symbols[fn] + 2)
    assert r.fault(after) is None
