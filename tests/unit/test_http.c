/* The devlxd HTTP face: Go net/url rules (bridge/url.c), the HTTP layer's
 * framing and limits (bridge/http.c), and every endpoint's bytes
 * (bridge/devlxd.c, images.c) over a real Unix socket, against an
 * in-memory model whose instance c1 is bound to this test process. */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <uv.h>

#include "bridge/devlxd.h"
#include "bridge/http.h"
#include "bridge/url.h"
#include "core/model.h"
#include "tests/unit/fake_store.h"
#include "tests/unit/unit.h"

/* ---- an in-memory model -------------------------------------------------- */


static uv_loop_t loop;
static fake_store fstore;
static gl_model *model;
static gl_devlxd *dx;
static char *tmp;
static char sock_path[256], images[256];
static int pending;

static void done_cb(void *arg, int status)
{
	int *st = arg;

	*st = status;
	pending--;
}

static double now_s(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void pump(int ms)
{
	double end = now_s() + ms / 1000.0;

	do {
		uv_run(&loop, UV_RUN_NOWAIT);
		usleep(200);
	} while (now_s() < end);
}

static int op(gl_op_kind kind, const char *inst, const char *key, const char *value)
{
	int st = 1;
	gl_op o = {.kind = kind,
		   .origin = GL_ORIGIN_HOST,
		   .instance = inst,
		   .ilen = strlen(inst),
		   .key = key,
		   .klen = key ? strlen(key) : 0,
		   .value = value,
		   .vlen = value ? strlen(value) : 0};

	pending++;
	ck_assert_int_eq(gl_model_submit(model, &o, done_cb, &st), 0);
	while (pending)
		uv_run(&loop, UV_RUN_ONCE);
	return st;
}

static int attr(const char *inst, gl_attr a, const char *value)
{
	int st = 1;
	gl_op o = {.kind = GL_OP_ATTR_SET,
		   .origin = GL_ORIGIN_HOST,
		   .attr = a,
		   .instance = inst,
		   .ilen = strlen(inst),
		   .value = value,
		   .vlen = strlen(value)};

	pending++;
	ck_assert_int_eq(gl_model_submit(model, &o, done_cb, &st), 0);
	while (pending)
		uv_run(&loop, UV_RUN_ONCE);
	return st;
}

static void bind_self(const char *inst)
{
	char pid[32];

	snprintf(pid, sizeof(pid), "%d", (int)getpid());
	ck_assert_int_eq(attr(inst, GL_ATTR_INIT_PID, pid), 0);
}

/* c1 as in the LXD captures, bound to this process. */
static void start_opts(gl_devlxd_opts *o)
{
	char err[256];

	signal(SIGPIPE, SIG_IGN);
	tmp = unit_tmpdir();
	chmod(tmp, 0755); /* callers of other uids must reach the socket */
	snprintf(sock_path, sizeof(sock_path), "%s/sock", tmp);
	snprintf(images, sizeof(images), "%s/images", tmp);
	mkdir(images, 0755);
	fstore.base.ops = &fake_ops;
	ck_assert_int_eq(uv_loop_init(&loop), 0);
	model = gl_model_open(&loop, &fstore.base, NULL, err, sizeof(err));
	ck_assert_msg(model != NULL, "%s", err);
	ck_assert_int_eq(op(GL_OP_CREATE, "c1", NULL, NULL), 0);
	ck_assert_int_eq(op(GL_OP_CONFIG_SET, "c1", "user.foo", "bar"), 0);
	ck_assert_int_eq(op(GL_OP_CONFIG_SET, "c1", "user.meta-data", "foo: meta\nbar: 2"), 0);
	ck_assert_int_eq(op(GL_OP_CONFIG_SET, "c1", "cloud-init.user-data",
			    "#cloud-config\npackages:\n  - hello"),
			 0);
	ck_assert_int_eq(op(GL_OP_CONFIG_SET, "c1", "volatile.cloud-init.instance-id",
			    "856fc818-f65d-440f-b283-2b893183ee4d"),
			 0);
	ck_assert_int_eq(op(GL_OP_DEVICE_SET, "c1", "root",
			    "{\"path\":\"/\",\"pool\":\"default\",\"type\":\"disk\"}"),
			 0);
	ck_assert_int_eq(op(GL_OP_DEVICE_SET, "c1", "share",
			    "{\"path\":\"/mnt/share\",\"source\":\"/var/tmp/lxdshare\",\"type\":\"disk\"}"),
			 0);
	bind_self("c1");
	o->socket_path = sock_path;
	o->images_dir = images;
	ck_assert_int_eq(gl_devlxd_start(&loop, model, o, &dx, err, sizeof(err)), 0);
}

static void start(void)
{
	gl_devlxd_opts o;

	gl_devlxd_opts_default(&o);
	start_opts(&o);
}

static void stop(void)
{
	gl_devlxd_stop(dx);
	pump(50);
	uv_run(&loop, UV_RUN_DEFAULT);
	gl_model_close(model);
	uv_run(&loop, UV_RUN_DEFAULT);
	ck_assert_int_eq(uv_loop_close(&loop), 0);
	ck_assert_int_ne(access(sock_path, F_OK), 0);
	unit_rmrf(tmp);
	free(tmp);
}

/* ---- a raw client ----------------------------------------------------------- */

static int cconnect(void)
{
	struct sockaddr_un a = {.sun_family = AF_UNIX};
	int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);

	ck_assert_int_ge(fd, 0);
	strcpy(a.sun_path, sock_path);
	ck_assert_int_eq(connect(fd, (struct sockaddr *)&a, sizeof(a)), 0);
	fcntl(fd, F_SETFL, O_NONBLOCK);
	return fd;
}

static void csend(int fd, const void *p, size_t n)
{
	const char *c = p;

	while (n) {
		ssize_t k = send(fd, c, n, MSG_NOSIGNAL);

		if (k < 0 && errno == EAGAIN) {
			uv_run(&loop, UV_RUN_NOWAIT);
			continue;
		}
		ck_assert_int_gt(k, 0);
		c += k;
		n -= (size_t)k;
	}
}

/* Read until EOF, `want` bytes, or `ms` without progress. 1 if EOF seen. */
static int crecv(int fd, gl_buf *out, size_t want, int ms)
{
	double last = now_s();
	char buf[65536];

	for (;;) {
		ssize_t k;

		uv_run(&loop, UV_RUN_NOWAIT);
		k = recv(fd, buf, sizeof(buf), MSG_DONTWAIT);
		if (k > 0) {
			gl_buf_add(out, buf, (size_t)k);
			last = now_s();
			if (want && out->len >= want)
				return 0;
			continue;
		}
		if (k == 0 || (k < 0 && errno != EAGAIN))
			return 1;
		if (now_s() - last > ms / 1000.0)
			return 0;
		usleep(100);
	}
}

/* Dates vary: "Date: <29 bytes>" becomes "Date: <DATE>". */
static char *masked(gl_buf *b)
{
	char *p, *from;

	gl_buf_addc(b, '\0');
	b->len--;
	from = b->data;
	while ((p = strstr(from, "Date: "))) {
		if (p[6] != '<' && strlen(p) >= 35) {
			memmove(p + 12, p + 35, b->len - (size_t)(p + 35 - b->data) + 1);
			memcpy(p + 6, "<DATE>", 6);
			b->len -= 23;
		}
		from = p + 6;
	}
	return b->data;
}

/* One request on a new connection; the response until EOF. */
static char *xchg_n(const char *req, size_t n, int *eof)
{
	static gl_buf out;
	int fd = cconnect();
	int e;

	gl_buf_free(&out);
	csend(fd, req, n);
	e = crecv(fd, &out, 0, 400);
	if (eof)
		*eof = e;
	close(fd);
	pump(5);
	return masked(&out);
}

static char *xchg(const char *req)
{
	return xchg_n(req, strlen(req), NULL);
}

static char *get(const char *path)
{
	char req[4096];

	snprintf(req, sizeof(req), "GET %s HTTP/1.1\r\nHost: lxd\r\nConnection: close\r\n\r\n", path);
	return xchg(req);
}

#define OK_HEAD(ct, len) "HTTP/1.1 200 OK\r\nContent-Type: " ct "\r\nDate: <DATE>\r\nContent-Length: " #len "\r\nConnection: close\r\n\r\n"
#define ERR(code, reason, len, body) "HTTP/1.1 " #code " " reason "\r\nContent-Type: text/plain; charset=utf-8\r\nX-Content-Type-Options: nosniff\r\nDate: <DATE>\r\nContent-Length: " #len "\r\nConnection: close\r\n\r\n" body
#define API_BODY "{\"state\":\"\",\"api_version\":\"1.0\",\"instance_type\":\"container\",\"location\":\"none\"}\n"
#define NOT_FOUND_PAGE ERR(404, "Not Found", 19, "404 page not found\n")
#define RAW400 "HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\nConnection: close\r\n\r\n400 Bad Request"

/* ---- url.c ------------------------------------------------------------------ */

static char *paths(const char *target, char **dec, bool *raw_kept)
{
	static gl_buf d, e;
	gl_url u;

	gl_buf_free(&d);
	gl_buf_free(&e);
	ck_assert_int_eq(gl_url_parse_request(target, strlen(target), &u), 0);
	ck_assert_int_eq(gl_url_paths(&u, &d, &e, raw_kept), 0);
	gl_buf_addc(&d, '\0');
	gl_buf_addc(&e, '\0');
	*dec = d.data;
	return e.data;
}

START_TEST(url_rules)
{
	gl_url u;
	gl_buf b = GL_BUF_INIT;
	char *dec;
	bool raw;

	/* what Go rejects before routing */
	ck_assert_int_eq(gl_url_parse_request("GARBAGE", 7, &u), -EINVAL);
	ck_assert_int_eq(gl_url_parse_request("/1.0/config/user.%zz", 20, &u), -EINVAL);
	ck_assert_int_eq(gl_url_parse_request("/a%2", 4, &u), -EINVAL);
	ck_assert_int_eq(gl_url_parse_request("/a\x01", 3, &u), -EINVAL);
	ck_assert_int_eq(gl_url_parse_request(":x", 2, &u), -EINVAL);
	ck_assert_int_eq(gl_url_parse_request("http://lx{d/1.0", 15, &u), -EINVAL);
	ck_assert_int_eq(gl_url_parse_request("http://lxd:8x/1.0", 17, &u), -EINVAL);
	/* absolute-form: only the path counts */
	ck_assert_int_eq(gl_url_parse_request("http://lxd/1.0/meta-data", 24, &u), 0);
	ck_assert_int_eq((int)u.raw_path_len, 14);
	ck_assert_int_eq(memcmp(u.raw_path, "/1.0/meta-data", 14), 0);
	ck_assert_int_eq(gl_url_parse_request("*", 1, &u), 0);
	ck_assert(u.star);

	ck_assert_str_eq(paths("/1.0/config/user%2Efoo", &dec, &raw), "/1.0/config/user%2Efoo");
	ck_assert_str_eq(dec, "/1.0/config/user.foo");
	ck_assert(raw);
	ck_assert_str_eq(paths("/1.0/config/a%20b", &dec, &raw), "/1.0/config/a%20b");
	ck_assert(!raw);
	/* a sent form that is not a valid encoding is re-escaped, as Go does */
	ck_assert_str_eq(paths("/1.0/config/a{b", &dec, &raw), "/1.0/config/a%7Bb");

	ck_assert_int_eq(gl_url_clean_path("//1.0", 5, &b), 0);
	ck_assert_str_eq(b.data, "/1.0");
	gl_buf_reset(&b);
	ck_assert_int_eq(gl_url_clean_path("/1.0/./config/", 14, &b), 0);
	ck_assert_str_eq(b.data, "/1.0/config/");
	gl_buf_reset(&b);
	ck_assert_int_eq(gl_url_clean_path("/1.0/config/../config/user.foo", 30, &b), 0);
	ck_assert_str_eq(b.data, "/1.0/config/user.foo");
	gl_buf_reset(&b);
	ck_assert_int_eq(gl_url_clean_path("/../..", 6, &b), 0);
	ck_assert_str_eq(b.data, "/");
	gl_buf_reset(&b);

	ck_assert_int_eq(gl_url_query_get("type=config&type=device", 23, "type", &b), 1);
	ck_assert_str_eq(b.data, "config");
	gl_buf_reset(&b);
	ck_assert_int_eq(gl_url_query_get("a;b=1&type=de%76ice+x", 21, "type", &b), 1);
	ck_assert_str_eq(b.data, "device x");
	gl_buf_reset(&b);
	ck_assert_int_eq(gl_url_query_get("type=%zz&type=2", 15, "type", &b), 1);
	ck_assert_str_eq(b.data, "2");
	gl_buf_reset(&b);
	ck_assert_int_eq(gl_url_query_get("x=1", 3, "type", &b), 0);

	ck_assert(gl_http_has_token("keep-alive, Upgrade", 19, "upgrade"));
	ck_assert(gl_http_has_token("CLOSE", 5, "close"));
	ck_assert(!gl_http_has_token("closed", 6, "close"));
	gl_buf_free(&b);
}
END_TEST

START_TEST(url_redirects)
{
	static const struct {
		const char *target, *loc;
	} t[] = {
		{"//1.0", "/1.0"},
		{"//1.0?x=1", "/1.0?x=1"},
		{"/1.0/./config", "/1.0/config"},
		{"/1.0/config/../config/user.foo", "/1.0/config/user.foo"},
		{"/1.0//config?", "/1.0/config?"},
		{"http://lxd//1.0", "http://lxd/1.0"},
		/* Go escapes the cleaned (escaped) path once more */
		{"//1.0/config/user%2Efoo", "/1.0/config/user%252Efoo"},
	};

	for (size_t k = 0; k < sizeof(t) / sizeof(t[0]); k++) {
		gl_buf d = GL_BUF_INIT, e = GL_BUF_INIT, c = GL_BUF_INIT, l = GL_BUF_INIT;
		gl_url u;
		bool raw;

		ck_assert_int_eq(gl_url_parse_request(t[k].target, strlen(t[k].target), &u), 0);
		ck_assert_int_eq(gl_url_paths(&u, &d, &e, &raw), 0);
		ck_assert_int_eq(gl_url_clean_path(e.data, e.len, &c), 0);
		ck_assert_int_eq(gl_url_redirect_location(&u, raw, d.data, d.len, c.data, c.len, &l),
				 0);
		ck_assert_str_eq(l.data, t[k].loc);
		gl_buf_free(&d);
		gl_buf_free(&e);
		gl_buf_free(&c);
		gl_buf_free(&l);
	}
}
END_TEST

/* ---- endpoints, byte for byte (captures 01-09, 20-22) ------------------------ */

START_TEST(capture_bytes)
{
	start();
	ck_assert_str_eq(get("/"), OK_HEAD("application/json", 9) "[\"/1.0\"]\n");
	ck_assert_str_eq(get("/1.0"), OK_HEAD("application/json", 79) API_BODY);
	ck_assert_str_eq(get("/1.0/config"),
			 OK_HEAD("application/json", 89)
			 "[\"/1.0/config/cloud-init.user-data\",\"/1.0/config/user.foo\","
			 "\"/1.0/config/user.meta-data\"]\n");
	ck_assert_str_eq(get("/1.0/config/user.foo"), OK_HEAD("application/octet-stream", 3) "bar");
	ck_assert_str_eq(get("/1.0/config/cloud-init.user-data"),
			 OK_HEAD("application/octet-stream", 33) "#cloud-config\npackages:\n  - hello");
	ck_assert_str_eq(get("/1.0/config/security.nesting"),
			 ERR(403, "Forbidden", 15, "not authorized\n"));
	ck_assert_str_eq(get("/1.0/config/volatile.cloud-init.instance-id"),
			 ERR(403, "Forbidden", 15, "not authorized\n"));
	ck_assert_str_eq(get("/1.0/config/user.missing"), ERR(404, "Not Found", 10, "not found\n"));
	ck_assert_str_eq(get("/1.0/config/cloud-init.vendor-data"),
			 ERR(404, "Not Found", 10, "not found\n"));
	ck_assert_str_eq(get("/1.0/devices"),
			 OK_HEAD("application/json", 126)
			 "{\"root\":{\"path\":\"/\",\"pool\":\"default\",\"type\":\"disk\"},\"share\":{\"path\":"
			 "\"/mnt/share\",\"source\":\"/var/tmp/lxdshare\",\"type\":\"disk\"}}\n");
	ck_assert_str_eq(get("/1.0/meta-data"),
			 OK_HEAD("application/octet-stream", 99)
			 "#cloud-config\ninstance-id: 856fc818-f65d-440f-b283-2b893183ee4d\n"
			 "local-hostname: c1\nfoo: meta\nbar: 2");
	ck_assert_str_eq(get("/1.0/nonexistent"), NOT_FOUND_PAGE);
	stop();
}
END_TEST

START_TEST(capture_paths)
{
	static const char *const nf[] = {"/1.0/", "/1.0/config/", "/1.0/config/user.foo/extra",
					 "/1.0/devices/", "/1.0/meta-data/", "/1.0/images",
					 "/1.0/images/abc", "/2.0", "/%31.0", "/1.0%2Fconfig"};

	start();
	for (size_t k = 0; k < sizeof(nf) / sizeof(nf[0]); k++)
		ck_assert_str_eq(get(nf[k]), NOT_FOUND_PAGE);
	ck_assert_str_eq(get("//1.0"), "HTTP/1.1 301 Moved Permanently\r\nLocation: /1.0\r\nDate: "
				       "<DATE>\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
	ck_assert_str_eq(get("/1.0/config/user%2Efoo"), OK_HEAD("application/octet-stream", 3) "bar");
	ck_assert_str_eq(get("/1.0/config/%75ser.foo"), OK_HEAD("application/octet-stream", 3) "bar");
	ck_assert_str_eq(get("/1.0/config/user.f%6Fo"), OK_HEAD("application/octet-stream", 3) "bar");
	ck_assert_str_eq(get("/1.0/config/user.foo?x=1"), OK_HEAD("application/octet-stream", 3) "bar");
	ck_assert_str_eq(get("http://lxd/1.0/config/user.foo"),
			 OK_HEAD("application/octet-stream", 3) "bar");
	ck_assert_str_eq(get("/1.0/config/user.%zz"), RAW400);
	ck_assert_str_eq(get("/1.0/images/abc/export"),
			 ERR(403, "Forbidden", 15, "not authorized\n"));
	stop();
}
END_TEST

START_TEST(capture_methods_protocol)
{
	int eof;

	start();
	ck_assert_str_eq(xchg("PUT /1.0 HTTP/1.1\r\nHost: lxd\r\nConnection: close\r\nContent-Type: "
			      "application/json\r\nContent-Length: 7\r\n\r\n{\"x\":1}"),
			 OK_HEAD("application/json", 79) API_BODY);
	ck_assert_str_eq(xchg("POST /1.0/config/user.foo HTTP/1.1\r\nHost: lxd\r\nConnection: close\r\n\r\n"),
			 OK_HEAD("application/octet-stream", 3) "bar");
	ck_assert_str_eq(xchg("DELETE /1.0/config/user.foo HTTP/1.1\r\nHost: lxd\r\nConnection: close\r\n\r\n"),
			 OK_HEAD("application/octet-stream", 3) "bar");
	ck_assert_str_eq(xchg("OPTIONS /1.0/config/user.foo HTTP/1.1\r\nHost: lxd\r\nConnection: close\r\n\r\n"),
			 OK_HEAD("application/octet-stream", 3) "bar");
	ck_assert_str_eq(xchg("HEAD /1.0 HTTP/1.1\r\nHost: lxd\r\nConnection: close\r\n\r\n"),
			 OK_HEAD("application/json", 79));
	ck_assert_str_eq(xchg("get /1.0 HTTP/1.1\r\nHost: lxd\r\nConnection: close\r\n\r\n"),
			 OK_HEAD("application/json", 79) API_BODY);
	ck_assert_str_eq(xchg("FOO /1.0 HTTP/1.1\r\nHost: lxd\r\nConnection: close\r\n\r\n"),
			 OK_HEAD("application/json", 79) API_BODY);
	ck_assert_str_eq(xchg("GET /1.0 HTTP/1.1\r\nHost: lxd\r\nContent-Length: 5\r\nConnection: "
			      "close\r\n\r\nhello"),
			 OK_HEAD("application/json", 79) API_BODY);
	ck_assert_str_eq(xchg("GET /1.0 HTTP/1.0\r\n\r\n"),
			 "HTTP/1.0 200 OK\r\nContent-Type: application/json\r\nDate: <DATE>\r\n"
			 "Content-Length: 79\r\n\r\n" API_BODY);
	ck_assert_str_eq(xchg("GET /1.0 HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"),
			 "HTTP/1.0 200 OK\r\nContent-Type: application/json\r\nDate: <DATE>\r\n"
			 "Content-Length: 79\r\nConnection: keep-alive\r\n\r\n" API_BODY);
	ck_assert_str_eq(xchg("GET /1.0 HTTP/1.1\r\n\r\n"),
			 "HTTP/1.1 400 Bad Request: missing required Host header\r\nContent-Type: "
			 "text/plain; charset=utf-8\r\nConnection: close\r\n\r\n400 Bad Request: "
			 "missing required Host header");
	ck_assert_str_eq(xchg("GET http://lxd/1.0 HTTP/1.1\r\n\r\n"),
			 "HTTP/1.1 400 Bad Request: missing required Host header\r\nContent-Type: "
			 "text/plain; charset=utf-8\r\nConnection: close\r\n\r\n400 Bad Request: "
			 "missing required Host header");
	ck_assert_str_eq(xchg("GARBAGE\r\n\r\n"), RAW400);
	ck_assert_str_eq(xchg("\r\n"), RAW400);
	ck_assert_str_eq(xchg("GET /1.0 HTTP/2.0\r\nHost: lxd\r\n\r\n"),
			 "HTTP/1.1 505 HTTP Version Not Supported: unsupported protocol version\r\n"
			 "Content-Type: text/plain; charset=utf-8\r\nConnection: close\r\n\r\n"
			 "505 HTTP Version Not Supported: unsupported protocol version");
	/* pipelining, answered in order; the first stays keep-alive */
	ck_assert_str_eq(xchg("GET /1.0 HTTP/1.1\r\nHost: lxd\r\n\r\nGET /1.0/config/user.foo "
			      "HTTP/1.1\r\nHost: lxd\r\nConnection: close\r\n\r\n"),
			 "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nDate: <DATE>\r\n"
			 "Content-Length: 79\r\n\r\n" API_BODY OK_HEAD("application/octet-stream", 3) "bar");
	/* keep-alive: no Connection header, the connection stays open */
	{
		static const char ka[] = "GET /1.0/config/user.foo HTTP/1.1\r\nHost: lxd\r\n\r\n";

		ck_assert_str_eq(xchg_n(ka, sizeof(ka) - 1, &eof),
				 "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nDate: "
				 "<DATE>\r\nContent-Length: 3\r\n\r\nbar");
		ck_assert_int_eq(eof, 0);
	}
	/* LF-only lines */
	ck_assert_str_eq(xchg("GET /1.0/config/user.foo HTTP/1.1\nHost: lxd\nConnection: close\n\n"),
			 OK_HEAD("application/octet-stream", 3) "bar");
	/* OPTIONS * is the server's own */
	ck_assert_str_eq(xchg("OPTIONS * HTTP/1.1\r\nHost: lxd\r\nConnection: close\r\n\r\n"),
			 "HTTP/1.1 200 OK\r\nContent-Length: 0\r\nDate: <DATE>\r\nConnection: "
			 "close\r\n\r\n");
	stop();
}
END_TEST

START_TEST(pre_routing_errors)
{
	gl_devlxd_opts o;
	gl_buf big = GL_BUF_INIT;

	gl_devlxd_opts_default(&o);
	o.max_header_bytes = 4096;
	start_opts(&o);
	ck_assert_str_eq(xchg("GET /1.0 HTTP/1.1\r\nHost: lxd\r\nHost: lxd\r\n\r\n"),
			 "HTTP/1.1 400 Bad Request: too many Host headers\r\nContent-Type: "
			 "text/plain; charset=utf-8\r\nConnection: close\r\n\r\n400 Bad Request: "
			 "too many Host headers");
	ck_assert_str_eq(xchg("GET /1.0 HTTP/1.1\r\nHost: lxd\r\nBad Header\r\n\r\n"), RAW400);
	ck_assert_str_eq(xchg("GET /1.0 HTTP/1.1\r\nHost: lxd\r\nBad Name: x\r\n\r\n"),
			 "HTTP/1.1 400 Bad Request: invalid header name\r\nContent-Type: "
			 "text/plain; charset=utf-8\r\nConnection: close\r\n\r\n400 Bad Request: "
			 "invalid header name");
	ck_assert_str_eq(xchg("GET 1.0 HTTP/1.1\r\nHost: lxd\r\n\r\n"), RAW400);
	ck_assert_str_eq(xchg("GET /1.0 HTTP/1.1 x\r\nHost: lxd\r\n\r\n"), RAW400);
	ck_assert_str_eq(xchg("GET /1.0 HTTP/1.10\r\nHost: lxd\r\n\r\n"), RAW400);
	ck_assert_str_eq(xchg("G(T /1.0 HTTP/1.1\r\nHost: lxd\r\n\r\n"), RAW400);
	ck_assert_str_eq(xchg("GET /1.0 HTTP/1.1\r\nHost: l{d\r\n\r\n"),
			 "HTTP/1.1 400 Bad Request: malformed Host header\r\nContent-Type: "
			 "text/plain; charset=utf-8\r\nConnection: close\r\n\r\n400 Bad Request: "
			 "malformed Host header");
	ck_assert_str_eq(xchg("GET /1.0 HTTP/1.1\r\nHost: lxd\r\nX: a\x01z\r\n\r\n"),
			 "HTTP/1.1 400 Bad Request: invalid header value\r\nContent-Type: "
			 "text/plain; charset=utf-8\r\nConnection: close\r\n\r\n400 Bad Request: "
			 "invalid header value");
	ck_assert_str_eq(xchg("GET /1.0 HTTP/1.1\r\nHost: lxd\r\nTransfer-Encoding: gzip\r\n\r\n"),
			 "HTTP/1.1 501 Not Implemented\r\nContent-Type: text/plain; charset=utf-8\r\n"
			 "Connection: close\r\n\r\nUnsupported transfer encoding");
	ck_assert_str_eq(xchg("GET /1.0 HTTP/1.1\r\nHost: lxd\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"),
			 "HTTP/1.1 501 Not Implemented\r\nContent-Type: text/plain; charset=utf-8\r\n"
			 "Connection: close\r\n\r\nUnsupported transfer encoding");
	/* chunked request bodies are fine */
	ck_assert_str_eq(xchg("GET /1.0/config/user.foo HTTP/1.1\r\nHost: lxd\r\nTransfer-Encoding: "
			      "chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n"),
			 OK_HEAD("application/octet-stream", 3) "bar");
	ck_assert_str_eq(xchg("GET /1.0 HTTP/1.1\r\nHost: lxd\r\nExpect: magic\r\n\r\n"),
			 "HTTP/1.1 417 Expectation Failed\r\nConnection: close\r\nDate: <DATE>\r\n"
			 "Content-Length: 0\r\n\r\n");
	/* a head over the limit */
	gl_buf_adds(&big, "GET /1.0 HTTP/1.1\r\nHost: lxd\r\nX-Big: ");
	for (int k = 0; k < 5000; k++)
		gl_buf_addc(&big, 'a');
	gl_buf_adds(&big, "\r\n\r\n");
	ck_assert_str_eq(xchg(big.data),
			 "HTTP/1.1 431 Request Header Fields Too Large\r\nContent-Type: text/plain; "
			 "charset=utf-8\r\nConnection: close\r\n\r\n431 Request Header Fields Too Large");
	gl_buf_reset(&big);
	gl_buf_adds(&big, "GET /");
	for (int k = 0; k < 5000; k++)
		gl_buf_addc(&big, 'a');
	ck_assert_str_eq(xchg(big.data),
			 "HTTP/1.1 431 Request Header Fields Too Large\r\nContent-Type: text/plain; "
			 "charset=utf-8\r\nConnection: close\r\n\r\n431 Request Header Fields Too Large");
	gl_buf_free(&big);
	/* still serving */
	ck_assert_str_eq(get("/1.0/config/user.foo"), OK_HEAD("application/octet-stream", 3) "bar");
	stop();
}
END_TEST

START_TEST(framing)
{
	gl_buf v = GL_BUF_INIT, exp = GL_BUF_INIT;
	char *got;

	start();
	for (int k = 0; k < 3000; k++)
		gl_buf_addc(&v, (char)('a' + k % 26));
	ck_assert_int_eq(op(GL_OP_CONFIG_SET, "c1", "user.big", v.data), 0);
	ck_assert_int_eq(op(GL_OP_CONFIG_SET, "c1", "user.edge", v.data + 952), 0); /* 2048 */
	/* over 2048 bytes: one chunk on HTTP/1.1 */
	gl_buf_printf(&exp,
		      "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nDate: <DATE>\r\n"
		      "Connection: close\r\nTransfer-Encoding: chunked\r\n\r\nbb8\r\n%s\r\n0\r\n\r\n",
		      v.data);
	got = get("/1.0/config/user.big");
	ck_assert_str_eq(got, exp.data);
	gl_buf_reset(&exp);
	gl_buf_printf(&exp, OK_HEAD("application/octet-stream", 2048) "%s", v.data + 952);
	ck_assert_str_eq(get("/1.0/config/user.edge"), exp.data);
	/* no length on HTTP/1.0: the end is the close */
	gl_buf_reset(&exp);
	gl_buf_printf(&exp,
		      "HTTP/1.0 200 OK\r\nContent-Type: application/octet-stream\r\nDate: <DATE>\r\n"
		      "\r\n%s",
		      v.data);
	ck_assert_str_eq(xchg("GET /1.0/config/user.big HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"),
			 exp.data);
	/* HEAD of a big body: no length, no chunk */
	ck_assert_str_eq(xchg("HEAD /1.0/config/user.big HTTP/1.1\r\nHost: lxd\r\nConnection: close\r\n\r\n"),
			 "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nDate: <DATE>\r\n"
			 "Connection: close\r\n\r\n");
	/* HEAD of an empty body: no length either (Go cannot tell) */
	ck_assert_int_eq(op(GL_OP_CONFIG_SET, "c1", "user.empty", ""), 0);
	ck_assert_str_eq(get("/1.0/config/user.empty"), OK_HEAD("application/octet-stream", 0));
	ck_assert_str_eq(xchg("HEAD /1.0/config/user.empty HTTP/1.1\r\nHost: lxd\r\nConnection: close\r\n\r\n"),
			 "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nDate: <DATE>\r\n"
			 "Connection: close\r\n\r\n");
	gl_buf_free(&v);
	gl_buf_free(&exp);
	stop();
}
END_TEST

START_TEST(json_escaping)
{
	start();
	ck_assert_int_eq(op(GL_OP_CONFIG_SET, "c1", "user.a <b>&\"c\"", "x"), 0);
	ck_assert_str_eq(get("/1.0/config"),
			 OK_HEAD("application/json", 120)
			 "[\"/1.0/config/cloud-init.user-data\",\"/1.0/config/user.a <b>&\\\"c\\\"\","
			 "\"/1.0/config/user.foo\",\"/1.0/config/user.meta-data\"]\n");
	ck_assert_str_eq(get("/1.0/config/user.a%20%3Cb%3E&%22c%22"),
			 OK_HEAD("application/octet-stream", 1) "x");
	/* %2F in the key decodes to a '/' that no key can hold */
	ck_assert_str_eq(get("/1.0/config/user.a%2Fb"), ERR(404, "Not Found", 10, "not found\n"));
	/* a nic gets its volatile hwaddr */
	ck_assert_int_eq(op(GL_OP_DEVICE_SET, "c1", "eth0",
			    "{\"name\":\"eth0\",\"nictype\":\"bridged\",\"parent\":\"br0\",\"type\":\"nic\"}"),
			 0);
	ck_assert_int_eq(op(GL_OP_CONFIG_SET, "c1", "volatile.eth0.hwaddr", "00:16:3e:aa:bb:cc"), 0);
	ck_assert_int_eq(op(GL_OP_DEVICE_UNSET, "c1", "share", NULL), 0);
	ck_assert_int_eq(op(GL_OP_DEVICE_UNSET, "c1", "root", NULL), 0);
	ck_assert_str_eq(get("/1.0/devices"),
			 OK_HEAD("application/json", 102)
			 "{\"eth0\":{\"hwaddr\":\"00:16:3e:aa:bb:cc\",\"name\":\"eth0\",\"nictype\":"
			 "\"bridged\",\"parent\":\"br0\",\"type\":\"nic\"}}\n");
	stop();
}
END_TEST

/* ---- PATCH /1.0 ------------------------------------------------------------------ */

static char *patch(const char *body)
{
	char req[8192];

	snprintf(req, sizeof(req),
		 "PATCH /1.0 HTTP/1.1\r\nHost: lxd\r\nConnection: close\r\nContent-Length: "
		 "%zu\r\n\r\n%s",
		 strlen(body), body);
	return xchg(req);
}

START_TEST(patch_state)
{
	gl_buf st = GL_BUF_INIT;

	start();
	ck_assert_str_eq(patch("{\"state\":\"Ready\"}"), OK_HEAD("application/octet-stream", 0));
	ck_assert_int_eq(gl_instance_attr(gl_model_find(model, "c1"), GL_ATTR_STATE, &st), 0);
	ck_assert_str_eq(st.data, "Ready");
	ck_assert_str_eq(get("/1.0"),
			 OK_HEAD("application/json", 84)
			 "{\"state\":\"Ready\",\"api_version\":\"1.0\",\"instance_type\":\"container\","
			 "\"location\":\"none\"}\n");
	ck_assert_str_eq(patch("{\"state\":\"Started\",\"other\":1}"),
			 OK_HEAD("application/octet-stream", 0));
	ck_assert_str_eq(patch("{\"state\":\"ready\"}"),
			 ERR(400, "Bad Request", 22, "Invalid state \"ready\"\n"));
	ck_assert_str_eq(patch("{}"), ERR(400, "Bad Request", 17, "Invalid state \"\"\n"));
	ck_assert_str_eq(patch("{\"state\":\"a\\nb\"}"),
			 ERR(400, "Bad Request", 21, "Invalid state \"a\\nb\"\n"));
	ck_assert_str_eq(patch("{\"state\":5}"),
			 ERR(400, "Bad Request", 104,
			     "Invalid request body: json: cannot unmarshal number into Go struct field "
			     "DevLXDPut.state of type string\n"));
	ck_assert(strstr(patch("{\"state\""), "HTTP/1.1 400 Bad Request\r\n") != NULL);
	ck_assert(strstr(patch("{\"state\""), "Invalid request body: ") != NULL);
	/* Expect: 100-continue is answered for the one body we read */
	{
		int fd = cconnect();
		gl_buf out = GL_BUF_INIT;
		static const char h[] = "PATCH /1.0 HTTP/1.1\r\nHost: lxd\r\nConnection: close\r\n"
					"Content-Length: 17\r\nExpect: 100-continue\r\n\r\n";

		csend(fd, h, sizeof(h) - 1);
		crecv(fd, &out, 25, 400);
		ck_assert_str_eq(masked(&out), "HTTP/1.1 100 Continue\r\n\r\n");
		csend(fd, "{\"state\":\"Ready\"}", 17);
		crecv(fd, &out, 0, 400);
		ck_assert_str_eq(masked(&out), "HTTP/1.1 100 Continue\r\n\r\n" OK_HEAD(
						       "application/octet-stream", 0));
		close(fd);
		gl_buf_free(&out);
	}
	gl_buf_free(&st);
	stop();
}
END_TEST

START_TEST(patch_body_limit)
{
	gl_devlxd_opts o;
	gl_buf body = GL_BUF_INIT, req = GL_BUF_INIT;

	gl_devlxd_opts_default(&o);
	o.max_body_bytes = 64;
	start_opts(&o);
	gl_buf_adds(&body, "{\"state\":\"Ready\",\"pad\":\"");
	for (int k = 0; k < 100; k++)
		gl_buf_addc(&body, 'x');
	gl_buf_adds(&body, "\"}");
	gl_buf_printf(&req, "PATCH /1.0 HTTP/1.1\r\nHost: lxd\r\nContent-Length: %zu\r\n\r\n%s",
		      body.len, body.data);
	ck_assert_str_eq(xchg(req.data), ERR(413, "Request Entity Too Large", 29,
					     "http: request body too large\n"));
	gl_buf_free(&body);
	gl_buf_free(&req);
	stop();
}
END_TEST

/* ---- identity ---------------------------------------------------------------------- */

/* GET path as uid `uid` from a child process (same pid namespace, so the
 * same instance). The parent runs the loop meanwhile. */
static char *get_as(uid_t uid, const char *path)
{
	static gl_buf out;
	int pfd[2];
	pid_t pid;
	char buf[4096];
	ssize_t n;
	int st;

	gl_buf_free(&out);
	ck_assert_int_eq(pipe(pfd), 0);
	pid = fork();
	ck_assert_int_ge(pid, 0);
	if (pid == 0) {
		struct sockaddr_un a = {.sun_family = AF_UNIX};
		int fd = socket(AF_UNIX, SOCK_STREAM, 0);
		char req[1024];

		close(pfd[0]);
		if (setuid(uid) < 0)
			_exit(3);
		strcpy(a.sun_path, sock_path);
		if (connect(fd, (struct sockaddr *)&a, sizeof(a)) < 0)
			_exit(4);
		snprintf(req, sizeof(req), "GET %s HTTP/1.1\r\nHost: lxd\r\nConnection: close\r\n\r\n",
			 path);
		if (write(fd, req, strlen(req)) < 0)
			_exit(5);
		while ((n = read(fd, buf, sizeof(buf))) > 0)
			if (write(pfd[1], buf, (size_t)n) < 0)
				_exit(6);
		_exit(0);
	}
	close(pfd[1]);
	fcntl(pfd[0], F_SETFL, O_NONBLOCK);
	for (;;) {
		uv_run(&loop, UV_RUN_NOWAIT);
		n = read(pfd[0], buf, sizeof(buf));
		if (n > 0) {
			gl_buf_add(&out, buf, (size_t)n);
			continue;
		}
		if (n == 0)
			break;
		usleep(200);
	}
	close(pfd[0]);
	waitpid(pid, &st, 0);
	ck_assert(WIFEXITED(st) && WEXITSTATUS(st) == 0);
	return masked(&out);
}

START_TEST(identity_checks)
{
	start();
	/* not root in the instance: 401 on routed paths, 404/301 still answered */
	ck_assert_str_eq(get_as(1000, "/1.0"),
			 ERR(401, "Unauthorized", 32, "Access denied for non-root user\n"));
	ck_assert_str_eq(get_as(65534, "/1.0/config/user.foo"),
			 ERR(401, "Unauthorized", 32, "Access denied for non-root user\n"));
	ck_assert_str_eq(get_as(1000, "/nope"), NOT_FOUND_PAGE);
	/* security.devlxd=false: 403 everywhere but "/" */
	ck_assert_int_eq(op(GL_OP_CONFIG_SET, "c1", "security.devlxd", "false"), 0);
	ck_assert_str_eq(get("/1.0"), ERR(403, "Forbidden", 15, "not authorized\n"));
	ck_assert_str_eq(get("/1.0/events"), ERR(403, "Forbidden", 15, "not authorized\n"));
	ck_assert_str_eq(get("/"), OK_HEAD("application/json", 9) "[\"/1.0\"]\n");
	ck_assert_int_eq(op(GL_OP_CONFIG_SET, "c1", "security.devlxd", "true"), 0);
	/* unbound: this process is in no instance any more */
	ck_assert_int_eq(attr("c1", GL_ATTR_INIT_PID, ""), 0);
	ck_assert_str_eq(get("/1.0"), ERR(500, "Internal Server Error", 22, "pid not in container?\n"));
	ck_assert_str_eq(get("/1.0/nope"), NOT_FOUND_PAGE);
	ck_assert_str_eq(get("//1.0"), "HTTP/1.1 301 Moved Permanently\r\nLocation: /1.0\r\nDate: "
				       "<DATE>\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
	/* bound again: a connection opened before the binding resolves now */
	{
		int fd = cconnect();
		gl_buf out = GL_BUF_INIT;
		static const char r[] = "GET /1.0/config/user.foo HTTP/1.1\r\nHost: lxd\r\nConnection: "
					"close\r\n\r\n";

		pump(20);
		bind_self("c1");
		csend(fd, r, sizeof(r) - 1);
		crecv(fd, &out, 0, 400);
		ck_assert_str_eq(masked(&out), OK_HEAD("application/octet-stream", 3) "bar");
		close(fd);
		gl_buf_free(&out);
	}
	/* the instance goes away under an open connection */
	{
		int fd = cconnect();
		gl_buf out = GL_BUF_INIT;
		static const char r[] = "GET /1.0 HTTP/1.1\r\nHost: lxd\r\nConnection: close\r\n\r\n";

		pump(20);
		ck_assert_int_eq(op(GL_OP_DELETE, "c1", NULL, NULL), 0);
		csend(fd, r, sizeof(r) - 1);
		crecv(fd, &out, 0, 400);
		ck_assert_str_eq(masked(&out),
				 ERR(500, "Internal Server Error", 22, "pid not in container?\n"));
		close(fd);
		gl_buf_free(&out);
	}
	stop();
}
END_TEST

/* ---- limits ------------------------------------------------------------------------ */

START_TEST(header_timeout)
{
	gl_devlxd_opts o;
	int fd, eof;
	gl_buf out = GL_BUF_INIT;

	gl_devlxd_opts_default(&o);
	o.header_timeout_ms = 200;
	start_opts(&o);
	/* a byte now and then does not keep a head alive */
	fd = cconnect();
	for (int k = 0; k < 8; k++) {
		if (send(fd, "G", 1, MSG_NOSIGNAL) < 0)
			break;
		pump(50);
	}
	eof = crecv(fd, &out, 0, 300);
	ck_assert_int_eq(eof, 1);
	ck_assert_uint_eq(out.len, 0);
	close(fd);
	/* nor does a body that never ends */
	fd = cconnect();
	csend(fd, "PATCH /1.0 HTTP/1.1\r\nHost: lxd\r\nContent-Length: 17\r\n\r\n{", 55);
	eof = crecv(fd, &out, 0, 600);
	ck_assert_int_eq(eof, 1);
	ck_assert_uint_eq(out.len, 0);
	close(fd);
	/* an idle connection is not on that clock */
	fd = cconnect();
	pump(400);
	csend(fd, "GET /1.0/config/user.foo HTTP/1.1\r\nHost: lxd\r\nConnection: close\r\n\r\n", 67);
	crecv(fd, &out, 0, 400);
	ck_assert_str_eq(masked(&out), OK_HEAD("application/octet-stream", 3) "bar");
	close(fd);
	gl_buf_free(&out);
	stop();
}
END_TEST

START_TEST(idle_cap)
{
	gl_devlxd_opts o;
	int fds[4];
	gl_buf out = GL_BUF_INIT;
	static const char ka[] = "GET /1.0/config/user.foo HTTP/1.1\r\nHost: lxd\r\n\r\n";

	gl_devlxd_opts_default(&o);
	o.max_conns = 3;
	start_opts(&o);
	for (int k = 0; k < 3; k++) {
		fds[k] = cconnect();
		pump(10);
	}
	/* the newest of the three is used once, so it is idle again but younger */
	csend(fds[2], ka, sizeof(ka) - 1);
	crecv(fds[2], &out, 0, 200);
	gl_buf_reset(&out);
	fds[3] = cconnect();
	pump(50);
	/* full: the oldest idle one made room */
	ck_assert_int_eq(crecv(fds[0], &out, 0, 100), 1);
	csend(fds[3], ka, sizeof(ka) - 1);
	crecv(fds[3], &out, 0, 200);
	ck_assert(strstr(masked(&out), "\r\n\r\nbar") != NULL);
	for (int k = 0; k < 4; k++)
		close(fds[k]);
	gl_buf_free(&out);
	stop();
}
END_TEST

START_TEST(idle_timeout_and_vanishing)
{
	gl_devlxd_opts o;
	int fd;
	gl_buf out = GL_BUF_INIT;

	gl_devlxd_opts_default(&o);
	o.idle_timeout_ms = 150;
	start_opts(&o);
	fd = cconnect();
	ck_assert_int_eq(crecv(fd, &out, 0, 600), 1);
	close(fd);
	/* clients that vanish mid-request and mid-response */
	for (int k = 0; k < 20; k++) {
		fd = cconnect();
		csend(fd, "GET /1.0 HTTP/1.1\r\nHo", 21);
		close(fd);
		fd = cconnect();
		csend(fd, "GET /1.0/config HTTP/1.1\r\nHost: lxd\r\n\r\n", 40);
		close(fd);
		fd = cconnect();
		csend(fd, "PATCH /1.0 HTTP/1.1\r\nHost: lxd\r\nContent-Length: 17\r\n\r\n{\"state\":\"Ready\"}",
		      71);
		close(fd);
	}
	pump(100);
	ck_assert_str_eq(get("/1.0/config/user.foo"), OK_HEAD("application/octet-stream", 3) "bar");
	gl_buf_free(&out);
	stop();
}
END_TEST

/* ---- events ------------------------------------------------------------------------ */

#define STREAM_HEAD "HTTP/1.1 200 OK\nConnection: keep-alive\nContent-Type: application/json\nX-Content-Type-Options: nosniff\n\n"

static const char *meta_of(const char *s)
{
	const char *p = strstr(s, "\"metadata\":");

	return p ? p : "";
}

START_TEST(events_plain)
{
	int fd, eof;
	gl_buf out = GL_BUF_INIT;
	static const char req[] = "GET /1.0/events HTTP/1.1\r\nHost: lxd\r\nConnection: close\r\n\r\n";

	start();
	fd = cconnect();
	csend(fd, req, sizeof(req) - 1);
	crecv(fd, &out, 0, 100);
	ck_assert_str_eq(masked(&out), STREAM_HEAD);
	gl_buf_reset(&out);
	ck_assert_int_eq(op(GL_OP_CONFIG_SET, "c1", "user.foo", "baz"), 0);
	ck_assert_int_eq(op(GL_OP_CONFIG_SET, "c1", "security.nesting", "true"), 0);
	ck_assert_int_eq(op(GL_OP_DEVICE_SET, "c1", "zero",
			    "{\"path\":\"/dev/zero2\",\"source\":\"/dev/zero\",\"type\":\"unix-char\"}"),
			 0);
	crecv(fd, &out, 0, 100);
	gl_buf_addc(&out, '\0');
	ck_assert(strncmp(meta_of(out.data),
			  "\"metadata\":{\"key\":\"user.foo\",\"old_value\":\"bar\",\"value\":\"baz\"}}\n"
			  "{\"type\":\"device\",\"timestamp\":",
			  92) == 0);
	ck_assert(strstr(out.data, "\"metadata\":{\"action\":\"added\",\"config\":{\"path\":\"/dev/zero2\","
				   "\"source\":\"/dev/zero\",\"type\":\"unix-char\"},\"name\":\"zero\"}}\n"));
	/* any byte from the client ends it */
	csend(fd, "x", 1);
	gl_buf_reset(&out);
	eof = crecv(fd, &out, 0, 300);
	ck_assert_int_eq(eof, 1);
	close(fd);

	/* ?type=device: config changes are not sent; removal of the instance ends it */
	fd = cconnect();
	csend(fd, "GET /1.0/events?type=device HTTP/1.1\r\nHost: lxd\r\n\r\n", 51);
	pump(20);
	ck_assert_int_eq(op(GL_OP_CONFIG_SET, "c1", "user.foo", "qux"), 0);
	ck_assert_int_eq(op(GL_OP_DEVICE_UNSET, "c1", "zero", NULL), 0);
	ck_assert_int_eq(op(GL_OP_DELETE, "c1", NULL, NULL), 0);
	gl_buf_reset(&out);
	eof = crecv(fd, &out, 0, 1500);
	ck_assert_int_eq(eof, 1);
	gl_buf_addc(&out, '\0');
	ck_assert(strncmp(out.data, STREAM_HEAD, strlen(STREAM_HEAD)) == 0);
	ck_assert(strstr(out.data, "\"action\":\"removed\"") != NULL);
	ck_assert(strstr(out.data, "user.foo") == NULL);
	close(fd);
	gl_buf_free(&out);
	stop();
}
END_TEST

START_TEST(events_since)
{
	int fd;
	gl_buf out = GL_BUF_INIT;
	uint64_t seq;
	char req[256];
	const char *p;

	start();
	seq = gl_instance_seq(gl_model_find(model, "c1"));
	ck_assert_int_eq(op(GL_OP_CONFIG_SET, "c1", "user.a", "1"), 0);
	ck_assert_int_eq(op(GL_OP_CONFIG_SET, "c1", "user.b", "2"), 0);
	ck_assert_int_eq(op(GL_OP_CONFIG_SET, "c1", "user.c", "3"), 0);
	/* resume after `seq`, having seen one event already */
	snprintf(req, sizeof(req),
		 "GET /1.0/events?since=%llu&skip=1 HTTP/1.1\r\nHost: lxd\r\n\r\n",
		 (unsigned long long)seq);
	fd = cconnect();
	csend(fd, req, strlen(req));
	crecv(fd, &out, 0, 100);
	gl_buf_addc(&out, '\0');
	p = strstr(out.data, "\n\n");
	ck_assert_ptr_nonnull(p);
	ck_assert(strstr(out.data, "X-Guestlink-Seq: ") != NULL);
	ck_assert(strstr(p, "user.a") == NULL);
	ck_assert(strstr(p, "\"key\":\"user.b\"") != NULL);
	ck_assert(strstr(p, "\"key\":\"user.c\"") != NULL);
	close(fd);
	/* since=now: a resync line gives the position */
	fd = cconnect();
	csend(fd, "GET /1.0/events?since=now HTTP/1.1\r\nHost: lxd\r\n\r\n", 49);
	gl_buf_reset(&out);
	crecv(fd, &out, 0, 100);
	gl_buf_addc(&out, '\0');
	ck_assert(strstr(out.data, "{\"type\":\"resync\",\"timestamp\":\"") != NULL);
	snprintf(req, sizeof(req), "\"metadata\":{\"seq\":%llu}}\n",
		 (unsigned long long)gl_instance_seq(gl_model_find(model, "c1")));
	ck_assert(strstr(out.data, req) != NULL);
	close(fd);
	ck_assert_str_eq(get("/1.0/events?since=x"),
			 ERR(400, "Bad Request", 20, "Invalid since value\n"));
	gl_buf_free(&out);
	stop();
}
END_TEST

START_TEST(events_websocket)
{
	int fd;
	gl_buf out = GL_BUF_INIT;
	static const char hs[] = "GET /1.0/events HTTP/1.1\r\nHost: lxd\r\nUpgrade: websocket\r\n"
				 "Connection: Upgrade\r\nSec-WebSocket-Key: 4g9b32M238QJ3YvGcwWNSw==\r\n"
				 "Sec-WebSocket-Version: 13\r\n\r\n";
	static const char ok[] = "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
				 "Connection: Upgrade\r\nSec-WebSocket-Accept: JG11bIWfnw3QtVVejlTHoi6xeEw="
				 "\r\n\r\n\x89\x09keepalive";
	const unsigned char *f;

	start();
	fd = cconnect();
	csend(fd, hs, sizeof(hs) - 1);
	crecv(fd, &out, sizeof(ok) - 1, 300);
	ck_assert_uint_eq(out.len, sizeof(ok) - 1);
	ck_assert_int_eq(memcmp(out.data, ok, out.len), 0);
	gl_buf_reset(&out);
	ck_assert_int_eq(op(GL_OP_CONFIG_SET, "c1", "user.foo", "baz"), 0);
	crecv(fd, &out, 2, 300);
	crecv(fd, &out, 0, 100);
	f = (const unsigned char *)out.data;
	ck_assert_uint_ge(out.len, 2);
	ck_assert_uint_eq(f[0], 0x81);
	ck_assert_uint_eq(f[1], out.len - 2);
	ck_assert(memmem(out.data, out.len, "\"old_value\":\"bar\",\"value\":\"baz\"}}\n", 34) != NULL);
	/* removing the instance ends the session with 1001 */
	gl_buf_reset(&out);
	ck_assert_int_eq(op(GL_OP_DELETE, "c1", NULL, NULL), 0);
	crecv(fd, &out, 4, 500);
	ck_assert_uint_ge(out.len, 4);
	ck_assert_int_eq(memcmp(out.data, "\x88\x02\x03\xe9", 4), 0);
	close(fd);
	ck_assert_int_eq(op(GL_OP_CREATE, "c1", NULL, NULL), 0);
	bind_self("c1");

	/* broken handshakes (capture 14) */
	ck_assert_str_eq(xchg("GET /1.0/events HTTP/1.1\r\nHost: lxd\r\nConnection: close\r\nUpgrade: "
			      "websocket\r\n\r\n"),
			 "HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\n"
			 "Sec-Websocket-Version: 13\r\nX-Content-Type-Options: nosniff\r\nDate: "
			 "<DATE>\r\nContent-Length: 34\r\nConnection: close\r\n\r\nBad Request\n"
			 "internal server error\n");
	ck_assert_str_eq(xchg("GET /1.0/events HTTP/1.1\r\nHost: lxd\r\nConnection: close\r\nUpgrade: "
			      "websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: "
			      "dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 8\r\n\r\n"),
			 "HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\n"
			 "Sec-Websocket-Version: 13\r\nX-Content-Type-Options: nosniff\r\nDate: "
			 "<DATE>\r\nContent-Length: 34\r\nConnection: close\r\n\r\nBad Request\n"
			 "internal server error\n");
	ck_assert_str_eq(xchg("POST /1.0/events HTTP/1.1\r\nHost: lxd\r\nConnection: Upgrade, close\r\n"
			      "Upgrade: websocket\r\nSec-WebSocket-Key: x\r\nSec-WebSocket-Version: 13\r\n\r\n"),
			 "HTTP/1.1 405 Method Not Allowed\r\nContent-Type: text/plain; charset=utf-8\r\n"
			 "Sec-Websocket-Version: 13\r\nX-Content-Type-Options: nosniff\r\nDate: "
			 "<DATE>\r\nContent-Length: 41\r\nConnection: close\r\n\r\nMethod Not Allowed\n"
			 "internal server error\n");
	/* "Upgrade: WebSocket" is not "websocket": the plain stream */
	fd = cconnect();
	{
		static const char cap[] = "GET /1.0/events HTTP/1.1\r\nHost: lxd\r\nUpgrade: WebSocket"
					  "\r\nConnection: Upgrade\r\nSec-WebSocket-Key: "
					  "dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";

		csend(fd, cap, sizeof(cap) - 1);
	}
	gl_buf_reset(&out);
	crecv(fd, &out, 0, 200);
	ck_assert_str_eq(masked(&out), STREAM_HEAD);
	close(fd);
	gl_buf_free(&out);
	stop();
}
END_TEST

/* ---- image export ------------------------------------------------------------------ */

#define FP "05fb4e3cbc61661ad118936ddaeb0ebea0dd66aa8c4f6d1e01601294b2a37d32"

static void write_file(const char *name, size_t size)
{
	char path[512];
	FILE *f;

	snprintf(path, sizeof(path), "%s/%s", images, name);
	f = fopen(path, "w");
	ck_assert_ptr_nonnull(f);
	for (size_t k = 0; k < size; k++)
		fputc((int)('A' + k % 23), f);
	fclose(f);
}

START_TEST(image_export)
{
	gl_buf exp = GL_BUF_INIT;
	char *got, lm[30];
	struct stat st;
	char path[512];
	gl_buf req = GL_BUF_INIT;

	start();
	ck_assert_str_eq(get("/1.0/images/" FP "/export"), ERR(403, "Forbidden", 15, "not authorized\n"));
	ck_assert_int_eq(op(GL_OP_CONFIG_SET, "c1", "security.devlxd.images", "true"), 0);
	write_file(FP ".tar.gz", 300000);
	ck_assert_str_eq(get("/1.0/images/0000000000000000000000000000000000000000000000000000000000000000/export"),
			 "HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\n"
			 "X-Content-Type-Options: nosniff\r\nDate: <DATE>\r\nContent-Length: 120\r\n"
			 "Connection: close\r\n\r\n{\"type\":\"error\",\"status\":\"\",\"status_code\":0,"
			 "\"operation\":\"\",\"error_code\":404,\"error\":\"Image not found\","
			 "\"metadata\":null}\n\n");
	ck_assert_str_eq(get("/1.0/images/" FP "/export"),
			 "HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\n"
			 "X-Content-Type-Options: nosniff\r\nDate: <DATE>\r\nContent-Length: 189\r\n"
			 "Connection: close\r\n\r\n{\"type\":\"error\",\"status\":\"\",\"status_code\":0,"
			 "\"operation\":\"\",\"error_code\":404,\"error\":\"Image \\\"" FP
			 "\\\" not found\",\"metadata\":null}\n\n");
	ck_assert(strstr(get("/1.0/images/..%2F..%2Fetc/export"), "\"Image not found\"") != NULL);
	ck_assert(strstr(get("/1.0/images/05fb%00/export"), "\"Image not found\"") != NULL);
	write_file(FP ".public", 0);
	snprintf(path, sizeof(path), "%s/" FP ".tar.gz", images);
	ck_assert_int_eq(stat(path, &st), 0);
	gl_http_date(st.st_mtime, lm);
	/* by prefix, streamed whole */
	got = get("/1.0/images/05fb4e3cbc61/export");
	gl_buf_printf(&exp,
		      "HTTP/1.1 200 OK\r\nAccept-Ranges: bytes\r\nContent-Disposition: "
		      "inline;filename=" FP ".tar.gz\r\nContent-Length: 300000\r\nContent-Type: "
		      "application/octet-stream\r\nLast-Modified: %s\r\nDate: <DATE>\r\nConnection: "
		      "close\r\n\r\n",
		      lm);
	ck_assert_int_eq(strncmp(got, exp.data, exp.len), 0);
	ck_assert_uint_eq(strlen(got), exp.len + 300000);
	ck_assert_int_eq(got[exp.len], 'A');
	ck_assert_int_eq(got[exp.len + 299999], (char)('A' + 299999 % 23));
	/* a range */
	gl_buf_printf(&req, "GET /1.0/images/" FP "/export HTTP/1.1\r\nHost: lxd\r\nRange: "
			    "bytes=10-19\r\nConnection: close\r\n\r\n");
	got = xchg(req.data);
	gl_buf_reset(&exp);
	gl_buf_printf(&exp,
		      "HTTP/1.1 206 Partial Content\r\nAccept-Ranges: bytes\r\nContent-Disposition: "
		      "inline;filename=" FP ".tar.gz\r\nContent-Length: 10\r\nContent-Range: bytes "
		      "10-19/300000\r\nContent-Type: application/octet-stream\r\nLast-Modified: "
		      "%s\r\nDate: <DATE>\r\nConnection: close\r\n\r\nKLMNOPQRST",
		      lm);
	ck_assert_str_eq(got, exp.data);
	/* not modified since */
	gl_buf_reset(&req);
	gl_buf_printf(&req, "GET /1.0/images/" FP "/export HTTP/1.1\r\nHost: lxd\r\n"
			    "If-Modified-Since: %s\r\nConnection: close\r\n\r\n", lm);
	gl_buf_reset(&exp);
	gl_buf_printf(&exp,
		      "HTTP/1.1 304 Not Modified\r\nContent-Disposition: inline;filename=" FP
		      ".tar.gz\r\nLast-Modified: %s\r\nDate: <DATE>\r\nConnection: close\r\n\r\n",
		      lm);
	ck_assert_str_eq(xchg(req.data), exp.data);
	/* HEAD: the head only */
	gl_buf_reset(&req);
	gl_buf_printf(&req, "HEAD /1.0/images/" FP "/export HTTP/1.1\r\nHost: lxd\r\n"
			    "Connection: close\r\n\r\n");
	got = xchg(req.data);
	ck_assert(strstr(got, "Content-Length: 300000\r\n") != NULL);
	ck_assert(strstr(got, "\r\n\r\n")[4] == '\0');
	/* two images under one prefix */
	write_file("05fb0000000000000000000000000000000000000000000000000000000000ff", 1);
	ck_assert(strstr(get("/1.0/images/05fb/export"), "\"error_code\":500,\"error\":\"More than "
							 "one image matches\"") != NULL);
	/* a client that goes away mid-download */
	{
		int fd = cconnect();
		gl_buf out = GL_BUF_INIT;

		gl_buf_reset(&req);
		gl_buf_printf(&req, "GET /1.0/images/" FP "/export HTTP/1.1\r\nHost: lxd\r\n\r\n");
		csend(fd, req.data, req.len);
		crecv(fd, &out, 1000, 300);
		close(fd);
		pump(100);
		gl_buf_free(&out);
	}
	/* and clients that hang up right after asking, at every stage */
	for (int k = 0; k < 30; k++) {
		int fd = cconnect();

		gl_buf_reset(&req);
		gl_buf_printf(&req, "GET /1.0/images/" FP "/export HTTP/1.1\r\nHost: lxd\r\n%s\r\n",
			      k % 2 ? "Range: bytes=0-99\r\n" : "");
		csend(fd, req.data, req.len);
		if (k % 3 == 1)
			pump(1);
		close(fd);
		if (k % 3 == 2)
			pump(2);
	}
	pump(100);
	ck_assert_str_eq(get("/1.0/config/user.foo"), OK_HEAD("application/octet-stream", 3) "bar");
	gl_buf_free(&exp);
	gl_buf_free(&req);
	stop();
}
END_TEST

static Suite *http_suite(void)
{
	Suite *s = suite_create("http");
	TCase *t = tcase_create("url");
	TCase *e = tcase_create("devlxd");

	tcase_add_test(t, url_rules);
	tcase_add_test(t, url_redirects);
	suite_add_tcase(s, t);
	tcase_add_test(e, capture_bytes);
	tcase_add_test(e, capture_paths);
	tcase_add_test(e, capture_methods_protocol);
	tcase_add_test(e, pre_routing_errors);
	tcase_add_test(e, framing);
	tcase_add_test(e, json_escaping);
	tcase_add_test(e, patch_state);
	tcase_add_test(e, patch_body_limit);
	tcase_add_test(e, identity_checks);
	tcase_add_test(e, header_timeout);
	tcase_add_test(e, idle_cap);
	tcase_add_test(e, idle_timeout_and_vanishing);
	tcase_add_test(e, events_plain);
	tcase_add_test(e, events_since);
	tcase_add_test(e, events_websocket);
	tcase_add_test(e, image_export);
	suite_add_tcase(s, e);
	return s;
}

UNIT_MAIN(http_suite)
