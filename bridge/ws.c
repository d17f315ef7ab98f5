/* The devlxd event WebSocket (bridge/ws.h): wslay's event API does the
 * framing, libuv the I/O. wslay never touches the socket: its recv callback
 * takes bytes from the read in progress, its send callback appends frames to
 * `out`, and flush() hands `out` to the stream (uv_try_write, then uv_write
 * for what is left), one write in flight at a time. While a write is in
 * flight, messages wait in wslay's queue; that backlog is what max_queued
 * bounds. */
#include <errno.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <sodium.h>
#include <wslay/wslay.h>

#include "bridge/ws.h"

#define OUT_CAP (64 * 1024)   /* frames gathered before a write */
#define FLUSH_ROUNDS 8        /* try_write rounds per wake-up before uv_write takes over */
#define LINGER_MS 5000        /* a closing peer that does not take our close frame (LXD: 5 s write deadline) */
#define WSLAY_FRAG_MAX 4096   /* wslay's buffer for one frame of a fragmented message */

static const char ws_guid[] = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
static const char keepalive[] = "keepalive";

/* A text message over frag_size, waiting in wslay's queue. */
struct frag {
	struct frag *next, *prev;
	size_t len, off;
	char data[];
};

/* A write in flight. Separate from the session so that a write the owner
 * cancels by closing the stream after `closed` never touches freed memory. */
struct wreq {
	uv_write_t req;
	gl_ws *ws; /* NULL once the session has ended */
	char *mem;
};

struct gl_ws {
	uv_stream_t *stream;         /* borrowed */
	void *stream_data;           /* the owner's stream->data, given back at the end */
	wslay_event_context_ptr ctx;
	gl_ws_opts o;
	gl_ws_closed_fn closed;
	void *arg;
	uv_timer_t timer;            /* pings; once closing, the linger deadline */
	uv_prepare_t prepare;        /* gathers a loop turn's messages into one write */
	int handles;                 /* of timer and prepare, not yet closed */
	gl_buf out;                  /* encoded frames not yet handed to the stream */
	struct wreq *wreq;
	size_t wlen;                 /* bytes of wreq not yet known written */
	struct frag *frag_head, *frag_tail;
	size_t frag_pending;         /* bytes of queued fragmented messages not yet framed */
	const char *in;              /* the read being fed to wslay */
	size_t in_len;
	unsigned unanswered;
	uint8_t ctl_op;              /* the frame being received */
	uint64_t ctl_len;
	unsigned char ctl[2];        /* first payload bytes of a control frame (close code) */
	size_t ctl_have;
	/* our own scan of incoming frame headers: wslay reports a frame only
	 * once payload arrives, but a data frame must end us at its header */
	unsigned char hdr[14];
	size_t hdr_have;
	uint64_t skip;               /* payload bytes of the current frame left */
	unsigned reading : 1;
	unsigned read_paused : 1;    /* until the write in flight completes */
	unsigned closing : 1;        /* a close frame is queued or wslay stopped reading */
	unsigned drop : 1;           /* end without writing anything more */
	unsigned ended : 1;
};

static void end(gl_ws *ws);
static void flush(gl_ws *ws);
static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf);
static void on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf);

void gl_ws_opts_default(gl_ws_opts *o)
{
	o->ping_interval_ms = 10000;
	o->max_unanswered = 2;
	o->max_queued = 4 * 1024 * 1024;
	o->max_frame = 4096;
	o->frag_size = 4082;
}

/* ---- handshake ---------------------------------------------------------- */

static int is_tchar(unsigned char c)
{
	if ((c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z'))
		return 1;
	return c && strchr("!#$%&'*+-.^_`|~", c) != NULL;
}

static const char *skip_space(const char *s)
{
	while (*s == ' ' || *s == '\t')
		s++;
	return s;
}

static int ascii_fold_eq(const char *a, const char *b, size_t n)
{
	size_t i;
	unsigned char x, y;

	for (i = 0; i < n; i++) {
		x = (unsigned char)a[i];
		y = (unsigned char)b[i];
		if (x >= 'A' && x <= 'Z')
			x += 'a' - 'A';
		if (y >= 'A' && y <= 'Z')
			y += 'a' - 'A';
		if (x != y)
			return 0;
	}
	return 1;
}

/* gorilla's tokenListContainsValue on one header value: comma-separated
 * tokens, optional blanks; anything malformed ends the scan with "no". */
static int token_list_contains(const char *s, const char *value)
{
	size_t vlen = strlen(value), n;
	const char *t;

	if (!s)
		return 0;
	for (;;) {
		t = skip_space(s);
		for (s = t; is_tchar((unsigned char)*s); s++)
			;
		n = (size_t)(s - t);
		if (n == 0)
			return 0;
		s = skip_space(s);
		if (*s && *s != ',')
			return 0;
		if (n == vlen && ascii_fold_eq(t, value, n))
			return 1;
		if (!*s)
			return 0;
		s++;
	}
}

int gl_ws_check(const char *method, const char *connection, const char *upgrade,
		const char *version, const char *key)
{
	if (!token_list_contains(connection, "upgrade"))
		return 400;
	if (!token_list_contains(upgrade, "websocket"))
		return 400;
	if (!method || strcmp(method, "GET") != 0)
		return 405;
	if (!token_list_contains(version, "13"))
		return 400;
	/* Go trims header values: a key of blanks is an empty key. */
	if (!key || !*skip_space(key))
		return 400;
	return 0;
}

const char *gl_ws_error_body(int status)
{
	switch (status) {
	case 400:
		return "Bad Request\ninternal server error\n";
	case 405:
		return "Method Not Allowed\ninternal server error\n";
	default:
		return NULL;
	}
}

void gl_ws_accept_key(const char *key, char out[29])
{
	unsigned char md[20];
	char stack[128];
	size_t klen = strlen(key), glen = sizeof(ws_guid) - 1;
	char *p = stack;

	if (klen + glen > sizeof(stack)) {
		p = malloc(klen + glen);
		if (!p) {
			out[0] = '\0';
			return;
		}
	}
	memcpy(p, key, klen);
	memcpy(p + klen, ws_guid, glen);
	gl_sha1(p, klen + glen, md);
	if (p != stack)
		free(p);
	sodium_bin2base64(out, 29, md, sizeof(md), sodium_base64_VARIANT_ORIGINAL);
}

/* ---- wslay callbacks ------------------------------------------------------ */

static ssize_t on_wslay_recv(wslay_event_context_ptr ctx, uint8_t *buf, size_t len, int flags,
			     void *user)
{
	gl_ws *ws = user;
	size_t n;

	if (ws->in_len == 0 || ws->drop) {
		wslay_event_set_error(ctx, WSLAY_ERR_WOULDBLOCK);
		return -1;
	}
	n = len < ws->in_len ? len : ws->in_len;
	memcpy(buf, ws->in, n);
	ws->in += n;
	ws->in_len -= n;
	return (ssize_t)n;
}

static ssize_t on_wslay_send(wslay_event_context_ptr ctx, const uint8_t *data, size_t len,
			     int flags, void *user)
{
	gl_ws *ws = user;

	if (ws->out.len >= OUT_CAP) {
		wslay_event_set_error(ctx, WSLAY_ERR_WOULDBLOCK);
		return -1;
	}
	if (gl_buf_add(&ws->out, data, len) < 0) {
		wslay_event_set_error(ctx, WSLAY_ERR_CALLBACK_FAILURE);
		return -1;
	}
	return (ssize_t)len;
}

static void on_frame_start(wslay_event_context_ptr ctx,
			   const struct wslay_event_on_frame_recv_start_arg *a, void *user)
{
	gl_ws *ws = user;

	ws->ctl_op = a->opcode;
	ws->ctl_len = a->payload_length;
	ws->ctl_have = 0;
	/* LXD takes any data message from the client as the end (its reader
	 * returns at the frame header), without a close frame. */
	if (a->payload_length > ws->o.max_frame || !wslay_is_ctrl_frame(a->opcode))
		ws->drop = 1;
}

static void on_frame_chunk(wslay_event_context_ptr ctx,
			   const struct wslay_event_on_frame_recv_chunk_arg *a, void *user)
{
	gl_ws *ws = user;
	size_t i;

	for (i = 0; i < a->data_length && ws->ctl_have < sizeof(ws->ctl); i++)
		ws->ctl[ws->ctl_have++] = a->data[i];
}

/* gorilla/websocket's isValidReceivedCloseCode. */
static int close_code_ok(unsigned code)
{
	if (code >= 3000 && code <= 4999)
		return 1;
	return code >= 1000 && code <= 1014 && code != 1004 && code != 1005 && code != 1006;
}

/* wslay echoes a close frame with its reason; LXD (gorilla) echoes the code
 * alone. Queueing ours first, before wslay handles the message, makes
 * wslay's own attempt a no-op. Bad codes are left to wslay (close 1002). */
static void on_frame_end(wslay_event_context_ptr ctx, void *user)
{
	gl_ws *ws = user;
	unsigned code;

	if (ws->drop || ws->ctl_op != WSLAY_CONNECTION_CLOSE)
		return;
	/* Once a close is queued wslay discards other control frames: encode
	 * the pongs of pings read before it now, as Go has written them by
	 * then. Only the output side is touched, which recv does not use. */
	if (wslay_event_want_write(ctx))
		wslay_event_send(ctx);
	if (ws->ctl_len < 2) {
		wslay_event_queue_close(ctx, 0, NULL, 0);
		return;
	}
	code = (unsigned)ws->ctl[0] << 8 | ws->ctl[1];
	if (close_code_ok(code))
		wslay_event_queue_close(ctx, (uint16_t)code, NULL, 0);
}

static void on_msg(wslay_event_context_ptr ctx, const struct wslay_event_on_msg_recv_arg *a,
		   void *user)
{
	gl_ws *ws = user;

	if (a->opcode == WSLAY_PONG)
		ws->unanswered = 0;
}

static ssize_t on_frag_read(wslay_event_context_ptr ctx, uint8_t *buf, size_t len,
			    const union wslay_event_msg_source *src, int *eof, void *user)
{
	gl_ws *ws = user;
	struct frag *f = src->data;
	size_t n = f->len - f->off;

	if (n > len)
		n = len;
	if (n > ws->o.frag_size)
		n = ws->o.frag_size;
	memcpy(buf, f->data + f->off, n);
	f->off += n;
	ws->frag_pending -= n;
	if (f->off == f->len) {
		*eof = 1;
		if (f->prev)
			f->prev->next = f->next;
		else
			ws->frag_head = f->next;
		if (f->next)
			f->next->prev = f->prev;
		else
			ws->frag_tail = f->prev;
		free(f);
	}
	return (ssize_t)n;
}

static const struct wslay_event_callbacks wslay_cbs = {
	.recv_callback = on_wslay_recv,
	.send_callback = on_wslay_send,
	.on_frame_recv_start_callback = on_frame_start,
	.on_frame_recv_chunk_callback = on_frame_chunk,
	.on_frame_recv_end_callback = on_frame_end,
	.on_msg_recv_callback = on_msg,
};

/* ---- I/O ---------------------------------------------------------------- */

static void on_handle_closed(uv_handle_t *h)
{
	gl_ws *ws = h->data;

	if (--ws->handles == 0)
		ws->closed(ws, ws->arg);
}

/* The session is over: stop reading, forget the write in flight, and call
 * `closed` once both handles are closed, which is never before this loop
 * turn ends. */
static void end(gl_ws *ws)
{
	if (ws->ended)
		return;
	ws->ended = 1;
	if (ws->reading) {
		uv_read_stop(ws->stream);
		ws->reading = 0;
	}
	ws->stream->data = ws->stream_data;
	if (ws->wreq) {
		ws->wreq->ws = NULL;
		ws->wreq = NULL;
		ws->wlen = 0;
	}
	uv_close((uv_handle_t *)&ws->timer, on_handle_closed);
	uv_close((uv_handle_t *)&ws->prepare, on_handle_closed);
}

static void on_timer(uv_timer_t *t);

static void start_closing(gl_ws *ws)
{
	if (ws->closing || ws->ended)
		return;
	ws->closing = 1;
	uv_timer_stop(&ws->timer);
	uv_timer_start(&ws->timer, on_timer, LINGER_MS, 0);
}

static void on_write(uv_write_t *req, int status)
{
	struct wreq *w = (struct wreq *)req;
	gl_ws *ws = w->ws;

	free(w->mem);
	free(w);
	if (!ws)
		return;
	ws->wreq = NULL;
	ws->wlen = 0;
	if (status < 0) {
		end(ws);
		return;
	}
	if (ws->read_paused) {
		ws->read_paused = 0;
		if (uv_read_start(ws->stream, on_alloc, on_read) < 0) {
			end(ws);
			return;
		}
		ws->reading = 1;
	}
	flush(ws);
}

/* Hand out[skip..] to uv_write; out is empty afterwards. */
static int write_out(gl_ws *ws, size_t skip)
{
	struct wreq *w;
	uv_buf_t b;
	size_t len;
	int r;

	w = malloc(sizeof(*w));
	if (!w)
		return -ENOMEM;
	w->mem = gl_buf_steal(&ws->out, &len);
	if (!w->mem) {
		free(w);
		return -ENOMEM;
	}
	w->ws = ws;
	b = uv_buf_init(w->mem + skip, (unsigned)(len - skip));
	r = uv_write(&w->req, ws->stream, &b, 1, on_write);
	if (r < 0) {
		free(w->mem);
		free(w);
		return r;
	}
	ws->wreq = w;
	ws->wlen = len - skip;
	return 0;
}

static void flush(gl_ws *ws)
{
	uv_buf_t b;
	int rounds, n;

	for (rounds = 0; !ws->ended && !ws->wreq; rounds++) {
		if (!ws->drop && wslay_event_want_write(ws->ctx) && wslay_event_send(ws->ctx) != 0) {
			end(ws);
			return;
		}
		if (ws->out.len == 0)
			break;
		if (rounds == FLUSH_ROUNDS) {
			/* Enough for one wake-up; the write callback goes on. */
			if (write_out(ws, 0) < 0)
				end(ws);
			return;
		}
		b = uv_buf_init(ws->out.data, (unsigned)ws->out.len);
		n = uv_try_write(ws->stream, &b, 1);
		if (n == UV_EAGAIN)
			n = 0;
		if (n < 0) {
			end(ws);
			return;
		}
		if ((size_t)n < ws->out.len) {
			if (write_out(ws, (size_t)n) < 0)
				end(ws);
			return;
		}
		/* An idle subscriber should not keep a burst's buffer. */
		if (ws->out.cap > 16384)
			gl_buf_free(&ws->out);
		else
			gl_buf_reset(&ws->out);
	}
	/* wslay stops writing once its close frame is out (or on failure). */
	if (!ws->ended && !ws->wreq && ws->out.len == 0 && !wslay_event_get_write_enabled(ws->ctx))
		end(ws);
}

static void on_prepare(uv_prepare_t *p)
{
	gl_ws *ws = p->data;

	uv_prepare_stop(p);
	flush(ws);
}

static void kick(gl_ws *ws)
{
	if (!ws->ended && !uv_is_active((uv_handle_t *)&ws->prepare))
		uv_prepare_start(&ws->prepare, on_prepare);
}

static void on_timer(uv_timer_t *t)
{
	gl_ws *ws = t->data;
	struct wslay_event_msg m = {
		.opcode = WSLAY_PING,
		.msg = (const uint8_t *)keepalive,
		.msg_length = sizeof(keepalive) - 1,
	};

	if (ws->closing || ws->unanswered > ws->o.max_unanswered) {
		end(ws);
		return;
	}
	if (wslay_event_queue_msg(ws->ctx, &m) != 0) {
		end(ws);
		return;
	}
	ws->unanswered++;
	flush(ws);
}

/* One buffer for every session's reads: reads are consumed (wslay copies
 * what it keeps) before the loop reads again. */
static _Thread_local char read_buf[16384];

static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf)
{
	*buf = uv_buf_init(read_buf, sizeof(read_buf));
}

/* Walk the frame headers in p[0..n): true when one of them starts a
 * data frame (text, binary, continuation), which LXD takes as the end. */
static bool data_frame_seen(gl_ws *ws, const unsigned char *p, size_t n)
{
	while (n) {
		size_t need, take;

		if (ws->skip) {
			take = ws->skip < n ? (size_t)ws->skip : n;
			ws->skip -= take;
			p += take;
			n -= take;
			continue;
		}
		ws->hdr[ws->hdr_have++] = *p++;
		n--;
		if (ws->hdr_have == 1 && !(ws->hdr[0] & 0x08))
			return true; /* opcodes 0-7 are data */
		if (ws->hdr_have < 2)
			continue;
		need = 2 + ((ws->hdr[1] & 0x7f) == 126 ? 2 : (ws->hdr[1] & 0x7f) == 127 ? 8 : 0) +
		       (ws->hdr[1] & 0x80 ? 4 : 0);
		if (ws->hdr_have < need)
			continue;
		/* a control frame: at most 125 bytes (wslay rejects longer ones) */
		ws->skip = ws->hdr[1] & 0x7f;
		ws->hdr_have = 0;
	}
	return false;
}

static void on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf)
{
	gl_ws *ws = s->data;

	if (nread == 0)
		return;
	if (nread < 0) {
		end(ws);
		return;
	}
	/* After a close frame or a protocol error wslay reads no more; the
	 * bytes are dropped while our close frame goes out. */
	if (!wslay_event_get_read_enabled(ws->ctx))
		return;
	if (data_frame_seen(ws, (const unsigned char *)buf->base, (size_t)nread)) {
		end(ws);
		return;
	}
	ws->in = buf->base;
	ws->in_len = (size_t)nread;
	wslay_event_recv(ws->ctx);
	ws->in = NULL;
	ws->in_len = 0;
	if (ws->drop) {
		end(ws);
		return;
	}
	if (!wslay_event_get_read_enabled(ws->ctx))
		start_closing(ws);
	flush(ws);
	/* Pongs for a client that sends pings but reads nothing would pile up
	 * in wslay's queue: read no more until the stream takes our bytes. */
	if (!ws->ended && ws->wreq && ws->reading) {
		uv_read_stop(ws->stream);
		ws->reading = 0;
		ws->read_paused = 1;
	}
}

/* ---- public --------------------------------------------------------------- */

gl_ws *gl_ws_start(uv_loop_t *loop, uv_stream_t *stream, const char *key, const char *early,
		   size_t nearly, const gl_ws_opts *o, gl_ws_closed_fn closed, void *arg)
{
	struct wslay_event_msg ping = {
		.opcode = WSLAY_PING,
		.msg = (const uint8_t *)keepalive,
		.msg_length = sizeof(keepalive) - 1,
	};
	gl_ws_opts def;
	char accept[29];
	gl_ws *ws;
	int r;

	if (!loop || !stream || !closed || (!nearly && !key))
		return NULL;
	ws = calloc(1, sizeof(*ws));
	if (!ws)
		return NULL;
	if (o)
		ws->o = *o;
	else
		gl_ws_opts_default(&ws->o);
	/* 0 means the default for sizes; ping_interval_ms 0 means only the
	 * first ping. wslay frames at most 4096 bytes of a fragmented message. */
	gl_ws_opts_default(&def);
	if (ws->o.frag_size == 0)
		ws->o.frag_size = def.frag_size;
	if (ws->o.frag_size > WSLAY_FRAG_MAX)
		ws->o.frag_size = WSLAY_FRAG_MAX;
	if (ws->o.max_frame == 0)
		ws->o.max_frame = def.max_frame;
	if (ws->o.max_queued == 0)
		ws->o.max_queued = def.max_queued;
	ws->stream = stream;
	ws->closed = closed;
	ws->arg = arg;
	if (wslay_event_context_server_init(&ws->ctx, &wslay_cbs, ws) != 0)
		goto err_free;
	/* Data frames are never buffered: any one ends the session at its
	 * header. Control frames are at most 125 bytes (wslay enforces it). */
	wslay_event_config_set_no_buffering(ws->ctx, 1);
	wslay_event_config_set_max_recv_msg_length(ws->ctx, UINT64_MAX);

	if (!nearly) {
		gl_ws_accept_key(key, accept);
		if (!accept[0])
			goto err_ctx;
		r = gl_buf_printf(&ws->out,
				  "HTTP/1.1 101 Switching Protocols\r\n"
				  "Upgrade: websocket\r\n"
				  "Connection: Upgrade\r\n"
				  "Sec-WebSocket-Accept: %s\r\n"
				  "\r\n",
				  accept);
		if (r < 0 || wslay_event_queue_msg(ws->ctx, &ping) != 0)
			goto err_ctx;
		ws->unanswered = 1;
	}

	ws->stream_data = stream->data;
	uv_read_stop(stream);
	if (!nearly) {
		stream->data = ws;
		r = uv_read_start(stream, on_alloc, on_read);
		if (r < 0) {
			stream->data = ws->stream_data;
			goto err_ctx;
		}
		ws->reading = 1;
	}

	uv_timer_init(loop, &ws->timer);
	uv_prepare_init(loop, &ws->prepare);
	ws->timer.data = ws;
	ws->prepare.data = ws;
	ws->handles = 2;

	if (nearly) {
		/* Go's upgrader refuses a connection with buffered bytes after
		 * the handshake request: no response at all. */
		(void)early;
		end(ws);
		return ws;
	}
	if (ws->o.ping_interval_ms)
		uv_timer_start(&ws->timer, on_timer, ws->o.ping_interval_ms, ws->o.ping_interval_ms);
	flush(ws);
	return ws;

err_ctx:
	wslay_event_context_free(ws->ctx);
err_free:
	gl_buf_free(&ws->out);
	free(ws);
	return NULL;
}

size_t gl_ws_queued(const gl_ws *ws)
{
	return wslay_event_get_queued_msg_length(ws->ctx) + ws->frag_pending + ws->out.len +
	       ws->wlen;
}

int gl_ws_send_text(gl_ws *ws, const char *p, size_t n)
{
	struct wslay_event_fragmented_msg fm;
	struct wslay_event_msg m;
	struct frag *f;

	if (ws->ended || ws->closing)
		return -EPIPE;
	if (n > ws->o.max_queued || gl_ws_queued(ws) > ws->o.max_queued - n) {
		/* Too slow a reader: the close frame jumps the backlog (wslay
		 * sends control frames first) and the linger timer bounds the
		 * wait for it. */
		wslay_event_queue_close(ws->ctx, WSLAY_CODE_POLICY_VIOLATION, NULL, 0);
		start_closing(ws);
		kick(ws);
		return -ENOBUFS;
	}
	if (n <= ws->o.frag_size) {
		m.opcode = WSLAY_TEXT_FRAME;
		m.msg = (const uint8_t *)p;
		m.msg_length = n;
		if (wslay_event_queue_msg(ws->ctx, &m) != 0)
			return -ENOMEM;
	} else {
		f = malloc(sizeof(*f) + n);
		if (!f)
			return -ENOMEM;
		memcpy(f->data, p, n);
		f->len = n;
		f->off = 0;
		fm.opcode = WSLAY_TEXT_FRAME;
		fm.source.data = f;
		fm.read_callback = on_frag_read;
		if (wslay_event_queue_fragmented_msg(ws->ctx, &fm) != 0) {
			free(f);
			return -ENOMEM;
		}
		f->next = NULL;
		f->prev = ws->frag_tail;
		if (ws->frag_tail)
			ws->frag_tail->next = f;
		else
			ws->frag_head = f;
		ws->frag_tail = f;
		ws->frag_pending += n;
	}
	kick(ws);
	return 0;
}

void gl_ws_close(gl_ws *ws, uint16_t code)
{
	if (ws->ended || ws->closing)
		return;
	wslay_event_queue_close(ws->ctx, code, NULL, 0);
	start_closing(ws);
	flush(ws);
}

void gl_ws_free(gl_ws *ws)
{
	struct frag *f, *next;

	if (!ws)
		return;
	wslay_event_context_free(ws->ctx);
	for (f = ws->frag_head; f; f = next) {
		next = f->next;
		free(f);
	}
	gl_buf_free(&ws->out);
	free(ws);
}
