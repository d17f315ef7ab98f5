/* An in-memory stand-in for the store, for unit tests of the model and of
 * the faces: commits succeed (or fail with `fail`) and are counted; nothing
 * is kept. Set `fstore.base.ops = &fake_ops` (or call fake_store_reset)
 * before gl_model_open(). */
#ifndef GUESTLINK_TESTS_FAKE_STORE_H
#define GUESTLINK_TESTS_FAKE_STORE_H

#include <stdio.h>
#include <string.h>

#include "core/store.h"

typedef struct fake_store {
	gl_store base;
	int commits;
	size_t last_n;
	int fail; /* -errno to return from commit */
} fake_store;

static inline int fake_commit(gl_store *s, const gl_sop *ops, size_t n)
{
	fake_store *f = (fake_store *)s;

	(void)ops;
	f->commits++;
	f->last_n = n;
	if (f->fail) /* as a real store does: say why, for the model's log line */
		snprintf(s->errmsg, sizeof(s->errmsg), "fake store: %s", strerror(-f->fail));
	return f->fail;
}

static inline int fake_load(gl_store *s, const gl_store_loader *l)
{
	(void)s;
	(void)l;
	return 0;
}

static inline void fake_close(gl_store *s)
{
	(void)s;
}

static const gl_store_ops fake_ops = {fake_commit, fake_load, fake_close};

static inline void fake_store_reset(fake_store *f)
{
	memset(f, 0, sizeof(*f));
	f->base.ops = &fake_ops;
}

#endif
