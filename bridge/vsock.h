/* Vsock transports behind one interface (specs/vsock.md, DESIGN.md "The
 * vsock channel"). Everything runs on the libuv loop; a dial or a listener
 * hands back plain connected stream fds, which callers wrap (gl_fconn,
 * gl_http adopt, a byte relay).
 *
 * Address kinds:
 *   GL_VSOCK_CID     AF_VSOCK: cid + port. The host dials guests (cid >= 3)
 *                    and listens on VMADDR_CID_ANY; the guest agent dials
 *                    the host (cid 2) and listens on VMADDR_CID_ANY.
 *                    A host-role dial to cid <= 2 is refused (-EINVAL):
 *                    on a machine that is itself a VM, cid 2 is its own
 *                    hypervisor (specs/vsock.md §4).
 *   GL_VSOCK_HYBRID  Firecracker-style hybrid vsock, host side: `path` is
 *                    the VMM's <uds>. Dial = connect <uds>, one write of
 *                    "CONNECT <port>\n", read the reply byte by byte up to
 *                    "\n" (cap 64 bytes), accept any line starting "OK "
 *                    and ignore its number; EOF first = nobody listens yet.
 *                    Listen = a Unix listener at "<uds>_<port>" (a stale
 *                    socket file there is replaced).
 *   GL_VSOCK_GUEST_UNIX
 *                    The guest agent's test transport (`--transport
 *                    unix:DIR`), which tools/vsock-mux plays the VMM for.
 *                    `path` is DIR. Listening on vsock port P = a Unix
 *                    listener at "DIR/listen-<P>". Dialing the host (cid 2)
 *                    port P = connect "DIR/host", one write of
 *                    "CONNECT <P>\n", then read "OK\n" (byte by byte); EOF
 *                    instead = the VMM's RST: -ECONNRESET, as a real guest
 *                    sees it. A failed connect to "DIR/host" itself (no
 *                    VMM running) is reported as it is (-ENOENT,
 *                    -ECONNREFUSED) and retried like any refusal.
 *
 * Paths must fit sun_path with the "_<port>" / "/listen-<port>" suffix
 * (-ENAMETOOLONG otherwise). */
#ifndef GUESTLINK_BRIDGE_VSOCK_H
#define GUESTLINK_BRIDGE_VSOCK_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <uv.h>

/* Well-known ports (docs/control-protocol.md). */
#define GL_VSOCK_AGENT_PORT 7361u  /* the agent's control service, in the guest */
#define GL_VSOCK_DEVLXD_PORT 7362u /* guestlinkd's devlxd service, on the host */
#define GL_VSOCK_CID_HOST 2u

typedef enum gl_vsock_kind {
	GL_VSOCK_CID = 1,
	GL_VSOCK_HYBRID = 2,
	GL_VSOCK_GUEST_UNIX = 3,
} gl_vsock_kind;

typedef struct gl_vsock_addr {
	gl_vsock_kind kind;
	uint32_t cid;   /* GL_VSOCK_CID */
	uint32_t port;
	char path[108]; /* GL_VSOCK_HYBRID: <uds>; GL_VSOCK_GUEST_UNIX: DIR */
} gl_vsock_addr;

/* Parse an agent --transport value: "vsock" (AF_VSOCK) or "unix:DIR".
 * Fills kind and path (port left 0). 0 or -EINVAL. */
int gl_vsock_parse_transport(const char *s, gl_vsock_addr *out);
/* "cid 42 port 7361", "/run/vm1.sock port 7361", ... for messages. */
const char *gl_vsock_addr_str(const gl_vsock_addr *a, char *buf, size_t len);

/* The handshake lines, as pure functions (also what the muxer emulator and
 * the fuzz harnesses use).
 * A CONNECT line as Firecracker parses it (specs/vsock.md §1.2): `p`/`n`
 * is what was read, up to and including "\n" or 32 bytes; valid UTF-8,
 * split on whitespace, word 1 "connect" in any case, word 2 a decimal u32,
 * further words ignored. 0 and *port, or -EINVAL. */
int gl_vsock_parse_connect(const char *p, size_t n, uint32_t *port);
/* A reply line (without its "\n"): 0 if it starts with "OK " (hybrid) or
 * is exactly "OK" (the guest-unix transport), else -EPROTO. */
int gl_vsock_parse_ok(const char *p, size_t n);

/* ---- dialing ---------------------------------------------------------------- */

typedef struct gl_vsock_dial gl_vsock_dial;

typedef struct gl_vsock_dial_opts {
	uint64_t attempt_ms;  /* deadline of one connect + handshake; default 2000 */
	uint64_t deadline_ms; /* all attempts; default 10000; 0 = one attempt only */
	uint64_t backoff_ms;  /* first retry delay, doubling; default 25 */
	uint64_t backoff_max_ms; /* default 1000 */
	bool guest_role;      /* the agent dialing the host: cid 2 allowed */
} gl_vsock_dial_opts;

void gl_vsock_dial_opts_default(gl_vsock_dial_opts *o);

/* status 0: fd is a connected, non-blocking stream socket that the callee
 * now owns, positioned right after the handshake line (nothing of the
 * peer's data was consumed). status < 0: every attempt failed; the last
 * attempt's error: -ECONNRESET / -ECONNREFUSED / -ENOENT (nobody listens,
 * retried until the deadline), -ETIMEDOUT (an attempt's deadline, or the
 * overall one), -EINVAL, -ENAMETOOLONG (not retried). */
typedef void (*gl_vsock_dial_cb)(void *arg, int status, int fd);

/* Start dialing `to` (copied). The callback runs exactly once, from the
 * loop (never inside this call), unless the dial is cancelled first.
 * 0 and *out (valid until the callback has run or cancel), or -errno. */
int gl_vsock_dial_start(uv_loop_t *loop, const gl_vsock_addr *to, const gl_vsock_dial_opts *o,
			gl_vsock_dial_cb cb, void *arg, gl_vsock_dial **out);
/* Stop; the callback will not run. Handles are freed asynchronously. */
void gl_vsock_dial_cancel(gl_vsock_dial *d);

/* ---- listening -------------------------------------------------------------- */

typedef struct gl_vsock_listener gl_vsock_listener;

/* A connection was accepted: fd (owned by the callee, non-blocking) and,
 * for GL_VSOCK_CID, the peer's cid (0 otherwise). */
typedef void (*gl_vsock_accept_cb)(void *arg, int fd, uint32_t peer_cid);

/* Listen at `at` (copied): GL_VSOCK_CID binds VMADDR_CID_ANY:port,
 * GL_VSOCK_HYBRID "<path>_<port>", GL_VSOCK_GUEST_UNIX "DIR/listen-<port>".
 * Unix socket files are created with `mode` (e.g. 0600) and removed by
 * gl_vsock_listen_stop. Backlog 1024. 0 and *out, or -errno with a
 * message in err. */
int gl_vsock_listen(uv_loop_t *loop, const gl_vsock_addr *at, unsigned mode,
		    gl_vsock_accept_cb cb, void *arg, gl_vsock_listener **out, char *err,
		    size_t errlen);
/* Stop listening, remove the socket file; freed asynchronously. */
void gl_vsock_listen_stop(gl_vsock_listener *l);
/* The filesystem path of a Unix listener ("" for AF_VSOCK). */
const char *gl_vsock_listen_path(const gl_vsock_listener *l);

#endif
