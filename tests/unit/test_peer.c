/* Caller identity (bridge/peer.c) with real processes in real pid and user
 * namespaces and cgroups: the index maps a connecting process to its
 * instance, nested namespaces and cgroups included; a host process, a dead
 * process and an ambiguous namespace map to nothing; a bound init that
 * exits is released (the instance becomes Stopped). Needs root and
 * unshare(2); cases that cannot run say so and pass vacuously. */
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <uv.h>

#include "bridge/peer.h"
#include "core/model.h"
#include "tests/unit/fake_store.h"
#include "tests/unit/model_ops.h"
#include "tests/unit/unit.h"

static fake_store fstore;
static char *tmp;
static char sock_path[256];
static int lfd = -1;

static void create(const char *name)
{
	gl_op o = {.kind = GL_OP_CREATE, .instance = name, .ilen = strlen(name), .value = "", .vlen = 0};

	ck_assert_int_eq(submit(&o), 0);
}

static int set_attr(const char *name, gl_attr a, const char *v)
{
	gl_op o = {.kind = GL_OP_ATTR_SET,
		   .origin = GL_ORIGIN_HOST,
		   .attr = a,
		   .instance = name,
		   .ilen = strlen(name),
		   .value = v,
		   .vlen = strlen(v)};

	return submit(&o);
}

static void bind_pid(const char *name, pid_t pid)
{
	char b[32];

	snprintf(b, sizeof(b), "%d", (int)pid);
	ck_assert_int_eq(set_attr(name, GL_ATTR_INIT_PID, b), 0);
}

static char *attr_of(const char *name, gl_attr a)
{
	static gl_buf b;
	gl_instance *i = gl_model_find(model, name);

	gl_buf_free(&b);
	ck_assert_ptr_nonnull(i);
	ck_assert_int_eq(gl_instance_attr(i, a, &b), 0);
	gl_buf_addc(&b, '\0');
	return b.data;
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

static bool can_unshare(void)
{
	pid_t p;
	int st;

	if (geteuid() != 0)
		return false;
	p = fork();
	if (p == 0)
		_exit(unshare(CLONE_NEWPID) == 0 ? 0 : 1);
	waitpid(p, &st, 0);
	return WIFEXITED(st) && WEXITSTATUS(st) == 0;
}

static void setup(void)
{
	struct sockaddr_un a = {.sun_family = AF_UNIX};
	char err[256];

	tmp = unit_tmpdir();
	snprintf(sock_path, sizeof(sock_path), "%s/sock", tmp);
	lfd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	strcpy(a.sun_path, sock_path);
	ck_assert_int_eq(bind(lfd, (struct sockaddr *)&a, sizeof(a)), 0);
	ck_assert_int_eq(listen(lfd, 64), 0);
	fstore.base.ops = &fake_ops;
	ck_assert_int_eq(uv_loop_init(&loop), 0);
	model = gl_model_open(&loop, &fstore.base, NULL, err, sizeof(err));
	ck_assert_ptr_nonnull(model);
}

static void teardown(gl_peer *p)
{
	gl_peer_free(p);
	gl_model_close(model);
	uv_run(&loop, UV_RUN_DEFAULT);
	ck_assert_int_eq(uv_loop_close(&loop), 0);
	close(lfd);
	unit_rmrf(tmp);
	free(tmp);
}

static void connect_and_wait(void)
{
	struct sockaddr_un a = {.sun_family = AF_UNIX};
	int fd = socket(AF_UNIX, SOCK_STREAM, 0);

	strcpy(a.sun_path, sock_path);
	if (connect(fd, (struct sockaddr *)&a, sizeof(a)) < 0)
		_exit(2);
	pause();
	_exit(0);
}

/* A "container": a new pid namespace whose init (pid 1) connects, forks a
 * sibling that connects, and a process in a further nested pid namespace
 * that connects. Returns the init's host pid; *outer is the process to
 * reap. */
static pid_t spawn_container(pid_t *outer, bool userns)
{
	int pfd[2], go[2];
	pid_t a, init = 0;

	ck_assert_int_eq(pipe(pfd), 0);
	ck_assert_int_eq(pipe(go), 0);
	a = fork();
	ck_assert_int_ge(a, 0);
	if (a == 0) {
		pid_t b;
		char c;

		close(pfd[0]);
		close(go[1]);
		if (userns) {
			if (unshare(CLONE_NEWUSER) < 0)
				_exit(10);
			/* the parent writes our maps, then lets us go on */
			if (write(pfd[1], "u", 1) != 1 || read(go[0], &c, 1) != 1)
				_exit(11);
			if (setresgid(0, 0, 0) || setresuid(0, 0, 0))
				_exit(12);
		}
		if (unshare(CLONE_NEWPID) < 0)
			_exit(13);
		b = fork();
		if (b == 0) {
			struct sockaddr_un sa = {.sun_family = AF_UNIX};
			int fd = socket(AF_UNIX, SOCK_STREAM, 0);

			strcpy(sa.sun_path, sock_path);
			if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0)
				_exit(2);
			if (fork() == 0)
				connect_and_wait();
			if (fork() == 0) {
				if (unshare(CLONE_NEWPID) < 0)
					_exit(3);
				if (fork() == 0)
					connect_and_wait();
				pause();
				_exit(0);
			}
			for (;;)
				pause();
		}
		if (write(pfd[1], &b, sizeof(b)) != sizeof(b))
			_exit(14);
		waitpid(b, NULL, 0);
		_exit(0);
	}
	close(pfd[1]);
	close(go[0]);
	if (userns) {
		char c, path[64];
		int fd;

		ck_assert_int_eq(read(pfd[0], &c, 1), 1);
		snprintf(path, sizeof(path), "/proc/%d/uid_map", (int)a);
		fd = open(path, O_WRONLY);
		ck_assert_int_ge(fd, 0);
		ck_assert_int_gt(write(fd, "0 100000 65536", 14), 0);
		close(fd);
		snprintf(path, sizeof(path), "/proc/%d/setgroups", (int)a);
		fd = open(path, O_WRONLY);
		if (fd >= 0) {
			ck_assert_int_gt(write(fd, "deny", 4), 0);
			close(fd);
		}
		snprintf(path, sizeof(path), "/proc/%d/gid_map", (int)a);
		fd = open(path, O_WRONLY);
		ck_assert_int_ge(fd, 0);
		ck_assert_int_gt(write(fd, "0 100000 65536", 14), 0);
		close(fd);
		ck_assert_int_eq(write(go[1], "g", 1), 1);
	}
	ck_assert_int_eq(read(pfd[0], &init, sizeof(init)), (ssize_t)sizeof(init));
	close(pfd[0]);
	close(go[1]);
	*outer = a;
	return init;
}

static int accept_one(gl_peer_cred *c)
{
	int fd = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);

	ck_assert_int_ge(fd, 0);
	ck_assert_int_eq(gl_peer_cred_get(fd, c), 0);
	return fd;
}

static void reap(pid_t init, pid_t outer)
{
	kill(init, SIGKILL);
	waitpid(outer, NULL, 0);
}

START_TEST(resolve_namespaces)
{
	gl_peer *p;
	char err[256];
	pid_t outer1, outer2, init1, init2;
	gl_peer_cred c[6];
	int fds[6];
	uint64_t uid;
	size_t nns, ncg, nw;

	if (!can_unshare()) {
		fprintf(stderr, "resolve_namespaces: skipped: needs root and pid namespaces\n");
		return;
	}
	setup();
	create("c1");
	create("c2");
	p = gl_peer_new(&loop, model, err, sizeof(err));
	ck_assert_ptr_nonnull(p);
	init1 = spawn_container(&outer1, false);
	for (int k = 0; k < 3; k++)
		fds[k] = accept_one(&c[k]);
	init2 = spawn_container(&outer2, false);
	for (int k = 3; k < 6; k++)
		fds[k] = accept_one(&c[k]);
	/* not bound yet: nobody */
	for (int k = 0; k < 6; k++)
		ck_assert_int_eq(gl_peer_resolve(p, &c[k], &uid), -ESRCH);
	bind_pid("c1", init1);
	bind_pid("c2", init2);
	ck_assert_str_eq(attr_of("c1", GL_ATTR_STATE), "Started");
	gl_peer_stats(p, &nns, &ncg, &nw);
	ck_assert_uint_eq(nns, 2);
	ck_assert_uint_eq(nw, 2);
	/* init, its sibling, and the process in a nested namespace */
	for (int k = 0; k < 6; k++) {
		ck_assert_int_eq(gl_peer_resolve(p, &c[k], &uid), 0);
		ck_assert_uint_eq(uid, gl_instance_uid(gl_model_find(model, k < 3 ? "c1" : "c2")));
	}
	ck_assert_ptr_eq(gl_peer_instance(p, uid), gl_model_find(model, "c2"));
	ck_assert_uint_eq(gl_peer_root_uid(p, uid), 0);
	/* a host process is no instance */
	{
		struct sockaddr_un a = {.sun_family = AF_UNIX};
		int s = socket(AF_UNIX, SOCK_STREAM, 0);
		gl_peer_cred me;
		int fd;

		strcpy(a.sun_path, sock_path);
		ck_assert_int_eq(connect(s, (struct sockaddr *)&a, sizeof(a)), 0);
		fd = accept_one(&me);
		ck_assert_int_eq(me.pid, getpid());
		ck_assert_int_ge(me.pidfd, 0);
		ck_assert_int_eq(gl_peer_resolve(p, &me, &uid), -ESRCH);
		gl_peer_cred_clear(&me);
		close(fd);
		close(s);
	}
	/* c1's init exits: everything in its namespace dies, the binding is
	 * released and c1 is Stopped; its callers resolve to nothing */
	reap(init1, outer1);
	pump(300);
	ck_assert_str_eq(attr_of("c1", GL_ATTR_INIT_PID), "");
	ck_assert_str_eq(attr_of("c1", GL_ATTR_STATE), "Stopped");
	gl_peer_stats(p, &nns, &ncg, &nw);
	ck_assert_uint_eq(nns, 1);
	ck_assert_uint_eq(nw, 1);
	for (int k = 0; k < 3; k++)
		ck_assert_int_eq(gl_peer_resolve(p, &c[k], &uid), -ESRCH);
	ck_assert_int_eq(gl_peer_resolve(p, &c[3], &uid), 0);
	/* two instances claiming one namespace: neither gets it */
	bind_pid("c1", init2);
	ck_assert_int_eq(gl_peer_resolve(p, &c[3], &uid), -ESRCH);
	ck_assert_int_eq(set_attr("c1", GL_ATTR_INIT_PID, ""), 0);
	ck_assert_int_eq(gl_peer_resolve(p, &c[3], &uid), 0);
	ck_assert_uint_eq(uid, gl_instance_uid(gl_model_find(model, "c2")));
	/* removing the instance forgets it */
	{
		gl_op o = {.kind = GL_OP_DELETE, .instance = "c2", .ilen = 2};

		ck_assert_int_eq(submit(&o), 0);
	}
	ck_assert_int_eq(gl_peer_resolve(p, &c[3], &uid), -ESRCH);
	ck_assert_ptr_null(gl_peer_instance(p, uid));
	gl_peer_stats(p, &nns, &ncg, &nw);
	ck_assert_uint_eq(nns, 0);
	ck_assert_uint_eq(nw, 0);
	reap(init2, outer2);
	for (int k = 0; k < 6; k++) {
		gl_peer_cred_clear(&c[k]);
		close(fds[k]);
	}
	teardown(p);
}
END_TEST

START_TEST(root_uid_from_userns)
{
	gl_peer *p;
	char err[256];
	pid_t outer, init;
	gl_peer_cred c;
	uint64_t uid;
	int fd;

	if (!can_unshare()) {
		fprintf(stderr, "root_uid_from_userns: skipped: needs root and namespaces\n");
		return;
	}
	setup();
	/* uid 100000 must reach the socket */
	chmod(tmp, 0777);
	chmod(sock_path, 0666);
	create("c1");
	p = gl_peer_new(&loop, model, err, sizeof(err));
	ck_assert_ptr_nonnull(p);
	init = spawn_container(&outer, true);
	fd = accept_one(&c);
	ck_assert_uint_eq(c.uid, 100000);
	bind_pid("c1", init);
	ck_assert_int_eq(gl_peer_resolve(p, &c, &uid), 0);
	ck_assert_uint_eq(gl_peer_root_uid(p, uid), 100000);
	reap(init, outer);
	gl_peer_cred_clear(&c);
	close(fd);
	pump(100);
	teardown(p);
}
END_TEST

START_TEST(release_at_startup)
{
	gl_peer *p;
	char err[256];
	pid_t dead;

	if (geteuid() != 0) {
		fprintf(stderr, "release_at_startup: skipped: needs root\n");
		return;
	}
	setup();
	create("c1");
	create("c2");
	dead = fork();
	if (dead == 0)
		_exit(0);
	waitpid(dead, NULL, 0);
	/* bound while the index was not running: one pid is gone, one lives */
	bind_pid("c1", dead);
	bind_pid("c2", getpid());
	p = gl_peer_new(&loop, model, err, sizeof(err));
	ck_assert_ptr_nonnull(p);
	pump(100);
	ck_assert_str_eq(attr_of("c1", GL_ATTR_INIT_PID), "");
	ck_assert_str_eq(attr_of("c1", GL_ATTR_STATE), "Stopped");
	ck_assert_str_ne(attr_of("c2", GL_ATTR_INIT_PID), "");
	/* a pid bound at run time that does not exist is released too */
	bind_pid("c1", dead);
	pump(100);
	ck_assert_str_eq(attr_of("c1", GL_ATTR_INIT_PID), "");
	teardown(p);
}
END_TEST

/* Where the cgroup v2 hierarchy is mounted (/sys/fs/cgroup, or
 * /sys/fs/cgroup/unified on a hybrid host), or NULL. */
static const char *cgroup2_mount(void)
{
	static char mnt[256];
	char dev[256], type[64];
	FILE *f = fopen("/proc/mounts", "re");

	if (!f)
		return NULL;
	while (fscanf(f, "%255s %255s %63s %*[^\n]", dev, mnt, type) == 3) {
		if (strcmp(type, "cgroup2") == 0) {
			fclose(f);
			return mnt;
		}
	}
	fclose(f);
	return NULL;
}

START_TEST(resolve_cgroups)
{
	const char *mnt = cgroup2_mount();
	gl_peer *p;
	char err[256], base[128], sub[256], path[300], rel[64], relsub[96];
	pid_t g, h;
	gl_peer_cred c1, c2;
	int f1, f2, fd;
	uint64_t uid;
	size_t nns, ncg, nw;

	snprintf(rel, sizeof(rel), "/gltest-%d", (int)getpid());
	snprintf(relsub, sizeof(relsub), "%s/sub", rel);
	if (!mnt)
		mnt = "/sys/fs/cgroup";
	snprintf(base, sizeof(base), "%s%s", mnt, rel);
	snprintf(sub, sizeof(sub), "%s/sub", base);
	if (geteuid() != 0 || !cgroup2_mount() || mkdir(base, 0755) < 0) {
		fprintf(stderr, "resolve_cgroups: skipped: needs root and a writable cgroup v2\n");
		return;
	}
	ck_assert_int_eq(mkdir(sub, 0755), 0);
	setup();
	create("c3");
	p = gl_peer_new(&loop, model, err, sizeof(err));
	ck_assert_ptr_nonnull(p);
	g = fork();
	if (g == 0) {
		usleep(100000);
		connect_and_wait();
	}
	h = fork();
	if (h == 0) {
		usleep(100000);
		connect_and_wait();
	}
	snprintf(path, sizeof(path), "%s/cgroup.procs", base);
	fd = open(path, O_WRONLY);
	ck_assert_int_ge(fd, 0);
	dprintf(fd, "%d\n", (int)g);
	close(fd);
	snprintf(path, sizeof(path), "%s/cgroup.procs", sub);
	fd = open(path, O_WRONLY);
	ck_assert_int_ge(fd, 0);
	dprintf(fd, "%d\n", (int)h);
	close(fd);
	f1 = accept_one(&c1);
	f2 = accept_one(&c2);
	if (c1.pid == h) {
		/* they connect in no particular order: c1 is g's, c2 is h's */
		gl_peer_cred t = c1;
		int tf = f1;

		c1 = c2;
		c2 = t;
		f1 = f2;
		f2 = tf;
	}
	ck_assert_int_eq(c1.pid, g);
	ck_assert_int_eq(gl_peer_resolve(p, &c1, &uid), -ESRCH);
	ck_assert_int_eq(set_attr("c3", GL_ATTR_CGROUP, rel), 0);
	gl_peer_stats(p, &nns, &ncg, &nw);
	ck_assert_uint_eq(ncg, 1);
	/* the bound cgroup and one below it */
	ck_assert_int_eq(gl_peer_resolve(p, &c1, &uid), 0);
	ck_assert_uint_eq(uid, gl_instance_uid(gl_model_find(model, "c3")));
	ck_assert_int_eq(gl_peer_resolve(p, &c2, &uid), 0);
	/* a longer binding wins for the process inside it */
	create("c4");
	ck_assert_int_eq(set_attr("c4", GL_ATTR_CGROUP, relsub), 0);
	ck_assert_int_eq(gl_peer_resolve(p, &c2, &uid), 0);
	ck_assert_uint_eq(uid, gl_instance_uid(gl_model_find(model, "c4")));
	ck_assert_int_eq(gl_peer_resolve(p, &c1, &uid), 0);
	ck_assert_uint_eq(uid, gl_instance_uid(gl_model_find(model, "c3")));
	/* the caller is gone: its cgroup no longer counts */
	kill(g, SIGKILL);
	waitpid(g, NULL, 0);
	ck_assert_int_eq(gl_peer_resolve(p, &c1, &uid), -ESRCH);
	kill(h, SIGKILL);
	waitpid(h, NULL, 0);
	ck_assert_int_eq(set_attr("c3", GL_ATTR_CGROUP, ""), 0);
	gl_peer_stats(p, &nns, &ncg, &nw);
	ck_assert_uint_eq(ncg, 1);
	gl_peer_cred_clear(&c1);
	gl_peer_cred_clear(&c2);
	close(f1);
	close(f2);
	pump(50);
	rmdir(sub);
	rmdir(base);
	teardown(p);
}
END_TEST

START_TEST(creds_of_socketpair)
{
	int sv[2];
	gl_peer_cred c;

	ck_assert_int_eq(socketpair(AF_UNIX, SOCK_STREAM, 0, sv), 0);
	ck_assert_int_eq(gl_peer_cred_get(sv[0], &c), 0);
	ck_assert_int_eq(c.pid, getpid());
	ck_assert_uint_eq(c.uid, geteuid());
	ck_assert_int_ge(c.pidfd, 0);
	gl_peer_cred_clear(&c);
	ck_assert_int_eq(c.pidfd, -1);
	close(sv[0]);
	close(sv[1]);
}
END_TEST

static Suite *peer_suite(void)
{
	Suite *s = suite_create("peer");
	TCase *t = tcase_create("peer");

	tcase_add_test(t, creds_of_socketpair);
	tcase_add_test(t, resolve_namespaces);
	tcase_add_test(t, root_uid_from_userns);
	tcase_add_test(t, release_at_startup);
	tcase_add_test(t, resolve_cgroups);
	suite_add_tcase(s, t);
	return s;
}

UNIT_MAIN(peer_suite)
