/* guestlinkd's VM side: the vsock transports of every VM and one agent
 * monitor per VM, kept in step with the model (gl_model_observe).
 *
 * For every virtual machine with a transport (vsock-uds and/or vsock-cid):
 *   - guest -> host: connections to the host's devlxd port arrive on a
 *     hybrid listener "<uds>_<port>" (one per VM), or on the one AF_VSOCK
 *     listener (VMADDR_CID_ANY, opened when the first CID-bound VM
 *     appears), where the peer cid names the VM. Each pokes the VM's
 *     monitor to redial at once if it is offline, must then present the
 *     line "GLDEVLXD1 <token> <uid>\n" (the VM's random token, which only
 *     its authenticated agent learns, in AUTH) within 5 s, and is then
 *     handed to the devlxd server as a connection of that VM made by that
 *     guest uid (gl_devlxd_adopt); anything else is closed without a byte.
 *   - host -> guest: a monitor keeps one authenticated link to the agent
 *     (bridge/agentlink.h), pings it, redials with backoff, and shows what
 *     it knows in the instance's `agent` file (gl_instance_set_agent_status;
 *     format in docs/control-protocol.md "The agent file").
 *   - agent links for the control socket's relays (gl_vm_link_open): a new
 *     authenticated connection per operation, at most max_agent_conns at a
 *     time per VM, the rest queued first in, first out.
 * A VM whose transport is unbound, or that is removed, loses its listener,
 * its adopted devlxd connections, its monitor and its links.
 *
 * Everything runs on the loop thread. When a VM has both transports the
 * host dials through the hybrid one. */
#ifndef GUESTLINK_BRIDGE_VM_H
#define GUESTLINK_BRIDGE_VM_H

#include <stdbool.h>
#include <stdint.h>
#include <uv.h>

#include "bridge/auth.h"
#include "bridge/devlxd.h"
#include "bridge/fconn.h"
#include "core/model.h"

typedef struct gl_vm gl_vm;
typedef struct gl_vm_link gl_vm_link;

typedef struct gl_vm_opts {
	uint32_t devlxd_port;       /* hybrid listeners "<uds>_<port>"; default 7362 */
	uint32_t vsock_port;        /* the AF_VSOCK listener's port; default 7362 */
	uint32_t agent_port;        /* the agent's control port in the guest; default 7361 */
	uint64_t ping_interval_ms;  /* monitor pings; default 5000 */
	uint64_t link_deadline_ms;  /* dialing a relay's link, all attempts; default 2000 */
	unsigned max_agent_conns;   /* relay links per VM at once; default 256 */
	bool af_vsock;              /* use AF_VSOCK for VMs bound by vsock-cid (the
	                               listener, and dialing their agents); false:
	                               such VMs count as having no transport.
	                               Default false: never on a machine that is
	                               itself a VM without nested guests. */
	bool devlxd_no_auth;        /* --vm-devlxd-auth none: no preamble on the devlxd
	                               transports, every caller counts as the VM's
	                               root. Default false: each connection must
	                               start with the agent's preamble
	                               (docs/control-protocol.md) */
	uint8_t sk[GL_AUTH_SK];     /* the host's secret key (gl_auth_host_keys) */
} gl_vm_opts;

void gl_vm_opts_default(gl_vm_opts *o);

/* Start watching `m` (borrowed) and serving VMs' devlxd connections through
 * `d` (borrowed; both must outlive the gl_vm). Transports and monitors of
 * the VMs already in the model start at once. 0 and *out, or -errno with
 * a message in err. */
int gl_vm_start(uv_loop_t *loop, gl_model *m, gl_devlxd *d, const gl_vm_opts *o, gl_vm **out,
		char *err, size_t errlen);
/* Stop every listener, monitor and dial; freed once the handles are
 * closed. Every gl_vm_link must have been released before. */
void gl_vm_stop(gl_vm *vm);

/* What the monitor knows about the agent of VM `uid`. */
typedef struct gl_vm_agent_info {
	bool online;
	char version[64];     /* "" until the agent answered once */
	int64_t last_ping_ns; /* CLOCK_REALTIME of the last answer; 0: never */
	uint64_t rtt_us;      /* of the last answer */
} gl_vm_agent_info;

/* 0, or -EINVAL when `uid` is no VM with a transport. */
int gl_vm_agent_info_get(gl_vm *vm, uint64_t uid, gl_vm_agent_info *out);

/* ---- agent links for relays ---------------------------------------------------- */

/* The outcome of a link, run from the loop, never inside a gl_vm_* call:
 *   status 0: `c` is an authenticated connection to the agent (max payload
 *     GL_FRAME_MAX) with the dialer's callbacks: call gl_fconn_rebind now.
 *     The caller owns c. The callback may run once more later, with c
 *     NULL and -ENOENT (the VM was removed) or -ECONNRESET (its transport
 *     was unbound): the caller then ends its relay.
 *   status < 0: -EHOSTUNREACH (the agent could not be reached or refused
 *     us), -ENOENT, -ECONNRESET as above.
 * In every case the caller ends with gl_vm_link_release (inside the
 * callback or later); after that the callback never runs. */
typedef void (*gl_vm_link_cb)(void *arg, int status, gl_fconn *c);

/* Ask for a new link to the agent of VM `uid`: dialed now, or queued while
 * the VM has max_agent_conns links held or dialing. 0 and *out, or -EINVAL
 * (no VM with a transport). */
int gl_vm_link_open(gl_vm *vm, uint64_t uid, gl_vm_link_cb cb, void *arg, gl_vm_link **out);
/* Give the slot back (cancels a queued or dialing link; does not close a
 * connection already handed over). Safe from the callback. */
void gl_vm_link_release(gl_vm_link *l);

#endif
