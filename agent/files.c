/* The file operations: read (streamed), write (temporary file, fsync,
 * rename), stat (lstat) and list. Disk work runs on libuv's thread pool;
 * a request whose connection dies waits for its pending job before it is
 * freed. */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "agent/agent.h"

/* A JSON "entries" frame is cut well under GL_FRAME_MAX. */
#define LIST_FRAME_BUDGET (512u << 10)

typedef struct file_req {
	agent_req r; /* first */
	uv_fs_t fs;
	bool busy;    /* a uv_fs job is pending: fs is in use */
	bool aborted; /* the connection is gone, or CANCEL: finish quietly */
	bool cancelled;
	uv_file fd;
	/* read */
	char *buf[2];
	size_t pend_len;
	bool have_pend, waiting;
	int cur;
	/* write */
	uv_work_t work;   /* the finishing job: fsync, link, rename */
	char *tmp;        /* the named temporary file, if any */
	char *path;
	char *tmpl;       /* ".NAME.gl-XXXXXX" beside the target */
	unsigned mode;
	int werr;         /* from the finishing job */
	bool unnamed;     /* an O_TMPFILE: nothing to clean on disk */
	gl_buf q;         /* received, not yet handed to the disk */
	gl_buf w;         /* being written */
	size_t woff;
	uint64_t written;
	bool end_seen, ready;
} file_req;

static file_req *file_req_new(agent_conn *c, uint32_t id, const agent_req_ops *ops)
{
	file_req *fr = calloc(1, sizeof(*fr));

	if (!fr)
		return NULL;
	fr->fd = -1;
	agent_req_add(c, &fr->r, id, ops);
	fr->fs.data = fr;
	return fr;
}

static void file_req_free(file_req *fr)
{
	if (fr->fd >= 0)
		close(fr->fd);
	if (fr->tmp) {
		/* Never answered: the temporary file must not stay. */
		unlink(fr->tmp);
		free(fr->tmp);
	}
	free(fr->path);
	free(fr->tmpl);
	free(fr->buf[0]);
	free(fr->buf[1]);
	gl_buf_free(&fr->q);
	gl_buf_free(&fr->w);
	agent_req_free(&fr->r);
}

/* Fail (unless already quiet) and free. The temporary file goes first:
 * whoever reads the ERROR must not find it. */
static void file_fail(file_req *fr, int e)
{
	if (fr->tmp) {
		unlink(fr->tmp);
		free(fr->tmp);
		fr->tmp = NULL;
	}
	if (!fr->aborted)
		agent_req_fail(&fr->r, e, NULL);
	file_req_free(fr);
}

/* path must be an absolute path without NUL bytes. */
static const char *req_path(json_t *req)
{
	json_t *p = json_object_get(req, "path");
	const char *s = json_string_value(p);

	if (!s || s[0] != '/' || strlen(s) != json_string_length(p))
		return NULL;
	return s;
}

static const char *mode_type(unsigned m)
{
	if (S_ISREG(m))
		return "file";
	if (S_ISDIR(m))
		return "dir";
	if (S_ISLNK(m))
		return "symlink";
	return "other";
}

/* Common head of every uv_fs callback: 1 when fr is still wanted. An
 * aborted request fails quietly (file_fail sends nothing then). */
static int fs_cb_head(file_req *fr, uv_fs_t *fs, ssize_t *res)
{
	*res = fs->result;
	uv_fs_req_cleanup(fs);
	fr->busy = false;
	if (fr->aborted || fr->cancelled) {
		file_fail(fr, ECANCELED);
		return 0;
	}
	if (*res < 0) {
		file_fail(fr, (int)-*res);
		return 0;
	}
	return 1;
}

/* After handing a job to libuv: ret is what the submission returned. */
static void submitted(file_req *fr, int ret)
{
	if (ret < 0)
		file_fail(fr, -ret);
	else
		fr->busy = true;
}

/* The request's path, or NULL once the request is failed. */
static const char *path_or_fail(agent_conn *c, uint32_t id, json_t *req)
{
	const char *path = req_path(req);

	if (!path)
		agent_conn_fail(c, id, EINVAL, "\"path\" must be an absolute path");
	return path;
}

/* Only the connection's end of things matters for these. */
static void quiet_abort(agent_req *r)
{
	file_req *fr = (file_req *)r;

	fr->aborted = true;
	if (!fr->busy)
		file_req_free(fr);
}

/* ---- read ------------------------------------------------------------------ */

static void read_next(file_req *fr);

static void read_cb(uv_fs_t *fs)
{
	file_req *fr = fs->data;
	ssize_t n;

	if (!fs_cb_head(fr, fs, &n))
		return;
	if (fr->have_pend)
		agent_req_send(&fr->r, GL_FRAME_DATA, n == 0 ? GL_FRAME_END : 0,
			       fr->buf[fr->cur ^ 1], fr->pend_len);
	if (n == 0) {
		if (!fr->have_pend)
			agent_req_send(&fr->r, GL_FRAME_DATA, GL_FRAME_END, NULL, 0);
		agent_req_done(&fr->r);
		file_req_free(fr);
		return;
	}
	/* Keep one chunk back so that the last one carries END. */
	fr->have_pend = true;
	fr->pend_len = (size_t)n;
	fr->cur ^= 1;
	read_next(fr);
}

static void read_next(file_req *fr)
{
	uv_buf_t b;
	int ret;

	if (agent_req_out_full(&fr->r)) {
		fr->waiting = true;
		return;
	}
	fr->waiting = false;
	b = uv_buf_init(fr->buf[fr->cur], GL_FRAME_CHUNK);
	ret = uv_fs_read(fr->r.agent->loop, &fr->fs, fr->fd, &b, 1, -1, read_cb);
	submitted(fr, ret);
}

static void read_fstat_cb(uv_fs_t *fs)
{
	file_req *fr = fs->data;
	uv_stat_t st = fs->statbuf;
	ssize_t res;
	json_t *j;

	if (!fs_cb_head(fr, fs, &res))
		return;
	if (S_ISDIR(st.st_mode)) {
		file_fail(fr, EISDIR);
		return;
	}
	j = json_pack("{s:I, s:I}", "size", (json_int_t)st.st_size, "mode",
		      (json_int_t)(st.st_mode & 07777));
	agent_req_send_json(&fr->r, GL_FRAME_RESPONSE, 0, j);
	read_next(fr);
}

static void read_open_cb(uv_fs_t *fs)
{
	file_req *fr = fs->data;
	ssize_t res = fs->result;

	if (res >= 0)
		fr->fd = (uv_file)res;
	if (!fs_cb_head(fr, fs, &res))
		return;
	submitted(fr, uv_fs_fstat(fr->r.agent->loop, &fr->fs, fr->fd, read_fstat_cb));
}

static void read_cancel(agent_req *r, int sig)
{
	agent_req_fail(r, ECANCELED, "cancelled");
	quiet_abort(r);
}

static void read_pause_out(agent_req *r, bool paused)
{
	file_req *fr = (file_req *)r;

	if (!paused && fr->waiting && !fr->busy)
		read_next(fr);
}

static const agent_req_ops read_ops = {
	.cancel = read_cancel,
	.abort = quiet_abort,
	.pause_out = read_pause_out,
};

void agent_op_read(agent_conn *c, uint32_t id, json_t *req)
{
	const char *path = path_or_fail(c, id, req);
	file_req *fr;
	int ret;

	if (!path)
		return;
	fr = file_req_new(c, id, &read_ops);
	if (!fr) {
		agent_conn_fail(c, id, ENOMEM, NULL);
		return;
	}
	fr->buf[0] = malloc(GL_FRAME_CHUNK);
	fr->buf[1] = malloc(GL_FRAME_CHUNK);
	if (!fr->buf[0] || !fr->buf[1]) {
		file_fail(fr, ENOMEM);
		return;
	}
	ret = uv_fs_open(fr->r.agent->loop, &fr->fs, path, O_RDONLY | O_CLOEXEC | O_NOCTTY, 0,
			 read_open_cb);
	submitted(fr, ret);
}

/* ---- write -----------------------------------------------------------------
 *
 * The data goes to an unnamed O_TMPFILE in the target's directory, so that
 * nothing is left on disk even if the agent itself is killed; it gets a
 * name (".NAME.gl-XXXXXX") only at the end, right before the rename. On a
 * file system without O_TMPFILE, the named temporary file is created first
 * (mkstemp) and removed on failure. */

static void write_pump(file_req *fr);

static void write_finish_err(file_req *fr, int e)
{
	file_fail(fr, fr->cancelled ? ECANCELED : e);
}

/* Give the unnamed file a fresh name from the template. */
static int link_unnamed(file_req *fr)
{
	static const char digits[] = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
	char proc[64], *name, *x;
	uint8_t rnd[GL_AUTH_NONCE];

	name = strdup(fr->tmpl);
	if (!name)
		return -ENOMEM;
	x = name + strlen(name) - 6;
	snprintf(proc, sizeof(proc), "/proc/self/fd/%d", fr->fd);
	for (int tries = 0; tries < 32; tries++) {
		gl_auth_nonce(rnd);
		for (int i = 0; i < 6; i++)
			x[i] = digits[rnd[i] % (sizeof(digits) - 1)];
		if (linkat(AT_FDCWD, proc, AT_FDCWD, name, AT_SYMLINK_FOLLOW) == 0 ||
		    (errno == ENOENT && linkat(fr->fd, "", AT_FDCWD, name, AT_EMPTY_PATH) == 0)) {
			fr->tmp = name;
			return 0;
		}
		if (errno != EEXIST)
			break;
	}
	free(name);
	return -errno;
}

/* On the thread pool: make the data durable and put it in place. */
static void write_finish_work(uv_work_t *w)
{
	file_req *fr = w->data;
	int ret = 0;

	if (fsync(fr->fd) < 0)
		ret = -errno;
	if (!ret && fr->unnamed)
		ret = link_unnamed(fr);
	if (!ret && rename(fr->tmp, fr->path) < 0)
		ret = -errno;
	if (close(fr->fd) < 0 && !ret && errno != EINTR)
		ret = -errno;
	fr->fd = -1;
	if (!ret) {
		free(fr->tmp);
		fr->tmp = NULL; /* it is the target now */
	}
	fr->werr = ret;
}

static void write_finish_after(uv_work_t *w, int status)
{
	file_req *fr = w->data;
	json_t *j;

	fr->busy = false;
	if (status < 0 && !fr->werr)
		fr->werr = status;
	if (fr->aborted) {
		file_req_free(fr);
		return;
	}
	if (fr->werr < 0) {
		file_fail(fr, -fr->werr);
		return;
	}
	j = json_pack("{s:I}", "size", (json_int_t)fr->written);
	agent_req_send_json(&fr->r, GL_FRAME_RESPONSE, GL_FRAME_END, j);
	agent_req_done(&fr->r);
	file_req_free(fr);
}

static void write_data_cb(uv_fs_t *fs)
{
	file_req *fr = fs->data;
	ssize_t res;

	if (!fs_cb_head(fr, fs, &res))
		return;
	fr->woff += (size_t)res;
	fr->written += (uint64_t)res;
	write_pump(fr);
}

/* Hand the next bytes to the disk, or finish; hold the connection's input
 * while the disk is behind. */
static void write_pump(file_req *fr)
{
	uv_buf_t b;
	int ret;

	if (fr->busy || !fr->ready)
		return;
	if (fr->woff == fr->w.len) {
		gl_buf_reset(&fr->w);
		fr->woff = 0;
		if (fr->q.len) {
			gl_buf tmp = fr->w;
			fr->w = fr->q;
			fr->q = tmp;
		}
	}
	if (fr->woff < fr->w.len) {
		agent_req_hold_input(&fr->r, true);
		b = uv_buf_init(fr->w.data + fr->woff, (unsigned)(fr->w.len - fr->woff));
		ret = uv_fs_write(fr->r.agent->loop, &fr->fs, fr->fd, &b, 1, -1, write_data_cb);
		submitted(fr, ret);
		return;
	}
	if (fr->end_seen) {
		fr->work.data = fr;
		ret = uv_queue_work(fr->r.agent->loop, &fr->work, write_finish_work,
				    write_finish_after);
		submitted(fr, ret);
		return;
	}
	agent_req_hold_input(&fr->r, false);
}

static void write_chmod_cb(uv_fs_t *fs)
{
	file_req *fr = fs->data;
	ssize_t res;

	if (!fs_cb_head(fr, fs, &res))
		return;
	fr->ready = true;
	write_pump(fr);
}

static void write_opened(file_req *fr)
{
	int ret;

	/* The requested mode exactly, whatever our umask. */
	ret = uv_fs_fchmod(fr->r.agent->loop, &fr->fs, fr->fd, (int)fr->mode, write_chmod_cb);
	submitted(fr, ret);
}

static void write_mkstemp_cb(uv_fs_t *fs)
{
	file_req *fr = fs->data;
	ssize_t res = fs->result;

	if (res >= 0) {
		fr->fd = (uv_file)res;
		fr->tmp = strdup(fs->path);
	}
	if (!fs_cb_head(fr, fs, &res))
		return;
	if (!fr->tmp) {
		file_fail(fr, ENOMEM);
		return;
	}
	write_opened(fr);
}

static void write_tmpfile_cb(uv_fs_t *fs)
{
	file_req *fr = fs->data;
	ssize_t res = fs->result;
	int ret;

	if (res >= 0) {
		fr->fd = (uv_file)res;
		fr->unnamed = true;
	}
	if (res == -EOPNOTSUPP || res == -EISDIR || res == -EINVAL) {
		/* No O_TMPFILE here: a named temporary file instead. */
		uv_fs_req_cleanup(fs);
		fr->busy = false;
		if (fr->aborted || fr->cancelled) {
			write_finish_err(fr, ECANCELED);
			return;
		}
		ret = uv_fs_mkstemp(fr->r.agent->loop, &fr->fs, fr->tmpl, write_mkstemp_cb);
		submitted(fr, ret);
		return;
	}
	if (!fs_cb_head(fr, fs, &res))
		return;
	write_opened(fr);
}

static void write_data(agent_req *r, const gl_frame *f)
{
	file_req *fr = (file_req *)r;

	if (fr->end_seen)
		return;
	if (f->len && gl_buf_add(&fr->q, f->payload, f->len) < 0) {
		file_fail(fr, ENOMEM);
		return;
	}
	if (f->flags & GL_FRAME_END)
		fr->end_seen = true;
	write_pump(fr);
}

static void write_cancel(agent_req *r, int sig)
{
	file_req *fr = (file_req *)r;

	fr->cancelled = true;
	if (!fr->busy)
		write_finish_err(fr, ECANCELED);
}

static const agent_req_ops write_ops = {
	.data = write_data,
	.cancel = write_cancel,
	.abort = quiet_abort,
};

void agent_op_write(agent_conn *c, uint32_t id, json_t *req)
{
	const char *path = path_or_fail(c, id, req), *slash;
	json_t *jm = json_object_get(req, "mode");
	unsigned mode = 0644;
	char *dir = NULL;
	file_req *fr;
	int ret;

	if (!path)
		return;
	if (jm && !json_is_null(jm)) {
		if (!json_is_integer(jm) || json_integer_value(jm) < 0 ||
		    json_integer_value(jm) > 07777) {
			agent_conn_fail(c, id, EINVAL, "\"mode\" must be an integer in 0..07777");
			return;
		}
		mode = (unsigned)json_integer_value(jm);
	}
	slash = strrchr(path, '/');
	if (!slash[1]) {
		agent_conn_fail(c, id, EISDIR, "\"path\" names a directory");
		return;
	}
	fr = file_req_new(c, id, &write_ops);
	if (!fr) {
		agent_conn_fail(c, id, ENOMEM, NULL);
		return;
	}
	fr->mode = mode;
	fr->path = strdup(path);
	/* In the target's directory, so that rename() is atomic. */
	if (!fr->path ||
	    asprintf(&fr->tmpl, "%.*s/.%s.gl-XXXXXX", (int)(slash - path), path, slash + 1) < 0) {
		fr->tmpl = NULL;
		file_fail(fr, ENOMEM);
		return;
	}
	if (asprintf(&dir, "%.*s", slash == path ? 1 : (int)(slash - path), path) < 0) {
		file_fail(fr, ENOMEM);
		return;
	}
	/* Nothing more is read from the connection until the file exists. */
	agent_req_hold_input(&fr->r, true);
	ret = uv_fs_open(fr->r.agent->loop, &fr->fs, dir, O_TMPFILE | O_WRONLY | O_CLOEXEC, 0600,
			 write_tmpfile_cb);
	free(dir);
	submitted(fr, ret);
}

/* ---- stat ------------------------------------------------------------------ */

static void stat_cb(uv_fs_t *fs)
{
	file_req *fr = fs->data;
	uv_stat_t st = fs->statbuf;
	ssize_t res;
	json_t *j;

	if (!fs_cb_head(fr, fs, &res))
		return;
	j = json_pack("{s:s, s:I, s:I, s:I, s:I, s:I}", "type", mode_type((unsigned)st.st_mode),
		      "mode", (json_int_t)(st.st_mode & 07777), "size", (json_int_t)st.st_size,
		      "uid", (json_int_t)st.st_uid, "gid", (json_int_t)st.st_gid, "mtime_ns",
		      (json_int_t)st.st_mtim.tv_sec * 1000000000 + st.st_mtim.tv_nsec);
	agent_req_send_json(&fr->r, GL_FRAME_RESPONSE, GL_FRAME_END, j);
	agent_req_done(&fr->r);
	file_req_free(fr);
}

static const agent_req_ops stat_ops = {
	.abort = quiet_abort,
};

void agent_op_stat(agent_conn *c, uint32_t id, json_t *req)
{
	const char *path = path_or_fail(c, id, req);
	file_req *fr;

	if (!path)
		return;
	fr = file_req_new(c, id, &stat_ops);
	if (!fr) {
		agent_conn_fail(c, id, ENOMEM, NULL);
		return;
	}
	submitted(fr, uv_fs_lstat(fr->r.agent->loop, &fr->fs, path, stat_cb));
}

/* ---- list ------------------------------------------------------------------ */

typedef struct list_ent {
	char *name;
	unsigned mode;
	int64_t size;
} list_ent;

typedef struct list_req {
	agent_req r; /* first */
	uv_work_t work;
	bool busy, aborted;
	char *path;
	list_ent *ents;
	size_t n;
	int err; /* from the worker */
} list_req;

static int ent_cmp(const void *a, const void *b)
{
	return strcmp(((const list_ent *)a)->name, ((const list_ent *)b)->name);
}

static void list_free(list_req *l)
{
	for (size_t i = 0; i < l->n; i++)
		free(l->ents[i].name);
	free(l->ents);
	free(l->path);
	agent_req_free(&l->r);
}

/* On the thread pool: no loop, no connection. */
static void list_work(uv_work_t *w)
{
	list_req *l = w->data;
	size_t cap = 0;
	struct dirent *de;
	struct stat st;
	DIR *d;

	d = opendir(l->path);
	if (!d) {
		l->err = errno;
		return;
	}
	while ((errno = 0, de = readdir(d))) {
		list_ent *ne;

		if (!strcmp(de->d_name, ".") || !strcmp(de->d_name, ".."))
			continue;
		if (fstatat(dirfd(d), de->d_name, &st, AT_SYMLINK_NOFOLLOW) < 0)
			continue; /* gone meanwhile */
		if (l->n == cap) {
			cap = cap ? cap * 2 : 64;
			ne = realloc(l->ents, cap * sizeof(*ne));
			if (!ne) {
				l->err = ENOMEM;
				break;
			}
			l->ents = ne;
		}
		l->ents[l->n].name = strdup(de->d_name);
		if (!l->ents[l->n].name) {
			l->err = ENOMEM;
			break;
		}
		l->ents[l->n].mode = st.st_mode;
		l->ents[l->n].size = st.st_size;
		l->n++;
	}
	if (!de && errno && !l->err)
		l->err = errno;
	closedir(d);
	if (!l->err && l->n > 1)
		qsort(l->ents, l->n, sizeof(*l->ents), ent_cmp);
}

static void list_after(uv_work_t *w, int status)
{
	list_req *l = w->data;
	json_t *arr = NULL;
	size_t budget = 0;

	l->busy = false;
	if (l->aborted) {
		list_free(l);
		return;
	}
	if (status < 0 || l->err) {
		agent_req_fail(&l->r, status < 0 ? -status : l->err, NULL);
		list_free(l);
		return;
	}
	for (size_t i = 0; i <= l->n; i++) {
		json_t *e, *name;

		if (!arr && !(arr = json_array()))
			goto nomem;
		if (i == l->n || budget > LIST_FRAME_BUDGET) {
			bool last = i == l->n;

			if (agent_req_send_json(&l->r, GL_FRAME_RESPONSE, last ? GL_FRAME_END : 0,
						json_pack("{s:o}", "entries", arr)) < 0 && !l->r.conn) {
				arr = NULL;
				break;
			}
			arr = NULL;
			budget = 0;
			if (last)
				break;
			if (!(arr = json_array()))
				goto nomem;
		}
		/* A name that is not UTF-8 cannot travel in JSON: left out. */
		name = json_string(l->ents[i].name);
		if (!name)
			continue;
		e = json_pack("{s:o, s:s, s:I, s:I}", "name", name, "type",
			      mode_type(l->ents[i].mode), "size", (json_int_t)l->ents[i].size,
			      "mode", (json_int_t)(l->ents[i].mode & 07777));
		if (!e || json_array_append_new(arr, e) < 0)
			goto nomem;
		budget += strlen(l->ents[i].name) * 6 + 96;
	}
	agent_req_done(&l->r);
	list_free(l);
	return;
nomem:
	json_decref(arr);
	agent_req_fail(&l->r, ENOMEM, NULL);
	list_free(l);
}

static void list_abort(agent_req *r)
{
	list_req *l = (list_req *)r;

	l->aborted = true;
	if (!l->busy)
		list_free(l);
}

static const agent_req_ops list_ops = {
	.abort = list_abort,
};

void agent_op_list(agent_conn *c, uint32_t id, json_t *req)
{
	const char *path = path_or_fail(c, id, req);
	list_req *l;
	int ret;

	if (!path)
		return;
	l = calloc(1, sizeof(*l));
	if (!l) {
		agent_conn_fail(c, id, ENOMEM, NULL);
		return;
	}
	agent_req_add(c, &l->r, id, &list_ops);
	l->work.data = l;
	l->path = strdup(path);
	if (!l->path) {
		agent_req_fail(&l->r, ENOMEM, NULL);
		list_free(l);
		return;
	}
	ret = uv_queue_work(l->r.agent->loop, &l->work, list_work, list_after);
	if (ret < 0) {
		agent_req_fail(&l->r, -ret, NULL);
		list_free(l);
		return;
	}
	l->busy = true;
}
