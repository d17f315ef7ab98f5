/* Vsock transports (see vsock.h; the facts are in specs/vsock.md §1-§4). */
#include "bridge/vsock.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>
#include <linux/vm_sockets.h>

#define CONNECT_MIN 10 /* "connect 0\n": Firecracker's first read_exact */
#define CONNECT_MAX 32 /* Firecracker's CONNECT buffer */
#define REPLY_MAX 64   /* our cap on the reply line, "\n" included */
#define LISTEN_BACKLOG 1024
#define ACCEPT_BUDGET 64     /* accepts per wake-up, so a flood cannot starve the loop */
#define ACCEPT_PAUSE_MS 100  /* out of fds: stop accepting for this long */
#define SUN_PATH_MAX sizeof(((struct sockaddr_un *)0)->sun_path)

/* ---- pure helpers ------------------------------------------------------------ */

int gl_vsock_parse_transport(const char *s, gl_vsock_addr *out)
{
	size_t n;

	if (!s || !out)
		return -EINVAL;
	memset(out, 0, sizeof(*out));
	if (strcmp(s, "vsock") == 0) {
		out->kind = GL_VSOCK_CID;
		return 0;
	}
	if (strncmp(s, "unix:", 5) != 0)
		return -EINVAL;
	s += 5;
	n = strlen(s);
	if (n == 0 || n >= sizeof(out->path))
		return -EINVAL;
	memcpy(out->path, s, n + 1);
	out->kind = GL_VSOCK_GUEST_UNIX;
	return 0;
}

const char *gl_vsock_addr_str(const gl_vsock_addr *a, char *buf, size_t len)
{
	int plen;

	if (!buf || len == 0)
		return "";
	if (!a) {
		snprintf(buf, len, "(no address)");
		return buf;
	}
	plen = (int)strnlen(a->path, sizeof(a->path));
	switch (a->kind) {
	case GL_VSOCK_CID:
		snprintf(buf, len, "cid %u port %u", a->cid, a->port);
		break;
	case GL_VSOCK_HYBRID:
		snprintf(buf, len, "%.*s port %u", plen, a->path, a->port);
		break;
	case GL_VSOCK_GUEST_UNIX:
		snprintf(buf, len, "unix:%.*s port %u", plen, a->path, a->port);
		break;
	default:
		snprintf(buf, len, "(bad vsock address kind %d)", (int)a->kind);
		break;
	}
	return buf;
}

/* One code point at p[0..n): its length in bytes, or 0 where Rust's
 * str::from_utf8 (what Firecracker applies) would refuse the bytes:
 * overlong forms, surrogates, past U+10FFFF, truncated sequences. */
static size_t utf8_next(const unsigned char *p, size_t n, uint32_t *cp)
{
	uint32_t c = p[0], min;
	size_t len, i;

	if (c < 0x80) {
		*cp = c;
		return 1;
	}
	if (c >= 0xc2 && c <= 0xdf) {
		len = 2;
		c &= 0x1f;
		min = 0x80;
	} else if (c >= 0xe0 && c <= 0xef) {
		len = 3;
		c &= 0x0f;
		min = 0x800;
	} else if (c >= 0xf0 && c <= 0xf4) {
		len = 4;
		c &= 0x07;
		min = 0x10000;
	} else {
		return 0;
	}
	if (len > n)
		return 0;
	for (i = 1; i < len; i++) {
		if ((p[i] & 0xc0) != 0x80)
			return 0;
		c = (c << 6) | (p[i] & 0x3f);
	}
	if (c < min || c > 0x10ffff || (c >= 0xd800 && c <= 0xdfff))
		return 0;
	*cp = c;
	return len;
}

/* Unicode White_Space, which is what Rust's split_whitespace splits on
 * (vertical tab and NBSP included, unlike isspace()). */
static bool is_white(uint32_t c)
{
	return (c >= 0x09 && c <= 0x0d) || c == 0x20 || c == 0x85 || c == 0xa0 ||
	       c == 0x1680 || (c >= 0x2000 && c <= 0x200a) || c == 0x2028 || c == 0x2029 ||
	       c == 0x202f || c == 0x205f || c == 0x3000;
}

/* u32::from_str: an optional '+', then ASCII digits only, no overflow. */
static int parse_u32(const char *p, size_t n, uint32_t *out)
{
	uint64_t v = 0;
	size_t i = 0;

	if (n > 0 && p[0] == '+')
		i = 1;
	if (i == n)
		return -EINVAL;
	for (; i < n; i++) {
		if (p[i] < '0' || p[i] > '9')
			return -EINVAL;
		v = v * 10 + (uint64_t)(p[i] - '0');
		if (v > UINT32_MAX)
			return -EINVAL;
	}
	*out = (uint32_t)v;
	return 0;
}

int gl_vsock_parse_connect(const char *p, size_t n, uint32_t *port)
{
	const unsigned char *u = (const unsigned char *)p;
	size_t i, len, ws[2] = {0, 0}, we[2] = {0, 0};
	int words = 0;
	bool in_word = false;
	uint32_t cp;

	if (!p || !port || n < CONNECT_MIN || n > CONNECT_MAX)
		return -EINVAL;
	/* Only what Firecracker's reader can produce: it stops at the first
	 * "\n" from byte 10 on, or at 32 bytes. Anything else was not read
	 * that way (a short read, for one) and fails as it would there. */
	if (n < CONNECT_MAX && p[n - 1] != '\n')
		return -EINVAL;
	for (i = CONNECT_MIN - 1; i + 1 < n; i++)
		if (p[i] == '\n')
			return -EINVAL;

	for (i = 0; i < n; i += len) {
		len = utf8_next(u + i, n - i, &cp);
		if (len == 0)
			return -EINVAL;
		if (is_white(cp)) {
			if (in_word && words <= 2)
				we[words - 1] = i;
			in_word = false;
			continue;
		}
		if (!in_word) {
			in_word = true;
			words++;
			if (words <= 2)
				ws[words - 1] = i;
		}
	}
	if (in_word && words <= 2)
		we[words - 1] = n;
	if (words < 2)
		return -EINVAL;
	if (we[0] - ws[0] != 7 || strncasecmp(p + ws[0], "connect", 7) != 0)
		return -EINVAL;
	return parse_u32(p + ws[1], we[1] - ws[1], port);
}

int gl_vsock_parse_ok(const char *p, size_t n)
{
	if (!p || n < 2 || p[0] != 'O' || p[1] != 'K')
		return -EPROTO;
	if (n == 2 || p[2] == ' ')
		return 0;
	return -EPROTO;
}

/* Could `p` (n bytes, no "\n" yet) still become a line gl_vsock_parse_ok
 * accepts? Lets a wrong reply fail at once instead of at the deadline. */
static bool ok_prefix(const char *p, size_t n)
{
	return (n < 1 || p[0] == 'O') && (n < 2 || p[1] == 'K') && (n < 3 || p[2] == ' ');
}

/* The Unix socket path for `a`: dialing (HYBRID <uds>, GUEST_UNIX DIR/host)
 * or listening (<uds>_<port>, DIR/listen-<port>). */
static int unix_path(const gl_vsock_addr *a, bool listening, char *out)
{
	size_t plen = strnlen(a->path, sizeof(a->path));
	int n;

	if (plen == sizeof(a->path))
		return -ENAMETOOLONG;
	if (plen == 0)
		return -EINVAL;
	if (a->kind == GL_VSOCK_HYBRID && listening)
		n = snprintf(out, SUN_PATH_MAX, "%s_%u", a->path, a->port);
	else if (a->kind == GL_VSOCK_HYBRID)
		n = snprintf(out, SUN_PATH_MAX, "%s", a->path);
	else if (listening)
		n = snprintf(out, SUN_PATH_MAX, "%s/listen-%u", a->path, a->port);
	else
		n = snprintf(out, SUN_PATH_MAX, "%s/host", a->path);
	if (n < 0)
		return -EINVAL;
	if ((size_t)n >= SUN_PATH_MAX)
		return -ENAMETOOLONG;
	return 0;
}

static void sun_fill(struct sockaddr_un *sa, const char *path)
{
	memset(sa, 0, sizeof(*sa));
	sa->sun_family = AF_UNIX;
	memcpy(sa->sun_path, path, strlen(path) + 1);
}

static void svm_fill(struct sockaddr_vm *sa, uint32_t cid, uint32_t port)
{
	memset(sa, 0, sizeof(*sa));
	sa->svm_family = AF_VSOCK;
	sa->svm_cid = cid;
	sa->svm_port = port;
}

/* ---- dialing ------------------------------------------------------------------ */

enum dial_state {
	D_WAIT,       /* timer armed: start the next attempt when it fires */
	D_LAST,       /* timer armed at the deadline: then report last_err */
	D_CONNECTING, /* connect() in progress; timer = the attempt's deadline */
	D_HANDSHAKE,  /* CONNECT line sent, reading the reply; same timer */
	D_DONE,       /* callback ran or cancelled; waiting for handles to close */
};

/* The poll handle of one attempt: each attempt has its own fd, and a
 * uv_poll_t cannot be re-initialised before its close callback. */
typedef struct dial_poll {
	uv_poll_t h;
	gl_vsock_dial *d;
} dial_poll;

struct gl_vsock_dial {
	uv_loop_t *loop;
	gl_vsock_addr to;
	gl_vsock_dial_opts o;
	gl_vsock_dial_cb cb;
	void *arg;
	uv_timer_t timer;
	dial_poll *poll;
	int fd;
	enum dial_state state;
	int handles; /* open uv handles; d is freed when DONE and 0 */
	int last_err;
	uint64_t end; /* overall deadline (loop time, ms); UINT64_MAX: one attempt */
	uint64_t backoff;
	size_t rlen;
	char reply[REPLY_MAX];
	char sun[SUN_PATH_MAX];
};

void gl_vsock_dial_opts_default(gl_vsock_dial_opts *o)
{
	memset(o, 0, sizeof(*o));
	o->attempt_ms = 2000;
	o->deadline_ms = 10000;
	o->backoff_ms = 25;
	o->backoff_max_ms = 1000;
}

static uint64_t loop_now(uv_loop_t *loop)
{
	uv_update_time(loop);
	return uv_now(loop);
}

/* Refusals that mean "not up yet": the VMM, the guest's driver or the
 * listener may still appear before the deadline. */
static bool retryable(int err)
{
	switch (err) {
	case -ECONNRESET:
	case -ECONNREFUSED:
	case -ENOENT:
	case -ETIMEDOUT:
	case -EAGAIN:
	case -EPIPE:
	case -EHOSTUNREACH:
	case -EINTR:
		return true;
	default:
		return false;
	}
}

static void dial_maybe_free(gl_vsock_dial *d)
{
	if (d->state == D_DONE && d->handles == 0)
		free(d);
}

static void dial_handle_closed(uv_handle_t *h)
{
	gl_vsock_dial *d;

	if (h->type == UV_POLL) {
		dial_poll *p = h->data;

		d = p->d;
		free(p);
	} else {
		d = h->data;
	}
	d->handles--;
	dial_maybe_free(d);
}

/* End the current attempt: stop its deadline, drop its poll handle and,
 * unless the fd is being handed over, close it. */
static void drop_attempt(gl_vsock_dial *d, bool keep_fd)
{
	uv_timer_stop(&d->timer);
	if (d->poll) {
		uv_close((uv_handle_t *)&d->poll->h, dial_handle_closed);
		d->poll = NULL;
	}
	if (d->fd >= 0 && !keep_fd)
		close(d->fd);
	d->fd = -1;
	d->rlen = 0;
}

static void dial_finish(gl_vsock_dial *d, int status)
{
	int fd = status == 0 ? d->fd : -1;

	drop_attempt(d, status == 0);
	d->state = D_DONE;
	uv_close((uv_handle_t *)&d->timer, dial_handle_closed);
	/* d stays allocated until the close callbacks: cancel inside cb is a no-op */
	d->cb(d->arg, status, fd);
}

static void dial_timer_cb(uv_timer_t *t);

static void attempt_fail(gl_vsock_dial *d, int err)
{
	uint64_t now, delay;

	drop_attempt(d, false);
	if (!retryable(err) || d->end == UINT64_MAX) {
		dial_finish(d, err);
		return;
	}
	now = loop_now(d->loop);
	if (now >= d->end) {
		dial_finish(d, err);
		return;
	}
	delay = d->backoff;
	d->backoff = d->backoff * 2 > d->o.backoff_max_ms ? d->o.backoff_max_ms : d->backoff * 2;
	d->state = D_WAIT;
	if (delay >= d->end - now) {
		/* no attempt would start in time: the verdict comes at the deadline */
		delay = d->end - now;
		d->state = D_LAST;
		d->last_err = err;
	}
	uv_timer_start(&d->timer, dial_timer_cb, delay, 0);
}

static void dial_poll_cb(uv_poll_t *h, int status, int events);

static int poll_start(gl_vsock_dial *d, int events)
{
	int rc;

	if (!d->poll) {
		dial_poll *p = calloc(1, sizeof(*p));

		if (!p)
			return -ENOMEM;
		rc = uv_poll_init_socket(d->loop, &p->h, d->fd);
		if (rc < 0) {
			free(p);
			return rc;
		}
		p->d = d;
		p->h.data = p;
		d->poll = p;
		d->handles++;
	}
	return uv_poll_start(&d->poll->h, events, dial_poll_cb);
}

/* The stream is connected: AF_VSOCK is done; the Unix transports send the
 * CONNECT line, whole, in one write (Firecracker fails a line that arrives
 * in pieces, specs/vsock.md §1.2). */
static void connected(gl_vsock_dial *d)
{
	char line[32];
	ssize_t w;
	int n, rc;

	if (d->to.kind == GL_VSOCK_CID) {
		dial_finish(d, 0);
		return;
	}
	n = snprintf(line, sizeof(line), "CONNECT %u\n", d->to.port);
	do
		w = send(d->fd, line, (size_t)n, MSG_NOSIGNAL);
	while (w < 0 && errno == EINTR);
	if (w != n) {
		attempt_fail(d, w < 0 ? -errno : -EIO);
		return;
	}
	d->state = D_HANDSHAKE;
	d->rlen = 0;
	rc = poll_start(d, UV_READABLE);
	if (rc < 0)
		attempt_fail(d, rc);
}

/* Byte by byte up to "\n": the guest may speak right after OK, in the same
 * segment, and its bytes belong to whoever gets the fd. */
static void read_reply(gl_vsock_dial *d)
{
	ssize_t r;
	char c;

	for (;;) {
		r = recv(d->fd, &c, 1, 0);
		if (r < 0 && errno == EINTR)
			continue;
		if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
			return;
		if (r < 0) {
			attempt_fail(d, -errno);
			return;
		}
		if (r == 0) {
			/* EOF with no line: nobody listens on that port (yet) */
			attempt_fail(d, -ECONNRESET);
			return;
		}
		if (c == '\n') {
			if (gl_vsock_parse_ok(d->reply, d->rlen) == 0)
				dial_finish(d, 0);
			else
				dial_finish(d, -EPROTO);
			return;
		}
		if (d->rlen == REPLY_MAX - 1) {
			dial_finish(d, -EPROTO);
			return;
		}
		d->reply[d->rlen++] = c;
		if (!ok_prefix(d->reply, d->rlen)) {
			dial_finish(d, -EPROTO);
			return;
		}
	}
}

static void dial_poll_cb(uv_poll_t *h, int status, int events)
{
	gl_vsock_dial *d = ((dial_poll *)h->data)->d;
	socklen_t sl = sizeof(int);
	int err = 0;

	if (d->state == D_DONE || !d->poll || h != &d->poll->h)
		return;
	if (status < 0) {
		attempt_fail(d, status);
		return;
	}
	if (d->state == D_CONNECTING) {
		if (getsockopt(d->fd, SOL_SOCKET, SO_ERROR, &err, &sl) < 0)
			err = errno;
		if (err == EINPROGRESS)
			return;
		if (err) {
			attempt_fail(d, -err);
			return;
		}
		connected(d);
		return;
	}
	if (d->state == D_HANDSHAKE)
		read_reply(d);
}

static void attempt(gl_vsock_dial *d)
{
	struct sockaddr_un sun;
	struct sockaddr_vm svm;
	struct sockaddr *sa;
	socklen_t salen;
	uint64_t now, limit;
	int rc, family;

	now = loop_now(d->loop);
	limit = d->o.attempt_ms;
	if (d->end != UINT64_MAX) {
		uint64_t rem = d->end > now ? d->end - now : 0;

		if (rem < limit)
			limit = rem;
	}
	d->state = D_CONNECTING;
	uv_timer_start(&d->timer, dial_timer_cb, limit, 0);

	if (d->to.kind == GL_VSOCK_CID) {
		family = AF_VSOCK;
		svm_fill(&svm, d->to.cid, d->to.port);
		sa = (struct sockaddr *)&svm;
		salen = sizeof(svm);
	} else {
		family = AF_UNIX;
		sun_fill(&sun, d->sun);
		sa = (struct sockaddr *)&sun;
		salen = sizeof(sun);
	}
	d->fd = socket(family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (d->fd < 0) {
		attempt_fail(d, -errno);
		return;
	}
	do
		rc = connect(d->fd, sa, salen);
	while (rc < 0 && errno == EINTR);
	if (rc == 0) {
		connected(d);
		return;
	}
	if (errno != EINPROGRESS) {
		attempt_fail(d, -errno);
		return;
	}
	rc = poll_start(d, UV_WRITABLE);
	if (rc < 0)
		attempt_fail(d, rc);
}

static void dial_timer_cb(uv_timer_t *t)
{
	gl_vsock_dial *d = t->data;

	switch (d->state) {
	case D_WAIT:
		attempt(d);
		break;
	case D_LAST:
		dial_finish(d, d->last_err);
		break;
	case D_CONNECTING:
	case D_HANDSHAKE:
		attempt_fail(d, -ETIMEDOUT);
		break;
	case D_DONE:
		break;
	}
}

int gl_vsock_dial_start(uv_loop_t *loop, const gl_vsock_addr *to, const gl_vsock_dial_opts *o,
			gl_vsock_dial_cb cb, void *arg, gl_vsock_dial **out)
{
	gl_vsock_dial *d;
	char sun[SUN_PATH_MAX] = "";
	int rc;

	if (!loop || !to || !cb)
		return -EINVAL;
	switch (to->kind) {
	case GL_VSOCK_CID:
		/* on a machine that is itself a VM, cid 2 is its hypervisor */
		if (to->cid <= GL_VSOCK_CID_HOST && !(o && o->guest_role))
			return -EINVAL;
		if (to->cid == VMADDR_CID_ANY)
			return -EINVAL;
		break;
	case GL_VSOCK_HYBRID:
	case GL_VSOCK_GUEST_UNIX:
		rc = unix_path(to, false, sun);
		if (rc < 0)
			return rc;
		break;
	default:
		return -EINVAL;
	}

	d = calloc(1, sizeof(*d));
	if (!d)
		return -ENOMEM;
	d->loop = loop;
	d->to = *to;
	if (o)
		d->o = *o;
	else
		gl_vsock_dial_opts_default(&d->o);
	if (!d->o.attempt_ms)
		d->o.attempt_ms = 2000;
	if (!d->o.backoff_ms)
		d->o.backoff_ms = 25;
	if (!d->o.backoff_max_ms)
		d->o.backoff_max_ms = 1000;
	if (d->o.backoff_max_ms < d->o.backoff_ms)
		d->o.backoff_max_ms = d->o.backoff_ms;
	d->cb = cb;
	d->arg = arg;
	d->fd = -1;
	d->backoff = d->o.backoff_ms;
	memcpy(d->sun, sun, sizeof(sun));
	d->end = d->o.deadline_ms ? loop_now(loop) + d->o.deadline_ms : UINT64_MAX;

	uv_timer_init(loop, &d->timer);
	d->timer.data = d;
	d->handles = 1;
	/* the first attempt runs from the loop, so no callback can run in here */
	d->state = D_WAIT;
	uv_timer_start(&d->timer, dial_timer_cb, 0, 0);
	if (out)
		*out = d;
	return 0;
}

void gl_vsock_dial_cancel(gl_vsock_dial *d)
{
	if (!d || d->state == D_DONE)
		return;
	drop_attempt(d, false);
	d->state = D_DONE;
	uv_close((uv_handle_t *)&d->timer, dial_handle_closed);
}

/* ---- listening ---------------------------------------------------------------- */

struct gl_vsock_listener {
	uv_loop_t *loop;
	uv_poll_t poll;
	uv_timer_t pause; /* accept paused while out of fds */
	int fd;
	int handles;
	bool stopping;
	gl_vsock_kind kind;
	gl_vsock_accept_cb cb;
	void *arg;
	dev_t dev; /* our socket file, so that stop never removes someone else's */
	ino_t ino;
	char path[SUN_PATH_MAX];
};

static void listen_closed(uv_handle_t *h)
{
	gl_vsock_listener *l = h->data;

	if (--l->handles > 0)
		return;
	if (l->fd >= 0)
		close(l->fd);
	free(l);
}

static void listen_poll_cb(uv_poll_t *h, int status, int events);

static void pause_cb(uv_timer_t *t)
{
	gl_vsock_listener *l = t->data;

	if (!l->stopping)
		uv_poll_start(&l->poll, UV_READABLE, listen_poll_cb);
}

static void listen_poll_cb(uv_poll_t *h, int status, int events)
{
	gl_vsock_listener *l = h->data;
	struct sockaddr_storage ss;
	socklen_t sl;
	uint32_t cid;
	int fd, i;

	for (i = 0; i < ACCEPT_BUDGET && !l->stopping; i++) {
		sl = sizeof(ss);
		memset(&ss, 0, sizeof(ss));
		fd = accept4(l->fd, (struct sockaddr *)&ss, &sl, SOCK_NONBLOCK | SOCK_CLOEXEC);
		if (fd < 0) {
			if (errno == EINTR || errno == ECONNABORTED)
				continue;
			if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS ||
			    errno == ENOMEM) {
				/* level-triggered: without a pause this would spin */
				uv_poll_stop(&l->poll);
				uv_timer_start(&l->pause, pause_cb, ACCEPT_PAUSE_MS, 0);
			}
			return;
		}
		cid = 0;
		if (l->kind == GL_VSOCK_CID && ss.ss_family == AF_VSOCK)
			cid = ((struct sockaddr_vm *)&ss)->svm_cid;
		l->cb(l->arg, fd, cid);
	}
}

/* Make room for a Unix listener at `path`: nothing there, or a socket file
 * nobody answers on (a previous run's) which is removed. A live listener
 * or anything that is not a socket is left alone. */
static int clear_stale(const char *path, char *err, size_t errlen)
{
	struct sockaddr_un sun;
	struct stat st;
	int fd, rc;

	if (lstat(path, &st) < 0) {
		if (errno == ENOENT)
			return 0;
		rc = -errno;
		snprintf(err, errlen, "%s: %s", path, strerror(-rc));
		return rc;
	}
	if (!S_ISSOCK(st.st_mode)) {
		snprintf(err, errlen, "%s exists and is not a socket", path);
		return -EEXIST;
	}
	fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (fd < 0) {
		rc = -errno;
		snprintf(err, errlen, "socket: %s", strerror(-rc));
		return rc;
	}
	sun_fill(&sun, path);
	rc = connect(fd, (struct sockaddr *)&sun, sizeof(sun));
	/* EAGAIN: a full backlog, so someone is listening */
	if (rc == 0 || errno == EAGAIN) {
		close(fd);
		snprintf(err, errlen, "%s: another process is listening there", path);
		return -EADDRINUSE;
	}
	rc = -errno;
	close(fd);
	if (rc != -ECONNREFUSED && rc != -ENOENT) {
		snprintf(err, errlen, "%s: %s", path, strerror(-rc));
		return rc;
	}
	if (unlink(path) < 0 && errno != ENOENT) {
		rc = -errno;
		snprintf(err, errlen, "cannot remove stale %s: %s", path, strerror(-rc));
		return rc;
	}
	return 0;
}

/* "<dir>/.gl-<pid>-<n>" beside `path`, or "" when it would not fit
 * sun_path (the socket is then bound at its final name directly). */
static void tmp_path(const char *path, char *out, size_t outlen)
{
	static unsigned n;
	const char *slash = strrchr(path, '/');
	int dlen = slash ? (int)(slash - path) : 0;
	int len;

	len = snprintf(out, outlen, "%.*s%s.gl-%ld-%u", dlen, path, slash ? "/" : "", (long)getpid(),
		       n++);
	if (len < 0 || (size_t)len >= outlen || (size_t)len >= sizeof(((struct sockaddr_un *)0)->sun_path))
		out[0] = '\0';
}

static int listen_unix(gl_vsock_listener *l, unsigned mode, char *err, size_t errlen)
{
	struct sockaddr_un sun;
	struct stat st;
	char tmp[sizeof(sun.sun_path)];
	const char *bound;
	int rc;

	rc = clear_stale(l->path, err, errlen);
	if (rc < 0)
		return rc;
	l->fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (l->fd < 0) {
		rc = -errno;
		snprintf(err, errlen, "socket: %s", strerror(-rc));
		return rc;
	}
	/* Bind under a temporary name in the same directory, set the mode,
	 * listen, and only then rename it into place: a client never finds the
	 * socket file before it accepts connections (a connect() between
	 * bind() and listen() would be refused). */
	tmp_path(l->path, tmp, sizeof(tmp));
	bound = tmp[0] ? tmp : l->path;
	sun_fill(&sun, bound);
	if (bind(l->fd, (struct sockaddr *)&sun, sizeof(sun)) < 0) {
		rc = -errno;
		snprintf(err, errlen, "bind %s: %s", bound, strerror(-rc));
		goto err_close;
	}
	if (chmod(bound, mode & 07777) < 0 || stat(bound, &st) < 0) {
		rc = -errno;
		snprintf(err, errlen, "chmod %s: %s", bound, strerror(-rc));
		goto err_unlink;
	}
	l->dev = st.st_dev;
	l->ino = st.st_ino;
	if (listen(l->fd, LISTEN_BACKLOG) < 0) {
		rc = -errno;
		snprintf(err, errlen, "listen %s: %s", l->path, strerror(-rc));
		goto err_unlink;
	}
	if (bound == tmp && rename(tmp, l->path) < 0) {
		rc = -errno;
		snprintf(err, errlen, "rename to %s: %s", l->path, strerror(-rc));
		goto err_unlink;
	}
	return 0;

err_unlink:
	unlink(bound);
err_close:
	close(l->fd);
	l->fd = -1;
	return rc;
}

static int listen_vsock(gl_vsock_listener *l, uint32_t port, char *err, size_t errlen)
{
	struct sockaddr_vm svm;
	int rc;

	l->fd = socket(AF_VSOCK, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (l->fd < 0) {
		rc = -errno;
		snprintf(err, errlen, "AF_VSOCK socket: %s", strerror(-rc));
		return rc;
	}
	svm_fill(&svm, VMADDR_CID_ANY, port);
	if (bind(l->fd, (struct sockaddr *)&svm, sizeof(svm)) < 0) {
		rc = -errno;
		snprintf(err, errlen, "bind vsock port %u: %s", port, strerror(-rc));
		goto err_close;
	}
	if (listen(l->fd, LISTEN_BACKLOG) < 0) {
		rc = -errno;
		snprintf(err, errlen, "listen vsock port %u: %s", port, strerror(-rc));
		goto err_close;
	}
	return 0;

err_close:
	close(l->fd);
	l->fd = -1;
	return rc;
}

int gl_vsock_listen(uv_loop_t *loop, const gl_vsock_addr *at, unsigned mode,
		    gl_vsock_accept_cb cb, void *arg, gl_vsock_listener **out, char *err,
		    size_t errlen)
{
	gl_vsock_listener *l;
	char dummy[1];
	int rc;

	if (!err || errlen == 0) {
		err = dummy;
		errlen = sizeof(dummy);
	}
	err[0] = '\0';
	if (!loop || !at || !cb || !out) {
		snprintf(err, errlen, "invalid arguments");
		return -EINVAL;
	}
	l = calloc(1, sizeof(*l));
	if (!l) {
		snprintf(err, errlen, "out of memory");
		return -ENOMEM;
	}
	l->loop = loop;
	l->kind = at->kind;
	l->cb = cb;
	l->arg = arg;
	l->fd = -1;

	switch (at->kind) {
	case GL_VSOCK_HYBRID:
	case GL_VSOCK_GUEST_UNIX:
		rc = unix_path(at, true, l->path);
		if (rc < 0) {
			snprintf(err, errlen, "%s: %.*s", rc == -ENAMETOOLONG ?
				 "socket path too long" : "no socket path",
				 (int)strnlen(at->path, sizeof(at->path)), at->path);
			goto err_free;
		}
		rc = listen_unix(l, mode, err, errlen);
		break;
	case GL_VSOCK_CID:
		rc = listen_vsock(l, at->port, err, errlen);
		break;
	default:
		snprintf(err, errlen, "bad vsock address kind %d", (int)at->kind);
		rc = -EINVAL;
		break;
	}
	if (rc < 0)
		goto err_free;

	rc = uv_poll_init_socket(loop, &l->poll, l->fd);
	if (rc < 0) {
		snprintf(err, errlen, "uv_poll_init_socket: %s", uv_strerror(rc));
		if (l->path[0])
			unlink(l->path);
		close(l->fd);
		goto err_free;
	}
	l->poll.data = l;
	uv_timer_init(loop, &l->pause);
	l->pause.data = l;
	l->handles = 2;
	uv_poll_start(&l->poll, UV_READABLE, listen_poll_cb);
	*out = l;
	return 0;

err_free:
	free(l);
	return rc;
}

void gl_vsock_listen_stop(gl_vsock_listener *l)
{
	struct stat st;

	if (!l || l->stopping)
		return;
	l->stopping = true;
	if (l->path[0] && stat(l->path, &st) == 0 && st.st_dev == l->dev && st.st_ino == l->ino)
		unlink(l->path);
	uv_close((uv_handle_t *)&l->poll, listen_closed);
	uv_close((uv_handle_t *)&l->pause, listen_closed);
}

const char *gl_vsock_listen_path(const gl_vsock_listener *l)
{
	return l ? l->path : "";
}
