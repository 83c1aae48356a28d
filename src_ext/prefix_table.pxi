# PrefixTable: the Python face of prefix_table.h and of the peer slots (peer_stats.h for IPv4 peers, peer6.h for
# IPv6 ones). The routes also live in a dict (the source of truth for iteration, deletes and for finding the route
# a deleted prefix hands its addresses back to); each batch of changes is applied to the C table in O(changed
# routes), with the GIL released, and published at once, so the engine threads see the routing before or after a
# whole batch. Prefixes and peers may each be IPv4 or IPv6, in any combination. A peer has a slot while any route
# leads to it; a batch whose new peers find no free slot refuses just their routes.

import ipaddress
import threading
from collections.abc import Iterable, Iterator

from libc.stdlib cimport malloc, calloc, free

from atomics cimport load64

from prefix_table cimport (
    pt_hop, pt_table, pt_op, pt_handle, PT_NONE, PT_V4, PT_V6, pt_leaf, pt_routed, pt_leaf_hop, pt_lookup,
    pt_lookup6, pt_acquire, pt_release, pt_init, pt_apply, pt_destroy, pt_bump, PT_READERS,
)
from offload cimport (
    PEER_SLOTS, PEER6_SLOTS, peer_slot, peer_table, peer_find, peer_add, peer_table_init, peer_table_destroy,
    peer_join, peer_leave, peer6_table, peer6_table_init, peer6_table_destroy, peer6_join, peer6_leave,
)

cdef enum:
    READER_PYTHON = PT_READERS - 2   # the reader slot of lookup() and count_matches(), under the table's lock

# Keys are (version, network int, prefix length); hops are (version, peer address int, port); peers are
# (version, peer address int).
MASKS = {
    4: tuple(((1 << 32) - 1) ^ ((1 << (32 - plen)) - 1) for plen in range(33)),
    6: tuple(((1 << 128) - 1) ^ ((1 << (128 - plen)) - 1) for plen in range(129)),
}
PEER_CAPACITY = {4: PEER_SLOTS, 6: PEER6_SLOTS}


cdef class PrefixTable:
    """IPv4 and IPv6 prefixes of any length mapped to UDP peers (each peer IPv4 or IPv6); the longest matching
    prefix of the address's family wins. At most PEER_CAPACITY[version] peers of a family at once, any number
    over the table's life."""

    cdef pt_handle _h
    cdef peer_table *_peers
    cdef peer6_table *_peers6
    cdef dict _routes       # (version, network int, prefix length) -> (version, peer address int, port)
    cdef dict _slots        # peer -> [its slot, how many routes lead to it]
    cdef object _lock       # one writer, or one Python-side reader, at a time

    def __cinit__(self):
        self._peers = <peer_table *>calloc(1, sizeof(peer_table))
        self._peers6 = <peer6_table *>calloc(1, sizeof(peer6_table))
        if (pt_init(&self._h) < 0 or self._peers == NULL or self._peers6 == NULL
                or peer_table_init(self._peers) < 0 or peer6_table_init(self._peers6) < 0):
            raise MemoryError()
        self._routes = {}
        self._slots = {}
        self._lock = threading.Lock()

    def __dealloc__(self):
        pt_destroy(&self._h)
        if self._peers != NULL:
            peer_table_destroy(self._peers)
        if self._peers6 != NULL:
            peer6_table_destroy(self._peers6)
        free(self._peers)
        free(self._peers6)

    def set(self, prefix: str, peer: str, port: int) -> dict[str, str]:
        """Add or replace the route for prefix (host bits are masked, as flannel does); as update()."""
        return self.update([(prefix, peer, port)])

    def delete(self, prefix: str) -> None:
        """Remove the route for exactly this prefix; KeyError if there is none."""
        self.update(delete=[prefix])

    def update(self, set: Iterable[tuple[str, str, int]] = (), delete: Iterable[str] = ()) -> dict[str, str]:
        """Remove the `delete` prefixes, then add or replace the `set` routes, published as one change. Returns
        the routes refused, {prefix: why}: those to a new peer of a family whose peer table is full, which are
        left with no route. Changes nothing if any entry is bad (ValueError), a deleted prefix has no route
        (KeyError) or memory runs out (MemoryError)."""
        dels = [_key(prefix) for prefix in delete]
        sets = [(_key(prefix), _peer(peer, port)) for prefix, peer, port in set]
        with self._lock:
            return self._apply(dels, sets)

    def lookup(self, addr: str) -> tuple[str, int] | None:
        """The peer for addr (IPv4 or IPv6) by longest-prefix match, through the C table the engine uses."""
        ip = ipaddress.ip_address(addr)
        cdef bytes packed = ip.packed
        cdef uint64_t leaf
        cdef const pt_table *t
        cdef pt_hop hop
        with self._lock:
            t = pt_acquire(&self._h, READER_PYTHON)
            leaf = pt_lookup(t, int(ip)) if ip.version == 4 else pt_lookup6(t, packed)
            pt_release(&self._h, READER_PYTHON)
            if not pt_routed(leaf):
                return None
            hop = pt_leaf_hop(leaf)
            if hop.v6:
                return str(ipaddress.IPv6Address(bytes(self._peers6.slot[hop.addr].addr[:16]))), ntohs(hop.port)
        return str(ipaddress.IPv4Address(ntohl(hop.addr))), ntohs(hop.port)

    def route(self, prefix: str) -> tuple[str, int] | None:
        """The (peer, port) of the route for exactly this prefix, or None."""
        hop = self._routes.get(_key(prefix))
        return None if hop is None else (str(_address(hop[0], hop[1])), hop[2])

    def peer_counts(self) -> dict[str, dict[str, int]]:
        """{peer address: {tx_packets, tx_bytes, rx_packets, rx_bytes}} for every peer a route leads to now
        (one that lost its last route is gone from here, and starts again from zero if it returns later)."""
        cdef peer_slot *s
        out = {}
        with self._lock:
            for (version, addr), (slot, _) in self._slots.items():
                s = &self._peers6.slot[slot].peer if version == 6 else &self._peers.slot[slot]
                out[str(_address(version, addr))] = {
                    "tx_packets": load64(&s.tx_packets), "tx_bytes": load64(&s.tx_bytes),
                    "rx_packets": load64(&s.rx_packets), "rx_bytes": load64(&s.rx_bytes)}
        return out

    def count_matches(self, const uint32_t[:] addrs) -> int:
        """How many of these host-order IPv4 addresses have a route: the engine's C lookup over a whole array,
        with no Python per address (what bench/micro.py measures)."""
        cdef const pt_table *t
        cdef Py_ssize_t i, n = addrs.shape[0]
        cdef uint64_t hits = 0
        with self._lock, nogil:
            t = pt_acquire(&self._h, READER_PYTHON)
            for i in range(n):
                hits += pt_routed(pt_lookup(t, addrs[i]))
            pt_release(&self._h, READER_PYTHON)
        return hits

    def count_matches6(self, const uint8_t[:] addrs) -> int:
        """The same for IPv6: addrs holds 16-byte addresses back to back."""
        cdef const pt_table *t
        cdef Py_ssize_t i, n = addrs.shape[0] // 16
        cdef uint64_t hits = 0
        if n == 0:
            return 0
        with self._lock, nogil:
            t = pt_acquire(&self._h, READER_PYTHON)
            for i in range(n):
                hits += pt_routed(pt_lookup6(t, &addrs[16 * i]))
            pt_release(&self._h, READER_PYTHON)
        return hits

    def __len__(self) -> int:
        return len(self._routes)

    def __contains__(self, prefix: str) -> bool:
        return _key(prefix) in self._routes

    def __iter__(self) -> Iterator[tuple[str, str, int]]:
        """(prefix, peer, port) for every route, in no particular order."""
        for key, (version, peer, port) in list(self._routes.items()):
            yield _text(key), str(_address(version, peer)), port

    cdef pt_handle *_handle(self):
        return &self._h

    cdef peer_table *_peer_table(self):
        return self._peers

    cdef peer6_table *_peer6_table(self):
        return self._peers6

    cdef dict _apply(self, list dels, list sets):
        """Change the dict, the peer slots and the C table together: all of it, or (on any error) none. Peers
        gaining their first route get a slot before the table that routes to them is published; peers losing
        their last one leave after it (peer_slots.h)."""
        cdef size_t n = len(dels) + len(sets), i = 0
        cdef int rc
        cdef pt_op *ops = <pt_op *>malloc(max(n, 1) * sizeof(pt_op))
        if ops == NULL:
            raise MemoryError()
        undo = []
        joined = []
        refused = {}
        try:
            for key in dels:
                if key not in self._routes:
                    raise KeyError(_text(key))
                i = self._unroute(ops, i, key, undo)
            for key, hop in sets:
                if hop[:2] not in self._slots:
                    if not self._join(hop[:2]):
                        refused[_text(key)] = (f"the IPv{hop[0]} peer table is full "
                                               f"({PEER_CAPACITY[hop[0]]} peers)")
                        if key in self._routes:
                            i = self._unroute(ops, i, key, undo)
                        continue
                    joined.append(hop[:2])
                undo.append((key, self._routes.get(key)))
                self._routes[key] = hop
                _set_op(&ops[i], key, False, self._leaf(hop, key[2]))
                i += 1
            with nogil:
                rc = pt_apply(&self._h, ops, i)
            if rc < 0:
                raise MemoryError()
        except BaseException:
            for key, old in reversed(undo):
                if old is None:
                    del self._routes[key]
                else:
                    self._routes[key] = old
            for peer in joined:
                self._leave(peer)
            raise
        finally:
            free(ops)
        self._count_peers(undo, joined)
        return refused

    cdef size_t _unroute(self, pt_op *ops, size_t i, tuple key, list undo) except? 0:
        """Op i: the route for key removed, its addresses handed to the route that covers it."""
        undo.append((key, self._routes.pop(key)))
        _set_op(&ops[i], key, True, self._cover(key))
        return i + 1

    cdef uint64_t _cover(self, tuple key) except? 0:
        """The leaf of the longest route strictly shorter than key that contains it (PT_NONE if none)."""
        version, net, plen = key
        masks = MASKS[version]
        for shorter in range(plen - 1, -1, -1):
            hop = self._routes.get((version, net & masks[shorter], shorter))
            if hop is not None:
                return self._leaf(hop, shorter)
        return PT_NONE

    cdef uint64_t _leaf(self, tuple hop, int plen) except? 0:
        """The leaf of a route to hop (a peer with a slot); an IPv6 peer's leaf holds its slot."""
        cdef pt_hop h
        h.port = htons(hop[2])
        h.v6 = hop[0] == 6
        h.addr = self._slots[hop[:2]][0] if h.v6 else htonl(hop[1])
        return pt_leaf(h, plen)

    cdef bint _join(self, tuple peer) except *:
        """A slot for a peer gaining its first route (no route counted yet); False when its table is full."""
        cdef bytes packed
        cdef int slot
        if peer[0] == 6:
            packed = peer[1].to_bytes(16, "big")
            slot = peer6_join(self._peers6, &self._h, packed)
        else:
            slot = peer_join(self._peers, &self._h, htonl(peer[1]))
        if slot < 0:
            return False
        self._slots[peer] = [slot, 0]
        return True

    cdef void _leave(self, tuple peer) except *:
        """The peer has no route any more (in the table published now): its slot goes once no reader sees it."""
        slot = self._slots.pop(peer)[0]
        if peer[0] == 6:
            peer6_leave(self._peers6, slot, self._h.epoch)
        else:
            peer_leave(self._peers, slot, self._h.epoch)

    cdef void _count_peers(self, list undo, list joined) except *:
        """After a publish: count the routes leading to each peer touched, and let go of the peers left with
        none (then a new epoch, so that no reader entering later can reach their slots)."""
        before = {}
        for key, old in undo:
            before.setdefault(key, old)
        for key, old in before.items():
            if (hop := self._routes.get(key)) is not None:
                self._slots[hop[:2]][1] += 1
            if old is not None:
                self._slots[old[:2]][1] -= 1
        left = [peer for peer in {*joined, *(old[:2] for old in before.values() if old is not None)}
                if self._slots[peer][1] == 0]
        for peer in left:
            self._leave(peer)
        if left:
            pt_bump(&self._h)


cdef inline void _set_op(pt_op *op, tuple key, bint delete, uint64_t leaf) except *:
    cdef bytes packed = key[1].to_bytes(4 if key[0] == 4 else 16, "big")
    memset(op.key, 0, 16)
    memcpy(op.key, <const char *>packed, len(packed))
    op.family = PT_V4 if key[0] == 4 else PT_V6
    op.plen = key[2]
    op.dele = delete
    op.leaf = leaf


def _key(prefix: str) -> tuple[int, int, int]:
    net = ipaddress.ip_network(prefix, strict=False)
    return net.version, int(net.network_address), net.prefixlen


def _address(version: int, value: int) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.IPv4Address(value) if version == 4 else ipaddress.IPv6Address(value)


def _text(key: tuple[int, int, int]) -> str:
    return f"{_address(key[0], key[1])}/{key[2]}"


def _peer(peer: str, port: int) -> tuple[int, int, int]:
    if not 0 < port < 65536:
        raise ValueError(f"port {port} out of range 1-65535")
    addr = ipaddress.ip_address(peer)
    return addr.version, int(addr), int(port)
