"""Alternative partition modes.  Next: the in-KVM Heki comparison mode (DESIGN section 8),
a single VM in which the VMM plays KVM with the Heki patches, run by the same tools."""
