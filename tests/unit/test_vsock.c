/* The vsock transports (bridge/vsock.c) against fake VMMs written here: a
 * thread owning a Unix listener that answers each connection from a
 * script, read with exactly one recv(32) so that a CONNECT line sent in
 * pieces shows. The dialer runs on a real uv loop. Only the Unix
 * transports are dialed: this machine is a VM, AF_VSOCK cid 2 is its
 * hypervisor (specs/vsock.md §4), so no AF_VSOCK connect happens here. */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>
#include <uv.h>

#include "bridge/vsock.h"
#include "tests/unit/unit.h"

static uv_loop_t loop;
static char *tmp;

static void setup(void)
{
	ck_assert_int_eq(uv_loop_init(&loop), 0);
	tmp = unit_tmpdir();
}

/* Every handle closed, every allocation returned: the loop must close. */
static void teardown(void)
{
	uv_run(&loop, UV_RUN_DEFAULT);
	ck_assert_int_eq(uv_loop_close(&loop), 0);
	unit_rmrf(tmp);
	free(tmp);
}

static uint64_t now_ms(void)
{
	return uv_hrtime() / 1000000;
}

static void path_in_tmp(char *out, size_t len, const char *name)
{
	ck_assert_int_lt(snprintf(out, len, "%s/%s", tmp, name), (int)len);
}

static int unix_listener(const char *path)
{
	struct sockaddr_un sa = {.sun_family = AF_UNIX};
	int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);

	ck_assert_int_ge(fd, 0);
	ck_assert_uint_lt(strlen(path), sizeof(sa.sun_path));
	strcpy(sa.sun_path, path);
	ck_assert_int_eq(bind(fd, (struct sockaddr *)&sa, sizeof(sa)), 0);
	ck_assert_int_eq(listen(fd, 64), 0);
	return fd;
}

static int unix_connect(const char *path)
{
	struct sockaddr_un sa = {.sun_family = AF_UNIX};
	int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);

	ck_assert_int_ge(fd, 0);
	strcpy(sa.sun_path, path);
	if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
		int e = errno;

		close(fd);
		return -e;
	}
	return fd;
}

static int count_fds(void)
{
	DIR *d = opendir("/proc/self/fd");
	struct dirent *e;
	int n = 0;

	ck_assert_ptr_nonnull(d);
	while ((e = readdir(d)))
		if (e->d_name[0] != '.')
			n++;
	closedir(d);
	return n;
}

/* Read exactly `want` bytes that must already be queued (or arrive within
 * a second) from a non-blocking fd. */
static void expect_bytes(int fd, const char *want)
{
	size_t n = strlen(want), got = 0;
	char buf[256];

	ck_assert_uint_lt(n, sizeof(buf));
	while (got < n) {
		struct pollfd pfd = {.fd = fd, .events = POLLIN};
		ssize_t r;

		ck_assert_int_eq(poll(&pfd, 1, 1000), 1);
		r = recv(fd, buf + got, n - got, 0);
		ck_assert_int_gt(r, 0);
		got += (size_t)r;
	}
	ck_assert_int_eq(memcmp(buf, want, n), 0);
	/* and nothing more */
	ck_assert_int_eq(recv(fd, buf, 1, MSG_DONTWAIT), -1);
	ck_assert_int_eq(errno, EAGAIN);
}

/* ---- a fake VMM ------------------------------------------------------------------ */

typedef struct fake {
	char path[108];
	int lfd;
	int stop[2];
	pthread_t th;
	int eof_first;     /* the first N connections: read the line, close */
	const char *reply; /* then: written in one write (NULL: stay silent) */
	size_t reply_len;
	int accepts;
	char got[64]; /* the last connection's one recv of 32 bytes */
	int gotn;
	int held[64];
	int nheld;
} fake;

static void *fake_main(void *arg)
{
	fake *f = arg;

	for (;;) {
		struct pollfd p[2] = {{.fd = f->lfd, .events = POLLIN},
				      {.fd = f->stop[0], .events = POLLIN}};
		char buf[32];
		ssize_t r;
		int c;

		if (poll(p, 2, -1) < 0)
			continue;
		if (p[1].revents)
			break;
		c = accept(f->lfd, NULL, NULL);
		if (c < 0)
			continue;
		r = recv(c, buf, sizeof(buf), 0);
		memset(f->got, 0, sizeof(f->got));
		memcpy(f->got, buf, r > 0 ? (size_t)r : 0);
		__atomic_store_n(&f->gotn, (int)r, __ATOMIC_SEQ_CST);
		__atomic_add_fetch(&f->accepts, 1, __ATOMIC_SEQ_CST);
		if (f->eof_first > 0) {
			f->eof_first--;
			close(c);
			continue;
		}
		if (f->reply && write(c, f->reply, f->reply_len) != (ssize_t)f->reply_len)
			close(c);
		else if (f->nheld < (int)(sizeof(f->held) / sizeof(f->held[0])))
			f->held[f->nheld++] = c; /* open: no EOF for the dialer */
		else
			close(c);
	}
	for (int i = 0; i < f->nheld; i++)
		close(f->held[i]);
	close(f->lfd);
	return NULL;
}

static void fake_start_n(fake *f, const char *path, int eof_first, const char *reply,
			 size_t len)
{
	memset(f, 0, sizeof(*f));
	snprintf(f->path, sizeof(f->path), "%s", path);
	f->eof_first = eof_first;
	f->reply = reply;
	f->reply_len = len;
	f->lfd = unix_listener(path);
	ck_assert_int_eq(pipe(f->stop), 0);
	ck_assert_int_eq(pthread_create(&f->th, NULL, fake_main, f), 0);
}

static void fake_start(fake *f, const char *path, int eof_first, const char *reply)
{
	fake_start_n(f, path, eof_first, reply, reply ? strlen(reply) : 0);
}

static void fake_stop(fake *f)
{
	ck_assert_int_eq(write(f->stop[1], "x", 1), 1);
	pthread_join(f->th, NULL);
	close(f->stop[0]);
	close(f->stop[1]);
}

static int fake_accepts(fake *f)
{
	return __atomic_load_n(&f->accepts, __ATOMIC_SEQ_CST);
}

/* ---- dialing helpers -------------------------------------------------------------- */

typedef struct result {
	int calls;
	int status;
	int fd;
	uint64_t at;
} result;

static void dial_cb(void *arg, int status, int fd)
{
	result *r = arg;

	r->calls++;
	r->status = status;
	r->fd = fd;
	r->at = now_ms();
}

static gl_vsock_addr hybrid(const char *uds, uint32_t port)
{
	gl_vsock_addr a = {.kind = GL_VSOCK_HYBRID, .port = port};

	ck_assert_uint_lt(strlen(uds), sizeof(a.path));
	memcpy(a.path, uds, strlen(uds) + 1);
	return a;
}

static gl_vsock_dial_opts opts(uint64_t attempt, uint64_t deadline)
{
	gl_vsock_dial_opts o;

	gl_vsock_dial_opts_default(&o);
	o.attempt_ms = attempt;
	o.deadline_ms = deadline;
	return o;
}

/* Dial and run the loop until the callback; returns the elapsed ms. */
static uint64_t dial_wait(const gl_vsock_addr *a, const gl_vsock_dial_opts *o, result *r)
{
	gl_vsock_dial *d = NULL;
	uint64_t t0 = now_ms();

	memset(r, 0, sizeof(*r));
	r->fd = -2;
	ck_assert_int_eq(gl_vsock_dial_start(&loop, a, o, dial_cb, r, &d), 0);
	ck_assert_ptr_nonnull(d);
	ck_assert_int_eq(r->calls, 0); /* never from inside the start call */
	while (r->calls == 0)
		uv_run(&loop, UV_RUN_ONCE);
	uv_run(&loop, UV_RUN_DEFAULT);
	ck_assert_int_eq(r->calls, 1);
	return r->at - t0;
}

/* A fake VMM at tmp/vm.sock (a previous one's file removed) that closes
 * the first `eofs` connections, then writes `reply` (NULL: silence); dial
 * its `port` with `o`. Returns the elapsed ms; fake_stop(f) is the
 * caller's. */
static uint64_t dial_fake(fake *f, int eofs, const char *reply, uint32_t port,
			  gl_vsock_dial_opts o, result *r)
{
	char uds[128];
	gl_vsock_addr a;

	path_in_tmp(uds, sizeof(uds), "vm.sock");
	unlink(uds);
	fake_start(f, uds, eofs, reply);
	a = hybrid(uds, port);
	return dial_wait(&a, &o, r);
}

/* ---- pure functions ---------------------------------------------------------------- */

static int pc(const char *s, uint32_t *port)
{
	return gl_vsock_parse_connect(s, strlen(s), port);
}

START_TEST(parse_connect_table)
{
	uint32_t port;
	static const struct {
		const char *line;
		int rc;
		uint32_t port;
	} t[] = {
		{"CONNECT 7361\n", 0, 7361},
		{"connect 0\n", 0, 0},
		{"CoNnEcT 52\n", 0, 52},
		{"connect 4294967295\n", 0, 4294967295u},
		{"connect 4294967296\n", -EINVAL, 0},        /* > u32 */
		{"connect 99999999999\n", -EINVAL, 0},
		{"connect 007\n", 0, 7},                      /* leading zeros: u32::from_str */
		{"connect +7\n", 0, 7},                       /* so is a plus sign */
		{"connect +\n", -EINVAL, 0},
		{"connect -1\n", -EINVAL, 0},
		{"connect -0\n", -EINVAL, 0},
		{"connect 12a\n", -EINVAL, 0},
		{"connect 0x10\n", -EINVAL, 0},
		{"connect 1 2 extra words\n", 0, 1},          /* extra words ignored */
		{"  \tconnect\t\t  80  \n", 0, 80},           /* any whitespace */
		{"\nconnect 5\n", 0, 5},                      /* a leading "\n" is whitespace */
		{"connect\v9\f\n", 0, 9},                     /* VT and FF too */
		{"connect \xc2\xa0" "9\n", 0, 9},             /* NBSP is whitespace in Rust */
		{"connect \xe3\x80\x80" "9\n", 0, 9},         /* U+3000 too */
		{"connectx 5\n", -EINVAL, 0},
		{"conn ect 5\n", -EINVAL, 0},
		{"CONNECT   \n", -EINVAL, 0},                 /* no port */
		{"CONNECT 5 \xff\n", -EINVAL, 0},             /* invalid UTF-8 anywhere */
		{"CONNECT 5 \xc0\x80\n", -EINVAL, 0},         /* overlong */
		{"CONNECT 5 \xed\xa0\x80\n", -EINVAL, 0},     /* surrogate */
		{"CONNECT 5 \xf4\x90\x80\x80\n", -EINVAL, 0}, /* > U+10FFFF */
		{"CONNECT 5 \xe2\x82\n", -EINVAL, 0},         /* truncated sequence */
		{"CONNECT \xef\xbc\x95\n", -EINVAL, 0},       /* fullwidth digit 5 */
		{"connect 9", -EINVAL, 0},                    /* 9 bytes: short read */
		{"connect 10", -EINVAL, 0},                   /* no "\n" under 32 bytes */
		{"connect 1\nconnect 2\n", -EINVAL, 0},       /* FC stops at the first "\n" */
		{"", -EINVAL, 0},
		{"OK 5\n", -EINVAL, 0},
	};

	for (size_t i = 0; i < sizeof(t) / sizeof(t[0]); i++) {
		int rc;

		port = 0xdeadbeef;
		rc = pc(t[i].line, &port);
		ck_assert_msg(rc == t[i].rc, "case %zu \"%s\": rc %d, want %d", i, t[i].line, rc,
			      t[i].rc);
		if (rc == 0)
			ck_assert_msg(port == t[i].port, "case %zu: port %u, want %u", i, port,
				      t[i].port);
	}

	/* 32 bytes without a newline: Firecracker parses what it has */
	{
		char b[33];

		memset(b, ' ', 32);
		memcpy(b, "connect 4242", 12);
		ck_assert_int_eq(gl_vsock_parse_connect(b, 32, &port), 0);
		ck_assert_uint_eq(port, 4242);
		/* ... and never more than 32 */
		b[32] = '\n';
		ck_assert_int_eq(gl_vsock_parse_connect(b, 33, &port), -EINVAL);
		/* the digits cut at byte 32 are what counts */
		memset(b, '1', 32);
		memcpy(b, "connect ", 8);
		ck_assert_int_eq(gl_vsock_parse_connect(b, 32, &port), -EINVAL); /* 24 digits */
		memset(b, ' ', 32);
		memcpy(b + 22, "connect 12", 10);
		ck_assert_int_eq(gl_vsock_parse_connect(b, 32, &port), 0);
		ck_assert_uint_eq(port, 12);
	}
	/* embedded NUL is not whitespace */
	ck_assert_int_eq(gl_vsock_parse_connect("connect 5\0 6\n", 13, &port), -EINVAL);
	ck_assert_int_eq(gl_vsock_parse_connect("connect 5 \0\n", 12, &port), 0);
	ck_assert_int_eq(gl_vsock_parse_connect(NULL, 10, &port), -EINVAL);
}
END_TEST

START_TEST(parse_ok_table)
{
	ck_assert_int_eq(gl_vsock_parse_ok("OK 1073741824", 13), 0);
	ck_assert_int_eq(gl_vsock_parse_ok("OK ", 3), 0);
	ck_assert_int_eq(gl_vsock_parse_ok("OK whatever", 11), 0); /* the number is ignored */
	ck_assert_int_eq(gl_vsock_parse_ok("OK", 2), 0);
	ck_assert_int_eq(gl_vsock_parse_ok("OK\r", 3), -EPROTO);
	ck_assert_int_eq(gl_vsock_parse_ok("OKAY", 4), -EPROTO);
	ck_assert_int_eq(gl_vsock_parse_ok("ok 5", 4), -EPROTO);
	ck_assert_int_eq(gl_vsock_parse_ok(" OK 5", 5), -EPROTO);
	ck_assert_int_eq(gl_vsock_parse_ok("O", 1), -EPROTO);
	ck_assert_int_eq(gl_vsock_parse_ok("", 0), -EPROTO);
	ck_assert_int_eq(gl_vsock_parse_ok("OK 5", 1), -EPROTO); /* n is what counts */
}
END_TEST

START_TEST(transport_and_str)
{
	gl_vsock_addr a;
	char buf[160], big[200];

	ck_assert_int_eq(gl_vsock_parse_transport("vsock", &a), 0);
	ck_assert_int_eq(a.kind, GL_VSOCK_CID);
	ck_assert_uint_eq(a.port, 0);
	ck_assert_int_eq(gl_vsock_parse_transport("unix:/run/gl", &a), 0);
	ck_assert_int_eq(a.kind, GL_VSOCK_GUEST_UNIX);
	ck_assert_str_eq(a.path, "/run/gl");
	ck_assert_uint_eq(a.port, 0);
	ck_assert_int_eq(gl_vsock_parse_transport("unix:", &a), -EINVAL);
	ck_assert_int_eq(gl_vsock_parse_transport("vsock:3", &a), -EINVAL);
	ck_assert_int_eq(gl_vsock_parse_transport("VSOCK", &a), -EINVAL);
	ck_assert_int_eq(gl_vsock_parse_transport("tcp:1", &a), -EINVAL);
	ck_assert_int_eq(gl_vsock_parse_transport("", &a), -EINVAL);
	memset(big, 'd', sizeof(big));
	memcpy(big, "unix:", 5);
	big[5 + 108] = '\0'; /* 108 characters: no room for the NUL */
	ck_assert_int_eq(gl_vsock_parse_transport(big, &a), -EINVAL);
	big[5 + 107] = '\0';
	ck_assert_int_eq(gl_vsock_parse_transport(big, &a), 0);

	a = (gl_vsock_addr){.kind = GL_VSOCK_CID, .cid = 42, .port = 7361};
	ck_assert_str_eq(gl_vsock_addr_str(&a, buf, sizeof(buf)), "cid 42 port 7361");
	a = hybrid("/run/vm1.sock", 7361);
	ck_assert_str_eq(gl_vsock_addr_str(&a, buf, sizeof(buf)), "/run/vm1.sock port 7361");
	a.kind = GL_VSOCK_GUEST_UNIX;
	ck_assert_str_eq(gl_vsock_addr_str(&a, buf, sizeof(buf)), "unix:/run/vm1.sock port 7361");
	ck_assert_str_eq(gl_vsock_addr_str(&a, buf, 6), "unix:");
}
END_TEST

/* ---- hybrid dial --------------------------------------------------------------------- */

START_TEST(hybrid_ok_leaves_guest_bytes)
{
	char uds[128];
	fake f;
	result r;
	gl_vsock_addr a;
	gl_vsock_dial_opts o = opts(2000, 5000);

	path_in_tmp(uds, sizeof(uds), "vm.sock");
	/* the guest speaks first: its bytes share the write with OK */
	{
		static const char reply[] = "OK 1073741824\nHELLO\x00\x01 rest\n";

		fake_start_n(&f, uds, 0, reply, sizeof(reply) - 1);
	}
	a = hybrid(uds, 7361);
	dial_wait(&a, &o, &r);
	ck_assert_int_eq(r.status, 0);
	ck_assert_int_ge(r.fd, 0);
	ck_assert(fcntl(r.fd, F_GETFL) & O_NONBLOCK);
	ck_assert(fcntl(r.fd, F_GETFD) & FD_CLOEXEC);
	/* one recv(32) saw the whole line: it went out in one write */
	ck_assert_int_eq(__atomic_load_n(&f.gotn, __ATOMIC_SEQ_CST), 13);
	ck_assert_int_eq(memcmp(f.got, "CONNECT 7361\n", 13), 0);
	ck_assert_int_eq(fake_accepts(&f), 1);
	{
		char want[] = "HELLO\x00\x01 rest\n";
		char buf[64];
		ssize_t n;

		n = recv(r.fd, buf, sizeof(buf), 0);
		ck_assert_int_eq(n, (ssize_t)sizeof(want) - 1);
		ck_assert_int_eq(memcmp(buf, want, sizeof(want) - 1), 0);
	}
	close(r.fd);
	fake_stop(&f);
}
END_TEST

START_TEST(hybrid_eof_then_ok)
{
	fake f;
	result r;
	uint64_t ms;

	/* two EOFs: nobody listens yet */
	ms = dial_fake(&f, 2, "OK 1073741825\n", 52, opts(2000, 5000), &r);
	ck_assert_int_eq(r.status, 0);
	ck_assert_int_eq(fake_accepts(&f), 3);
	ck_assert_int_eq(memcmp(f.got, "CONNECT 52\n", 11), 0);
	/* backoff 25 then 50 ms, and not much more */
	ck_assert_uint_ge(ms, 70);
	ck_assert_uint_lt(ms, 1000);
	expect_bytes(r.fd, "");
	close(r.fd);
	fake_stop(&f);
}
END_TEST

START_TEST(hybrid_eof_until_deadline)
{
	fake f;
	result r;
	uint64_t ms;

	ms = dial_fake(&f, 1000, NULL, 7361, opts(2000, 300), &r);
	ck_assert_int_eq(r.status, -ECONNRESET);
	ck_assert_int_eq(r.fd, -1);
	ck_assert_uint_ge(ms, 290);
	ck_assert_uint_lt(ms, 900);
	/* attempts at 0, 25, 75, 175 ms; the next (375) would be past the
	 * deadline, so the verdict waits for it with the last error */
	ck_assert_int_ge(fake_accepts(&f), 3);
	ck_assert_int_le(fake_accepts(&f), 4);
	fake_stop(&f);
}
END_TEST

START_TEST(hybrid_silent_attempt_timeout)
{
	fake f;
	result r;
	uint64_t ms;

	ms = dial_fake(&f, 0, NULL, 7361, opts(200, 0) /* one attempt */, &r);
	ck_assert_int_eq(r.status, -ETIMEDOUT);
	ck_assert_int_eq(r.fd, -1);
	ck_assert_uint_ge(ms, 195);
	ck_assert_uint_lt(ms, 800);
	ck_assert_int_eq(fake_accepts(&f), 1);
	fake_stop(&f);
}
END_TEST

START_TEST(hybrid_silent_retried_to_deadline)
{
	fake f;
	result r;
	uint64_t ms;

	ms = dial_fake(&f, 0, NULL, 7361, opts(150, 500), &r);
	ck_assert_int_eq(r.status, -ETIMEDOUT);
	ck_assert_uint_ge(ms, 490);
	ck_assert_uint_lt(ms, 1200);
	ck_assert_int_ge(fake_accepts(&f), 3); /* 150 +25 +150 +50 +150: a new attempt each time */
	fake_stop(&f);
}
END_TEST

START_TEST(hybrid_missing_uds)
{
	char uds[128];
	result r;
	gl_vsock_addr a;
	gl_vsock_dial_opts o = opts(2000, 300);
	uint64_t ms;

	path_in_tmp(uds, sizeof(uds), "absent.sock");
	a = hybrid(uds, 7361);
	ms = dial_wait(&a, &o, &r);
	ck_assert_int_eq(r.status, -ENOENT);
	ck_assert_int_eq(r.fd, -1);
	ck_assert_uint_ge(ms, 290);
	ck_assert_uint_lt(ms, 900);

	/* one attempt only: at once */
	o.deadline_ms = 0;
	ms = dial_wait(&a, &o, &r);
	ck_assert_int_eq(r.status, -ENOENT);
	ck_assert_uint_lt(ms, 100);
}
END_TEST

START_TEST(hybrid_stale_uds)
{
	char uds[128];
	result r;
	gl_vsock_addr a;
	gl_vsock_dial_opts o = opts(2000, 200);
	uint64_t ms;

	path_in_tmp(uds, sizeof(uds), "stale.sock");
	close(unix_listener(uds)); /* the file stays, nobody listens */
	a = hybrid(uds, 7361);
	ms = dial_wait(&a, &o, &r);
	ck_assert_int_eq(r.status, -ECONNREFUSED);
	ck_assert_uint_ge(ms, 190);
	ck_assert_uint_lt(ms, 800);
}
END_TEST

static fake late;
static char late_path[128];

static void start_late(uv_timer_t *t)
{
	fake_start(&late, late_path, 0, "OK 1073741999\n");
	uv_close((uv_handle_t *)t, NULL);
}

START_TEST(hybrid_vmm_comes_up_later)
{
	uv_timer_t t;
	result r;
	gl_vsock_addr a;
	gl_vsock_dial_opts o = opts(2000, 3000);
	uint64_t ms;

	path_in_tmp(late_path, sizeof(late_path), "late.sock");
	uv_timer_init(&loop, &t);
	uv_timer_start(&t, start_late, 150, 0);
	a = hybrid(late_path, 7361);
	ms = dial_wait(&a, &o, &r);
	ck_assert_int_eq(r.status, 0);
	ck_assert_uint_ge(ms, 145);
	ck_assert_uint_lt(ms, 1000);
	ck_assert_int_eq(fake_accepts(&late), 1);
	close(r.fd);
	fake_stop(&late);
}
END_TEST

static void bad_reply(const char *reply)
{
	fake f;
	result r;
	uint64_t ms;

	ms = dial_fake(&f, 0, reply, 7361, opts(2000, 5000), &r);
	ck_assert_msg(r.status == -EPROTO, "reply \"%s\": status %d", reply, r.status);
	ck_assert_int_eq(r.fd, -1);
	ck_assert_uint_lt(ms, 1000); /* not retried */
	ck_assert_int_eq(fake_accepts(&f), 1);
	fake_stop(&f);
}

START_TEST(hybrid_reply_without_ok)
{
	char longline[100];

	bad_reply("ERR no listener\n");
	bad_reply("OKAY 5\n");
	bad_reply("ok 5\n");
	bad_reply("\n");
	/* wrong as soon as it cannot become OK: no waiting for "\n" or the deadline */
	bad_reply("X");
	bad_reply("OKX");
	memset(longline, '7', sizeof(longline));
	memcpy(longline, "OK ", 3);
	longline[sizeof(longline) - 1] = '\0'; /* 99 bytes, no "\n": over the 64-byte cap */
	bad_reply(longline);
}
END_TEST

START_TEST(hybrid_reply_at_cap)
{
	char line[70];
	fake f;
	result r;

	/* 63 bytes + "\n" = 64: the longest reply taken */
	memset(line, '1', sizeof(line));
	memcpy(line, "OK ", 3);
	line[63] = '\n';
	memcpy(line + 64, "tail", 5);
	dial_fake(&f, 0, line, 7361, opts(2000, 5000), &r);
	ck_assert_int_eq(r.status, 0);
	expect_bytes(r.fd, "tail");
	close(r.fd);
	fake_stop(&f);
}
END_TEST

static void cancel_cb(uv_timer_t *t)
{
	gl_vsock_dial_cancel(t->data);
	uv_close((uv_handle_t *)t, NULL);
}

START_TEST(cancel_before_completion)
{
	char uds[128];
	fake f;
	result r = {0};
	gl_vsock_addr a;
	gl_vsock_dial_opts o = opts(2000, 5000);
	gl_vsock_dial *d;
	uv_timer_t t;
	int fds0 = count_fds();

	path_in_tmp(uds, sizeof(uds), "vm.sock");
	fake_start(&f, uds, 0, NULL); /* silent: the dial is in its handshake */
	a = hybrid(uds, 7361);
	ck_assert_int_eq(gl_vsock_dial_start(&loop, &a, &o, dial_cb, &r, &d), 0);
	uv_timer_init(&loop, &t);
	t.data = d;
	uv_timer_start(&t, cancel_cb, 100, 0);
	uv_run(&loop, UV_RUN_DEFAULT); /* returns once everything is closed */
	ck_assert_int_eq(r.calls, 0);
	ck_assert_int_eq(fake_accepts(&f), 1);

	/* cancelled right after start, before the first attempt */
	ck_assert_int_eq(gl_vsock_dial_start(&loop, &a, &o, dial_cb, &r, &d), 0);
	gl_vsock_dial_cancel(d);
	uv_run(&loop, UV_RUN_DEFAULT);
	ck_assert_int_eq(r.calls, 0);
	fake_stop(&f);
	ck_assert_int_eq(count_fds(), fds0); /* the dial's sockets are closed */
}
END_TEST

START_TEST(cancel_while_backing_off)
{
	char uds[128];
	result r = {0};
	gl_vsock_addr a;
	gl_vsock_dial_opts o = opts(2000, 5000);
	gl_vsock_dial *d;
	uv_timer_t t;

	o.backoff_ms = 1000;
	path_in_tmp(uds, sizeof(uds), "absent.sock");
	a = hybrid(uds, 7361);
	ck_assert_int_eq(gl_vsock_dial_start(&loop, &a, &o, dial_cb, &r, &d), 0);
	uv_timer_init(&loop, &t);
	t.data = d;
	uv_timer_start(&t, cancel_cb, 50, 0);
	uv_run(&loop, UV_RUN_DEFAULT);
	ck_assert_int_eq(r.calls, 0);
}
END_TEST

static void noop_accept(void *arg, int fd, uint32_t cid)
{
	close(fd);
}

static int dial_rc(const gl_vsock_addr *a, bool guest_role)
{
	gl_vsock_dial_opts o = opts(2000, 0);
	gl_vsock_dial *d = NULL;
	result r = {0};
	int rc;

	o.guest_role = guest_role;
	rc = gl_vsock_dial_start(&loop, a, &o, dial_cb, &r, &d);
	if (rc == 0)
		gl_vsock_dial_cancel(d);
	uv_run(&loop, UV_RUN_DEFAULT);
	ck_assert_int_eq(r.calls, 0);
	return rc;
}

START_TEST(refused_addresses)
{
	gl_vsock_addr a = {.kind = GL_VSOCK_CID, .port = 7361};
	int fds0 = count_fds();

	/* host role: cid 0, 1 and 2 (our own hypervisor here) are never dialed */
	for (uint32_t cid = 0; cid <= 2; cid++) {
		a.cid = cid;
		ck_assert_int_eq(dial_rc(&a, false), -EINVAL);
	}
	a.cid = 0xffffffffu; /* VMADDR_CID_ANY is no peer */
	ck_assert_int_eq(dial_rc(&a, false), -EINVAL);
	ck_assert_int_eq(dial_rc(&a, true), -EINVAL);
	ck_assert_int_eq(count_fds(), fds0); /* refused before any socket */

	a = (gl_vsock_addr){.kind = 9};
	ck_assert_int_eq(dial_rc(&a, false), -EINVAL);
	a = hybrid("", 7361);
	ck_assert_int_eq(dial_rc(&a, false), -EINVAL);
}
END_TEST

START_TEST(name_too_long)
{
	gl_vsock_addr a;
	gl_vsock_listener *l = NULL;
	char err[256];

	/* <uds> of 107 bytes fits sun_path for a dial, not with "_7362" */
	a = (gl_vsock_addr){.kind = GL_VSOCK_HYBRID, .port = 7362};
	memset(a.path, 'u', 107);
	memcpy(a.path, "/gl-no-such-dir/", 16);
	ck_assert_int_eq(gl_vsock_listen(&loop, &a, 0600, noop_accept, NULL, &l,
					 err, sizeof(err)),
			 -ENAMETOOLONG);
	ck_assert_ptr_null(l);
	ck_assert(strstr(err, "too long") != NULL);
	/* 102 + "_7362" = 107: fits (the directory does not exist: ENOENT, not the name) */
	a.path[102] = '\0';
	ck_assert_int_eq(gl_vsock_listen(&loop, &a, 0600, noop_accept, NULL, &l,
					 err, sizeof(err)),
			 -ENOENT);
	a.path[102] = 'u';
	a.path[103] = '\0'; /* 103 + 5 = 108: no room for the NUL */
	ck_assert_int_eq(gl_vsock_listen(&loop, &a, 0600, noop_accept, NULL, &l,
					 err, sizeof(err)),
			 -ENAMETOOLONG);
	/* all 108 bytes used, no terminator at all */
	memset(a.path, 'u', sizeof(a.path));
	ck_assert_int_eq(dial_rc(&a, false), -ENAMETOOLONG);
	/* guest-unix: DIR + "/host" must fit */
	a.kind = GL_VSOCK_GUEST_UNIX;
	memset(a.path, 'd', sizeof(a.path));
	a.path[103] = '\0';
	ck_assert_int_eq(dial_rc(&a, true), -ENAMETOOLONG);
	a.path[102] = '\0';
	ck_assert_int_eq(dial_rc(&a, true), 0);
	a.path[95] = '\0'; /* + "/listen-4294967295" = 113 */
	a.port = 4294967295u;
	ck_assert_int_eq(gl_vsock_listen(&loop, &a, 0600, noop_accept, NULL, &l,
					 err, sizeof(err)),
			 -ENAMETOOLONG);
}
END_TEST

/* ---- guest-unix dial ------------------------------------------------------------------ */

START_TEST(guest_unix_dial)
{
	char host[128];
	fake f;
	result r;
	gl_vsock_addr a = {.kind = GL_VSOCK_GUEST_UNIX, .cid = GL_VSOCK_CID_HOST,
			   .port = GL_VSOCK_DEVLXD_PORT};
	gl_vsock_dial_opts o = opts(2000, 0);
	uint64_t ms;

	snprintf(a.path, sizeof(a.path), "%s", tmp);
	path_in_tmp(host, sizeof(host), "host");

	/* no muxer: reported as it is */
	ms = dial_wait(&a, &o, &r);
	ck_assert_int_eq(r.status, -ENOENT);
	ck_assert_uint_lt(ms, 100);

	fake_start(&f, host, 1, "OK\nGET /1.0 HTTP/1.1\r\n");
	/* the muxer's EOF instead of OK: the RST a real guest would get */
	ms = dial_wait(&a, &o, &r);
	ck_assert_int_eq(r.status, -ECONNRESET);
	ck_assert_uint_lt(ms, 500);
	ck_assert_int_eq(memcmp(f.got, "CONNECT 7362\n", 13), 0);
	ck_assert_int_eq(__atomic_load_n(&f.gotn, __ATOMIC_SEQ_CST), 13);

	ms = dial_wait(&a, &o, &r);
	ck_assert_int_eq(r.status, 0);
	ck_assert_int_eq(fake_accepts(&f), 2);
	ck_assert_int_eq(__atomic_load_n(&f.gotn, __ATOMIC_SEQ_CST), 13);
	ck_assert_int_eq(memcmp(f.got, "CONNECT 7362\n", 13), 0);
	expect_bytes(r.fd, "GET /1.0 HTTP/1.1\r\n");
	close(r.fd);
	fake_stop(&f);
}
END_TEST

START_TEST(guest_unix_dial_retries_reset)
{
	char host[128];
	fake f;
	result r;
	gl_vsock_addr a = {.kind = GL_VSOCK_GUEST_UNIX, .cid = GL_VSOCK_CID_HOST, .port = 7362};
	gl_vsock_dial_opts o = opts(2000, 3000);

	o.guest_role = true;
	snprintf(a.path, sizeof(a.path), "%s", tmp);
	path_in_tmp(host, sizeof(host), "host");
	fake_start(&f, host, 3, "OK\n");
	dial_wait(&a, &o, &r);
	ck_assert_int_eq(r.status, 0);
	ck_assert_int_eq(fake_accepts(&f), 4);
	close(r.fd);
	fake_stop(&f);
}
END_TEST

/* ---- listening --------------------------------------------------------------------------- */

typedef struct accepted {
	int n;
	int fd[8];
	uint32_t cid[8];
	gl_vsock_listener *stop_in_cb;
} accepted;

static void accept_cb(void *arg, int fd, uint32_t cid)
{
	accepted *ac = arg;

	ck_assert_int_lt(ac->n, 8);
	ac->fd[ac->n] = fd;
	ac->cid[ac->n] = cid;
	ac->n++;
	if (ac->stop_in_cb) {
		gl_vsock_listen_stop(ac->stop_in_cb);
		ac->stop_in_cb = NULL;
	}
}

static void wait_accepts(accepted *ac, int n)
{
	uint64_t t0 = now_ms();

	while (ac->n < n) {
		ck_assert_uint_lt(now_ms() - t0, 2000);
		uv_run(&loop, UV_RUN_NOWAIT);
		usleep(1000);
	}
}

/* A listener answers: accept gives a non-blocking fd carrying the bytes. */
static void check_listener(gl_vsock_listener *l, accepted *ac, const char *path)
{
	int c = unix_connect(path);
	int i = ac->n;

	ck_assert_int_ge(c, 0);
	ck_assert_int_eq(write(c, "ping", 4), 4);
	wait_accepts(ac, i + 1);
	ck_assert_uint_eq(ac->cid[i], 0);
	ck_assert(fcntl(ac->fd[i], F_GETFL) & O_NONBLOCK);
	expect_bytes(ac->fd[i], "ping");
	ck_assert_int_eq(write(ac->fd[i], "pong", 4), 4);
	{
		char b[8];

		ck_assert_int_eq(read(c, b, sizeof(b)), 4);
		ck_assert_int_eq(memcmp(b, "pong", 4), 0);
	}
	close(ac->fd[i]);
	close(c);
}

START_TEST(listen_guest_unix)
{
	gl_vsock_addr a = {.kind = GL_VSOCK_GUEST_UNIX, .port = GL_VSOCK_AGENT_PORT};
	gl_vsock_listener *l = NULL;
	accepted ac = {0};
	char err[256], want[160];
	struct stat st;

	snprintf(a.path, sizeof(a.path), "%s", tmp);
	snprintf(want, sizeof(want), "%s/listen-7361", tmp);
	ck_assert_int_eq(gl_vsock_listen(&loop, &a, 0600, accept_cb, &ac, &l, err, sizeof(err)), 0);
	ck_assert_str_eq(gl_vsock_listen_path(l), want);
	ck_assert_int_eq(stat(want, &st), 0);
	ck_assert(S_ISSOCK(st.st_mode));
	ck_assert_uint_eq(st.st_mode & 07777, 0600);
	check_listener(l, &ac, want);
	check_listener(l, &ac, want);
	gl_vsock_listen_stop(l);
	ck_assert_int_eq(access(want, F_OK), -1); /* removed by stop */
	ck_assert_int_eq(errno, ENOENT);

	/* another mode, and stop from inside the accept callback */
	ck_assert_int_eq(gl_vsock_listen(&loop, &a, 0660, accept_cb, &ac, &l, err, sizeof(err)), 0);
	ck_assert_int_eq(stat(want, &st), 0);
	ck_assert_uint_eq(st.st_mode & 07777, 0660);
	ac.stop_in_cb = l;
	{
		int c1 = unix_connect(want), c2 = unix_connect(want);

		ck_assert_int_ge(c1, 0);
		ck_assert_int_ge(c2, 0);
		wait_accepts(&ac, 3);
		uv_run(&loop, UV_RUN_DEFAULT);
		ck_assert_int_eq(ac.n, 3); /* nothing accepted after stop */
		close(ac.fd[2]);
		close(c1);
		close(c2);
	}
	ck_assert_int_eq(access(want, F_OK), -1);
}
END_TEST

START_TEST(listen_hybrid)
{
	char uds[128], want[160], err[256];
	gl_vsock_addr a;
	gl_vsock_listener *l = NULL;
	accepted ac = {0};

	path_in_tmp(uds, sizeof(uds), "vm.sock");
	snprintf(want, sizeof(want), "%s_7362", uds);
	a = hybrid(uds, GL_VSOCK_DEVLXD_PORT);
	ck_assert_int_eq(gl_vsock_listen(&loop, &a, 0600, accept_cb, &ac, &l, err, sizeof(err)), 0);
	ck_assert_str_eq(gl_vsock_listen_path(l), want);
	ck_assert_int_eq(access(uds, F_OK), -1); /* the VMM's own <uds> is not ours */
	check_listener(l, &ac, want);
	gl_vsock_listen_stop(l);
	ck_assert_int_eq(access(want, F_OK), -1);
}
END_TEST

START_TEST(listen_replaces_stale)
{
	char want[160], err[256];
	gl_vsock_addr a = {.kind = GL_VSOCK_GUEST_UNIX, .port = 7361};
	gl_vsock_listener *l = NULL;
	accepted ac = {0};
	struct stat before, after;

	snprintf(a.path, sizeof(a.path), "%s", tmp);
	snprintf(want, sizeof(want), "%s/listen-7361", tmp);
	close(unix_listener(want)); /* a previous run's socket file */
	ck_assert_int_eq(stat(want, &before), 0);
	ck_assert(S_ISSOCK(before.st_mode));
	ck_assert_int_eq(unix_connect(want), -ECONNREFUSED);
	ck_assert_int_eq(gl_vsock_listen(&loop, &a, 0600, accept_cb, &ac, &l, err, sizeof(err)), 0);
	ck_assert_int_eq(stat(want, &after), 0);
	ck_assert_uint_eq(after.st_mode & 07777, 0600);
	check_listener(l, &ac, want);

	/* stop leaves a file that is no longer ours alone */
	ck_assert_int_eq(unlink(want), 0);
	close(unix_listener(want));
	gl_vsock_listen_stop(l);
	ck_assert_int_eq(access(want, F_OK), 0);
}
END_TEST

START_TEST(listen_refuses_live_and_non_socket)
{
	char want[160], err[256];
	gl_vsock_addr a = {.kind = GL_VSOCK_GUEST_UNIX, .port = 7361};
	gl_vsock_listener *l = NULL;
	accepted ac = {0};
	int live, c, fd;

	snprintf(a.path, sizeof(a.path), "%s", tmp);
	snprintf(want, sizeof(want), "%s/listen-7361", tmp);
	live = unix_listener(want);
	err[0] = '\0';
	ck_assert_int_eq(gl_vsock_listen(&loop, &a, 0600, accept_cb, &ac, &l, err, sizeof(err)),
			 -EADDRINUSE);
	ck_assert_ptr_null(l);
	ck_assert(strstr(err, want) != NULL);
	/* the live one still answers */
	c = unix_connect(want);
	ck_assert_int_ge(c, 0);
	close(c);
	close(live);
	unlink(want);

	fd = open(want, O_CREAT | O_WRONLY, 0644);
	ck_assert_int_ge(fd, 0);
	ck_assert_int_eq(write(fd, "keep", 4), 4);
	close(fd);
	ck_assert_int_eq(gl_vsock_listen(&loop, &a, 0600, accept_cb, &ac, &l, err, sizeof(err)),
			 -EEXIST);
	ck_assert(strstr(err, "not a socket") != NULL);
	{
		struct stat st;

		ck_assert_int_eq(stat(want, &st), 0);
		ck_assert(S_ISREG(st.st_mode));
		ck_assert_int_eq(st.st_size, 4);
	}
}
END_TEST

START_TEST(listen_af_vsock)
{
	/* listening only: binding VMADDR_CID_ANY connects to nobody */
	gl_vsock_addr a = {.kind = GL_VSOCK_CID, .cid = 0xffffffffu, .port = 47361};
	gl_vsock_listener *l = NULL;
	accepted ac = {0};
	char err[256] = "";
	int rc, fds0 = count_fds();

	rc = gl_vsock_listen(&loop, &a, 0600, accept_cb, &ac, &l, err, sizeof(err));
	if (rc == 0) {
		ck_assert_str_eq(gl_vsock_listen_path(l), "");
		gl_vsock_listen_stop(l);
		uv_run(&loop, UV_RUN_DEFAULT);
	} else {
		/* no vsock transport here: a clean failure, said in err */
		ck_assert_int_lt(rc, 0);
		ck_assert_ptr_null(l);
		ck_assert(err[0] != '\0');
		fprintf(stderr, "listen_af_vsock: %s (%d)\n", err, rc);
	}
	ck_assert_int_eq(count_fds(), fds0);
	ck_assert_int_eq(ac.n, 0);
}
END_TEST

static Suite *vsock_suite(void)
{
	Suite *s = suite_create("vsock");
	TCase *tc = tcase_create("vsock");

	tcase_add_checked_fixture(tc, setup, teardown);
	tcase_add_test(tc, parse_connect_table);
	tcase_add_test(tc, parse_ok_table);
	tcase_add_test(tc, transport_and_str);
	tcase_add_test(tc, hybrid_ok_leaves_guest_bytes);
	tcase_add_test(tc, hybrid_eof_then_ok);
	tcase_add_test(tc, hybrid_eof_until_deadline);
	tcase_add_test(tc, hybrid_silent_attempt_timeout);
	tcase_add_test(tc, hybrid_silent_retried_to_deadline);
	tcase_add_test(tc, hybrid_missing_uds);
	tcase_add_test(tc, hybrid_stale_uds);
	tcase_add_test(tc, hybrid_vmm_comes_up_later);
	tcase_add_test(tc, hybrid_reply_without_ok);
	tcase_add_test(tc, hybrid_reply_at_cap);
	tcase_add_test(tc, cancel_before_completion);
	tcase_add_test(tc, cancel_while_backing_off);
	tcase_add_test(tc, refused_addresses);
	tcase_add_test(tc, name_too_long);
	tcase_add_test(tc, guest_unix_dial);
	tcase_add_test(tc, guest_unix_dial_retries_reset);
	tcase_add_test(tc, listen_guest_unix);
	tcase_add_test(tc, listen_hybrid);
	tcase_add_test(tc, listen_replaces_stale);
	tcase_add_test(tc, listen_refuses_live_and_non_socket);
	tcase_add_test(tc, listen_af_vsock);
	suite_add_tcase(s, tc);
	return s;
}

UNIT_MAIN(vsock_suite)
