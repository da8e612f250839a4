"""vtl/protect_bench.py: outcomes of protecting N pages read-only, never timings."""

from __future__ import annotations

from typing import Any

import pytest

from vmm.memattr import VMA_LEDGER
from vtl.tools.protect_bench import (
    FLAT_WINDOW,
    flatness,
    format_costs,
    guest_size_independence,
    host_mapping_case,
    host_memslot_limit,
    max_alternating_pages,
    memslot_case,
    memslots_needed,
    protection_costs,
    rwx_fake_case,
    vmas_needed,
)

pytestmark = pytest.mark.kvm

MiB = 1 << 20
GiB = 1 << 30


@pytest.fixture(scope="module")
def costs() -> dict[str, Any]:
    # Small sizes keep this fast (the default sizes take ~10 s).
    return protection_costs(sizes=(256, 1024), independence_pages=256)


def test_contiguous_ops_are_a_small_constant_independent_of_n() -> None:
    small = memslot_case("contiguous", 1024)
    big = memslot_case("contiguous", 16384)
    assert small["ops"] == big["ops"] <= 4
    assert small["memslots_in_use"] == big["memslots_in_use"] == memslots_needed("contiguous", 1024)


def test_alternating_ops_grow_with_ranges(costs: dict[str, Any]) -> None:
    alt = costs["memslot"]["alternating"]
    a, b = alt[256], alt[1024]
    assert a["ranges"] == 256 and b["ranges"] == 1024
    assert b["ops"] > a["ops"]
    assert b["ops"] // b["ranges"] == a["ops"] // a["ranges"]      # a constant per range
    assert b["ops"] >= b["ranges"]
    for n, c in alt.items():
        assert c["progress"][-1] == (n, c["seconds"], c["ops"])
        assert c["memslots_in_use"] == memslots_needed("alternating", n) == 2 * n + 1
    cont = costs["memslot"]["contiguous"]
    assert cont[256]["ops"] == cont[1024]["ops"] < a["ops"]


def test_ops_equal_on_256mib_and_4gib_guest() -> None:
    gi = guest_size_independence(pages=1024, guest_sizes=(256 * MiB, 4 * GiB))
    for layout in ("contiguous", "alternating"):
        ops = gi[layout]["ops"]
        assert set(ops) == {256 * MiB, 4 * GiB}
        assert ops[256 * MiB] == ops[4 * GiB] > 0
        assert gi[layout]["equal"]
    assert gi["equal"]


def test_alternating_65536_is_refused_with_the_limit_not_a_number() -> None:
    limit = host_memslot_limit()
    assert memslots_needed("alternating", 65536) > limit     # impossible on this host
    # Reaching the real limit takes ~16k set_range calls (~3 s here); a lowered limit
    # exercises the same ExhaustedError path of the real backend in well under a second.
    low = 512
    c = memslot_case("alternating", 65536, max_slots=low)
    assert "refused" in c and str(low) in c["refused"]
    assert c["memslots_needed"] == 2 * 65536 + 1 and c["memslot_limit"] == low
    for key in ("ops", "seconds", "ns_per_page", "ns_per_range", "memslots_in_use"):
        assert key not in c
    # Refused exactly when the next range would exceed the limit: 2N + 1 memslots for N ranges.
    assert c["applied_before_refusal"] == max_alternating_pages(low) == (low - 1) // 2
    assert c["memslots_at_refusal"] == 2 * c["applied_before_refusal"] + 1 <= low
    assert f"needs {low + 1} memslots" in c["refused"]
    assert "REFUSED" in format_costs({"memslot": {"alternating": {65536: c}}})


def test_rwx_fake_issues_one_ioctl_per_range(costs: dict[str, Any]) -> None:
    rwx = costs["rwx_fake"]
    assert rwx["fake"] is True
    for layout in ("contiguous", "alternating"):
        for n, c in rwx[layout].items():
            assert c["fake"] is True
            assert c["ioctls"] == c["ranges"] == c["ops"]
            assert c["ranges"] == (1 if layout == "contiguous" else n)
    assert rwx_fake_case("alternating", 64)["ioctls"] == 64


def test_host_mapping_issues_one_mprotect_per_range_on_one_memslot(costs: dict[str, Any]) -> None:
    hm = costs["host_mapping"]
    for n, c in hm["alternating"].items():
        assert c["backend"] == "host_mapping" and "refused" not in c
        assert c["ops"] == c["ranges"] == n                      # one mprotect per range
        assert c["memslots_in_use"] == 1                         # never more memslots
        assert c["vmas_in_use"] == vmas_needed("alternating", n) == 2 * n + 1
        assert c["progress"][-1] == (n, c["seconds"], c["ops"])
    for c in hm["contiguous"].values():
        assert c["ops"] == 1 and c["vmas_in_use"] == 3


def test_every_real_case_reports_syscall_share_and_flatness(costs: dict[str, Any]) -> None:
    for kind in ("memslot", "host_mapping"):
        for layout, cases in costs[kind].items():
            for n, c in cases.items():
                assert 0 < c["syscall_share"] <= 1 and 0 < c["syscall_s"] <= c["seconds"]
                if layout == "contiguous":
                    assert c["flatness"] is None                 # one range: nothing to compare
                else:
                    f = c["flatness"]
                    assert f["window"] == min(FLAT_WINDOW, n // 2) and f["ratio"] > 0
                    assert f["first_s"] > 0 and f["last_s"] > 0


def test_flatness_compares_the_last_window_with_the_first() -> None:
    stamps = [float(i) for i in range(3001)]                     # 1 s per range
    assert flatness(stamps) == {"window": 1000, "first_s": 1000.0, "last_s": 1000.0, "ratio": 1.0}
    growing = [i * i / 1000 for i in range(11)]                  # cost grows with ranges done
    f = flatness(growing)
    assert f is not None and f["window"] == 5 and f["ratio"] > 2
    assert flatness([0.0, 1.0]) is None


def test_host_mapping_refusal_at_its_vma_budget_is_recorded_not_invented() -> None:
    held = VMA_LEDGER.held
    c = host_mapping_case("alternating", 4096, vma_budget=100)
    assert "refused" in c and "may add 100" in c["refused"]
    assert c["applied_before_refusal"] == 50 and c["vmas_at_refusal"] == 101
    assert c["ops_before_refusal"] == 50
    for key in ("ops", "seconds", "ns_per_page", "ns_per_range", "vmas_in_use"):
        assert key not in c
    assert VMA_LEDGER.held == held                               # released with the memory
    text = format_costs({"host_mapping": {"alternating": {4096: c}}})
    assert "REFUSED" in text and "host mappings (VMAs)" in text


def test_format_costs_has_every_row(costs: dict[str, Any]) -> None:
    text = format_costs(costs)
    assert "kernel ops" in text and "ns/range" in text and "in syscalls" in text
    assert "last/first 1k" in text and "host mappings: vm.max_map_count" in text
    assert text.count("rwx (FAKE)") >= 4 and "guest-size independence" in text
    assert text.count("host_mapping ") >= 4 and text.count("memslot ") >= 4
