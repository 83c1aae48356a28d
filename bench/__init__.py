"""Benchmarks: the two-host rig in network namespaces, the flannel-bench harness and micro-benchmarks."""
