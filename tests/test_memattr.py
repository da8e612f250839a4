"""Per-page attributes on a real VM (memslot backend) and on a fake RWX ioctl layer."""

from __future__ import annotations

import random
from collections.abc import Iterator

import pytest

from vmm.exits import Mmio
from vmm.kvm import Kvm, Vm
from vmm.memattr import NR, NW, NX, ExhaustedError, MemslotBackend, RwxBackend, valid_attributes
from vmm.memory import GuestMemory
from vmm.scratch import scratch_vm

MiB = 1 << 20
P = 4096


@pytest.fixture
def vm_mem() -> Iterator[tuple[Vm, GuestMemory]]:
    kvm = Kvm()
    mem = GuestMemory(64 * MiB)
    vm = kvm.create_vm()
    yield vm, mem
    vm.close()
    mem.close()
    kvm.close()


def test_attribute_validity() -> None:
    assert valid_attributes(0) and valid_attributes(NW) and valid_attributes(NX)
    assert valid_attributes(NW | NX) and valid_attributes(NR | NW | NX)
    assert not valid_attributes(NR) and not valid_attributes(NR | NW) and not valid_attributes(1 << 5)


@pytest.mark.kvm
def test_memslot_runs_coalesce_and_cost_follows_ranges(vm_mem: tuple[Vm, GuestMemory]) -> None:
    vm, mem = vm_mem
    b = MemslotBackend(vm, mem, [(0, 16 * MiB), (32 * MiB, 32 * MiB)])
    assert b.runs() == [(0, 16 * MiB, 0), (32 * MiB, 64 * MiB, 0)]
    before = b.ops
    b.set_range(1 * MiB, 4 * MiB, NW)               # one range: delete 1, add 3
    assert b.ops - before == 4
    assert b.runs()[:3] == [(0, MiB, 0), (MiB, 5 * MiB, NW), (5 * MiB, 16 * MiB, 0)]
    b.set_range(5 * MiB, MiB, NW)                   # extends the NW run: merges with it
    assert (MiB, 6 * MiB, NW) in b.runs()
    b.set_range(MiB, 5 * MiB, 0)                    # back to one slot
    assert b.runs() == [(0, 16 * MiB, 0), (32 * MiB, 64 * MiB, 0)]
    assert len(vm.slots) == 2
    # The same change costs the same however big the guest is.
    assert b.get(2 * MiB) == 0 and b.enforceable(NW | NX) == NW


@pytest.mark.kvm
def test_memslot_random_changes_match_a_page_model(vm_mem: tuple[Vm, GuestMemory]) -> None:
    vm, mem = vm_mem
    b = MemslotBackend(vm, mem, [(0, 16 * MiB)])
    model = [0] * (16 * MiB // P)
    rng = random.Random(7)
    for _ in range(300):
        start = rng.randrange(0, len(model))
        n = rng.randrange(1, min(64, len(model) - start) + 1)
        attrs = rng.choice([0, NW, NW | NX, NR | NW | NX])
        b.set_range(start * P, n * P, attrs)
        model[start:start + n] = [attrs] * n
    runs = b.runs()
    for s, e, a in runs:
        assert all(model[g] == a for g in range(s // P, e // P))
    for (_, e1, a1), (s2, _, a2) in zip(runs, runs[1:], strict=False):
        assert not (e1 == s2 and a1 == a2), "adjacent equal runs must be merged"
    mapped = sum(1 for _, _, a in runs if not a & NR)
    assert len(vm.slots) == mapped


@pytest.mark.kvm
def test_memslot_refuses_changes_beyond_the_slot_limit(vm_mem: tuple[Vm, GuestMemory]) -> None:
    vm, mem = vm_mem
    b = MemslotBackend(vm, mem, [(0, 16 * MiB)], max_slots=8)
    for i in range(3):
        b.set_range((2 * i + 1) * P, P, NW)
    runs = b.runs()
    with pytest.raises(ExhaustedError):
        b.set_range(9 * P, P, NW)
    assert b.runs() == runs  # nothing changed


@pytest.mark.kvm
def test_nw_page_blocks_a_guest_write() -> None:
    # mov rax, 0xdeadbeef; mov [0x200000], rax
    code = bytes.fromhex("48b8efbeadde00000000" "48890425") + (0x200000).to_bytes(4, "little")
    with scratch_vm(code, unmapped=[(0x200000, 0x200000)]) as s:
        b = MemslotBackend(s.vm, s.mem, [(0x200000, 0x200000)])
        s.mem.write_u64(0x200000, 0x1111)
        b.set_range(0x200000, P, NW)
        e = s.run()
        assert isinstance(e, Mmio) and e.is_write and e.gpa == 0x200000
        assert s.mem.read_u64(0x200000) == 0x1111


@pytest.mark.fake_rwx
def test_rwx_backend_issues_one_ioctl_per_change() -> None:
    calls: list[tuple[int, int, int]] = []
    b = RwxBackend(None, 64 * MiB, lambda gpa, size, a: calls.append((gpa, size, a)))  # type: ignore[arg-type]
    b.set_range(MiB, 16 * MiB, NW | NX)
    assert calls == [(MiB, 16 * MiB, NW | NX)] and b.ops == 1
    assert b.get(MiB) == NW | NX and b.get(17 * MiB) == 0 and b.enforceable(NX) == NX
