"""vtl/run/step.py: the temporary mapping of a single step is all or nothing and is undone
whatever happens (a backend that fails half-way, a KVM_RUN that raises), with fakes for
the backend and the vCPU (the real thing runs in test_v9_register_intercepts.py)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from vmm.errors import VmmError
from vmm.exits import Debug
from vmm.memattr import NR, NW, NX
from vtl.run.step import SingleStepper
from vtl.services.outcomes import Step

ALL = NR | NW | NX
P0, P1 = 0x202000, 0x203000


class FakeBackend:
    def __init__(self, fail_on: int | None = None) -> None:
        self.attrs = {P0: ALL, P1: ALL}
        self.calls: list[tuple[int, int]] = []
        self.fail_on = fail_on

    def get(self, gpa: int) -> int:
        return self.attrs[gpa]

    def set_range(self, gpa: int, size: int, attrs: int) -> None:
        assert size == 4096
        if self.fail_on is not None and len(self.calls) == self.fail_on:
            self.calls.append((gpa, -1))
            raise VmmError("mprotect failed")
        self.calls.append((gpa, attrs))
        self.attrs[gpa] = attrs


class FakeVcpu:
    def __init__(self, run: Any = None) -> None:
        self.stepping: list[bool] = []
        self._run = run

    def set_single_step(self, enable: bool) -> None:
        self.stepping.append(enable)

    def run_once(self) -> Any:
        assert self.stepping[-1] is True
        if isinstance(self._run, Exception):
            raise self._run
        return self._run


def _stepper(backend: FakeBackend) -> SingleStepper:
    return SingleStepper(SimpleNamespace(backend=backend))  # type: ignore[arg-type]


def test_pages_are_opened_for_the_step_and_restored_exactly() -> None:
    b = FakeBackend()
    v = FakeVcpu(Debug(1, P0 + 1, 0, 0))
    s = _stepper(b)
    assert s.step(v, Step(P0, (P0, P1))).exit == Debug(1, P0 + 1, 0, 0)  # type: ignore[arg-type]
    assert b.calls == [(P0, NW), (P1, NW), (P1, ALL), (P0, ALL)]     # r-x for one instruction
    assert v.stepping == [True, False] and s.count == 1


def test_a_backend_failure_half_way_undoes_the_first_page() -> None:
    b = FakeBackend(fail_on=1)
    v = FakeVcpu(Debug(1, 0, 0, 0))
    with pytest.raises(VmmError, match="mprotect"):
        _stepper(b).step(v, Step(P0, (P0, P1)))  # type: ignore[arg-type]
    assert b.attrs == {P0: ALL, P1: ALL} and v.stepping == []


def test_a_failing_run_still_clears_single_step_and_restores() -> None:
    b = FakeBackend()
    v = FakeVcpu(RuntimeError("KVM_RUN blew up"))
    with pytest.raises(RuntimeError):
        _stepper(b).step(v, Step(P0, (P0,)))  # type: ignore[arg-type]
    assert b.attrs[P0] == ALL and v.stepping == [True, False]


# --- the CPU's order of checks, on a fake vCPU ------------------------------------------------
@pytest.mark.kvm
def test_privileged_instructions_at_cpl3_and_ud_before_gp(guest_images: tuple[Any, Any]) -> None:
    """#UD (LOCK, CR5, XSETBV without CR4.OSXSAVE) comes before the CPL check; at CPL3
    every one of these instructions is #GP(0), whatever the value."""
    from vmm.decode import decode, from_bytes
    from vtl.core.config import PartitionConfig
    from vtl.core.partition import Partition
    from vtl.services.intercepts import Intercepts
    from vtl.services.privileged import PrivilegedSection
    from vtl.services.refusals import Refusals
    from vtl.services.vtl0view import Context, Fault

    with Partition(PartitionConfig(vtl0_image=guest_images[0])) as p:
        intercepts = Intercepts(p, p.events, Refusals(p.mem, p.layout, p.events))
        section = PrivilegedSection(p, p.events, intercepts)
        for cpl in (0, 3):
            seg = SimpleNamespace(selector=cpl, base=0, limit=0)
            sregs = SimpleNamespace(cr0=0x80010033, cr3=0x2000, cr4=0x620, cr2=0, cr8=0, efer=0xD01,
                                    cs=seg, gdt=seg, idt=seg, ldt=seg, tr=seg)
            vcpu = SimpleNamespace(sregs=sregs, regs=SimpleNamespace(rip=0x202000, rflags=2))
            ctx = Context(0x2000, cpl, sregs.cr0, sregs.cr4, sregs.efer, 2)
            for code, want in (("f00f22c7", 6), ("0f22ef", 6), ("0f01d1", 6), ("0f22c7", 13 if cpl else None),
                               ("0f06", 13 if cpl else None), ("0f00df", 13)):
                d = decode(from_bytes(bytes.fromhex(code)))
                got = section._prepare(vcpu, ctx, d, bytes.fromhex(code), [0x80010033] * 16)  # type: ignore[arg-type]
                vector = got.vector if isinstance(got, Fault) else None
                assert vector == want, (cpl, code, got)


def _events(**kw: int) -> Any:
    ev = SimpleNamespace(exception=SimpleNamespace(injected=0, pending=0),
                         interrupt=SimpleNamespace(injected=0), nmi=SimpleNamespace(injected=0, pending=0),
                         smi=SimpleNamespace(pending=0))
    for path, value in kw.items():
        part, field = path.split("_", 1)
        setattr(getattr(ev, part), field, value)
    return SimpleNamespace(sync=SimpleNamespace(events=ev))


@pytest.mark.parametrize("pending", ["exception_injected", "exception_pending", "interrupt_injected",
                                     "nmi_injected"])
def test_no_step_while_an_event_waits_for_delivery(pending: str) -> None:
    """An event KVM will deliver first is delivered with the section NR: no step (None:
    VTL0 resumes, and the fetch comes back once its handler returns)."""
    from vtl.services.privileged import PrivilegedSection
    section = PrivilegedSection.__new__(PrivilegedSection)
    assert section.plan_step(None, _events(**{pending: 1}), P0, None) is None  # type: ignore[arg-type]
