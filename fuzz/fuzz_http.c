/* The HTTP request layer (bridge/http.c, with bridge/url.c for targets):
 * request line, headers, percent-decoding, Content-Length and chunked
 * bodies, pipelining, 100-continue, hijacking and the WebSocket upgrade.
 *
 * Input: byte 0 picks how the bytes are split into reads (fuzz_util.h),
 * bytes 1-2 seed the split sizes, the rest is what a client sends on one
 * connection (then it half-closes and reads until the server hangs up).
 *
 * The handler answers by the first byte of the decoded path, so that the
 * fuzzer reaches every response mode:
 *   /b...  keep up to 100 body bytes, /B... up to 64 KiB (else discard)
 *   /e...  gl_http_error with the path as text (long paths: heap path)
 *   /s...  streamed body with a Content-Length; /sx... ends it short
 *   /h...  hijack, echo what came after the request, close on input
 *   /w...  WebSocket upgrade (gl_ws_check, gl_ws_start)
 *   /d...  answer later from a timer (the cancel path when the client goes)
 *   else   200 echoing method, path, some headers and the body
 * and checks what the layer promises about each request: NUL-terminated
 * path and target, body within the limit, header values trimmed. */
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>
#include <uv.h>

#include "bridge/http.h"
#include "bridge/ws.h"
#include "fuzz/fuzz_util.h"

typedef struct hconn {
	gl_http_conn *c;
	gl_ws *ws;
	bool ws_closed;
	uv_timer_t *later; /* /d: the pending answer */
	size_t stream_left;
	bool stream_short;
} hconn;

static uv_loop_t loop;
static gl_http_server *srv;
static char sock_path[128];
static char *dir;
static int live_conns;   /* accepted and not yet closed */
static int live_handles; /* timers being closed */

static void check(bool ok, const char *what)
{
	if (!ok)
		fz_die(what);
}

static void on_handle_freed(uv_handle_t *h)
{
	free(h);
	live_handles--;
}

static int h_accept(gl_http_conn *c, void *arg)
{
	hconn *hc = calloc(1, sizeof(*hc));

	live_conns++;
	if (!hc)
		return -ENOMEM;
	hc->c = c;
	gl_http_conn_set_data(c, hc);
	return 0;
}

static char first(const gl_http_req *r)
{
	return r->path_len >= 2 ? r->path[1] : '\0';
}

static size_t h_body_limit(gl_http_conn *c, const gl_http_req *r, void *arg)
{
	switch (first(r)) {
	case 'b': return 100;
	case 'B': return 65536;
	default: return 0;
	}
}

static void check_req(const gl_http_req *r)
{
	size_t lim = first(r) == 'b' ? 100 : first(r) == 'B' ? 65536 : 0;

	check(r->method_len > 0 && r->method[r->method_len] == '\0', "method not terminated");
	check(r->target[r->target_len] == '\0', "target not terminated");
	check(r->path[r->path_len] == '\0', "path not terminated");
	check(r->epath[r->epath_len] == '\0', "escaped path not terminated");
	check(r->major == 1 && r->minor >= 0 && r->minor <= 9, "version passed to a handler");
	check(r->body_len <= lim, "body over the handler's limit");
	check(r->body != NULL, "body pointer NULL");
	for (size_t i = 0; i < r->nfields; i++) {
		const gl_http_field *f = &r->fields[i];

		check(f->nlen > 0, "empty header name");
		check(f->vlen == 0 || (f->value[0] != ' ' && f->value[0] != '\t' &&
				       f->value[f->vlen - 1] != ' ' && f->value[f->vlen - 1] != '\t'),
		      "header value not trimmed");
	}
}

static void on_more(gl_http_conn *c, void *arg)
{
	hconn *hc = arg;
	static const char fill[512] = {'x'};
	size_t n = hc->stream_left < sizeof(fill) ? hc->stream_left : sizeof(fill);

	if (hc->stream_short || n == 0) {
		gl_http_stream_end(c);
		return;
	}
	hc->stream_left -= n;
	gl_http_stream_write(c, fill, n);
}

static void on_hijack_input(gl_http_conn *c, void *arg)
{
	gl_http_close(c);
}

static void on_ws_closed(gl_ws *ws, void *arg)
{
	hconn *hc = arg;

	hc->ws_closed = true;
	gl_http_close(hc->c);
}

static void later_cancel(void *arg)
{
	hconn *hc = arg;

	if (hc->later) {
		uv_close((uv_handle_t *)hc->later, on_handle_freed);
		hc->later = NULL;
	}
}

static void on_later(uv_timer_t *t)
{
	hconn *hc = t->data;

	uv_close((uv_handle_t *)hc->later, on_handle_freed);
	hc->later = NULL;
	gl_http_respond(hc->c, 202, NULL, 0, "later\n", 6);
}

/* A header value as a C string for gl_ws_check (cut at 255 bytes), or
 * NULL when the header is absent. */
static const char *hdr_str(const gl_http_req *r, const char *name, char buf[256])
{
	size_t n = 0;
	const char *v = gl_http_req_get(r, name, &n);

	if (!v)
		return NULL;
	if (n > 255)
		n = 255;
	memcpy(buf, v, n);
	buf[n] = '\0';
	return buf;
}

static void answer_ws(gl_http_conn *c, hconn *hc, gl_http_req *r)
{
	char cbuf[256], ubuf[256], vbuf[256], kbuf[256];
	const char *key = hdr_str(r, "Sec-WebSocket-Key", kbuf);
	const char *rest;
	size_t nrest;
	gl_ws_opts o;
	uv_stream_t *st;
	int status;

	status = gl_ws_check(r->method, hdr_str(r, "Connection", cbuf), hdr_str(r, "Upgrade", ubuf),
			     hdr_str(r, "Sec-WebSocket-Version", vbuf), key);
	if (status) {
		const char *body = gl_ws_error_body(status);

		check(body != NULL, "no error body for a refused upgrade");
		gl_http_respond(c, status, NULL, 0, body, strlen(body));
		return;
	}
	st = gl_http_hijack(c, &rest, &nrest);
	check(st != NULL, "hijack failed in a request");
	gl_ws_opts_default(&o);
	o.ping_interval_ms = 0; /* the first ping only: nothing depends on time */
	hc->ws = gl_ws_start(&loop, st, key, rest, nrest, &o, on_ws_closed, hc);
	if (!hc->ws)
		gl_http_close(c);
}

static void h_request(gl_http_conn *c, gl_http_req *r, void *arg)
{
	hconn *hc = gl_http_conn_data(c);
	gl_buf b = GL_BUF_INIT;
	const char *rest;
	size_t nrest;
	char len[32];

	check_req(r);
	switch (first(r)) {
	case 'e':
		gl_http_error(c, 400 + (int)(r->path_len % 32), r->path);
		return;
	case 's': {
		gl_http_hdr h[2] = {{"Content-Length", len}, {"Content-Type", "text/plain"}};

		hc->stream_left = (r->path_len * 331) % 5000;
		hc->stream_short = r->path_len > 2 && r->path[2] == 'x';
		snprintf(len, sizeof(len), "%zu", hc->stream_left);
		gl_http_stream_begin(c, 200, h, 2, on_more, hc);
		return;
	}
	case 'h': {
		uv_stream_t *st = gl_http_hijack(c, &rest, &nrest);

		check(st != NULL, "hijack failed in a request");
		gl_http_raw_write(c, "HIJACKED\n", 9);
		if (nrest)
			gl_http_raw_write(c, rest, nrest);
		if (gl_http_watch(c, on_hijack_input, hc))
			gl_http_close(c);
		return;
	}
	case 'w':
		answer_ws(c, hc, r);
		return;
	case 'd':
		hc->later = malloc(sizeof(*hc->later));
		if (!hc->later)
			fz_die("out of memory");
		uv_timer_init(&loop, hc->later);
		hc->later->data = hc;
		live_handles++;
		uv_timer_start(hc->later, on_later, 0, 0);
		gl_http_set_cancel(c, later_cancel, hc);
		return;
	default: {
		gl_http_hdr h[2] = {{"Content-Type", "text/plain"}, {"X-Echo", "1"}};
		const char *host;
		size_t hl = 0;

		gl_buf_add(&b, r->method, r->method_len);
		gl_buf_addc(&b, ' ');
		gl_buf_add(&b, r->path, r->path_len);
		gl_buf_addc(&b, '\n');
		host = gl_http_req_get(r, "Host", &hl);
		if (host)
			gl_buf_add(&b, host, hl);
		gl_http_req_join(r, "Accept", &b);
		gl_buf_add(&b, r->body, r->body_len);
		if (r->path_len > 2 && r->path[2] == 'c') {
			h[1].name = "Connection";
			h[1].value = "close";
		}
		gl_http_respond(c, 200, h, 2, b.data, b.len);
		gl_buf_free(&b);
	}
	}
}

static void h_closed(gl_http_conn *c, void *arg)
{
	hconn *hc = gl_http_conn_data(c);

	live_conns--;
	if (!hc)
		return;
	if (hc->later) {
		/* cancel has run (it runs before `closed`) */
		fz_die("pending answer left after close");
	}
	if (hc->ws) {
		check(hc->ws_closed, "connection closed under a live WebSocket session");
		gl_ws_free(hc->ws);
	}
	free(hc);
}

static void cleanup(void)
{
	if (sock_path[0])
		unlink(sock_path);
	if (dir)
		rmdir(dir);
}

static void init(void)
{
	static const gl_http_handler h = {h_accept, h_body_limit, h_request, h_closed};
	gl_http_limits lim = {
		.max_header_bytes = 8192,
		.max_queued = 1 << 20,
		.max_conns = 8,
		.header_timeout_ms = 0,
		.idle_timeout_ms = 0,
	};
	char err[256];
	static bool done;

	if (done)
		return;
	done = true;
	signal(SIGPIPE, SIG_IGN);
	dir = fz_tmpdir("http");
	snprintf(sock_path, sizeof(sock_path), "%s/sock", dir);
	fz_on_exit(cleanup);
	if (uv_loop_init(&loop))
		fz_die("uv_loop_init");
	if (gl_http_server_start(&loop, sock_path, 0600, &lim, &h, NULL, &srv, err, sizeof(err)))
		fz_die(err);
}

static int client(void)
{
	struct sockaddr_un sa = {.sun_family = AF_UNIX};
	int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);

	if (fd < 0)
		fz_die("socket");
	strcpy(sa.sun_path, sock_path);
	if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)))
		fz_die("connect");
	fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
	return fd;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	static char out[16];
	fz_drive_opts o = {0};
	size_t got = 0;

	init();
	if (size < 3)
		return 0;
	o.split = data[0];
	o.seed = (uint32_t)data[1] << 8 | data[2];
	o.out = out;
	o.out_cap = sizeof(out);
	o.out_len = &got;
	fz_drive(&loop, client(), data + 3, size - 3, &o);
	/* nothing, or a response (a hijacked first request writes its marker) */
	check(got == 0 || (got >= 9 && (memcmp(out, "HTTP/1.1 ", 9) == 0 ||
					 memcmp(out, "HTTP/1.0 ", 9) == 0 ||
					 memcmp(out, "HIJACKED\n", 9) == 0)),
	      "the server wrote something that is not a response");
	/* the server sees the client's close; wait until it has freed
	 * everything of this connection */
	while (live_conns || live_handles) {
		uv_run(&loop, UV_RUN_NOWAIT);
		if (live_conns || live_handles)
			fz_wait(&loop, -1, 0, 10);
	}
	check(gl_http_server_nconns(srv) == 0, "connections left after the client went");
	return 0;
}
