/* What every store shares: its error message, set and read under one lock. */
#include "core/store.h"

#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>

static pthread_mutex_t err_lock = PTHREAD_MUTEX_INITIALIZER;

void gl_store_set_err(gl_store *s, const char *fmt, ...)
{
	va_list ap;

	pthread_mutex_lock(&err_lock);
	va_start(ap, fmt);
	vsnprintf(s->errmsg, sizeof(s->errmsg), fmt, ap);
	va_end(ap);
	pthread_mutex_unlock(&err_lock);
}

void gl_store_err(gl_store *s, char *out, size_t len)
{
	if (!len)
		return;
	pthread_mutex_lock(&err_lock);
	snprintf(out, len, "%.*s", (int)sizeof(s->errmsg) - 1, s->errmsg);
	pthread_mutex_unlock(&err_lock);
}
