/* The FUSE face: session on the loop, names, attributes, directories.
 * Open files live in files.c. Every handler replies exactly once; handlers
 * that wait for a commit copy what they need from the request first
 * (names point into the receive buffer, fi lives on libfuse's stack). */
#include "fsd/fs.h"

#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "core/names.h"
#include "fsd/fs_priv.h"
#include "fsd/log.h"

#define UNKNOWN_INO 0xffffffffULL

static const char *const vm_only[] = {"vsock-cid", "vsock-uds", "agent"};
static const char *const ct_only[] = {"init-pid", "cgroup"};

/* ---- helpers ---------------------------------------------------------- */

static gl_fs *req_fs(fuse_req_t req)
{
	return fuse_req_userdata(req);
}

int64_t fs__realtime_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_REALTIME, &ts);
	return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

uint64_t fs__now_ms(gl_fs *fs)
{
	uv_update_time(fs->loop);
	return uv_now(fs->loop);
}

static bool attr_applies(gl_attr a, bool vm)
{
	switch (a) {
	case GL_ATTR_TYPE:
	case GL_ATTR_STATE:
		return true;
	case GL_ATTR_INIT_PID:
	case GL_ATTR_CGROUP:
		return !vm;
	case GL_ATTR_VSOCK_CID:
	case GL_ATTR_VSOCK_UDS:
	case GL_ATTR_AGENT:
		return vm;
	default:
		return false;
	}
}

gl_instance *fs__instance(gl_fs *fs, const gl_node *n)
{
	gl_instance *inst;

	if (!n->iname)
		return NULL;
	inst = gl_model_find(fs->m, n->iname);
	if (!inst || gl_instance_uid(inst) != n->iuid)
		return NULL;
	return inst;
}

static const gl_entry *node_entry(gl_instance *inst, const gl_node *n)
{
	if (n->kind == GL_NODE_KEY)
		return gl_instance_config_get(inst, n->name, n->name_len);
	return gl_instance_device_get(inst, n->name, n->name_len);
}

int fs__content(gl_fs *fs, gl_node *n, gl_buf *out)
{
	gl_instance *inst = fs__instance(fs, n);
	const gl_entry *e;
	int r;

	if (!inst)
		return -ENOENT;
	switch (n->kind) {
	case GL_NODE_KEY:
	case GL_NODE_DEVICE:
		e = node_entry(inst, n);
		if (!e)
			return n->pending ? 0 : -ENOENT;
		r = gl_buf_add(out, e->value, e->len);
		return r < 0 ? r : gl_buf_addc(out, '\n');
	case GL_NODE_ATTR:
		if (!attr_applies(n->attr, gl_instance_is_vm(inst)))
			return -ENOENT;
		r = gl_instance_attr(inst, n->attr, out);
		return r < 0 ? r : gl_buf_addc(out, '\n');
	case GL_NODE_META_DATA:
		return gl_instance_meta_data(inst, out);
	default:
		return -EINVAL;
	}
}

static void fill(struct stat *st, uint64_t ino, mode_t mode, nlink_t nlink, off_t size,
                 int64_t mtime_ns)
{
	memset(st, 0, sizeof(*st));
	st->st_ino = ino;
	st->st_mode = mode;
	st->st_nlink = nlink;
	st->st_size = size;
	st->st_blksize = 4096;
	st->st_blocks = (size + 511) / 512;
	st->st_mtim.tv_sec = mtime_ns / 1000000000;
	st->st_mtim.tv_nsec = mtime_ns % 1000000000;
	st->st_atim = st->st_mtim;
	st->st_ctim = st->st_mtim;
}

static int64_t root_mtime(gl_fs *fs)
{
	int64_t t = gl_model_mtime(fs->m);

	return t > fs->start_ns ? t : fs->start_ns;
}

int fs__stat(gl_fs *fs, gl_node *n, struct stat *st)
{
	gl_instance *inst = NULL;
	gl_buf b = GL_BUF_INIT;
	const gl_entry *e;
	size_t count;
	int r;

	if (n->iname) {
		inst = fs__instance(fs, n);
		if (!inst)
			return -ENOENT;
	}
	switch (n->kind) {
	case GL_NODE_ROOT:
		gl_model_instances(fs->m, &count);
		fill(st, n->ino, S_IFDIR | 0755, 2 + count, 0, root_mtime(fs));
		return 0;
	case GL_NODE_ALL_EVENTS:
		fill(st, n->ino, S_IFREG | 0444, 1, 0, root_mtime(fs));
		return 0;
	case GL_NODE_INSTANCE:
		fill(st, n->ino, S_IFDIR | 0755, 4, 0, gl_instance_mtime(inst));
		return 0;
	case GL_NODE_CONFIG_DIR:
	case GL_NODE_DEVICES_DIR:
		fill(st, n->ino, S_IFDIR | 0755, 2, 0, gl_instance_mtime(inst));
		return 0;
	case GL_NODE_EVENTS:
		fill(st, n->ino, S_IFREG | 0444, 1, 0, gl_instance_mtime(inst));
		return 0;
	case GL_NODE_META_DATA:
		r = gl_instance_meta_data(inst, &b);
		fill(st, n->ino, S_IFREG | 0444, 1, b.len, gl_instance_mtime(inst));
		gl_buf_free(&b);
		return r;
	case GL_NODE_ATTR:
		if (!attr_applies(n->attr, gl_instance_is_vm(inst)))
			return -ENOENT;
		r = gl_instance_attr(inst, n->attr, &b);
		fill(st, n->ino, S_IFREG | (n->attr == GL_ATTR_AGENT ? 0444 : 0644), 1, b.len + 1,
		     gl_instance_attr_mtime(inst, n->attr));
		gl_buf_free(&b);
		return r;
	case GL_NODE_KEY:
	case GL_NODE_DEVICE:
		e = node_entry(inst, n);
		if (e)
			fill(st, n->ino, S_IFREG | 0644, 1, e->len + 1, e->mtime_ns);
		else if (n->pending)
			fill(st, n->ino, S_IFREG | 0644, 1, 0, n->btime_ns);
		else
			return -ENOENT;
		return 0;
	case GL_NODE_SCRATCH:
		if (!n->scratch || (!n->scratch->live && !n->opens))
			return -ENOENT;
		fill(st, n->ino, S_IFREG | n->scratch->mode, 1, n->scratch->data.len,
		     n->scratch->mtime_ns);
		return 0;
	}
	return -ENOENT;
}

/* Files change size with their value: never cached. Directories change
 * (mtime, nlink) only through the model, which pushes an invalidation for
 * each change; caching them spares the kernel's permission checks a round
 * trip per path component. Not the root: after a crash, stat(MNT) must
 * fail (ENOTCONN) at once, for us and for `mountpoint`-style checks. */
double fs__attr_timeout(const gl_node *n)
{
	switch (n->kind) {
	case GL_NODE_INSTANCE:
	case GL_NODE_CONFIG_DIR:
	case GL_NODE_DEVICES_DIR:
		return FS_DIR_ATTR_TIMEOUT;
	default:
		return 0;
	}
}

void fs__reply_attr(gl_fs *fs, fuse_req_t req, gl_node *n)
{
	struct stat st;
	int r = n ? fs__stat(fs, n, &st) : -ENOENT;

	if (r < 0)
		fuse_reply_err(req, -r);
	else
		fuse_reply_attr(req, &st, fs__attr_timeout(n));
}

void fs__set_op(const gl_node *n, gl_op *op, const char *value, size_t len)
{
	memset(op, 0, sizeof(*op));
	op->origin = GL_ORIGIN_HOST;
	op->instance = n->iname;
	op->ilen = strlen(n->iname);
	op->value = value;
	op->vlen = len;
	switch (n->kind) {
	case GL_NODE_KEY:
		op->kind = GL_OP_CONFIG_SET;
		op->key = n->name;
		op->klen = n->name_len;
		break;
	case GL_NODE_DEVICE:
		op->kind = GL_OP_DEVICE_SET;
		op->key = n->name;
		op->klen = n->name_len;
		break;
	default:
		op->kind = GL_OP_ATTR_SET;
		op->attr = n->attr;
		break;
	}
}

static void unset_op(const gl_node *dir, gl_op *op, const char *key, size_t klen)
{
	memset(op, 0, sizeof(*op));
	op->origin = GL_ORIGIN_HOST;
	op->kind = dir->kind == GL_NODE_DEVICES_DIR ? GL_OP_DEVICE_UNSET : GL_OP_CONFIG_UNSET;
	op->instance = dir->iname;
	op->ilen = strlen(dir->iname);
	op->key = key;
	op->klen = klen;
}

/* The node for `name` in `parent` with that meaning: the one in the name
 * index if it means the same, else a new one (the old one is detached). */
static gl_node *child(gl_fs *fs, gl_node *parent, const char *name, size_t len,
                      gl_node_kind kind, gl_attr attr, const char *iname, uint64_t iuid,
                      gl_scratch *scratch)
{
	gl_node *n = gl_nodes_find(&fs->nodes, parent->ino, name, len);

	if (n && n->kind == kind && n->iuid == iuid && n->scratch == scratch &&
	    (kind != GL_NODE_ATTR || n->attr == attr))
		return n;
	n = gl_nodes_add(&fs->nodes, parent->ino, name, len, kind, iname, iuid);
	if (!n)
		return NULL;
	n->btime_ns = fs__realtime_ns();
	n->attr = attr;
	if (scratch)
		n->scratch = gl_scratch_ref(scratch);
	return n;
}

static void reply_entry(gl_fs *fs, fuse_req_t req, gl_node *n)
{
	struct fuse_entry_param e;
	int r;

	memset(&e, 0, sizeof(e));
	r = fs__stat(fs, n, &e.attr);
	if (r < 0) {
		fuse_reply_err(req, -r);
		gl_nodes_maybe_free(&fs->nodes, n);
		return;
	}
	e.ino = n->ino;
	e.generation = 0;
	e.attr_timeout = fs__attr_timeout(n);
	e.entry_timeout = FS_ENTRY_TIMEOUT;
	if (fuse_reply_entry(req, &e) == 0)
		n->nlookup++;
	else
		gl_nodes_maybe_free(&fs->nodes, n);
}

static bool is_dir_of_values(const gl_node *n)
{
	return n->kind == GL_NODE_CONFIG_DIR || n->kind == GL_NODE_DEVICES_DIR;
}

static int check_name(const gl_node *dir, const char *name, size_t len)
{
	if (dir->kind == GL_NODE_DEVICES_DIR)
		return gl_name_device_check(name, len);
	return gl_name_key_check(name, len);
}

static bool all_digits(const char *s, size_t n)
{
	size_t i;

	for (i = 0; i < n; i++)
		if (s[i] < '0' || s[i] > '9')
			return false;
	return n > 0;
}

/* Names that mkstemp-style writers give their temporary files: sed -i
 * ("sed" + 6 of [A-Za-z0-9]) and Python's tempfile ("tmp" + 8 of
 * [a-z0-9_]). Created with O_EXCL they are scratch files, even where they
 * would be valid device names, so that `sed -i` works in devices/ while
 * `cp new devices/x` (also O_EXCL) still creates a device. */
static bool looks_temporary(const char *s, size_t n)
{
	size_t i;

	if (n == 9 && memcmp(s, "sed", 3) == 0) {
		for (i = 3; i < n; i++)
			if (!isalnum((unsigned char)s[i]))
				return false;
		return true;
	}
	if (n == 11 && memcmp(s, "tmp", 3) == 0) {
		for (i = 3; i < n; i++)
			if (!islower((unsigned char)s[i]) && !isdigit((unsigned char)s[i]) && s[i] != '_')
				return false;
		return true;
	}
	return false;
}

/* The node an instance directory's entry `name` stands for, or NULL. */
static gl_node *instance_child(gl_fs *fs, gl_node *p, gl_instance *inst, const char *name)
{
	size_t len = strlen(name);
	gl_attr a;

	if (strcmp(name, "config") == 0)
		return child(fs, p, name, len, GL_NODE_CONFIG_DIR, 0, p->iname, p->iuid, NULL);
	if (strcmp(name, "devices") == 0)
		return child(fs, p, name, len, GL_NODE_DEVICES_DIR, 0, p->iname, p->iuid, NULL);
	if (strcmp(name, "meta-data") == 0)
		return child(fs, p, name, len, GL_NODE_META_DATA, 0, p->iname, p->iuid, NULL);
	if (strcmp(name, "events") == 0)
		return child(fs, p, name, len, GL_NODE_EVENTS, 0, p->iname, p->iuid, NULL);
	a = gl_attr_from_name(name);
	if (a == GL_ATTR_COUNT || !attr_applies(a, gl_instance_is_vm(inst)))
		return NULL;
	return child(fs, p, name, len, GL_NODE_ATTR, a, p->iname, p->iuid, NULL);
}

/* What `name` in config/ or devices/ is now: a key/device, a scratch file,
 * or a key being created. *err says why not (ENOENT, ENOMEM). */
static gl_node *value_child(gl_fs *fs, gl_node *p, gl_instance *inst, const char *name,
                            int *err)
{
	size_t len = strlen(name);
	bool devices = p->kind == GL_NODE_DEVICES_DIR;
	gl_node_kind kind = devices ? GL_NODE_DEVICE : GL_NODE_KEY;
	gl_scratch *s;
	gl_node *n;
	const gl_entry *e;

	*err = -ENOMEM;
	e = devices ? gl_instance_device_get(inst, name, len)
	            : gl_instance_config_get(inst, name, len);
	if (e)
		return child(fs, p, name, len, kind, 0, p->iname, p->iuid, NULL);
	s = gl_scratch_find(&fs->scratches, p->iuid, devices, name, len);
	if (s)
		return child(fs, p, name, len, GL_NODE_SCRATCH, 0, p->iname, p->iuid, s);
	n = gl_nodes_find(&fs->nodes, p->ino, name, len);
	if (n && n->kind == kind && n->pending)
		return n;
	*err = -ENOENT;
	return NULL;
}

/* ---- model observer: push name changes to the kernel ------------------- */

static gl_node *instance_node(gl_fs *fs, gl_instance *inst)
{
	const char *name = gl_instance_name(inst);
	gl_node *n = gl_nodes_find(&fs->nodes, FUSE_ROOT_ID, name, strlen(name));

	return n && n->kind == GL_NODE_INSTANCE && n->iuid == gl_instance_uid(inst) ? n : NULL;
}

static void on_change(void *arg, const gl_change *c)
{
	gl_fs *fs = arg;
	const char *name = gl_instance_name(c->inst);
	gl_node *in = instance_node(fs, c->inst), *dir, *k;
	gl_scratch *s, *next;
	size_t i;

	switch (c->kind) {
	case GL_CHANGE_INSTANCE_ADDED:
		gl_notifier_inval_entry(fs->notifier, FUSE_ROOT_ID, name, strlen(name));
		gl_notifier_inval_inode(fs->notifier, FUSE_ROOT_ID);
		break;
	case GL_CHANGE_INSTANCE_REMOVED:
		gl_notifier_inval_inode(fs->notifier, FUSE_ROOT_ID);
		if (in)
			gl_nodes_detach(&fs->nodes, in);
		gl_notifier_inval_entry(fs->notifier, FUSE_ROOT_ID, name, strlen(name));
		for (s = gl_scratch_first(&fs->scratches); s; s = next) {
			next = s->next;
			if (s->iuid == gl_instance_uid(c->inst))
				gl_scratch_remove(&fs->scratches, s);
		}
		break;
	case GL_CHANGE_CONFIG:
	case GL_CHANGE_DEVICE:
		if (!in)
			break;
		/* the instance's and the directory's mtime moved */
		gl_notifier_inval_inode(fs->notifier, in->ino);
		dir = gl_nodes_find(&fs->nodes, in->ino,
		                    c->kind == GL_CHANGE_CONFIG ? "config" : "devices",
		                    c->kind == GL_CHANGE_CONFIG ? 6 : 7);
		if (!dir)
			break;
		gl_notifier_inval_inode(fs->notifier, dir->ino);
		if (c->existed == c->exists)
			break;
		if (!c->exists) {
			k = gl_nodes_find(&fs->nodes, dir->ino, c->key, strlen(c->key));
			if (k && (k->kind == GL_NODE_KEY || k->kind == GL_NODE_DEVICE) && !k->pending)
				gl_nodes_detach(&fs->nodes, k);
		}
		gl_notifier_inval_entry(fs->notifier, dir->ino, c->key, strlen(c->key));
		break;
	case GL_CHANGE_ATTR:
		if (in)
			gl_notifier_inval_inode(fs->notifier, in->ino);
		/* The type decides which attribute files exist. */
		if (c->attr != GL_ATTR_TYPE || !in)
			break;
		for (i = 0; i < sizeof(vm_only) / sizeof(vm_only[0]); i++)
			gl_notifier_inval_entry(fs->notifier, in->ino, vm_only[i], strlen(vm_only[i]));
		for (i = 0; i < sizeof(ct_only) / sizeof(ct_only[0]); i++)
			gl_notifier_inval_entry(fs->notifier, in->ino, ct_only[i], strlen(ct_only[i]));
		break;
	}
}

/* ---- lookup, forget, attributes ---------------------------------------- */

static void op_lookup(fuse_req_t req, fuse_ino_t parent, const char *name)
{
	gl_fs *fs = req_fs(req);
	gl_node *p = gl_nodes_get(&fs->nodes, parent), *n = NULL;
	gl_instance *inst;
	int err = -ENOENT;

	if (!p)
		goto out;
	switch (p->kind) {
	case GL_NODE_ROOT:
		if (strcmp(name, "events") == 0) {
			n = child(fs, p, name, 6, GL_NODE_ALL_EVENTS, 0, NULL, 0, NULL);
			break;
		}
		inst = gl_model_find(fs->m, name);
		if (inst)
			n = child(fs, p, name, strlen(name), GL_NODE_INSTANCE, 0, name,
			          gl_instance_uid(inst), NULL);
		if (inst && !n)
			err = -ENOMEM;
		break;
	case GL_NODE_INSTANCE:
		inst = fs__instance(fs, p);
		if (inst)
			n = instance_child(fs, p, inst, name);
		break;
	case GL_NODE_CONFIG_DIR:
	case GL_NODE_DEVICES_DIR:
		inst = fs__instance(fs, p);
		if (inst)
			n = value_child(fs, p, inst, name, &err);
		break;
	default:
		err = -ENOTDIR;
		break;
	}
out:
	if (!n) {
		/* An error, never a negative entry: a name made by another
		 * face must show at once. */
		fuse_reply_err(req, -err);
		return;
	}
	reply_entry(fs, req, n);
}

static void op_forget(fuse_req_t req, fuse_ino_t ino, uint64_t nlookup)
{
	gl_fs *fs = req_fs(req);
	gl_node *n = gl_nodes_get(&fs->nodes, ino);

	if (n)
		gl_nodes_forget(&fs->nodes, n, nlookup);
	fuse_reply_none(req);
}

static void op_forget_multi(fuse_req_t req, size_t count, struct fuse_forget_data *forgets)
{
	gl_fs *fs = req_fs(req);
	size_t i;

	for (i = 0; i < count; i++) {
		gl_node *n = gl_nodes_get(&fs->nodes, forgets[i].ino);

		if (n)
			gl_nodes_forget(&fs->nodes, n, forgets[i].nlookup);
	}
	fuse_reply_none(req);
}

static void op_getattr(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	gl_fs *fs = req_fs(req);

	fs__reply_attr(fs, req, gl_nodes_get(&fs->nodes, ino));
}

struct truncate_ctx {
	gl_fs *fs;
	fuse_req_t req;
	uint64_t ino;
};

static void truncate_done(void *arg, int status)
{
	struct truncate_ctx *t = arg;

	if (status < 0)
		fuse_reply_err(t->req, -status);
	else
		fs__reply_attr(t->fs, t->req, gl_nodes_get(&t->fs->nodes, t->ino));
	free(t);
}

/* truncate(2) by path: commit the truncated value at once. */
static int truncate_value(gl_fs *fs, fuse_req_t req, gl_node *n, off_t size)
{
	gl_buf b = GL_BUF_INIT;
	struct truncate_ctx *t;
	size_t len;
	gl_op op;
	int r;

	if ((uint64_t)size > gl_model_limits(fs->m)->max_value + 1)
		return -EFBIG;
	r = fs__content(fs, n, &b);
	if (r == 0)
		r = fs__buf_resize(&b, size);
	if (r < 0)
		goto out;
	len = b.len;
	if (len > 0 && b.data[len - 1] == '\n')
		len--;
	t = malloc(sizeof(*t));
	r = -ENOMEM;
	if (!t)
		goto out;
	t->fs = fs;
	t->req = req;
	t->ino = n->ino;
	fs__set_op(n, &op, b.data ? b.data : "", len);
	r = gl_model_submit(fs->m, &op, truncate_done, t);
	if (r < 0)
		free(t);
out:
	gl_buf_free(&b);
	return r;
}

static void op_setattr(fuse_req_t req, fuse_ino_t ino, struct stat *attr, int to_set,
                       struct fuse_file_info *fi)
{
	gl_fs *fs = req_fs(req);
	gl_node *n = gl_nodes_get(&fs->nodes, ino);
	struct stat st;
	int r;

	if (!n || fs__stat(fs, n, &st) < 0) {
		fuse_reply_err(req, ENOENT);
		return;
	}
	if (to_set & FUSE_SET_ATTR_SIZE) {
		if (S_ISDIR(st.st_mode)) {
			fuse_reply_err(req, EISDIR);
			return;
		}
		if (fi) {
			r = fs__handle_truncate((fs_fh *)(uintptr_t)fi->fh, attr->st_size);
		} else if (n->kind == GL_NODE_SCRATCH) {
			r = fs__scratch_resize(fs, n->scratch, attr->st_size);
		} else if (n->kind == GL_NODE_KEY || n->kind == GL_NODE_DEVICE ||
		           (n->kind == GL_NODE_ATTR && n->attr != GL_ATTR_AGENT)) {
			r = truncate_value(fs, req, n, attr->st_size);
			if (r == 0)
				return; /* replied when durable */
		} else {
			r = -EACCES;
		}
		if (r < 0) {
			fuse_reply_err(req, -r);
			return;
		}
	}
	/* Scratch files keep what editors set; everything else ignores mode,
	 * owner and times (chmod/touch must not fail, they change nothing). */
	if (n->kind == GL_NODE_SCRATCH && n->scratch) {
		if (to_set & FUSE_SET_ATTR_MODE)
			n->scratch->mode = attr->st_mode & 07777;
		if (to_set & FUSE_SET_ATTR_MTIME_NOW)
			n->scratch->mtime_ns = fs__realtime_ns();
		else if (to_set & FUSE_SET_ATTR_MTIME)
			n->scratch->mtime_ns =
				(int64_t)attr->st_mtim.tv_sec * 1000000000 + attr->st_mtim.tv_nsec;
	}
	fs__reply_attr(fs, req, n);
}

/* ---- directories ---------------------------------------------------------- */

struct dent {
	size_t name_off;
	uint64_t ino;
	mode_t type;
};

/* A directory listing taken at opendir, served by offset until releasedir. */
struct dirsnap {
	struct dirsnap *next, *prev; /* fs->dirsnaps: freed at destroy if still open */
	gl_fs *fs;
	struct dent *ents;
	size_t n, cap;
	gl_buf names;
};

static int snap_add(gl_fs *fs, struct dirsnap *d, uint64_t parent, const char *name,
                    mode_t type, uint64_t ino)
{
	struct dent *e;
	int r;

	if (d->n == d->cap) {
		size_t ncap = d->cap ? d->cap * 2 : 16;
		struct dent *ne = realloc(d->ents, ncap * sizeof(*ne));

		if (!ne)
			return -ENOMEM;
		d->ents = ne;
		d->cap = ncap;
	}
	e = &d->ents[d->n];
	e->name_off = d->names.len;
	r = gl_buf_add(&d->names, name, strlen(name) + 1);
	if (r < 0)
		return r;
	if (!ino) {
		gl_node *n = gl_nodes_find(&fs->nodes, parent, name, strlen(name));

		ino = n ? n->ino : UNKNOWN_INO;
	}
	e->ino = ino;
	e->type = type;
	d->n++;
	return 0;
}

static void snap_free(struct dirsnap *d)
{
	if (d->prev)
		d->prev->next = d->next;
	else
		d->fs->dirsnaps = d->next;
	if (d->next)
		d->next->prev = d->prev;
	free(d->ents);
	gl_buf_free(&d->names);
	free(d);
}

static int snap_values(gl_fs *fs, struct dirsnap *d, gl_node *p, gl_instance *inst)
{
	bool devices = p->kind == GL_NODE_DEVICES_DIR;
	const gl_entry *e;
	const fs_fh *fh;
	gl_scratch *s;
	size_t n, i;
	int r;

	e = devices ? gl_instance_devices(inst, &n) : gl_instance_config(inst, &n);
	for (i = 0; i < n; i++) {
		r = snap_add(fs, d, p->ino, e[i].key, S_IFREG, 0);
		if (r < 0)
			return r;
	}
	/* Keys being created (touch, `>` not yet closed) already look like
	 * empty keys to lookup and stat: list them too. */
	for (fh = fs->handles; fh; fh = fh->next) {
		const fs_fh *o;

		if (!fh->created || !fh->node->hashed || fh->node->parent != p->ino ||
		    node_entry(inst, fh->node))
			continue;
		for (o = fs->handles; o != fh; o = o->next)
			if (o->created && o->node == fh->node)
				break;
		if (o != fh)
			continue; /* listed already */
		r = snap_add(fs, d, p->ino, fh->node->name, S_IFREG, fh->node->ino);
		if (r < 0)
			return r;
	}
	for (s = gl_scratch_first(&fs->scratches); s; s = s->next) {
		if (s->iuid != p->iuid || s->devices != devices)
			continue;
		if (devices && gl_instance_device_get(inst, s->name, s->name_len))
			continue; /* shadowed by a device of the same name */
		r = snap_add(fs, d, p->ino, s->name, S_IFREG, 0);
		if (r < 0)
			return r;
	}
	return 0;
}

static void op_opendir(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	static const char *const fixed[] = {"config", "devices", "meta-data", "events"};
	gl_fs *fs = req_fs(req);
	gl_node *p = gl_nodes_get(&fs->nodes, ino);
	gl_instance *inst = NULL, *const *all;
	struct dirsnap *d;
	size_t n, i;
	int r;

	if (!p) {
		fuse_reply_err(req, ENOENT);
		return;
	}
	if (p->iname) {
		inst = fs__instance(fs, p);
		if (!inst) {
			fuse_reply_err(req, ENOENT);
			return;
		}
	}
	d = calloc(1, sizeof(*d));
	if (!d) {
		fuse_reply_err(req, ENOMEM);
		return;
	}
	d->fs = fs;
	d->next = fs->dirsnaps;
	if (fs->dirsnaps)
		fs->dirsnaps->prev = d;
	fs->dirsnaps = d;
	r = snap_add(fs, d, 0, ".", S_IFDIR, p->ino);
	if (r == 0)
		r = snap_add(fs, d, 0, "..", S_IFDIR, p->kind == GL_NODE_ROOT ? p->ino : p->parent);
	switch (p->kind) {
	case GL_NODE_ROOT:
		if (r == 0)
			r = snap_add(fs, d, p->ino, "events", S_IFREG, 0);
		all = gl_model_instances(fs->m, &n);
		for (i = 0; i < n && r == 0; i++)
			r = snap_add(fs, d, p->ino, gl_instance_name(all[i]), S_IFDIR, 0);
		break;
	case GL_NODE_INSTANCE:
		for (i = 0; i < 4 && r == 0; i++)
			r = snap_add(fs, d, p->ino, fixed[i], i < 2 ? S_IFDIR : S_IFREG, 0);
		for (i = 0; i < GL_ATTR_COUNT && r == 0; i++)
			if (attr_applies(i, gl_instance_is_vm(inst)))
				r = snap_add(fs, d, p->ino, gl_attr_name(i), S_IFREG, 0);
		break;
	case GL_NODE_CONFIG_DIR:
	case GL_NODE_DEVICES_DIR:
		if (r == 0)
			r = snap_values(fs, d, p, inst);
		break;
	default:
		r = -ENOTDIR;
		break;
	}
	if (r < 0) {
		snap_free(d);
		fuse_reply_err(req, -r);
		return;
	}
	fi->fh = (uintptr_t)d;
	if (fuse_reply_open(req, fi) != 0)
		snap_free(d);
}

static void op_readdir(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
                       struct fuse_file_info *fi)
{
	struct dirsnap *d = (struct dirsnap *)(uintptr_t)fi->fh;
	char *buf;
	size_t used = 0;
	struct stat st;

	if (!d) {
		fuse_reply_err(req, EBADF);
		return;
	}
	buf = malloc(size);
	if (!buf) {
		fuse_reply_err(req, ENOMEM);
		return;
	}
	memset(&st, 0, sizeof(st));
	for (; off >= 0 && (size_t)off < d->n; off++) {
		const struct dent *e = &d->ents[off];
		size_t need;

		st.st_ino = e->ino;
		st.st_mode = e->type;
		need = fuse_add_direntry(req, buf + used, size - used, d->names.data + e->name_off,
		                         &st, off + 1);
		if (need > size - used)
			break;
		used += need;
	}
	fuse_reply_buf(req, buf, used);
	free(buf);
}

static void op_releasedir(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	struct dirsnap *d = (struct dirsnap *)(uintptr_t)fi->fh;

	if (d)
		snap_free(d);
	fuse_reply_err(req, 0);
}

static void op_fsyncdir(fuse_req_t req, fuse_ino_t ino, int datasync, struct fuse_file_info *fi)
{
	fuse_reply_err(req, 0);
}

/* A request waiting for a commit, with the names it needs copied. */
struct name_ctx {
	gl_fs *fs;
	fuse_req_t req;
	uint64_t parent;
	gl_scratch *scratch; /* rename: a reference */
	char *name;
	char *newname;
};

static struct name_ctx *name_ctx_new(gl_fs *fs, fuse_req_t req, uint64_t parent,
                                     const char *name, const char *newname)
{
	struct name_ctx *c = calloc(1, sizeof(*c));

	if (!c)
		return NULL;
	c->fs = fs;
	c->req = req;
	c->parent = parent;
	c->name = strdup(name);
	c->newname = newname ? strdup(newname) : NULL;
	if (!c->name || (newname && !c->newname)) {
		free(c->name);
		free(c->newname);
		free(c);
		return NULL;
	}
	return c;
}

static void name_ctx_free(struct name_ctx *c)
{
	gl_scratch_unref(c->scratch);
	free(c->name);
	free(c->newname);
	free(c);
}

static void mkdir_done(void *arg, int status)
{
	struct name_ctx *c = arg;
	gl_fs *fs = c->fs;
	gl_node *root = gl_nodes_get(&fs->nodes, FUSE_ROOT_ID), *n;
	gl_instance *inst;

	if (status < 0) {
		fuse_reply_err(c->req, -status);
		goto out;
	}
	inst = gl_model_find(fs->m, c->name);
	if (!inst) {
		fuse_reply_err(c->req, ENOENT); /* removed again in the same batch */
		goto out;
	}
	n = child(fs, root, c->name, strlen(c->name), GL_NODE_INSTANCE, 0, c->name,
	          gl_instance_uid(inst), NULL);
	if (!n)
		fuse_reply_err(c->req, ENOMEM);
	else
		reply_entry(fs, c->req, n);
out:
	name_ctx_free(c);
}

static void op_mkdir(fuse_req_t req, fuse_ino_t parent, const char *name, mode_t mode)
{
	gl_fs *fs = req_fs(req);
	gl_node *p = gl_nodes_get(&fs->nodes, parent);
	struct name_ctx *c;
	gl_op op;
	int r;

	if (!p || p->kind != GL_NODE_ROOT) {
		fuse_reply_err(req, p ? EPERM : ENOENT);
		return;
	}
	if (fs->stopping) {
		fuse_reply_err(req, ESHUTDOWN);
		return;
	}
	c = name_ctx_new(fs, req, parent, name, NULL);
	if (!c) {
		fuse_reply_err(req, ENOMEM);
		return;
	}
	memset(&op, 0, sizeof(op));
	op.kind = GL_OP_CREATE;
	op.origin = GL_ORIGIN_HOST;
	op.instance = c->name;
	op.ilen = strlen(c->name);
	op.value = "";
	r = gl_model_submit(fs->m, &op, mkdir_done, c);
	if (r < 0) {
		name_ctx_free(c);
		fuse_reply_err(req, -r);
	}
}

/* Replies 0 after the commit and forgets the name's node. */
static void remove_done(void *arg, int status)
{
	struct name_ctx *c = arg;
	gl_node *n;

	if (status == 0) {
		n = gl_nodes_find(&c->fs->nodes, c->parent, c->name, strlen(c->name));
		if (n && n->kind != GL_NODE_SCRATCH && !n->pending)
			gl_nodes_detach(&c->fs->nodes, n);
	}
	fuse_reply_err(c->req, -status);
	name_ctx_free(c);
}

static void submit_remove(gl_fs *fs, fuse_req_t req, gl_node *p, const char *name,
                          const gl_op *op)
{
	struct name_ctx *c = name_ctx_new(fs, req, p->ino, name, NULL);
	gl_op o = *op;
	int r;

	if (!c) {
		fuse_reply_err(req, ENOMEM);
		return;
	}
	/* Point the op at our copies: submit copies them again anyway. */
	if (o.kind == GL_OP_DELETE)
		o.instance = c->name;
	else
		o.key = c->name;
	r = gl_model_submit(fs->m, &o, remove_done, c);
	if (r < 0) {
		name_ctx_free(c);
		fuse_reply_err(req, -r);
	}
}

/* Fixed entries cannot be removed; removing them succeeds without effect so
 * that `rm -r MNT/NAME` works. The node is detached so that a later lookup
 * gets a fresh one (the kernel has marked this one dead). */
static void remove_fixed(gl_fs *fs, fuse_req_t req, gl_node *p, const char *name)
{
	gl_node *n = gl_nodes_find(&fs->nodes, p->ino, name, strlen(name));

	if (n)
		gl_nodes_detach(&fs->nodes, n);
	fuse_reply_err(req, 0);
}

static void op_rmdir(fuse_req_t req, fuse_ino_t parent, const char *name)
{
	gl_fs *fs = req_fs(req);
	gl_node *p = gl_nodes_get(&fs->nodes, parent);
	gl_instance *inst;
	gl_op op;

	if (!p) {
		fuse_reply_err(req, ENOENT);
		return;
	}
	switch (p->kind) {
	case GL_NODE_ROOT:
		if (strcmp(name, "events") == 0) {
			fuse_reply_err(req, ENOTDIR);
			return;
		}
		memset(&op, 0, sizeof(op));
		op.kind = GL_OP_DELETE;
		op.origin = GL_ORIGIN_HOST;
		op.ilen = strlen(name);
		submit_remove(fs, req, p, name, &op);
		return;
	case GL_NODE_INSTANCE:
		inst = fs__instance(fs, p);
		if (!inst) {
			fuse_reply_err(req, ENOENT);
		} else if (strcmp(name, "config") == 0 || strcmp(name, "devices") == 0) {
			remove_fixed(fs, req, p, name);
		} else {
			gl_node *n = instance_child(fs, p, inst, name);

			fuse_reply_err(req, n ? ENOTDIR : ENOENT);
		}
		return;
	case GL_NODE_CONFIG_DIR:
	case GL_NODE_DEVICES_DIR:
		fuse_reply_err(req, ENOTDIR);
		return;
	default:
		fuse_reply_err(req, ENOTDIR);
		return;
	}
}

static void op_unlink(fuse_req_t req, fuse_ino_t parent, const char *name)
{
	gl_fs *fs = req_fs(req);
	gl_node *p = gl_nodes_get(&fs->nodes, parent), *n;
	gl_instance *inst;
	gl_scratch *s;
	size_t len = strlen(name);
	bool devices;
	gl_op op;

	if (!p) {
		fuse_reply_err(req, ENOENT);
		return;
	}
	if (p->kind == GL_NODE_ROOT) {
		fuse_reply_err(req, EPERM);
		return;
	}
	inst = fs__instance(fs, p);
	if (!inst) {
		fuse_reply_err(req, ENOENT);
		return;
	}
	if (p->kind == GL_NODE_INSTANCE) {
		if (strcmp(name, "config") == 0 || strcmp(name, "devices") == 0)
			fuse_reply_err(req, EISDIR);
		else if (instance_child(fs, p, inst, name))
			remove_fixed(fs, req, p, name);
		else
			fuse_reply_err(req, ENOENT);
		return;
	}
	if (!is_dir_of_values(p)) {
		fuse_reply_err(req, ENOTDIR);
		return;
	}
	devices = p->kind == GL_NODE_DEVICES_DIR;
	if (devices ? gl_instance_device_get(inst, name, len)
	            : gl_instance_config_get(inst, name, len)) {
		unset_op(p, &op, name, len);
		submit_remove(fs, req, p, name, &op);
		return;
	}
	s = gl_scratch_find(&fs->scratches, p->iuid, devices, name, len);
	if (s) {
		n = gl_nodes_find(&fs->nodes, p->ino, name, len);
		if (n && n->scratch == s)
			gl_nodes_detach(&fs->nodes, n);
		gl_scratch_remove(&fs->scratches, s);
		fuse_reply_err(req, 0);
		return;
	}
	fuse_reply_err(req, ENOENT);
}

static void rename_done(void *arg, int status)
{
	struct name_ctx *c = arg;
	gl_fs *fs = c->fs;
	gl_node *n;

	if (status < 0) {
		fuse_reply_err(c->req, -status);
		goto out;
	}
	/* The kernel's dentry for the new name now points at the scratch
	 * file's node: make that node the key (fuse-live-files.md §9.3).
	 * Whatever node had the name is detached and lives until FORGET. */
	n = gl_nodes_find(&fs->nodes, c->parent, c->name, strlen(c->name));
	if (n && n->kind == GL_NODE_SCRATCH && n->scratch == c->scratch) {
		gl_node *p = gl_nodes_get(&fs->nodes, c->parent);

		n->kind = p && p->kind == GL_NODE_DEVICES_DIR ? GL_NODE_DEVICE : GL_NODE_KEY;
		gl_scratch_unref(n->scratch);
		n->scratch = NULL;
		if (gl_nodes_rename(&fs->nodes, n, c->parent, c->newname, strlen(c->newname)) < 0)
			gl_nodes_detach(&fs->nodes, n);
	}
	gl_scratch_remove(&fs->scratches, c->scratch);
	fuse_reply_err(c->req, 0);
out:
	name_ctx_free(c);
}

static void op_rename(fuse_req_t req, fuse_ino_t parent, const char *name, fuse_ino_t newparent,
                      const char *newname, unsigned int flags)
{
	gl_fs *fs = req_fs(req);
	gl_node *p = gl_nodes_get(&fs->nodes, parent), *n, *dn;
	size_t len = strlen(name), nlen = strlen(newname);
	gl_instance *inst;
	gl_scratch *s, *dst;
	struct name_ctx *c;
	bool devices;
	gl_op op;
	int r;

	if (flags) {
		fuse_reply_err(req, EINVAL);
		return;
	}
	if (!p) {
		fuse_reply_err(req, ENOENT);
		return;
	}
	if (!is_dir_of_values(p)) {
		fuse_reply_err(req, EPERM);
		return;
	}
	if (newparent != parent) {
		fuse_reply_err(req, EXDEV);
		return;
	}
	inst = fs__instance(fs, p);
	if (!inst) {
		fuse_reply_err(req, ENOENT);
		return;
	}
	devices = p->kind == GL_NODE_DEVICES_DIR;
	s = gl_scratch_find(&fs->scratches, p->iuid, devices, name, len);
	if (!s) {
		/* A key cannot move: mv falls back to copy + unlink. */
		bool key = devices ? gl_instance_device_get(inst, name, len) != NULL
		                   : gl_instance_config_get(inst, name, len) != NULL;

		fuse_reply_err(req, key ? EXDEV : ENOENT);
		return;
	}
	if (len == nlen && memcmp(name, newname, len) == 0) {
		fuse_reply_err(req, 0);
		return;
	}
	dst = gl_scratch_find(&fs->scratches, p->iuid, devices, newname, nlen);
	if (dst || check_name(p, newname, nlen) < 0) {
		/* scratch -> scratch: an ordinary rename. */
		if (dst) {
			dn = gl_nodes_find(&fs->nodes, p->ino, newname, nlen);
			if (dn && dn->scratch == dst)
				gl_nodes_detach(&fs->nodes, dn);
			gl_scratch_remove(&fs->scratches, dst);
		}
		r = gl_scratch_set_name(s, newname, nlen);
		if (r == 0) {
			n = gl_nodes_find(&fs->nodes, p->ino, name, len);
			if (n && n->scratch == s &&
			    gl_nodes_rename(&fs->nodes, n, p->ino, newname, nlen) < 0)
				gl_nodes_detach(&fs->nodes, n);
		}
		fuse_reply_err(req, -r);
		return;
	}
	/* scratch -> key: the scratch file's content becomes the value. */
	c = name_ctx_new(fs, req, p->ino, name, newname);
	if (!c) {
		fuse_reply_err(req, ENOMEM);
		return;
	}
	c->scratch = gl_scratch_ref(s);
	memset(&op, 0, sizeof(op));
	op.kind = devices ? GL_OP_DEVICE_SET : GL_OP_CONFIG_SET;
	op.origin = GL_ORIGIN_HOST;
	op.instance = p->iname;
	op.ilen = strlen(p->iname);
	op.key = c->newname;
	op.klen = nlen;
	op.value = s->data.data ? s->data.data : "";
	op.vlen = s->data.len;
	if (op.vlen > 0 && op.value[op.vlen - 1] == '\n')
		op.vlen--;
	r = gl_model_submit(fs->m, &op, rename_done, c);
	if (r < 0) {
		name_ctx_free(c);
		fuse_reply_err(req, -r);
	}
}

static void op_create(fuse_req_t req, fuse_ino_t parent, const char *name, mode_t mode,
                      struct fuse_file_info *fi)
{
	gl_fs *fs = req_fs(req);
	gl_node *p = gl_nodes_get(&fs->nodes, parent), *n = NULL;
	size_t len = strlen(name);
	struct fuse_entry_param e;
	gl_instance *inst;
	gl_scratch *s;
	bool devices, excl = fi->flags & O_EXCL, created = false, new_scratch = false;
	fs_fh *fh;
	int r;

	if (!p) {
		fuse_reply_err(req, ENOENT);
		return;
	}
	if (!is_dir_of_values(p)) {
		fuse_reply_err(req, EPERM);
		return;
	}
	inst = fs__instance(fs, p);
	if (!inst) {
		fuse_reply_err(req, ENOENT);
		return;
	}
	devices = p->kind == GL_NODE_DEVICES_DIR;
	n = value_child(fs, p, inst, name, &r);
	if (n) {
		/* It appeared since the kernel looked (another face). */
		if (excl) {
			fuse_reply_err(req, EEXIST);
			return;
		}
	} else if (r != -ENOENT) {
		fuse_reply_err(req, -r);
		return;
	} else if ((r = check_name(p, name, len)) == 0 && !(excl && looks_temporary(name, len))) {
		/* A new key: committed when the file is closed. */
		n = child(fs, p, name, len, devices ? GL_NODE_DEVICE : GL_NODE_KEY, 0, p->iname,
		          p->iuid, NULL);
		created = true;
	} else if (excl && !all_digits(name, len)) {
		if (gl_scratch_count(&fs->scratches, p->iuid, devices) >= GL_SCRATCH_MAX_PER_DIR) {
			fuse_reply_err(req, ENOSPC);
			return;
		}
		r = gl_scratch_new(&fs->scratches, p->iuid, p->iname, devices, name, len, mode,
		                   fs__realtime_ns(), fs__now_ms(fs), &s);
		if (r == 0) {
			n = child(fs, p, name, len, GL_NODE_SCRATCH, 0, p->iname, p->iuid, s);
			if (!n)
				gl_scratch_remove(&fs->scratches, s);
			new_scratch = true;
		}
	} else {
		/* All-digit names: vim's "can I create files here" probe
		 * (4913) fails, so vim overwrites keys in place. */
		if (all_digits(name, len))
			r = -EPERM;
		else if (r != -ENAMETOOLONG)
			r = -EINVAL;
		fuse_reply_err(req, -r);
		return;
	}
	if (!n) {
		fuse_reply_err(req, ENOMEM);
		return;
	}
	r = fs__open_node(fs, n, fi, created, &fh);
	if (r < 0) {
		if (new_scratch) {
			/* Never seen by anyone: do not leave it behind. */
			gl_nodes_detach(&fs->nodes, n);
			gl_scratch_remove(&fs->scratches, n->scratch);
		}
		fuse_reply_err(req, -r);
		gl_nodes_maybe_free(&fs->nodes, n);
		return;
	}
	memset(&e, 0, sizeof(e));
	fs__stat(fs, n, &e.attr);
	e.ino = n->ino;
	e.attr_timeout = 0;
	e.entry_timeout = FS_ENTRY_TIMEOUT;
	if (fuse_reply_create(req, &e, fi) == 0)
		n->nlookup++;
	else
		fs__release_handle(fh); /* the kernel never got the file */
}

static void op_eperm_mknod(fuse_req_t req, fuse_ino_t parent, const char *name, mode_t mode,
                           dev_t rdev)
{
	fuse_reply_err(req, EPERM);
}

static void op_eperm_symlink(fuse_req_t req, const char *link, fuse_ino_t parent,
                             const char *name)
{
	fuse_reply_err(req, EPERM);
}

static void op_eperm_link(fuse_req_t req, fuse_ino_t ino, fuse_ino_t newparent,
                          const char *newname)
{
	fuse_reply_err(req, EPERM);
}

static void op_init(void *userdata, struct fuse_conn_info *conn)
{
	/* O_TRUNC arrives in open's flags (not as a separate SETATTR). */
	if (conn->capable & FUSE_CAP_ATOMIC_O_TRUNC)
		conn->want |= FUSE_CAP_ATOMIC_O_TRUNC;
	/* Values change from other faces: never let the kernel cache writes. */
	conn->want &= ~FUSE_CAP_WRITEBACK_CACHE;
}

static const struct fuse_lowlevel_ops fs_ops = {
	.init = op_init,
	.lookup = op_lookup,
	.forget = op_forget,
	.forget_multi = op_forget_multi,
	.getattr = op_getattr,
	.setattr = op_setattr,
	.mknod = op_eperm_mknod,
	.mkdir = op_mkdir,
	.unlink = op_unlink,
	.rmdir = op_rmdir,
	.symlink = op_eperm_symlink,
	.rename = op_rename,
	.link = op_eperm_link,
	.open = fs__op_open,
	.read = fs__op_read,
	.write = fs__op_write,
	.flush = fs__op_flush,
	.release = fs__op_release,
	.fsync = fs__op_fsync,
	.opendir = op_opendir,
	.readdir = op_readdir,
	.releasedir = op_releasedir,
	.fsyncdir = op_fsyncdir,
	.create = op_create,
	.poll = fs__op_poll,
};

/* ---- the session on the loop ------------------------------------------ */

static void on_uv_closed(uv_handle_t *h)
{
	gl_fs *fs = h->data;

	if (--fs->open_uv > 0)
		return;
	if (!fs->ended_called) {
		fs->ended_called = true;
		fs->ended(fs, fs->ended_arg);
	}
}

static void on_notifier_stopped(void *arg)
{
	gl_fs *fs = arg;

	fs->notifier = NULL;
	if (fs->polling) {
		uv_poll_stop(&fs->poll);
		fs->polling = false;
	}
	uv_timer_stop(&fs->sweep);
	fs->open_uv = 2;
	uv_close((uv_handle_t *)&fs->poll, on_uv_closed);
	uv_close((uv_handle_t *)&fs->sweep, on_uv_closed);
}

void gl_fs_stop(gl_fs *fs)
{
	if (fs->stopping)
		return;
	fs->stopping = true;
	if (fs->observing) {
		gl_model_unobserve(fs->m, on_change, fs);
		fs->observing = false;
	}
	fs__events_shutdown(fs);
	/* Keep serving requests until the notifier has exited: it may be
	 * waiting for a directory lock that one of them holds. */
	gl_notifier_stop(fs->notifier, on_notifier_stopped, fs);
}

static void on_fuse_readable(uv_poll_t *h, int status, int events)
{
	gl_fs *fs = h->data;
	int i, r;

	if (status < 0) {
		/* POLLERR: the connection is gone (umount, abort). */
		log_info("%s: unmounted", fs->mountpoint);
		uv_poll_stop(&fs->poll);
		fs->polling = false;
		gl_fs_stop(fs);
		return;
	}
	for (i = 0; i < FS_RECEIVE_BUDGET; i++) {
		if (fuse_session_exited(fs->se))
			break;
		r = fuse_session_receive_buf(fs->se, &fs->buf);
		if (r == -EINTR)
			continue;
		if (r == -EAGAIN)
			return;
		if (r <= 0) {
			if (r < 0)
				log_error("reading /dev/fuse: %s", strerror(-r));
			else
				log_info("%s: unmounted", fs->mountpoint);
			uv_poll_stop(&fs->poll);
			fs->polling = false;
			gl_fs_stop(fs);
			return;
		}
		fuse_session_process_buf(fs->se, &fs->buf);
	}
}

static void on_sweep(uv_timer_t *t)
{
	gl_fs *fs = t->data;
	uint64_t now = uv_now(fs->loop);
	gl_scratch *s, *next;

	fs__sweep_parked(fs, now);
	for (s = gl_scratch_first(&fs->scratches); s; s = next) {
		next = s->next;
		if (s->opens == 0 && s->refs <= 2 && now - s->last_close_ms >= GL_SCRATCH_IDLE_MS) {
			gl_node *in = NULL, *dir = NULL, *n;

			log_debug("dropping abandoned scratch file %s/%s/%s", s->iname,
			          s->devices ? "devices" : "config", s->name);
			in = gl_nodes_find(&fs->nodes, FUSE_ROOT_ID, s->iname, strlen(s->iname));
			if (in && in->iuid == s->iuid)
				dir = gl_nodes_find(&fs->nodes, in->ino, s->devices ? "devices" : "config",
				                    s->devices ? 7 : 6);
			if (dir) {
				n = gl_nodes_find(&fs->nodes, dir->ino, s->name, s->name_len);
				if (n && n->scratch == s)
					gl_nodes_detach(&fs->nodes, n);
				gl_notifier_inval_entry(fs->notifier, dir->ino, s->name, s->name_len);
			}
			gl_scratch_remove(&fs->scratches, s);
		}
	}
}

static void node_free_hook(void *arg, gl_node *n)
{
	gl_scratch_unref(n->scratch);
	n->scratch = NULL;
}

int gl_fs_start(uv_loop_t *loop, gl_model *m, const gl_fs_opts *o, gl_fs_ended_cb ended,
                void *arg, gl_fs **out)
{
	char opts[256];
	char *argv[4];
	struct fuse_args args;
	gl_fs *fs;
	int argc = 0, r;

	fs = calloc(1, sizeof(*fs));
	if (!fs)
		return -ENOMEM;
	fs->loop = loop;
	fs->m = m;
	fs->ended = ended;
	fs->ended_arg = arg;
	fs->start_ns = fs__realtime_ns();
	fs->mountpoint = strdup(o->mountpoint);
	if (!fs->mountpoint || gl_nodes_init(&fs->nodes) < 0) {
		free(fs->mountpoint);
		free(fs);
		return -ENOMEM;
	}
	fs->nodes.free_hook = node_free_hook;
	fs->nodes.free_arg = fs;

	snprintf(opts, sizeof(opts), "fsname=guestlink,subtype=guestlink,default_permissions%s",
	         o->allow_other ? ",allow_other" : "");
	argv[argc++] = "guestlinkd";
	argv[argc++] = "-o";
	argv[argc++] = opts;
	if (o->debug)
		argv[argc++] = "-d";
	args.argc = argc;
	args.argv = argv;
	args.allocated = 0;
	fs->se = fuse_session_new(&args, &fs_ops, sizeof(fs_ops), fs);
	fuse_opt_free_args(&args);
	if (!fs->se) {
		log_error("cannot create the FUSE session");
		r = -EIO;
		goto err_nodes;
	}
	if (fuse_session_mount(fs->se, o->mountpoint) != 0) {
		log_error("cannot mount on %s (is /dev/fuse there, and are we root?)",
		          o->mountpoint);
		r = -EIO;
		goto err_session;
	}
	r = gl_notifier_new(loop, fs->se, &fs->notifier);
	if (r < 0) {
		log_error("cannot start the notifier thread: %s", strerror(-r));
		goto err_unmount;
	}
	r = gl_model_observe(m, on_change, fs);
	if (r < 0) {
		log_error("cannot observe the model: %s", strerror(-r));
		goto err_notifier;
	}
	fs->observing = true;
	r = uv_poll_init(loop, &fs->poll, fuse_session_fd(fs->se));
	if (r < 0) {
		log_error("cannot poll /dev/fuse: %s", uv_strerror(r));
		goto err_observe;
	}
	fs->poll.data = fs;
	uv_poll_start(&fs->poll, UV_READABLE, on_fuse_readable);
	fs->polling = true;
	uv_timer_init(loop, &fs->sweep);
	fs->sweep.data = fs;
	uv_timer_start(&fs->sweep, on_sweep, FS_SWEEP_MS, FS_SWEEP_MS);
	uv_unref((uv_handle_t *)&fs->sweep);
	*out = fs;
	return 0;

err_observe:
	gl_model_unobserve(m, on_change, fs);
err_notifier:
	/* The idle thread exits without touching the session; the notifier
	 * frees itself on a later loop turn. */
	gl_notifier_stop(fs->notifier, NULL, NULL);
err_unmount:
	fuse_session_unmount(fs->se);
err_session:
	fuse_session_destroy(fs->se);
err_nodes:
	gl_nodes_fini(&fs->nodes);
	free(fs->mountpoint);
	free(fs);
	return r;
}

void gl_fs_destroy(gl_fs *fs)
{
	gl_scratch *s;

	if (!fs)
		return;
	fs__handle_free_all(fs);
	while (fs->dirsnaps)
		snap_free(fs->dirsnaps);
	if (fs->se) {
		fuse_session_unmount(fs->se);
		fuse_session_destroy(fs->se);
	}
	free(fs->buf.mem);
	while ((s = gl_scratch_first(&fs->scratches)))
		gl_scratch_remove(&fs->scratches, s);
	gl_nodes_fini(&fs->nodes);
	free(fs->mountpoint);
	free(fs);
}
