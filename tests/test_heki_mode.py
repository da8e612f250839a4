"""Heki mode on real KVM (docs/heki-mode.md): one VM, the VMM as KVM with the Heki patches.

Every argument rule of KVM_HC_LOCK_CR_UPDATE and KVM_HC_PROTECT_MEMORY gets the patch's
return value, and nothing changes: the VMM's pins and per-page permissions, the
attribute backend's map, memory read back through the VMM (the guest writes a marker
into the page a refused request named: it lands), CR0/CR4 read from KVM.  The hostile
requests come from the built-in VTL0 kernel's `heki-hypercalls` scenario, one case per
run (param).  Then the hardened kernel's attacks: clearing CR0.WP or CR4.SMEP and
writing kernel text are blocked, loading an own CR3 is not (Heki does not pin it), each
as the VMM observes it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.vtlrun import RUN_TIMEOUT, vtl_cli
from vmm.elf import read_image
from vmm.memattr import NW
from vmm.memory import PAGE_SIZE
from vmm.regcheck import CR4_CET, CR4_SMAP, CR4_SMEP
from vtl.abi import ABI
from vtl.core.config import PartitionConfig
from vtl.core.events import EventLog
from vtl.core.partition import Partition
from vtl.core.vtl import Vtl
from vtl.modes.heki import CR0_WP, CR4_PINNED_MASK, HekiScheduler, HekiState, heki_config, neg
from vtl.run import control
from vtl.services.console import Console
from vtl.services.reports import Report
from vtl.tools.attack import read_back

pytestmark = pytest.mark.kvm

MARK = 0x48454B494D41524B
R, W, X, IMM = ABI.MEM_ATTR_READ, ABI.MEM_ATTR_WRITE, ABI.MEM_ATTR_EXEC, ABI.MEM_ATTR_IMMUTABLE
EINVAL, EFAULT = neg(ABI.KVM_EINVAL), neg(ABI.KVM_EFAULT)
E2BIG, EPERM = neg(ABI.KVM_E2BIG), neg(ABI.KVM_EPERM)


@dataclass
class HekiRun:
    result: Any
    reports: list[Report]
    events: EventLog
    heki: HekiState
    cr0: int
    cr3: int
    cr4: int
    host_cr4: int
    vtl0_attrs: bytes
    backend: dict[int, int]        # GPA of each page a VALUE report named -> backend attributes
    memory: dict[int, int]         # ... -> its first u64, read through the VMM
    changed: list[str]             # vtl attack's read-back: what the VMM found changed
    checked: list[str]
    console: list[str]

    def value(self, name: str) -> int:
        found = [r for r in self.reports if r.kind == "value" and r.name == name]
        assert found, f"no VALUE {name}: {[(r.kind, r.name) for r in self.reports]}"
        return found[-1].value[0]

    def status(self, name: str) -> int:
        found = [r for r in self.reports if r.kind == "status" and r.name == name]
        assert found, f"no STATUS {name}: {self.console[-20:]}"
        return found[-1].value[1]

    def kinds(self, kind: str) -> list[Any]:
        return self.events.of_kind(kind)

    def report(self, kind: str, name: str) -> Report:
        found = [r for r in self.reports if r.kind == kind and r.name == name]
        assert found, f"no {kind} {name}: {[(r.kind, r.name) for r in self.reports]}"
        return found[-1]

    def passed(self) -> bool:
        res = [r for r in self.reports if r.kind == "result"]
        return self.result.reason == "guest_exit" and self.result.status == 0 and bool(res) \
            and res[-1].value[0] == 0


def run_heki(vtl0: Path, scenario: str, param: int = 0) -> HekiRun:
    cfg = heki_config(PartitionConfig(vtl0_image=vtl0, scenario=scenario, param=param))
    events = EventLog(trace=True, keep=100_000)
    console = Console(cfg.nr_vps, keep=10_000)
    with Partition(cfg, events) as p:
        result, sched = control.run(p, console, RUN_TIMEOUT, scheduler=HekiScheduler)
        assert isinstance(sched, HekiScheduler)
        reports = list(sched.reports.records)
        vcpu = p.vps[0].vcpus[Vtl.VTL0]
        assert vcpu is not None
        s = vcpu.get_sregs()                                      # from KVM, not the guest
        pages = [r.value[0] for r in reports if r.kind == "value" and r.name.startswith("heki_target")]
        backend = {g: p.backend.get(g) for g in pages}
        memory = {g: p.mem.read_u64(g) for g in pages}
        changed, checked, _ = read_back(p, reports)
        return HekiRun(result, reports, events, sched.heki.state, int(s.cr0), int(s.cr3), int(s.cr4),
                       sched.heki.host_cr4, bytes(p.vtl0_attrs), backend, memory, changed, checked,
                       list(console.tail))


# case (the scenario's param) -> (name, the patch's return value)
LOCK_CASES = {
    1: ("version", ABI.HEKI_ABI_VERSION),          # KVM_LOCK_CR_UPDATE_VERSION, cr = pin = 0
    2: ("version_with_cr", EINVAL),
    3: ("version_with_pin", EINVAL),
    4: ("unknown_flags", EINVAL),
    5: ("bad_cr", EINVAL),                         # CR3
    6: ("cr_over_u32", EINVAL),                    # a0 > U32_MAX (kvm_emulate_hypercall)
    7: ("pin_zero", EINVAL),
    8: ("cr0_without_wp", EINVAL),
    9: ("cr0_not_in_host", EINVAL),                # CR0.CD: not in the host's CR0
    10: ("cr4_outside_mask", EINVAL),              # SMEP|PAE: PAE is not pinnable
}
PROTECT_CASES = {
    11: ("list_bad_gpa", EFAULT),                  # the list at 1 TiB
    12: ("list_in_vtl1_hole", EFAULT),             # no memslot there in Heki mode either
    13: ("list_loop", E2BIG),                      # next_pa = itself
    14: ("list_loop_two", E2BIG),                  # A -> B -> A
    15: ("npages_huge", EFAULT),                   # npages = 2^40: entries past memory
    16: ("npages_over_page", E2BIG),               # 170 valid entries: more than a page holds
    17: ("entry_outside_memory", EINVAL),
    18: ("entry_in_vtl1_hole", EINVAL),
    19: ("entry_misaligned", EINVAL),
    20: ("entry_empty", EINVAL),                   # epa == pa
    21: ("perm_zero", EINVAL),
    22: ("perm_unknown", EINVAL),                  # bit 4: beyond MEM_ATTR_PROT
    23: ("all_or_nothing", EINVAL),                # a good entry, then a bad one
    24: ("all_or_nothing_lists", EFAULT),          # a good list, then next_pa past memory
    29: ("too_many_pages", E2BIG),                 # 169 x 16 MiB: more than the VMM's budget of pages
}


def _nothing_pinned(r: HekiRun) -> None:
    assert (r.heki.pinned_cr0, r.heki.pinned_cr4) == (0, 0)
    assert not r.kinds("heki_configure") and not r.kinds("heki_denial")
    assert (r.cr0, r.cr4) == (r.value("cr0_before"), r.value("cr4_before"))     # KVM's CRs


def _nothing_protected(r: HekiRun) -> None:
    assert not any(r.heki.perms), "a permission was recorded"
    assert not any(r.vtl0_attrs), "the attribute backend was changed"
    for gpa in r.backend:
        assert r.backend[gpa] == 0
        assert r.memory[gpa] == MARK, f"the guest's write to {gpa:#x} did not land: it was protected"


def _ret(r: HekiRun, name: str, want: int) -> None:
    got = r.status(name)
    assert got == want, f"{name}: RAX {got:#x}, the patch gives {want:#x}"
    calls = r.kinds("heki_hypercall")
    assert calls and calls[-1].ret == (want - (1 << 64) if want >> 63 else want)   # what the VMM returned


@pytest.mark.parametrize("case", sorted(LOCK_CASES), ids=[LOCK_CASES[c][0] for c in sorted(LOCK_CASES)])
def test_lock_cr_update_rule(guest_images: tuple[Path, Path], case: int) -> None:
    name, want = LOCK_CASES[case]
    r = run_heki(guest_images[0], "heki-hypercalls", case)
    assert r.passed(), r.console[-20:]
    _ret(r, name, want)
    _nothing_pinned(r)
    _nothing_protected(r)
    assert r.heki.section is None, "the stand-in judged CR writes with nothing pinned"


@pytest.mark.parametrize("case", sorted(PROTECT_CASES),
                         ids=[PROTECT_CASES[c][0] for c in sorted(PROTECT_CASES)])
def test_protect_memory_rule(guest_images: tuple[Path, Path], case: int) -> None:
    name, want = PROTECT_CASES[case]
    r = run_heki(guest_images[0], "heki-hypercalls", case)
    assert r.passed(), r.console[-20:]
    _ret(r, name, want)
    _nothing_protected(r)
    _nothing_pinned(r)


def test_immutable_pages_never_change_again(guest_images: tuple[Path, Path]) -> None:
    r = run_heki(guest_images[0], "heki-hypercalls", 25)
    assert r.passed(), r.console[-20:]
    assert r.status("immutable_first") == 0
    _ret(r, "immutable_then_change", EPERM)
    target = r.value("heki_target")
    page = target // PAGE_SIZE
    assert r.heki.perms[page] == R | X | IMM          # EXEC added: no MBEC here, as the patch
    assert r.backend[target] == NW
    assert r.memory[target] != MARK, "a write to the immutable read-only page landed"
    faults = [e for e in r.kinds("guest_fault") if e.vector == 14]
    assert faults and faults[-1].error_code == 0x3    # KVM's #PF(P|W), injected by the VMM
    others = [i for i, b in enumerate(r.heki.perms) if b and i != page]
    assert others == [], "pages beyond the request changed"


def test_no_exec_is_not_enforced_on_this_host_and_says_so(guest_images: tuple[Path, Path]) -> None:
    r = run_heki(guest_images[0], "heki-hypercalls", 26)
    assert r.passed(), r.console[-20:]
    _ret(r, "no_exec", 0)
    target2 = r.value("heki_target2")
    assert r.heki.perms[target2 // PAGE_SIZE] == R | W | X
    ne = r.kinds("heki_not_enforced")
    assert ne and "MBEC" in ne[-1].why and ne[-1].pages == 1


def test_cr4_bits_the_host_lacks_are_dropped(guest_images: tuple[Path, Path]) -> None:
    r = run_heki(guest_images[0], "heki-hypercalls", 27)
    assert r.passed(), r.console[-20:]
    _ret(r, "cr4_host_lacks_cet", 0)
    assert r.heki.pinned_cr4 == CR4_CET & r.host_cr4
    if not r.host_cr4 & CR4_CET:
        assert r.kinds("heki_not_enforced"), "the dropped pin was not reported"
    assert r.cr4 == r.value("cr4_before")


def test_pins_are_or_only(guest_images: tuple[Path, Path]) -> None:
    r = run_heki(guest_images[0], "heki-hypercalls", 28)
    assert r.passed(), r.console[-20:]
    assert r.status("pin_smep") == 0
    _ret(r, "pins_or_only", 0)
    assert r.heki.pinned_cr4 == (CR4_SMEP | CR4_SMAP) & r.host_cr4
    configure = r.kinds("heki_configure")
    assert [e.reason for e in configure] == [ABI.KVM_HEKI_EXIT_REASON_CR4] * 2
    assert configure[-1].pinned_total == r.heki.pinned_cr4


# --- the hardened kernel -----------------------------------------------------------


def test_harden_through_heki(guest_images: tuple[Path, Path]) -> None:
    r = run_heki(guest_images[0], "harden")
    assert r.passed(), r.console[-20:]
    for key in ("heki_version", "heki_lock_cr0", "heki_lock_cr4", "heki_protect"):
        assert r.status(key) == (1 if key == "heki_version" else 0), key
    assert r.heki.pinned_cr0 == CR0_WP
    assert r.heki.pinned_cr4 == r.value("heki_cr4_pin") & r.host_cr4 & CR4_PINNED_MASK
    assert r.heki.pinned_cr4 & CR4_SMEP or not r.host_cr4 & CR4_SMEP
    assert r.heki.section is not None                 # the stand-in judges CR writes from the pin
    # text r-x immutable (as the VMM holds it and as the backend applied it)
    syms = read_image(guest_images[0]).symbols()
    ts, te = syms["_text_start"], syms["_text_end"]
    text = range(ts // PAGE_SIZE, te // PAGE_SIZE)
    assert all(r.heki.perms[i] == R | X | IMM for i in text)
    assert all(r.vtl0_attrs[i] & NW for i in text)
    data = syms["_data_start"] // PAGE_SIZE
    assert r.heki.perms[data] == R | W | X and not r.vtl0_attrs[data] & NW
    configure = r.kinds("heki_configure")
    assert [e.reason for e in configure] == [ABI.KVM_HEKI_EXIT_REASON_CR0, ABI.KVM_HEKI_EXIT_REASON_CR4]
    assert configure[0].cr_pinned == CR0_WP


@pytest.mark.parametrize("scenario,reason", [("clear-cr0-wp", ABI.KVM_HEKI_EXIT_REASON_CR0),
                                             ("clear-cr4-smep", ABI.KVM_HEKI_EXIT_REASON_CR4)])
def test_clearing_a_pinned_bit_is_blocked(guest_images: tuple[Path, Path], scenario: str,
                                          reason: int) -> None:
    r = run_heki(guest_images[0], scenario)
    assert r.passed(), r.console[-20:]
    assert r.changed == [] and ("CR0" in r.checked or "CR4" in r.checked), (r.changed, r.checked)
    denial = r.kinds("heki_denial")
    assert len(denial) == 1 and denial[0].reason == reason
    pinned = r.heki.pinned_cr0 if reason == ABI.KVM_HEKI_EXIT_REASON_CR0 else r.heki.pinned_cr4
    assert denial[0].cr_value & pinned != pinned
    gp = [e for e in r.kinds("guest_fault") if e.vector == 13]
    assert gp and gp[-1].rip == denial[0].rip          # #GP(0) at the MOV, the CR unchanged in KVM
    assert r.cr0 & CR0_WP and (reason == ABI.KVM_HEKI_EXIT_REASON_CR0 or r.cr4 & CR4_SMEP)


def test_writing_kernel_text_is_blocked(guest_images: tuple[Path, Path]) -> None:
    r = run_heki(guest_images[0], "write-kernel-text")
    assert r.passed(), r.console[-20:]
    assert r.changed == [] and any(c.startswith("memory") for c in r.checked), (r.changed, r.checked)
    pf = [e for e in r.kinds("guest_fault") if e.vector == 14]
    assert pf and pf[-1].error_code == 0x3            # injected by the VMM as KVM would
    assert not r.kinds("intercept"), "no VTL1 is involved in Heki mode"


def test_writing_ro_after_init_is_blocked_after_late_init(guest_images: tuple[Path, Path]) -> None:
    """Written at boot, then R-- through KVM_HC_PROTECT_MEMORY where VTL mode ends boot."""
    r = run_heki(guest_images[0], "write-ro-after-init")
    assert r.passed(), r.console[-20:]
    assert r.status("heki_ro_after_init") == 0
    target = r.report("target", "ro_after_init")
    assert target.value[2] == 0x2222                  # the boot-time write had landed
    assert r.changed == [] and f"memory {target.value[0]:#x}" in r.checked, (r.changed, r.checked)
    page = target.value[0] // PAGE_SIZE
    assert r.heki.perms[page] == R | X and r.vtl0_attrs[page] & NW     # R-- (X: no MBEC), not immutable
    pf = [e for e in r.kinds("refused") if e.request == "memory write"]
    assert pf and pf[-1].gpa == target.value[0]        # KVM's #PF, injected by the VMM


def test_loading_an_own_cr3_is_not_blocked(guest_images: tuple[Path, Path]) -> None:
    r = run_heki(guest_images[0], "load-own-cr3")
    assert not r.passed()                              # the attack worked, as the guest saw it too
    assert any(c.startswith("CR3 now") for c in r.changed), r.changed    # CR3 read from KVM
    assert any("planted code" in c for c in r.changed), r.changed        # and the data page ran
    assert not r.kinds("heki_denial")


def test_cli_run_mode_heki_boots_and_passes() -> None:
    cp = vtl_cli("run", "--mode", "heki", "--json")
    assert cp.returncode == 0, cp.stderr[-2000:]
    doc = json.loads(cp.stdout)
    assert doc["status"] == 0 and doc["vtl1_enabled"] is False
    statuses = {r["name"]: r["value"][1] for r in doc["reports"] if r["kind"] == "status"}
    assert statuses["heki_version"] == 1 and statuses["heki_lock_cr0"] == 0
    assert statuses["heki_protect"] == 0
    assert doc["events"].get("heki_configure") == 2


def test_caps_says_what_is_real_and_what_is_a_stand_in() -> None:
    cp = vtl_cli("caps", "--json")
    assert cp.returncode == 0, cp.stderr[-2000:]
    parts = {h["part"]: h for h in json.loads(cp.stdout)["heki_mode"]}
    assert parts["transport"]["kind"] == "stand-in" and "VMCALL" in parts["transport"]["how"]
    pins = parts["CR0/CR4 pins"]
    assert pins["kind"] == "stand-in" and "privileged section" in pins["how"]
    noexec = parts["page no-exec (MEM_ATTR_EXEC clear)"]
    assert noexec["kind"] == "not enforced on this host" and "MBEC" in noexec["how"]
    assert parts["page no-write (MEM_ATTR_WRITE clear)"]["kind"] == "real"
    assert any(h["kind"] == "not protected by Heki" and "CR3" in part for part, h in parts.items())


def test_pins_and_permissions_outlive_the_kernel_across_a_reset(guest_images: tuple[Path, Path]) -> None:
    """KVM keeps them in struct kvm, which a guest reset keeps ("doesn't handle VM reboot")."""
    r = run_heki(guest_images[0], "reset-request")
    assert r.result.boot_count == 1 and r.result.resets == 1
    assert r.heki.pinned_cr0 == CR0_WP and r.heki.section is not None
    syms = read_image(guest_images[0]).symbols()
    text = range(syms["_text_start"] // PAGE_SIZE, syms["_priv_start"] // PAGE_SIZE)
    assert all(r.vtl0_attrs[i] & NW for i in text), "the rebuilt VM lost the text's no-write"
    # The rebooted kernel cannot even set up its own tables: Heki's design, observed.
    assert r.result.reason == "triple_fault", r.result
