# The engine's threads: what each waits on, in what order it serves what is ready, when it sleeps, and when a
# second thread helps.
#
# Light (the usual state): one thread, the lead, serves both directions of every bucket. A request crossing the
# tunnel then wakes as few threads as it can: the thread that read the request from flannel0 and sent it keeps
# looking for the answer for a while (spin_ns) instead of sleeping at once, so the answer is usually taken without a
# wake-up; and the thread that writes a packet into flannel0 finds what the kernel answered at once (an echo reply,
# an ACK) on its next pass, without handing it to another thread. One wake-up per host per round trip, where
# flannel's C proxy pays three in all and a TX/RX thread pair four (bench/RESULTS.md). On the 2-vCPU rig a wake-up
# costs tens of microseconds (an idle vCPU is halted; waking it goes through the hypervisor), which the kernel's
# VXLAN, working in softirq, never pays. A tunnel with no traffic sleeps in poll.
#
# Heavy: when the lead has been busy for most of a window with work on both sides (a bulk transfer and its ACKs),
# it hands the RX side to the helper thread, which was parked (waiting on its wake fd only, so it costs no wake-up
# while parked), and keeps TX; each then polls only its own side's fds. Once the two together were busy for less
# than half a window, the helper hands RX back and parks. A side changes hands only after the thread leaving it has
# finished its pass, and is taken only after the mode says so (release/acquire), so no side is ever served by two
# threads at once and each side's state (tx_state, rx_state, its reader slot, its counters) has one writer.
#
# Fairness: each pass serves every ready bucket one quantum (tx_bucket: `batch` segments; rx_bucket: about
# RX_QUANTUM bytes), the buckets that were quiet last time first. A bulk transfer fills its own bucket's TUN queue
# and socket; a request in another bucket waits for at most one quantum of it, not for its whole queue.

cdef enum:
    SPIN_NS = 50000          # how long a thread keeps looking for more work after its last (bench/RESULTS.md)
    WINDOW_NS = 2000000      # how often a thread weighs whether the engine needs one thread or two
    HEAVY_PERMILLE = 800     # light -> heavy: the lead was busy this much of a window (e.heavy_permille) ...
    SIDE_PERMILLE = 100      # ... of which each side at least this much
    LIGHT_PERMILLE = 500     # heavy -> light: both threads together were busy less than this (e.light_permille)
    LEAD = 0                 # the two threads of an engine
    HELPER = 1
    LIGHT = 0                # the engine's mode
    HEAVY = 1
    FIXED_FDS = 2            # every poll set starts with stop() and the thread's wake fd


cdef struct worker:
    int role                        # LEAD or HELPER
    pollfd fds[FIXED_FDS + 3 * MAX_BUCKETS]   # stop, wake; then (lead) TUN queues; then sockets of both families
    int first_sock                  # index of the first socket fd in fds
    uint64_t last_work              # when this thread last found work (spinning lasts spin_ns past it)
    uint64_t window_start
    uint64_t busy[2]                # ns spent serving each side in the current window


cdef void worker_init(engine *e, worker *w, int role) noexcept nogil:
    """The thread's poll set: stop() and its wake fd, the TUN queues (lead only), then every socket (poll skips a
    negative fd)."""
    cdef int i, fam, n = FIXED_FDS
    memset(w, 0, sizeof(worker))
    w.role = role
    w.fds[0].fd = e.stop_fd
    w.fds[1].fd = e.wake_fd[role]
    if role == LEAD:
        for i in range(e.nbuckets):
            w.fds[n].fd = e.buckets[i].tun
            n += 1
    w.first_sock = n
    for fam in range(2):
        for i in range(e.nbuckets):
            w.fds[n].fd = e.buckets[i].sock[fam]
            n += 1
    for i in range(n):
        w.fds[i].events = POLLIN
    w.window_start = now_ns()


cdef inline int worker_nfds(engine *e, worker *w) noexcept nogil:
    """What the thread polls in the current mode: the lead its TUN queues (and the sockets when light), the helper
    its sockets when heavy and nothing but its wake fd when light."""
    cdef bint heavy = acquire32(&e.mode) == HEAVY
    if w.role == LEAD:
        return w.first_sock if heavy else w.first_sock + 2 * e.nbuckets
    return w.first_sock + 2 * e.nbuckets if heavy else FIXED_FDS


cdef void serve(engine *e, int role) noexcept nogil:
    """Wait for work, serve what is ready, again, until stop() or until a side fails (a dead fd, or poll itself
    failing). After the last work the thread keeps polling without blocking (yielding the CPU in between) for
    spin_ns; then it sleeps in poll (when heavy, only until its window ends, to weigh it). A pass under a flood is
    bounded (one quantum per bucket), so stop() is seen within a pass."""
    cdef worker w
    cdef int nfds, ready
    cdef bint asleep
    cdef uint64_t one
    worker_init(e, &w, role)
    while not stopped(e):
        nfds = worker_nfds(e, &w)
        asleep = now_ns() - w.last_work >= <uint64_t>e.spin_ns
        ready = poll(w.fds, nfds, sleep_ms(e, &w) if asleep else 0)
        if ready < 0:
            if errno != EINTR:
                fail(e, SIDE_RX, errno)
            continue
        if w.fds[0].revents:
            return
        if w.fds[1].revents:
            read(e.wake_fd[role], &one, 8)      # the mode changed: poll the new set
        elif ready:
            add64(&e.counters[C_wakeups if asleep else C_spin_catches], 1)
            serve_ready(e, &w, nfds)
            check_fds(e, &w, nfds)
            w.last_work = now_ns()
        elif not asleep:
            sched_yield()
        weigh(e, &w)


cdef inline int sleep_ms(engine *e, worker *w) noexcept nogil:
    """How long a thread with nothing to do sleeps: for good when light, until its window ends when heavy."""
    cdef uint64_t t = now_ns(), end = w.window_start + WINDOW_NS
    if not e.helper or acquire32(&e.mode) == LIGHT:
        return -1
    return 1 + <int>((end - t) // 1000000) if end > t else 0


cdef void serve_ready(engine *e, worker *w, int nfds) noexcept nogil:
    """One quantum of every ready bucket side: first those that did not use their whole quantum last time, then
    those that did (a bulk transfer's). The time spent goes to each side's busy count."""
    cdef bint was_bulk[MAX_BUCKETS][2]
    cdef bint served[MAX_BUCKETS]
    cdef int i, k, fam, bulk
    cdef uint64_t start = now_ns(), mid
    for i in range(e.nbuckets):
        was_bulk[i][SIDE_TX] = e.buckets[i].bulk[SIDE_TX]
        was_bulk[i][SIDE_RX] = e.buckets[i].bulk[SIDE_RX]
        served[i] = False
    for bulk in range(2):
        for k in range(FIXED_FDS, w.first_sock):
            i = k - FIXED_FDS
            if w.fds[k].revents and was_bulk[i][SIDE_TX] == bulk:
                e.buckets[i].bulk[SIDE_TX] = tx_bucket(e, &e.buckets[i])
    mid = now_ns()
    w.busy[SIDE_TX] += mid - start
    for bulk in range(2):
        for k in range(w.first_sock, nfds):
            i = (k - w.first_sock) % e.nbuckets
            fam = (k - w.first_sock) // e.nbuckets
            if w.fds[k].revents and was_bulk[i][SIDE_RX] == bulk:
                if not served[i]:
                    e.buckets[i].bulk[SIDE_RX] = False      # full again if either family's socket was
                    served[i] = True
                e.buckets[i].bulk[SIDE_RX] |= rx_bucket(e, &e.buckets[i], fam)
            if stopped(e):
                return
    w.busy[SIDE_RX] += now_ns() - mid


cdef void check_fds(engine *e, worker *w, int nfds) noexcept nogil:
    """POLLNVAL on any fd, POLLERR or POLLHUP on a TUN queue, is final (a deleted flannel0). Normally the read has
    already failed with the reason; POLLERR on a socket is a queued ICMP error that the receive consumed."""
    cdef int k
    cdef short ev
    for k in range(FIXED_FDS, nfds):
        ev = w.fds[k].revents
        if ev & POLLNVAL:
            fail(e, SIDE_TX if k < w.first_sock else SIDE_RX, EBADF)
        elif k < w.first_sock and ev & (POLLERR | POLLHUP):
            fail(e, SIDE_TX, EBADFD)


cdef void weigh(engine *e, worker *w) noexcept nogil:
    """At the end of each window: does the engine need one thread or two? The lead decides to hand RX over, the
    helper to hand it back (each leaving a side it has finished with); each publishes its busy time for the
    other."""
    cdef uint64_t t = now_ns(), window = t - w.window_start, busy = w.busy[SIDE_TX] + w.busy[SIDE_RX], other
    if window < WINDOW_NS or not e.helper:
        return
    store64(&e.busy_share[w.role], busy * 1000 // window)
    other = load64(&e.busy_share[1 - w.role])
    if (w.role == LEAD and acquire32(&e.mode) == LIGHT and busy * 1000 >= e.heavy_permille * window
            and w.busy[SIDE_TX] * 1000 >= SIDE_PERMILLE * window and w.busy[SIDE_RX] * 1000 >= SIDE_PERMILLE * window):
        release32(&e.mode, HEAVY)
        add64(&e.counters[C_helper_on], 1)
        wake(e, HELPER)
    elif w.role == HELPER and acquire32(&e.mode) == HEAVY and busy * 1000 // window + other < e.light_permille:
        release32(&e.mode, LIGHT)
        add64(&e.counters[C_helper_off], 1)
        wake(e, LEAD)
    w.window_start = t
    w.busy[SIDE_TX] = w.busy[SIDE_RX] = 0


cdef inline void wake(engine *e, int role) noexcept nogil:
    cdef uint64_t one = 1
    write(e.wake_fd[role], &one, 8)
