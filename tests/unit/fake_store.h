/* An in-memory stand-in for the store, for unit tests of the model and of
 * the faces: commits succeed (or fail with `fail`) and are counted; nothing
 * is kept. Set `fstore.base.ops = &fake_ops` (or call fake_store_reset)
 * before gl_model_open().
 *
 * `fake_split_ops` is the same store with separate write() and sync(), as
 * the SQLite store has, for the model's pipeline: syncs wait while `held`
 * is set (fake_hold, from the test thread). Writes are numbered from 1 in
 * `commits`; write number `fail_write_at` fails with `fail`, and so does
 * the sync that follows write number `fail_sync_at` (a batch's write and
 * sync run on one pool thread, one after the other). */
#ifndef GUESTLINK_TESTS_FAKE_STORE_H
#define GUESTLINK_TESTS_FAKE_STORE_H

#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <string.h>

#include "core/store.h"

typedef struct fake_store {
	gl_store base;
	int commits; /* commits, or writes of the split store */
	size_t last_n;
	int fail; /* -errno to return from commit */
	/* split store only; the counters are read with fake_count() */
	pthread_mutex_t lock;
	pthread_cond_t cond;
	bool held;
	int syncs;
	int fail_write_at, fail_sync_at;
} fake_store;

/* the number of the last write this pool thread made */
static __thread int fake_thread_write;

static inline int fake_commit(gl_store *s, const gl_sop *ops, size_t n)
{
	fake_store *f = (fake_store *)s;

	(void)ops;
	f->commits++;
	f->last_n = n;
	if (f->fail) /* as a real store does: say why, for the model's log line */
		gl_store_set_err(s, "fake store: %s", strerror(-f->fail));
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

static inline int fake_write(gl_store *s, const gl_sop *ops, size_t n)
{
	fake_store *f = (fake_store *)s;
	int r = 0;

	(void)ops;
	pthread_mutex_lock(&f->lock);
	f->commits++;
	f->last_n = n;
	fake_thread_write = f->commits;
	if (f->commits == f->fail_write_at) {
		r = f->fail;
		gl_store_set_err(s, "fake store: write: %s", strerror(-r));
	}
	pthread_mutex_unlock(&f->lock);
	return r;
}

static inline int fake_sync(gl_store *s)
{
	fake_store *f = (fake_store *)s;
	int r = 0;

	pthread_mutex_lock(&f->lock);
	while (f->held)
		pthread_cond_wait(&f->cond, &f->lock);
	f->syncs++;
	if (fake_thread_write == f->fail_sync_at) {
		r = f->fail;
		gl_store_set_err(s, "fake store: sync: %s", strerror(-r));
	}
	pthread_mutex_unlock(&f->lock);
	return r;
}

static const gl_store_ops fake_ops = {
	.commit = fake_commit, .load = fake_load, .close = fake_close};
static const gl_store_ops fake_split_ops = {.commit = fake_commit,
					    .write = fake_write,
					    .sync = fake_sync,
					    .load = fake_load,
					    .close = fake_close};

static inline void fake_store_reset(fake_store *f)
{
	memset(f, 0, sizeof(*f));
	f->base.ops = &fake_ops;
	pthread_mutex_init(&f->lock, NULL);
	pthread_cond_init(&f->cond, NULL);
}

static inline void fake_hold(fake_store *f, bool held)
{
	pthread_mutex_lock(&f->lock);
	f->held = held;
	pthread_cond_broadcast(&f->cond);
	pthread_mutex_unlock(&f->lock);
}

/* *counter read under the store's lock (the pool threads write it) */
static inline int fake_count(fake_store *f, const int *counter)
{
	int n;

	pthread_mutex_lock(&f->lock);
	n = *counter;
	pthread_mutex_unlock(&f->lock);
	return n;
}

#endif
