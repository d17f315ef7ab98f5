/* The devlxd face: LXD's /dev/lxd/sock API 1.0 on one host Unix socket for
 * every instance (DESIGN.md, specs/devlxd-api.md). Runs on the daemon's
 * loop, reads and changes the model only through core/model.h. */
#ifndef GUESTLINK_BRIDGE_DEVLXD_H
#define GUESTLINK_BRIDGE_DEVLXD_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>
#include <uv.h>

#include "core/model.h"

typedef struct gl_devlxd gl_devlxd;

typedef struct gl_devlxd_opts {
	const char *socket_path;     /* created mode 0666; a stale socket file is replaced;
	                                NULL: no host socket (VM transports only) */
	const char *images_dir;      /* <state-dir>/images */
	size_t max_header_bytes;     /* default 1 MiB + 4 KiB (Go's); over it: 431 */
	size_t max_body_bytes;       /* default 1 MiB */
	unsigned max_conns;          /* default 16384; over it the oldest idle is closed */
	unsigned max_conns_per_instance; /* default 1024 */
	unsigned max_subs_per_instance;  /* default 1024 event subscribers */
	uint64_t header_timeout_ms;  /* default 10000: a request's head must arrive within it */
	uint64_t idle_timeout_ms;    /* default 0 = none (LXD 5.0.2); keep-alive idle limit */
} gl_devlxd_opts;

void gl_devlxd_opts_default(gl_devlxd_opts *o);

/* Listen on o->socket_path (when set). Returns 0 and *out, or -errno with a message in err. */
int gl_devlxd_start(uv_loop_t *loop, gl_model *m, const gl_devlxd_opts *o, gl_devlxd **out,
		    char *err, size_t errlen);
/* Stop listening, end every connection (WebSocket subscribers get close
 * 1001), and free the server once its handles are closed. */
void gl_devlxd_stop(gl_devlxd *d);

/* Serve a connection that arrived on a VM's transport (its vsock devlxd
 * port): the caller is instance `uid` (gl_instance_uid), running as
 * `guest_uid` inside the guest (what the VM's agent vouched for; no
 * SO_PEERCRED over vsock). A guest_uid other than 0 is answered 401
 * "Access denied for non-root user", as a container's non-root caller.
 * Takes ownership of fd in every case. 0, or -errno when the connection
 * was refused (limits) or could not be set up. */
int gl_devlxd_adopt(gl_devlxd *d, int fd, uint64_t uid, uid_t guest_uid);
/* Close every adopted connection of instance `uid` (its transport was
 * unbound or the VM removed); event subscribers get WebSocket close 1001. */
void gl_devlxd_drop_instance(gl_devlxd *d, uint64_t uid);

#endif
