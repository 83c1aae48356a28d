"""Backends: how a lease becomes forwarding state (flannel's pkg/backend). Kernel objects go through pyroute2."""
