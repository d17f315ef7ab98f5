/* The guest's /dev/lxd/sock: every local connection becomes one vsock
 * connection to the host's devlxd port, which starts with the preamble
 * "GLDEVLXD1 <token> <uid>\n" (the token from the host's latest AUTH,
 * the client's SO_PEERCRED uid) and is then relayed byte for byte both
 * ways. Also the announce: one connection at start whose preamble has no
 * token ("-"), so that guestlinkd learns at once that the agent is up. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include "agent/agent.h"

#define PREAMBLE_MAGIC "GLDEVLXD1"
#define ANNOUNCE_REQ PREAMBLE_MAGIC " - 0\n"
#define ANNOUNCE_BACKOFF_MS 25u
#define ANNOUNCE_BACKOFF_MAX_MS 1000u
#define ANNOUNCE_EXCHANGE_MS 5000u
#define RELAY_BUF (64u << 10)
#define PREAMBLE_MAX 128u

typedef struct relay relay;

typedef struct relay_side {
	uv_pipe_t h;
	relay *r;
	bool open;      /* handle initialised, not closed */
	bool reading;
	bool throttled; /* stopped because the other side's queue is full */
	unsigned writes; /* writes in flight toward this side */
} relay_side;

struct relay {
	agent_proxy *p;
	relay_side s[2]; /* 0: the local client, 1: the host */
	gl_vsock_dial *dial;
	uid_t uid; /* the local client's */
	bool ending;
	unsigned handles;
	relay *next, *prev;
};

typedef struct relay_write {
	uv_write_t w;
	relay_side *to;
	char *base;
} relay_write;

struct agent_proxy {
	gl_agent *a;
	uv_pipe_t server;
	bool server_open;
	relay *relays;
	/* announce */
	uv_timer_t timer;
	bool timer_open;
	gl_vsock_dial *adial;
	uv_pipe_t ah;
	bool ah_open, ah_got, announced;
	uint64_t backoff_ms;
	uv_write_t aw;
	unsigned handles; /* open handles embedded here */
	bool stopped;     /* freed when the last handle is closed */
};

static agent_proxy *proxy_get(gl_agent *a)
{
	if (!a->proxy) {
		a->proxy = calloc(1, sizeof(*a->proxy));
		if (a->proxy)
			a->proxy->a = a;
	}
	return a->proxy;
}

static void proxy_unref(agent_proxy *p)
{
	if (--p->handles == 0 && p->stopped)
		free(p);
}

static void proxy_handle_closed(uv_handle_t *h)
{
	proxy_unref(h->data);
}

static void host_addr(const gl_agent *a, gl_vsock_addr *to)
{
	*to = a->transport;
	to->cid = GL_VSOCK_CID_HOST;
	to->port = GL_VSOCK_DEVLXD_PORT;
}

static void dial_opts(gl_vsock_dial_opts *o)
{
	gl_vsock_dial_opts_default(o);
	o->guest_role = true;
	o->deadline_ms = 0; /* one attempt: the caller decides about retrying */
}

/* ---- relay ----------------------------------------------------------------- */

static void relay_read_cb(uv_stream_t *s, ssize_t n, const uv_buf_t *buf);
static void relay_end(relay *r);

static void relay_handle_closed(uv_handle_t *h)
{
	relay *r = h->data;

	if (--r->handles)
		return;
	if (r->p) {
		if (r->prev)
			r->prev->next = r->next;
		else
			r->p->relays = r->next;
		if (r->next)
			r->next->prev = r->prev;
	}
	free(r);
}

static void side_close(relay_side *sd)
{
	if (!sd->open)
		return;
	sd->open = false;
	sd->reading = false;
	sd->h.data = sd->r;
	uv_close((uv_handle_t *)&sd->h, relay_handle_closed);
}

static void relay_alloc(uv_handle_t *h, size_t hint, uv_buf_t *buf)
{
	buf->base = malloc(RELAY_BUF);
	buf->len = buf->base ? RELAY_BUF : 0;
}

static void side_read(relay_side *sd, bool on)
{
	if (!sd->open || sd->reading == on || (on && sd->r->ending))
		return;
	if (on) {
		if (uv_read_start((uv_stream_t *)&sd->h, relay_alloc, relay_read_cb) == 0)
			sd->reading = true;
	} else {
		uv_read_stop((uv_stream_t *)&sd->h);
		sd->reading = false;
	}
}

static size_t side_queued(relay_side *sd)
{
	return sd->open ? uv_stream_get_write_queue_size((uv_stream_t *)&sd->h) : 0;
}

static void relay_write_cb(uv_write_t *w, int status)
{
	relay_write *rw = (relay_write *)w;
	relay_side *to = rw->to, *from;
	relay *r = to->r;

	free(rw->base);
	free(rw);
	to->writes--;
	from = &r->s[to == &r->s[0] ? 1 : 0];
	if (status == UV_ECANCELED)
		return; /* `to` is being closed: the other side keeps its own queue */
	if (status < 0) {
		/* The receiver is gone: nothing more can be delivered. */
		r->ending = true;
		side_close(to);
		side_close(from);
		return;
	}
	if (r->ending) {
		if (to->writes == 0)
			side_close(to);
		return;
	}
	if (from->throttled && side_queued(to) < AGENT_RELAY_LOW) {
		from->throttled = false;
		side_read(from, true);
	}
}

static void relay_read_cb(uv_stream_t *s, ssize_t n, const uv_buf_t *buf)
{
	relay_side *from = (relay_side *)s;
	relay *r = from->r;
	relay_side *to = &r->s[from == &r->s[0] ? 1 : 0];
	relay_write *rw;
	uv_buf_t b;

	if (n < 0) {
		free(buf->base);
		/* EOF or error from one side: the whole exchange is over (no
		 * half-close), once what is already read has been delivered. */
		side_close(from);
		relay_end(r);
		return;
	}
	if (n == 0) {
		free(buf->base);
		return;
	}
	rw = malloc(sizeof(*rw));
	if (!rw || !to->open) {
		free(rw);
		free(buf->base);
		r->ending = true;
		side_close(from);
		side_close(to);
		return;
	}
	rw->to = to;
	rw->base = buf->base;
	b = uv_buf_init(buf->base, (unsigned)n);
	if (uv_write(&rw->w, (uv_stream_t *)&to->h, &b, 1, relay_write_cb) < 0) {
		free(rw->base);
		free(rw);
		r->ending = true;
		side_close(from);
		side_close(to);
		return;
	}
	to->writes++;
	if (side_queued(to) > AGENT_RELAY_HIGH) {
		from->throttled = true;
		side_read(from, false);
	}
}

static void relay_end(relay *r)
{
	r->ending = true;
	if (r->dial) {
		gl_vsock_dial_cancel(r->dial);
		r->dial = NULL;
	}
	for (int i = 0; i < 2; i++) {
		side_read(&r->s[i], false);
		if (r->s[i].writes == 0)
			side_close(&r->s[i]);
	}
}

/* The first bytes toward the host, queued before anything relayed. */
static int send_preamble(relay *r)
{
	gl_agent *a = r->p->a;
	relay_side *to = &r->s[1];
	char tok[2 * sizeof(a->devlxd_token) + 1] = "-";
	relay_write *rw;
	uv_buf_t b;
	int n;

	rw = malloc(sizeof(*rw));
	if (!rw)
		return -ENOMEM;
	rw->base = malloc(PREAMBLE_MAX);
	if (!rw->base) {
		free(rw);
		return -ENOMEM;
	}
	if (a->has_devlxd_token)
		gl_auth_hex(a->devlxd_token, sizeof(a->devlxd_token), tok);
	n = snprintf(rw->base, PREAMBLE_MAX, PREAMBLE_MAGIC " %s %u\n", tok, (unsigned)r->uid);
	rw->to = to;
	b = uv_buf_init(rw->base, (unsigned)n);
	if (uv_write(&rw->w, (uv_stream_t *)&to->h, &b, 1, relay_write_cb) < 0) {
		free(rw->base);
		free(rw);
		return -EIO;
	}
	to->writes++;
	return 0;
}

static void relay_dialed(void *arg, int status, int fd)
{
	relay *r = arg;
	gl_agent *a = r->p->a;
	int ret;

	r->dial = NULL;
	if (status < 0) {
		agent_log(a, 1, "devlxd: cannot reach the host: %s", strerror(-status));
		relay_end(r);
		return;
	}
	ret = uv_pipe_init(a->loop, &r->s[1].h, 0);
	if (ret < 0) {
		close(fd);
		relay_end(r);
		return;
	}
	r->s[1].open = true;
	r->handles++;
	ret = uv_pipe_open(&r->s[1].h, fd);
	if (ret < 0) {
		close(fd);
		relay_end(r);
		return;
	}
	if (send_preamble(r) < 0) {
		relay_end(r);
		return;
	}
	side_read(&r->s[0], true);
	side_read(&r->s[1], true);
}

/* Who is on the other end: the uid the host is told (root or not). */
static int peer_uid(uv_pipe_t *h, uid_t *uid)
{
	struct ucred cr;
	socklen_t len = sizeof(cr);
	uv_os_fd_t fd;

	if (uv_fileno((uv_handle_t *)h, &fd) < 0)
		return -EBADF;
	if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cr, &len) < 0)
		return -errno;
	/* (uid_t)-1 cannot be vouched for: the host takes 0..4294967294 */
	if (cr.uid == (uid_t)-1)
		return -EPERM;
	*uid = cr.uid;
	return 0;
}

static void on_local_conn(uv_stream_t *server, int status)
{
	agent_proxy *p = server->data;
	gl_agent *a = p->a;
	gl_vsock_dial_opts o;
	gl_vsock_addr to;
	relay *r;
	int ret;

	if (status < 0)
		return;
	r = calloc(1, sizeof(*r));
	if (!r)
		return;
	r->p = p;
	r->s[0].r = r->s[1].r = r;
	if (uv_pipe_init(a->loop, &r->s[0].h, 0) < 0) {
		free(r);
		return;
	}
	r->s[0].open = true;
	r->handles = 1;
	r->next = p->relays;
	if (p->relays)
		p->relays->prev = r;
	p->relays = r;
	if (uv_accept(server, (uv_stream_t *)&r->s[0].h) < 0 || peer_uid(&r->s[0].h, &r->uid) < 0) {
		relay_end(r);
		return;
	}
	host_addr(a, &to);
	dial_opts(&o);
	ret = gl_vsock_dial_start(a->loop, &to, &o, relay_dialed, r, &r->dial);
	if (ret < 0) {
		r->dial = NULL;
		agent_log(a, 1, "devlxd: dial: %s", strerror(-ret));
		relay_end(r);
	}
}

/* mkdir -p of path's parents, 0755. */
static int make_parents(const char *path)
{
	char *dup = strdup(path), *s;
	int ret = 0;

	if (!dup)
		return -ENOMEM;
	for (s = dup + 1; (s = strchr(s, '/')); s++) {
		*s = '\0';
		if (mkdir(dup, 0755) < 0 && errno != EEXIST) {
			ret = -errno;
			break;
		}
		*s = '/';
	}
	free(dup);
	return ret;
}

int agent_proxy_start(gl_agent *a, char *err, size_t errlen)
{
	agent_proxy *p = proxy_get(a);
	struct stat st;
	int ret;

	if (!p) {
		snprintf(err, errlen, "out of memory");
		return -ENOMEM;
	}
	ret = make_parents(a->devlxd_path);
	if (ret < 0) {
		snprintf(err, errlen, "creating its directory: %s", strerror(-ret));
		return ret;
	}
	/* A stale socket from an earlier run is replaced; anything else is not ours. */
	if (lstat(a->devlxd_path, &st) == 0) {
		if (!S_ISSOCK(st.st_mode)) {
			snprintf(err, errlen, "exists and is not a socket");
			return -EEXIST;
		}
		unlink(a->devlxd_path);
	}
	ret = uv_pipe_init(a->loop, &p->server, 0);
	if (ret < 0)
		goto fail;
	p->server_open = true;
	p->handles++;
	p->server.data = p;
	ret = uv_pipe_bind(&p->server, a->devlxd_path);
	if (ret < 0)
		goto fail;
	if (chmod(a->devlxd_path, 0666) < 0) {
		ret = -errno;
		goto fail;
	}
	ret = uv_listen((uv_stream_t *)&p->server, 1024, on_local_conn);
	if (ret < 0)
		goto fail;
	return 0;
fail:
	snprintf(err, errlen, "%s", uv_strerror(ret));
	if (p->server_open) {
		uv_close((uv_handle_t *)&p->server, proxy_handle_closed);
		p->server_open = false;
	}
	return ret;
}

/* ---- announce -------------------------------------------------------------- */

static void announce_dial(agent_proxy *p);
static void announce_close(agent_proxy *p, bool ok);

static void announce_timer_cb(uv_timer_t *t)
{
	agent_proxy *p = t->data;

	/* The exchange took too long: drop it; the retry follows its close
	 * (the handle is reused). */
	if (p->ah_open)
		announce_close(p, false);
	else
		announce_dial(p);
}

static void announce_retry(agent_proxy *p)
{
	if (p->a->stopping || !p->timer_open)
		return;
	uv_timer_start(&p->timer, announce_timer_cb, p->backoff_ms, 0);
	p->backoff_ms *= 2;
	if (p->backoff_ms > ANNOUNCE_BACKOFF_MAX_MS)
		p->backoff_ms = ANNOUNCE_BACKOFF_MAX_MS;
}

static void announce_ah_closed(uv_handle_t *h)
{
	agent_proxy *p = h->data;

	if (p->announced) {
		agent_log(p->a, 1, "announced to the host");
		if (p->timer_open) {
			p->timer_open = false;
			uv_close((uv_handle_t *)&p->timer, proxy_handle_closed);
		}
	} else {
		announce_retry(p);
	}
	proxy_unref(p);
}

static void announce_close(agent_proxy *p, bool ok)
{
	if (!p->ah_open)
		return;
	p->ah_open = false;
	p->announced = ok;
	if (p->timer_open)
		uv_timer_stop(&p->timer);
	p->ah.data = p;
	uv_close((uv_handle_t *)&p->ah, announce_ah_closed);
}

static void announce_alloc(uv_handle_t *h, size_t hint, uv_buf_t *buf)
{
	static char sink[4096];

	buf->base = sink;
	buf->len = sizeof(sink);
}

static void announce_read_cb(uv_stream_t *s, ssize_t n, const uv_buf_t *buf)
{
	agent_proxy *p = s->data;

	/* The host ends the exchange once it has read the line (it closes a
	 * preamble without a token; with --vm-devlxd-auth none it answers
	 * 400): the announce reached it. No half-close from us: Firecracker
	 * turns it into a full close. */
	if (n < 0)
		announce_close(p, p->ah_got);
}

static void announce_write_cb(uv_write_t *w, int status)
{
	agent_proxy *p = w->data;

	if (status < 0) {
		announce_close(p, false);
		return;
	}
	p->ah_got = true;
}

static void announce_dialed(void *arg, int status, int fd)
{
	agent_proxy *p = arg;
	gl_agent *a = p->a;
	uv_buf_t b = uv_buf_init((char *)ANNOUNCE_REQ, sizeof(ANNOUNCE_REQ) - 1);

	p->adial = NULL;
	if (status < 0) {
		agent_log(a, 2, "announce: %s", strerror(-status));
		announce_retry(p);
		return;
	}
	if (uv_pipe_init(a->loop, &p->ah, 0) < 0) {
		close(fd);
		announce_retry(p);
		return;
	}
	p->ah.data = p;
	p->ah_open = true;
	p->handles++;
	p->ah_got = false;
	if (uv_pipe_open(&p->ah, fd) < 0) {
		close(fd);
		announce_close(p, false);
		return;
	}
	p->aw.data = p;
	if (uv_write(&p->aw, (uv_stream_t *)&p->ah, &b, 1, announce_write_cb) < 0 ||
	    uv_read_start((uv_stream_t *)&p->ah, announce_alloc, announce_read_cb) < 0) {
		announce_close(p, false);
		return;
	}
	uv_timer_start(&p->timer, announce_timer_cb, ANNOUNCE_EXCHANGE_MS, 0);
}

static void announce_dial(agent_proxy *p)
{
	gl_vsock_dial_opts o;
	gl_vsock_addr to;
	int ret;

	if (p->a->stopping)
		return;
	host_addr(p->a, &to);
	dial_opts(&o);
	ret = gl_vsock_dial_start(p->a->loop, &to, &o, announce_dialed, p, &p->adial);
	if (ret < 0) {
		p->adial = NULL;
		agent_log(p->a, 1, "announce: %s", strerror(-ret));
		announce_retry(p);
	}
}

void agent_announce_start(gl_agent *a)
{
	agent_proxy *p = proxy_get(a);

	if (!p)
		return;
	if (uv_timer_init(a->loop, &p->timer) < 0)
		return;
	p->timer.data = p;
	p->timer_open = true;
	p->handles++;
	p->backoff_ms = ANNOUNCE_BACKOFF_MS;
	announce_dial(p);
}

void agent_proxy_stop(gl_agent *a)
{
	agent_proxy *p = a->proxy;
	relay *r, *next;

	if (!p)
		return;
	a->proxy = NULL;
	p->stopped = true;
	p->handles++; /* held across the closes below */
	if (p->server_open) {
		p->server_open = false;
		p->server.data = p;
		uv_close((uv_handle_t *)&p->server, proxy_handle_closed);
		if (a->devlxd_path)
			unlink(a->devlxd_path);
	}
	for (r = p->relays; r; r = next) {
		next = r->next;
		r->p = NULL;
		r->ending = true;
		if (r->dial) {
			gl_vsock_dial_cancel(r->dial);
			r->dial = NULL;
		}
		side_close(&r->s[0]);
		side_close(&r->s[1]);
	}
	p->relays = NULL;
	if (p->adial) {
		gl_vsock_dial_cancel(p->adial);
		p->adial = NULL;
	}
	if (p->ah_open) {
		p->ah_open = false;
		p->ah.data = p;
		uv_close((uv_handle_t *)&p->ah, proxy_handle_closed);
	}
	if (p->timer_open) {
		p->timer_open = false;
		p->timer.data = p;
		uv_close((uv_handle_t *)&p->timer, proxy_handle_closed);
	}
	proxy_unref(p);
}
