"""Running a partition: the scheduler (the VP loop, the one VP-state transition, the
VTL switch), exit dispatch, and the trio control plane around them."""
