/* LD_PRELOAD shim: sendmmsg() fails with EIO whenever a message carries a UDP_SEGMENT control message, which is
 * how a kernel refuses UDP GSO on an egress path that cannot do it (older kernels without TX checksum offload,
 * IPsec paths). The kernels the tests run on segment in software instead, so the refusal is injected here, at
 * the syscall boundary, leaving the engine's code untouched. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <netinet/in.h>
#include <sys/socket.h>

#define UDP_SEGMENT 103

int sendmmsg(int fd, struct mmsghdr *msgs, unsigned int n, int flags)
{
    static int (*real)(int, struct mmsghdr *, unsigned int, int);
    if (!real)
        real = (int (*)(int, struct mmsghdr *, unsigned int, int))dlsym(RTLD_NEXT, "sendmmsg");
    if (n > 0) {
        struct msghdr *m = &msgs[0].msg_hdr;
        for (struct cmsghdr *c = CMSG_FIRSTHDR(m); c; c = CMSG_NXTHDR(m, c))
            if (c->cmsg_level == IPPROTO_UDP && c->cmsg_type == UDP_SEGMENT) {
                errno = EIO;
                return -1;
            }
    }
    return real(fd, msgs, n, flags);
}
