/* guestlink-agent: options, signals, start and stop. */
#include <errno.h>
#include <getopt.h>
#include <limits.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "agent/agent.h"

#define DEFAULT_DEVLXD "/dev/lxd/sock"
#define DEFAULT_MAX_CONNS 64u

static void usage(FILE *out)
{
	fprintf(out,
		"Usage: guestlink-agent --host-key FILE [options]\n"
		"\n"
		"The guest agent of guestlink: serves the host's control requests (ping,\n"
		"exec, files) on vsock port 7361 and carries /dev/lxd/sock to the host.\n"
		"\n"
		"  --host-key FILE        the host's ed25519 public key (64 hex digits or base64)\n"
		"  --transport T          vsock (default) or unix:DIR (tests: DIR/listen-PORT,\n"
		"                         host reached through DIR/host)\n"
		"  --instance-id ID       this VM's instance id, sent in HELLO (default \"\")\n"
		"  --devlxd-socket PATH   local devlxd socket (default " DEFAULT_DEVLXD ";\n"
		"                         \"none\" disables it)\n"
		"  --port N               control port (default 7361)\n"
		"  --max-conns N          control connections at once (default %u)\n"
		"  -v, --verbose          more log lines on stderr (repeatable)\n"
		"  -h, --help             this text\n"
		"  -V, --version          print the version\n",
		DEFAULT_MAX_CONNS);
}

void agent_log(const gl_agent *a, int level, const char *fmt, ...)
{
	va_list ap;

	if (level > a->verbose)
		return;
	fputs("guestlink-agent: ", stderr);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
}

uint64_t agent_uptime_ms(const gl_agent *a)
{
	return uv_now(a->loop) - a->start_ms;
}

static int parse_uint(const char *s, unsigned long min, unsigned long max, unsigned long *out)
{
	char *end;
	unsigned long v;

	if (!s || !*s || *s == '-')
		return -EINVAL;
	errno = 0;
	v = strtoul(s, &end, 10);
	if (errno || *end || v < min || v > max)
		return -EINVAL;
	*out = v;
	return 0;
}

static uv_signal_t sig_term, sig_int;

static void on_stop(uv_signal_t *h, int signum)
{
	gl_agent *a = h->data;

	if (a->stopping)
		return;
	agent_log(a, 1, "signal %d: stopping", signum);
	a->stopping = true;
	if (a->listener) {
		gl_vsock_listen_stop(a->listener);
		a->listener = NULL;
	}
	agent_proxy_stop(a);
	agent_conn_close_all(a);
	uv_close((uv_handle_t *)&sig_term, NULL);
	uv_close((uv_handle_t *)&sig_int, NULL);
}

int main(int argc, char **argv)
{
	static const struct option longopts[] = {
		{"host-key", required_argument, NULL, 'k'},
		{"transport", required_argument, NULL, 't'},
		{"instance-id", required_argument, NULL, 'i'},
		{"devlxd-socket", required_argument, NULL, 'd'},
		{"port", required_argument, NULL, 'p'},
		{"max-conns", required_argument, NULL, 'm'},
		{"verbose", no_argument, NULL, 'v'},
		{"help", no_argument, NULL, 'h'},
		{"version", no_argument, NULL, 'V'},
		{NULL, 0, NULL, 0},
	};
	const char *key_path = NULL, *transport = "vsock", *devlxd = DEFAULT_DEVLXD;
	gl_vsock_addr at;
	gl_agent a;
	char err[256], abuf[160];
	unsigned long v;
	int opt, ret;

	memset(&a, 0, sizeof(a));
	a.port = GL_VSOCK_AGENT_PORT;
	a.max_conns = DEFAULT_MAX_CONNS;
	while ((opt = getopt_long(argc, argv, "vhV", longopts, NULL)) != -1) {
		switch (opt) {
		case 'k':
			key_path = optarg;
			break;
		case 't':
			transport = optarg;
			break;
		case 'i':
			if (strlen(optarg) > GL_AUTH_INSTANCE_MAX) {
				fprintf(stderr, "guestlink-agent: --instance-id: longer than %u bytes\n",
					GL_AUTH_INSTANCE_MAX);
				return 2;
			}
			strcpy(a.instance, optarg);
			break;
		case 'd':
			devlxd = optarg;
			break;
		case 'p':
			if (parse_uint(optarg, 1, UINT32_MAX - 1, &v) < 0) {
				fprintf(stderr, "guestlink-agent: --port: not a port number: %s\n", optarg);
				return 2;
			}
			a.port = (uint32_t)v;
			break;
		case 'm':
			if (parse_uint(optarg, 1, 1000000, &v) < 0) {
				fprintf(stderr, "guestlink-agent: --max-conns: expected 1..1000000: %s\n",
					optarg);
				return 2;
			}
			a.max_conns = (unsigned)v;
			break;
		case 'v':
			a.verbose++;
			break;
		case 'h':
			usage(stdout);
			return 0;
		case 'V':
			printf("guestlink-agent %s\n", GUESTLINK_VERSION);
			return 0;
		default:
			usage(stderr);
			return 2;
		}
	}
	if (optind < argc) {
		fprintf(stderr, "guestlink-agent: unexpected argument: %s\n", argv[optind]);
		usage(stderr);
		return 2;
	}
	if (!key_path) {
		fprintf(stderr, "guestlink-agent: --host-key FILE is required\n");
		usage(stderr);
		return 2;
	}
	if (gl_vsock_parse_transport(transport, &a.transport) < 0) {
		fprintf(stderr, "guestlink-agent: --transport: expected vsock or unix:DIR: %s\n",
			transport);
		return 2;
	}
	a.devlxd_path = strcmp(devlxd, "none") ? devlxd : NULL;

	if (gl_auth_init() < 0) {
		fprintf(stderr, "guestlink-agent: libsodium failed to initialise\n");
		return 1;
	}
	ret = gl_auth_load_pub(key_path, a.pk, err, sizeof(err));
	if (ret < 0) {
		fprintf(stderr, "guestlink-agent: --host-key %s: %s\n", key_path, err);
		return 1;
	}
	/* A host that went away must not kill us through a write. */
	signal(SIGPIPE, SIG_IGN);

	a.loop = uv_default_loop();
	uv_update_time(a.loop);
	a.start_ms = uv_now(a.loop);

	at = a.transport;
	at.cid = 0xffffffffu; /* VMADDR_CID_ANY */
	at.port = a.port;
	ret = gl_vsock_listen(a.loop, &at, 0600, agent_conn_accept, &a, &a.listener, err,
			      sizeof(err));
	if (ret < 0) {
		fprintf(stderr, "guestlink-agent: listen on %s: %s\n",
			gl_vsock_addr_str(&at, abuf, sizeof(abuf)), err);
		return 1;
	}
	if (a.devlxd_path) {
		ret = agent_proxy_start(&a, err, sizeof(err));
		if (ret < 0) {
			fprintf(stderr, "guestlink-agent: devlxd socket %s: %s\n", a.devlxd_path, err);
			gl_vsock_listen_stop(a.listener);
			uv_run(a.loop, UV_RUN_NOWAIT);
			return 1;
		}
	}
	uv_signal_init(a.loop, &sig_term);
	uv_signal_init(a.loop, &sig_int);
	sig_term.data = sig_int.data = &a;
	uv_signal_start(&sig_term, on_stop, SIGTERM);
	uv_signal_start(&sig_int, on_stop, SIGINT);

	agent_log(&a, 1, "listening on %s", gl_vsock_addr_str(&at, abuf, sizeof(abuf)));
	agent_announce_start(&a);

	uv_run(a.loop, UV_RUN_DEFAULT);
	ret = uv_loop_close(a.loop);
	if (ret < 0)
		agent_log(&a, 1, "loop not empty at exit: %s", uv_strerror(ret));
	return 0;
}
