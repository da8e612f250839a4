"""The KVM layer: file descriptors, memory, vCPUs and exits.  Knows nothing of VTLs."""
