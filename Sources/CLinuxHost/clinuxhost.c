#define _GNU_SOURCE
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


#include <fcntl.h>
#include <linux/if.h>
#include <linux/if_tun.h>
#include <pthread.h>
#include <sched.h>
#include <sys/ioctl.h>

struct tap_request {
    int netns_fd;
    const char *name;
    int fd;
    int created;
    int error;
    int stage;
};

static void *clinuxhost_open_tap_thread(void *argument) {
    struct tap_request *request = argument;
    // setns(2) changes the calling thread only; this thread ends right after.
    if (request->netns_fd >= 0 && setns(request->netns_fd, CLONE_NEWNET) != 0) {
        request->error = errno; request->stage = 1; return NULL;
    }
    int probe = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (probe < 0) { request->error = errno; request->stage = 2; return NULL; }
    int fd = open("/dev/net/tun", O_RDWR | O_CLOEXEC);
    if (fd < 0) { request->error = errno; request->stage = 3; close(probe); return NULL; }
    // Make it, exclusively; only if it exists already, attach to it. No check-then-act: `created`
    // says which of the two calls succeeded.
    struct ifreq tap;
    memset(&tap, 0, sizeof(tap));
    strncpy(tap.ifr_name, request->name, IFNAMSIZ - 1);
    tap.ifr_flags = (short)(IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | IFF_TUN_EXCL);  // 0x8000 fits the kernel's unsigned short
    request->created = 1;
    if (ioctl(fd, TUNSETIFF, &tap) != 0) {
        if (errno != EBUSY) {
            request->error = errno; request->stage = 4; close(fd); close(probe); return NULL;
        }
        request->created = 0;
        memset(&tap, 0, sizeof(tap));
        strncpy(tap.ifr_name, request->name, IFNAMSIZ - 1);
        tap.ifr_flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
        if (ioctl(fd, TUNSETIFF, &tap) != 0) {
            request->error = errno; request->stage = 4; close(fd); close(probe); return NULL;
        }
    }
    if (request->created) {
        struct ifreq flags;
        memset(&flags, 0, sizeof(flags));
        strncpy(flags.ifr_name, request->name, IFNAMSIZ - 1);
        if (ioctl(probe, SIOCGIFFLAGS, &flags) != 0 || (flags.ifr_flags |= IFF_UP, ioctl(probe, SIOCSIFFLAGS, &flags) != 0)) {
            request->error = errno; request->stage = 5; close(fd); close(probe); return NULL;
        }
    }
    close(probe);
    request->fd = fd;
    return NULL;
}

int clinuxhost_open_tap(int netns_fd, const char *name, int *created, int *stage) {
    struct tap_request request = { .netns_fd = netns_fd, .name = name, .fd = -1 };
    pthread_t thread;
    int started = pthread_create(&thread, NULL, clinuxhost_open_tap_thread, &request);
    if (started != 0) { *stage = 6; *created = 0; return -started; }
    pthread_join(thread, NULL);
    *created = request.created;
    *stage = request.stage;
    return request.fd >= 0 ? request.fd : -request.error;
}

#include <linux/openat2.h>
#include <sys/vfs.h>

int clinuxhost_openat_beneath(int dirfd, const char *path, int flags) {
#ifdef SYS_openat2
    struct open_how how;
    memset(&how, 0, sizeof(how));
    how.flags = (unsigned long long)flags;
    how.resolve = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS;
    long fd = syscall(SYS_openat2, dirfd, path, &how, sizeof(how));
    return fd < 0 ? -errno : (int)fd;
#else
    return -ENOSYS;
#endif
}

int clinuxhost_open_beneath_no_symlinks(const char *path, int flags) {
#ifdef SYS_openat2
    struct open_how how;
    memset(&how, 0, sizeof(how));
    how.flags = (unsigned long long)flags;
    how.resolve = RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS;
    long fd = syscall(SYS_openat2, AT_FDCWD, path, &how, sizeof(how));
    return fd < 0 ? -errno : (int)fd;
#else
    return -ENOSYS;
#endif
}

long clinuxhost_filesystem_type(int fd) {
    struct statfs info;
    return fstatfs(fd, &info) == 0 ? (long)info.f_type : -errno;
}

int clinuxhost_o_path(void) { return O_PATH; }
int clinuxhost_o_tmpfile(void) { return O_TMPFILE; }

#include <stdio.h>
#include <sys/syscall.h>

long clinuxhost_rename_noreplace(const char *from, const char *to) {
    long result = syscall(SYS_renameat2, AT_FDCWD, from, AT_FDCWD, to, 1 /* RENAME_NOREPLACE */);
    return result < 0 ? -errno : 0;
}

#include <poll.h>
#include <sys/resource.h>
#include <time.h>

static long clinuxhost_now_ms(void) {
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return now.tv_sec * 1000L + now.tv_nsec / 1000000L;
}

int clinuxhost_fork_reply_waiter(int fd, int lines, int timeout_ms, int log_fd) {
    pid_t pid = fork();
    if (pid != 0) return pid < 0 ? -errno : pid;
    // The child of a multi-threaded process: only system calls from here on (no allocation, no
    // locks), and it must hold nothing of its parent's but these two descriptors (a copy of a
    // store lock's descriptor would keep the lock for as long as this child lives).
    setsid();
    // The channel becomes 3 and the log 4 (moved above them first, so that neither overwrites
    // the other), then everything from 5 up is closed: with close_range(2) where the kernel has
    // it (5.9), else one close(2) per possible descriptor.
    int channel = fcntl(fd, F_DUPFD, 5);
    int log = log_fd >= 0 ? fcntl(log_fd, F_DUPFD, 5) : -1;
    if (channel < 0 || dup2(channel, 3) != 3) _exit(2);
    if (log >= 0 && dup2(log, 4) != 4) log = -1;
    channel = 3;
    if (log >= 0) log = 4;
    if (syscall(SYS_close_range, 5U, ~0U, 0U) != 0) {
        struct rlimit limit;
        long highest = getrlimit(RLIMIT_NOFILE, &limit) == 0 && limit.rlim_cur != RLIM_INFINITY ? (long)limit.rlim_cur : 65536;
        for (long other = 5; other < highest; other++) close((int)other);
    }
    for (int standard = 0; standard < 3; standard++) close(standard);
    if (log < 0) close(4);
    long deadline = clinuxhost_now_ms() + timeout_ms;
    char buffer[4096];
    int seen = 0;
    while (seen < lines) {
        long left = deadline - clinuxhost_now_ms();
        if (left <= 0) break;
        struct pollfd entry = { .fd = channel, .events = POLLIN };
        int ready = poll(&entry, 1, (int)left);
        if (ready < 0 && errno == EINTR) continue;
        if (ready <= 0) continue;
        long count = recv(channel, buffer, sizeof(buffer), 0);
        if (count < 0 && errno == EINTR) continue;
        if (count <= 0) break;
        for (long i = 0; i < count; i++) if (buffer[i] == '\n') seen++;
    }
    if (seen < lines && log >= 0) {
        static const char message[] = "vmtemplate: the guest did not answer its clock and hostname requests in time (or the channel closed): its clock may be the template's\n";
        ssize_t ignored = write(log, message, sizeof(message) - 1);
        (void)ignored;
    }
    _exit(seen < lines ? 1 : 0);
}

/* copy_file_range(2) and SEEK_DATA/SEEK_HOLE need _GNU_SOURCE, which Swift's Glibc module does
 * not define. Returns the bytes copied, or -errno. */
long long clinuxhost_copy_file_range(int in, long long *in_offset, int out, long long *out_offset, unsigned long long length) {
    loff_t input = *in_offset, output = *out_offset;
    ssize_t copied = copy_file_range(in, &input, out, &output, length, 0);
    if (copied < 0) return -errno;
    *in_offset = input;
    *out_offset = output;
    return copied;
}

/* lseek(fd, offset, SEEK_DATA or SEEK_HOLE): the next data (data != 0) or hole at or after
 * offset, or -errno (-ENXIO: no more data). */
long long clinuxhost_seek_data(int fd, long long offset, int data) {
    off_t found = lseek(fd, offset, data ? SEEK_DATA : SEEK_HOLE);
    return found < 0 ? -errno : (long long)found;
}

#include <string.h>
#include <sys/socket.h>

/* Sends `length` bytes and, with them, a copy of descriptor `fd` (SCM_RIGHTS). Returns the bytes
 * sent, or -errno. */
long clinuxhost_send_with_fd(int socket, const void *data, unsigned long length, int fd) {
    struct iovec iov = { (void *)data, length };
    union { char buffer[CMSG_SPACE(sizeof(int))]; struct cmsghdr align; } control;
    memset(&control, 0, sizeof(control));
    struct msghdr message = {0};
    message.msg_iov = &iov;
    message.msg_iovlen = 1;
    message.msg_control = control.buffer;
    message.msg_controllen = sizeof(control.buffer);
    struct cmsghdr *header = CMSG_FIRSTHDR(&message);
    header->cmsg_level = SOL_SOCKET;
    header->cmsg_type = SCM_RIGHTS;
    header->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(header), &fd, sizeof(int));
    ssize_t sent;
    do { sent = sendmsg(socket, &message, MSG_NOSIGNAL); } while (sent < 0 && errno == EINTR);
    return sent < 0 ? -errno : (long)sent;
}

static long receive_descriptors(int socket, void *data, unsigned long capacity, int *fds, int max, int *count, int flags);

/* Receives up to `capacity` bytes and, if one came with them, a descriptor (close-on-exec) into
 * *fd (else -1; any further one is closed). Returns the bytes received (0 at the end), or -errno. */
long clinuxhost_receive_with_fd(int socket, void *data, unsigned long capacity, int *fd) {
    int fds[253];
    int count = 0;
    long received = receive_descriptors(socket, data, capacity, fds, 253, &count, 0);
    *fd = count > 0 ? fds[0] : -1;
    for (int i = 1; i < count; i++) close(fds[i]);
    return received;
}

#include <linux/if_tun.h>

/* TUNGETIFF: the interface a tun/tap descriptor is attached to, and its flags. */
int clinuxhost_tap_info(int fd, char *name, int *flags) {
    struct ifreq request;
    memset(&request, 0, sizeof(request));
    if (ioctl(fd, TUNGETIFF, &request) != 0) return -errno;
    memcpy(name, request.ifr_name, IFNAMSIZ);
    name[IFNAMSIZ - 1] = 0;
    *flags = (unsigned short)request.ifr_flags;
    return 0;
}

/* accept4(2) with SOCK_CLOEXEC | SOCK_NONBLOCK (a GNU call Swift does not see): no moment in
 * which a process started by another thread could inherit the connection. */
int clinuxhost_accept_nonblocking(int listener) {
    int fd = accept4(listener, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK);
    return fd < 0 ? -errno : fd;
}

/* pipe2(2) with O_CLOEXEC | O_NONBLOCK. */
int clinuxhost_pipe_nonblocking(int fds[2]) {
    return pipe2(fds, O_CLOEXEC | O_NONBLOCK) == 0 ? 0 : -errno;
}

/* Receives up to `capacity` bytes and every descriptor that came with them (close-on-exec), up
 * to `max` into `fds` (*count says how many; the control buffer holds 253, SCM_MAX_FD, so the
 * kernel never drops any itself). Closes none: a descriptor from another user may block its
 * closer (a FUSE file's flush), so closing is the caller's choice of thread. Returns the bytes
 * received (0 at the end), or -errno. */
long clinuxhost_receive_descriptors(int socket, void *data, unsigned long capacity, int *fds, int max, int *count) {
    return receive_descriptors(socket, data, capacity, fds, max, count, MSG_DONTWAIT);
}

static long receive_descriptors(int socket, void *data, unsigned long capacity, int *fds, int max, int *count, int flags) {
    struct iovec iov = { data, capacity };
    union { char buffer[CMSG_SPACE(sizeof(int) * 253)]; struct cmsghdr align; } control;
    struct msghdr message = {0};
    message.msg_iov = &iov;
    message.msg_iovlen = 1;
    message.msg_control = control.buffer;
    message.msg_controllen = sizeof(control.buffer);
    *count = 0;
    ssize_t received;
    do { received = recvmsg(socket, &message, MSG_CMSG_CLOEXEC | flags); } while (received < 0 && errno == EINTR);
    if (received < 0) return -errno;
    for (struct cmsghdr *header = CMSG_FIRSTHDR(&message); header; header = CMSG_NXTHDR(&message, header)) {
        if (header->cmsg_level != SOL_SOCKET || header->cmsg_type != SCM_RIGHTS) continue;
        int found = (int)((header->cmsg_len - CMSG_LEN(0)) / sizeof(int));
        for (int i = 0; i < found; i++) {
            int received_fd;
            memcpy(&received_fd, CMSG_DATA(header) + i * sizeof(int), sizeof(int));
            // More than `max` cannot come (the buffer holds 253); closed here only if it did.
            if (*count < max) fds[(*count)++] = received_fd; else close(received_fd);
        }
    }
    return (long)received;
}
