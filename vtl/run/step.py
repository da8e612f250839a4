"""Single-stepping one VTL0 instruction of the privileged section on a temporary mapping.

The privileged section is NR for VTL0, so none of its instructions can run; an
instruction there that writes no register VTL1 judges (a `ret`, a `mov` between
registers) runs like this, while only its VP runs (a partition has one VP today; with
more, the others would have to be paused first, since the mapping is the VM's):

  1. the section pages the instruction may occupy get their attributes minus NR and NX
     (r-x, or r-- where NW: writes stay refused) through the partition's attribute
     backend, all or nothing;
  2. KVM_SET_GUEST_DEBUG single-step, one KVM_RUN: it ends with KVM_EXIT_DEBUG after the
     instruction, or with whatever exit the instruction itself caused (port I/O, a
     memory intercept, a fetch fault of a byte outside the opened pages, ...);
  3. single-step off and every page back to exactly its attributes, also when anything
     above failed.

The exit comes back to the scheduler, which handles it like any other.
"""

from __future__ import annotations

from vmm.exits import VcpuExit
from vmm.kvm import VCpu
from vmm.memattr import NR, NX
from vmm.memory import PAGE_SIZE
from vtl.core.partition import Partition
from vtl.services.outcomes import Step


class SingleStepper:
    def __init__(self, partition: Partition) -> None:
        self.p = partition
        self.count = 0

    def step(self, vcpu: VCpu, step: Step) -> VcpuExit:
        """Run exactly the instruction at `step.rip` with `step.pages` executable."""
        backend = self.p.backend
        opened: list[tuple[int, int]] = []
        try:
            for page in step.pages:
                attrs = backend.get(page)
                backend.set_range(page, PAGE_SIZE, attrs & ~(NR | NX))
                opened.append((page, attrs))
            vcpu.set_single_step(True)
            try:
                exit = vcpu.run_once()
            finally:
                vcpu.set_single_step(False)
        finally:
            # Restore in reverse; a failure here leaves VTL0 able to run the section
            # unjudged, so it ends the run (the scheduler turns it into vmm_error).
            for page, attrs in reversed(opened):
                backend.set_range(page, PAGE_SIZE, attrs)
        self.count += 1
        return exit
