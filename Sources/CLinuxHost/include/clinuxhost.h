#ifndef CLINUXHOST_H
#define CLINUXHOST_H

/// Linux calls Swift cannot import directly: variadic C functions (prctl(2), syscall(2)).
/// Each returns 0 (or a descriptor) on success and -errno on failure.

/// Disables transparent huge pages for this process and every process it starts from now on
/// (PR_SET_THP_DISABLE is inherited across fork and preserved across execve).
int clinuxhost_disable_transparent_huge_pages(void);

/// PR_GET_THP_DISABLE: 1 when disabled, 0 when not.
int clinuxhost_thp_disabled(void);

/// PR_SET_THP_DISABLE to `disabled` (0 or 1).
int clinuxhost_set_thp_disabled(int disabled);

/// pidfd_open(2) (Linux >= 5.3): a descriptor that keeps naming this one process even after its
/// PID is reused, so a signal sent through it can never reach another process.
int clinuxhost_pidfd_open(int pid);

/// pidfd_send_signal(2) (Linux >= 5.1).
int clinuxhost_pidfd_send_signal(int pidfd, int signal);

/// Opens tap device `name` (IFF_TAP | IFF_NO_PI | IFF_VNET_HDR) in the network namespace
/// `netns_fd` (-1: this process's), creating it if it does not exist and bringing a created one
/// up. The namespace is entered by a short-lived thread of its own, so no other thread of this
/// process ever changes namespace. Returns the tap's descriptor (close-on-exec) or -errno, with
/// `*stage` saying which step failed (1 setns, 2 socket, 3 open /dev/net/tun, 4 TUNSETIFF,
/// 5 bringing it up, 6 starting the thread) and `*created` whether the device was made here
/// (exclusively, IFF_TUN_EXCL; it then disappears with the last descriptor) rather than found.
int clinuxhost_open_tap(int netns_fd, const char *name, int *created, int *stage);

/// openat2(2) of `path` with RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS (Linux >= 5.6): no
/// symbolic link is followed anywhere in the path, so nobody who can write a directory on the way
/// can point the open elsewhere. Returns the descriptor or -errno.
int clinuxhost_open_beneath_no_symlinks(const char *path, int flags);

/// openat2(2) of `path` relative to `dirfd` with RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS |
/// RESOLVE_NO_MAGICLINKS: the path stays below the directory and follows no link on the way.
/// Returns the descriptor or -errno.
int clinuxhost_openat_beneath(int dirfd, const char *path, int flags);

/// fstatfs(2)'s f_type of `fd` (e.g. NSFS_MAGIC for a namespace file), or -errno.
long clinuxhost_filesystem_type(int fd);

/// O_PATH, which Swift does not see (it needs _GNU_SOURCE): a handle that opens nothing.
int clinuxhost_o_path(void);
/// O_TMPFILE (also _GNU_SOURCE): a file without a name until linkat(2) gives it one.
int clinuxhost_o_tmpfile(void);
/// renameat2(2) with RENAME_NOREPLACE: 0, or -errno (-EEXIST when `to` exists).
long clinuxhost_rename_noreplace(const char *from, const char *to);
long long clinuxhost_copy_file_range(int in, long long *in_offset, int out, long long *out_offset, unsigned long long length);
long long clinuxhost_seek_data(int fd, long long offset, int data);
/// sendmsg(2) of `length` bytes with one descriptor attached (SCM_RIGHTS), as QMP's `getfd` and
/// `add-fd`, the guest-setup helper and the descriptor socket expect; retried on EINTR. Returns
/// the bytes sent (the descriptor goes with the first byte) or -errno.
long clinuxhost_send_with_fd(int socket, const void *data, unsigned long length, int fd);
long clinuxhost_receive_with_fd(int socket, void *data, unsigned long capacity, int *fd);

/// recvmsg(2) without waiting (MSG_DONTWAIT) of up to `capacity` bytes and every descriptor
/// attached (close-on-exec), up to `max` (253 suffice) into `fds`, `*count` of them. Closes none.
/// Returns the bytes received (0 at the end) or -errno.
long clinuxhost_receive_descriptors(int socket, void *data, unsigned long capacity, int *fds, int max, int *count);

/// TUNGETIFF on `fd`: the tun/tap interface it is attached to (`name`, 16 bytes, NUL-ended) and
/// its flags (IFF_TAP 0x2, IFF_NO_PI 0x1000, IFF_VNET_HDR 0x4000). Returns 0 or -errno (a
/// descriptor of anything else: EBADFD, ENOTTY or EINVAL).
int clinuxhost_tap_info(int fd, char *name, int *flags);

/// Forks a child that waits (at most `timeout_ms`) until `lines` newline-ended lines have arrived
/// on `fd`, then exits; it keeps only `fd` and `log_fd` (where it says so when the lines did not
/// come) and runs in a session of its own. No exec: it costs a fork, not a program's start-up on
/// a machine whose cores the just-resumed guest is using. For short-lived processes only: the
/// child is not reaped here. Returns its PID or -errno.
int clinuxhost_fork_reply_waiter(int fd, int lines, int timeout_ms, int log_fd);

/// accept4(2) with SOCK_CLOEXEC | SOCK_NONBLOCK: the connection or -errno.
int clinuxhost_accept_nonblocking(int listener);

/// pipe2(2) with O_CLOEXEC | O_NONBLOCK: 0 or -errno.
int clinuxhost_pipe_nonblocking(int fds[2]);

/// struct ucred (SO_PEERCRED), which Swift does not see without _GNU_SOURCE; the same layout.
struct clinuxhost_ucred {
    int pid;
    unsigned int uid;
    unsigned int gid;
};

#endif
