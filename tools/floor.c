/* floor: the smallest HTTP/1.1 server this machine can run on a Unix
 * socket, the baseline of the devlxd benchmarks. One thread, one epoll set,
 * no peer identity, no routing: every request gets
 *
 *   HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nbar
 *
 * It honours keep-alive the way any HTTP/1.1 server must (persistent by
 * default, `Connection: close` answered with `Connection: close` and a
 * close, HTTP/1.0 closed unless it asks for keep-alive), answers pipelined
 * requests in order, and skips request bodies that carry a Content-Length.
 *
 *   floor --socket PATH [--body TEXT]
 *
 * Prints "floor pid=N socket=PATH" on stdout once it listens; SIGINT or
 * SIGTERM removes the socket and exits 0. */
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#define IN_MAX (64 * 1024)    /* a request head or body bigger than this: closed */
#define OUT_MAX (1024 * 1024) /* unsent responses per connection (a client that never reads) */
#define READ_BUDGET 16        /* reads per wake-up, so one client cannot starve the others */

typedef struct conn {
	int fd;
	char in[IN_MAX];
	size_t nin;
	size_t skip;   /* body bytes of the current request still to discard */
	char *out;
	size_t nout, out_off, out_cap;
	bool closing;  /* close once everything queued is written */
	bool want_out; /* EPOLLOUT registered */
} conn;

static volatile sig_atomic_t stop_flag;

static void on_signal(int sig)
{
	(void)sig;
	stop_flag = 1;
}

static char response_ka[128];
static char response_close[160];
static size_t response_ka_len, response_close_len;

static int make_responses(const char *body)
{
	size_t blen = strlen(body);
	int n;

	n = snprintf(response_ka, sizeof(response_ka),
		     "HTTP/1.1 200 OK\r\nContent-Length: %zu\r\n\r\n%s", blen, body);
	if (n < 0 || (size_t)n >= sizeof(response_ka))
		return -EINVAL;
	response_ka_len = (size_t)n;
	n = snprintf(response_close, sizeof(response_close),
		     "HTTP/1.1 200 OK\r\nContent-Length: %zu\r\nConnection: close\r\n\r\n%s", blen,
		     body);
	if (n < 0 || (size_t)n >= sizeof(response_close))
		return -EINVAL;
	response_close_len = (size_t)n;
	return 0;
}

/* ---- request heads --------------------------------------------------------- */

/* End of the head (index after the blank line), or 0 when incomplete.
 * Accepts LF-only line endings, as Go does. */
static size_t head_end(const char *p, size_t n)
{
	size_t i;

	for (i = 0; i + 1 < n; i++) {
		if (p[i] != '\n')
			continue;
		if (p[i + 1] == '\n')
			return i + 2;
		if (p[i + 1] == '\r' && i + 2 < n && p[i + 2] == '\n')
			return i + 3;
	}
	return 0;
}

static bool has_token(const char *v, size_t n, const char *tok)
{
	size_t tl = strlen(tok), i = 0;

	while (i < n) {
		size_t s, e;

		while (i < n && (v[i] == ' ' || v[i] == '\t' || v[i] == ','))
			i++;
		s = i;
		while (i < n && v[i] != ',')
			i++;
		e = i;
		while (e > s && (v[e - 1] == ' ' || v[e - 1] == '\t'))
			e--;
		if (e - s == tl && strncasecmp(v + s, tok, tl) == 0)
			return true;
	}
	return false;
}

/* What the head asks for: keep the connection, and how many body bytes follow. */
static int inspect_head(const char *p, size_t n, bool *keep, size_t *body)
{
	const char *line = p, *end = p + n;
	bool http10 = false, ka = false, close_tok = false;
	bool first = true;

	*body = 0;
	while (line < end) {
		const char *nl = memchr(line, '\n', (size_t)(end - line));
		size_t len;

		if (!nl)
			break;
		len = (size_t)(nl - line);
		if (len && line[len - 1] == '\r')
			len--;
		if (first) {
			if (len >= 8 && memcmp(line + len - 8, "HTTP/1.0", 8) == 0)
				http10 = true;
			else if (len < 8 || memcmp(line + len - 8, "HTTP/1.", 7) != 0)
				return -EINVAL;
			first = false;
		} else if (len) {
			const char *colon = memchr(line, ':', len);
			const char *v;
			size_t vl;

			if (!colon)
				return -EINVAL;
			v = colon + 1;
			vl = len - (size_t)(v - line);
			if ((size_t)(colon - line) == 10 && strncasecmp(line, "connection", 10) == 0) {
				ka |= has_token(v, vl, "keep-alive");
				close_tok |= has_token(v, vl, "close");
			} else if ((size_t)(colon - line) == 14 &&
				   strncasecmp(line, "content-length", 14) == 0) {
				char num[24];
				char *e;
				unsigned long long cl;

				while (vl && (*v == ' ' || *v == '\t'))
					v++, vl--;
				if (!vl || vl >= sizeof(num))
					return -EINVAL;
				memcpy(num, v, vl);
				num[vl] = 0;
				errno = 0;
				cl = strtoull(num, &e, 10);
				while (*e == ' ' || *e == '\t')
					e++;
				if (errno || *e || cl > IN_MAX)
					return -EINVAL;
				*body = (size_t)cl;
			}
		}
		line = nl + 1;
	}
	*keep = !close_tok && (!http10 || ka);
	return 0;
}

/* ---- connections ------------------------------------------------------------- */

static int epfd;

static void conn_free(conn *c)
{
	epoll_ctl(epfd, EPOLL_CTL_DEL, c->fd, NULL);
	close(c->fd);
	free(c->out);
	free(c);
}

static int queue_out(conn *c, const char *p, size_t n)
{
	if (c->out_off == c->nout)
		c->out_off = c->nout = 0;
	if (c->nout + n > c->out_cap) {
		size_t cap = c->out_cap ? c->out_cap : 4096;
		char *np;

		while (cap < c->nout + n)
			cap *= 2;
		if (cap > OUT_MAX)
			return -ENOBUFS;
		np = realloc(c->out, cap);
		if (!np)
			return -ENOMEM;
		c->out = np;
		c->out_cap = cap;
	}
	memcpy(c->out + c->nout, p, n);
	c->nout += n;
	return 0;
}

/* Answer every complete request in the buffer. */
static int parse_requests(conn *c)
{
	size_t off = 0;
	int err = 0;

	while (!c->closing) {
		size_t he, body;
		bool keep;

		if (c->skip) {
			size_t k = c->nin - off < c->skip ? c->nin - off : c->skip;

			off += k;
			c->skip -= k;
			if (c->skip)
				break;
		}
		he = head_end(c->in + off, c->nin - off);
		if (!he) {
			if (c->nin - off >= IN_MAX)
				err = -E2BIG;
			break;
		}
		err = inspect_head(c->in + off, he, &keep, &body);
		if (err)
			break;
		off += he;
		c->skip = body;
		if (keep) {
			err = queue_out(c, response_ka, response_ka_len);
		} else {
			err = queue_out(c, response_close, response_close_len);
			c->closing = true;
		}
		if (err)
			break;
	}
	memmove(c->in, c->in + off, c->nin - off);
	c->nin -= off;
	return err;
}

/* 1: everything written, 0: more to write later, < 0: error. */
static int flush_out(conn *c)
{
	while (c->out_off < c->nout) {
		ssize_t w = send(c->fd, c->out + c->out_off, c->nout - c->out_off, MSG_NOSIGNAL);

		if (w < 0) {
			if (errno == EINTR)
				continue;
			if (errno == EAGAIN)
				return 0;
			return -errno;
		}
		c->out_off += (size_t)w;
	}
	return 1;
}

static int set_out_interest(conn *c, bool want)
{
	struct epoll_event ev = { .events = EPOLLIN | (want ? EPOLLOUT : 0), .data.ptr = c };

	if (want == c->want_out)
		return 0;
	c->want_out = want;
	return epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev) < 0 ? -errno : 0;
}

static void conn_event(conn *c, uint32_t events)
{
	int i, r;

	if (events & EPOLLIN) {
		for (i = 0; i < READ_BUDGET && !c->closing; i++) {
			ssize_t n = read(c->fd, c->in + c->nin, sizeof(c->in) - c->nin);

			if (n == 0) {
				/* Answer what was asked before the peer's EOF, then close. */
				c->closing = true;
				break;
			}
			if (n < 0) {
				if (errno == EINTR)
					continue;
				if (errno == EAGAIN)
					break;
				goto gone;
			}
			c->nin += (size_t)n;
			if (parse_requests(c) < 0)
				goto gone;
		}
	} else if (events & (EPOLLHUP | EPOLLERR)) {
		goto gone;
	}
	r = flush_out(c);
	if (r < 0)
		goto gone;
	if (r == 1 && c->closing)
		goto gone;
	if (set_out_interest(c, r == 0) < 0)
		goto gone;
	return;
gone:
	conn_free(c);
}

static int listen_on(const char *path)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	struct stat st;
	int fd, err;

	if (strlen(path) >= sizeof(sa.sun_path))
		return -ENAMETOOLONG;
	strcpy(sa.sun_path, path);
	if (lstat(path, &st) == 0) {
		if (!S_ISSOCK(st.st_mode))
			return -EEXIST;
		unlink(path);
	}
	fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return -errno;
	if (bind(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0)
		goto fail;
	chmod(path, 0666);
	if (listen(fd, 4096) < 0)
		goto fail;
	return fd;
fail:
	err = -errno;
	close(fd);
	return err;
}

static void accept_all(int lfd)
{
	for (;;) {
		struct epoll_event ev = { .events = EPOLLIN };
		conn *c;
		int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);

		if (fd < 0) {
			if (errno == EINTR || errno == ECONNABORTED)
				continue;
			if (errno != EAGAIN)
				fprintf(stderr, "floor: accept: %s\n", strerror(errno));
			return;
		}
		c = calloc(1, sizeof(*c));
		if (!c) {
			close(fd);
			continue;
		}
		c->fd = fd;
		ev.data.ptr = c;
		if (epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev) < 0) {
			close(fd);
			free(c);
		}
	}
}

static void usage(void)
{
	fprintf(stderr, "usage: floor --socket PATH [--body TEXT]\n");
	exit(2);
}

int main(int argc, char **argv)
{
	const char *path = NULL, *body = "bar";
	struct epoll_event lev = { .events = EPOLLIN, .data.ptr = NULL };
	struct epoll_event evs[256];
	struct sigaction sa = { .sa_handler = on_signal };
	int i, lfd;

	for (i = 1; i < argc; i++) {
		if (strcmp(argv[i], "--socket") == 0 && i + 1 < argc)
			path = argv[++i];
		else if (strcmp(argv[i], "--body") == 0 && i + 1 < argc)
			body = argv[++i];
		else
			usage();
	}
	if (!path || make_responses(body) < 0)
		usage();
	sigaction(SIGINT, &sa, NULL);
	sigaction(SIGTERM, &sa, NULL);
	signal(SIGPIPE, SIG_IGN);

	lfd = listen_on(path);
	if (lfd < 0) {
		fprintf(stderr, "floor: cannot listen on %s: %s\n", path, strerror(-lfd));
		return 1;
	}
	epfd = epoll_create1(EPOLL_CLOEXEC);
	if (epfd < 0 || epoll_ctl(epfd, EPOLL_CTL_ADD, lfd, &lev) < 0) {
		perror("floor: epoll");
		unlink(path);
		return 1;
	}
	printf("floor pid=%d socket=%s\n", (int)getpid(), path);
	fflush(stdout);

	while (!stop_flag) {
		int n = epoll_wait(epfd, evs, (int)(sizeof(evs) / sizeof(evs[0])), -1);

		if (n < 0) {
			if (errno == EINTR)
				continue;
			perror("floor: epoll_wait");
			break;
		}
		for (i = 0; i < n; i++) {
			if (!evs[i].data.ptr)
				accept_all(lfd);
			else
				conn_event(evs[i].data.ptr, evs[i].events);
		}
	}
	unlink(path);
	return 0;
}
