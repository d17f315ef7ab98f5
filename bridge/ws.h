/* A WebSocket server session (RFC 6455) on a stream that the HTTP layer
 * hands over after an upgrade request, behaving as LXD 5.0.2's event
 * WebSocket does (specs/devlxd-api.md §6.3, §6.4). Framing is wslay's.
 *
 * Ownership: the stream stays owned by its HTTP connection; the session
 * borrows it from gl_ws_start() until it calls `closed`, after which the
 * owner closes the stream and frees the session with gl_ws_free(). */
#ifndef GUESTLINK_BRIDGE_WS_H
#define GUESTLINK_BRIDGE_WS_H

#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "core/buf.h"

typedef struct gl_ws gl_ws;

typedef struct gl_ws_opts {
	uint64_t ping_interval_ms; /* 10000: LXD pings "keepalive" at once, then every 10 s */
	unsigned max_unanswered;   /* 2: a ping due with more unanswered drops the peer */
	size_t max_queued;         /* bytes of unsent messages; over it: close frame 1008, then close */
	size_t max_frame;          /* largest client frame accepted (clients only send control frames) */
	size_t frag_size;          /* 4082: payload per frame of a fragmented message */
} gl_ws_opts;

void gl_ws_opts_default(gl_ws_opts *o);

/* The checks of an upgrade request, in gorilla/websocket 1.5.0's order
 * (§6.3). Header values are NULL when absent. Returns 0 when the upgrade
 * may go ahead, else the HTTP status to answer (400 or 405); the caller
 * then sends LXD's two-line body (gl_ws_error_body). */
int gl_ws_check(const char *method, const char *connection, const char *upgrade,
		const char *version, const char *key);
/* "Bad Request\ninternal server error\n" or "Method Not Allowed\n..." */
const char *gl_ws_error_body(int status);
/* Sec-WebSocket-Accept for key: base64(SHA-1(key + GUID)); out has >= 29 bytes. */
void gl_ws_accept_key(const char *key, char out[29]);

/* Called once when the session is over (peer closed, protocol error, too
 * slow, gl_ws_close finished). The stream is no longer read or written by
 * the session; the owner closes it, then calls gl_ws_free(). */
typedef void (*gl_ws_closed_fn)(gl_ws *ws, void *arg);

/* Start a session on `stream` (borrowed, see above): writes the 101
 * response for `key`, sends the first ping, and from then on reads frames
 * (uv_read_start with its own callbacks; stream->data is the session's
 * until `closed`). `early`/`nearly`: bytes that arrived after the
 * handshake request before the 101 was sent; if any, the session closes
 * at once without a response (as Go does). Returns a new session or NULL. */
gl_ws *gl_ws_start(uv_loop_t *loop, uv_stream_t *stream, const char *key, const char *early,
		   size_t nearly, const gl_ws_opts *o, gl_ws_closed_fn closed, void *arg);

/* Queue one text message (an event line). 0, or -ENOBUFS when the queue
 * limit is exceeded (the session then sends close 1008 and ends), or
 * -EPIPE when the session is ending. */
int gl_ws_send_text(gl_ws *ws, const char *p, size_t n);
size_t gl_ws_queued(const gl_ws *ws);
/* Begin a clean close (close frame with `code`, e.g. 1001 at shutdown). */
void gl_ws_close(gl_ws *ws, uint16_t code);
void gl_ws_free(gl_ws *ws);

/* SHA-1 (RFC 3174): none of the project's libraries provide it and the
 * WebSocket handshake requires it. */
void gl_sha1(const void *data, size_t len, unsigned char out[20]);

#endif
