/* The VM side of the daemon without a VM: devlxd connections adopted from a
 * transport (bridge/devlxd.c, bridge/http.c), the hybrid listener of a VM
 * kept in step with the model, and relay links with nothing to reach
 * (bridge/vm.c). Every case closes everything and checks that the loop
 * closes. */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>
#include <uv.h>

#include "bridge/devlxd.h"
#include "bridge/vm.h"
#include "core/model.h"
#include "tests/unit/fake_store.h"
#include "tests/unit/model_ops.h"
#include "tests/unit/unit.h"

static fake_store fstore;
static gl_devlxd *dl;
static char *tmp;

static void create(const char *name, const char *type)
{
	gl_op o = {.kind = GL_OP_CREATE, .instance = name, .ilen = strlen(name), .value = type,
		   .vlen = strlen(type)};

	ck_assert_int_eq(submit(&o), 0);
}

static void remove_instance(const char *name)
{
	gl_op o = {.kind = GL_OP_DELETE, .instance = name, .ilen = strlen(name)};

	ck_assert_int_eq(submit(&o), 0);
}

static void set_config(const char *name, const char *key, const char *v)
{
	gl_op o = {.kind = GL_OP_CONFIG_SET, .origin = GL_ORIGIN_HOST, .instance = name,
		   .ilen = strlen(name), .key = key, .klen = strlen(key), .value = v,
		   .vlen = strlen(v)};

	ck_assert_int_eq(submit(&o), 0);
}

static void set_attr(const char *name, gl_attr a, const char *v)
{
	gl_op o = {.kind = GL_OP_ATTR_SET, .origin = GL_ORIGIN_HOST, .attr = a, .instance = name,
		   .ilen = strlen(name), .value = v, .vlen = strlen(v)};

	ck_assert_int_eq(submit(&o), 0);
}

static uint64_t uid_of(const char *name)
{
	gl_instance *i = gl_model_find(model, name);

	ck_assert_ptr_nonnull(i);
	return gl_instance_uid(i);
}

static void pump(int ms)
{
	struct timespec t0, t;

	clock_gettime(CLOCK_MONOTONIC, &t0);
	do {
		uv_run(&loop, UV_RUN_NOWAIT);
		usleep(500);
		clock_gettime(CLOCK_MONOTONIC, &t);
	} while ((t.tv_sec - t0.tv_sec) * 1000 + (t.tv_nsec - t0.tv_nsec) / 1000000 < ms);
}

/* Send req on fd, then read until EOF while the loop runs (the requests
 * say Connection: close). Returns the bytes read (static buffer). */
static const char *exchange(int fd, const char *req)
{
	static char out[8192];
	size_t n = 0;
	struct timespec t0, t;

	ck_assert_int_eq(write(fd, req, strlen(req)), (ssize_t)strlen(req));
	clock_gettime(CLOCK_MONOTONIC, &t0);
	for (;;) {
		struct pollfd p = {.fd = fd, .events = POLLIN};
		ssize_t r;

		uv_run(&loop, UV_RUN_NOWAIT);
		if (poll(&p, 1, 1) == 1) {
			r = read(fd, out + n, sizeof(out) - 1 - n);
			if (r <= 0)
				break;
			n += (size_t)r;
		}
		clock_gettime(CLOCK_MONOTONIC, &t);
		ck_assert_msg(t.tv_sec - t0.tv_sec < 5, "no EOF within 5 s; got %zu bytes", n);
	}
	out[n] = '\0';
	return out;
}

/* The body of a raw response. */
static const char *body_of(const char *resp)
{
	const char *b = strstr(resp, "\r\n\r\n");

	ck_assert_ptr_nonnull(b);
	return b + 4;
}

/* True once the peer closed fd (EOF), while the loop runs. */
static bool closed_within(int fd, int ms)
{
	for (int k = 0; k < ms; k++) {
		struct pollfd p = {.fd = fd, .events = POLLIN};
		char c;

		uv_run(&loop, UV_RUN_NOWAIT);
		if (poll(&p, 1, 1) == 1)
			return read(fd, &c, 1) == 0;
	}
	return false;
}

static void setup(void)
{
	gl_devlxd_opts o;
	char err[256];

	tmp = unit_tmpdir();
	fake_store_reset(&fstore);
	ck_assert_int_eq(uv_loop_init(&loop), 0);
	model = gl_model_open(&loop, &fstore.base, NULL, err, sizeof(err));
	ck_assert_ptr_nonnull(model);
	gl_devlxd_opts_default(&o);
	o.socket_path = NULL; /* no host socket: adopted connections only */
	o.images_dir = tmp;
	ck_assert_int_eq(gl_devlxd_start(&loop, model, &o, &dl, err, sizeof(err)), 0);
}

static void teardown(void)
{
	gl_devlxd_stop(dl);
	gl_model_close(model);
	uv_run(&loop, UV_RUN_DEFAULT);
	ck_assert_int_eq(uv_loop_close(&loop), 0);
	unit_rmrf(tmp);
	free(tmp);
}

static int adopt_as(const char *name, uid_t guest_uid)
{
	int sv[2];

	ck_assert_int_eq(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
	ck_assert_int_eq(gl_devlxd_adopt(dl, sv[0], uid_of(name), guest_uid), 0);
	return sv[1];
}

static int adopt(const char *name)
{
	return adopt_as(name, 0);
}

#define GET(path) "GET " path " HTTP/1.1\r\nHost: lxd\r\nConnection: close\r\n\r\n"

START_TEST(adopted_connections_are_their_instance)
{
	int a, b, k;
	const char *r;

	setup();
	create("vm1", "virtual-machine");
	create("vm2", "virtual-machine");
	set_config("vm1", "user.foo", "one");
	set_config("vm2", "user.foo", "two");
	set_config("vm1", "user.only1", "x");

	a = adopt("vm1");
	r = exchange(a, GET("/1.0/config/user.foo"));
	ck_assert_msg(!strncmp(r, "HTTP/1.1 200 OK\r\n", 17), "%s", r);
	ck_assert_str_eq(body_of(r), "one");
	close(a);

	b = adopt("vm2");
	r = exchange(b, GET("/1.0/config"));
	ck_assert_str_eq(body_of(r), "[\"/1.0/config/user.foo\"]\n");
	close(b);

	b = adopt("vm2");
	r = exchange(b, GET("/1.0/config/user.only1"));
	ck_assert_msg(!strncmp(r, "HTTP/1.1 404 Not Found\r\n", 24), "%s", r);
	close(b);

	/* a guest uid other than 0: LXD's 401 for non-root, on every path */
	a = adopt_as("vm1", 1000);
	r = exchange(a, GET("/1.0/config/user.foo"));
	ck_assert_msg(!strncmp(r, "HTTP/1.1 401 Unauthorized\r\n", 27), "%s", r);
	ck_assert_str_eq(body_of(r), "Access denied for non-root user\n");
	close(a);

	a = adopt("vm1");
	r = exchange(a, GET("/1.0"));
	ck_assert_str_eq(body_of(r), "{\"state\":\"\",\"api_version\":\"1.0\","
				     "\"instance_type\":\"virtual-machine\",\"location\":\"none\"}\n");
	close(a);

	/* dropping an instance closes its adopted connections, not others' */
	a = adopt("vm1");
	b = adopt("vm2");
	pump(20);
	gl_devlxd_drop_instance(dl, uid_of("vm1"));
	ck_assert(closed_within(a, 2000));
	r = exchange(b, GET("/1.0/config/user.foo"));
	ck_assert_str_eq(body_of(r), "two");
	close(a);
	close(b);

	/* a removed instance: its connections get LXD's "not in container" */
	a = adopt("vm2");
	remove_instance("vm2");
	r = exchange(a, GET("/1.0"));
	ck_assert_msg(!strncmp(r, "HTTP/1.1 500 ", 13), "%s", r);
	close(a);
	for (k = 0; k < 3; k++)
		pump(5);
	teardown();
}
END_TEST

static bool is_sock(const char *p)
{
	struct stat st;

	return lstat(p, &st) == 0 && S_ISSOCK(st.st_mode);
}

static const char *agent_text(const char *name)
{
	static gl_buf b;
	gl_instance *i = gl_model_find(model, name);

	gl_buf_free(&b);
	ck_assert_ptr_nonnull(i);
	ck_assert_int_eq(gl_instance_attr(i, GL_ATTR_AGENT, &b), 0);
	gl_buf_addc(&b, '\0');
	return b.data;
}

static gl_vm *vm_start_auth(unsigned max_conns, bool no_auth)
{
	gl_vm_opts o;
	gl_vm *vm;
	char err[256];

	gl_vm_opts_default(&o);
	o.link_deadline_ms = 200;
	o.max_agent_conns = max_conns;
	o.devlxd_no_auth = no_auth;
	memset(o.sk, 7, sizeof(o.sk));
	ck_assert_int_eq(gl_vm_start(&loop, model, dl, &o, &vm, err, sizeof(err)), 0);
	return vm;
}

/* These tests speak HTTP on the transport: no preamble. */
static gl_vm *vm_start(unsigned max_conns)
{
	return vm_start_auth(max_conns, true);
}

static int dial_unix(const char *path)
{
	struct sockaddr_un sa = {.sun_family = AF_UNIX};
	int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);

	snprintf(sa.sun_path, sizeof(sa.sun_path), "%s", path);
	ck_assert_int_eq(connect(fd, (struct sockaddr *)&sa, sizeof(sa)), 0);
	return fd;
}

START_TEST(transport_wants_the_preamble)
{
	char uds[256], lst[300];
	const char *r;
	int fd, slow, partial;
	gl_vm *vm;

	setup();
	snprintf(uds, sizeof(uds), "%s/vm1.sock", tmp);
	snprintf(lst, sizeof(lst), "%s_7362", uds);
	create("vm1", "virtual-machine");
	set_config("vm1", "user.foo", "bar");
	set_attr("vm1", GL_ATTR_VSOCK_UDS, uds);
	vm = vm_start_auth(4, false);
	ck_assert(is_sock(lst));

	/* raw HTTP, "-", a token that is not the VM's: closed, no byte */
	fd = dial_unix(lst);
	ck_assert_str_eq(exchange(fd, GET("/1.0/config/user.foo")), "");
	close(fd);
	fd = dial_unix(lst);
	ck_assert_str_eq(exchange(fd, "GLDEVLXD1 - 0\n" GET("/1.0/config/user.foo")), "");
	close(fd);
	fd = dial_unix(lst);
	r = exchange(fd, "GLDEVLXD1 0000000000000000000000000000000000000000000000000000000000000000"
		     " 0\n" GET("/1.0/config/user.foo"));
	ck_assert_str_eq(r, "");
	close(fd);

	/* a silent client and a line that never ends do not hold the loop;
	 * the VM side stops with them still pending (ASan: nothing leaks) */
	slow = dial_unix(lst);
	partial = dial_unix(lst);
	ck_assert_int_eq(write(partial, "GLDEVLXD1 ", 10), 10);
	pump(50);
	fd = dial_unix(lst);
	ck_assert_str_eq(exchange(fd, GET("/1.0")), "");
	close(fd);
	gl_vm_stop(vm);
	ck_assert(closed_within(slow, 2000));
	ck_assert(closed_within(partial, 2000));
	close(slow);
	close(partial);
	teardown();
}
END_TEST

START_TEST(hybrid_listener_follows_the_model)
{
	char uds[256], lst[300], uds2[256], lst2[300];
	struct sockaddr_un sa = {.sun_family = AF_UNIX};
	gl_vm_agent_info info;
	gl_vm *vm;
	int fd;
	const char *r;

	setup();
	snprintf(uds, sizeof(uds), "%s/vm1.sock", tmp);
	snprintf(lst, sizeof(lst), "%s_7362", uds);
	snprintf(uds2, sizeof(uds2), "%s/vm1b.sock", tmp);
	snprintf(lst2, sizeof(lst2), "%s_7362", uds2);
	create("vm1", "virtual-machine");
	set_config("vm1", "user.foo", "bar");
	/* bound before the VM side starts: picked up at start */
	set_attr("vm1", GL_ATTR_VSOCK_UDS, uds);
	vm = vm_start(4);
	ck_assert(is_sock(lst));
	ck_assert_str_eq(agent_text("vm1"), "status: offline");
	ck_assert_int_eq(gl_vm_agent_info_get(vm, uid_of("vm1"), &info), 0);
	ck_assert(!info.online);
	ck_assert_str_eq(info.version, "");

	fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	strcpy(sa.sun_path, lst);
	ck_assert_int_eq(connect(fd, (struct sockaddr *)&sa, sizeof(sa)), 0);
	r = exchange(fd, GET("/1.0/config/user.foo"));
	ck_assert_str_eq(body_of(r), "bar");
	close(fd);

	/* a connection open when the transport moves is closed */
	fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	ck_assert_int_eq(connect(fd, (struct sockaddr *)&sa, sizeof(sa)), 0);
	pump(20);
	set_attr("vm1", GL_ATTR_VSOCK_UDS, uds2);
	ck_assert(!is_sock(lst));
	ck_assert(is_sock(lst2));
	ck_assert(closed_within(fd, 2000));
	close(fd);

	set_attr("vm1", GL_ATTR_VSOCK_UDS, "");
	ck_assert(!is_sock(lst2));
	ck_assert_int_eq(gl_vm_agent_info_get(vm, uid_of("vm1"), &info), -EINVAL);

	/* a container never gets one */
	create("c1", "container");
	ck_assert_int_eq(gl_vm_agent_info_get(vm, uid_of("c1"), &info), -EINVAL);

	set_attr("vm1", GL_ATTR_VSOCK_UDS, uds);
	ck_assert(is_sock(lst));
	remove_instance("vm1");
	ck_assert(!is_sock(lst));

	gl_vm_stop(vm);
	teardown();
}
END_TEST

struct lres {
	int calls, status;
	gl_vm_link *l;
};

static void link_cb(void *arg, int status, gl_fconn *c)
{
	struct lres *x = arg;

	x->calls++;
	x->status = status;
	ck_assert_ptr_null(c);
	gl_vm_link_release(x->l);
	x->l = NULL;
}

START_TEST(links_fail_cleanly)
{
	struct lres a = {0}, b = {0}, c = {0};
	char uds[256];
	gl_vm *vm;
	int k;

	setup();
	snprintf(uds, sizeof(uds), "%s/vm1.sock", tmp);
	create("vm1", "virtual-machine");
	create("vm2", "virtual-machine");
	create("c1", "container");
	set_attr("vm1", GL_ATTR_VSOCK_UDS, uds);
	vm = vm_start(1);

	ck_assert_int_eq(gl_vm_link_open(vm, uid_of("c1"), link_cb, &a, &a.l), -EINVAL);
	ck_assert_int_eq(gl_vm_link_open(vm, uid_of("vm2"), link_cb, &a, &a.l), -EINVAL);

	/* nobody at the VMM socket: unreachable within the deadline, never
	 * from inside the call */
	ck_assert_int_eq(gl_vm_link_open(vm, uid_of("vm1"), link_cb, &a, &a.l), 0);
	ck_assert_int_eq(a.calls, 0);
	for (k = 0; k < 2000 && !a.calls; k++)
		pump(1);
	ck_assert_int_eq(a.calls, 1);
	ck_assert_int_eq(a.status, -EHOSTUNREACH);

	/* one dialing, one in line behind it (cap 1): the VM goes, both hear
	 * ENOENT */
	ck_assert_int_eq(gl_vm_link_open(vm, uid_of("vm1"), link_cb, &b, &b.l), 0);
	ck_assert_int_eq(gl_vm_link_open(vm, uid_of("vm1"), link_cb, &c, &c.l), 0);
	ck_assert_int_eq(b.calls + c.calls, 0);
	remove_instance("vm1"); /* (runs the loop until the removal is applied) */
	pump(20);
	ck_assert_int_eq(b.calls, 1);
	ck_assert_int_eq(b.status, -ENOENT);
	ck_assert_int_eq(c.calls, 1);
	ck_assert_int_eq(c.status, -ENOENT);

	/* released before any outcome: the callback never runs */
	create("vm3", "virtual-machine");
	set_attr("vm3", GL_ATTR_VSOCK_UDS, uds);
	a.calls = 0;
	ck_assert_int_eq(gl_vm_link_open(vm, uid_of("vm3"), link_cb, &a, &a.l), 0);
	gl_vm_link_release(a.l);
	a.l = NULL;
	pump(400);
	ck_assert_int_eq(a.calls, 0);

	gl_vm_stop(vm);
	teardown();
}
END_TEST

static Suite *vm_suite(void)
{
	Suite *s = suite_create("vm");
	TCase *t = tcase_create("vm");

	tcase_add_test(t, adopted_connections_are_their_instance);
	tcase_add_test(t, hybrid_listener_follows_the_model);
	tcase_add_test(t, transport_wants_the_preamble);
	tcase_add_test(t, links_fail_cleanly);
	suite_add_tcase(s, t);
	return s;
}

UNIT_MAIN(vm_suite)
