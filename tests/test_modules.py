"""New code after END_OF_BOOT (issue 10): modules VTL1 authenticates before they may run,
on real KVM with the built-in kernels and modules (guest_vtl0/module.S, module-priv.S).

The module area is mapped executable by VTL0's own (locked) tables and kept NW|NX by VTL1,
so that W^X holds where NX is the page tables' (this host: `vtl caps`); VTL1 fills it from
the bytes VTL0 names, after sealing, hashing and scanning them.  Verdicts: the module's
marker and the area read back by the VMM, VTL0's attribute map, Lifecycle events, VTL1's
own reports of what it computed."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest

from tests.vtlrun import Run, run_scenario
from vmm.elf import read_image
from vmm.memattr import NW, NX
from vtl.abi import ABI
from vtl.core.trust import trust_digest

pytestmark = pytest.mark.kvm

MODULE_MARK = 0x454C55444F4D2121


def _modules(images: tuple[Path, Path]) -> tuple[Path, Path]:
    build = images[0].parent
    return build / "module.bin", build / "module-priv.bin"


def _run(images: tuple[Path, Path], trust: list[bytes]) -> tuple[Run, dict[str, int]]:
    syms = read_image(images[0]).symbols()
    run = run_scenario(images, "module-load", trust=trust,
                       snapshot=[(syms["module_area"], 8192), (syms["module_marker"], 8)])
    return run, syms


def test_an_allowlisted_module_runs_only_between_load_and_unload(guest_images: tuple[Path, Path]) -> None:
    module, priv = _modules(guest_images)
    run, syms = _run(guest_images, [trust_digest(module), trust_digest(priv)])
    assert run.passed(), "\n".join(run.console[-20:])
    area = syms["module_area"]
    # VTL1 hashed exactly the module's page (first digest report), as hashlib does.
    digests = [r.data for r in run.reports if r.vtl == 1 and r.name == "module_digest"]
    assert digests[0] == hashlib.sha256(module.read_bytes()).digest() == trust_digest(module)
    assert len(module.read_bytes()) == 4096
    # The module ran: its marker, read back by the VMM.
    assert run.memory[(syms["module_marker"], 8)] == MODULE_MARK.to_bytes(8, "little")
    assert run.report("value", "module_result").value[0] == 0x600D
    # Writes to it while validated and while loaded were intercepted and refused (#PF);
    # the module that ran after the first one is the allowlisted one (its marker above).
    targets = {r.value[0] for r in run.of_kind("target") if r.name in ("module_validated", "module_loaded")}
    assert targets == {area + 8}
    writes = [e for e in run.events.of_kind("intercept")
              if e.type == "memory" and e.gpa is not None and e.gpa >> 12 == area >> 12]  # type: ignore[union-attr]
    assert [e.access for e in writes] == ["write", "write"]  # type: ignore[union-attr]
    assert [(v.verdict, v.vector) for v in run.events.of_kind("verdict")] == [("inject_fault", 14)] * 2  # type: ignore[union-attr]
    # The states VTL1 reported, and the VMM's map and memory at the end: sealed and empty.
    v = {k: run.report("value", k).value[0] for k in
         ("module_area_attrs", "validated_attrs", "loaded_attrs", "unloaded_attrs", "untrusted_attrs",
          "privileged_attrs", "rw_validated_attrs", "rw_unloaded_attrs")}
    assert v == {"module_area_attrs": NW | NX, "validated_attrs": NW | NX, "loaded_attrs": NW,
                 "unloaded_attrs": NW | NX, "untrusted_attrs": NW | NX, "privileged_attrs": NW | NX,
                 "rw_validated_attrs": NW | NX, "rw_unloaded_attrs": NX}
    assert run.attr_map[area >> 12] == NW | NX and run.attr_map[(area >> 12) + 1] == NW | NX
    assert run.memory[(area, 8192)] == bytes(8192)
    assert run.attr_map[syms["module_copy"] >> 12] == NX
    # Refusals: a changed byte (not on the allowlist), a privileged instruction (scan).
    assert run.report("status", "module_untrusted").value[1] == ABI.VTL_E_POLICY
    assert run.report("status", "module_privileged").value[1] == ABI.VTL_E_POLICY
    viol = [r for r in run.reports if r.vtl == 1 and r.name == "module_priv_violation_gpa"]
    assert [r.value[0] for r in viol] == [area + 3]          # 0F 22 E0 after MOV from CR4
    # No step ever left a page both writable and executable in VTL0's map.
    steps: list[Any] = run.events.of_kind("lifecycle")
    mods = [(e.step, e.status) for e in steps if e.step.startswith("module_")]
    assert ("module_load", ABI.VTL_OK) in mods and ("module_unload", ABI.VTL_OK) in mods
    for e in steps:
        assert "rwx" not in e.after["protected_pages"]


def test_a_module_off_the_allowlist_never_reaches_the_area(guest_images: tuple[Path, Path]) -> None:
    # Nothing trusted: the first MODULE_VALIDATE is refused and the scenario stops there.
    run, syms = _run(guest_images, [])
    assert not run.passed()
    assert run.report("status", "module_validate").value[1] == ABI.VTL_E_POLICY
    assert run.memory[(syms["module_area"], 8192)] == bytes(8192)
    assert run.memory[(syms["module_marker"], 8)] == bytes(8)
    assert run.attr_map[syms["module_area"] >> 12] == NW | NX


def test_the_lock_refuses_a_writable_module_area_mapped_executable(guest_images: tuple[Path, Path]) -> None:
    # W^X by the page tables' view: a page they map executable must be unwritable, whatever
    # VTL1's NX says (this host enforces NX only through the tables).
    run = run_scenario(guest_images, "module-area-writable")
    assert run.passed(), "\n".join(run.console[-20:])
    area = run.report("value", "module_area").value[0]
    assert run.report("status", "lock_with_writable_area").value[1] == ABI.VTL_E_POLICY
    assert [r.value[0] for r in run.reports if r.vtl == 1 and r.name == "lock_wx_violations"] == [2]
    assert run.report("status", "lock_page_tables").value[1] == ABI.VTL_OK
    assert run.report("status", "protect_area_rw_after_lock").value[1] == ABI.VTL_E_POLICY
    assert run.attr_map[area >> 12] == NW | NX and run.attr_map[(area >> 12) + 1] == NW | NX
