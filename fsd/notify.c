#include "fsd/notify.h"

#include <errno.h>
#include <fuse_lowlevel.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "fsd/log.h"

struct item {
	struct item *next;
	uint64_t parent; /* or the inode, for an INODE_ITEM */
	size_t len;
	char name[];
};

/* len of an item that invalidates the attributes of inode `parent` */
#define INODE_ITEM SIZE_MAX

struct gl_notifier {
	struct fuse_session *se;
	uv_prepare_t prepare; /* hands the local batch over before the loop sleeps */
	uv_async_t done;      /* the thread has exited */
	pthread_t thread;
	bool thread_started;
	int closing;          /* uv handles still to close */
	void (*stop_cb)(void *arg);
	void *stop_arg;

	/* loop thread only */
	struct item *local_head, **local_tail;

	/* shared, under lock */
	pthread_mutex_t lock;
	pthread_cond_t cond;
	struct item *head, **tail;
	bool stop;
	bool stopping; /* loop thread's view: stop requested */
};

static void free_list(struct item *it)
{
	while (it) {
		struct item *next = it->next;
		free(it);
		it = next;
	}
}

static void *notifier_main(void *arg)
{
	gl_notifier *n = arg;
	struct item *batch;
	int r;

	for (;;) {
		pthread_mutex_lock(&n->lock);
		while (!n->head && !n->stop)
			pthread_cond_wait(&n->cond, &n->lock);
		if (n->stop) {
			pthread_mutex_unlock(&n->lock);
			break;
		}
		batch = n->head;
		n->head = NULL;
		n->tail = &n->head;
		pthread_mutex_unlock(&n->lock);

		while (batch) {
			struct item *it = batch;

			batch = it->next;
			if (it->len == INODE_ITEM)
				r = fuse_lowlevel_notify_inval_inode(n->se, it->parent, -1, 0);
			else
				r = fuse_lowlevel_notify_inval_entry(n->se, it->parent, it->name,
				                                     it->len);
			/* The kernel may have forgotten the parent (ENOENT) or be
			 * unmounting (EBADF, ENODEV): nothing to invalidate. */
			if (r < 0 && r != -ENOENT && r != -EBADF && r != -ENODEV)
				log_debug("invalidate %s: %s", it->name, strerror(-r));
			free(it);
			pthread_mutex_lock(&n->lock);
			if (n->stop) {
				pthread_mutex_unlock(&n->lock);
				free_list(batch);
				goto out;
			}
			pthread_mutex_unlock(&n->lock);
		}
	}
out:
	uv_async_send(&n->done);
	return NULL;
}

static void on_prepare(uv_prepare_t *h)
{
	gl_notifier *n = h->data;

	if (!n->local_head)
		return;
	pthread_mutex_lock(&n->lock);
	*n->tail = n->local_head;
	n->tail = n->local_tail;
	pthread_cond_signal(&n->cond);
	pthread_mutex_unlock(&n->lock);
	n->local_head = NULL;
	n->local_tail = &n->local_head;
}

static void on_closed(uv_handle_t *h)
{
	gl_notifier *n = h->data;

	if (--n->closing > 0)
		return;
	free_list(n->head);
	free_list(n->local_head);
	pthread_mutex_destroy(&n->lock);
	pthread_cond_destroy(&n->cond);
	if (n->stop_cb)
		n->stop_cb(n->stop_arg);
	free(n);
}

static void on_done(uv_async_t *h)
{
	gl_notifier *n = h->data;

	pthread_join(n->thread, NULL);
	n->thread_started = false;
	n->closing = 2;
	uv_close((uv_handle_t *)&n->prepare, on_closed);
	uv_close((uv_handle_t *)&n->done, on_closed);
}

int gl_notifier_new(uv_loop_t *loop, struct fuse_session *se, gl_notifier **out)
{
	gl_notifier *n;
	int r;

	n = calloc(1, sizeof(*n));
	if (!n)
		return -ENOMEM;
	n->se = se;
	n->head = NULL;
	n->tail = &n->head;
	n->local_tail = &n->local_head;
	pthread_mutex_init(&n->lock, NULL);
	pthread_cond_init(&n->cond, NULL);

	r = uv_prepare_init(loop, &n->prepare);
	if (r < 0)
		goto err_free;
	n->prepare.data = n;
	uv_prepare_start(&n->prepare, on_prepare);
	uv_unref((uv_handle_t *)&n->prepare);

	r = uv_async_init(loop, &n->done, on_done);
	if (r < 0)
		goto err_prepare;
	n->done.data = n;
	uv_unref((uv_handle_t *)&n->done);

	r = -pthread_create(&n->thread, NULL, notifier_main, n);
	if (r < 0)
		goto err_async;
	n->thread_started = true;
	*out = n;
	return 0;

err_async:
	/* Both handles close; on_closed frees n without a stop callback. */
	n->closing = 2;
	uv_close((uv_handle_t *)&n->done, on_closed);
	uv_close((uv_handle_t *)&n->prepare, on_closed);
	return r;
err_prepare:
	n->closing = 1;
	uv_close((uv_handle_t *)&n->prepare, on_closed);
	return r;
err_free:
	pthread_mutex_destroy(&n->lock);
	pthread_cond_destroy(&n->cond);
	free(n);
	return r;
}

void gl_notifier_inval_entry(gl_notifier *n, uint64_t parent, const char *name, size_t len)
{
	struct item *it;

	if (!n || n->stopping)
		return;
	it = malloc(sizeof(*it) + len + 1);
	if (!it)
		return;
	it->next = NULL;
	it->parent = parent;
	it->len = len;
	memcpy(it->name, name, len);
	it->name[len] = '\0';
	*n->local_tail = it;
	n->local_tail = &it->next;
}

void gl_notifier_inval_inode(gl_notifier *n, uint64_t ino)
{
	struct item *it;

	if (!n || n->stopping)
		return;
	/* a burst of changes in one loop turn needs one invalidation */
	for (it = n->local_head; it; it = it->next)
		if (it->len == INODE_ITEM && it->parent == ino)
			return;
	it = malloc(sizeof(*it) + 1);
	if (!it)
		return;
	it->next = NULL;
	it->parent = ino;
	it->len = INODE_ITEM;
	it->name[0] = '\0';
	*n->local_tail = it;
	n->local_tail = &it->next;
}

void gl_notifier_stop(gl_notifier *n, void (*cb)(void *arg), void *arg)
{
	n->stopping = true;
	n->stop_cb = cb;
	n->stop_arg = arg;
	/* Keep the loop alive until the thread has been joined. */
	uv_ref((uv_handle_t *)&n->done);
	pthread_mutex_lock(&n->lock);
	n->stop = true;
	pthread_cond_signal(&n->cond);
	pthread_mutex_unlock(&n->lock);
}
