"""Test-only guests for the register-intercept path, assembled and linked by the tests with
the machine's binutils (the built-in guests do not have a privileged section yet).

VTL0 (linked at 0x200000) has its privileged section in one page at PRIV, a GDT with
TSS and LDT descriptors at fixed addresses, an IDT whose handlers record the fault
(vector, error code, RIP, CR2) and resume at a recovery point, and a body the test
writes with the helpers below: `try_(...)` calls a privileged-section function with
arguments and VTL1's policy in R12 and records what happened in a result slot.

VTL1 (linked at VTL1_BASE + 1 MiB) serves three VTL calls (0x40: set the intercept
control from RSI/R11/RDX/R8/R9/R10, 0x41: protect R8 pages at RSI with attributes RDX,
0x42: the control hypercall with a GPA of VTL0's choosing, 0x43: VTL_HC_GET_VP_REGISTER
of register RSI, the value in RCX), logs every intercept message
it gets and answers with the policy VTL0 put in R12: 0 allow, 1 #GP(0), 2 stop, 3 #UD,
4 a malformed verdict, 5 #PF(W) with CR2 0x1234.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.vtlrun import Run
from vmm.elf import read_image
from vtl.abi import ABI, abi_ffi
from vtl.core.config import Backend, PartitionConfig
from vtl.core.events import EventLog
from vtl.core.partition import Partition
from vtl.core.vtl import Vtl
from vtl.run import control
from vtl.services.console import Console

HAVE_BINUTILS = all(shutil.which(t) for t in ("as", "ld"))

# VTL1's handler of the test call that protects R8 pages at RSI with attributes RDX
# (VTL_HC_MODIFY_VTL_PROTECTION, 0x102, on a one-entry page list); shared by the test VTL1s.
VTL1_DO_PROTECT = """do_protect:
        lea prot_list(%rip), %rdi
        mov %rsi, (%rdi)
        mov %r8, 8(%rdi)
        lea prot_req(%rip), %rdi
        movl $0, (%rdi)
        mov %edx, 4(%rdi)
        movl $1, 8(%rdi)
        movl $1, 12(%rdi)
        movq $0, 16(%rdi)
        lea prot_list(%rip), %rax
        mov %rax, 24(%rdi)
        mov $0x102, %eax
        out %al, $0xF3
        mov %rax, 8(%rbx)
        jmp back
"""

PRIV = 0x202000             # the privileged section (one page)
TAIL = 0x203000             # code after it (crossing tests)
TABLES = 0x205000           # GDT, TSSs, LDT, pseudo-descriptors
GDT, TSS, TSS2, LDT = TABLES, TABLES + 0x100, TABLES + 0x200, TABLES + 0x300
GDTR_NEW, GDTR_BAD, IDTR = TABLES + 0x400, TABLES + 0x410, TABLES + 0x420
SEL_LDT_PTR, MSW_PTR = TABLES + 0x440, TABLES + 0x448
IDT = 0x206000
NRDATA = 0x207000           # a data page the tests make NR
SEL_TSS, SEL_LDT, SEL_TSS_NP, SEL_TSS2, SEL_DATA = 0x18, 0x28, 0x38, 0x48, 0x10
GDT_ENTRIES = 11

ALLOW, DENY_GP, STOP, DENY_UD, MALFORMED, DENY_PF = range(6)
CALL_CONTROL, CALL_PROTECT, CALL_CONTROL_AT, CALL_GET_REGISTER = 0x40, 0x41, 0x42, 0x43
NO_FAULT = (1 << 64) - 1

ICPT = abi_ffi.offsetof("struct vtl_control", "intercept")
ISIZE = abi_ffi.sizeof("struct vtl_intercept")


def _off(name: str) -> int:
    return abi_ffi.offsetof("struct vtl_intercept", name)


def system_desc(base: int, limit: int, typ: int, present: bool = True) -> tuple[int, int]:
    lo = ((limit & 0xFFFF) | (base & 0xFFFFFF) << 16 | typ << 40 | (1 << 47 if present else 0)
          | ((limit >> 16) & 0xF) << 48 | ((base >> 24) & 0xFF) << 56)
    return lo, base >> 32


def gdt_quads() -> list[int]:
    q = [0, 0x00AF9B000000FFFF, 0x00CF93000000FFFF]
    q += system_desc(TSS, 0x67, 0x9)                   # 0x18 available TSS
    q += system_desc(LDT, 0xF, 0x2)                    # 0x28 LDT
    q += system_desc(TSS2, 0x67, 0x9, present=False)   # 0x38 not present
    q += system_desc(TSS2, 0x67, 0x9)                  # 0x48 available TSS
    assert len(q) == GDT_ENTRIES
    return q


# The privileged section: one function per instruction form.
PRIV_FUNCS = """
p_cr0:    mov %rdi, %cr0; ret
p_cr2:    mov %rdi, %cr2; ret
p_cr3:    mov %rdi, %cr3; ret
p_cr4:    mov %rdi, %cr4; ret
p_cr8:    mov %rdi, %cr8; ret
p_lgdt:   lgdt (%rdi); ret
p_lidt:   lidt (%rdi); ret
p_lgdt_fs: lgdt %fs:8(%rdi); ret
p_lldt:   lldt %di; ret
p_lldt_m: lldt (%rdi); ret
p_ltr:    ltr %di; ret
p_lmsw:   lmsw %di; ret
p_lmsw_m: lmsw (%rdi); ret
p_clts:   clts; ret
p_xsetbv: mov %edi, %ecx; mov %esi, %eax; mov %rsi, %rdx; shr $32, %rdx; xsetbv; ret
p_nops:   nop; nop; nop; ret
p_ud2:    ud2
p_out:    mov $0x42, %al; out %al, $0xE9; mov $0x0a, %al; out %al, $0xE9; ret
p_lock:   .byte 0xf0, 0x0f, 0x22, 0xc7; ret
p_cr5:    .byte 0x0f, 0x22, 0xef; ret
p_long:   .fill 13, 1, 0x66; .byte 0x0f, 0x22, 0xc7; ret
p_jmp_tail: jmp tail_ret
p_load:   mov (%rdi), %rax; ret
p_movsb:  rep movsb; ret
p_int3:   int3; ret
p_int1:   .byte 0xf1; ret
p_int80:  int $0x80; ret
p_into:   .byte 0xce; ret
p_syscall: syscall; ret
p_sysenter: sysenter; ret
"""


@dataclass
class Guest:
    """A VTL0 body under construction: slots of 4 u64 (vector, error code, RIP, CR2 of
    the fault, or NO_FAULT) and values written with `store`."""
    lines: list[str] = field(default_factory=list)
    slots: int = 0
    _label: int = 0

    def slot(self) -> int:
        self.slots += 1
        return self.slots - 1

    def asm(self, text: str) -> Guest:
        self.lines.append(text)
        return self

    def try_(self, fn: str, rdi: int = 0, rsi: int = 0, policy: int = ALLOW) -> int:
        s = self.slot()
        self._label += 1
        lbl = f"after_{self._label}"
        self.lines.append(f"""
        movq $-1, last_vector(%rip); movq $0, last_error(%rip)
        movq $0, last_rip(%rip); movq $0, last_cr2(%rip)
        mov %rsp, recover_rsp(%rip)
        lea {lbl}(%rip), %rax; mov %rax, recover_rip(%rip)
        movabs ${rdi:#x}, %rdi
        movabs ${rsi:#x}, %rsi
        movabs ${policy:#x}, %r12
        call {fn}
{lbl}:  lea results+{32 * s}(%rip), %rdi
        mov last_vector(%rip), %rax; mov %rax, (%rdi)
        mov last_error(%rip), %rax; mov %rax, 8(%rdi)
        mov last_rip(%rip), %rax; mov %rax, 16(%rdi)
        mov last_cr2(%rip), %rax; mov %rax, 24(%rdi)""")
        return s

    def vtl_call(self, code: int, rsi: int = 0, rdx: int = 0, r8: int = 0, r9: int = 0, r10: int = 0,
                 r11: int = 0) -> int:
        """A VTL call to the test VTL1; the slot's first value is RAX (the status)."""
        s = self.slot()
        self.lines.append(f"""
        mov ${code:#x}, %eax
        movabs ${rsi:#x}, %rsi; movabs ${rdx:#x}, %rdx; movabs ${r8:#x}, %r8
        movabs ${r9:#x}, %r9; movabs ${r10:#x}, %r10; movabs ${r11:#x}, %r11
        out %al, $0xF0
        mov %rax, results+{32 * s}(%rip)
        mov %rcx, results+{32 * s + 8}(%rip)""")
        return s

    def control(self, flags: int, cr0_mask: int = 0, cr4_mask: int = 0, gpa: int = PRIV, pages: int = 1,
                reserved0: int = 0) -> int:
        return self.vtl_call(CALL_CONTROL, flags, cr0_mask, cr4_mask, gpa, pages, reserved0)

    def protect(self, gpa: int, attrs: int, pages: int = 1) -> int:
        return self.vtl_call(CALL_PROTECT, gpa, attrs, pages)

    def store(self, what: str) -> int:
        """results[slot] = the value of `what` (an AT&T source operand, e.g. %cr4)."""
        s = self.slot()
        self.lines.append(f"        mov {what}, %rax; mov %rax, results+{32 * s}(%rip)")
        return s

    def call_store(self, fn: str, rdi: int = 0, rsi: int = 0) -> int:
        """results[slot] = RAX after `call fn` (no fault expected)."""
        s = self.slot()
        self.lines.append(f"""
        movabs ${rdi:#x}, %rdi; movabs ${rsi:#x}, %rsi
        call {fn}
        mov %rax, results+{32 * s}(%rip)""")
        return s

    def hypercall(self, code: int, rdi: int = 0) -> int:
        s = self.slot()
        self.lines.append(f"""
        mov ${code:#x}, %eax; movabs ${rdi:#x}, %rdi
        out %al, $0xF3
        mov %rax, results+{32 * s}(%rip)""")
        return s


def vtl0_source(body: str) -> str:
    gdt = "\n".join(f"        .quad {q:#x}" for q in gdt_quads())
    return f"""
        .code64
        .section .text.entry, "ax"
        .globl _start
_start:
        lea stack_top(%rip), %rsp
        call setup_idt
        lidt idtr(%rip)
        mov $1, %eax
        out %al, $0xF3                  # VTL_HC_ENABLE_VTL1
        mov %rax, enable_status(%rip)
{body}
        xor %eax, %eax
        out %eax, $0xF4
1:      hlt
        jmp 1b

setup_idt:
        lea idt(%rip), %rdi
        lea isr_table(%rip), %rsi
        xor %ecx, %ecx
2:      mov (%rsi,%rcx,8), %rax
        call write_gate
        add $16, %rdi
        inc %ecx
        cmp $32, %ecx
        jne 2b
        ret

t_wrmsr:                                # MSR RDI <- RSI, outside the privileged section
        mov %edi, %ecx; mov %esi, %eax; mov %rsi, %rdx; shr $32, %rdx
        wrmsr
        ret
t_rdmsr:
        mov %edi, %ecx
        rdmsr
        shl $32, %rdx; or %rdx, %rax
        ret

write_gate:                             # gate at RDI -> handler RAX
        mov %ax, (%rdi)
        movw $0x08, 2(%rdi)
        movw $0x8E00, 4(%rdi)
        shr $16, %rax
        mov %ax, 6(%rdi)
        shr $16, %rax
        mov %eax, 8(%rdi)
        movl $0, 12(%rdi)
        ret

        .irp v, 0,1,2,3,4,5,6,7,9,15,16,18,19,20,22,23,24,25,26,27,28,29,30,31
isr\\v:  movq $\\v, last_vector(%rip); movq $0, last_error(%rip); jmp fault_common
        .endr
        .irp v, 8,10,11,12,13,14,17,21
isr\\v:  movq $\\v, last_vector(%rip); popq last_error(%rip); jmp fault_common
        .endr
fault_common:
        mov (%rsp), %rax
        mov %rax, last_rip(%rip)
        mov %cr2, %rax
        mov %rax, last_cr2(%rip)
        mov recover_rsp(%rip), %rsp
        jmp *recover_rip(%rip)

        .section .priv, "ax"
        .fill 16, 1, 0xcc
{PRIV_FUNCS}
        .org 0xffe, 0xcc
straddle: .byte 0x0f, 0x22             # mov %rdi, %cr4, split across the section's end

        .section .tail, "ax"
        .byte 0xe7
        ret
tail_ret: ret

        .section .tables, "aw"
gdt:
{gdt}
        .org {TSS - TABLES}
tss:    .fill 0x68, 1, 0
        .org {TSS2 - TABLES}
tss2:   .fill 0x68, 1, 0
        .org {LDT - TABLES}
ldt:    .quad 0, 0x00CF93000000FFFF
        .org {GDTR_NEW - TABLES}
gdtr_new: .word {GDT_ENTRIES * 8 - 1}; .quad {GDT:#x}
        .org {GDTR_BAD - TABLES}
gdtr_bad: .word {GDT_ENTRIES * 8 - 1}; .quad 0x8000000000000000
        .org {IDTR - TABLES}
idtr:   .word 511; .quad {IDT:#x}
        .org {SEL_LDT_PTR - TABLES}
sel_ldt: .word {SEL_LDT}
        .org {MSW_PTR - TABLES}
msw:    .word 0x000b

        .section .idt, "aw"
idt:    .fill 4096, 1, 0

        .section .nrdata, "aw"
nr_gdtr: .word {GDT_ENTRIES * 8 - 1}; .quad {GDT:#x}
        .balign 4096

        .data
isr_table:
        .irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
        .quad isr\\v
        .endr
enable_status: .quad 0
last_vector: .quad 0
last_error: .quad 0
last_rip: .quad 0
last_cr2: .quad 0
recover_rip: .quad 0
recover_rsp: .quad 0
        .balign 64
results: .fill 256 * 4, 8, 0
        .balign 16
stack:  .fill 16384, 1, 0
stack_top:
"""


VTL0_LDS = f"""
ENTRY(_start)
SECTIONS {{
  . = 0x200000;
  .text : {{ *(.text.entry) *(.text) }}
  . = {PRIV:#x};
  .priv : {{ *(.priv) }}
  . = {TAIL:#x};
  .tail : {{ *(.tail) }}
  . = {TABLES:#x};
  .tables : {{ *(.tables) }}
  . = {IDT:#x};
  .idt : {{ *(.idt) }}
  . = {NRDATA:#x};
  .nrdata : {{ *(.nrdata) }}
  . = 0x208000;
  .data : {{ *(.data) }}
  /DISCARD/ : {{ *(.note*) *(.comment) }}
}}
"""


def vtl1_source() -> str:
    ctl = ABI.VTL1_BASE + ABI.VTL1_CONTROL_OFF
    v = ICPT
    return f"""
        .code64
        .section .text.entry, "ax"
        .globl _start
_start:
        xor %eax, %eax
        out %al, $0xF1                  # first VTL return: VTL1 is up
vtl1_loop:
        movabs ${ctl:#x}, %rbx
        mov (%rbx), %eax
        cmp $2, %eax
        je intercept
        mov 8(%rbx), %rax               # the call code
        cmp ${CALL_CONTROL}, %rax; je do_control
        cmp ${CALL_PROTECT}, %rax; je do_protect
        cmp ${CALL_CONTROL_AT}, %rax; je do_control_at
        cmp ${CALL_GET_REGISTER}, %rax; je do_get_register
        movq $1, 8(%rbx)
        jmp back
do_get_register:
        xor %edi, %edi
        mov $0x101, %eax
        out %al, $0xF3
        mov %rax, 8(%rbx)
        mov %rdx, 16(%rbx)
        jmp back
do_control:
        lea ctl_struct(%rip), %rdi
        mov %esi, (%rdi)
        mov %r11d, 4(%rdi)
        mov %rdx, 8(%rdi)
        mov %r8, 16(%rdi)
        mov %r9, 24(%rdi)
        mov %r10, 32(%rdi)
        mov $0x103, %eax
        out %al, $0xF3
        mov %rax, 8(%rbx)
        movl $0xFF, ctl_struct(%rip)    # VTL1's own copy changes afterwards: no effect
        movq $0x7000, ctl_struct+24(%rip)
        jmp back
do_control_at:
        mov %rsi, %rdi
        mov $0x103, %eax
        out %al, $0xF3
        mov %rax, 8(%rbx)
        jmp back
{VTL1_DO_PROTECT}intercept:
        lea {v}(%rbx), %rsi
        mov log_count(%rip), %rcx
        cmp $64, %rcx
        jae 1f
        imul ${ISIZE}, %rcx, %rdi
        lea log(%rip), %rax
        add %rax, %rdi
        mov ${ISIZE}, %ecx
        cld
        rep movsb
1:      incq log_count(%rip)
        movl $0, {v + _off("fault_has_error_code")}(%rbx)
        movl $0, {v + _off("fault_error_code")}(%rbx)
        mov {v + _off("gprs") + 12 * 8}(%rbx), %rax     # VTL0's R12: the policy
        cmp ${ALLOW}, %rax; jne 2f
        movl $2, {v + _off("verdict")}(%rbx)
        jmp back
2:      cmp ${STOP}, %rax; jne 3f
        movl $3, {v + _off("verdict")}(%rbx)
        jmp back
3:      movl $1, {v + _off("verdict")}(%rbx)
        cmp ${DENY_UD}, %rax; jne 4f
        movl $6, {v + _off("fault_vector")}(%rbx)
        jmp back
4:      cmp ${MALFORMED}, %rax; jne 5f
        movl $2, {v + _off("fault_vector")}(%rbx)
        jmp back
5:      cmp ${DENY_PF}, %rax; jne 6f
        movl $14, {v + _off("fault_vector")}(%rbx)
        movl $1, {v + _off("fault_has_error_code")}(%rbx)
        movl $2, {v + _off("fault_error_code")}(%rbx)
        movq $0x1234, {v + _off("fault_cr2")}(%rbx)
        jmp back
6:      movl $13, {v + _off("fault_vector")}(%rbx)      # DENY_GP and anything else
        movl $1, {v + _off("fault_has_error_code")}(%rbx)
back:
        out %al, $0xF1
        jmp vtl1_loop

        .data
ctl_struct: .fill 40, 1, 0
prot_req: .fill 32, 1, 0
prot_list: .fill 16, 1, 0
log_count: .quad 0
        .balign 16
log:    .fill {64 * ISIZE}, 1, 0
"""


VTL1_LDS = f"""
ENTRY(_start)
SECTIONS {{
  . = {ABI.VTL1_BASE + ABI.VTL1_IMAGE_MIN_OFF:#x};
  .text : {{ *(.text.entry) *(.text) }}
  . = ALIGN(4096);
  .data : {{ *(.data) }}
  /DISCARD/ : {{ *(.note*) *(.comment) }}
}}
"""


def link(src: str, lds: str, out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    s, o, ld = out.with_suffix(".s"), out.with_suffix(".o"), out.with_suffix(".ld")
    s.write_text(src)
    ld.write_text(lds)
    cp = subprocess.run(["as", "--64", "-o", str(o), str(s)], capture_output=True, text=True)
    assert cp.returncode == 0, cp.stderr
    cp = subprocess.run(["ld", "-static", "--build-id=none", "-z", "max-page-size=0x1000", "-T", str(ld),
                         "-o", str(out), str(o)], capture_output=True, text=True)
    assert cp.returncode == 0, cp.stderr
    return out


@dataclass
class GuestRun:
    run: Run
    results: list[tuple[int, int, int, int]]
    sregs: Any                     # VTL0's, from KVM_GET_SREGS after the run
    xcrs: dict[int, int]
    log: list[Any]                 # the intercept messages VTL1 received (struct vtl_intercept copies)
    symbols: dict[str, int]
    control: Any
    gdt: bytes                     # VTL0's GDT in memory after the run

    def fault(self, slot: int) -> tuple[int, int] | None:
        """(vector, error code) of the fault recorded in `slot`, None if none."""
        v, e, _, _ = self.results[slot]
        return None if v == NO_FAULT else (v, e)

    def value(self, slot: int) -> int:
        return self.results[slot][0]

    def events(self, kind: str) -> list[Any]:
        return self.run.events.of_kind(kind)


def run_guest(tmp: Path, guest: Guest, *, backend: Backend | None = None, vtl1: bool = True,
              timeout: float = 30.0, features: Any = None) -> GuestRun:
    vtl0 = link(vtl0_source("\n".join(guest.lines)), VTL0_LDS, tmp / "vtl0" / "v0.elf")
    vtl1_path = link(vtl1_source(), VTL1_LDS, tmp / "vtl1" / "v1.elf")
    cfg = PartitionConfig(vtl0_image=vtl0, vtl1_image=vtl1_path if vtl1 else None, attr_backend=backend)
    events = EventLog(trace=True, keep=100_000)
    console = Console(cfg.nr_vps, keep=1000)
    sym0, sym1 = read_image(vtl0).symbols(), read_image(vtl1_path).symbols()
    with Partition(cfg, events) as p:
        if features is not None:
            p.cpu_features = features
        result, sched = control.run(p, console, timeout)
        raw = p.mem.read(sym0["results"], 32 * max(1, guest.slots))
        results = [tuple(int.from_bytes(raw[32 * i + 8 * k:32 * i + 8 * k + 8], "little") for k in range(4))
                   for i in range(guest.slots)]
        v0 = p.vps[0].vcpus[Vtl.VTL0]
        assert v0 is not None
        sregs = v0.get_sregs()
        xcrs = v0.get_xcrs()
        log = []
        if vtl1 and p.vtl1_enabled:
            n = min(64, p.mem.read_u64(sym1["log_count"]))
            for i in range(n):
                buf = bytearray(p.mem.read(sym1["log"] + i * ISIZE, ISIZE))
                log.append(abi_ffi.from_buffer("struct vtl_intercept *", buf))
        gdt = p.mem.read(GDT, GDT_ENTRIES * 8)
        ctl = p.intercept_control
        run = Run(result, list(console.tail), list(sched.reports.records), events, p, {}, {},
                  bytes(p.vtl0_attrs), p.backend.runs())
    return GuestRun(run, results, sregs, xcrs, log, sym0, ctl, gdt)  # type: ignore[arg-type]
