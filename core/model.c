/* The live model and its commit pipeline.
 *
 * Ops queue up in submission order. Before the loop sleeps (uv_prepare) the
 * queue is cut into a batch; the batch is staged on the loop thread against
 * the durable state plus the ops of the batches still in flight and the
 * ops before it in the same batch (the "overlay"), which decides each op's
 * outcome, the events it makes and the store writes it needs. A batch goes
 * to the pool for a single store transaction and one fsync (group commit).
 * The stores that split the two (write, then sync) are pipelined: as soon
 * as one batch is written the next one may be staged and written while the
 * first is still syncing, up to MAX_INFLIGHT batches. Batches finish in
 * order: when a batch and every batch before it are durable, it is applied
 * to memory in order, events go out, observers run, and only then are the
 * callers told. Memory never holds what is not durable. A failed
 * transaction fails every op of the batch and changes nothing; a failed
 * sync also fails the batches staged over it. */
#include "core/model.h"

#include <errno.h>
#include <inttypes.h>
#include <jansson.h>
#include <pthread.h>
#include <sodium.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "core/json.h"
#include "core/names.h"

#define MAX_BATCH 512
/* Batches written and not yet reported; also bounds the overlay a staging
 * looks through (MAX_INFLIGHT * MAX_BATCH ops before the new batch). */
#define MAX_INFLIGHT 4
#define INSTANCE_ID_KEY "volatile.cloud-init.instance-id"

enum { ST_STOPPED, ST_STARTED, ST_READY };
static const char *const state_names[] = {"Stopped", "Started", "Ready"};

typedef struct entries {
	gl_entry *v;
	size_t n, cap;
} entries;

struct gl_instance {
	char *name;
	uint64_t uid;
	bool vm;
	int state;
	bool guest_state;
	int64_t init_pid;
	char *cgroup;
	int64_t vsock_cid;
	char *vsock_uds;
	char *agent; /* runtime agent status text, never stored; NULL: offline */
	int64_t ctime, mtime;
	int64_t attr_mtime[GL_ATTR_COUNT];
	uint64_t seq;
	entries config, devices;
	gl_event **hist; /* ring of the newest events */
	size_t hcap, hstart, hcount;
	gl_sub *subs; /* this instance's subscribers */
};

struct gl_sub {
	gl_model *m;
	gl_instance *inst; /* NULL: every instance */
	unsigned mask;
	gl_sub_status status;
	gl_sub_notify notify;
	void *arg;
	const gl_event **q; /* ring */
	size_t qstart, qcount, qcap, qbytes;
	gl_sub *prev, *next;   /* in inst->subs or m->gsubs */
	gl_sub *nnext;         /* in m->notify_list */
	bool notify_pending;
	bool detached; /* the model let go of it: instance removed or model closed */
};

typedef struct observer {
	gl_observer_fn fn;
	void *arg;
} observer;

/* One queued op with everything staging computes for it. */
typedef struct pending {
	struct pending *next;
	gl_op_kind kind;
	gl_origin origin;
	gl_attr attr;
	char *instance, *key, *value;
	size_t vlen;
	gl_done_cb cb;
	void *arg;
	int status;
	/* staging results */
	bool changed;           /* applying it changes memory */
	bool existed;           /* CONFIG/DEVICE: key existed before */
	const char *old;        /* borrowed: previous value (model or earlier op) */
	size_t old_len;
	char *row_strs[4];      /* CREATE/ATTR_SET: owned strings of row */
	gl_irow row;            /* CREATE/ATTR_SET: the new row */
	gl_event *ev[2];
	int nev;
	uint64_t seq_after;     /* instance seq after this op */
	int64_t now;
} pending;

typedef struct batch {
	uv_work_t work;
	struct batch *next; /* the model's in-flight list, oldest first */
	gl_model *m;        /* NULL once the model closed under it */
	pending *ops;
	size_t nops;
	gl_sop *sops;
	size_t nsops;
	/* set by the pool thread under lock */
	int wstatus; /* the write's result, once written */
	int status;  /* the whole result, once done */
	bool written, done;
	char err[256]; /* the store's message, when the write or sync failed */
	pthread_mutex_t lock;
	pthread_cond_t cond;
	/* loop thread only */
	bool finished; /* libuv's completion callback ran */
	int fail;      /* failed because a batch it was staged over failed */
} batch;

struct gl_model {
	uv_loop_t *loop;
	gl_store *store;
	gl_limits lim;
	gl_instance **inst; /* sorted by name */
	size_t ninst, capinst;
	uint64_t next_uid;
	int64_t mtime;
	pending *qhead, **qtail;
	batch *fly, *fly_last; /* in flight, oldest first */
	size_t nfly;
	pending **overlay; /* staging scratch: MAX_INFLIGHT + 1 batches of ops */
	uv_prepare_t prepare;
	uv_async_t written;       /* a pool thread wrote a batch the loop waits on */
	atomic_bool want_written; /* the loop waits on that */
	int open_handles;
	gl_sub *gsubs;
	gl_sub *notify_list;
	observer *obs;
	size_t nobs;
	bool closing;
};

static int64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_REALTIME, &ts);
	return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

void gl_limits_default(gl_limits *l)
{
	l->max_value = 1024 * 1024;
	l->max_sub_bytes = 4 * 1024 * 1024;
	l->history = 256;
	l->max_instances = 1000000;
	l->max_keys = 65536;
}

const gl_limits *gl_model_limits(const gl_model *m)
{
	return &m->lim;
}

/* ---- sorted arrays ------------------------------------------------------ */

static int cmp_n(const char *a, const char *b, size_t bn)
{
	size_t an = strlen(a);
	int r = memcmp(a, b, an < bn ? an : bn);

	if (r)
		return r;
	return an < bn ? -1 : an > bn;
}

/* Index of key in e, or -(insertion point) - 1. */
static ssize_t entries_find(const entries *e, const char *key, size_t klen)
{
	size_t lo = 0, hi = e->n;

	while (lo < hi) {
		size_t mid = (lo + hi) / 2;
		int r = cmp_n(e->v[mid].key, key, klen);

		if (r == 0)
			return (ssize_t)mid;
		if (r < 0)
			lo = mid + 1;
		else
			hi = mid;
	}
	return -(ssize_t)lo - 1;
}

/* key and value live in one allocation owned through entry.key */
static int entry_fill(gl_entry *en, const char *key, size_t klen, const char *val, size_t vlen,
		      int64_t mtime)
{
	char *p = malloc(klen + vlen + 2);

	if (!p)
		return -ENOMEM;
	memcpy(p, key, klen);
	p[klen] = '\0';
	if (vlen)
		memcpy(p + klen + 1, val, vlen);
	p[klen + 1 + vlen] = '\0';
	en->key = p;
	en->value = p + klen + 1;
	en->len = vlen;
	en->mtime_ns = mtime;
	return 0;
}

static int entries_set(entries *e, const char *key, size_t klen, const char *val, size_t vlen,
		       int64_t mtime)
{
	ssize_t at = entries_find(e, key, klen);
	gl_entry en;
	int r = entry_fill(&en, key, klen, val, vlen, mtime);

	if (r)
		return r;
	if (at >= 0) {
		free((char *)e->v[at].key);
		e->v[at] = en;
		return 0;
	}
	at = -at - 1;
	if (e->n == e->cap) {
		size_t ncap = e->cap ? e->cap * 2 : 8;
		gl_entry *nv = realloc(e->v, ncap * sizeof(*nv));

		if (!nv) {
			free((char *)en.key);
			return -ENOMEM;
		}
		e->v = nv;
		e->cap = ncap;
	}
	memmove(&e->v[at + 1], &e->v[at], (e->n - (size_t)at) * sizeof(*e->v));
	e->v[at] = en;
	e->n++;
	return 0;
}

static void entries_del(entries *e, const char *key, size_t klen)
{
	ssize_t at = entries_find(e, key, klen);

	if (at < 0)
		return;
	free((char *)e->v[at].key);
	memmove(&e->v[at], &e->v[at + 1], (e->n - (size_t)at - 1) * sizeof(*e->v));
	e->n--;
}

static void entries_free(entries *e)
{
	for (size_t i = 0; i < e->n; i++)
		free((char *)e->v[i].key);
	free(e->v);
	*e = (entries){0};
}

static int entry_cmp(const void *a, const void *b)
{
	return strcmp(((const gl_entry *)a)->key, ((const gl_entry *)b)->key);
}

static ssize_t inst_find(const gl_model *m, const char *name, size_t n)
{
	size_t lo = 0, hi = m->ninst;

	while (lo < hi) {
		size_t mid = (lo + hi) / 2;
		int r = cmp_n(m->inst[mid]->name, name, n);

		if (r == 0)
			return (ssize_t)mid;
		if (r < 0)
			lo = mid + 1;
		else
			hi = mid;
	}
	return -(ssize_t)lo - 1;
}

/* ---- instances ---------------------------------------------------------- */

static void event_unref(gl_event *ev)
{
	if (ev && --ev->refs == 0)
		free(ev);
}

static gl_event *event_ref(gl_event *ev)
{
	ev->refs++;
	return ev;
}

static void instance_free(gl_instance *i)
{
	if (!i)
		return;
	entries_free(&i->config);
	entries_free(&i->devices);
	for (size_t k = 0; k < i->hcount; k++)
		event_unref(i->hist[(i->hstart + k) % i->hcap]);
	free(i->hist);
	free(i->name);
	free(i->cgroup);
	free(i->vsock_uds);
	free(i->agent);
	free(i);
}

static int state_from(const char *s, size_t n)
{
	for (int k = 0; k < 3; k++)
		if (strlen(state_names[k]) == n && memcmp(state_names[k], s, n) == 0)
			return k;
	return -1;
}

static int instance_set_row(gl_instance *i, const gl_irow *r)
{
	char *cg = strdup(r->cgroup ? r->cgroup : "");
	char *uds = strdup(r->vsock_uds ? r->vsock_uds : "");
	int st = r->state ? state_from(r->state, strlen(r->state)) : ST_STOPPED;

	if (!cg || !uds) {
		free(cg);
		free(uds);
		return -ENOMEM;
	}
	free(i->cgroup);
	free(i->vsock_uds);
	i->cgroup = cg;
	i->vsock_uds = uds;
	i->vm = r->type && strcmp(r->type, "virtual-machine") == 0;
	i->state = st < 0 ? ST_STOPPED : st;
	i->guest_state = r->guest_state != 0;
	i->init_pid = r->init_pid;
	i->vsock_cid = r->vsock_cid;
	i->ctime = r->ctime_ns;
	if (r->mtime_ns > i->mtime)
		i->mtime = r->mtime_ns;
	return 0;
}

static void instance_row(const gl_instance *i, gl_irow *r)
{
	r->name = i->name;
	r->type = i->vm ? "virtual-machine" : "container";
	r->state = state_names[i->state];
	r->guest_state = i->guest_state;
	r->init_pid = i->init_pid;
	r->cgroup = i->cgroup;
	r->vsock_cid = i->vsock_cid;
	r->vsock_uds = i->vsock_uds;
	r->ctime_ns = i->ctime;
	r->mtime_ns = i->mtime;
}

static gl_instance *instance_new(gl_model *m, const gl_irow *r)
{
	gl_instance *i = calloc(1, sizeof(*i));

	if (!i)
		return NULL;
	i->name = strdup(r->name);
	if (!i->name || instance_set_row(i, r)) {
		instance_free(i);
		return NULL;
	}
	i->uid = ++m->next_uid;
	for (int a = 0; a < GL_ATTR_COUNT; a++)
		i->attr_mtime[a] = r->mtime_ns ? r->mtime_ns : r->ctime_ns;
	return i;
}

static int model_insert(gl_model *m, gl_instance *i)
{
	ssize_t at = inst_find(m, i->name, strlen(i->name));

	if (at >= 0)
		return -EEXIST;
	at = -at - 1;
	if (m->ninst == m->capinst) {
		size_t ncap = m->capinst ? m->capinst * 2 : 64;
		gl_instance **nv = realloc(m->inst, ncap * sizeof(*nv));

		if (!nv)
			return -ENOMEM;
		m->inst = nv;
		m->capinst = ncap;
	}
	memmove(&m->inst[at + 1], &m->inst[at], (m->ninst - (size_t)at) * sizeof(*m->inst));
	m->inst[at] = i;
	m->ninst++;
	return 0;
}

/* ---- reading ------------------------------------------------------------ */

gl_instance *gl_model_find_n(gl_model *m, const char *name, size_t n)
{
	ssize_t at = inst_find(m, name, n);

	return at >= 0 ? m->inst[at] : NULL;
}

gl_instance *gl_model_find(gl_model *m, const char *name)
{
	return gl_model_find_n(m, name, strlen(name));
}

gl_instance *const *gl_model_instances(gl_model *m, size_t *n)
{
	*n = m->ninst;
	return m->inst;
}

int64_t gl_model_mtime(const gl_model *m)
{
	return m->mtime;
}

const char *gl_instance_name(const gl_instance *i) { return i->name; }
uint64_t gl_instance_uid(const gl_instance *i) { return i->uid; }
bool gl_instance_is_vm(const gl_instance *i) { return i->vm; }
int64_t gl_instance_ctime(const gl_instance *i) { return i->ctime; }
int64_t gl_instance_mtime(const gl_instance *i) { return i->mtime; }
uint64_t gl_instance_seq(const gl_instance *i) { return i->seq; }
int64_t gl_instance_init_pid(const gl_instance *i) { return i->init_pid; }

const gl_entry *gl_instance_config(const gl_instance *i, size_t *n)
{
	*n = i->config.n;
	return i->config.v;
}

const gl_entry *gl_instance_config_get(const gl_instance *i, const char *key, size_t klen)
{
	ssize_t at = entries_find(&i->config, key, klen);

	return at >= 0 ? &i->config.v[at] : NULL;
}

const gl_entry *gl_instance_devices(const gl_instance *i, size_t *n)
{
	*n = i->devices.n;
	return i->devices.v;
}

const gl_entry *gl_instance_device_get(const gl_instance *i, const char *name, size_t nlen)
{
	ssize_t at = entries_find(&i->devices, name, nlen);

	return at >= 0 ? &i->devices.v[at] : NULL;
}

static const char *const attr_names[GL_ATTR_COUNT] = {
	[GL_ATTR_TYPE] = "type",           [GL_ATTR_STATE] = "state",
	[GL_ATTR_INIT_PID] = "init-pid",   [GL_ATTR_CGROUP] = "cgroup",
	[GL_ATTR_VSOCK_CID] = "vsock-cid", [GL_ATTR_VSOCK_UDS] = "vsock-uds",
	[GL_ATTR_AGENT] = "agent",
};

gl_attr gl_attr_from_name(const char *file_name)
{
	for (int a = 0; a < GL_ATTR_COUNT; a++)
		if (strcmp(attr_names[a], file_name) == 0)
			return (gl_attr)a;
	return GL_ATTR_COUNT;
}

const char *gl_attr_name(gl_attr a)
{
	return a < GL_ATTR_COUNT ? attr_names[a] : NULL;
}

int gl_instance_attr(const gl_instance *i, gl_attr a, gl_buf *out)
{
	switch (a) {
	case GL_ATTR_TYPE:
		return gl_buf_adds(out, i->vm ? "virtual-machine" : "container");
	case GL_ATTR_STATE:
		return gl_buf_adds(out, state_names[i->state]);
	case GL_ATTR_INIT_PID:
		return i->init_pid ? gl_buf_printf(out, "%" PRId64, i->init_pid) : 0;
	case GL_ATTR_CGROUP:
		return gl_buf_adds(out, i->cgroup);
	case GL_ATTR_VSOCK_CID:
		return i->vsock_cid ? gl_buf_printf(out, "%" PRId64, i->vsock_cid) : 0;
	case GL_ATTR_VSOCK_UDS:
		return gl_buf_adds(out, i->vsock_uds);
	case GL_ATTR_AGENT:
		return gl_buf_adds(out, i->agent ? i->agent : "status: offline");
	default:
		return -EINVAL;
	}
}

int64_t gl_instance_attr_mtime(const gl_instance *i, gl_attr a)
{
	return a < GL_ATTR_COUNT ? i->attr_mtime[a] : i->mtime;
}

const char *gl_instance_guest_state(const gl_instance *i)
{
	return i->guest_state ? state_names[i->state] : "";
}

int gl_instance_meta_data(const gl_instance *i, gl_buf *out)
{
	const gl_entry *id = gl_instance_config_get(i, INSTANCE_ID_KEY, strlen(INSTANCE_ID_KEY));
	const gl_entry *md = gl_instance_config_get(i, "user.meta-data", 14);
	int r;

	r = gl_buf_adds(out, "#cloud-config\ninstance-id: ");
	if (!r)
		r = id ? gl_buf_add(out, id->value, id->len) : gl_buf_adds(out, i->name);
	if (!r)
		r = gl_buf_printf(out, "\nlocal-hostname: %s\n", i->name);
	if (!r && md)
		r = gl_buf_add(out, md->value, md->len);
	return r;
}

/* ---- validation --------------------------------------------------------- */

static int parse_u64(const char *s, size_t n, uint64_t max, uint64_t *out)
{
	uint64_t v = 0;

	if (n == 0 || n > 20 || (n > 1 && s[0] == '0'))
		return -EINVAL;
	for (size_t k = 0; k < n; k++) {
		if (s[k] < '0' || s[k] > '9')
			return -EINVAL;
		if (v > (max - (uint64_t)(s[k] - '0')) / 10)
			return -EINVAL;
		v = v * 10 + (uint64_t)(s[k] - '0');
	}
	*out = v;
	return 0;
}

static int check_path(const char *s, size_t n, size_t max)
{
	if (n == 0)
		return 0;
	if (s[0] != '/' || n > max)
		return -EINVAL;
	for (size_t k = 0; k < n; k++) {
		unsigned char c = (unsigned char)s[k];

		if (c < 0x20 || c == 0x7f)
			return -EINVAL;
		/* no "." or ".." components */
		if (c == '/' && k + 1 < n && s[k + 1] == '.') {
			size_t e = k + 2;

			if (e < n && s[e] == '.')
				e++;
			if (e == n || s[e] == '/')
				return -EINVAL;
		}
	}
	return 0;
}

int gl_attr_check(gl_attr a, const char *v, size_t n)
{
	uint64_t u;

	switch (a) {
	case GL_ATTR_TYPE:
		if ((n == 9 && !memcmp(v, "container", 9)) || (n == 15 && !memcmp(v, "virtual-machine", 15)))
			return 0;
		return -EINVAL;
	case GL_ATTR_STATE:
		return state_from(v, n) >= 0 ? 0 : -EINVAL;
	case GL_ATTR_INIT_PID:
		if (n == 0)
			return 0;
		return parse_u64(v, n, 4194304, &u) || u < 1 ? -EINVAL : 0;
	case GL_ATTR_VSOCK_CID:
		if (n == 0)
			return 0;
		/* 0, 1 and 2 are the hypervisor, local and host; -1 is "any" */
		return parse_u64(v, n, 0xfffffffeu, &u) || u < 3 ? -EINVAL : 0;
	case GL_ATTR_CGROUP:
		return check_path(v, n, 4095);
	case GL_ATTR_VSOCK_UDS:
		/* sun_path is 108 bytes and the host also listens on <uds>_<port> */
		return check_path(v, n, 96);
	default:
		return -EINVAL;
	}
}

int gl_model_check_value(const gl_model *m, gl_op_kind kind, gl_attr attr, const char *value,
			 size_t vlen, bool partial)
{
	switch (kind) {
	case GL_OP_CONFIG_SET:
		return vlen > m->lim.max_value ? -EFBIG : 0;
	case GL_OP_DEVICE_SET:
		if (vlen > m->lim.max_value)
			return -EFBIG;
		if (partial) {
			size_t k = 0;

			while (k < vlen && (value[k] == ' ' || value[k] == '\t' || value[k] == '\n' ||
					    value[k] == '\r'))
				k++;
			return k < vlen && value[k] != '{' ? -EINVAL : 0;
		}
	{
		gl_buf tmp = GL_BUF_INIT;
		int r = gl_device_parse(value, vlen, &tmp, NULL) ? -EINVAL : 0;

		gl_buf_free(&tmp);
		return r;
	}
	case GL_OP_ATTR_SET:
		if (partial)
			return vlen > 4096 ? -EFBIG : 0;
		return gl_attr_check(attr, value, vlen);
	default:
		return 0;
	}
}

/* ---- events ------------------------------------------------------------- */

/* Build an event from the JSON of its metadata object. */
static gl_event *event_new(gl_event_type type, const char *instance, uint64_t uid, uint64_t seq,
			   int64_t ts, const gl_buf *meta)
{
	static const char *const tnames[] = {[GL_EV_CONFIG] = "config", [GL_EV_DEVICE] = "device",
					     [GL_EV_LIFECYCLE] = "lifecycle"};
	gl_buf line = GL_BUF_INIT, g = GL_BUF_INIT;
	gl_event *ev = NULL;
	size_t nlen = strlen(instance);
	int r;

	r = gl_buf_printf(&line, "{\"type\":\"%s\",\"timestamp\":\"", tnames[type]);
	if (!r)
		r = gl_json_timestamp(&line, ts);
	if (!r)
		r = gl_buf_adds(&line, "\",\"metadata\":");
	if (!r)
		r = gl_buf_add(&line, meta->data, meta->len);
	if (!r)
		r = gl_buf_add(&g, line.data, line.len);
	if (!r)
		r = gl_buf_adds(&g, ",\"instance\":");
	if (!r)
		r = gl_json_quote(&g, instance, nlen, true);
	if (!r)
		r = gl_buf_adds(&line, "}\n");
	if (!r)
		r = gl_buf_adds(&g, "}\n");
	if (r)
		goto out;
	ev = malloc(sizeof(*ev) + line.len + 1 + g.len + 1 + nlen + 1);
	if (!ev)
		goto out;
	char *p = (char *)(ev + 1);
	ev->refs = 1;
	ev->type = type;
	ev->seq = seq;
	ev->inst_uid = uid;
	memcpy(p, line.data, line.len + 1);
	ev->line = p;
	ev->line_len = line.len;
	p += line.len + 1;
	memcpy(p, g.data, g.len + 1);
	ev->gline = p;
	ev->gline_len = g.len;
	p += g.len + 1;
	memcpy(p, instance, nlen + 1);
	ev->instance = p;
out:
	gl_buf_free(&line);
	gl_buf_free(&g);
	return ev;
}

static int meta_config(gl_buf *b, const char *key, const char *old, size_t olen, const char *val,
		       size_t vlen)
{
	int r = gl_buf_adds(b, "{\"key\":");

	if (!r)
		r = gl_json_quote(b, key, strlen(key), true);
	if (!r)
		r = gl_buf_adds(b, ",\"old_value\":");
	if (!r)
		r = gl_json_quote(b, old, olen, true);
	if (!r)
		r = gl_buf_adds(b, ",\"value\":");
	if (!r)
		r = gl_json_quote(b, val, vlen, true);
	if (!r)
		r = gl_buf_addc(b, '}');
	return r;
}

/* Re-encode a stored (canonical, sorted) device object with event escaping. */
static int device_obj(gl_buf *b, const char *json, size_t len)
{
	json_t *o = json_loadb(json, len, 0, NULL);
	const char *k;
	json_t *v;
	bool first = true;
	int r;

	if (!o)
		return -EINVAL;
	/* jansson iterates in insertion order, which is the stored sorted order */
	r = gl_buf_addc(b, '{');
	json_object_foreach(o, k, v) {
		if (!r && !first)
			r = gl_buf_addc(b, ',');
		first = false;
		if (!r)
			r = gl_json_quote(b, k, strlen(k), true);
		if (!r)
			r = gl_buf_addc(b, ':');
		if (!r)
			r = gl_json_quote(b, json_string_value(v), json_string_length(v), true);
	}
	if (!r)
		r = gl_buf_addc(b, '}');
	json_decref(o);
	return r;
}

static int meta_device(gl_buf *b, const char *action, const char *name, const char *json,
		       size_t len)
{
	int r = gl_buf_printf(b, "{\"action\":\"%s\",\"config\":", action);

	if (!r)
		r = device_obj(b, json, len);
	if (!r)
		r = gl_buf_adds(b, ",\"name\":");
	if (!r)
		r = gl_json_quote(b, name, strlen(name), true);
	if (!r)
		r = gl_buf_addc(b, '}');
	return r;
}

static int meta_lifecycle(gl_buf *b, const char *action, const char *instance, const char *ckey,
			  const char *cval)
{
	int r = gl_buf_printf(b, "{\"action\":\"%s\",\"source\":\"/1.0/instances/", action);

	/* instance names are [A-Za-z0-9-]: no escaping needed */
	if (!r)
		r = gl_buf_adds(b, instance);
	if (!r && ckey) {
		r = gl_buf_printf(b, "\",\"context\":{\"%s\":", ckey);
		if (!r)
			r = gl_json_quote(b, cval, strlen(cval), true);
		if (!r)
			r = gl_buf_adds(b, "}}");
	} else if (!r) {
		r = gl_buf_adds(b, "\"}");
	}
	return r;
}

/* ---- subscribers -------------------------------------------------------- */

static void sub_link(gl_sub **head, gl_sub *s)
{
	s->prev = NULL;
	s->next = *head;
	if (*head)
		(*head)->prev = s;
	*head = s;
}

static void sub_unlink(gl_sub **head, gl_sub *s)
{
	if (s->prev)
		s->prev->next = s->next;
	else if (*head == s)
		*head = s->next;
	if (s->next)
		s->next->prev = s->prev;
	s->prev = s->next = NULL;
}

static void sub_want_notify(gl_sub *s)
{
	if (s->notify_pending || !s->notify)
		return;
	s->notify_pending = true;
	s->nnext = s->m->notify_list;
	s->m->notify_list = s;
}

static void sub_clear(gl_sub *s)
{
	for (size_t k = 0; k < s->qcount; k++)
		event_unref((gl_event *)s->q[(s->qstart + k) % s->qcap]);
	free(s->q);
	s->q = NULL;
	s->qstart = s->qcount = s->qcap = s->qbytes = 0;
}

static size_t ev_len(const gl_sub *s, const gl_event *ev)
{
	return s->inst ? ev->line_len : ev->gline_len;
}

static void sub_push(gl_sub *s, gl_event *ev)
{
	if (s->status != GL_SUB_LIVE || !(s->mask & ev->type))
		return;
	if (s->qbytes + ev_len(s, ev) > s->m->lim.max_sub_bytes) {
		/* too slow: drop it rather than let it grow or stall anyone */
		sub_clear(s);
		s->status = GL_SUB_DROPPED;
		sub_want_notify(s);
		return;
	}
	if (s->qcount == s->qcap) {
		size_t ncap = s->qcap ? s->qcap * 2 : 16;
		const gl_event **nq = malloc(ncap * sizeof(*nq));

		if (!nq) {
			sub_clear(s);
			s->status = GL_SUB_DROPPED;
			sub_want_notify(s);
			return;
		}
		for (size_t k = 0; k < s->qcount; k++)
			nq[k] = s->q[(s->qstart + k) % s->qcap];
		free(s->q);
		s->q = nq;
		s->qcap = ncap;
		s->qstart = 0;
	}
	s->q[(s->qstart + s->qcount) % s->qcap] = event_ref(ev);
	s->qcount++;
	s->qbytes += ev_len(s, ev);
	if (s->qcount == 1)
		sub_want_notify(s);
}

static void run_notifications(gl_model *m)
{
	while (m->notify_list) {
		gl_sub *s = m->notify_list;

		m->notify_list = s->nnext;
		s->nnext = NULL;
		s->notify_pending = false;
		s->notify(s, s->arg);
	}
}

static gl_sub *sub_alloc(gl_model *m, gl_instance *inst, unsigned mask, gl_sub_notify notify,
			 void *arg)
{
	gl_sub *s = calloc(1, sizeof(*s));

	if (!s)
		return NULL;
	s->m = m;
	s->inst = inst;
	s->mask = mask;
	s->notify = notify;
	s->arg = arg;
	s->status = GL_SUB_LIVE;
	sub_link(inst ? &inst->subs : &m->gsubs, s);
	return s;
}

gl_sub *gl_sub_new(gl_model *m, gl_instance *inst, unsigned mask, gl_sub_notify notify, void *arg)
{
	return sub_alloc(m, inst, mask, notify, arg);
}

gl_sub *gl_sub_new_since(gl_model *m, gl_instance *inst, unsigned mask, uint64_t since, bool *gap,
			 gl_sub_notify notify, void *arg)
{
	gl_sub *s = sub_alloc(m, inst, mask, notify, arg);

	*gap = false;
	if (!s || !inst || since >= inst->seq)
		return s;
	if (inst->hcount == 0 || inst->hist[inst->hstart]->seq > since + 1)
		*gap = true;
	for (size_t k = 0; k < inst->hcount; k++) {
		gl_event *ev = inst->hist[(inst->hstart + k) % inst->hcap];

		if (ev->seq > since)
			sub_push(s, ev);
	}
	/* the caller peeks right after; no notification for what it asked for */
	if (s->notify_pending) {
		gl_sub **pp = &m->notify_list;

		while (*pp && *pp != s)
			pp = &(*pp)->nnext;
		if (*pp)
			*pp = s->nnext;
		s->notify_pending = false;
	}
	return s;
}

const gl_event *gl_sub_peek(gl_sub *s)
{
	return s->qcount ? s->q[s->qstart] : NULL;
}

void gl_sub_pop(gl_sub *s)
{
	if (!s->qcount)
		return;
	gl_event *ev = (gl_event *)s->q[s->qstart];

	s->qbytes -= ev_len(s, ev);
	s->qstart = (s->qstart + 1) % s->qcap;
	s->qcount--;
	event_unref(ev);
}

size_t gl_sub_queued_bytes(const gl_sub *s)
{
	return s->qbytes;
}

gl_sub_status gl_sub_status_get(const gl_sub *s)
{
	return s->status;
}

void gl_sub_free(gl_sub *s)
{
	if (!s)
		return;
	if (s->notify_pending) {
		gl_sub **pp = &s->m->notify_list;

		while (*pp && *pp != s)
			pp = &(*pp)->nnext;
		if (*pp)
			*pp = s->nnext;
	}
	if (!s->detached)
		sub_unlink(s->inst ? &s->inst->subs : &s->m->gsubs, s);
	sub_clear(s);
	free(s);
}

/* The model lets go of s: it ends (a dropped sub stays dropped) and its
 * owner is told; gl_sub_free then only frees it. */
static void sub_detach(gl_sub **head, gl_sub *s)
{
	sub_unlink(head, s);
	s->inst = NULL;
	s->detached = true;
	if (s->status == GL_SUB_LIVE)
		s->status = GL_SUB_ENDED;
	sub_want_notify(s);
}

static void history_push(gl_model *m, gl_instance *i, gl_event *ev)
{
	size_t cap = m->lim.history;

	if (!cap)
		return;
	if (!i->hist) {
		i->hist = calloc(cap, sizeof(*i->hist));
		if (!i->hist)
			return;
		i->hcap = cap;
	}
	if (i->hcount == cap) {
		event_unref(i->hist[i->hstart]);
		i->hist[i->hstart] = event_ref(ev);
		i->hstart = (i->hstart + 1) % cap;
	} else {
		i->hist[(i->hstart + i->hcount) % cap] = event_ref(ev);
		i->hcount++;
	}
}

static void publish(gl_model *m, gl_instance *i, gl_event *ev)
{
	history_push(m, i, ev);
	for (gl_sub *s = i->subs; s; s = s->next)
		sub_push(s, ev);
	for (gl_sub *s = m->gsubs; s; s = s->next)
		sub_push(s, ev);
}

/* ---- observers ---------------------------------------------------------- */

int gl_model_observe(gl_model *m, gl_observer_fn fn, void *arg)
{
	observer *n = realloc(m->obs, (m->nobs + 1) * sizeof(*n));

	if (!n)
		return -ENOMEM;
	m->obs = n;
	m->obs[m->nobs++] = (observer){fn, arg};
	return 0;
}

void gl_model_unobserve(gl_model *m, gl_observer_fn fn, void *arg)
{
	for (size_t k = 0; k < m->nobs; k++) {
		if (m->obs[k].fn == fn && m->obs[k].arg == arg) {
			memmove(&m->obs[k], &m->obs[k + 1], (m->nobs - k - 1) * sizeof(*m->obs));
			m->nobs--;
			return;
		}
	}
}

static void observe(gl_model *m, const gl_change *c)
{
	for (size_t k = 0; k < m->nobs; k++)
		m->obs[k].fn(m->obs[k].arg, c);
}

int gl_instance_set_agent_status(gl_model *m, gl_instance *i, const char *text)
{
	char *t = NULL;

	if (text && *text && !(t = strdup(text)))
		return -ENOMEM;
	if ((!t && !i->agent) || (t && i->agent && !strcmp(t, i->agent))) {
		free(t);
		return 0;
	}
	free(i->agent);
	i->agent = t;
	i->attr_mtime[GL_ATTR_AGENT] = now_ns();
	observe(m, &(gl_change){.kind = GL_CHANGE_ATTR, .inst = i, .attr = GL_ATTR_AGENT});
	return 0;
}

/* ---- submit ------------------------------------------------------------- */

static void pending_free(pending *p)
{
	free(p->instance);
	free(p->key);
	free(p->value);
	for (int k = 0; k < 4; k++)
		free(p->row_strs[k]);
	for (int k = 0; k < p->nev; k++)
		event_unref(p->ev[k]);
	free(p);
}

static char *dupn(const char *s, size_t n)
{
	char *d = malloc(n + 1);

	if (d) {
		if (n)
			memcpy(d, s, n);
		d[n] = '\0';
	}
	return d;
}

static void prepare_cb(uv_prepare_t *h);

int gl_model_submit(gl_model *m, const gl_op *op, gl_done_cb cb, void *arg)
{
	gl_buf canon = GL_BUF_INIT;
	pending *p;
	int r;

	if (m->closing)
		return -ECANCELED;
	r = gl_name_instance_check(op->instance, op->ilen);
	if (r)
		return r;
	switch (op->kind) {
	case GL_OP_CREATE:
		if (op->vlen && gl_attr_check(GL_ATTR_TYPE, op->value, op->vlen))
			return -EINVAL;
		break;
	case GL_OP_DELETE:
		break;
	case GL_OP_CONFIG_SET:
	case GL_OP_CONFIG_UNSET:
		r = gl_name_key_check(op->key, op->klen);
		if (!r && op->kind == GL_OP_CONFIG_SET)
			r = gl_model_check_value(m, op->kind, op->attr, op->value, op->vlen, false);
		break;
	case GL_OP_DEVICE_SET:
	case GL_OP_DEVICE_UNSET:
		r = gl_name_device_check(op->key, op->klen);
		if (!r && op->kind == GL_OP_DEVICE_SET) {
			if (op->vlen > m->lim.max_value)
				r = -EFBIG;
			else if (gl_device_parse(op->value, op->vlen, &canon, NULL))
				r = -EINVAL;
		}
		break;
	case GL_OP_ATTR_SET:
		r = gl_attr_check(op->attr, op->value, op->vlen);
		break;
	default:
		r = -EINVAL;
	}
	if (r)
		goto out;

	p = calloc(1, sizeof(*p));
	if (!p) {
		r = -ENOMEM;
		goto out;
	}
	p->kind = op->kind;
	p->origin = op->origin;
	p->attr = op->attr;
	p->cb = cb;
	p->arg = arg;
	p->instance = dupn(op->instance, op->ilen);
	p->key = op->key ? dupn(op->key, op->klen) : NULL;
	if (op->kind == GL_OP_DEVICE_SET) {
		p->value = gl_buf_steal(&canon, &p->vlen);
	} else {
		p->value = dupn(op->value ? op->value : "", op->vlen);
		p->vlen = op->vlen;
	}
	if (!p->instance || (op->key && !p->key) || !p->value) {
		pending_free(p);
		r = -ENOMEM;
		goto out;
	}
	*m->qtail = p;
	m->qtail = &p->next;
	uv_prepare_start(&m->prepare, prepare_cb);
out:
	gl_buf_free(&canon);
	return r;
}

/* ---- staging: the overlay ---------------------------------------------- */

typedef struct stage {
	gl_model *m;
	pending **ops; /* the batch so far, in order */
	size_t n;
} stage;

/* Does the instance exist just before ops[at]? Sets *fresh when an earlier
 * op of the batch created it (then the model's copy, if any, is stale). */
static bool st_exists(const stage *st, size_t at, const char *name)
{
	for (size_t k = at; k-- > 0;) {
		pending *p = st->ops[k];

		/* any op that succeeded on it, but a delete, means it exists */
		if (!p->status && strcmp(p->instance, name) == 0)
			return p->kind != GL_OP_DELETE;
	}
	return gl_model_find(st->m, name) != NULL;
}

/* The newest op of the batch before ops[at] that wrote the instance's row. */
static pending *st_row(const stage *st, size_t at, const char *name)
{
	for (size_t k = at; k-- > 0;) {
		pending *p = st->ops[k];

		if (!p->status && p->changed && strcmp(p->instance, name) == 0 &&
		    (p->kind == GL_OP_CREATE || p->kind == GL_OP_ATTR_SET))
			return p;
	}
	return NULL;
}

/* The value of a config key or device just before ops[at]. */
static bool st_value(const stage *st, size_t at, const char *name, bool device, const char *key,
		     const char **val, size_t *len)
{
	for (size_t k = at; k-- > 0;) {
		pending *p = st->ops[k];

		if (p->status || strcmp(p->instance, name))
			continue;
		if (p->kind == GL_OP_DELETE)
			return false;
		if (p->kind == GL_OP_CREATE) {
			if (!device && strcmp(key, INSTANCE_ID_KEY) == 0) {
				*val = p->row_strs[3];
				*len = strlen(p->row_strs[3]);
				return true;
			}
			return false;
		}
		bool dev_op = p->kind == GL_OP_DEVICE_SET || p->kind == GL_OP_DEVICE_UNSET;
		bool cfg_op = p->kind == GL_OP_CONFIG_SET || p->kind == GL_OP_CONFIG_UNSET;

		if ((device ? dev_op : cfg_op) && strcmp(p->key, key) == 0) {
			if (p->kind == GL_OP_CONFIG_UNSET || p->kind == GL_OP_DEVICE_UNSET)
				return false;
			*val = p->value;
			*len = p->vlen;
			return true;
		}
	}
	gl_instance *i = gl_model_find(st->m, name);
	const gl_entry *e;

	if (!i)
		return false;
	e = device ? gl_instance_device_get(i, key, strlen(key))
		   : gl_instance_config_get(i, key, strlen(key));
	if (!e)
		return false;
	*val = e->value;
	*len = e->len;
	return true;
}

static uint64_t st_seq(const stage *st, size_t at, const char *name)
{
	for (size_t k = at; k-- > 0;) {
		pending *p = st->ops[k];

		if (p->status || strcmp(p->instance, name))
			continue;
		if (p->kind == GL_OP_CREATE || p->nev)
			return p->seq_after;
	}
	gl_instance *i = gl_model_find(st->m, name);

	return i ? i->seq : 0;
}

/* Number of keys+devices (approximate: model count plus this batch's adds). */
static size_t st_nkeys(const stage *st, size_t at, const char *name)
{
	gl_instance *i = gl_model_find(st->m, name);
	size_t n = i ? i->config.n + i->devices.n : 0;

	for (size_t k = 0; k < at; k++) {
		pending *p = st->ops[k];

		if (!p->status && !p->existed && strcmp(p->instance, name) == 0 &&
		    (p->kind == GL_OP_CONFIG_SET || p->kind == GL_OP_DEVICE_SET))
			n++;
	}
	return n;
}

static size_t st_ninst(const stage *st, size_t at)
{
	size_t n = st->m->ninst;

	for (size_t k = 0; k < at; k++)
		if (!st->ops[k]->status && st->ops[k]->kind == GL_OP_CREATE)
			n++;
	return n;
}

static int add_event(pending *p, gl_event_type type, const char *inst, uint64_t *seq,
		     const gl_buf *meta)
{
	gl_event *ev = event_new(type, inst, 0, *seq + 1, p->now, meta);

	if (!ev)
		return -ENOMEM;
	p->ev[p->nev++] = ev;
	(*seq)++;
	return 0;
}

static void uuid4(char out[37])
{
	unsigned char b[16];

	randombytes_buf(b, sizeof(b));
	b[6] = (unsigned char)((b[6] & 0x0f) | 0x40);
	b[8] = (unsigned char)((b[8] & 0x3f) | 0x80);
	snprintf(out, 37,
		 "%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x", b[0],
		 b[1], b[2], b[3], b[4], b[5], b[6], b[7], b[8], b[9], b[10], b[11], b[12], b[13],
		 b[14], b[15]);
}

/* Fill p->row from a base row and owned copies of its strings. */
static int row_own(pending *p, const gl_irow *base)
{
	p->row = *base;
	p->row_strs[0] = strdup(base->name);
	p->row_strs[1] = strdup(base->cgroup ? base->cgroup : "");
	p->row_strs[2] = strdup(base->vsock_uds ? base->vsock_uds : "");
	if (!p->row_strs[0] || !p->row_strs[1] || !p->row_strs[2])
		return -ENOMEM;
	p->row.name = p->row_strs[0];
	p->row.cgroup = p->row_strs[1];
	p->row.vsock_uds = p->row_strs[2];
	return 0;
}

static int stage_attr(stage *st, size_t at, pending *p, uint64_t *seq)
{
	pending *last = st_row(st, at, p->instance);
	gl_irow base;
	gl_buf meta = GL_BUF_INIT;
	const char *action = NULL;
	int r;

	if (last)
		base = last->row;
	else
		instance_row(gl_model_find(st->m, p->instance), &base);
	r = row_own(p, &base);
	if (r)
		return r;
	p->row.mtime_ns = p->now;

	switch (p->attr) {
	case GL_ATTR_TYPE:
		p->row.type = p->vlen == 9 ? "container" : "virtual-machine";
		p->changed = strcmp(p->row.type, base.type) != 0;
		break;
	case GL_ATTR_STATE: {
		int ns = state_from(p->value, p->vlen);
		int gs = p->origin == GL_ORIGIN_GUEST;

		p->row.state = state_names[ns];
		p->row.guest_state = gs;
		p->changed = strcmp(p->row.state, base.state) != 0 || gs != base.guest_state;
		if (strcmp(p->row.state, base.state) != 0)
			action = ns == ST_READY	    ? "instance-ready"
				 : ns == ST_STARTED ? "instance-started"
						    : "instance-stopped";
		break;
	}
	case GL_ATTR_INIT_PID:
	case GL_ATTR_VSOCK_CID: {
		uint64_t v = 0;

		if (p->vlen)
			parse_u64(p->value, p->vlen, UINT64_MAX, &v);
		if (p->attr == GL_ATTR_INIT_PID)
			p->row.init_pid = (int64_t)v;
		else
			p->row.vsock_cid = (int64_t)v;
		p->changed = p->row.init_pid != base.init_pid || p->row.vsock_cid != base.vsock_cid;
		/* a container runs while its init is bound: binding starts it,
		 * release (the init exited, or the host unbound it) stops it; the
		 * guest's readiness is forgotten either way, as LXD does on stop */
		if (p->changed && p->attr == GL_ATTR_INIT_PID) {
			bool was = base.init_pid != 0, is = p->row.init_pid != 0;

			if (is && strcmp(base.state, "Stopped") == 0) {
				p->row.state = state_names[ST_STARTED];
				p->row.guest_state = 0;
				action = "instance-started";
			} else if (was && !is && strcmp(base.state, "Stopped") != 0) {
				p->row.state = state_names[ST_STOPPED];
				p->row.guest_state = 0;
				action = "instance-stopped";
			}
		}
		break;
	}
	case GL_ATTR_CGROUP:
	case GL_ATTR_VSOCK_UDS: {
		char **slot = &p->row_strs[p->attr == GL_ATTR_CGROUP ? 1 : 2];
		const char *prev = *slot;

		p->changed = strcmp(prev, p->value) != 0;
		free(*slot);
		*slot = strdup(p->value);
		if (!*slot)
			return -ENOMEM;
		p->row.cgroup = p->row_strs[1];
		p->row.vsock_uds = p->row_strs[2];
		break;
	}
	default:
		return -EINVAL;
	}
	if (!p->changed)
		return 0;
	if (action)
		r = meta_lifecycle(&meta, action, p->instance, NULL, NULL);
	else
		r = meta_lifecycle(&meta, "instance-updated", p->instance, "attribute",
				   gl_attr_name(p->attr));
	if (!r)
		r = add_event(p, GL_EV_LIFECYCLE, p->instance, seq, &meta);
	gl_buf_free(&meta);
	return r;
}

/* The common part of staging a config key or device set/unset: what it
 * was before, whether the op may go ahead, whether it changes anything. */
static int stage_value(stage *st, size_t at, pending *p, bool device, bool set)
{
	const char *old = "";
	size_t olen = 0;

	p->existed = st_value(st, at, p->instance, device, p->key, &old, &olen);
	if (!set && !p->existed)
		return -ENOENT;
	if (set && !p->existed && st_nkeys(st, at, p->instance) >= st->m->lim.max_keys)
		return -ENOSPC;
	p->old = old;
	p->old_len = olen;
	p->changed = !set || !p->existed || olen != p->vlen || memcmp(old, p->value, olen);
	return 0;
}

static int stage_one(stage *st, size_t at, pending *p)
{
	gl_model *m = st->m;
	bool exists;
	uint64_t seq;
	gl_buf meta = GL_BUF_INIT;
	int r = 0;

	p->now = now_ns();
	exists = st_exists(st, at, p->instance);
	if (p->kind == GL_OP_CREATE) {
		char id[37];
		gl_irow row = {.name = p->instance,
			       .type = p->vlen == 15 ? "virtual-machine" : "container",
			       .state = "Stopped",
			       .ctime_ns = p->now,
			       .mtime_ns = p->now};

		if (exists)
			return -EEXIST;
		if (st_ninst(st, at) >= m->lim.max_instances)
			return -ENOSPC;
		r = row_own(p, &row);
		if (r)
			return r;
		uuid4(id);
		p->row_strs[3] = strdup(id);
		if (!p->row_strs[3])
			return -ENOMEM;
		p->changed = true;
		seq = 0;
		r = meta_lifecycle(&meta, "instance-created", p->instance, "type", p->row.type);
		if (!r)
			r = add_event(p, GL_EV_LIFECYCLE, p->instance, &seq, &meta);
		p->seq_after = seq;
		gl_buf_free(&meta);
		return r;
	}
	if (!exists)
		return -ENOENT;
	seq = st_seq(st, at, p->instance);

	switch (p->kind) {
	case GL_OP_DELETE:
		p->changed = true;
		r = meta_lifecycle(&meta, "instance-deleted", p->instance, NULL, NULL);
		if (!r)
			r = add_event(p, GL_EV_LIFECYCLE, p->instance, &seq, &meta);
		break;
	case GL_OP_CONFIG_SET:
	case GL_OP_CONFIG_UNSET: {
		bool set = p->kind == GL_OP_CONFIG_SET;
		const char *old;
		size_t olen;

		r = stage_value(st, at, p, false, set);
		if (r || !p->changed)
			break;
		old = p->old;
		olen = p->old_len;
		/* LXD compares old and new as strings: unset and "" are the same */
		if (gl_key_evented(p->key)) {
			if (olen == (set ? p->vlen : 0) && (!olen || !memcmp(old, p->value, olen)))
				break;
			r = meta_config(&meta, p->key, old, olen, set ? p->value : "",
					set ? p->vlen : 0);
			if (!r)
				r = add_event(p, GL_EV_CONFIG, p->instance, &seq, &meta);
		} else {
			r = meta_lifecycle(&meta, "instance-updated", p->instance, "key", p->key);
			if (!r)
				r = add_event(p, GL_EV_LIFECYCLE, p->instance, &seq, &meta);
		}
		break;
	}
	case GL_OP_DEVICE_SET:
	case GL_OP_DEVICE_UNSET: {
		bool set = p->kind == GL_OP_DEVICE_SET;
		const char *old;
		size_t olen;

		r = stage_value(st, at, p, true, set);
		if (r || !p->changed)
			break;
		old = p->old;
		olen = p->old_len;
		if (p->existed) {
			r = meta_device(&meta, "removed", p->key, old, olen);
			if (!r)
				r = add_event(p, GL_EV_DEVICE, p->instance, &seq, &meta);
			gl_buf_reset(&meta);
		}
		if (!r && set) {
			r = meta_device(&meta, "added", p->key, p->value, p->vlen);
			if (!r)
				r = add_event(p, GL_EV_DEVICE, p->instance, &seq, &meta);
		}
		break;
	}
	case GL_OP_ATTR_SET:
		r = stage_attr(st, at, p, &seq);
		break;
	default:
		r = -EINVAL;
	}
	p->seq_after = seq;
	gl_buf_free(&meta);
	return r;
}

static int sops_add(batch *b, size_t *cap, gl_sop op)
{
	if (b->nsops == *cap) {
		size_t ncap = *cap ? *cap * 2 : 16;
		gl_sop *n = realloc(b->sops, ncap * sizeof(*n));

		if (!n)
			return -ENOMEM;
		b->sops = n;
		*cap = ncap;
	}
	b->sops[b->nsops++] = op;
	return 0;
}

static int sops_for(batch *b, size_t *cap, pending *p)
{
	int r = 0;

	if (!p->changed)
		return 0;
	switch (p->kind) {
	case GL_OP_CREATE:
		r = sops_add(b, cap, (gl_sop){.kind = GL_SOP_INSTANCE_PUT, .instance = p->instance,
					      .irow = &p->row});
		if (!r)
			r = sops_add(b, cap,
				     (gl_sop){.kind = GL_SOP_CONFIG_PUT, .instance = p->instance,
					      .key = INSTANCE_ID_KEY, .value = p->row_strs[3],
					      .vlen = strlen(p->row_strs[3]), .mtime_ns = p->now});
		break;
	case GL_OP_DELETE:
		return sops_add(b, cap, (gl_sop){.kind = GL_SOP_INSTANCE_DEL, .instance = p->instance});
	case GL_OP_ATTR_SET:
		r = sops_add(b, cap, (gl_sop){.kind = GL_SOP_INSTANCE_PUT, .instance = p->instance,
					      .irow = &p->row});
		break;
	case GL_OP_CONFIG_SET:
	case GL_OP_DEVICE_SET:
		r = sops_add(b, cap,
			     (gl_sop){.kind = p->kind == GL_OP_CONFIG_SET ? GL_SOP_CONFIG_PUT
									  : GL_SOP_DEVICE_PUT,
				      .instance = p->instance, .key = p->key, .value = p->value,
				      .vlen = p->vlen, .mtime_ns = p->now});
		break;
	case GL_OP_CONFIG_UNSET:
	case GL_OP_DEVICE_UNSET:
		r = sops_add(b, cap,
			     (gl_sop){.kind = p->kind == GL_OP_CONFIG_UNSET ? GL_SOP_CONFIG_DEL
									    : GL_SOP_DEVICE_DEL,
				      .instance = p->instance, .key = p->key});
		break;
	}
	for (int k = 0; !r && k < p->nev; k++)
		r = sops_add(b, cap, (gl_sop){.kind = GL_SOP_EVENT_PUT, .instance = p->instance,
					      .seq = p->ev[k]->seq, .value = p->ev[k]->line,
					      .vlen = p->ev[k]->line_len});
	return r;
}

/* ---- the pool side ------------------------------------------------------ */

static void batch_work(uv_work_t *w)
{
	batch *b = w->data;
	gl_model *m = b->m; /* the model waits for `done` before it goes */
	gl_store *s = m->store;
	bool split = s->ops->write && s->ops->sync;
	int r = 0;

	if (b->nsops)
		r = split ? s->ops->write(s, b->sops, b->nsops) : gl_store_commit(s, b->sops, b->nsops);
	pthread_mutex_lock(&b->lock);
	b->wstatus = r;
	b->written = true;
	pthread_mutex_unlock(&b->lock);
	/* the next batch may go to the store now, while this one syncs */
	if (atomic_load(&m->want_written))
		uv_async_send(&m->written);
	if (!r && b->nsops && split)
		r = s->ops->sync(s);
	/* now, before another batch's write or sync may overwrite it */
	if (r)
		gl_store_err(s, b->err, sizeof(b->err));
	pthread_mutex_lock(&b->lock);
	b->status = r;
	b->done = true;
	pthread_cond_signal(&b->cond);
	pthread_mutex_unlock(&b->lock);
}

/* Has the pool thread written b? Its write's result in *wstatus. */
static bool batch_written(batch *b, int *wstatus)
{
	bool w;

	pthread_mutex_lock(&b->lock);
	w = b->written;
	if (wstatus)
		*wstatus = b->wstatus;
	pthread_mutex_unlock(&b->lock);
	return w;
}

static void batch_free(batch *b)
{
	pending *p = b->ops;

	while (p) {
		pending *n = p->next;

		pending_free(p);
		p = n;
	}
	free(b->sops);
	pthread_mutex_destroy(&b->lock);
	pthread_cond_destroy(&b->cond);
	free(b);
}

/* ---- applying ----------------------------------------------------------- */

static void bump(gl_instance *i, pending *p)
{
	for (int k = 0; k < p->nev; k++) {
		p->ev[k]->inst_uid = i->uid;
		/* the event's instance name points into the event itself */
	}
	if (p->seq_after > i->seq)
		i->seq = p->seq_after;
	if (p->now > i->mtime)
		i->mtime = p->now;
}

static void remove_instance(gl_model *m, gl_instance *i)
{
	ssize_t at = inst_find(m, i->name, strlen(i->name));

	/* an ended sub keeps its queue: readers drain it, then see EOF */
	while (i->subs)
		sub_detach(&i->subs, i->subs);
	if (at >= 0) {
		memmove(&m->inst[at], &m->inst[at + 1], (m->ninst - (size_t)at - 1) * sizeof(*m->inst));
		m->ninst--;
	}
	instance_free(i);
}

static void apply_one(gl_model *m, pending *p)
{
	gl_instance *i = gl_model_find(m, p->instance);
	gl_change c = {0};
	int r = 0;

	if (!p->changed)
		return;
	switch (p->kind) {
	case GL_OP_CREATE:
		i = instance_new(m, &p->row);
		if (!i || model_insert(m, i)) {
			instance_free(i);
			r = -ENOMEM;
			break;
		}
		entries_set(&i->config, INSTANCE_ID_KEY, strlen(INSTANCE_ID_KEY), p->row_strs[3],
			    strlen(p->row_strs[3]), p->now);
		m->mtime = p->now;
		bump(i, p);
		for (int k = 0; k < p->nev; k++)
			publish(m, i, p->ev[k]);
		c = (gl_change){.kind = GL_CHANGE_INSTANCE_ADDED, .inst = i};
		observe(m, &c);
		return;
	case GL_OP_DELETE:
		bump(i, p);
		for (int k = 0; k < p->nev; k++)
			publish(m, i, p->ev[k]);
		c = (gl_change){.kind = GL_CHANGE_INSTANCE_REMOVED, .inst = i};
		observe(m, &c);
		m->mtime = p->now;
		remove_instance(m, i);
		return;
	case GL_OP_CONFIG_SET:
	case GL_OP_DEVICE_SET: {
		bool cfg = p->kind == GL_OP_CONFIG_SET;

		r = entries_set(cfg ? &i->config : &i->devices, p->key, strlen(p->key), p->value,
				p->vlen, p->now);
		c = (gl_change){.kind = cfg ? GL_CHANGE_CONFIG : GL_CHANGE_DEVICE, .inst = i,
				.key = p->key, .existed = p->existed, .exists = true};
		break;
	}
	case GL_OP_CONFIG_UNSET:
	case GL_OP_DEVICE_UNSET: {
		bool cfg = p->kind == GL_OP_CONFIG_UNSET;

		entries_del(cfg ? &i->config : &i->devices, p->key, strlen(p->key));
		c = (gl_change){.kind = cfg ? GL_CHANGE_CONFIG : GL_CHANGE_DEVICE, .inst = i,
				.key = p->key, .existed = true, .exists = false};
		break;
	}
	case GL_OP_ATTR_SET:
		r = instance_set_row(i, &p->row);
		i->attr_mtime[p->attr] = p->now;
		if (p->attr == GL_ATTR_INIT_PID)
			i->attr_mtime[GL_ATTR_STATE] = p->now;
		c = (gl_change){.kind = GL_CHANGE_ATTR, .inst = i, .attr = p->attr};
		break;
	}
	if (r) {
		/* durable but not in memory: only on ENOMEM; memory catches up at restart */
		fprintf(stderr, "guestlinkd: error: out of memory applying a change to %s\n",
			p->instance);
	}
	bump(i, p);
	for (int k = 0; k < p->nev; k++)
		publish(m, i, p->ev[k]);
	observe(m, &c);
}

static void model_kick(gl_model *m);

/* Tell everyone how the batch went; frees its ops. */
static void batch_report(gl_model *m, batch *b)
{
	int status = b->fail ? b->fail : b->status;

	if (status) {
		if (!b->fail)
			fprintf(stderr, "guestlinkd: error: store commit failed: %s\n",
				b->err[0] ? b->err : strerror(-status));
		/* Written but not durable: the batches staged over this one
		 * assumed it, so they fail with it. b was taken off the list
		 * first: what is left there is every batch staged after it. */
		if (!b->fail && !b->wstatus)
			for (batch *q = m->fly; q; q = q->next)
				if (!q->fail)
					q->fail = status;
		for (pending *p = b->ops; p; p = p->next)
			if (!p->status)
				p->status = status;
	} else {
		for (pending *p = b->ops; p; p = p->next)
			if (!p->status)
				apply_one(m, p);
	}
	run_notifications(m);
	for (pending *p = b->ops; p; p = p->next)
		if (p->cb)
			p->cb(p->arg, p->status);
	while (b->ops) {
		pending *n = b->ops->next;

		pending_free(b->ops);
		b->ops = n;
	}
}

/* Take the oldest in-flight batch off the list. */
static batch *fly_pop(gl_model *m)
{
	batch *b = m->fly;

	m->fly = b->next;
	if (!m->fly)
		m->fly_last = NULL;
	b->next = NULL;
	m->nfly--;
	return b;
}

static void batch_done(uv_work_t *w, int status)
{
	batch *b = w->data;
	gl_model *m = b->m; /* NULL: the model closed and reported it already */

	(void)status;
	if (!m) {
		batch_free(b);
		return;
	}
	b->finished = true;
	/* in order: a batch finished early waits for the ones before it */
	while (m->fly && m->fly->finished) {
		batch *d = fly_pop(m);

		batch_report(m, d);
		batch_free(d);
	}
	if (!m->closing)
		model_kick(m);
}

/* May a new batch be staged now? Not while the newest batch is still being
 * written: it would have to be staged over ops whose write may yet fail. */
static bool can_start(gl_model *m)
{
	if (!m->qhead || m->closing || m->nfly >= MAX_INFLIGHT)
		return false;
	if (!m->fly_last || batch_written(m->fly_last, NULL))
		return true;
	/* ask the pool thread to wake us, then look again: one of the two
	 * sees the other's flag */
	atomic_store(&m->want_written, true);
	return batch_written(m->fly_last, NULL);
}

static void batch_start(gl_model *m)
{
	batch *b = calloc(1, sizeof(*b));
	stage st = {.m = m, .ops = m->overlay, .n = 0};
	size_t cap = 0, first;
	pending **tail;
	int ws;

	if (!b)
		return; /* retried at the next loop turn */
	pthread_mutex_init(&b->lock, NULL);
	pthread_cond_init(&b->cond, NULL);
	b->m = m;
	/* the overlay: every op of the batches in flight whose write worked */
	for (batch *q = m->fly; q; q = q->next)
		if (batch_written(q, &ws) && !ws && !q->fail)
			for (pending *p = q->ops; p; p = p->next)
				st.ops[st.n++] = p;
	first = st.n;
	tail = &b->ops;
	while (m->qhead && st.n - first < MAX_BATCH) {
		pending *p = m->qhead;

		m->qhead = p->next;
		p->next = NULL;
		*tail = p;
		tail = &p->next;
		st.ops[st.n] = p;
		p->status = stage_one(&st, st.n, p);
		if (!p->status && sops_for(b, &cap, p))
			p->status = -ENOMEM;
		st.n++;
	}
	if (!m->qhead)
		m->qtail = &m->qhead;
	b->nops = st.n - first;
	b->work.data = b;
	if (m->fly_last)
		m->fly_last->next = b;
	else
		m->fly = b;
	m->fly_last = b;
	m->nfly++;
	if (uv_queue_work(m->loop, &b->work, batch_work, batch_done)) {
		b->wstatus = b->status = -EIO;
		b->written = b->done = true;
		batch_done(&b->work, 0);
	}
}

static void model_kick(gl_model *m)
{
	if (m->qhead && !m->closing)
		uv_prepare_start(&m->prepare, prepare_cb);
}

static void prepare_cb(uv_prepare_t *h)
{
	gl_model *m = h->data;

	uv_prepare_stop(h);
	if (can_start(m))
		batch_start(m);
}

static void written_cb(uv_async_t *h)
{
	gl_model *m = h->data;

	atomic_store(&m->want_written, false);
	model_kick(m);
}

/* ---- load and lifetime -------------------------------------------------- */

typedef struct loadctx {
	gl_model *m;
	gl_instance *last;
} loadctx;

static gl_instance *load_find(loadctx *lc, const char *name)
{
	if (!lc->last || strcmp(lc->last->name, name))
		lc->last = gl_model_find(lc->m, name);
	return lc->last;
}

static int load_instance(void *arg, const gl_irow *row)
{
	loadctx *lc = arg;
	gl_instance *i = instance_new(lc->m, row);

	if (!i)
		return -ENOMEM;
	/* rows come sorted: append when in order */
	if (lc->m->ninst && strcmp(lc->m->inst[lc->m->ninst - 1]->name, i->name) < 0 &&
	    lc->m->ninst < lc->m->capinst) {
		lc->m->inst[lc->m->ninst++] = i;
	} else if (model_insert(lc->m, i)) {
		instance_free(i);
		return -ENOMEM;
	}
	if (row->ctime_ns > lc->m->mtime)
		lc->m->mtime = row->ctime_ns;
	return 0;
}

static int load_entry(loadctx *lc, bool dev, const char *inst, const char *key, const char *v,
		      size_t vlen, int64_t mtime)
{
	gl_instance *i = load_find(lc, inst);
	entries *e;
	int r;

	if (!i)
		return 0; /* orphan row; ignore */
	e = dev ? &i->devices : &i->config;
	if (e->n == e->cap) {
		size_t ncap = e->cap ? e->cap * 2 : 8;
		gl_entry *nv = realloc(e->v, ncap * sizeof(*nv));

		if (!nv)
			return -ENOMEM;
		e->v = nv;
		e->cap = ncap;
	}
	r = entry_fill(&e->v[e->n], key, strlen(key), v, vlen, mtime);
	if (r)
		return r;
	e->n++;
	if (mtime > i->mtime)
		i->mtime = mtime;
	return 0;
}

static int load_config(void *arg, const char *inst, const char *key, const char *v, size_t vlen,
		       int64_t mtime)
{
	return load_entry(arg, false, inst, key, v, vlen, mtime);
}

static int load_device(void *arg, const char *inst, const char *key, const char *v, size_t vlen,
		       int64_t mtime)
{
	return load_entry(arg, true, inst, key, v, vlen, mtime);
}

static int load_seq(void *arg, const char *inst, uint64_t seq)
{
	gl_instance *i = load_find(arg, inst);

	if (i)
		i->seq = seq;
	return 0;
}

static void sort_entries(entries *e)
{
	for (size_t k = 1; k < e->n; k++) {
		if (strcmp(e->v[k - 1].key, e->v[k].key) >= 0) {
			qsort(e->v, e->n, sizeof(*e->v), entry_cmp);
			return;
		}
	}
}

gl_model *gl_model_open(uv_loop_t *loop, gl_store *store, const gl_limits *lim, char *errbuf,
			size_t errlen)
{
	gl_model *m = calloc(1, sizeof(*m));
	loadctx lc = {.m = m};
	gl_store_loader l = {.arg = &lc,
			     .instance = load_instance,
			     .config = load_config,
			     .device = load_device,
			     .seq = load_seq};
	int r;

	if (!m) {
		snprintf(errbuf, errlen, "out of memory");
		return NULL;
	}
	if (sodium_init() < 0) {
		snprintf(errbuf, errlen, "libsodium failed to initialise");
		free(m);
		return NULL;
	}
	m->loop = loop;
	m->store = store;
	if (lim)
		m->lim = *lim;
	else
		gl_limits_default(&m->lim);
	m->qtail = &m->qhead;
	r = gl_store_load(store, &l);
	if (r) {
		snprintf(errbuf, errlen, "loading the store failed: %s",
			 store->errmsg[0] ? store->errmsg : strerror(-r));
		for (size_t k = 0; k < m->ninst; k++)
			instance_free(m->inst[k]);
		free(m->inst);
		free(m);
		return NULL;
	}
	for (size_t k = 0; k < m->ninst; k++) {
		sort_entries(&m->inst[k]->config);
		sort_entries(&m->inst[k]->devices);
	}
	m->overlay = calloc((MAX_INFLIGHT + 1) * MAX_BATCH, sizeof(*m->overlay));
	if (!m->overlay || uv_async_init(loop, &m->written, written_cb)) {
		snprintf(errbuf, errlen, "out of memory");
		for (size_t k = 0; k < m->ninst; k++)
			instance_free(m->inst[k]);
		free(m->inst);
		free(m->overlay);
		free(m);
		return NULL;
	}
	m->written.data = m;
	/* the async is only needed while a batch is being written */
	uv_unref((uv_handle_t *)&m->written);
	uv_prepare_init(loop, &m->prepare);
	/* active (and so keeping the loop alive) only while ops are queued */
	m->prepare.data = m;
	m->open_handles = 2;
	return m;
}

static void handle_closed(uv_handle_t *h)
{
	gl_model *m = h->data;

	if (--m->open_handles == 0) {
		free(m->overlay);
		free(m);
	}
}

void gl_model_close(gl_model *m)
{
	if (!m)
		return;
	m->closing = true;
	/* wait for the pool threads, then report the batches here, in order;
	 * libuv's completion callback only frees those it has not seen yet */
	while (m->fly) {
		batch *b = fly_pop(m);

		pthread_mutex_lock(&b->lock);
		while (!b->done)
			pthread_cond_wait(&b->cond, &b->lock);
		pthread_mutex_unlock(&b->lock);
		batch_report(m, b);
		if (b->finished)
			batch_free(b);
		else
			b->m = NULL;
	}
	while (m->qhead) {
		pending *p = m->qhead;

		m->qhead = p->next;
		if (p->cb)
			p->cb(p->arg, -ECANCELED);
		pending_free(p);
	}
	while (m->gsubs)
		sub_detach(&m->gsubs, m->gsubs);
	for (size_t k = 0; k < m->ninst; k++)
		while (m->inst[k]->subs)
			sub_detach(&m->inst[k]->subs, m->inst[k]->subs);
	run_notifications(m);
	for (size_t k = 0; k < m->ninst; k++)
		instance_free(m->inst[k]);
	free(m->inst);
	free(m->obs);
	uv_close((uv_handle_t *)&m->prepare, handle_closed);
	uv_close((uv_handle_t *)&m->written, handle_closed);
}
