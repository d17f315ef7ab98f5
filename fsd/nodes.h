/* The node table: every inode the kernel has been told about, found by
 * nodeid and, while it is the current meaning of a name, by
 * (parent nodeid, name). Nodeids come from a 64-bit counter and are never
 * reused; the generation is always 0. A node lives while the kernel holds
 * a lookup count on it or a file is open on it; a node that no longer
 * stands for its name (deleted key, removed instance, replaced by a
 * rename) is detached from the name index at once and freed at FORGET.
 *
 * Nodes name their instance by name + gl_instance_uid: a re-created
 * instance of the same name is another instance, and old nodes answer
 * ENOENT. Loop thread only. */
#ifndef GUESTLINK_FSD_NODES_H
#define GUESTLINK_FSD_NODES_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "core/model.h"

typedef enum gl_node_kind {
	GL_NODE_ROOT,        /* MNT */
	GL_NODE_ALL_EVENTS,  /* MNT/events */
	GL_NODE_INSTANCE,    /* MNT/NAME */
	GL_NODE_CONFIG_DIR,  /* MNT/NAME/config */
	GL_NODE_DEVICES_DIR, /* MNT/NAME/devices */
	GL_NODE_META_DATA,   /* MNT/NAME/meta-data */
	GL_NODE_EVENTS,      /* MNT/NAME/events */
	GL_NODE_ATTR,        /* MNT/NAME/<attr>, see gl_attr */
	GL_NODE_KEY,         /* MNT/NAME/config/<key> */
	GL_NODE_DEVICE,      /* MNT/NAME/devices/<name> */
	GL_NODE_SCRATCH,     /* an editor's temporary file in config/ or devices/ */
} gl_node_kind;

struct gl_scratch;

typedef struct gl_node {
	uint64_t ino;
	uint64_t nlookup;  /* the kernel's lookup count */
	unsigned opens;    /* open files on this node */
	unsigned pending;  /* KEY/DEVICE: open handles that created the name, not yet committed */
	gl_node_kind kind;
	gl_attr attr;      /* GL_NODE_ATTR */
	bool hashed;       /* in the name index */
	uint64_t parent;   /* parent nodeid (name index key) */
	char *name;        /* owned; name in parent ("" for the root) */
	size_t name_len;
	char *iname;       /* owned; the instance's name, NULL above instances */
	uint64_t iuid;     /* gl_instance_uid of that instance */
	int64_t btime_ns;  /* set by the caller: the mtime of a key being created */
	struct gl_scratch *scratch; /* SCRATCH: a reference, dropped by the free hook */

	struct gl_node *ino_next;   /* hash chains */
	struct gl_node *name_next;
} gl_node;

typedef struct gl_nodes {
	gl_node **by_ino;
	size_t ino_mask;
	size_t count;
	gl_node **by_name;
	size_t name_mask;
	size_t hashed;
	uint64_t next_ino;
	/* Runs just before a node is freed (to drop its scratch reference). */
	void (*free_hook)(void *arg, gl_node *n);
	void *free_arg;
} gl_nodes;

/* Empty table plus the root node (FUSE_ROOT_ID). 0 or -ENOMEM. */
int gl_nodes_init(gl_nodes *t);
/* Free every node (running the free hook) and the table. */
void gl_nodes_fini(gl_nodes *t);

/* Borrowed, or NULL. */
gl_node *gl_nodes_get(gl_nodes *t, uint64_t ino);
gl_node *gl_nodes_find(gl_nodes *t, uint64_t parent, const char *name, size_t len);

/* A new node named `name` in `parent`, put in the name index in place of
 * whatever node held that name (which is detached). `iname` may be NULL.
 * Returns the node (borrowed: the table owns it) or NULL (-ENOMEM). */
gl_node *gl_nodes_add(gl_nodes *t, uint64_t parent, const char *name, size_t len,
                      gl_node_kind kind, const char *iname, uint64_t iuid);

/* Take `n` out of the name index (idempotent). */
void gl_nodes_detach(gl_nodes *t, gl_node *n);

/* Give `n` a new name (detaching the holder of that name). 0 or -ENOMEM. */
int gl_nodes_rename(gl_nodes *t, gl_node *n, uint64_t parent, const char *name, size_t len);

/* Drop `nlookup` kernel references; frees the node when nothing holds it.
 * The root is never freed. */
void gl_nodes_forget(gl_nodes *t, gl_node *n, uint64_t nlookup);

/* Free `n` if neither the kernel nor an open file holds it (call after
 * decrementing n->opens). */
void gl_nodes_maybe_free(gl_nodes *t, gl_node *n);

#endif
