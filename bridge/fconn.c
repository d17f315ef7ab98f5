/* A framed connection on the libuv loop (bridge/fconn.h).
 *
 * Three handles live in the struct: the stream, a timer (idle/handshake
 * deadline, then the flush deadline once closing flushed) and an idle
 * handle that defers work to the next loop turn (frames that were already
 * buffered when the user resumed, or bytes handed in at creation). The
 * struct is freed, and `closed` runs, in the last close callback. */
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "bridge/fconn.h"

#define READ_CHUNK (64u << 10)
#define FLUSH_MS 2000
#define NHANDLES 3

enum fconn_state {
	ST_OPEN,
	ST_FLUSHING, /* no more reading or sending; closing when the queue is empty */
	ST_CLOSING,  /* uv_close issued on every handle */
};

struct gl_fconn {
	uv_pipe_t pipe;
	uv_timer_t timer;
	uv_idle_t kick;
	uv_loop_t *loop;
	int fd;
	enum fconn_state state;
	int err;       /* first error; what `closed` gets */
	int nclosed;   /* handles whose close callback ran */
	bool silent;   /* gl_fconn_new failed: no `closed` */
	bool paused;
	bool reading;
	bool over;     /* went over high_water; `drain` owed */
	uint64_t timeout_ms;
	size_t queued;
	gl_fconn_opts opts;
	gl_fconn_cbs cbs;
	void *arg;
	void *data;
	gl_frame_reader rd;
	char *rbuf;
};

struct wreq {
	uv_write_t req;
	gl_fconn *c;
	size_t n;
	uint8_t bytes[];
};

static void begin_close(gl_fconn *c, int err);
static void deliver(gl_fconn *c);

void gl_fconn_opts_default(gl_fconn_opts *o)
{
	o->max_payload = GL_FRAME_MAX_AUTH;
	o->high_water = 1u << 20;
	o->low_water = 256u << 10;
	o->max_queued = 64u << 20;
}

/* ---- closing -------------------------------------------------------------- */

static void on_handle_closed(uv_handle_t *h)
{
	gl_fconn *c = h->data;

	if (++c->nclosed < NHANDLES)
		return;
	if (!c->silent && c->cbs.closed)
		c->cbs.closed(c, c->err, c->arg);
	gl_frame_reader_free(&c->rd);
	free(c->rbuf);
	free(c);
}

/* Close every handle now; queued writes are cancelled by libuv. */
static void begin_close(gl_fconn *c, int err)
{
	if (c->state == ST_CLOSING)
		return;
	if (!c->err)
		c->err = err;
	c->state = ST_CLOSING;
	uv_close((uv_handle_t *)&c->pipe, on_handle_closed);
	uv_close((uv_handle_t *)&c->timer, on_handle_closed);
	uv_close((uv_handle_t *)&c->kick, on_handle_closed);
}

static void on_flush_timeout(uv_timer_t *t)
{
	begin_close(t->data, -ETIMEDOUT);
}

static void start_flush(gl_fconn *c, int err)
{
	if (c->state != ST_OPEN)
		return;
	if (!c->err)
		c->err = err;
	c->state = ST_FLUSHING;
	if (c->reading) {
		uv_read_stop((uv_stream_t *)&c->pipe);
		c->reading = false;
	}
	uv_idle_stop(&c->kick);
	if (c->queued == 0) {
		begin_close(c, 0);
		return;
	}
	uv_timer_start(&c->timer, on_flush_timeout, FLUSH_MS, 0);
}

void gl_fconn_close(gl_fconn *c)
{
	begin_close(c, 0);
}

void gl_fconn_close_flushed(gl_fconn *c)
{
	start_flush(c, 0);
}

bool gl_fconn_closing(const gl_fconn *c)
{
	return c->state != ST_OPEN;
}

/* ---- writing -------------------------------------------------------------- */

static void on_write(uv_write_t *req, int status)
{
	struct wreq *w = (struct wreq *)req;
	gl_fconn *c = w->c;

	c->queued -= w->n;
	free(w);
	if (c->state == ST_CLOSING)
		return;
	if (status < 0) {
		begin_close(c, status == UV_ECANCELED ? 0 : status);
		return;
	}
	if (c->state == ST_FLUSHING) {
		if (c->queued == 0)
			begin_close(c, 0);
		return;
	}
	if (c->over && c->queued <= c->opts.low_water) {
		c->over = false;
		if (c->cbs.drain)
			c->cbs.drain(c, c->arg);
	}
}

/* Queue header + payload as one write. Bypasses the state checks: the
 * caller decides whether sending is still allowed. */
static int queue_frame(gl_fconn *c, uint32_t id, uint8_t type, uint8_t flags, const void *p,
		       size_t n)
{
	struct wreq *w;
	uv_buf_t b;
	int r;

	if (n > GL_FRAME_MAX)
		return -EMSGSIZE;
	w = malloc(sizeof(*w) + GL_FRAME_HDR + n);
	if (!w)
		return -ENOMEM;
	w->c = c;
	w->n = GL_FRAME_HDR + n;
	gl_frame_hdr(w->bytes, (uint32_t)n, id, type, flags);
	if (n)
		memcpy(w->bytes + GL_FRAME_HDR, p, n);
	b = uv_buf_init((char *)w->bytes, (unsigned)w->n);
	r = uv_write(&w->req, (uv_stream_t *)&c->pipe, &b, 1, on_write);
	if (r < 0) {
		free(w);
		begin_close(c, r);
		return -EPIPE;
	}
	c->queued += w->n;
	if (c->queued >= c->opts.high_water)
		c->over = true;
	return 0;
}

int gl_fconn_send(gl_fconn *c, uint32_t id, uint8_t type, uint8_t flags, const void *p, size_t n)
{
	if (c->state != ST_OPEN)
		return -EPIPE;
	if (n > GL_FRAME_MAX)
		return -EMSGSIZE;
	if (c->queued + GL_FRAME_HDR + n > c->opts.max_queued) {
		begin_close(c, -ENOBUFS);
		return -ENOBUFS;
	}
	return queue_frame(c, id, type, flags, p, n);
}

int gl_fconn_send_json(gl_fconn *c, uint32_t id, uint8_t type, uint8_t flags, const json_t *j)
{
	char *s;
	int r;

	if (c->state != ST_OPEN)
		return -EPIPE;
	s = json_dumps(j, JSON_COMPACT);
	if (!s)
		return -ENOMEM;
	r = gl_fconn_send(c, id, type, flags, s, strlen(s));
	free(s);
	return r;
}

int gl_fconn_send_error(gl_fconn *c, uint32_t id, int e, const char *msg)
{
	json_t *j;
	int r;

	j = gl_frame_error_json(e, "%s", msg);
	if (!j)
		return -ENOMEM;
	r = gl_fconn_send_json(c, id, GL_FRAME_ERROR, GL_FRAME_END, j);
	json_decref(j);
	return r;
}

size_t gl_fconn_queued(const gl_fconn *c)
{
	return c->queued;
}

bool gl_fconn_over_high(const gl_fconn *c)
{
	return c->queued >= c->opts.high_water;
}

/* ---- reading -------------------------------------------------------------- */

static void on_timeout(uv_timer_t *t)
{
	begin_close(t->data, -ETIMEDOUT);
}

static void arm_timeout(gl_fconn *c)
{
	if (c->state != ST_OPEN)
		return;
	if (c->timeout_ms && !c->paused)
		uv_timer_start(&c->timer, on_timeout, c->timeout_ms, 0);
	else
		uv_timer_stop(&c->timer);
}

/* The peer broke the size limit: nothing after this header can be
 * trusted, so say why and leave. */
static void oversize(gl_fconn *c)
{
	json_t *j;
	char *s;

	j = gl_frame_error_json(EMSGSIZE, "frame too large");
	s = j ? json_dumps(j, JSON_COMPACT) : NULL;
	json_decref(j);
	if (s)
		queue_frame(c, 0, GL_FRAME_ERROR, GL_FRAME_END, s, strlen(s));
	free(s);
	start_flush(c, -EMSGSIZE);
}

/* Hand every whole buffered frame to the user, until paused or closed. */
static void deliver(gl_fconn *c)
{
	gl_frame f;
	int r;

	while (c->state == ST_OPEN && !c->paused) {
		r = gl_frame_next(&c->rd, &f);
		if (r == 0)
			break;
		if (r < 0) {
			oversize(c);
			break;
		}
		arm_timeout(c);
		c->cbs.frame(c, &f, c->arg);
	}
}

static void on_alloc(uv_handle_t *h, size_t hint, uv_buf_t *buf)
{
	gl_fconn *c = h->data;

	*buf = uv_buf_init(c->rbuf, READ_CHUNK);
}

static void on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf)
{
	gl_fconn *c = s->data;
	int r;

	if (c->state != ST_OPEN)
		return;
	if (nread == UV_EOF) {
		/* frames still buffered (left by a resume whose turn has not
		 * come yet) go out before the end */
		deliver(c);
		if (c->state == ST_OPEN && !c->paused)
			begin_close(c, -EPIPE);
		return;
	}
	if (nread < 0) {
		begin_close(c, (int)nread);
		return;
	}
	if (nread == 0)
		return;
	r = gl_frame_reader_feed(&c->rd, buf->base, (size_t)nread);
	if (r < 0) {
		begin_close(c, r);
		return;
	}
	deliver(c);
}

static void start_reading(gl_fconn *c)
{
	int r;

	if (c->reading || c->state != ST_OPEN || c->paused)
		return;
	r = uv_read_start((uv_stream_t *)&c->pipe, on_alloc, on_read);
	if (r < 0) {
		begin_close(c, r);
		return;
	}
	c->reading = true;
}

static void on_kick(uv_idle_t *i)
{
	gl_fconn *c = i->data;

	uv_idle_stop(i);
	deliver(c);
}

void gl_fconn_pause(gl_fconn *c, bool paused)
{
	if (c->state != ST_OPEN || c->paused == paused)
		return;
	c->paused = paused;
	if (paused) {
		if (c->reading)
			uv_read_stop((uv_stream_t *)&c->pipe);
		c->reading = false;
		uv_idle_stop(&c->kick);
	} else {
		start_reading(c);
		/* frames buffered before the pause go out on the next turn */
		if (c->state == ST_OPEN && gl_frame_reader_pending(&c->rd) >= GL_FRAME_HDR)
			uv_idle_start(&c->kick, on_kick);
	}
	arm_timeout(c);
}

void gl_fconn_set_max_payload(gl_fconn *c, uint32_t max)
{
	c->opts.max_payload = max;
	c->rd.max = max;
}

void gl_fconn_set_timeout(gl_fconn *c, uint64_t ms)
{
	c->timeout_ms = ms;
	arm_timeout(c);
}

/* ---- life ----------------------------------------------------------------- */

gl_fconn *gl_fconn_new(uv_loop_t *loop, int fd, const void *pre, size_t npre,
		       const gl_fconn_opts *opts, const gl_fconn_cbs *cbs, void *arg, int *err)
{
	gl_fconn *c;
	struct stat st;
	int r, fl;

	if (fstat(fd, &st) < 0) {
		r = -errno;
		goto err_fd;
	}
	if (!S_ISSOCK(st.st_mode)) {
		r = -ENOTSOCK;
		goto err_fd;
	}
	fl = fcntl(fd, F_GETFL);
	if (fl < 0 || (!(fl & O_NONBLOCK) && fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0)) {
		r = -errno;
		goto err_fd;
	}

	c = calloc(1, sizeof(*c));
	if (!c) {
		r = -ENOMEM;
		goto err_fd;
	}
	c->rbuf = malloc(READ_CHUNK);
	if (!c->rbuf) {
		r = -ENOMEM;
		goto err_mem;
	}
	c->loop = loop;
	c->fd = fd;
	c->state = ST_OPEN;
	if (opts)
		c->opts = *opts;
	else
		gl_fconn_opts_default(&c->opts);
	if (!c->opts.max_payload)
		c->opts.max_payload = GL_FRAME_MAX_AUTH;
	c->cbs = *cbs;
	c->arg = arg;
	gl_frame_reader_init(&c->rd, c->opts.max_payload);
	if (npre) {
		r = gl_frame_reader_feed(&c->rd, pre, npre);
		if (r < 0)
			goto err_mem;
	}

	/* From here on the handles are in the loop: failures unwind through
	 * the close callbacks, silently. */
	uv_pipe_init(loop, &c->pipe, 0);
	uv_timer_init(loop, &c->timer);
	uv_idle_init(loop, &c->kick);
	c->pipe.data = c;
	c->timer.data = c;
	c->kick.data = c;
	r = uv_pipe_open(&c->pipe, fd);
	if (r < 0) {
		c->silent = true;
		begin_close(c, r);
		/* uv_close on a pipe that failed to open does not close fd */
		close(fd);
		if (err)
			*err = r;
		return NULL;
	}
	start_reading(c);
	if (c->state != ST_OPEN) {
		/* start_reading began closing: report it through `closed`, as
		 * the handle owns fd now */
		return c;
	}
	if (gl_frame_reader_pending(&c->rd) >= GL_FRAME_HDR)
		uv_idle_start(&c->kick, on_kick);
	return c;

err_mem:
	gl_frame_reader_free(&c->rd);
	free(c->rbuf);
	free(c);
err_fd:
	close(fd);
	if (err)
		*err = r;
	return NULL;
}

void gl_fconn_rebind(gl_fconn *c, const gl_fconn_cbs *cbs, void *arg)
{
	c->cbs = *cbs;
	c->arg = arg;
}

void *gl_fconn_data(const gl_fconn *c)
{
	return c->data;
}

void gl_fconn_set_data(gl_fconn *c, void *data)
{
	c->data = data;
}

int gl_fconn_fd(const gl_fconn *c)
{
	return c->fd;
}
