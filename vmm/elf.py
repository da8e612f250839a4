"""ELF64 x86-64 loader for guest images.

`read_image` validates the whole file before anything touches guest memory;
`load_image` checks every segment against the allowed GPA window before it
copies any, so a refused image leaves memory as it was.  Segments are placed
at their physical address (p_paddr).
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass, field
from pathlib import Path

from vmm.errors import GuestImageError
from vmm.files import read_input
from vmm.memory import PAGE_SIZE, GuestMemory

ELF_MAGIC = b"\x7fELF"
ELFCLASS64, ELFDATA2LSB, EV_CURRENT = 2, 1, 1
ET_EXEC, EM_X86_64 = 2, 62
PT_LOAD = 1
PF_X, PF_W, PF_R = 1, 2, 4
SHT_SYMTAB, SHT_NOBITS = 2, 8
MACHINES = {3: "i386", 40: "ARM", 183: "AArch64", 243: "RISC-V", 62: "x86-64"}
MAX_IMAGE = 256 << 20

_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
_PHDR = struct.Struct("<IIQQQQQQ")
_SHDR = struct.Struct("<IIQQQQIIQQ")
_SYM = struct.Struct("<IBBHQQ")


@dataclass(frozen=True)
class Segment:
    gpa: int
    offset: int
    filesz: int
    memsz: int
    flags: int

    @property
    def perms(self) -> str:
        return "".join(c if self.flags & b else "-" for c, b in (("r", PF_R), ("w", PF_W), ("x", PF_X)))


@dataclass(frozen=True)
class Section:
    name: str
    offset: int
    size: int
    type: int
    link: int


@dataclass
class ElfImage:
    path: Path
    data: bytes
    entry: int
    segments: list[Segment]
    sha256: str
    sections: list[Section] = field(default_factory=list)

    @property
    def start(self) -> int:
        return min(s.gpa for s in self.segments) & ~(PAGE_SIZE - 1)

    @property
    def end(self) -> int:
        end = max(s.gpa + s.memsz for s in self.segments)
        return (end + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)

    def _bytes(self, sec: Section) -> bytes:
        return self.data[sec.offset:sec.offset + sec.size]

    def section(self, name: str) -> bytes | None:
        sec = next((s for s in self.sections if s.name == name), None)
        return self._bytes(sec) if sec else None

    def symbols(self) -> dict[str, int]:
        symtab = next((s for s in self.sections if s.type == SHT_SYMTAB), None)
        if symtab is None or symtab.link >= len(self.sections):
            return {}
        names, table = self._bytes(self.sections[symtab.link]), self._bytes(symtab)
        out = {}
        for i in range(0, len(table) - _SYM.size + 1, _SYM.size):
            st_name, _, _, _, value, _ = _SYM.unpack_from(table, i)
            if 0 < st_name < len(names):
                out[names[st_name:names.find(b"\0", st_name)].decode("latin-1")] = value
        return out


def read_image(path: Path | str) -> ElfImage:
    path = Path(path)
    name = path.name
    if not path.exists():
        raise GuestImageError(f"{path}: no such file (build the guests with `make guests`?)")
    if path.is_file() and path.stat().st_size > MAX_IMAGE:
        raise GuestImageError(
            f"{name} is {path.stat().st_size >> 20} MiB; guest images are limited to {MAX_IMAGE >> 20} MiB"
        )
    return parse_image(path, read_input(path, "", MAX_IMAGE, GuestImageError))


def parse_image(path: Path, data: bytes) -> ElfImage:
    """An ELF image from bytes already read (`path` names it in errors)."""
    return _parse(path, data)


def _parse(path: Path, data: bytes) -> ElfImage:
    name = path.name
    if len(data) < 4 or data[:4] != ELF_MAGIC:
        raise GuestImageError(f"{name} is not an ELF file (magic 7f454c46 expected, "
                              f"found {data[:4].hex() or 'nothing'})")
    if len(data) < _EHDR.size:
        raise GuestImageError(f"{name} is truncated: {len(data)} bytes, shorter than an ELF64 header")
    (ident, e_type, e_machine, e_version, e_entry, e_phoff, e_shoff, _flags, _ehsize,
     e_phentsize, e_phnum, e_shentsize, e_shnum, e_shstrndx) = _EHDR.unpack_from(data)
    if ident[4] != ELFCLASS64:
        raise GuestImageError(f"{name} is a 32-bit ELF; an x86-64 ELF64 image is needed")
    if ident[5] != ELFDATA2LSB:
        raise GuestImageError(f"{name} is big-endian; an x86-64 (little-endian) image is needed")
    if ident[6] != EV_CURRENT or e_version != EV_CURRENT:
        raise GuestImageError(f"{name} has unknown ELF version {ident[6]}")
    if e_machine != EM_X86_64:
        raise GuestImageError(f"{name} is for machine {e_machine} "
                              f"({MACHINES.get(e_machine, 'unknown')}), not x86-64")
    if e_type != ET_EXEC:
        kind = {1: "a relocatable object", 3: "a shared object or PIE", 4: "a core file"}.get(e_type, "")
        raise GuestImageError(f"{name} is {kind or f'ELF type {e_type}'}, not a static executable "
                              "(link with -static -no-pie)")
    if e_phnum == 0 or e_phentsize != _PHDR.size or e_phoff + e_phnum * _PHDR.size > len(data):
        raise GuestImageError(f"{name} has no valid program header table")
    segs: list[Segment] = []
    for i in range(e_phnum):
        p_type, p_flags, p_offset, _vaddr, p_paddr, p_filesz, p_memsz, _align = \
            _PHDR.unpack_from(data, e_phoff + i * _PHDR.size)
        if p_type != PT_LOAD or p_memsz == 0:
            continue
        if p_filesz > p_memsz:
            raise GuestImageError(f"{name}: segment {i} has filesz {p_filesz:#x} > memsz {p_memsz:#x}")
        if p_offset + p_filesz > len(data):
            raise GuestImageError(f"{name} is truncated: segment {i} needs file bytes "
                                  f"{p_offset:#x}..{p_offset + p_filesz:#x}, file has {len(data):#x}")
        if p_paddr + p_memsz > 1 << 52:
            raise GuestImageError(f"{name}: segment {i} at {p_paddr:#x} is beyond physical addresses")
        segs.append(Segment(p_paddr, p_offset, p_filesz, p_memsz, p_flags))
    if not segs:
        raise GuestImageError(f"{name} has no loadable segments")
    segs.sort(key=lambda s: s.gpa)
    for a, b in zip(segs, segs[1:], strict=False):
        if a.gpa + a.memsz > b.gpa:
            raise GuestImageError(f"{name}: segments at {a.gpa:#x} and {b.gpa:#x} overlap")
    if not any(s.flags & PF_X and s.gpa <= e_entry < s.gpa + s.memsz for s in segs):
        raise GuestImageError(f"{name}: entry point {e_entry:#x} is not inside an executable segment")
    img = ElfImage(path, data, e_entry, segs, hashlib.sha256(data).hexdigest())
    _parse_sections(img, e_shoff, e_shentsize, e_shnum, e_shstrndx)
    return img


def _parse_sections(img: ElfImage, shoff: int, shentsize: int, shnum: int, shstrndx: int) -> None:
    """Section headers are optional: a malformed table just means no named sections."""
    data = img.data
    if not shoff or shentsize != _SHDR.size or shoff + shnum * _SHDR.size > len(data) or shstrndx >= shnum:
        return
    hdrs = [_SHDR.unpack_from(data, shoff + i * _SHDR.size) for i in range(shnum)]
    names = data[hdrs[shstrndx][4]:hdrs[shstrndx][4] + hdrs[shstrndx][5]]
    for sh_name, sh_type, _f, _a, off, size, link, _i, _al, _es in hdrs:
        if sh_type == SHT_NOBITS or off + size > len(data):
            off, size = 0, 0    # no file bytes (.bss) or out of bounds: an empty section
        end = names.find(b"\0", sh_name)
        name = names[sh_name:end].decode("latin-1") if 0 <= sh_name < len(names) and end >= 0 else ""
        img.sections.append(Section(name, off, size, sh_type, link))


def check_window(image: ElfImage, lo: int, hi: int) -> None:
    """Every segment of the image must lie in [lo, hi)."""
    for s in image.segments:
        if s.gpa < lo or s.gpa + s.memsz > hi:
            raise GuestImageError(
                f"{image.path.name}: segment {s.perms} at {s.gpa:#x}..{s.gpa + s.memsz:#x} is outside "
                f"the window this image may occupy ({lo:#x}..{hi:#x})")


def load_image(image: ElfImage, mem: GuestMemory, lo: int, hi: int) -> None:
    """Copy the image's segments into guest memory; all must lie in [lo, hi)."""
    check_window(image, lo, hi)
    for s in image.segments:
        mem.write(s.gpa, image.data[s.offset:s.offset + s.filesz])
        mem.fill(s.gpa + s.filesz, s.memsz - s.filesz)
