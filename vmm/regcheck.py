"""The architectural checks a CPU makes on a write of CR0, CR3, CR4, CR8, XCR0 or a
descriptor-table base, for a VMM that performs such writes on a guest's behalf.

Pure: each check takes the values it needs and returns None (the write is valid) or
the reason it is not; the CPU raises #GP(0) for every one of them, and so does a VMM
using this module (never an error of its own).  The rules follow the SDM's MOV to CR,
XSETBV and LGDT pages for 64-bit mode, in the form KVM implements them (kvm_set_cr0/3/4,
__kvm_set_xcr), so that a value passing here is one KVM accepts too.

What the vCPU supports comes from its CPUID (`CpuFeatures.from_cpuid`, e.g. on
KVM_GET_SUPPORTED_CPUID, which is what the VMM gives its vCPUs): the CR4 bits it may
set, MAXPHYADDR for CR3, the XCR0 features.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from vmm.x86 import (
    EFER_LMA,
    EFER_LME,
    EFER_NXE,
    EFER_SCE,
    MSR_APIC_BASE,
    MSR_CSTAR,
    MSR_EFER,
    MSR_LSTAR,
    MSR_SFMASK,
    MSR_SYSENTER_EIP,
    MSR_SYSENTER_ESP,
)

MASK64 = (1 << 64) - 1

# CR0
CR0_PE, CR0_MP, CR0_EM, CR0_TS, CR0_ET, CR0_NE = 1 << 0, 1 << 1, 1 << 2, 1 << 3, 1 << 4, 1 << 5
CR0_WP, CR0_AM, CR0_NW, CR0_CD, CR0_PG = 1 << 16, 1 << 18, 1 << 29, 1 << 30, 1 << 31
CR0_DEFINED = CR0_PE | CR0_MP | CR0_EM | CR0_TS | CR0_ET | CR0_NE | CR0_WP | CR0_AM | CR0_NW | CR0_CD | CR0_PG

# CR4
(CR4_VME, CR4_PVI, CR4_TSD, CR4_DE, CR4_PSE, CR4_PAE, CR4_MCE, CR4_PGE, CR4_PCE, CR4_OSFXSR,
 CR4_OSXMMEXCPT, CR4_UMIP, CR4_LA57, CR4_VMXE, CR4_SMXE) = (1 << b for b in range(15))
CR4_FSGSBASE, CR4_PCIDE, CR4_OSXSAVE, CR4_KL, CR4_SMEP, CR4_SMAP, CR4_PKE, CR4_CET, CR4_PKS = (
    1 << b for b in range(16, 25))
CR4_UINTR, CR4_LAM_SUP = 1 << 25, 1 << 28
CR4_DEFINED = ((1 << 15) - 1) | (((1 << 10) - 1) << 16) | CR4_LAM_SUP
# Bits every x86-64 vCPU may set (KVM's CR4_RESERVED_BITS complement without CPUID gates).
CR4_ALWAYS = (CR4_VME | CR4_PVI | CR4_TSD | CR4_DE | CR4_PSE | CR4_PAE | CR4_MCE | CR4_PGE | CR4_PCE
              | CR4_OSFXSR | CR4_OSXMMEXCPT)

CR3_PCID_NOFLUSH = 1 << 63
CR3_PCID_MASK = 0xFFF

# XCR0
XFEATURE_FP, XFEATURE_SSE, XFEATURE_YMM = 1 << 0, 1 << 1, 1 << 2
XFEATURE_BNDREGS, XFEATURE_BNDCSR = 1 << 3, 1 << 4
XFEATURE_AVX512 = (1 << 5) | (1 << 6) | (1 << 7)
XFEATURE_XTILE = (1 << 17) | (1 << 18)

# (CPUID leaf, subleaf, register, bit) -> CR4 bit it makes valid
_CR4_GATES: tuple[tuple[int, int, str, int, int], ...] = (
    (1, 0, "ecx", 5, CR4_VMXE),
    (1, 0, "ecx", 17, CR4_PCIDE),
    (1, 0, "ecx", 26, CR4_OSXSAVE),
    (7, 0, "ebx", 0, CR4_FSGSBASE),
    (7, 0, "ebx", 7, CR4_SMEP),
    (7, 0, "ebx", 20, CR4_SMAP),
    (7, 0, "ecx", 2, CR4_UMIP),
    (7, 0, "ecx", 3, CR4_PKE),
    (7, 0, "ecx", 7, CR4_CET),          # CET_SS
    (7, 0, "edx", 20, CR4_CET),         # CET_IBT
    (7, 0, "ecx", 16, CR4_LA57),
    (7, 0, "ecx", 31, CR4_PKS),
    (7, 1, "eax", 26, CR4_LAM_SUP),
)

CpuidEntry = tuple[int, int, int, int, int, int]   # function, index, eax, ebx, ecx, edx


# EFER bits and the CPUID bit (leaf 0x80000001, or as given) that makes each valid.
EFER_SVME, EFER_LMSLE, EFER_FFXSR, EFER_TCE, EFER_AUTOIBRS = 1 << 12, 1 << 13, 1 << 14, 1 << 15, 1 << 21
_EFER_GATES: tuple[tuple[int, int, str, int, int], ...] = (
    (0x80000001, 0, "edx", 11, EFER_SCE),
    (0x80000001, 0, "edx", 29, EFER_LME | EFER_LMA),
    (0x80000001, 0, "edx", 20, EFER_NXE),
    (0x80000001, 0, "ecx", 2, EFER_SVME),
    (0x80000001, 0, "edx", 25, EFER_FFXSR),
    (0x80000001, 0, "ecx", 17, EFER_TCE),
    (0x80000021, 0, "eax", 8, EFER_AUTOIBRS),
)
# IA32_APIC_BASE: BSP (8), x2APIC mode (10, with CPUID.1:ECX.21), enable (11), base 12+.
APIC_BASE_BSP, APIC_BASE_EXTD, APIC_BASE_EN = 1 << 8, 1 << 10, 1 << 11


@dataclass(frozen=True, slots=True)
class CpuFeatures:
    """What a vCPU's CPUID allows for the registers checked here."""
    cr4_allowed: int = CR4_ALWAYS
    maxphyaddr: int = 36
    xcr0_supported: int = XFEATURE_FP | XFEATURE_SSE
    efer_allowed: int = EFER_SCE | EFER_LME | EFER_LMA | EFER_NXE
    x2apic: bool = False

    @classmethod
    def from_cpuid(cls, entries: Iterable[CpuidEntry]) -> CpuFeatures:
        regs: dict[tuple[int, int], dict[str, int]] = {}
        for fn, idx, eax, ebx, ecx, edx in entries:
            regs[(fn, idx)] = {"eax": eax, "ebx": ebx, "ecx": ecx, "edx": edx}
        allowed = CR4_ALWAYS
        for fn, idx, reg, bit, cr4 in _CR4_GATES:
            if regs.get((fn, idx), {}).get(reg, 0) >> bit & 1:
                allowed |= cr4
        ext = regs.get((0x80000008, 0))
        maxphy = ext["eax"] & 0xFF if ext and ext["eax"] & 0xFF else 36
        xsave = regs.get((0xD, 0))
        xcr0 = (xsave["eax"] | xsave["edx"] << 32) if xsave else 0
        efer = 0
        for fn, idx, reg, bit, e in _EFER_GATES:
            if regs.get((fn, idx), {}).get(reg, 0) >> bit & 1:
                efer |= e
        x2apic = bool(regs.get((1, 0), {}).get("ecx", 0) >> 21 & 1)
        return cls(allowed, maxphy, (xcr0 | XFEATURE_FP) & MASK64, efer, x2apic)


# CR4 feature bits whose validity does not depend on the mode (api.rst: KVM_SET_SREGS
# refuses a CR4 the vCPU cannot take, as a MOV to CR4 would fault).
_CR4_PROBED = (CR4_FSGSBASE, CR4_OSXSAVE, CR4_SMEP, CR4_SMAP, CR4_UMIP, CR4_PKE)


def probe_cr4_accepted(vcpu: Any) -> int:
    """The CR4 feature bits KVM accepts on `vcpu` (a fresh one, with its CPUID set), by
    trying each with KVM_SET_SREGS; the vCPU's own state is put back.  Some hosts accept
    bits their supported CPUID does not advertise (this nested one: SMEP, SMAP, OSXSAVE),
    and a MOV to CR4 that KVM would take natively must not be refused when the VMM
    carries it out instead (the privileged section)."""
    from vmm.errors import KvmIoctlError

    original = vcpu.get_sregs()
    accepted = 0
    try:
        for bit in _CR4_PROBED:
            trial = vcpu.get_sregs()
            trial.cr4 = int(original.cr4) | bit
            try:
                vcpu.set_sregs(trial)
            except KvmIoctlError:
                continue
            accepted |= bit
    finally:
        vcpu.set_sregs(original)
    return accepted


def cpuid_entries(cpuid2: Any) -> list[CpuidEntry]:
    """The entries of a struct kvm_cpuid2 (as KVM_GET_SUPPORTED_CPUID returns it)."""
    return [(int(e.function), int(e.index), int(e.eax), int(e.ebx), int(e.ecx), int(e.edx))
            for e in (cpuid2.entries[i] for i in range(int(cpuid2.nent)))]


def canonical(addr: int, la57: bool = False) -> bool:
    """`addr` sign-extends from bit 47 (bit 56 with 5-level paging)."""
    bits = 57 if la57 else 48
    top = (addr & MASK64) >> (bits - 1)
    return top == 0 or top == (1 << (65 - bits)) - 1


def normalize_cr0(value: int) -> int:
    """What the CPU stores: ET reads as 1 and the reserved bits in 31:0 are ignored."""
    return (value | CR0_ET) & (CR0_DEFINED | ~((1 << 32) - 1)) & MASK64


def check_cr0(new: int, *, cr4: int, efer: int, long_mode: bool = True) -> str | None:
    """MOV to CR0 (the value as written; bits 63:32 are checked, 31:0 normalised)."""
    if new >> 32:
        return f"CR0 value {new:#x} sets reserved bits 63:32"
    if new & CR0_PG and not new & CR0_PE:
        return "CR0.PG set without CR0.PE"
    if new & CR0_NW and not new & CR0_CD:
        return "CR0.NW set without CR0.CD"
    if not new & CR0_PG and (long_mode and efer & EFER_LMA or cr4 & CR4_PCIDE):
        return "CR0.PG cleared in long mode" if efer & EFER_LMA else "CR0.PG cleared with CR4.PCIDE set"
    if not new & CR0_WP and cr4 & CR4_CET:
        return "CR0.WP cleared with CR4.CET set"
    return None


def check_cr4(new: int, *, old: int, cr0: int, cr3: int, efer: int, features: CpuFeatures) -> str | None:
    """MOV to CR4.  A bit already set in the current CR4 stays allowed: KVM may have
    accepted a bit its supported CPUID lacks (this host: SMEP, SMAP), and keeping it is
    not a reserved-bit write."""
    reserved = new & ~(features.cr4_allowed | (old & CR4_DEFINED))
    if reserved:
        return f"CR4 value {new:#x} sets bits {reserved:#x} this vCPU does not support"
    if efer & EFER_LMA:
        if not new & CR4_PAE:
            return "CR4.PAE cleared in long mode"
        if (new ^ old) & CR4_LA57:
            return "CR4.LA57 changed in long mode"
    if new & CR4_PCIDE and not old & CR4_PCIDE:
        if cr3 & CR3_PCID_MASK:
            return "CR4.PCIDE set with a nonzero PCID in CR3"
        if not efer & EFER_LMA:
            return "CR4.PCIDE set outside long mode"
    if new & CR4_CET and not cr0 & CR0_WP:
        return "CR4.CET set with CR0.WP clear"
    return None


def normalize_cr3(value: int, cr4: int) -> int:
    """With CR4.PCIDE, bit 63 (no-flush) is consumed by the write, not stored."""
    return value & ~CR3_PCID_NOFLUSH if cr4 & CR4_PCIDE else value


def check_cr3(new: int, *, cr4: int, features: CpuFeatures) -> str | None:
    """MOV to CR3 in long mode (`new` as written; bit 63 is allowed with PCIDE)."""
    value = normalize_cr3(new, cr4)
    reserved = value >> features.maxphyaddr << features.maxphyaddr
    if reserved:
        return f"CR3 value {new:#x} sets bits above MAXPHYADDR ({features.maxphyaddr})"
    return None


def check_cr8(new: int) -> str | None:
    if new >> 4:
        return f"CR8 value {new:#x} sets reserved bits 63:4"
    return None


def check_xcr0(new: int, features: CpuFeatures, index: int = 0) -> str | None:
    """XSETBV (the caller checks CR4.OSXSAVE and CPL first: #UD and #GP)."""
    if index != 0:
        return f"XCR{index} is not writable"
    if not new & XFEATURE_FP:
        return "XCR0 without x87 (bit 0)"
    if new & XFEATURE_YMM and not new & XFEATURE_SSE:
        return "XCR0 enables AVX without SSE"
    unsupported = new & ~features.xcr0_supported
    if unsupported:
        return f"XCR0 value {new:#x} sets bits {unsupported:#x} this vCPU does not support"
    if bool(new & XFEATURE_BNDREGS) != bool(new & XFEATURE_BNDCSR):
        return "XCR0 enables only one of BNDREGS and BNDCSR"
    if new & XFEATURE_AVX512:
        if not new & XFEATURE_YMM:
            return "XCR0 enables AVX-512 without AVX"
        if new & XFEATURE_AVX512 != XFEATURE_AVX512:
            return "XCR0 enables only part of AVX-512 (bits 5-7)"
    if new & XFEATURE_XTILE and new & XFEATURE_XTILE != XFEATURE_XTILE:
        return "XCR0 enables only one of XTILECFG and XTILEDATA"
    return None


def check_table_base(base: int, *, cr4: int = 0, what: str = "descriptor table") -> str | None:
    """LGDT/LIDT in 64-bit mode: the base must be canonical."""
    if not canonical(base, bool(cr4 & CR4_LA57)):
        return f"{what} base {base:#x} is not canonical"
    return None


_CANONICAL_MSRS = {MSR_LSTAR: "LSTAR", MSR_CSTAR: "CSTAR", MSR_SYSENTER_EIP: "SYSENTER_EIP",
                   MSR_SYSENTER_ESP: "SYSENTER_ESP"}


def check_wrmsr(index: int, value: int, *, old: int, cr0: int, cr4: int,
                features: CpuFeatures) -> str | None:
    """A guest's WRMSR of the MSRs this project filters (x86.PINNED_MSRS), as the CPU judges
    it: a VMM that completes a filtered WRMSR through KVM_SET_MSRS writes as the host, which
    KVM checks less (EFER.LME may change under paging, APIC_BASE takes reserved bits), and a
    state no guest could reach makes KVM refuse the vCPU's next KVM_SET_SREGS.  `old` is the
    MSR's current value."""
    value &= MASK64
    if index == MSR_EFER:
        reserved = value & ~features.efer_allowed
        if reserved:
            return f"EFER value {value:#x} sets bits {reserved:#x} this vCPU does not support"
        if cr0 & CR0_PG and (value ^ old) & EFER_LME:
            return "EFER.LME changed while paging is on"
        return None
    if index in _CANONICAL_MSRS:
        if not canonical(value, bool(cr4 & CR4_LA57)):
            return f"{_CANONICAL_MSRS[index]} value {value:#x} is not canonical"
        return None
    if index == MSR_SFMASK and value >> 32:
        return f"SFMASK value {value:#x} sets reserved bits 63:32"
    if index == MSR_APIC_BASE:
        reserved = (0xFF | 1 << 9 | (0 if features.x2apic else APIC_BASE_EXTD)
                    | (MASK64 >> features.maxphyaddr << features.maxphyaddr))
        if value & reserved:
            return f"APIC_BASE value {value:#x} sets reserved bits {value & reserved:#x}"
        mode = value & (APIC_BASE_EN | APIC_BASE_EXTD)
        cur = old & (APIC_BASE_EN | APIC_BASE_EXTD)
        if mode == APIC_BASE_EXTD:
            return "APIC_BASE enables x2APIC mode with the APIC disabled"
        if cur == APIC_BASE_EN | APIC_BASE_EXTD and mode == APIC_BASE_EN:
            return "APIC_BASE leaves x2APIC mode for xAPIC mode without disabling the APIC"
        if cur == 0 and mode == APIC_BASE_EN | APIC_BASE_EXTD:
            return "APIC_BASE enters x2APIC mode from a disabled APIC"
        return None
    return None
