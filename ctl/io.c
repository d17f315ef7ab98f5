/* guestlinkctl's source and sink (ctl/io.h). */
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "bridge/frame.h"
#include "ctl/io.h"

/* ---- source ------------------------------------------------------------------ */

static void source_deliver(ctl_source *s, ssize_t n, const char *p)
{
	if (n <= 0)
		s->ended = true;
	else
		s->total += (uint64_t)n;
	s->cb(s, n, p, s->arg);
}

static void file_read(ctl_source *s);

static void on_file_read(uv_fs_t *req)
{
	ctl_source *s = req->data;
	ssize_t n = req->result;

	uv_fs_req_cleanup(req);
	s->inflight = false;
	if (!s->open) {
		free(s->buf);
		s->buf = NULL;
		return;
	}
	if (n == UV_EINTR || n == UV_EAGAIN) {
		file_read(s);
		return;
	}
	source_deliver(s, n, s->buf);
	if (n > 0)
		file_read(s);
}

static void file_read(ctl_source *s)
{
	uv_buf_t b;
	int r;

	if (!s->open || s->paused || s->inflight || s->ended)
		return;
	b = uv_buf_init(s->buf, GL_FRAME_CHUNK);
	s->req.data = s;
	r = uv_fs_read(s->loop, &s->req, s->fd, &b, 1, -1, on_file_read);
	if (r < 0) {
		source_deliver(s, r, NULL);
		return;
	}
	s->inflight = true;
}

static void on_alloc(uv_handle_t *h, size_t hint, uv_buf_t *b)
{
	ctl_source *s = h->data;

	b->base = s->buf;
	b->len = GL_FRAME_CHUNK;
}

static void on_stream_read(uv_stream_t *st, ssize_t n, const uv_buf_t *b)
{
	ctl_source *s = st->data;

	if (n == 0 || !s->open || s->ended)
		return;
	if (n < 0) {
		uv_read_stop(st);
		source_deliver(s, n == UV_EOF ? 0 : n, NULL);
		return;
	}
	source_deliver(s, n, b->base);
}

int ctl_source_open(ctl_source *s, uv_loop_t *loop, int fd, ctl_source_cb cb, void *arg)
{
	uv_handle_type t = uv_guess_handle(fd);
	int r, dfd;

	memset(s, 0, sizeof(*s));
	s->loop = loop;
	s->fd = fd;
	s->cb = cb;
	s->arg = arg;
	s->buf = malloc(GL_FRAME_CHUNK);
	if (!s->buf)
		return -ENOMEM;
	switch (t) {
	case UV_TTY:
	case UV_NAMED_PIPE:
	case UV_TCP:
		/* libuv owns (and closes) the descriptor it is given: give it a
		 * duplicate, so that the caller's fd stays open and can have its
		 * blocking mode restored at exit. */
		dfd = fcntl(fd, F_DUPFD_CLOEXEC, 3);
		if (dfd < 0) {
			r = -errno;
			break;
		}
		if (t == UV_TTY) {
			r = uv_tty_init(loop, &s->u.tty, dfd, 1);
		} else {
			r = uv_pipe_init(loop, &s->u.pipe, 0);
			if (r == 0) {
				r = uv_pipe_open(&s->u.pipe, dfd);
				if (r < 0)
					uv_close(&s->u.handle, NULL);
			}
		}
		if (r < 0)
			close(dfd);
		s->stream = true;
		break;
	case UV_UNKNOWN_HANDLE:
		r = -EBADF;
		break;
	default: /* files, character devices: the threadpool reads them */
		r = 0;
		break;
	}
	if (r < 0) {
		free(s->buf);
		s->buf = NULL;
		return r;
	}
	if (s->stream)
		s->u.handle.data = s;
	s->open = true;
	return 0;
}

void ctl_source_start(ctl_source *s)
{
	if (!s->open || s->started)
		return;
	s->started = true;
	if (s->paused)
		return;
	if (s->stream)
		uv_read_start(&s->u.stream, on_alloc, on_stream_read);
	else
		file_read(s);
}

void ctl_source_pause(ctl_source *s, bool paused)
{
	if (!s->open || s->paused == paused)
		return;
	s->paused = paused;
	if (!s->started || s->ended)
		return;
	if (s->stream) {
		if (paused)
			uv_read_stop(&s->u.stream);
		else
			uv_read_start(&s->u.stream, on_alloc, on_stream_read);
	} else if (!paused) {
		file_read(s);
	}
}

void ctl_source_close(ctl_source *s)
{
	if (!s->open)
		return;
	s->open = false;
	if (s->stream)
		uv_close(&s->u.handle, NULL);
	/* A file read still in flight finishes into s->buf: free it then. */
	if (!s->inflight) {
		free(s->buf);
		s->buf = NULL;
	}
}

/* ---- sink -------------------------------------------------------------------- */

struct sink_chunk {
	struct sink_chunk *next;
	int fd;
	size_t len, off;
	char data[];
};

static void sink_kick(ctl_sink *s);

static void sink_drop(ctl_sink *s)
{
	struct sink_chunk *c, *next;

	for (c = s->head; c; c = next) {
		next = c->next;
		free(c);
	}
	s->head = s->tail = NULL;
	s->queued = 0;
}

static void on_retry(uv_timer_t *t)
{
	sink_kick(t->data);
}

static void on_sink_write(uv_fs_t *req)
{
	ctl_sink *s = req->data;
	ssize_t n = req->result;
	struct sink_chunk *c = s->head;

	uv_fs_req_cleanup(req);
	s->busy = false;
	if (!s->open) {
		sink_drop(s);
		return;
	}
	if (n == UV_EAGAIN || n == UV_EINTR) {
		uv_timer_start(&s->retry, on_retry, 5, 0);
		return;
	}
	if (n < 0) {
		s->err = (int)n;
		sink_drop(s);
		s->cb(s, s->arg);
		return;
	}
	c->off += (size_t)n;
	s->queued -= (size_t)n;
	s->written += (uint64_t)n;
	if (c->off == c->len) {
		s->head = c->next;
		if (!s->head)
			s->tail = NULL;
		free(c);
	}
	sink_kick(s);
	s->cb(s, s->arg);
}

static void sink_kick(ctl_sink *s)
{
	uv_buf_t b;
	int r;

	if (!s->open || s->busy || s->err || !s->head)
		return;
	b = uv_buf_init(s->head->data + s->head->off, (unsigned)(s->head->len - s->head->off));
	s->req.data = s;
	r = uv_fs_write(s->loop, &s->req, s->head->fd, &b, 1, -1, on_sink_write);
	if (r < 0) {
		s->err = r;
		sink_drop(s);
		s->cb(s, s->arg);
		return;
	}
	s->busy = true;
}

int ctl_sink_open(ctl_sink *s, uv_loop_t *loop, int fd, ctl_sink_cb cb, void *arg)
{
	int r;

	memset(s, 0, sizeof(*s));
	s->loop = loop;
	s->fd = fd;
	s->cb = cb;
	s->arg = arg;
	r = uv_timer_init(loop, &s->retry);
	if (r < 0)
		return r;
	s->retry.data = s;
	s->open = true;
	return 0;
}

int ctl_sink_write(ctl_sink *s, const void *p, size_t n)
{
	return ctl_sink_write_fd(s, s->fd, p, n);
}

int ctl_sink_write_fd(ctl_sink *s, int fd, const void *p, size_t n)
{
	struct sink_chunk *c;

	if (s->err)
		return s->err;
	if (!s->open)
		return -EPIPE;
	if (n == 0)
		return 0;
	c = malloc(sizeof(*c) + n);
	if (!c)
		return -ENOMEM;
	c->next = NULL;
	c->fd = fd;
	c->len = n;
	c->off = 0;
	memcpy(c->data, p, n);
	if (s->tail)
		s->tail->next = c;
	else
		s->head = c;
	s->tail = c;
	s->queued += n;
	sink_kick(s);
	return 0;
}

bool ctl_sink_idle(const ctl_sink *s)
{
	return !s->busy && !s->head;
}

void ctl_sink_close(ctl_sink *s)
{
	if (!s->open)
		return;
	s->open = false;
	uv_close((uv_handle_t *)&s->retry, NULL);
	if (!s->busy)
		sink_drop(s);
}
