"""Single-stepping one VTL0 instruction of the privileged section on a temporary mapping.

The privileged section is NR for VTL0, so none of its instructions can run; an
instruction there that writes no register VTL1 judges (a `ret`, a `mov` between
registers) runs like this, while only its VP runs (a partition has one VP today; with
more, the others would have to be paused first, since the mapping is the VM's):

  1. the section pages the instruction may occupy get their attributes minus NR and NX
     (r-x, or r-- where NW: writes stay refused) through the partition's attribute
     backend, all or nothing; the pages of every IDT handler's first byte become NR
     (`Step.guard_nr`) and the IDT and the page tables that map it and the handlers NW
     (`Step.guard_nw`), so that nothing but this one instruction can run while the
     section is mapped (services/privileged.py, `plan_step`);
  2. KVM_SET_GUEST_DEBUG single-step, one KVM_RUN: it ends with KVM_EXIT_DEBUG after the
     instruction, with the fetch fault of a handler's first byte when the instruction
     raised an exception (or an event was delivered), or with whatever exit the
     instruction itself caused (port I/O, a memory intercept, ...).  A read of a guarded
     page (the instruction, or the event delivery, reading text that holds a handler) is
     answered from guest memory and the step goes on;
  3. single-step off and every page back to exactly its attributes, also when anything
     above failed.

The exit comes back to the scheduler, which handles it like any other (`StepEnd`
says whether it was a guarded page's).
"""

from __future__ import annotations

from dataclasses import dataclass

from vmm import exits as ex
from vmm.exits import VcpuExit
from vmm.kvm import VCpu
from vmm.memattr import NR, NW, NX
from vmm.memory import PAGE_SIZE
from vtl.core.partition import Partition
from vtl.services.outcomes import Step

# Reads of guarded pages answered within one step (a string instruction may make many).
MAX_GUARDED_READS = 4096


@dataclass(frozen=True, slots=True)
class StepEnd:
    exit: VcpuExit
    guarded: int | None = None   # the guarded page (GPA) the exit is an access to, if any


class SingleStepper:
    def __init__(self, partition: Partition) -> None:
        self.p = partition
        self.count = 0

    def step(self, vcpu: VCpu, step: Step) -> StepEnd:
        """Run exactly the instruction at `step.rip` with `step.pages` executable."""
        backend = self.p.backend
        changed: list[tuple[int, int]] = []
        guarded = set(step.guard_nr) | set(step.guard_nw)
        try:
            for page in step.pages:
                attrs = backend.get(page)
                backend.set_range(page, PAGE_SIZE, attrs & ~(NR | NX))
                changed.append((page, attrs))
            for page in step.guard_nr:
                attrs = backend.get(page)
                backend.set_range(page, PAGE_SIZE, NR | NW | NX)
                changed.append((page, attrs))
            for page in step.guard_nw:
                attrs = backend.get(page)
                backend.set_range(page, PAGE_SIZE, attrs | NW)
                changed.append((page, attrs))
            vcpu.set_single_step(True)
            try:
                exit = vcpu.run_once()
                for _ in range(MAX_GUARDED_READS):
                    if not (isinstance(exit, ex.Mmio) and not exit.is_write
                            and exit.gpa & ~(PAGE_SIZE - 1) in guarded
                            and (exit.gpa + exit.length - 1) & ~(PAGE_SIZE - 1) in guarded):
                        break
                    ex.complete_mmio_read(vcpu, self.p.mem.read(exit.gpa, exit.length))
                    exit = vcpu.run_once()
            finally:
                vcpu.set_single_step(False)
        finally:
            # Restore in reverse; a failure here leaves VTL0 able to run the section
            # unjudged, so it ends the run (the scheduler turns it into vmm_error).
            for page, attrs in reversed(changed):
                backend.set_range(page, PAGE_SIZE, attrs)
        self.count += 1
        if isinstance(exit, (ex.Mmio, ex.MemoryFault)) and exit.gpa & ~(PAGE_SIZE - 1) in guarded:
            return StepEnd(exit, exit.gpa & ~(PAGE_SIZE - 1))
        return StepEnd(exit)
