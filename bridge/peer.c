/* Caller identity for the devlxd socket (see peer.h). */
#include "bridge/peer.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <linux/nsfs.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#ifndef SO_PEERPIDFD
#define SO_PEERPIDFD 77
#endif
#ifndef PIDFS_IOCTL_MAGIC
#define PIDFS_IOCTL_MAGIC 0xFF
#endif
#ifndef PIDFD_GET_PID_NAMESPACE
#define PIDFD_GET_PID_NAMESPACE _IO(PIDFS_IOCTL_MAGIC, 5)
#endif

#define MAX_NS_DEPTH 32

/* ---- a small hash table keyed by bytes ------------------------------------ */

struct prec;

typedef struct hent {
	struct hent *next;
	uint64_t hash;
	struct prec *val; /* one of the instances with this key */
	unsigned count;   /* how many instances have it: > 1 is ambiguous */
	size_t klen;
	unsigned char key[];
} hent;

typedef struct htab {
	hent **b;
	size_t nb, n;
} htab;

static uint64_t hash_bytes(const void *k, size_t n)
{
	const unsigned char *p = k;
	uint64_t h = 1469598103934665603ull;

	for (size_t i = 0; i < n; i++) {
		h ^= p[i];
		h *= 1099511628211ull;
	}
	return h ^ (h >> 29);
}

static hent *ht_find(const htab *t, const void *k, size_t n)
{
	uint64_t h;

	if (!t->nb)
		return NULL;
	h = hash_bytes(k, n);
	for (hent *e = t->b[h & (t->nb - 1)]; e; e = e->next)
		if (e->hash == h && e->klen == n && memcmp(e->key, k, n) == 0)
			return e;
	return NULL;
}

static int ht_grow(htab *t)
{
	size_t nb = t->nb ? t->nb * 2 : 64;
	hent **b = calloc(nb, sizeof(*b));

	if (!b)
		return -ENOMEM;
	for (size_t i = 0; i < t->nb; i++) {
		hent *e = t->b[i];

		while (e) {
			hent *n = e->next;

			e->next = b[e->hash & (nb - 1)];
			b[e->hash & (nb - 1)] = e;
			e = n;
		}
	}
	free(t->b);
	t->b = b;
	t->nb = nb;
	return 0;
}

static int ht_add(htab *t, const void *k, size_t n, struct prec *val)
{
	hent *e = ht_find(t, k, n);

	if (e) {
		e->count++;
		return 0;
	}
	if ((t->n + 1) * 4 > t->nb * 3 && ht_grow(t))
		return -ENOMEM;
	e = malloc(sizeof(*e) + n);
	if (!e)
		return -ENOMEM;
	e->hash = hash_bytes(k, n);
	e->val = val;
	e->count = 1;
	e->klen = n;
	memcpy(e->key, k, n);
	e->next = t->b[e->hash & (t->nb - 1)];
	t->b[e->hash & (t->nb - 1)] = e;
	t->n++;
	return 0;
}

/* Drop one holder of key k. Returns the entry when holders remain and the
 * one it named was `val` (the caller names another), else NULL. */
static hent *ht_del(htab *t, const void *k, size_t n, struct prec *val)
{
	hent *e = ht_find(t, k, n), **pp;

	if (!e)
		return NULL;
	if (--e->count) {
		return e->val == val ? e : NULL;
	}
	pp = &t->b[e->hash & (t->nb - 1)];
	while (*pp != e)
		pp = &(*pp)->next;
	*pp = e->next;
	free(e);
	t->n--;
	return NULL;
}

static void ht_free(htab *t)
{
	for (size_t i = 0; i < t->nb; i++) {
		hent *e = t->b[i];

		while (e) {
			hent *n = e->next;

			free(e);
			e = n;
		}
	}
	free(t->b);
	t->b = NULL;
	t->nb = t->n = 0;
}

/* ---- records -------------------------------------------------------------- */

typedef struct nskey {
	uint64_t dev, ino;
} nskey;

typedef struct pwatch pwatch;

typedef struct prec {
	uint64_t uid;
	char *name;
	int64_t pid; /* the init being watched, 0: none */
	bool ns_indexed;
	nskey ns;
	char *cgroup; /* indexed cgroup path, NULL: none */
	uid_t root_uid;
	pwatch *w;
	unsigned counters[GL_PEER_NCOUNTERS];
} prec;

struct pwatch {
	uv_poll_t poll;
	int fd;
	gl_peer *p;
	uint64_t uid;
};

struct gl_peer {
	uv_loop_t *loop;
	gl_model *m;
	htab by_uid, by_ns, by_cgroup;
	nskey self_ns;
	unsigned closing; /* watcher handles still closing */
	bool freed;
};

static int nskey_of_fd(int fd, nskey *k)
{
	struct stat st;

	if (fstat(fd, &st) < 0)
		return -errno;
	k->dev = (uint64_t)st.st_dev;
	k->ino = (uint64_t)st.st_ino;
	return 0;
}

static prec *rec_of(const gl_peer *p, uint64_t uid)
{
	hent *e = ht_find(&p->by_uid, &uid, sizeof(uid));

	return e ? e->val : NULL;
}

/* Another holder of an ambiguous key must be named when the named one leaves. */
static void rename_holder(gl_peer *p, hent *e, bool ns)
{
	for (size_t i = 0; i < p->by_uid.nb; i++) {
		for (hent *u = p->by_uid.b[i]; u; u = u->next) {
			prec *r = u->val;

			if (r == e->val)
				continue;
			if (ns && r->ns_indexed && e->klen == sizeof(nskey) &&
			    memcmp(&r->ns, e->key, sizeof(nskey)) == 0) {
				e->val = r;
				return;
			}
			if (!ns && r->cgroup && strlen(r->cgroup) == e->klen &&
			    memcmp(r->cgroup, e->key, e->klen) == 0) {
				e->val = r;
				return;
			}
		}
	}
}

static void unindex_ns(gl_peer *p, prec *r)
{
	hent *e;

	if (!r->ns_indexed)
		return;
	r->ns_indexed = false;
	e = ht_del(&p->by_ns, &r->ns, sizeof(r->ns), r);
	if (e)
		rename_holder(p, e, true);
}

static void unindex_cgroup(gl_peer *p, prec *r)
{
	hent *e;

	if (!r->cgroup)
		return;
	e = ht_del(&p->by_cgroup, r->cgroup, strlen(r->cgroup), r);
	free(r->cgroup);
	r->cgroup = NULL;
	if (e)
		rename_holder(p, e, false);
}

/* ---- init watching --------------------------------------------------------- */

static void watch_closed(uv_handle_t *h)
{
	pwatch *w = h->data;
	gl_peer *p = w->p;

	close(w->fd);
	free(w);
	p->closing--;
	if (p->freed && !p->closing)
		free(p);
}

static void unwatch(gl_peer *p, prec *r)
{
	if (!r->w)
		return;
	p->closing++;
	uv_close((uv_handle_t *)&r->w->poll, watch_closed);
	r->w = NULL;
}

static void release_done(void *arg, int status)
{
	if (status && status != -ENOENT && status != -ECANCELED)
		fprintf(stderr, "guestlinkd: warning: releasing an exited init failed: %s\n",
			strerror(-status));
}

/* The bound init is gone: forget its namespace now (its inode number may be
 * reused by a new namespace) and unbind it through the model. */
static void release(gl_peer *p, prec *r)
{
	gl_op op = {.kind = GL_OP_ATTR_SET,
		    .origin = GL_ORIGIN_DAEMON,
		    .attr = GL_ATTR_INIT_PID,
		    .instance = r->name,
		    .ilen = strlen(r->name),
		    .value = "",
		    .vlen = 0};

	unwatch(p, r);
	unindex_ns(p, r);
	r->pid = 0;
	if (p->freed)
		return;
	gl_model_submit(p->m, &op, release_done, NULL);
}

static void on_init_exit(uv_poll_t *h, int status, int events)
{
	pwatch *w = h->data;
	prec *r = rec_of(w->p, w->uid);

	if (r && r->w == w)
		release(w->p, r);
	else
		uv_poll_stop(h);
}

static int pidfd_open_(pid_t pid)
{
	long r = syscall(SYS_pidfd_open, pid, 0);

	return r < 0 ? -errno : (int)r;
}

static bool pidfd_alive(int fd)
{
	long r = syscall(SYS_pidfd_send_signal, fd, 0, NULL, 0);

	return r == 0 || errno == EPERM;
}

/* The pid namespace of the process behind pidfd (or pid), as an open fd.
 * *exact is set when it came through the pidfd itself (no pid reuse race). */
static int pidns_fd(int pidfd, pid_t pid, bool *exact)
{
	char path[64];
	int fd = -1;

	*exact = false;
	if (pidfd >= 0) {
		fd = ioctl(pidfd, PIDFD_GET_PID_NAMESPACE, 0);
		if (fd >= 0) {
			*exact = true;
			return fd;
		}
		if (errno == ESRCH)
			return -ESRCH;
	}
	if (pid <= 0)
		return -ESRCH;
	snprintf(path, sizeof(path), "/proc/%d/ns/pid", (int)pid);
	fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return errno == ENOENT ? -ESRCH : -errno;
	return fd;
}

/* Host uid of uid 0 in pid's user namespace; 0 if it has no mapping for it
 * (nobody is root there then: 0 never matches a caller of that instance
 * except a host-root one, which is what "no user namespace" means). */
static uid_t root_uid_of(pid_t pid)
{
	char path[64];
	FILE *f;
	unsigned long in, out, cnt;
	uid_t res = 0;

	snprintf(path, sizeof(path), "/proc/%d/uid_map", (int)pid);
	f = fopen(path, "re");
	if (!f)
		return 0;
	while (fscanf(f, "%lu %lu %lu", &in, &out, &cnt) == 3) {
		if (in == 0 && cnt > 0) {
			res = (uid_t)out;
			break;
		}
	}
	fclose(f);
	return res;
}

/* Start time of pid in ns since the epoch, 0 if unknown. */
static int64_t proc_start_ns(pid_t pid)
{
	char path[64], buf[1024];
	unsigned long long start = 0, btime = 0;
	long hz = sysconf(_SC_CLK_TCK);
	FILE *f;
	char *p;
	size_t n;

	snprintf(path, sizeof(path), "/proc/%d/stat", (int)pid);
	f = fopen(path, "re");
	if (!f)
		return 0;
	n = fread(buf, 1, sizeof(buf) - 1, f);
	fclose(f);
	buf[n] = '\0';
	p = strrchr(buf, ')');
	if (!p)
		return 0;
	/* fields after comm: state is field 3, starttime field 22 */
	for (int field = 2; field < 22 && p; field++)
		p = strchr(p + 1, ' ');
	if (!p || sscanf(p + 1, "%llu", &start) != 1)
		return 0;
	f = fopen("/proc/stat", "re");
	if (!f)
		return 0;
	while (fgets(buf, sizeof(buf), f))
		if (sscanf(buf, "btime %llu", &btime) == 1)
			break;
	fclose(f);
	if (!btime || hz <= 0)
		return 0;
	return (int64_t)(btime + start / (unsigned long long)hz) * 1000000000ll +
	       (int64_t)(start % (unsigned long long)hz) * (1000000000ll / hz);
}

/* Bring r's init binding in line with the instance. `startup`: also refuse
 * a pid whose process started after the binding was recorded. */
static void sync_init(gl_peer *p, prec *r, gl_instance *inst, bool startup)
{
	int64_t pid = gl_instance_init_pid(inst);
	pwatch *w;
	int fd, nsfd;
	bool exact;

	if (pid == r->pid && (pid == 0 || r->w))
		return;
	unwatch(p, r);
	unindex_ns(p, r);
	r->pid = pid;
	r->root_uid = 0;
	if (!pid)
		return;
	fd = pidfd_open_((pid_t)pid);
	if (fd < 0) {
		release(p, r);
		return;
	}
	if (startup) {
		int64_t started = proc_start_ns((pid_t)pid);
		int64_t bound = gl_instance_attr_mtime(inst, GL_ATTR_INIT_PID);

		/* 2 s of slack: btime is whole seconds and drifts */
		if (started && bound && started > bound + 2000000000ll) {
			close(fd);
			release(p, r);
			return;
		}
	}
	nsfd = pidns_fd(fd, (pid_t)pid, &exact);
	if (nsfd < 0 || nskey_of_fd(nsfd, &r->ns) < 0) {
		if (nsfd >= 0)
			close(nsfd);
		close(fd);
		release(p, r);
		return;
	}
	close(nsfd);
	r->root_uid = root_uid_of((pid_t)pid);
	if (!pidfd_alive(fd)) {
		close(fd);
		release(p, r);
		return;
	}
	w = calloc(1, sizeof(*w));
	if (!w || uv_poll_init(p->loop, &w->poll, fd)) {
		/* without a watcher the exit would go unseen: give the binding no
		 * identity rather than keep a namespace we cannot track */
		fprintf(stderr, "guestlinkd: warning: cannot watch init %" PRId64 " of %s\n", pid,
			r->name);
		free(w);
		close(fd);
		return;
	}
	w->fd = fd;
	w->p = p;
	w->uid = r->uid;
	w->poll.data = w;
	if (uv_poll_start(&w->poll, UV_READABLE, on_init_exit)) {
		fprintf(stderr, "guestlinkd: warning: cannot watch init %" PRId64 " of %s\n", pid,
			r->name);
		p->closing++;
		uv_close((uv_handle_t *)&w->poll, watch_closed);
		return;
	}
	r->w = w;
	if (ht_add(&p->by_ns, &r->ns, sizeof(r->ns), r) == 0)
		r->ns_indexed = true;
}

static void sync_cgroup(gl_peer *p, prec *r, gl_instance *inst)
{
	gl_buf b = GL_BUF_INIT;

	if (gl_instance_attr(inst, GL_ATTR_CGROUP, &b)) {
		gl_buf_free(&b);
		return;
	}
	if (r->cgroup && b.len && strcmp(r->cgroup, b.data) == 0) {
		gl_buf_free(&b);
		return;
	}
	unindex_cgroup(p, r);
	if (b.len) {
		size_t n = b.len;

		/* "/a/b/" and "/a/b" name the same cgroup */
		while (n > 1 && b.data[n - 1] == '/')
			n--;
		b.data[n] = '\0';
		b.len = n;
		r->cgroup = gl_buf_steal(&b, NULL);
		if (r->cgroup && ht_add(&p->by_cgroup, r->cgroup, strlen(r->cgroup), r)) {
			free(r->cgroup);
			r->cgroup = NULL;
		}
	}
	gl_buf_free(&b);
}

static prec *rec_add(gl_peer *p, gl_instance *inst)
{
	uint64_t uid = gl_instance_uid(inst);
	prec *r = rec_of(p, uid);

	if (r)
		return r;
	r = calloc(1, sizeof(*r));
	if (!r)
		return NULL;
	r->uid = uid;
	r->name = strdup(gl_instance_name(inst));
	if (!r->name || ht_add(&p->by_uid, &uid, sizeof(uid), r)) {
		free(r->name);
		free(r);
		return NULL;
	}
	return r;
}

static void rec_del(gl_peer *p, prec *r)
{
	unwatch(p, r);
	unindex_ns(p, r);
	unindex_cgroup(p, r);
	ht_del(&p->by_uid, &r->uid, sizeof(r->uid), r);
	free(r->name);
	free(r);
}

static void on_change(void *arg, const gl_change *c)
{
	gl_peer *p = arg;
	prec *r;

	switch (c->kind) {
	case GL_CHANGE_INSTANCE_ADDED:
		r = rec_add(p, c->inst);
		if (r) {
			sync_init(p, r, c->inst, false);
			sync_cgroup(p, r, c->inst);
		}
		break;
	case GL_CHANGE_INSTANCE_REMOVED:
		r = rec_of(p, gl_instance_uid(c->inst));
		if (r)
			rec_del(p, r);
		break;
	case GL_CHANGE_ATTR:
		r = rec_of(p, gl_instance_uid(c->inst));
		if (!r)
			r = rec_add(p, c->inst);
		if (!r)
			break;
		if (c->attr == GL_ATTR_INIT_PID)
			sync_init(p, r, c->inst, false);
		else if (c->attr == GL_ATTR_CGROUP)
			sync_cgroup(p, r, c->inst);
		break;
	default:
		break;
	}
}

gl_peer *gl_peer_new(uv_loop_t *loop, gl_model *m, char *err, size_t errlen)
{
	gl_peer *p = calloc(1, sizeof(*p));
	gl_instance *const *all;
	size_t n;
	int fd;

	if (!p) {
		snprintf(err, errlen, "out of memory");
		return NULL;
	}
	p->loop = loop;
	p->m = m;
	fd = open("/proc/self/ns/pid", O_RDONLY | O_CLOEXEC);
	if (fd >= 0) {
		nskey_of_fd(fd, &p->self_ns);
		close(fd);
	}
	all = gl_model_instances(m, &n);
	for (size_t k = 0; k < n; k++) {
		prec *r = rec_add(p, all[k]);

		if (!r) {
			snprintf(err, errlen, "out of memory");
			gl_peer_free(p);
			return NULL;
		}
		sync_init(p, r, all[k], true);
		sync_cgroup(p, r, all[k]);
	}
	if (gl_model_observe(m, on_change, p)) {
		snprintf(err, errlen, "out of memory");
		gl_peer_free(p);
		return NULL;
	}
	return p;
}

void gl_peer_free(gl_peer *p)
{
	if (!p)
		return;
	gl_model_unobserve(p->m, on_change, p);
	p->freed = true;
	for (size_t i = 0; i < p->by_uid.nb; i++) {
		hent *e = p->by_uid.b[i];

		while (e) {
			hent *n = e->next;
			prec *r = e->val;

			unwatch(p, r);
			free(r->name);
			free(r->cgroup);
			free(r);
			e = n;
		}
	}
	ht_free(&p->by_uid);
	ht_free(&p->by_ns);
	ht_free(&p->by_cgroup);
	if (!p->closing)
		free(p);
}

/* ---- callers --------------------------------------------------------------- */

int gl_peer_cred_get(int sockfd, gl_peer_cred *out)
{
	struct ucred uc;
	socklen_t len = sizeof(uc);
	int fd = -1;

	out->pidfd = -1;
	if (getsockopt(sockfd, SOL_SOCKET, SO_PEERCRED, &uc, &len) < 0)
		return -errno;
	out->pid = uc.pid;
	out->uid = uc.uid;
	out->gid = uc.gid;
	len = sizeof(fd);
	if (getsockopt(sockfd, SOL_SOCKET, SO_PEERPIDFD, &fd, &len) == 0 && fd >= 0) {
		out->pidfd = fd;
		return 0;
	}
	if (uc.pid > 0) {
		fd = pidfd_open_(uc.pid);
		if (fd >= 0)
			out->pidfd = fd;
	}
	return 0;
}

void gl_peer_cred_clear(gl_peer_cred *c)
{
	if (c->pidfd >= 0)
		close(c->pidfd);
	c->pidfd = -1;
}

/* 1 and *out: one instance has this namespace; 0: none; -1: several
 * (ambiguous: no identity can come from it). */
static int lookup_ns(gl_peer *p, const nskey *k, prec **out)
{
	hent *e = ht_find(&p->by_ns, k, sizeof(*k));

	if (!e)
		return 0;
	if (e->count != 1)
		return -1;
	*out = e->val;
	return 1;
}

/* The caller's cgroup v2 path from /proc/<pid>/cgroup ("0::/path"). */
static int caller_cgroup(pid_t pid, gl_buf *out)
{
	char path[64], line[4096];
	FILE *f;
	int r = -ENOENT;

	snprintf(path, sizeof(path), "/proc/%d/cgroup", (int)pid);
	f = fopen(path, "re");
	if (!f)
		return errno == ENOENT ? -ESRCH : -errno;
	while (fgets(line, sizeof(line), f)) {
		size_t n = strlen(line);

		if (strncmp(line, "0::", 3) != 0)
			continue;
		while (n && line[n - 1] == '\n')
			line[--n] = '\0';
		r = gl_buf_add(out, line + 3, n - 3);
		break;
	}
	fclose(f);
	return r;
}

static prec *lookup_cgroup(gl_peer *p, gl_buf *cg)
{
	size_t n = cg->len;

	while (n > 1 && cg->data[n - 1] == '/')
		n--;
	/* the caller's cgroup, then each parent up to the root */
	while (n > 0) {
		hent *e = ht_find(&p->by_cgroup, cg->data, n);

		if (e)
			return e->count == 1 ? e->val : NULL;
		if (n == 1)
			break;
		while (n > 1 && cg->data[n - 1] != '/')
			n--;
		if (n > 1)
			n--; /* drop the separator */
	}
	return NULL;
}

int gl_peer_resolve(gl_peer *p, const gl_peer_cred *c, uint64_t *uid)
{
	gl_instance *inst;
	prec *found = NULL;
	bool exact = false;
	int nsfd;

	if (c->pid <= 0)
		return -ESRCH;
	if (p->by_ns.n) {
		nsfd = pidns_fd(c->pidfd, c->pid, &exact);
		if (nsfd < 0)
			return nsfd;
		/* the caller's namespace, then its ancestors: a process in a pid
		 * namespace nested inside a container belongs to that container */
		for (int depth = 0; depth < MAX_NS_DEPTH; depth++) {
			nskey k;
			int parent;

			if (nskey_of_fd(nsfd, &k) < 0)
				break;
			if (depth > 0 && k.dev == p->self_ns.dev && k.ino == p->self_ns.ino)
				break;
			if (lookup_ns(p, &k, &found))
				break;
			parent = ioctl(nsfd, NS_GET_PARENT);
			if (parent < 0)
				break;
			close(nsfd);
			nsfd = parent;
		}
		close(nsfd);
	}
	if (!found)
		exact = false;
	if (!found && p->by_cgroup.n) {
		gl_buf cg = GL_BUF_INIT;
		int r = caller_cgroup(c->pid, &cg);

		if (r == -ESRCH) {
			gl_buf_free(&cg);
			return r;
		}
		if (!r && cg.len)
			found = lookup_cgroup(p, &cg);
		gl_buf_free(&cg);
	}
	if (!found)
		return -ESRCH;
	/* what we read through /proc must have been about the process that
	 * connected: if it is still alive its pid cannot have been reused
	 * meanwhile (a namespace taken through the pidfd needs no such check) */
	if (c->pidfd < 0 || (!exact && !pidfd_alive(c->pidfd)))
		return -ESRCH;
	/* a VM keeps the init-pid / cgroup it had as a container, unused:
	 * VMs are known by their vsock transport only */
	inst = gl_peer_instance(p, found->uid);
	if (!inst || gl_instance_is_vm(inst))
		return -ESRCH;
	*uid = found->uid;
	return 0;
}

gl_instance *gl_peer_instance(gl_peer *p, uint64_t uid)
{
	prec *r = rec_of(p, uid);
	gl_instance *i;

	if (!r)
		return NULL;
	i = gl_model_find(p->m, r->name);
	return i && gl_instance_uid(i) == uid ? i : NULL;
}

uid_t gl_peer_root_uid(gl_peer *p, uint64_t uid)
{
	prec *r = rec_of(p, uid);

	return r ? r->root_uid : 0;
}

unsigned *gl_peer_counter(gl_peer *p, uint64_t uid, int which)
{
	prec *r = rec_of(p, uid);

	return r && which >= 0 && which < GL_PEER_NCOUNTERS ? &r->counters[which] : NULL;
}

void gl_peer_stats(const gl_peer *p, size_t *nns, size_t *ncgroups, size_t *nwatch)
{
	size_t w = 0;

	for (size_t i = 0; i < p->by_uid.nb; i++)
		for (hent *e = p->by_uid.b[i]; e; e = e->next)
			w += e->val->w != NULL;
	*nns = p->by_ns.n;
	*ncgroups = p->by_cgroup.n;
	*nwatch = w;
}
