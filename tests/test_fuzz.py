"""A malicious guest and malformed requests: the VMM keeps running, VTL1's memory is
untouched, and VTL0's attributes change only where VTL1 approved."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.vtlrun import run_scenario
from vmm.elf import read_image
from vmm.memattr import NR, NW, NX
from vmm.memory import PAGE_SIZE, GuestMemory
from vtl.abi import ABI, abi_struct
from vtl.core.config import PartitionConfig
from vtl.core.layout import Layout
from vtl.core.partition import Partition
from vtl.core.vtl import Vtl
from vtl.services.protection import Vtl0Protection

pytestmark = pytest.mark.kvm
MEM = 128 << 20


# The malicious guest's requests (its default is 10,000; 4,000 answer every kind of request
# and refusal many times over, in half the time).
REQUESTS = 4000


def test_malicious_vtl0_requests(guest_images: tuple[Path, Path]) -> None:
    vtl1 = read_image(guest_images[1])
    syms = vtl1.symbols()
    pages = (256 << 20) // PAGE_SIZE     # the default guest size
    code = [(s.gpa, s.filesz) for s in vtl1.segments if not s.flags & 2]   # VTL1's R/RX segments
    run = run_scenario(guest_images, "fuzz-protection", param=REQUESTS,
                       snapshot=[(syms["page"], pages), *code])
    assert run.result.status == 0, "\n".join(run.console[-10:])
    assert run.passed() and run.report("result", "fuzz-protection").vtl == 0
    # VTL0's own tally: no accepted W+X or after-boot request; every request answered.
    tally = {r.name: r.value[0] for r in run.of_kind("value") if r.vtl == 0}
    assert tally["policy_violations"] == 0
    assert tally["requests"] == REQUESTS and tally["accepted"] + tally["refused"] == REQUESTS
    assert run.report("status", "end_of_boot").value[1] == ABI.VTL_OK
    assert run.report("value", "echo_rcx").value[0] == 0x1235       # VTL1 still serves calls
    # The VMM refused none of VTL1's requests (VTL1's own STATUS reports are its reasons for
    # the kexec calls it refused).
    assert not [r for r in run.of_kind("status") if r.vtl == 1 and not r.name.startswith("kexec_")]
    # VTL1's code and read-only data are byte for byte what was loaded.
    for gpa, size in code:
        seg = next(s for s in vtl1.segments if s.gpa == gpa)
        assert run.memory[(gpa, size)] == vtl1.data[seg.offset:seg.offset + size]
    # The VMM's attribute map is exactly what VTL1 recorded as approved.
    approved = run.memory[(syms["page"], pages)]
    lay = Layout(256 << 20)
    for i, attrs in enumerate(run.attr_map):
        if not lay.in_vtl1(i * PAGE_SIZE):
            want = approved[i] & 7
            assert attrs == want, f"page {i:#x}: VMM {attrs:#x}, VTL1 approved {want:#x}"
            assert attrs & (NW | NX), f"page {i:#x} is writable and executable"
    # And KVM's memslots say the same: NW pages read-only, NR pages unmapped.
    for start, end, a in run.memslot_runs:
        assert set(run.attr_map[start // PAGE_SIZE:end // PAGE_SIZE]) == {a}
    assert len(run.events.of_kind("refused")) > REQUESTS // 10


@pytest.fixture
def protection(guest_images: tuple[Path, Path]) -> Iterator[tuple[Partition, GuestMemory, Layout]]:
    cfg = PartitionConfig(vtl0_image=guest_images[0], mem_size=MEM, attr_backend="memslot")
    with Partition(cfg) as p:
        yield p, p.mem, p.layout


def _expect(lay: Layout, target: int, caller: int, attrs: int, flags: int, count: int, start: int,
            entries: list[tuple[int, int]], list_ok: bool, model: bytearray) -> tuple[int, int]:
    """An independent statement of the hypercall's contract; applies to `model`."""
    if caller != 1:
        return ABI.VTL_E_ACCESS_DENIED, 0
    if target >= caller:
        return ABI.VTL_E_ACCESS_DENIED, start
    if attrs & ~7 or (attrs & NR and attrs != 7) or flags & ~1:
        return ABI.VTL_E_INVALID_ARG, start
    if start > count or not list_ok:
        return ABI.VTL_E_INVALID_ARG, start
    end = min(count, start + ABI.VTL_PROTECT_MAX_PER_CALL)
    for i in range(start, end):
        gpa, n = entries[i]
        if gpa % PAGE_SIZE:
            return ABI.VTL_E_MISALIGNED, i
        if n == 0 or gpa + n * PAGE_SIZE > lay.mem_size:
            return ABI.VTL_E_OUT_OF_RANGE, i
        if lay.in_vtl1(gpa, n * PAGE_SIZE):
            return ABI.VTL_E_OVERLAPS_VTL1, i
        model[gpa // PAGE_SIZE:gpa // PAGE_SIZE + n] = bytes([attrs]) * n
    return ABI.VTL_OK, end


def test_10000_seeded_random_requests_match_the_contract(
        protection: tuple[Partition, GuestMemory, Layout]) -> None:
    part, mem, lay = protection
    prot = Vtl0Protection(part)
    rng = random.Random(20261124)
    req_gpa, list_gpa = lay.vtl1_base + 0x200000, lay.vtl1_base + 0x201000
    model = bytearray(MEM // PAGE_SIZE)
    pages = MEM // PAGE_SIZE

    def gpa() -> int:
        k = rng.randrange(6)
        if k == 0:
            return rng.getrandbits(64)
        if k == 1:
            return rng.randrange(pages) * PAGE_SIZE + rng.randrange(1, PAGE_SIZE)
        if k == 2:
            return lay.vtl1_base + rng.randrange(lay.vtl1_size // PAGE_SIZE) * PAGE_SIZE
        return rng.randrange(pages) * PAGE_SIZE

    statuses: dict[int, int] = {}
    for _ in range(10000):
        ranges = rng.random() < 0.5
        count = rng.choice([0, 1, 2, 5, 17, 64, rng.getrandbits(32)])
        n_real = min(count, 64)
        entries = [(gpa(), rng.choice([0, 1, 3, 64, 1 << 40]) if ranges else 1) for _ in range(n_real)]
        raw = b"".join(g.to_bytes(8, "little") + (n.to_bytes(8, "little") if ranges else b"")
                       for g, n in entries)
        mem.write(list_gpa, raw)
        lg = rng.choice([list_gpa, list_gpa, list_gpa, 0x100000, lay.vtl1_end - 8, rng.getrandbits(64)])
        esize = 16 if ranges else 8
        list_ok = lay.vtl1_base <= lg and lg + count * esize <= lay.vtl1_end
        r = abi_struct(mem, "struct vtl_protect_request", req_gpa)
        r.target_vtl = rng.choice([0, 0, 0, 1, 2, 0xFFFFFFFF])
        r.attributes = rng.choice([0, NW, NX, NW | NX, 7, NR, 8, 0xFFFFFFFF])
        r.flags = (1 if ranges else 0) | rng.choice([0, 0, 0, 2])
        r.count = count
        r.start_index = rng.choice([0, 0, 0, 1, count, count + 1])
        r.list_gpa = lg
        caller = rng.choice([1, 1, 1, 1, 0])
        if lg == list_gpa and count <= 64:
            exp_entries = entries
        elif list_ok:
            # A list VTL1 owns but the test did not fill: read what is there.
            data = mem.read(lg, min(count, ABI.VTL_PROTECT_MAX_PER_CALL + int(r.start_index)) * esize)
            exp_entries = [(int.from_bytes(data[i:i + 8], "little"),
                            int.from_bytes(data[i + 8:i + 16], "little") if ranges else 1)
                           for i in range(0, len(data), esize)]
        else:
            exp_entries = []
        want = _expect(lay, int(r.target_vtl), caller, int(r.attributes), int(r.flags), count,
                       int(r.start_index), exp_entries, list_ok, model)
        out = prot.modify(req_gpa, Vtl(caller))
        assert (out.status, out.next_index) == want
        statuses[out.status] = statuses.get(out.status, 0) + 1
    assert part.vtl0_attrs == model
    for start, end, a in part.backend.runs():     # type: ignore[attr-defined]
        assert set(model[start // PAGE_SIZE:end // PAGE_SIZE]) == {a}
    # Every refusal kind was exercised, and some requests went through.
    for code in ("VTL_OK", "VTL_E_ACCESS_DENIED", "VTL_E_INVALID_ARG", "VTL_E_MISALIGNED",
                 "VTL_E_OUT_OF_RANGE", "VTL_E_OVERLAPS_VTL1"):
        assert statuses.get(getattr(ABI, code), 0) > 20, (code, statuses)
