"""VTL1's SHA-256 (guest_vtl1/sha256.c) through VTL_CALL_SHA256, on real KVM.

The guest fills buffers from a seeded PRNG and asks VTL1 to hash them into a digest
array; after the run the VMM reads both the data and the digests back from guest memory
and the verdict is Python's hashlib on those bytes, never the guest's own claim.  The
lengths cover the padding boundaries (0, 55, 56, 63, 64, 65) and multi-page data."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from tests.vtlrun import run_scenario
from vmm.elf import read_image
from vtl.abi import ABI

pytestmark = pytest.mark.kvm

LENGTHS = [0, 1, 55, 56, 63, 64, 65, 1000, 4096 * 3 + 7]


@pytest.mark.parametrize("seed", [1, 0xDEADBEEF])
def test_vtl1_sha256_matches_hashlib_on_memory_the_vmm_reads_back(guest_images: tuple[Path, Path],
                                                                  seed: int) -> None:
    syms = read_image(guest_images[0]).symbols()
    data_gpa, digests_gpa = syms["sha_data"], syms["sha_digests"]
    total = sum(LENGTHS)
    run = run_scenario(guest_images, "sha256-selftest", param=seed,
                       snapshot=[(data_gpa, total), (digests_gpa, 32 * len(LENGTHS))])
    assert run.passed(), "\n".join(run.console[-15:])
    assert run.report("value", "sha256_data").value[0] == data_gpa
    assert [run.report("value", f"sha256_len_{i}").value[0] for i in range(len(LENGTHS))] == LENGTHS
    data = run.memory[(data_gpa, total)]
    digests = run.memory[(digests_gpa, 32 * len(LENGTHS))]
    assert len(set(data)) > 200                      # seeded random bytes, not a constant fill
    off = 0
    for i, n in enumerate(LENGTHS):
        assert run.report("status", f"sha256stat_{i}").value[:2] == [ABI.VTL_CALL_SHA256, ABI.VTL_OK]
        want = hashlib.sha256(data[off:off + n]).digest()
        assert digests[32 * i:32 * i + 32] == want, f"length {n}"
        off += n
    # The refusals: too long, output or data in VTL1's region.
    for key in ("sha256_too_long", "sha256_out_in_vtl1", "sha256_data_in_vtl1"):
        assert run.report("status", key).value[1] == ABI.VTL_E_INVALID_ARG, key
    # Each hash was VTL1's: a VTL call per buffer, served by VTL1.
    calls = [e for e in run.events.of_kind("vtl_call") if e.code == ABI.VTL_CALL_SHA256]  # type: ignore[union-attr]
    assert len(calls) == len(LENGTHS) + 3
