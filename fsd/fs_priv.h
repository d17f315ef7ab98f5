/* Internals shared by fsd/fs.c (session, names, directories) and
 * fsd/files.c (open files: values, events, scratch files). */
#ifndef GUESTLINK_FSD_FS_PRIV_H
#define GUESTLINK_FSD_FS_PRIV_H

#include <fuse_lowlevel.h>
#include <stdbool.h>
#include <stdint.h>
#include <sys/stat.h>
#include <uv.h>

#include "core/buf.h"
#include "core/model.h"
#include "fsd/fs.h"
#include "fsd/nodes.h"
#include "fsd/notify.h"
#include "fsd/scratch.h"

/* Name entries stay valid this long; every name change is pushed to the
 * kernel through the notifier, so this only bounds a race. Attributes are
 * never cached (attr_timeout 0). */
#define FS_ENTRY_TIMEOUT 1.0
#define FS_DIR_ATTR_TIMEOUT 1.0
/* Longest time a read of an events file stays parked (then EINTR, which
 * coreutils' safe_read simply retries). */
#define FS_PARK_MAX_MS (60 * 1000)
#define FS_SWEEP_MS 5000
/* Requests handled per wake-up of the session fd. */
#define FS_RECEIVE_BUDGET 64

typedef enum fh_kind {
	FH_VALUE,    /* config key, device, settable attribute: read + buffered write */
	FH_SNAPSHOT, /* meta-data, agent: read-only */
	FH_EVENTS,   /* events files */
	FH_SCRATCH,  /* scratch files */
} fh_kind;

struct parked {
	struct parked *next;
	struct fs_fh *fh;
	fuse_req_t req;
	size_t size;
	uint64_t since_ms;
};

/* Per-open state, in fi->fh. Freed when released and no commit holds it. */
typedef struct fs_fh {
	struct fs_fh *next, *prev; /* fs->handles */
	gl_fs *fs;
	gl_node *node;
	fh_kind kind;
	unsigned refs;    /* the open, plus each commit in flight */
	bool released;
	bool writable;
	bool append;
	bool created;     /* counted in node->pending */
	/* FH_VALUE, FH_SNAPSHOT */
	gl_buf buf;
	bool loaded;      /* buf holds the file's content */
	bool dirty;       /* the buffer differs from what was last committed */
	bool touched;     /* written or truncated since the last commit */
	int failed;       /* a write was refused: nothing is committed */
	/* FH_SCRATCH */
	gl_scratch *scratch; /* a reference */
	/* FH_EVENTS */
	gl_sub *sub;
	bool all;         /* MNT/events: gline, else line */
	size_t cursor;    /* bytes of the head event already returned */
	struct parked *parked;
	struct fuse_pollhandle *ph;
} fs_fh;

struct gl_fs {
	uv_loop_t *loop;
	gl_model *m;
	struct fuse_session *se;
	struct fuse_buf buf;
	char *mountpoint;
	uv_poll_t poll;
	uv_timer_t sweep;
	int open_uv;       /* uv handles not yet closed */
	gl_notifier *notifier;
	gl_nodes nodes;
	gl_scratches scratches;
	fs_fh *handles;
	struct dirsnap *dirsnaps;
	bool polling;
	bool observing;
	bool stopping;
	bool ended_called;
	int64_t start_ns; /* mtime of the root before any instance change */
	gl_fs_ended_cb ended;
	void *ended_arg;
};

/* ---- fs.c, for files.c -------------------------------------------------- */

/* The node's instance, or NULL if it is gone (or was re-created). */
gl_instance *fs__instance(gl_fs *fs, const gl_node *n);
/* The text a read of a file node returns (value + "\n", meta-data as is),
 * appended to out. 0, -ENOENT (gone) or -ENOMEM. */
int fs__content(gl_fs *fs, gl_node *n, gl_buf *out);
/* Attributes of node n. 0 or -ENOENT. */
int fs__stat(gl_fs *fs, gl_node *n, struct stat *st);
/* The op that sets node n to value[0..len), n being KEY, DEVICE or ATTR. */
void fs__set_op(const gl_node *n, gl_op *op, const char *value, size_t len);
/* Reply to req with the attributes of n, or ENOENT. */
double fs__attr_timeout(const struct gl_node *n);
void fs__reply_attr(gl_fs *fs, fuse_req_t req, gl_node *n);
uint64_t fs__now_ms(gl_fs *fs);
int64_t fs__realtime_ns(void);

/* ---- files.c ---------------------------------------------------------------- */

/* Open node n with the flags the kernel sent; on success *out is a new
 * handle and fi's direct_io/nonseekable are set. 0 or -errno. */
int fs__open_node(gl_fs *fs, gl_node *n, struct fuse_file_info *fi, bool created,
                  fs_fh **out);
/* The kernel closed the file (or never got it): commit what is pending,
 * drop the open's reference. */
void fs__release_handle(fs_fh *fh);
void fs__handle_free_all(gl_fs *fs);
/* Parked reads get EOF, pollhandles are woken, subscribers freed. */
void fs__events_shutdown(gl_fs *fs);
/* EINTR for reads parked longer than FS_PARK_MAX_MS. */
void fs__sweep_parked(gl_fs *fs, uint64_t now_ms);
/* Truncate the handle's buffer (ftruncate on an open file). 0 or -errno. */
int fs__handle_truncate(fs_fh *fh, off_t size);
/* Set a scratch file's size (zero-filled when growing). 0 or -errno. */
int fs__scratch_resize(gl_fs *fs, gl_scratch *s, off_t size);
/* Set b's length, zero-filling what grows. 0 or -ENOMEM. */
int fs__buf_resize(gl_buf *b, size_t size);

void fs__op_open(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi);
void fs__op_read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
                 struct fuse_file_info *fi);
void fs__op_write(fuse_req_t req, fuse_ino_t ino, const char *buf, size_t size, off_t off,
                  struct fuse_file_info *fi);
void fs__op_flush(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi);
void fs__op_fsync(fuse_req_t req, fuse_ino_t ino, int datasync, struct fuse_file_info *fi);
void fs__op_release(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi);
void fs__op_poll(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi,
                 struct fuse_pollhandle *ph);

#endif
