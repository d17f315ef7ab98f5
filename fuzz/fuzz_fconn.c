/* Control-channel frames on a live connection (bridge/fconn.c over
 * bridge/frame.c): what a peer (agent, host, guestlinkctl) sends, on one
 * end of a socketpair, read by a gl_fconn whose user echoes each frame.
 *
 * Input: byte 0 picks the read sizes (fuzz_util.h), byte 1 seeds them,
 * byte 2 is the number of bytes handed in as already read (`pre`, as after
 * the hybrid-vsock handshake), the rest is the stream. The user:
 *   AUTH_OK (3)  raises the payload limit to GL_FRAME_MAX, as after auth
 *   CANCEL (7)   closes flushed; ERROR (8): closes at once
 *   others       echoes the frame as a RESPONSE with the same id
 * Checks: the frames delivered are exactly those a gl_frame_reader
 * reference reads from the same bytes under the same limits, in order, and
 * `closed` reports -EMSGSIZE exactly when the reference hits an oversize
 * header, 0 after our own close, else -EPIPE (the peer's EOF). */
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
#include <uv.h>

#include "bridge/fconn.h"
#include "bridge/frame.h"
#include "fuzz/fuzz_util.h"

#define MAXF 4096

typedef struct fr {
	uint32_t len, id;
	uint8_t type, flags;
	uint32_t sum;
} fr;

typedef struct state {
	fr got[MAXF];
	size_t ngot;
	bool closed, ours;
	int err;
} state;

static uv_loop_t loop;
static state S;

static void check(bool ok, const char *what)
{
	if (!ok)
		fz_die(what);
}

static uint32_t sum(const uint8_t *p, size_t n)
{
	uint32_t h = 2166136261u;

	for (size_t i = 0; i < n; i++)
		h = (h ^ p[i]) * 16777619u;
	return h;
}

static void on_frame(gl_fconn *c, const gl_frame *f, void *arg)
{
	state *s = arg;

	check(!s->ours, "a frame delivered after the user closed");
	if (s->ngot < MAXF)
		s->got[s->ngot++] = (fr){f->len, f->id, f->type, f->flags, sum(f->payload, f->len)};
	switch (f->type) {
	case GL_FRAME_AUTH_OK:
		gl_fconn_set_max_payload(c, GL_FRAME_MAX);
		break;
	case GL_FRAME_CANCEL:
		s->ours = true;
		gl_fconn_close_flushed(c);
		break;
	case GL_FRAME_ERROR:
		s->ours = true;
		gl_fconn_close(c);
		break;
	default:
		gl_fconn_send(c, f->id, GL_FRAME_RESPONSE, f->flags, f->payload, f->len);
	}
}

static void on_closed(gl_fconn *c, int err, void *arg)
{
	state *s = arg;

	check(!s->closed, "closed twice");
	s->closed = true;
	s->err = err;
}

/* What the connection must deliver: the reference reader's frames up to
 * the first that closes, and the error expected. */
static int reference(const uint8_t *p, size_t n, fr *want, size_t *nwant)
{
	gl_frame_reader r;
	gl_frame f;
	int k, err = -EPIPE;

	*nwant = 0;
	gl_frame_reader_init(&r, GL_FRAME_MAX_AUTH);
	gl_frame_reader_feed(&r, p, n);
	for (;;) {
		k = gl_frame_next(&r, &f);
		if (k < 0) {
			err = -EMSGSIZE;
			break;
		}
		if (k == 0)
			break;
		if (*nwant < MAXF)
			want[(*nwant)++] = (fr){f.len, f.id, f.type, f.flags, sum(f.payload, f.len)};
		if (f.type == GL_FRAME_AUTH_OK)
			r.max = GL_FRAME_MAX;
		if (f.type == GL_FRAME_CANCEL || f.type == GL_FRAME_ERROR) {
			err = 0;
			break;
		}
	}
	gl_frame_reader_free(&r);
	return err;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	static bool inited;
	static fr want[MAXF];
	fz_drive_opts o = {0};
	size_t npre, nwant;
	gl_fconn *c;
	int sv[2], err, werr;

	if (!inited) {
		inited = true;
		if (uv_loop_init(&loop))
			fz_die("uv_loop_init");
	}
	if (size < 3)
		return 0;
	npre = data[2];
	if (npre > size - 3)
		npre = size - 3;
	memset(&S, 0, sizeof(S));
	if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv))
		fz_die("socketpair");
	fcntl(sv[1], F_SETFL, fcntl(sv[1], F_GETFL) | O_NONBLOCK);
	c = gl_fconn_new(&loop, sv[0], data + 3, npre, NULL,
			 &(gl_fconn_cbs){.frame = on_frame, .closed = on_closed}, &S, &err);
	check(c != NULL, "gl_fconn_new failed");
	o.split = data[0];
	o.seed = data[1];
	fz_drive(&loop, sv[1], data + 3 + npre, size - 3 - npre, &o);
	while (!S.closed) {
		uv_run(&loop, UV_RUN_NOWAIT);
		if (!S.closed)
			fz_wait(&loop, -1, 0, 10);
	}
	werr = reference(data + 3, size - 3, want, &nwant);
	check(S.ngot == nwant, "frames delivered differ in number from the reference");
	for (size_t i = 0; i < nwant; i++)
		check(S.got[i].len == want[i].len && S.got[i].id == want[i].id &&
			      S.got[i].type == want[i].type && S.got[i].flags == want[i].flags &&
			      S.got[i].sum == want[i].sum,
		      "a frame delivered differs from the reference");
	check(S.err == werr, "closed reported an unexpected error");
	return 0;
}
