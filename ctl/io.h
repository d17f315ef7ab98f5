/* guestlinkctl's local byte streams on the libuv loop: a source (stdin or
 * a local file being pushed) read in chunks of at most GL_FRAME_CHUNK that
 * the caller can pause while the connection is over its high watermark,
 * and a sink (stdout, stderr, or a file being pulled) with a measured
 * queue the caller watches to pause the connection.
 *
 * Both are embedded in the caller's structure, which must outlive the
 * loop run: the handles are closed with no close callback. */
#ifndef GUESTLINK_CTL_IO_H
#define GUESTLINK_CTL_IO_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>
#include <uv.h>

typedef struct ctl_source ctl_source;

/* n > 0: p holds n bytes (borrowed for the call); n == 0: end of input;
 * n < 0: a read error (-errno). Nothing follows an end or an error. */
typedef void (*ctl_source_cb)(ctl_source *s, ssize_t n, const char *p, void *arg);

struct ctl_source {
	uv_loop_t *loop;
	int fd;
	bool stream; /* pipe, socket or tty read by the loop; else uv_fs_read */
	bool open, started, paused, inflight, ended;
	union {
		uv_handle_t handle;
		uv_stream_t stream;
		uv_pipe_t pipe;
		uv_tty_t tty;
	} u;
	uv_fs_t req;
	char *buf; /* GL_FRAME_CHUNK bytes, owned */
	ctl_source_cb cb;
	void *arg;
	uint64_t total; /* bytes delivered */
};

/* Read fd (not taken: closing the source does not close a file's fd, but a
 * pipe or tty handle owns its fd as libuv does). 0 or -errno. */
int ctl_source_open(ctl_source *s, uv_loop_t *loop, int fd, ctl_source_cb cb, void *arg);
void ctl_source_start(ctl_source *s);
/* Stop / resume delivering chunks (a chunk already being read is still
 * delivered for a file). */
void ctl_source_pause(ctl_source *s, bool paused);
/* Stop for good. Idempotent. */
void ctl_source_close(ctl_source *s);

typedef struct ctl_sink ctl_sink;
struct sink_chunk;

/* Runs after every completed write, and on the first write error. */
typedef void (*ctl_sink_cb)(ctl_sink *s, void *arg);

struct ctl_sink {
	uv_loop_t *loop;
	int fd;
	struct sink_chunk *head, *tail;
	size_t queued; /* bytes accepted and not yet written */
	bool busy;     /* a write is in flight */
	bool open;
	int err;       /* the first write error (-errno); later writes are dropped */
	uv_fs_t req;
	uv_timer_t retry; /* EAGAIN on a descriptor someone made non-blocking */
	ctl_sink_cb cb;
	void *arg;
	uint64_t written;
};

/* Write to fd (not taken) in order, one write at a time, from libuv's
 * threadpool (any kind of descriptor, blocking or not). 0 or -errno. */
int ctl_sink_open(ctl_sink *s, uv_loop_t *loop, int fd, ctl_sink_cb cb, void *arg);
/* Queue a copy of p. 0, -ENOMEM, or the sink's earlier write error. */
int ctl_sink_write(ctl_sink *s, const void *p, size_t n);
/* The same toward another descriptor, in the same order: one queue for an
 * exec's stdout and stderr keeps them interleaved as the command wrote
 * them when both are the same file (2>&1). */
int ctl_sink_write_fd(ctl_sink *s, int fd, const void *p, size_t n);
/* Nothing queued and no write in flight. */
bool ctl_sink_idle(const ctl_sink *s);
/* Drop what is queued and close the retry timer. Idempotent. */
void ctl_sink_close(ctl_sink *s);

#endif
