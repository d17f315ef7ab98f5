/* GET /1.0/images/{fingerprint}/export (specs/devlxd-api.md §7).
 *
 * The image store is a directory: <fingerprint>[<ext>] is an image (one
 * file, a unified tarball or squashfs as LXD exports them), and an empty
 * <fingerprint>.public marks it public. The lookup is by prefix, as LXD's
 * (a 12-digit prefix finds the image), and answers with LXD's two 404
 * envelopes. The file is served as Go's http.ServeContent serves it (Range,
 * If-Modified-Since and the other preconditions), read with uv_fs_* on
 * libuv's pool and written as the client takes it: the loop never blocks. */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <time.h>

#include "bridge/devlxd_priv.h"
#include "core/json.h"

#define FP_LEN 64
#define CHUNK (64 << 10)

typedef struct export_ctx {
	gl_http_conn *c; /* NULL once the connection is gone */
	const gl_http_req *r;
	uv_loop_t *loop;
	uv_fs_t req;
	bool busy; /* req in flight */
	char *dir, *want;
	char *file; /* chosen file name */
	char fp[FP_LEN + 1];
	uv_file fd;
	int64_t size, off, end, mtime;
	char *buf;
} export_ctx;

int gl__devlxd_envelope(gl_http_conn *c, int code, const char *msg, size_t len)
{
	static const gl_http_hdr h[] = {{"Content-Type", "application/json"},
					{"X-Content-Type-Options", "nosniff"}};
	gl_buf b = GL_BUF_INIT;
	int r;

	r = gl_buf_printf(&b,
			  "{\"type\":\"error\",\"status\":\"\",\"status_code\":0,\"operation\":\"\","
			  "\"error_code\":%d,\"error\":",
			  code);
	if (!r)
		r = gl_json_quote(&b, msg, len, true);
	if (!r)
		r = gl_buf_adds(&b, ",\"metadata\":null}\n\n");
	if (r)
		r = gl_http_error(c, 500, "internal server error");
	else
		r = gl_http_respond(c, code, h, 2, b.data, b.len);
	gl_buf_free(&b);
	return r;
}

static bool all_hex(const char *s, size_t n)
{
	for (size_t i = 0; i < n; i++) {
		char c = s[i];

		if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F')))
			return false;
	}
	return true;
}

static void ctx_free(export_ctx *x)
{
	if (x->fd >= 0) {
		uv_fs_t cl;

		uv_fs_close(x->loop, &cl, x->fd, NULL); /* close(2) on the loop: quick */
		uv_fs_req_cleanup(&cl);
	}
	free(x->dir);
	free(x->want);
	free(x->file);
	free(x->buf);
	free(x);
}

static void on_cancel(void *arg)
{
	export_ctx *x = arg;

	x->c = NULL;
	if (!x->busy)
		ctx_free(x);
}

static void not_found(export_ctx *x)
{
	static const char msg[] = "Image not found";

	gl__devlxd_envelope(x->c, 404, msg, sizeof(msg) - 1);
}

/* ---- Go's http.ParseTime and the preconditions of ServeContent -------- */

static int64_t parse_http_time(const char *v, size_t n)
{
	static const char *const fmts[] = {"%a, %d %b %Y %H:%M:%S GMT", "%A, %d-%b-%y %H:%M:%S GMT",
					   "%a %b %e %H:%M:%S %Y"};
	char tmp[64];

	if (!v || n == 0 || n >= sizeof(tmp))
		return -1;
	memcpy(tmp, v, n);
	tmp[n] = '\0';
	for (size_t k = 0; k < sizeof(fmts) / sizeof(fmts[0]); k++) {
		struct tm tm;
		const char *end;

		memset(&tm, 0, sizeof(tm));
		end = strptime(tmp, fmts[k], &tm);
		if (end && *end == '\0')
			return (int64_t)timegm(&tm);
	}
	return -1;
}

/* If-Match / If-None-Match against a response that has no ETag: only "*"
 * can match. */
static bool etag_list_has_star(const char *v, size_t n)
{
	for (size_t i = 0; i < n; i++) {
		if (v[i] == ' ' || v[i] == '\t' || v[i] == ',')
			continue;
		if (v[i] == '*')
			return true;
		/* skip an entity tag */
		while (i < n && v[i] != ',')
			i++;
	}
	return false;
}

enum cond { C_NONE, C_TRUE, C_FALSE };

static bool method_is(const gl_http_req *r, const char *m)
{
	return strcmp(r->method, m) == 0;
}

/* 0: serve (*range_hdr set or NULL), 304 or 412: answer that. */
static int preconditions(const gl_http_req *r, int64_t mtime, const char **range_hdr,
			 size_t *range_len)
{
	const char *v;
	size_t n;
	enum cond ch = C_NONE;

	*range_hdr = NULL;
	v = gl_http_req_get(r, "If-Match", &n);
	if (v && n)
		ch = etag_list_has_star(v, n) ? C_TRUE : C_FALSE;
	if (ch == C_NONE) {
		v = gl_http_req_get(r, "If-Unmodified-Since", &n);
		if (v && n) {
			int64_t t = parse_http_time(v, n);

			if (t >= 0)
				ch = mtime <= t ? C_TRUE : C_FALSE;
		}
	}
	if (ch == C_FALSE)
		return 412;
	v = gl_http_req_get(r, "If-None-Match", &n);
	if (v && n) {
		if (etag_list_has_star(v, n))
			return method_is(r, "GET") || method_is(r, "HEAD") ? 304 : 412;
	} else if (method_is(r, "GET") || method_is(r, "HEAD")) {
		v = gl_http_req_get(r, "If-Modified-Since", &n);
		if (v && n) {
			int64_t t = parse_http_time(v, n);

			if (t >= 0 && mtime <= t)
				return 304;
		}
	}
	v = gl_http_req_get(r, "Range", &n);
	if (v && n) {
		const char *ir;
		size_t irn;

		*range_hdr = v;
		*range_len = n;
		ir = gl_http_req_get(r, "If-Range", &irn);
		if (ir && irn && (method_is(r, "GET") || method_is(r, "HEAD"))) {
			int64_t t = ir[0] == '"' || (irn > 1 && ir[0] == 'W' && ir[1] == '/')
					    ? -1
					    : parse_http_time(ir, irn);

			if (t != mtime)
				*range_hdr = NULL;
		}
	}
	return 0;
}

/* Go's parseRange for one range (several ranges are served whole: see
 * docs/devlxd.md). 0: no usable range, 1: [start, start+len), -1: invalid,
 * -2: no overlap. */
static int parse_range(const char *v, size_t n, int64_t size, int64_t *start, int64_t *len)
{
	size_t pos = 6;
	int nranges = 0;
	bool no_overlap = false;
	int64_t sum = 0;

	if (n < 6 || memcmp(v, "bytes=", 6) != 0)
		return -1;
	while (pos <= n) {
		const char *ra = v + pos, *comma = memchr(ra, ',', n - pos), *dash;
		size_t rl = comma ? (size_t)(comma - ra) : n - pos;
		const char *a, *b;
		size_t al, bl;
		int64_t s, e, l;
		char tmp[32];
		char *end;

		pos += rl + 1;
		gl_http_trim(&ra, &rl);
		if (!rl)
			continue;
		dash = memchr(ra, '-', rl);
		if (!dash)
			return -1;
		a = ra;
		al = (size_t)(dash - ra);
		b = dash + 1;
		bl = rl - al - 1;
		gl_http_trim(&a, &al);
		gl_http_trim(&b, &bl);
		if (al >= sizeof(tmp) || bl >= sizeof(tmp))
			return -1;
		if (!al) {
			if (!bl || b[0] == '-')
				return -1;
			memcpy(tmp, b, bl);
			tmp[bl] = '\0';
			errno = 0;
			l = strtoll(tmp, &end, 10);
			if (errno || *end || l < 0)
				return -1;
			if (l > size)
				l = size;
			s = size - l;
		} else {
			memcpy(tmp, a, al);
			tmp[al] = '\0';
			errno = 0;
			s = strtoll(tmp, &end, 10);
			if (errno || *end || s < 0 || tmp[0] == '+' || tmp[0] == '-')
				return -1;
			if (s >= size) {
				no_overlap = true;
				continue;
			}
			if (!bl) {
				l = size - s;
			} else {
				memcpy(tmp, b, bl);
				tmp[bl] = '\0';
				errno = 0;
				e = strtoll(tmp, &end, 10);
				if (errno || *end || s > e || tmp[0] == '+')
					return -1;
				if (e >= size)
					e = size - 1;
				l = e - s + 1;
			}
		}
		if (nranges == 0) {
			*start = s;
			*len = l;
		}
		nranges++;
		sum += l;
	}
	if (no_overlap && nranges == 0)
		return -2;
	if (nranges != 1 || sum > size)
		return 0;
	return 1;
}

/* ---- streaming ------------------------------------------------------------ */

static void on_more(gl_http_conn *c, void *arg);

/* The body is over (whole, or short when the file shrank or failed under
 * us: http.c then closes the connection). */
static void finish(export_ctx *x)
{
	gl_http_conn *c = x->c;

	gl_http_set_cancel(c, NULL, NULL);
	gl_http_stream_end(c);
	ctx_free(x);
}

static void on_read_done(uv_fs_t *req)
{
	export_ctx *x = req->data;
	ssize_t n = req->result;

	x->busy = false;
	uv_fs_req_cleanup(req);
	if (!x->c) {
		ctx_free(x);
		return;
	}
	if (n <= 0) {
		finish(x);
		return;
	}
	x->off += n;
	gl_http_stream_write(x->c, x->buf, (size_t)n);
	if (x->off >= x->end)
		finish(x);
	/* otherwise the connection asks for more (on_more) once it has room;
	 * the cancel hook frees x if it goes away first */
}

static void on_more(gl_http_conn *c, void *arg)
{
	export_ctx *x = arg;
	uv_buf_t b;
	int64_t left = x->end - x->off;

	if (x->busy)
		return;
	if (left <= 0) {
		finish(x);
		return;
	}
	b = uv_buf_init(x->buf, (unsigned)(left < CHUNK ? left : CHUNK));
	x->req.data = x;
	if (uv_fs_read(x->loop, &x->req, x->fd, &b, 1, x->off, on_read_done)) {
		finish(x);
		return;
	}
	x->busy = true;
}

static void serve(export_ctx *x)
{
	char disp[FP_LEN + 300], clen[32], crange[96], lm[30];
	const char *range;
	size_t rlen = 0;
	int64_t start = 0, len = x->size;
	int pre, pr = 0, r;
	gl_http_conn *c = x->c;

	snprintf(disp, sizeof(disp), "inline;filename=%s", x->file);
	gl_http_date((time_t)x->mtime, lm);
	pre = preconditions(x->r, x->mtime, &range, &rlen);
	if (pre == 304) {
		const gl_http_hdr h[] = {{"Content-Disposition", disp}, {"Last-Modified", lm}};

		gl_http_respond(c, 304, h, 2, NULL, 0);
		ctx_free(x);
		return;
	}
	if (pre == 412) {
		const gl_http_hdr h[] = {{"Content-Disposition", disp},
					 {"Content-Type", "application/octet-stream"},
					 {"Last-Modified", lm}};

		gl_http_respond(c, 412, h, 3, NULL, 0);
		ctx_free(x);
		return;
	}
	if (range)
		pr = parse_range(range, rlen, x->size, &start, &len);
	if (pr < 0) {
		const char *text = pr == -2 ? "invalid range: failed to overlap\n" : "invalid range\n";
		char cr[48];
		gl_http_hdr h[5];
		size_t nh = 0;

		snprintf(cr, sizeof(cr), "bytes */%" PRId64, x->size);
		h[nh++] = (gl_http_hdr){"Content-Disposition", disp};
		if (pr == -2)
			h[nh++] = (gl_http_hdr){"Content-Range", cr};
		h[nh++] = (gl_http_hdr){"Content-Type", "text/plain; charset=utf-8"};
		h[nh++] = (gl_http_hdr){"Last-Modified", lm};
		h[nh++] = (gl_http_hdr){"X-Content-Type-Options", "nosniff"};
		gl_http_respond(c, 416, h, nh, text, strlen(text));
		ctx_free(x);
		return;
	}
	if (pr == 0) {
		start = 0;
		len = x->size;
	}
	x->off = start;
	x->end = start + len;
	snprintf(clen, sizeof(clen), "%" PRId64, len);
	if (pr == 1) {
		const gl_http_hdr h[] = {{"Accept-Ranges", "bytes"},
					 {"Content-Disposition", disp},
					 {"Content-Length", clen},
					 {"Content-Range", crange},
					 {"Content-Type", "application/octet-stream"},
					 {"Last-Modified", lm}};

		snprintf(crange, sizeof(crange), "bytes %" PRId64 "-%" PRId64 "/%" PRId64, start,
			 start + len - 1, x->size);
		r = gl_http_stream_begin(c, 206, h, 6, on_more, x);
	} else {
		const gl_http_hdr h[] = {{"Accept-Ranges", "bytes"},
					 {"Content-Disposition", disp},
					 {"Content-Length", clen},
					 {"Content-Type", "application/octet-stream"},
					 {"Last-Modified", lm}};

		r = gl_http_stream_begin(c, 200, h, 5, on_more, x);
	}
	if (r != 0) {
		/* HEAD, empty body, or the connection is gone: nothing to stream */
		ctx_free(x);
		return;
	}
	gl_http_set_cancel(c, on_cancel, x);
	x->buf = malloc(CHUNK);
	if (!x->buf)
		finish(x);
}

static void on_fstat(uv_fs_t *req)
{
	export_ctx *x = req->data;

	x->busy = false;
	if (!x->c) {
		uv_fs_req_cleanup(req);
		ctx_free(x);
		return;
	}
	if (req->result < 0 || !S_ISREG(req->statbuf.st_mode)) {
		uv_fs_req_cleanup(req);
		gl_http_set_cancel(x->c, NULL, NULL);
		not_found(x);
		ctx_free(x);
		return;
	}
	x->size = (int64_t)req->statbuf.st_size;
	x->mtime = (int64_t)req->statbuf.st_mtim.tv_sec;
	uv_fs_req_cleanup(req);
	gl_http_set_cancel(x->c, NULL, NULL);
	serve(x);
}

static void on_open(uv_fs_t *req)
{
	export_ctx *x = req->data;

	x->busy = false;
	if (req->result >= 0)
		x->fd = (uv_file)req->result;
	uv_fs_req_cleanup(req);
	if (!x->c) {
		ctx_free(x);
		return;
	}
	if (x->fd < 0) {
		gl_http_set_cancel(x->c, NULL, NULL);
		not_found(x);
		ctx_free(x);
		return;
	}
	x->req.data = x;
	if (uv_fs_fstat(x->loop, &x->req, x->fd, on_fstat)) {
		gl_http_set_cancel(x->c, NULL, NULL);
		not_found(x);
		ctx_free(x);
		return;
	}
	x->busy = true;
}

static void on_scandir(uv_fs_t *req)
{
	export_ctx *x = req->data;
	size_t wl = strlen(x->want);
	uv_dirent_t ent;
	char *chosen = NULL;
	bool ambiguous = false, public_ = false;
	gl_buf markers = GL_BUF_INIT; /* fingerprints with a .public file */
	gl_buf path = GL_BUF_INIT;

	x->busy = false;
	if (!x->c) {
		uv_fs_req_cleanup(req);
		ctx_free(x);
		return;
	}
	if (req->result >= 0) {
		while (uv_fs_scandir_next(req, &ent) == 0) {
			const char *name = ent.name, *ext = name + FP_LEN;

			if (strlen(name) < FP_LEN || !all_hex(name, FP_LEN) ||
			    (name[FP_LEN] && name[FP_LEN] != '.'))
				continue;
			if (strncasecmp(name, x->want, wl) != 0)
				continue;
			if (strcmp(ext, ".public") == 0) {
				gl_buf_add(&markers, name, FP_LEN);
				continue;
			}
			if (strcmp(ext, ".rootfs") == 0 || strcmp(ext, ".partial") == 0)
				continue;
			if (!chosen) {
				chosen = strdup(name);
			} else if (strncmp(chosen, name, FP_LEN) != 0) {
				ambiguous = true;
			} else if (strcmp(name, chosen) < 0) {
				/* several files for one image: the first by name wins */
				free(chosen);
				chosen = strdup(name);
			}
		}
	}
	uv_fs_req_cleanup(req);
	gl_http_set_cancel(x->c, NULL, NULL);
	if (ambiguous) {
		static const char msg[] = "More than one image matches";

		gl__devlxd_envelope(x->c, 500, msg, sizeof(msg) - 1);
		goto done;
	}
	if (!chosen) {
		not_found(x);
		goto done;
	}
	for (size_t k = 0; k + FP_LEN <= markers.len; k += FP_LEN)
		if (memcmp(markers.data + k, chosen, FP_LEN) == 0)
			public_ = true;
	if (!public_) {
		gl_buf msg = GL_BUF_INIT;

		/* LXD names the fingerprint as it was asked for */
		if (gl_buf_printf(&msg, "Image \"%s\" not found", x->want))
			gl_http_error(x->c, 500, "internal server error");
		else
			gl__devlxd_envelope(x->c, 404, msg.data, msg.len);
		gl_buf_free(&msg);
		goto done;
	}
	memcpy(x->fp, chosen, FP_LEN);
	x->fp[FP_LEN] = '\0';
	x->file = chosen;
	chosen = NULL;
	if (gl_buf_printf(&path, "%s/%s", x->dir, x->file)) {
		gl_http_error(x->c, 500, "internal server error");
		goto done;
	}
	x->req.data = x;
	/* O_NOFOLLOW: an image is a file in the images directory, never what
	 * a link there points to */
	if (uv_fs_open(x->loop, &x->req, path.data, O_RDONLY | O_CLOEXEC | O_NOFOLLOW, 0,
		       on_open)) {
		not_found(x);
		goto done;
	}
	x->busy = true;
	gl_http_set_cancel(x->c, on_cancel, x);
	gl_buf_free(&path);
	gl_buf_free(&markers);
	return;
done:
	free(chosen);
	gl_buf_free(&path);
	gl_buf_free(&markers);
	ctx_free(x);
}

void gl__devlxd_image_export(gl_http_conn *c, const gl_http_req *r, const char *images_dir,
			     const char *fp, size_t fplen)
{
	gl_buf want = GL_BUF_INIT;
	export_ctx *x;

	/* a fingerprint is hex; anything else ('/', "..", NUL, wildcards) can
	 * only be "not found" */
	if (gl_url_unescape(fp, fplen, false, &want) || want.len == 0 || want.len > FP_LEN ||
	    !all_hex(want.data, want.len) || !images_dir || !*images_dir) {
		gl_buf_free(&want);
		gl__devlxd_envelope(c, 404, "Image not found", 15);
		return;
	}
	x = calloc(1, sizeof(*x));
	if (!x) {
		gl_buf_free(&want);
		gl_http_error(c, 500, "internal server error");
		return;
	}
	x->c = c;
	x->r = r;
	x->loop = gl_http_conn_loop(c);
	x->fd = -1;
	x->want = gl_buf_steal(&want, NULL);
	x->dir = strdup(images_dir);
	if (!x->want || !x->dir) {
		ctx_free(x);
		gl_http_error(c, 500, "internal server error");
		return;
	}
	x->req.data = x;
	if (uv_fs_scandir(x->loop, &x->req, x->dir, 0, on_scandir)) {
		ctx_free(x);
		gl__devlxd_envelope(c, 404, "Image not found", 15);
		return;
	}
	x->busy = true;
	gl_http_set_cancel(c, on_cancel, x);
}
