/* A framed connection on the libuv loop: a stream socket (Unix, AF_VSOCK,
 * or a hybrid-vsock Unix socket after its handshake) that reads frames
 * (bridge/frame.h) and writes them with a bounded, measured queue.
 *
 * Back-pressure is the caller's: gl_fconn_queued() tells how much is
 * waiting to be written; `drain` runs when that fell back under the low
 * watermark after having gone over the high one. A relay pauses its
 * source with gl_fconn_pause() until then. Over `max_queued` (hard limit)
 * the connection is closed with -ENOBUFS.
 *
 * Never half-closes (specs/vsock.md §1.5): the end of a stream is a frame
 * flag, and closing is always a full close. */
#ifndef GUESTLINK_BRIDGE_FCONN_H
#define GUESTLINK_BRIDGE_FCONN_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "bridge/frame.h"

typedef struct gl_fconn gl_fconn;

typedef struct gl_fconn_cbs {
	/* A whole frame arrived. f->payload is borrowed for the call. The
	 * callback may send, pause, or close c (then no further frame is
	 * delivered). */
	void (*frame)(gl_fconn *c, const gl_frame *f, void *arg);
	/* Queued output went back under the low watermark. May be NULL. */
	void (*drain)(gl_fconn *c, void *arg);
	/* The connection is over: 0 after gl_fconn_close, -ECONNRESET / EOF
	 * as -EPIPE, -EMSGSIZE (oversize frame: an ERROR id 0 was sent first),
	 * -ENOBUFS (queue over max_queued), -ETIMEDOUT (idle/handshake timer),
	 * or a read error. Runs once, from the loop, never inside a gl_fconn_*
	 * call; c is freed after it returns. */
	void (*closed)(gl_fconn *c, int err, void *arg);
} gl_fconn_cbs;

typedef struct gl_fconn_opts {
	uint32_t max_payload; /* default GL_FRAME_MAX_AUTH (raise after AUTH_OK) */
	size_t high_water;    /* default 1 MiB */
	size_t low_water;     /* default 256 KiB */
	size_t max_queued;    /* default 64 MiB */
} gl_fconn_opts;

void gl_fconn_opts_default(gl_fconn_opts *o);

/* Take ownership of a connected stream socket `fd` (made non-blocking)
 * and start reading. `pre`/`npre`: bytes already read from fd that belong
 * to the stream (copied). opts NULL: defaults. Returns the connection or
 * NULL with -errno in *err (fd is then closed). */
gl_fconn *gl_fconn_new(uv_loop_t *loop, int fd, const void *pre, size_t npre,
		       const gl_fconn_opts *opts, const gl_fconn_cbs *cbs, void *arg, int *err);

/* Queue one frame (copied). 0, -EPIPE when the connection is closing,
 * -EMSGSIZE when n > GL_FRAME_MAX. A DATA longer than GL_FRAME_CHUNK is
 * the caller's to cut. */
int gl_fconn_send(gl_fconn *c, uint32_t id, uint8_t type, uint8_t flags, const void *p, size_t n);
/* Same with a JSON payload (borrowed). */
int gl_fconn_send_json(gl_fconn *c, uint32_t id, uint8_t type, uint8_t flags, const json_t *j);
/* Convenience: ERROR {error, errno} with END. */
int gl_fconn_send_error(gl_fconn *c, uint32_t id, int e, const char *msg);

size_t gl_fconn_queued(const gl_fconn *c);
bool gl_fconn_over_high(const gl_fconn *c); /* queued >= high_water */
/* Stop / resume delivering frames (and reading the socket). */
void gl_fconn_pause(gl_fconn *c, bool paused);
void gl_fconn_set_max_payload(gl_fconn *c, uint32_t max);
/* Close after `ms` without any frame received (0: no timer). Re-armed by
 * every frame. For handshake deadlines and idle limits. */
void gl_fconn_set_timeout(gl_fconn *c, uint64_t ms);

/* Close now; queued output is dropped. `closed` runs later with 0 (or
 * with the first error, if one was already pending). Idempotent. */
void gl_fconn_close(gl_fconn *c);
/* Close once everything queued is written (bounded by 2 s). */
void gl_fconn_close_flushed(gl_fconn *c);
bool gl_fconn_closing(const gl_fconn *c);

/* Give the connection new callbacks and argument (handing an established
 * connection from its dialer to its user). */
void gl_fconn_rebind(gl_fconn *c, const gl_fconn_cbs *cbs, void *arg);

void *gl_fconn_data(const gl_fconn *c);
void gl_fconn_set_data(gl_fconn *c, void *data);
int gl_fconn_fd(const gl_fconn *c);

#endif
