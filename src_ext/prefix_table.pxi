# PrefixTable: the Python face of prefix_table.h and of the configured-peer hash (peer_stats.h). The routes also
# live in a dict (the source of truth for iteration, deletes and for finding the route a deleted prefix hands its
# addresses back to); each batch of changes is applied to the C table in O(changed routes), with the GIL
# released, and published at once, so the engine threads see the routing before or after a whole batch.

import ipaddress
import threading
from collections.abc import Iterable, Iterator

from libc.stdlib cimport malloc, calloc, free

from prefix_table cimport (
    pt_hop, pt_table, pt_op, pt_handle, PT_NONE, pt_leaf, pt_routed, pt_leaf_hop, pt_lookup, pt_acquire,
    pt_release, pt_init, pt_apply, pt_destroy, PT_READERS,
)
from offload cimport peer_table, peer_configure

cdef enum:
    READER_PYTHON = PT_READERS - 2   # the reader slot of lookup() and count_matches(), under the table's lock

MASKS = tuple((0xFFFFFFFF << (32 - plen)) & 0xFFFFFFFF for plen in range(33))


cdef class PrefixTable:
    """IPv4 prefixes of any length (/0-/32) mapped to UDP peers; the longest matching prefix wins."""

    cdef pt_handle _h
    cdef peer_table *_peers
    cdef dict _routes       # (network int, prefix length) -> (peer address int, port)
    cdef dict _peer_routes  # peer address int -> how many routes lead to it
    cdef object _lock       # one writer, or one Python-side reader, at a time

    def __cinit__(self):
        self._peers = <peer_table *>calloc(1, sizeof(peer_table))
        if pt_init(&self._h) < 0 or self._peers == NULL:
            raise MemoryError()
        self._routes = {}
        self._peer_routes = {}
        self._lock = threading.Lock()

    def __dealloc__(self):
        pt_destroy(&self._h)
        free(self._peers)

    def set(self, prefix: str, peer: str, port: int) -> None:
        """Add or replace the route for prefix (host bits are masked, as flannel does)."""
        self.update([(prefix, peer, port)])

    def delete(self, prefix: str) -> None:
        """Remove the route for exactly this prefix; KeyError if there is none."""
        self.update(delete=[prefix])

    def update(self, set: Iterable[tuple[str, str, int]] = (), delete: Iterable[str] = ()) -> None:
        """Remove the `delete` prefixes, then add or replace the `set` routes, published as one change. Changes
        nothing if any entry is bad (ValueError) or a deleted prefix has no route (KeyError)."""
        dels = [_key(prefix) for prefix in delete]
        sets = [(_key(prefix), _peer(peer, port)) for prefix, peer, port in set]
        with self._lock:
            self._apply(dels, sets)

    def lookup(self, addr: str) -> tuple[str, int] | None:
        """The peer for addr by longest-prefix match, through the C table the engine uses."""
        cdef uint32_t a = int(ipaddress.IPv4Address(addr))
        cdef uint64_t leaf
        with self._lock:
            leaf = pt_lookup(pt_acquire(&self._h, READER_PYTHON), a)
            pt_release(&self._h, READER_PYTHON)
        if not pt_routed(leaf):
            return None
        cdef pt_hop hop = pt_leaf_hop(leaf)
        return str(ipaddress.IPv4Address(ntohl(hop.addr))), ntohs(hop.port)

    def count_matches(self, const uint32_t[:] addrs) -> int:
        """How many of these host-order addresses have a route: the engine's C lookup over a whole array, with
        no Python per address (what bench/micro.py measures)."""
        cdef const pt_table *t
        cdef Py_ssize_t i, n = addrs.shape[0]
        cdef uint64_t hits = 0
        with self._lock, nogil:
            t = pt_acquire(&self._h, READER_PYTHON)
            for i in range(n):
                hits += pt_routed(pt_lookup(t, addrs[i]))
            pt_release(&self._h, READER_PYTHON)
        return hits

    def __len__(self) -> int:
        return len(self._routes)

    def __contains__(self, prefix: str) -> bool:
        return _key(prefix) in self._routes

    def __iter__(self) -> Iterator[tuple[str, str, int]]:
        """(prefix, peer, port) for every route, in no particular order."""
        for (net, plen), (peer, port) in list(self._routes.items()):
            yield f"{ipaddress.IPv4Address(net)}/{plen}", str(ipaddress.IPv4Address(peer)), port

    cdef pt_handle *_handle(self):
        return &self._h

    cdef peer_table *_peer_table(self):
        return self._peers

    cdef void _apply(self, list dels, list sets) except *:
        """Change the dict and the C table together: both, or (on any error) neither."""
        cdef size_t n = len(dels) + len(sets), i = 0
        cdef int rc
        cdef pt_op *ops = <pt_op *>malloc(max(n, 1) * sizeof(pt_op))
        if ops == NULL:
            raise MemoryError()
        undo = []
        try:
            for key in dels:
                if key not in self._routes:
                    raise KeyError(f"{ipaddress.IPv4Address(key[0])}/{key[1]}")
                undo.append((key, self._routes.pop(key)))
                _set_op(&ops[i], key, True, self._cover(key))
                i += 1
            for key, hop in sets:
                undo.append((key, self._routes.get(key)))
                self._routes[key] = hop
                _set_op(&ops[i], key, False, _leaf(hop, key[1]))
                i += 1
            with nogil:
                rc = pt_apply(&self._h, ops, n)
            if rc < 0:
                raise MemoryError()
        except BaseException:
            for key, old in reversed(undo):
                if old is None:
                    del self._routes[key]
                else:
                    self._routes[key] = old
            raise
        finally:
            free(ops)
        self._count_peers(undo)

    cdef uint64_t _cover(self, tuple key) except? 0:
        """The leaf of the longest route strictly shorter than key that contains it (PT_NONE if none)."""
        net, plen = key
        for shorter in range(plen - 1, -1, -1):
            hop = self._routes.get((net & MASKS[shorter], shorter))
            if hop is not None:
                return _leaf(hop, shorter)
        return PT_NONE

    cdef void _count_peers(self, list undo) except *:
        """Keep the configured-peer hash in step with the routes: a peer is in it while any route leads to it."""
        before = {}
        for key, old in undo:
            before.setdefault(key, old)
        for key in before:   # gains first, so a peer that keeps a route is never briefly gone
            if (hop := self._routes.get(key)) is not None:
                self._peer_routes[hop[0]] = count = self._peer_routes.get(hop[0], 0) + 1
                if count == 1:
                    peer_configure(self._peers, htonl(hop[0]), 1)
        for old in before.values():
            if old is not None:
                self._peer_routes[old[0]] -= 1
                if self._peer_routes[old[0]] == 0:
                    del self._peer_routes[old[0]]
                    peer_configure(self._peers, htonl(old[0]), 0)


cdef inline uint64_t _leaf(tuple hop, int plen) except? 0:
    cdef pt_hop h
    h.addr = htonl(hop[0])
    h.port = htons(hop[1])
    return pt_leaf(h, plen)


cdef inline void _set_op(pt_op *op, tuple key, bint delete, uint64_t leaf) except *:
    op.net = key[0]
    op.plen = key[1]
    op.dele = delete
    op.leaf = leaf


def _key(prefix: str) -> tuple[int, int]:
    net = ipaddress.IPv4Network(prefix, strict=False)
    return int(net.network_address), net.prefixlen


def _peer(peer: str, port: int) -> tuple[int, int]:
    if not 0 < port < 65536:
        raise ValueError(f"port {port} out of range 1-65535")
    return int(ipaddress.IPv4Address(peer)), int(port)


cdef extern from * nogil:
    # gcc's atomic builtins, for the test reader's stop flag
    int __atomic_load_n(int *p, int order)
    void __atomic_store_n(int *p, int value, int order)
    int __ATOMIC_ACQUIRE, __ATOMIC_RELEASE

cdef extern from "<pthread.h>" nogil:
    ctypedef unsigned long pthread_t
    int pthread_create(pthread_t *thread, const void *attr, void *(*start)(void *) noexcept nogil, void *arg)
    int pthread_join(pthread_t thread, void **retval)

cdef enum:
    READER_TEST = PT_READERS - 1

ctypedef struct _race_reader:
    pt_handle *h
    const uint32_t *probes
    Py_ssize_t nprobes
    uint32_t peer_a, peer_b      # network order: the only peers the racing writer uses
    int stop
    uint64_t rounds, wrong


cdef void *_race_read(void *arg) noexcept nogil:
    """What an engine thread does to the table: pin it, look up a batch of addresses, let go; again until told."""
    cdef _race_reader *r = <_race_reader *>arg
    cdef const pt_table *t
    cdef uint64_t leaf
    cdef Py_ssize_t i
    while not __atomic_load_n(&r.stop, __ATOMIC_ACQUIRE):
        t = pt_acquire(r.h, READER_TEST)
        for i in range(r.nprobes):
            leaf = pt_lookup(t, r.probes[i])
            if pt_routed(leaf) and pt_leaf_hop(leaf).addr != r.peer_a and pt_leaf_hop(leaf).addr != r.peer_b:
                r.wrong += 1
        pt_release(r.h, READER_TEST)
        r.rounds += 1
    return NULL


def _testhelper_race(PrefixTable table, batches: list, const uint32_t[:] probes, str peer_a, str peer_b) -> tuple:
    """Apply each (set, delete) batch while a C thread keeps looking the probes up, as an engine thread does;
    (lookup rounds done, leaves seen with a peer other than peer_a/peer_b). Under AddressSanitizer (make debug)
    a node freed while a reader could still hold it is reported."""
    cdef _race_reader r
    cdef pthread_t thread
    memset(&r, 0, sizeof(r))
    r.h = &table._h
    r.probes = &probes[0]
    r.nprobes = probes.shape[0]
    r.peer_a = htonl(int(ipaddress.IPv4Address(peer_a)))
    r.peer_b = htonl(int(ipaddress.IPv4Address(peer_b)))
    if pthread_create(&thread, NULL, _race_read, &r) != 0:
        raise OSError("pthread_create failed")
    try:
        for sets, deletes in batches:
            table.update(set=sets, delete=deletes)
    finally:
        __atomic_store_n(&r.stop, 1, __ATOMIC_RELEASE)
        with nogil:
            pthread_join(thread, NULL)
    return r.rounds, r.wrong
