/* A growable byte buffer (core/buf.h). */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/buf.h"

int gl_buf_reserve(gl_buf *b, size_t extra)
{
	size_t need, cap;
	char *p;

	/* One byte more than asked for: the content is always NUL-terminated. */
	if (extra > SIZE_MAX - b->len - 1)
		return -ENOMEM;
	need = b->len + extra + 1;
	if (need <= b->cap)
		return 0;

	cap = b->cap ? b->cap : 64;
	while (cap < need) {
		if (cap > SIZE_MAX / 2) {
			cap = need;
			break;
		}
		cap *= 2;
	}

	p = realloc(b->data, cap);
	if (!p)
		return -ENOMEM;
	b->data = p;
	b->cap = cap;
	return 0;
}

int gl_buf_add(gl_buf *b, const void *p, size_t n)
{
	int r;

	r = gl_buf_reserve(b, n);
	if (r < 0)
		return r;
	if (n)
		memcpy(b->data + b->len, p, n);
	b->len += n;
	b->data[b->len] = '\0';
	return 0;
}

int gl_buf_adds(gl_buf *b, const char *s)
{
	return gl_buf_add(b, s, strlen(s));
}

int gl_buf_addc(gl_buf *b, char c)
{
	int r;

	r = gl_buf_reserve(b, 1);
	if (r < 0)
		return r;
	b->data[b->len++] = c;
	b->data[b->len] = '\0';
	return 0;
}

int gl_buf_printf(gl_buf *b, const char *fmt, ...)
{
	va_list ap;
	size_t room;
	int n, r;

	/* Make sure data is allocated so the first vsnprintf has somewhere to write. */
	r = gl_buf_reserve(b, 0);
	if (r < 0)
		return r;

	room = b->cap - b->len;
	va_start(ap, fmt);
	n = vsnprintf(b->data + b->len, room, fmt, ap);
	va_end(ap);
	if (n < 0)
		goto fail;

	if ((size_t)n >= room) {
		r = gl_buf_reserve(b, (size_t)n);
		if (r < 0)
			goto fail_r;
		va_start(ap, fmt);
		n = vsnprintf(b->data + b->len, b->cap - b->len, fmt, ap);
		va_end(ap);
		if (n < 0)
			goto fail;
	}
	b->len += (size_t)n;
	return 0;

fail:
	r = -EINVAL;
fail_r:
	/* vsnprintf may have written past len: restore the terminator. */
	b->data[b->len] = '\0';
	return r;
}

void gl_buf_reset(gl_buf *b)
{
	b->len = 0;
	if (b->data)
		b->data[0] = '\0';
}

void gl_buf_free(gl_buf *b)
{
	free(b->data);
	b->data = NULL;
	b->len = 0;
	b->cap = 0;
}

char *gl_buf_steal(gl_buf *b, size_t *len)
{
	char *p;

	if (!b->data) {
		p = malloc(1);
		if (!p)
			return NULL;
		p[0] = '\0';
	} else {
		p = b->data;
	}
	if (len)
		*len = b->len;
	b->data = NULL;
	b->len = 0;
	b->cap = 0;
	return p;
}
