"""VTLs on KVM: partitions of one KVM VM per Virtual Trust Level over shared memory."""
