/* Who is calling: the instance of a process connected to the devlxd socket
 * (DESIGN.md "The devlxd API", specs/devlxd-api.md §1).
 *
 * An index kept in step with the model (gl_model_observe) maps
 *   - the pid namespace of each bound init (st_dev, st_ino of its
 *     /proc/<pid>/ns/pid) to the instance: a hash table, O(1);
 *   - each bound cgroup path to the instance: a hash table, looked up for
 *     the caller's cgroup and then each parent, O(depth).
 * A caller is resolved once, at accept, from its SO_PEERCRED pid through a
 * pidfd (SO_PEERPIDFD where the kernel has it), and the pidfd is checked to
 * still name a live process after the lookup, so a recycled pid can never
 * lend its number to another instance's process.
 *
 * Each bound init is watched with a pidfd on the loop; when it exits the
 * index forgets its namespace at once and the binding is released through
 * the model (init-pid "" from GL_ORIGIN_DAEMON, which makes the instance
 * Stopped). Everything runs on the loop thread. */
#ifndef GUESTLINK_BRIDGE_PEER_H
#define GUESTLINK_BRIDGE_PEER_H

#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>
#include <uv.h>

#include "core/model.h"

typedef struct gl_peer gl_peer;

typedef struct gl_peer_cred {
	pid_t pid; /* as seen from the daemon's pid namespace; 0: unknown */
	uid_t uid;
	gid_t gid;
	int pidfd; /* owned; -1 when none could be had */
} gl_peer_cred;

/* Credentials of the peer of a connected Unix socket: SO_PEERCRED, and a
 * pidfd from SO_PEERPIDFD (Linux >= 6.5) or, failing that, pidfd_open on
 * the pid (racy: the pid may already be reused; then the liveness check
 * in gl_peer_resolve is all that protects). 0 or -errno. */
int gl_peer_cred_get(int sockfd, gl_peer_cred *out);
/* Close the pidfd. */
void gl_peer_cred_clear(gl_peer_cred *c);

/* A new index over every instance of m (borrowed, must outlive the index).
 * Bound inits that no longer run (or whose pid now names a process that
 * started after the binding was made) are released at once. NULL on
 * failure with a message in err. */
gl_peer *gl_peer_new(uv_loop_t *loop, gl_model *m, char *err, size_t errlen);
/* Stop observing the model and watching inits; the memory is freed once
 * the loop has closed the watchers' handles. */
void gl_peer_free(gl_peer *p);

/* The instance of the process that connected: 0 and *uid (an instance
 * uid, see gl_instance_uid), or -ESRCH when it is in no instance or is no
 * longer alive, or another -errno when its credentials cannot be read. */
int gl_peer_resolve(gl_peer *p, const gl_peer_cred *c, uint64_t *uid);
/* The live instance for a uid from gl_peer_resolve, or NULL when it is
 * gone. Borrowed, as every model reader. */
gl_instance *gl_peer_instance(gl_peer *p, uint64_t uid);
/* The host uid that uid 0 of the instance maps to (its init's user
 * namespace; 0 without one, or when no init is bound). */
uid_t gl_peer_root_uid(gl_peer *p, uint64_t uid);

/* Per-instance counters the devlxd limits use. NULL when the instance is
 * gone. */
enum { GL_PEER_CONNS, GL_PEER_SUBS, GL_PEER_NCOUNTERS };
unsigned *gl_peer_counter(gl_peer *p, uint64_t uid, int which);

/* For tests: how many namespaces and cgroups are indexed. */
void gl_peer_stats(const gl_peer *p, size_t *nns, size_t *ncgroups, size_t *nwatch);

#endif
