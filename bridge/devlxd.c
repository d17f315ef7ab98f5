/* The devlxd face: routing and endpoints of LXD 5.0.2's /dev/lxd/sock API
 * (specs/devlxd-api.md §1-§7), on the HTTP layer of http.c, with callers
 * identified by peer.c.
 *
 * Order of every routed request, as LXD's: unclean path -> 301, no route
 * -> 404, caller in no instance -> 500, not the instance's root -> 401,
 * security.devlxd=false -> 403 (except "/"), then the endpoint. */
#include "bridge/devlxd.h"

#include <errno.h>
#include <inttypes.h>
#include <jansson.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <poll.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#include "bridge/devlxd_priv.h"
#include "bridge/http.h"
#include "bridge/peer.h"
#include "bridge/url.h"
#include "bridge/ws.h"
#include "core/json.h"
#include "core/names.h"

#define DEVLXD_WRITE_LIMIT (4u << 20) /* queued event bytes of a plain stream */
#define DEVLXD_KEPT_PIDFDS 1024       /* unresolved callers that may be retried */

typedef struct dconn dconn;

struct gl_devlxd {
	uv_loop_t *loop;
	gl_model *m;
	gl_devlxd_opts o;
	char *socket_path, *images_dir;
	gl_http_server *srv;
	gl_peer *peer;
	dconn *streams; /* event subscribers, for stop */
	dconn *adopted; /* connections from VM transports, for their unbinding */
	unsigned kept_pidfds; /* of connections not (yet) resolved */
	bool stopping;
	bool adopting; /* inside gl_devlxd_adopt: on_accept takes adopt_uid */
	uint64_t adopt_uid;
	uid_t adopt_guest_uid;
};

/* Per connection. */
struct dconn {
	gl_devlxd *d;
	gl_http_conn *c;
	gl_peer_cred cred;
	int cred_err;
	bool resolved, counted, kept_pidfd;
	uint64_t uid;
	/* event stream */
	gl_sub *sub;
	gl_ws *ws;
	bool ws_closed, streaming, sub_counted;
	dconn *sprev, *snext;
	/* adopted from a VM transport: the instance is fixed, the caller's uid
	 * inside the guest is what the agent vouched for */
	bool adopted;
	uid_t guest_uid;
	dconn *aprev, *anext;
};

enum route {
	R_NONE,
	R_ROOT,
	R_API,
	R_CONFIG,
	R_CONFIG_KEY,
	R_DEVICES,
	R_META,
	R_EVENTS,
	R_IMAGE_EXPORT,
};

/* ---- small helpers ---------------------------------------------------------- */

static bool eq_ci(const char *a, size_t n, const char *b)
{
	if (strlen(b) != n)
		return false;
	for (size_t i = 0; i < n; i++) {
		char x = a[i];

		if (x >= 'A' && x <= 'Z')
			x = (char)(x + 32);
		if (x != b[i])
			return false;
	}
	return true;
}

bool gl__lxd_is_true(const char *v, size_t n)
{
	return v && (eq_ci(v, n, "true") || eq_ci(v, n, "1") || eq_ci(v, n, "yes") ||
		     eq_ci(v, n, "on"));
}

bool gl__lxd_is_false(const char *v, size_t n)
{
	return v && (eq_ci(v, n, "false") || eq_ci(v, n, "0") || eq_ci(v, n, "no") ||
		     eq_ci(v, n, "off"));
}

static bool config_is(const gl_instance *i, const char *key, bool (*pred)(const char *, size_t))
{
	const gl_entry *e = gl_instance_config_get(i, key, strlen(key));

	return e && pred(e->value, e->len);
}

/* gorilla/mux routes of LXD 5.0.2, matched on the escaped path. A variable
 * is [^/]+. */
static enum route route_match(const char *p, size_t n, const char **var, size_t *vlen)
{
	static const struct {
		const char *path;
		enum route r;
	} fixed[] = {
		{"/", R_ROOT},
		{"/1.0", R_API},
		{"/1.0/config", R_CONFIG},
		{"/1.0/devices", R_DEVICES},
		{"/1.0/meta-data", R_META},
		{"/1.0/events", R_EVENTS},
	};
	static const char cfg[] = "/1.0/config/", img[] = "/1.0/images/", exp[] = "/export";

	*var = NULL;
	*vlen = 0;
	for (size_t k = 0; k < sizeof(fixed) / sizeof(fixed[0]); k++)
		if (strlen(fixed[k].path) == n && memcmp(fixed[k].path, p, n) == 0)
			return fixed[k].r;
	if (n > sizeof(cfg) - 1 && memcmp(p, cfg, sizeof(cfg) - 1) == 0) {
		const char *v = p + sizeof(cfg) - 1;
		size_t l = n - (sizeof(cfg) - 1);

		if (!memchr(v, '/', l)) {
			*var = v;
			*vlen = l;
			return R_CONFIG_KEY;
		}
	}
	if (n > sizeof(img) - 1 + sizeof(exp) - 1 && memcmp(p, img, sizeof(img) - 1) == 0 &&
	    memcmp(p + n - (sizeof(exp) - 1), exp, sizeof(exp) - 1) == 0) {
		const char *v = p + sizeof(img) - 1;
		size_t l = n - (sizeof(img) - 1) - (sizeof(exp) - 1);

		if (l && !memchr(v, '/', l)) {
			*var = v;
			*vlen = l;
			return R_IMAGE_EXPORT;
		}
	}
	return R_NONE;
}

static bool is_patch_api(const gl_http_req *r, enum route rt)
{
	return rt == R_API && r->method_len == 5 && memcmp(r->method, "PATCH", 5) == 0;
}

static int respond_json(gl_http_conn *c, const gl_buf *b)
{
	static const gl_http_hdr h[] = {{"Content-Type", "application/json"}};

	return gl_http_respond(c, 200, h, 1, b->data, b->len);
}

static int respond_raw(gl_http_conn *c, const char *p, size_t n)
{
	static const gl_http_hdr h[] = {{"Content-Type", "application/octet-stream"}};

	return gl_http_respond(c, 200, h, 1, p, n);
}

static void oom(gl_http_conn *c)
{
	gl_http_error(c, 500, "internal server error");
}

/* ---- identity ------------------------------------------------------------------ */

static void count_conn(dconn *dc)
{
	unsigned *n = dc->d->peer ? gl_peer_counter(dc->d->peer, dc->uid, GL_PEER_CONNS) : NULL;

	if (n) {
		(*n)++;
		dc->counted = true;
	}
}

static void drop_pidfd(dconn *dc)
{
	if (dc->kept_pidfd) {
		dc->kept_pidfd = false;
		dc->d->kept_pidfds--;
	}
	gl_peer_cred_clear(&dc->cred);
}

/* A connection speaks for the process that opened it, and only while that
 * process lives (LXD looks the pid up on every request): once it has
 * exited, a connection it handed to another process (SCM_RIGHTS, fork)
 * speaks for nobody. Its pidfd turns readable when it exits. */
static bool connector_alive(const dconn *dc)
{
	struct pollfd p = {.fd = dc->cred.pidfd, .events = POLLIN};

	if (dc->cred.pidfd < 0)
		return true; /* no pidfd on this kernel: nothing to check with */
	return poll(&p, 1, 0) == 0;
}

/* The caller's instance, or NULL after answering 500 / 401. */
static gl_instance *identify(dconn *dc)
{
	gl_devlxd *d = dc->d;
	gl_instance *inst;
	int r;

	if (!dc->resolved && !dc->cred_err && dc->cred.pidfd >= 0) {
		/* not an instance at accept: maybe its binding came since */
		r = gl_peer_resolve(d->peer, &dc->cred, &dc->uid);
		if (r == 0) {
			dc->resolved = true;
			/* the pidfd stays, for the liveness check below, but no
			 * longer counts among those of unresolved connections */
			if (dc->kept_pidfd) {
				dc->kept_pidfd = false;
				d->kept_pidfds--;
			}
			count_conn(dc);
		} else if (r != -ESRCH) {
			dc->cred_err = r;
			drop_pidfd(dc);
		}
	}
	if (!dc->resolved) {
		if (dc->cred_err && dc->cred_err != -ESRCH) {
			char msg[128];

			snprintf(msg, sizeof(msg), "%s", strerror(-dc->cred_err));
			gl_http_error(dc->c, 500, msg);
		} else {
			gl_http_error(dc->c, 500, "pid not in container?");
		}
		return NULL;
	}
	inst = gl_peer_instance(d->peer, dc->uid);
	if (!inst || (!dc->adopted && (!connector_alive(dc) || gl_instance_is_vm(inst)))) {
		gl_http_error(dc->c, 500, "pid not in container?");
		return NULL;
	}
	if (dc->adopted ? dc->guest_uid != 0 :
			  dc->cred.uid != gl_peer_root_uid(d->peer, dc->uid)) {
		gl_http_error(dc->c, 401, "Access denied for non-root user");
		return NULL;
	}
	return inst;
}

/* ---- GET / , GET/PATCH /1.0 ----------------------------------------------------- */

static void get_root(gl_http_conn *c)
{
	static const gl_http_hdr h[] = {{"Content-Type", "application/json"}};

	gl_http_respond(c, 200, h, 1, "[\"/1.0\"]\n", 9);
}

static void get_api(gl_http_conn *c, gl_instance *inst)
{
	gl_buf b = GL_BUF_INIT;
	const char *st = gl_instance_guest_state(inst);
	int r;

	r = gl_buf_adds(&b, "{\"state\":");
	if (!r)
		r = gl_json_quote(&b, st, strlen(st), false);
	if (!r)
		r = gl_buf_printf(&b,
				  ",\"api_version\":\"1.0\",\"instance_type\":\"%s\","
				  "\"location\":\"none\"}\n",
				  gl_instance_is_vm(inst) ? "virtual-machine" : "container");
	if (r)
		oom(c);
	else
		respond_json(c, &b);
	gl_buf_free(&b);
}

typedef struct patch_ctx {
	gl_http_conn *c; /* NULL once the connection is gone */
} patch_ctx;

static void patch_cancel(void *arg)
{
	patch_ctx *p = arg;

	p->c = NULL;
}

static void patch_done(void *arg, int status)
{
	patch_ctx *p = arg;

	if (p->c) {
		/* p goes away now: the connection must not cancel it later (it may
		 * be closing already, with its close callback still to run) */
		gl_http_set_cancel(p->c, NULL, NULL);
		if (status == 0) {
			respond_raw(p->c, "", 0);
		} else {
			char msg[160];

			snprintf(msg, sizeof(msg), "Failed to set the instance state: %s",
				 strerror(-status));
			gl_http_error(p->c, 500, msg);
		}
	}
	free(p);
}

/* Go's %q for the value in `Invalid state %q`. */
static int go_quote(gl_buf *b, const char *s, size_t n)
{
	int r = gl_buf_addc(b, '"');

	for (size_t i = 0; i < n && !r; i++) {
		unsigned char ch = (unsigned char)s[i];

		switch (ch) {
		case '"': r = gl_buf_adds(b, "\\\""); break;
		case '\\': r = gl_buf_adds(b, "\\\\"); break;
		case '\a': r = gl_buf_adds(b, "\\a"); break;
		case '\b': r = gl_buf_adds(b, "\\b"); break;
		case '\f': r = gl_buf_adds(b, "\\f"); break;
		case '\n': r = gl_buf_adds(b, "\\n"); break;
		case '\r': r = gl_buf_adds(b, "\\r"); break;
		case '\t': r = gl_buf_adds(b, "\\t"); break;
		case '\v': r = gl_buf_adds(b, "\\v"); break;
		default:
			if (ch < 0x20 || ch == 0x7f)
				r = gl_buf_printf(b, "\\x%02x", ch);
			else
				r = gl_buf_addc(b, (char)ch);
		}
	}
	return r ? r : gl_buf_addc(b, '"');
}

static const char *json_kind(const json_t *v)
{
	switch (json_typeof(v)) {
	case JSON_OBJECT: return "object";
	case JSON_ARRAY: return "array";
	case JSON_STRING: return "string";
	case JSON_INTEGER:
	case JSON_REAL: return "number";
	case JSON_TRUE:
	case JSON_FALSE: return "bool";
	default: return "null";
	}
}

/* PATCH /1.0 {"state":"Ready"|"Started"}: newer LXD's instance_ready_state. */
static void patch_api(gl_devlxd *d, gl_http_conn *c, const gl_http_req *r, gl_instance *inst)
{
	json_error_t jerr;
	json_t *doc = NULL, *st;
	const char *val = "";
	size_t vlen = 0;
	gl_buf msg = GL_BUF_INIT;
	patch_ctx *p;
	gl_op op;
	int rc;

	if (r->body_over) {
		gl_http_error(c, 413, "http: request body too large");
		return;
	}
	if (r->body_bad) {
		gl_http_error(c, 400, "Invalid request body: unexpected EOF");
		return;
	}
	if (r->body_len == 0) {
		gl_http_error(c, 400, "Invalid request body: EOF");
		return;
	}
	doc = json_loadb(r->body, r->body_len, JSON_DECODE_ANY | JSON_DISABLE_EOF_CHECK |
						     JSON_ALLOW_NUL, &jerr);
	if (!doc) {
		gl_buf_printf(&msg, "Invalid request body: %s", jerr.text);
		goto error400;
	}
	if (json_is_object(doc)) {
		st = json_object_get(doc, "state");
		if (st && json_is_string(st)) {
			val = json_string_value(st);
			vlen = json_string_length(st);
		} else if (st && !json_is_null(st)) {
			gl_buf_printf(&msg,
				      "Invalid request body: json: cannot unmarshal %s into Go struct "
				      "field DevLXDPut.state of type string",
				      json_kind(st));
			goto error400;
		}
	} else if (!json_is_null(doc)) {
		gl_buf_printf(&msg,
			      "Invalid request body: json: cannot unmarshal %s into Go value of "
			      "type api.DevLXDPut",
			      json_kind(doc));
		goto error400;
	}
	if (!((vlen == 5 && memcmp(val, "Ready", 5) == 0) ||
	      (vlen == 7 && memcmp(val, "Started", 7) == 0))) {
		gl_buf_adds(&msg, "Invalid state ");
		go_quote(&msg, val, vlen);
		goto error400;
	}
	p = calloc(1, sizeof(*p));
	if (!p) {
		oom(c);
		goto out;
	}
	p->c = c;
	op = (gl_op){.kind = GL_OP_ATTR_SET,
		     .origin = GL_ORIGIN_GUEST,
		     .attr = GL_ATTR_STATE,
		     .instance = gl_instance_name(inst),
		     .ilen = strlen(gl_instance_name(inst)),
		     .value = val,
		     .vlen = vlen};
	rc = gl_model_submit(d->m, &op, patch_done, p);
	if (rc) {
		free(p);
		gl_buf_printf(&msg, "Failed to set the instance state: %s", strerror(-rc));
		gl_http_error(c, 500, msg.data ? msg.data : "internal server error");
		goto out;
	}
	gl_http_set_cancel(c, patch_cancel, p);
	goto out;
error400:
	gl_http_error(c, 400, msg.data ? msg.data : "Invalid request body");
out:
	json_decref(doc);
	gl_buf_free(&msg);
}

/* ---- config, devices, meta-data ---------------------------------------------- */

static void get_config(gl_http_conn *c, gl_instance *inst)
{
	gl_buf b = GL_BUF_INIT, u = GL_BUF_INIT;
	size_t n;
	const gl_entry *e = gl_instance_config(inst, &n);
	bool first = true;
	int r = gl_buf_addc(&b, '[');

	/* sorted: one valid Go map order, and a stable one */
	for (size_t k = 0; k < n && !r; k++) {
		if (!gl_key_guest_visible(e[k].key))
			continue;
		gl_buf_reset(&u);
		r = gl_buf_adds(&u, "/1.0/config/");
		if (!r)
			r = gl_buf_adds(&u, e[k].key);
		if (!r && !first)
			r = gl_buf_addc(&b, ',');
		if (!r)
			r = gl_json_quote(&b, u.data, u.len, false);
		first = false;
	}
	if (!r)
		r = gl_buf_adds(&b, "]\n");
	if (r)
		oom(c);
	else
		respond_json(c, &b);
	gl_buf_free(&b);
	gl_buf_free(&u);
}

static void get_config_key(gl_http_conn *c, gl_instance *inst, const char *var, size_t vlen)
{
	char small[512];
	gl_buf key = GL_BUF_INIT;
	const gl_entry *e;

	/* most keys fit on the stack: no allocation on the hot path.
	 * gl_url_unescape reserves vlen + 1 and gl_buf keeps room for a NUL
	 * beyond that: a buffer that could need more must never be the
	 * stack array, or gl_buf would realloc() it (found by fuzzing). */
	if (vlen + 2 <= sizeof(small)) {
		key.data = small;
		key.cap = sizeof(small);
	}
	if (gl_url_unescape(var, vlen, false, &key)) {
		if (key.data != small)
			gl_buf_free(&key);
		gl_http_error(c, 400, "bad request");
		return;
	}
	if (!gl_key_guest_visible(key.data)) {
		/* key.data is NUL-terminated; a key with a NUL inside is still
		 * judged by its full bytes below */
		gl_http_error(c, 403, "not authorized");
	} else if (strlen(key.data) != key.len ||
		   !(e = gl_instance_config_get(inst, key.data, key.len))) {
		gl_http_error(c, 404, "not found");
	} else {
		respond_raw(c, e->value, e->len);
	}
	if (key.data != small)
		gl_buf_free(&key);
}

/* A nic without hwaddr gets volatile.<name>.hwaddr, as LXD fills it in. */
static int device_json(gl_buf *b, gl_instance *inst, const gl_entry *dev)
{
	gl_buf vk = GL_BUF_INIT;
	const gl_entry *hw;
	json_t *o;
	int r = 0;

	if (!strstr(dev->value, "\"nic\""))
		return gl_buf_add(b, dev->value, dev->len);
	if (gl_buf_printf(&vk, "volatile.%s.hwaddr", dev->key)) {
		gl_buf_free(&vk);
		return -ENOMEM;
	}
	hw = gl_instance_config_get(inst, vk.data, vk.len);
	gl_buf_free(&vk);
	o = hw ? json_loadb(dev->value, dev->len, 0, NULL) : NULL;
	if (!o || !json_is_string(json_object_get(o, "type")) ||
	    strcmp(json_string_value(json_object_get(o, "type")), "nic") != 0 ||
	    json_object_get(o, "hwaddr")) {
		json_decref(o);
		return gl_buf_add(b, dev->value, dev->len);
	}
	{
		size_t n = json_object_size(o) + 1, k = 0;
		const char **keys = calloc(n, sizeof(*keys));
		const char **vals = calloc(n, sizeof(*vals));
		size_t *lens = calloc(n, sizeof(*lens));
		const char *key;
		json_t *v;
		bool placed = false;

		if (!keys || !vals || !lens) {
			r = -ENOMEM;
			goto done;
		}
		/* stored objects are sorted; insert hwaddr in its place */
		json_object_foreach(o, key, v) {
			if (!placed && strcmp(key, "hwaddr") > 0) {
				keys[k] = "hwaddr";
				vals[k] = hw->value;
				lens[k++] = hw->len;
				placed = true;
			}
			keys[k] = key;
			vals[k] = json_string_value(v);
			lens[k++] = json_string_length(v);
		}
		if (!placed) {
			keys[k] = "hwaddr";
			vals[k] = hw->value;
			lens[k++] = hw->len;
		}
		r = gl_json_flat_object(b, keys, vals, lens, k, false);
done:
		free(keys);
		free(vals);
		free(lens);
	}
	json_decref(o);
	return r;
}

static void get_devices(gl_http_conn *c, gl_instance *inst)
{
	gl_buf b = GL_BUF_INIT;
	size_t n;
	const gl_entry *e = gl_instance_devices(inst, &n);
	int r = gl_buf_addc(&b, '{');

	for (size_t k = 0; k < n && !r; k++) {
		if (k)
			r = gl_buf_addc(&b, ',');
		if (!r)
			r = gl_json_quote(&b, e[k].key, strlen(e[k].key), false);
		if (!r)
			r = gl_buf_addc(&b, ':');
		if (!r)
			r = device_json(&b, inst, &e[k]);
	}
	if (!r)
		r = gl_buf_adds(&b, "}\n");
	if (r)
		oom(c);
	else
		respond_json(c, &b);
	gl_buf_free(&b);
}

static void get_meta(gl_http_conn *c, gl_instance *inst)
{
	gl_buf b = GL_BUF_INIT;

	if (gl_instance_meta_data(inst, &b))
		oom(c);
	else
		respond_raw(c, b.data ? b.data : "", b.len);
	gl_buf_free(&b);
}

/* ---- events ---------------------------------------------------------------------- */

static void stream_link(dconn *dc)
{
	gl_devlxd *d = dc->d;

	dc->streaming = true;
	dc->snext = d->streams;
	if (d->streams)
		d->streams->sprev = dc;
	d->streams = dc;
}

static void stream_unlink(dconn *dc)
{
	gl_devlxd *d = dc->d;

	if (!dc->streaming)
		return;
	dc->streaming = false;
	if (dc->sprev)
		dc->sprev->snext = dc->snext;
	else
		d->streams = dc->snext;
	if (dc->snext)
		dc->snext->sprev = dc->sprev;
	dc->sprev = dc->snext = NULL;
}

static void sub_release(dconn *dc)
{
	if (!dc->sub)
		return;
	gl_sub_free(dc->sub);
	dc->sub = NULL;
	if (dc->sub_counted && dc->d->peer) {
		unsigned *n = gl_peer_counter(dc->d->peer, dc->uid, GL_PEER_SUBS);

		if (n && *n)
			(*n)--;
	}
	dc->sub_counted = false;
}

/* Hand queued events to the transport; end it when the subscription is. */
static void drain(dconn *dc)
{
	gl_sub_status st;
	const gl_event *ev;

	if (!dc->sub)
		return;
	st = gl_sub_status_get(dc->sub);
	while ((ev = gl_sub_peek(dc->sub))) {
		int r;

		if (dc->ws)
			r = dc->ws_closed ? -EPIPE : gl_ws_send_text(dc->ws, ev->line, ev->line_len);
		else
			r = gl_http_raw_write(dc->c, ev->line, ev->line_len);
		if (r < 0) {
			/* the transport is ending (over its queue limit, or closed) */
			sub_release(dc);
			return;
		}
		gl_sub_pop(dc->sub);
	}
	if (st == GL_SUB_LIVE)
		return;
	sub_release(dc);
	if (dc->ws) {
		/* too slow: policy violation; instance removed: going away */
		if (!dc->ws_closed)
			gl_ws_close(dc->ws, st == GL_SUB_DROPPED ? 1008 : 1001);
	} else if (st == GL_SUB_DROPPED) {
		gl_http_close(dc->c);
	} else {
		/* ended: let the last events out, then hang up */
		gl_http_close_flushed(dc->c);
	}
}

static void on_sub(gl_sub *s, void *arg)
{
	drain(arg);
}

static void on_ws_closed(gl_ws *ws, void *arg)
{
	dconn *dc = arg;

	dc->ws_closed = true;
	sub_release(dc);
	stream_unlink(dc);
	gl_http_close(dc->c);
}

static void on_plain_input(gl_http_conn *c, void *arg)
{
	dconn *dc = arg;

	/* LXD reads one byte: anything, or EOF, ends the stream */
	sub_release(dc);
	stream_unlink(dc);
	gl_http_close(c);
}

/* ?type=: exact comma-separated tokens, first parameter only; empty or
 * missing means both. Only config and device events reach guests. */
static unsigned type_mask(const gl_http_req *r)
{
	gl_buf v = GL_BUF_INIT;
	unsigned mask = 0;
	int got = r->url.query ? gl_url_query_get(r->url.query, r->url.query_len, "type", &v) : 0;

	if (got <= 0 || v.len == 0) {
		gl_buf_free(&v);
		return GL_EV_CONFIG | GL_EV_DEVICE;
	}
	for (size_t s = 0; s <= v.len;) {
		const char *tok = v.data + s;
		const char *comma = memchr(tok, ',', v.len - s);
		size_t tl = comma ? (size_t)(comma - tok) : v.len - s;

		if (tl == 6 && memcmp(tok, "config", 6) == 0)
			mask |= GL_EV_CONFIG;
		else if (tl == 6 && memcmp(tok, "device", 6) == 0)
			mask |= GL_EV_DEVICE;
		s += tl + 1;
	}
	gl_buf_free(&v);
	return mask;
}

/* The guestlink extension ?since=<seq>|now[&skip=<n>] (docs/devlxd.md).
 * 0 when absent, 1 when given (values set), -1 when malformed. */
static int since_param(const gl_http_req *r, uint64_t *since, bool *now, uint64_t *skip)
{
	gl_buf v = GL_BUF_INIT;
	int got;
	char *end;

	*since = 0;
	*now = false;
	*skip = 0;
	if (!r->url.query)
		return 0;
	got = gl_url_query_get(r->url.query, r->url.query_len, "since", &v);
	if (got <= 0 || v.len == 0) {
		gl_buf_free(&v);
		return 0;
	}
	if (strcmp(v.data, "now") == 0) {
		*now = true;
	} else {
		if (v.data[0] < '0' || v.data[0] > '9')
			goto bad;
		errno = 0;
		*since = strtoull(v.data, &end, 10);
		if (errno || *end)
			goto bad;
	}
	gl_buf_reset(&v);
	got = gl_url_query_get(r->url.query, r->url.query_len, "skip", &v);
	if (got > 0 && v.len) {
		if (v.data[0] < '0' || v.data[0] > '9')
			goto bad;
		errno = 0;
		*skip = strtoull(v.data, &end, 10);
		if (errno || *end)
			goto bad;
	}
	gl_buf_free(&v);
	return 1;
bad:
	gl_buf_free(&v);
	return -1;
}

static int resync_line(gl_buf *b, uint64_t seq)
{
	struct timespec ts;
	int r;

	clock_gettime(CLOCK_REALTIME, &ts);
	r = gl_buf_adds(b, "{\"type\":\"resync\",\"timestamp\":\"");
	if (!r)
		r = gl_json_timestamp(b, (long long)ts.tv_sec * 1000000000ll + ts.tv_nsec);
	if (!r)
		r = gl_buf_printf(b, "\",\"metadata\":{\"seq\":%" PRIu64 "}}\n", seq);
	return r;
}

/* Subscribe, applying ?since: the queue then holds the events the client
 * has not seen; *resync is set (with its seq) when the client must start
 * over from that seq. */
static gl_sub *subscribe(dconn *dc, gl_instance *inst, unsigned mask, int has_since,
			 uint64_t since, bool now, uint64_t skip, bool *resync, uint64_t *rseq)
{
	gl_model *m = dc->d->m;
	uint64_t cur = gl_instance_seq(inst);
	gl_sub *s;
	bool gap = false;

	*resync = false;
	if (has_since <= 0)
		return gl_sub_new(m, inst, mask, on_sub, dc);
	if (now || since > cur) {
		*resync = true;
		*rseq = cur;
		return gl_sub_new(m, inst, mask, on_sub, dc);
	}
	s = gl_sub_new_since(m, inst, mask, since, &gap, on_sub, dc);
	if (!s)
		return NULL;
	if (gap) {
		const gl_event *ev = gl_sub_peek(s);

		*resync = true;
		*rseq = ev ? ev->seq - 1 : cur;
		return s;
	}
	for (uint64_t k = 0; k < skip; k++) {
		if (!gl_sub_peek(s)) {
			/* the client counts more events than there were: start over */
			*resync = true;
			*rseq = cur;
			break;
		}
		gl_sub_pop(s);
	}
	return s;
}

/* subscribe() within the per-instance subscriber cap, counted. False when
 * refused; the request has then been answered (503, or 500 on ENOMEM). */
static bool subscribe_capped(dconn *dc, gl_http_conn *c, gl_instance *inst, unsigned mask,
			     int has_since, uint64_t since, bool now, uint64_t skip, bool *resync,
			     uint64_t *rseq)
{
	gl_devlxd *d = dc->d;
	unsigned *nsubs = gl_peer_counter(d->peer, dc->uid, GL_PEER_SUBS);

	if (nsubs && *nsubs >= d->o.max_subs_per_instance) {
		gl_http_error(c, 503, "too many event subscribers");
		return false;
	}
	dc->sub = subscribe(dc, inst, mask, has_since, since, now, skip, resync, rseq);
	if (!dc->sub) {
		oom(c);
		return false;
	}
	if (nsubs) {
		(*nsubs)++;
		dc->sub_counted = true;
	}
	return true;
}

static void get_events(gl_devlxd *d, dconn *dc, const gl_http_req *r, gl_instance *inst)
{
	gl_http_conn *c = dc->c;
	unsigned mask = type_mask(r);
	uint64_t since, skip, rseq = 0;
	bool now, resync = false;
	int has_since = since_param(r, &since, &now, &skip);
	const char *upg;
	size_t ulen = 0;
	uint64_t cur = gl_instance_seq(inst);
	gl_buf extra = GL_BUF_INIT;
	const char *rest;
	size_t nrest;
	uv_stream_t *stream;

	if (has_since < 0) {
		gl_http_error(c, 400, "Invalid since value");
		return;
	}
	upg = gl_http_req_get(r, "Upgrade", &ulen);
	if (upg && ulen == 9 && memcmp(upg, "websocket", 9) == 0) {
		gl_buf conn = GL_BUF_INIT, up = GL_BUF_INIT, ver = GL_BUF_INIT, key = GL_BUF_INIT;
		int nc = gl_http_req_join(r, "Connection", &conn);
		int nu = gl_http_req_join(r, "Upgrade", &up);
		int nv = gl_http_req_join(r, "Sec-WebSocket-Version", &ver);
		size_t kl = 0;
		const char *k = gl_http_req_get(r, "Sec-WebSocket-Key", &kl);
		int st;

		if (k)
			gl_buf_add(&key, k, kl);
		st = gl_ws_check(r->method, nc > 0 ? conn.data : NULL, nu > 0 ? up.data : NULL,
				 nv > 0 ? ver.data : NULL, k ? (key.data ? key.data : "") : NULL);
		gl_buf_free(&conn);
		gl_buf_free(&up);
		gl_buf_free(&ver);
		if (st) {
			static const gl_http_hdr h[] = {
				{"Content-Type", "text/plain; charset=utf-8"},
				{"Sec-Websocket-Version", "13"},
				{"X-Content-Type-Options", "nosniff"}};
			const char *body = gl_ws_error_body(st);

			gl_buf_free(&key);
			gl_http_respond(c, st, h, 3, body, strlen(body));
			return;
		}
		if (!subscribe_capped(dc, c, inst, mask, has_since, since, now, skip, &resync,
				      &rseq)) {
			gl_buf_free(&key);
			return;
		}
		stream = gl_http_hijack(c, &rest, &nrest);
		{
			gl_ws_opts o;

			gl_ws_opts_default(&o);
			dc->ws = gl_ws_start(d->loop, stream, key.data, rest, nrest, &o, on_ws_closed,
					     dc);
		}
		gl_buf_free(&key);
		if (!dc->ws) {
			sub_release(dc);
			gl_http_close(c);
			return;
		}
		stream_link(dc);
		if (resync && !resync_line(&extra, rseq))
			gl_ws_send_text(dc->ws, extra.data, extra.len);
		gl_buf_free(&extra);
		drain(dc);
		return;
	}

	/* LXD's plain stream: the connection is taken over and the head is
	 * written by hand, LF line endings, "keep-alive" whatever was asked */
	if (!subscribe_capped(dc, c, inst, mask, has_since, since, now, skip, &resync, &rseq))
		return;
	gl_http_hijack(c, &rest, &nrest);
	if (gl_buf_adds(&extra, "HTTP/1.1 200 OK\nConnection: keep-alive\n"
				"Content-Type: application/json\nX-Content-Type-Options: nosniff\n") ||
	    (has_since > 0 && gl_buf_printf(&extra, "X-Guestlink-Seq: %" PRIu64 "\n", cur)) ||
	    gl_buf_addc(&extra, '\n') || (resync && resync_line(&extra, rseq))) {
		gl_buf_free(&extra);
		sub_release(dc);
		gl_http_close(c);
		return;
	}
	stream_link(dc);
	gl_http_raw_write(c, extra.data, extra.len);
	gl_buf_free(&extra);
	/* bytes pipelined behind the request were read before the take-over;
	 * LXD never sees them either: only new input ends the stream */
	if (gl_http_watch(c, on_plain_input, dc)) {
		sub_release(dc);
		stream_unlink(dc);
		gl_http_close(c);
		return;
	}
	drain(dc);
}

/* ---- the HTTP handler ---------------------------------------------------------- */

static bool same_instance(gl_http_conn *c, void *arg)
{
	const dconn *me = arg, *dc = gl_http_conn_data(c);

	return dc && dc != me && dc->counted && dc->uid == me->uid;
}

static int on_accept(gl_http_conn *c, void *arg)
{
	gl_devlxd *d = arg;
	dconn *dc = calloc(1, sizeof(*dc));
	unsigned *n;
	int r;

	if (!dc)
		return -ENOMEM;
	dc->d = d;
	dc->c = c;
	dc->cred.pidfd = -1;
	gl_http_conn_set_data(c, dc);
	if (d->adopting) {
		/* identity = transport (no SO_PEERCRED over vsock); the uid
		 * is the one the VM's agent vouched for */
		dc->adopted = true;
		dc->uid = d->adopt_uid;
		dc->guest_uid = d->adopt_guest_uid;
		dc->anext = d->adopted;
		if (d->adopted)
			d->adopted->aprev = dc;
		d->adopted = dc;
		r = 0;
	} else {
		r = gl_peer_cred_get(gl_http_conn_fd(c), &dc->cred);
		if (r) {
			dc->cred_err = r;
			return 0;
		}
		r = gl_peer_resolve(d->peer, &dc->cred, &dc->uid);
	}
	if (r) {
		if (r != -ESRCH)
			dc->cred_err = r;
		/* its pidfd lets a later request try again (the binding may come
		 * after the connection); a bounded number of them, as each costs
		 * a descriptor */
		if (dc->cred.pidfd >= 0) {
			if (d->kept_pidfds < DEVLXD_KEPT_PIDFDS) {
				d->kept_pidfds++;
				dc->kept_pidfd = true;
			} else {
				gl_peer_cred_clear(&dc->cred);
			}
		}
		return 0; /* answered per request: 404/301 still work, the rest 500 */
	}
	dc->resolved = true; /* its pidfd (if any) stays: connector_alive() */
	n = gl_peer_counter(d->peer, dc->uid, GL_PEER_CONNS);
	if (n && *n >= d->o.max_conns_per_instance) {
		/* the instance's connection idle the longest makes room, as for
		 * the global limit; with none idle the new one is turned away */
		gl_http_conn *old = gl_http_server_oldest_idle(d->srv, same_instance, dc);
		dconn *od = old ? gl_http_conn_data(old) : NULL;

		if (!od)
			return -EMFILE;
		od->counted = false;
		(*n)--;
		gl_http_close(old);
	}
	count_conn(dc);
	return 0;
}

static size_t on_body_limit(gl_http_conn *c, const gl_http_req *r, void *arg)
{
	gl_devlxd *d = arg;
	const char *var;
	size_t vlen;

	if (is_patch_api(r, route_match(r->epath, r->epath_len, &var, &vlen)))
		return d->o.max_body_bytes ? d->o.max_body_bytes : 1;
	return 0;
}

static void on_request(gl_http_conn *c, gl_http_req *r, void *arg)
{
	gl_devlxd *d = arg;
	dconn *dc = gl_http_conn_data(c);
	gl_buf clean = GL_BUF_INIT;
	const char *var;
	size_t vlen;
	enum route rt;
	gl_instance *inst;

	if (!gl_url_is_clean(r->epath, r->epath_len)) {
		gl_buf loc = GL_BUF_INIT;
		gl_http_hdr h[1] = {{"Location", ""}};

		if (gl_url_clean_path(r->epath, r->epath_len, &clean) ||
		    gl_url_redirect_location(&r->url, r->raw_kept, r->path, r->path_len, clean.data,
					     clean.len, &loc)) {
			oom(c);
		} else {
			h[0].value = loc.data ? loc.data : "";
			gl_http_respond(c, 301, h, 1, NULL, 0);
		}
		gl_buf_free(&loc);
		gl_buf_free(&clean);
		return;
	}
	rt = route_match(r->epath, r->epath_len, &var, &vlen);
	if (rt == R_NONE) {
		gl_http_error(c, 404, "404 page not found");
		return;
	}
	inst = identify(dc);
	if (!inst)
		return;
	if (rt != R_ROOT && config_is(inst, "security.devlxd", gl__lxd_is_false)) {
		gl_http_error(c, 403, "not authorized");
		return;
	}
	switch (rt) {
	case R_ROOT:
		get_root(c);
		break;
	case R_API:
		if (is_patch_api(r, rt))
			patch_api(d, c, r, inst);
		else
			get_api(c, inst);
		break;
	case R_CONFIG:
		get_config(c, inst);
		break;
	case R_CONFIG_KEY:
		get_config_key(c, inst, var, vlen);
		break;
	case R_DEVICES:
		get_devices(c, inst);
		break;
	case R_META:
		get_meta(c, inst);
		break;
	case R_EVENTS:
		get_events(d, dc, r, inst);
		break;
	case R_IMAGE_EXPORT:
		if (!config_is(inst, "security.devlxd.images", gl__lxd_is_true)) {
			gl_http_error(c, 403, "not authorized");
			break;
		}
		gl__devlxd_image_export(c, r, d->images_dir, var, vlen);
		break;
	default:
		gl_http_error(c, 404, "404 page not found");
	}
}

static void on_closed(gl_http_conn *c, void *arg)
{
	dconn *dc = gl_http_conn_data(c);
	gl_devlxd *d = arg;

	if (!dc)
		return;
	sub_release(dc);
	stream_unlink(dc);
	if (dc->ws) {
		if (dc->ws_closed)
			gl_ws_free(dc->ws);
		else
			fprintf(stderr, "guestlinkd: warning: devlxd connection closed under a live "
					"WebSocket session\n");
	}
	if (dc->counted && d->peer) {
		unsigned *n = gl_peer_counter(d->peer, dc->uid, GL_PEER_CONNS);

		if (n && *n)
			(*n)--;
	}
	drop_pidfd(dc);
	if (dc->adopted) {
		if (dc->aprev)
			dc->aprev->anext = dc->anext;
		else
			d->adopted = dc->anext;
		if (dc->anext)
			dc->anext->aprev = dc->aprev;
	}
	free(dc);
}

/* ---- lifetime ------------------------------------------------------------------ */

void gl_devlxd_opts_default(gl_devlxd_opts *o)
{
	memset(o, 0, sizeof(*o));
	o->socket_path = "/run/guestlink/devlxd.sock";
	o->images_dir = NULL;
	o->max_header_bytes = (1u << 20) + 4096;
	o->max_body_bytes = 1u << 20;
	o->max_conns = 16384;
	o->max_conns_per_instance = 1024;
	o->max_subs_per_instance = 1024;
	o->header_timeout_ms = 10000;
	o->idle_timeout_ms = 0;
}

/* 16384 connections need more descriptors than the usual soft limit. */
static void raise_nofile(unsigned want)
{
	struct rlimit rl;

	if (getrlimit(RLIMIT_NOFILE, &rl) < 0)
		return;
	if (rl.rlim_cur >= (rlim_t)want * 2 + 256 || rl.rlim_cur >= rl.rlim_max)
		return;
	rl.rlim_cur = rl.rlim_max;
	setrlimit(RLIMIT_NOFILE, &rl);
}

int gl_devlxd_start(uv_loop_t *loop, gl_model *m, const gl_devlxd_opts *o, gl_devlxd **out,
		    char *err, size_t errlen)
{
	static const gl_http_handler h = {
		.accept = on_accept,
		.body_limit = on_body_limit,
		.request = on_request,
		.closed = on_closed,
	};
	gl_devlxd *d;
	gl_http_limits lim;
	struct sigaction sa;
	int r;

	d = calloc(1, sizeof(*d));
	if (!d) {
		snprintf(err, errlen, "out of memory");
		return -ENOMEM;
	}
	d->loop = loop;
	d->m = m;
	d->o = *o;
	d->socket_path = o->socket_path && *o->socket_path ? strdup(o->socket_path) : NULL;
	d->images_dir = strdup(o->images_dir ? o->images_dir : "");
	if ((o->socket_path && *o->socket_path && !d->socket_path) || !d->images_dir) {
		r = -ENOMEM;
		snprintf(err, errlen, "out of memory");
		goto fail;
	}
	d->o.socket_path = d->socket_path;
	d->o.images_dir = d->images_dir;
	if (!d->o.max_header_bytes)
		d->o.max_header_bytes = (1u << 20) + 4096;
	if (!d->o.max_conns)
		d->o.max_conns = 16384;
	if (!d->o.max_conns_per_instance)
		d->o.max_conns_per_instance = 1024;
	if (!d->o.max_subs_per_instance)
		d->o.max_subs_per_instance = 1024;
	/* a peer that hangs up must not kill the daemon with SIGPIPE */
	if (sigaction(SIGPIPE, NULL, &sa) == 0 && sa.sa_handler == SIG_DFL)
		signal(SIGPIPE, SIG_IGN);
	raise_nofile(d->o.max_conns);
	d->peer = gl_peer_new(loop, m, err, errlen);
	if (!d->peer) {
		r = -ENOMEM;
		goto fail;
	}
	lim = (gl_http_limits){.max_header_bytes = d->o.max_header_bytes,
			       .max_queued = DEVLXD_WRITE_LIMIT,
			       .max_conns = d->o.max_conns,
			       .header_timeout_ms = d->o.header_timeout_ms,
			       .idle_timeout_ms = d->o.idle_timeout_ms};
	r = gl_http_server_start(loop, d->socket_path, 0666, &lim, &h, d, &d->srv, err, errlen);
	if (r)
		goto fail;
	*out = d;
	return 0;
fail:
	gl_peer_free(d->peer);
	free(d->socket_path);
	free(d->images_dir);
	free(d);
	return r;
}

int gl_devlxd_adopt(gl_devlxd *d, int fd, uint64_t uid, uid_t guest_uid)
{
	int r;

	if (d->stopping) {
		close(fd);
		return -ESHUTDOWN;
	}
	d->adopting = true;
	d->adopt_uid = uid;
	d->adopt_guest_uid = guest_uid;
	r = gl_http_server_adopt(d->srv, fd, NULL);
	d->adopting = false;
	return r;
}

void gl_devlxd_drop_instance(gl_devlxd *d, uint64_t uid)
{
	dconn *dc, *n;

	if (!d || d->stopping)
		return;
	for (dc = d->adopted; dc; dc = n) {
		n = dc->anext;
		if (dc->uid != uid || gl_http_conn_closing(dc->c))
			continue;
		sub_release(dc);
		if (dc->ws) {
			if (!dc->ws_closed)
				gl_ws_close(dc->ws, 1001);
		} else {
			stream_unlink(dc);
			gl_http_close(dc->c);
		}
	}
}

static void stopped(void *arg)
{
	gl_devlxd *d = arg;

	free(d->socket_path);
	free(d->images_dir);
	free(d);
}

void gl_devlxd_stop(gl_devlxd *d)
{
	dconn *dc, *n;

	if (!d || d->stopping)
		return;
	d->stopping = true;
	/* subscriptions go now: the model may be closed right after this */
	for (dc = d->streams; dc; dc = n) {
		n = dc->snext;
		sub_release(dc);
		if (dc->ws) {
			if (!dc->ws_closed)
				gl_ws_close(dc->ws, 1001);
		} else {
			stream_unlink(dc);
			gl_http_close(dc->c);
		}
	}
	gl_peer_free(d->peer);
	d->peer = NULL;
	gl_http_server_stop(d->srv, stopped, d);
}
