"""Alternative partition modes, run by the same tools as the VTL design: `heki` (design §8,
docs/heki-mode.md), a single VM in which the VMM plays KVM with the Heki patches."""
