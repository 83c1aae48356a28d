/* The few atomic operations the engine's threads and the control side share, named for what they are used for,
 * on gcc's builtins. Words that one thread writes and others only read are plain aligned loads and stores
 * (relaxed); a handover between threads (a failure, a change of mode) is release on one side, acquire on the
 * other. */
#ifndef PYFLANNEL_ATOMICS_H
#define PYFLANNEL_ATOMICS_H

#include <stdint.h>

/* A word read by other threads: a counter, a busy share. */
static inline uint64_t load64(const uint64_t *p) { return __atomic_load_n(p, __ATOMIC_RELAXED); }
static inline void store64(uint64_t *p, uint64_t v) { __atomic_store_n(p, v, __ATOMIC_RELAXED); }
/* A counter with more than one writer. */
static inline void add64(uint64_t *p, uint64_t n) { __atomic_fetch_add(p, n, __ATOMIC_RELAXED); }
/* The ICMP rate limit's one word, shared by the engines of a tunnel. */
static inline int cas64(uint64_t *p, uint64_t *expected, uint64_t v)
{
    return __atomic_compare_exchange_n(p, expected, v, 0, __ATOMIC_RELAXED, __ATOMIC_RELAXED);
}
/* A flag handed from one thread to another: what was written before the store is seen after the load. */
static inline int acquire32(const int *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
static inline void release32(int *p, int v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
/* Set once: the first value wins (a side's failure keeps its first reason). */
static inline void set_once32(int *p, int v)
{
    int none = 0;
    __atomic_compare_exchange_n(p, &none, v, 0, __ATOMIC_RELEASE, __ATOMIC_RELAXED);
}

#endif
