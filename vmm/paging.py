"""Software walk of x86-64 4-level guest page tables.

KVM_TRANSLATE is not dependable across hosts (design §2), and the VMM
needs permissions too, so it reads the guest's tables from guest memory itself.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from vmm.errors import VmmError
from vmm.memory import GuestMemory
from vmm.x86 import PTE_ADDR, PTE_NX, PTE_P, PTE_PS, PTE_U, PTE_W


class PageFault(VmmError):
    """The walk could not translate the address; the message says why, `kind` says it
    for code: "noncanonical", "not_present", "unreadable" (a table the caller's
    `readable` refused, or outside guest memory) or "page_size" (a 1 GiB page without
    1 GiB pages)."""

    def __init__(self, message: str, kind: str = "not_present") -> None:
        super().__init__(message)
        self.kind = kind


@dataclass
class Translation:
    gva: int
    gpa: int
    page_size: int
    writable: bool
    user: bool
    nx: bool
    entries: list[int] = field(default_factory=list)   # GPAs of the table entries visited


def _canonical(gva: int) -> bool:
    top = gva >> 47
    return top == 0 or top == (1 << 17) - 1


def walk(mem: GuestMemory, cr3: int, gva: int, gbpages: bool = True,
         readable: Callable[[int], bool] | None = None) -> Translation:
    """Translate like the CPU would; `gbpages` False makes a 1 GiB page a fault, as on a
    vCPU whose CPUID lacks PDPE1GB (KVM under PVM offers none).  `readable(gpa)` says
    whether a table entry may be read at all (a VMM walking a guest's tables on its behalf
    reads only what that guest could read); a refused entry is a PageFault."""
    if not _canonical(gva):
        raise PageFault(f"GVA {gva:#x} is not canonical", "noncanonical")
    table = cr3 & PTE_ADDR
    writable = user = True
    nx = False
    visited = []
    for level, shift in ((4, 39), (3, 30), (2, 21), (1, 12)):
        entry_gpa = table + ((gva >> shift) & 0x1FF) * 8
        if entry_gpa + 8 > mem.size:
            raise PageFault(f"level-{level} table entry at GPA {entry_gpa:#x} is outside guest memory",
                            "unreadable")
        if readable is not None and not readable(entry_gpa):
            raise PageFault(f"level-{level} table entry at GPA {entry_gpa:#x} is in memory the walker "
                            "may not read", "unreadable")
        visited.append(entry_gpa)
        entry = mem.read_u64(entry_gpa)
        if not entry & PTE_P:
            raise PageFault(f"GVA {gva:#x} not present at level {level} (entry at {entry_gpa:#x})")
        writable &= bool(entry & PTE_W)
        user &= bool(entry & PTE_U)
        nx |= bool(entry & PTE_NX)
        if level == 3 and entry & PTE_PS and not gbpages:
            raise PageFault(f"GVA {gva:#x}: 1 GiB page at level 3, but the vCPU has no 1 GiB pages",
                            "page_size")
        if level == 1 or (level in (2, 3) and entry & PTE_PS):
            size = 1 << shift
            base = entry & PTE_ADDR & ~(size - 1)
            return Translation(gva, base | (gva & (size - 1)), size, writable, user, nx, visited)
        table = entry & PTE_ADDR
    raise AssertionError("unreachable")


def read_virt(mem: GuestMemory, cr3: int, gva: int, length: int) -> bytes:
    """Read `length` bytes at guest-virtual `gva`, crossing pages as needed."""
    out = bytearray()
    while length > 0:
        t = walk(mem, cr3, gva)
        chunk = min(length, t.page_size - (gva & (t.page_size - 1)))
        out += mem.read(t.gpa, chunk)
        gva += chunk
        length -= chunk
    return bytes(out)
