# cython: language_level=3, boundscheck=False, wraparound=False
"""Request/response over one TCP connection: one byte asked, one byte answered, the next asked only once the
answer is in (what a small RPC between two pods does, with nothing of the RPC's own cost). Both ends loop in C with
the GIL released, so the figure is the path's, not the interpreter's; flannel-bench's rr_per_s."""

from posix.time cimport clock_gettime, timespec, CLOCK_MONOTONIC

cdef extern from "<sys/socket.h>" nogil:
    ssize_t send(int fd, const void *buf, size_t n, int flags)
    ssize_t recv(int fd, void *buf, size_t n, int flags)
    int accept(int fd, void *addr, void *addrlen)

from posix.unistd cimport close


cdef double now() noexcept nogil:
    cdef timespec t
    clock_gettime(CLOCK_MONOTONIC, &t)
    return t.tv_sec + t.tv_nsec * 1e-9


cdef void answer(int conn) noexcept nogil:
    cdef char byte
    while recv(conn, &byte, 1, 0) == 1 and send(conn, &byte, 1, 0) == 1:
        pass


def serve(int listen_fd) -> None:
    """Answer every byte of each accepted connection, one connection after another, until accept fails (the
    listening socket is shut down or the process ends)."""
    cdef int conn
    with nogil:
        while True:
            conn = accept(listen_fd, NULL, NULL)
            if conn < 0:
                break
            answer(conn)
            close(conn)


def ping_pong(int fd, double seconds) -> tuple[int, float]:
    """(transactions, elapsed seconds) of one-byte requests on a connected socket for about `seconds`; stops
    early if the server goes away."""
    cdef char byte = b"?"
    cdef long done = 0
    cdef double start, end
    with nogil:
        start = now()
        end = start
        while end - start < seconds:
            if send(fd, &byte, 1, 0) != 1 or recv(fd, &byte, 1, 0) != 1:
                break
            done += 1
            end = now()
    return done, end - start
