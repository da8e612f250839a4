"""vmm.kvm.Vm memslot bookkeeping: O(log n) slot ids, explicit ids, refusals."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from vmm.errors import VmmError
from vmm.kvm import Kvm, Vm
from vmm.memory import GuestMemory

pytestmark = pytest.mark.kvm

P = 4096


@pytest.fixture
def vm_mem() -> Iterator[tuple[Vm, GuestMemory]]:
    kvm = Kvm()
    mem = GuestMemory(64 << 20)
    vm = kvm.create_vm()
    yield vm, mem
    vm.close()
    mem.close()
    kvm.close()


def test_lowest_freed_slot_is_reused_first(vm_mem: tuple[Vm, GuestMemory]) -> None:
    vm, mem = vm_mem
    ids = [vm.map_memory(mem, i * P, P) for i in range(6)]
    assert ids == [0, 1, 2, 3, 4, 5]
    vm.unmap_slot(4)
    vm.unmap_slot(1)
    assert vm.map_memory(mem, 1 * P, P) == 1 and vm.map_memory(mem, 4 * P, P) == 4
    assert vm.map_memory(mem, 6 * P, P) == 6


def test_explicit_slot_ids_never_collide_with_allocated_ones(vm_mem: tuple[Vm, GuestMemory]) -> None:
    vm, mem = vm_mem
    assert vm.map_memory(mem, 0, P) == 0
    assert vm.map_memory(mem, P, P, slot=2) == 2        # past the counter
    assert vm.map_memory(mem, 2 * P, P) == 1
    assert vm.map_memory(mem, 3 * P, P) == 3            # the counter skips the explicit 2
    vm.unmap_slot(1)
    assert vm.map_memory(mem, 4 * P, P, slot=1) == 1    # freed id taken explicitly: heap entry stale
    assert vm.map_memory(mem, 5 * P, P) == 4
    vm.unmap_slot(2)
    assert vm.map_memory(mem, 6 * P, P) == 2
    with pytest.raises(VmmError, match="in use"):
        vm.map_memory(mem, 7 * P, P, slot=3)
    assert sorted(vm.slots) == [0, 1, 2, 3, 4]


def test_bad_memslots_are_refused_with_vmm_errors(vm_mem: tuple[Vm, GuestMemory]) -> None:
    vm, mem = vm_mem
    with pytest.raises(VmmError, match="page-aligned"):
        vm.map_memory(mem, 1, P)
    with pytest.raises(VmmError, match="page-aligned"):
        vm.map_memory(mem, 0, 0)
    with pytest.raises(VmmError, match="outside guest memory"):
        vm.map_memory(mem, 0, 128 << 20)
    with pytest.raises(VmmError, match="not mapped"):
        vm.unmap_slot(7)
    slot = vm.map_memory(mem, 0, P)
    with pytest.raises(VmmError):                          # overlapping: KVM says EEXIST
        vm.map_memory(mem, 0, 2 * P)
    assert list(vm.slots) == [slot]
    assert vm.map_memory(mem, P, P) == slot + 1            # the failed id went back to the pool


def test_slot_allocation_does_not_slow_down_with_slots_in_use(vm_mem: tuple[Vm, GuestMemory]) -> None:
    """Outcome, not a benchmark: with 8k slots in use, taking and freeing an id is as
    cheap as with none (the old linear scan made it ~8k times dearer)."""
    vm, _ = vm_mem

    def churn() -> float:
        t = time.perf_counter()
        for _ in range(2000):
            vm._give_back_slot(vm._take_slot())
        return time.perf_counter() - t

    empty = churn()
    vm.slots.update({i: (0, P, 0) for i in range(8192)})   # bookkeeping only: no KVM calls
    vm._next_slot = 8192
    full = churn()
    vm.slots.clear()
    assert full < 20 * empty + 0.01
