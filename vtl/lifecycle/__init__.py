"""Flows that create, change or end a VTL: enable now; kexec, reset and snapshot next.

A flow works on the partition (vtl.core) and may use services; the scheduler
(vtl.run) starts it and moves the VP into the state the flow leaves it in.
"""
