"""Issue 9, the guest half: the privileged section and VTL1's lock-time scan.

The build-time scan (guest_lib/privscan.py) and VTL1's scan at VTL_CALL_LOCK_PAGE_TABLES
apply one rule: an encoding that writes CR0/CR3/CR4/XCR0/GDTR/IDTR/LDTR/TR may only lie in
the privileged section.  These tests pin the rule down on bytes, check the built image
against it, and check on KVM that VTL1 scans what VTL0 can execute, refuses a stray
encoding (even one split across a page end) and pins registers where the VMM can."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

from tests.vtlrun import run_scenario, shared_run
from vmm.elf import read_image
from vmm.memattr import NR, NW, NX
from vtl.abi import ABI

REPO = Path(__file__).resolve().parent.parent


def _privscan() -> ModuleType:
    spec = importlib.util.spec_from_file_location("privscan", REPO / "guest_lib" / "privscan.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("code,flagged", [
    ("0f22c0", True),           # mov %rax, %cr0
    ("440f22c0", True),         # mov %rax, %cr8 (REX.R): conservative, flagged too
    ("0f22", False),            # no ModRM byte to fetch: cannot run
    ("0f06", True),             # clts
    ("0f0117", True),           # lgdt (%rdi)
    ("0f011f", True),           # lidt (%rdi)
    ("0f01f7", True),           # lmsw %di
    ("0f01d1", True),           # xsetbv
    ("0f01d0", True),           # xgetbv: reg 2 as well, conservative
    ("0f01c8", False),          # monitor: reg 1
    ("0f01f8", False),          # swapgs: reg 7
    ("0f01f9", False),          # rdtscp
    ("0f00d7", True),           # lldt %di
    ("0f00df", True),           # ltr %di
    ("0f00c0", False),          # sldt %eax: reg 0
    ("0f00c8", False),          # str %eax: reg 1
    ("0f20c0", False),          # mov %cr0, %rax: a read
    ("e80f060000", True),       # call with rel32 0x60F: 0F 06 inside the displacement
    ("b8400f2200", True),       # mov $0x220f40, %eax: 0F 22 inside an address
])
def test_the_scan_rule_on_bytes(code: str, flagged: bool) -> None:
    found = list(_privscan().matches(bytes.fromhex(code), 0x1000))
    assert bool(found) == flagged, found


def test_built_vtl0_has_register_writes_only_in_its_privileged_section(
        guest_images: tuple[Path, Path]) -> None:
    scan = _privscan()
    data = guest_images[0].read_bytes()
    bad, start, end = scan.violations(data)
    assert bad == []
    img = read_image(guest_images[0])
    syms = img.symbols()
    assert start == syms["_priv_start"] and end == syms["_priv_end"] and start % 4096 == 0 and end % 4096 == 0
    # The section holds one of each kind the kernel needs, and is the last of the text.
    text = next(s for s in img.segments if s.flags & 1)
    code = img.data[text.offset:text.offset + text.filesz]
    inside = [raw for addr, raw in scan.matches(code, text.gpa) if start <= addr < end]
    assert {raw[:2] for raw in inside} >= {b"\x0f\x22", b"\x0f\x06", b"\x0f\x01", b"\x0f\x00"}
    assert syms["_text_end"] == end
    for name in ("priv_write_cr0", "priv_write_cr3", "priv_write_cr4", "priv_lgdt", "priv_lidt", "priv_lldt",
                 "priv_ltr", "priv_lmsw", "priv_clts", "priv_xsetbv"):
        assert start <= syms[name] < end, name


@pytest.mark.kvm
def test_lock_scans_what_vtl0_can_execute_and_says_whether_registers_are_pinned(
        guest_images: tuple[Path, Path]) -> None:
    run = shared_run(guest_images, "harden")
    assert run.passed(), "\n".join(run.console[-15:])
    v1 = {r.name: r.value[0] for r in run.of_kind("value") if r.vtl == 1}
    syms = read_image(guest_images[0]).symbols()
    text_pages = (syms["_text_end"] - syms["_text_start"]) // 4096
    assert v1["scan_bytes"] == text_pages * 4096       # NX everywhere but the text
    assert v1["scan_ticks"] > 0
    priv = syms["_priv_start"] // 4096
    if v1["register_pinning"]:
        assert v1["set_intercept_control"] == ABI.VTL_OK
        assert run.attr_map[priv] == NR | NW | NX       # every fetch there reaches the VMM
    else:
        # This VMM cannot decode the section: it stays r-x, and VTL0 keeps working.
        assert v1["set_intercept_control"] == ABI.VTL_E_INVALID_CODE
        assert run.attr_map[priv] == NW
    assert not [r for r in run.of_kind("status") if r.vtl == 1]


@pytest.mark.kvm
def test_lock_refuses_a_register_write_split_across_two_executable_pages(
        guest_images: tuple[Path, Path]) -> None:
    run = run_scenario(guest_images, "lock-refuses-stray-cr-write")
    assert run.passed(), "\n".join(run.console[-15:])
    lock = run.report("status", "lock_with_stray")
    assert lock.value[:2] == [ABI.VTL_CALL_LOCK_PAGE_TABLES, ABI.VTL_E_POLICY]
    stray = run.report("value", "stray_va").value[0]
    assert stray % 4096 == 4095                         # the 0F is the last byte of a page
    refused = run.report("value", "lock_priv_violations")
    assert refused.vtl == 1 and refused.value[0] == 1
    assert run.report("value", "lock_priv_violation_va").value[0] == stray
    # Nothing was locked by the refused call; the second lock went through.
    assert run.report("status", "lock_page_tables").value[1] == ABI.VTL_OK
    locks = [r for r in run.of_kind("value") if r.name == "locked_table_pages"]
    assert len(locks) == 1
    assert run.attr_map[stray >> 12] == NX and run.attr_map[(stray >> 12) + 1] == NX
