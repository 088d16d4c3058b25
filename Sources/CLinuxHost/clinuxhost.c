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
