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

/// sendmsg(2) of `length` bytes with one descriptor attached (SCM_RIGHTS), as QMP's `getfd` and
/// `add-fd` expect. Returns the bytes sent (the descriptor goes with the first byte) or -errno.
long clinuxhost_send_with_descriptor(int sock, const void *buffer, unsigned long length, int descriptor);

/// Opens tap device `name` (IFF_TAP | IFF_NO_PI | IFF_VNET_HDR) in the network namespace
/// `netns_fd` (-1: this process's), creating it if it does not exist and bringing a created one
/// up. The namespace is entered by a short-lived thread of its own, so no other thread of this
/// process ever changes namespace. Returns the tap's descriptor (close-on-exec) or -errno, with
/// `*stage` saying which step failed (1 setns, 2 socket, 3 open /dev/net/tun, 4 TUNSETIFF,
/// 5 bringing it up, 6 starting the thread) and `*created` whether the device was made here
/// (it then disappears with the last descriptor).
int clinuxhost_open_tap(int netns_fd, const char *name, int *created, int *stage);

#endif
