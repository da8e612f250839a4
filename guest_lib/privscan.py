#!/usr/bin/env python3
"""The scan VTL1 makes at VTL_CALL_LOCK_PAGE_TABLES, run on a VTL0 image at build time.

VTL1 refuses the lock if any byte offset of memory VTL0 can execute starts an encoding
that writes CR0/CR3/CR4/XCR0/GDTR/IDTR/LDTR/TR outside the privileged section
(`_priv_start`.. `_priv_end`, guest_lib/priv.S).  The compiler knows nothing of that: a
call whose rel32 displacement is 0x060F holds the bytes 0F 06 (CLTS), an absolute address
0x220Fxx holds 0F 22 (MOV to CR).  `make guests` links the VTL0 image with growing
padding (PRIVSCAN_PAD, guest_vtl0/linker.ld) until this scan is clean, so such
accidents never reach a run; what padding cannot fix (inside one function) fails the
build with the function named.

The rule (docs/writing-guests.md, "Register pinning"), conservative, any prefixes and any
ModRM.mod: 0F 22 /r (MOV to CRn), 0F 06 (CLTS), 0F 01 with ModRM.reg 2, 3 or 6 (LGDT,
LIDT, LMSW, and so XSETBV 0F 01 D1 and XGETBV 0F 01 D0), 0F 00 with ModRM.reg 2 or 3
(LLDT, LTR).  A match is allowed only if all its opcode and ModRM bytes lie in the
privileged section.  Bytes past the end of the executable range cannot be fetched, so a
match needing them is not one.

usage: privscan.py IMAGE [--quiet]        exit 0 clean, 1 violations, 2 bad image
"""

from __future__ import annotations

import struct
import sys
from collections.abc import Iterator

PF_X = 1
PT_LOAD = 1
SHT_SYMTAB = 2


def matches(code: bytes, base: int) -> Iterator[tuple[int, bytes]]:
    """(address, bytes) of every privileged-write encoding in `code` loaded at `base`."""
    n = len(code)
    i = code.find(b"\x0f")
    while i != -1:
        b1 = code[i + 1] if i + 1 < n else None
        b2 = code[i + 2] if i + 2 < n else None
        length = 0
        if b1 == 0x06:
            length = 2
        elif b1 == 0x22 and b2 is not None:
            length = 3
        elif b1 == 0x01 and b2 is not None and (b2 >> 3) & 7 in (2, 3, 6):
            length = 3
        elif b1 == 0x00 and b2 is not None and (b2 >> 3) & 7 in (2, 3):
            length = 3
        if length:
            yield base + i, code[i:i + length]
        i = code.find(b"\x0f", i + 1)


def _elf(data: bytes) -> tuple[list[tuple[int, bytes]], dict[str, tuple[int, int]]]:
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ValueError("not a little-endian ELF64 file")
    phoff, shoff = struct.unpack_from("<QQ", data, 32)
    phentsize, phnum, shentsize, shnum = struct.unpack_from("<HHHH", data, 54)
    segments = []
    for k in range(phnum):
        p_type, flags, off, vaddr, _pa, filesz, memsz, _al = struct.unpack_from("<IIQQQQQQ", data,
                                                                               phoff + k * phentsize)
        if p_type == PT_LOAD and flags & PF_X:
            segments.append((vaddr, data[off:off + filesz] + bytes(memsz - filesz)))
    symbols: dict[str, tuple[int, int]] = {}
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + k * shentsize) for k in range(shnum)]
    for _name, sh_type, _f, _a, off, size, link, _i, _al, entsize in sections:
        if sh_type != SHT_SYMTAB or not entsize:
            continue
        strtab = sections[link]
        names = data[strtab[4]:strtab[4] + strtab[5]]
        for j in range(0, size, entsize):
            st_name, _info, _other, _shndx, value, st_size = struct.unpack_from("<IBBHQQ", data, off + j)
            if st_name:
                symbols[names[st_name:names.index(b"\0", st_name)].decode("latin-1")] = (value, st_size)
    return segments, symbols


def violations(data: bytes) -> tuple[list[tuple[int, bytes, str]], int, int]:
    """Matches outside the privileged section, each with the function it lies in, and the
    section's bounds."""
    segments, symbols = _elf(data)
    if "_priv_start" not in symbols or "_priv_end" not in symbols:
        raise ValueError("no _priv_start/_priv_end symbols: not linked with a privileged section")
    start, end = symbols["_priv_start"][0], symbols["_priv_end"][0]
    funcs = sorted((v, s, n) for n, (v, s) in symbols.items() if s)
    out = []
    for base, code in segments:
        for addr, raw in matches(code, base):
            if start <= addr and addr + len(raw) <= end:
                continue
            where = next((f"{n}+{addr - v:#x}" for v, s, n in funcs if v <= addr < v + s), "?")
            out.append((addr, raw, where))
    return out, start, end


def main(argv: list[str]) -> int:
    if not argv or argv[0].startswith("-"):
        print(__doc__.strip().splitlines()[-1], file=sys.stderr)
        return 2
    quiet = "--quiet" in argv[1:]
    try:
        with open(argv[0], "rb") as f:
            bad, start, end = violations(f.read())
    except (OSError, ValueError, struct.error, IndexError) as e:
        print(f"privscan: {argv[0]}: {e}", file=sys.stderr)
        return 2
    if not quiet:
        for addr, raw, where in bad:
            print(f"privscan: {argv[0]}: {raw.hex(' ')} at {addr:#x} ({where}) is outside the privileged "
                  f"section {start:#x}-{end:#x}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
