"""vmm/decode.py: the privileged-instruction decoder, against the machine's assembler
(each vector is assembled by `as` in this test; its length is what `as` emitted between
two labels) and against hand-written bytes for the forms `as` never emits."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from vmm.decode import (
    SEG_FS,
    SEG_GS,
    SEG_SS,
    MemOperand,
    NotPrivileged,
    Op,
    Privileged,
    TooLong,
    Truncated,
    decode,
    from_bytes,
)

HAVE_AS = all(shutil.which(t) for t in ("as", "objcopy", "nm"))
GPRS = [0x1000 * (i + 1) + i for i in range(16)]        # rax=0x1000, rcx=0x2001, ...
RIP = 0xFFFF_FFFF_8000_0000
FS_BASE, GS_BASE = 0x7000_0000_0000, 0x6000_0000_0000


def M(base: int | None = None, index: int | None = None, scale: int = 1, disp: int = 0, *,  # noqa: N802
      rip: bool = False, a32: bool = False, seg: int | None = None) -> MemOperand:
    return MemOperand(base, index, scale, disp, rip, a32, seg)


# (assembly, op, cr, reg, memory operand)
VECTORS: list[tuple[str, Op, int | None, int | None, MemOperand | None]] = [
    ("mov %rdi, %cr0", Op.MOV_CR, 0, 7, None),
    ("mov %rax, %cr2", Op.MOV_CR, 2, 0, None),
    ("mov %rsp, %cr3", Op.MOV_CR, 3, 4, None),
    ("mov %r8, %cr4", Op.MOV_CR, 4, 8, None),
    ("mov %rax, %cr8", Op.MOV_CR, 8, 0, None),
    ("mov %r15, %cr8", Op.MOV_CR, 8, 15, None),
    ("lmsw %ax", Op.LMSW, None, 0, None),
    ("lmsw %r9w", Op.LMSW, None, 9, None),
    ("lmsw (%rax)", Op.LMSW, None, None, M(0)),
    ("clts", Op.CLTS, None, None, None),
    ("xsetbv", Op.XSETBV, None, None, None),
    ("lgdt (%rdi)", Op.LGDT, None, None, M(7)),
    ("lidt (%rsi)", Op.LIDT, None, None, M(6)),
    ("lgdt 8(%rsp)", Op.LGDT, None, None, M(4, disp=8)),               # SIB, base RSP
    ("lgdt -8(%rbp)", Op.LGDT, None, None, M(5, disp=-8)),             # disp8, negative
    ("lgdt 0x12345678(%rbx,%rcx,4)", Op.LGDT, None, None, M(3, 1, 4, 0x12345678)),
    ("lgdt -0x80000000(%rdx)", Op.LGDT, None, None, M(2, disp=-0x80000000)),   # disp32, negative
    ("lgdt (%r12)", Op.LGDT, None, None, M(12)),                       # SIB needed for r12
    ("lgdt (%r13)", Op.LGDT, None, None, M(13)),                       # mod=1 disp8 0 for r13
    ("lgdt 0x1000(%r13)", Op.LGDT, None, None, M(13, disp=0x1000)),
    ("lgdt (%rax,%r12,2)", Op.LGDT, None, None, M(0, 12, 2)),          # REX.X: index r12
    ("lgdt (%r9,%r10,8)", Op.LGDT, None, None, M(9, 10, 8)),
    ("lgdt (,%rax,8)", Op.LGDT, None, None, M(None, 0, 8)),            # SIB, no base: disp32
    ("lgdt 0x1234", Op.LGDT, None, None, M(disp=0x1234)),              # SIB, no base, no index
    ("lgdt 0x10(%rip)", Op.LGDT, None, None, M(disp=0x10, rip=True)),
    ("lgdt -0x20(%rip)", Op.LGDT, None, None, M(disp=-0x20, rip=True)),
    ("lgdt (%eax)", Op.LGDT, None, None, M(0, a32=True)),              # 0x67
    ("lgdt 4(%r8d,%ecx,2)", Op.LGDT, None, None, M(8, 1, 2, 4, a32=True)),
    ("lgdt 0x10(%eip)", Op.LGDT, None, None, M(disp=0x10, rip=True, a32=True)),
    ("lgdt %fs:8(%rax)", Op.LGDT, None, None, M(0, disp=8, seg=SEG_FS)),
    ("lgdt %gs:(%rax)", Op.LGDT, None, None, M(0, seg=SEG_GS)),
    ("lgdt %ss:(%rax)", Op.LGDT, None, None, M(0, seg=SEG_SS)),
    ("lldt %di", Op.LLDT, None, None, None),
    ("lldt %r10w", Op.LLDT, None, None, None),
    ("lldt (%rax)", Op.LLDT, None, None, M(0)),
    ("ltr %di", Op.LTR, None, None, None),
    ("ltr 2(%rbx)", Op.LTR, None, None, M(3, disp=2)),
    ("ltr 0x40(%rip)", Op.LTR, None, None, M(disp=0x40, rip=True)),
]
REG_OF = {"lldt %di": 7, "lldt %r10w": 10, "ltr %di": 7}

NOT_PRIVILEGED = ["nop", "ret", "xgetbv", "sgdt (%rax)", "sidt (%rax)", "invlpg (%rax)", "swapgs",
                  "sldt %ax", "str %ax", "verr %ax", "mov %cr0, %rax", "mov %cr4, %r8", "vmcall",
                  "wrmsr", "vzeroupper", "rdtscp", "push %rax", "jmp .",
                  "mov %rdi, %dr7", "lar %ax, %bx", "int3", "iretq", "lock addl $1, (%rax)"]


def _assemble(lines: list[str], tmp: Path) -> list[bytes]:
    src = [".code64", ".text"]
    for i, line in enumerate(lines):
        src += [f"s{i}:", line, f"e{i}:"]
    (tmp / "v.s").write_text("\n".join(src) + "\n")
    subprocess.run(["as", "--64", "-o", str(tmp / "v.o"), str(tmp / "v.s")], check=True, capture_output=True)
    subprocess.run(["objcopy", "-O", "binary", "-j", ".text", str(tmp / "v.o"), str(tmp / "v.bin")],
                   check=True)
    code = (tmp / "v.bin").read_bytes()
    syms = subprocess.run(["nm", str(tmp / "v.o")], check=True, capture_output=True, text=True).stdout
    addr = {m.group(2): int(m.group(1), 16) for m in re.finditer(r"^([0-9a-f]+) \w (\w+)$", syms, re.M)}
    return [code[addr[f"s{i}"]:addr[f"e{i}"]] for i in range(len(lines))]


@pytest.fixture(scope="module")
def assembled(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    if not HAVE_AS:
        pytest.skip("needs binutils (as, objcopy, nm)")
    lines = [v[0] for v in VECTORS] + NOT_PRIVILEGED
    return dict(zip(lines, _assemble(lines, tmp_path_factory.mktemp("asm")), strict=True))


@pytest.mark.parametrize("vector", VECTORS, ids=[v[0] for v in VECTORS])
def test_assembled_privileged_instructions(assembled: dict[str, bytes], vector: tuple) -> None:  # type: ignore[type-arg]
    asm, op, cr, reg, mem = vector
    code = assembled[asm]
    d = decode(from_bytes(code + b"\x90" * 8))      # trailing bytes must not count
    assert isinstance(d, Privileged), (asm, code.hex(), d)
    assert (d.op, d.length, d.cr, d.mem) == (op, len(code), cr, mem), (asm, code.hex())
    assert d.reg == REG_OF.get(asm, reg)
    assert not d.lock


@pytest.mark.parametrize("asm", NOT_PRIVILEGED)
def test_assembled_other_instructions(assembled: dict[str, bytes], asm: str) -> None:
    assert isinstance(decode(from_bytes(assembled[asm] + b"\x90" * 8)), NotPrivileged), asm


def test_effective_addresses(assembled: dict[str, bytes]) -> None:
    def addr(asm: str) -> int:
        code = assembled[asm]
        d = decode(from_bytes(code), rip=RIP, gprs=GPRS, fs_base=FS_BASE, gs_base=GS_BASE)
        assert isinstance(d, Privileged) and d.address is not None
        return d.address

    m64 = (1 << 64) - 1
    assert addr("lgdt (%rdi)") == GPRS[7]
    assert addr("lgdt 8(%rsp)") == GPRS[4] + 8
    assert addr("lgdt -8(%rbp)") == GPRS[5] - 8
    assert addr("lgdt 0x12345678(%rbx,%rcx,4)") == GPRS[3] + 4 * GPRS[1] + 0x12345678
    assert addr("lgdt -0x80000000(%rdx)") == (GPRS[2] - 0x80000000) & m64
    assert addr("lgdt (%rax,%r12,2)") == GPRS[0] + 2 * GPRS[12]
    assert addr("lgdt (,%rax,8)") == 8 * GPRS[0]
    assert addr("lgdt 0x1234") == 0x1234
    n = len(assembled["lgdt 0x10(%rip)"])
    assert addr("lgdt 0x10(%rip)") == RIP + n + 0x10
    assert addr("lgdt -0x20(%rip)") == RIP + len(assembled["lgdt -0x20(%rip)"]) - 0x20
    assert addr("lgdt 0x10(%eip)") == (RIP + len(assembled["lgdt 0x10(%eip)"]) + 0x10) & 0xFFFFFFFF
    assert addr("lgdt %fs:8(%rax)") == FS_BASE + GPRS[0] + 8
    assert addr("lgdt %gs:(%rax)") == GS_BASE + GPRS[0]
    assert addr("lgdt %ss:(%rax)") == GPRS[0]                       # SS base ignored in 64-bit mode


def test_address_size_prefix_truncates_registers_and_result() -> None:
    gprs = list(GPRS)
    gprs[0] = 0xFFFF_FFFF_FFFF_FFF0           # eax = 0xFFFFFFF0
    gprs[1] = 0x1_0000_0008                   # ecx = 8
    # 67 0f 01 14 48: lgdt (%eax,%ecx,2) -> (0xFFFFFFF0 + 16) mod 2^32 = 0
    d = decode(from_bytes(bytes.fromhex("670f011448")), gprs=gprs)
    assert isinstance(d, Privileged) and d.mem == M(0, 1, 2, a32=True) and d.address == 0
    # without 0x67 the same operand uses all 64 bits
    d = decode(from_bytes(bytes.fromhex("0f011448")), gprs=gprs)
    assert isinstance(d, Privileged) and d.address == (gprs[0] + 2 * gprs[1]) & ((1 << 64) - 1)


def test_stack_references_fault_as_ss() -> None:
    assert M(4).stack and M(5, disp=8).stack and M(0, seg=SEG_SS).stack
    assert not M(0).stack and not M(disp=8, rip=True).stack and not M(5, seg=0x3E).stack


# --- hand-written bytes: what `as` never emits ----------------------------------------------
@pytest.mark.parametrize(("hexbytes", "cr", "reg", "length"), [
    ("0f2207", 0, 7, 3),            # mov %rdi,%cr0 with mod=00: mod is ignored
    ("0f2204", 0, 4, 3),            # rm=100 with mod=00 would mean a SIB: not for MOV CR
    ("0f2205", 0, 5, 3),            # rm=101 with mod=00 would mean disp32: not for MOV CR
    ("0f2245", 0, 5, 3),            # mod=01: no disp8
    ("0f2285", 0, 5, 3),            # mod=10: no disp32
    ("440f22c0", 8, 0, 4),          # REX.R: CR8
    ("410f22c0", 0, 8, 4),          # REX.B: r8
    ("450f22f8", 15, 8, 4),         # REX.R+B, reg 7: CR15 (the VMM answers #UD)
    ("480f22d8", 3, 0, 4),          # REX.W changes nothing
    ("660f22e0", 4, 0, 4),          # 0x66 changes nothing
    ("f30f22c0", 0, 0, 4),          # F3 changes nothing
    ("2e3e0f22c0", 0, 0, 5),        # segment prefixes change nothing
    ("41660f22c0", 0, 0, 5),        # a legacy prefix after REX cancels REX: rax, not r8
    ("66410f22c0", 0, 8, 5),        # REX last: r8
    ("44410f22c0", 0, 8, 5),        # two REX: only the last counts (REX.B), REX.R lost
])
def test_mov_to_cr_forms(hexbytes: str, cr: int, reg: int, length: int) -> None:
    d = decode(from_bytes(bytes.fromhex(hexbytes) + b"\xcc\xcc"))
    assert isinstance(d, Privileged) and d.op is Op.MOV_CR
    assert (d.cr, d.reg, d.length) == (cr, reg, length)


def test_lock_prefix_is_reported() -> None:
    for code in ("f00f22c0", "f00f06", "66f00f0110", "f00f01d1"):
        d = decode(from_bytes(bytes.fromhex(code)))
        assert isinstance(d, Privileged) and d.lock, code


def test_every_modrm_form_of_lgdt() -> None:
    """All 256 ModRM bytes of 0F 01, and with each REX: the decoder agrees with the
    architecture's table on what is LGDT/LIDT/LMSW/XSETBV and on every length."""
    for rex in (b"", b"\x41", b"\x42", b"\x44", b"\x4f"):
        for modrm in range(256):
            mod, sub, rm = modrm >> 6, (modrm >> 3) & 7, modrm & 7
            code = rex + bytes([0x0F, 0x01, modrm]) + bytes([0x24]) + b"\x11\x22\x33\x44"
            d = decode(from_bytes(code))
            if mod == 3:
                want = Op.LMSW if sub == 6 else Op.XSETBV if sub == 2 and rm == 1 else None
                extra = 0
            else:
                want = {2: Op.LGDT, 3: Op.LIDT, 6: Op.LMSW}.get(sub)
                sib = rm == 4
                base = (code[len(rex) + 3] & 7) if sib else rm
                extra = sib + {0: 4 if (rm == 5 or (sib and base == 5)) else 0, 1: 1, 2: 4}[mod]
            if want is None:
                assert isinstance(d, NotPrivileged), (rex.hex(), hex(modrm), d)
                continue
            assert isinstance(d, Privileged) and d.op is want, (rex.hex(), hex(modrm), d)
            assert d.length == len(rex) + 3 + extra, (rex.hex(), hex(modrm), d)
            assert (d.mem is None) == (mod == 3)


def test_0f00_group() -> None:
    for modrm in range(256):
        sub = (modrm >> 3) & 7
        d = decode(from_bytes(bytes([0x0F, 0x00, modrm, 0x24, 0, 0, 0, 0])))
        if sub in (2, 3):
            assert isinstance(d, Privileged) and d.op is (Op.LLDT if sub == 2 else Op.LTR)
        else:
            assert isinstance(d, NotPrivileged)


# --- truncated and over-long input ---------------------------------------------------------
@pytest.mark.parametrize(("hexbytes", "offset"), [
    ("", 0), ("66", 1), ("6666", 2), ("41", 1), ("0f", 1), ("0f22", 2), ("0f01", 2), ("0f00", 2),
    ("0f0114", 3),               # SIB missing
    ("0f0115", 3),               # RIP-relative disp32 missing
    ("0f011512", 4), ("0f0115123456", 6),
    ("0f0150", 3),               # disp8 missing
    ("0f0190112233", 6),         # disp32 missing its last byte
    ("0f01142512", 5),           # SIB no-base disp32 missing bytes
])
def test_truncated_input(hexbytes: str, offset: int) -> None:
    assert decode(from_bytes(bytes.fromhex(hexbytes))) == Truncated(offset)


def test_decided_before_the_end_is_not_truncated() -> None:
    assert isinstance(decode(from_bytes(b"\x90")), NotPrivileged)           # one byte decides
    assert isinstance(decode(from_bytes(b"\x0f\x05")), NotPrivileged)       # syscall
    assert isinstance(decode(from_bytes(b"\x0f\x06")), Privileged)          # clts, nothing after


def test_over_long_instructions() -> None:
    ok = bytes([0x66] * 12) + bytes.fromhex("0f22c0")                         # exactly 15
    d = decode(from_bytes(ok))
    assert isinstance(d, Privileged) and d.length == 15
    assert decode(from_bytes(bytes([0x66] * 13) + bytes.fromhex("0f22c0"))) == TooLong(16)
    assert decode(from_bytes(bytes([0x66] * 15) + b"\x90")) == TooLong(16)
    assert decode(from_bytes(bytes([0x2e] * 40))) == TooLong(16)
    assert decode(from_bytes(bytes([0x66] * 9) + bytes.fromhex("0f011500000000"))) == TooLong(16)
    d = decode(from_bytes(bytes([0x66] * 8) + bytes.fromhex("0f011500000000")))
    assert isinstance(d, Privileged) and d.length == 15


def test_fetch_is_asked_in_order_and_never_past_15_bytes() -> None:
    asked: list[int] = []

    def fetch(i: int) -> int | None:
        asked.append(i)
        return 0x66

    assert decode(fetch) == TooLong(16)
    assert asked == list(range(15))
    asked.clear()
    code = bytes.fromhex("670f0194881122334455")

    def fetch2(i: int) -> int | None:
        asked.append(i)
        return code[i] if i < len(code) else None

    d = decode(fetch2)
    assert isinstance(d, Privileged) and d.length == 9 and asked == list(range(9))
