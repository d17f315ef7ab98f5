/* The exec operation: a command in its own session (so its own process
 * group), stdout/stderr streamed as DATA frames, stdin fed from DATA
 * frames, a timeout, and CANCEL as a signal to the group. */
#include <errno.h>
#include <signal.h>
#include <sys/ioctl.h>
#include <stdlib.h>
#include <string.h>

#include "agent/agent.h"

#define EXEC_READ_BUF GL_FRAME_CHUNK
/* After the command exited, a descendant may hold the pipes open
 * (`sleep 100 &`): stop waiting for their EOF after this much silence. */
#define EXEC_LINGER_MS 1000u
#define EXEC_STDIN_HIGH (1u << 20)

typedef struct exec_req exec_req;

typedef struct exec_pipe {
	uv_pipe_t h;
	exec_req *e;
	bool open;    /* handle initialised and not yet closed */
	bool reading; /* read_start in effect */
	bool eof;
	uint8_t flags; /* DATA flags for its output */
} exec_pipe;

struct exec_req {
	agent_req r; /* first */
	uv_process_t proc;
	exec_pipe out, err, in;
	uv_timer_t timer;  /* timeout, then linger */
	bool proc_open, timer_open;
	bool spawned, exited, timed_out, aborted, answered;
	bool in_eof;       /* END seen on stdin */
	bool in_held;      /* holding the connection's input for stdin */
	unsigned in_writes; /* stdin writes in flight */
	int64_t exit_status;
	int term_signal;
	unsigned open_handles;
};

static void exec_maybe_finish(exec_req *e);
static void exec_read_cb(uv_stream_t *s, ssize_t n, const uv_buf_t *buf);

static void handle_closed(uv_handle_t *h)
{
	exec_req *e = h->data;

	if (--e->open_handles == 0)
		agent_req_free(&e->r);
}

static void close_handle(exec_req *e, uv_handle_t *h, bool *open)
{
	if (!*open)
		return;
	*open = false;
	h->data = e;
	uv_close(h, handle_closed);
}

static void pipe_close(exec_pipe *p)
{
	p->reading = false;
	close_handle(p->e, (uv_handle_t *)&p->h, &p->open);
}

/* Free everything once the process is reaped; the last close callback
 * frees the request. */
static void exec_release(exec_req *e)
{
	pipe_close(&e->out);
	pipe_close(&e->err);
	pipe_close(&e->in);
	close_handle(e, (uv_handle_t *)&e->timer, &e->timer_open);
	close_handle(e, (uv_handle_t *)&e->proc, &e->proc_open);
}

static void kill_group(exec_req *e, int sig)
{
	if (!e->spawned || e->answered)
		return;
	/* setsid() made the command a group leader: its pid is the pgid, and
	 * the kernel keeps that number reserved while the group has members,
	 * so this still reaches background children after the leader exited. */
	if (kill(-e->proc.pid, sig) < 0 && !e->exited)
		kill(e->proc.pid, sig);
}

static void alloc_cb(uv_handle_t *h, size_t hint, uv_buf_t *buf)
{
	buf->base = malloc(EXEC_READ_BUF);
	buf->len = buf->base ? EXEC_READ_BUF : 0;
}

static void pipe_set_reading(exec_pipe *p, bool on)
{
	if (!p->open || p->eof || p->reading == on)
		return;
	if (on) {
		if (uv_read_start((uv_stream_t *)&p->h, alloc_cb, exec_read_cb) == 0)
			p->reading = true;
	} else {
		uv_read_stop((uv_stream_t *)&p->h);
		p->reading = false;
	}
}

/* Bytes are waiting in the pipe (or its writer end is still being
 * drained by us). */
static bool pipe_has_data(exec_pipe *p)
{
	uv_os_fd_t fd;
	int n = 0;

	if (!p->open || uv_fileno((uv_handle_t *)&p->h, &fd) != 0)
		return false;
	return ioctl(fd, FIONREAD, &n) == 0 && n > 0;
}

static void linger_cb(uv_timer_t *t)
{
	exec_req *e = t->data;

	/* Output paused by back-pressure is not silence, and neither is output
	 * the loop has not read yet: a loop turn can take longer than the
	 * linger when many commands start at once. */
	if (agent_req_out_full(&e->r) || pipe_has_data(&e->out) || pipe_has_data(&e->err)) {
		uv_timer_start(&e->timer, linger_cb, EXEC_LINGER_MS, 0);
		return;
	}
	e->out.eof = e->err.eof = true;
	pipe_close(&e->out);
	pipe_close(&e->err);
	exec_maybe_finish(e);
}

static void exec_read_cb(uv_stream_t *s, ssize_t n, const uv_buf_t *buf)
{
	exec_pipe *p = (exec_pipe *)s;
	exec_req *e = p->e;

	if (n > 0) {
		agent_req_send(&e->r, GL_FRAME_DATA, p->flags, buf->base, (size_t)n);
		if (e->exited && e->timer_open)
			uv_timer_start(&e->timer, linger_cb, EXEC_LINGER_MS, 0);
		if (agent_req_out_full(&e->r))
			pipe_set_reading(p, false);
	} else if (n < 0) {
		p->eof = true;
		pipe_close(p);
		exec_maybe_finish(e);
	}
	free(buf->base);
}

static void exec_answer(exec_req *e)
{
	json_t *j;

	if (e->term_signal)
		j = json_pack("{s:I, s:i}", "exit_code", (json_int_t)(128 + e->term_signal),
			      "signal", e->term_signal);
	else
		j = json_pack("{s:I}", "exit_code", (json_int_t)e->exit_status);
	if (j && e->timed_out)
		json_object_set_new(j, "timed_out", json_true());
	agent_req_send_json(&e->r, GL_FRAME_RESPONSE, GL_FRAME_END, j);
	agent_req_done(&e->r);
}

static void exec_maybe_finish(exec_req *e)
{
	if (!e->exited || e->answered)
		return;
	if (!e->aborted && (e->out.open || e->err.open))
		return;
	e->answered = true;
	if (!e->aborted)
		exec_answer(e);
	exec_release(e);
}

static void exit_cb(uv_process_t *proc, int64_t status, int term_signal)
{
	exec_req *e = proc->data;

	e->exited = true;
	e->exit_status = status;
	e->term_signal = term_signal;
	if (e->timer_open) {
		uv_timer_stop(&e->timer);
		uv_update_time(e->proc.loop); /* the linger counts from now */
		if (e->out.open || e->err.open)
			uv_timer_start(&e->timer, linger_cb, EXEC_LINGER_MS, 0);
	}
	exec_maybe_finish(e);
}

static void timeout_cb(uv_timer_t *t)
{
	exec_req *e = t->data;

	if (e->exited)
		return;
	e->timed_out = true;
	kill_group(e, SIGKILL);
}

/* ---- stdin ----------------------------------------------------------------- */

typedef struct stdin_write {
	uv_write_t w;
	exec_req *e;
	char data[];
} stdin_write;

static void stdin_hold(exec_req *e, bool hold)
{
	if (e->in_held == hold)
		return;
	e->in_held = hold;
	agent_req_hold_input(&e->r, hold);
}

static void stdin_maybe_close(exec_req *e)
{
	if (e->in_eof && e->in_writes == 0)
		pipe_close(&e->in);
}

static void stdin_write_cb(uv_write_t *w, int status)
{
	stdin_write *sw = (stdin_write *)w;
	exec_req *e = sw->e;

	free(sw);
	e->in_writes--;
	if (status < 0) {
		/* The command closed its stdin: discard the rest. */
		e->in_eof = true;
	}
	if (e->in.open && uv_stream_get_write_queue_size((uv_stream_t *)&e->in.h) < EXEC_STDIN_HIGH)
		stdin_hold(e, false);
	stdin_maybe_close(e);
}

static void exec_data(agent_req *r, const gl_frame *f)
{
	exec_req *e = (exec_req *)r;
	stdin_write *sw;
	uv_buf_t b;

	if (!e->in.open || e->in_eof)
		return;
	if (f->len > 0) {
		sw = malloc(sizeof(*sw) + f->len);
		if (!sw) {
			e->in_eof = true;
		} else {
			sw->e = e;
			memcpy(sw->data, f->payload, f->len);
			b = uv_buf_init(sw->data, f->len);
			if (uv_write(&sw->w, (uv_stream_t *)&e->in.h, &b, 1, stdin_write_cb) < 0) {
				free(sw);
				e->in_eof = true;
			} else {
				e->in_writes++;
			}
		}
	}
	if (f->flags & GL_FRAME_END)
		e->in_eof = true;
	if (e->in.open && uv_stream_get_write_queue_size((uv_stream_t *)&e->in.h) >= EXEC_STDIN_HIGH)
		stdin_hold(e, true);
	stdin_maybe_close(e);
}

static void exec_cancel(agent_req *r, int sig)
{
	kill_group((exec_req *)r, sig ? sig : SIGKILL);
}

static void exec_abort(agent_req *r)
{
	exec_req *e = (exec_req *)r;

	e->aborted = true;
	kill_group(e, SIGKILL);
	pipe_close(&e->out);
	pipe_close(&e->err);
	pipe_close(&e->in);
	/* The process handle stays until exit_cb reaps the child. */
	exec_maybe_finish(e);
}

static void exec_pause_out(agent_req *r, bool paused)
{
	exec_req *e = (exec_req *)r;

	pipe_set_reading(&e->out, !paused);
	pipe_set_reading(&e->err, !paused);
}

static const agent_req_ops exec_ops = {
	.data = exec_data,
	.cancel = exec_cancel,
	.abort = exec_abort,
	.pause_out = exec_pause_out,
};

/* ---- start ----------------------------------------------------------------- */

static void free_strv(char **v)
{
	if (!v)
		return;
	for (char **p = v; *p; p++)
		free(*p);
	free(v);
}

/* argv: a non-empty array of strings. */
static int build_argv(json_t *ja, char ***out)
{
	size_t n = json_array_size(ja);
	char **v;

	if (!json_is_array(ja) || n == 0)
		return -EINVAL;
	v = calloc(n + 1, sizeof(*v));
	if (!v)
		return -ENOMEM;
	for (size_t i = 0; i < n; i++) {
		const char *s = json_string_value(json_array_get(ja, i));
		if (!s || !(v[i] = strdup(s))) {
			free_strv(v);
			return s ? -ENOMEM : -EINVAL;
		}
	}
	*out = v;
	return 0;
}

static int build_env(json_t *jo, char ***out)
{
	size_t n = json_object_size(jo), i = 0;
	const char *k;
	json_t *val;
	char **v;

	if (!json_is_object(jo))
		return -EINVAL;
	v = calloc(n + 1, sizeof(*v));
	if (!v)
		return -ENOMEM;
	json_object_foreach(jo, k, val) {
		const char *s = json_string_value(val);
		if (!s || !*k || strchr(k, '=') || asprintf(&v[i], "%s=%s", k, s) < 0) {
			v[i] = NULL;
			free_strv(v);
			return -EINVAL;
		}
		i++;
	}
	*out = v;
	return 0;
}

static int pipe_init(exec_req *e, exec_pipe *p, uint8_t flags)
{
	int ret = uv_pipe_init(e->r.agent->loop, &p->h, 0);

	if (ret < 0)
		return ret;
	p->e = e;
	p->open = true;
	p->flags = flags;
	e->open_handles++;
	return 0;
}

void agent_op_exec(agent_conn *c, uint32_t id, json_t *req)
{
	uv_process_options_t po;
	uv_stdio_container_t stdio[3];
	char **argv = NULL, **env = NULL;
	json_t *jenv, *jcwd, *jto, *jin;
	uint64_t timeout_ms = 0;
	bool want_stdin;
	exec_req *e;
	int ret;

	e = calloc(1, sizeof(*e));
	if (!e) {
		agent_conn_fail(c, id, ENOMEM, NULL);
		return;
	}
	agent_req_add(c, &e->r, id, &exec_ops);

	ret = build_argv(json_object_get(req, "argv"), &argv);
	if (ret < 0)
		goto fail_msg_argv;
	jenv = json_object_get(req, "env");
	if (jenv && !json_is_null(jenv)) {
		ret = build_env(jenv, &env);
		if (ret < 0)
			goto fail_msg_env;
	}
	jcwd = json_object_get(req, "cwd");
	if (jcwd && !json_is_null(jcwd) && !json_is_string(jcwd)) {
		ret = -EINVAL;
		goto fail_msg_cwd;
	}
	jto = json_object_get(req, "timeout_ms");
	if (jto && !json_is_null(jto)) {
		if (!json_is_integer(jto) || json_integer_value(jto) < 0) {
			ret = -EINVAL;
			goto fail_msg_timeout;
		}
		timeout_ms = (uint64_t)json_integer_value(jto);
	}
	jin = json_object_get(req, "stdin");
	want_stdin = json_is_true(jin);

	if ((ret = pipe_init(e, &e->out, 0)) < 0 ||
	    (ret = pipe_init(e, &e->err, GL_FRAME_STDERR)) < 0 ||
	    (want_stdin && (ret = pipe_init(e, &e->in, 0)) < 0))
		goto fail_spawn;
	if ((ret = uv_timer_init(e->r.agent->loop, &e->timer)) < 0)
		goto fail_spawn;
	e->timer.data = e;
	e->timer_open = true;
	e->open_handles++;

	memset(&po, 0, sizeof(po));
	memset(stdio, 0, sizeof(stdio));
	if (want_stdin) {
		stdio[0].flags = UV_CREATE_PIPE | UV_READABLE_PIPE;
		stdio[0].data.stream = (uv_stream_t *)&e->in.h;
	} else {
		stdio[0].flags = UV_IGNORE; /* /dev/null */
	}
	stdio[1].flags = UV_CREATE_PIPE | UV_WRITABLE_PIPE;
	stdio[1].data.stream = (uv_stream_t *)&e->out.h;
	stdio[2].flags = UV_CREATE_PIPE | UV_WRITABLE_PIPE;
	stdio[2].data.stream = (uv_stream_t *)&e->err.h;
	po.exit_cb = exit_cb;
	po.file = argv[0];
	po.args = argv;
	po.env = env;
	po.cwd = json_string_value(jcwd);
	po.stdio = stdio;
	po.stdio_count = 3;
	/* UV_PROCESS_DETACHED = setsid(): a group of its own to signal. */
	po.flags = UV_PROCESS_DETACHED;

	e->proc.data = e;
	ret = uv_spawn(e->r.agent->loop, &e->proc, &po);
	if (ret < 0) {
		/* libuv still wants the handle closed after a failed spawn. */
		e->proc.data = e;
		e->proc_open = true;
		e->open_handles++;
		goto fail_spawn;
	}
	e->proc.data = e;
	e->proc_open = true;
	e->open_handles++;
	e->spawned = true;
	free_strv(argv);
	free_strv(env);
	agent_log(e->r.agent, 2, "exec %u: pid %d", id, e->proc.pid);

	if (timeout_ms)
		uv_timer_start(&e->timer, timeout_cb, timeout_ms, 0);
	exec_pause_out(&e->r, agent_req_out_full(&e->r));
	return;

fail_msg_argv:
	agent_req_fail(&e->r, -ret, ret == -EINVAL ? "\"argv\" must be a non-empty array of strings"
						   : NULL);
	goto free_early;
fail_msg_env:
	agent_req_fail(&e->r, -ret, ret == -EINVAL ? "\"env\" must be an object of strings" : NULL);
	goto free_early;
fail_msg_cwd:
	agent_req_fail(&e->r, EINVAL, "\"cwd\" must be a string");
	goto free_early;
fail_msg_timeout:
	agent_req_fail(&e->r, EINVAL, "\"timeout_ms\" must be a non-negative integer");
	goto free_early;
fail_spawn:
	agent_req_fail(&e->r, -ret, NULL);
	free_strv(argv);
	free_strv(env);
	e->answered = true;
	if (e->open_handles == 0) {
		agent_req_free(&e->r);
		return;
	}
	exec_release(e);
	return;
free_early:
	free_strv(argv);
	free_strv(env);
	agent_req_free(&e->r);
}
