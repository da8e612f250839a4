"""vmm.scratch: the one long-mode scratch VM (probes, floors, tests) and the watchdog run."""

from __future__ import annotations

import pytest

from vmm.errors import VmmError
from vmm.exits import Hlt, IoOut, Mmio, complete_mmio_read
from vmm.kvm import Kvm
from vmm.memory import GuestMemory
from vmm.probe import probe_all
from vmm.scratch import CODE_GPA, ScratchVm, run_with_watchdog, scratch_vm, slot_layout

MiB = 1 << 20
P = 4096


def test_slot_layout_splits_memory_around_readonly_and_unmapped_ranges() -> None:
    assert slot_layout(4 * MiB) == [(0, 4 * MiB, False)]
    assert slot_layout(4 * MiB, readonly=[(2 * MiB, P)], unmapped=[(2 * MiB + P, 2 * MiB - P)]) == [
        (0, 2 * MiB, False), (2 * MiB, P, True)]
    assert slot_layout(4 * MiB, readonly=[(P, P), (2 * P, P)]) == [
        (0, P, False), (P, 2 * P, True), (3 * P, 4 * MiB - 3 * P, False)]


@pytest.mark.parametrize("kwargs,match", [
    ({"readonly": [(0x1001, P)]}, "page-aligned"),
    ({"unmapped": [(0, 0)]}, "page-aligned"),
    ({"unmapped": [(4 * MiB, P)]}, "outside guest memory"),
    ({"readonly": [(0, 2 * P)], "unmapped": [(P, P)]}, "overlap"),
])
def test_bad_ranges_are_refused_before_kvm_is_touched(kwargs: dict[str, list[tuple[int, int]]],
                                                      match: str) -> None:
    with pytest.raises(VmmError, match=match):
        slot_layout(4 * MiB, **kwargs)


@pytest.mark.kvm
@pytest.mark.parametrize("kwargs,match", [
    ({"regs": {"bogus": 1}}, "no register 'bogus'"),
    ({"regs": {"rax": -1}}, "not a 64-bit value"),
    ({"mem_size": 64 << 30}, "page tables"),
    ({"code_gpa": 0x8000}, "boot area"),
])
def test_bad_arguments_raise_vmm_errors(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(VmmError, match=match):
        ScratchVm(b"\xf4", **kwargs)  # type: ignore[arg-type]


@pytest.mark.kvm
def test_registers_readonly_and_unmapped_ranges_reach_the_guest() -> None:
    # mov [rbx], al (read-only page); mov al, [rcx] (unmapped); out 0xf0, al; hlt
    code = bytes.fromhex("8803" "8a01" "e6f0" "f4")
    ro, un = 2 * MiB, 3 * MiB
    with scratch_vm(code, regs={"rax": 0x77, "rbx": ro, "rcx": un}, readonly=[(ro, P)],
                    unmapped=[(un, P)]) as s:
        assert sorted(s.vm.slots.values())[1:3] == [(ro, P, 2), (ro + P, un - ro - P, 0)]
        s.mem.write(ro, b"\x11")
        e = s.run()
        assert e == Mmio(ro, 1, True, b"\x77") and s.mem.read(ro, 1) == b"\x11"
        assert s.run() == Mmio(un, 1, False, b"")
        complete_mmio_read(s.vcpu, b"\x99")
        assert s.run() == IoOut(0xF0, 1, b"\x99")
        assert isinstance(s.run(), Hlt)
        assert s.vcpu.sync.regs.rip == CODE_GPA + len(code)


@pytest.mark.kvm
def test_watchdog_gives_up_on_a_guest_that_never_exits() -> None:
    with scratch_vm(bytes.fromhex("ebfe")) as s:          # jmp $
        assert s.run(timeout=0.2) is None
        assert s.vcpu.run.immediate_exit == 0
        # The vCPU is usable afterwards: point it at an OUT.
        s.mem.write(CODE_GPA, bytes.fromhex("e6f1"))
        regs = s.vcpu.get_regs()
        regs.rip = CODE_GPA
        s.vcpu.set_regs(regs)
        assert run_with_watchdog(s.vcpu, 1.0) == IoOut(0xF1, 1, bytes([regs.rax & 0xFF]))


@pytest.mark.kvm
def test_given_kvm_and_memory_stay_open_and_shared() -> None:
    kvm = Kvm()
    mem = GuestMemory(4 * MiB)
    try:
        with scratch_vm(bytes.fromhex("e6f0"), kvm=kvm, mem=mem) as a, \
                scratch_vm(bytes.fromhex("e6f1"), kvm=kvm, mem=mem, code_gpa=CODE_GPA + P) as b:
            assert isinstance(a.run(), IoOut) and isinstance(b.run(), IoOut)
        assert kvm.fd >= 0 and mem.host_addr
        with pytest.raises(VmmError, match="differs"):
            ScratchVm(mem=mem, mem_size=8 * MiB)
    finally:
        mem.close()
        kvm.close()


@pytest.mark.kvm
def test_probes_run_on_the_scratch_vm() -> None:
    results = {r.name: r for r in probe_all()}
    for name in ("long_mode_pio_exit", "readonly_memslot", "unmapped_gpa_read", "unmapped_gpa_fetch",
                 "msr_filter", "single_step", "kvm_translate"):
        assert results[name].present, results[name].detail
