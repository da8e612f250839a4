"""The partition's data: VTL types, guest layout, VPs and their state, events.

Nothing here runs a vCPU or judges a request; `vtl.services` and `vtl.run` do.
"""
