/* bridge/fconn.c: framed connections over a socketpair on a real uv loop.
 * The peer is either a second gl_fconn or a raw non-blocking fd that the
 * test reads and writes byte for byte. */
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "bridge/fconn.h"
#include "tests/unit/unit.h"

#define MAXF 4096

struct side {
	gl_fconn *c;
	int nframes;
	uint32_t ids[MAXF];
	uint8_t types[MAXF];
	uint8_t flags[MAXF];
	uint32_t lens[MAXF];
	uint64_t sums[MAXF];
	int closed;
	int closed_err;
	int drains;
	int close_after;  /* close from the frame callback after this many (0: no) */
	int pause_after;  /* pause from the frame callback after this many (0: no) */
	int send_after_close;
	bool echo;        /* send every frame back */
	bool in_api;      /* set while the test is inside a gl_fconn_* call */
	int cb_in_api;    /* callbacks that ran inside a gl_fconn_* call */
};

static struct {
	uv_loop_t loop;
	uv_timer_t tick;
	struct side a, b;
	int raw; /* the raw peer's fd, or -1 */
	uint8_t in[8 << 20];
	size_t in_len;
	bool eof;
} F;

static uint64_t now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

static uint64_t sum(const uint8_t *p, size_t n)
{
	uint64_t h = 1469598103934665603ull;
	size_t i;

	for (i = 0; i < n; i++)
		h = (h ^ p[i]) * 1099511628211ull;
	return h;
}

static void on_frame(gl_fconn *c, const gl_frame *f, void *arg)
{
	struct side *s = arg;
	int n;

	ck_assert_ptr_eq(c, s->c);
	if (s->in_api)
		s->cb_in_api++;
	ck_assert_int_lt(s->nframes, MAXF);
	n = s->nframes++;
	s->ids[n] = f->id;
	s->types[n] = f->type;
	s->flags[n] = f->flags;
	s->lens[n] = f->len;
	s->sums[n] = sum(f->payload, f->len);
	if (s->echo)
		ck_assert_int_eq(gl_fconn_send(c, f->id, f->type, f->flags, f->payload, f->len), 0);
	if (s->close_after && s->nframes == s->close_after) {
		gl_fconn_close(c);
		ck_assert(gl_fconn_closing(c));
		s->send_after_close = gl_fconn_send(c, 1, GL_FRAME_DATA, 0, "x", 1);
		gl_fconn_close(c); /* idempotent */
	}
	if (s->pause_after && s->nframes == s->pause_after)
		gl_fconn_pause(c, true);
}

static void on_drain(gl_fconn *c, void *arg)
{
	struct side *s = arg;

	if (s->in_api)
		s->cb_in_api++;
	s->drains++;
}

static void on_closed(gl_fconn *c, int err, void *arg)
{
	struct side *s = arg;

	ck_assert_ptr_eq(c, s->c);
	if (s->in_api)
		s->cb_in_api++;
	s->closed++;
	s->closed_err = err;
	s->c = NULL;
}

static const gl_fconn_cbs cbs = {
	.frame = on_frame,
	.drain = on_drain,
	.closed = on_closed,
};

static void on_tick(uv_timer_t *t)
{
}

static void setup(void)
{
	memset(&F, 0, sizeof(F));
	F.raw = -1;
	signal(SIGPIPE, SIG_IGN);
	ck_assert_int_eq(uv_loop_init(&F.loop), 0);
	uv_timer_init(&F.loop, &F.tick);
	uv_timer_start(&F.tick, on_tick, 2, 2);
	uv_unref((uv_handle_t *)&F.tick);
}

static void teardown(void)
{
	uint64_t end = now_ms() + 3000;

	if (F.a.c)
		gl_fconn_close(F.a.c);
	if (F.b.c)
		gl_fconn_close(F.b.c);
	while ((F.a.c || F.b.c) && now_ms() < end)
		uv_run(&F.loop, UV_RUN_ONCE);
	uv_close((uv_handle_t *)&F.tick, NULL);
	uv_run(&F.loop, UV_RUN_DEFAULT);
	ck_assert_int_eq(uv_loop_close(&F.loop), 0);
	if (F.raw >= 0)
		close(F.raw);
}

/* a: a gl_fconn on one end; the other end raw (b unused) or a gl_fconn b. */
static void open_pair(const gl_fconn_opts *oa, const gl_fconn_opts *ob, bool raw_peer)
{
	int sv[2], err = 0;

	ck_assert_int_eq(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
	F.a.in_api = true;
	F.a.c = gl_fconn_new(&F.loop, sv[0], NULL, 0, oa, &cbs, &F.a, &err);
	F.a.in_api = false;
	ck_assert_ptr_nonnull(F.a.c);
	ck_assert_int_eq(gl_fconn_fd(F.a.c), sv[0]);
	if (raw_peer) {
		F.raw = sv[1];
		ck_assert_int_eq(fcntl(F.raw, F_SETFL, O_NONBLOCK), 0);
		return;
	}
	F.b.c = gl_fconn_new(&F.loop, sv[1], NULL, 0, ob, &cbs, &F.b, &err);
	ck_assert_ptr_nonnull(F.b.c);
}

static void raw_read(void)
{
	ssize_t n;

	while (F.raw >= 0 && !F.eof && F.in_len < sizeof(F.in)) {
		n = read(F.raw, F.in + F.in_len, sizeof(F.in) - F.in_len);
		if (n > 0)
			F.in_len += (size_t)n;
		else if (n == 0 || (n < 0 && errno == ECONNRESET))
			F.eof = true;
		else
			break;
	}
}

static void raw_write(const void *p, size_t n)
{
	ck_assert_int_eq(write(F.raw, p, n), (ssize_t)n);
}

static void raw_frame(uint32_t id, uint8_t type, uint8_t flags, const void *p, size_t n)
{
	gl_buf b = GL_BUF_INIT;

	ck_assert_int_eq(gl_frame_append(&b, id, type, flags, p, n), 0);
	raw_write(b.data, b.len);
	gl_buf_free(&b);
}

/* Run the loop until cond holds or ms passed; reads the raw peer only
 * when `read_raw`. */
#define RUN_UNTIL(cond, ms, read_raw)                                           \
	do {                                                                     \
		uint64_t end_ = now_ms() + (ms);                                 \
		while (!(cond) && now_ms() < end_) {                             \
			uv_run(&F.loop, UV_RUN_NOWAIT);                          \
			if (read_raw)                                            \
				raw_read();                                      \
			if (!(cond))                                             \
				usleep(200);                                     \
		}                                                                \
	} while (0)

/* ---- cases ---------------------------------------------------------------- */

START_TEST(many_frames_both_ways)
{
	enum { N = 3000 };
	static uint8_t p[70000];
	size_t i;
	int k;

	for (i = 0; i < sizeof(p); i++)
		p[i] = (uint8_t)(i * 31 + 7);
	open_pair(NULL, NULL, false);
	gl_fconn_set_max_payload(F.a.c, GL_FRAME_MAX);
	gl_fconn_set_max_payload(F.b.c, GL_FRAME_MAX);
	F.b.echo = true;
	/* a sends N frames of many sizes; b echoes each one; a checks them all */
	for (k = 0; k < N; k++) {
		size_t n = (size_t)(k * 7919) % (k % 50 == 0 ? sizeof(p) : 300);

		F.a.in_api = true;
		ck_assert_int_eq(gl_fconn_send(F.a.c, (uint32_t)k + 1, (uint8_t)(k % 9),
					       (uint8_t)(k & 3), p + (k % 13), n), 0);
		F.a.in_api = false;
		if (k % 500 == 0)
			uv_run(&F.loop, UV_RUN_NOWAIT);
	}
	ck_assert_uint_gt(gl_fconn_queued(F.a.c), 0);
	RUN_UNTIL(F.a.nframes == N, 10000, false);
	ck_assert_int_eq(F.b.nframes, N);
	ck_assert_int_eq(F.a.nframes, N);
	for (k = 0; k < N; k++) {
		size_t n = (size_t)(k * 7919) % (k % 50 == 0 ? sizeof(p) : 300);

		ck_assert_uint_eq(F.a.ids[k], (uint32_t)k + 1);
		ck_assert_uint_eq(F.a.types[k], (uint8_t)(k % 9)); /* type 0 too: delivered */
		ck_assert_uint_eq(F.a.flags[k], (uint8_t)(k & 3));
		ck_assert_uint_eq(F.a.lens[k], n);
		ck_assert(F.a.sums[k] == sum(p + (k % 13), n));
		ck_assert(F.b.sums[k] == F.a.sums[k]);
	}
	ck_assert_int_eq(F.a.cb_in_api, 0);
	ck_assert_uint_eq(gl_fconn_queued(F.a.c), 0);
	ck_assert_uint_eq(gl_fconn_queued(F.b.c), 0);
	ck_assert_int_eq(F.a.closed + F.b.closed, 0);
}
END_TEST

START_TEST(raw_bytes_exact)
{
	static const uint8_t want[] = "\0\0\0\x02\0\0\0\x07\x05\x01hi"
				      "\0\0\0\x1a\0\0\0\x08\x08\x01"
				      "{\"error\":\"nope\",\"errno\":2}";
	json_t *j;

	open_pair(NULL, NULL, true);
	ck_assert_int_eq(gl_fconn_send(F.a.c, 7, GL_FRAME_RESPONSE, GL_FRAME_END, "hi", 2), 0);
	ck_assert_int_eq(gl_fconn_send_error(F.a.c, 8, ENOENT, "nope"), 0);
	RUN_UNTIL(F.in_len >= sizeof(want) - 1, 2000, true);
	ck_assert_uint_eq(F.in_len, sizeof(want) - 1);
	ck_assert_mem_eq(F.in, want, sizeof(want) - 1);

	/* JSON payload, compact */
	j = json_pack("{s:s}", "op", "ping");
	ck_assert_int_eq(gl_fconn_send_json(F.a.c, 9, GL_FRAME_REQUEST, 0, j), 0);
	json_decref(j);
	F.in_len = 0;
	RUN_UNTIL(F.in_len >= 23, 2000, true);
	ck_assert_uint_eq(F.in_len, 23);
	ck_assert_mem_eq(F.in, "\0\0\0\x0d\0\0\0\x09\x04\0{\"op\":\"ping\"}", 23);

	/* over the protocol's maximum: refused, nothing queued */
	{
		uint8_t *big = calloc(1, GL_FRAME_MAX + 1);

		ck_assert_int_eq(gl_fconn_send(F.a.c, 1, GL_FRAME_DATA, 0, big, GL_FRAME_MAX + 1),
				 -EMSGSIZE);
		free(big);
	}
	ck_assert_uint_eq(gl_fconn_queued(F.a.c), 0);
	ck_assert(!gl_fconn_closing(F.a.c));
}
END_TEST

START_TEST(back_pressure_drain)
{
	gl_fconn_opts o;
	static uint8_t chunk[GL_FRAME_CHUNK];
	size_t total = 0, i;
	int sent = 0;

	gl_fconn_opts_default(&o);
	ck_assert_uint_eq(o.max_payload, GL_FRAME_MAX_AUTH);
	ck_assert_uint_eq(o.high_water, 1u << 20);
	ck_assert_uint_eq(o.low_water, 256u << 10);
	ck_assert_uint_eq(o.max_queued, 64u << 20);
	o.high_water = 512 << 10;
	o.low_water = 128 << 10;
	open_pair(&o, NULL, true);
	for (i = 0; i < sizeof(chunk); i++)
		chunk[i] = (uint8_t)i;

	/* the raw peer does not read: the queue grows past the high watermark */
	while (!gl_fconn_over_high(F.a.c)) {
		ck_assert_int_eq(gl_fconn_send(F.a.c, 5, GL_FRAME_DATA, 0, chunk, sizeof(chunk)),
				 0);
		total += GL_FRAME_HDR + sizeof(chunk);
		sent++;
		uv_run(&F.loop, UV_RUN_NOWAIT);
	}
	ck_assert_uint_ge(gl_fconn_queued(F.a.c), o.high_water);
	RUN_UNTIL(0, 50, false);
	ck_assert_int_eq(F.a.drains, 0);
	ck_assert(gl_fconn_over_high(F.a.c));

	/* reading makes it drain, once */
	RUN_UNTIL(F.in_len == total, 5000, true);
	ck_assert_uint_eq(F.in_len, total);
	ck_assert_int_eq(F.a.drains, 1);
	ck_assert_uint_eq(gl_fconn_queued(F.a.c), 0);
	ck_assert(!gl_fconn_over_high(F.a.c));
	/* the bytes are the frames, in order */
	for (i = 0; i < (size_t)sent; i++) {
		const uint8_t *f = F.in + i * (GL_FRAME_HDR + sizeof(chunk));

		ck_assert_mem_eq(f, "\0\x01\0\0\0\0\0\x05\x06\0", GL_FRAME_HDR);
		ck_assert(memcmp(f + GL_FRAME_HDR, chunk, sizeof(chunk)) == 0);
	}
	/* under the high watermark, no drain is owed */
	ck_assert_int_eq(gl_fconn_send(F.a.c, 5, GL_FRAME_DATA, 0, chunk, 100), 0);
	RUN_UNTIL(F.in_len == total + 110, 2000, true);
	RUN_UNTIL(0, 20, true);
	ck_assert_int_eq(F.a.drains, 1);
	ck_assert_int_eq(F.a.cb_in_api, 0);
}
END_TEST

START_TEST(max_queued_enobufs)
{
	gl_fconn_opts o;
	static uint8_t chunk[GL_FRAME_CHUNK];
	int r = 0, k;

	gl_fconn_opts_default(&o);
	o.max_queued = 1 << 20;
	open_pair(&o, NULL, true);
	for (k = 0; k < 1000 && r == 0; k++) {
		F.a.in_api = true;
		r = gl_fconn_send(F.a.c, 1, GL_FRAME_DATA, 0, chunk, sizeof(chunk));
		F.a.in_api = false;
		if (r == 0)
			ck_assert_uint_le(gl_fconn_queued(F.a.c), o.max_queued);
	}
	ck_assert_int_eq(r, -ENOBUFS);
	ck_assert(gl_fconn_closing(F.a.c));
	ck_assert_int_eq(gl_fconn_send(F.a.c, 1, GL_FRAME_DATA, 0, "x", 1), -EPIPE);
	ck_assert_int_eq(F.a.closed, 0); /* never inside the call */
	RUN_UNTIL(F.a.closed, 2000, false);
	ck_assert_int_eq(F.a.closed, 1);
	ck_assert_int_eq(F.a.closed_err, -ENOBUFS);
	ck_assert_int_eq(F.a.cb_in_api, 0);
	/* the peer sees the end */
	RUN_UNTIL(F.eof, 2000, true);
	ck_assert(F.eof);
}
END_TEST

START_TEST(close_from_frame_callback)
{
	gl_buf b = GL_BUF_INIT;

	open_pair(NULL, NULL, true);
	F.a.close_after = 2;
	/* four frames in one write: the callback closes on the second */
	gl_frame_append(&b, 1, GL_FRAME_REQUEST, 0, "{}", 2);
	gl_frame_append(&b, 2, GL_FRAME_REQUEST, 0, "{}", 2);
	gl_frame_append(&b, 3, GL_FRAME_REQUEST, 0, "{}", 2);
	gl_frame_append(&b, 4, GL_FRAME_REQUEST, 0, "{}", 2);
	raw_write(b.data, b.len);
	gl_buf_free(&b);
	RUN_UNTIL(F.a.closed, 2000, false);
	ck_assert_int_eq(F.a.nframes, 2);
	ck_assert_uint_eq(F.a.ids[1], 2);
	ck_assert_int_eq(F.a.send_after_close, -EPIPE);
	ck_assert_int_eq(F.a.closed, 1);
	ck_assert_int_eq(F.a.closed_err, 0);
	RUN_UNTIL(F.eof, 2000, true);
	ck_assert(F.eof);
	RUN_UNTIL(0, 20, false);
	ck_assert_int_eq(F.a.closed, 1);
}
END_TEST

START_TEST(close_is_deferred)
{
	open_pair(NULL, NULL, true);
	ck_assert_int_eq(gl_fconn_send(F.a.c, 1, GL_FRAME_DATA, 0, "dropped", 7), 0);
	F.a.in_api = true;
	gl_fconn_close(F.a.c);
	gl_fconn_close(F.a.c);
	F.a.in_api = false;
	ck_assert_int_eq(F.a.closed, 0);
	RUN_UNTIL(F.a.closed, 2000, false);
	ck_assert_int_eq(F.a.closed, 1);
	ck_assert_int_eq(F.a.closed_err, 0);
	ck_assert_int_eq(F.a.cb_in_api, 0);
}
END_TEST

START_TEST(oversize_error_then_closed)
{
	static const char want_payload[] = "{\"error\":\"frame too large\",\"errno\":90}";
	uint8_t hdr[GL_FRAME_HDR], want[GL_FRAME_HDR];
	uint8_t junk[100];

	ck_assert_int_eq(EMSGSIZE, 90);
	open_pair(NULL, NULL, true);
	/* one good frame, then a header one byte over the 4 KiB limit */
	raw_frame(3, GL_FRAME_HELLO, 0, "{}", 2);
	gl_frame_hdr(hdr, GL_FRAME_MAX_AUTH + 1, 0, GL_FRAME_HELLO, 0);
	raw_write(hdr, sizeof(hdr));
	memset(junk, 'j', sizeof(junk));
	raw_write(junk, sizeof(junk));
	RUN_UNTIL(F.a.closed && F.eof, 3000, true);
	ck_assert_int_eq(F.a.nframes, 1);
	ck_assert_int_eq(F.a.closed, 1);
	ck_assert_int_eq(F.a.closed_err, -EMSGSIZE);
	ck_assert(F.eof);
	gl_frame_hdr(want, sizeof(want_payload) - 1, 0, GL_FRAME_ERROR, GL_FRAME_END);
	ck_assert_uint_eq(F.in_len, GL_FRAME_HDR + sizeof(want_payload) - 1);
	ck_assert_mem_eq(F.in, want, GL_FRAME_HDR);
	ck_assert_mem_eq(F.in + GL_FRAME_HDR, want_payload, sizeof(want_payload) - 1);
}
END_TEST

START_TEST(max_exact_accepted_and_raised)
{
	uint8_t *p = malloc(GL_FRAME_MAX);
	size_t i;

	ck_assert_ptr_nonnull(p);
	for (i = 0; i < GL_FRAME_MAX; i++)
		p[i] = (uint8_t)(i >> 3);
	open_pair(NULL, NULL, true);
	raw_frame(1, GL_FRAME_HELLO, 0, p, GL_FRAME_MAX_AUTH);
	RUN_UNTIL(F.a.nframes == 1, 2000, false);
	ck_assert_int_eq(F.a.nframes, 1);
	ck_assert_uint_eq(F.a.lens[0], GL_FRAME_MAX_AUTH);
	ck_assert(F.a.sums[0] == sum(p, GL_FRAME_MAX_AUTH));

	/* raised to 1 MiB: a frame of exactly that passes */
	gl_fconn_set_max_payload(F.a.c, GL_FRAME_MAX);
	{
		gl_buf b = GL_BUF_INIT;
		size_t off = 0;

		ck_assert_int_eq(gl_frame_append(&b, 2, GL_FRAME_DATA, 0, p, GL_FRAME_MAX), 0);
		while (off < b.len) {
			ssize_t n = write(F.raw, b.data + off, b.len - off);

			if (n > 0)
				off += (size_t)n;
			uv_run(&F.loop, UV_RUN_NOWAIT);
		}
		gl_buf_free(&b);
	}
	RUN_UNTIL(F.a.nframes == 2, 3000, false);
	ck_assert_int_eq(F.a.nframes, 2);
	ck_assert_uint_eq(F.a.lens[1], GL_FRAME_MAX);
	ck_assert(F.a.sums[1] == sum(p, GL_FRAME_MAX));
	ck_assert_int_eq(F.a.closed, 0);
	free(p);
}
END_TEST

START_TEST(peer_eof_epipe)
{
	open_pair(NULL, NULL, true);
	raw_frame(1, GL_FRAME_DATA, 0, "abc", 3);
	raw_write("\0\0\0\x05\0", 5); /* half a header, then the peer goes */
	close(F.raw);
	F.raw = -1;
	RUN_UNTIL(F.a.closed, 2000, false);
	ck_assert_int_eq(F.a.nframes, 1);
	ck_assert_int_eq(F.a.closed, 1);
	ck_assert_int_eq(F.a.closed_err, -EPIPE);
}
END_TEST

START_TEST(peer_fconn_closes)
{
	open_pair(NULL, NULL, false);
	ck_assert_int_eq(gl_fconn_send(F.b.c, 4, GL_FRAME_RESPONSE, GL_FRAME_END, "{}", 2), 0);
	gl_fconn_close_flushed(F.b.c);
	ck_assert(gl_fconn_closing(F.b.c));
	ck_assert_int_eq(gl_fconn_send(F.b.c, 4, GL_FRAME_DATA, 0, "", 0), -EPIPE);
	RUN_UNTIL(F.a.closed && F.b.closed, 2000, false);
	ck_assert_int_eq(F.a.nframes, 1);
	ck_assert_uint_eq(F.a.ids[0], 4);
	ck_assert_int_eq(F.b.closed_err, 0);
	ck_assert_int_eq(F.a.closed_err, -EPIPE);
}
END_TEST

START_TEST(close_flushed_writes_everything)
{
	static uint8_t chunk[GL_FRAME_CHUNK];
	size_t total = 0;
	int k;

	open_pair(NULL, NULL, true);
	memset(chunk, 0xc3, sizeof(chunk));
	for (k = 0; k < 40; k++) {
		uint8_t fl = k == 39 ? GL_FRAME_END : 0;

		ck_assert_int_eq(gl_fconn_send(F.a.c, 6, GL_FRAME_DATA, fl, chunk, sizeof(chunk)),
				 0);
		total += GL_FRAME_HDR + sizeof(chunk);
	}
	F.a.in_api = true;
	gl_fconn_close_flushed(F.a.c);
	gl_fconn_close_flushed(F.a.c);
	F.a.in_api = false;
	RUN_UNTIL(F.eof, 5000, true);
	ck_assert(F.eof);
	ck_assert_uint_eq(F.in_len, total);
	ck_assert_uint_eq(F.in[total - sizeof(chunk) - 1], GL_FRAME_END);
	RUN_UNTIL(F.a.closed, 2000, false);
	ck_assert_int_eq(F.a.closed, 1);
	ck_assert_int_eq(F.a.closed_err, 0);
	ck_assert_int_eq(F.a.cb_in_api, 0);
}
END_TEST

START_TEST(pause_and_resume)
{
	gl_buf b = GL_BUF_INIT;
	int k;

	open_pair(NULL, NULL, true);
	F.a.pause_after = 2;
	for (k = 1; k <= 5; k++)
		gl_frame_append(&b, (uint32_t)k, GL_FRAME_DATA, 0, "zz", 2);
	raw_write(b.data, b.len);
	gl_buf_free(&b);
	RUN_UNTIL(F.a.nframes == 2, 2000, false);
	RUN_UNTIL(0, 50, false);
	ck_assert_int_eq(F.a.nframes, 2);
	/* more bytes while paused: not read, not delivered */
	raw_frame(6, GL_FRAME_DATA, 0, "zz", 2);
	RUN_UNTIL(0, 50, false);
	ck_assert_int_eq(F.a.nframes, 2);

	F.a.in_api = true;
	gl_fconn_pause(F.a.c, false);
	F.a.in_api = false;
	ck_assert_int_eq(F.a.nframes, 2); /* not from inside the call */
	RUN_UNTIL(F.a.nframes == 6, 2000, false);
	ck_assert_int_eq(F.a.nframes, 6);
	for (k = 0; k < 6; k++)
		ck_assert_uint_eq(F.a.ids[k], (uint32_t)k + 1);
	ck_assert_int_eq(F.a.cb_in_api, 0);
}
END_TEST

START_TEST(timeout_and_rearm)
{
	uint64_t t0;
	int k;

	open_pair(NULL, NULL, true);
	gl_fconn_set_timeout(F.a.c, 150);
	t0 = now_ms();
	/* frames every 50 ms keep it open past the timeout */
	for (k = 0; k < 6; k++) {
		raw_frame((uint32_t)k + 1, GL_FRAME_DATA, 0, "", 0);
		RUN_UNTIL(0, 50, false);
	}
	ck_assert_int_eq(F.a.nframes, 6);
	ck_assert_int_eq(F.a.closed, 0);
	ck_assert_uint_ge(now_ms() - t0, 300);
	t0 = now_ms();
	RUN_UNTIL(F.a.closed, 2000, false);
	ck_assert_int_eq(F.a.closed, 1);
	ck_assert_int_eq(F.a.closed_err, -ETIMEDOUT);
	ck_assert_uint_ge(now_ms() - t0, 90);
	ck_assert_uint_le(now_ms() - t0, 1000);
}
END_TEST

START_TEST(timeout_off)
{
	open_pair(NULL, NULL, true);
	gl_fconn_set_timeout(F.a.c, 30);
	gl_fconn_set_timeout(F.a.c, 0);
	RUN_UNTIL(0, 150, false);
	ck_assert_int_eq(F.a.closed, 0);
}
END_TEST

START_TEST(pre_bytes_and_unknown_types)
{
	gl_buf b = GL_BUF_INIT;
	int sv[2], err = 0;

	ck_assert_int_eq(socketpair(AF_UNIX, SOCK_STREAM, 0, sv), 0);
	F.raw = sv[1];
	ck_assert_int_eq(fcntl(F.raw, F_SETFL, O_NONBLOCK), 0);
	gl_frame_append(&b, 0, GL_FRAME_HELLO, 0, "{\"a\":1}", 7);
	gl_frame_append(&b, 0, 0xee, 0x80, "?", 1);
	gl_buf_add(&b, "\0\0\0\x03\0\0\0\x09\x06", 9); /* a header cut short */
	F.a.in_api = true;
	F.a.c = gl_fconn_new(&F.loop, sv[0], b.data, b.len, NULL, &cbs, &F.a, &err);
	F.a.in_api = false;
	gl_buf_free(&b);
	ck_assert_ptr_nonnull(F.a.c);
	ck_assert_int_eq(F.a.nframes, 0);
	raw_write("\0xyz", 4);
	RUN_UNTIL(F.a.nframes == 3, 2000, false);
	ck_assert_int_eq(F.a.nframes, 3);
	ck_assert_uint_eq(F.a.types[0], GL_FRAME_HELLO);
	ck_assert_uint_eq(F.a.lens[0], 7);
	ck_assert_uint_eq(F.a.types[1], 0xee);
	ck_assert_uint_eq(F.a.flags[1], 0x80);
	ck_assert_uint_eq(F.a.ids[2], 9);
	ck_assert_uint_eq(F.a.lens[2], 3);
	ck_assert(F.a.sums[2] == sum((const uint8_t *)"xyz", 3));
	ck_assert_int_eq(F.a.cb_in_api, 0);
}
END_TEST

START_TEST(bad_fd)
{
	int err = 0, fd;

	fd = open("/dev/null", O_RDONLY);
	ck_assert_int_ge(fd, 0);
	ck_assert_ptr_null(gl_fconn_new(&F.loop, fd, NULL, 0, NULL, &cbs, &F.a, &err));
	ck_assert_int_eq(err, -ENOTSOCK);
	/* fd was closed */
	ck_assert_int_eq(fcntl(fd, F_GETFD), -1);
	ck_assert_ptr_null(gl_fconn_new(&F.loop, 9999, NULL, 0, NULL, &cbs, &F.a, &err));
	ck_assert_int_eq(err, -EBADF);
}
END_TEST

START_TEST(data_and_rebind)
{
	static const gl_fconn_cbs other = { .frame = on_frame, .closed = on_closed };

	open_pair(NULL, NULL, true);
	ck_assert_ptr_null(gl_fconn_data(F.a.c));
	gl_fconn_set_data(F.a.c, &F);
	ck_assert_ptr_eq(gl_fconn_data(F.a.c), &F);
	/* frames now go to side b's record */
	F.b.c = F.a.c;
	gl_fconn_rebind(F.a.c, &other, &F.b);
	raw_frame(3, GL_FRAME_DATA, 0, "q", 1);
	RUN_UNTIL(F.b.nframes == 1, 2000, false);
	ck_assert_int_eq(F.b.nframes, 1);
	ck_assert_int_eq(F.a.nframes, 0);
	close(F.raw);
	F.raw = -1;
	RUN_UNTIL(F.b.closed, 2000, false);
	ck_assert_int_eq(F.b.closed, 1);
	ck_assert_int_eq(F.a.closed, 0);
	F.a.c = NULL;
}
END_TEST

/* Many connections on one loop, each closed by its peer's close. */
START_TEST(many_pairs)
{
	enum { P = 100 };
	static struct side s[2 * P];
	int sv[2], err, i;

	memset(s, 0, sizeof(s));
	for (i = 0; i < P; i++) {
		ck_assert_int_eq(socketpair(AF_UNIX, SOCK_STREAM, 0, sv), 0);
		s[2 * i].c = gl_fconn_new(&F.loop, sv[0], NULL, 0, NULL, &cbs, &s[2 * i], &err);
		s[2 * i + 1].c = gl_fconn_new(&F.loop, sv[1], NULL, 0, NULL, &cbs, &s[2 * i + 1],
					      &err);
		ck_assert_ptr_nonnull(s[2 * i].c);
		ck_assert_ptr_nonnull(s[2 * i + 1].c);
		s[2 * i + 1].echo = true;
		ck_assert_int_eq(gl_fconn_send(s[2 * i].c, (uint32_t)i + 1, GL_FRAME_REQUEST, 0,
					       "{}", 2), 0);
	}
	{
		uint64_t end = now_ms() + 5000;
		int done = 0;

		while (done < P && now_ms() < end) {
			uv_run(&F.loop, UV_RUN_NOWAIT);
			for (done = 0, i = 0; i < P; i++)
				done += s[2 * i].nframes == 1;
		}
		ck_assert_int_eq(done, P);
	}
	for (i = 0; i < P; i++) {
		ck_assert_uint_eq(s[2 * i].ids[0], (uint32_t)i + 1);
		gl_fconn_close(s[2 * i].c);
	}
	{
		uint64_t end = now_ms() + 5000;
		int done = 0;

		while (done < 2 * P && now_ms() < end) {
			uv_run(&F.loop, UV_RUN_NOWAIT);
			for (done = 0, i = 0; i < 2 * P; i++)
				done += s[i].closed;
		}
		ck_assert_int_eq(done, 2 * P);
	}
	for (i = 0; i < P; i++) {
		ck_assert_int_eq(s[2 * i].closed_err, 0);
		ck_assert_int_eq(s[2 * i + 1].closed_err, -EPIPE);
	}
}
END_TEST

static Suite *fconn_suite(void)
{
	Suite *s = suite_create("fconn");
	TCase *t = tcase_create("fconn");

	tcase_add_checked_fixture(t, setup, teardown);
	tcase_add_test(t, many_frames_both_ways);
	tcase_add_test(t, raw_bytes_exact);
	tcase_add_test(t, back_pressure_drain);
	tcase_add_test(t, max_queued_enobufs);
	tcase_add_test(t, close_from_frame_callback);
	tcase_add_test(t, close_is_deferred);
	tcase_add_test(t, oversize_error_then_closed);
	tcase_add_test(t, max_exact_accepted_and_raised);
	tcase_add_test(t, peer_eof_epipe);
	tcase_add_test(t, peer_fconn_closes);
	tcase_add_test(t, close_flushed_writes_everything);
	tcase_add_test(t, pause_and_resume);
	tcase_add_test(t, timeout_and_rearm);
	tcase_add_test(t, timeout_off);
	tcase_add_test(t, pre_bytes_and_unknown_types);
	tcase_add_test(t, bad_fd);
	tcase_add_test(t, data_and_rebind);
	tcase_add_test(t, many_pairs);
	suite_add_tcase(s, t);
	return s;
}

UNIT_MAIN(fconn_suite)
