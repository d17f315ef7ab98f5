/* The notifier: sends entry invalidations to the kernel from a thread of
 * its own. fuse_lowlevel_notify_inval_entry takes the parent directory's
 * inode lock in the kernel; a LOOKUP or CREATE in that directory holds the
 * same lock while it waits for the loop thread's reply, so the loop thread
 * must never send one itself (fuse-live-files.md §5.2).
 *
 * The loop thread queues names with gl_notifier_inval_entry; the queue is
 * handed to the thread in one batch before the loop sleeps (uv_prepare). */
#ifndef GUESTLINK_FSD_NOTIFY_H
#define GUESTLINK_FSD_NOTIFY_H

#include <stddef.h>
#include <stdint.h>
#include <uv.h>

struct fuse_session;
typedef struct gl_notifier gl_notifier;

/* Start the thread. `se` is borrowed and must stay alive until the stop
 * callback has run. 0 or -errno; on success *out is new. */
int gl_notifier_new(uv_loop_t *loop, struct fuse_session *se, gl_notifier **out);

/* Queue "forget the dentry `name` in directory `parent`" (the name is
 * copied). Loop thread only. Errors (out of memory, stopped) are dropped:
 * the entry then simply expires after its timeout. */
void gl_notifier_inval_entry(gl_notifier *n, uint64_t parent, const char *name, size_t len);

/* Stop the thread without waiting on the loop: what is still queued is
 * dropped; `cb` runs from the loop once the thread has been joined and the
 * notifier freed (never inside this call). */
/* Queue an invalidation of inode `ino`'s attributes (not its data). */
void gl_notifier_inval_inode(gl_notifier *n, uint64_t ino);
void gl_notifier_stop(gl_notifier *n, void (*cb)(void *arg), void *arg);

#endif
