"""x86-64 architectural constants and the 64-bit boot state a VMM hands a guest."""

from __future__ import annotations

from typing import Any

from vmm.memory import GuestMemory

CR0_PE, CR0_MP, CR0_ET, CR0_NE, CR0_WP, CR0_AM, CR0_PG = (
    1 << 0, 1 << 1, 1 << 4, 1 << 5, 1 << 16, 1 << 18, 1 << 31)
CR4_PAE, CR4_PGE, CR4_OSFXSR, CR4_OSXMMEXCPT, CR4_SMEP, CR4_SMAP = (
    1 << 5, 1 << 7, 1 << 9, 1 << 10, 1 << 20, 1 << 21)
EFER_SCE, EFER_LME, EFER_LMA, EFER_NXE = 1 << 0, 1 << 8, 1 << 10, 1 << 11

PTE_P, PTE_W, PTE_U, PTE_PWT, PTE_PCD, PTE_A, PTE_D, PTE_PS, PTE_G = (
    1 << 0, 1 << 1, 1 << 2, 1 << 3, 1 << 4, 1 << 5, 1 << 6, 1 << 7, 1 << 8)
PTE_NX = 1 << 63
PTE_ADDR = 0x000F_FFFF_FFFF_F000

RFLAGS_RESERVED1 = 1 << 1
RFLAGS_TF, RFLAGS_IF, RFLAGS_DF, RFLAGS_AC = 1 << 8, 1 << 9, 1 << 10, 1 << 18

MSR_EFER, MSR_STAR, MSR_LSTAR, MSR_CSTAR, MSR_SFMASK = (
    0xC0000080, 0xC0000081, 0xC0000082, 0xC0000083, 0xC0000084)
MSR_SYSENTER_CS, MSR_SYSENTER_ESP, MSR_SYSENTER_EIP = 0x174, 0x175, 0x176
MSR_APIC_BASE = 0x1B
# MSRs a kernel-integrity monitor pins (Heki, design §6): syscall entry points,
# EFER (NXE, LME) and the APIC base.
PINNED_MSRS = {MSR_EFER: "EFER", MSR_STAR: "STAR", MSR_LSTAR: "LSTAR", MSR_CSTAR: "CSTAR",
               MSR_SFMASK: "SFMASK", MSR_SYSENTER_CS: "SYSENTER_CS", MSR_SYSENTER_ESP: "SYSENTER_ESP",
               MSR_SYSENTER_EIP: "SYSENTER_EIP", MSR_APIC_BASE: "APIC_BASE"}

VEC_DE, VEC_DB, VEC_BP, VEC_UD, VEC_DF, VEC_GP, VEC_PF = 0, 1, 3, 6, 8, 13, 14
VECTOR_NAMES = {0: "#DE", 1: "#DB", 2: "NMI", 3: "#BP", 4: "#OF", 5: "#BR", 6: "#UD", 7: "#NM",
                8: "#DF", 10: "#TS", 11: "#NP", 12: "#SS", 13: "#GP", 14: "#PF", 16: "#MF",
                17: "#AC", 18: "#MC", 19: "#XM", 20: "#VE", 21: "#CP"}

# Selectors of the boot GDT the VMM writes (null, code64, data).
BOOT_CS, BOOT_DS = 0x08, 0x10
BOOT_GDT = [0, 0x00AF9B000000FFFF, 0x00CF93000000FFFF]

LARGE_PAGE = 2 << 20


def boot_tables_size(mem_limit: int) -> int:
    """Bytes of page tables `write_identity_tables` needs to map [0, mem_limit)."""
    gib = max(1, -(-mem_limit // (1 << 30)))
    return (2 + gib) * 4096


def write_identity_tables(mem: GuestMemory, base: int, mem_limit: int) -> int:
    """Identity-map [0, mem_limit) with 2 MiB pages at `base`; returns the CR3 value.

    Layout: PML4 at base, one PDPT at base+4K, then one PD per GiB."""
    gib = max(1, -(-mem_limit // (1 << 30)))
    if gib > 512:
        raise ValueError("identity map limited to 512 GiB")
    pml4, pdpt = base, base + 4096
    mem.fill(base, boot_tables_size(mem_limit))
    mem.write_u64(pml4, pdpt | PTE_P | PTE_W)
    for g in range(gib):
        pd = base + (2 + g) * 4096
        mem.write_u64(pdpt + 8 * g, pd | PTE_P | PTE_W)
        entries = b"".join(
            ((g << 30) + (i << 21) | PTE_P | PTE_W | PTE_PS | PTE_A | PTE_D).to_bytes(8, "little")
            for i in range(512))
        mem.write(pd, entries)
    return pml4


def _segment(seg: Any, selector: int, code: bool) -> None:
    seg.base, seg.limit, seg.selector = 0, 0xFFFFFFFF, selector
    seg.type = 0xB if code else 0x3
    seg.present, seg.dpl, seg.s, seg.g, seg.avl, seg.unusable = 1, 0, 1, 1, 0, 0
    seg.l, seg.db = (1, 0) if code else (0, 1)


def set_long_mode(sregs: Any, cr3: int, gdt_base: int, nxe: bool = True) -> None:
    """Fill kvm_sregs for 64-bit mode, CPL0, paging on with the tables at `cr3`."""
    _segment(sregs.cs, BOOT_CS, True)
    for seg in (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss):
        _segment(seg, BOOT_DS, False)
    sregs.gdt.base, sregs.gdt.limit = gdt_base, 8 * len(BOOT_GDT) - 1
    sregs.idt.base, sregs.idt.limit = 0, 0
    sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG
    sregs.cr3 = cr3
    sregs.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT
    sregs.efer = EFER_LME | EFER_LMA | EFER_SCE | (EFER_NXE if nxe else 0)


def write_boot_gdt(mem: GuestMemory, gpa: int) -> None:
    mem.write(gpa, b"".join(d.to_bytes(8, "little") for d in BOOT_GDT))
