/* Open files: buffered value writes committed at FLUSH, read-only
 * snapshots, scratch files, and events files whose reads park without a
 * thread. fi lives on libfuse's stack: everything a deferred reply needs
 * is copied into fs_fh or a small context first. */
#include <dirent.h>
#include <limits.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>

#include "fsd/fs_priv.h"
#include "fsd/log.h"

struct waiter {
	struct waiter *next;
	fuse_req_t req;
};

/* A commit in flight: the value of one handle on its way to the store. */
struct commit {
	fs_fh *fh;
	fuse_req_t req; /* FLUSH/FSYNC to answer; NULL at release */
};

/* The waiters of a handle: flushes that found the value already on its way. */
struct fh_waiters {
	struct waiter *head;
	unsigned inflight;
	int last_status;
};

static struct fh_waiters *waiters_of(fs_fh *fh);

static fs_fh *fh_of(const struct fuse_file_info *fi)
{
	return (fs_fh *)(uintptr_t)fi->fh;
}

static gl_fs *req_fs(fuse_req_t req)
{
	return fuse_req_userdata(req);
}

static size_t max_value(gl_fs *fs)
{
	return gl_model_limits(fs->m)->max_value;
}

/* ---- handle lifetime --------------------------------------------------- */

struct fs_fh_full {
	fs_fh fh;
	struct fh_waiters w;
};

static struct fh_waiters *waiters_of(fs_fh *fh)
{
	return &((struct fs_fh_full *)fh)->w;
}

static void fh_unlink(fs_fh *fh)
{
	gl_fs *fs = fh->fs;

	if (fh->prev)
		fh->prev->next = fh->next;
	else
		fs->handles = fh->next;
	if (fh->next)
		fh->next->prev = fh->prev;
	fh->next = fh->prev = NULL;
}

static void fh_free(fs_fh *fh)
{
	if (fh->ph)
		fuse_pollhandle_destroy(fh->ph);
	gl_buf_free(&fh->buf);
	gl_scratch_unref(fh->scratch);
	free(fh);
}

static void fh_unref(fs_fh *fh)
{
	gl_fs *fs = fh->fs;
	gl_node *n = fh->node;

	if (--fh->refs > 0)
		return;
	fh_unlink(fh);
	n->opens--;
	if (fh->created) {
		n->pending--;
		/* A key that was being created and never came to be (its value
		 * was refused): the name is free again. */
		if (!n->pending && n->hashed && (n->kind == GL_NODE_KEY || n->kind == GL_NODE_DEVICE)) {
			struct stat st;

			if (fs__stat(fs, n, &st) < 0) {
				gl_nodes_detach(&fs->nodes, n);
				gl_notifier_inval_entry(fs->notifier, n->parent, n->name, n->name_len);
			}
		}
	}
	fh_free(fh);
	gl_nodes_maybe_free(&fs->nodes, n);
}

static void on_sub_notify(gl_sub *s, void *arg);

int fs__open_node(gl_fs *fs, gl_node *n, struct fuse_file_info *fi, bool created,
                  fs_fh **out)
{
	int acc = fi->flags & O_ACCMODE;
	bool wr = acc != O_RDONLY, trunc = wr && (fi->flags & O_TRUNC);
	struct fs_fh_full *full;
	gl_instance *inst = NULL;
	struct stat st;
	fs_fh *fh;
	fh_kind kind;
	int r;

	switch (n->kind) {
	case GL_NODE_ROOT:
	case GL_NODE_INSTANCE:
	case GL_NODE_CONFIG_DIR:
	case GL_NODE_DEVICES_DIR:
		return -EISDIR;
	case GL_NODE_ALL_EVENTS:
	case GL_NODE_EVENTS:
		if (wr)
			return -EACCES;
		if (n->kind == GL_NODE_EVENTS && !(inst = fs__instance(fs, n)))
			return -ENOENT;
		kind = FH_EVENTS;
		break;
	case GL_NODE_META_DATA:
		if (wr)
			return -EACCES;
		if (!fs__instance(fs, n))
			return -ENOENT;
		kind = FH_SNAPSHOT;
		break;
	case GL_NODE_ATTR:
		if (fs__stat(fs, n, &st) < 0)
			return -ENOENT;
		if (n->attr == GL_ATTR_AGENT) {
			if (wr)
				return -EACCES;
			kind = FH_SNAPSHOT;
		} else {
			kind = FH_VALUE;
		}
		break;
	case GL_NODE_KEY:
	case GL_NODE_DEVICE:
		if (!fs__instance(fs, n))
			return -ENOENT;
		if (!created && fs__stat(fs, n, &st) < 0) {
			/* Deleted meanwhile: writing it anew creates it again. */
			if (!trunc)
				return -ENOENT;
			created = true;
		}
		kind = FH_VALUE;
		break;
	case GL_NODE_SCRATCH:
		if (!n->scratch || !n->scratch->live)
			return -ENOENT;
		kind = FH_SCRATCH;
		break;
	default:
		return -ENOENT;
	}

	full = calloc(1, sizeof(*full));
	if (!full)
		return -ENOMEM;
	fh = &full->fh;
	fh->fs = fs;
	fh->node = n;
	fh->kind = kind;
	fh->refs = 1;
	fh->writable = wr;
	fh->append = fi->flags & O_APPEND;

	switch (kind) {
	case FH_EVENTS:
		fh->all = n->kind == GL_NODE_ALL_EVENTS;
		/* After a stop began, the file reads as ended. */
		if (!fs->stopping) {
			fh->sub = gl_sub_new(fs->m, inst, GL_EV_ALL, on_sub_notify, fh);
			if (!fh->sub) {
				free(full);
				return -ENOMEM;
			}
		}
		fi->nonseekable = 1;
		break;
	case FH_VALUE:
		if (created || trunc) {
			/* Committed at close even if nothing is written:
			 * `touch` makes an empty key, `: > f` empties one. */
			fh->dirty = true;
			fh->loaded = true;
		} else if (wr) {
			r = fs__content(fs, n, &fh->buf);
			if (r < 0) {
				gl_buf_free(&fh->buf);
				free(full);
				return r;
			}
			fh->loaded = true;
		}
		break;
	case FH_SCRATCH:
		fh->scratch = gl_scratch_ref(n->scratch);
		fh->scratch->opens++;
		if (trunc) {
			fh->scratch->data.len = 0;
			fh->scratch->mtime_ns = fs__realtime_ns();
		}
		break;
	case FH_SNAPSHOT:
		break;
	}
	if (created) {
		fh->created = true;
		n->pending++;
	}
	n->opens++;
	fh->next = fs->handles;
	if (fs->handles)
		fs->handles->prev = fh;
	fs->handles = fh;
	fi->fh = (uintptr_t)fh;
	/* Nothing to commit on a read-only open: spare the FLUSH round trip,
	 * and let close() succeed even once the daemon is gone. */
	if (!wr)
		fi->noflush = 1;
	/* Every value can change underneath: no page cache, ever. */
	fi->direct_io = 1;
	fi->keep_cache = 0;
	*out = fh;
	return 0;
}

void fs__op_open(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	gl_fs *fs = req_fs(req);
	gl_node *n = gl_nodes_get(&fs->nodes, ino);
	fs_fh *fh;
	int r;

	if (!n) {
		fuse_reply_err(req, ENOENT);
		return;
	}
	r = fs__open_node(fs, n, fi, false, &fh);
	if (r < 0) {
		fuse_reply_err(req, -r);
		return;
	}
	if (fuse_reply_open(req, fi) != 0)
		fs__release_handle(fh);
}

/* ---- commits ----------------------------------------------------------- */

static void wake_waiters(fs_fh *fh, int status)
{
	struct fh_waiters *w = waiters_of(fh);
	struct waiter *it;

	w->last_status = status;
	if (w->inflight > 0)
		return;
	while ((it = w->head)) {
		w->head = it->next;
		fuse_reply_err(it->req, -w->last_status);
		free(it);
	}
}

static void commit_done(void *arg, int status)
{
	struct commit *c = arg;
	fs_fh *fh = c->fh;

	waiters_of(fh)->inflight--;
	if (c->req)
		fuse_reply_err(c->req, -status);
	else if (status < 0)
		log_warn("%s: value written at close was refused: %s", fh->node->name,
		         strerror(-status));
	wake_waiters(fh, status);
	free(c);
	fh_unref(fh);
}

/* Submit the handle's buffer (minus one trailing newline). 0 when queued
 * (req is answered by the commit), or -errno (nothing queued). */
static int commit(fs_fh *fh, fuse_req_t req)
{
	gl_fs *fs = fh->fs;
	size_t len = fh->buf.len;
	const char *data = fh->buf.data ? fh->buf.data : "";
	struct commit *c;
	gl_op op;
	int r;

	if (len > 0 && data[len - 1] == '\n')
		len--;
	c = malloc(sizeof(*c));
	if (!c)
		return -ENOMEM;
	c->fh = fh;
	c->req = req;
	fh->dirty = false;
	fh->touched = false;
	fs__set_op(fh->node, &op, data, len);
	r = gl_model_submit(fs->m, &op, commit_done, c);
	if (r < 0) {
		free(c);
		return r;
	}
	fh->refs++;
	waiters_of(fh)->inflight++;
	return 0;
}

/* FLUSH and FSYNC: commit if dirty and answer when durable. */
/* Does the process closing a descriptor of fh still hold another one on
 * the same file? close() detaches the descriptor before FLUSH is sent, so
 * what remains in /proc/PID/fd is the rest. Read through readlink only:
 * a stat() there would come back to this single-threaded daemon. Unknown
 * (a caller outside our pid namespace) counts as yes. */
static bool closer_holds_another(const fs_fh *fh, fuse_req_t req)
{
	const struct fuse_ctx *ctx = fuse_req_ctx(req);
	const gl_node *n = fh->node;
	char dir[64], link[PATH_MAX], path[PATH_MAX], target[PATH_MAX];
	const char *sub = n->kind == GL_NODE_KEY      ? "/config/"
	                  : n->kind == GL_NODE_DEVICE ? "/devices/"
	                                              : "/";
	struct dirent *de;
	bool found = false;
	DIR *d;
	int len;

	if (!ctx || ctx->pid <= 0 || !n->iname)
		return true;
	len = snprintf(path, sizeof(path), "%s/%s%s%s", fh->fs->mountpoint, n->iname, sub, n->name);
	if (len < 0 || (size_t)len >= sizeof(path))
		return true;
	snprintf(dir, sizeof(dir), "/proc/%d/fd", (int)ctx->pid);
	d = opendir(dir);
	if (!d)
		return true;
	while (!found && (de = readdir(d))) {
		ssize_t t;

		if (de->d_name[0] == '.')
			continue;
		snprintf(link, sizeof(link), "%s/%s", dir, de->d_name);
		t = readlink(link, target, sizeof(target) - 1);
		if (t < 0)
			continue;
		target[t] = '\0';
		/* a dentry the notifier invalidated reads as "PATH (deleted)" */
		found = strncmp(target, path, (size_t)len) == 0 &&
		        (target[len] == '\0' || strcmp(target + len, " (deleted)") == 0);
	}
	closedir(d);
	return found;
}

static void commit_or_wait(fs_fh *fh, fuse_req_t req)
{
	struct fh_waiters *w = waiters_of(fh);
	struct waiter *it;
	int r;

	if (fh->kind != FH_VALUE) {
		fuse_reply_err(req, 0);
		return;
	}
	if (fh->failed) {
		/* A write was refused: nothing is committed, close says so. */
		r = fh->failed;
		fh->failed = 0;
		fh->dirty = false;
		fuse_reply_err(req, -r);
		return;
	}
	/* Only a buffer that was written (or truncated) is committed here.
	 * A shell redirection opens with O_TRUNC, dup2()s and closes the
	 * first descriptor before anything is written: that FLUSH must not
	 * commit an empty value (a torn write and an extra event). So a value
	 * only truncated at open is committed at the close after which the
	 * process holds no other descriptor on the file (`: > f`, `touch`),
	 * and failing that at RELEASE. */
	if (fh->dirty && (fh->touched || !closer_holds_another(fh, req))) {
		r = commit(fh, req);
		if (r < 0)
			fuse_reply_err(req, -r);
		return;
	}
	if (w->inflight == 0) {
		fuse_reply_err(req, 0);
		return;
	}
	/* Another close of this file sent the value: answer with it. */
	it = malloc(sizeof(*it));
	if (!it) {
		fuse_reply_err(req, ENOMEM);
		return;
	}
	it->req = req;
	it->next = w->head;
	w->head = it;
}

void fs__op_flush(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	commit_or_wait(fh_of(fi), req);
}

void fs__op_fsync(fuse_req_t req, fuse_ino_t ino, int datasync, struct fuse_file_info *fi)
{
	commit_or_wait(fh_of(fi), req);
}

/* ---- reading and writing values ----------------------------------------- */

static void reply_slice(fuse_req_t req, const gl_buf *b, size_t size, off_t off)
{
	if (off < 0 || (size_t)off >= b->len) {
		fuse_reply_buf(req, NULL, 0);
		return;
	}
	if (size > b->len - off)
		size = b->len - off;
	fuse_reply_buf(req, b->data + off, size);
}

static void events_read(fs_fh *fh, fuse_req_t req, size_t size, bool nonblock);

void fs__op_read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
                 struct fuse_file_info *fi)
{
	fs_fh *fh = fh_of(fi);
	int r;

	switch (fh->kind) {
	case FH_EVENTS:
		events_read(fh, req, size, fi->flags & O_NONBLOCK);
		return;
	case FH_SCRATCH:
		reply_slice(req, &fh->scratch->data, size, off);
		return;
	case FH_VALUE:
	case FH_SNAPSHOT:
		/* A read-only open renders at offset 0 and serves the rest of a
		 * multi-read `cat` from that snapshot (fuse-live-files.md §4). */
		if (!fh->loaded || (!fh->writable && off == 0)) {
			gl_buf_reset(&fh->buf);
			r = fs__content(fh->fs, fh->node, &fh->buf);
			if (r < 0) {
				fuse_reply_err(req, -r);
				return;
			}
			fh->loaded = true;
		}
		reply_slice(req, &fh->buf, size, off);
		return;
	}
}

int fs__buf_resize(gl_buf *b, size_t size)
{
	int r;

	if (size > b->len) {
		r = gl_buf_reserve(b, size - b->len);
		if (r < 0)
			return r;
		memset(b->data + b->len, 0, size - b->len);
	}
	b->len = size;
	if (b->data)
		b->data[size] = '\0';
	return 0;
}

/* Put data at off in b, growing it; gaps are zero-filled. 0 or -ENOMEM. */
static int buf_put(gl_buf *b, const char *data, size_t size, size_t off)
{
	int r;

	if (off + size > b->len) {
		r = fs__buf_resize(b, off + size);
		if (r < 0)
			return r;
	}
	if (size)
		memcpy(b->data + off, data, size);
	return 0;
}

/* True once the JSON text's top-level value is complete (its object
 * closed), or when it is no object at all: then it can be judged whole. */
static bool json_complete(const char *s, size_t n)
{
	size_t i = 0, depth = 0;
	bool in_str = false;

	while (i < n && (s[i] == ' ' || s[i] == '\t' || s[i] == '\n' || s[i] == '\r'))
		i++;
	if (i == n)
		return false;
	if (s[i] != '{')
		return true;
	for (; i < n; i++) {
		char c = s[i];

		if (in_str) {
			if (c == '\\')
				i++;
			else if (c == '"')
				in_str = false;
		} else if (c == '"') {
			in_str = true;
		} else if (c == '{' || c == '[') {
			depth++;
		} else if ((c == '}' || c == ']') && --depth == 0) {
			return true;
		}
	}
	return false;
}

/* Early validation, so that the writer (`echo` itself) sees the error:
 * attribute values are judged whole at every write (they are short and
 * written at once); a device JSON once its object is complete. */
static int check_early(gl_fs *fs, const gl_op *op)
{
	bool partial = true;

	if (op->kind == GL_OP_ATTR_SET ||
	    (op->kind == GL_OP_DEVICE_SET && json_complete(op->value, op->vlen)))
		partial = false;
	return gl_model_check_value(fs->m, op->kind, op->attr, op->value, op->vlen, partial);
}

static int write_value(fs_fh *fh, const char *data, size_t size, off_t off)
{
	gl_fs *fs = fh->fs;
	gl_buf *b = &fh->buf;
	size_t old_len = b->len, keep = 0, vlen;
	char *saved = NULL;
	gl_op op;
	int r;

	if (fh->failed)
		return fh->failed;
	if (fh->append)
		off = b->len;
	if (off < 0 || (size_t)off > b->len) {
		fh->failed = -EINVAL; /* a value has no holes */
		return -EINVAL;
	}
	if ((size_t)off + size > max_value(fs) + 1) {
		fh->failed = -EFBIG;
		return -EFBIG;
	}
	/* Keep what the write covers, to undo it if the value is refused. */
	if ((size_t)off < old_len) {
		keep = old_len - off < size ? old_len - off : size;
		saved = malloc(keep);
		if (!saved) {
			/* refused: nothing of this open file may be committed, not
			 * even the truncation its open made */
			fh->failed = -ENOMEM;
			return -ENOMEM;
		}
		memcpy(saved, b->data + off, keep);
	}
	r = buf_put(b, data, size, off);
	if (r < 0) {
		fh->failed = r;
		goto out;
	}
	vlen = b->len;
	if (vlen > 0 && b->data[vlen - 1] == '\n')
		vlen--;
	fs__set_op(fh->node, &op, b->data, vlen);
	r = check_early(fs, &op);
	if (r < 0) {
		if (keep)
			memcpy(b->data + off, saved, keep);
		b->len = old_len;
		if (b->data)
			b->data[old_len] = '\0';
		fh->failed = r;
		goto out;
	}
	fh->dirty = true;
	fh->touched = true;
	fh->loaded = true;
out:
	free(saved);
	return r;
}

static int write_scratch(fs_fh *fh, const char *data, size_t size, off_t off)
{
	gl_scratch *s = fh->scratch;
	int r;

	if (fh->append)
		off = s->data.len;
	if (off < 0 || (size_t)off + size > max_value(fh->fs))
		return -EFBIG;
	r = buf_put(&s->data, data, size, off);
	if (r == 0)
		s->mtime_ns = fs__realtime_ns();
	return r;
}

void fs__op_write(fuse_req_t req, fuse_ino_t ino, const char *buf, size_t size, off_t off,
                  struct fuse_file_info *fi)
{
	fs_fh *fh = fh_of(fi);
	int r;

	if (fh->kind == FH_VALUE && fh->writable)
		r = write_value(fh, buf, size, off);
	else if (fh->kind == FH_SCRATCH)
		r = write_scratch(fh, buf, size, off);
	else
		r = -EBADF;
	if (r < 0)
		fuse_reply_err(req, -r);
	else
		fuse_reply_write(req, size);
}

int fs__scratch_resize(gl_fs *fs, gl_scratch *s, off_t size)
{
	int r;

	if (size < 0)
		return -EINVAL;
	if ((size_t)size > max_value(fs))
		return -EFBIG;
	r = fs__buf_resize(&s->data, size);
	if (r == 0)
		s->mtime_ns = fs__realtime_ns();
	return r;
}

int fs__handle_truncate(fs_fh *fh, off_t size)
{
	int r;

	if (fh->kind == FH_SCRATCH)
		return fs__scratch_resize(fh->fs, fh->scratch, size);
	if (fh->kind != FH_VALUE || !fh->writable)
		return -EACCES;
	if (size < 0)
		return -EINVAL;
	if ((size_t)size > max_value(fh->fs) + 1)
		return -EFBIG;
	r = fs__buf_resize(&fh->buf, size);
	if (r < 0)
		return r;
	fh->dirty = true;
	fh->touched = true;
	fh->loaded = true;
	return 0;
}

/* ---- events files ------------------------------------------------------ */

/* Copy whole queued lines that fit; a line longer than the whole read goes
 * out in pieces, the cursor remembering where it stopped. */
static size_t events_fill(fs_fh *fh, char *out, size_t size)
{
	const gl_event *ev;
	size_t used = 0;

	while (used < size && (ev = gl_sub_peek(fh->sub))) {
		const char *line = fh->all ? ev->gline : ev->line;
		size_t len = fh->all ? ev->gline_len : ev->line_len;
		size_t rest = len - fh->cursor;

		if (rest <= size - used) {
			memcpy(out + used, line + fh->cursor, rest);
			used += rest;
			fh->cursor = 0;
			gl_sub_pop(fh->sub);
			continue;
		}
		if (used == 0) {
			memcpy(out, line + fh->cursor, size);
			fh->cursor += size;
			used = size;
		}
		break;
	}
	return used;
}

/* Answer req if there is something to say: data, EOF, or an error.
 * Returns false if the read has to wait. */
static bool events_answer(fs_fh *fh, fuse_req_t req, size_t size)
{
	char *buf;
	size_t used;

	if (!fh->sub) {
		fuse_reply_buf(req, NULL, 0); /* stopping: EOF */
		return true;
	}
	if (gl_sub_peek(fh->sub)) {
		buf = malloc(size ? size : 1);
		if (!buf) {
			fuse_reply_err(req, ENOMEM);
			return true;
		}
		used = events_fill(fh, buf, size);
		fuse_reply_buf(req, buf, used);
		free(buf);
		return true;
	}
	switch (gl_sub_status_get(fh->sub)) {
	case GL_SUB_ENDED:
		fuse_reply_buf(req, NULL, 0);
		return true;
	case GL_SUB_DROPPED:
		fuse_reply_err(req, ENOBUFS);
		return true;
	default:
		return false;
	}
}

static void unpark(fs_fh *fh, struct parked *p)
{
	struct parked **pp = &fh->parked;

	while (*pp && *pp != p)
		pp = &(*pp)->next;
	if (*pp)
		*pp = p->next;
}

static void on_interrupt(fuse_req_t req, void *data)
{
	struct parked *p = data;

	/* Safe here: libfuse holds a reference on req while we run
	 * (fuse-live-files.md §1.5). */
	unpark(p->fh, p);
	fuse_reply_err(req, EINTR);
	free(p);
}

static void events_read(fs_fh *fh, fuse_req_t req, size_t size, bool nonblock)
{
	struct parked *p, **tail;

	if (fh->parked == NULL && events_answer(fh, req, size))
		return;
	if (nonblock) {
		fuse_reply_err(req, EAGAIN);
		return;
	}
	/* Already interrupted (the INTERRUPT came first): answer now, since
	 * registering would call back from inside libfuse's registration. */
	if (fuse_req_interrupted(req)) {
		fuse_reply_err(req, EINTR);
		return;
	}
	p = calloc(1, sizeof(*p));
	if (!p) {
		fuse_reply_err(req, ENOMEM);
		return;
	}
	p->fh = fh;
	p->req = req;
	p->size = size;
	p->since_ms = fs__now_ms(fh->fs);
	for (tail = &fh->parked; *tail; tail = &(*tail)->next)
		;
	*tail = p;
	/* Park first, then register (the callback may run at once). */
	fuse_req_interrupt_func(req, on_interrupt, p);
}

static void events_wake(fs_fh *fh)
{
	struct parked *p;

	while ((p = fh->parked)) {
		if (!events_answer(fh, p->req, p->size))
			break;
		fh->parked = p->next;
		free(p);
	}
	if (fh->ph && (!fh->sub || gl_sub_peek(fh->sub) ||
	               gl_sub_status_get(fh->sub) != GL_SUB_LIVE)) {
		fuse_lowlevel_notify_poll(fh->ph);
		fuse_pollhandle_destroy(fh->ph);
		fh->ph = NULL;
	}
}

static void on_sub_notify(gl_sub *s, void *arg)
{
	events_wake(arg);
}

void fs__events_shutdown(gl_fs *fs)
{
	fs_fh *fh;

	for (fh = fs->handles; fh; fh = fh->next) {
		if (fh->kind != FH_EVENTS)
			continue;
		if (fh->sub) {
			gl_sub_free(fh->sub);
			fh->sub = NULL;
		}
		events_wake(fh); /* parked reads get EOF, pollers wake */
	}
}

void fs__sweep_parked(gl_fs *fs, uint64_t now_ms)
{
	struct parked *p, **pp;
	fs_fh *fh;

	for (fh = fs->handles; fh; fh = fh->next) {
		if (fh->kind != FH_EVENTS)
			continue;
		for (pp = &fh->parked; (p = *pp);) {
			if (now_ms - p->since_ms < FS_PARK_MAX_MS) {
				pp = &p->next;
				continue;
			}
			/* Bounded park: readers re-issue the read (safe_read). */
			*pp = p->next;
			fuse_reply_err(p->req, EINTR);
			free(p);
		}
	}
}

void fs__op_poll(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi,
                 struct fuse_pollhandle *ph)
{
	fs_fh *fh = fh_of(fi);
	unsigned want = fi->poll_events ? fi->poll_events : (POLLIN | POLLOUT);
	unsigned revents;
	bool ready;

	if (fh->kind != FH_EVENTS) {
		/* Regular files are always ready; never ENOSYS (the kernel
		 * would remember it for the whole connection). */
		if (ph)
			fuse_pollhandle_destroy(ph);
		fuse_reply_poll(req, want & (POLLIN | POLLOUT | POLLRDNORM | POLLWRNORM));
		return;
	}
	ready = !fh->sub || gl_sub_peek(fh->sub) || gl_sub_status_get(fh->sub) != GL_SUB_LIVE;
	revents = ready ? (POLLIN | POLLRDNORM) & (want | POLLIN) : 0;
	if (ph) {
		if (ready) {
			fuse_pollhandle_destroy(ph);
		} else {
			/* Only the newest handle matters; it is one-shot. */
			if (fh->ph)
				fuse_pollhandle_destroy(fh->ph);
			fh->ph = ph;
		}
	}
	fuse_reply_poll(req, revents);
}

/* ---- release ----------------------------------------------------------- */

void fs__release_handle(fs_fh *fh)
{
	struct parked *p;
	int r;

	fh->released = true;
	switch (fh->kind) {
	case FH_VALUE:
		/* Closed without a flush that committed (e.g. the FLUSH was
		 * never sent): commit now, nobody waits for it. */
		if (fh->dirty && !fh->failed) {
			r = commit(fh, NULL);
			if (r < 0)
				log_warn("%s: value written at close was refused: %s", fh->node->name,
				         strerror(-r));
		}
		break;
	case FH_EVENTS:
		while ((p = fh->parked)) {
			fh->parked = p->next;
			fuse_reply_err(p->req, EINTR);
			free(p);
		}
		if (fh->sub) {
			gl_sub_free(fh->sub);
			fh->sub = NULL;
		}
		if (fh->ph) {
			fuse_pollhandle_destroy(fh->ph);
			fh->ph = NULL;
		}
		break;
	case FH_SCRATCH:
		fh->scratch->opens--;
		fh->scratch->last_close_ms = fs__now_ms(fh->fs);
		break;
	case FH_SNAPSHOT:
		break;
	}
	fh_unref(fh);
}

void fs__op_release(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	fs__release_handle(fh_of(fi));
	fuse_reply_err(req, 0);
}

void fs__handle_free_all(gl_fs *fs)
{
	fs_fh *fh;

	/* Teardown after the session stopped: no more replies, no model. */
	while ((fh = fs->handles)) {
		struct fh_waiters *w = waiters_of(fh);

		fs->handles = fh->next;
		while (fh->parked) {
			struct parked *p = fh->parked;

			fh->parked = p->next;
			free(p);
		}
		while (w->head) {
			struct waiter *it = w->head;

			w->head = it->next;
			free(it);
		}
		fh->node->opens--;
		fh_free(fh);
	}
}
