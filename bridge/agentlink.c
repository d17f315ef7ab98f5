/* The host's side of the agent handshake (bridge/agentlink.h). */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <sodium.h>

#include "bridge/agentlink.h"

#ifndef GUESTLINK_VERSION
#define GUESTLINK_VERSION "0.2.0"
#endif

#define DEFAULT_HANDSHAKE_MS 5000

enum link_state {
	LS_DIALING,
	LS_WAIT_HELLO,
	LS_WAIT_AUTH_OK,
};

struct gl_agentlink {
	uv_loop_t *loop;
	enum link_state state;
	gl_vsock_dial *dial; /* LS_DIALING */
	gl_fconn *c;         /* from the handshake on */
	gl_agentlink_cb cb;
	void *arg;
	int status;     /* the failure to report once c is closed */
	bool cancelled; /* no callback */
	bool in_cb;
	uint64_t handshake_ms;
	uint64_t deadline; /* uv_now() at which the handshake is over */
	uint64_t auth_sent_ns;
	char instance[GL_AUTH_INSTANCE_MAX + 1];
	uint8_t sk[GL_AUTH_SK];
	uint8_t token[GL_AGENTLINK_TOKEN];
	bool has_token;
	gl_agent_hello hello;
};

static const gl_fconn_cbs link_cbs;

static void link_free(gl_agentlink *l)
{
	sodium_memzero(l->sk, sizeof(l->sk));
	sodium_memzero(l->token, sizeof(l->token));
	free(l);
}

/* Report and forget the link (from a loop callback). */
static void finish(gl_agentlink *l, int status, gl_fconn *c)
{
	if (!l->cancelled) {
		l->in_cb = true;
		l->cb(l->arg, status, c, &l->hello);
	}
	link_free(l);
}

/* Fail the handshake: close the connection; `closed` reports status. */
static void fail(gl_agentlink *l, int status)
{
	if (!l->status)
		l->status = status;
	gl_fconn_close(l->c);
}

static const char *json_str(json_t *j, const char *key)
{
	return json_string_value(json_object_get(j, key));
}

static void on_hello(gl_agentlink *l, const gl_frame *f)
{
	uint8_t nonce[GL_AUTH_NONCE], sig[GL_AUTH_SIG];
	char sighex[2 * GL_AUTH_SIG + 1], tokhex[2 * GL_AGENTLINK_TOKEN + 1];
	const char *nonce_hex, *inst, *ver;
	json_t *j, *auth;
	uint64_t now;
	int r;

	j = gl_frame_json(f, NULL, 0);
	if (!j) {
		fail(l, -EPROTO);
		return;
	}
	nonce_hex = json_str(j, "nonce");
	inst = json_object_get(j, "instance") ? json_str(j, "instance") : "";
	ver = json_str(j, "version");
	if (!nonce_hex || !inst ||
	    gl_auth_unhex(nonce_hex, strlen(nonce_hex), nonce, sizeof(nonce)) < 0 ||
	    strlen(inst) > GL_AUTH_INSTANCE_MAX) {
		json_decref(j);
		fail(l, -EPROTO);
		return;
	}
	/* An agent provisioned for another VM answers at this address: never
	 * sign for it. */
	if (inst[0] && strcmp(inst, l->instance) != 0) {
		json_decref(j);
		fail(l, -EPERM);
		return;
	}
	if (ver)
		snprintf(l->hello.version, sizeof(l->hello.version), "%s", ver);

	gl_auth_sign(l->sk, nonce, inst, sig);
	json_decref(j);
	gl_auth_hex(sig, sizeof(sig), sighex);
	auth = json_pack("{s:s, s:s}", "version", GUESTLINK_VERSION, "sig", sighex);
	if (auth && l->has_token) {
		gl_auth_hex(l->token, sizeof(l->token), tokhex);
		if (json_object_set_new(auth, "devlxd_token", json_string(tokhex)) < 0) {
			json_decref(auth);
			auth = NULL;
		}
		sodium_memzero(tokhex, sizeof(tokhex));
	}
	if (!auth) {
		fail(l, -ENOMEM);
		return;
	}
	l->auth_sent_ns = uv_hrtime();
	r = gl_fconn_send_json(l->c, 0, GL_FRAME_AUTH, 0, auth);
	json_decref(auth);
	if (r < 0) {
		fail(l, r);
		return;
	}
	l->state = LS_WAIT_AUTH_OK;
	/* The frame re-armed the timer; keep the handshake's overall deadline. */
	now = uv_now(l->loop);
	gl_fconn_set_timeout(l->c, l->deadline > now ? l->deadline - now : 1);
}

static void drop_frame(gl_fconn *c, const gl_frame *f, void *arg)
{
}

static const gl_fconn_cbs idle_cbs = {
	.frame = drop_frame,
};

static void on_auth_ok(gl_agentlink *l, const gl_frame *f)
{
	json_t *j, *up;
	const char *ver;
	gl_fconn *c = l->c;

	l->hello.rtt_us = (uv_hrtime() - l->auth_sent_ns) / 1000;
	j = gl_frame_json(f, NULL, 0);
	if (!j) {
		fail(l, -EPROTO);
		return;
	}
	ver = json_str(j, "version");
	if (ver)
		snprintf(l->hello.version, sizeof(l->hello.version), "%s", ver);
	up = json_object_get(j, "uptime_ms");
	if (json_is_integer(up) && json_integer_value(up) > 0)
		l->hello.uptime_ms = (uint64_t)json_integer_value(up);
	json_decref(j);

	gl_fconn_set_timeout(c, 0);
	gl_fconn_set_max_payload(c, GL_FRAME_MAX);
	/* Until the user rebinds, frames are dropped and the link (about to
	 * be freed) hears nothing more. */
	gl_fconn_rebind(c, &idle_cbs, NULL);
	finish(l, 0, c);
}

static void link_frame(gl_fconn *c, const gl_frame *f, void *arg)
{
	gl_agentlink *l = arg;

	/* Unknown types are skipped (version skew); known ones out of place
	 * end the handshake. */
	if (f->type < GL_FRAME_HELLO || f->type > GL_FRAME_ERROR)
		return;
	if (l->state == LS_WAIT_HELLO && f->type == GL_FRAME_HELLO && f->id == 0)
		on_hello(l, f);
	else if (l->state == LS_WAIT_AUTH_OK && f->type == GL_FRAME_AUTH_OK && f->id == 0)
		on_auth_ok(l, f);
	else
		fail(l, -EPROTO);
}

static void link_closed(gl_fconn *c, int err, void *arg)
{
	gl_agentlink *l = arg;
	int status = l->status;

	if (!status) {
		status = err ? err : -ECONNRESET;
		/* Closing after our AUTH is how an agent says it does not trust
		 * our key (it closes without a word). */
		if (l->state == LS_WAIT_AUTH_OK && (err == -EPIPE || err == -ECONNRESET))
			status = -EPERM;
		else if (l->state == LS_WAIT_HELLO && err == -EPIPE)
			status = -ECONNRESET;
	}
	finish(l, status, NULL);
}

static const gl_fconn_cbs link_cbs = {
	.frame = link_frame,
	.closed = link_closed,
};

static int handshake(gl_agentlink *l, int fd)
{
	gl_fconn_opts fo;
	int err = 0;

	gl_fconn_opts_default(&fo);
	fo.max_payload = GL_FRAME_MAX_AUTH;
	l->c = gl_fconn_new(l->loop, fd, NULL, 0, &fo, &link_cbs, l, &err);
	if (!l->c)
		return err;
	l->state = LS_WAIT_HELLO;
	l->deadline = uv_now(l->loop) + l->handshake_ms;
	gl_fconn_set_timeout(l->c, l->handshake_ms);
	return 0;
}

static int link_new(uv_loop_t *loop, const gl_agentlink_opts *o, gl_agentlink_cb cb, void *arg,
		    gl_agentlink **out)
{
	gl_agentlink *l;
	const char *inst = o->instance_id ? o->instance_id : "";

	if (!o->sk || !cb || strlen(inst) > GL_AUTH_INSTANCE_MAX)
		return -EINVAL;
	if (gl_auth_init() < 0)
		return -EIO;
	l = calloc(1, sizeof(*l));
	if (!l)
		return -ENOMEM;
	l->loop = loop;
	l->cb = cb;
	l->arg = arg;
	l->handshake_ms = o->handshake_ms ? o->handshake_ms : DEFAULT_HANDSHAKE_MS;
	memcpy(l->instance, inst, strlen(inst) + 1);
	memcpy(l->sk, o->sk, GL_AUTH_SK);
	if (o->devlxd_token) {
		memcpy(l->token, o->devlxd_token, GL_AGENTLINK_TOKEN);
		l->has_token = true;
	}
	*out = l;
	return 0;
}

static void on_dial(void *arg, int status, int fd)
{
	gl_agentlink *l = arg;
	int r;

	l->dial = NULL;
	if (status < 0) {
		finish(l, status, NULL);
		return;
	}
	r = handshake(l, fd);
	if (r < 0)
		finish(l, r, NULL);
}

int gl_agentlink_start(uv_loop_t *loop, const gl_vsock_addr *to, const gl_agentlink_opts *o,
		       gl_agentlink_cb cb, void *arg, gl_agentlink **out)
{
	static const gl_vsock_dial_opts zero;
	gl_vsock_dial_opts dopts = o->dial;
	gl_agentlink *l;
	int r;

	r = link_new(loop, o, cb, arg, &l);
	if (r < 0)
		return r;
	/* opts left all zero by the caller: the dial's defaults */
	if (memcmp(&dopts, &zero, sizeof(zero)) == 0)
		gl_vsock_dial_opts_default(&dopts);
	l->state = LS_DIALING;
	r = gl_vsock_dial_start(loop, to, &dopts, on_dial, l, &l->dial);
	if (r < 0) {
		link_free(l);
		return r;
	}
	if (out)
		*out = l;
	return 0;
}

int gl_agentlink_start_fd(uv_loop_t *loop, int fd, const gl_agentlink_opts *o,
			  gl_agentlink_cb cb, void *arg, gl_agentlink **out)
{
	gl_agentlink *l;
	int r;

	r = link_new(loop, o, cb, arg, &l);
	if (r < 0) {
		close(fd);
		return r;
	}
	r = handshake(l, fd); /* fd is closed by gl_fconn_new on failure */
	if (r < 0) {
		link_free(l);
		return r;
	}
	if (out)
		*out = l;
	return 0;
}

void gl_agentlink_cancel(gl_agentlink *l)
{
	if (!l || l->in_cb || l->cancelled)
		return;
	if (l->state == LS_DIALING) {
		gl_vsock_dial_cancel(l->dial);
		link_free(l);
		return;
	}
	/* The connection's close callback frees the link, silently. */
	l->cancelled = true;
	gl_fconn_close(l->c);
}
