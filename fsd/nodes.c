#include "fsd/nodes.h"

#include <errno.h>
#include <fuse_lowlevel.h>
#include <stdlib.h>
#include <string.h>

#define INITIAL_BUCKETS 1024

static size_t hash_ino(uint64_t ino)
{
	ino ^= ino >> 33;
	ino *= 0xff51afd7ed558ccdULL;
	ino ^= ino >> 33;
	return (size_t)ino;
}

static size_t hash_name(uint64_t parent, const char *name, size_t len)
{
	uint64_t h = 0xcbf29ce484222325ULL ^ hash_ino(parent);
	size_t i;

	for (i = 0; i < len; i++) {
		h ^= (unsigned char)name[i];
		h *= 0x100000001b3ULL;
	}
	return (size_t)(h ^ (h >> 29));
}

static int grow_ino(gl_nodes *t)
{
	size_t nmask = t->ino_mask * 2 + 1, i;
	gl_node **nb = calloc(nmask + 1, sizeof(*nb));

	if (!nb)
		return -ENOMEM;
	for (i = 0; i <= t->ino_mask; i++) {
		gl_node *n = t->by_ino[i], *next;

		for (; n; n = next) {
			size_t b = hash_ino(n->ino) & nmask;

			next = n->ino_next;
			n->ino_next = nb[b];
			nb[b] = n;
		}
	}
	free(t->by_ino);
	t->by_ino = nb;
	t->ino_mask = nmask;
	return 0;
}

static int grow_name(gl_nodes *t)
{
	size_t nmask = t->name_mask * 2 + 1, i;
	gl_node **nb = calloc(nmask + 1, sizeof(*nb));

	if (!nb)
		return -ENOMEM;
	for (i = 0; i <= t->name_mask; i++) {
		gl_node *n = t->by_name[i], *next;

		for (; n; n = next) {
			size_t b = hash_name(n->parent, n->name, n->name_len) & nmask;

			next = n->name_next;
			n->name_next = nb[b];
			nb[b] = n;
		}
	}
	free(t->by_name);
	t->by_name = nb;
	t->name_mask = nmask;
	return 0;
}

static void name_insert(gl_nodes *t, gl_node *n)
{
	size_t b;

	/* Growth failing only makes chains longer. */
	if (t->hashed > t->name_mask)
		grow_name(t);
	b = hash_name(n->parent, n->name, n->name_len) & t->name_mask;
	n->name_next = t->by_name[b];
	t->by_name[b] = n;
	n->hashed = true;
	t->hashed++;
}

static gl_node *node_new(gl_nodes *t, uint64_t ino, const char *name, size_t len,
                         const char *iname)
{
	gl_node *n = calloc(1, sizeof(*n));
	size_t b;

	if (!n)
		return NULL;
	n->name = malloc(len + 1);
	if (!n->name)
		goto err;
	memcpy(n->name, name, len);
	n->name[len] = '\0';
	n->name_len = len;
	if (iname) {
		n->iname = strdup(iname);
		if (!n->iname)
			goto err;
	}
	if (t->count > t->ino_mask)
		grow_ino(t);
	n->ino = ino;
	b = hash_ino(ino) & t->ino_mask;
	n->ino_next = t->by_ino[b];
	t->by_ino[b] = n;
	t->count++;
	return n;
err:
	free(n->name);
	free(n);
	return NULL;
}

int gl_nodes_init(gl_nodes *t)
{
	gl_node *root;

	memset(t, 0, sizeof(*t));
	t->ino_mask = INITIAL_BUCKETS - 1;
	t->name_mask = INITIAL_BUCKETS - 1;
	t->by_ino = calloc(INITIAL_BUCKETS, sizeof(*t->by_ino));
	t->by_name = calloc(INITIAL_BUCKETS, sizeof(*t->by_name));
	if (!t->by_ino || !t->by_name)
		goto err;
	root = node_new(t, FUSE_ROOT_ID, "", 0, NULL);
	if (!root)
		goto err;
	root->kind = GL_NODE_ROOT;
	root->nlookup = 1;
	t->next_ino = FUSE_ROOT_ID + 1;
	return 0;
err:
	free(t->by_ino);
	free(t->by_name);
	return -ENOMEM;
}

static void node_free(gl_nodes *t, gl_node *n)
{
	if (t->free_hook)
		t->free_hook(t->free_arg, n);
	free(n->name);
	free(n->iname);
	free(n);
}

void gl_nodes_fini(gl_nodes *t)
{
	size_t i;

	for (i = 0; i <= t->ino_mask; i++) {
		gl_node *n = t->by_ino[i], *next;

		for (; n; n = next) {
			next = n->ino_next;
			node_free(t, n);
		}
	}
	free(t->by_ino);
	free(t->by_name);
	t->by_ino = t->by_name = NULL;
	t->count = t->hashed = 0;
}

gl_node *gl_nodes_get(gl_nodes *t, uint64_t ino)
{
	gl_node *n = t->by_ino[hash_ino(ino) & t->ino_mask];

	while (n && n->ino != ino)
		n = n->ino_next;
	return n;
}

gl_node *gl_nodes_find(gl_nodes *t, uint64_t parent, const char *name, size_t len)
{
	gl_node *n = t->by_name[hash_name(parent, name, len) & t->name_mask];

	for (; n; n = n->name_next)
		if (n->parent == parent && n->name_len == len && memcmp(n->name, name, len) == 0)
			return n;
	return NULL;
}

void gl_nodes_detach(gl_nodes *t, gl_node *n)
{
	gl_node **pp;

	if (!n->hashed)
		return;
	pp = &t->by_name[hash_name(n->parent, n->name, n->name_len) & t->name_mask];
	while (*pp != n)
		pp = &(*pp)->name_next;
	*pp = n->name_next;
	n->name_next = NULL;
	n->hashed = false;
	t->hashed--;
}

gl_node *gl_nodes_add(gl_nodes *t, uint64_t parent, const char *name, size_t len,
                      gl_node_kind kind, const char *iname, uint64_t iuid)
{
	gl_node *old = gl_nodes_find(t, parent, name, len);
	gl_node *n = node_new(t, t->next_ino, name, len, iname);

	if (!n)
		return NULL;
	t->next_ino++;
	n->kind = kind;
	n->parent = parent;
	n->iuid = iuid;
	if (old)
		gl_nodes_detach(t, old);
	name_insert(t, n);
	return n;
}

int gl_nodes_rename(gl_nodes *t, gl_node *n, uint64_t parent, const char *name, size_t len)
{
	gl_node *old;
	char *copy = malloc(len + 1);

	if (!copy)
		return -ENOMEM;
	memcpy(copy, name, len);
	copy[len] = '\0';
	gl_nodes_detach(t, n);
	old = gl_nodes_find(t, parent, name, len);
	if (old)
		gl_nodes_detach(t, old);
	free(n->name);
	n->name = copy;
	n->name_len = len;
	n->parent = parent;
	name_insert(t, n);
	return 0;
}

static void node_remove(gl_nodes *t, gl_node *n)
{
	gl_node **pp = &t->by_ino[hash_ino(n->ino) & t->ino_mask];

	gl_nodes_detach(t, n);
	while (*pp != n)
		pp = &(*pp)->ino_next;
	*pp = n->ino_next;
	t->count--;
	node_free(t, n);
}

void gl_nodes_maybe_free(gl_nodes *t, gl_node *n)
{
	if (n->kind == GL_NODE_ROOT || n->nlookup > 0 || n->opens > 0)
		return;
	node_remove(t, n);
}

void gl_nodes_forget(gl_nodes *t, gl_node *n, uint64_t nlookup)
{
	n->nlookup = nlookup < n->nlookup ? n->nlookup - nlookup : 0;
	gl_nodes_maybe_free(t, n);
}
