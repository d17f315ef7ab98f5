/* The control socket (see ctl.h).
 *
 * The listening socket is our own (accept4 under a uv_poll), so that each
 * accepted descriptor goes straight to gl_fconn_new after the SO_PEERCRED
 * check. A connection is either a plain one (local requests, many at once)
 * or, from its first agent operation on, a relay of that one operation:
 * its frames then go to the agent link unread, and the agent's come back
 * the same way. */
#include "bridge/ctl.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "bridge/fconn.h"
#include "bridge/frame.h"

#define ACCEPT_BUDGET 64 /* connections accepted per wake-up */

typedef struct cconn cconn;
typedef struct cwait cwait;

struct gl_ctl {
	uv_loop_t *loop;
	gl_model *m;
	gl_vm *vm;
	char *path;
	int lfd;
	uv_poll_t poll;
	cconn *conns;
	cwait *waits;
	unsigned open; /* the poll handle, connections and wait timers not yet gone */
	bool stopping, observing;
};

enum wkind { W_READY, W_AGENT };

struct cwait {
	uv_timer_t timer; /* first: handle -> wait */
	gl_ctl *ctl;
	cconn *cc; /* NULL once answered */
	cwait *prev, *next;
	uint32_t id;
	uint64_t uid;
	enum wkind kind;
	char *name;
};

enum rstate { R_NONE, R_DIALING, R_LINKED, R_OVER };

struct cconn {
	gl_ctl *ctl;
	gl_fconn *fc;
	cconn *prev, *next;
	/* the relay */
	enum rstate rs;
	gl_vm_link *vl;
	gl_fconn *agent;
	uint32_t rid;
	uint8_t rflags;
	char *rname;
	gl_buf rreq;    /* the REQUEST payload, forwarded unchanged */
	gl_buf pending; /* frames from the CLI before the link was up */
	bool done;      /* the agent's last frame of the request passed */
};

static void cc_end_relay(cconn *cc);

/* ---- small helpers ----------------------------------------------------------------- */

static void send_err(cconn *cc, uint32_t id, int e, const char *fmt, ...)
	__attribute__((format(printf, 4, 5)));

static void send_err(cconn *cc, uint32_t id, int e, const char *fmt, ...)
{
	char msg[512];
	va_list ap;

	if (!cc->fc || gl_fconn_closing(cc->fc))
		return;
	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	gl_fconn_send_error(cc->fc, id, e, msg);
}

static void send_json_end(cconn *cc, uint32_t id, json_t *j)
{
	if (!j) {
		send_err(cc, id, ENOMEM, "out of memory");
		return;
	}
	if (cc->fc && !gl_fconn_closing(cc->fc))
		gl_fconn_send_json(cc->fc, id, GL_FRAME_RESPONSE, GL_FRAME_END, j);
	json_decref(j);
}

static void noop_frame(gl_fconn *c, const gl_frame *f, void *arg)
{
}

static void noop_closed(gl_fconn *c, int err, void *arg)
{
}

static const gl_fconn_cbs noop_cbs = {.frame = noop_frame, .closed = noop_closed};

static void maybe_free(gl_ctl *ctl)
{
	if (ctl->stopping && !ctl->open) {
		free(ctl->path);
		free(ctl);
	}
}

/* ---- waits ------------------------------------------------------------------------- */

static void wait_freed(uv_handle_t *h)
{
	cwait *w = (cwait *)h;
	gl_ctl *ctl = w->ctl;

	free(w->name);
	free(w);
	ctl->open--;
	maybe_free(ctl);
}

/* Forget the wait (it was answered, or its connection is gone). */
static void wait_end(cwait *w)
{
	gl_ctl *ctl = w->ctl;

	if (w->prev)
		w->prev->next = w->next;
	else
		ctl->waits = w->next;
	if (w->next)
		w->next->prev = w->prev;
	w->cc = NULL;
	uv_timer_stop(&w->timer);
	uv_close((uv_handle_t *)&w->timer, wait_freed);
}

static bool wait_met(gl_ctl *ctl, enum wkind k, gl_instance *i)
{
	gl_buf b = GL_BUF_INIT;
	gl_vm_agent_info info;
	bool met;

	if (k == W_AGENT)
		return gl_vm_agent_info_get(ctl->vm, gl_instance_uid(i), &info) == 0 && info.online;
	met = gl_instance_attr(i, GL_ATTR_STATE, &b) == 0 && b.data && !strcmp(b.data, "Ready");
	gl_buf_free(&b);
	return met;
}

static void on_wait_timeout(uv_timer_t *t)
{
	cwait *w = (cwait *)t;

	if (w->cc)
		send_err(w->cc, w->id, ETIMEDOUT, "timed out waiting for %s to be %s", w->name,
			 w->kind == W_READY ? "ready" : "reachable (agent)");
	wait_end(w);
}

static void on_change(void *arg, const gl_change *c)
{
	gl_ctl *ctl = arg;
	cwait *w, *n;
	uint64_t uid;

	if (c->kind != GL_CHANGE_INSTANCE_REMOVED &&
	    !(c->kind == GL_CHANGE_ATTR && (c->attr == GL_ATTR_STATE || c->attr == GL_ATTR_AGENT)))
		return;
	uid = gl_instance_uid(c->inst);
	for (w = ctl->waits; w; w = n) {
		n = w->next;
		if (w->uid != uid)
			continue;
		if (c->kind == GL_CHANGE_INSTANCE_REMOVED) {
			send_err(w->cc, w->id, ENOENT, "%s was removed", w->name);
		} else if (wait_met(ctl, w->kind, c->inst)) {
			send_json_end(w->cc, w->id, json_object());
		} else {
			continue;
		}
		wait_end(w);
	}
}

static void op_wait(cconn *cc, uint32_t id, gl_instance *i, json_t *req)
{
	gl_ctl *ctl = cc->ctl;
	const char *what = json_string_value(json_object_get(req, "for"));
	json_t *jt = json_object_get(req, "timeout_ms");
	enum wkind k;
	json_int_t t = 0;
	cwait *w;

	if (!what || (strcmp(what, "ready") && strcmp(what, "agent"))) {
		send_err(cc, id, EINVAL, "wait: \"for\" must be \"ready\" or \"agent\"");
		return;
	}
	if (jt && (!json_is_integer(jt) || (t = json_integer_value(jt)) < 0)) {
		send_err(cc, id, EINVAL, "wait: bad timeout_ms");
		return;
	}
	k = what[0] == 'r' ? W_READY : W_AGENT;
	if (k == W_AGENT && !gl_instance_is_vm(i)) {
		send_err(cc, id, EINVAL, "%s is not a virtual machine", gl_instance_name(i));
		return;
	}
	if (wait_met(ctl, k, i)) {
		send_json_end(cc, id, json_object());
		return;
	}
	for (w = ctl->waits; w; w = w->next) {
		if (w->cc == cc && w->id == id) {
			send_err(cc, id, EINVAL, "request id %" PRIu32 " is already in flight", id);
			return;
		}
	}
	w = calloc(1, sizeof(*w));
	if (!w || !(w->name = strdup(gl_instance_name(i)))) {
		free(w);
		send_err(cc, id, ENOMEM, "out of memory");
		return;
	}
	w->ctl = ctl;
	w->cc = cc;
	w->id = id;
	w->uid = gl_instance_uid(i);
	w->kind = k;
	uv_timer_init(ctl->loop, &w->timer);
	ctl->open++;
	w->next = ctl->waits;
	if (ctl->waits)
		ctl->waits->prev = w;
	ctl->waits = w;
	if (t > 0)
		uv_timer_start(&w->timer, on_wait_timeout, (uint64_t)t, 0);
}

static void op_status(cconn *cc, uint32_t id, gl_instance *i)
{
	gl_vm_agent_info info;

	if (gl_vm_agent_info_get(cc->ctl->vm, gl_instance_uid(i), &info) < 0) {
		send_err(cc, id, EINVAL, "%s is not a VM with a vsock transport",
			 gl_instance_name(i));
		return;
	}
	send_json_end(cc, id,
		      json_pack("{s:b, s:s, s:I, s:I}", "online", info.online, "version",
				info.version, "last_ping_ns", (json_int_t)info.last_ping_ns,
				"rtt_us", (json_int_t)info.rtt_us));
}

/* ---- relays ------------------------------------------------------------------------ */

static void relay_finish(cconn *cc)
{
	/* the link and its slot go now; the CLI gets what is queued */
	cc_end_relay(cc);
	if (cc->fc)
		gl_fconn_close_flushed(cc->fc);
}

static void agent_frame(gl_fconn *c, const gl_frame *f, void *arg)
{
	cconn *cc = arg;

	if (f->type == GL_FRAME_ERROR && f->id == 0) {
		/* the agent ends the connection: as good as lost */
		send_err(cc, cc->rid, ECONNRESET, "agent of %s: connection lost", cc->rname);
		relay_finish(cc);
		return;
	}
	if (gl_fconn_send(cc->fc, f->id, f->type, f->flags, f->payload, f->len) < 0) {
		relay_finish(cc);
		return;
	}
	if (f->id == cc->rid && (f->type == GL_FRAME_ERROR || (f->flags & GL_FRAME_END))) {
		cc->done = true;
		relay_finish(cc);
		return;
	}
	if (gl_fconn_over_high(cc->fc))
		gl_fconn_pause(c, true);
}

static void agent_drain(gl_fconn *c, void *arg)
{
	cconn *cc = arg;

	if (cc->fc && cc->rs == R_LINKED)
		gl_fconn_pause(cc->fc, false);
}

static void agent_closed(gl_fconn *c, int err, void *arg)
{
	cconn *cc = arg;

	if (cc->agent != c)
		return;
	cc->agent = NULL;
	if (!cc->done)
		send_err(cc, cc->rid, ECONNRESET, "agent of %s: connection lost", cc->rname);
	relay_finish(cc);
}

static const gl_fconn_cbs agent_cbs = {
	.frame = agent_frame,
	.drain = agent_drain,
	.closed = agent_closed,
};

/* Frames the CLI sent while the link was being made, in order. */
static int flush_pending(cconn *cc)
{
	size_t off = 0;

	while (off + GL_FRAME_HDR <= cc->pending.len) {
		const uint8_t *h = (const uint8_t *)cc->pending.data + off;
		uint32_t len = (uint32_t)h[0] << 24 | (uint32_t)h[1] << 16 | (uint32_t)h[2] << 8 | h[3];
		uint32_t id = (uint32_t)h[4] << 24 | (uint32_t)h[5] << 16 | (uint32_t)h[6] << 8 | h[7];
		int r = gl_fconn_send(cc->agent, id, h[8], h[9], h + GL_FRAME_HDR, len);

		if (r < 0)
			return r;
		off += GL_FRAME_HDR + len;
	}
	gl_buf_free(&cc->pending);
	return 0;
}

static void on_link(void *arg, int status, gl_fconn *c)
{
	cconn *cc = arg;

	if (status == 0 && c) {
		gl_fconn_rebind(c, &agent_cbs, cc);
		cc->agent = c;
		cc->rs = R_LINKED;
		if (gl_fconn_send(c, cc->rid, GL_FRAME_REQUEST, cc->rflags, cc->rreq.data,
				  cc->rreq.len) < 0 ||
		    flush_pending(cc) < 0) {
			send_err(cc, cc->rid, ECONNRESET, "agent of %s: connection lost", cc->rname);
			relay_finish(cc);
			return;
		}
		gl_buf_free(&cc->rreq);
		if (!gl_fconn_over_high(c))
			gl_fconn_pause(cc->fc, false);
		return;
	}
	if (cc->rs == R_LINKED) {
		/* the VM went away under the relay */
		if (status == -ENOENT)
			send_err(cc, cc->rid, ENOENT, "%s was removed", cc->rname);
		else
			send_err(cc, cc->rid, ECONNRESET, "agent of %s: connection lost",
				 cc->rname);
		relay_finish(cc);
		return;
	}
	if (status == -ENOENT)
		send_err(cc, cc->rid, ENOENT, "%s was removed", cc->rname);
	else if (status == -ECONNRESET)
		send_err(cc, cc->rid, ECONNRESET, "agent of %s: connection lost", cc->rname);
	else
		send_err(cc, cc->rid, EHOSTUNREACH, "agent of %s is not reachable", cc->rname);
	gl_vm_link_release(cc->vl);
	cc->vl = NULL;
	/* the connection is a plain one again; frames it sent for the
	 * request are for an id no longer in flight and are dropped */
	gl_buf_free(&cc->rreq);
	gl_buf_free(&cc->pending);
	free(cc->rname);
	cc->rname = NULL;
	cc->rs = R_NONE;
	gl_fconn_pause(cc->fc, false);
}

static void op_agent(cconn *cc, const gl_frame *f, gl_instance *i)
{
	int r;

	if (gl_buf_add(&cc->rreq, f->payload, f->len) < 0 ||
	    !(cc->rname = strdup(gl_instance_name(i)))) {
		gl_buf_free(&cc->rreq);
		send_err(cc, f->id, ENOMEM, "out of memory");
		return;
	}
	r = gl_vm_link_open(cc->ctl->vm, gl_instance_uid(i), on_link, cc, &cc->vl);
	if (r < 0) {
		gl_buf_free(&cc->rreq);
		free(cc->rname);
		cc->rname = NULL;
		if (r == -EINVAL)
			send_err(cc, f->id, EINVAL, "%s is not a VM with a vsock transport",
				 gl_instance_name(i));
		else
			send_err(cc, f->id, -r, "%s", strerror(-r));
		return;
	}
	cc->rid = f->id;
	cc->rflags = f->flags;
	cc->rs = R_DIALING;
	/* the rest of the stream (stdin, file data) waits in the socket */
	gl_fconn_pause(cc->fc, true);
}

static void cc_end_relay(cconn *cc)
{
	if (cc->agent) {
		gl_fconn_rebind(cc->agent, &noop_cbs, NULL);
		gl_fconn_close(cc->agent);
		cc->agent = NULL;
	}
	if (cc->vl) {
		gl_vm_link_release(cc->vl);
		cc->vl = NULL;
	}
	cc->rs = R_OVER;
}

/* ---- the CLI's side ---------------------------------------------------------------- */

static bool is_agent_op(const char *op)
{
	static const char *const ops[] = {"ping", "exec", "read", "write", "stat", "list"};

	for (size_t k = 0; k < sizeof(ops) / sizeof(ops[0]); k++)
		if (!strcmp(op, ops[k]))
			return true;
	return false;
}

static void on_request(cconn *cc, const gl_frame *f)
{
	char why[128] = "";
	json_t *req = gl_frame_json(f, why, sizeof(why));
	const char *op, *name;
	gl_instance *i;

	if (f->id == 0) {
		send_err(cc, 0, EINVAL, "request id 0");
		goto out;
	}
	if (!req) {
		send_err(cc, f->id, EINVAL, "bad request: %s", why[0] ? why : "not a JSON object");
		goto out;
	}
	op = json_string_value(json_object_get(req, "op"));
	name = json_string_value(json_object_get(req, "instance"));
	if (!op) {
		send_err(cc, f->id, EINVAL, "bad request: no \"op\"");
		goto out;
	}
	if (strcmp(op, "wait") && strcmp(op, "status") && !is_agent_op(op)) {
		send_err(cc, f->id, EINVAL, "unknown op \"%s\"", op);
		goto out;
	}
	if (!name) {
		send_err(cc, f->id, EINVAL, "bad request: no \"instance\"");
		goto out;
	}
	i = gl_model_find(cc->ctl->m, name);
	if (!i) {
		send_err(cc, f->id, ENOENT, "no instance %s", name);
		goto out;
	}
	if (!strcmp(op, "wait"))
		op_wait(cc, f->id, i, req);
	else if (!strcmp(op, "status"))
		op_status(cc, f->id, i);
	else
		op_agent(cc, f, i);
out:
	json_decref(req);
}

static void cli_frame(gl_fconn *c, const gl_frame *f, void *arg)
{
	cconn *cc = arg;

	switch (cc->rs) {
	case R_LINKED:
		if (gl_fconn_send(cc->agent, f->id, f->type, f->flags, f->payload, f->len) < 0) {
			send_err(cc, cc->rid, ECONNRESET, "agent of %s: connection lost", cc->rname);
			relay_finish(cc);
			return;
		}
		if (gl_fconn_over_high(cc->agent))
			gl_fconn_pause(c, true);
		return;
	case R_DIALING:
		/* delivered before the pause took hold: kept for the link */
		if (gl_frame_append(&cc->pending, f->id, f->type, f->flags, f->payload, f->len) < 0) {
			send_err(cc, cc->rid, ENOMEM, "out of memory");
			cc_end_relay(cc);
			gl_fconn_close_flushed(c);
		}
		return;
	case R_OVER:
		return;
	case R_NONE:
		break;
	}
	if (f->type == GL_FRAME_REQUEST) {
		on_request(cc, f);
	} else if (f->type == GL_FRAME_CANCEL) {
		for (cwait *w = cc->ctl->waits; w; w = w->next) {
			if (w->cc == cc && w->id == f->id) {
				send_err(cc, f->id, ECANCELED, "cancelled");
				wait_end(w);
				break;
			}
		}
	}
	/* anything else is for no request in flight here: dropped */
}

static void cli_drain(gl_fconn *c, void *arg)
{
	cconn *cc = arg;

	if (cc->agent)
		gl_fconn_pause(cc->agent, false);
}

static void cli_closed(gl_fconn *c, int err, void *arg)
{
	cconn *cc = arg;
	gl_ctl *ctl = cc->ctl;
	cwait *w, *n;

	cc->fc = NULL;
	for (w = ctl->waits; w; w = n) {
		n = w->next;
		if (w->cc == cc)
			wait_end(w);
	}
	cc_end_relay(cc);
	if (cc->prev)
		cc->prev->next = cc->next;
	else
		ctl->conns = cc->next;
	if (cc->next)
		cc->next->prev = cc->prev;
	gl_buf_free(&cc->rreq);
	gl_buf_free(&cc->pending);
	free(cc->rname);
	free(cc);
	ctl->open--;
	maybe_free(ctl);
}

static const gl_fconn_cbs cli_cbs = {
	.frame = cli_frame,
	.drain = cli_drain,
	.closed = cli_closed,
};

/* ---- accepting ------------------------------------------------------------------------ */

static void accept_one(gl_ctl *ctl, int fd)
{
	struct ucred cr;
	socklen_t len = sizeof(cr);
	gl_fconn_opts fo;
	cconn *cc;
	int e;

	if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cr, &len) < 0 || cr.uid != 0) {
		/* root only, whatever the file's mode says */
		close(fd);
		return;
	}
	cc = calloc(1, sizeof(*cc));
	if (!cc) {
		close(fd);
		return;
	}
	cc->ctl = ctl;
	gl_fconn_opts_default(&fo);
	fo.max_payload = GL_FRAME_MAX;
	cc->fc = gl_fconn_new(ctl->loop, fd, NULL, 0, &fo, &cli_cbs, cc, &e);
	if (!cc->fc) {
		free(cc);
		return;
	}
	cc->next = ctl->conns;
	if (ctl->conns)
		ctl->conns->prev = cc;
	ctl->conns = cc;
	ctl->open++;
}

static void on_listen(uv_poll_t *p, int status, int events)
{
	gl_ctl *ctl = p->data;

	for (int k = 0; k < ACCEPT_BUDGET && !ctl->stopping; k++) {
		int fd = accept4(ctl->lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);

		if (fd < 0)
			return; /* EAGAIN, or a connection that died in the backlog */
		accept_one(ctl, fd);
	}
}

/* mkdir -p of path's directory. 0 or -errno. */
static int make_parents(const char *path)
{
	char dir[PATH_MAX];
	size_t n = strlen(path);

	if (n >= sizeof(dir))
		return -ENAMETOOLONG;
	memcpy(dir, path, n + 1);
	for (size_t k = 1; k < n; k++) {
		if (dir[k] != '/')
			continue;
		dir[k] = '\0';
		if (mkdir(dir, 0755) < 0 && errno != EEXIST)
			return -errno;
		dir[k] = '/';
	}
	return 0;
}

static int open_listener(const char *path, char *err, size_t errlen)
{
	struct sockaddr_un sa = {.sun_family = AF_UNIX};
	struct stat st;
	mode_t old;
	int fd, r;

	if (strlen(path) >= sizeof(sa.sun_path)) {
		snprintf(err, errlen, "control socket path too long: %s", path);
		return -ENAMETOOLONG;
	}
	strcpy(sa.sun_path, path);
	r = make_parents(path);
	if (r < 0) {
		snprintf(err, errlen, "cannot create the directory of %s: %s", path, strerror(-r));
		return r;
	}
	if (lstat(path, &st) == 0) {
		int probe;
		bool live;

		if (!S_ISSOCK(st.st_mode)) {
			snprintf(err, errlen, "%s exists and is not a socket", path);
			return -EEXIST;
		}
		/* non-blocking: a full backlog (EAGAIN) is a live server too */
		probe = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
		live = probe >= 0 && (connect(probe, (struct sockaddr *)&sa, sizeof(sa)) == 0 ||
				      errno == EAGAIN);
		if (probe >= 0)
			close(probe);
		if (live) {
			snprintf(err, errlen,
				 "control socket %s is in use: another guestlinkd runs with it "
				 "(use --control-socket PATH or none)", path);
			return -EADDRINUSE;
		}
		unlink(path); /* stale: nobody accepts */
	}
	fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (fd < 0) {
		r = -errno;
		snprintf(err, errlen, "socket: %s", strerror(errno));
		return r;
	}
	/* never reachable by others, not even between bind and chmod */
	old = umask(0177);
	r = bind(fd, (struct sockaddr *)&sa, sizeof(sa));
	umask(old);
	if (r < 0 || chmod(path, 0600) < 0 || listen(fd, 128) < 0) {
		r = -errno;
		snprintf(err, errlen, "cannot listen on %s: %s", path, strerror(errno));
		close(fd);
		unlink(path);
		return r;
	}
	return fd;
}

int gl_ctl_start(uv_loop_t *loop, gl_model *m, gl_vm *vm, const char *path, gl_ctl **out,
		 char *err, size_t errlen)
{
	gl_ctl *ctl = calloc(1, sizeof(*ctl));
	int r;

	if (!ctl || !(ctl->path = strdup(path))) {
		free(ctl);
		snprintf(err, errlen, "out of memory");
		return -ENOMEM;
	}
	ctl->loop = loop;
	ctl->m = m;
	ctl->vm = vm;
	r = open_listener(path, err, errlen);
	if (r < 0)
		goto fail;
	ctl->lfd = r;
	r = gl_model_observe(m, on_change, ctl);
	if (r < 0) {
		snprintf(err, errlen, "out of memory");
		goto fail_fd;
	}
	ctl->observing = true;
	r = uv_poll_init(loop, &ctl->poll, ctl->lfd);
	if (r < 0) {
		snprintf(err, errlen, "uv_poll_init: %s", uv_strerror(r));
		goto fail_obs;
	}
	ctl->poll.data = ctl;
	ctl->open = 1;
	r = uv_poll_start(&ctl->poll, UV_READABLE, on_listen);
	if (r < 0) {
		/* the handle exists now: it is closed the normal way */
		snprintf(err, errlen, "uv_poll_start: %s", uv_strerror(r));
		gl_ctl_stop(ctl);
		return r;
	}
	*out = ctl;
	return 0;
fail_obs:
	gl_model_unobserve(m, on_change, ctl);
fail_fd:
	close(ctl->lfd);
	unlink(path);
fail:
	free(ctl->path);
	free(ctl);
	return r;
}

static void poll_closed(uv_handle_t *h)
{
	gl_ctl *ctl = h->data;

	close(ctl->lfd);
	ctl->open--;
	maybe_free(ctl);
}

void gl_ctl_stop(gl_ctl *ctl)
{
	cconn *cc;

	if (!ctl || ctl->stopping)
		return;
	ctl->stopping = true;
	if (ctl->observing)
		gl_model_unobserve(ctl->m, on_change, ctl);
	unlink(ctl->path);
	/* whoever waits is told why the answer will never come */
	while (ctl->waits) {
		if (ctl->waits->cc)
			send_err(ctl->waits->cc, ctl->waits->id, ESHUTDOWN, "guestlinkd is stopping");
		wait_end(ctl->waits);
	}
	for (cc = ctl->conns; cc; cc = cc->next) {
		if (cc->rs == R_DIALING || cc->rs == R_LINKED)
			send_err(cc, cc->rid, ESHUTDOWN, "guestlinkd is stopping");
		cc_end_relay(cc);
		if (cc->fc)
			gl_fconn_close_flushed(cc->fc);
	}
	uv_poll_stop(&ctl->poll);
	uv_close((uv_handle_t *)&ctl->poll, poll_closed);
}
