"""Userspace dataplane: the TUN device, the packet pump and the standalone tunnel."""
