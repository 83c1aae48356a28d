# PrefixTable: the Python face of prefix_table.h. The routes live in a dict (the source of truth for iteration
# and deletes); every change builds a new C table from it and publishes it atomically, so the engine threads
# always see either the old routing or the new one, never a half-written table.

import ipaddress
from collections.abc import Iterable, Iterator

from libc.stdlib cimport malloc, free
from libc.string cimport memset

from prefix_table cimport (
    pt_hop, pt_route, pt_table, pt_handle, pt_lookup, pt_build, pt_free, pt_publish,
)


cdef class PrefixTable:
    """IPv4 prefixes of any length (/0-/32) mapped to UDP peers; the longest matching prefix wins."""

    cdef pt_handle _h
    cdef dict _routes   # IPv4Network -> (peer address str, port int)

    def __cinit__(self):
        memset(&self._h, 0, sizeof(pt_handle))
        self._routes = {}
        self._h.cur = pt_build(NULL, 0)
        if self._h.cur == NULL:
            raise MemoryError()

    def __dealloc__(self):
        pt_free(self._h.cur)

    def set(self, prefix: str, peer: str, port: int) -> None:
        """Add or replace the route for prefix (host bits are masked, as flannel does)."""
        self.update([(prefix, peer, port)])

    def update(self, routes: Iterable[tuple[str, str, int]]) -> None:
        """Add or replace many routes with a single rebuild."""
        staged = dict(self._routes)
        for prefix, peer, port in routes:
            staged[_network(prefix)] = _peer(peer, port)
        self._rebuild(staged)

    def delete(self, prefix: str) -> None:
        """Remove the route for exactly this prefix; KeyError if there is none."""
        staged = dict(self._routes)
        del staged[_network(prefix)]
        self._rebuild(staged)

    def lookup(self, addr: str) -> tuple[str, int] | None:
        """The peer for addr by longest-prefix match, through the C table the engine uses."""
        cdef uint32_t h = pt_lookup(self._h.cur, int(ipaddress.IPv4Address(addr)))
        if h == 0:
            return None
        cdef pt_hop hop = self._h.cur.hops[h]
        return str(ipaddress.IPv4Address(ntohl(hop.addr))), ntohs(hop.port)

    def count_matches(self, const uint32_t[:] addrs) -> int:
        """How many of these host-order addresses have a route: the engine's C lookup over a whole array, with
        no Python per address (what bench/micro.py measures)."""
        cdef const pt_table *t = self._h.cur
        cdef Py_ssize_t i, n = addrs.shape[0]
        cdef uint64_t hits = 0
        with nogil:
            for i in range(n):
                hits += pt_lookup(t, addrs[i]) != 0
        return hits

    def __len__(self) -> int:
        return len(self._routes)

    def __contains__(self, prefix: str) -> bool:
        return _network(prefix) in self._routes

    def __iter__(self) -> Iterator[tuple[str, str, int]]:
        """(prefix, peer, port) for every route, in no particular order."""
        for net, (peer, port) in list(self._routes.items()):
            yield str(net), peer, port

    cdef pt_handle *_handle(self):
        return &self._h

    cdef void _rebuild(self, dict staged) except *:
        cdef uint32_t n = len(staged), i = 0
        cdef pt_table *table
        cdef pt_route *routes = <pt_route *>malloc(max(n, 1) * sizeof(pt_route))
        if routes == NULL:
            raise MemoryError()
        try:
            for net, (peer, port) in staged.items():
                routes[i].net = int(net.network_address)
                routes[i].plen = net.prefixlen
                routes[i].hop.addr = htonl(int(ipaddress.IPv4Address(peer)))
                routes[i].hop.port = htons(port)
                i += 1
            table = pt_build(routes, n)
        finally:
            free(routes)
        if table == NULL:
            raise MemoryError()
        pt_publish(&self._h, table)
        self._routes = staged


def _network(prefix: str) -> ipaddress.IPv4Network:
    return ipaddress.IPv4Network(prefix, strict=False)


def _peer(peer: str, port: int) -> tuple[str, int]:
    if not 0 < port < 65536:
        raise ValueError(f"port {port} out of range 1-65535")
    return str(ipaddress.IPv4Address(peer)), int(port)
