/* The durable store behind the model. The model is the only user; it keeps
 * everything in memory and writes each change through a store before
 * acknowledging it. One embedded implementation: SQLite (store_sqlite.c).
 *
 * Threading: gl_store_open/load/close run on the loop thread at start-up and
 * shutdown. commit() and write() run on a libuv pool thread, never two at
 * once for one store; sync() may run on another pool thread at the same
 * time as a write() or another sync(). They touch nothing but the store and
 * the batch they are given. */
#ifndef GUESTLINK_CORE_STORE_H
#define GUESTLINK_CORE_STORE_H

#include <stddef.h>
#include <stdint.h>

/* One instance's own row: everything but its config, devices and events. */
typedef struct gl_irow {
	const char *name;
	const char *type;      /* "container" | "virtual-machine" */
	const char *state;     /* "Stopped" | "Started" | "Ready" */
	int guest_state;       /* 1 if the guest has set the state since start */
	int64_t init_pid;      /* 0: none */
	const char *cgroup;    /* "" : none */
	int64_t vsock_cid;     /* 0: none */
	const char *vsock_uds; /* "" : none */
	int64_t ctime_ns;
	int64_t mtime_ns;
} gl_irow;

typedef enum gl_sop_kind {
	GL_SOP_INSTANCE_PUT, /* insert or replace the row `irow` */
	GL_SOP_INSTANCE_DEL, /* delete instance `instance` with its config, devices, events */
	GL_SOP_CONFIG_PUT,   /* instance, key, value[vlen], mtime_ns */
	GL_SOP_CONFIG_DEL,   /* instance, key */
	GL_SOP_DEVICE_PUT,   /* instance, key (= device name), value (canonical JSON), mtime_ns */
	GL_SOP_DEVICE_DEL,   /* instance, key */
	GL_SOP_EVENT_PUT,    /* instance, seq, value = event JSON line; the store keeps
	                        the newest GL_STORE_EVENT_HISTORY per instance, and
	                        fewer than GL_STORE_EVENT_PRUNE_EVERY older ones */
} gl_sop_kind;

/* The state directory's lock file, flock()ed by the open store; it holds
 * the owner's pid (guestlinkd reads it to find a predecessor stuck exiting). */
#define GL_STORE_LOCK_NAME "guestlink.lock"

#define GL_STORE_EVENT_HISTORY 1024
#define GL_STORE_EVENT_PRUNE_EVERY 64

typedef struct gl_sop {
	gl_sop_kind kind;
	const char *instance;
	const char *key;
	const char *value;
	size_t vlen;
	int64_t mtime_ns;
	uint64_t seq;
	const gl_irow *irow; /* GL_SOP_INSTANCE_PUT only */
} gl_sop;

/* What load() reports, in this order: every instance, then config, devices,
 * and the newest event sequence number of each instance that has one.
 * Every pointer passed to a callback is borrowed for the call only; values
 * are NUL-terminated (and may also hold NUL bytes within vlen).
 * A callback returning non-zero stops the load with that value. */
typedef struct gl_store_loader {
	void *arg;
	int (*instance)(void *arg, const gl_irow *row);
	int (*config)(void *arg, const char *instance, const char *key, const char *value,
	              size_t vlen, int64_t mtime_ns);
	int (*device)(void *arg, const char *instance, const char *name, const char *value,
	              size_t vlen, int64_t mtime_ns);
	int (*seq)(void *arg, const char *instance, uint64_t seq);
} gl_store_loader;

typedef struct gl_store gl_store;

typedef struct gl_store_ops {
	/* Apply ops[0..n) atomically and durably (all or nothing). 0 or -errno:
	 * -ENOSPC when the disk is full, -EIO for anything else. */
	int (*commit)(gl_store *s, const gl_sop *ops, size_t n);
	/* The same in two steps, so that a caller can write the next batch
	 * while the last one is being synced (both NULL: use commit()).
	 * write(): apply ops[0..n) atomically, seen by later writes, not yet
	 * durable. sync(): make durable every write() that returned before it
	 * was called. After a failed sync() what reached the disk is unknown:
	 * the store is broken and every later write() and sync() fails with
	 * -EIO (a restart loads whatever the disk holds). */
	int (*write)(gl_store *s, const gl_sop *ops, size_t n);
	int (*sync)(gl_store *s);
	int (*load)(gl_store *s, const gl_store_loader *l);
	void (*close)(gl_store *s); /* frees s */
} gl_store_ops;

struct gl_store {
	const gl_store_ops *ops;
	/* Why the last open/load/write/sync failed, for logs. The write and
	 * the sync of two batches run on two threads: set it with
	 * gl_store_set_err() and read it with gl_store_err() from any thread
	 * but the one that opened the store. */
	char errmsg[512];
};

/* Set s->errmsg (printf format), under a lock shared by every store. */
__attribute__((format(printf, 2, 3))) void gl_store_set_err(gl_store *s, const char *fmt, ...);
/* Copy s->errmsg into out (always NUL-terminated), under that lock. */
void gl_store_err(gl_store *s, char *out, size_t len);

/* Open (creating if absent) the SQLite store in directory `dir`
 * (`dir`/guestlink.db, WAL mode; sync() is one fdatasync of the WAL, which
 * makes commit() as durable as SQLite's synchronous=FULL). A file that is not a
 * SQLite database, is corrupt, or is some other application's database is
 * refused, never overwritten: *err then points at a static message and
 * the result is -EINVAL (foreign/corrupt) or another -errno.
 * On success *out is a new store. */
int gl_store_sqlite_open(const char *dir, gl_store **out, char *err, size_t errlen);

static inline int gl_store_commit(gl_store *s, const gl_sop *ops, size_t n)
{
	return s->ops->commit(s, ops, n);
}
static inline int gl_store_load(gl_store *s, const gl_store_loader *l)
{
	return s->ops->load(s, l);
}
static inline void gl_store_close(gl_store *s)
{
	if (s)
		s->ops->close(s);
}

#endif
