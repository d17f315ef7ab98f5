/* Control connections: the handshake, the table of requests in flight, and
 * the dispatch of frames to them (docs/control-protocol.md). */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "agent/agent.h"

struct agent_conn {
	gl_agent *agent;
	gl_fconn *fc; /* NULL once closed */
	bool authed;
	bool out_paused; /* output over the high watermark: sources paused */
	unsigned holds;  /* requests holding the input (pending disk writes) */
	uint8_t nonce[GL_AUTH_NONCE];
	agent_req *reqs; /* requests in flight */
	agent_conn *next, *prev;
};

static const gl_fconn_cbs conn_cbs;

static void conn_send_hello(agent_conn *c)
{
	char hex[GL_AUTH_NONCE * 2 + 1];
	json_t *j;

	gl_auth_nonce(c->nonce);
	gl_auth_hex(c->nonce, sizeof(c->nonce), hex);
	j = json_pack("{s:s, s:s, s:s}", "version", GUESTLINK_VERSION, "nonce", hex, "instance",
		      c->agent->instance);
	if (!j || gl_fconn_send_json(c->fc, 0, GL_FRAME_HELLO, 0, j) < 0)
		gl_fconn_close(c->fc);
	json_decref(j);
}

void agent_conn_accept(void *arg, int fd, uint32_t peer_cid)
{
	gl_agent *a = arg;
	agent_conn *c;
	int err = 0;

	/* Over AF_VSOCK only the host may drive us: not a local process
	 * (cid 1) and not a sibling guest. */
	if (a->transport.kind == GL_VSOCK_CID && peer_cid != GL_VSOCK_CID_HOST) {
		agent_log(a, 1, "refused a control connection from cid %u", peer_cid);
		close(fd);
		return;
	}
	if (a->stopping || a->nconns >= a->max_conns) {
		agent_log(a, 1, "refused a control connection: %u open (--max-conns)", a->nconns);
		close(fd);
		return;
	}
	c = calloc(1, sizeof(*c));
	if (!c) {
		close(fd);
		return;
	}
	c->agent = a;
	c->fc = gl_fconn_new(a->loop, fd, NULL, 0, NULL, &conn_cbs, c, &err);
	if (!c->fc) {
		agent_log(a, 0, "control connection: %s", strerror(-err));
		free(c);
		return;
	}
	c->next = a->conns;
	if (a->conns)
		a->conns->prev = c;
	a->conns = c;
	a->nconns++;
	gl_fconn_set_timeout(c->fc, AGENT_HANDSHAKE_MS);
	conn_send_hello(c);
	agent_log(a, 2, "control connection opened (%u open)", a->nconns);
}

void agent_conn_close_all(gl_agent *a)
{
	for (agent_conn *c = a->conns; c; c = c->next)
		if (c->fc)
			gl_fconn_close(c->fc);
}

/* ---- requests ------------------------------------------------------------ */

void agent_conn_fail(agent_conn *c, uint32_t id, int e, const char *msg)
{
	if (c->fc)
		gl_fconn_send_error(c->fc, id, e, msg ? msg : strerror(e));
}

static agent_req *req_find(agent_conn *c, uint32_t id)
{
	for (agent_req *r = c->reqs; r; r = r->next)
		if (r->id == id)
			return r;
	return NULL;
}

void agent_req_add(agent_conn *c, agent_req *r, uint32_t id, const agent_req_ops *ops)
{
	r->conn = c;
	r->agent = c->agent;
	r->id = id;
	r->ops = ops;
	r->in_flight = true;
	r->prev = NULL;
	r->next = c->reqs;
	if (c->reqs)
		c->reqs->prev = r;
	c->reqs = r;
}

static void req_unlink(agent_req *r)
{
	agent_conn *c = r->conn;

	if (!c)
		return;
	if (r->prev)
		r->prev->next = r->next;
	else
		c->reqs = r->next;
	if (r->next)
		r->next->prev = r->prev;
	r->next = r->prev = NULL;
	r->conn = NULL;
	r->in_flight = false;
}

void agent_req_done(agent_req *r)
{
	if (!r->conn)
		return;
	agent_req_hold_input(r, false);
	req_unlink(r);
}

void agent_req_free(agent_req *r)
{
	if (!r)
		return;
	agent_req_done(r);
	free(r);
}

static void conn_out_check(agent_conn *c)
{
	if (c->out_paused || !c->fc || !gl_fconn_over_high(c->fc))
		return;
	c->out_paused = true;
	for (agent_req *r = c->reqs, *next; r; r = next) {
		next = r->next;
		if (r->ops->pause_out)
			r->ops->pause_out(r, true);
	}
}

int agent_req_send(agent_req *r, uint8_t type, uint8_t flags, const void *p, size_t n)
{
	agent_conn *c = r->conn;
	int ret;

	if (!c || !c->fc)
		return -EPIPE;
	ret = gl_fconn_send(c->fc, r->id, type, flags, p, n);
	if (ret == 0)
		conn_out_check(c);
	return ret;
}

int agent_req_send_json(agent_req *r, uint8_t type, uint8_t flags, json_t *j)
{
	agent_conn *c = r->conn;
	int ret = -EPIPE;

	if (!j)
		return -ENOMEM;
	if (c && c->fc) {
		ret = gl_fconn_send_json(c->fc, r->id, type, flags, j);
		if (ret == 0)
			conn_out_check(c);
	}
	json_decref(j);
	return ret;
}

void agent_req_fail(agent_req *r, int e, const char *msg)
{
	if (r->conn && r->conn->fc)
		gl_fconn_send_error(r->conn->fc, r->id, e, msg ? msg : strerror(e));
	agent_req_done(r);
}

bool agent_req_out_full(const agent_req *r)
{
	return r->conn && r->conn->out_paused;
}

void agent_req_hold_input(agent_req *r, bool hold)
{
	agent_conn *c = r->conn;

	if (!c || r->holding == hold)
		return;
	r->holding = hold;
	if (hold) {
		if (c->holds++ == 0 && c->fc)
			gl_fconn_pause(c->fc, true);
	} else {
		if (--c->holds == 0 && c->fc)
			gl_fconn_pause(c->fc, false);
	}
}

/* ---- frames -------------------------------------------------------------- */

static void conn_auth(agent_conn *c, const gl_frame *f)
{
	gl_agent *a = c->agent;
	uint8_t sig[GL_AUTH_SIG], tok[sizeof(a->devlxd_token)];
	json_t *j, *s, *ok;
	const char *hex, *thex;
	bool good = false;

	j = gl_frame_json(f, NULL, 0);
	s = j ? json_object_get(j, "sig") : NULL;
	hex = json_string_value(s);
	if (f->type == GL_FRAME_AUTH && f->id == 0 && hex &&
	    gl_auth_unhex(hex, strlen(hex), sig, sizeof(sig)) == 0)
		good = gl_auth_verify(a->pk, c->nonce, a->instance, sig);
	/* Only the signer can have sent this frame on this connection, so
	 * the token it carries is the host's (the latest one wins). */
	thex = good ? json_string_value(json_object_get(j, "devlxd_token")) : NULL;
	if (thex && gl_auth_unhex(thex, strlen(thex), tok, sizeof(tok)) == 0) {
		memcpy(a->devlxd_token, tok, sizeof(tok));
		a->has_devlxd_token = true;
	}
	json_decref(j);
	if (!good) {
		agent_log(a, 1, "control connection: %s", f->type == GL_FRAME_AUTH ?
			  "bad signature" : "frame before authentication");
		gl_fconn_close(c->fc);
		return;
	}
	/* A nonce is good for one AUTH only. */
	memset(c->nonce, 0, sizeof(c->nonce));
	c->authed = true;
	gl_fconn_set_timeout(c->fc, 0);
	gl_fconn_set_max_payload(c->fc, GL_FRAME_MAX);
	ok = json_pack("{s:s, s:I}", "version", GUESTLINK_VERSION, "uptime_ms",
		       (json_int_t)agent_uptime_ms(a));
	if (!ok || gl_fconn_send_json(c->fc, 0, GL_FRAME_AUTH_OK, 0, ok) < 0)
		gl_fconn_close(c->fc);
	json_decref(ok);
	agent_log(a, 2, "control connection authenticated");
}

static void op_ping(agent_conn *c, uint32_t id)
{
	struct timespec ts;
	json_t *j;

	clock_gettime(CLOCK_REALTIME, &ts);
	j = json_pack("{s:s, s:I, s:I}", "version", GUESTLINK_VERSION, "uptime_ms",
		      (json_int_t)agent_uptime_ms(c->agent), "time_ns",
		      (json_int_t)ts.tv_sec * 1000000000 + ts.tv_nsec);
	if (j)
		gl_fconn_send_json(c->fc, id, GL_FRAME_RESPONSE, GL_FRAME_END, j);
	else
		gl_fconn_send_error(c->fc, id, ENOMEM, "out of memory");
	json_decref(j);
	conn_out_check(c);
}

static void conn_request(agent_conn *c, const gl_frame *f)
{
	char why[128];
	const char *op;
	json_t *j;

	if (f->id == 0) {
		/* id 0 belongs to the connection: a request there is a broken peer. */
		gl_fconn_send_error(c->fc, 0, EPROTO, "request id 0");
		gl_fconn_close_flushed(c->fc);
		return;
	}
	if (req_find(c, f->id)) {
		gl_fconn_send_error(c->fc, f->id, EBUSY, "request id already in flight");
		return;
	}
	j = gl_frame_json(f, why, sizeof(why));
	if (!j) {
		gl_fconn_send_error(c->fc, f->id, EINVAL, why);
		return;
	}
	op = json_string_value(json_object_get(j, "op"));
	if (!op)
		gl_fconn_send_error(c->fc, f->id, EINVAL, "missing \"op\"");
	else if (!strcmp(op, "ping"))
		op_ping(c, f->id);
	else if (!strcmp(op, "exec"))
		agent_op_exec(c, f->id, j);
	else if (!strcmp(op, "read"))
		agent_op_read(c, f->id, j);
	else if (!strcmp(op, "write"))
		agent_op_write(c, f->id, j);
	else if (!strcmp(op, "stat"))
		agent_op_stat(c, f->id, j);
	else if (!strcmp(op, "list"))
		agent_op_list(c, f->id, j);
	else
		gl_fconn_send_error(c->fc, f->id, EINVAL, "unknown op");
	json_decref(j);
}

static void conn_cancel(agent_conn *c, const gl_frame *f)
{
	agent_req *r = req_find(c, f->id);
	json_t *j, *s;
	int sig = 0;

	if (!r || !r->ops->cancel)
		return;
	if (f->len > 0) {
		j = gl_frame_json(f, NULL, 0);
		s = j ? json_object_get(j, "signal") : NULL;
		if (json_is_integer(s) && json_integer_value(s) > 0 && json_integer_value(s) < 65)
			sig = (int)json_integer_value(s);
		json_decref(j);
	}
	r->ops->cancel(r, sig);
}

static void conn_frame(gl_fconn *fc, const gl_frame *f, void *arg)
{
	agent_conn *c = arg;
	agent_req *r;

	if (!c->authed) {
		conn_auth(c, f);
		return;
	}
	switch (f->type) {
	case GL_FRAME_REQUEST:
		conn_request(c, f);
		break;
	case GL_FRAME_DATA:
		r = req_find(c, f->id);
		if (r && r->ops->data)
			r->ops->data(r, f);
		break;
	case GL_FRAME_CANCEL:
		conn_cancel(c, f);
		break;
	default:
		/* Unknown types, and types only the agent sends: skipped. */
		break;
	}
}

static void conn_drain(gl_fconn *fc, void *arg)
{
	agent_conn *c = arg;

	if (!c->out_paused)
		return;
	c->out_paused = false;
	for (agent_req *r = c->reqs, *next; r; r = next) {
		next = r->next;
		if (r->ops->pause_out)
			r->ops->pause_out(r, false);
		/* A resumed source may have filled the queue again at once. */
		if (c->out_paused)
			break;
	}
}

static void conn_closed(gl_fconn *fc, int err, void *arg)
{
	agent_conn *c = arg;
	gl_agent *a = c->agent;
	agent_req *r;

	agent_log(a, 2, "control connection closed: %s", err ? strerror(-err) : "by us");
	c->fc = NULL;
	while ((r = c->reqs)) {
		req_unlink(r);
		if (r->ops->abort)
			r->ops->abort(r);
		else
			free(r);
	}
	if (c->prev)
		c->prev->next = c->next;
	else
		a->conns = c->next;
	if (c->next)
		c->next->prev = c->prev;
	a->nconns--;
	free(c);
}

static const gl_fconn_cbs conn_cbs = {
	.frame = conn_frame,
	.drain = conn_drain,
	.closed = conn_closed,
};
