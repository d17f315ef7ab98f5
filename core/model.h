/* The live model: instances, their config, devices, state and binding, and
 * the event bus. Owned by one thread (the loop's); no locks. Every change is
 * a gl_op submitted to the commit queue: ops are validated, written through
 * the store in group-committed batches on the libuv pool, and only once the
 * batch is durable are they applied to memory, published as events, shown
 * to observers, and acknowledged -- in submission order.
 *
 * Readers (gl_model_find, gl_instance_*) see durable state only. Pointers
 * returned by readers are borrowed: valid until control returns to the loop
 * (the next applied batch may free them). */
#ifndef GUESTLINK_CORE_MODEL_H
#define GUESTLINK_CORE_MODEL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "core/buf.h"
#include "core/store.h"

typedef struct gl_model gl_model;
typedef struct gl_instance gl_instance;
typedef struct gl_sub gl_sub;

typedef struct gl_limits {
	size_t max_value;       /* bytes of one config value or device JSON; default 1 MiB */
	size_t max_sub_bytes;   /* queued bytes per event subscriber; default 4 MiB */
	size_t history;         /* events kept in memory per instance for resume; default 256 */
	size_t max_instances;   /* default 1000000 */
	size_t max_keys;        /* config keys + devices per instance; default 65536 */
} gl_limits;

void gl_limits_default(gl_limits *l);

/* ---- lifetime ---------------------------------------------------------- */

/* A new model on `loop` over `store` (borrowed; must outlive the model).
 * Loads everything from the store synchronously. On failure returns NULL and
 * leaves a message in errbuf. */
gl_model *gl_model_open(uv_loop_t *loop, gl_store *store, const gl_limits *lim, char *errbuf,
                        size_t errlen);
/* Waits for the batch in flight (if any), fails queued ops with -ECANCELED
 * (their callbacks run inside this call), ends every subscriber, frees the
 * model. The store is not closed. */
void gl_model_close(gl_model *m);
const gl_limits *gl_model_limits(const gl_model *m);

/* ---- reading ----------------------------------------------------------- */

typedef struct gl_entry {
	const char *key;   /* NUL-terminated */
	const char *value; /* value[len] is NUL, but values may hold NUL bytes */
	size_t len;
	int64_t mtime_ns;
} gl_entry;

gl_instance *gl_model_find(gl_model *m, const char *name); /* NULL if absent */
gl_instance *gl_model_find_n(gl_model *m, const char *name, size_t n);
/* All instances sorted by name; *n set to their number. */
gl_instance *const *gl_model_instances(gl_model *m, size_t *n);
int64_t gl_model_mtime(const gl_model *m); /* last instance added or removed */

const char *gl_instance_name(const gl_instance *i);
/* Unique for the life of the process; a re-created name gets a new one. */
uint64_t gl_instance_uid(const gl_instance *i);
bool gl_instance_is_vm(const gl_instance *i);
int64_t gl_instance_ctime(const gl_instance *i);
int64_t gl_instance_mtime(const gl_instance *i); /* last change of anything in it */
uint64_t gl_instance_seq(const gl_instance *i);  /* newest event sequence number, 0: none */

/* Config keys / devices sorted by key; *n set to their number. */
const gl_entry *gl_instance_config(const gl_instance *i, size_t *n);
const gl_entry *gl_instance_config_get(const gl_instance *i, const char *key, size_t klen);
const gl_entry *gl_instance_devices(const gl_instance *i, size_t *n);
const gl_entry *gl_instance_device_get(const gl_instance *i, const char *name, size_t nlen);

/* Instance attributes: the one-value files of the FUSE tree. */
typedef enum gl_attr {
	GL_ATTR_TYPE,      /* "container" | "virtual-machine" */
	GL_ATTR_STATE,     /* "Stopped" | "Started" | "Ready" */
	GL_ATTR_INIT_PID,  /* decimal pid, "" when unbound; binding a Stopped
	                      instance makes it Started, unbinding makes it
	                      Stopped (and forgets the guest-set state) */
	GL_ATTR_CGROUP,    /* absolute cgroup path, "" when unbound */
	GL_ATTR_VSOCK_CID, /* decimal CID (3..0xfffffffe), "" when unbound */
	GL_ATTR_VSOCK_UDS, /* absolute path, "" when unbound */
	GL_ATTR_AGENT,     /* read-only: agent status text */
	GL_ATTR_COUNT
} gl_attr;
/* Append the attribute's text (no trailing newline) to out. 0 or -ENOMEM. */
int gl_instance_attr(const gl_instance *i, gl_attr a, gl_buf *out);
/* Same, plus when it last changed. */
int64_t gl_instance_attr_mtime(const gl_instance *i, gl_attr a);
int64_t gl_instance_init_pid(const gl_instance *i);
/* The `agent` file's text (docs/control-protocol.md), kept in memory only:
 * the VM link's monitor sets it; NULL or "" shows "status: offline".
 * Observers see a GL_CHANGE_ATTR for GL_ATTR_AGENT when it changed.
 * 0 or -ENOMEM. */
int gl_instance_set_agent_status(gl_model *m, gl_instance *i, const char *text);
/* The state GET /1.0 reports: "" until the guest set one since start. */
const char *gl_instance_guest_state(const gl_instance *i);

/* The cloud-init meta-data the guest gets (LXD 5.0.2's composition,
 * specs/devlxd-api.md §4.6), appended to out. 0 or -ENOMEM. */
int gl_instance_meta_data(const gl_instance *i, gl_buf *out);

/* ---- changing ---------------------------------------------------------- */

typedef enum gl_op_kind {
	GL_OP_CREATE,       /* instance; value = type ("container" when empty) */
	GL_OP_DELETE,       /* instance */
	GL_OP_CONFIG_SET,   /* instance, key, value */
	GL_OP_CONFIG_UNSET, /* instance, key; -ENOENT if not set */
	GL_OP_DEVICE_SET,   /* instance, key = device name, value = device JSON */
	GL_OP_DEVICE_UNSET, /* instance, key; -ENOENT if absent */
	GL_OP_ATTR_SET,     /* instance, attr, value = attribute text; "" unbinds */
} gl_op_kind;

typedef enum gl_origin {
	GL_ORIGIN_HOST,  /* FUSE tree, control socket */
	GL_ORIGIN_GUEST, /* devlxd PATCH: marks the state as guest-set */
	GL_ORIGIN_DAEMON /* the daemon itself (bound init exited, ...) */
} gl_origin;

typedef struct gl_op {
	gl_op_kind kind;
	gl_origin origin;
	gl_attr attr;
	const char *instance;
	size_t ilen;
	const char *key;
	size_t klen;
	const char *value;
	size_t vlen;
} gl_op;

/* Called exactly once, never from inside gl_model_submit: status 0 once the
 * change is durable and applied (also when it changed nothing), or -errno:
 *   -ENOENT  no such instance / key / device
 *   -EEXIST  instance exists (CREATE)
 *   -EINVAL  bad name, bad value, bad device JSON, read-only attribute
 *   -ENAMETOOLONG  name too long
 *   -EFBIG   value over limits.max_value
 *   -ENOSPC  disk full; -EIO other store failure (nothing changed)
 *   -ECANCELED  model closed before the op ran */
typedef void (*gl_done_cb)(void *arg, int status);

/* Queue op (everything is copied). Returns 0 when queued (cb will run), or
 * -errno when the op is invalid on its face (bad name, too large, bad JSON):
 * then nothing is queued and cb is not called. */
int gl_model_submit(gl_model *m, const gl_op *op, gl_done_cb cb, void *arg);

/* The same validation submit does for a value, for writers that want to
 * fail early (FUSE write()). 0 or -errno as above. `partial` allows a
 * device JSON that is a prefix of a valid one. */
int gl_model_check_value(const gl_model *m, gl_op_kind kind, gl_attr attr, const char *value,
                         size_t vlen, bool partial);
/* Parse the text of a settable attribute. 0 or -EINVAL. */
int gl_attr_check(gl_attr a, const char *value, size_t vlen);
gl_attr gl_attr_from_name(const char *file_name); /* GL_ATTR_COUNT if none */
const char *gl_attr_name(gl_attr a);              /* file name: "type", "init-pid", ... */

/* Observers see every applied change, after the store has it and after
 * events went out. For caches and indexes (FUSE invalidation, pid index). */
typedef enum gl_change_kind {
	GL_CHANGE_INSTANCE_ADDED,
	GL_CHANGE_INSTANCE_REMOVED, /* `inst` is still readable during the call */
	GL_CHANGE_CONFIG,           /* key added, changed or removed */
	GL_CHANGE_DEVICE,
	GL_CHANGE_ATTR,
} gl_change_kind;

typedef struct gl_change {
	gl_change_kind kind;
	gl_instance *inst;
	const char *key; /* CONFIG/DEVICE: the key; else NULL */
	bool existed;    /* CONFIG/DEVICE: key existed before */
	bool exists;     /* CONFIG/DEVICE: key exists after */
	gl_attr attr;    /* ATTR */
} gl_change;

typedef void (*gl_observer_fn)(void *arg, const gl_change *c);
int gl_model_observe(gl_model *m, gl_observer_fn fn, void *arg); /* 0 or -ENOMEM */
void gl_model_unobserve(gl_model *m, gl_observer_fn fn, void *arg);

/* ---- events ------------------------------------------------------------ */

typedef enum gl_event_type {
	GL_EV_CONFIG = 1 << 0,
	GL_EV_DEVICE = 1 << 1,
	GL_EV_LIFECYCLE = 1 << 2,
	GL_EV_ALL = 7,
} gl_event_type;

typedef struct gl_event {
	unsigned refs;
	gl_event_type type;
	uint64_t seq;         /* per instance, 1, 2, ...; survives restarts */
	uint64_t inst_uid;
	const char *instance; /* name */
	/* LXD's shape, one line ending in '\n':
	 * {"type":..,"timestamp":..,"metadata":{..}}\n */
	const char *line;
	size_t line_len;
	/* The same with "instance":"<name>" appended, for the all-instances stream. */
	const char *gline;
	size_t gline_len;
} gl_event;

/* Subscribe to one instance's events (inst != NULL) or to every instance's
 * (inst == NULL), of the types in `mask`. `notify` runs (from the loop,
 * never inside a gl_sub_* call) when the queue goes from empty to non-empty,
 * when the subscriber is dropped for being too slow, and when it ends (its
 * instance was removed, or the model closed). Returns a new subscriber or
 * NULL (-ENOMEM). */
typedef void (*gl_sub_notify)(gl_sub *s, void *arg);
gl_sub *gl_sub_new(gl_model *m, gl_instance *inst, unsigned mask, gl_sub_notify notify,
                   void *arg);
/* Like gl_sub_new, but first queue the instance's events with seq > since
 * from the in-memory history. If history does not reach back that far,
 * *gap is set to true (the caller should tell its client to resync) and
 * the queue starts with the oldest event held. `notify` is not called for
 * the replayed events: the caller peeks right after this returns. */
gl_sub *gl_sub_new_since(gl_model *m, gl_instance *inst, unsigned mask, uint64_t since,
                         bool *gap, gl_sub_notify notify, void *arg);
/* The oldest queued event, or NULL when none is queued. Borrowed. */
const gl_event *gl_sub_peek(gl_sub *s);
void gl_sub_pop(gl_sub *s);
size_t gl_sub_queued_bytes(const gl_sub *s);
typedef enum gl_sub_status { GL_SUB_LIVE, GL_SUB_DROPPED, GL_SUB_ENDED } gl_sub_status;
gl_sub_status gl_sub_status_get(const gl_sub *s);
/* Unsubscribe and free. Safe at any time, including from notify. */
void gl_sub_free(gl_sub *s);

#endif
