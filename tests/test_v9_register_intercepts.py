"""Register intercepts end to end on real KVM: a test-only VTL0 with a privileged section
(tests/v9guest.py) and a test-only VTL1 that registers it (VTL_HC_SET_INTERCEPT_CONTROL),
makes it NR and answers every intercept with the policy VTL0 names in R12.

What is checked is what the VMM observes and does: VTL0's registers read from KVM after
the run, the faults VTL0 took (recorded by its own handlers into memory), the intercept
messages VTL1 received, the events, and the run's counters."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.v9guest import (
    ALLOW,
    CALL_CONTROL_AT,
    CALL_GET_REGISTER,
    DENY_GP,
    DENY_PF,
    DENY_UD,
    GDT,
    GDT_ENTRIES,
    GDTR_BAD,
    GDTR_NEW,
    HAVE_BINUTILS,
    IDT,
    IDTR,
    LDT,
    NRDATA,
    PRIV,
    SEL_DATA,
    SEL_LDT,
    SEL_LDT_PTR,
    SEL_TSS,
    SEL_TSS2,
    SEL_TSS_NP,
    STOP,
    TAIL,
    TSS,
    Guest,
    GuestRun,
    run_guest,
)
from vmm import regcheck as rc
from vtl.abi import ABI

pytestmark = [pytest.mark.kvm, pytest.mark.skipif(not HAVE_BINUTILS, reason="needs binutils (as, ld)")]

CR0 = 0x80010033            # the boot CR0: PE MP ET NE WP PG
CR4 = 0x620                 # the boot CR4: PAE OSFXSR OSXMMEXCPT
WP, TS, PGE, PCE = rc.CR0_WP, rc.CR0_TS, rc.CR4_PGE, rc.CR4_PCE
ICTL = ABI.VTL_ICTL_CR0 | ABI.VTL_ICTL_CR4
NR_ALL = 7                  # NR | NW | NX
GP0, UD = (13, 0), (6, 0)


def _setup(g: Guest, flags: int = ICTL, cr0_mask: int = WP, cr4_mask: int = PCE) -> None:
    """VTL1 registers the section and makes it NR for VTL0; both must succeed."""
    g.control(flags, cr0_mask, cr4_mask)
    g.protect(PRIV, NR_ALL)


def _ok(r: GuestRun) -> None:
    res = r.run.result
    assert (res.reason, res.status) == ("guest_exit", 0), (res, r.run.console[-20:])
    assert r.value(0) == ABI.VTL_OK and r.value(1) == ABI.VTL_OK, "control or protect refused"


def test_control_registers_judged_refused_and_applied(tmp_path: Path) -> None:
    g = Guest()
    _setup(g)
    pge = g.try_("p_cr4", CR4 | PGE)                      # not in the mask: applied directly
    cr4_a = g.store("%cr4")
    pce_deny = g.try_("p_cr4", CR4 | PGE | PCE, policy=DENY_GP)
    cr4_b = g.store("%cr4")
    pce_allow = g.try_("p_cr4", CR4 | PGE | PCE, policy=ALLOW)
    cr4_c = g.store("%cr4")
    wp_deny = g.try_("p_cr0", CR0 & ~WP, policy=DENY_GP)
    cr0_a = g.store("%cr0")
    wp_allow = g.try_("p_cr0", CR0 & ~WP, policy=ALLOW)
    cr0_b = g.store("%cr0")
    g.try_("p_cr0", CR0, policy=ALLOW)
    ts = g.try_("p_cr0", CR0 | TS)                        # TS is not judged
    cr0_c = g.store("%cr0")
    clts = g.try_("p_clts")
    cr0_d = g.store("%cr0")
    lmsw = g.try_("p_lmsw", 0x000B)                       # MP|TS (+PE, which LMSW keeps)
    cr0_e = g.store("%cr0")
    lmsw0 = g.try_("p_lmsw", 0)                           # LMSW never clears PE
    cr0_f = g.store("%cr0")
    g.try_("p_cr0", CR0)
    # Architecturally invalid values: #GP(0), and VTL1 is never asked.
    pg_no_pe = g.try_("p_cr0", CR0 & ~rc.CR0_PE)
    hi = g.try_("p_cr0", CR0 | 1 << 32)
    rsvd4 = g.try_("p_cr4", CR4 | PGE | PCE | 1 << 15)
    no_pae = g.try_("p_cr4", (CR4 | PGE | PCE) & ~rc.CR4_PAE)
    smxe = g.try_("p_cr4", CR4 | PGE | PCE | rc.CR4_SMXE)
    # Verdicts other than #GP: #UD, #PF with VTL1's CR2 (a malformed verdict stops the
    # partition: tests/test_hostile_vtl1.py).
    ud = g.try_("p_cr4", CR4 | PGE, policy=DENY_UD)
    pf = g.try_("p_cr4", CR4 | PGE, policy=DENY_PF)
    cr4_d = g.store("%cr4")
    r = run_guest(tmp_path, g)
    _ok(r)
    p_cr4, p_cr0 = r.symbols["p_cr4"], r.symbols["p_cr0"]

    assert r.fault(pge) is None and r.value(cr4_a) == CR4 | PGE
    assert r.fault(pce_deny) == GP0 and r.results[pce_deny][2] == p_cr4 and r.value(cr4_b) == CR4 | PGE
    assert r.fault(pce_allow) is None and r.value(cr4_c) == CR4 | PGE | PCE
    assert r.fault(wp_deny) == GP0 and r.results[wp_deny][2] == p_cr0 and r.value(cr0_a) == CR0
    assert r.fault(wp_allow) is None and r.value(cr0_b) == CR0 & ~WP
    assert r.fault(ts) is None and r.value(cr0_c) == CR0 | TS
    assert r.fault(clts) is None and r.value(cr0_d) == CR0
    assert r.fault(lmsw) is None and r.value(cr0_e) == CR0 | TS
    assert r.fault(lmsw0) is None and r.value(cr0_f) == (CR0 & ~0xF) | rc.CR0_PE
    for s in (pg_no_pe, hi, rsvd4, no_pae, smxe):
        assert r.fault(s) == GP0, s
    assert r.fault(ud) == UD
    assert r.fault(pf) == (14, 2) and r.results[pf][3] == 0x1234
    assert r.value(cr4_d) == CR4 | PGE | PCE
    assert r.sregs.cr4 == CR4 | PGE | PCE and r.sregs.cr0 == CR0           # read back from KVM

    # VTL1 was asked exactly about the judged changes, with the whole story in the message.
    judged = [(int(m.reg), int(m.old_value), int(m.new_value)) for m in r.log]
    assert judged == (
        [(ABI.VTL_REG_CR4, CR4 | PGE, CR4 | PGE | PCE)] * 2               # denied, allowed
        + [(ABI.VTL_REG_CR0, CR0, CR0 & ~WP)] * 2                         # denied, allowed
        + [(ABI.VTL_REG_CR0, CR0 & ~WP, CR0)]                             # WP back on
        + [(ABI.VTL_REG_CR4, CR4 | PGE | PCE, CR4 | PGE)] * 2)            # #UD, #PF
    m = r.log[1]
    assert m.type == ABI.VTL_INTERCEPT_REGISTER and m.access == ABI.VTL_ACCESS_WRITE
    assert m.rip == p_cr4 and m.insn_len == 3 and bytes(m.insn_bytes[0:4]) == bytes.fromhex("0f22e700")
    assert m.gprs[7] == CR4 | PGE | PCE and m.gprs[12] == ALLOW and m.cr4 == CR4 | PGE and m.cr0 == CR0
    assert r.run.result.register_intercepts == 7

    icpt = [e for e in r.events("intercept") if e.type == "register"]
    assert [(e.reg, e.old, e.new, e.rip, e.insn_len) for e in icpt][:2] == [
        ("cr4", CR4 | PGE, CR4 | PGE | PCE, p_cr4, 3)] * 2
    verdicts = [e.verdict for e in r.events("verdict")]
    assert verdicts == ["inject_fault", "allow", "inject_fault", "allow", "allow", "inject_fault",
                        "inject_fault"]
    direct = [(e.reg, e.new) for e in r.events("register_write") if e.how == "direct"]
    assert ("cr4", CR4 | PGE) in direct and ("cr0", CR0 | TS) in direct and ("cr0_low", CR0) in direct
    refused = [e.reason for e in r.events("refused")]
    assert any("PG set without CR0.PE" in x for x in refused) and any("PAE" in x for x in refused)
    # The `ret` after each of the 9 writes that completed ran as a single step.
    assert r.run.result.single_steps == 9
    assert r.run.result.exits["single_step"] == r.run.result.single_steps


def test_cr2_cr3_cr8_and_instructions_that_do_not_exist(tmp_path: Path) -> None:
    g = Guest()
    _setup(g, flags=ICTL | ABI.VTL_ICTL_CR3)
    cr2 = g.try_("p_cr2", 0xDEAD000)
    cr2_v = g.store("%cr2")
    cr8 = g.try_("p_cr8", 5)
    cr8_v = g.store("%cr8")
    cr8_bad = g.try_("p_cr8", 16)
    cr3 = g.store("%cr3")
    g.asm("        mov %cr3, %rax; mov %rax, %r13")
    s3 = g.slot()
    g.asm(f"""
        movq $-1, last_vector(%rip); mov %rsp, recover_rsp(%rip)
        lea 7f(%rip), %rax; mov %rax, recover_rip(%rip)
        mov %r13, %rdi; mov $1, %r12; call p_cr3      # same CR3, VTL1 denies
7:      mov last_vector(%rip), %rax; mov %rax, results+{32 * s3}(%rip)""")
    cr3_hi = g.try_("p_cr3", 1 << 50)                     # above MAXPHYADDR: #GP, VTL1 not asked
    lock = g.try_("p_lock", CR0)
    cr5 = g.try_("p_cr5", 0)
    long = g.try_("p_long", CR0)
    r = run_guest(tmp_path, g)
    _ok(r)
    assert r.fault(cr2) is None and r.value(cr2_v) == 0xDEAD000
    assert r.fault(cr8) is None and r.value(cr8_v) == 5 and r.sregs.cr8 == 5
    assert r.fault(cr8_bad) == GP0
    assert r.value(s3) == 13
    assert r.fault(cr3_hi) == GP0
    assert r.fault(lock) == UD and r.fault(cr5) == UD and r.fault(long) == GP0
    assert [int(m.reg) for m in r.log] == [ABI.VTL_REG_CR3]
    assert r.log[0].old_value == r.value(cr3) == r.log[0].new_value


def test_stop_verdict_ends_the_run(tmp_path: Path) -> None:
    g = Guest()
    _setup(g)
    g.try_("p_cr0", CR0 & ~WP, policy=STOP)
    r = run_guest(tmp_path, g)
    assert r.run.result.reason == "stopped_by_vtl1" and r.run.result.status == 4
    assert "cr0 register intercept" in r.run.result.message
    assert r.sregs.cr0 == CR0


def test_writes_vtl1_does_not_judge_are_applied_without_asking(tmp_path: Path) -> None:
    """No flags: nothing is judged, but the section is still decoded and checked."""
    g = Guest()
    _setup(g, flags=0, cr0_mask=0, cr4_mask=0)
    wp = g.try_("p_cr0", CR0 & ~WP, policy=DENY_GP)
    bad = g.try_("p_cr0", CR0 & ~rc.CR0_PE)
    g.try_("p_cr0", CR0)
    r = run_guest(tmp_path, g)
    _ok(r)
    assert r.fault(wp) is None and r.fault(bad) == GP0 and not r.log
    assert [e.how for e in r.events("register_write")] == ["direct", "direct"]


def test_descriptor_tables(tmp_path: Path) -> None:
    g = Guest()
    _setup(g, flags=ABI.VTL_ICTL_GDTR | ABI.VTL_ICTL_IDTR | ABI.VTL_ICTL_LDTR | ABI.VTL_ICTL_TR,
           cr0_mask=0, cr4_mask=0)
    gdt_deny = g.try_("p_lgdt", GDTR_NEW, policy=DENY_GP)
    gdt = g.try_("p_lgdt", GDTR_NEW)
    gdt_bad = g.try_("p_lgdt", GDTR_BAD)                          # non-canonical base: #GP, not asked
    g.protect(NRDATA, NR_ALL)
    gdt_nr = g.try_("p_lgdt", NRDATA)                             # operand VTL0 may not read
    gdt_vtl1 = g.try_("p_lgdt", ABI.VTL1_BASE)                    # operand in VTL1's memory
    gdt_unmapped = g.try_("p_lgdt", 0x8000_0000)                  # beyond VTL0's page tables: #PF
    gdt_noncanon = g.try_("p_lgdt", 0x8000_0000_0000_0000)        # non-canonical operand: #GP
    idt = g.try_("p_lidt", IDTR)                                  # the same IDT, through VTL1
    ldt = g.try_("p_lldt", SEL_LDT)
    ldt_m = g.try_("p_lldt_m", SEL_LDT_PTR)                        # the selector from memory
    ldt_tss = g.try_("p_lldt", SEL_TSS)                           # a TSS is not an LDT: #GP(sel)
    ldt_ti = g.try_("p_lldt", SEL_LDT | 4)                        # TI=1: #GP(sel)
    ldt_null = g.try_("p_lldt", 0)                                # null: LDTR unusable, no fault
    ldt_far = g.try_("p_lldt", (GDT_ENTRIES + 1) * 8)             # beyond the limit: #GP(sel)
    tr = g.try_("p_ltr", SEL_TSS)
    tr_busy = g.try_("p_ltr", SEL_TSS)                            # now busy: #GP(sel)
    tr_np = g.try_("p_ltr", SEL_TSS_NP)                           # not present: #NP(sel)
    tr_null = g.try_("p_ltr", 0)                                  # #GP(0)
    tr_data = g.try_("p_ltr", SEL_DATA)                           # a code/data descriptor: #GP(sel)
    tr_deny = g.try_("p_ltr", SEL_TSS2, policy=DENY_GP)
    r = run_guest(tmp_path, g)
    _ok(r)
    assert r.fault(gdt_deny) == GP0 and r.fault(gdt) is None
    assert r.sregs.gdt.base == GDT and r.sregs.gdt.limit == GDT_ENTRIES * 8 - 1
    assert r.fault(gdt_bad) == GP0 and r.fault(gdt_nr) == GP0 and r.fault(gdt_vtl1) == GP0
    assert r.fault(gdt_unmapped) == (14, 0) and r.results[gdt_unmapped][3] == 0x8000_0000
    assert r.fault(gdt_noncanon) == GP0
    assert r.fault(idt) is None and r.sregs.idt.base == IDT and r.sregs.idt.limit == 511
    assert r.fault(ldt) is None and r.fault(ldt_m) is None
    assert r.fault(ldt_tss) == (13, SEL_TSS) and r.fault(ldt_ti) == (13, SEL_LDT | 4)
    assert r.fault(ldt_null) is None and r.fault(ldt_far) == (13, (GDT_ENTRIES + 1) * 8)
    assert r.sregs.ldt.unusable == 1
    assert r.fault(tr) is None and r.fault(tr_busy) == (13, SEL_TSS)
    assert r.fault(tr_np) == (11, SEL_TSS_NP) and r.fault(tr_null) == GP0
    assert r.fault(tr_data) == (13, SEL_DATA) and r.fault(tr_deny) == GP0
    assert r.sregs.tr.selector == SEL_TSS and r.sregs.tr.base == TSS and r.sregs.tr.type == 11
    assert r.sregs.tr.limit == 0x67 and r.sregs.tr.present == 1
    # LTR marked the descriptor busy in VTL0's GDT (type 9 -> 11); TSS2 stayed available.
    assert (int.from_bytes(r.gdt[SEL_TSS:SEL_TSS + 8], "little") >> 40) & 0xF == 0xB
    assert (int.from_bytes(r.gdt[SEL_TSS2:SEL_TSS2 + 8], "little") >> 40) & 0xF == 0x9
    regs = [(int(m.reg), int(m.old_value), int(m.new_value), int(m.new_limit)) for m in r.log]
    assert regs[0][0] == ABI.VTL_REG_GDTR and regs[0][2] == GDT and regs[0][3] == GDT_ENTRIES * 8 - 1
    assert regs[0][1] == 0x9000 and r.log[0].old_limit == 23          # the boot GDT
    assert (ABI.VTL_REG_IDTR, IDT, IDT, 511) in regs
    # LDTR/TR: the selector, and what its descriptor loads (base, limit) as the VMM read it.
    assert (ABI.VTL_REG_LDTR, 0, SEL_LDT, 0xF) in regs and (ABI.VTL_REG_TR, 0, SEL_TSS, 0x67) in regs
    assert (ABI.VTL_REG_LDTR, SEL_LDT, SEL_LDT, 0xF) in regs              # LLDT from memory
    assert (ABI.VTL_REG_LDTR, SEL_LDT, 0, 0) in regs                      # null
    bases = {(int(m.reg), int(m.new_value)): int(m.new_base) for m in r.log}
    assert bases[(ABI.VTL_REG_LDTR, SEL_LDT)] == LDT and bases[(ABI.VTL_REG_TR, SEL_TSS)] == TSS
    assert bases[(ABI.VTL_REG_LDTR, 0)] == 0
    refused = " ".join(e.reason for e in r.events("refused"))
    assert "VTL1 memory" in refused and "no-access" in refused


def test_ltr_busy_bit_in_a_gdt_vtl0_may_not_write(tmp_path: Path) -> None:
    """Setting the busy bit is a write VTL0 could not make on an NW GDT page: refused
    unless VTL1 judged and allowed this LTR."""
    g = Guest()
    _setup(g, flags=0, cr0_mask=0, cr4_mask=0)
    g.try_("p_lgdt", GDTR_NEW)
    g.protect(GDT, 2)                                              # NW
    tr = g.try_("p_ltr", SEL_TSS)
    g.control(ABI.VTL_ICTL_TR)
    tr2 = g.try_("p_ltr", SEL_TSS2)
    r = run_guest(tmp_path, g)
    assert r.run.result.reason == "guest_exit"
    assert r.fault(tr) == GP0 and r.fault(tr2) is None
    assert r.sregs.tr.selector == SEL_TSS2
    assert (int.from_bytes(r.gdt[SEL_TSS:SEL_TSS + 8], "little") >> 40) & 0xF == 0x9
    assert (int.from_bytes(r.gdt[SEL_TSS2:SEL_TSS2 + 8], "little") >> 40) & 0xF == 0xB


def test_xsetbv(tmp_path: Path) -> None:
    g = Guest()
    _setup(g, flags=ABI.VTL_ICTL_XCR0, cr0_mask=0, cr4_mask=0)
    ud = g.try_("p_xsetbv", 0, 3)                                   # CR4.OSXSAVE clear: #UD
    # CR4.OSXSAVE set outside the section (it runs natively: nothing scans this test's
    # VTL0; the supported CPUID lacks XSAVE here, so the VMM itself would refuse the bit).
    g.asm("        mov %cr4, %rax; bts $18, %rax; mov %rax, %cr4")
    deny = g.try_("p_xsetbv", 0, 3, policy=DENY_GP)
    ok = g.try_("p_xsetbv", 0, 3)
    avx_no_sse = g.try_("p_xsetbv", 0, 5)
    no_x87 = g.try_("p_xsetbv", 0, 2)
    xcr1 = g.try_("p_xsetbv", 1, 1)
    unsupported = g.try_("p_xsetbv", 0, 3 | 1 << 9)
    r = run_guest(tmp_path, g)
    assert r.run.result.reason == "guest_exit", r.run.result
    assert r.fault(ud) == UD and r.fault(deny) == GP0 and r.fault(ok) is None
    for s in (avx_no_sse, no_x87, xcr1, unsupported):
        assert r.fault(s) == GP0, s
    assert r.xcrs[0] == 3
    assert [(int(m.reg), int(m.old_value), int(m.new_value)) for m in r.log] == [
        (ABI.VTL_REG_XCR0, 1, 3)] * 2


def test_a_value_kvm_refuses_is_gp_in_vtl0(tmp_path: Path) -> None:
    """A CPUID that claims VMX lets CR4.VMXE pass the VMM's own checks; KVM refuses it
    (KVM_SET_SREGS EINVAL): #GP(0) in VTL0, never a VMM error."""
    g = Guest()
    _setup(g, cr4_mask=rc.CR4_VMXE)
    direct = g.try_("p_cr4", CR4 | rc.CR4_PGE | rc.CR4_VMXE, policy=DENY_GP)     # judged: denied
    allowed = g.try_("p_cr4", CR4 | rc.CR4_VMXE, policy=ALLOW)                   # allowed, KVM refuses
    g.control(0)
    unjudged = g.try_("p_cr4", CR4 | rc.CR4_VMXE)                                  # direct, KVM refuses
    cr4 = g.store("%cr4")
    features = rc.CpuFeatures(cr4_allowed=rc.CR4_ALWAYS | rc.CR4_VMXE, maxphyaddr=48, xcr0_supported=3)
    r = run_guest(tmp_path, g, features=features)
    _ok(r)
    assert r.fault(direct) == GP0 and r.fault(allowed) == GP0 and r.fault(unjudged) == GP0
    assert r.value(cr4) == CR4 and r.sregs.cr4 == CR4
    allow = [e for e in r.events("verdict") if e.verdict == "allow"]
    assert allow and "KVM refused" in allow[0].detail


@pytest.mark.parametrize("backend", ["host_mapping", "memslot"])
def test_single_steps_and_fetches(tmp_path: Path, backend: str) -> None:
    g = Guest()
    _setup(g)
    nops = g.try_("p_nops")
    ud2 = g.try_("p_ud2")                                         # stepped; the CPU raises #UD
    out = g.try_("p_out")                                         # port I/O during a step
    straddle = g.try_("straddle", CR4 | PGE)                      # mov %rdi,%cr4 across the section's end
    cr4 = g.store("%cr4")
    jmp = g.try_("p_jmp_tail")                                    # a stepped jump out of the section
    # An IDT gate into the section: a step that faults would run the handler's first
    # instruction unjudged, so the step is refused (#GP(0) through the normal gate 13).
    g.asm("        lea idt+16*6(%rip), %rdi; lea p_cr0(%rip), %rax; call write_gate")
    conflict = g.try_("p_ud2")
    g.asm("        call setup_idt")
    # The page after the section made NR: the instruction straddling into it is an
    # execute intercept on that page (VTL1 denies: #GP).
    g.protect(TAIL, NR_ALL)
    into_nr = g.try_("straddle", CR4, policy=DENY_GP)
    r = run_guest(tmp_path, g, backend=backend)  # type: ignore[arg-type]
    _ok(r)
    assert r.run.result.backend == backend
    assert r.fault(nops) is None
    assert r.fault(ud2) == UD and r.results[ud2][2] == r.symbols["p_ud2"]
    assert r.fault(out) is None and any(line.endswith("B") for line in r.run.console)
    assert r.fault(straddle) is None and r.value(cr4) == CR4 | PGE
    assert r.fault(jmp) is None
    assert r.fault(conflict) == GP0 and r.results[conflict][2] == r.symbols["p_ud2"]
    assert any("IDT vector 6" in e.reason for e in r.events("refused"))
    assert r.fault(into_nr) == GP0
    mem = [e for e in r.events("intercept") if e.type == "memory"]
    assert [(e.access, e.gpa, e.gva, e.rip) for e in mem] == [("execute", TAIL, TAIL, r.symbols["straddle"])]
    steps = r.events("single_step")
    assert len(steps) == r.run.result.single_steps
    assert [s.rip for s in steps[:4]] == [r.symbols["p_nops"] + i for i in range(4)]
    assert any(s.exit == "io_out" for s in steps)
    # The section is NR again after every step: the map the backend applies is VTL1's.
    assert (PRIV, TAIL + 0x1000, NR_ALL) in r.run.memslot_runs          # section and tail page
    assert r.run.attr_map[TAIL // 4096] == NR_ALL
    assert r.run.attr_map[PRIV // 4096] == NR_ALL


def test_control_hypercall_validation(tmp_path: Path) -> None:
    g = Guest()
    bad = [g.control(0x100),                                       # unknown flag
           g.control(ICTL, reserved0=1),
           g.control(ICTL, cr0_mask=1 << 7),                       # undefined CR0 bit
           g.control(ABI.VTL_ICTL_CR4, cr0_mask=WP),               # a mask without its flag
           g.control(ICTL, gpa=PRIV + 8),
           g.control(ICTL, gpa=0xFFFF_0000, pages=1),
           g.control(ICTL, gpa=ABI.VTL1_BASE - 0x1000, pages=2),
           g.control(ICTL, gpa=PRIV, pages=0),
           g.vtl_call(CALL_CONTROL_AT, PRIV)]                      # the struct in VTL0 memory
    direct = g.hypercall(ABI.VTL_HC_SET_INTERCEPT_CONTROL, 0)      # from VTL0
    ok = g.control(ICTL, WP, PCE)
    g.protect(PRIV, NR_ALL)
    judged = g.try_("p_cr0", CR0 & ~WP, policy=DENY_GP)
    again = g.control(0)                                           # replaces: nothing judged now
    unjudged = g.try_("p_cr0", CR0 & ~WP, policy=DENY_GP)
    none = g.control(0, gpa=0, pages=0)                            # no section at all
    r = run_guest(tmp_path, g)
    assert r.run.result.reason == "guest_exit", r.run.result
    statuses = [r.value(s) for s in bad]
    assert statuses == [ABI.VTL_E_INVALID_ARG] * 4 + [ABI.VTL_E_MISALIGNED, ABI.VTL_E_OUT_OF_RANGE,
                                                      ABI.VTL_E_OVERLAPS_VTL1, ABI.VTL_E_INVALID_ARG,
                                                      ABI.VTL_E_INVALID_ARG]
    assert r.value(direct) == ABI.VTL_E_ACCESS_DENIED
    assert r.value(ok) == r.value(again) == r.value(none) == ABI.VTL_OK
    assert r.fault(judged) == GP0 and r.fault(unjudged) is None
    # VTL1 changed its own copy after each call (flags 0xFF, priv_gpa 0x7000): no effect.
    sets = r.events("intercept_control")
    assert [(e.flags, e.priv_gpa, e.priv_pages) for e in sets] == [(ICTL, PRIV, 1), (0, PRIV, 1), (0, 0, 0)]
    assert r.control is not None and r.control.flags == 0 and r.control.priv_pages == 0


def test_get_vp_register_reads_the_new_registers(tmp_path: Path) -> None:
    """VTL_HC_GET_VP_REGISTER for XCR0, GDTR, IDTR, LDTR, TR (the base or selector)."""
    g = Guest()
    _setup(g, flags=0, cr0_mask=0, cr4_mask=0)
    g.try_("p_lgdt", GDTR_NEW)
    g.try_("p_lldt", SEL_LDT)
    g.try_("p_ltr", SEL_TSS)
    got = {reg: g.vtl_call(CALL_GET_REGISTER, reg) for reg in (
        ABI.VTL_REG_CR0, ABI.VTL_REG_XCR0, ABI.VTL_REG_GDTR, ABI.VTL_REG_IDTR, ABI.VTL_REG_LDTR,
        ABI.VTL_REG_TR, ABI.VTL_REG_CR0_LOW, 99)}
    r = run_guest(tmp_path, g)
    _ok(r)
    value = {reg: r.results[s][:2] for reg, s in got.items()}
    assert value[ABI.VTL_REG_CR0] == (ABI.VTL_OK, CR0)
    assert value[ABI.VTL_REG_XCR0] == (ABI.VTL_OK, 1)
    assert value[ABI.VTL_REG_GDTR] == (ABI.VTL_OK, GDT)
    assert value[ABI.VTL_REG_IDTR] == (ABI.VTL_OK, IDT)
    assert value[ABI.VTL_REG_LDTR] == (ABI.VTL_OK, SEL_LDT)
    assert value[ABI.VTL_REG_TR] == (ABI.VTL_OK, SEL_TSS)
    assert value[ABI.VTL_REG_CR0_LOW][0] == value[99][0] == ABI.VTL_E_INVALID_ARG
    assert r.sregs.ldt.base == LDT and r.sregs.ldt.limit == 0xF and r.sregs.ldt.type == 2


def test_wrmsr_without_vtl1_refused_by_kvm_is_gp(tmp_path: Path) -> None:
    """--no-vtl1: the MSR filter still exits; the VMM applies the write itself, and a value
    KVM refuses (non-canonical LSTAR) is #GP(0) in the guest, never a VMM error."""
    lstar = 0xC0000082
    g = Guest()
    bad = g.try_("t_wrmsr", lstar, 0x8000_0000_0000_0000)
    good = g.try_("t_wrmsr", lstar, 0xFFFF_FFFF_8123_4000)
    now = g.call_store("t_rdmsr", lstar)
    r = run_guest(tmp_path, g, vtl1=False)
    assert r.run.result.reason == "guest_exit" and r.run.result.status == 0
    assert r.fault(bad) == GP0 and r.fault(good) is None and r.value(now) == 0xFFFF_FFFF_8123_4000
    assert not r.run.result.vtl1_enabled
