/* loadgen: the load client of the devlxd benchmarks and tests. HTTP/1.1
 * over a Unix socket; every run prints one machine-readable line on stdout.
 *
 *   loadgen --socket PATH [request options] [--clients N] [--close]
 *           [--count N | --duration S] [--server-pid PID] [--label NAME]
 *       N client threads, each with one connection at a time, one request in
 *       flight: keep-alive (default) or a new connection per request (--close:
 *       the request says `Connection: close` and the client reads to EOF).
 *       Every response is checked (status, body); latency is measured from
 *       before the write (before connect() with --close) to the end of the
 *       response. With --server-pid, the server's CPU time per request from
 *       the utime + stime of /proc/PID/stat over the run. Prints
 *         NAME mode=keepalive clients=1 reqs=N errors=0 secs=3.00 rate=R
 *              p50_us=A p99_us=B max_us=C [srv_cpu_us_per_req=D]
 *
 *   loadgen --socket PATH --ws-fanout N --trigger FILE [--changes K]
 *       N WebSocket subscribers of --path (default /1.0/events?type=config);
 *       then K times: write a new value into FILE (a config key file of the
 *       FUSE tree: open, write, close) and wait until every subscriber has
 *       received the event. Prints the time from the start of the write to
 *       the last subscriber's event (p50/p99/max over the K changes), and
 *       how long the write + close itself took:
 *         NAME mode=ws-fanout subscribers=N changes=K errors=0 p50_ms=..
 *              p99_ms=.. max_ms=.. write_p50_ms=..
 *
 *   loadgen --socket PATH --idle N [--hold S] [--idle-request]
 *       Open N connections and keep them idle (--idle-request: after one
 *       request each, i.e. idle keep-alive connections). Prints
 *         NAME mode=idle open=N errors=E secs=S
 *       once they are open, then waits --hold seconds (default: until
 *       SIGTERM/SIGINT) and prints how many the server has not closed:
 *         NAME mode=idle open=N still_open=M
 *
 * Request options: --path P (GET P HTTP/1.1, Host: lxd; default
 * /1.0/config/user.foo), or --request STR, the whole request with C escapes
 * (\r \n \t \\ \xHH); --expect-status N (default 200); --expect-body STR
 * (C escapes); --timeout S per response (default 10).
 *
 * Exit status: 0 when at least one request succeeded and none failed. */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define HEAD_MAX (64 * 1024)
#define BODY_KEEP (64 * 1024) /* body bytes kept for the comparison */

/* ---- options --------------------------------------------------------------- */

static const char *opt_socket;
static const char *opt_label = "loadgen";
static const char *opt_path = "/1.0/config/user.foo";
static char *opt_request;  /* unescaped --request */
static size_t opt_request_len;
static char *opt_body;     /* unescaped --expect-body; NULL: not checked */
static size_t opt_body_len;
static int opt_status = 200;
static unsigned opt_clients = 1;
static bool opt_close;
static uint64_t opt_count;
static double opt_duration = 3.0;
static int opt_server_pid;
static int opt_timeout_ms = 10000;
static unsigned opt_fanout;
static const char *opt_trigger;
static unsigned opt_changes = 100;
static unsigned opt_idle;
static double opt_hold = -1;
static bool opt_idle_request;

static char *req_ka, *req_close; /* the request, keep-alive and Connection: close forms */
static size_t req_ka_len, req_close_len;

static double now_s(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static int hexval(int c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	if (c >= 'a' && c <= 'f')
		return c - 'a' + 10;
	if (c >= 'A' && c <= 'F')
		return c - 'A' + 10;
	return -1;
}

/* C escapes of a command-line argument; returns a new buffer. */
static char *unescape(const char *s, size_t *len)
{
	char *out = malloc(strlen(s) + 1);
	size_t n = 0;

	if (!out)
		return NULL;
	while (*s) {
		if (*s != '\\' || !s[1]) {
			out[n++] = *s++;
			continue;
		}
		s++;
		switch (*s) {
		case 'r': out[n++] = '\r'; s++; break;
		case 'n': out[n++] = '\n'; s++; break;
		case 't': out[n++] = '\t'; s++; break;
		case '0': out[n++] = '\0'; s++; break;
		case 'x':
			if (hexval(s[1]) >= 0 && hexval(s[2]) >= 0) {
				out[n++] = (char)(hexval(s[1]) * 16 + hexval(s[2]));
				s += 3;
				break;
			}
			/* fall through */
		default: out[n++] = *s++; break;
		}
	}
	out[n] = 0;
	*len = n;
	return out;
}

static bool parse_u64(const char *s, uint64_t max, uint64_t *out)
{
	char *end;
	unsigned long long v;

	errno = 0;
	v = strtoull(s, &end, 10);
	if (errno || end == s || *end || v > max)
		return false;
	*out = v;
	return true;
}

static bool parse_secs(const char *s, double *out)
{
	char *end;
	double v;

	errno = 0;
	v = strtod(s, &end);
	if (errno || end == s || *end || v < 0 || v > 86400)
		return false;
	*out = v;
	return true;
}

static void usage(void)
{
	fprintf(stderr,
		"usage: loadgen --socket PATH [--path P | --request STR] [--expect-status N]\n"
		"               [--expect-body STR] [--clients N] [--close] [--count N | --duration S]\n"
		"               [--server-pid PID] [--timeout S] [--label NAME]\n"
		"       loadgen --socket PATH --ws-fanout N --trigger FILE [--changes K] [--path P]\n"
		"       loadgen --socket PATH --idle N [--hold S] [--idle-request]\n");
	exit(2);
}

static void parse_args(int argc, char **argv)
{
	int i;

	for (i = 1; i < argc; i++) {
		const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
		uint64_t u;
		bool ok = true, takes = true;

		if (strcmp(a, "--close") == 0) {
			opt_close = true;
			takes = false;
		} else if (strcmp(a, "--idle-request") == 0) {
			opt_idle_request = true;
			takes = false;
		} else if (!v) {
			ok = false;
		} else if (strcmp(a, "--socket") == 0) {
			opt_socket = v;
		} else if (strcmp(a, "--label") == 0) {
			opt_label = v;
		} else if (strcmp(a, "--path") == 0) {
			opt_path = v;
		} else if (strcmp(a, "--request") == 0) {
			opt_request = unescape(v, &opt_request_len);
			ok = opt_request && opt_request_len;
		} else if (strcmp(a, "--expect-body") == 0) {
			opt_body = unescape(v, &opt_body_len);
			ok = opt_body != NULL;
		} else if (strcmp(a, "--expect-status") == 0) {
			ok = parse_u64(v, 999, &u);
			opt_status = (int)u;
		} else if (strcmp(a, "--clients") == 0) {
			ok = parse_u64(v, 4096, &u) && u;
			opt_clients = (unsigned)u;
		} else if (strcmp(a, "--count") == 0) {
			ok = parse_u64(v, UINT64_MAX / 2, &opt_count) && opt_count;
		} else if (strcmp(a, "--duration") == 0) {
			ok = parse_secs(v, &opt_duration) && opt_duration > 0;
		} else if (strcmp(a, "--server-pid") == 0) {
			ok = parse_u64(v, INT32_MAX, &u) && u;
			opt_server_pid = (int)u;
		} else if (strcmp(a, "--timeout") == 0) {
			double t;

			ok = parse_secs(v, &t) && t > 0;
			opt_timeout_ms = (int)(t * 1000);
		} else if (strcmp(a, "--ws-fanout") == 0) {
			ok = parse_u64(v, 100000, &u) && u;
			opt_fanout = (unsigned)u;
		} else if (strcmp(a, "--trigger") == 0) {
			opt_trigger = v;
		} else if (strcmp(a, "--changes") == 0) {
			ok = parse_u64(v, 1000000, &u) && u;
			opt_changes = (unsigned)u;
		} else if (strcmp(a, "--idle") == 0) {
			ok = parse_u64(v, 1000000, &u) && u;
			opt_idle = (unsigned)u;
		} else if (strcmp(a, "--hold") == 0) {
			ok = parse_secs(v, &opt_hold);
		} else {
			ok = false;
		}
		if (!ok) {
			fprintf(stderr, "loadgen: bad option %s%s%s\n", a, v && takes ? " " : "",
				v && takes ? v : "");
			usage();
		}
		if (takes)
			i++;
	}
	if (!opt_socket || (opt_fanout && !opt_trigger))
		usage();
}

/* The keep-alive and the Connection: close form of the request. A request
 * given with --request is sent as is in both modes. */
static int build_requests(void)
{
	size_t n;

	if (opt_request) {
		req_ka = req_close = opt_request;
		req_ka_len = req_close_len = opt_request_len;
		return 0;
	}
	n = strlen(opt_path) + 64;
	req_ka = malloc(n);
	req_close = malloc(n + 32);
	if (!req_ka || !req_close)
		return -ENOMEM;
	req_ka_len = (size_t)snprintf(req_ka, n, "GET %s HTTP/1.1\r\nHost: lxd\r\n\r\n", opt_path);
	req_close_len = (size_t)snprintf(req_close, n + 32,
					 "GET %s HTTP/1.1\r\nHost: lxd\r\nConnection: close\r\n\r\n",
					 opt_path);
	return 0;
}

/* ---- errors ------------------------------------------------------------------ */

static atomic_uint reported;

/* Print the first few failures only: a broken server fails every request. */
static void report(const char *fmt, const char *detail, int err)
{
	if (atomic_fetch_add(&reported, 1) >= 5)
		return;
	fprintf(stderr, "loadgen: %s", fmt);
	if (detail)
		fprintf(stderr, ": %s", detail);
	if (err)
		fprintf(stderr, ": %s", strerror(err));
	fputc('\n', stderr);
}

/* ---- sockets ------------------------------------------------------------------- */

static int connect_unix(const char *path)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	int fd, err;

	if (strlen(path) >= sizeof(sa.sun_path))
		return -ENAMETOOLONG;
	strcpy(sa.sun_path, path);
	fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return -errno;
	while (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
		if (errno == EINTR)
			continue;
		err = -errno;
		close(fd);
		return err;
	}
	return fd;
}

static int write_all(int fd, const char *p, size_t n)
{
	while (n) {
		ssize_t w = send(fd, p, n, MSG_NOSIGNAL);

		if (w < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		p += w;
		n -= (size_t)w;
	}
	return 0;
}

/* ---- responses --------------------------------------------------------------- */

typedef struct rbuf {
	char *p;
	size_t len, cap;
} rbuf;

typedef struct resp {
	int status;
	bool close;    /* Connection: close */
	size_t body_len;
	char body[BODY_KEEP];
} resp;

/* Read more into rb; 1 read, 0 EOF, < 0 error or -ETIMEDOUT. */
static int fill(int fd, rbuf *rb, int timeout_ms)
{
	struct pollfd pfd = { .fd = fd, .events = POLLIN };
	ssize_t n;
	int r;

	if (rb->cap - rb->len < 4096) {
		size_t cap = rb->cap ? rb->cap * 2 : 16384;
		char *np;

		if (cap > 16 * HEAD_MAX)
			return -E2BIG;
		np = realloc(rb->p, cap);
		if (!np)
			return -ENOMEM;
		rb->p = np;
		rb->cap = cap;
	}
	do {
		r = poll(&pfd, 1, timeout_ms);
	} while (r < 0 && errno == EINTR);
	if (r == 0)
		return -ETIMEDOUT;
	if (r < 0)
		return -errno;
	do {
		n = read(fd, rb->p + rb->len, rb->cap - rb->len);
	} while (n < 0 && errno == EINTR);
	if (n < 0)
		return -errno;
	rb->len += (size_t)n;
	return n > 0;
}

static void consume(rbuf *rb, size_t n)
{
	memmove(rb->p, rb->p + n, rb->len - n);
	rb->len -= n;
}

static const char *find_crlf2(const char *p, size_t n)
{
	size_t i;

	for (i = 0; i + 3 < n; i++)
		if (p[i] == '\r' && p[i + 1] == '\n' && p[i + 2] == '\r' && p[i + 3] == '\n')
			return p + i;
	return NULL;
}

static void keep_body(resp *r, const char *p, size_t n)
{
	size_t room = BODY_KEEP - (r->body_len < BODY_KEEP ? r->body_len : BODY_KEEP);

	memcpy(r->body + (BODY_KEEP - room), p, n < room ? n : room);
	r->body_len += n;
}

/* Read one response. With to_eof, also read until the server closes (any
 * byte after the response is an error). 0 or -errno; -EPROTO for a
 * response that is not HTTP/1.x. */
static int read_response(int fd, rbuf *rb, resp *r, bool to_eof)
{
	const char *he, *line, *end;
	size_t head_len;
	long long cl = -1;
	bool chunked = false;
	int rc;

	r->status = 0;
	r->close = false;
	r->body_len = 0;
	while (!(he = find_crlf2(rb->p, rb->len))) {
		if (rb->len > HEAD_MAX)
			return -E2BIG;
		rc = fill(fd, rb, opt_timeout_ms);
		if (rc <= 0)
			return rc ? rc : -ECONNRESET;
	}
	head_len = (size_t)(he - rb->p) + 4;
	if (rb->len < 12 || memcmp(rb->p, "HTTP/1.", 7) != 0 || rb->p[8] != ' ')
		return -EPROTO;
	r->status = atoi(rb->p + 9);
	end = rb->p + head_len - 2;
	line = memchr(rb->p, '\n', head_len) + 1;
	while (line < end) {
		const char *nl = memchr(line, '\n', (size_t)(end - line));
		const char *colon, *v;

		if (!nl)
			return -EPROTO;
		colon = memchr(line, ':', (size_t)(nl - line));
		if (!colon)
			return -EPROTO;
		v = colon + 1;
		while (*v == ' ')
			v++;
		if (colon - line == 14 && strncasecmp(line, "content-length", 14) == 0)
			cl = atoll(v);
		else if (colon - line == 17 && strncasecmp(line, "transfer-encoding", 17) == 0)
			chunked = strncasecmp(v, "chunked", 7) == 0;
		else if (colon - line == 10 && strncasecmp(line, "connection", 10) == 0)
			r->close = strncasecmp(v, "close", 5) == 0;
		line = nl + 1;
	}
	consume(rb, head_len);

	if (chunked) {
		for (;;) {
			const char *nl;
			unsigned long long csz;
			size_t hl;

			while (!(nl = memchr(rb->p, '\n', rb->len))) {
				rc = fill(fd, rb, opt_timeout_ms);
				if (rc <= 0)
					return rc ? rc : -ECONNRESET;
			}
			csz = strtoull(rb->p, NULL, 16);
			hl = (size_t)(nl - rb->p) + 1;
			while (rb->len < hl + csz + 2) {
				rc = fill(fd, rb, opt_timeout_ms);
				if (rc <= 0)
					return rc ? rc : -ECONNRESET;
			}
			keep_body(r, rb->p + hl, (size_t)csz);
			consume(rb, hl + (size_t)csz + 2);
			if (csz == 0)
				break;
		}
	} else if (cl >= 0) {
		while (rb->len < (size_t)cl) {
			rc = fill(fd, rb, opt_timeout_ms);
			if (rc <= 0)
				return rc ? rc : -ECONNRESET;
		}
		keep_body(r, rb->p, (size_t)cl);
		consume(rb, (size_t)cl);
	} else {
		/* No length: the body runs to EOF. */
		while ((rc = fill(fd, rb, opt_timeout_ms)) > 0) {
			keep_body(r, rb->p, rb->len);
			rb->len = 0;
		}
		if (rc < 0)
			return rc;
		keep_body(r, rb->p, rb->len);
		rb->len = 0;
		return 0;
	}
	if (to_eof) {
		while ((rc = fill(fd, rb, opt_timeout_ms)) > 0)
			;
		if (rc < 0)
			return rc;
		if (rb->len)
			return -EPROTO;
	}
	return 0;
}

static bool response_ok(const resp *r)
{
	char msg[160];

	if (r->status != opt_status) {
		snprintf(msg, sizeof(msg), "status %d, expected %d", r->status, opt_status);
		report("unexpected response", msg, 0);
		return false;
	}
	if (opt_body && (r->body_len != opt_body_len ||
			 memcmp(r->body, opt_body, opt_body_len < BODY_KEEP ? opt_body_len : BODY_KEEP))) {
		snprintf(msg, sizeof(msg), "body of %zu bytes: %.*s", r->body_len,
			 (int)(r->body_len < 64 ? r->body_len : 64), r->body);
		report("unexpected body", msg, 0);
		return false;
	}
	return true;
}

/* ---- request/response load ------------------------------------------------------ */

typedef struct client {
	pthread_t tid;
	uint32_t *lat; /* ns, capped at UINT32_MAX */
	size_t nlat, cap;
	uint64_t reqs, errors;
} client;

static atomic_bool stop_flag;
static atomic_int_fast64_t budget; /* requests left in --count mode (may go negative) */
static pthread_barrier_t start_barrier;

static bool take_one(void)
{
	if (opt_count)
		return atomic_fetch_sub(&budget, 1) > 0 && !atomic_load(&stop_flag);
	return !atomic_load(&stop_flag);
}

static void record(client *c, uint64_t ns)
{
	if (c->nlat == c->cap) {
		size_t cap = c->cap ? c->cap * 2 : 65536;
		uint32_t *np = realloc(c->lat, cap * sizeof(*np));

		if (!np)
			return;
		c->lat = np;
		c->cap = cap;
	}
	c->lat[c->nlat++] = ns > UINT32_MAX ? UINT32_MAX : (uint32_t)ns;
}

static void *client_main(void *arg)
{
	client *c = arg;
	resp *r = malloc(sizeof(*r));
	rbuf rb = { 0 };
	int fd = -1, rc;

	pthread_barrier_wait(&start_barrier);
	while (r && take_one()) {
		uint64_t t0 = now_ns();

		if (fd < 0) {
			fd = connect_unix(opt_socket);
			if (fd < 0) {
				report("connect", opt_socket, -fd);
				c->errors++;
				continue;
			}
			if (!opt_close)
				t0 = now_ns(); /* keep-alive: connecting is not part of a request */
		}
		if (opt_close)
			rc = write_all(fd, req_close, req_close_len);
		else
			rc = write_all(fd, req_ka, req_ka_len);
		if (rc == 0)
			rc = read_response(fd, &rb, r, opt_close);
		if (rc < 0) {
			report("request", NULL, -rc);
			c->errors++;
		} else if (!response_ok(r)) {
			c->errors++;
		} else {
			c->reqs++;
			record(c, now_ns() - t0);
		}
		if (opt_close || rc < 0 || r->close) {
			close(fd);
			fd = -1;
			rb.len = 0;
		}
	}
	if (fd >= 0)
		close(fd);
	free(rb.p);
	free(r);
	return NULL;
}

static int cmp_u32(const void *a, const void *b)
{
	uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;

	return x < y ? -1 : x > y;
}

static double pct(const uint32_t *v, size_t n, double p)
{
	if (!n)
		return 0;
	return (double)v[(size_t)((double)(n - 1) * p + 0.5)];
}

/* utime + stime of a process, in seconds; < 0 when unreadable. */
static double proc_cpu_s(int pid)
{
	char path[64], buf[2048];
	unsigned long long ut, st;
	const char *p;
	ssize_t n;
	int fd;

	snprintf(path, sizeof(path), "/proc/%d/stat", pid);
	fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return -1;
	n = read(fd, buf, sizeof(buf) - 1);
	close(fd);
	if (n <= 0)
		return -1;
	buf[n] = 0;
	p = strrchr(buf, ')');
	/* After the comm: state ppid pgrp session tty tpgid flags minflt
	 * cminflt majflt cmajflt utime stime. */
	if (!p || sscanf(p + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %llu %llu", &ut,
			 &st) != 2)
		return -1;
	return (double)(ut + st) / (double)sysconf(_SC_CLK_TCK);
}

static int run_load(void)
{
	client *cl = calloc(opt_clients, sizeof(*cl));
	uint32_t *all;
	uint64_t reqs = 0, errors = 0;
	size_t n = 0, i;
	double t0, secs, cpu0 = -1, cpu1 = -1;
	char cpu[64] = "";

	if (!cl || build_requests() < 0)
		return 1;
	atomic_store(&budget, (int_fast64_t)opt_count);
	pthread_barrier_init(&start_barrier, NULL, opt_clients + 1);
	for (i = 0; i < opt_clients; i++)
		if (pthread_create(&cl[i].tid, NULL, client_main, &cl[i]) != 0) {
			perror("loadgen: pthread_create");
			exit(1);
		}
	if (opt_server_pid)
		cpu0 = proc_cpu_s(opt_server_pid);
	t0 = now_s();
	pthread_barrier_wait(&start_barrier);
	if (!opt_count) {
		struct timespec ts = { .tv_sec = (time_t)opt_duration,
				       .tv_nsec = (long)((opt_duration - (double)(time_t)opt_duration) *
							 1e9) };

		while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
			;
		atomic_store(&stop_flag, true);
	}
	for (i = 0; i < opt_clients; i++)
		pthread_join(cl[i].tid, NULL);
	secs = now_s() - t0;
	if (opt_server_pid)
		cpu1 = proc_cpu_s(opt_server_pid);

	for (i = 0; i < opt_clients; i++) {
		reqs += cl[i].reqs;
		errors += cl[i].errors;
		n += cl[i].nlat;
	}
	all = malloc((n ? n : 1) * sizeof(*all));
	if (!all)
		return 1;
	n = 0;
	for (i = 0; i < opt_clients; i++) {
		if (cl[i].nlat)
			memcpy(all + n, cl[i].lat, cl[i].nlat * sizeof(*all));
		n += cl[i].nlat;
		free(cl[i].lat);
	}
	qsort(all, n, sizeof(*all), cmp_u32);
	if (opt_server_pid && cpu0 >= 0 && cpu1 >= 0 && reqs)
		snprintf(cpu, sizeof(cpu), " srv_cpu_us_per_req=%.2f",
			 (cpu1 - cpu0) * 1e6 / (double)reqs);
	printf("%s mode=%s clients=%u reqs=%" PRIu64 " errors=%" PRIu64
	       " secs=%.2f rate=%.1f p50_us=%.1f p99_us=%.1f max_us=%.1f%s\n",
	       opt_label, opt_close ? "close" : "keepalive", opt_clients, reqs, errors, secs,
	       (double)reqs / secs, pct(all, n, 0.50) / 1e3, pct(all, n, 0.99) / 1e3,
	       n ? (double)all[n - 1] / 1e3 : 0.0, cpu);
	fflush(stdout);
	free(all);
	free(cl);
	return reqs > 0 && errors == 0 ? 0 : 1;
}

/* ---- WebSocket fan-out ------------------------------------------------------------- */

typedef struct sub {
	int fd;
	rbuf rb;
	char *msg; /* a fragmented message being put together */
	size_t msg_len;
	bool in_msg;
	unsigned got; /* events received */
	bool dead;
} sub;

/* `"value":"fanout-PID-K"` of the change in flight; nothing matches before the first. */
static char expect_value[64] = "\x01";
static uint64_t fan_errors;

static void sub_fail(sub *s, const char *why, int err)
{
	if (!s->dead) {
		report(why, NULL, err);
		fan_errors++;
		s->dead = true;
	}
}

static int ws_handshake(int fd, rbuf *rb, const char *path)
{
	char req[1024];
	const char *he;
	int n, rc;

	n = snprintf(req, sizeof(req),
		     "GET %s HTTP/1.1\r\nHost: lxd\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
		     "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
		     path);
	if (n < 0 || (size_t)n >= sizeof(req))
		return -ENAMETOOLONG;
	rc = write_all(fd, req, (size_t)n);
	if (rc < 0)
		return rc;
	while (!(he = find_crlf2(rb->p, rb->len))) {
		rc = fill(fd, rb, opt_timeout_ms);
		if (rc <= 0)
			return rc ? rc : -ECONNRESET;
	}
	if (rb->len < 12 || memcmp(rb->p, "HTTP/1.1 101 ", 13) != 0)
		return -EPROTO;
	consume(rb, (size_t)(he - rb->p) + 4);
	return 0;
}

static void sub_message(sub *s, const char *p, size_t n)
{
	/* Events arrive in order, one per change: the message must carry the
	 * value of the change in flight. */
	if (!memmem(p, n, expect_value, strlen(expect_value))) {
		char msg[200];

		snprintf(msg, sizeof(msg), "unexpected event (want %s): %.*s", expect_value,
			 (int)(n < 120 ? n : 120), p);
		report(msg, NULL, 0);
		fan_errors++;
		return;
	}
	s->got++;
}

/* Parse every complete server frame in the buffer. */
static void sub_frames(sub *s)
{
	rbuf *rb = &s->rb;

	while (!s->dead && rb->len >= 2) {
		unsigned char *p = (unsigned char *)rb->p;
		bool fin = p[0] & 0x80;
		int op = p[0] & 0x0f;
		uint64_t len = p[1] & 0x7f;
		size_t hl = 2;

		if (p[1] & 0x80) {
			sub_fail(s, "server frame is masked", 0);
			return;
		}
		if (len == 126) {
			if (rb->len < 4)
				return;
			len = (uint64_t)p[2] << 8 | p[3];
			hl = 4;
		} else if (len == 127) {
			int i;

			if (rb->len < 10)
				return;
			len = 0;
			for (i = 0; i < 8; i++)
				len = len << 8 | p[2 + i];
			hl = 10;
		}
		if (len > 16 * 1024 * 1024) {
			sub_fail(s, "oversized frame", 0);
			return;
		}
		if (rb->len < hl + len)
			return;
		switch (op) {
		case 0x9: { /* ping: pong with the same payload, masked (key 0) */
			unsigned char pong[6 + 125];

			if (len <= 125) {
				pong[0] = 0x8a;
				pong[1] = 0x80 | (unsigned char)len;
				memset(pong + 2, 0, 4);
				memcpy(pong + 6, p + hl, len);
				if (write_all(s->fd, (char *)pong, 6 + len) < 0)
					sub_fail(s, "pong", errno);
			}
			break;
		}
		case 0xa:
			break;
		case 0x8:
			sub_fail(s, "server sent a close frame", 0);
			return;
		case 0x1:
		case 0x0:
			if (op == 0x1 && fin && !s->in_msg) {
				sub_message(s, (char *)p + hl, len);
				break;
			}
			if ((op == 0x1) == s->in_msg) {
				sub_fail(s, "bad fragmentation", 0);
				return;
			}
			s->in_msg = true;
			{
				char *np = realloc(s->msg, s->msg_len + len + 1);

				if (!np) {
					sub_fail(s, "out of memory", ENOMEM);
					return;
				}
				s->msg = np;
				memcpy(s->msg + s->msg_len, p + hl, len);
				s->msg_len += len;
			}
			if (fin) {
				sub_message(s, s->msg, s->msg_len);
				s->msg_len = 0;
				s->in_msg = false;
			}
			break;
		default:
			sub_fail(s, "unexpected opcode", 0);
			return;
		}
		consume(rb, hl + (size_t)len);
	}
}

static void sub_readable(sub *s)
{
	for (;;) {
		ssize_t n;

		if (s->rb.cap - s->rb.len < 4096) {
			size_t cap = s->rb.cap ? s->rb.cap * 2 : 8192;
			char *np = realloc(s->rb.p, cap);

			if (!np) {
				sub_fail(s, "out of memory", ENOMEM);
				return;
			}
			s->rb.p = np;
			s->rb.cap = cap;
		}
		n = read(s->fd, s->rb.p + s->rb.len, s->rb.cap - s->rb.len);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0 && errno == EAGAIN)
			return;
		if (n <= 0) {
			sub_fail(s, "subscriber connection closed by the server", n < 0 ? errno : 0);
			return;
		}
		s->rb.len += (size_t)n;
		sub_frames(s);
	}
}

static int write_value(const char *path, const char *value)
{
	size_t len = strlen(value);
	int fd, err = 0;
	ssize_t w;

	fd = open(path, O_WRONLY | O_TRUNC | O_CLOEXEC);
	if (fd < 0)
		return -errno;
	w = write(fd, value, len);
	if (w < 0)
		err = -errno;
	else if ((size_t)w != len)
		err = -EIO;
	if (close(fd) < 0 && !err)
		err = -errno;
	return err;
}

static int run_fanout(void)
{
	const char *path = strcmp(opt_path, "/1.0/config/user.foo") ? opt_path
								  : "/1.0/events?type=config";
	sub *subs = calloc(opt_fanout, sizeof(*subs));
	double *last = calloc(opt_changes, sizeof(*last));
	double *wr = calloc(opt_changes, sizeof(*wr));
	struct epoll_event evs[256];
	unsigned i, k, done_changes = 0;
	int ep, rc;
	double t0;

	ep = epoll_create1(EPOLL_CLOEXEC);
	if (!subs || !last || !wr || ep < 0)
		return 1;
	t0 = now_s();
	for (i = 0; i < opt_fanout; i++) {
		struct epoll_event ev = { .events = EPOLLIN, .data.ptr = &subs[i] };

		subs[i].fd = connect_unix(opt_socket);
		if (subs[i].fd < 0) {
			report("connect", opt_socket, -subs[i].fd);
			return 1;
		}
		rc = ws_handshake(subs[i].fd, &subs[i].rb, path);
		if (rc < 0) {
			report("WebSocket handshake", path, -rc);
			return 1;
		}
		fcntl(subs[i].fd, F_SETFL, fcntl(subs[i].fd, F_GETFL) | O_NONBLOCK);
		if (epoll_ctl(ep, EPOLL_CTL_ADD, subs[i].fd, &ev) < 0)
			return 1;
		sub_frames(&subs[i]);
	}
	fprintf(stderr, "loadgen: %u subscribers connected in %.2f s\n", opt_fanout, now_s() - t0);

	for (k = 1; k <= opt_changes && !fan_errors; k++) {
		char value[48];
		unsigned have = 0;
		double start, deadline;

		snprintf(value, sizeof(value), "fanout-%u-%u\n", (unsigned)getpid(), k);
		snprintf(expect_value, sizeof(expect_value), "\"value\":\"%.*s\"",
			 (int)strlen(value) - 1, value);
		start = now_s();
		rc = write_value(opt_trigger, value);
		wr[k - 1] = now_s() - start;
		if (rc < 0) {
			report("write", opt_trigger, -rc);
			fan_errors++;
			break;
		}
		deadline = start + (double)opt_timeout_ms / 1000;
		while (have < opt_fanout && !fan_errors) {
			int n, j;
			double left = deadline - now_s();

			if (left <= 0) {
				report("timeout waiting for the event on every subscriber", NULL, 0);
				fan_errors++;
				break;
			}
			n = epoll_wait(ep, evs, 256, (int)(left * 1000) + 1);
			for (j = 0; j < n; j++) {
				sub *s = evs[j].data.ptr;
				unsigned before = s->got;

				sub_readable(s);
				if (s->got >= k && before < k)
					have++;
				if (s->got > k) {
					report("more than one event for one change", NULL, 0);
					fan_errors++;
				}
			}
		}
		last[k - 1] = now_s() - start;
		if (!fan_errors)
			done_changes++;
	}

	{
		uint32_t *lv = malloc(opt_changes * sizeof(*lv)), *wv = malloc(opt_changes * sizeof(*wv));

		if (!lv || !wv)
			return 1;
		for (k = 0; k < done_changes; k++) {
			lv[k] = (uint32_t)(last[k] * 1e6);
			wv[k] = (uint32_t)(wr[k] * 1e6);
		}
		qsort(lv, done_changes, sizeof(*lv), cmp_u32);
		qsort(wv, done_changes, sizeof(*wv), cmp_u32);
		printf("%s mode=ws-fanout subscribers=%u changes=%u errors=%" PRIu64
		       " p50_ms=%.2f p99_ms=%.2f max_ms=%.2f write_p50_ms=%.2f\n",
		       opt_label, opt_fanout, done_changes, fan_errors, pct(lv, done_changes, 0.5) / 1e3,
		       pct(lv, done_changes, 0.99) / 1e3,
		       done_changes ? (double)lv[done_changes - 1] / 1e3 : 0.0,
		       pct(wv, done_changes, 0.5) / 1e3);
		fflush(stdout);
		free(lv);
		free(wv);
	}
	for (i = 0; i < opt_fanout; i++) {
		if (subs[i].fd >= 0)
			close(subs[i].fd);
		free(subs[i].rb.p);
		free(subs[i].msg);
	}
	close(ep);
	free(subs);
	free(last);
	free(wr);
	return done_changes == opt_changes && !fan_errors ? 0 : 1;
}

/* ---- idle connections ---------------------------------------------------------------- */

static volatile sig_atomic_t got_signal;

static void on_signal(int sig)
{
	(void)sig;
	got_signal = 1;
}

static int run_idle(void)
{
	int *fds = malloc(opt_idle * sizeof(*fds));
	resp *r = malloc(sizeof(*r));
	rbuf rb = { 0 };
	unsigned i, open_n = 0, still = 0;
	uint64_t errors = 0;
	double t0 = now_s(), until;
	struct sigaction sa = { .sa_handler = on_signal };

	if (!fds || !r || build_requests() < 0)
		return 1;
	sigaction(SIGINT, &sa, NULL);
	sigaction(SIGTERM, &sa, NULL);
	for (i = 0; i < opt_idle && !got_signal; i++) {
		fds[i] = connect_unix(opt_socket);
		if (fds[i] < 0) {
			report("connect", opt_socket, -fds[i]);
			errors++;
			continue;
		}
		open_n++;
		if (opt_idle_request) {
			int rc = write_all(fds[i], req_ka, req_ka_len);

			rb.len = 0;
			if (rc == 0)
				rc = read_response(fds[i], &rb, r, false);
			if (rc < 0) {
				report("request", NULL, -rc);
				errors++;
			} else if (!response_ok(r)) {
				errors++;
			}
		}
	}
	printf("%s mode=idle open=%u errors=%" PRIu64 " secs=%.2f\n", opt_label, open_n, errors,
	       now_s() - t0);
	fflush(stdout);
	until = opt_hold >= 0 ? now_s() + opt_hold : 0;
	while (!got_signal && (opt_hold < 0 || now_s() < until))
		usleep(20000);
	for (i = 0; i < opt_idle; i++) {
		struct pollfd pfd = { .fd = fds[i], .events = POLLIN };

		if (fds[i] < 0)
			continue;
		/* Readable means EOF (or unsolicited bytes): the server let go. */
		if (poll(&pfd, 1, 0) == 0)
			still++;
		close(fds[i]);
	}
	printf("%s mode=idle open=%u still_open=%u\n", opt_label, open_n, still);
	fflush(stdout);
	free(rb.p);
	free(r);
	free(fds);
	return errors ? 1 : 0;
}

int main(int argc, char **argv)
{
	struct rlimit rl;

	parse_args(argc, argv);
	signal(SIGPIPE, SIG_IGN);
	/* Thousands of connections need thousands of descriptors. */
	if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
		rl.rlim_cur = rl.rlim_max;
		setrlimit(RLIMIT_NOFILE, &rl);
	}
	if (opt_fanout)
		return run_fanout();
	if (opt_idle)
		return run_idle();
	return run_load();
}
