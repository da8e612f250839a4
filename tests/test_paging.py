"""The software page-table walker (used because KVM_TRANSLATE is not dependable on every
host, and because the VMM needs permissions, which KVM_TRANSLATE does not give)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from vmm.memory import GuestMemory
from vmm.paging import PageFault, read_virt, walk
from vmm.scratch import ScratchVm
from vmm.x86 import PTE_NX, PTE_P, PTE_PS, PTE_U, PTE_W

PML4, PDPT, PD, PT = 0x10000, 0x11000, 0x12000, 0x13000
HIGH_PDPT = 0x14000
RW, RWU = PTE_P | PTE_W, PTE_P | PTE_W | PTE_U


@pytest.fixture
def tables() -> Iterator[GuestMemory]:
    """A small address space mixing 4K, 2M and 1G pages and a higher-half alias."""
    mem = GuestMemory(8 << 20)
    mem.write_u64(PML4 + 0, PDPT | RWU)
    mem.write_u64(PML4 + 511 * 8, HIGH_PDPT | RW)              # 0xffffff80_00000000
    mem.write_u64(PDPT + 0, PD | RWU)
    mem.write_u64(PDPT + 8, 0x40000000 | RW | PTE_PS)           # 1G page at 1 GiB
    mem.write_u64(PD + 0, PT | RWU)                             # [0, 2M) in 4K pages
    mem.write_u64(PD + 8, 0x200000 | PTE_P | PTE_PS | PTE_NX)   # [2M, 4M) read-only, NX
    mem.write_u64(PT + 5 * 8, 0x5000 | PTE_P | PTE_U)           # 0x5000: read-only user
    mem.write_u64(PT + 6 * 8, 0x7000 | RW)                      # 0x6000 -> 0x7000, supervisor
    mem.write_u64(HIGH_PDPT + 0, PD | RW)                       # alias of the low 1G
    mem.write(0x5FFE, b"AB")
    mem.write(0x7000, b"CD")
    yield mem
    mem.close()


def test_4k_2m_1g_translations_and_permissions(tables: GuestMemory) -> None:
    t = walk(tables, PML4, 0x5123)
    assert (t.gpa, t.page_size, t.writable, t.user, t.nx) == (0x5123, 4096, False, True, False)
    t = walk(tables, PML4, 0x6FF0)
    assert (t.gpa, t.writable, t.user) == (0x7FF0, True, False)
    t = walk(tables, PML4, 0x234567)
    assert (t.gpa, t.page_size, t.writable, t.nx) == (0x234567, 2 << 20, False, True)
    t = walk(tables, PML4, 0x40001234)
    assert (t.gpa, t.page_size) == (0x40001234, 1 << 30)
    with pytest.raises(PageFault, match="no 1 GiB pages"):
        walk(tables, PML4, 0x40001234, gbpages=False)
    t = walk(tables, PML4, 0xFFFFFF8000006010)
    assert (t.gpa, t.user) == (0x7010, False)
    assert t.entries == [PML4 + 511 * 8, HIGH_PDPT, PD, PT + 6 * 8]


def test_reads_cross_page_boundaries(tables: GuestMemory) -> None:
    assert read_virt(tables, PML4, 0x5FFE, 4) == b"ABCD"


@pytest.mark.parametrize("gva,reason", [
    (0x7000, "not present at level 1"),
    (0x800000, "not present at level 2"),
    (0x80000000, "not present at level 3"),
    (0x8000000000, "not present at level 4"),
    (0x0000800000000000, "not canonical"),
])
def test_untranslatable_addresses_say_why(tables: GuestMemory, gva: int, reason: str) -> None:
    with pytest.raises(PageFault, match=reason):
        walk(tables, PML4, gva)


def test_tables_pointing_outside_memory_are_a_fault_not_a_crash(tables: GuestMemory) -> None:
    tables.write_u64(PD + 16, (1 << 40) | RW)   # a PT far beyond guest memory
    with pytest.raises(PageFault, match="outside guest memory"):
        walk(tables, PML4, 0x400000)


@pytest.mark.kvm
def test_walker_agrees_with_kvm_translate(tables: GuestMemory) -> None:
    # A long-mode vCPU booted on the fixture's own tables (not the scratch identity map).
    with ScratchVm(mem=tables, cr3=PML4) as s:
        cpuid = s.kvm.supported_cpuid()
        gbpages = any(cpuid.entries[i].function == 0x80000001 and cpuid.entries[i].edx >> 26 & 1
                      for i in range(cpuid.nent))
        for gva in (0x5123, 0x6FF0, 0x234567, 0x40001234, 0xFFFFFF8000006010, 0x7000, 0x800000):
            valid, gpa = s.vcpu.translate(gva)
            try:
                mine: int | None = walk(tables, PML4, gva, gbpages).gpa
            except PageFault:
                mine = None
            assert (gpa if valid else None) == mine, hex(gva)
