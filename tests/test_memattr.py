"""Per-page attributes on a real VM (memslot and host-mapping backends) and on a fake RWX
ioctl layer."""

from __future__ import annotations

import errno
import random
from collections.abc import Iterator

import pytest

from vmm.backends import default_backend_kind, make_backend
from vmm.errors import KvmIoctlError, VmmError
from vmm.exits import EmulationFailure, Hlt, IoOut, Mmio, complete_mmio_read
from vmm.kvm import Kvm, Vm
from vmm.memattr import (
    NR,
    NW,
    NX,
    VMA_LEDGER,
    ExhaustedError,
    HostMappingBackend,
    MemslotBackend,
    RwxBackend,
    valid_attributes,
)
from vmm.memory import GuestMemory, MemoryAlias
from vmm.scratch import CODE_GPA, scratch_vm
from vmm.uapi import ffi

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


def alias_vmas(alias: MemoryAlias) -> list[tuple[int, int, str]]:
    """(start, end, "rw-"-style protection) of the VMAs covering `alias`, from the kernel."""
    lo, hi = alias.host_addr, alias.host_addr + alias.size
    out = []
    with open("/proc/self/maps") as f:
        for line in f:
            addr, perms = line.split()[:2]
            a, b = (int(x, 16) for x in addr.split("-"))
            if lo <= a and b <= hi:
                out.append((a - lo, b - lo, perms[:3]))
    return out


def expected_vmas(runs: list[tuple[int, int, int]], size: int) -> list[tuple[int, int, str]]:
    """The VMAs the alias should have: protections per run, read-write outside runs, equal
    neighbours merged (as the kernel merges them)."""
    segs: list[tuple[int, int, str]] = []
    pos = 0
    for s, e, a in [*runs, (size, size, 0)]:
        for seg in ((pos, s, "rw-"), (s, e, "---" if a & NR else "r--" if a & NW else "rw-")):
            if seg[1] <= seg[0]:
                continue
            if segs and segs[-1][1] == seg[0] and segs[-1][2] == seg[2]:
                segs[-1] = (segs[-1][0], seg[1], seg[2])
            else:
                segs.append(seg)
        pos = e
    return segs


@pytest.mark.kvm
@pytest.mark.parametrize("kind", ["memslot", "host_mapping"])
def test_random_changes_match_a_page_model(vm_mem: tuple[Vm, GuestMemory], kind: str) -> None:
    vm, mem = vm_mem
    b: MemslotBackend | HostMappingBackend = (MemslotBackend if kind == "memslot" else HostMappingBackend)(
        vm, mem, [(0, 16 * MiB)])
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
    if isinstance(b, MemslotBackend):
        assert len(vm.slots) == sum(1 for _, _, a in runs if not a & NR)
    else:
        assert len(vm.slots) == 1                       # one memslot on the alias, whatever happens
        vmas = alias_vmas(b.alias)
        assert vmas == expected_vmas(runs, mem.size) and len(vmas) == b.vmas


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
    assert b.runs() == [(0, MiB, 0), (MiB, 17 * MiB, NW | NX), (17 * MiB, 64 * MiB, 0)]
    with pytest.raises(VmmError, match="invalid"):
        b.set_range(0, P, NR)
    assert b.ops == 1                                    # refused before any ioctl


# --- host-mapping backend ----------------------------------------------------------------
PROT = 0x200000            # the scratch VM's second 2 MiB: mapped through the backend's alias
NWP, NRP, NXP = PROT, PROT + P, PROT + 2 * P


def _store(addr: int) -> bytes:               # mov [addr32], rax
    return bytes.fromhex("48890425") + addr.to_bytes(4, "little")


def _load(addr: int) -> bytes:                # mov rax, [addr32]
    return bytes.fromhex("488b0425") + addr.to_bytes(4, "little")


@pytest.mark.kvm
def test_alias_is_the_same_memory_with_its_own_mapping() -> None:
    mem = GuestMemory(4 * MiB)
    try:
        a = mem.alias()
        assert a.host_addr != mem.host_addr and a.size == mem.size and mem.aliases == [a]
        mem.write(0x1234, b"shared")
        assert ffi.buffer(ffi.cast("char *", a.host_addr + 0x1234), 6)[:] == b"shared"
        assert a.mprotect(0, P, 1) == 0 and a.mprotect(1, P, 1) != 0   # EINVAL: unaligned
        with pytest.raises(VmmError, match="outside guest memory"):
            a.mprotect(4 * MiB, P, 1)
    finally:
        mem.close()
    assert a.closed and mem.fd == -1
    with pytest.raises(VmmError, match="closed"):
        mem.alias()
    with pytest.raises(VmmError, match="multiple of 4 KiB"):
        GuestMemory(4097)


@pytest.mark.kvm
def test_host_mapping_violations_exit_like_readonly_and_unmapped_memslots() -> None:
    # mov rax, 0xdeadbeef; mov [NWP], rax; out 0xf0; mov rax, [NRP]; out 0xf1; mov rax, NXP; jmp rax
    code = (bytes.fromhex("48b8efbeadde00000000") + _store(NWP) + bytes.fromhex("e6f0") + _load(NRP)
            + bytes.fromhex("e6f1" "48b8") + NXP.to_bytes(8, "little") + bytes.fromhex("ffe0"))
    after_store = CODE_GPA + 10 + 8
    with scratch_vm(code, unmapped=[(PROT, 2 * MiB)]) as s:
        b = HostMappingBackend(s.vm, s.mem, [(PROT, 2 * MiB)])
        assert s.vm.slots[b.slots[0]] == (PROT, 2 * MiB, 0)       # writable memslot, on the alias
        s.mem.write_u64(NWP, 0x1111)
        s.mem.write_u64(NRP, 0x2222)
        s.mem.write(NXP, b"\xf4")
        b.set_range(NWP, P, NW)
        b.set_range(NRP, 2 * P, NR | NW | NX)
        assert b.runs() == [(PROT, NWP + P, NW), (NRP, NRP + 2 * P, NR | NW | NX),
                            (NRP + 2 * P, PROT + 2 * MiB, 0)]
        e = s.run()
        assert e == Mmio(NWP, 8, True, (0xDEADBEEF).to_bytes(8, "little"))
        assert s.vcpu.sync.regs.rip == after_store and s.mem.read_u64(NWP) == 0x1111
        assert isinstance(s.run(), IoOut)
        e = s.run()
        assert e == Mmio(NRP, 8, False, b"")
        complete_mmio_read(s.vcpu, bytes(8))
        assert isinstance(s.run(), IoOut)
        assert isinstance(s.run(), EmulationFailure) and s.vcpu.sync.regs.rip == NXP
        # The VMM's mapping is unaffected; lifting the protection lets the guest in again.
        s.mem.write_u64(NWP, 0x3333)
        assert s.mem.read_u64(NRP) == 0x2222
        b.set_range(NRP, 2 * P, 0)
        assert isinstance(s.run(), Hlt)                       # the fetch at NXP now runs its HLT


@pytest.mark.kvm
def test_the_other_mapping_is_unaffected() -> None:
    """A second VM on the main mapping (VTL1's place) writes and reads the pages that the
    protected VM may not touch."""
    attack = bytes.fromhex("48b8efbeadde00000000") + _store(NWP) + bytes.fromhex("f4")
    # mov rax, 0x4444; mov [NWP], rax; mov rax, [NRP]; out 0xf2, al
    other = bytes.fromhex("48c7c044440000") + _store(NWP) + _load(NRP) + bytes.fromhex("e6f2")
    with scratch_vm(attack, unmapped=[(PROT, 2 * MiB)]) as s0:
        b = HostMappingBackend(s0.vm, s0.mem, [(PROT, 2 * MiB)])
        with scratch_vm(other, kvm=s0.kvm, mem=s0.mem, code_gpa=CODE_GPA + P) as s1:
            s0.mem.write_u64(NRP, 0x55)
            b.set_range(NWP, P, NW)
            b.set_range(NRP, P, NR | NW | NX)
            e0 = s0.run()
            assert isinstance(e0, Mmio) and e0.is_write and s0.mem.read_u64(NWP) == 0
            assert s1.run() == IoOut(0xF2, 1, b"\x55")
            assert s0.mem.read_u64(NWP) == 0x4444


@pytest.mark.kvm
def test_host_mapping_refuses_past_its_vma_budget_and_changes_nothing(
        vm_mem: tuple[Vm, GuestMemory]) -> None:
    vm, mem = vm_mem
    b = HostMappingBackend(vm, mem, [(0, 16 * MiB)], vma_budget=6)
    for i in range(3):                                   # 3 islands: 6 extra VMAs
        b.set_range((2 * i + 1) * P, P, NW)
    b.set_range(6 * P, P, NW | NX)                       # same protection as its NW neighbour: no new VMA
    assert b.vmas == 7 == len(alias_vmas(b.alias))
    runs, vmas, held = b.runs(), alias_vmas(b.alias), VMA_LEDGER.held
    with pytest.raises(ExhaustedError, match="may add 6"):
        b.set_range(9 * P, P, NW)
    assert b.runs() == runs and alias_vmas(b.alias) == vmas and VMA_LEDGER.held == held
    b.set_range(P, 7 * P, 0)                             # fewer VMAs is always possible
    assert b.vmas == 1 and VMA_LEDGER.held == held - 6
    b.set_range(P, P, NW)
    b2 = HostMappingBackend(vm, mem, [(16 * MiB, 16 * MiB)])
    b2.set_range(16 * MiB, P, NW)
    assert VMA_LEDGER.held == held - 6 + 4
    b2.close()                                           # its memslot and alias go, its VMAs too
    assert b2.alias.closed and b2.alias not in mem.aliases and VMA_LEDGER.held == held - 6 + 2
    assert [v[0] for v in vm.slots.values()] == [0]
    b2.close()
    b.set_range(P, P, 0)
    mem.close()                                          # the alias goes: its VMAs leave the ledger
    assert VMA_LEDGER.held == held - 6 and b.vmas == 0
    with pytest.raises(VmmError, match="closed"):
        b.set_range(P, P, NW)


@pytest.mark.kvm
def test_bad_requests_raise_vmm_errors(vm_mem: tuple[Vm, GuestMemory]) -> None:
    vm, mem = vm_mem
    with pytest.raises(VmmError, match="overlap"):
        HostMappingBackend(vm, mem, [(0, 2 * P), (P, P)])
    with pytest.raises(VmmError, match="outside guest memory"):
        MemslotBackend(vm, mem, [(0, 128 * MiB)])
    b = HostMappingBackend(vm, mem, [(0, MiB), (2 * MiB, MiB)])
    for args, match in [((1, P, NW), "aligned"), ((0, 0, NW), "aligned"), ((0, P, NR), "invalid"),
                        ((MiB - P, 2 * P, NW), "not memory"), ((0, 3 * MiB, NW), "may not map"),
                        ((0, P, 1 << 7), "invalid")]:
        with pytest.raises(VmmError, match=match):
            b.set_range(*args)
    assert b.runs() == [(0, MiB, 0), (2 * MiB, 3 * MiB, 0)] and b.ops == 2


@pytest.mark.kvm
def test_make_backend_chooses_by_probing_and_honours_explicit_kinds(vm_mem: tuple[Vm, GuestMemory]) -> None:
    vm, mem = vm_mem
    # This host: no RWX attributes, host mapping probes working (design §2).
    assert default_backend_kind(vm) == "host_mapping"
    b = make_backend(None, vm, mem, [(0, 4 * MiB)])
    assert isinstance(b, HostMappingBackend) and b.name == "host_mapping"
    assert b.enforceable(NR | NW | NX) == NR | NW
    with pytest.raises(VmmError, match="KVM_CAP_MEMORY_ATTRIBUTES"):
        make_backend("rwx", vm, mem, [(8 * MiB, MiB)])
    with pytest.raises(VmmError, match="unknown attribute backend"):
        make_backend("mprotect", vm, mem, [(8 * MiB, MiB)])
    m = make_backend("memslot", vm, mem, [(8 * MiB, MiB)])
    assert isinstance(m, MemslotBackend) and m.runs() == [(8 * MiB, 9 * MiB, 0)]


# --- all or nothing ------------------------------------------------------------------------
class _FailOnCall:
    """Wraps Vm._set_region (the one memslot ioctl) to fail from its `n`-th call on, for
    `times` calls: KVM itself never fails on demand."""

    def __init__(self, vm: Vm, n: int, times: int = 1) -> None:
        self.real, self.n, self.times, self.calls = vm._set_region, n, times, 0

    def __call__(self, slot: int, flags: int, gpa: int, size: int, hva: int) -> None:
        self.calls += 1
        if self.n <= self.calls < self.n + self.times:
            raise KvmIoctlError("KVM_SET_USER_MEMORY_REGION", errno.ENOSPC, "injected")
        self.real(slot, flags, gpa, size, hva)


@pytest.mark.kvm
def test_memslot_change_failing_at_any_step_changes_nothing(
        vm_mem: tuple[Vm, GuestMemory], monkeypatch: pytest.MonkeyPatch) -> None:
    vm, mem = vm_mem
    b = MemslotBackend(vm, mem, [(0, 16 * MiB)])
    for i in range(4):
        b.set_range((2 * i + 1) * P, P, NW if i % 2 else NR | NW | NX)
    runs, slots = b.runs(), dict(vm.slots)
    # Clearing pages 1..7 deletes every mapped run from 0 to the tail and adds one memslot:
    # fail each of those ioctls in turn.
    steps = sum(1 for _, _, a in runs if not a & NR) + 1
    for n in range(1, steps + 1):
        inject = _FailOnCall(vm, n)
        monkeypatch.setattr(vm, "_set_region", inject)
        ops = b.ops
        with pytest.raises(KvmIoctlError, match="injected"):
            b.set_range(P, 7 * P, 0)
        monkeypatch.undo()
        assert b.runs() == runs and vm.slots == slots, f"failure at call {n}"
        assert b.ops > ops                              # the undo's ioctls are counted too
    b.set_range(P, 7 * P, 0)                            # KVM agrees with the bookkeeping
    assert b.runs() == [(0, 16 * MiB, 0)] and len(vm.slots) == 1


@pytest.mark.kvm
def test_memslot_failed_undo_is_reported(vm_mem: tuple[Vm, GuestMemory],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    vm, mem = vm_mem
    b = MemslotBackend(vm, mem, [(0, 16 * MiB)])
    monkeypatch.setattr(vm, "_set_region", _FailOnCall(vm, 2, times=100))
    with pytest.raises(VmmError, match="so did undoing it"):
        b.set_range(P, P, NW)


@pytest.mark.kvm
def test_a_failed_change_leaves_protection_enforced() -> None:
    code = bytes.fromhex("48b8efbeadde00000000") + _store(NWP) + bytes.fromhex("f4")
    with scratch_vm(code, unmapped=[(PROT, 2 * MiB)]) as s:
        b = MemslotBackend(s.vm, s.mem, [(PROT, 2 * MiB)])
        b.set_range(NWP, P, NW)
        real = s.vm._set_region
        s.vm._set_region = _FailOnCall(s.vm, 3)          # type: ignore[method-assign]
        with pytest.raises(KvmIoctlError):
            b.set_range(NWP, 2 * P, 0)                   # delete NW, delete rest, add (fails)
        s.vm._set_region = real                          # type: ignore[method-assign]
        e = s.run()
        assert isinstance(e, Mmio) and e.is_write and e.gpa == NWP and s.mem.read_u64(NWP) == 0


@pytest.mark.kvm
def test_host_mapping_partial_mprotect_failure_is_undone(vm_mem: tuple[Vm, GuestMemory],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    vm, mem = vm_mem
    b = HostMappingBackend(vm, mem, [(0, 16 * MiB)])
    for i in range(4):
        b.set_range((2 * i + 1) * P, P, NW if i % 2 else NR | NW | NX)
    runs, vmas, held, ops = b.runs(), alias_vmas(b.alias), VMA_LEDGER.held, b.ops
    real = b._sys_mprotect
    failed: list[int] = []

    def partial(addr: int, size: int, prot: int) -> int:
        # As the kernel may: protect the first pages, then fail (ENOMEM: VMA limit).
        if not failed:
            failed.append(addr - b.alias.host_addr)
            assert real(addr, size // 2, prot) == 0
            ffi.errno = errno.ENOMEM
            return -1
        return int(real(addr, size, prot))

    monkeypatch.setattr(b, "_sys_mprotect", partial)
    with pytest.raises(ExhaustedError, match="Nothing was changed"):
        b.set_range(0, 10 * P, NR | NW | NX)
    monkeypatch.undo()
    assert failed == [0]
    assert b.runs() == runs and alias_vmas(b.alias) == vmas and VMA_LEDGER.held == held
    assert b.ops > ops + 1                              # the mprotect and its undo

    def refuse(addr: int, size: int, prot: int) -> int:
        ffi.errno = errno.EACCES
        return -1

    monkeypatch.setattr(b, "_sys_mprotect", refuse)
    with pytest.raises(VmmError, match="so did undoing it"):
        b.set_range(0, 10 * P, NR | NW | NX)


@pytest.mark.kvm
def test_code_and_page_tables_on_nw_pages_still_run() -> None:
    """NW is r-x: kernel text and locked page tables live on such pages.  The guest runs
    code from a PROT_READ alias page, through page tables that are PROT_READ too."""
    tables = PROT + 16 * P
    jump = bytes.fromhex("48b8") + (PROT + 5 * P).to_bytes(8, "little") + bytes.fromhex("ffe0")
    with scratch_vm(jump, unmapped=[(PROT, 2 * MiB)]) as s:
        b = HostMappingBackend(s.vm, s.mem, [(PROT, 2 * MiB)])
        s.mem.write(PROT + 5 * P, bytes.fromhex("b07be6f5f4"))        # mov al, 0x7b; out 0xf5; hlt
        # Copy the identity tables into the protected area (A/D already set) and switch CR3.
        s.mem.write(tables, s.mem.read(0x2000, 3 * P))
        s.mem.write_u64(tables, (tables + P) | 0x23)
        s.mem.write_u64(tables + P, (tables + 2 * P) | 0x23)
        sregs = s.vcpu.get_sregs()
        sregs.cr3 = tables
        s.vcpu.set_sregs(sregs)
        b.set_range(PROT, 32 * P, NW)
        assert s.run() == IoOut(0xF5, 1, b"\x7b")
        assert isinstance(s.run(), Hlt)
