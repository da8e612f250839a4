"""A hostile VTL1 for the verdict checks (issue 14, item 4): it answers every secure
intercept with the next record of a verdict list the test wrote into its image, copied
over the verdict fields of `struct vtl_intercept` (verdict, fault_vector,
fault_has_error_code, fault_error_code, fault_cr2: 24 contiguous bytes), and can scribble
over the fields that are not its answer (reg, reserved1, old/new values and limits).

VTL0 is the test VTL0 of tests/v9guest.py: it registers its privileged section and makes
the NR data page no-access through VTL1 (calls 0x40 and 0x41, served as the v9 VTL1
serves them), then runs a loop whose iteration i raises intercept kind KINDS[i % 5]: a
WRMSR to LSTAR, a read, a write and an instruction fetch of the NR page, a MOV to CR4
toggling PCE (judged).  Its IDT handlers recover from whatever fault VTL1 chose, so the
loop ends (exit status 0) unless the partition stops first.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.v9guest import (
    ICPT,
    NRDATA,
    PRIV,
    VTL0_LDS,
    VTL1_DO_PROTECT,
    VTL1_LDS,
    Guest,
    _off,
    link,
    vtl0_source,
)
from vmm import regcheck as rc
from vmm.elf import read_image
from vtl.abi import ABI
from vtl.core.config import PartitionConfig
from vtl.core.events import EventLog
from vtl.core.partition import Partition
from vtl.run import control
from vtl.run.result import RunResult
from vtl.services.console import Console

KINDS = ("msr", "read", "write", "execute", "register")
CR4_BOOT = 0x620
LSTAR = 0xC0000082


@dataclass(frozen=True)
class Verdict:
    verdict: int
    vector: int = 0
    has_ec: int = 0
    ec: int = 0
    cr2: int = 0

    def pack(self) -> bytes:
        return struct.pack("<IIIIQ", self.verdict & 0xFFFFFFFF, self.vector & 0xFFFFFFFF,
                           self.has_ec & 0xFFFFFFFF, self.ec & 0xFFFFFFFF, self.cr2 & (1 << 64) - 1)


def vtl1_source(verdicts: list[Verdict], scribble: bool) -> str:
    ctl = ABI.VTL1_BASE + ABI.VTL1_CONTROL_OFF
    v = ICPT
    table = "\n".join(f"        .byte {', '.join(str(b) for b in rec.pack())}" for rec in verdicts)
    scribble_asm = f"""
        movl $0xFFFFFFFF, {v + _off("reg")}(%rbx)
        movl $0xDEADBEEF, {v + _off("reserved1")}(%rbx)
        movq $-1, {v + _off("old_value")}(%rbx)
        movabs $0x8000000000000000, %rax
        mov %rax, {v + _off("new_value")}(%rbx)
        movl $0xFFFFFFFF, {v + _off("new_limit")}(%rbx)
        movl $0x12345678, {v + _off("insn_len")}(%rbx)""" if scribble else ""
    return f"""
        .code64
        .section .text.entry, "ax"
        .globl _start
_start:
        xor %eax, %eax
        out %al, $0xF1
vtl1_loop:
        movabs ${ctl:#x}, %rbx
        mov (%rbx), %eax
        cmp $2, %eax
        je intercept
        mov 8(%rbx), %rax
        cmp $0x40, %rax; je do_control
        cmp $0x41, %rax; je do_protect
        movq $1, 8(%rbx)
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
        jmp back
{VTL1_DO_PROTECT}intercept:
        mov answered(%rip), %rax
        incq answered(%rip)
        xor %edx, %edx
        mov ${len(verdicts)}, %rcx
        div %rcx                                # RDX = answered % len
        imul $24, %rdx, %rsi
        lea verdicts(%rip), %rax
        add %rax, %rsi
        lea {v + _off("verdict")}(%rbx), %rdi
        mov $24, %ecx
        cld
        rep movsb
{scribble_asm}
back:
        out %al, $0xF1
        jmp vtl1_loop

        .data
ctl_struct: .fill 40, 1, 0
prot_req: .fill 32, 1, 0
prot_list: .fill 16, 1, 0
answered: .quad 0
        .balign 8
verdicts:
{table}
"""


def vtl0_body(iterations: int, kinds: tuple[str, ...] = KINDS,
              msr: tuple[int, int] = (LSTAR, 0xFFFFFFFF81000000)) -> Guest:
    g = Guest()
    g.control(ABI.VTL_ICTL_CR4, 0, rc.CR4_PCE)            # slot 0
    g.protect(PRIV, 7)                                    # slot 1
    g.protect(NRDATA, 7)                                  # slot 2
    done = g.slot()                                       # slot 3: iterations completed
    g.asm(f"""
        mov ${iterations}, %r13
        xor %r14d, %r14d                # i
hostile_loop:
        mov %rsp, recover_rsp(%rip)
        lea hostile_next(%rip), %rax; mov %rax, recover_rip(%rip)
        mov %r14, %rax
        xor %edx, %edx
        mov ${len(kinds)}, %ecx
        div %rcx
        lea kind_table(%rip), %rax
        movzbl (%rax,%rdx), %edx
        cmp $0, %rdx; je k_msr
        cmp $1, %rdx; je k_read
        cmp $2, %rdx; je k_write
        cmp $3, %rdx; je k_exec
        mov $0x620, %edi                # CR4 toggling PCE: judged
        mov %cr4, %rax
        xor $0x100, %rax
        mov %rax, %rdi
        call p_cr4
        jmp hostile_next
k_msr:  mov ${msr[0]:#x}, %edi
        movabs ${msr[1]:#x}, %rsi
        call t_wrmsr
        jmp hostile_next
k_read: mov {NRDATA:#x}, %rax
        jmp hostile_next
k_write: movq $0x77, {NRDATA:#x}
        jmp hostile_next
k_exec: mov ${NRDATA:#x}, %eax
        call *%rax
hostile_next:
        inc %r14
        mov %r14, results+{32 * done}(%rip)
        dec %r13
        jnz hostile_loop
        jmp hostile_done
kind_table: .byte {", ".join(str(KINDS.index(k)) for k in kinds)}
hostile_done:""")
    return g


@dataclass
class HostileRun:
    result: RunResult
    intercepts: int              # secure intercepts the VMM delivered
    completed: int               # loop iterations VTL0 completed
    setup: tuple[int, int, int]  # statuses of the control and protect calls
    events: EventLog
    console: list[str]
    sregs: Any


def run_hostile(tmp: Path, verdicts: list[Verdict], iterations: int, *, scribble: bool = False,
                kinds: tuple[str, ...] = KINDS, msr: tuple[int, int] = (LSTAR, 0xFFFFFFFF81000000),
                timeout: float = 120.0) -> HostileRun:
    g = vtl0_body(iterations, kinds, msr)
    vtl0 = link(vtl0_source("\n".join(g.lines)), VTL0_LDS, tmp / "vtl0" / "v0.elf")
    vtl1 = link(vtl1_source(verdicts, scribble), VTL1_LDS, tmp / "vtl1" / "v1.elf")
    cfg = PartitionConfig(vtl0_image=vtl0, vtl1_image=vtl1)
    events = EventLog(trace=False, keep=200)
    console = Console(cfg.nr_vps, keep=50)
    results = read_image(vtl0).symbols()["results"]
    with Partition(cfg, events) as p:
        result, sched = control.run(p, console, timeout)
        setup = tuple(p.mem.read_u64(results + 32 * i) for i in range(3))
        completed = p.mem.read_u64(results + 32 * 3)
        v0 = p.vps[0].vcpus[0]
        sregs = v0.get_sregs() if v0 is not None else None
        n = sched.intercepts.count
    return HostileRun(result, n, completed, setup, events, list(console.tail), sregs)  # type: ignore[arg-type]
