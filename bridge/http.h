/* An HTTP/1.x server on a Unix socket, on the libuv loop, with the wire
 * behaviour of Go 1.19's net/http server that LXD 5.0.2 runs
 * (specs/devlxd-api.md §2): the same pre-routing errors, header order,
 * Content-Length / one-chunk framing, keep-alive and Connection rules,
 * pipelining. Requests are parsed incrementally (nodejs http-parser for
 * headers and bodies, the request line by hand so that any token method is
 * accepted as Go does); no thread per connection.
 *
 * Ownership: the server owns its connections. A handler keeps a
 * gl_http_conn pointer only until its `closed` callback has run. A request
 * (gl_http_req and every pointer in it) stays valid until the response to
 * it is complete, the connection is hijacked, or the connection closes. */
#ifndef GUESTLINK_BRIDGE_HTTP_H
#define GUESTLINK_BRIDGE_HTTP_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>
#include <uv.h>

#include "bridge/url.h"
#include "core/buf.h"

typedef struct gl_http_server gl_http_server;
typedef struct gl_http_conn gl_http_conn;

/* A request header: name as sent, value trimmed (textproto). */
typedef struct gl_http_field {
	const char *name;
	size_t nlen;
	const char *value;
	size_t vlen;
} gl_http_field;

typedef struct gl_http_req {
	const char *method; /* any token, as sent ("get" is not "GET") */
	size_t method_len;
	const char *target; /* request-target as sent, NUL-terminated */
	size_t target_len;
	int major, minor;
	bool head; /* method is exactly "HEAD" */
	gl_url url;
	const char *path;  /* decoded path (Go's URL.Path), NUL-terminated */
	size_t path_len;
	const char *epath; /* escaped path the router matches (URL.EscapedPath) */
	size_t epath_len;
	bool raw_kept; /* Go kept URL.RawPath (for redirects) */
	const gl_http_field *fields;
	size_t nfields;
	const char *body; /* buffered body, only when the handler asked for it */
	size_t body_len;
	bool body_over; /* the body went over the handler's limit (not all kept) */
	bool body_bad;  /* the body's framing was broken (not all read) */
} gl_http_req;

/* The first value of header `name` (case-insensitive), NULL when absent;
 * *len set when not NULL. */
const char *gl_http_req_get(const gl_http_req *r, const char *name, size_t *len);
/* Every value of `name` joined with ", " appended to out. Returns how many
 * there were (0: absent), or -ENOMEM. */
int gl_http_req_join(const gl_http_req *r, const char *name, gl_buf *out);

/* A response header the handler sets. Handlers pass them sorted by name,
 * as Go writes its header map. */
typedef struct gl_http_hdr {
	const char *name;
	const char *value;
} gl_http_hdr;

typedef struct gl_http_limits {
	size_t max_header_bytes;    /* request line + headers; over it: 431 */
	size_t max_queued;          /* unsent output per connection; over it: closed */
	unsigned max_conns;         /* over it the oldest idle connection is closed */
	uint64_t header_timeout_ms; /* from the first byte of a request to its end
	                               (head and body); 0 = none */
	uint64_t idle_timeout_ms;   /* between requests; 0 = none */
} gl_http_limits;

typedef struct gl_http_handler {
	/* A connection was accepted. Return 0 to serve it, < 0 to refuse it
	 * (it is closed at once; `closed` still runs). */
	int (*accept)(gl_http_conn *c, void *arg);
	/* The head of a request is in. Return how many body bytes to keep for
	 * the handler (0: read and discard the body, as Go does for handlers
	 * that never read it). */
	size_t (*body_limit)(gl_http_conn *c, const gl_http_req *r, void *arg);
	/* A request to answer: with gl_http_respond / gl_http_error /
	 * gl_http_stream_begin, now or later, or by hijacking the connection.
	 * No other request of the connection is parsed until then. */
	void (*request)(gl_http_conn *c, gl_http_req *r, void *arg);
	/* The connection is gone (its handle closed, every write callback has
	 * run). The last call for c; c is freed after it returns. */
	void (*closed)(gl_http_conn *c, void *arg);
} gl_http_handler;

/* Listen on `path` (a stale socket file is replaced; anything else there is
 * an error) with permissions `mode`. path NULL: no listener, the server
 * serves only connections given to gl_http_server_adopt. 0 and *out, or
 * -errno and a message. */
int gl_http_server_start(uv_loop_t *loop, const char *path, unsigned mode,
			 const gl_http_limits *lim, const gl_http_handler *h, void *arg,
			 gl_http_server **out, char *err, size_t errlen);
/* Serve a connected stream socket that arrived some other way (a vsock
 * transport): takes ownership of `fd` in every case. The connection goes
 * through the same limits and the handler's `accept`, which runs inside
 * this call (so the caller can hand it context first). 0 and *out (may be
 * NULL), or -errno: the connection was refused or could not be set up
 * (when `accept` had run, `closed` still runs later). */
int gl_http_server_adopt(gl_http_server *s, int fd, gl_http_conn **out);
/* Stop accepting, remove the socket file, close every connection that is
 * not hijacked (hijacked ones are their owner's to close with
 * gl_http_close). `done` runs (from the loop) once every handle is closed;
 * the server is freed after it returns. */
void gl_http_server_stop(gl_http_server *s, void (*done)(void *arg), void *arg);
unsigned gl_http_server_nconns(const gl_http_server *s);
/* The connection idle the longest for which pred (NULL: any) holds, or
 * NULL. Idle: between requests, nothing pending. */
gl_http_conn *gl_http_server_oldest_idle(gl_http_server *s,
					 bool (*pred)(gl_http_conn *c, void *arg), void *arg);

uv_loop_t *gl_http_conn_loop(const gl_http_conn *c);
int gl_http_conn_fd(const gl_http_conn *c);
void *gl_http_conn_data(const gl_http_conn *c);
void gl_http_conn_set_data(gl_http_conn *c, void *data);
bool gl_http_conn_closing(const gl_http_conn *c);

/* Answer the current request with one body, framed as Go frames a handler
 * that wrote it in one call: Date, then Content-Length (body <= 2048 bytes),
 * or one chunk (HTTP/1.1) / no length and close (HTTP/1.0); HEAD gets the
 * head only; Connection as Go decides it. 0, or -EPIPE when the connection
 * is closing (nothing to do then). */
int gl_http_respond(gl_http_conn *c, int status, const gl_http_hdr *h, size_t nh,
		    const void *body, size_t len);
/* Go's http.Error(w, text, status): text/plain; charset=utf-8, nosniff,
 * body text + "\n". */
int gl_http_error(gl_http_conn *c, int status, const char *text);

/* Answer with a streamed body whose length the handler set in a
 * Content-Length header (file download). `more` runs (never from inside a
 * gl_http_* call) whenever the connection wants more data; the handler
 * answers with gl_http_stream_write (any number of times) and finally
 * gl_http_stream_end. For HEAD the stream ends at once and `more` never
 * runs. 0 or -EPIPE. */
typedef void (*gl_http_more_fn)(gl_http_conn *c, void *arg);
int gl_http_stream_begin(gl_http_conn *c, int status, const gl_http_hdr *h, size_t nh,
			 gl_http_more_fn more, void *arg);
int gl_http_stream_write(gl_http_conn *c, const void *p, size_t n);
void gl_http_stream_end(gl_http_conn *c);

/* A handler that answers later (commit pending, file being opened) says how
 * to forget the request if the connection closes first: `cancel` then runs
 * once, from `closed` time; it must stop using c. Cleared by any
 * gl_http_respond / gl_http_error / gl_http_stream_begin call (even one
 * that fails because the connection is closing) and by gl_http_stream_end. */
void gl_http_set_cancel(gl_http_conn *c, void (*cancel)(void *arg), void *arg);

/* Take the connection over (event streams). The HTTP layer stops reading
 * and parsing; `rest`/`nrest` are the bytes already read after the
 * request (borrowed until the next gl_http_* call on c). The stream stays
 * owned by the connection: close it with gl_http_close. */
uv_stream_t *gl_http_hijack(gl_http_conn *c, const char **rest, size_t *nrest);
/* On a hijacked connection: read again, and call on_input once for the
 * first byte that arrives or for EOF/error (LXD's plain event stream ends on
 * either). */
int gl_http_watch(gl_http_conn *c, void (*on_input)(gl_http_conn *c, void *arg), void *arg);
/* On a hijacked connection: queue raw bytes. 0, -EPIPE (closing), or
 * -ENOBUFS: over max_queued, the connection is being closed. */
int gl_http_raw_write(gl_http_conn *c, const void *p, size_t n);
size_t gl_http_queued(const gl_http_conn *c);
/* Close now (pending writes are dropped). Idempotent. */
void gl_http_close(gl_http_conn *c);
/* Close once everything queued is written (and the peer had a moment to
 * read it). */
void gl_http_close_flushed(gl_http_conn *c);

/* IMF-fixdate for `t` (29 bytes + NUL); the current second is cached. */
void gl_http_date(time_t t, char out[30]);
const char *gl_http_status_text(int status);

#endif
