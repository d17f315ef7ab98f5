/* The control channel's frames (bridge/frame.h). */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bridge/frame.h"

static void put_u32(uint8_t *p, uint32_t v)
{
	p[0] = (uint8_t)(v >> 24);
	p[1] = (uint8_t)(v >> 16);
	p[2] = (uint8_t)(v >> 8);
	p[3] = (uint8_t)v;
}

static uint32_t get_u32(const uint8_t *p)
{
	return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | (uint32_t)p[3];
}

void gl_frame_hdr(uint8_t *out, uint32_t len, uint32_t id, uint8_t type, uint8_t flags)
{
	put_u32(out, len);
	put_u32(out + 4, id);
	out[8] = type;
	out[9] = flags;
}

int gl_frame_append(gl_buf *out, uint32_t id, uint8_t type, uint8_t flags, const void *p,
		    size_t n)
{
	uint8_t hdr[GL_FRAME_HDR];
	int r;

	if (n > GL_FRAME_MAX)
		return -EMSGSIZE;
	r = gl_buf_reserve(out, GL_FRAME_HDR + n);
	if (r < 0)
		return r;
	gl_frame_hdr(hdr, (uint32_t)n, id, type, flags);
	gl_buf_add(out, hdr, sizeof(hdr));
	gl_buf_add(out, p, n);
	return 0;
}

int gl_frame_append_json(gl_buf *out, uint32_t id, uint8_t type, uint8_t flags,
			 const json_t *j)
{
	char *s;
	int r;

	s = json_dumps(j, JSON_COMPACT);
	if (!s)
		return -ENOMEM;
	r = gl_frame_append(out, id, type, flags, s, strlen(s));
	free(s);
	return r;
}

void gl_frame_reader_init(gl_frame_reader *r, uint32_t max)
{
	memset(r, 0, sizeof(*r));
	r->max = max;
}

void gl_frame_reader_free(gl_frame_reader *r)
{
	gl_buf_free(&r->in);
	r->off = 0;
}

int gl_frame_reader_feed(gl_frame_reader *r, const void *p, size_t n)
{
	/* Frames already returned are forgotten here, not in gl_frame_next,
	 * so that a returned payload stays valid until the next feed. */
	if (r->off) {
		size_t rest = r->in.len - r->off;

		if (rest)
			memmove(r->in.data, r->in.data + r->off, rest);
		r->in.len = rest;
		if (r->in.data)
			r->in.data[rest] = '\0';
		r->off = 0;
	}
	if (!n)
		return 0;
	return gl_buf_add(&r->in, p, n);
}

int gl_frame_next(gl_frame_reader *r, gl_frame *f)
{
	const uint8_t *h;
	size_t avail = r->in.len - r->off;
	uint32_t len;

	if (avail < GL_FRAME_HDR)
		return 0;
	h = (const uint8_t *)r->in.data + r->off;
	len = get_u32(h);
	/* Refuse on the header alone: an oversize payload is never buffered. */
	if (len > r->max)
		return -EMSGSIZE;
	if (avail - GL_FRAME_HDR < len)
		return 0;
	f->len = len;
	f->id = get_u32(h + 4);
	f->type = h[8];
	f->flags = h[9];
	f->payload = h + GL_FRAME_HDR;
	r->off += GL_FRAME_HDR + len;
	return 1;
}

size_t gl_frame_reader_pending(const gl_frame_reader *r)
{
	return r->in.len - r->off;
}

json_t *gl_frame_json(const gl_frame *f, char *err, size_t errlen)
{
	json_error_t je;
	json_t *j;

	j = json_loadb((const char *)f->payload, f->len, JSON_REJECT_DUPLICATES, &je);
	if (!j) {
		if (err && errlen)
			snprintf(err, errlen, "bad JSON: %s", je.text);
		return NULL;
	}
	if (!json_is_object(j)) {
		json_decref(j);
		if (err && errlen)
			snprintf(err, errlen, "payload is not a JSON object");
		return NULL;
	}
	return j;
}

json_t *gl_frame_error_json(int e, const char *fmt, ...)
{
	char msg[512];
	va_list ap;
	json_t *j;

	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	j = json_pack("{s:s, s:i}", "error", msg, "errno", e);
	/* jansson refuses text that is not UTF-8 (a path from the guest, say) */
	if (!j)
		j = json_pack("{s:s, s:i}", "error", strerror(e), "errno", e);
	return j;
}
