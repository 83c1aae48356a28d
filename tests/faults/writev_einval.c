/* LD_PRELOAD shim: writev() fails with EINVAL whenever it carries a virtio-net header that asks for GSO (the
 * coalesced writes of several segments into the TUN), which is how kernels of the 6.6.44 era refused them (a
 * virtio header regression). Today's kernels take them, so the refusal is injected here, at the syscall
 * boundary, and the engine's own fallback (coalescing off, one write per segment) runs as it is. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdint.h>
#include <sys/uio.h>

#define VNET_HDR_LEN 10     /* struct virtio_net_hdr: flags, gso_type, ... */

ssize_t writev(int fd, const struct iovec *iov, int iovcnt)
{
    static ssize_t (*real)(int, const struct iovec *, int);
    if (!real)
        real = (ssize_t (*)(int, const struct iovec *, int))dlsym(RTLD_NEXT, "writev");
    if (iovcnt > 1 && iov[0].iov_len == VNET_HDR_LEN && ((const uint8_t *)iov[0].iov_base)[1] != 0) {
        errno = EINVAL;
        return -1;
    }
    return real(fd, iov, iovcnt);
}
