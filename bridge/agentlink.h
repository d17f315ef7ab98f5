/* The host's side of the agent handshake: dial a VM's agent over its
 * transport (bridge/vsock.h) and authenticate to it
 * (docs/control-protocol.md "Authentication"):
 *
 *   agent -> HELLO    id 0 {"version", "nonce": 64 hex, "instance": id or ""}
 *   host  -> AUTH     id 0 {"version", "sig": 128 hex[, "devlxd_token": 64 hex]}
 *   agent -> AUTH_OK  id 0 {"version", "uptime_ms"}
 *
 * The host refuses (-EPERM) an agent whose HELLO names an instance id other
 * than `instance_id` (it belongs to another VM), and signs
 * GL_AUTH_CONTEXT || nonce || hello.instance. Any other frame, an oversize
 * one, or silence past the handshake deadline fails the link. */
#ifndef GUESTLINK_BRIDGE_AGENTLINK_H
#define GUESTLINK_BRIDGE_AGENTLINK_H

#include <stdint.h>
#include <uv.h>

#include "bridge/auth.h"
#include "bridge/fconn.h"
#include "bridge/vsock.h"

typedef struct gl_agentlink gl_agentlink;

typedef struct gl_agentlink_opts {
	gl_vsock_dial_opts dial;
	uint64_t handshake_ms; /* HELLO..AUTH_OK; default 5000 */
	const char *instance_id; /* the VM's volatile.cloud-init.instance-id (copied) */
	const uint8_t *sk;       /* GL_AUTH_SK bytes, borrowed until the callback */
	const uint8_t *devlxd_token; /* GL_AGENTLINK_TOKEN bytes (copied), or NULL:
	                                sent in AUTH as "devlxd_token" (64 hex) */
} gl_agentlink_opts;

/* The per-VM secret the agent writes in front of every devlxd connection
 * it relays (docs/control-protocol.md "The devlxd preamble"). */
#define GL_AGENTLINK_TOKEN 32

typedef struct gl_agent_hello {
	char version[64]; /* the agent's, from AUTH_OK (else HELLO) */
	uint64_t uptime_ms;
	uint64_t rtt_us;  /* AUTH sent -> AUTH_OK received */
} gl_agent_hello;

/* status 0: `c` is an authenticated framed connection (max payload
 * GL_FRAME_MAX), whose callbacks are still the link's: the callee must
 * call gl_fconn_rebind right away. status < 0: -ECONNRESET etc. from the
 * dial, -ETIMEDOUT, -EPERM (wrong instance, or the agent closed after AUTH:
 * it does not trust our key), -EPROTO (a frame out of place). */
typedef void (*gl_agentlink_cb)(void *arg, int status, gl_fconn *c, const gl_agent_hello *h);

/* Start. The callback runs exactly once, from the loop, unless cancelled.
 * 0 and *out, or -errno. */
int gl_agentlink_start(uv_loop_t *loop, const gl_vsock_addr *to, const gl_agentlink_opts *o,
		       gl_agentlink_cb cb, void *arg, gl_agentlink **out);
/* The same handshake over an already connected stream socket (taken). */
int gl_agentlink_start_fd(uv_loop_t *loop, int fd, const gl_agentlink_opts *o,
			  gl_agentlink_cb cb, void *arg, gl_agentlink **out);
void gl_agentlink_cancel(gl_agentlink *l);

#endif
