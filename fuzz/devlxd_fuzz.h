/* The devlxd server of the fuzz harnesses fuzz_devlxd.c and fuzz_patch.c:
 * the real face (bridge/devlxd.c, images.c, peer.c, http.c, ws.c) on an
 * in-memory model over the fake store, with instance c1 bound to the
 * fuzzer's own process, so that every connection the harness makes is
 * "from inside c1" and reaches the endpoints (PATCH /1.0 included), as in
 * tests/unit/test_http.c. c1 carries the capture's config and devices, and
 * security.devlxd.images, with one public image in the images directory. */
#ifndef GUESTLINK_FUZZ_DEVLXD_FUZZ_H
#define GUESTLINK_FUZZ_DEVLXD_FUZZ_H

#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>
#include <uv.h>

#include "bridge/devlxd.h"
#include "core/model.h"
#include "fuzz/fuzz_util.h"
#include "tests/unit/fake_store.h"

#define DX_FP "05fb4e3cbc61661ad118936ddaeb0ebea0dd66aa8c4f6d1e01601294b2a37d32"

static uv_loop_t dx_loop;
static fake_store dx_store;
static gl_model *dx_model;
static gl_devlxd *dx_srv;
static char *dx_dir;
static char dx_sock[160], dx_images[160], dx_img[300], dx_pub[300];

static void dx_done(void *arg, int status)
{
	*(int *)arg = status;
}

static void dx_op(gl_op_kind kind, gl_attr attr, const char *key, const char *val)
{
	int st = 1;
	gl_op o = {.kind = kind,
		   .origin = GL_ORIGIN_HOST,
		   .attr = attr,
		   .instance = "c1",
		   .ilen = 2,
		   .key = key,
		   .klen = key ? strlen(key) : 0,
		   .value = val,
		   .vlen = val ? strlen(val) : 0};

	if (gl_model_submit(dx_model, &o, dx_done, &st))
		fz_die("model submit refused a setup op");
	while (st == 1)
		uv_run(&dx_loop, UV_RUN_ONCE);
	if (st)
		fz_die("a setup op failed");
}

static void dx_cleanup(void)
{
	unlink(dx_sock);
	unlink(dx_img);
	unlink(dx_pub);
	rmdir(dx_images);
	if (dx_dir)
		rmdir(dx_dir);
}

static void dx_write_file(const char *path, const char *text)
{
	int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);

	if (fd < 0 || write(fd, text, strlen(text)) != (ssize_t)strlen(text))
		fz_die("cannot write an image file");
	close(fd);
}

static void dx_init(void)
{
	static bool done;
	gl_devlxd_opts o;
	char err[256], pid[32];

	if (done)
		return;
	done = true;
	signal(SIGPIPE, SIG_IGN);
	dx_dir = fz_tmpdir("devlxd");
	snprintf(dx_sock, sizeof(dx_sock), "%s/sock", dx_dir);
	snprintf(dx_images, sizeof(dx_images), "%s/images", dx_dir);
	snprintf(dx_img, sizeof(dx_img), "%s/%s", dx_images, DX_FP);
	snprintf(dx_pub, sizeof(dx_pub), "%s/%s.public", dx_images, DX_FP);
	fz_on_exit(dx_cleanup);
	if (mkdir(dx_images, 0755))
		fz_die("mkdir images");
	dx_write_file(dx_img, "an image, 28 bytes of it...\n");
	dx_write_file(dx_pub, "");

	fake_store_reset(&dx_store);
	if (uv_loop_init(&dx_loop))
		fz_die("uv_loop_init");
	dx_model = gl_model_open(&dx_loop, &dx_store.base, NULL, err, sizeof(err));
	if (!dx_model)
		fz_die(err);
	dx_op(GL_OP_CREATE, 0, NULL, "container");
	dx_op(GL_OP_CONFIG_SET, 0, "user.foo", "bar");
	dx_op(GL_OP_CONFIG_SET, 0, "user.meta-data", "foo: meta\nbar: 2");
	dx_op(GL_OP_CONFIG_SET, 0, "cloud-init.user-data", "#cloud-config\npackages:\n  - hello");
	dx_op(GL_OP_CONFIG_SET, 0, "volatile.cloud-init.instance-id",
	      "856fc818-f65d-440f-b283-2b893183ee4d");
	dx_op(GL_OP_CONFIG_SET, 0, "security.devlxd.images", "true");
	dx_op(GL_OP_DEVICE_SET, 0, "root", "{\"path\":\"/\",\"pool\":\"default\",\"type\":\"disk\"}");
	dx_op(GL_OP_DEVICE_SET, 0, "eth0",
	      "{\"name\":\"eth0\",\"network\":\"lxdbr0\",\"type\":\"nic\"}");
	snprintf(pid, sizeof(pid), "%d", (int)getpid());
	dx_op(GL_OP_ATTR_SET, GL_ATTR_INIT_PID, NULL, pid);

	gl_devlxd_opts_default(&o);
	o.socket_path = dx_sock;
	o.images_dir = dx_images;
	/* small limits, so that inputs of a few KiB reach the 431 and 413 paths */
	o.max_header_bytes = 8192;
	o.max_body_bytes = 4096;
	/* nothing depends on time: a request either completes or the client's
	 * half-close ends it */
	o.header_timeout_ms = 0;
	o.idle_timeout_ms = 0;
	if (gl_devlxd_start(&dx_loop, dx_model, &o, &dx_srv, err, sizeof(err)))
		fz_die(err);
}

static void dx_count_pipe(uv_handle_t *h, void *arg)
{
	/* closing ones too: their memory goes only after the close callback */
	if (h->type == UV_NAMED_PIPE)
		(*(int *)arg)++;
}

/* Nothing of a connection is left: only the listener's pipe remains and no
 * request (model commit, file I/O) is in flight. */
static bool dx_quiet(void)
{
	int pipes = 0;

	uv_walk(&dx_loop, dx_count_pipe, &pipes);
	return pipes <= 1 && dx_loop.active_reqs.count == 0;
}

/* A PATCH that set the state leaves c1 "Ready" or "Started" for the next
 * input; unbinding and binding again forgets it, so that each input starts
 * from the same c1 (event sequence numbers still grow). */
static void dx_reset(void)
{
	gl_instance *i = gl_model_find(dx_model, "c1");
	char pid[32];

	if (!i || !gl_instance_guest_state(i)[0])
		return;
	snprintf(pid, sizeof(pid), "%d", (int)getpid());
	dx_op(GL_OP_ATTR_SET, GL_ATTR_INIT_PID, NULL, "");
	dx_op(GL_OP_ATTR_SET, GL_ATTR_INIT_PID, NULL, pid);
	i = gl_model_find(dx_model, "c1");
	if (!i || gl_instance_guest_state(i)[0])
		fz_die("c1's guest state survived a rebind");
}

/* One connection from c1 playing data[0..n) (see fz_drive); the first
 * `cap` bytes of the answer in out (when not NULL), its length in *got. */
static void dx_play(const uint8_t *data, size_t n, unsigned split, uint32_t seed, char *out,
		    size_t cap, size_t *got)
{
	struct sockaddr_un sa = {.sun_family = AF_UNIX};
	fz_drive_opts o = {.split = split, .seed = seed, .out = out, .out_cap = cap, .out_len = got};
	int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);

	if (fd < 0)
		fz_die("socket");
	strcpy(sa.sun_path, dx_sock);
	if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)))
		fz_die("connect");
	fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
	fz_drive(&dx_loop, fd, data, n, &o);
	while (!dx_quiet()) {
		uv_run(&dx_loop, UV_RUN_NOWAIT);
		if (!dx_quiet())
			fz_wait(&dx_loop, -1, 0, 10);
	}
	dx_reset();
}

#endif
