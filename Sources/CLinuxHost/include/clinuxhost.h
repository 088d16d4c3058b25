#ifndef CLINUXHOST_H
#define CLINUXHOST_H

/// Linux calls Swift cannot import directly (variadic C functions such as prctl(2)).

/// Disables transparent huge pages for this process and every process it starts from now on
/// (PR_SET_THP_DISABLE is inherited across fork and preserved across execve). Returns 0 or -errno.
int clinuxhost_disable_transparent_huge_pages(void);

#endif
