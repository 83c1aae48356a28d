"""flanneld: the lease-managing daemon (flags, registries, backends)."""
