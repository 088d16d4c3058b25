#include "clinuxhost.h"

#include <errno.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>

int clinuxhost_disable_transparent_huge_pages(void) {
    return prctl(PR_SET_THP_DISABLE, 1, 0, 0, 0) == 0 ? 0 : -errno;
}

int clinuxhost_thp_disabled(void) {
    int value = prctl(PR_GET_THP_DISABLE, 0, 0, 0, 0);
    return value < 0 ? -errno : value;
}

int clinuxhost_set_thp_disabled(int disabled) {
    return prctl(PR_SET_THP_DISABLE, disabled ? 1 : 0, 0, 0, 0) == 0 ? 0 : -errno;
}

int clinuxhost_pidfd_open(int pid) {
#ifdef SYS_pidfd_open
    long fd = syscall(SYS_pidfd_open, pid, 0);
    return fd < 0 ? -errno : (int)fd;
#else
    return -ENOSYS;
#endif
}

int clinuxhost_pidfd_send_signal(int pidfd, int signal) {
#ifdef SYS_pidfd_send_signal
    return syscall(SYS_pidfd_send_signal, pidfd, signal, NULL, 0) == 0 ? 0 : -errno;
#else
    return -ENOSYS;
#endif
}

#include <string.h>
#include <sys/socket.h>

long clinuxhost_send_with_descriptor(int sock, const void *buffer, unsigned long length, int descriptor) {
    struct iovec iov = { .iov_base = (void *)buffer, .iov_len = length };
    union {
        char buf[CMSG_SPACE(sizeof(int))];
        struct cmsghdr align;
    } control;
    memset(&control, 0, sizeof(control));
    struct msghdr message = {
        .msg_iov = &iov, .msg_iovlen = 1,
        .msg_control = control.buf, .msg_controllen = sizeof(control.buf),
    };
    struct cmsghdr *header = CMSG_FIRSTHDR(&message);
    header->cmsg_level = SOL_SOCKET;
    header->cmsg_type = SCM_RIGHTS;
    header->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(header), &descriptor, sizeof(int));
    long sent = sendmsg(sock, &message, MSG_NOSIGNAL);
    return sent < 0 ? -errno : sent;
}
