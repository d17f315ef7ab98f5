/* VM transports, agent monitors and relay links (see vm.h).
 *
 * One record per VM with a transport, found by instance uid. A record
 * embeds the monitor's timer (backoff wait, then the ping interval), so it
 * is freed in that timer's close callback; everything that may call back
 * later (dials, the monitor's connection) is cancelled or rebound to
 * no-op callbacks before the record goes. */
#include "bridge/vm.h"

#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <sodium.h>

#include "bridge/agentlink.h"
#include "bridge/vsock.h"

#define MON_BACKOFF_MIN 100u
#define MON_BACKOFF_MAX 5000u
#define MON_ATTEMPT_MS 2000u
#define INSTANCE_ID_KEY "volatile.cloud-init.instance-id"

/* The devlxd preamble: "GLDEVLXD1 <64 hex | -> <uid>\n" */
#define PRE_MAGIC "GLDEVLXD1 "
#define PRE_MAX 128u
#define PRE_DEADLINE_MS 5000u
#define PRE_MAX_PER_VM 1024u

typedef struct vmrec vmrec;
typedef struct preamble preamble;

enum lstate { L_QUEUED, L_DIALING, L_HELD, L_DETACHED };

struct gl_vm_link {
	gl_vm *vm;
	vmrec *rec; /* NULL once detached */
	enum lstate st;
	gl_vm_link_cb cb;
	void *arg;
	gl_agentlink *dial;
	gl_vm_link *prev, *next; /* rec's queue (L_QUEUED) or its active list */
	gl_vm_link *dnext;       /* the deferred-callback list */
	int status;              /* deferred outcome */
	unsigned retries;        /* failed dials while the agent was online */
	bool in_defer, released;
};

/* A relay's dial that fails while the monitor sees the agent online is
 * retried (first in line) this many times: under load a handshake can miss
 * its deadline, and one unlucky failure must not fail every request queued
 * behind it. */
#define LINK_RETRIES 8

struct vmrec {
	uv_timer_t timer; /* first: handle -> record */
	gl_vm *vm;
	vmrec *next;
	uint64_t uid;
	uint64_t serial; /* this record, not another with the same uid later */
	char *name, *iid;
	char uds[108];
	uint8_t token[GL_AGENTLINK_TOKEN]; /* the agent's, for devlxd preambles */
	unsigned pending; /* preambles being read */
	uint32_t cid;
	gl_vsock_listener *lst;
	/* monitor */
	gl_agentlink *dial;
	gl_fconn *link;
	bool online, ever, auth_logged, ping_out, dead;
	uint64_t backoff;
	uint32_t ping_id;
	uint64_t ping_sent; /* uv_hrtime */
	gl_vm_agent_info info;
	/* relay links */
	unsigned active;
	unsigned cap; /* links at once: max_agent_conns, lowered to what the
	                 agent was seen to accept (its own --max-conns) */
	gl_vm_link *qhead, *qtail;
	gl_vm_link *links;
};

struct gl_vm {
	uv_loop_t *loop;
	gl_model *m;
	gl_devlxd *d;
	gl_vm_opts o;
	vmrec *recs;
	gl_vsock_listener *cid_lst;
	bool cid_failed_logged;
	uv_timer_t defer;
	gl_vm_link *dhead, *dtail;
	preamble *pre;  /* connections whose preamble is being read */
	uint64_t serials;
	int open_handles;
	bool stopping;
};

/* A connection on a devlxd transport, until its first line is read. The
 * poll and the timer are closed before the fd goes anywhere. */
struct preamble {
	gl_vm *vm;
	uint64_t serial; /* its record's */
	int fd;
	uv_poll_t poll;
	uv_timer_t timer;
	int handles;
	size_t len;
	char line[PRE_MAX + 1];
	preamble *prev, *next;
};

/* ---- small helpers ------------------------------------------------------------ */

static void vlog(const char *level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static void vlog(const char *level, const char *fmt, ...)
{
	char line[1024];
	va_list ap;
	int n;

	n = snprintf(line, sizeof(line), "guestlinkd: %s: ", level);
	va_start(ap, fmt);
	n += vsnprintf(line + n, sizeof(line) - (size_t)n - 1, fmt, ap);
	va_end(ap);
	if (n > (int)sizeof(line) - 2)
		n = (int)sizeof(line) - 2;
	line[n++] = '\n';
	/* one write: lines of concurrent writers never mix */
	if (write(STDERR_FILENO, line, (size_t)n) < 0)
		return;
}

static int64_t realtime_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_REALTIME, &ts);
	return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* RFC 3339 UTC with milliseconds: 2026-11-23T07:04:05.123Z */
static void rfc3339_ms(int64_t ns, char out[32])
{
	time_t s = (time_t)(ns / 1000000000);
	struct tm tm;
	size_t n;

	gmtime_r(&s, &tm);
	n = strftime(out, 32, "%Y-%m-%dT%H:%M:%S", &tm);
	snprintf(out + n, 32 - n, ".%03dZ", (int)(ns / 1000000 % 1000));
}

static vmrec *rec_find(gl_vm *vm, uint64_t uid)
{
	for (vmrec *r = vm->recs; r; r = r->next)
		if (r->uid == uid)
			return r;
	return NULL;
}

static gl_instance *rec_instance(vmrec *r)
{
	gl_instance *i = gl_model_find(r->vm->m, r->name);

	return i && gl_instance_uid(i) == r->uid ? i : NULL;
}

static char *instance_id_of(const gl_instance *i)
{
	const gl_entry *e = gl_instance_config_get(i, INSTANCE_ID_KEY, strlen(INSTANCE_ID_KEY));

	return strdup(e ? e->value : "");
}

static void dial_addr(const vmrec *r, uint32_t port, gl_vsock_addr *a)
{
	memset(a, 0, sizeof(*a));
	a->port = port;
	if (r->uds[0]) {
		a->kind = GL_VSOCK_HYBRID;
		memcpy(a->path, r->uds, sizeof(a->path));
	} else {
		a->kind = GL_VSOCK_CID;
		a->cid = r->cid;
	}
}

/* ---- the agent file --------------------------------------------------------------- */

static void show_status(vmrec *r)
{
	gl_instance *i = rec_instance(r);
	char ts[32], text[256];

	if (!i)
		return;
	if (!r->ever) {
		gl_instance_set_agent_status(r->vm->m, i, NULL);
		return;
	}
	rfc3339_ms(r->info.last_ping_ns, ts);
	if (r->online)
		snprintf(text, sizeof(text),
			 "status: online\nversion: %s\nlast-ping: %s\nrtt-us: %" PRIu64,
			 r->info.version, ts, r->info.rtt_us);
	else
		snprintf(text, sizeof(text), "status: offline\nversion: %s\nlast-ping: %s",
			 r->info.version, ts);
	gl_instance_set_agent_status(r->vm->m, i, text);
}

/* ---- the monitor ------------------------------------------------------------------ */

static void mon_dial(vmrec *r);

static void mon_noop_frame(gl_fconn *c, const gl_frame *f, void *arg)
{
}

static void mon_noop_closed(gl_fconn *c, int err, void *arg)
{
}

static const gl_fconn_cbs noop_cbs = {.frame = mon_noop_frame, .closed = mon_noop_closed};

static void on_backoff(uv_timer_t *t)
{
	mon_dial((vmrec *)t);
}

static void mon_wait(vmrec *r)
{
	uint64_t ms = r->backoff;

	r->backoff = r->backoff * 2 > MON_BACKOFF_MAX ? MON_BACKOFF_MAX : r->backoff * 2;
	uv_timer_start(&r->timer, on_backoff, ms, 0);
}

static void on_ping_tick(uv_timer_t *t)
{
	vmrec *r = (vmrec *)t;
	json_t *j;

	if (!r->link)
		return;
	if (r->ping_out) {
		/* a whole interval without an answer: the link is dead even if
		 * the socket does not know it yet (a VM paused or restored) */
		gl_fconn_close(r->link);
		return;
	}
	if (++r->ping_id == 0)
		r->ping_id = 1;
	j = json_pack("{s:s}", "op", "ping");
	if (!j || gl_fconn_send_json(r->link, r->ping_id, GL_FRAME_REQUEST, 0, j) < 0) {
		json_decref(j);
		gl_fconn_close(r->link);
		return;
	}
	json_decref(j);
	r->ping_out = true;
	r->ping_sent = uv_hrtime();
}

static void mon_frame(gl_fconn *c, const gl_frame *f, void *arg)
{
	vmrec *r = arg;
	json_t *j;
	const char *v;

	if (f->type == GL_FRAME_ERROR && f->id == 0) {
		gl_fconn_close(c);
		return;
	}
	if (!r->ping_out || f->id != r->ping_id)
		return;
	if (f->type != GL_FRAME_RESPONSE && f->type != GL_FRAME_ERROR)
		return;
	r->ping_out = false;
	if (f->type == GL_FRAME_ERROR) {
		gl_fconn_close(c);
		return;
	}
	r->info.rtt_us = (uv_hrtime() - r->ping_sent) / 1000;
	r->info.last_ping_ns = realtime_ns();
	j = gl_frame_json(f, NULL, 0);
	v = j ? json_string_value(json_object_get(j, "version")) : NULL;
	if (v)
		snprintf(r->info.version, sizeof(r->info.version), "%s", v);
	json_decref(j);
	show_status(r);
}

static void mon_closed(gl_fconn *c, int err, void *arg)
{
	vmrec *r = arg;

	if (r->link != c)
		return;
	r->link = NULL;
	r->online = r->info.online = false;
	r->ping_out = false;
	uv_timer_stop(&r->timer);
	show_status(r);
	r->backoff = MON_BACKOFF_MIN;
	mon_wait(r);
}

static const gl_fconn_cbs mon_cbs = {.frame = mon_frame, .closed = mon_closed};

static void on_mon_link(void *arg, int status, gl_fconn *c, const gl_agent_hello *h)
{
	vmrec *r = arg;

	r->dial = NULL;
	if (status < 0) {
		if (status == -EPERM && !r->auth_logged) {
			r->auth_logged = true;
			vlog("warning",
			     "agent of %s refused the link: wrong host key, or the agent of "
			     "another VM (instance id)", r->name);
		}
		mon_wait(r);
		return;
	}
	gl_fconn_rebind(c, &mon_cbs, r);
	r->link = c;
	r->online = r->ever = r->info.online = true;
	r->auth_logged = false;
	r->backoff = MON_BACKOFF_MIN;
	snprintf(r->info.version, sizeof(r->info.version), "%s", h ? h->version : "");
	r->info.rtt_us = h ? h->rtt_us : 0;
	r->info.last_ping_ns = realtime_ns();
	show_status(r);
	if (r->vm->o.ping_interval_ms)
		uv_timer_start(&r->timer, on_ping_tick, r->vm->o.ping_interval_ms,
			       r->vm->o.ping_interval_ms);
}

static void mon_dial(vmrec *r)
{
	gl_agentlink_opts ao;
	gl_vsock_addr a;
	int e;

	if (r->dead || r->dial || r->link)
		return;
	memset(&ao, 0, sizeof(ao));
	gl_vsock_dial_opts_default(&ao.dial);
	ao.dial.attempt_ms = MON_ATTEMPT_MS;
	ao.dial.deadline_ms = 0; /* one attempt: the monitor does its own backoff */
	ao.instance_id = r->iid;
	ao.sk = r->vm->o.sk;
	ao.devlxd_token = r->token;
	dial_addr(r, r->vm->o.agent_port, &a);
	e = gl_agentlink_start(r->vm->loop, &a, &ao, on_mon_link, r, &r->dial);
	if (e < 0) {
		r->dial = NULL;
		mon_wait(r);
	}
}

/* Something arrived from the guest: if the agent is not linked, try now
 * instead of waiting out the backoff. */
static void mon_poke(vmrec *r)
{
	if (r->dead || r->link || r->dial)
		return;
	uv_timer_stop(&r->timer);
	r->backoff = MON_BACKOFF_MIN;
	mon_dial(r);
}

/* ---- relay links ------------------------------------------------------------------- */

static void on_defer(uv_timer_t *t)
{
	gl_vm *vm = t->data;

	while (vm->dhead) {
		gl_vm_link *l = vm->dhead;

		vm->dhead = l->dnext;
		if (!vm->dhead)
			vm->dtail = NULL;
		l->dnext = NULL;
		l->in_defer = false;
		if (l->released)
			free(l);
		else
			l->cb(l->arg, l->status, NULL);
	}
}

static void link_defer(gl_vm_link *l, int status)
{
	gl_vm *vm = l->vm;

	l->status = status;
	l->in_defer = true;
	if (vm->dtail)
		vm->dtail->dnext = l;
	else
		vm->dhead = l;
	vm->dtail = l;
	uv_timer_start(&vm->defer, on_defer, 0, 0);
}

static void list_del(gl_vm_link **head, gl_vm_link *l)
{
	if (l->prev)
		l->prev->next = l->next;
	else
		*head = l->next;
	if (l->next)
		l->next->prev = l->prev;
	l->prev = l->next = NULL;
}

/* Out of the record's lists; an active slot is given back. */
static void link_detach(gl_vm_link *l)
{
	vmrec *r = l->rec;

	if (!r)
		return;
	if (l->st == L_QUEUED) {
		if (l->prev)
			l->prev->next = l->next;
		else
			r->qhead = l->next;
		if (l->next)
			l->next->prev = l->prev;
		else
			r->qtail = l->prev;
		l->prev = l->next = NULL;
	} else if (l->st == L_DIALING || l->st == L_HELD) {
		list_del(&r->links, l);
		r->active--;
	}
	if (l->dial) {
		gl_agentlink_cancel(l->dial);
		l->dial = NULL;
	}
	l->rec = NULL;
	l->st = L_DETACHED;
}

static void link_pump(vmrec *r);

static void link_requeue(vmrec *r, gl_vm_link *l)
{
	list_del(&r->links, l);
	r->active--;
	l->st = L_QUEUED;
	l->prev = NULL;
	l->next = r->qhead;
	if (r->qhead)
		r->qhead->prev = l;
	else
		r->qtail = l;
	r->qhead = l;
}

static void on_relay_link(void *arg, int status, gl_fconn *c, const gl_agent_hello *h)
{
	gl_vm_link *l = arg;
	vmrec *r = l->rec;

	l->dial = NULL;
	if (status < 0 && status != -EPERM && r &&
	    (r->active > 1 || (r->online && l->retries < LINK_RETRIES))) {
		/* refused while other links of ours are up: the agent is at its
		 * own connection limit. Wait in line (first) for one of them to
		 * end, and open no more than it took. Refused with none of ours
		 * up while the agent answers pings: a handshake that missed its
		 * deadline under load; try again, one link at a time. */
		if (r->active <= 1)
			l->retries++;
		link_requeue(r, l);
		r->cap = r->active ? r->active : 1;
		if (!r->active)
			link_pump(r);
		return;
	}
	if (status < 0) {
		link_detach(l);
		if (r && !r->active) {
			gl_vm_link *q;

			/* nothing of ours is up and the agent cannot be reached:
			 * those in line would only fail one dial deadline at a time */
			while ((q = r->qhead)) {
				link_detach(q);
				link_defer(q, -EHOSTUNREACH);
			}
		} else if (r) {
			link_pump(r);
		}
		l->cb(l->arg, -EHOSTUNREACH, NULL);
		return;
	}
	l->st = L_HELD;
	/* probe upwards again, one at a time */
	if (r && r->active >= r->cap && r->cap < r->vm->o.max_agent_conns)
		r->cap++;
	l->cb(l->arg, 0, c);
}

static void link_start(vmrec *r, gl_vm_link *l)
{
	gl_agentlink_opts ao;
	gl_vsock_addr a;
	int e;

	l->st = L_DIALING;
	l->prev = NULL;
	l->next = r->links;
	if (r->links)
		r->links->prev = l;
	r->links = l;
	r->active++;
	memset(&ao, 0, sizeof(ao));
	gl_vsock_dial_opts_default(&ao.dial);
	ao.dial.deadline_ms = r->vm->o.link_deadline_ms;
	if (ao.dial.attempt_ms > ao.dial.deadline_ms)
		ao.dial.attempt_ms = ao.dial.deadline_ms;
	ao.instance_id = r->iid;
	ao.sk = r->vm->o.sk;
	ao.devlxd_token = r->token;
	dial_addr(r, r->vm->o.agent_port, &a);
	e = gl_agentlink_start(r->vm->loop, &a, &ao, on_relay_link, l, &l->dial);
	if (e < 0) {
		l->dial = NULL;
		link_detach(l);
		link_defer(l, -EHOSTUNREACH);
	}
}

static void link_pump(vmrec *r)
{
	while (r->qhead && r->active < r->cap) {
		gl_vm_link *l = r->qhead;

		r->qhead = l->next;
		if (r->qhead)
			r->qhead->prev = NULL;
		else
			r->qtail = NULL;
		l->next = NULL;
		link_start(r, l);
	}
}

int gl_vm_link_open(gl_vm *vm, uint64_t uid, gl_vm_link_cb cb, void *arg, gl_vm_link **out)
{
	vmrec *r = vm->stopping ? NULL : rec_find(vm, uid);
	gl_vm_link *l;

	if (!r)
		return -EINVAL;
	l = calloc(1, sizeof(*l));
	if (!l)
		return -ENOMEM;
	l->vm = vm;
	l->rec = r;
	l->cb = cb;
	l->arg = arg;
	l->st = L_QUEUED;
	l->prev = r->qtail;
	if (r->qtail)
		r->qtail->next = l;
	else
		r->qhead = l;
	r->qtail = l;
	*out = l;
	link_pump(r);
	return 0;
}

void gl_vm_link_release(gl_vm_link *l)
{
	vmrec *r;

	if (!l)
		return;
	r = l->rec;
	link_detach(l);
	if (r)
		link_pump(r);
	if (l->in_defer)
		l->released = true; /* freed when its turn comes */
	else
		free(l);
}

/* ---- transports ------------------------------------------------------------------- */

static vmrec *rec_by_serial(gl_vm *vm, uint64_t serial)
{
	for (vmrec *r = vm->recs; r; r = r->next)
		if (r->serial == serial)
			return r;
	return NULL;
}

static void pre_handle_closed(uv_handle_t *h)
{
	preamble *p = h->data;
	gl_vm *vm = p->vm;

	if (--p->handles)
		return;
	free(p);
	vm->open_handles--;
	if (vm->stopping && !vm->open_handles)
		free(vm);
}

/* Stop reading: out of the list, handles closing. The fd is the caller's. */
static void pre_detach(preamble *p)
{
	gl_vm *vm = p->vm;
	vmrec *r = rec_by_serial(vm, p->serial);

	if (r && r->pending)
		r->pending--;
	if (p->prev)
		p->prev->next = p->next;
	else
		vm->pre = p->next;
	if (p->next)
		p->next->prev = p->prev;
	p->prev = p->next = NULL;
	/* the poll first: libuv forgets the fd now, before anyone else has it */
	uv_close((uv_handle_t *)&p->poll, pre_handle_closed);
	uv_close((uv_handle_t *)&p->timer, pre_handle_closed);
}

static void pre_reject(preamble *p)
{
	int fd = p->fd;

	pre_detach(p);
	close(fd);
}

/* "<64 hex> <uid>" after the magic: 0 and *uid when the token is the
 * record's, -EACCES otherwise ("-" included). */
static int pre_check(const vmrec *r, const char *s, size_t n, uid_t *uid)
{
	uint8_t tok[GL_AGENTLINK_TOKEN];
	const char *sp = memchr(s, ' ', n);
	const char *u;
	size_t ulen;
	uint64_t v = 0;
	int ok;

	if (!sp || (size_t)(sp - s) != 2 * GL_AGENTLINK_TOKEN)
		return -EACCES;
	u = sp + 1;
	ulen = n - (size_t)(u - s);
	if (ulen < 1 || ulen > 10 || (u[0] == '0' && ulen > 1))
		return -EACCES;
	for (size_t k = 0; k < ulen; k++) {
		if (u[k] < '0' || u[k] > '9')
			return -EACCES;
		v = v * 10 + (uint64_t)(u[k] - '0');
	}
	if (v > 4294967294ULL)
		return -EACCES;
	if (gl_auth_unhex(s, 2 * GL_AGENTLINK_TOKEN, tok, sizeof(tok)) < 0)
		return -EACCES;
	ok = sodium_memcmp(tok, r->token, sizeof(tok)) == 0;
	sodium_memzero(tok, sizeof(tok));
	if (!ok)
		return -EACCES;
	*uid = (uid_t)v;
	return 0;
}

static void pre_line(preamble *p)
{
	gl_vm *vm = p->vm;
	vmrec *r = rec_by_serial(vm, p->serial);
	size_t m = sizeof(PRE_MAGIC) - 1;
	uid_t guid = 0;
	int fd = p->fd;

	/* p->line holds the line without its "\n" */
	if (!r || r->dead || p->len < m || memcmp(p->line, PRE_MAGIC, m) != 0 ||
	    pre_check(r, p->line + m, p->len - m, &guid) < 0) {
		pre_reject(p);
		return;
	}
	pre_detach(p);
	gl_devlxd_adopt(vm->d, fd, r->uid, guid);
}

static void on_pre_readable(uv_poll_t *h, int status, int events)
{
	preamble *p = h->data;
	char buf[PRE_MAX];
	size_t room = PRE_MAX - p->len;
	ssize_t n;
	char *nl;
	size_t take;

	if (status < 0) {
		pre_reject(p);
		return;
	}
	/* Look, then take exactly up to the newline: what follows it is the
	 * HTTP stream, the devlxd server's to read. */
	n = recv(p->fd, buf, room, MSG_PEEK | MSG_DONTWAIT);
	if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR))
		return;
	if (n <= 0) {
		pre_reject(p);
		return;
	}
	nl = memchr(buf, '\n', (size_t)n);
	take = nl ? (size_t)(nl - buf) + 1 : (size_t)n;
	n = recv(p->fd, p->line + p->len, take, MSG_DONTWAIT);
	if (n != (ssize_t)take) {
		pre_reject(p);
		return;
	}
	p->len += take;
	if (nl) {
		p->len--; /* the newline */
		p->line[p->len] = '\0';
		pre_line(p);
		return;
	}
	if (p->len >= PRE_MAX)
		pre_reject(p);
}

static void on_pre_timeout(uv_timer_t *t)
{
	pre_reject(t->data);
}

/* A connection on r's devlxd transport. */
static void transport_accept(vmrec *r, int fd)
{
	gl_vm *vm = r->vm;
	preamble *p;

	mon_poke(r);
	if (vm->o.devlxd_no_auth) {
		gl_devlxd_adopt(vm->d, fd, r->uid, 0);
		return;
	}
	if (r->pending >= PRE_MAX_PER_VM)
		goto refuse;
	p = calloc(1, sizeof(*p));
	if (!p)
		goto refuse;
	p->vm = vm;
	p->serial = r->serial;
	p->fd = fd;
	if (uv_poll_init(vm->loop, &p->poll, fd) < 0) {
		free(p);
		goto refuse;
	}
	uv_timer_init(vm->loop, &p->timer);
	p->poll.data = p->timer.data = p;
	p->handles = 2;
	vm->open_handles++;
	p->next = vm->pre;
	if (vm->pre)
		vm->pre->prev = p;
	vm->pre = p;
	r->pending++;
	if (uv_poll_start(&p->poll, UV_READABLE | UV_DISCONNECT, on_pre_readable) < 0) {
		pre_reject(p);
		return;
	}
	uv_timer_start(&p->timer, on_pre_timeout, PRE_DEADLINE_MS, 0);
	return;
refuse:
	close(fd);
}

/* Close the preambles still being read on r's transports. */
static void pre_drop(gl_vm *vm, uint64_t serial)
{
	preamble *p, *next;

	for (p = vm->pre; p; p = next) {
		next = p->next;
		if (p->serial == serial)
			pre_reject(p);
	}
}

static void on_uds_accept(void *arg, int fd, uint32_t peer_cid)
{
	vmrec *r = arg;

	if (r->dead) {
		close(fd);
		return;
	}
	transport_accept(r, fd);
}

static void on_cid_accept(void *arg, int fd, uint32_t peer_cid)
{
	gl_vm *vm = arg;
	vmrec *r;

	for (r = vm->recs; r; r = r->next)
		if (r->cid && r->cid == peer_cid)
			break;
	if (!r) {
		close(fd);
		return;
	}
	transport_accept(r, fd);
}

/* The AF_VSOCK listener runs while some VM is bound to a cid. */
static void cid_listener_sync(gl_vm *vm)
{
	gl_vsock_addr a = {.kind = GL_VSOCK_CID};
	char err[256] = "";
	bool want = false;
	int e;

	for (vmrec *r = vm->recs; r && !want; r = r->next)
		want = r->cid != 0;
	if (!want && vm->cid_lst) {
		gl_vsock_listen_stop(vm->cid_lst);
		vm->cid_lst = NULL;
	}
	if (!want || vm->cid_lst || vm->stopping)
		return;
	a.cid = UINT32_MAX; /* VMADDR_CID_ANY */
	a.port = vm->o.vsock_port;
	e = gl_vsock_listen(vm->loop, &a, 0600, on_cid_accept, vm, &vm->cid_lst, err, sizeof(err));
	if (e < 0) {
		vm->cid_lst = NULL;
		if (!vm->cid_failed_logged)
			vlog("warning", "cannot listen on vsock port %u (VMs bound by vsock-cid "
			     "cannot reach devlxd): %s", vm->o.vsock_port, err[0] ? err : strerror(-e));
		vm->cid_failed_logged = true;
		return;
	}
	vm->cid_failed_logged = false;
}

/* ---- records ---------------------------------------------------------------------- */

static void rec_freed(uv_handle_t *h)
{
	vmrec *r = (vmrec *)h;
	gl_vm *vm = r->vm;

	free(r->name);
	free(r->iid);
	sodium_memzero(r->token, sizeof(r->token));
	free(r);
	vm->open_handles--;
	if (vm->stopping && !vm->open_handles)
		free(vm);
}

/* The VM lost its transport (err -ECONNRESET) or is gone (-ENOENT). */
static void rec_teardown(vmrec *r, int err, bool notify)
{
	gl_vm *vm = r->vm;
	vmrec **pp = &vm->recs;
	gl_vm_link *l;

	while (*pp && *pp != r)
		pp = &(*pp)->next;
	if (*pp)
		*pp = r->next;
	r->dead = true;
	if (r->lst) {
		gl_vsock_listen_stop(r->lst);
		r->lst = NULL;
	}
	if (!vm->stopping)
		gl_devlxd_drop_instance(vm->d, r->uid);
	pre_drop(vm, r->serial);
	if (r->dial) {
		gl_agentlink_cancel(r->dial);
		r->dial = NULL;
	}
	if (r->link) {
		gl_fconn_rebind(r->link, &noop_cbs, NULL);
		gl_fconn_close(r->link);
		r->link = NULL;
	}
	/* relays learn it from the loop, not from inside this observer */
	while ((l = r->qhead) || (l = r->links)) {
		link_detach(l);
		if (notify)
			link_defer(l, err);
	}
	if (notify && err != -ENOENT) {
		r->ever = r->online = false;
		show_status(r);
	}
	uv_timer_stop(&r->timer);
	uv_close((uv_handle_t *)&r->timer, rec_freed);
	if (!vm->stopping)
		cid_listener_sync(vm);
}

static void rec_create(gl_vm *vm, gl_instance *i, const char *uds, uint32_t cid)
{
	vmrec *r = calloc(1, sizeof(*r));
	char err[256] = "";
	int e;

	if (!r)
		goto oom;
	r->vm = vm;
	r->uid = gl_instance_uid(i);
	r->serial = ++vm->serials;
	randombytes_buf(r->token, sizeof(r->token));
	r->name = strdup(gl_instance_name(i));
	r->iid = instance_id_of(i);
	if (!r->name || !r->iid) {
		free(r->name);
		free(r->iid);
		free(r);
		goto oom;
	}
	snprintf(r->uds, sizeof(r->uds), "%s", uds);
	r->cid = cid;
	r->backoff = MON_BACKOFF_MIN;
	r->cap = vm->o.max_agent_conns;
	uv_timer_init(vm->loop, &r->timer);
	vm->open_handles++;
	r->next = vm->recs;
	vm->recs = r;
	if (r->uds[0]) {
		gl_vsock_addr a = {.kind = GL_VSOCK_HYBRID, .port = vm->o.devlxd_port};

		memcpy(a.path, r->uds, sizeof(a.path));
		e = gl_vsock_listen(vm->loop, &a, 0600, on_uds_accept, r, &r->lst, err, sizeof(err));
		if (e < 0) {
			r->lst = NULL;
			vlog("warning", "%s: cannot listen on %s_%u: %s", r->name, r->uds,
			     vm->o.devlxd_port, err[0] ? err : strerror(-e));
		}
	}
	if (r->cid)
		cid_listener_sync(vm);
	show_status(r);
	mon_dial(r);
	return;
oom:
	vlog("error", "out of memory setting up VM %s", gl_instance_name(i));
}

/* Bring the record of instance i in line with its type and transport. */
static void sync_instance(gl_vm *vm, gl_instance *i)
{
	vmrec *r = rec_find(vm, gl_instance_uid(i));
	gl_buf uds = GL_BUF_INIT, cidb = GL_BUF_INIT;
	uint32_t cid = 0;
	const char *u;

	if (gl_instance_attr(i, GL_ATTR_VSOCK_UDS, &uds) < 0 ||
	    gl_instance_attr(i, GL_ATTR_VSOCK_CID, &cidb) < 0)
		goto out;
	u = uds.data ? uds.data : "";
	if (cidb.len && vm->o.af_vsock)
		cid = (uint32_t)strtoul(cidb.data, NULL, 10);
	if (!gl_instance_is_vm(i) || (!*u && !cid)) {
		if (r)
			rec_teardown(r, -ECONNRESET, true);
		goto out;
	}
	if (r && !strcmp(r->uds, u) && r->cid == cid)
		goto out;
	if (r)
		rec_teardown(r, -ECONNRESET, true);
	rec_create(vm, i, u, cid);
out:
	gl_buf_free(&uds);
	gl_buf_free(&cidb);
}

static void on_change(void *arg, const gl_change *c)
{
	gl_vm *vm = arg;
	vmrec *r;

	if (vm->stopping)
		return;
	switch (c->kind) {
	case GL_CHANGE_INSTANCE_ADDED:
		sync_instance(vm, c->inst);
		break;
	case GL_CHANGE_INSTANCE_REMOVED:
		r = rec_find(vm, gl_instance_uid(c->inst));
		if (r)
			rec_teardown(r, -ENOENT, true);
		break;
	case GL_CHANGE_ATTR:
		if (c->attr == GL_ATTR_TYPE || c->attr == GL_ATTR_VSOCK_UDS ||
		    c->attr == GL_ATTR_VSOCK_CID)
			sync_instance(vm, c->inst);
		break;
	case GL_CHANGE_CONFIG:
		if (c->key && !strcmp(c->key, INSTANCE_ID_KEY) &&
		    (r = rec_find(vm, gl_instance_uid(c->inst)))) {
			char *iid = instance_id_of(c->inst);

			/* the next dial presents the new id */
			if (iid) {
				free(r->iid);
				r->iid = iid;
			}
		}
		break;
	default:
		break;
	}
}

/* ---- lifetime ---------------------------------------------------------------------- */

void gl_vm_opts_default(gl_vm_opts *o)
{
	memset(o, 0, sizeof(*o));
	o->devlxd_port = GL_VSOCK_DEVLXD_PORT;
	o->vsock_port = GL_VSOCK_DEVLXD_PORT;
	o->agent_port = GL_VSOCK_AGENT_PORT;
	o->ping_interval_ms = 5000;
	o->link_deadline_ms = 2000;
	o->max_agent_conns = 256;
}

static void defer_closed(uv_handle_t *h)
{
	gl_vm *vm = h->data;

	vm->open_handles--;
	if (vm->stopping && !vm->open_handles)
		free(vm);
}

int gl_vm_start(uv_loop_t *loop, gl_model *m, gl_devlxd *d, const gl_vm_opts *o, gl_vm **out,
		char *err, size_t errlen)
{
	gl_vm *vm = calloc(1, sizeof(*vm));
	gl_instance *const *all;
	size_t n;
	int r;

	if (!vm) {
		snprintf(err, errlen, "out of memory");
		return -ENOMEM;
	}
	if (gl_auth_init() < 0) {
		snprintf(err, errlen, "libsodium: cannot initialise");
		free(vm);
		return -EIO;
	}
	vm->loop = loop;
	vm->m = m;
	vm->d = d;
	vm->o = *o;
	if (!vm->o.devlxd_port)
		vm->o.devlxd_port = GL_VSOCK_DEVLXD_PORT;
	if (!vm->o.vsock_port)
		vm->o.vsock_port = GL_VSOCK_DEVLXD_PORT;
	if (!vm->o.agent_port)
		vm->o.agent_port = GL_VSOCK_AGENT_PORT;
	if (!vm->o.max_agent_conns)
		vm->o.max_agent_conns = 256;
	if (!vm->o.link_deadline_ms)
		vm->o.link_deadline_ms = 2000;
	r = gl_model_observe(m, on_change, vm);
	if (r < 0) {
		snprintf(err, errlen, "out of memory");
		free(vm);
		return r;
	}
	uv_timer_init(loop, &vm->defer);
	vm->defer.data = vm;
	vm->open_handles = 1;
	all = gl_model_instances(m, &n);
	for (size_t k = 0; k < n; k++)
		sync_instance(vm, all[k]);
	*out = vm;
	return 0;
}

void gl_vm_stop(gl_vm *vm)
{
	gl_vm_link *l;

	if (!vm || vm->stopping)
		return;
	vm->stopping = true;
	gl_model_unobserve(vm->m, on_change, vm);
	while (vm->recs)
		rec_teardown(vm->recs, -ECONNRESET, false);
	if (vm->cid_lst) {
		gl_vsock_listen_stop(vm->cid_lst);
		vm->cid_lst = NULL;
	}
	/* links nobody released (they should have been): no callback, freed */
	while ((l = vm->dhead)) {
		vm->dhead = l->dnext;
		free(l);
	}
	vm->dtail = NULL;
	uv_close((uv_handle_t *)&vm->defer, defer_closed);
}

int gl_vm_agent_info_get(gl_vm *vm, uint64_t uid, gl_vm_agent_info *out)
{
	vmrec *r = rec_find(vm, uid);

	if (!r)
		return -EINVAL;
	*out = r->info;
	out->online = r->online;
	return 0;
}
