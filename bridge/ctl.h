/* guestlinkd's control socket (docs/control-protocol.md "Operations served
 * by guestlinkd"): a root-only Unix socket that guestlinkctl speaks frames
 * on, without a handshake. Peers whose SO_PEERCRED uid is not 0 are closed
 * at once.
 *
 * Local operations: `wait` (an instance's state Ready, or its agent
 * online; with a timeout) and `status` (what the VM's monitor knows).
 * Agent operations (ping exec read write stat list): the connection becomes
 * a relay. guestlinkd opens a new authenticated link to that VM's agent
 * (gl_vm_link_open), forwards the REQUEST unchanged and then relays frames
 * both ways with back-pressure; either side ending ends both. Everything
 * runs on the loop thread. */
#ifndef GUESTLINK_BRIDGE_CTL_H
#define GUESTLINK_BRIDGE_CTL_H

#include <stddef.h>
#include <uv.h>

#include "bridge/vm.h"
#include "core/model.h"

#define GL_CTL_DEFAULT_PATH "/run/guestlink/control.sock"

typedef struct gl_ctl gl_ctl;

/* Listen on `path`, mode 0600; missing parent directories are created
 * (0755). A stale socket file there (nobody accepts) is replaced; a live
 * one means another daemon owns it: -EADDRINUSE. Anything else there:
 * -EEXIST. `m` and `vm` are borrowed and must outlive the gl_ctl. 0 and
 * *out, or -errno with a message in err. */
int gl_ctl_start(uv_loop_t *loop, gl_model *m, gl_vm *vm, const char *path, gl_ctl **out,
		 char *err, size_t errlen);
/* Stop listening, remove the socket file, end every connection (relays
 * drop their agent links and give their gl_vm_link back at once). Freed
 * once its handles are closed. Call it before gl_vm_stop. */
void gl_ctl_stop(gl_ctl *c);

#endif
