"""Decoding, in 64-bit mode, of the x86 instructions that write control and
descriptor-table registers: MOV to CRn (0F 22 /r), LMSW (0F 01 /6), CLTS (0F 06),
LGDT (0F 01 /2), LIDT (0F 01 /3), LLDT (0F 00 /2), LTR (0F 00 /3) and XSETBV (0F 01 D1).

Pure: no KVM, no guest memory.  The bytes come from a fetch callback, `fetch(i)` for
byte i of the instruction (0-based), which returns None for a byte the caller does not
allow to be read; the decoder asks for bytes in order and never for byte 15 or later,
so the caller controls exactly what is read (and the CPU's 15-byte limit holds).

The result says which of these instructions it is (`Privileged`), with its length, its
register operand or the memory operand (ModRM, SIB, disp8/disp32, RIP-relative, the
0x67 address-size prefix) and the operand's linear address when registers are given;
or `NotPrivileged` (any other instruction: its length is not known), `Truncated` (the
fetch refused a byte the decision needed) or `TooLong` (over 15 bytes: #GP(0)).

What the CPU does and the decoder mirrors:
  * legacy prefixes (66 67 F0 F2 F3 2E 36 3E 26 64 65) in any order and number; a REX
    prefix (40-4F) counts only directly before the opcode (a legacy prefix after it
    cancels it, as on hardware);
  * MOV to CRn ignores ModRM.mod (always the register form), REX.R selects CR8-CR15,
    REX.B the source register; the operand size is 64 bits whatever 66 or REX.W say;
  * segment overrides are ignored in 64-bit mode except FS and GS, whose bases the
    caller passes in; with several segment prefixes the last one counts (as KVM's
    emulator takes it);
  * 66/F2/F3 do not change which of these instructions the bytes are (they are kept in
    `prefixes` for a caller that wants to be stricter); LOCK is reported (`lock`): the
    CPU raises #UD for every one of these with LOCK.

The reg forms of 0F 01 other than /6 and D1 (XGETBV, VMCALL, SWAPGS, ...) and the
memory forms of 0F 01 other than /2, /3, /6 (SGDT, SIDT, INVLPG, ...) are other
instructions: NotPrivileged.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum

Fetch = Callable[[int], "int | None"]

MAX_INSN = 15
MASK64 = (1 << 64) - 1
MASK32 = (1 << 32) - 1

GPR_NAMES = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
             "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")
RSP, RBP = 4, 5

SEG_ES, SEG_CS, SEG_SS, SEG_DS, SEG_FS, SEG_GS = 0x26, 0x2E, 0x36, 0x3E, 0x64, 0x65
SEGMENT_PREFIXES = frozenset({SEG_ES, SEG_CS, SEG_SS, SEG_DS, SEG_FS, SEG_GS})
OPSIZE, ADDRSIZE, LOCK, REPNE, REP = 0x66, 0x67, 0xF0, 0xF2, 0xF3
LEGACY_PREFIXES = SEGMENT_PREFIXES | {OPSIZE, ADDRSIZE, LOCK, REPNE, REP}


class Op(Enum):
    MOV_CR = "mov_cr"
    LMSW = "lmsw"
    CLTS = "clts"
    LGDT = "lgdt"
    LIDT = "lidt"
    LLDT = "lldt"
    LTR = "ltr"
    XSETBV = "xsetbv"


@dataclass(frozen=True, slots=True)
class MemOperand:
    """A ModRM memory operand: [base + index*scale + disp], or [next RIP + disp]."""
    base: int | None            # GPR index 0-15
    index: int | None           # GPR index 0-15 (never RSP)
    scale: int                  # 1, 2, 4 or 8
    disp: int                   # sign-extended
    rip_relative: bool
    addr32: bool                # 0x67: 32-bit registers, 32-bit result (EIP-relative)
    segment: int | None         # the segment override prefix that counts, or None

    @property
    def stack(self) -> bool:
        """The reference uses SS (a canonical fault is #SS(0), not #GP(0)): an explicit SS
        override, or no override and RSP/RBP as the base."""
        if self.segment is not None:
            return self.segment == SEG_SS
        return self.base in (RSP, RBP) and not self.rip_relative

    def effective(self, gprs: Sequence[int], next_rip: int) -> int:
        """The offset in the segment (no FS/GS base)."""
        if self.rip_relative:
            ea = next_rip + self.disp
        else:
            mask = MASK32 if self.addr32 else MASK64
            ea = self.disp
            if self.base is not None:
                ea += gprs[self.base] & mask
            if self.index is not None:
                ea += (gprs[self.index] & mask) * self.scale
        return ea & (MASK32 if self.addr32 else MASK64)

    def linear(self, gprs: Sequence[int], next_rip: int, fs_base: int = 0, gs_base: int = 0) -> int:
        """The linear address: the offset plus the FS or GS base (other bases are 0 in
        64-bit mode)."""
        base = fs_base if self.segment == SEG_FS else gs_base if self.segment == SEG_GS else 0
        return (base + self.effective(gprs, next_rip)) & MASK64


@dataclass(frozen=True, slots=True)
class Privileged:
    """One of the instructions this module decodes."""
    op: Op
    length: int
    prefixes: bytes = b""       # legacy and REX prefixes as they appeared
    cr: int | None = None       # MOV_CR: the control register written (0-15)
    reg: int | None = None      # the register operand (GPR 0-15), if not memory
    mem: MemOperand | None = None
    address: int | None = None  # mem's linear address, when decode() was given registers
    lock: bool = False          # a LOCK prefix: #UD on the CPU

    @property
    def operand(self) -> str:
        if self.reg is not None:
            return GPR_NAMES[self.reg]
        if self.mem is not None:
            return "memory"
        return "none"


@dataclass(frozen=True, slots=True)
class NotPrivileged:
    """Any other instruction (its length is not known)."""


@dataclass(frozen=True, slots=True)
class Truncated:
    """The fetch refused byte `offset`, which the decoder needed to tell."""
    offset: int


@dataclass(frozen=True, slots=True)
class TooLong:
    """The instruction is longer than 15 bytes (the CPU raises #GP(0))."""
    length: int


Decoded = Privileged | NotPrivileged | Truncated | TooLong
NOT_PRIVILEGED = NotPrivileged()


class _Need(Exception):
    def __init__(self, offset: int) -> None:
        self.offset = offset


class _Bytes:
    """The fetch callback with the 15-byte limit and 'missing byte' turned into _Need."""

    def __init__(self, fetch: Fetch) -> None:
        self.fetch = fetch

    def __call__(self, i: int) -> int:
        if i >= MAX_INSN:
            raise _TooLong(i + 1)
        b = self.fetch(i)
        if b is None:
            raise _Need(i)
        if not 0 <= b <= 0xFF:
            raise ValueError(f"fetch({i}) returned {b!r}, not a byte")
        return b


class _TooLong(Exception):
    def __init__(self, length: int) -> None:
        self.length = length


def from_bytes(data: bytes) -> Fetch:
    """A fetch over `data`: bytes past its end are refused."""
    return lambda i: data[i] if i < len(data) else None


def decode(fetch: Fetch, *, rip: int = 0, gprs: Sequence[int] | None = None,
           fs_base: int = 0, gs_base: int = 0) -> Decoded:
    """Decode the instruction at `rip` (64-bit mode).  With `gprs` (16 values, RAX..R15
    order) a memory operand's linear address is computed as well."""
    get = _Bytes(fetch)
    try:
        d = _decode(get)
    except _Need as e:
        return Truncated(e.offset)
    except _TooLong as e:
        return TooLong(e.length)
    if isinstance(d, Privileged) and d.mem is not None and gprs is not None:
        if len(gprs) != 16:
            raise ValueError(f"gprs has {len(gprs)} values, not 16")
        addr = d.mem.linear(gprs, (rip + d.length) & MASK64, fs_base, gs_base)
        d = Privileged(d.op, d.length, d.prefixes, d.cr, d.reg, d.mem, addr, d.lock)
    return d


def _decode(get: _Bytes) -> Decoded:
    i = 0
    rex = 0
    lock = False
    addr32 = False
    segment: int | None = None
    prefixes = bytearray()
    while True:
        b = get(i)
        if b in LEGACY_PREFIXES:
            rex = 0                          # REX counts only directly before the opcode
            if b == LOCK:
                lock = True
            elif b == ADDRSIZE:
                addr32 = True
            elif b in SEGMENT_PREFIXES:
                segment = b
        elif 0x40 <= b <= 0x4F:
            rex = b
        else:
            break
        prefixes.append(b)
        i += 1
    if b != 0x0F:
        return NOT_PRIVILEGED
    op2 = get(i + 1)
    pre = bytes(prefixes)
    rex_r, rex_b = 8 if rex & 4 else 0, 8 if rex & 1 else 0
    if op2 == 0x06:                                            # CLTS
        return Privileged(Op.CLTS, i + 2, pre, lock=lock)
    if op2 == 0x22:                                            # MOV CRn, r64 (mod ignored)
        modrm = get(i + 2)
        return Privileged(Op.MOV_CR, _length(i + 3), pre, cr=((modrm >> 3) & 7) | rex_r,
                          reg=(modrm & 7) | rex_b, lock=lock)
    if op2 not in (0x00, 0x01):
        return NOT_PRIVILEGED
    modrm = get(i + 2)
    mod, sub, rm = modrm >> 6, (modrm >> 3) & 7, modrm & 7
    if op2 == 0x01:
        if mod == 3:
            if sub == 6:                                       # LMSW r16
                return Privileged(Op.LMSW, _length(i + 3), pre, reg=rm | rex_b, lock=lock)
            if sub == 2 and rm == 1:                           # XSETBV (0F 01 D1)
                return Privileged(Op.XSETBV, _length(i + 3), pre, lock=lock)
            return NOT_PRIVILEGED
        ops = {2: Op.LGDT, 3: Op.LIDT, 6: Op.LMSW}
    else:
        ops = {2: Op.LLDT, 3: Op.LTR}
    op = ops.get(sub)
    if op is None:
        return NOT_PRIVILEGED
    if mod == 3:                                               # LLDT/LTR r16
        return Privileged(op, _length(i + 3), pre, reg=rm | rex_b, lock=lock)
    mem, end = _memory(get, i + 3, mod, rm, rex, addr32, segment)
    return Privileged(op, _length(end), pre, mem=mem, lock=lock)


def _length(n: int) -> int:
    if n > MAX_INSN:
        raise _TooLong(n)
    return n


def _memory(get: _Bytes, j: int, mod: int, rm: int, rex: int, addr32: bool,
            segment: int | None) -> tuple[MemOperand, int]:
    """The memory operand whose ModRM (mod != 3) ended at byte j; returns it and the
    offset just past its SIB and displacement."""
    base: int | None
    index: int | None = None
    scale = 1
    rip_relative = False
    disp_size = {0: 0, 1: 1, 2: 4}[mod]
    if rm == 4:                                               # SIB follows
        sib = get(j)
        j += 1
        scale = 1 << (sib >> 6)
        idx = ((sib >> 3) & 7) | (8 if rex & 2 else 0)
        index = None if idx == RSP else idx                   # index 100 without REX.X: none
        if sib & 7 == 5 and mod == 0:                         # no base, disp32
            base = None
            disp_size = 4
        else:
            base = (sib & 7) | (8 if rex & 1 else 0)
    elif rm == 5 and mod == 0:                                # RIP-relative disp32
        base = None
        rip_relative = True
        disp_size = 4
    else:
        base = rm | (8 if rex & 1 else 0)
    disp = 0
    for k in range(disp_size):
        disp |= get(j + k) << (8 * k)
    if disp_size and disp & (1 << (8 * disp_size - 1)):
        disp -= 1 << (8 * disp_size)
    j += disp_size
    return MemOperand(base, index, scale, disp, rip_relative, addr32, segment), j
