/* Scratch files: the temporary files editors and atomic writers create in
 * config/ and devices/ (sed's sed + 6 random characters, vim's swap and backup files,
 * Python's tmp + 8 random characters) before renaming one over a key. They live in
 * guestlinkd's memory only: never in the model, never evented, invisible to
 * guests. Each directory holds at most GL_SCRATCH_MAX_PER_DIR of them.
 *
 * Reference counted: the registry holds one reference while the file has
 * a name, and every node, open file and rename in flight holds one, so an
 * unlinked scratch file stays usable through the descriptors still open on
 * it. Loop thread only. */
#ifndef GUESTLINK_FSD_SCRATCH_H
#define GUESTLINK_FSD_SCRATCH_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "core/buf.h"

#define GL_SCRATCH_MAX_PER_DIR 64
/* An abandoned scratch file is dropped this long after its last close. */
#define GL_SCRATCH_IDLE_MS (10 * 60 * 1000)

typedef struct gl_scratch {
	struct gl_scratch *next, *prev; /* registry */
	unsigned refs;
	bool live;           /* has a name (is in the registry) */
	uint64_t iuid;       /* instance */
	char *iname;
	bool devices;        /* in devices/ (else config/) */
	char *name;
	size_t name_len;
	gl_buf data;
	mode_t mode;         /* permission bits only */
	int64_t mtime_ns;
	unsigned opens;
	uint64_t last_close_ms; /* uv_now() at the last close */
} gl_scratch;

typedef struct gl_scratches {
	gl_scratch *head;
	size_t count;
} gl_scratches;

/* The live scratch file `name` in that directory, borrowed, or NULL. */
gl_scratch *gl_scratch_find(gl_scratches *r, uint64_t iuid, bool devices, const char *name,
                            size_t len);
/* How many live scratch files the directory holds. */
size_t gl_scratch_count(gl_scratches *r, uint64_t iuid, bool devices);

/* A new, empty, live scratch file made at `mtime_ns` (wall clock) and
 * `now_ms` (uv_now). The registry holds its only reference.
 * 0 or -ENOMEM. *out is borrowed. */
int gl_scratch_new(gl_scratches *r, uint64_t iuid, const char *iname, bool devices,
                   const char *name, size_t len, mode_t mode, int64_t mtime_ns,
                   uint64_t now_ms, gl_scratch **out);
/* Rename a live scratch file within its directory. 0 or -ENOMEM. */
int gl_scratch_set_name(gl_scratch *s, const char *name, size_t len);
/* Take s out of the registry (it loses its name) and drop the registry's
 * reference. Idempotent. */
void gl_scratch_remove(gl_scratches *r, gl_scratch *s);

gl_scratch *gl_scratch_ref(gl_scratch *s);
void gl_scratch_unref(gl_scratch *s);

/* Every scratch file of the registry, for sweeps: iterate with ->next. */
static inline gl_scratch *gl_scratch_first(gl_scratches *r)
{
	return r->head;
}

#endif
