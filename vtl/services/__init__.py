"""What the VMM does for a guest request: hypercalls, the report channel, VTL0's memory
protections, secure intercepts, VTL0's privileged section (register intercepts,
privileged.py) and its registers, the console, refusals.

A service reads and writes the partition (vtl.core) and the exiting vCPU, emits
events, and *returns* what should happen next (vtl.services.outcomes); it never
changes a VP's state or picks the next vCPU: that is the scheduler's (vtl.run).
"""
