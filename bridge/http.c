/* HTTP/1.x server with Go 1.19 net/http's wire behaviour (see http.h).
 *
 * A connection reads into one buffer shared by the whole server (libuv
 * calls alloc and read back to back), so an idle connection holds no read
 * buffer. Bytes that cannot be parsed yet (a response is pending) are kept
 * in the connection's `in` buffer. Each request goes through three phases:
 * the request line (parsed here, as Go does, so that any token method is
 * served), the header block and the body (http-parser, fed a canonical
 * request line and paused at the end of the head and of the message).
 *
 * Timing is done with ordered lists and one sweep timer instead of a timer
 * per connection: idle connections (oldest first: the eviction order),
 * connections inside a request head (header timeout), lingering closes, and
 * connections with output pending (write stall). */
#include "bridge/http.h"

#include <errno.h>
#include <fcntl.h>
#include <http_parser.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define GO_CHUNKING_SIZE 2048     /* net/http bufferBeforeChunkingSize */
#define GO_DISCARD_MAX (256 << 10) /* net/http maxPostHandlerReadBytes */
#define RBUF_SIZE (64 << 10)
#define MAX_INBUF (64 << 10)     /* unparsed input kept before reading pauses */
#define HIGH_WATER (256 << 10)   /* queued output that pauses request parsing */
#define STREAM_LOW (128 << 10)   /* a streamed body is refilled below this */
#define LINGER_MS 1000
#define WRITE_STALL_MS 30000

enum cstate { CS_READ, CS_BUSY, CS_STREAM, CS_HIJACK, CS_LINGER, CS_CLOSED };
enum phase { PH_LINE, PH_HEAD, PH_BODY, PH_DONE };
enum tlist { L_NONE, L_IDLE, L_HEAD, L_LINGER, L_COUNT };

typedef struct foff {
	size_t no, nl, vo, vl;
} foff;

struct gl_http_conn {
	uv_pipe_t pipe; /* first: handle -> conn */
	gl_http_server *s;
	void *data;
	gl_http_conn *prev, *next;   /* every connection */
	gl_http_conn *lprev, *lnext; /* the timing list `list` */
	gl_http_conn *wprev, *wnext; /* the write-stall list */
	gl_http_conn *dnext;         /* the deferred-work list */
	uint64_t deadline, wdeadline;
	enum tlist list;
	bool in_wlist, deferred, need_resume, need_more;
	enum cstate state;
	enum phase phase;
	http_parser parser;
	gl_buf in, head, aux, body;
	foff *offs;
	size_t noffs, capoffs;
	gl_http_field *fields;
	size_t capfields;
	gl_http_req req;
	size_t head_bytes, body_limit, body_seen;
	size_t queued;
	bool value_last, hdr_done, msg_done, body_stop, body_bad;
	bool too_big, expect_continue, expect_unmet, options_star;
	bool wants10ka, wants_close;
	bool close_after, eof, reading, in_feed, announced;
	int64_t stream_left; /* declared Content-Length not yet written, -1: none */
	gl_http_more_fn more;
	void *more_arg;
	void (*cancel)(void *arg);
	void *cancel_arg;
	void (*on_input)(gl_http_conn *c, void *arg);
	void *input_arg;
	const char *rest;
	size_t nrest;
	size_t line_offs[6]; /* request-line pointers as offsets into head */
	uv_shutdown_t shut;
};

typedef struct clist {
	gl_http_conn *head, *tail;
} clist;

struct gl_http_server {
	uv_loop_t *loop;
	uv_pipe_t listener;
	uv_timer_t sweep, defer;
	char *path;
	gl_http_limits lim;
	gl_http_handler h;
	void *arg;
	gl_http_conn *conns;
	unsigned nconns, nclosing; /* nclosing: closed, handle not yet released */
	clist lists[L_COUNT];
	clist wlist;
	gl_http_conn *dhead;
	uint64_t tick;
	bool sweeping, stopping;
	int open_handles;
	void (*done)(void *arg);
	void *done_arg;
	gl_buf out;
	char *rbuf;
};

typedef struct wreq {
	uv_write_t req;
	gl_http_conn *c;
	size_t len;
	char data[];
} wreq;

static http_parser_settings settings;

/* ---- small helpers ------------------------------------------------------- */

static gl_http_conn *conn_of(const void *handle)
{
	return (gl_http_conn *)handle; /* pipe is the first member */
}

static bool eqfold(const char *a, size_t an, const char *b)
{
	size_t bn = strlen(b);

	if (an != bn)
		return false;
	for (size_t i = 0; i < an; i++) {
		char x = a[i], y = b[i];

		if (x >= 'A' && x <= 'Z')
			x = (char)(x + 32);
		if (y >= 'A' && y <= 'Z')
			y = (char)(y + 32);
		if (x != y)
			return false;
	}
	return true;
}

static bool is_tchar(unsigned char c)
{
	if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9'))
		return true;
	return c && strchr("!#$%&'*+-.^_`|~", c) != NULL;
}

const char *gl_http_status_text(int status)
{
	switch (status) {
	case 100: return "Continue";
	case 101: return "Switching Protocols";
	case 200: return "OK";
	case 204: return "No Content";
	case 206: return "Partial Content";
	case 301: return "Moved Permanently";
	case 304: return "Not Modified";
	case 400: return "Bad Request";
	case 401: return "Unauthorized";
	case 403: return "Forbidden";
	case 404: return "Not Found";
	case 405: return "Method Not Allowed";
	case 412: return "Precondition Failed";
	case 413: return "Request Entity Too Large";
	case 416: return "Requested Range Not Satisfiable";
	case 417: return "Expectation Failed";
	case 431: return "Request Header Fields Too Large";
	case 500: return "Internal Server Error";
	case 501: return "Not Implemented";
	case 503: return "Service Unavailable";
	case 505: return "HTTP Version Not Supported";
	default: return NULL;
	}
}

void gl_http_date(time_t t, char out[30])
{
	static const char days[] = "SunMonTueWedThuFriSat";
	static const char months[] = "JanFebMarAprMayJunJulAugSepOctNovDec";
	static time_t last = (time_t)-1;
	static char cache[30];
	char tmp[80];
	struct tm tm;

	if (t != last) {
		gmtime_r(&t, &tm);
		snprintf(tmp, sizeof(tmp), "%.3s, %02d %.3s %04d %02d:%02d:%02d GMT",
			 days + 3 * tm.tm_wday, tm.tm_mday, months + 3 * tm.tm_mon,
			 tm.tm_year + 1900, tm.tm_hour, tm.tm_min, tm.tm_sec);
		memcpy(cache, tmp, 29);
		cache[29] = '\0';
		last = t;
	}
	memcpy(out, cache, 30);
}

/* ---- lists ----------------------------------------------------------------- */

static void list_del(clist *l, gl_http_conn *c)
{
	if (c->lprev)
		c->lprev->lnext = c->lnext;
	else
		l->head = c->lnext;
	if (c->lnext)
		c->lnext->lprev = c->lprev;
	else
		l->tail = c->lprev;
	c->lprev = c->lnext = NULL;
}

static void list_add(clist *l, gl_http_conn *c)
{
	c->lnext = NULL;
	c->lprev = l->tail;
	if (l->tail)
		l->tail->lnext = c;
	else
		l->head = c;
	l->tail = c;
}

static void wlist_del(gl_http_server *s, gl_http_conn *c)
{
	if (!c->in_wlist)
		return;
	if (c->wprev)
		c->wprev->wnext = c->wnext;
	else
		s->wlist.head = c->wnext;
	if (c->wnext)
		c->wnext->wprev = c->wprev;
	else
		s->wlist.tail = c->wprev;
	c->wprev = c->wnext = NULL;
	c->in_wlist = false;
}

static void sweep_arm(gl_http_server *s);

/* Output made progress (or started): the stall deadline moves. */
static void wlist_touch(gl_http_server *s, gl_http_conn *c)
{
	wlist_del(s, c);
	if (!c->queued || c->state == CS_CLOSED)
		return;
	c->wdeadline = uv_now(s->loop) + WRITE_STALL_MS;
	c->wnext = NULL;
	c->wprev = s->wlist.tail;
	if (s->wlist.tail)
		s->wlist.tail->wnext = c;
	else
		s->wlist.head = c;
	s->wlist.tail = c;
	c->in_wlist = true;
	sweep_arm(s);
}

/* Put c in the timing list its state calls for, keeping its place (and so
 * its deadline) when it is already there. */
static void conn_retime(gl_http_conn *c)
{
	gl_http_server *s = c->s;
	enum tlist want = L_NONE;
	uint64_t ms = 0;

	if (c->state == CS_LINGER) {
		want = L_NONE; /* entered explicitly once the shutdown is done */
		if (c->list == L_LINGER)
			return;
	} else if (c->state == CS_READ) {
		/* a request (head, and body if any) must arrive in time, whether
		 * it trickles in or sits half-sent */
		bool started = c->phase != PH_LINE || c->head.len > 0 || c->in.len > 0;

		if (started) {
			want = L_HEAD;
			ms = s->lim.header_timeout_ms;
		} else if (!c->queued && !c->eof) {
			want = L_IDLE;
			ms = s->lim.idle_timeout_ms;
		}
	}
	if (want == c->list)
		return;
	if (c->list != L_NONE)
		list_del(&s->lists[c->list], c);
	c->list = want;
	if (want == L_NONE)
		return;
	c->deadline = ms ? uv_now(s->loop) + ms : UINT64_MAX;
	list_add(&s->lists[want], c);
	if (ms)
		sweep_arm(s);
}

/* ---- closing --------------------------------------------------------------- */

static void maybe_done(gl_http_server *s);

static void on_conn_closed(uv_handle_t *h)
{
	gl_http_conn *c = conn_of(h);
	gl_http_server *s = c->s;

	if (c->cancel) {
		void (*fn)(void *) = c->cancel;

		c->cancel = NULL;
		fn(c->cancel_arg);
	}
	if (c->announced && s->h.closed)
		s->h.closed(c, s->arg);
	if (c->deferred) {
		gl_http_conn **pp = &s->dhead;

		while (*pp && *pp != c)
			pp = &(*pp)->dnext;
		if (*pp)
			*pp = c->dnext;
	}
	if (c->prev)
		c->prev->next = c->next;
	else
		s->conns = c->next;
	if (c->next)
		c->next->prev = c->prev;
	s->nconns--;
	s->nclosing--;
	gl_buf_free(&c->in);
	gl_buf_free(&c->head);
	gl_buf_free(&c->aux);
	gl_buf_free(&c->body);
	free(c->offs);
	free(c->fields);
	free(c);
	maybe_done(s);
}

static void conn_close(gl_http_conn *c)
{
	gl_http_server *s = c->s;

	if (c->state == CS_CLOSED)
		return;
	c->state = CS_CLOSED;
	s->nclosing++;
	if (c->list != L_NONE) {
		list_del(&s->lists[c->list], c);
		c->list = L_NONE;
	}
	wlist_del(s, c);
	c->more = NULL;
	c->on_input = NULL;
	uv_close((uv_handle_t *)&c->pipe, on_conn_closed);
}

void gl_http_close(gl_http_conn *c)
{
	conn_close(c);
}

static void on_shutdown(uv_shutdown_t *req, int status)
{
	gl_http_conn *c = req->data;

	if (c->state != CS_LINGER)
		return;
	if (status < 0 || c->eof) {
		conn_close(c);
		return;
	}
	/* everything is written; wait a little for the peer's EOF so that it
	 * reads our last bytes before the socket goes away */
	c->deadline = uv_now(c->s->loop) + LINGER_MS;
	c->list = L_LINGER;
	list_add(&c->s->lists[L_LINGER], c);
	sweep_arm(c->s);
}

/* Close once the output is flushed. */
static void conn_finish(gl_http_conn *c)
{
	int unread = 0;

	if (c->state == CS_CLOSED || c->state == CS_LINGER)
		return;
	/* all written and nothing unread: closing now loses nothing (an AF_UNIX
	 * peer only gets ECONNRESET when we close with input pending) */
	if (!c->queued && ioctl(gl_http_conn_fd(c), FIONREAD, &unread) == 0 && unread == 0) {
		conn_close(c);
		return;
	}
	c->state = CS_LINGER;
	conn_retime(c);
	c->shut.data = c;
	if (uv_shutdown(&c->shut, (uv_stream_t *)&c->pipe, on_shutdown))
		conn_close(c);
}

void gl_http_close_flushed(gl_http_conn *c)
{
	if (c->reading && c->state == CS_HIJACK) {
		/* keep reading: the peer's EOF ends the linger early */
		c->on_input = NULL;
	}
	conn_finish(c);
}

bool gl_http_conn_closing(const gl_http_conn *c)
{
	return c->state == CS_CLOSED || c->state == CS_LINGER;
}

/* ---- writing --------------------------------------------------------------- */

static void defer_add(gl_http_conn *c);
static void eof_check(gl_http_conn *c);

static void on_write(uv_write_t *req, int status)
{
	wreq *w = (wreq *)req;
	gl_http_conn *c = w->c;

	c->queued -= w->len;
	free(w);
	if (c->state == CS_CLOSED)
		return;
	if (status < 0) {
		conn_close(c);
		return;
	}
	wlist_touch(c->s, c);
	if (c->state == CS_STREAM && c->more && c->queued < STREAM_LOW) {
		c->need_more = true;
		defer_add(c);
	} else if (c->state == CS_READ && c->queued < HIGH_WATER && c->in.len) {
		c->need_resume = true;
		defer_add(c);
	} else if (c->state == CS_READ && c->eof) {
		eof_check(c);
	} else if (c->state == CS_READ) {
		conn_retime(c);
	}
}

/* Queue bufs, writing what the socket takes at once. 0 or -EPIPE. */
static int conn_writev(gl_http_conn *c, uv_buf_t *b, unsigned nb)
{
	size_t total = 0, skip = 0;
	wreq *w;
	char *p;
	uv_buf_t one;

	if (c->state == CS_CLOSED)
		return -EPIPE;
	for (unsigned i = 0; i < nb; i++)
		total += b[i].len;
	if (!total)
		return 0;
	if (!c->queued) {
		int n = uv_try_write((uv_stream_t *)&c->pipe, b, nb);

		if (n >= 0 && (size_t)n == total)
			return 0;
		if (n < 0 && n != UV_EAGAIN) {
			conn_close(c);
			return -EPIPE;
		}
		if (n > 0)
			skip = (size_t)n;
	}
	w = malloc(sizeof(*w) + total - skip);
	if (!w) {
		conn_close(c);
		return -EPIPE;
	}
	p = w->data;
	for (unsigned i = 0; i < nb; i++) {
		size_t l = b[i].len;
		const char *s = b[i].base;

		if (skip >= l) {
			skip -= l;
			continue;
		}
		s += skip;
		l -= skip;
		skip = 0;
		memcpy(p, s, l);
		p += l;
	}
	w->c = c;
	w->len = (size_t)(p - w->data);
	one = uv_buf_init(w->data, (unsigned)w->len);
	if (uv_write(&w->req, (uv_stream_t *)&c->pipe, &one, 1, on_write)) {
		free(w);
		conn_close(c);
		return -EPIPE;
	}
	if (!c->queued) {
		c->queued = w->len;
		wlist_touch(c->s, c);
	} else {
		c->queued += w->len;
	}
	return 0;
}

static int conn_write(gl_http_conn *c, const void *p, size_t n)
{
	uv_buf_t b = uv_buf_init((char *)p, (unsigned)n);

	return conn_writev(c, &b, 1);
}

size_t gl_http_queued(const gl_http_conn *c)
{
	return c->queued;
}

/* A pre-routing error: Go writes it raw and hangs up. */
static void raw_error(gl_http_conn *c, const char *status, const char *body)
{
	gl_buf *b = &c->s->out;

	gl_buf_reset(b);
	if (!gl_buf_printf(b,
			   "HTTP/1.1 %s\r\nContent-Type: text/plain; charset=utf-8\r\n"
			   "Connection: close\r\n\r\n%s",
			   status, body))
		conn_write(c, b->data, b->len);
	c->phase = PH_DONE;
	conn_finish(c);
}

static void bad_request(gl_http_conn *c, const char *why)
{
	char line[128];

	if (!why) {
		raw_error(c, "400 Bad Request", "400 Bad Request");
		return;
	}
	snprintf(line, sizeof(line), "400 Bad Request: %s", why);
	raw_error(c, line, line);
}

/* ---- request state ----------------------------------------------------------- */

static void req_reset(gl_http_conn *c)
{
	c->phase = PH_LINE;
	/* keep small buffers for the next request, give big ones back */
	if (c->head.cap > 4096)
		gl_buf_free(&c->head);
	if (c->aux.cap > 4096)
		gl_buf_free(&c->aux);
	if (c->body.cap > 4096)
		gl_buf_free(&c->body);
	gl_buf_reset(&c->head);
	gl_buf_reset(&c->aux);
	gl_buf_reset(&c->body);
	c->noffs = 0;
	memset(&c->req, 0, sizeof(c->req));
	c->head_bytes = c->body_limit = c->body_seen = 0;
	c->value_last = c->hdr_done = c->msg_done = c->body_stop = c->body_bad = false;
	c->too_big = c->expect_continue = c->expect_unmet = c->options_star = false;
	c->wants10ka = c->wants_close = false;
	c->stream_left = -1;
	c->more = NULL;
	c->cancel = NULL;
}

const char *gl_http_req_get(const gl_http_req *r, const char *name, size_t *len)
{
	for (size_t i = 0; i < r->nfields; i++) {
		if (eqfold(r->fields[i].name, r->fields[i].nlen, name)) {
			if (len)
				*len = r->fields[i].vlen;
			return r->fields[i].value;
		}
	}
	return NULL;
}

int gl_http_req_join(const gl_http_req *r, const char *name, gl_buf *out)
{
	int n = 0;

	for (size_t i = 0; i < r->nfields; i++) {
		if (!eqfold(r->fields[i].name, r->fields[i].nlen, name))
			continue;
		if ((n && gl_buf_adds(out, ", ")) ||
		    gl_buf_add(out, r->fields[i].value, r->fields[i].vlen))
			return -ENOMEM;
		n++;
	}
	return n;
}

static int count_fields(const gl_http_req *r, const char *name)
{
	int n = 0;

	for (size_t i = 0; i < r->nfields; i++)
		if (eqfold(r->fields[i].name, r->fields[i].nlen, name))
			n++;
	return n;
}

/* ---- responses ------------------------------------------------------------- */

static bool body_allowed(int status)
{
	return !((status >= 100 && status <= 199) || status == 204 || status == 304);
}

static void finish_request(gl_http_conn *c);

static char *put(char *p, const char *s, size_t n)
{
	memcpy(p, s, n);
	return p + n;
}

static char *put_u64(char *p, uint64_t v)
{
	char tmp[24];
	int n = 0;

	do {
		tmp[n++] = (char)('0' + v % 10);
		v /= 10;
	} while (v);
	while (n)
		*p++ = tmp[--n];
	return p;
}

/* Build and send a response head (and body) the way net/http's
 * chunkWriter.writeHeader does for a handler that is done (`done`) or that
 * streams with its own Content-Length. */
static int send_response(gl_http_conn *c, int status, const gl_http_hdr *h, size_t nh,
			 const void *body, size_t len, bool done)
{
	gl_buf *b = &c->s->out;
	const gl_http_req *r = &c->req;
	bool is11 = r->major > 1 || (r->major == 1 && r->minor >= 1);
	bool allowed = body_allowed(status), explicit_cl = false, auto_cl, has_cl, chunked = false;
	const char *conn_hdr = NULL, *conn_val = NULL, *text = gl_http_status_text(status);
	bool drop_conn_hdr = false;
	char date[30];
	char chunk_head[24];
	uv_buf_t bufs[4];
	unsigned nb = 0;
	size_t need;
	char *p;

	if (c->state == CS_CLOSED || c->state == CS_LINGER)
		return -EPIPE;
	for (size_t i = 0; i < nh; i++) {
		if (strcasecmp(h[i].name, "Content-Length") == 0)
			explicit_cl = true;
		else if (strcasecmp(h[i].name, "Connection") == 0 && !conn_hdr)
			conn_hdr = h[i].value;
	}
	auto_cl = done && allowed && !explicit_cl && (!r->head || len > 0) &&
		  len <= GO_CHUNKING_SIZE;
	has_cl = explicit_cl || auto_cl;
	if (c->wants10ka && (r->head || has_cl || !allowed)) {
		if (!conn_hdr)
			conn_val = "keep-alive";
	} else if (!is11 || c->wants_close) {
		c->close_after = true;
	}
	if (conn_hdr && strcmp(conn_hdr, "close") == 0)
		c->close_after = true;
	if (c->expect_unmet)
		c->close_after = true;
	if (c->too_big) {
		c->close_after = true;
		drop_conn_hdr = true;
		conn_val = "close";
	}
	if (r->head || !allowed || status == 204 || has_cl) {
		/* no framing needed */
	} else if (is11) {
		chunked = true;
	} else {
		c->close_after = true;
	}
	if (c->close_after && !(conn_hdr && gl_http_has_token(conn_hdr, strlen(conn_hdr), "close"))) {
		drop_conn_hdr = true;
		if (is11)
			conn_val = "close";
	}

	/* the head, built with plain copies: this runs for every response */
	need = 64 + 37 + 40 + 24 + 32;
	for (size_t i = 0; i < nh; i++)
		need += strlen(h[i].name) + strlen(h[i].value) + 4;
	gl_buf_reset(b);
	if (gl_buf_reserve(b, need)) {
		conn_close(c);
		return -EPIPE;
	}
	p = b->data;
	p = put(p, is11 ? "HTTP/1.1 " : "HTTP/1.0 ", 9);
	if (text && status >= 100 && status <= 999) {
		*p++ = (char)('0' + status / 100);
		*p++ = (char)('0' + status / 10 % 10);
		*p++ = (char)('0' + status % 10);
		*p++ = ' ';
		p = put(p, text, strlen(text));
	} else {
		p += snprintf(p, 48, "%03d status code %d", status % 1000, status % 1000);
	}
	p = put(p, "\r\n", 2);
	for (size_t i = 0; i < nh; i++) {
		if (drop_conn_hdr && strcasecmp(h[i].name, "Connection") == 0)
			continue;
		p = put(p, h[i].name, strlen(h[i].name));
		p = put(p, ": ", 2);
		p = put(p, h[i].value, strlen(h[i].value));
		p = put(p, "\r\n", 2);
	}
	gl_http_date(time(NULL), date);
	p = put(p, "Date: ", 6);
	p = put(p, date, 29);
	p = put(p, "\r\n", 2);
	if (auto_cl) {
		p = put(p, "Content-Length: ", 16);
		p = put_u64(p, len);
		p = put(p, "\r\n", 2);
	}
	if (conn_val) {
		p = put(p, "Connection: ", 12);
		p = put(p, conn_val, strlen(conn_val));
		p = put(p, "\r\n", 2);
	}
	if (chunked)
		p = put(p, "Transfer-Encoding: chunked\r\n", 28);
	p = put(p, "\r\n", 2);
	b->len = (size_t)(p - b->data);
	bufs[nb++] = uv_buf_init(b->data, (unsigned)b->len);
	if (!r->head && allowed && len) {
		if (chunked) {
			int k = snprintf(chunk_head, sizeof(chunk_head), "%zx\r\n", len);

			bufs[nb++] = uv_buf_init(chunk_head, (unsigned)k);
			bufs[nb++] = uv_buf_init((char *)body, (unsigned)len);
			bufs[nb++] = uv_buf_init((char *)"\r\n0\r\n\r\n", 7);
		} else {
			bufs[nb++] = uv_buf_init((char *)body, (unsigned)len);
		}
	} else if (chunked && done) {
		bufs[nb++] = uv_buf_init((char *)"0\r\n\r\n", 5);
	}
	return conn_writev(c, bufs, nb);
}

static bool in_request(const gl_http_conn *c)
{
	return c->state == CS_BUSY;
}

int gl_http_respond(gl_http_conn *c, int status, const gl_http_hdr *h, size_t nh,
		    const void *body, size_t len)
{
	int r;

	/* answered (or trying to): whatever happens to the connection now, the
	 * handler's pending work is over and must not be cancelled later */
	c->cancel = NULL;
	if (!in_request(c))
		return -EPIPE;
	r = send_response(c, status, h, nh, body, len, true);
	if (c->state == CS_CLOSED)
		return -EPIPE;
	finish_request(c);
	return r;
}

int gl_http_error(gl_http_conn *c, int status, const char *text)
{
	static const gl_http_hdr h[] = {{"Content-Type", "text/plain; charset=utf-8"},
					{"X-Content-Type-Options", "nosniff"}};
	gl_buf *tmp;
	size_t n = strlen(text);
	char small[256];
	int r;

	if (n + 2 <= sizeof(small)) {
		memcpy(small, text, n);
		small[n] = '\n';
		return gl_http_respond(c, status, h, 2, small, n + 1);
	}
	tmp = malloc(sizeof(*tmp));
	if (!tmp) {
		conn_close(c);
		return -EPIPE;
	}
	*tmp = (gl_buf)GL_BUF_INIT;
	if (gl_buf_add(tmp, text, n) || gl_buf_addc(tmp, '\n')) {
		gl_buf_free(tmp);
		free(tmp);
		conn_close(c);
		return -EPIPE;
	}
	r = gl_http_respond(c, status, h, 2, tmp->data, tmp->len);
	gl_buf_free(tmp);
	free(tmp);
	return r;
}

int gl_http_stream_begin(gl_http_conn *c, int status, const gl_http_hdr *h, size_t nh,
			 gl_http_more_fn more, void *arg)
{
	int r;

	c->cancel = NULL;
	if (!in_request(c))
		return -EPIPE;
	c->stream_left = -1;
	for (size_t i = 0; i < nh; i++)
		if (strcasecmp(h[i].name, "Content-Length") == 0)
			c->stream_left = strtoll(h[i].value, NULL, 10);
	if (c->stream_left < 0)
		return -EINVAL;
	r = send_response(c, status, h, nh, NULL, 0, false);
	if (r || c->state == CS_CLOSED)
		return -EPIPE;
	if (c->req.head || !body_allowed(status) || c->stream_left == 0) {
		finish_request(c);
		return 1;
	}
	c->state = CS_STREAM;
	c->more = more;
	c->more_arg = arg;
	c->need_more = true;
	defer_add(c);
	return 0;
}

int gl_http_stream_write(gl_http_conn *c, const void *p, size_t n)
{
	if (c->state != CS_STREAM)
		return -EPIPE;
	int r;

	if ((int64_t)n > c->stream_left)
		n = (size_t)c->stream_left;
	c->stream_left -= (int64_t)n;
	r = conn_write(c, p, n);
	/* written at once: no write callback will ask for more */
	if (!r && c->state == CS_STREAM && c->more && c->queued < STREAM_LOW) {
		c->need_more = true;
		defer_add(c);
	}
	return r;
}

void gl_http_stream_end(gl_http_conn *c)
{
	c->cancel = NULL;
	if (c->state != CS_STREAM)
		return;
	c->more = NULL;
	/* a short body leaves the framing broken: the connection cannot go on */
	if (c->stream_left)
		c->close_after = true;
	c->state = CS_BUSY;
	finish_request(c);
}

void gl_http_set_cancel(gl_http_conn *c, void (*cancel)(void *arg), void *arg)
{
	c->cancel = cancel;
	c->cancel_arg = arg;
}

/* ---- hijack ------------------------------------------------------------------ */

static void on_alloc(uv_handle_t *h, size_t hint, uv_buf_t *buf);
static void on_read(uv_stream_t *st, ssize_t nread, const uv_buf_t *buf);

uv_stream_t *gl_http_hijack(gl_http_conn *c, const char **rest, size_t *nrest)
{
	if (!in_request(c))
		return NULL;
	if (c->reading) {
		uv_read_stop((uv_stream_t *)&c->pipe);
		c->reading = false;
	}
	c->state = CS_HIJACK;
	c->cancel = NULL;
	conn_retime(c);
	*rest = c->rest ? c->rest : "";
	*nrest = c->nrest;
	return (uv_stream_t *)&c->pipe;
}

int gl_http_watch(gl_http_conn *c, void (*on_input)(gl_http_conn *c, void *arg), void *arg)
{
	if (c->state != CS_HIJACK)
		return -EPIPE;
	c->on_input = on_input;
	c->input_arg = arg;
	if (!c->reading) {
		int r = uv_read_start((uv_stream_t *)&c->pipe, on_alloc, on_read);

		if (r)
			return r;
		c->reading = true;
	}
	return 0;
}

int gl_http_raw_write(gl_http_conn *c, const void *p, size_t n)
{
	if (c->state != CS_HIJACK)
		return -EPIPE;
	if (c->queued > c->s->lim.max_queued) {
		conn_close(c);
		return -ENOBUFS;
	}
	return conn_write(c, p, n);
}

/* ---- request parsing ---------------------------------------------------------- */

static int cb_header_field(http_parser *p, const char *at, size_t len)
{
	gl_http_conn *c = p->data;

	/* http-parser reports a chunked body's trailer fields through these
	 * callbacks too. They must not grow c->head: the request's pointers
	 * point into it by now. No handler asks for trailers (Go keeps them
	 * from handlers that do not), so they are dropped. */
	if (c->hdr_done)
		return 0;
	if (c->value_last || c->noffs == 0) {
		if (c->noffs == c->capoffs) {
			size_t ncap = c->capoffs ? c->capoffs * 2 : 16;
			foff *n = realloc(c->offs, ncap * sizeof(*n));

			if (!n)
				return 1;
			c->offs = n;
			c->capoffs = ncap;
		}
		c->offs[c->noffs++] = (foff){c->head.len, 0, c->head.len, 0};
		c->value_last = false;
	}
	if (gl_buf_add(&c->head, at, len))
		return 1;
	c->offs[c->noffs - 1].nl += len;
	return 0;
}

static int cb_header_value(http_parser *p, const char *at, size_t len)
{
	gl_http_conn *c = p->data;
	foff *f;

	if (c->hdr_done)
		return 0; /* a trailer: see cb_header_field */
	if (!c->noffs)
		return 1;
	f = &c->offs[c->noffs - 1];
	if (!c->value_last) {
		f->vo = c->head.len;
		f->vl = 0;
		c->value_last = true;
	}
	if (gl_buf_add(&c->head, at, len))
		return 1;
	f->vl += len;
	return 0;
}

static int cb_headers_complete(http_parser *p)
{
	gl_http_conn *c = p->data;

	c->hdr_done = true;
	http_parser_pause(p, 1);
	return 0;
}

static int cb_body(http_parser *p, const char *at, size_t len)
{
	gl_http_conn *c = p->data;

	c->body_seen += len;
	if (c->body_limit) {
		size_t room = c->body_limit - c->body.len;

		if (len > room) {
			/* keep what fits, answer now and hang up after */
			if (gl_buf_add(&c->body, at, room))
				return 1;
			c->req.body_over = true;
			c->body_stop = true;
			http_parser_pause(p, 1);
			return 0;
		}
		return gl_buf_add(&c->body, at, len) ? 1 : 0;
	}
	if (c->body_seen > GO_DISCARD_MAX) {
		/* Go discards at most 256 KiB after the handler, then gives up on
		 * the connection */
		c->too_big = true;
		c->body_stop = true;
		http_parser_pause(p, 1);
	}
	return 0;
}

static int cb_message_complete(http_parser *p)
{
	gl_http_conn *c = p->data;

	c->msg_done = true;
	http_parser_pause(p, 1);
	return 0;
}

static bool valid_host(const char *h, size_t n)
{
	for (size_t i = 0; i < n; i++) {
		unsigned char c = (unsigned char)h[i];

		if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9'))
			continue;
		if (!c || !strchr("!$%&()*+,-.:;=['~]_", c))
			return false;
	}
	return true;
}

static bool valid_value(const char *v, size_t n)
{
	for (size_t i = 0; i < n; i++) {
		unsigned char c = (unsigned char)v[i];

		if ((c < 0x20 && c != '\t') || c == 0x7f)
			return false;
	}
	return true;
}

static void line_save(gl_http_conn *c);

/* The request line, in c->head: Go's parseRequestLine, validMethod,
 * ParseHTTPVersion and url.ParseRequestURI. 0, or -1 after answering. */
static int parse_request_line(gl_http_conn *c)
{
	gl_http_req *r = &c->req;
	char *line = c->head.data;
	size_t len = c->head.len - 1; /* without the LF */
	char *sp1, *sp2, *proto;
	size_t plen;
	int rc;

	if (len && line[len - 1] == '\r')
		len--;
	sp1 = memchr(line, ' ', len);
	sp2 = sp1 ? memchr(sp1 + 1, ' ', len - (size_t)(sp1 + 1 - line)) : NULL;
	if (!sp2) {
		bad_request(c, NULL);
		return -1;
	}
	r->method = line;
	r->method_len = (size_t)(sp1 - line);
	r->target = sp1 + 1;
	r->target_len = (size_t)(sp2 - sp1 - 1);
	proto = sp2 + 1;
	plen = len - (size_t)(proto - line);
	if (!r->method_len) {
		bad_request(c, NULL);
		return -1;
	}
	for (size_t i = 0; i < r->method_len; i++) {
		if (!is_tchar((unsigned char)line[i])) {
			bad_request(c, NULL);
			return -1;
		}
	}
	if (plen == 8 && memcmp(proto, "HTTP/", 5) == 0 && proto[5] >= '0' && proto[5] <= '9' &&
	    proto[6] == '.' && proto[7] >= '0' && proto[7] <= '9') {
		r->major = proto[5] - '0';
		r->minor = proto[7] - '0';
	} else {
		bad_request(c, NULL);
		return -1;
	}
	if (gl_url_parse_request(r->target, r->target_len, &r->url)) {
		bad_request(c, NULL);
		return -1;
	}
	/* NUL-terminate method and target in place */
	*sp1 = '\0';
	*sp2 = '\0';
	r->head = r->method_len == 4 && memcmp(r->method, "HEAD", 4) == 0;
	c->options_star = r->url.star && r->method_len == 7 && memcmp(r->method, "OPTIONS", 7) == 0;
	gl_buf_reset(&c->aux);
	rc = gl_url_paths_into(&r->url, &c->aux, &r->path_len, &r->epath_len, &r->raw_kept);
	if (rc == -EINVAL) {
		bad_request(c, NULL);
		return -1;
	}
	if (rc) {
		conn_close(c);
		return -1;
	}
	r->path = c->aux.data;
	r->epath = c->aux.data + r->path_len + 1;
	line_save(c);
	return 0;
}

static void dispatch(gl_http_conn *c, const char *rest, size_t nrest);

/* The request line's pointers point into c->head, which grows (and may
 * move) while headers arrive: keep them as offsets until the head is in. */
static const char **line_ptr(gl_http_req *r, int k)
{
	switch (k) {
	case 0: return &r->method;
	case 1: return &r->target;
	case 2: return &r->url.scheme;
	case 3: return &r->url.authority;
	case 4: return &r->url.raw_path;
	default: return &r->url.query;
	}
}

static void line_save(gl_http_conn *c)
{
	for (int k = 0; k < 6; k++) {
		const char *p = *line_ptr(&c->req, k);

		c->line_offs[k] = p ? (size_t)(p - c->head.data) : SIZE_MAX;
	}
}

static void line_rebase(gl_http_conn *c)
{
	for (int k = 0; k < 6; k++)
		if (c->line_offs[k] != SIZE_MAX)
			*line_ptr(&c->req, k) = c->head.data + c->line_offs[k];
}

/* Everything Go checks once the head is read, in its order. 0 to go on,
 * -1 after answering. */
static int head_checks(gl_http_conn *c)
{
	gl_http_req *r = &c->req;
	const char *v, *first_conn;
	size_t vl, fl = 0;
	int hosts, te;
	bool is11 = r->major > 1 || (r->major == 1 && r->minor >= 1);
	bool any_close = false, any_ka = false, body;

	if (c->noffs > c->capfields) {
		gl_http_field *n = realloc(c->fields, c->noffs * sizeof(*n));

		if (!n) {
			conn_close(c);
			return -1;
		}
		c->fields = n;
		c->capfields = c->noffs;
	}
	for (size_t i = 0; i < c->noffs; i++) {
		const char *val = c->head.data + c->offs[i].vo;
		size_t vlen = c->offs[i].vl;

		gl_http_trim(&val, &vlen);
		c->fields[i] = (gl_http_field){c->head.data + c->offs[i].no, c->offs[i].nl, val, vlen};
	}
	r->fields = c->fields;
	r->nfields = c->noffs;
	line_rebase(c);

	hosts = count_fields(r, "Host");
	te = count_fields(r, "Transfer-Encoding");
	if (te) {
		v = gl_http_req_get(r, "Transfer-Encoding", &vl);
		if (te != 1 || !eqfold(v, vl, "chunked")) {
			raw_error(c, "501 Not Implemented", "Unsupported transfer encoding");
			return -1;
		}
	}
	if (r->major != 1) {
		const char *t = "505 HTTP Version Not Supported: unsupported protocol version";

		raw_error(c, t, t);
		return -1;
	}
	if (is11 && !hosts) {
		bad_request(c, "missing required Host header");
		return -1;
	}
	if (hosts > 1) {
		bad_request(c, "too many Host headers");
		return -1;
	}
	v = gl_http_req_get(r, "Host", &vl);
	if (v && !valid_host(v, vl)) {
		bad_request(c, "malformed Host header");
		return -1;
	}
	for (size_t i = 0; i < r->nfields; i++) {
		bool name_ok = r->fields[i].nlen > 0;

		/* http-parser lets blanks into names; Go does not */
		for (size_t k = 0; k < r->fields[i].nlen && name_ok; k++)
			name_ok = is_tchar((unsigned char)r->fields[i].name[k]);
		if (!name_ok) {
			bad_request(c, "invalid header name");
			return -1;
		}
		if (!valid_value(r->fields[i].value, r->fields[i].vlen)) {
			bad_request(c, "invalid header value");
			return -1;
		}
	}

	/* Connection: Go's Request.Close, wantsClose and wantsHttp10KeepAlive */
	first_conn = gl_http_req_get(r, "Connection", &fl);
	for (size_t i = 0; i < r->nfields; i++) {
		if (!eqfold(r->fields[i].name, r->fields[i].nlen, "Connection"))
			continue;
		any_close |= gl_http_has_token(r->fields[i].value, r->fields[i].vlen, "close");
		any_ka |= gl_http_has_token(r->fields[i].value, r->fields[i].vlen, "keep-alive");
	}
	if (r->minor == 0)
		c->wants_close = any_close || !any_ka;
	else
		c->wants_close = any_close;
	if (first_conn && gl_http_has_token(first_conn, fl, "close"))
		c->wants_close = true;
	c->wants10ka = r->minor == 0 && first_conn && gl_http_has_token(first_conn, fl, "keep-alive");

	body = (c->parser.flags & F_CHUNKED) ||
	       (c->parser.content_length > 0 && c->parser.content_length != ULLONG_MAX);
	v = gl_http_req_get(r, "Expect", &vl);
	if (v && gl_http_has_token(v, vl, "100-continue")) {
		c->expect_continue = is11 && body;
	} else if (v && vl) {
		static const gl_http_hdr h[] = {{"Connection", "close"}};

		c->state = CS_BUSY;
		c->phase = PH_DONE;
		gl_http_respond(c, 417, h, 1, NULL, 0);
		return -1;
	}
	c->body_limit = 0;
	if (!c->options_star && c->s->h.body_limit)
		c->body_limit = c->s->h.body_limit(c, r, c->s->arg);
	if (c->expect_continue) {
		if (c->body_limit) {
			static const char cont[] = "HTTP/1.1 100 Continue\r\n\r\n";

			conn_write(c, cont, sizeof(cont) - 1);
		} else {
			/* Go never asks for a body nobody reads: answer now, then the
			 * connection is in an unknown state and must end */
			c->expect_unmet = true;
			dispatch(c, NULL, 0);
			return -1;
		}
	}
	return 0;
}

static void map_parse_error(gl_http_conn *c, enum http_errno e)
{
	if (c->phase == PH_BODY) {
		/* Go has answered by now; the unread rest of the body makes the
		 * connection unusable */
		c->req.body_bad = true;
		c->body_stop = true;
		dispatch(c, NULL, 0);
		return;
	}
	switch (e) {
	case HPE_INVALID_TRANSFER_ENCODING:
		raw_error(c, "501 Not Implemented", "Unsupported transfer encoding");
		break;
	case HPE_HEADER_OVERFLOW:
		raw_error(c, "431 Request Header Fields Too Large", "431 Request Header Fields Too Large");
		break;
	case HPE_CB_header_field:
	case HPE_CB_header_value:
	case HPE_CB_body:
		conn_close(c); /* out of memory */
		break;
	default:
		bad_request(c, NULL);
	}
}

static void too_large(gl_http_conn *c)
{
	raw_error(c, "431 Request Header Fields Too Large", "431 Request Header Fields Too Large");
}

static ssize_t step_line(gl_http_conn *c, const char *p, size_t n)
{
	static const char canon[] = "GET / HTTP/1.1\r\n";
	const char *lf = memchr(p, '\n', n);
	size_t take = lf ? (size_t)(lf - p) + 1 : n;

	if (c->head_bytes + take > c->s->lim.max_header_bytes) {
		too_large(c);
		return -1;
	}
	c->head_bytes += take;
	if (gl_buf_add(&c->head, p, take)) {
		conn_close(c);
		return -1;
	}
	if (!lf)
		return (ssize_t)take;
	if (parse_request_line(c))
		return -1;
	http_parser_init(&c->parser, HTTP_REQUEST);
	c->parser.data = c;
	/* control bytes in values are Go's "invalid header value", checked
	 * later in Go's order; a Content-Length beside chunked is allowed */
	c->parser.lenient_http_headers = 1;
	c->parser.allow_chunked_length = 1;
	http_parser_execute(&c->parser, &settings, canon, sizeof(canon) - 1);
	c->phase = PH_HEAD;
	return (ssize_t)take;
}

static ssize_t step_parser(gl_http_conn *c, const char *p, size_t n)
{
	size_t k = http_parser_execute(&c->parser, &settings, p, n);
	enum http_errno e = HTTP_PARSER_ERRNO(&c->parser);

	if (c->phase == PH_HEAD) {
		c->head_bytes += k;
		if (c->head_bytes > c->s->lim.max_header_bytes) {
			too_large(c);
			return -1;
		}
	}
	if (e == HPE_OK)
		return (ssize_t)k;
	if (e != HPE_PAUSED) {
		map_parse_error(c, e);
		return -1;
	}
	http_parser_pause(&c->parser, 0);
	if (c->phase == PH_HEAD && c->hdr_done) {
		c->phase = PH_BODY;
		conn_retime(c);
		if (head_checks(c))
			return -1;
		return (ssize_t)k;
	}
	if (c->msg_done || c->body_stop)
		dispatch(c, p + k, n - k);
	return (ssize_t)k;
}

static void options_star(gl_http_conn *c)
{
	static const gl_http_hdr h[] = {{"Content-Length", "0"}};

	gl_http_respond(c, 200, h, 1, NULL, 0);
}

static void dispatch(gl_http_conn *c, const char *rest, size_t nrest)
{
	gl_http_req *r = &c->req;

	c->state = CS_BUSY;
	if (!c->msg_done) {
		/* answered before the body was all read: whatever remains on the
		 * wire must not be parsed as another request */
		c->close_after = true;
	}
	c->phase = PH_DONE;
	conn_retime(c);
	r->body = c->body.data ? c->body.data : "";
	r->body_len = c->body.len;
	c->rest = rest;
	c->nrest = nrest;
	if (c->options_star)
		options_star(c);
	else
		c->s->h.request(c, r, c->s->arg);
	c->rest = NULL;
	c->nrest = 0;
}

static bool can_parse(const gl_http_conn *c)
{
	return c->state == CS_READ && !c->close_after && c->queued < HIGH_WATER;
}

/* EOF seen and nothing more can be parsed: hang up once the output is out. */
static void eof_check(gl_http_conn *c)
{
	if (c->state != CS_READ || !c->eof)
		return;
	if (!can_parse(c) && c->in.len)
		return; /* waiting for our own output to drain; resumed later */
	if (c->phase == PH_BODY && !c->msg_done) {
		/* the body was cut short by the client's EOF: Go has called the
		 * handler already, its body read fails with io.ErrUnexpectedEOF,
		 * and it answers (the client may still be reading) */
		c->req.body_bad = true;
		c->body_stop = true;
		dispatch(c, NULL, 0);
		return;
	}
	if (!c->queued)
		conn_close(c);
	else
		conn_finish(c);
}

static void feed(gl_http_conn *c, const char *p, size_t n, bool from_in)
{
	size_t off = 0;

	c->in_feed = true;
	while (off < n && can_parse(c)) {
		ssize_t k = c->phase == PH_LINE ? step_line(c, p + off, n - off)
						: step_parser(c, p + off, n - off);

		if (k < 0)
			break;
		off += (size_t)k;
	}
	c->in_feed = false;
	if (c->state == CS_CLOSED || c->state == CS_LINGER || c->state == CS_HIJACK) {
		/* nothing after this point is ever parsed (a hijacker has already
		 * taken the rest) */
		c->in.len = 0;
		return;
	}
	if (c->phase == PH_DONE && c->close_after) {
		c->in.len = 0;
	} else if (from_in) {
		memmove(c->in.data, c->in.data + off, n - off);
		c->in.len = n - off;
	} else if (off < n && gl_buf_add(&c->in, p + off, n - off)) {
		conn_close(c);
		return;
	}
	if (c->reading && c->in.len > MAX_INBUF) {
		uv_read_stop((uv_stream_t *)&c->pipe);
		c->reading = false;
	}
	if (c->eof) {
		eof_check(c);
		if (c->state == CS_CLOSED || c->state == CS_LINGER)
			return;
	}
	conn_retime(c);
}

/* The current request is answered: go on with the next one or hang up. */
static void finish_request(gl_http_conn *c)
{
	if (c->state == CS_CLOSED || c->state == CS_LINGER)
		return;
	c->cancel = NULL;
	if (c->close_after) {
		conn_finish(c);
		return;
	}
	req_reset(c);
	c->state = CS_READ;
	if (!c->reading && c->in.len <= MAX_INBUF && !c->eof) {
		if (!uv_read_start((uv_stream_t *)&c->pipe, on_alloc, on_read))
			c->reading = true;
	}
	if (c->in_feed)
		return; /* the parse loop in progress goes on by itself */
	if (c->in.len) {
		c->need_resume = true;
		defer_add(c);
	} else if (c->eof) {
		eof_check(c);
		if (c->state != CS_READ)
			return;
	}
	conn_retime(c);
}

/* ---- reading --------------------------------------------------------------------- */

static void on_alloc(uv_handle_t *h, size_t hint, uv_buf_t *buf)
{
	gl_http_conn *c = conn_of(h);

	buf->base = c->s->rbuf;
	buf->len = RBUF_SIZE;
}

static void on_read(uv_stream_t *st, ssize_t nread, const uv_buf_t *buf)
{
	gl_http_conn *c = conn_of(st);

	if (nread == 0 || c->state == CS_CLOSED)
		return;
	if (c->state == CS_HIJACK) {
		void (*fn)(gl_http_conn *, void *) = c->on_input;

		uv_read_stop(st);
		c->reading = false;
		c->on_input = NULL;
		if (fn)
			fn(c, c->input_arg);
		return;
	}
	if (nread < 0) {
		uv_read_stop(st);
		c->reading = false;
		c->eof = true;
		if (c->state == CS_LINGER) {
			conn_close(c);
		} else if (c->state == CS_READ) {
			/* complete requests already buffered are still answered */
			if (c->in.len && can_parse(c))
				feed(c, c->in.data, c->in.len, true);
			else
				eof_check(c);
		}
		return;
	}
	if (c->state == CS_LINGER)
		return; /* discarded */
	if (c->in.len) {
		if (gl_buf_add(&c->in, buf->base, (size_t)nread)) {
			conn_close(c);
			return;
		}
		if (can_parse(c)) {
			feed(c, c->in.data, c->in.len, true);
			return;
		}
	} else if (can_parse(c)) {
		feed(c, buf->base, (size_t)nread, false);
		return;
	} else if (gl_buf_add(&c->in, buf->base, (size_t)nread)) {
		conn_close(c);
		return;
	}
	if (c->reading && c->in.len > MAX_INBUF) {
		uv_read_stop(st);
		c->reading = false;
	}
	conn_retime(c);
}

/* ---- deferred work, timers ----------------------------------------------------------- */

static void on_defer(uv_timer_t *t)
{
	gl_http_server *s = t->data;

	while (s->dhead) {
		gl_http_conn *c = s->dhead;

		s->dhead = c->dnext;
		c->dnext = NULL;
		c->deferred = false;
		if (c->state == CS_CLOSED)
			continue;
		if (c->need_more) {
			c->need_more = false;
			if (c->state == CS_STREAM && c->more)
				c->more(c, c->more_arg);
		}
		if (c->need_resume) {
			c->need_resume = false;
			if (c->state == CS_READ && can_parse(c) && c->in.len)
				feed(c, c->in.data, c->in.len, true);
			if (c->state == CS_READ && !c->reading && !c->eof && c->in.len <= MAX_INBUF &&
			    !uv_read_start((uv_stream_t *)&c->pipe, on_alloc, on_read))
				c->reading = true;
		}
	}
}

static void defer_add(gl_http_conn *c)
{
	gl_http_server *s = c->s;

	if (c->deferred)
		return;
	c->deferred = true;
	c->dnext = s->dhead;
	s->dhead = c;
	uv_timer_start(&s->defer, on_defer, 0, 0);
}

static void on_sweep(uv_timer_t *t)
{
	gl_http_server *s = t->data;
	uint64_t now = uv_now(s->loop);
	bool any = false;

	for (int l = L_IDLE; l < L_COUNT; l++) {
		gl_http_conn *c;

		while ((c = s->lists[l].head) && c->deadline <= now)
			conn_close(c);
		any |= s->lists[l].head != NULL && s->lists[l].head->deadline != UINT64_MAX;
	}
	while (s->wlist.head && s->wlist.head->wdeadline <= now)
		conn_close(s->wlist.head);
	any |= s->wlist.head != NULL;
	if (!any) {
		uv_timer_stop(&s->sweep);
		s->sweeping = false;
	}
}

static void sweep_arm(gl_http_server *s)
{
	if (s->sweeping || s->stopping)
		return;
	s->sweeping = true;
	uv_timer_start(&s->sweep, on_sweep, s->tick, s->tick);
}

/* ---- accepting ------------------------------------------------------------------------- */

static gl_http_conn *conn_new(gl_http_server *s)
{
	gl_http_conn *c = calloc(1, sizeof(*c));

	if (!c)
		return NULL;
	c->s = s;
	c->stream_left = -1;
	uv_pipe_init(s->loop, &c->pipe, 0);
	c->next = s->conns;
	if (s->conns)
		s->conns->prev = c;
	s->conns = c;
	s->nconns++;
	return c;
}

/* Limits, the handler's accept, then reading. 0, or -errno when the
 * connection was turned away (it is closing then). */
static int conn_begin(gl_http_conn *c)
{
	gl_http_server *s = c->s;
	int r;

	if (s->nconns - s->nclosing > s->lim.max_conns) {
		/* full: the oldest idle connection makes room, else the new one
		 * is turned away */
		gl_http_conn *old = s->lists[L_IDLE].head;

		if (!old) {
			conn_close(c);
			return -EMFILE;
		}
		conn_close(old);
	}
	c->announced = true;
	if (s->h.accept && (r = s->h.accept(c, s->arg)) < 0) {
		conn_close(c);
		return r;
	}
	r = uv_read_start((uv_stream_t *)&c->pipe, on_alloc, on_read);
	if (r) {
		conn_close(c);
		return r;
	}
	c->reading = true;
	conn_retime(c);
	return 0;
}

static void on_connection(uv_stream_t *l, int status)
{
	gl_http_server *s = l->data;
	gl_http_conn *c;

	if (status < 0 || s->stopping)
		return;
	c = conn_new(s);
	if (!c)
		return;
	if (uv_accept(l, (uv_stream_t *)&c->pipe)) {
		conn_close(c);
		return;
	}
	conn_begin(c);
}

int gl_http_server_adopt(gl_http_server *s, int fd, gl_http_conn **out)
{
	gl_http_conn *c;
	int r;

	if (s->stopping) {
		close(fd);
		return -ESHUTDOWN;
	}
	c = conn_new(s);
	if (!c) {
		close(fd);
		return -ENOMEM;
	}
	r = uv_pipe_open(&c->pipe, fd);
	if (r) {
		/* the handle does not own fd yet */
		close(fd);
		conn_close(c);
		return r;
	}
	r = conn_begin(c);
	if (r)
		return r;
	if (out)
		*out = c;
	return 0;
}

/* ---- server ---------------------------------------------------------------------------- */

static void handle_closed(uv_handle_t *h)
{
	gl_http_server *s = h->data;

	s->open_handles--;
	maybe_done(s);
}

static void maybe_done(gl_http_server *s)
{
	if (!s->stopping || s->nconns || s->open_handles)
		return;
	if (s->done)
		s->done(s->done_arg);
	gl_buf_free(&s->out);
	free(s->rbuf);
	free(s->path);
	free(s);
}

static void settings_init(void)
{
	static bool once;

	if (once)
		return;
	once = true;
	http_parser_settings_init(&settings);
	settings.on_header_field = cb_header_field;
	settings.on_header_value = cb_header_value;
	settings.on_headers_complete = cb_headers_complete;
	settings.on_body = cb_body;
	settings.on_message_complete = cb_message_complete;
	/* our own limit (max_header_bytes) applies; the parser's must not bite first */
	http_parser_set_max_header_size(UINT32_MAX / 2);
}

static uint64_t min_nz(uint64_t a, uint64_t b)
{
	if (!a)
		return b;
	if (!b)
		return a;
	return a < b ? a : b;
}

/* mkdir -p of path's directory, mode 0755. 0 or -errno. */
static int make_parents(const char *path)
{
	char dir[PATH_MAX];
	size_t i, n = strlen(path);

	if (n >= sizeof(dir))
		return -ENAMETOOLONG;
	memcpy(dir, path, n + 1);
	for (i = 1; i < n; i++) {
		if (dir[i] != '/')
			continue;
		dir[i] = '\0';
		if (mkdir(dir, 0755) < 0 && errno != EEXIST)
			return -errno;
		dir[i] = '/';
	}
	return 0;
}

int gl_http_server_start(uv_loop_t *loop, const char *path, unsigned mode,
			 const gl_http_limits *lim, const gl_http_handler *h, void *arg,
			 gl_http_server **out, char *err, size_t errlen)
{
	gl_http_server *s;
	struct stat st;
	uint64_t t;
	int r;

	settings_init();
	if (path && strlen(path) >= sizeof(((struct sockaddr_un *)0)->sun_path)) {
		snprintf(err, errlen, "socket path too long: %s", path);
		return -ENAMETOOLONG;
	}
	/* the socket's directory (e.g. /run/guestlink) is made if missing;
	 * libuv would report a missing one as EACCES */
	r = path ? make_parents(path) : 0;
	if (r < 0) {
		snprintf(err, errlen, "cannot create the directory of %s: %s", path, strerror(-r));
		return r;
	}
	if (path && lstat(path, &st) == 0) {
		struct sockaddr_un sa = {.sun_family = AF_UNIX};
		int fd, live;

		if (!S_ISSOCK(st.st_mode)) {
			snprintf(err, errlen, "%s exists and is not a socket", path);
			return -EEXIST;
		}
		/* stale (nobody listening) is replaced; a live one is not ours */
		strcpy(sa.sun_path, path);
		fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
		live = fd >= 0 && (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) == 0 ||
				   errno == EAGAIN);
		if (fd >= 0)
			close(fd);
		if (live) {
			snprintf(err, errlen, "%s is in use by another server", path);
			return -EADDRINUSE;
		}
		unlink(path);
	}
	s = calloc(1, sizeof(*s));
	if (!s) {
		snprintf(err, errlen, "out of memory");
		return -ENOMEM;
	}
	s->rbuf = malloc(RBUF_SIZE);
	s->path = path ? strdup(path) : NULL;
	if (!s->rbuf || (path && !s->path)) {
		free(s->rbuf);
		free(s->path);
		free(s);
		snprintf(err, errlen, "out of memory");
		return -ENOMEM;
	}
	s->loop = loop;
	s->lim = *lim;
	s->h = *h;
	s->arg = arg;
	t = min_nz(min_nz(lim->header_timeout_ms, lim->idle_timeout_ms), LINGER_MS) / 4;
	s->tick = t < 10 ? 10 : t > 500 ? 500 : t;
	uv_pipe_init(loop, &s->listener, 0);
	s->listener.data = s;
	uv_timer_init(loop, &s->sweep);
	s->sweep.data = s;
	uv_timer_init(loop, &s->defer);
	s->defer.data = s;
	s->open_handles = 3;
	if (!path) {
		/* adopted connections only: the listener is never opened */
		uv_close((uv_handle_t *)&s->listener, handle_closed);
		*out = s;
		return 0;
	}
	r = uv_pipe_bind(&s->listener, path);
	if (r) {
		snprintf(err, errlen, "cannot bind %s: %s", path, uv_strerror(r));
		goto fail;
	}
	if (chmod(path, mode) < 0) {
		r = -errno;
		snprintf(err, errlen, "cannot chmod %s: %s", path, strerror(errno));
		unlink(path);
		goto fail;
	}
	r = uv_listen((uv_stream_t *)&s->listener, 4096, on_connection);
	if (r) {
		snprintf(err, errlen, "cannot listen on %s: %s", path, uv_strerror(r));
		unlink(path);
		goto fail;
	}
	*out = s;
	return 0;
fail:
	/* the handles close on the next loop turn; the server is freed then */
	s->stopping = true;
	s->listener.data = s;
	uv_close((uv_handle_t *)&s->listener, handle_closed);
	uv_close((uv_handle_t *)&s->sweep, handle_closed);
	uv_close((uv_handle_t *)&s->defer, handle_closed);
	return r;
}

void gl_http_server_stop(gl_http_server *s, void (*done)(void *arg), void *arg)
{
	gl_http_conn *c, *n;

	if (!s || s->stopping)
		return;
	s->stopping = true;
	s->done = done;
	s->done_arg = arg;
	if (s->path)
		unlink(s->path);
	for (c = s->conns; c; c = n) {
		n = c->next;
		if (c->state != CS_HIJACK)
			conn_close(c);
	}
	if (!uv_is_closing((uv_handle_t *)&s->listener))
		uv_close((uv_handle_t *)&s->listener, handle_closed);
	uv_close((uv_handle_t *)&s->sweep, handle_closed);
	uv_close((uv_handle_t *)&s->defer, handle_closed);
}

unsigned gl_http_server_nconns(const gl_http_server *s)
{
	return s->nconns - s->nclosing;
}

gl_http_conn *gl_http_server_oldest_idle(gl_http_server *s,
					 bool (*pred)(gl_http_conn *c, void *arg), void *arg)
{
	for (gl_http_conn *c = s->lists[L_IDLE].head; c; c = c->lnext)
		if (!pred || pred(c, arg))
			return c;
	return NULL;
}

uv_loop_t *gl_http_conn_loop(const gl_http_conn *c)
{
	return c->s->loop;
}

int gl_http_conn_fd(const gl_http_conn *c)
{
	uv_os_fd_t fd;

	if (uv_fileno((const uv_handle_t *)&c->pipe, &fd))
		return -1;
	return fd;
}

void *gl_http_conn_data(const gl_http_conn *c)
{
	return c->data;
}

void gl_http_conn_set_data(gl_http_conn *c, void *data)
{
	c->data = data;
}
