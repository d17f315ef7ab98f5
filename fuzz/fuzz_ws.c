/* The WebSocket frame layer (bridge/ws.c over wslay): the bytes a client
 * sends after the upgrade, on a session started on one end of a
 * socketpair.
 *
 * Input: byte 0 picks how the bytes are split into reads (fuzz_util.h),
 * byte 1 holds flags, byte 2 seeds the split sizes, the rest is the
 * client's bytes. Flags:
 *   bit 0  the server queues a short text message (an event) first
 *   bit 1  ... and one over frag_size (sent fragmented)
 *   bit 2  the server starts a clean close (1001) before the client writes
 *   bit 3  max_queued is tiny: sending overflows it (close 1008)
 * The session must end by itself once the client has half-closed and read
 * everything; every byte the server wrote must parse as server frames
 * (unmasked, control frames <= 125 bytes, after the 101 response). */
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
#include <uv.h>

#include "bridge/ws.h"
#include "fuzz/fuzz_util.h"

static uv_loop_t loop;
static char out[1 << 20];

typedef struct sess {
	uv_pipe_t pipe;
	gl_ws *ws;
	bool closed;     /* the session's `closed` ran */
	bool pipe_freed; /* the pipe handle is closed */
} sess;

static void check(bool ok, const char *what)
{
	if (!ok)
		fz_die(what);
}

static void on_pipe_closed(uv_handle_t *h)
{
	sess *s = h->data;

	s->pipe_freed = true;
}

static void on_closed(gl_ws *ws, void *arg)
{
	sess *s = arg;

	check(!s->closed, "closed called twice");
	s->closed = true;
	s->pipe.data = s;
	uv_close((uv_handle_t *)&s->pipe, on_pipe_closed);
}

/* The server's bytes: the 101 head, then well-formed server frames (a
 * trailing partial frame is allowed: the session may end mid-write). */
static void check_output(const char *p, size_t n)
{
	static const char head[] = "HTTP/1.1 101 Switching Protocols\r\n";
	const char *end = memmem(p, n, "\r\n\r\n", 4);
	size_t off;

	if (n == 0)
		return;
	check(n >= sizeof(head) - 1 ? memcmp(p, head, sizeof(head) - 1) == 0
				    : memcmp(p, head, n) == 0,
	      "output does not start with the 101 response");
	if (!end)
		return;
	off = (size_t)(end - p) + 4;
	while (off + 2 <= n) {
		unsigned char b0 = (unsigned char)p[off], b1 = (unsigned char)p[off + 1];
		uint64_t len = b1 & 0x7f;
		size_t hl = 2;

		check(!(b1 & 0x80), "server frame is masked");
		check((b0 & 0x70) == 0, "server frame has RSV bits");
		if (b0 & 0x08)
			check(len <= 125 && (b0 & 0x80), "bad server control frame");
		if (len == 126) {
			if (off + 4 > n)
				return;
			len = (uint64_t)(unsigned char)p[off + 2] << 8 | (unsigned char)p[off + 3];
			hl = 4;
		} else if (len == 127) {
			if (off + 10 > n)
				return;
			len = 0;
			for (int i = 0; i < 8; i++)
				len = len << 8 | (unsigned char)p[off + 2 + i];
			hl = 10;
		}
		off += hl;
		if (len > n - off)
			return;
		off += (size_t)len;
	}
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	static bool inited;
	static char big[6000];
	fz_drive_opts o = {0};
	size_t got = 0;
	gl_ws_opts wo;
	sess s = {0};
	int sv[2];
	unsigned flags;

	if (!inited) {
		inited = true;
		if (uv_loop_init(&loop))
			fz_die("uv_loop_init");
		memset(big, 'e', sizeof(big));
	}
	if (size < 3)
		return 0;
	flags = data[1];
	if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv))
		fz_die("socketpair");
	fcntl(sv[1], F_SETFL, fcntl(sv[1], F_GETFL) | O_NONBLOCK);
	uv_pipe_init(&loop, &s.pipe, 0);
	if (uv_pipe_open(&s.pipe, sv[0]))
		fz_die("uv_pipe_open");
	gl_ws_opts_default(&wo);
	wo.ping_interval_ms = 0; /* the first ping only: nothing depends on time */
	if (flags & 8)
		wo.max_queued = 64;
	s.ws = gl_ws_start(&loop, (uv_stream_t *)&s.pipe, "dGhlIHNhbXBsZSBub25jZQ==", NULL, 0,
			   &wo, on_closed, &s);
	check(s.ws != NULL, "gl_ws_start failed");
	if (flags & 1)
		gl_ws_send_text(s.ws, "{\"type\":\"config\"}\n", 18);
	if (flags & 2)
		gl_ws_send_text(s.ws, big, sizeof(big));
	if (flags & 4)
		gl_ws_close(s.ws, 1001);

	o.split = data[0];
	o.seed = data[2];
	o.out = out;
	o.out_cap = sizeof(out);
	o.out_len = &got;
	fz_drive(&loop, sv[1], data + 3, size - 3, &o);
	while (!s.closed || !s.pipe_freed) {
		uv_run(&loop, UV_RUN_NOWAIT);
		if (!s.closed || !s.pipe_freed)
			fz_wait(&loop, -1, 0, 10);
	}
	gl_ws_free(s.ws);
	check_output(out, got);
	return 0;
}
