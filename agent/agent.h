/* guestlink-agent: the guest side of the vsock channel
 * (docs/control-protocol.md). One libuv loop; libuv's thread pool does the
 * file I/O.
 *
 *   agent/main.c   options, signals, start and stop
 *   agent/conn.c   control connections: handshake, request table, dispatch
 *   agent/exec.c   the exec operation (uv_spawn, pipes, process groups)
 *   agent/files.c  read, write, stat, list
 *   agent/proxy.c  /dev/lxd/sock in the guest -> the host's devlxd port,
 *                  and the announce connection
 *
 * Internal header: nothing here is a public API. */
#ifndef GUESTLINK_AGENT_AGENT_H
#define GUESTLINK_AGENT_AGENT_H

#include <stdbool.h>
#include <stdint.h>
#include <uv.h>

#include <jansson.h>

#include "bridge/auth.h"
#include "bridge/fconn.h"
#include "bridge/frame.h"
#include "bridge/vsock.h"

#ifndef GUESTLINK_VERSION
#define GUESTLINK_VERSION "0.2.0"
#endif

#define AGENT_HANDSHAKE_MS 5000u
#define AGENT_RELAY_HIGH (1u << 20) /* pause a source while its sink holds this much */
#define AGENT_RELAY_LOW (256u << 10)

typedef struct agent_conn agent_conn;
typedef struct agent_req agent_req;
typedef struct agent_proxy agent_proxy;

typedef struct gl_agent {
	uv_loop_t *loop;
	uint8_t pk[GL_AUTH_PK];
	char instance[GL_AUTH_INSTANCE_MAX + 1];
	gl_vsock_addr transport; /* kind + path; the port is set per use */
	uint32_t port;           /* control service port */
	const char *devlxd_path; /* NULL: no local devlxd socket */
	unsigned max_conns;
	unsigned nconns;
	int verbose;
	uint64_t start_ms;       /* uv_now at start, for uptime_ms */
	/* from the latest verified AUTH: written in front of every devlxd
	 * connection to the host (docs/control-protocol.md) */
	uint8_t devlxd_token[32];
	bool has_devlxd_token;
	bool stopping;
	gl_vsock_listener *listener;
	agent_conn *conns;       /* every live control connection */
	agent_proxy *proxy;
} gl_agent;

void agent_log(const gl_agent *a, int level, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));
uint64_t agent_uptime_ms(const gl_agent *a);

/* ---- control connections (conn.c) ---------------------------------------- */

/* What each operation implements. Every hook may be NULL. */
typedef struct agent_req_ops {
	/* A DATA frame for this request (payload borrowed for the call). */
	void (*data)(agent_req *r, const gl_frame *f);
	/* CANCEL: sig is the frame's "signal" or 0 when absent. */
	void (*cancel)(agent_req *r, int sig);
	/* The connection is gone: stop everything, then agent_req_free once
	 * nothing is pending (may be later, from a callback). */
	void (*abort)(agent_req *r);
	/* The connection's output fell under / rose over the high watermark. */
	void (*pause_out)(agent_req *r, bool paused);
} agent_req_ops;

/* The common head of every request; ops embed it first. */
struct agent_req {
	agent_conn *conn;  /* NULL once the connection is gone */
	gl_agent *agent;
	uint32_t id;
	bool in_flight;    /* still in the connection's table */
	bool holding;      /* counts in the connection's input holds */
	const agent_req_ops *ops;
	agent_req *next, *prev;
};

/* Accept callback for gl_vsock_listen (arg: the gl_agent). */
void agent_conn_accept(void *arg, int fd, uint32_t peer_cid);
/* Close every control connection (shutdown). */
void agent_conn_close_all(gl_agent *a);

/* Answer request id with ERROR {msg or strerror(e), e} END, before any
 * request struct exists (bad arguments, no memory). */
void agent_conn_fail(agent_conn *c, uint32_t id, int e, const char *msg);

/* Register r (already allocated by an op, id set) in its connection. */
void agent_req_add(agent_conn *c, agent_req *r, uint32_t id, const agent_req_ops *ops);
/* The request is answered (its END frame went out, or must never go out):
 * take it out of the table, so that later frames for its id are dropped.
 * Does not free. */
void agent_req_done(agent_req *r);
/* Unlink and free (r must be done, or its connection gone). */
void agent_req_free(agent_req *r);

/* Sending on a request; no-ops (returning -EPIPE) once the connection is gone. */
int agent_req_send(agent_req *r, uint8_t type, uint8_t flags, const void *p, size_t n);
int agent_req_send_json(agent_req *r, uint8_t type, uint8_t flags, json_t *j); /* steals j */
/* ERROR {error: strerror(e) or msg, errno: e} END, then agent_req_done. */
void agent_req_fail(agent_req *r, int e, const char *msg);
/* Whether the connection's output queue is over its high watermark. */
bool agent_req_out_full(const agent_req *r);
/* Pause / resume reading the connection (counted: every pause needs a resume). */
void agent_req_hold_input(agent_req *r, bool hold);

/* ---- operations ---------------------------------------------------------- */

/* Each takes the REQUEST payload (borrowed) and answers on its own. */
void agent_op_exec(agent_conn *c, uint32_t id, json_t *req);
void agent_op_read(agent_conn *c, uint32_t id, json_t *req);
void agent_op_write(agent_conn *c, uint32_t id, json_t *req);
void agent_op_stat(agent_conn *c, uint32_t id, json_t *req);
void agent_op_list(agent_conn *c, uint32_t id, json_t *req);

/* ---- devlxd proxy (proxy.c) ---------------------------------------------- */

/* Listen on a->devlxd_path. 0 or -errno with a message in err. */
int agent_proxy_start(gl_agent *a, char *err, size_t errlen);
/* Begin announcing the agent to the host (until one success). */
void agent_announce_start(gl_agent *a);
void agent_proxy_stop(gl_agent *a);

#endif
