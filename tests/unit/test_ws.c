/* bridge/ws.c and bridge/sha1.c: the devlxd event WebSocket, driven over a
 * socketpair with raw client bytes (one end a uv_pipe_t, the other a plain
 * non-blocking fd playing the client). */
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "bridge/ws.h"
#include "tests/unit/unit.h"

/* ---- fixture ------------------------------------------------------------- */

static struct {
	uv_loop_t loop;
	uv_pipe_t pipe;
	uv_timer_t tick; /* bounds each UV_RUN_ONCE so the tests can poll */
	int cfd;         /* the client's end */
	gl_ws *ws;
	int closed;
	int pipe_closed;
	void *owner_data;
	void *data_at_closed;
	unsigned char in[1 << 20];
	size_t in_len, pos;
	int eof;
} F;

static uint64_t now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

static void on_tick(uv_timer_t *t)
{
}

static void on_pipe_closed(uv_handle_t *h)
{
	F.pipe_closed = 1;
}

/* The owner's part: close the stream once the session is over. */
static void on_closed(gl_ws *ws, void *arg)
{
	ck_assert_ptr_eq(ws, F.ws);
	ck_assert_ptr_eq(arg, &F);
	F.closed++;
	F.data_at_closed = F.pipe.data;
	uv_close((uv_handle_t *)&F.pipe, on_pipe_closed);
}

static void setup(void)
{
	int sv[2];

	memset(&F, 0, sizeof(F));
	signal(SIGPIPE, SIG_IGN);
	ck_assert_int_eq(uv_loop_init(&F.loop), 0);
	ck_assert_int_eq(socketpair(AF_UNIX, SOCK_STREAM, 0, sv), 0);
	ck_assert_int_eq(uv_pipe_init(&F.loop, &F.pipe, 0), 0);
	ck_assert_int_eq(uv_pipe_open(&F.pipe, sv[0]), 0);
	F.owner_data = (void *)&F.owner_data;
	F.pipe.data = F.owner_data;
	F.cfd = sv[1];
	ck_assert_int_eq(fcntl(F.cfd, F_SETFL, O_NONBLOCK), 0);
	uv_timer_init(&F.loop, &F.tick);
	uv_timer_start(&F.tick, on_tick, 2, 2);
}

/* Read what the server wrote so far. */
static void drain(void)
{
	ssize_t n;

	while (!F.eof && F.in_len < sizeof(F.in)) {
		n = read(F.cfd, F.in + F.in_len, sizeof(F.in) - F.in_len);
		if (n > 0)
			F.in_len += (size_t)n;
		else if (n == 0)
			F.eof = 1;
		else
			break;
	}
}

static void pump(unsigned ms)
{
	uint64_t end = now_ms() + ms;

	do {
		uv_run(&F.loop, UV_RUN_ONCE);
		drain();
	} while (now_ms() < end);
}

static void pump_until_bytes(size_t n, unsigned ms)
{
	uint64_t end = now_ms() + ms;

	while (F.in_len - F.pos < n && now_ms() < end) {
		uv_run(&F.loop, UV_RUN_ONCE);
		drain();
	}
}

static void pump_until_closed(unsigned ms)
{
	uint64_t end = now_ms() + ms;

	while ((!F.closed || !F.pipe_closed) && now_ms() < end) {
		uv_run(&F.loop, UV_RUN_ONCE);
		drain();
	}
	ck_assert_int_eq(F.closed, 1);
}

static void pump_until_eof(unsigned ms)
{
	uint64_t end = now_ms() + ms;

	while (!F.eof && now_ms() < end) {
		uv_run(&F.loop, UV_RUN_ONCE);
		drain();
	}
	ck_assert_msg(F.eof, "no EOF from the server");
}

/* End the case: the session must be over (or is ended by the client going
 * away), then every handle is closed and the loop closes cleanly. */
static void teardown(void)
{
	if (F.ws && !F.closed) {
		close(F.cfd);
		F.cfd = -1;
		pump_until_closed(2000);
	}
	ck_assert_int_le(F.closed, 1);
	if (F.ws) {
		ck_assert_ptr_eq(F.data_at_closed, F.owner_data);
		gl_ws_free(F.ws);
		F.ws = NULL;
	} else if (!uv_is_closing((uv_handle_t *)&F.pipe)) {
		uv_close((uv_handle_t *)&F.pipe, on_pipe_closed);
	}
	uv_close((uv_handle_t *)&F.tick, NULL);
	uv_run(&F.loop, UV_RUN_DEFAULT);
	ck_assert_int_eq(uv_loop_close(&F.loop), 0);
	if (F.cfd >= 0)
		close(F.cfd);
}

static const char key_rfc[] = "dGhlIHNhbXBsZSBub25jZQ==";
static const char hs_rfc[] = "HTTP/1.1 101 Switching Protocols\r\n"
			     "Upgrade: websocket\r\n"
			     "Connection: Upgrade\r\n"
			     "Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"
			     "\r\n";
static const unsigned char ping_frame[] = "\x89\x09keepalive";

static void start(const gl_ws_opts *o)
{
	F.ws = gl_ws_start(&F.loop, (uv_stream_t *)&F.pipe, key_rfc, NULL, 0, o, on_closed, &F);
	ck_assert_ptr_nonnull(F.ws);
	ck_assert_ptr_eq(F.pipe.data, F.ws);
}

/* Start and consume the 101 and the first ping. */
static void start_past_handshake(const gl_ws_opts *o)
{
	size_t n = sizeof(hs_rfc) - 1;

	start(o);
	pump_until_bytes(n + 11, 1000);
	ck_assert_uint_ge(F.in_len, n + 11);
	ck_assert_mem_eq(F.in, hs_rfc, n);
	ck_assert_mem_eq(F.in + n, ping_frame, 11);
	F.pos = n + 11;
}

/* A client frame, masked unless told otherwise. */
static void csend(uint8_t b0, const void *p, size_t n, int masked)
{
	static const uint8_t key[4] = { 0x37, 0xfa, 0x21, 0x3d };
	uint8_t buf[70000];
	size_t h = 0, i;
	ssize_t w;

	ck_assert_uint_le(n, 65535);
	buf[h++] = b0;
	if (n < 126) {
		buf[h++] = (uint8_t)((masked ? 0x80 : 0) | n);
	} else {
		buf[h++] = (uint8_t)((masked ? 0x80 : 0) | 126);
		buf[h++] = (uint8_t)(n >> 8);
		buf[h++] = (uint8_t)n;
	}
	if (masked) {
		memcpy(buf + h, key, 4);
		h += 4;
	}
	for (i = 0; i < n; i++)
		buf[h + i] = ((const uint8_t *)p)[i] ^ (masked ? key[i % 4] : 0);
	w = write(F.cfd, buf, h + n);
	ck_assert_int_eq(w, (ssize_t)(h + n));
}

static void craw(const void *p, size_t n)
{
	ck_assert_int_eq(write(F.cfd, p, n), (ssize_t)n);
}

struct sframe {
	int fin, op;
	size_t len;
	const unsigned char *p;
};

/* Take the next server frame; fails the case if none is complete in time. */
static void next_frame(struct sframe *f)
{
	const unsigned char *b;
	size_t avail, h, i;

	pump_until_bytes(2, 1000);
	b = F.in + F.pos;
	avail = F.in_len - F.pos;
	ck_assert_uint_ge(avail, 2);
	ck_assert_msg(!(b[1] & 0x80), "server frame masked");
	f->fin = b[0] >> 7;
	f->op = b[0] & 0x0f;
	ck_assert_int_eq(b[0] & 0x70, 0);
	f->len = b[1] & 0x7f;
	h = 2;
	if (f->len == 126) {
		pump_until_bytes(4, 1000);
		b = F.in + F.pos;
		f->len = (size_t)b[2] << 8 | b[3];
		h = 4;
	} else if (f->len == 127) {
		pump_until_bytes(10, 1000);
		b = F.in + F.pos;
		f->len = 0;
		for (i = 0; i < 8; i++)
			f->len = f->len << 8 | b[2 + i];
		h = 10;
	}
	pump_until_bytes(h + f->len, 1000);
	b = F.in + F.pos;
	ck_assert_uint_ge(F.in_len - F.pos, h + f->len);
	f->p = b + h;
	F.pos += h + f->len;
}

static void expect_frame(int fin, int op, const void *p, size_t n)
{
	struct sframe f;

	next_frame(&f);
	ck_assert_int_eq(f.fin, fin);
	ck_assert_int_eq(f.op, op);
	ck_assert_uint_eq(f.len, n);
	if (n)
		ck_assert_mem_eq(f.p, p, n);
}

/* The server ends: `closed` runs, the owner closes the stream, the client
 * sees EOF with nothing more than what the case already consumed. */
static void expect_end_nothing_more(unsigned ms)
{
	pump_until_closed(ms);
	pump_until_eof(1000);
	ck_assert_uint_eq(F.in_len, F.pos);
}

static void opts(gl_ws_opts *o)
{
	gl_ws_opts_default(o);
}

/* ---- SHA-1, accept key, handshake checks ---------------------------------- */

static void sha1_hex(const void *p, size_t n, char hex[41])
{
	unsigned char md[20];
	int i;

	gl_sha1(p, n, md);
	for (i = 0; i < 20; i++)
		sprintf(hex + 2 * i, "%02x", md[i]);
}

START_TEST(sha1_vectors)
{
	static const char rep4[] = "0123456701234567012345670123456701234567012345670123456701234567";
	char hex[41];
	char *big;
	size_t i;

	/* RFC 3174 section 7.3 tests 1-4 */
	sha1_hex("abc", 3, hex);
	ck_assert_str_eq(hex, "a9993e364706816aba3e25717850c26c9cd0d89d");
	sha1_hex("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq", 56, hex);
	ck_assert_str_eq(hex, "84983e441c3bd26ebaae4aa1f95129e5e54670f1");
	big = malloc(1000000);
	ck_assert_ptr_nonnull(big);
	memset(big, 'a', 1000000);
	sha1_hex(big, 1000000, hex);
	ck_assert_str_eq(hex, "34aa973cd4c4daa4f61eeb2bdbad27316534016f");
	for (i = 0; i < 10; i++)
		memcpy(big + i * 64, rep4, 64);
	sha1_hex(big, 640, hex);
	ck_assert_str_eq(hex, "dea356a2cddd90c7a7ecedc5ebb563934f460452");
	free(big);

	/* Padding edges: empty, 55, 56, 63, 64 bytes. */
	sha1_hex("", 0, hex);
	ck_assert_str_eq(hex, "da39a3ee5e6b4b0d3255bfef95601890afd80709");
	sha1_hex("The quick brown fox jumps over the lazy dog", 43, hex);
	ck_assert_str_eq(hex, "2fd4e1c67a2d28fced849ee1bb76e7391b93eb12");
	sha1_hex("aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", 55, hex);
	ck_assert_str_eq(hex, "c1c8bbdc22796e28c0e15163d20899b65621d65a");
	sha1_hex("aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", 56, hex);
	ck_assert_str_eq(hex, "c2db330f6083854c99d4b5bfb6e8f29f201be699");
	sha1_hex("aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", 64, hex);
	ck_assert_str_eq(hex, "0098ba824b5c16427bd7a1122a5a442a25ec644d");
}
END_TEST

START_TEST(accept_keys)
{
	char out[29];

	gl_ws_accept_key("dGhlIHNhbXBsZSBub25jZQ==", out);
	ck_assert_str_eq(out, "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
	gl_ws_accept_key("4g9b32M238QJ3YvGcwWNSw==", out);
	ck_assert_str_eq(out, "JG11bIWfnw3QtVVejlTHoi6xeEw=");
	/* the keys of capture 13 */
	gl_ws_accept_key("PS5k2OpP4C3YVqbHeBis4A==", out);
	ck_assert_str_eq(out, "0BLpZKnglIQZqbQcxzAac4b7ncU=");
	gl_ws_accept_key("tphSBAtevkVZ7f6CFm5Bqw==", out);
	ck_assert_str_eq(out, "1X7//VUnKguBFTKj6/257Lr1WzA=");
	gl_ws_accept_key("s2/yh1KJWJNBBxCOM8aNNg==", out);
	ck_assert_str_eq(out, "ZHd0W6aE/2hs9Z/oo+dCGQdzOwo=");
}
END_TEST

START_TEST(check_table)
{
	static const struct {
		const char *method, *conn, *upg, *ver, *key;
		int want;
	} t[] = {
		{ "GET", "Upgrade", "websocket", "13", "k", 0 },
		{ "GET", "upgrade", "WebSocket", "13", "k", 0 },
		{ "GET", "keep-alive, Upgrade", "websocket", "13", "k", 0 },
		{ "GET", "keep-alive,Upgrade", "websocket", "13", "k", 0 },
		{ "GET", "Upgrade, keep-alive", "websocket", "13", "k", 0 },
		{ "GET", " \tUPGRADE\t ", "websocket", "13", "k", 0 },
		{ "GET", "close, Upgrade", "websocket", "13", "k", 0 },
		{ "GET", "Upgrade", "h2c, websocket", "13", "k", 0 },
		{ "GET", "Upgrade", "websocket", "8, 13", "k", 0 },
		{ "GET", "Upgrade", "websocket", "13", "  not base64 at all", 0 },
		/* 1. Connection */
		{ "GET", NULL, "websocket", "13", "k", 400 },
		{ "GET", "", "websocket", "13", "k", 400 },
		{ "GET", "close", "websocket", "13", "k", 400 },
		{ "GET", "Upgrades", "websocket", "13", "k", 400 },
		{ "GET", "foo bar, upgrade", "websocket", "13", "k", 400 },
		{ "GET", ",upgrade", "websocket", "13", "k", 400 },
		{ "GET", "up grade", "websocket", "13", "k", 400 },
		{ "POST", NULL, NULL, NULL, NULL, 400 },
		/* 2. Upgrade */
		{ "GET", "Upgrade", NULL, "13", "k", 400 },
		{ "GET", "Upgrade", "websockets", "13", "k", 400 },
		{ "GET", "Upgrade", "h2c", "13", "k", 400 },
		{ "POST", "Upgrade", "h2c", "13", "k", 400 },
		/* 3. method, before version and key */
		{ "POST", "Upgrade", "websocket", "13", "k", 405 },
		{ "get", "Upgrade", "websocket", "13", "k", 405 },
		{ "HEAD", "Upgrade", "websocket", NULL, NULL, 405 },
		{ NULL, "Upgrade", "websocket", "13", "k", 405 },
		/* 4. version */
		{ "GET", "Upgrade", "websocket", NULL, "k", 400 },
		{ "GET", "Upgrade", "websocket", "8", "k", 400 },
		{ "GET", "Upgrade", "websocket", "130", "k", 400 },
		{ "GET", "Upgrade", "websocket", "", "k", 400 },
		/* 6. key */
		{ "GET", "Upgrade", "websocket", "13", NULL, 400 },
		{ "GET", "Upgrade", "websocket", "13", "", 400 },
		{ "GET", "Upgrade", "websocket", "13", " \t", 400 },
	};
	size_t i;

	for (i = 0; i < sizeof(t) / sizeof(t[0]); i++)
		ck_assert_msg(gl_ws_check(t[i].method, t[i].conn, t[i].upg, t[i].ver, t[i].key) ==
				      t[i].want,
			      "row %zu: want %d", i, t[i].want);
	ck_assert_str_eq(gl_ws_error_body(400), "Bad Request\ninternal server error\n");
	ck_assert_uint_eq(strlen(gl_ws_error_body(400)), 34);
	ck_assert_str_eq(gl_ws_error_body(405), "Method Not Allowed\ninternal server error\n");
	ck_assert_uint_eq(strlen(gl_ws_error_body(405)), 41);
}
END_TEST

/* ---- sessions ------------------------------------------------------------- */

START_TEST(handshake_bytes)
{
	static const char hs12[] = "HTTP/1.1 101 Switching Protocols\r\n"
				   "Upgrade: websocket\r\n"
				   "Connection: Upgrade\r\n"
				   "Sec-WebSocket-Accept: JG11bIWfnw3QtVVejlTHoi6xeEw=\r\n"
				   "\r\n";
	size_t n = sizeof(hs12) - 1;

	/* capture 12's key and answer, then at once the ping */
	F.ws = gl_ws_start(&F.loop, (uv_stream_t *)&F.pipe, "4g9b32M238QJ3YvGcwWNSw==", NULL, 0,
			   NULL, on_closed, &F);
	ck_assert_ptr_nonnull(F.ws);
	pump(50);
	ck_assert_uint_eq(F.in_len, n + 11);
	ck_assert_mem_eq(F.in, hs12, n);
	ck_assert_mem_eq(F.in + n, "\x89\x09keepalive", 11);
	ck_assert_int_eq(F.closed, 0);
	ck_assert_uint_eq(gl_ws_queued(F.ws), 0);
}
END_TEST

START_TEST(text_delivery)
{
	static const char ev[] = "{\"type\":\"config\",\"timestamp\":\"2026-11-22T23:42:31.347887743Z\","
				 "\"metadata\":{\"key\":\"user.foo\",\"old_value\":\"bar\",\"value\":\"baz\"}}\n";
	char big[4082];

	start_past_handshake(NULL);
	ck_assert_int_eq(gl_ws_send_text(F.ws, ev, sizeof(ev) - 1), 0);
	ck_assert_int_eq(gl_ws_send_text(F.ws, "x\n", 2), 0);
	ck_assert_uint_eq(gl_ws_queued(F.ws), sizeof(ev) - 1 + 2);
	/* capture 12's first event: 81 7d (125 bytes) */
	pump_until_bytes(2 + 125, 1000);
	ck_assert_uint_eq(F.in[F.pos], 0x81);
	ck_assert_uint_eq(F.in[F.pos + 1], 125);
	expect_frame(1, 1, ev, sizeof(ev) - 1);
	expect_frame(1, 1, "x\n", 2);

	memset(big, 'b', sizeof(big));
	ck_assert_int_eq(gl_ws_send_text(F.ws, big, 200), 0);
	pump_until_bytes(4, 1000);
	ck_assert_mem_eq(F.in + F.pos, "\x81\x7e\x00\xc8", 4);
	expect_frame(1, 1, big, 200);
	/* 4082 bytes still fit one frame */
	ck_assert_int_eq(gl_ws_send_text(F.ws, big, 4082), 0);
	pump_until_bytes(4, 1000);
	ck_assert_mem_eq(F.in + F.pos, "\x81\x7e\x0f\xf2", 4);
	expect_frame(1, 1, big, 4082);
	ck_assert_int_eq(gl_ws_send_text(F.ws, "", 0), 0);
	expect_frame(1, 1, "", 0);
	pump(20);
	ck_assert_uint_eq(F.in_len, F.pos);
	ck_assert_uint_eq(gl_ws_queued(F.ws), 0);
}
END_TEST

START_TEST(fragmentation)
{
	static char msg[100000];
	size_t i, got;
	struct sframe f;

	for (i = 0; i < sizeof(msg); i++)
		msg[i] = (char)('a' + i % 26);
	start_past_handshake(NULL);

	/* 4083: 4082 in a text frame without FIN, then 1 in a final continuation */
	ck_assert_int_eq(gl_ws_send_text(F.ws, msg, 4083), 0);
	ck_assert_uint_eq(gl_ws_queued(F.ws), 4083);
	pump_until_bytes(4, 1000);
	ck_assert_mem_eq(F.in + F.pos, "\x01\x7e\x0f\xf2", 4);
	expect_frame(0, 1, msg, 4082);
	ck_assert_mem_eq(F.in + F.pos, "\x80\x01", 2);
	expect_frame(1, 0, msg + 4082, 1);

	/* 10000 = 4082 + 4082 + 1836, then a short message after it */
	ck_assert_int_eq(gl_ws_send_text(F.ws, msg, 10000), 0);
	ck_assert_int_eq(gl_ws_send_text(F.ws, "next\n", 5), 0);
	expect_frame(0, 1, msg, 4082);
	expect_frame(0, 0, msg + 4082, 4082);
	expect_frame(1, 0, msg + 8164, 1836);
	expect_frame(1, 1, "next\n", 5);

	/* 8164: exactly two full fragments, no empty final frame */
	ck_assert_int_eq(gl_ws_send_text(F.ws, msg, 8164), 0);
	expect_frame(0, 1, msg, 4082);
	expect_frame(1, 0, msg + 4082, 4082);

	/* a big one reassembles */
	ck_assert_int_eq(gl_ws_send_text(F.ws, msg, sizeof(msg)), 0);
	got = 0;
	do {
		next_frame(&f);
		ck_assert_int_eq(f.op, got ? 0 : 1);
		ck_assert_uint_le(f.len, 4082);
		ck_assert_mem_eq(f.p, msg + got, f.len);
		got += f.len;
	} while (!f.fin);
	ck_assert_uint_eq(got, sizeof(msg));
	pump(20);
	ck_assert_uint_eq(F.in_len, F.pos);
	ck_assert_uint_eq(gl_ws_queued(F.ws), 0);
}
END_TEST

START_TEST(fragment_size_option)
{
	gl_ws_opts o;
	char msg[250];

	opts(&o);
	o.frag_size = 100;
	memset(msg, 'q', sizeof(msg));
	start_past_handshake(&o);
	ck_assert_int_eq(gl_ws_send_text(F.ws, msg, 100), 0);
	expect_frame(1, 1, msg, 100);
	ck_assert_int_eq(gl_ws_send_text(F.ws, msg, 250), 0);
	expect_frame(0, 1, msg, 100);
	expect_frame(0, 0, msg, 100);
	expect_frame(1, 0, msg, 50);
}
END_TEST

START_TEST(ping_pong)
{
	static const uint8_t split[] = { 0x89, 0x83, 1, 2, 3, 4, 'x' ^ 1, 'y' ^ 2, 'z' ^ 3 };
	size_t i;

	start_past_handshake(NULL);
	csend(0x89, "abc", 3, 1);
	expect_frame(1, 0xa, "abc", 3);
	csend(0x89, "", 0, 1);
	expect_frame(1, 0xa, "", 0);
	/* one byte at a time */
	for (i = 0; i < sizeof(split); i++) {
		craw(split + i, 1);
		pump(3);
	}
	expect_frame(1, 0xa, "xyz", 3);
	/* an unsolicited pong is fine and answered by nothing */
	csend(0x8a, "keepalive", 9, 1);
	pump(20);
	ck_assert_uint_eq(F.in_len, F.pos);
	ck_assert_int_eq(F.closed, 0);
}
END_TEST

START_TEST(pong_keeps_alive)
{
	gl_ws_opts o;
	struct sframe f;
	uint64_t t0 = now_ms();
	int pings = 0;

	opts(&o);
	o.ping_interval_ms = 20;
	start_past_handshake(&o);
	csend(0x8a, "keepalive", 9, 1);
	/* answering every ping, 15 intervals pass without a drop */
	while (now_ms() - t0 < 300) {
		next_frame(&f);
		ck_assert_int_eq(f.op, 9);
		ck_assert_uint_eq(f.len, 9);
		ck_assert_mem_eq(f.p, "keepalive", 9);
		csend(0x8a, "keepalive", 9, 1);
		pings++;
	}
	ck_assert_int_ge(pings, 8);
	ck_assert_int_eq(F.closed, 0);
	/* then silence: three more pings, then the drop */
	expect_frame(1, 9, "keepalive", 9);
	expect_frame(1, 9, "keepalive", 9);
	expect_frame(1, 9, "keepalive", 9);
	expect_end_nothing_more(1000);
}
END_TEST

START_TEST(unanswered_pings_drop)
{
	gl_ws_opts o;
	uint64_t t0;

	opts(&o);
	o.ping_interval_ms = 40;
	t0 = now_ms();
	start_past_handshake(&o);
	/* t=0 (counted at start), 40, 80: three unanswered; at 120 the drop,
	 * with no close frame */
	expect_frame(1, 9, "keepalive", 9);
	expect_frame(1, 9, "keepalive", 9);
	expect_end_nothing_more(1000);
	ck_assert_uint_ge(now_ms() - t0, 110);
	ck_assert_uint_lt(now_ms() - t0, 600);
}
END_TEST

static void close_case(const void *payload, size_t n, const void *echo, size_t echo_len)
{
	start_past_handshake(NULL);
	csend(0x88, payload, n, 1);
	pump_until_bytes(echo_len, 1000);
	ck_assert_uint_ge(F.in_len - F.pos, echo_len);
	ck_assert_mem_eq(F.in + F.pos, echo, echo_len);
	F.pos += echo_len;
	expect_end_nothing_more(1000);
	ck_assert_int_eq(gl_ws_send_text(F.ws, "late\n", 5), -EPIPE);
}

START_TEST(close_echo_1000)
{
	close_case("\x03\xe8", 2, "\x88\x02\x03\xe8", 4);
}
END_TEST

START_TEST(close_echo_1001_reason_dropped)
{
	close_case("\x03\xe9going away", 12, "\x88\x02\x03\xe9", 4);
}
END_TEST

START_TEST(close_echo_empty)
{
	close_case("", 0, "\x88\x00", 2);
}
END_TEST

START_TEST(close_echo_other_codes)
{
	/* 3000 is an application code; 1012 is valid for Go, not for wslay */
	close_case("\x0b\xb8", 2, "\x88\x02\x0b\xb8", 4);
}
END_TEST

START_TEST(close_echo_1012)
{
	close_case("\x03\xf4", 2, "\x88\x02\x03\xf4", 4);
}
END_TEST

START_TEST(close_bad_code)
{
	/* 1005 may not be sent: a protocol error, close 1002 */
	close_case("\x03\xed", 2, "\x88\x02\x03\xea", 4);
}
END_TEST

START_TEST(close_one_byte)
{
	/* Go reads a 1-byte close payload as "no status": 88 00 */
	close_case("\x03", 1, "\x88\x00", 2);
}
END_TEST

START_TEST(close_with_pending_data)
{
	/* a close with a backlog: the echo still goes out, then the end */
	start_past_handshake(NULL);
	ck_assert_int_eq(gl_ws_send_text(F.ws, "a\n", 2), 0);
	pump(10);
	expect_frame(1, 1, "a\n", 2);
	csend(0x89, "p", 1, 1);
	csend(0x88, "\x03\xe8", 2, 1);
	expect_frame(1, 0xa, "p", 1);
	expect_frame(1, 8, "\x03\xe8", 2);
	expect_end_nothing_more(1000);
}
END_TEST

START_TEST(client_text_drops)
{
	start_past_handshake(NULL);
	csend(0x81, "hello", 5, 1);
	expect_end_nothing_more(1000);
}
END_TEST

START_TEST(client_binary_drops)
{
	start_past_handshake(NULL);
	/* a ping first gets its pong; the binary message then ends it */
	csend(0x89, "a", 1, 1);
	expect_frame(1, 0xa, "a", 1);
	csend(0x82, "\x00\x01", 2, 1);
	expect_end_nothing_more(1000);
}
END_TEST

START_TEST(client_fragment_start_drops)
{
	start_past_handshake(NULL);
	csend(0x01, "part", 4, 1);
	expect_end_nothing_more(1000);
}
END_TEST

START_TEST(unmasked_frame)
{
	/* RFC 6455 5.1: the server closes (wslay: 1002) */
	start_past_handshake(NULL);
	csend(0x89, "abc", 3, 0);
	expect_frame(1, 8, "\x03\xea", 2);
	expect_end_nothing_more(1000);
}
END_TEST

START_TEST(bad_frames)
{
	/* A control frame may not be fragmented: protocol error, close frame,
	 * end. Whatever wslay answers, the session ends and writes nothing
	 * but one close frame. */
	struct sframe f;

	start_past_handshake(NULL);
	csend(0x09, "abc", 3, 1);
	next_frame(&f);
	ck_assert_int_eq(f.op, 8);
	expect_end_nothing_more(1000);
}
END_TEST

START_TEST(oversize_frames)
{
	gl_ws_opts o;
	char p[100];

	opts(&o);
	o.max_frame = 64;
	memset(p, 'p', sizeof(p));
	start_past_handshake(&o);
	csend(0x89, p, 64, 1);
	expect_frame(1, 0xa, p, 64);
	csend(0x89, p, 65, 1);
	expect_end_nothing_more(1000);
}
END_TEST

START_TEST(huge_length_header)
{
	/* a text frame announcing 2^40 bytes: the end, no allocation (wslay
	 * shows a frame once its first payload byte is in) */
	static const uint8_t hdr[] = { 0x81, 0xff, 0, 0, 1, 0, 0, 0, 0, 0, 1, 2, 3, 4, 'x' };

	start_past_handshake(NULL);
	craw(hdr, sizeof(hdr));
	expect_end_nothing_more(1000);
}
END_TEST

START_TEST(queue_overflow_1008)
{
	gl_ws_opts o;
	char m[300];

	opts(&o);
	o.max_queued = 1000;
	memset(m, 'm', sizeof(m));
	start_past_handshake(&o);
	/* no loop turn in between: all four are queued at once */
	ck_assert_int_eq(gl_ws_send_text(F.ws, m, 300), 0);
	ck_assert_int_eq(gl_ws_send_text(F.ws, m, 300), 0);
	ck_assert_int_eq(gl_ws_send_text(F.ws, m, 300), 0);
	ck_assert_uint_eq(gl_ws_queued(F.ws), 900);
	ck_assert_int_eq(gl_ws_send_text(F.ws, m, 300), -ENOBUFS);
	ck_assert_int_eq(F.closed, 0); /* never synchronously */
	ck_assert_int_eq(gl_ws_send_text(F.ws, m, 1), -EPIPE);
	/* the close frame jumps the backlog */
	expect_frame(1, 8, "\x03\xf0", 2);
	expect_end_nothing_more(1000);
}
END_TEST

START_TEST(queue_overflow_reader_stalled)
{
	gl_ws_opts o;
	char m[1000];
	int r = 0, i;
	uint64_t t0;
	size_t peak = 0;

	opts(&o);
	o.max_queued = 64 * 1024;
	memset(m, 's', sizeof(m));
	start_past_handshake(&o);
	/* the client reads nothing from here on */
	for (i = 0; i < 100000; i++) {
		r = gl_ws_send_text(F.ws, m, sizeof(m));
		if (r < 0)
			break;
		if (gl_ws_queued(F.ws) > peak)
			peak = gl_ws_queued(F.ws);
		uv_run(&F.loop, UV_RUN_NOWAIT);
	}
	ck_assert_int_eq(r, -ENOBUFS);
	ck_assert_uint_le(peak, o.max_queued);
	ck_assert_int_eq(F.closed, 0);
	t0 = now_ms();
	while (!F.closed && now_ms() - t0 < 8000)
		uv_run(&F.loop, UV_RUN_ONCE);
	ck_assert_int_eq(F.closed, 1);
	/* the linger timer, not the peer, ended it */
	ck_assert_uint_ge(now_ms() - t0, 4000);
}
END_TEST

START_TEST(ping_flood_not_reading)
{
	/* a client that sends pings and never reads: pongs are not queued
	 * without bound, because reading waits for the stalled write */
	static const uint8_t key[4] = { 1, 2, 3, 4 };
	uint8_t frame[106];
	size_t peak = 0, sent = 0, i;
	uint64_t t0;
	ssize_t w;

	frame[0] = 0x89;
	frame[1] = 0x80 | 100;
	memcpy(frame + 2, key, 4);
	for (i = 0; i < 100; i++)
		frame[6 + i] = (uint8_t)('p' ^ key[i % 4]);
	start_past_handshake(NULL);
	t0 = now_ms();
	while (now_ms() - t0 < 400) {
		for (i = 0; i < 64; i++) {
			w = write(F.cfd, frame, sizeof(frame));
			if (w != (ssize_t)sizeof(frame))
				break;
			sent += sizeof(frame);
		}
		if (w > 0 && w < (ssize_t)sizeof(frame)) {
			/* finish the partial frame so the stream stays in sync */
			size_t off = (size_t)w;
			while (off < sizeof(frame)) {
				w = write(F.cfd, frame + off, sizeof(frame) - off);
				if (w > 0)
					off += (size_t)w;
				uv_run(&F.loop, UV_RUN_NOWAIT);
			}
		}
		uv_run(&F.loop, UV_RUN_NOWAIT);
		if (gl_ws_queued(F.ws) > peak)
			peak = gl_ws_queued(F.ws);
	}
	ck_assert_int_eq(F.closed, 0);
	ck_assert_uint_gt(sent, 100000);
	ck_assert_uint_lt(peak, 256 * 1024);
	/* the client goes away: the stalled write fails, the session ends */
	close(F.cfd);
	F.cfd = -1;
	pump_until_closed(2000);
}
END_TEST

START_TEST(early_bytes)
{
	F.ws = gl_ws_start(&F.loop, (uv_stream_t *)&F.pipe, key_rfc, "\x81", 1, NULL, on_closed, &F);
	ck_assert_ptr_nonnull(F.ws);
	ck_assert_int_eq(F.closed, 0); /* never synchronously */
	ck_assert_int_eq(gl_ws_send_text(F.ws, "x", 1), -EPIPE);
	pump_until_closed(1000);
	pump_until_eof(1000);
	ck_assert_uint_eq(F.in_len, 0);
}
END_TEST

START_TEST(server_close)
{
	start_past_handshake(NULL);
	ck_assert_int_eq(gl_ws_send_text(F.ws, "last\n", 5), 0);
	gl_ws_close(F.ws, 1001);
	ck_assert_int_eq(F.closed, 0);
	ck_assert_int_eq(gl_ws_send_text(F.ws, "x", 1), -EPIPE);
	/* control frames go first: the close, and nothing after it */
	expect_frame(1, 8, "\x03\xe9", 2);
	expect_end_nothing_more(1000);
}
END_TEST

START_TEST(peer_goes_away)
{
	start_past_handshake(NULL);
	close(F.cfd);
	F.cfd = -1;
	pump_until_closed(1000);
	ck_assert_int_eq(gl_ws_send_text(F.ws, "x", 1), -EPIPE);
}
END_TEST

START_TEST(peer_goes_away_midframe)
{
	start_past_handshake(NULL);
	craw("\x89\x85\x01", 3);
	pump(10);
	close(F.cfd);
	F.cfd = -1;
	pump_until_closed(1000);
}
END_TEST

struct owner {
	uv_pipe_t pipe;
	int closed;
};

static void on_owner_closed(gl_ws *ws, void *arg)
{
	struct owner *ow = arg;

	ow->closed++;
	uv_close((uv_handle_t *)&ow->pipe, NULL);
}

START_TEST(many_sessions_one_loop)
{
	/* several sessions on one loop: one event each, a close each */
	enum { N = 8 };
	static const char hs_ping[] = "\x89\x09keepalive\x81\x03" "ev\n\x88\x02\x03\xe8";
	struct owner ow[N];
	gl_ws *ws[N];
	int cfds[N], sv[2], i, all;
	unsigned char buf[N][256];
	size_t got[N], want = sizeof(hs_rfc) - 1 + sizeof(hs_ping) - 1;
	uint64_t t0;
	ssize_t n;

	memset(ow, 0, sizeof(ow));
	memset(got, 0, sizeof(got));
	ck_assert_ptr_null(gl_ws_start(&F.loop, (uv_stream_t *)&F.pipe, key_rfc, NULL, 0, NULL,
				       NULL, NULL)); /* no closed callback: refused */
	for (i = 0; i < N; i++) {
		ck_assert_int_eq(socketpair(AF_UNIX, SOCK_STREAM, 0, sv), 0);
		uv_pipe_init(&F.loop, &ow[i].pipe, 0);
		uv_pipe_open(&ow[i].pipe, sv[0]);
		cfds[i] = sv[1];
		fcntl(cfds[i], F_SETFL, O_NONBLOCK);
		ws[i] = gl_ws_start(&F.loop, (uv_stream_t *)&ow[i].pipe, key_rfc, NULL, 0, NULL,
				    on_owner_closed, &ow[i]);
		ck_assert_ptr_nonnull(ws[i]);
	}
	for (i = 0; i < N; i++)
		ck_assert_int_eq(gl_ws_send_text(ws[i], "ev\n", 3), 0);
	uv_run(&F.loop, UV_RUN_NOWAIT);
	for (i = 0; i < N; i++)
		ck_assert_int_eq(write(cfds[i], "\x88\x82\0\0\0\0\x03\xe8", 8), 8);
	t0 = now_ms();
	do {
		uv_run(&F.loop, UV_RUN_ONCE);
		all = 1;
		for (i = 0; i < N; i++) {
			n = read(cfds[i], buf[i] + got[i], sizeof(buf[i]) - got[i]);
			if (n > 0)
				got[i] += (size_t)n;
			if (!ow[i].closed)
				all = 0;
		}
	} while (!all && now_ms() - t0 < 2000);
	for (i = 0; i < N; i++) {
		ck_assert_int_eq(ow[i].closed, 1);
		while ((n = read(cfds[i], buf[i] + got[i], sizeof(buf[i]) - got[i])) > 0)
			got[i] += (size_t)n;
		ck_assert_uint_eq(got[i], want);
		ck_assert_mem_eq(buf[i], hs_rfc, sizeof(hs_rfc) - 1);
		ck_assert_mem_eq(buf[i] + sizeof(hs_rfc) - 1, hs_ping, sizeof(hs_ping) - 1);
		gl_ws_free(ws[i]);
		close(cfds[i]);
	}
	uv_run(&F.loop, UV_RUN_NOWAIT);
}
END_TEST

static Suite *ws_suite(void)
{
	Suite *s = suite_create("ws");
	TCase *pure = tcase_create("pure");
	TCase *sess = tcase_create("session");

	tcase_add_test(pure, sha1_vectors);
	tcase_add_test(pure, accept_keys);
	tcase_add_test(pure, check_table);
	suite_add_tcase(s, pure);

	tcase_add_checked_fixture(sess, setup, teardown);
	tcase_add_test(sess, handshake_bytes);
	tcase_add_test(sess, text_delivery);
	tcase_add_test(sess, fragmentation);
	tcase_add_test(sess, fragment_size_option);
	tcase_add_test(sess, ping_pong);
	tcase_add_test(sess, pong_keeps_alive);
	tcase_add_test(sess, unanswered_pings_drop);
	tcase_add_test(sess, close_echo_1000);
	tcase_add_test(sess, close_echo_1001_reason_dropped);
	tcase_add_test(sess, close_echo_empty);
	tcase_add_test(sess, close_echo_other_codes);
	tcase_add_test(sess, close_echo_1012);
	tcase_add_test(sess, close_bad_code);
	tcase_add_test(sess, close_one_byte);
	tcase_add_test(sess, close_with_pending_data);
	tcase_add_test(sess, client_text_drops);
	tcase_add_test(sess, client_binary_drops);
	tcase_add_test(sess, client_fragment_start_drops);
	tcase_add_test(sess, unmasked_frame);
	tcase_add_test(sess, bad_frames);
	tcase_add_test(sess, oversize_frames);
	tcase_add_test(sess, huge_length_header);
	tcase_add_test(sess, queue_overflow_1008);
	tcase_add_test(sess, queue_overflow_reader_stalled);
	tcase_add_test(sess, ping_flood_not_reading);
	tcase_add_test(sess, early_bytes);
	tcase_add_test(sess, server_close);
	tcase_add_test(sess, peer_goes_away);
	tcase_add_test(sess, peer_goes_away_midframe);
	tcase_add_test(sess, many_sessions_one_loop);
	suite_add_tcase(s, sess);
	return s;
}

UNIT_MAIN(ws_suite)
