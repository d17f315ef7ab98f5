/* devlxd-dev: the devlxd server alone, for development and tests before the
 * daemon wires it in. Opens (creating) the SQLite store in STATE_DIR, starts
 * the devlxd socket, and applies model changes read from stdin, one per
 * line, answering "ok" or "error: ..." once each is committed:
 *
 *   create NAME [container|virtual-machine]
 *   delete NAME
 *   set NAME KEY VALUE...        (VALUE: the rest of the line; \n \t \\ escapes)
 *   unset NAME KEY
 *   device NAME DEV JSON...
 *   undevice NAME DEV
 *   attr NAME ATTR [VALUE]       (init-pid, cgroup, state, ...; no VALUE: "")
 *   get NAME ATTR                (prints the attribute)
 *   quit
 *
 * usage: devlxd-dev STATE_DIR SOCKET [IMAGES_DIR] [--header-timeout MS]
 *        [--idle-timeout MS] [--max-conns N] [--max-conns-per-instance N]
 *        [--max-subs N] [--max-body N] [--max-header N] [--history N]
 *        [--max-sub-bytes N] */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <uv.h>

#include "bridge/devlxd.h"
#include "core/model.h"
#include "core/store.h"

static uv_loop_t loop;
static gl_model *model;
static gl_store *store;
static gl_devlxd *devlxd;
static uv_pipe_t in;
static uv_signal_t sigterm, sigint;
static char line[1 << 20];
static size_t line_len;
static bool quitting;

static void done(void *arg, int status)
{
	(void)arg;
	if (status)
		printf("error: %s\n", strerror(-status));
	else
		printf("ok\n");
	fflush(stdout);
}

static void unescape(char *s)
{
	char *w = s;

	for (char *r = s; *r; r++) {
		if (*r == '\\' && r[1]) {
			r++;
			*w++ = *r == 'n' ? '\n' : *r == 't' ? '\t' : *r == 'r' ? '\r' : *r;
		} else {
			*w++ = *r;
		}
	}
	*w = '\0';
}

static void quit(void)
{
	if (quitting)
		return;
	quitting = true;
	gl_devlxd_stop(devlxd);
	uv_close((uv_handle_t *)&in, NULL);
	uv_close((uv_handle_t *)&sigterm, NULL);
	uv_close((uv_handle_t *)&sigint, NULL);
}

static void command(char *l)
{
	char *save = NULL, *verb = strtok_r(l, " ", &save);
	char *name = verb ? strtok_r(NULL, " ", &save) : NULL;
	gl_op op = {0};
	int r;

	if (!verb)
		return;
	if (strcmp(verb, "quit") == 0) {
		printf("ok\n");
		fflush(stdout);
		quit();
		return;
	}
	if (!name) {
		printf("error: missing instance\n");
		fflush(stdout);
		return;
	}
	op.instance = name;
	op.ilen = strlen(name);
	op.origin = GL_ORIGIN_HOST;
	if (strcmp(verb, "create") == 0) {
		char *type = strtok_r(NULL, " ", &save);

		op.kind = GL_OP_CREATE;
		op.value = type ? type : "";
		op.vlen = strlen(op.value);
	} else if (strcmp(verb, "delete") == 0) {
		op.kind = GL_OP_DELETE;
	} else if (strcmp(verb, "set") == 0 || strcmp(verb, "device") == 0) {
		char *key = strtok_r(NULL, " ", &save);
		char *val = save ? save : "";

		if (!key) {
			printf("error: missing key\n");
			fflush(stdout);
			return;
		}
		unescape(val);
		op.kind = verb[0] == 's' ? GL_OP_CONFIG_SET : GL_OP_DEVICE_SET;
		op.key = key;
		op.klen = strlen(key);
		op.value = val;
		op.vlen = strlen(val);
	} else if (strcmp(verb, "unset") == 0 || strcmp(verb, "undevice") == 0) {
		char *key = strtok_r(NULL, " ", &save);

		if (!key) {
			printf("error: missing key\n");
			fflush(stdout);
			return;
		}
		op.kind = verb[0] == 'u' && verb[2] == 's' ? GL_OP_CONFIG_UNSET : GL_OP_DEVICE_UNSET;
		op.key = key;
		op.klen = strlen(key);
	} else if (strcmp(verb, "attr") == 0 || strcmp(verb, "get") == 0) {
		char *an = strtok_r(NULL, " ", &save);
		char *val = strtok_r(NULL, "", &save);
		gl_attr a = an ? gl_attr_from_name(an) : GL_ATTR_COUNT;

		if (a == GL_ATTR_COUNT) {
			printf("error: unknown attribute\n");
			fflush(stdout);
			return;
		}
		if (verb[0] == 'g') {
			gl_instance *i = gl_model_find(model, name);
			gl_buf b = GL_BUF_INIT;

			if (!i || gl_instance_attr(i, a, &b))
				printf("error: no such instance\n");
			else
				printf("%.*s\nok\n", (int)b.len, b.data ? b.data : "");
			gl_buf_free(&b);
			fflush(stdout);
			return;
		}
		op.kind = GL_OP_ATTR_SET;
		op.attr = a;
		op.value = val ? val : "";
		op.vlen = strlen(op.value);
	} else {
		printf("error: unknown command %s\n", verb);
		fflush(stdout);
		return;
	}
	r = gl_model_submit(model, &op, done, NULL);
	if (r) {
		printf("error: %s\n", strerror(-r));
		fflush(stdout);
	}
}

static void on_alloc(uv_handle_t *h, size_t hint, uv_buf_t *b)
{
	static char buf[65536];

	(void)h;
	(void)hint;
	b->base = buf;
	b->len = sizeof(buf);
}

static void on_stdin(uv_stream_t *s, ssize_t n, const uv_buf_t *b)
{
	(void)s;
	if (n < 0) {
		quit();
		return;
	}
	for (ssize_t k = 0; k < n; k++) {
		char c = b->base[k];

		if (c == '\n') {
			line[line_len] = '\0';
			command(line);
			line_len = 0;
		} else if (line_len + 1 < sizeof(line)) {
			line[line_len++] = c;
		}
	}
}

static void on_signal(uv_signal_t *h, int sig)
{
	(void)h;
	(void)sig;
	quit();
}

int main(int argc, char **argv)
{
	gl_devlxd_opts o;
	gl_limits lim;
	char err[512];
	int r;

	if (argc < 3) {
		fprintf(stderr,
			"usage: devlxd-dev STATE_DIR SOCKET [IMAGES_DIR] [--header-timeout MS] "
			"[--idle-timeout MS] [--max-conns N] [--max-conns-per-instance N] "
			"[--max-subs N] [--max-body N] [--max-header N] [--history N] "
			"[--max-sub-bytes N]\n");
		return 2;
	}
	signal(SIGPIPE, SIG_IGN);
	gl_devlxd_opts_default(&o);
	gl_limits_default(&lim);
	o.socket_path = argv[2];
	for (int k = 3; k < argc; k++) {
		const char *a = argv[k];
		unsigned long long v = k + 1 < argc ? strtoull(argv[k + 1], NULL, 10) : 0;

		if (a[0] != '-') {
			o.images_dir = a;
			continue;
		}
		if (k + 1 >= argc) {
			fprintf(stderr, "devlxd-dev: %s needs a value\n", a);
			return 2;
		}
		k++;
		if (!strcmp(a, "--header-timeout"))
			o.header_timeout_ms = v;
		else if (!strcmp(a, "--idle-timeout"))
			o.idle_timeout_ms = v;
		else if (!strcmp(a, "--max-conns"))
			o.max_conns = (unsigned)v;
		else if (!strcmp(a, "--max-conns-per-instance"))
			o.max_conns_per_instance = (unsigned)v;
		else if (!strcmp(a, "--max-subs"))
			o.max_subs_per_instance = (unsigned)v;
		else if (!strcmp(a, "--max-body"))
			o.max_body_bytes = v;
		else if (!strcmp(a, "--max-header"))
			o.max_header_bytes = v;
		else if (!strcmp(a, "--history"))
			lim.history = v;
		else if (!strcmp(a, "--max-sub-bytes"))
			lim.max_sub_bytes = v;
		else {
			fprintf(stderr, "devlxd-dev: unknown option %s\n", a);
			return 2;
		}
	}
	uv_loop_init(&loop);
	r = gl_store_sqlite_open(argv[1], &store, err, sizeof(err));
	if (r) {
		fprintf(stderr, "devlxd-dev: %s\n", err);
		return 1;
	}
	model = gl_model_open(&loop, store, &lim, err, sizeof(err));
	if (!model) {
		fprintf(stderr, "devlxd-dev: %s\n", err);
		return 1;
	}
	r = gl_devlxd_start(&loop, model, &o, &devlxd, err, sizeof(err));
	if (r) {
		fprintf(stderr, "devlxd-dev: %s\n", err);
		return 1;
	}
	uv_pipe_init(&loop, &in, 0);
	uv_pipe_open(&in, 0);
	uv_read_start((uv_stream_t *)&in, on_alloc, on_stdin);
	uv_signal_init(&loop, &sigterm);
	uv_signal_init(&loop, &sigint);
	uv_signal_start(&sigterm, on_signal, SIGTERM);
	uv_signal_start(&sigint, on_signal, SIGINT);
	printf("ready\n");
	fflush(stdout);
	uv_run(&loop, UV_RUN_DEFAULT);
	gl_model_close(model);
	uv_run(&loop, UV_RUN_DEFAULT);
	gl_store_close(store);
	r = uv_loop_close(&loop);
	if (r)
		fprintf(stderr, "devlxd-dev: loop not empty at exit: %s\n", uv_strerror(r));
	return r ? 1 : 0;
}
