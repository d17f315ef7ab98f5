/* vsock-mux: the host side of a VMM's hybrid vsock, played byte for byte
 * over Unix sockets so that every vsock test runs without a VM
 * (specs/vsock.md §1, §7; docs/vsock-mux.md).
 *
 *   vsock-mux --uds PATH --guest DIR [--mode firecracker|vhost-device|
 *             cloud-hypervisor] [--inactive] [--max-conns N] [--control PATH]
 *             [-v] [--help]
 *
 * Host side: PATH is the VMM's <uds>. A host client sends "CONNECT <P>\n";
 * the emulator connects to DIR/listen-<P> (the guest agent in its
 * `--transport unix:DIR` mode), answers "OK <n>\n" and relays bytes.
 * Guest side: DIR/host takes "CONNECT <P>\n" from the guest and connects
 * to "<PATH>_<P>" (guestlinkd's listener), answering "OK\n".
 *
 * One thread, one epoll set, level-triggered. SIGUSR1 = transport reset,
 * SIGUSR2 = activate, SIGTERM/SIGINT = remove the sockets and exit 0. */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "bridge/vsock.h"

#define RING_SIZE (64 * 1024)       /* CONN_TX_BUF_SIZE, per direction */
#define LINE_CAP 32                  /* Firecracker's CONNECT buffer */
#define VHOST_READ 8192              /* a BufReader's default capacity */
#define REQUEST_TIMEOUT_MS 2000      /* CONN_REQUEST_TIMEOUT_MS */
#define SHUTDOWN_TIMEOUT_MS 2000     /* CONN_SHUTDOWN_TIMEOUT_MS */
#define RETRY_MS 20                  /* a guest listener with a full backlog: try again */
#define GUEST_CONNECT_TIMEOUT_S 5    /* the "blocking" connect to <uds>_<P>, bounded */
#define DEFAULT_MAX_CONNS 1023       /* MAX_CONNECTIONS */
#define READ_BUDGET 16               /* reads per fd per wake-up */
#define CTL_LINE_MAX 1024
#define LOCAL_PORT_MIN (1u << 30)

typedef enum mux_mode {
	MODE_FIRECRACKER,
	MODE_VHOST,
	MODE_CLOUD_HV,
} mux_mode;

typedef enum tag_kind {
	TAG_HOST_LISTEN,
	TAG_GUEST_LISTEN,
	TAG_CTL_LISTEN,
	TAG_SIGNAL,
	TAG_CONN_HOST,
	TAG_CONN_GUEST,
	TAG_CTL_CLIENT,
} tag_kind;

typedef struct tag {
	tag_kind kind;
	void *obj;
} tag;

typedef enum conn_state {
	C_HOST_LINE,    /* host stream accepted, its CONNECT line not read yet */
	C_GUEST_LINE,   /* guest stream accepted, its CONNECT line not read yet */
	C_REQUEST,      /* host-initiated: waiting for the guest listener (no OK yet) */
	C_OPEN,         /* relaying */
	C_HOST_CLOSED,  /* host EOF: flush toward the guest, then close it (2 s cap) */
	C_GUEST_CLOSED, /* guest full close: flush toward the host, then close it */
} conn_state;

typedef struct ring {
	char *data;
	size_t head, len;
} ring;

typedef struct conn {
	struct conn *prev, *next;
	uint64_t id;
	conn_state state;
	bool counted;   /* in the connection cap (Firecracker's conn_map) */
	bool host_init;
	bool dead;
	int hfd, gfd;   /* host-side stream, guest-side stream; -1 when closed */
	tag htag, gtag;
	uint32_t hmask, gmask;
	bool hreg, greg;
	bool h_hup, g_hup;     /* EPOLLHUP seen: the peer closed both directions */
	bool g_eof;            /* guest read gave EOF (SHUT_WR): not propagated */
	bool g_wdead;          /* guest no longer takes bytes (EPIPE) */
	uint32_t port;         /* the port asked for in CONNECT */
	uint32_t local_port;   /* host-initiated: the n of "OK <n>" (Firecracker) */
	char line[LINE_CAP];
	size_t nline;
	ring h2g, g2h;
	uint64_t expiry;       /* request expiry (ms, monotonic); 0 = none */
	uint64_t retry_at;     /* C_REQUEST: next connect attempt */
	uint64_t deadline;     /* C_HOST_CLOSED: drain deadline */
} conn;

typedef struct ctl_client {
	struct ctl_client *prev, *next;
	int fd;
	tag t;
	char buf[CTL_LINE_MAX];
	size_t n;
	bool dead;
} ctl_client;

static struct {
	mux_mode mode;
	char uds[108];
	char guest_dir[108];
	char guest_path[108];
	char ctl_path[108];
	bool inactive;
	unsigned max_conns; /* 0 = no cap */
	int verbose;

	int ep;
	int hlfd, glfd, ctlfd, sigfd;
	tag hltag, gltag, ctltag, sigtag;
	bool host_polled;
	bool stop;

	conn *conns;
	conn *grave;
	ctl_client *ctls;
	unsigned live;          /* counted connections */
	uint64_t next_id;
	uint32_t local_port_last;

	/* totals, for "stats" */
	uint64_t host_accepted, host_ok, host_failed, cap_refused, expired;
	uint64_t guest_accepted, guest_ok, guest_failed, resets, aborts;
	uint64_t bytes_h2g, bytes_g2h;
} mux;

static void vlog(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

static void vlog(const char *fmt, ...)
{
	va_list ap;

	if (!mux.verbose)
		return;
	va_start(ap, fmt);
	fputs("vsock-mux: ", stderr);
	vfprintf(stderr, fmt, ap);
	fputc('\n', stderr);
	va_end(ap);
}

static uint64_t now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

static const char *mode_name(mux_mode m)
{
	return m == MODE_VHOST ? "vhost-device" : m == MODE_CLOUD_HV ? "cloud-hypervisor" : "firecracker";
}

/* ---- CONNECT line syntax ---------------------------------------------------- */

/* One strictly valid UTF-8 sequence (what Rust's str::from_utf8 accepts):
 * its length and code point, or 0 if invalid. */
static size_t utf8_next(const unsigned char *p, size_t n, uint32_t *cp)
{
	size_t len;
	uint32_t c, min;

	if (p[0] < 0x80) {
		*cp = p[0];
		return 1;
	}
	if ((p[0] & 0xe0) == 0xc0) {
		len = 2, c = p[0] & 0x1f, min = 0x80;
	} else if ((p[0] & 0xf0) == 0xe0) {
		len = 3, c = p[0] & 0x0f, min = 0x800;
	} else if ((p[0] & 0xf8) == 0xf0) {
		len = 4, c = p[0] & 0x07, min = 0x10000;
	} else {
		return 0;
	}
	if (n < len)
		return 0;
	for (size_t i = 1; i < len; i++) {
		if ((p[i] & 0xc0) != 0x80)
			return 0;
		c = (c << 6) | (p[i] & 0x3f);
	}
	if (c < min || c > 0x10ffff || (c >= 0xd800 && c <= 0xdfff))
		return 0;
	*cp = c;
	return len;
}

static bool utf8_valid(const char *p, size_t n)
{
	uint32_t cp;

	for (size_t i = 0; i < n;) {
		size_t l = utf8_next((const unsigned char *)p + i, n - i, &cp);

		if (!l)
			return false;
		i += l;
	}
	return true;
}

/* Rust's char::is_whitespace (the Unicode White_Space property). */
static bool uni_space(uint32_t c)
{
	return (c >= 0x09 && c <= 0x0d) || c == 0x20 || c == 0x85 || c == 0xa0 || c == 0x1680 ||
	       (c >= 0x2000 && c <= 0x200a) || c == 0x2028 || c == 0x2029 || c == 0x202f ||
	       c == 0x205f || c == 0x3000;
}

/* Next whitespace-separated word of valid UTF-8 text, from *pos. */
static bool next_word(const char *p, size_t n, size_t *pos, const char **w, size_t *wlen)
{
	size_t i = *pos, start, l;
	uint32_t cp;

	while (i < n) {
		l = utf8_next((const unsigned char *)p + i, n - i, &cp);
		if (!uni_space(cp))
			break;
		i += l;
	}
	if (i >= n)
		return false;
	start = i;
	while (i < n) {
		l = utf8_next((const unsigned char *)p + i, n - i, &cp);
		if (uni_space(cp))
			break;
		i += l;
	}
	*w = p + start;
	*wlen = i - start;
	*pos = i;
	return true;
}

/* Rust's u32::from_str: an optional '+', then one or more decimal digits. */
static int parse_u32(const char *p, size_t n, uint32_t *out)
{
	uint64_t v = 0;

	if (n && p[0] == '+')
		p++, n--;
	if (!n)
		return -EINVAL;
	for (size_t i = 0; i < n; i++) {
		if (p[i] < '0' || p[i] > '9')
			return -EINVAL;
		v = v * 10 + (uint64_t)(p[i] - '0');
		if (v > UINT32_MAX)
			return -EINVAL;
	}
	*out = (uint32_t)v;
	return 0;
}

/* vhost-device-vsock's parse of a line of any length (Firecracker's rules
 * without its 32-byte reader, which gl_vsock_parse_connect assumes): valid
 * UTF-8, split on whitespace, word 1 "connect" in any case (no non-ASCII
 * letter lowercases into it), word 2 a u32, further words ignored. */
static int parse_connect_any(const char *p, size_t n, uint32_t *port)
{
	const char *w;
	size_t wl, pos = 0;

	if (!utf8_valid(p, n))
		return -EINVAL;
	if (!next_word(p, n, &pos, &w, &wl) || wl != 7 || strncasecmp(w, "connect", 7))
		return -EINVAL;
	if (!next_word(p, n, &pos, &w, &wl))
		return -EINVAL;
	return parse_u32(w, wl, port);
}

/* Cloud Hypervisor's parse of a partial line: 1 = need more bytes. The
 * prefix is "connect " or "CONNECT " exactly (those two spellings only);
 * the port is the trimmed text before "\n"; a full 32-byte buffer fails. */
static int parse_connect_ch(const char *p, size_t n, uint32_t *port)
{
	const char *nl = memchr(p, '\n', n);
	const char *s, *e;
	size_t pos = 0, l;
	uint32_t cp;

	if (n < 8)
		return nl ? -EINVAL : 1;
	if (memcmp(p, "connect ", 8) && memcmp(p, "CONNECT ", 8))
		return -EINVAL;
	if (n == LINE_CAP)
		return -EINVAL;
	if (!nl)
		return 1;
	s = p + 8;
	e = nl;
	if (!utf8_valid(s, (size_t)(e - s)))
		return -EINVAL;
	/* trim Unicode whitespace on both ends */
	while (s < e) {
		l = utf8_next((const unsigned char *)s, (size_t)(e - s), &cp);
		if (!uni_space(cp))
			break;
		s += l;
	}
	for (const char *q = s; q < e; q += l) {
		l = utf8_next((const unsigned char *)q, (size_t)(e - q), &cp);
		if (!uni_space(cp))
			pos = (size_t)(q + l - s);
	}
	return parse_u32(s, pos, port);
}

/* ---- byte rings --------------------------------------------------------------- */

static size_t ring_space(const ring *r)
{
	return r->data ? RING_SIZE - r->len : 0;
}

/* >0 bytes read, 0 EOF, -errno (-EAGAIN, -ENOBUFS when full). */
static ssize_t ring_fill(ring *r, int fd)
{
	size_t space = ring_space(r), tail, first;
	struct iovec iov[2];
	int cnt = 1;
	ssize_t got;

	if (!space)
		return -ENOBUFS;
	tail = (r->head + r->len) % RING_SIZE;
	first = RING_SIZE - tail < space ? RING_SIZE - tail : space;
	iov[0].iov_base = r->data + tail;
	iov[0].iov_len = first;
	if (first < space) {
		iov[1].iov_base = r->data;
		iov[1].iov_len = space - first;
		cnt = 2;
	}
	got = readv(fd, iov, cnt);
	if (got < 0)
		return errno == EWOULDBLOCK ? -EAGAIN : -errno;
	r->len += (size_t)got;
	return got;
}

/* >0 bytes written, -errno (-EAGAIN). */
static ssize_t ring_drain(ring *r, int fd)
{
	struct iovec iov[2];
	struct msghdr msg = {.msg_iov = iov, .msg_iovlen = 1};
	size_t first = RING_SIZE - r->head < r->len ? RING_SIZE - r->head : r->len;
	ssize_t put;

	if (!r->len)
		return 0;
	iov[0].iov_base = r->data + r->head;
	iov[0].iov_len = first;
	if (first < r->len) {
		iov[1].iov_base = r->data;
		iov[1].iov_len = r->len - first;
		msg.msg_iovlen = 2;
	}
	put = sendmsg(fd, &msg, MSG_NOSIGNAL | MSG_DONTWAIT);
	if (put < 0)
		return errno == EWOULDBLOCK ? -EAGAIN : -errno;
	r->head = (r->head + (size_t)put) % RING_SIZE;
	r->len -= (size_t)put;
	if (!r->len)
		r->head = 0;
	return put;
}

/* ---- epoll bookkeeping ---------------------------------------------------- */

static int ep_set(int fd, tag *t, uint32_t mask, bool *reg, uint32_t *cur)
{
	struct epoll_event ev = {.events = mask, .data.ptr = t};

	if (*reg && *cur == mask)
		return 0;
	if (epoll_ctl(mux.ep, *reg ? EPOLL_CTL_MOD : EPOLL_CTL_ADD, fd, &ev) < 0)
		return -errno;
	*reg = true;
	*cur = mask;
	return 0;
}

static void ep_del(int fd, bool *reg)
{
	if (*reg)
		epoll_ctl(mux.ep, EPOLL_CTL_DEL, fd, NULL);
	*reg = false;
}

static void close_host(conn *c)
{
	if (c->hfd < 0)
		return;
	ep_del(c->hfd, &c->hreg);
	close(c->hfd);
	c->hfd = -1;
}

static void close_guest(conn *c)
{
	if (c->gfd < 0)
		return;
	ep_del(c->gfd, &c->greg);
	close(c->gfd);
	c->gfd = -1;
}

/* ---- connections ------------------------------------------------------------ */

static conn *conn_new(bool host_init, int fd)
{
	conn *c = calloc(1, sizeof(*c));

	if (!c)
		return NULL;
	c->id = ++mux.next_id;
	c->host_init = host_init;
	c->state = host_init ? C_HOST_LINE : C_GUEST_LINE;
	c->hfd = host_init ? fd : -1;
	c->gfd = host_init ? -1 : fd;
	c->htag = (tag){TAG_CONN_HOST, c};
	c->gtag = (tag){TAG_CONN_GUEST, c};
	c->next = mux.conns;
	if (mux.conns)
		mux.conns->prev = c;
	mux.conns = c;
	return c;
}

/* Close both streams, drop buffered bytes; freed after this loop turn. */
static void conn_kill(conn *c, const char *why)
{
	if (c->dead)
		return;
	vlog("conn %" PRIu64 " (port %" PRIu32 "): closed: %s", c->id, c->port, why);
	close_host(c);
	close_guest(c);
	c->dead = true;
	if (c->counted) {
		c->counted = false;
		mux.live--;
	}
	if (c->prev)
		c->prev->next = c->next;
	else
		mux.conns = c->next;
	if (c->next)
		c->next->prev = c->prev;
	c->prev = NULL;
	c->next = mux.grave;
	mux.grave = c;
}

static void bury(void)
{
	while (mux.grave) {
		conn *c = mux.grave;

		mux.grave = c->next;
		free(c->h2g.data);
		free(c->g2h.data);
		free(c);
	}
}

static int conn_buffers(conn *c)
{
	c->h2g.data = malloc(RING_SIZE);
	c->g2h.data = malloc(RING_SIZE);
	if (!c->h2g.data || !c->g2h.data)
		return -ENOMEM;
	return 0;
}

/* Recompute what each side waits for. Level-triggered: a side that has
 * hung up and that we do not read right now is taken out of the set, or
 * its EPOLLHUP would wake us forever. */
static void conn_update(conn *c)
{
	uint32_t hm = 0, gm = 0;

	if (c->dead)
		return;
	switch (c->state) {
	case C_HOST_LINE:
		hm = EPOLLIN;
		break;
	case C_GUEST_LINE:
		gm = EPOLLIN;
		break;
	case C_REQUEST:
		/* Firecracker does not poll a stream before the guest answers */
		break;
	case C_OPEN:
		hm = (ring_space(&c->h2g) ? EPOLLIN : 0) | (c->g2h.len ? EPOLLOUT : 0);
		break;
	case C_HOST_CLOSED:
	case C_GUEST_CLOSED:
		hm = c->g2h.len ? EPOLLOUT : 0;
		break;
	}
	if (c->state == C_OPEN || c->state == C_HOST_CLOSED)
		gm = (ring_space(&c->g2h) && !c->g_eof ? EPOLLIN : 0) |
		     (c->h2g.len && !c->g_wdead ? EPOLLOUT : 0);

	if (c->hfd >= 0) {
		if (c->state == C_REQUEST || (c->h_hup && !(hm & EPOLLIN)))
			ep_del(c->hfd, &c->hreg);
		else if (ep_set(c->hfd, &c->htag, hm, &c->hreg, &c->hmask) < 0)
			conn_kill(c, "epoll");
	}
	if (!c->dead && c->gfd >= 0) {
		if (c->g_hup && !(gm & EPOLLIN))
			ep_del(c->gfd, &c->greg);
		else if (ep_set(c->gfd, &c->gtag, gm, &c->greg, &c->gmask) < 0)
			conn_kill(c, "epoll");
	}
}

/* Firecracker's sweep_killq: only when a connection is being added. */
static void sweep_expired(void)
{
	uint64_t now;

	if (mux.mode == MODE_VHOST)
		return;
	now = now_ms();
	for (conn *c = mux.conns, *nx; c; c = nx) {
		nx = c->next;
		if (c->state == C_REQUEST && c->expiry && c->expiry <= now) {
			mux.expired++;
			conn_kill(c, "request expired (swept)");
		}
	}
}

/* Firecracker's add_connection: sweep, then the cap. */
static int add_connection(conn *c)
{
	sweep_expired();
	if (mux.max_conns && mux.live >= mux.max_conns) {
		mux.cap_refused++;
		return -EMFILE;
	}
	c->counted = true;
	mux.live++;
	return 0;
}

static uint32_t allocate_local_port(void)
{
	for (;;) {
		bool used = false;

		mux.local_port_last = ((mux.local_port_last + 1) & ~(1u << 31)) | LOCAL_PORT_MIN;
		for (conn *c = mux.conns; c; c = c->next)
			if (c->host_init && c->counted && c->local_port == mux.local_port_last)
				used = true;
		if (!used)
			return mux.local_port_last;
	}
}

static void open_established(conn *c)
{
	c->state = C_OPEN;
	c->expiry = 0;
	c->retry_at = 0;
}

/* Both streams are connected: the rings, then the OK line to whoever sent
 * CONNECT (fd). False once c is killed. */
static bool answer_ok(conn *c, int fd, const char *ok, size_t n)
{
	if (conn_buffers(c) < 0) {
		conn_kill(c, "out of memory");
		return false;
	}
	if (send(fd, ok, n, MSG_NOSIGNAL | MSG_DONTWAIT) != (ssize_t)n) {
		conn_kill(c, "OK not written whole");
		return false;
	}
	return true;
}

/* Host-initiated: connect (non-blocking) to DIR/listen-<P>. A Unix connect
 * that lands in the listener's backlog is what a guest kernel's RESPONSE
 * is: the guest has the connection queued, before its accept(). */
static void request_guest(conn *c)
{
	struct sockaddr_un sa = {.sun_family = AF_UNIX};
	char ok[32];
	int fd, n;

	n = snprintf(sa.sun_path, sizeof(sa.sun_path), "%s/listen-%" PRIu32, mux.guest_dir, c->port);
	if (n < 0 || (size_t)n >= sizeof(sa.sun_path)) {
		mux.host_failed++;
		conn_kill(c, "guest path too long");
		return;
	}
	fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (fd < 0) {
		mux.host_failed++;
		conn_kill(c, "socket");
		return;
	}
	if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
		int err = errno;

		close(fd);
		if (err == EAGAIN || err == EWOULDBLOCK) {
			/* delivered, not answered: arm the expiry once */
			if (!c->expiry)
				vlog("conn %" PRIu64 ": guest port %" PRIu32 " does not answer (backlog full)",
				     c->id, c->port);
			if (!c->expiry && mux.mode != MODE_VHOST)
				c->expiry = now_ms() + REQUEST_TIMEOUT_MS;
			c->retry_at = now_ms() + RETRY_MS;
			return;
		}
		mux.host_failed++;
		conn_kill(c, err == ENOENT ? "no guest listener (ENOENT)" :
			  err == ECONNREFUSED ? "no guest listener (ECONNREFUSED)" :
						"guest connect failed");
		return;
	}
	c->gfd = fd;
	n = snprintf(ok, sizeof(ok), "OK %" PRIu32 "\n",
		     mux.mode == MODE_VHOST ? c->port : c->local_port);
	if (!answer_ok(c, c->hfd, ok, (size_t)n))
		return;
	mux.host_ok++;
	vlog("conn %" PRIu64 ": host -> guest port %" PRIu32 ": OK %" PRIu32, c->id, c->port,
	     mux.mode == MODE_VHOST ? c->port : c->local_port);
	open_established(c);
	conn_update(c);
}

/* Firecracker: read_exact of 10 bytes, then one byte at a time up to "\n"
 * or 32 bytes; every read non-blocking, so a missing byte is a failure. */
static int read_exact(int fd, char *p, size_t n)
{
	while (n) {
		ssize_t r = read(fd, p, n);

		if (r < 0 && errno == EINTR)
			continue;
		if (r <= 0)
			return r == 0 ? -EPIPE : -errno;
		p += r;
		n -= (size_t)r;
	}
	return 0;
}

static int host_line_fc(conn *c, uint32_t *port)
{
	size_t blen = 10;

	if (read_exact(c->hfd, c->line, 10) < 0)
		return -EINVAL;
	while (c->line[blen - 1] != '\n' && blen < LINE_CAP) {
		if (read_exact(c->hfd, c->line + blen, 1) < 0)
			return -EINVAL;
		blen++;
	}
	return gl_vsock_parse_connect(c->line, blen, port);
}

/* vhost-device-vsock: read_until('\n') through a BufReader: big reads,
 * and whatever followed "\n" in them is lost. */
static int host_line_vhost(conn *c, uint32_t *port)
{
	char buf[VHOST_READ];
	size_t total = 0;
	char line[VHOST_READ];

	for (;;) {
		ssize_t r = read(c->hfd, buf, sizeof(buf));
		char *nl;
		size_t take;

		if (r < 0 && errno == EINTR)
			continue;
		if (r <= 0)
			return -EINVAL;
		nl = memchr(buf, '\n', (size_t)r);
		take = nl ? (size_t)(nl - buf) + 1 : (size_t)r;
		if (total + take > sizeof(line))
			return -EINVAL; /* a test tool's bound, far beyond any real line */
		memcpy(line + total, buf, take);
		total += take;
		if (nl) {
			if ((size_t)r > take)
				vlog("conn %" PRIu64 ": %zu bytes after the CONNECT line swallowed",
				     c->id, (size_t)r - take);
			break;
		}
	}
	return parse_connect_any(line, total, port);
}

/* Cloud Hypervisor: one byte per readiness event, the partial line kept. */
static int host_line_ch(conn *c, uint32_t *port)
{
	ssize_t r;

	r = read(c->hfd, c->line + c->nline, 1);
	if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR))
		return 1;
	if (r <= 0)
		return -EINVAL;
	c->nline++;
	return parse_connect_ch(c->line, c->nline, port);
}

/* A host stream's CONNECT line, read the mode's way; once it is whole,
 * the connection is counted and the guest listener asked. */
static void host_line(conn *c)
{
	uint32_t port;
	int ret;

	if (mux.mode == MODE_VHOST)
		ret = host_line_vhost(c, &port);
	else if (mux.mode == MODE_CLOUD_HV)
		ret = host_line_ch(c, &port);
	else
		ret = host_line_fc(c, &port);
	if (ret == 1)
		return;
	if (ret < 0) {
		mux.host_failed++;
		conn_kill(c, "bad CONNECT line");
		return;
	}
	c->port = port;
	if (add_connection(c) < 0) {
		conn_kill(c, "connection cap");
		return;
	}
	c->local_port = allocate_local_port();
	c->state = C_REQUEST;
	conn_update(c);
	request_guest(c);
}

/* Guest-initiated: the guest-unix transport's "CONNECT <P>\n", read a byte
 * at a time so nothing after it is consumed. */
static void guest_line(conn *c)
{
	struct sockaddr_un sa = {.sun_family = AF_UNIX};
	struct timeval tv = {.tv_sec = GUEST_CONNECT_TIMEOUT_S};
	uint32_t port;
	int fd, n;

	for (;;) {
		ssize_t r = read(c->gfd, c->line + c->nline, 1);

		if (r < 0 && errno == EINTR)
			continue;
		if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
			return;
		if (r <= 0)
			goto fail;
		c->nline++;
		if (c->line[c->nline - 1] == '\n')
			break;
		if (c->nline == LINE_CAP)
			goto fail;
	}
	if (gl_vsock_parse_connect(c->line, c->nline, &port) < 0)
		goto fail;
	c->port = port;
	if (add_connection(c) < 0) {
		conn_kill(c, "connection cap");
		return;
	}
	n = snprintf(sa.sun_path, sizeof(sa.sun_path), "%s_%" PRIu32, mux.uds, port);
	if (n < 0 || (size_t)n >= sizeof(sa.sun_path)) {
		vlog("conn %" PRIu64 ": guest -> %s_%" PRIu32 ": path too long", c->id, mux.uds, port);
		goto fail;
	}
	/* Firecracker connects blocking; bounded here so a stuck listener
	 * cannot freeze the emulator forever */
	fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		goto fail;
	setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
	if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
		vlog("conn %" PRIu64 ": guest -> %s: %s", c->id, sa.sun_path, strerror(errno));
		close(fd);
		goto fail;
	}
	if (fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK) < 0) {
		close(fd);
		goto fail;
	}
	c->hfd = fd;
	if (!answer_ok(c, c->gfd, "OK\n", 3))
		return;
	mux.guest_ok++;
	vlog("conn %" PRIu64 ": guest -> %s: OK", c->id, sa.sun_path);
	open_established(c);
	conn_update(c);
	return;
fail:
	mux.guest_failed++;
	conn_kill(c, "guest dial failed (the guest sees ECONNRESET)");
}

/* ---- relaying ----------------------------------------------------------------- */

static void guest_full_close(conn *c)
{
	/* the guest is gone: what it had sent still goes to the host; what
	 * was meant for it is dropped */
	close_guest(c);
	c->h2g.len = 0;
	c->h2g.head = 0;
	c->state = C_GUEST_CLOSED;
}

/* After any I/O: move on when a closing side has drained. */
static void conn_step(conn *c)
{
	if (c->dead)
		return;
	if (c->state == C_HOST_CLOSED && c->gfd >= 0 && (!c->h2g.len || c->g_wdead)) {
		/* last chance for bytes the guest already sent, then the full
		 * close that Firecracker's SHUTDOWN(RCV|SEND) amounts to */
		while (ring_space(&c->g2h) && !c->g_eof) {
			ssize_t r = ring_fill(&c->g2h, c->gfd);

			if (r <= 0)
				break;
			mux.bytes_g2h += (uint64_t)r;
		}
		close_guest(c);
	}
	if ((c->state == C_HOST_CLOSED && c->gfd < 0 && !c->g2h.len) ||
	    (c->state == C_GUEST_CLOSED && !c->g2h.len)) {
		conn_kill(c, c->state == C_HOST_CLOSED ? "host closed" : "guest closed");
		return;
	}
	conn_update(c);
}

/* Write buffered guest bytes to the host stream. false: c was killed. */
static bool flush_to_host(conn *c)
{
	ssize_t r;

	if (!c->g2h.len || c->hfd < 0)
		return true;
	r = ring_drain(&c->g2h, c->hfd);
	if (r >= 0 || r == -EAGAIN)
		return true;
	if (c->state == C_HOST_CLOSED) {
		/* the host half-closed and then went away: nobody to read it */
		c->g2h.len = 0;
		c->g2h.head = 0;
		return true;
	}
	conn_kill(c, "host write error");
	return false;
}

/* Write buffered host bytes to the guest stream. false: c was killed. */
static bool flush_to_guest(conn *c)
{
	ssize_t r;

	if (!c->h2g.len || c->gfd < 0 || c->g_wdead)
		return true;
	r = ring_drain(&c->h2g, c->gfd);
	if (r >= 0 || r == -EAGAIN)
		return true;
	if (r == -EPIPE) {
		/* the guest closed; its EOF (read side) decides what follows */
		c->g_wdead = true;
		c->h2g.len = 0;
		c->h2g.head = 0;
		return true;
	}
	mux.aborts++;
	conn_kill(c, "guest write error");
	return false;
}

static void host_event(conn *c, uint32_t ev)
{
	if (c->state == C_HOST_LINE) {
		host_line(c);
		return;
	}
	if (ev & EPOLLERR) {
		conn_kill(c, "host stream error");
		return;
	}
	if (ev & EPOLLHUP)
		c->h_hup = true;
	if (c->state == C_OPEN && (ev & (EPOLLIN | EPOLLHUP))) {
		for (int i = 0; i < READ_BUDGET && c->state == C_OPEN; i++) {
			ssize_t r = ring_fill(&c->h2g, c->hfd);

			if (r > 0) {
				mux.bytes_h2g += (uint64_t)r;
				if (!flush_to_guest(c))
					return;
				continue;
			}
			if (r == 0) {
				/* close or SHUT_WR alike: Firecracker's LocalClosed */
				c->state = C_HOST_CLOSED;
				c->deadline = now_ms() + SHUTDOWN_TIMEOUT_MS;
				vlog("conn %" PRIu64 ": host EOF: full close toward the guest", c->id);
			} else if (r != -EAGAIN && r != -ENOBUFS) {
				conn_kill(c, "host read error");
				return;
			}
			break;
		}
	}
	if ((ev & EPOLLOUT) && !flush_to_host(c))
		return;
	if (c->h_hup && c->state == C_GUEST_CLOSED) {
		conn_kill(c, "host gone");
		return;
	}
	if (c->h_hup && c->state == C_HOST_CLOSED) {
		c->g2h.len = 0; /* nobody left to read it */
		c->g2h.head = 0;
	}
	conn_step(c);
}

static bool peer_closed_fully(int fd)
{
	struct pollfd p = {.fd = fd, .events = POLLRDHUP};

	return poll(&p, 1, 0) == 1 && (p.revents & POLLHUP);
}

static void guest_event(conn *c, uint32_t ev)
{
	if (c->state == C_GUEST_LINE) {
		guest_line(c);
		return;
	}
	if (ev & EPOLLERR) {
		/* the guest's RST (a Unix close with unread data gives us
		 * ECONNRESET): discard everything, close the host stream */
		mux.aborts++;
		conn_kill(c, "guest abort: buffered data discarded");
		return;
	}
	if (ev & EPOLLHUP)
		c->g_hup = true;
	if ((ev & EPOLLOUT) && !flush_to_guest(c))
		return;
	if ((ev & (EPOLLIN | EPOLLHUP)) && !c->g_eof) {
		for (int i = 0; i < READ_BUDGET; i++) {
			ssize_t r = ring_fill(&c->g2h, c->gfd);

			if (r > 0) {
				mux.bytes_g2h += (uint64_t)r;
				if (!flush_to_host(c))
					return;
				continue;
			}
			if (r == 0) {
				c->g_eof = true;
				if (c->g_hup || peer_closed_fully(c->gfd)) {
					vlog("conn %" PRIu64 ": guest closed", c->id);
					guest_full_close(c);
				} else {
					vlog("conn %" PRIu64 ": guest SHUT_WR (not propagated)", c->id);
				}
			} else if (r == -ECONNRESET) {
				mux.aborts++;
				conn_kill(c, "guest abort: buffered data discarded");
				return;
			} else if (r != -EAGAIN && r != -ENOBUFS) {
				conn_kill(c, "guest read error");
				return;
			}
			break;
		}
	} else if (c->g_eof && c->g_hup && c->gfd >= 0) {
		/* half-closed earlier, now closed for good */
		vlog("conn %" PRIu64 ": guest closed", c->id);
		guest_full_close(c);
	}
	conn_step(c);
}

/* ---- listeners ------------------------------------------------------------------ */

static void accept_host(void)
{
	for (int i = 0; i < READ_BUDGET; i++) {
		int fd;
		conn *c;

		/* Firecracker: at the cap, accept and drop at once */
		fd = accept4(mux.hlfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
		if (fd < 0)
			return;
		mux.host_accepted++;
		if (mux.max_conns && mux.live >= mux.max_conns) {
			mux.cap_refused++;
			vlog("host connection refused: %u connections", mux.live);
			close(fd);
			continue;
		}
		c = conn_new(true, fd);
		if (!c) {
			close(fd);
			continue;
		}
		conn_update(c);
	}
}

static void accept_guest(void)
{
	for (int i = 0; i < READ_BUDGET; i++) {
		int fd = accept4(mux.glfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
		conn *c;

		if (fd < 0)
			return;
		mux.guest_accepted++;
		c = conn_new(false, fd);
		if (!c) {
			close(fd);
			continue;
		}
		conn_update(c);
	}
}

static int set_host_polled(bool on)
{
	struct epoll_event ev = {.events = EPOLLIN, .data.ptr = &mux.hltag};

	if (on == mux.host_polled)
		return 0;
	if (epoll_ctl(mux.ep, on ? EPOLL_CTL_ADD : EPOLL_CTL_DEL, mux.hlfd, &ev) < 0)
		return -errno;
	mux.host_polled = on;
	return 0;
}

/* Snapshot/restore: every connection dies, listeners stay. */
static void transport_reset(void)
{
	unsigned n = 0;

	while (mux.conns) {
		conn_kill(mux.conns, "transport reset");
		n++;
	}
	mux.resets++;
	vlog("transport reset: %u connections killed", n);
}

static int activate(void)
{
	int ret = set_host_polled(true);

	if (!ret)
		vlog("activated");
	return ret;
}

static int move_uds(const char *to)
{
	if (strlen(to) >= sizeof(mux.uds))
		return -ENAMETOOLONG;
	if (rename(mux.uds, to) < 0)
		return -errno;
	vlog("moved %s -> %s", mux.uds, to);
	snprintf(mux.uds, sizeof(mux.uds), "%s", to);
	return 0;
}

static int make_listener(const char *path, int *out)
{
	struct sockaddr_un sa = {.sun_family = AF_UNIX};
	struct stat st;
	int fd;

	if (strlen(path) >= sizeof(sa.sun_path))
		return -ENAMETOOLONG;
	strcpy(sa.sun_path, path);
	if (lstat(path, &st) == 0 && S_ISSOCK(st.st_mode))
		unlink(path);
	fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return -errno;
	if (bind(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0 || listen(fd, 4096) < 0) {
		int err = -errno;

		close(fd);
		return err;
	}
	*out = fd;
	return 0;
}

/* ---- control socket -------------------------------------------------------- */

static void ctl_reply(ctl_client *cl, const char *s)
{
	size_t n = strlen(s);

	/* replies are short; a client that does not read them loses them */
	if (send(cl->fd, s, n, MSG_NOSIGNAL | MSG_DONTWAIT) != (ssize_t)n)
		cl->dead = true;
}

static void ctl_stats(ctl_client *cl)
{
	char out[1024];
	unsigned pending = 0, requests = 0, closing = 0;
	uint64_t buf_h2g = 0, buf_g2h = 0;

	for (conn *c = mux.conns; c; c = c->next) {
		if (c->state == C_HOST_LINE || c->state == C_GUEST_LINE)
			pending++;
		else if (c->state == C_REQUEST)
			requests++;
		else if (c->state != C_OPEN)
			closing++;
		buf_h2g += c->h2g.len;
		buf_g2h += c->g2h.len;
	}
	snprintf(out, sizeof(out),
		 "{\"mode\":\"%s\",\"active\":%s,\"live\":%u,\"pending_lines\":%u,"
		 "\"requests\":%u,\"closing\":%u,\"buffered_h2g\":%" PRIu64
		 ",\"buffered_g2h\":%" PRIu64 ",\"host_accepted\":%" PRIu64
		 ",\"host_ok\":%" PRIu64 ",\"host_failed\":%" PRIu64 ",\"cap_refused\":%" PRIu64
		 ",\"expired\":%" PRIu64 ",\"guest_accepted\":%" PRIu64 ",\"guest_ok\":%" PRIu64
		 ",\"guest_failed\":%" PRIu64 ",\"aborts\":%" PRIu64 ",\"resets\":%" PRIu64
		 ",\"bytes_h2g\":%" PRIu64 ",\"bytes_g2h\":%" PRIu64 "}\n",
		 mode_name(mux.mode), mux.host_polled ? "true" : "false", mux.live, pending,
		 requests, closing, buf_h2g, buf_g2h, mux.host_accepted, mux.host_ok,
		 mux.host_failed, mux.cap_refused, mux.expired, mux.guest_accepted, mux.guest_ok,
		 mux.guest_failed, mux.aborts, mux.resets, mux.bytes_h2g, mux.bytes_g2h);
	ctl_reply(cl, out);
}

static void ctl_result(ctl_client *cl, int ret)
{
	char msg[256];

	if (!ret) {
		ctl_reply(cl, "ok\n");
		return;
	}
	snprintf(msg, sizeof(msg), "error: %s\n", strerror(-ret));
	ctl_reply(cl, msg);
}

static void ctl_command(ctl_client *cl, char *line)
{
	int ret;

	if (!strcmp(line, "reset")) {
		transport_reset();
		ctl_reply(cl, "ok\n");
	} else if (!strcmp(line, "activate")) {
		ret = activate();
		ctl_result(cl, ret);
	} else if (!strncmp(line, "move ", 5) && line[5]) {
		ret = move_uds(line + 5);
		ctl_result(cl, ret);
	} else if (!strcmp(line, "stats")) {
		ctl_stats(cl);
	} else {
		ctl_reply(cl, "error: unknown command (reset, activate, move PATH, stats)\n");
	}
}

static void ctl_free(ctl_client *cl)
{
	epoll_ctl(mux.ep, EPOLL_CTL_DEL, cl->fd, NULL);
	close(cl->fd);
	if (cl->prev)
		cl->prev->next = cl->next;
	else
		mux.ctls = cl->next;
	if (cl->next)
		cl->next->prev = cl->prev;
	free(cl);
}

static void ctl_event(ctl_client *cl)
{
	ssize_t r = read(cl->fd, cl->buf + cl->n, sizeof(cl->buf) - cl->n);
	char *nl;

	if (r < 0 && (errno == EAGAIN || errno == EINTR))
		return;
	if (r <= 0) {
		ctl_free(cl);
		return;
	}
	cl->n += (size_t)r;
	while (!cl->dead && (nl = memchr(cl->buf, '\n', cl->n))) {
		size_t len = (size_t)(nl - cl->buf);

		*nl = '\0';
		if (len && cl->buf[len - 1] == '\r')
			cl->buf[len - 1] = '\0';
		ctl_command(cl, cl->buf);
		memmove(cl->buf, nl + 1, cl->n - len - 1);
		cl->n -= len + 1;
	}
	if (cl->n == sizeof(cl->buf))
		cl->dead = true;
	if (cl->dead)
		ctl_free(cl);
}

static void accept_ctl(void)
{
	int fd = accept4(mux.ctlfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
	ctl_client *cl;
	struct epoll_event ev = {.events = EPOLLIN};

	if (fd < 0)
		return;
	cl = calloc(1, sizeof(*cl));
	if (!cl) {
		close(fd);
		return;
	}
	cl->fd = fd;
	cl->t = (tag){TAG_CTL_CLIENT, cl};
	ev.data.ptr = &cl->t;
	if (epoll_ctl(mux.ep, EPOLL_CTL_ADD, fd, &ev) < 0) {
		close(fd);
		free(cl);
		return;
	}
	cl->next = mux.ctls;
	if (mux.ctls)
		mux.ctls->prev = cl;
	mux.ctls = cl;
}

static void signal_event(void)
{
	struct signalfd_siginfo si;

	while (read(mux.sigfd, &si, sizeof(si)) == (ssize_t)sizeof(si)) {
		switch (si.ssi_signo) {
		case SIGUSR1:
			transport_reset();
			break;
		case SIGUSR2:
			if (activate() < 0)
				fprintf(stderr, "vsock-mux: activate failed\n");
			break;
		default:
			mux.stop = true;
		}
	}
}

/* ---- timers: retries and drain deadlines (expiries are lazy) ----------- */

static int next_timeout(void)
{
	uint64_t now = now_ms(), first = UINT64_MAX;

	for (conn *c = mux.conns; c; c = c->next) {
		if (c->state == C_REQUEST && c->retry_at && c->retry_at < first)
			first = c->retry_at;
		if (c->state == C_HOST_CLOSED && c->deadline < first)
			first = c->deadline;
	}
	if (first == UINT64_MAX)
		return -1;
	return first <= now ? 0 : (int)(first - now);
}

static void run_timers(void)
{
	uint64_t now = now_ms();

	for (conn *c = mux.conns, *nx; c; c = nx) {
		nx = c->next;
		if (c->state == C_REQUEST && c->retry_at && c->retry_at <= now) {
			c->retry_at = 0;
			request_guest(c);
		} else if (c->state == C_HOST_CLOSED && c->deadline <= now) {
			conn_kill(c, "shutdown timeout (2 s)");
		}
	}
}

/* ---- main ------------------------------------------------------------------------ */

static void usage(FILE *f)
{
	fprintf(f,
		"usage: vsock-mux --uds PATH --guest DIR [options]\n"
		"\n"
		"Plays a VMM's host side of hybrid vsock over Unix sockets (specs/vsock.md).\n"
		"  --uds PATH        the VMM's <uds>: host clients connect here and send\n"
		"                    \"CONNECT <port>\\n\"; guest dials go to PATH_<port>\n"
		"  --guest DIR       the guest side: the agent's listeners DIR/listen-<port>;\n"
		"                    guest dials arrive at DIR/host\n"
		"  --mode M          firecracker (default), vhost-device, cloud-hypervisor\n"
		"  --inactive        do not answer host connects until activated\n"
		"                    (SIGUSR2 or \"activate\"): a guest whose driver is not up\n"
		"  --max-conns N     connection cap (default 1023; vhost-device: none)\n"
		"  --control PATH    a Unix socket taking \"reset\", \"activate\",\n"
		"                    \"move NEWPATH\", \"stats\", one per line\n"
		"  -v                log every connection on stderr\n"
		"  --help            this text\n"
		"Signals: SIGUSR1 transport reset (every connection dies), SIGUSR2 activate,\n"
		"SIGTERM/SIGINT exit 0 removing the socket files.\n"
		"Prints \"vsock-mux: ready\" on stderr once listening.\n");
}

static void add_fixed(int fd, tag *t)
{
	struct epoll_event ev = {.events = EPOLLIN, .data.ptr = t};

	if (epoll_ctl(mux.ep, EPOLL_CTL_ADD, fd, &ev) < 0) {
		fprintf(stderr, "vsock-mux: epoll: %s\n", strerror(errno));
		exit(1);
	}
}

static void raise_nofile(void)
{
	struct rlimit rl;

	if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
		rl.rlim_cur = rl.rlim_max;
		setrlimit(RLIMIT_NOFILE, &rl);
	}
}

int main(int argc, char **argv)
{
	static const struct option opts[] = {
		{"uds", required_argument, NULL, 'u'},
		{"guest", required_argument, NULL, 'g'},
		{"mode", required_argument, NULL, 'm'},
		{"inactive", no_argument, NULL, 'i'},
		{"max-conns", required_argument, NULL, 'n'},
		{"control", required_argument, NULL, 'c'},
		{"verbose", no_argument, NULL, 'v'},
		{"help", no_argument, NULL, 'h'},
		{NULL, 0, NULL, 0},
	};
	const char *uds = NULL, *guest = NULL, *ctl = NULL;
	bool cap_given = false;
	struct epoll_event evs[64];
	sigset_t ss;
	int opt, ret;
	char *end;
	unsigned long v;

	mux.mode = MODE_FIRECRACKER;
	mux.max_conns = DEFAULT_MAX_CONNS;
	while ((opt = getopt_long(argc, argv, "vh", opts, NULL)) != -1) {
		switch (opt) {
		case 'u':
			uds = optarg;
			break;
		case 'g':
			guest = optarg;
			break;
		case 'm':
			if (!strcmp(optarg, "firecracker"))
				mux.mode = MODE_FIRECRACKER;
			else if (!strcmp(optarg, "vhost-device"))
				mux.mode = MODE_VHOST;
			else if (!strcmp(optarg, "cloud-hypervisor"))
				mux.mode = MODE_CLOUD_HV;
			else {
				fprintf(stderr, "vsock-mux: unknown mode %s\n", optarg);
				return 2;
			}
			break;
		case 'i':
			mux.inactive = true;
			break;
		case 'n':
			errno = 0;
			v = strtoul(optarg, &end, 10);
			if (errno || *end || !*optarg || v > 1000000) {
				fprintf(stderr, "vsock-mux: bad --max-conns %s\n", optarg);
				return 2;
			}
			mux.max_conns = (unsigned)v;
			cap_given = true;
			break;
		case 'c':
			ctl = optarg;
			break;
		case 'v':
			mux.verbose = 1;
			break;
		case 'h':
			usage(stdout);
			return 0;
		default:
			usage(stderr);
			return 2;
		}
	}
	if (!uds || !guest || optind != argc) {
		usage(stderr);
		return 2;
	}
	if (mux.mode == MODE_VHOST && !cap_given)
		mux.max_conns = 0;
	/* Only the sockets themselves must fit: like Firecracker, a dial whose
	 * "<uds>_<P>" (or "DIR/listen-<P>") is too long for sun_path fails
	 * when it happens (specs/vsock.md §1.3). */
	if (strlen(uds) >= sizeof(mux.uds) || strlen(guest) + 5 >= sizeof(mux.guest_dir) ||
	    (ctl && strlen(ctl) >= sizeof(mux.ctl_path))) {
		fprintf(stderr, "vsock-mux: path too long for sun_path\n");
		return 2;
	}
	snprintf(mux.uds, sizeof(mux.uds), "%s", uds);
	snprintf(mux.guest_dir, sizeof(mux.guest_dir), "%s", guest);
	snprintf(mux.guest_path, sizeof(mux.guest_path), "%s/host", guest);
	if (ctl)
		snprintf(mux.ctl_path, sizeof(mux.ctl_path), "%s", ctl);
	mux.local_port_last = LOCAL_PORT_MIN - 1;
	mux.hlfd = mux.glfd = mux.ctlfd = -1;
	raise_nofile();
	signal(SIGPIPE, SIG_IGN);

	sigemptyset(&ss);
	sigaddset(&ss, SIGTERM);
	sigaddset(&ss, SIGINT);
	sigaddset(&ss, SIGUSR1);
	sigaddset(&ss, SIGUSR2);
	sigprocmask(SIG_BLOCK, &ss, NULL);
	mux.sigfd = signalfd(-1, &ss, SFD_NONBLOCK | SFD_CLOEXEC);
	mux.ep = epoll_create1(EPOLL_CLOEXEC);
	if (mux.sigfd < 0 || mux.ep < 0) {
		fprintf(stderr, "vsock-mux: %s\n", strerror(errno));
		return 1;
	}
	mux.hltag = (tag){TAG_HOST_LISTEN, NULL};
	mux.gltag = (tag){TAG_GUEST_LISTEN, NULL};
	mux.ctltag = (tag){TAG_CTL_LISTEN, NULL};
	mux.sigtag = (tag){TAG_SIGNAL, NULL};
	add_fixed(mux.sigfd, &mux.sigtag);

	if (mkdir(mux.guest_dir, 0755) < 0 && errno != EEXIST) {
		fprintf(stderr, "vsock-mux: mkdir %s: %s\n", mux.guest_dir, strerror(errno));
		return 1;
	}
	ret = make_listener(mux.uds, &mux.hlfd);
	if (ret < 0) {
		fprintf(stderr, "vsock-mux: listen %s: %s\n", mux.uds, strerror(-ret));
		return 1;
	}
	ret = make_listener(mux.guest_path, &mux.glfd);
	if (ret < 0) {
		fprintf(stderr, "vsock-mux: listen %s: %s\n", mux.guest_path, strerror(-ret));
		goto out;
	}
	add_fixed(mux.glfd, &mux.gltag);
	if (ctl) {
		ret = make_listener(mux.ctl_path, &mux.ctlfd);
		if (ret < 0) {
			fprintf(stderr, "vsock-mux: listen %s: %s\n", mux.ctl_path, strerror(-ret));
			goto out;
		}
		add_fixed(mux.ctlfd, &mux.ctltag);
	}
	if (!mux.inactive && set_host_polled(true) < 0) {
		fprintf(stderr, "vsock-mux: epoll: %s\n", strerror(errno));
		ret = -1;
		goto out;
	}
	fprintf(stderr, "vsock-mux: ready\n");
	vlog("mode %s, uds %s, guest %s, cap %u%s", mode_name(mux.mode), mux.uds, mux.guest_dir,
	     mux.max_conns, mux.inactive ? ", inactive" : "");

	ret = 0;
	while (!mux.stop) {
		int n = epoll_wait(mux.ep, evs, 64, next_timeout());

		if (n < 0 && errno != EINTR) {
			fprintf(stderr, "vsock-mux: epoll_wait: %s\n", strerror(errno));
			ret = -1;
			break;
		}
		for (int i = 0; i < n; i++) {
			tag *t = evs[i].data.ptr;
			conn *c = t->obj;

			switch (t->kind) {
			case TAG_HOST_LISTEN:
				accept_host();
				break;
			case TAG_GUEST_LISTEN:
				accept_guest();
				break;
			case TAG_CTL_LISTEN:
				accept_ctl();
				break;
			case TAG_SIGNAL:
				signal_event();
				break;
			case TAG_CONN_HOST:
				if (!c->dead && c->hfd >= 0)
					host_event(c, evs[i].events);
				break;
			case TAG_CONN_GUEST:
				if (!c->dead && c->gfd >= 0)
					guest_event(c, evs[i].events);
				break;
			case TAG_CTL_CLIENT:
				/* a control client is freed only from its own event */
				ctl_event(t->obj);
				break;
			}
		}
		run_timers();
		bury();
	}
out:
	while (mux.conns)
		conn_kill(mux.conns, "exit");
	bury();
	while (mux.ctls)
		ctl_free(mux.ctls);
	if (mux.hlfd >= 0) {
		close(mux.hlfd);
		unlink(mux.uds);
	}
	if (mux.glfd >= 0) {
		close(mux.glfd);
		unlink(mux.guest_path);
	}
	if (mux.ctlfd >= 0) {
		close(mux.ctlfd);
		unlink(mux.ctl_path);
	}
	close(mux.ep);
	close(mux.sigfd);
	return ret < 0 ? 1 : 0;
}
