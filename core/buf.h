/* A growable byte buffer. The one allocation helper the whole project uses
 * for building responses, event lines and file contents. */
#ifndef GUESTLINK_CORE_BUF_H
#define GUESTLINK_CORE_BUF_H

#include <stdarg.h>
#include <stddef.h>

typedef struct gl_buf {
	char *data; /* owned; always NUL-terminated when len > 0 or after any append */
	size_t len;
	size_t cap;
} gl_buf;

#define GL_BUF_INIT {NULL, 0, 0}

/* Make room for at least `extra` more bytes. 0 or -ENOMEM. */
int gl_buf_reserve(gl_buf *b, size_t extra);
/* Append bytes / a C string / one byte / printf output. 0 or -ENOMEM. */
int gl_buf_add(gl_buf *b, const void *p, size_t n);
int gl_buf_adds(gl_buf *b, const char *s);
int gl_buf_addc(gl_buf *b, char c);
int gl_buf_printf(gl_buf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Forget the content, keep the memory. */
void gl_buf_reset(gl_buf *b);
/* Free the memory; the buffer is GL_BUF_INIT again. */
void gl_buf_free(gl_buf *b);
/* Hand the memory to the caller (who frees it with free()); the buffer is
 * GL_BUF_INIT again. Never NULL unless out of memory: an empty buffer gives "". */
char *gl_buf_steal(gl_buf *b, size_t *len);

#endif
