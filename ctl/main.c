/* guestlinkctl: the host's command line for the guest agents of VMs. It
 * speaks the control protocol (docs/control-protocol.md) to guestlinkd's
 * control socket: one connection, one request (id 1), one libuv loop.
 * Local bytes (stdin, stdout, stderr, files) go through ctl/io.h so that
 * back-pressure holds both ways: a source pauses while the connection is
 * over its high watermark, the connection pauses while a sink is full. */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <libgen.h>
#include <limits.h>
#include <math.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>
#include <uv.h>
#include <jansson.h>

#include "bridge/fconn.h"
#include "bridge/frame.h"
#include "ctl/io.h"

#ifndef GUESTLINK_VERSION
#define GUESTLINK_VERSION "0.2.0"
#endif

#define DEFAULT_SOCKET "/run/guestlink/control.sock"

/* Exit statuses (documented in --help and guestlinkctl(8)). */
#define ST_OK 0
#define ST_FAILED 1
#define ST_USAGE 2
#define ST_UNAVAILABLE 69 /* EX_UNAVAILABLE */
#define ST_TIMEOUT 124    /* as timeout(1) */
#define ST_EXEC_FAILED 255 /* as ssh(1) */

#define REQ_ID 1u
#define SINK_HIGH (1u << 20)
#define SINK_LOW (256u << 10)
#define PROGRESS_NS (200u * 1000u * 1000u)

enum op { OP_PING, OP_EXEC, OP_PUSH, OP_PULL, OP_STAT, OP_LS, OP_WAIT, OP_STATUS };

struct command {
	const char *name;
	enum op op;
	const char *synopsis;
	const char *help;
};

static const struct command commands[] = {
	{"ping", OP_PING, "ping VM",
	 "Ask VM's agent to answer, once. Prints its version, its uptime and the\n"
	 "round trip as this command saw it, and exits 0 the moment it answers:\n"
	 "  vm1: agent 0.2.0, up 12.3 s, rtt 0.21 ms\n"
	 "Exits 69 when the agent cannot be reached (use 'wait VM agent' to block).\n"},
	{"exec", OP_EXEC, "exec VM [--env K=V]... [--cwd DIR] [--timeout SEC] [-T] [--] CMD [ARG...]",
	 "Run CMD with its arguments in the guest (no shell: use sh -c for one).\n"
	 "Its stdout and stderr stream to ours as it writes them; our stdin is\n"
	 "forwarded to it until end of input (an interactive terminal too: end it\n"
	 "with ^D). SIGINT, SIGTERM or SIGHUP is passed on to the command's process\n"
	 "group, and guestlinkctl waits for it to end; a second one sends SIGKILL, a\n"
	 "third one gives up waiting.\n"
	 "\n"
	 "  --env K=V       set a variable; when any --env is given, the command's\n"
	 "                  environment is exactly these variables (pass PATH too)\n"
	 "  --cwd DIR       working directory in the guest\n"
	 "  --timeout SEC   kill the command (SIGKILL) after SEC seconds; exit 124\n"
	 "  -T, --no-stdin  the command's stdin is /dev/null; ours is not read\n"
	 "\n"
	 "Exits with the command's status (128+N when signal N killed it), 124 when\n"
	 "--timeout killed it, and 255 when it did not run or its end is unknown\n"
	 "(it could not start, the daemon or the agent is unreachable, the\n"
	 "connection was lost).\n"},
	{"push", OP_PUSH, "push VM LOCAL REMOTE [--mode OCTAL] [--progress]",
	 "Copy the local file LOCAL (\"-\": stdin) to REMOTE in the guest. The agent\n"
	 "writes a temporary file beside REMOTE and renames it over REMOTE once all\n"
	 "of it is on disk: REMOTE is never half written. A REMOTE ending in \"/\"\n"
	 "is a directory: LOCAL's name is added.\n"
	 "\n"
	 "  --mode OCTAL    REMOTE's permissions (default: LOCAL's; 0644 for stdin)\n"
	 "  --progress      show progress on stderr (default: when it is a terminal)\n"
	 "  --no-progress   never show progress\n"},
	{"pull", OP_PULL, "pull VM REMOTE LOCAL [--progress]",
	 "Copy the guest file REMOTE to LOCAL (\"-\": stdout; an existing directory:\n"
	 "REMOTE's name inside it). The bytes go to a temporary file beside LOCAL,\n"
	 "which is renamed over LOCAL once complete and removed on any failure.\n"
	 "LOCAL gets REMOTE's permissions, less the umask.\n"
	 "\n"
	 "  --progress      show progress on stderr (default: when it is a terminal)\n"
	 "  --no-progress   never show progress\n"},
	{"stat", OP_STAT, "stat VM PATH [--json]",
	 "Show what lstat(2) says of PATH in the guest: type (file, dir, symlink,\n"
	 "other), mode, size, uid, gid, mtime (UTC).\n"
	 "\n"
	 "  --json          print the agent's answer as one JSON object\n"},
	{"ls", OP_LS, "ls VM PATH [-l] [--json]",
	 "List the directory PATH in the guest, one name per line, sorted.\n"
	 "\n"
	 "  -l, --long      type, mode, size and name on each line\n"
	 "  --json          one JSON array of {name, type, size, mode}\n"},
	{"wait", OP_WAIT, "wait VM ready|agent [--timeout SEC]",
	 "Block until VM is so, then exit 0:\n"
	 "  ready   the guest reported state Ready on devlxd (containers too)\n"
	 "  agent   the VM's agent answers\n"
	 "\n"
	 "  --timeout SEC   give up after SEC seconds (exit 124); default: never\n"},
	{"status", OP_STATUS, "status VM [--json]",
	 "Show the daemon's view of VM's agent (as M/VM/agent shows it): online or\n"
	 "offline, the agent's version, the last ping and its round trip. Exits 0\n"
	 "whether the agent is online or not.\n"
	 "\n"
	 "  --json          print the daemon's answer as one JSON object\n"},
};

#define N_COMMANDS (sizeof(commands) / sizeof(commands[0]))

struct ctl {
	uv_loop_t loop;
	const struct command *cmd;
	const char *socket_path;
	const char *vm;
	char what[512]; /* the object of the command, for messages: "stat /nope" */
	json_t *req;
	gl_fconn *conn;
	bool done;    /* the outcome is decided (status is final) */
	bool closing; /* everything is being closed */
	int status;
	uint64_t sent_ns;

	/* options */
	bool json, long_list, progress, use_stdin;
	double timeout; /* seconds, 0: none */

	/* exec: out writes our stdout and stderr (one queue: their order is
	 * kept), src reads stdin; pull: out is the file; push: src is. */
	ctl_sink out;
	ctl_source src;
	bool conn_paused;
	int cancels;

	/* push / pull */
	const char *local, *remote;
	char *dest;     /* pull: the final path */
	char *tmp_path; /* pull: the temporary file, until renamed */
	int file_fd;
	uint64_t size_total;
	bool have_mode;
	unsigned mode;

	/* progress */
	uint64_t prog_start, prog_last;
	bool prog_shown;

	bool ls_first;
	uv_signal_t sigs[3];
	int nsigs;
};

static void maybe_shutdown(struct ctl *x);

/* ---- messages --------------------------------------------------------------- */

/* exec's output queue: our messages go through it, after the command's
 * output that arrived before them. */
static ctl_sink *msg_sink;

static void msg(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void msg(const char *fmt, ...)
{
	char buf[1024];
	va_list ap;
	int n;

	n = snprintf(buf, sizeof(buf), "guestlinkctl: ");
	va_start(ap, fmt);
	vsnprintf(buf + n, sizeof(buf) - (size_t)n - 1, fmt, ap);
	va_end(ap);
	n = (int)strlen(buf);
	buf[n++] = '\n';
	if (msg_sink && msg_sink->open && !msg_sink->err &&
	    ctl_sink_write_fd(msg_sink, STDERR_FILENO, buf, (size_t)n) == 0)
		return;
	fflush(stdout);
	fwrite(buf, 1, (size_t)n, stderr);
}

static int usage_error(const char *cmd, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static int usage_error(const char *cmd, const char *fmt, ...)
{
	va_list ap;

	fputs("guestlinkctl: ", stderr);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	if (cmd)
		fprintf(stderr, "\nTry 'guestlinkctl help %s'.\n", cmd);
	else
		fputs("\nTry 'guestlinkctl --help'.\n", stderr);
	return ST_USAGE;
}

static void usage(FILE *f)
{
	size_t i;

	fprintf(f, "Usage: guestlinkctl [-s SOCKET] COMMAND [ARGS...]\n"
		   "\n"
		   "Drive the guest agent of a VM (guestlink-agent) through guestlinkd's\n"
		   "control socket: check it answers, run commands, move files.\n"
		   "\n"
		   "Commands:\n");
	for (i = 0; i < N_COMMANDS; i++)
		fprintf(f, "  %s\n", commands[i].synopsis);
	fprintf(f, "  help [COMMAND]\n"
		   "\n"
		   "Options:\n"
		   "  -s, --socket PATH  guestlinkd's control socket (default: $GUESTLINK_SOCKET,\n"
		   "                     else " DEFAULT_SOCKET ")\n"
		   "  -h, --help         show this help (or 'help COMMAND': one command's)\n"
		   "  -V, --version      show the version\n"
		   "\n"
		   "Exit status:\n"
		   "  0    success\n"
		   "  1    the operation failed (the guest's error is printed)\n"
		   "  2    usage error\n"
		   "  69   guestlinkd or the VM's agent cannot be reached, or the\n"
		   "       connection to it was lost\n"
		   "  124  timed out (wait --timeout, exec --timeout)\n"
		   "  exec exits with the remote command's status (128+N for signal N),\n"
		   "  124 when its --timeout killed it, and 255 when guestlinkctl failed\n"
		   "  (the command could not start, daemon or agent unreachable,\n"
		   "  connection lost), as ssh does.\n"
		   "  A signal (SIGINT, SIGTERM, SIGHUP) that ends another command: 128+N.\n");
}

static void command_help(FILE *f, const struct command *c)
{
	fprintf(f, "Usage: guestlinkctl [-s SOCKET] %s\n\n%s", c->synopsis, c->help);
}

static const struct command *find_command(const char *name)
{
	size_t i;

	for (i = 0; i < N_COMMANDS; i++)
		if (strcmp(commands[i].name, name) == 0)
			return &commands[i];
	return NULL;
}

/* ---- formatting ------------------------------------------------------------- */

/* RFC 3339 UTC with `digits` (3 or 9) fractional digits. */
static const char *fmt_time_ns(uint64_t ns, int digits, char *buf, size_t len)
{
	time_t t = (time_t)(ns / 1000000000u);
	unsigned frac = (unsigned)(ns % 1000000000u);
	struct tm tm;
	size_t n;

	if (!gmtime_r(&t, &tm)) {
		snprintf(buf, len, "%" PRIu64, ns);
		return buf;
	}
	n = strftime(buf, len, "%Y-%m-%dT%H:%M:%S", &tm);
	if (digits == 3)
		snprintf(buf + n, len - n, ".%03uZ", frac / 1000000u);
	else
		snprintf(buf + n, len - n, ".%09uZ", frac);
	return buf;
}

static const char *human_size(uint64_t v, char *buf, size_t len)
{
	static const char *const units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
	double d = (double)v;
	unsigned i = 0;

	while (d >= 1024 && i < 4) {
		d /= 1024;
		i++;
	}
	if (i == 0)
		snprintf(buf, len, "%" PRIu64 " B", v);
	else
		snprintf(buf, len, "%.1f %s", d, units[i]);
	return buf;
}

static json_int_t jint(const json_t *o, const char *k)
{
	return json_integer_value(json_object_get(o, k));
}

static const char *jstr(const json_t *o, const char *k, const char *dflt)
{
	const char *s = json_string_value(json_object_get(o, k));

	return s ? s : dflt;
}

static void print_json(const json_t *j)
{
	char *s = json_dumps(j, JSON_COMPACT | JSON_PRESERVE_ORDER);

	if (s) {
		printf("%s\n", s);
		free(s);
	}
}

/* ---- progress --------------------------------------------------------------- */

static void progress(struct ctl *x, uint64_t done, bool last)
{
	uint64_t now = uv_hrtime();
	char a[32], b[32], r[32];
	double secs;

	if (!x->progress)
		return;
	if (!last && now - x->prog_last < PROGRESS_NS)
		return;
	if (last && !x->prog_shown)
		return;
	x->prog_last = now;
	x->prog_shown = true;
	secs = (double)(now - x->prog_start) / 1e9;
	human_size(secs > 0 ? (uint64_t)((double)done / secs) : 0, r, sizeof(r));
	if (x->size_total)
		fprintf(stderr, "\r%s: %s / %s (%3u%%), %s/s   ", x->cmd->name,
			human_size(done, a, sizeof(a)), human_size(x->size_total, b, sizeof(b)),
			(unsigned)(done >= x->size_total ? 100 : done * 100 / x->size_total), r);
	else
		fprintf(stderr, "\r%s: %s, %s/s   ", x->cmd->name, human_size(done, a, sizeof(a)),
			r);
	if (last)
		fputc('\n', stderr);
}

/* ---- the outcome ------------------------------------------------------------ */

/* Decide the exit status once; the loop winds down when the sinks are empty. */
static void finish(struct ctl *x, int status)
{
	if (x->done)
		return;
	x->done = true;
	x->status = status;
	ctl_source_close(&x->src);
	maybe_shutdown(x);
}

/* Errors that say the daemon or the agent is out of reach. */
static bool link_errno(int e)
{
	return e == EHOSTUNREACH || e == ECONNRESET || e == EPIPE || e == ECONNREFUSED ||
	       e == ECONNABORTED || e == ENOTCONN || e == ESHUTDOWN;
}

static int error_status(const struct ctl *x, int e)
{
	if (x->cmd->op == OP_EXEC)
		return ST_EXEC_FAILED;
	if (e == ETIMEDOUT)
		return ST_TIMEOUT;
	if (link_errno(e))
		return ST_UNAVAILABLE;
	return ST_FAILED;
}

static void report_error(struct ctl *x, int e, const char *text)
{
	const char *se = strerror(e);

	if (x->cmd->op == OP_WAIT && e == ETIMEDOUT)
		msg("%s: timed out after %g s", x->what, x->timeout);
	else if (text && *text && (link_errno(e) || (x->vm && *x->vm && strstr(text, x->vm))))
		/* The daemon's words about the instance or its agent: "agent of
		 * vm1: connection lost", "no instance vm9". */
		msg("%s", text);
	else if (text && *text && !strstr(text, se))
		msg("%s: %s (%s)", x->what, se, text);
	else
		msg("%s: %s", x->what, se);
}

static void on_error_frame(struct ctl *x, const gl_frame *f)
{
	json_t *j = gl_frame_json(f, NULL, 0);
	json_int_t e = j ? jint(j, "errno") : 0;

	if (e <= 0 || e > 4095)
		e = EIO;
	report_error(x, (int)e, j ? jstr(j, "error", NULL) : NULL);
	json_decref(j);
	finish(x, error_status(x, (int)e));
}

/* ---- pull's file ------------------------------------------------------------ */

static int pull_commit(struct ctl *x)
{
	mode_t um = umask(0);
	mode_t m = (x->have_mode ? (mode_t)x->mode : 0666) & 0777 & ~um;

	umask(um);
	if (fchmod(x->file_fd, m) < 0 || fsync(x->file_fd) < 0)
		return -errno;
	if (close(x->file_fd) < 0) {
		x->file_fd = -1;
		return -errno;
	}
	x->file_fd = -1;
	if (rename(x->tmp_path, x->dest) < 0)
		return -errno;
	free(x->tmp_path);
	x->tmp_path = NULL;
	return 0;
}

static void pull_discard(struct ctl *x)
{
	if (x->file_fd >= 0 && x->tmp_path) {
		close(x->file_fd);
		x->file_fd = -1;
	}
	if (x->tmp_path) {
		unlink(x->tmp_path);
		free(x->tmp_path);
		x->tmp_path = NULL;
	}
}

/* ---- winding down ----------------------------------------------------------- */

static void maybe_shutdown(struct ctl *x)
{
	int i, r;

	if (!x->done || x->closing)
		return;
	/* What arrived before the end is written out first. */
	if (x->out.open && !ctl_sink_idle(&x->out))
		return;
	x->closing = true;
	if (x->cmd->op == OP_PULL && x->tmp_path) {
		if (x->status == ST_OK && !x->out.err) {
			r = pull_commit(x);
			if (r < 0) {
				msg("pull: %s: %s", x->dest, strerror(-r));
				x->status = ST_FAILED;
			}
		}
		pull_discard(x);
	}
	if (x->cmd->op == OP_PUSH || x->cmd->op == OP_PULL)
		progress(x, x->cmd->op == OP_PUSH ? x->src.total : x->out.written, true);
	if (x->conn)
		gl_fconn_close(x->conn);
	ctl_source_close(&x->src);
	ctl_sink_close(&x->out);
	for (i = 0; i < x->nsigs; i++)
		uv_close((uv_handle_t *)&x->sigs[i], NULL);
	x->nsigs = 0;
}

/* Force the end: a sink that cannot be written (stdout blocked for good)
 * is abandoned. */
static void force_shutdown(struct ctl *x, int status)
{
	if (!x->done)
		finish(x, status);
	if (x->closing)
		return;
	ctl_sink_close(&x->out);
	maybe_shutdown(x);
}

/* ---- the connection --------------------------------------------------------- */

static void sink_write(struct ctl *x, int fd, const gl_frame *f)
{
	ctl_sink *s = &x->out;

	if (!f->len || !s->open)
		return;
	if (ctl_sink_write_fd(s, fd, f->payload, f->len) == -ENOMEM) {
		msg("out of memory");
		force_shutdown(x, x->cmd->op == OP_EXEC ? ST_EXEC_FAILED : ST_FAILED);
		return;
	}
	if (!x->conn_paused && x->conn && x->out.queued > SINK_HIGH) {
		x->conn_paused = true;
		gl_fconn_pause(x->conn, true);
	}
}

static void send_cancel(struct ctl *x, int sig)
{
	json_t *j = sig ? json_pack("{s:i}", "signal", sig) : json_object();

	if (x->conn && j)
		gl_fconn_send_json(x->conn, REQ_ID, GL_FRAME_CANCEL, 0, j);
	json_decref(j);
}

static void on_sink(ctl_sink *s, void *arg)
{
	struct ctl *x = arg;

	if (s->err && !x->done) {
		if (x->cmd->op == OP_PULL) {
			msg("pull: %s: %s", x->dest ? x->dest : "stdout", strerror(-s->err));
			finish(x, ST_FAILED);
		} else if (x->cmd->op == OP_EXEC && x->cancels == 0) {
			/* Our reader went away: the command gets what a local
			 * one would, SIGPIPE for EPIPE. */
			x->cancels++;
			send_cancel(x, s->err == -EPIPE ? SIGPIPE : SIGTERM);
		}
	}
	if (x->conn_paused && x->conn && x->out.queued < SINK_LOW) {
		x->conn_paused = false;
		gl_fconn_pause(x->conn, false);
	}
	if (x->cmd->op == OP_PULL)
		progress(x, s->written, false);
	maybe_shutdown(x);
}

static void on_response(struct ctl *x, const gl_frame *f)
{
	bool end = f->flags & GL_FRAME_END;
	json_t *j = gl_frame_json(f, NULL, 0);
	json_t *a, *e;
	char tb[64];
	size_t i;
	json_int_t code, sig;

	if (!j) {
		msg("%s: guestlinkd sent an answer that is not a JSON object", x->what);
		finish(x, x->cmd->op == OP_EXEC ? ST_EXEC_FAILED : ST_FAILED);
		return;
	}
	switch (x->cmd->op) {
	case OP_PING:
		if (!end)
			break;
		printf("%s: agent %s, up %.1f s, rtt %.2f ms\n", x->vm, jstr(j, "version", "?"),
		       (double)jint(j, "uptime_ms") / 1000.0,
		       (double)(uv_hrtime() - x->sent_ns) / 1e6);
		finish(x, ST_OK);
		break;
	case OP_EXEC:
		if (!end)
			break;
		code = jint(j, "exit_code");
		sig = jint(j, "signal");
		if (json_is_true(json_object_get(j, "timed_out"))) {
			msg("%s: timed out after %g s", x->what, x->timeout);
			finish(x, ST_TIMEOUT);
		} else if (!json_is_integer(json_object_get(j, "exit_code")) && sig > 0) {
			finish(x, 128 + (int)(sig & 127));
		} else {
			finish(x, (int)(code & 255));
		}
		break;
	case OP_PUSH:
		if (end)
			finish(x, ST_OK);
		break;
	case OP_PULL:
		if (json_is_integer(json_object_get(j, "size")))
			x->size_total = (uint64_t)jint(j, "size");
		if (json_is_integer(json_object_get(j, "mode"))) {
			x->have_mode = true;
			x->mode = (unsigned)jint(j, "mode");
		}
		if (end)
			finish(x, ST_OK);
		break;
	case OP_STAT:
		if (!end)
			break;
		if (x->json) {
			print_json(j);
		} else {
			printf("type: %s\n", jstr(j, "type", "?"));
			printf("mode: %04o\n", (unsigned)(jint(j, "mode") & 07777));
			printf("size: %" JSON_INTEGER_FORMAT "\n", jint(j, "size"));
			printf("uid: %" JSON_INTEGER_FORMAT "\n", jint(j, "uid"));
			printf("gid: %" JSON_INTEGER_FORMAT "\n", jint(j, "gid"));
			printf("mtime: %s\n",
			       fmt_time_ns((uint64_t)jint(j, "mtime_ns"), 9, tb, sizeof(tb)));
		}
		finish(x, ST_OK);
		break;
	case OP_LS:
		a = json_object_get(j, "entries");
		json_array_foreach(a, i, e) {
			if (x->json) {
				char *s = json_dumps(e, JSON_COMPACT | JSON_PRESERVE_ORDER);

				printf("%s%s", x->ls_first ? "," : "[", s ? s : "null");
				free(s);
				x->ls_first = true;
			} else if (x->long_list) {
				printf("%-7s %04o %12" JSON_INTEGER_FORMAT " %s\n",
				       jstr(e, "type", "?"), (unsigned)(jint(e, "mode") & 07777),
				       jint(e, "size"), jstr(e, "name", "?"));
			} else {
				printf("%s\n", jstr(e, "name", "?"));
			}
		}
		if (end) {
			if (x->json)
				printf("%s\n", x->ls_first ? "]" : "[]");
			finish(x, ST_OK);
		}
		break;
	case OP_WAIT:
		if (end)
			finish(x, ST_OK);
		break;
	case OP_STATUS:
		if (!end)
			break;
		if (x->json) {
			print_json(j);
		} else {
			const char *v = jstr(j, "version", "");

			printf("status: %s\n",
			       json_is_true(json_object_get(j, "online")) ? "online" : "offline");
			if (*v)
				printf("version: %s\n", v);
			if (jint(j, "last_ping_ns") > 0)
				printf("last-ping: %s\n",
				       fmt_time_ns((uint64_t)jint(j, "last_ping_ns"), 3, tb,
						   sizeof(tb)));
			if (json_is_true(json_object_get(j, "online")) &&
			    json_is_integer(json_object_get(j, "rtt_us")))
				printf("rtt-us: %" JSON_INTEGER_FORMAT "\n", jint(j, "rtt_us"));
		}
		finish(x, ST_OK);
		break;
	}
	json_decref(j);
}

static void on_frame(gl_fconn *c, const gl_frame *f, void *arg)
{
	struct ctl *x = arg;

	if (x->done)
		return;
	if (f->id == 0) {
		/* The daemon ends the connection (a frame it could not take). */
		if (f->type == GL_FRAME_ERROR)
			on_error_frame(x, f);
		return;
	}
	if (f->id != REQ_ID)
		return;
	switch (f->type) {
	case GL_FRAME_ERROR:
		on_error_frame(x, f);
		break;
	case GL_FRAME_RESPONSE:
		on_response(x, f);
		break;
	case GL_FRAME_DATA:
		if (x->cmd->op == OP_EXEC) {
			sink_write(x, (f->flags & GL_FRAME_STDERR) ? STDERR_FILENO : STDOUT_FILENO,
				   f);
		} else if (x->cmd->op == OP_PULL) {
			sink_write(x, x->out.fd, f);
			if (f->flags & GL_FRAME_END)
				finish(x, ST_OK);
		}
		break;
	default:
		break; /* a type from a newer daemon: skipped */
	}
}

static void on_drain(gl_fconn *c, void *arg)
{
	struct ctl *x = arg;

	ctl_source_pause(&x->src, false);
}

static void on_closed(gl_fconn *c, int err, void *arg)
{
	struct ctl *x = arg;

	x->conn = NULL;
	if (x->done)
		return;
	if (err < 0 && err != -EPIPE && err != -ECONNRESET)
		msg("connection to guestlinkd lost: %s", strerror(-err));
	else
		msg("connection to guestlinkd lost");
	finish(x, x->cmd->op == OP_EXEC ? ST_EXEC_FAILED : ST_UNAVAILABLE);
}

/* ---- local input ------------------------------------------------------------ */

static void on_source(ctl_source *s, ssize_t n, const char *p, void *arg)
{
	struct ctl *x = arg;

	if (x->done || !x->conn)
		return;
	if (n > 0) {
		gl_fconn_send(x->conn, REQ_ID, GL_FRAME_DATA, 0, p, (size_t)n);
		if (gl_fconn_over_high(x->conn))
			ctl_source_pause(s, true);
		if (x->cmd->op == OP_PUSH)
			progress(x, s->total, false);
		return;
	}
	if (n < 0) {
		if (x->cmd->op == OP_PUSH) {
			msg("push: %s: %s", x->local, strerror((int)-n));
			send_cancel(x, 0);
			finish(x, ST_FAILED);
			return;
		}
		msg("exec: reading stdin: %s", strerror((int)-n));
	}
	/* End of input: an empty DATA flagged END (never a half-close). */
	gl_fconn_send(x->conn, REQ_ID, GL_FRAME_DATA, GL_FRAME_END, NULL, 0);
	ctl_source_close(s);
}

/* ---- signals ---------------------------------------------------------------- */

static void on_signal(uv_signal_t *h, int signum)
{
	struct ctl *x = h->data;

	if (x->done) {
		/* Still flushing output somebody does not read: give up. */
		force_shutdown(x, x->status);
		return;
	}
	if (x->cmd->op == OP_EXEC && x->conn) {
		x->cancels++;
		if (x->cancels == 1) {
			send_cancel(x, signum);
			return;
		}
		if (x->cancels == 2) {
			send_cancel(x, SIGKILL);
			return;
		}
		force_shutdown(x, ST_EXEC_FAILED);
		msg("%s: not waiting for the command any longer", x->what);
		return;
	}
	if (x->cmd->op == OP_PUSH)
		send_cancel(x, 0);
	force_shutdown(x, 128 + signum);
}

/* ---- connecting ------------------------------------------------------------- */

static int connect_daemon(const char *path)
{
	struct sockaddr_un sa;
	int fd, r;

	memset(&sa, 0, sizeof(sa));
	sa.sun_family = AF_UNIX;
	if (strlen(path) >= sizeof(sa.sun_path))
		return -ENAMETOOLONG;
	strcpy(sa.sun_path, path);
	fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return -errno;
	do
		r = connect(fd, (struct sockaddr *)&sa, sizeof(sa));
	while (r < 0 && errno == EINTR);
	if (r < 0) {
		r = -errno;
		close(fd);
		return r;
	}
	return fd;
}

static int run(struct ctl *x)
{
	static const int signums[] = {SIGINT, SIGTERM, SIGHUP};
	gl_fconn_cbs cbs = {.frame = on_frame, .drain = on_drain, .closed = on_closed};
	gl_fconn_opts o;
	size_t i;
	int fd, err = 0, r;

	for (i = 0; i < sizeof(signums) / sizeof(signums[0]); i++) {
		if (uv_signal_init(&x->loop, &x->sigs[x->nsigs]) < 0)
			continue;
		x->sigs[x->nsigs].data = x;
		uv_signal_start(&x->sigs[x->nsigs], on_signal, signums[i]);
		x->nsigs++;
	}
	fd = connect_daemon(x->socket_path);
	if (fd < 0) {
		msg("cannot connect to guestlinkd at %s: %s", x->socket_path, strerror(-fd));
		finish(x, x->cmd->op == OP_EXEC ? ST_EXEC_FAILED : ST_UNAVAILABLE);
		goto run;
	}
	gl_fconn_opts_default(&o);
	o.max_payload = GL_FRAME_MAX; /* no handshake on the control socket */
	x->conn = gl_fconn_new(&x->loop, fd, NULL, 0, &o, &cbs, x, &err);
	if (!x->conn) {
		msg("guestlinkd at %s: %s", x->socket_path, strerror(-err));
		finish(x, x->cmd->op == OP_EXEC ? ST_EXEC_FAILED : ST_UNAVAILABLE);
		goto run;
	}
	r = gl_fconn_send_json(x->conn, REQ_ID, GL_FRAME_REQUEST, 0, x->req);
	if (r < 0) {
		msg("%s: cannot send the request: %s", x->what, strerror(-r));
		finish(x, x->cmd->op == OP_EXEC ? ST_EXEC_FAILED : ST_FAILED);
		goto run;
	}
	x->sent_ns = uv_hrtime();
	x->prog_start = x->sent_ns;
	x->prog_last = x->sent_ns; /* the first progress line after 200 ms */
	ctl_source_start(&x->src);
run:
	uv_run(&x->loop, UV_RUN_DEFAULT);
	return x->status;
}

/* ---- arguments -------------------------------------------------------------- */

/* Seconds as a decimal ("30", "0.5"). 0 or -EINVAL. */
static int parse_seconds(const char *s, double *out)
{
	char *end;
	double v;

	errno = 0;
	v = strtod(s, &end);
	if (errno || end == s || *end || !isfinite(v) || v < 0 || v > 1e9)
		return -EINVAL;
	*out = v;
	return 0;
}

static uint64_t seconds_ms(double s)
{
	uint64_t ms = (uint64_t)(s * 1000.0 + 0.5);

	return s > 0 && ms == 0 ? 1 : ms;
}

enum {
	O_HELP = 'h',
	O_LONG = 'l',
	O_NOSTDIN = 'T',
	O_ENV = 256,
	O_CWD,
	O_TIMEOUT,
	O_MODE,
	O_PROGRESS,
	O_NOPROGRESS,
	O_JSON,
};

static const struct option cmd_longopts[] = {
	{"help", no_argument, NULL, O_HELP},
	{"env", required_argument, NULL, O_ENV},
	{"cwd", required_argument, NULL, O_CWD},
	{"timeout", required_argument, NULL, O_TIMEOUT},
	{"no-stdin", no_argument, NULL, O_NOSTDIN},
	{"mode", required_argument, NULL, O_MODE},
	{"progress", no_argument, NULL, O_PROGRESS},
	{"no-progress", no_argument, NULL, O_NOPROGRESS},
	{"json", no_argument, NULL, O_JSON},
	{"long", no_argument, NULL, O_LONG},
	{NULL, 0, NULL, 0},
};

/* Which options each command takes. */
static bool cmd_takes(enum op op, int o)
{
	switch (o) {
	case O_HELP:
		return true;
	case O_ENV:
	case O_CWD:
	case O_NOSTDIN:
		return op == OP_EXEC;
	case O_TIMEOUT:
		return op == OP_EXEC || op == OP_WAIT;
	case O_MODE:
		return op == OP_PUSH;
	case O_PROGRESS:
	case O_NOPROGRESS:
		return op == OP_PUSH || op == OP_PULL;
	case O_JSON:
		return op == OP_STAT || op == OP_LS || op == OP_STATUS;
	case O_LONG:
		return op == OP_LS;
	}
	return false;
}

static const char *opt_name(int c)
{
	static char buf[32];
	size_t i;

	snprintf(buf, sizeof(buf), "-%c", c);
	for (i = 0; cmd_longopts[i].name; i++)
		if (cmd_longopts[i].val == c && c >= 256)
			snprintf(buf, sizeof(buf), "--%s", cmd_longopts[i].name);
	return buf;
}

struct parsed {
	json_t *env; /* exec --env, or NULL */
	const char *cwd;
	const char *mode;
	int progress; /* -1 auto */
};

/* One getopt pass over argv[optind..]. Returns -1 to go on, or an exit
 * status. `order`: stop at the first operand (exec's command). */
static int parse_opts(struct ctl *x, struct parsed *p, int argc, char **argv, bool order)
{
	const char *name = x->cmd->name;
	const char *eq;
	json_t *v;
	int c;

	while ((c = getopt_long(argc, argv, order ? "+hlT" : "hlT", cmd_longopts, NULL)) != -1) {
		if (c == '?' || c == ':') {
			if (optopt && optopt < 256)
				return usage_error(name, "%s: unknown option -%c, or it needs a value",
						   name, optopt);
			return usage_error(name, "%s: unknown option %s, or it needs a value", name,
					   argv[optind - 1]);
		}
		if (!cmd_takes(x->cmd->op, c))
			return usage_error(name, "%s does not take %s", name, opt_name(c));
		switch (c) {
		case O_HELP:
			command_help(stdout, x->cmd);
			return ST_OK;
		case O_LONG:
			x->long_list = true;
			break;
		case O_NOSTDIN:
			x->use_stdin = false;
			break;
		case O_ENV:
			eq = strchr(optarg, '=');
			if (!eq || eq == optarg)
				return usage_error(name, "--env wants K=V, not %s", optarg);
			if (!p->env)
				p->env = json_object();
			v = json_string(eq + 1);
			if (!p->env || !v ||
			    json_object_setn_new_nocheck(p->env, optarg, (size_t)(eq - optarg), v) < 0)
				return usage_error(name, "--env %s: not valid UTF-8", optarg);
			break;
		case O_CWD:
			p->cwd = optarg;
			break;
		case O_TIMEOUT:
			if (parse_seconds(optarg, &x->timeout) < 0)
				return usage_error(name, "--timeout wants seconds, not %s", optarg);
			break;
		case O_MODE:
			p->mode = optarg;
			break;
		case O_PROGRESS:
			p->progress = 1;
			break;
		case O_NOPROGRESS:
			p->progress = 0;
			break;
		case O_JSON:
			x->json = true;
			break;
		}
	}
	return -1;
}

static int want_operands(struct ctl *x, int have, int want, const char *names)
{
	if (have < want)
		return usage_error(x->cmd->name, "%s: missing %s (%s %s)", x->cmd->name,
				   have == 0 ? "VM" : "operand", x->cmd->name, names);
	if (have > want)
		return usage_error(x->cmd->name, "%s: unexpected argument", x->cmd->name);
	return -1;
}

static json_t *request(struct ctl *x, const char *op)
{
	return json_pack("{s:s, s:s}", "op", op, "instance", x->vm);
}

static int set_request(struct ctl *x, json_t *j)
{
	if (!j) {
		msg("%s: cannot build the request (not valid UTF-8?)", x->cmd->name);
		return ST_USAGE;
	}
	x->req = j;
	return -1;
}

static int prepare_exec(struct ctl *x, struct parsed *p, int argc, char **argv)
{
	json_t *j, *args;
	int r, i;

	r = parse_opts(x, p, argc, argv, true);
	if (r >= 0)
		return r;
	if (optind >= argc)
		return usage_error("exec", "exec: missing VM (exec VM [OPTIONS] -- CMD [ARG...])");
	x->vm = argv[optind++];
	/* Options may come after VM too, up to "--" or the command. */
	r = parse_opts(x, p, argc, argv, true);
	if (r >= 0)
		return r;
	if (optind >= argc)
		return usage_error("exec", "exec: missing the command (exec VM -- CMD [ARG...])");
	snprintf(x->what, sizeof(x->what), "exec %s", argv[optind]);
	j = request(x, "exec");
	args = json_array();
	if (!j || !args)
		goto nomem;
	json_object_set_new(j, "argv", args);
	for (i = optind; i < argc; i++)
		if (json_array_append_new(args, json_string(argv[i])) < 0) {
			json_decref(j);
			return usage_error("exec", "exec: argument %d is not valid UTF-8",
					   i - optind);
		}
	if (p->env) {
		json_object_set_new(j, "env", p->env);
		p->env = NULL;
	}
	if (p->cwd)
		json_object_set_new(j, "cwd", json_string(p->cwd));
	if (x->use_stdin) {
		/* A closed stdin: the command gets /dev/null. */
		if (ctl_source_open(&x->src, &x->loop, STDIN_FILENO, on_source, x) < 0)
			x->use_stdin = false;
	}
	json_object_set_new(j, "stdin", json_boolean(x->use_stdin));
	json_object_set_new(j, "timeout_ms", json_integer((json_int_t)seconds_ms(x->timeout)));
	if (ctl_sink_open(&x->out, &x->loop, STDOUT_FILENO, on_sink, x) < 0) {
		json_decref(j);
		goto nomem;
	}
	msg_sink = &x->out;
	return set_request(x, j);
nomem:
	msg("out of memory");
	return ST_EXEC_FAILED;
}

static int prepare_push(struct ctl *x, struct parsed *p)
{
	struct stat st;
	json_t *j;
	char *copy, *remote = NULL;
	unsigned long m;
	char *end;
	int fd;

	if (strcmp(x->local, "-") == 0) {
		fd = STDIN_FILENO;
		if (x->remote[strlen(x->remote) - 1] == '/')
			return usage_error("push", "push: REMOTE is a directory; a file read from "
						   "stdin needs a name");
	} else {
		fd = open(x->local, O_RDONLY | O_CLOEXEC);
		if (fd < 0) {
			msg("push: %s: %s", x->local, strerror(errno));
			return ST_FAILED;
		}
		x->file_fd = fd;
	}
	if (fstat(fd, &st) < 0) {
		msg("push: %s: %s", x->local, strerror(errno));
		return ST_FAILED;
	}
	if (S_ISDIR(st.st_mode)) {
		msg("push: %s: %s", x->local, strerror(EISDIR));
		return ST_FAILED;
	}
	if (x->remote[strlen(x->remote) - 1] == '/') {
		copy = strdup(x->local);
		if (!copy || asprintf(&remote, "%s%s", x->remote, basename(copy)) < 0)
			remote = NULL;
		free(copy);
		if (!remote) {
			msg("out of memory");
			return ST_FAILED;
		}
	}
	j = request(x, "write");
	if (!j) {
		free(remote);
		return set_request(x, NULL);
	}
	json_object_set_new(j, "path", json_string(remote ? remote : x->remote));
	snprintf(x->what, sizeof(x->what), "push %s", remote ? remote : x->remote);
	free(remote);
	if (p->mode) {
		errno = 0;
		m = strtoul(p->mode, &end, 8);
		if (errno || end == p->mode || *end || m > 07777) {
			json_decref(j);
			return usage_error("push", "--mode wants octal permissions, not %s", p->mode);
		}
		json_object_set_new(j, "mode", json_integer((json_int_t)m));
	} else if (fd != STDIN_FILENO) {
		json_object_set_new(j, "mode", json_integer(st.st_mode & 07777));
	}
	if (S_ISREG(st.st_mode) && fd != STDIN_FILENO) {
		x->size_total = (uint64_t)st.st_size;
		json_object_set_new(j, "size", json_integer((json_int_t)st.st_size));
	}
	if (ctl_source_open(&x->src, &x->loop, fd, on_source, x) < 0) {
		msg("push: %s: cannot read it", x->local);
		json_decref(j);
		return ST_FAILED;
	}
	return set_request(x, j);
}

static int prepare_pull(struct ctl *x)
{
	struct stat st;
	char *copy = NULL, *copy2 = NULL;
	json_t *j;
	int fd = STDOUT_FILENO;

	if (strcmp(x->local, "-") != 0) {
		if (stat(x->local, &st) == 0 && S_ISDIR(st.st_mode)) {
			copy = strdup(x->remote);
			if (!copy || asprintf(&x->dest, "%s/%s", x->local, basename(copy)) < 0)
				x->dest = NULL;
		} else {
			x->dest = strdup(x->local);
		}
		copy2 = x->dest ? strdup(x->dest) : NULL;
		if (!copy2 || asprintf(&x->tmp_path, "%s/.%s.guestlinkctl.XXXXXX", dirname(copy2),
				       basename(x->dest)) < 0)
			x->tmp_path = NULL;
		free(copy);
		free(copy2);
		if (!x->tmp_path) {
			msg("out of memory");
			return ST_FAILED;
		}
		fd = mkostemp(x->tmp_path, O_CLOEXEC);
		if (fd < 0) {
			msg("pull: %s: %s", x->dest, strerror(errno));
			free(x->tmp_path);
			x->tmp_path = NULL;
			return ST_FAILED;
		}
		x->file_fd = fd;
	}
	if (ctl_sink_open(&x->out, &x->loop, fd, on_sink, x) < 0) {
		msg("out of memory");
		pull_discard(x);
		return ST_FAILED;
	}
	j = request(x, "read");
	if (j)
		json_object_set_new(j, "path", json_string(x->remote));
	snprintf(x->what, sizeof(x->what), "pull %s", x->remote);
	return set_request(x, j);
}

/* Parse a command's arguments into x->req and the local ends. -1 to run,
 * or an exit status. */
static int prepare(struct ctl *x, int argc, char **argv)
{
	struct parsed p = {.progress = -1};
	json_t *j;
	char **ops;
	int r, n;

	optind = 0; /* glibc: start over, reading the optstring's '+' again */
	x->use_stdin = true;
	if (x->cmd->op == OP_EXEC) {
		r = prepare_exec(x, &p, argc, argv);
		json_decref(p.env);
		return r;
	}
	r = parse_opts(x, &p, argc, argv, false);
	if (r >= 0)
		return r;
	ops = argv + optind;
	n = argc - optind;
	x->vm = n > 0 ? ops[0] : NULL;
	x->progress = p.progress == 1 || (p.progress == -1 && isatty(STDERR_FILENO));
	switch (x->cmd->op) {
	case OP_PING:
	case OP_STATUS:
		if ((r = want_operands(x, n, 1, "VM")) >= 0)
			return r;
		snprintf(x->what, sizeof(x->what), "%s %s", x->cmd->name, x->vm);
		return set_request(x, request(x, x->cmd->op == OP_PING ? "ping" : "status"));
	case OP_STAT:
	case OP_LS:
		if ((r = want_operands(x, n, 2, "VM PATH")) >= 0)
			return r;
		snprintf(x->what, sizeof(x->what), "%s %s", x->cmd->name, ops[1]);
		j = request(x, x->cmd->op == OP_STAT ? "stat" : "list");
		if (j)
			json_object_set_new(j, "path", json_string(ops[1]));
		return set_request(x, j);
	case OP_WAIT:
		if ((r = want_operands(x, n, 2, "VM ready|agent")) >= 0)
			return r;
		if (strcmp(ops[1], "ready") != 0 && strcmp(ops[1], "agent") != 0)
			return usage_error("wait", "wait: %s: wait for \"ready\" or \"agent\"",
					   ops[1]);
		snprintf(x->what, sizeof(x->what), "wait %s %s", x->vm, ops[1]);
		j = request(x, "wait");
		if (j) {
			json_object_set_new(j, "for", json_string(ops[1]));
			json_object_set_new(j, "timeout_ms",
					    json_integer((json_int_t)seconds_ms(x->timeout)));
		}
		return set_request(x, j);
	case OP_PUSH:
	case OP_PULL:
		if ((r = want_operands(x, n, 3,
				       x->cmd->op == OP_PUSH ? "VM LOCAL REMOTE" : "VM REMOTE LOCAL")) >= 0)
			return r;
		x->local = ops[x->cmd->op == OP_PUSH ? 1 : 2];
		x->remote = ops[x->cmd->op == OP_PUSH ? 2 : 1];
		if (!*x->local || !*x->remote)
			return usage_error(x->cmd->name, "%s: empty path", x->cmd->name);
		if (x->remote[0] != '/')
			return usage_error(x->cmd->name, "%s: %s: guest paths are absolute",
					   x->cmd->name, x->remote);
		return x->cmd->op == OP_PUSH ? prepare_push(x, &p) : prepare_pull(x);
	case OP_EXEC:
		break;
	}
	return ST_USAGE;
}

int main(int argc, char **argv)
{
	static const struct option longopts[] = {
		{"socket", required_argument, NULL, 's'},
		{"help", no_argument, NULL, 'h'},
		{"version", no_argument, NULL, 'V'},
		{NULL, 0, NULL, 0},
	};
	struct ctl x;
	int flags[3], c, i, r, status;
	const char *env;

	memset(&x, 0, sizeof(x));
	x.file_fd = -1;
	env = getenv("GUESTLINK_SOCKET");
	x.socket_path = env && *env ? env : DEFAULT_SOCKET;
	opterr = 0;
	while ((c = getopt_long(argc, argv, "+s:hV", longopts, NULL)) != -1) {
		switch (c) {
		case 's':
			x.socket_path = optarg;
			break;
		case 'h':
			usage(stdout);
			return ST_OK;
		case 'V':
			printf("guestlinkctl %s\n", GUESTLINK_VERSION);
			return ST_OK;
		default:
			if (optopt == 's')
				return usage_error(NULL, "-s wants the control socket's path");
			if (optopt)
				return usage_error(NULL, "unknown option -%c", optopt);
			return usage_error(NULL, "unknown option %s", argv[optind - 1]);
		}
	}
	if (optind >= argc) {
		usage(stderr);
		return ST_USAGE;
	}
	if (strcmp(argv[optind], "help") == 0) {
		if (optind + 1 >= argc) {
			usage(stdout);
			return ST_OK;
		}
		x.cmd = find_command(argv[optind + 1]);
		if (!x.cmd)
			return usage_error(NULL, "help: no command %s", argv[optind + 1]);
		command_help(stdout, x.cmd);
		return ST_OK;
	}
	x.cmd = find_command(argv[optind]);
	if (!x.cmd)
		return usage_error(NULL, "unknown command %s", argv[optind]);

	signal(SIGPIPE, SIG_IGN);
	r = uv_loop_init(&x.loop);
	if (r < 0) {
		msg("uv_loop_init: %s", uv_strerror(r));
		return x.cmd->op == OP_EXEC ? ST_EXEC_FAILED : ST_FAILED;
	}
	for (i = 0; i < 3; i++)
		flags[i] = fcntl(i, F_GETFL);
	status = prepare(&x, argc - optind, argv + optind);
	if (status < 0) {
		status = run(&x);
	} else {
		/* Help, or a usage error: close what the parsing opened. */
		ctl_source_close(&x.src);
		ctl_sink_close(&x.out);
		pull_discard(&x);
		uv_run(&x.loop, UV_RUN_DEFAULT);
	}
	fflush(stdout);
	if (uv_loop_close(&x.loop) != 0)
		uv_run(&x.loop, UV_RUN_NOWAIT);
	if (x.cmd->op == OP_PUSH && x.file_fd >= 0)
		close(x.file_fd);
	for (i = 0; i < 3; i++)
		if (flags[i] >= 0)
			fcntl(i, F_SETFL, flags[i]);
	json_decref(x.req);
	free(x.dest);
	free(x.tmp_path);
	return status;
}
