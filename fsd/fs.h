/* The FUSE face: MNT/ as described in DESIGN.md "The FUSE tree", served by
 * a libfuse3 low-level session whose fd is polled by the libuv loop
 * (fuse-live-files.md §1). No thread serves requests; entry invalidations
 * go through a notifier thread (fsd/notify.h). */
#ifndef GUESTLINK_FSD_FS_H
#define GUESTLINK_FSD_FS_H

#include <stdbool.h>
#include <uv.h>

#include "core/model.h"

typedef struct gl_fs gl_fs;

typedef struct gl_fs_opts {
	const char *mountpoint; /* must exist */
	bool allow_other;       /* mount with allow_other */
	bool debug;             /* libfuse's request trace on stderr */
} gl_fs_opts;

/* Called once, from the loop, when the file system has stopped serving:
 * after gl_fs_stop, or because the mount went away (umount). The caller
 * then closes the model (which answers the requests still waiting for a
 * commit) and calls gl_fs_destroy. */
typedef void (*gl_fs_ended_cb)(gl_fs *fs, void *arg);

/* Mount the tree of model `m` (borrowed; must stay open until
 * gl_fs_destroy) and start serving it on `loop`. Logs why on failure.
 * 0 or -errno; on success *out is new. */
int gl_fs_start(uv_loop_t *loop, gl_model *m, const gl_fs_opts *o, gl_fs_ended_cb ended,
                void *arg, gl_fs **out);

/* Begin an orderly stop: parked reads of events files get EOF, no more
 * notifications, the session fd stops being polled; `ended` runs when
 * done. Idempotent. */
void gl_fs_stop(gl_fs *fs);

/* Unmount, destroy the session, free everything. Only after `ended` ran. */
void gl_fs_destroy(gl_fs *fs);

#endif
