"""vmm/regcheck.py: the architectural checks on CR0/CR3/CR4/CR8/XCR0 and descriptor-table
bases that the VMM makes before writing a register for VTL0 (the CPU raises #GP(0) for
each; KVM's own kvm_set_cr*/__kvm_set_xcr make the same ones)."""

from __future__ import annotations

import pytest

from vmm import regcheck as rc
from vmm.x86 import EFER_LMA, EFER_LME, EFER_NXE

LM = EFER_LME | EFER_LMA | EFER_NXE
CR0 = rc.CR0_PE | rc.CR0_MP | rc.CR0_ET | rc.CR0_NE | rc.CR0_WP | rc.CR0_PG
CR4 = rc.CR4_PAE | rc.CR4_OSFXSR | rc.CR4_OSXMMEXCPT
FULL = rc.CpuFeatures(cr4_allowed=rc.CR4_ALWAYS | rc.CR4_SMEP | rc.CR4_SMAP | rc.CR4_UMIP | rc.CR4_PCIDE
                      | rc.CR4_OSXSAVE | rc.CR4_FSGSBASE | rc.CR4_PKE | rc.CR4_CET,
                      maxphyaddr=46, xcr0_supported=0x600FF)   # x87 SSE AVX BND* AVX-512 XTILE
BARE = rc.CpuFeatures()


def _r(reason: str | None) -> str:
    assert reason is not None, "expected the write to be refused"
    return reason


def test_cr0() -> None:
    def check(value: int) -> str | None:
        return rc.check_cr0(value, cr4=CR4, efer=LM)
    assert check(CR0) is None
    assert check(CR0 & ~rc.CR0_WP) is None             # clearing WP is legal (VTL1 judges)
    assert check(CR0 | rc.CR0_TS) is None
    assert "63:32" in _r(check(CR0 | 1 << 32))
    assert "63:32" in _r(check(CR0 | 1 << 63))
    assert "PG set without" in _r(check(CR0 & ~rc.CR0_PE))
    assert "NW set without" in _r(check(CR0 | rc.CR0_NW))
    assert check(CR0 | rc.CR0_NW | rc.CR0_CD) is None
    assert "long mode" in _r(check(CR0 & ~rc.CR0_PG))
    assert rc.check_cr0(CR0 & ~rc.CR0_PG, cr4=CR4, efer=0) is None   # legacy mode may turn paging off
    assert "PCIDE" in _r(rc.check_cr0(CR0 & ~rc.CR0_PG, cr4=CR4 | rc.CR4_PCIDE, efer=0))
    assert "CET" in _r(rc.check_cr0(CR0 & ~rc.CR0_WP, cr4=CR4 | rc.CR4_CET, efer=LM))


def test_cr0_normalised_as_the_cpu_stores_it() -> None:
    assert rc.normalize_cr0(CR0 & ~rc.CR0_ET) == CR0                # ET reads as 1
    assert rc.normalize_cr0(CR0 | 1 << 6 | 1 << 17 | 1 << 28) == CR0  # reserved low bits ignored


def test_cr4_reserved_bits_follow_cpuid() -> None:
    def check(value: int, features: rc.CpuFeatures) -> str | None:
        return rc.check_cr4(value, old=CR4, cr0=CR0, cr3=0x2000, efer=LM, features=features)
    for bit in (rc.CR4_SMEP, rc.CR4_SMAP, rc.CR4_UMIP, rc.CR4_OSXSAVE, rc.CR4_FSGSBASE, rc.CR4_PKE):
        assert check(CR4 | bit, FULL) is None, hex(bit)
        assert "does not support" in _r(check(CR4 | bit, BARE))
    for bit in (rc.CR4_PGE, rc.CR4_MCE, rc.CR4_PCE, rc.CR4_TSD, rc.CR4_DE):
        assert check(CR4 | bit, BARE) is None
    for bit in (1 << 15, 1 << 26, 1 << 31, 1 << 32, 1 << 63, rc.CR4_SMXE, rc.CR4_KL):
        assert check(CR4 | bit, FULL) is not None, hex(bit)


def test_cr4_bits_already_set_stay_allowed() -> None:
    """KVM may have accepted a bit its supported CPUID lacks (this host: SMEP, SMAP);
    writing CR4 again with it is not a reserved-bit write."""
    old = CR4 | rc.CR4_SMEP
    assert rc.check_cr4(old | rc.CR4_PGE, old=old, cr0=CR0, cr3=0, efer=LM, features=BARE) is None
    assert rc.check_cr4(old | rc.CR4_SMAP, old=old, cr0=CR0, cr3=0, efer=LM, features=BARE) is not None


def test_cr4_long_mode_and_pcid_rules() -> None:
    la57 = rc.CpuFeatures(cr4_allowed=rc.CR4_ALWAYS | rc.CR4_LA57 | rc.CR4_PCIDE)
    pcide = CR4 | rc.CR4_PCIDE
    assert "PAE" in _r(rc.check_cr4(CR4 & ~rc.CR4_PAE, old=CR4, cr0=CR0, cr3=0, efer=LM, features=la57))
    assert "LA57" in _r(rc.check_cr4(CR4 | rc.CR4_LA57, old=CR4, cr0=CR0, cr3=0, efer=LM, features=la57))
    assert "LA57" in _r(rc.check_cr4(CR4, old=CR4 | rc.CR4_LA57, cr0=CR0, cr3=0, efer=LM, features=la57))
    assert rc.check_cr4(CR4 | rc.CR4_PCIDE, old=CR4, cr0=CR0, cr3=0x2000, efer=LM, features=la57) is None
    assert "PCID" in _r(rc.check_cr4(pcide, old=CR4, cr0=CR0, cr3=0x2001, efer=LM, features=la57))
    # Clearing PCIDE, or keeping it, needs nothing.
    assert rc.check_cr4(CR4, old=CR4 | rc.CR4_PCIDE, cr0=CR0, cr3=0x2001, efer=LM, features=la57) is None
    assert "CET" in _r(rc.check_cr4(CR4 | rc.CR4_CET, old=CR4, cr0=CR0 & ~rc.CR0_WP, cr3=0, efer=LM,
                                    features=FULL))


def test_cr3_maxphyaddr_and_noflush() -> None:
    assert rc.check_cr3((1 << 46) - 4096, cr4=CR4, features=FULL) is None
    assert "MAXPHYADDR" in _r(rc.check_cr3(1 << 46, cr4=CR4, features=FULL))
    assert "MAXPHYADDR" in _r(rc.check_cr3(1 << 63 | 0x1000, cr4=CR4, features=FULL))
    pcid = CR4 | rc.CR4_PCIDE
    assert rc.check_cr3(1 << 63 | 0x1005, cr4=pcid, features=FULL) is None   # no-flush bit consumed
    assert rc.normalize_cr3(1 << 63 | 0x1005, pcid) == 0x1005
    assert rc.normalize_cr3(0x1018, CR4) == 0x1018


def test_cr8() -> None:
    assert rc.check_cr8(15) is None and rc.check_cr8(0) is None
    assert rc.check_cr8(16) is not None and rc.check_cr8(1 << 63) is not None


@pytest.mark.parametrize(("value", "ok"), [
    (0x1, True), (0x3, True), (0x7, True), (0xE7, True), (0x1F, True), (0x60007, True),
    (0x0, False), (0x2, False),            # x87 must stay on
    (0x5, False),                          # AVX without SSE
    (0xF, False), (0x17, False),           # only one of BNDREGS/BNDCSR
    (0x27, False), (0x67, False),          # part of AVX-512
    (0xE3, False),                         # AVX-512 without AVX
    (0x20007, False),                      # one of the two tile bits
    (0x200, False), (1 << 62, False),      # unsupported
])
def test_xcr0(value: int, ok: bool) -> None:
    assert (rc.check_xcr0(value, FULL) is None) is ok


def test_xcr0_follows_cpuid_and_only_xcr0_is_writable() -> None:
    assert rc.check_xcr0(0x7, BARE) is not None            # no AVX on a bare vCPU
    assert rc.check_xcr0(0x3, BARE) is None
    assert "XCR1" in _r(rc.check_xcr0(0x1, FULL, index=1))


def test_table_base_canonical() -> None:
    assert rc.check_table_base(0xFFFF_8000_0000_0000) is None
    assert rc.check_table_base(0x0000_7FFF_FFFF_F000) is None
    assert rc.check_table_base(0x0000_8000_0000_0000) is not None
    assert rc.check_table_base(0xFF00_0000_0000_0000) is not None
    assert rc.check_table_base(0xFF00_0000_0000_0000, cr4=rc.CR4_LA57) is None
    assert rc.check_table_base(0x0100_0000_0000_0000, cr4=rc.CR4_LA57) is not None


def test_features_from_cpuid() -> None:
    entries = [(1, 0, 0, 0, 1 << 26 | 1 << 17 | 1 << 21, 0), (7, 0, 0, 1 << 7 | 1 << 20, 1 << 2, 0),
               (0xD, 0, 0x7, 0, 0, 0), (0x80000008, 0, 0x3027, 0, 0, 0),
               (0x80000001, 0, 0, 0, 0, 1 << 11 | 1 << 20 | 1 << 29)]
    f = rc.CpuFeatures.from_cpuid(entries)
    want = rc.CR4_ALWAYS | rc.CR4_OSXSAVE | rc.CR4_PCIDE | rc.CR4_SMEP | rc.CR4_SMAP | rc.CR4_UMIP
    assert f == rc.CpuFeatures(want, 39, 0x7, 0xD01, True)     # EFER: SCE LME LMA NXE
    assert rc.CpuFeatures.from_cpuid([]) == rc.CpuFeatures(rc.CR4_ALWAYS, 36, 1, 0, False)


def test_wrmsr_as_the_guest_writes_it() -> None:
    """What a guest's WRMSR may not do even where a host write (KVM_SET_MSRS) may."""
    f = rc.CpuFeatures(efer_allowed=0xD01, maxphyaddr=39)
    pg, la57 = rc.CR0_PG | rc.CR0_PE, rc.CR4_LA57
    assert rc.check_wrmsr(0xC0000080, 0xD01, old=0xD01, cr0=pg, cr4=0, features=f) is None
    assert rc.check_wrmsr(0xC0000080, 0x501, old=0xD01, cr0=pg, cr4=0, features=f) is None   # NXE off
    assert "LME changed while paging" in (rc.check_wrmsr(0xC0000080, 0xC01, old=0xD01, cr0=pg, cr4=0,
                                                         features=f) or "")
    assert "does not support" in (rc.check_wrmsr(0xC0000080, 0xD01 | 1 << 12, old=0xD01, cr0=pg, cr4=0,
                                                 features=f) or "")
    assert rc.check_wrmsr(0xC0000082, 0x0000_8000_0000_0000, old=0, cr0=pg, cr4=0, features=f) is not None
    assert rc.check_wrmsr(0xC0000082, 0x00FF_8000_0000_0000, old=0, cr0=pg, cr4=la57, features=f) is None
    assert rc.check_wrmsr(0x176, 0xFFFF_FFFF_8100_0000, old=0, cr0=pg, cr4=0, features=f) is None
    assert rc.check_wrmsr(0xC0000084, 1 << 32, old=0, cr0=pg, cr4=0, features=f) is not None
    base = 0xFEE00900
    assert rc.check_wrmsr(0x1B, base, old=base, cr0=pg, cr4=0, features=f) is None
    assert rc.check_wrmsr(0x1B, base | 1 << 9, old=base, cr0=pg, cr4=0, features=f) is not None
    assert rc.check_wrmsr(0x1B, base | 1 << 10, old=base, cr0=pg, cr4=0, features=f) is not None  # no x2APIC
    assert rc.check_wrmsr(0x1B, 1 << 39 | 0x900, old=base, cr0=pg, cr4=0, features=f) is not None
    x2 = rc.CpuFeatures(x2apic=True)
    assert rc.check_wrmsr(0x1B, base | 1 << 10, old=base, cr0=pg, cr4=0, features=x2) is None
    assert rc.check_wrmsr(0x1B, base & ~(1 << 11) | 1 << 10, old=base, cr0=pg, cr4=0, features=x2) is not None
    assert rc.check_wrmsr(0x1B, base, old=base | 1 << 10, cr0=pg, cr4=0, features=x2) is not None


@pytest.mark.kvm
def test_features_of_this_hosts_kvm() -> None:
    from vmm.kvm import Kvm
    kvm = Kvm()
    try:
        f = rc.CpuFeatures.from_cpuid(rc.cpuid_entries(kvm.supported_cpuid()))
    finally:
        kvm.close()
    assert f.cr4_allowed & rc.CR4_ALWAYS == rc.CR4_ALWAYS
    assert 36 <= f.maxphyaddr <= 52 and f.xcr0_supported & 1
