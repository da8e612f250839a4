"""A hostile VTL1 never makes a VMM error (issue 14, item 4).

VTL1 (tests/hostile_vtl1.py) answers every secure intercept with verdicts the test
chose: each field fuzzed, one invalid field at a time, and valid but unusual ones in the
thousands.  What the user sees is the outcome: the run ends with VTL1's stop and a reason
naming the field, or VTL0 finishes its loop; the exit status is never the VMM-error one.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from tests.hostile_vtl1 import KINDS, HostileRun, Verdict, run_hostile
from tests.v9guest import HAVE_BINUTILS
from vtl.abi import ABI
from vtl.core.events import InterceptVerdict, RefusedRequest
from vtl.services.outcomes import STATUS_STOPPED_BY_VTL1, STATUS_VMM_ERROR

pytestmark = [pytest.mark.kvm, pytest.mark.skipif(not HAVE_BINUTILS, reason="needs binutils (as, ld)")]

INJECT, ALLOW, STOP = ABI.VTL_VERDICT_INJECT_FAULT, ABI.VTL_VERDICT_ALLOW, ABI.VTL_VERDICT_STOP
GOOD = [Verdict(INJECT, 13, 1, 0), Verdict(ALLOW), Verdict(INJECT, 6), Verdict(INJECT, 14, 1, 3, 0x5000)]

# One bad field each, after four good verdicts; (verdict, what the reason names).
INVALID = [
    (Verdict(INJECT, 14, 1, 0xEEA9A453, 0x1234), "reserved bits 31:16"),     # the issue's example
    (Verdict(0), "verdict 0x0 is not"),
    (Verdict(7), "verdict 0x7 is not"),
    (Verdict(0xFFFFFFFF, 13, 1), "verdict 0xffffffff is not"),
    (Verdict(INJECT, 2), "NMI is not an exception"),
    (Verdict(INJECT, 9), "vector 0x9 is not an exception"),
    (Verdict(INJECT, 3), "#BP is not an exception"),
    (Verdict(INJECT, 4), "#OF is not an exception"),
    (Verdict(INJECT, 15), "vector 0xf is not"),
    (Verdict(INJECT, 20), "#VE is not"),
    (Verdict(INJECT, 31), "vector 0x1f is not"),
    (Verdict(INJECT, 32), "vector 0x20 is not"),
    (Verdict(INJECT, 0x10D), "vector 0x10d is not"),                       # #GP's number in the low byte
    (Verdict(INJECT, 6, 1, 0), "#UD has no error code"),
    (Verdict(INJECT, 13, 0, 0), "#GP pushes error code"),
    (Verdict(INJECT, 13, 2, 0), "fault_has_error_code 0x2"),
    (Verdict(INJECT, 6, 0, 5), "error code 0x5 given for #UD"),
    (Verdict(INJECT, 13, 1, 0x10000), "reserved bits 31:16"),
    (Verdict(INJECT, 8, 1, 1), "#DF error code 0x1: it is always 0"),
    (Verdict(INJECT, 17, 1, 4), "#AC error code 0x4"),
    (Verdict(INJECT, 14, 1, 0x100), "reserved bits 14:8"),
    (Verdict(INJECT, 21, 1, 0), "#CP error code 0x0 is not one of 1-6"),
    (Verdict(INJECT, 14, 1, 2, 0x0000800000000000), "not a canonical address"),
    (Verdict(INJECT, 13, 1, 0, 0x1000), "only #PF sets CR2"),
    (Verdict(ALLOW, 13), "reserved (0) unless injecting"),
    (Verdict(ALLOW, 0, 0, 0, 0x1000), "reserved (0) unless injecting"),
    (Verdict(STOP, 0, 1), "reserved (0) unless injecting"),
]


def _never_a_vmm_error(r: HostileRun) -> None:
    res = r.result
    assert res.status != STATUS_VMM_ERROR and res.reason != "vmm_error", res
    assert "internal error" not in res.message and "KVM_RUN failed" not in res.message, res


@pytest.mark.parametrize(("bad", "why"), INVALID, ids=[w for _, w in INVALID])
def test_an_invalid_verdict_field_stops_the_partition_with_the_reason(tmp_path: Path, bad: Verdict,
                                                                      why: str) -> None:
    r = run_hostile(tmp_path, [*GOOD, bad], 40)
    _never_a_vmm_error(r)
    assert r.setup == (ABI.VTL_OK,) * 3
    assert (r.result.reason, r.result.status) == ("stopped_by_vtl1", STATUS_STOPPED_BY_VTL1), r.result
    assert r.result.message.startswith("VTL1 stopped the partition: its verdict on the ")
    assert why in r.result.message, r.result.message
    # The four good verdicts were applied (VTL0 went on), the fifth was applied to nothing.
    assert r.intercepts == 5 and r.completed == 4
    kind = KINDS[4]
    assert f"{'cr4 register' if kind == 'register' else kind} intercept" in r.result.message
    verdicts = [e.verdict for e in r.events.of_kind("verdict") if isinstance(e, InterceptVerdict)]
    assert verdicts[-1] == "invalid"


def test_the_issue_example_on_msr_intercepts_ends_at_the_first_one(tmp_path: Path) -> None:
    """#PF with error code 0xEEA9A453 on every MSR intercept: was `KVM_RUN failed: EINVAL`
    (exit 1) after many intercepts; now the first one ends the run, VTL1's doing."""
    r = run_hostile(tmp_path, [Verdict(INJECT, 14, 1, 0xEEA9A453, 0xDEAD000)], 3000, kinds=("msr",))
    _never_a_vmm_error(r)
    assert r.result.status == STATUS_STOPPED_BY_VTL1 and r.intercepts == 1
    assert "MSR intercept" in r.result.message and "0xeea9a453" in r.result.message


@pytest.mark.parametrize(("msr", "value"), [(0xC0000080, 0xC01),          # EFER.LME cleared under paging
                                            (0xC0000080, 0xD01 | 1 << 40),  # a reserved EFER bit
                                            (0xC0000082, 0x0000800000000000),  # LSTAR non-canonical
                                            (0x1B, 0xFEE00D00 | 1 << 9)])   # APIC_BASE reserved bit
def test_an_allowed_wrmsr_the_cpu_refuses_is_gp_not_a_broken_vcpu(tmp_path: Path, msr: int,
                                                                   value: int) -> None:
    """The class behind the EINVAL: VTL1 allows a WRMSR the CPU would refuse.  Completed as a
    host write (KVM_SET_MSRS), EFER without LME under paging was accepted, and the next
    register sync (the CR2 of a #PF verdict) made KVM_RUN fail.  Now the WRMSR is judged as
    the guest's: #GP(0) at it, the MSR unchanged, the next #PF verdict delivered."""
    r = run_hostile(tmp_path, [Verdict(ALLOW), Verdict(INJECT, 14, 1, 2, 0x1234)], 10, kinds=("msr", "read"),
                    msr=(msr, value))
    _never_a_vmm_error(r)
    assert (r.result.reason, r.result.status) == ("guest_exit", 0), r.result
    assert r.completed == 10 and r.intercepts == 10
    assert r.sregs.efer == 0xD01                          # read back from KVM
    refused = [e for e in r.events.of_kind("refused")
               if isinstance(e, RefusedRequest) and e.request == f"wrmsr {msr:#x}"]
    assert len(refused) == 5 and refused[0].response == "#GP(0)"


def _valid(rng: random.Random) -> Verdict:
    """A verdict hardware takes, chosen to be unusual: every injectable vector, error codes
    with high bits, CR2 anywhere canonical (both halves)."""
    if rng.random() < 0.25:
        return Verdict(ALLOW)
    vector = rng.choice([0, 1, 5, 6, 7, 8, 10, 11, 12, 13, 14, 16, 17, 19, 21])
    ec = {8: 0, 17: 0, 14: rng.getrandbits(16) & 0x80FF,
          21: rng.choice([1, 2, 3, 4, 5, 6]) | rng.choice([0, 0x8000])}.get(vector, rng.getrandbits(16))
    has_ec = int(vector in (8, 10, 11, 12, 13, 14, 17, 21))
    cr2 = 0
    if vector == 14:
        cr2 = rng.getrandbits(47) | (rng.choice([0, (1 << 17) - 1]) << 47)
    return Verdict(INJECT, vector, has_ec, ec if has_ec else 0, cr2)


@pytest.mark.parametrize("seed", [1, 2])
def test_thousands_of_valid_hostile_verdicts_every_intercept_kind(tmp_path: Path, seed: int) -> None:
    """5000 intercepts (MSR, read, write, fetch, register), each answered with a random valid
    verdict, VTL1 scribbling over the message fields that are not its answer: VTL0 takes every
    fault and finishes; nothing accumulates (the issue's run failed after about a thousand)."""
    rng = random.Random(seed)
    r = run_hostile(tmp_path, [_valid(rng) for _ in range(997)], 5000, scribble=True)
    _never_a_vmm_error(r)
    assert (r.result.reason, r.result.status) == ("guest_exit", 0), (r.result, r.console[-5:])
    assert r.intercepts == 5000 and r.completed == 5000


@pytest.mark.parametrize("seed", range(6))
def test_fully_random_verdict_fields_end_cleanly(tmp_path: Path, seed: int) -> None:
    """Every field random (verdict, vector, has_error_code, error code, CR2): the run ends as
    VTL1's stop with a reason, or VTL0 finishes; never a VMM error."""
    rng = random.Random(seed)
    verdicts = []
    for _ in range(64):
        verdicts.append(Verdict(rng.choice([INJECT, INJECT, ALLOW, 0, 4, rng.getrandbits(32)]),
                                rng.choice([rng.randrange(32), rng.getrandbits(32)]),
                                rng.choice([0, 1, rng.getrandbits(32)]), rng.getrandbits(32),
                                rng.getrandbits(64)))
    r = run_hostile(tmp_path, verdicts, 2000, scribble=bool(seed % 2))
    _never_a_vmm_error(r)
    assert r.result.reason in ("guest_exit", "stopped_by_vtl1"), r.result
    if r.result.reason == "stopped_by_vtl1":
        assert "is invalid (" in r.result.message or "VTL1 stopped the partition on a" in r.result.message
