/* core/store_sqlite.c: durability round trips, all-or-nothing batches,
 * event pruning, refusal of files that are not ours, the state-dir lock,
 * and disk-full mapping. */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <sqlite3.h>

#include "core/buf.h"
#include "core/store.h"
#include "tests/unit/unit.h"

/* ---- helpers ------------------------------------------------------------- */

static char *path_in(const char *dir, const char *name)
{
	char *p = NULL;

	ck_assert_int_gt(asprintf(&p, "%s/%s", dir, name), 0);
	return p;
}

static gl_store *open_ok(const char *dir)
{
	char err[512] = "unset";
	gl_store *s = NULL;
	int r;

	r = gl_store_sqlite_open(dir, &s, err, sizeof(err));
	ck_assert_msg(r == 0, "open %s: %d %s", dir, r, err);
	ck_assert_ptr_nonnull(s);
	return s;
}

static void commit_ok(gl_store *s, const gl_sop *ops, size_t n)
{
	int r = gl_store_commit(s, ops, n);

	ck_assert_msg(r == 0, "commit: %d %s", r, s->errmsg);
}

/* The loader writes everything it is told into a text dump, in order. */
static void dump_hex(gl_buf *b, const char *v, size_t n)
{
	size_t i;

	for (i = 0; i < n; i++)
		gl_buf_printf(b, "%02x", (unsigned char)v[i]);
}

static int ld_instance(void *arg, const gl_irow *r)
{
	gl_buf_printf(arg, "I %s %s %s %d %lld %s %lld %s %lld %lld\n", r->name, r->type, r->state,
	              r->guest_state, (long long)r->init_pid, r->cgroup[0] ? r->cgroup : "-",
	              (long long)r->vsock_cid, r->vsock_uds[0] ? r->vsock_uds : "-",
	              (long long)r->ctime_ns, (long long)r->mtime_ns);
	return 0;
}

static int ld_entry(gl_buf *b, char tag, const char *inst, const char *key, const char *v,
                    size_t n, int64_t mtime)
{
	/* Values are promised NUL-terminated. */
	ck_assert_int_eq(v[n], '\0');
	gl_buf_printf(b, "%c %s %s ", tag, inst, key);
	dump_hex(b, v, n);
	gl_buf_printf(b, " %lld\n", (long long)mtime);
	return 0;
}

static int ld_config(void *arg, const char *inst, const char *key, const char *v, size_t n,
                     int64_t mtime)
{
	return ld_entry(arg, 'C', inst, key, v, n, mtime);
}

static int ld_device(void *arg, const char *inst, const char *key, const char *v, size_t n,
                     int64_t mtime)
{
	return ld_entry(arg, 'D', inst, key, v, n, mtime);
}

static int ld_seq(void *arg, const char *inst, uint64_t seq)
{
	gl_buf_printf(arg, "S %s %llu\n", inst, (unsigned long long)seq);
	return 0;
}

/* Load everything; returns a new string (free() it). Config and device rows
 * may come in any order, so they are compared as sorted lines. */
static char *load_dump(gl_store *s)
{
	gl_buf b = GL_BUF_INIT;
	gl_store_loader l = {
		.arg = &b,
		.instance = ld_instance,
		.config = ld_config,
		.device = ld_device,
		.seq = ld_seq,
	};
	int r;

	r = gl_store_load(s, &l);
	ck_assert_msg(r == 0, "load: %d %s", r, s->errmsg);
	return gl_buf_steal(&b, NULL);
}

static char *reopen_dump(const char *dir)
{
	gl_store *s = open_ok(dir);
	char *d = load_dump(s);

	gl_store_close(s);
	return d;
}

static char *read_file(const char *path, size_t *len)
{
	gl_buf b = GL_BUF_INIT;
	char chunk[65536];
	ssize_t n;
	int fd;

	fd = open(path, O_RDONLY);
	ck_assert_msg(fd >= 0, "open %s: %s", path, strerror(errno));
	while ((n = read(fd, chunk, sizeof(chunk))) > 0)
		ck_assert_int_eq(gl_buf_add(&b, chunk, (size_t)n), 0);
	ck_assert_int_eq(n, 0);
	close(fd);
	return gl_buf_steal(&b, len);
}

static void write_file(const char *path, const void *data, size_t len)
{
	int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0600);

	ck_assert_int_ge(fd, 0);
	ck_assert_int_eq(write(fd, data, len), (ssize_t)len);
	close(fd);
}

static void sql_exec(const char *dbpath, const char *sql)
{
	sqlite3 *db = NULL;
	char *msg = NULL;
	int rc;

	ck_assert_int_eq(sqlite3_open(dbpath, &db), SQLITE_OK);
	rc = sqlite3_exec(db, sql, NULL, NULL, &msg);
	ck_assert_msg(rc == SQLITE_OK, "%s: %s", sql, msg ? msg : "?");
	sqlite3_free(msg);
	ck_assert_int_eq(sqlite3_close(db), SQLITE_OK);
}

static long long sql_int(const char *dbpath, const char *sql)
{
	sqlite3_stmt *st = NULL;
	sqlite3 *db = NULL;
	long long v;

	ck_assert_int_eq(sqlite3_open_v2(dbpath, &db, SQLITE_OPEN_READONLY, NULL), SQLITE_OK);
	ck_assert_int_eq(sqlite3_prepare_v2(db, sql, -1, &st, NULL), SQLITE_OK);
	ck_assert_int_eq(sqlite3_step(st), SQLITE_ROW);
	v = sqlite3_column_int64(st, 0);
	sqlite3_finalize(st);
	sqlite3_close(db);
	return v;
}

static gl_irow irow(const char *name, const char *type, const char *state, int64_t t)
{
	gl_irow r = {
		.name = name,
		.type = type,
		.state = state,
		.cgroup = "",
		.vsock_uds = "",
		.ctime_ns = t,
		.mtime_ns = t,
	};

	return r;
}

#define CFG_PUT(i, k, v, t) \
	{ .kind = GL_SOP_CONFIG_PUT, .instance = i, .key = k, .value = v, .vlen = sizeof(v) - 1, \
	  .mtime_ns = t }
#define DEV_PUT(i, k, v, t) \
	{ .kind = GL_SOP_DEVICE_PUT, .instance = i, .key = k, .value = v, .vlen = sizeof(v) - 1, \
	  .mtime_ns = t }
#define EV_PUT(i, s, v) \
	{ .kind = GL_SOP_EVENT_PUT, .instance = i, .seq = s, .value = v, .vlen = sizeof(v) - 1 }

/* ---- round trips --------------------------------------------------------- */

START_TEST(create_commit_reload)
{
	char *tmp = unit_tmpdir();
	char *dir = path_in(tmp, "state");
	char *db = path_in(dir, "guestlink.db");
	gl_irow c1 = irow("c1", "container", "Started", 100);
	gl_irow v1 = irow("v1", "virtual-machine", "Stopped", 200);
	gl_irow c1b;
	struct stat st;
	gl_store *s;
	char *d;

	v1.vsock_cid = 42;
	v1.vsock_uds = "/run/fc/v1.vsock";
	c1.init_pid = 1234;
	c1.cgroup = "/lxc.payload.c1";

	s = open_ok(dir);
	ck_assert_int_eq(stat(dir, &st), 0);
	ck_assert_uint_eq(st.st_mode & 0777, 0700);
	ck_assert_int_eq(stat(db, &st), 0);
	ck_assert_uint_eq(st.st_mode & 0777, 0600);
	ck_assert_str_eq(s->errmsg, "");

	commit_ok(s, NULL, 0);
	{
		gl_sop ops[] = {
			{.kind = GL_SOP_INSTANCE_PUT, .instance = "c1", .irow = &c1},
			{.kind = GL_SOP_INSTANCE_PUT, .instance = "v1", .irow = &v1},
			CFG_PUT("c1", "user.foo", "bar", 101),
			CFG_PUT("c1", "user.bin", "a\0b\n\xff", 102),
			CFG_PUT("c1", "user.empty", "", 103),
			CFG_PUT("c1", "user.gone", "x", 104),
			CFG_PUT("v1", "cloud-init.user-data", "#cloud-config\n", 201),
			DEV_PUT("c1", "share", "{\"path\":\"/mnt\",\"type\":\"disk\"}", 105),
			DEV_PUT("c1", "old", "{\"type\":\"nic\"}", 106),
			EV_PUT("c1", 1, "{\"type\":\"config\"}\n"),
			EV_PUT("c1", 2, "{\"type\":\"device\"}\n"),
			EV_PUT("v1", 1, "{}\n"),
		};
		commit_ok(s, ops, sizeof(ops) / sizeof(ops[0]));
	}
	c1b = c1;
	c1b.state = "Ready";
	c1b.guest_state = 1;
	c1b.mtime_ns = 300;
	{
		gl_sop ops[] = {
			CFG_PUT("c1", "user.foo", "baz", 301),
			{.kind = GL_SOP_CONFIG_DEL, .instance = "c1", .key = "user.gone"},
			{.kind = GL_SOP_DEVICE_DEL, .instance = "c1", .key = "old"},
			{.kind = GL_SOP_CONFIG_DEL, .instance = "c1", .key = "user.never-set"},
			{.kind = GL_SOP_INSTANCE_PUT, .instance = "c1", .irow = &c1b},
			EV_PUT("c1", 3, "{\"type\":\"config\"}\n"),
		};
		commit_ok(s, ops, sizeof(ops) / sizeof(ops[0]));
	}

	/* The same store reads what it wrote, before and after a reopen. */
	const char *want =
		"I c1 container Ready 1 1234 /lxc.payload.c1 0 - 100 300\n"
		"I v1 virtual-machine Stopped 0 0 - 42 /run/fc/v1.vsock 200 200\n"
		"C c1 user.bin 6100620aff 102\n"
		"C c1 user.empty  103\n"
		"C c1 user.foo 62617a 301\n"
		"C v1 cloud-init.user-data 23636c6f75642d636f6e6669670a 201\n"
		"D c1 share 7b2270617468223a222f6d6e74222c2274797065223a226469736b227d 105\n"
		"S c1 3\n"
		"S v1 1\n";
	d = load_dump(s);
	ck_assert_str_eq(d, want);
	free(d);
	gl_store_close(s);

	d = reopen_dump(dir);
	ck_assert_str_eq(d, want);
	free(d);

	ck_assert_int_eq(sql_int(db, "PRAGMA application_id"), 0x676c6e6b);
	ck_assert_int_eq(sql_int(db, "PRAGMA user_version"), 1);
	ck_assert_int_eq(sql_int(db, "SELECT count(*) FROM pragma_journal_mode WHERE "
	                             "journal_mode = 'wal'"),
	                 1);

	/* Deleting an instance takes its config, devices and events along. */
	s = open_ok(dir);
	{
		gl_sop ops[] = {{.kind = GL_SOP_INSTANCE_DEL, .instance = "c1"}};
		commit_ok(s, ops, 1);
	}
	gl_store_close(s);
	d = reopen_dump(dir);
	ck_assert_str_eq(d, "I v1 virtual-machine Stopped 0 0 - 42 /run/fc/v1.vsock 200 200\n"
	                    "C v1 cloud-init.user-data 23636c6f75642d636f6e6669670a 201\n"
	                    "S v1 1\n");
	free(d);
	ck_assert_int_eq(sql_int(db, "SELECT count(*) FROM events WHERE instance = 'c1'"), 0);

	unit_rmrf(tmp);
	free(db);
	free(dir);
	free(tmp);
}
END_TEST

START_TEST(open_needs_parent)
{
	char *tmp = unit_tmpdir();
	char *dir = path_in(tmp, "a/b");
	char err[512] = "";
	gl_store *s = (gl_store *)1;

	/* Only the last level is created. */
	ck_assert_int_eq(gl_store_sqlite_open(dir, &s, err, sizeof(err)), -ENOENT);
	ck_assert_ptr_null(s);
	ck_assert_msg(strstr(err, dir) != NULL, "%s", err);

	unit_rmrf(tmp);
	free(dir);
	free(tmp);
}
END_TEST

/* A process that dies right after commit() returned 0 loses nothing. */
START_TEST(survives_crash)
{
	char *tmp = unit_tmpdir();
	gl_irow c1 = irow("c1", "container", "Started", 1);
	gl_sop ops[] = {{.kind = GL_SOP_INSTANCE_PUT, .irow = &c1},
	                CFG_PUT("c1", "user.a", "1", 2), EV_PUT("c1", 9, "e")};
	int status;
	pid_t pid;
	char *d;

	pid = fork();
	ck_assert_int_ge(pid, 0);
	if (pid == 0) {
		gl_store *s = NULL;
		char err[512];

		if (gl_store_sqlite_open(tmp, &s, err, sizeof(err)) != 0 ||
		    gl_store_commit(s, ops, 3) != 0)
			_exit(1);
		_exit(0); /* no close, no checkpoint */
	}
	ck_assert_int_eq(waitpid(pid, &status, 0), pid);
	ck_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0);

	d = reopen_dump(tmp);
	ck_assert_str_eq(d, "I c1 container Started 0 0 - 0 - 1 1\nC c1 user.a 31 2\nS c1 9\n");
	free(d);

	unit_rmrf(tmp);
	free(tmp);
}
END_TEST

/* write() and sync() on two threads at once, as the model's pipeline runs
 * them: after the last sync returned, a process that dies without closing
 * loses none of the writes. */
typedef struct syncer {
	gl_store *s;
	volatile int stop;
	int syncs, failed;
} syncer;

static void *sync_loop(void *arg)
{
	syncer *y = arg;

	while (!y->stop) {
		if (y->s->ops->sync(y->s) != 0)
			y->failed++;
		y->syncs++;
	}
	return NULL;
}

START_TEST(write_and_sync_overlap)
{
	char *tmp = unit_tmpdir();
	int status;
	pid_t pid;
	char *d, *line;
	int n = 0;

	pid = fork();
	ck_assert_int_ge(pid, 0);
	if (pid == 0) {
		gl_irow c1 = irow("c1", "container", "Started", 1);
		gl_sop first = {.kind = GL_SOP_INSTANCE_PUT, .irow = &c1};
		syncer y = {0};
		pthread_t t;
		char key[32];
		char err[512];

		if (gl_store_sqlite_open(tmp, &y.s, err, sizeof(err)) != 0 || !y.s->ops->write ||
		    !y.s->ops->sync || y.s->ops->write(y.s, &first, 1) != 0 ||
		    pthread_create(&t, NULL, sync_loop, &y) != 0)
			_exit(1);
		for (int k = 0; k < 300; k++) {
			gl_sop op = CFG_PUT("c1", key, "v", 2);

			snprintf(key, sizeof(key), "user.k%03d", k);
			if (y.s->ops->write(y.s, &op, 1) != 0)
				_exit(2);
		}
		y.stop = 1;
		pthread_join(t, NULL);
		if (y.failed || y.s->ops->sync(y.s) != 0)
			_exit(3);
		_exit(0); /* no close, no checkpoint */
	}
	ck_assert_int_eq(waitpid(pid, &status, 0), pid);
	ck_assert_msg(WIFEXITED(status) && WEXITSTATUS(status) == 0, "child status %d", status);

	d = reopen_dump(tmp);
	for (line = strstr(d, "C c1 user.k"); line; line = strstr(line + 1, "C c1 user.k"))
		n++;
	ck_assert_int_eq(n, 300);
	free(d);

	unit_rmrf(tmp);
	free(tmp);
}
END_TEST

static int stop_at_second(void *arg, const gl_irow *r)
{
	int *n = arg;

	return ++*n == 2 ? 7 : 0;
}

START_TEST(load_stops_on_callback)
{
	char *tmp = unit_tmpdir();
	gl_irow a = irow("a", "container", "Stopped", 1);
	gl_irow b = irow("b", "container", "Stopped", 1);
	gl_irow c = irow("c", "container", "Stopped", 1);
	gl_sop ops[] = {
		{.kind = GL_SOP_INSTANCE_PUT, .irow = &c},
		{.kind = GL_SOP_INSTANCE_PUT, .irow = &a},
		{.kind = GL_SOP_INSTANCE_PUT, .irow = &b},
	};
	gl_store_loader l = {.instance = stop_at_second};
	gl_store *s;
	int n = 0;

	s = open_ok(tmp);
	commit_ok(s, ops, 3);
	l.arg = &n;
	ck_assert_int_eq(gl_store_load(s, &l), 7);
	ck_assert_int_eq(n, 2);
	/* Still usable afterwards. */
	commit_ok(s, ops, 1);
	gl_store_close(s);

	unit_rmrf(tmp);
	free(tmp);
}
END_TEST

/* ---- all or nothing ------------------------------------------------------ */

START_TEST(batch_fails_whole_bad_op)
{
	char *tmp = unit_tmpdir();
	gl_irow c1 = irow("c1", "container", "Started", 1);
	gl_sop ok[] = {{.kind = GL_SOP_INSTANCE_PUT, .irow = &c1}, CFG_PUT("c1", "user.a", "1", 2)};
	gl_sop bad[] = {
		CFG_PUT("c1", "user.a", "changed", 3),
		CFG_PUT("c1", "user.b", "new", 3),
		EV_PUT("c1", 1, "{}\n"),
		{.kind = GL_SOP_CONFIG_PUT, .instance = "c1", .key = NULL, .value = "x", .vlen = 1},
		CFG_PUT("c1", "user.c", "after", 3),
	};
	const char *want = "I c1 container Started 0 0 - 0 - 1 1\n"
	                   "C c1 user.a 31 2\n";
	gl_store *s;
	char *d;
	int r;

	s = open_ok(tmp);
	commit_ok(s, ok, 2);
	r = gl_store_commit(s, bad, sizeof(bad) / sizeof(bad[0]));
	ck_assert_int_eq(r, -EIO);
	ck_assert_msg(strstr(s->errmsg, "NOT NULL") != NULL, "%s", s->errmsg);

	d = load_dump(s);
	ck_assert_str_eq(d, want);
	free(d);

	/* The store goes on working after a failed batch. */
	commit_ok(s, bad, 1);
	gl_store_close(s);
	d = reopen_dump(tmp);
	ck_assert_str_eq(d, "I c1 container Started 0 0 - 0 - 1 1\n"
	                    "C c1 user.a 6368616e676564 3\n");
	free(d);

	unit_rmrf(tmp);
	free(tmp);
}
END_TEST

START_TEST(batch_fails_whole_trigger)
{
	char *tmp = unit_tmpdir();
	char *db = path_in(tmp, "guestlink.db");
	gl_irow c1 = irow("c1", "container", "Started", 1);
	gl_irow c3 = irow("c3", "container", "Started", 5);
	gl_sop first[] = {{.kind = GL_SOP_INSTANCE_PUT, .irow = &c1},
	                  CFG_PUT("c1", "user.a", "1", 2), DEV_PUT("c1", "d", "{}", 2),
	                  EV_PUT("c1", 1, "e1")};
	gl_sop batch[] = {
		{.kind = GL_SOP_INSTANCE_PUT, .irow = &c3},
		CFG_PUT("c3", "user.x", "1", 5),
		{.kind = GL_SOP_DEVICE_DEL, .instance = "c1", .key = "d"},
		{.kind = GL_SOP_INSTANCE_DEL, .instance = "c1"},
		EV_PUT("c3", 1, "e"),
		CFG_PUT("c3", "user.boom", "1", 5),
	};
	char *before, *d;
	gl_store *s;

	s = open_ok(tmp);
	commit_ok(s, first, 4);
	gl_store_close(s);
	before = reopen_dump(tmp);

	/* Another connection adds a trigger that fails the last op of the batch. */
	sql_exec(db, "CREATE TRIGGER boom BEFORE INSERT ON config WHEN NEW.key = 'user.boom' "
	             "BEGIN SELECT RAISE(ABORT, 'boom trigger'); END;");
	s = open_ok(tmp);
	ck_assert_int_eq(gl_store_commit(s, batch, sizeof(batch) / sizeof(batch[0])), -EIO);
	ck_assert_msg(strstr(s->errmsg, "boom trigger") != NULL, "%s", s->errmsg);
	gl_store_close(s);

	d = reopen_dump(tmp);
	ck_assert_str_eq(d, before);
	free(d);
	free(before);

	unit_rmrf(tmp);
	free(db);
	free(tmp);
}
END_TEST

/* ---- events -------------------------------------------------------------- */

START_TEST(event_pruning)
{
	char *tmp = unit_tmpdir();
	char *db = path_in(tmp, "guestlink.db");
	const uint64_t last = GL_STORE_EVENT_HISTORY + 300;
	gl_irow c1 = irow("c1", "container", "Started", 1);
	gl_irow c2 = irow("c2", "container", "Started", 1);
	gl_sop ops[64];
	gl_store *s;
	uint64_t seq = 1;
	size_t n;
	char *d;

	s = open_ok(tmp);
	ops[0] = (gl_sop){.kind = GL_SOP_INSTANCE_PUT, .irow = &c1};
	ops[1] = (gl_sop){.kind = GL_SOP_INSTANCE_PUT, .irow = &c2};
	ops[2] = (gl_sop)EV_PUT("c2", 5, "other");
	commit_ok(s, ops, 3);
	while (seq <= last) {
		for (n = 0; n < 64 && seq <= last; n++, seq++)
			ops[n] = (gl_sop)EV_PUT("c1", seq, "{\"type\":\"config\"}\n");
		commit_ok(s, ops, n);
	}
	gl_store_close(s);

	/* pruned at the last multiple of GL_STORE_EVENT_PRUNE_EVERY (1280):
	 * seq <= 1280 - 1024 are gone */
	ck_assert_int_eq(sql_int(db, "SELECT count(*) FROM events WHERE instance = 'c1'"),
	                 last - (last / GL_STORE_EVENT_PRUNE_EVERY * GL_STORE_EVENT_PRUNE_EVERY -
	                         GL_STORE_EVENT_HISTORY));
	ck_assert_int_eq(sql_int(db, "SELECT min(seq) FROM events WHERE instance = 'c1'"),
	                 last / GL_STORE_EVENT_PRUNE_EVERY * GL_STORE_EVENT_PRUNE_EVERY -
	                 GL_STORE_EVENT_HISTORY + 1);
	ck_assert_int_ge(sql_int(db, "SELECT count(*) FROM events WHERE instance = 'c1'"),
	                 GL_STORE_EVENT_HISTORY);
	ck_assert_int_lt(sql_int(db, "SELECT count(*) FROM events WHERE instance = 'c1'"),
	                 GL_STORE_EVENT_HISTORY + GL_STORE_EVENT_PRUNE_EVERY);
	ck_assert_int_eq(sql_int(db, "SELECT max(seq) FROM events WHERE instance = 'c1'"), last);
	/* Another instance's history is untouched. */
	ck_assert_int_eq(sql_int(db, "SELECT count(*) FROM events WHERE instance = 'c2'"), 1);

	d = reopen_dump(tmp);
	ck_assert_msg(strstr(d, "S c1 1324\nS c2 5\n") != NULL, "%s", d);
	free(d);

	unit_rmrf(tmp);
	free(db);
	free(tmp);
}
END_TEST

/* ---- refusal ------------------------------------------------------------- */

/* Opening `dir` must fail with `want_r`, a message containing `want_msg`,
 * and leave guestlink.db and its WAL (if any) byte for byte as they were,
 * creating no WAL where there was none. */
static void refused(const char *dir, int want_r, const char *want_msg)
{
	char *db = path_in(dir, "guestlink.db");
	char *wal = path_in(dir, "guestlink.db-wal");
	char *shm = path_in(dir, "guestlink.db-shm");
	char *before, *after, *wbefore = NULL, *wafter;
	size_t blen, alen, wblen = 0, walen;
	char err[512] = "";
	gl_store *s = NULL;
	int r;

	before = read_file(db, &blen);
	if (access(wal, F_OK) == 0)
		wbefore = read_file(wal, &wblen);
	r = gl_store_sqlite_open(dir, &s, err, sizeof(err));
	ck_assert_msg(r == want_r, "open: %d (%s), want %d", r, err, want_r);
	ck_assert_ptr_null(s);
	ck_assert_msg(strstr(err, want_msg) != NULL, "message \"%s\" lacks \"%s\"", err, want_msg);
	ck_assert_msg(strstr(err, db) != NULL, "message \"%s\" lacks the path", err);
	fprintf(stderr, "refused as expected: %s\n", err);

	after = read_file(db, &alen);
	ck_assert_uint_eq(alen, blen);
	ck_assert_msg(memcmp(before, after, blen) == 0, "%s was modified", db);
	if (wbefore) {
		wafter = read_file(wal, &walen);
		ck_assert_uint_eq(walen, wblen);
		ck_assert_msg(memcmp(wbefore, wafter, wblen) == 0, "%s was modified", wal);
		free(wafter);
		free(wbefore);
	} else {
		ck_assert_int_ne(access(wal, F_OK), 0);
		ck_assert_int_ne(access(shm, F_OK), 0);
	}

	free(before);
	free(after);
	free(shm);
	free(wal);
	free(db);
}

START_TEST(refuse_text_file)
{
	char *tmp = unit_tmpdir();
	char *db = path_in(tmp, "guestlink.db");
	const char text[] = "instances:\n  c1: {type: container}\n# not a database\n";

	write_file(db, text, sizeof(text) - 1);
	refused(tmp, -EINVAL, "is not a SQLite database");
	/* Refused every time, not only the first. */
	refused(tmp, -EINVAL, "is not a SQLite database");

	unit_rmrf(tmp);
	free(db);
	free(tmp);
}
END_TEST

START_TEST(refuse_random_bytes)
{
	char *tmp = unit_tmpdir();
	char *db = path_in(tmp, "guestlink.db");
	static unsigned char junk[65536];
	uint32_t x = 2463534242u;
	size_t i;

	for (i = 0; i < sizeof(junk); i++) {
		x ^= x << 13;
		x ^= x >> 17;
		x ^= x << 5;
		junk[i] = (unsigned char)x;
	}
	write_file(db, junk, sizeof(junk));
	refused(tmp, -EINVAL, "is not a SQLite database");

	unit_rmrf(tmp);
	free(db);
	free(tmp);
}
END_TEST

START_TEST(refuse_foreign_db)
{
	char *tmp = unit_tmpdir();
	char *db = path_in(tmp, "guestlink.db");
	char *wal;

	sql_exec(db, "PRAGMA application_id = 305419896;" /* 0x12345678 */
	             "CREATE TABLE t(x); INSERT INTO t VALUES (1);");
	refused(tmp, -EINVAL, "belongs to another application (application_id 0x12345678)");
	unlink(db);

	/* No application id at all, but tables: still someone else's. */
	sql_exec(db, "CREATE TABLE instances(name TEXT PRIMARY KEY);");
	refused(tmp, -EINVAL, "belongs to another application (application_id 0x00000000)");
	unlink(db);

	/* Someone else's, in WAL mode with frames not yet checkpointed. */
	{
		sqlite3 *h = NULL;

		ck_assert_int_eq(sqlite3_open(db, &h), SQLITE_OK);
		sqlite3_db_config(h, SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, 1, NULL);
		ck_assert_int_eq(sqlite3_exec(h, "PRAGMA journal_mode=WAL; CREATE TABLE t(x);"
		                                 "INSERT INTO t VALUES (1);",
		                              NULL, NULL, NULL),
		                 SQLITE_OK);
		sqlite3_close(h);
	}
	wal = path_in(tmp, "guestlink.db-wal");
	ck_assert_int_eq(access(wal, F_OK), 0);
	refused(tmp, -EINVAL, "belongs to another application");
	free(wal);

	unit_rmrf(tmp);
	free(db);
	free(tmp);
}
END_TEST

START_TEST(refuse_newer_schema)
{
	char *tmp = unit_tmpdir();
	char *db = path_in(tmp, "guestlink.db");
	gl_store *s;

	s = open_ok(tmp);
	gl_store_close(s);
	sql_exec(db, "PRAGMA user_version = 2;");
	refused(tmp, -EINVAL, "was written by a newer guestlink (schema 2)");

	unit_rmrf(tmp);
	free(db);
	free(tmp);
}
END_TEST

START_TEST(refuse_corrupt)
{
	char *tmp = unit_tmpdir();
	char *db = path_in(tmp, "guestlink.db");
	gl_irow c1 = irow("c1", "container", "Started", 1);
	gl_sop ops[] = {{.kind = GL_SOP_INSTANCE_PUT, .irow = &c1}, CFG_PUT("c1", "user.a", "1", 2)};
	unsigned char junk[4096];
	gl_store *s;
	int fd;

	s = open_ok(tmp);
	commit_ok(s, ops, 2);
	gl_store_close(s);
	ck_assert_int_ge(sql_int(db, "PRAGMA page_count"), 3);
	/* The store keeps its WAL, which still holds good copies of the pages. */
	sql_exec(db, "PRAGMA wal_checkpoint(TRUNCATE)");

	/* Scribble over page 2, keeping the header page intact. */
	memset(junk, 0xa5, sizeof(junk));
	fd = open(db, O_WRONLY);
	ck_assert_int_ge(fd, 0);
	ck_assert_int_eq(pwrite(fd, junk, sizeof(junk), 4096), (ssize_t)sizeof(junk));
	close(fd);
	refused(tmp, -EINVAL, "is corrupt: ");

	unit_rmrf(tmp);
	free(db);
	free(tmp);
}
END_TEST

START_TEST(empty_file_is_new)
{
	char *tmp = unit_tmpdir();
	char *db = path_in(tmp, "guestlink.db");
	gl_store *s;
	char *d;

	write_file(db, "", 0);
	s = open_ok(tmp);
	d = load_dump(s);
	ck_assert_str_eq(d, "");
	free(d);
	gl_store_close(s);
	ck_assert_int_eq(sql_int(db, "PRAGMA application_id"), 0x676c6e6b);

	unit_rmrf(tmp);
	free(db);
	free(tmp);
}
END_TEST

/* ---- the state-directory lock -------------------------------------------- */

START_TEST(second_open_is_busy)
{
	char *tmp = unit_tmpdir();
	char want[64], err[512] = "";
	gl_store *s, *s2 = NULL;

	s = open_ok(tmp);
	ck_assert_int_eq(gl_store_sqlite_open(tmp, &s2, err, sizeof(err)), -EBUSY);
	ck_assert_ptr_null(s2);
	snprintf(want, sizeof(want), "(pid %ld)", (long)getpid());
	ck_assert_msg(strstr(err, "is in use by another guestlinkd") != NULL, "%s", err);
	ck_assert_msg(strstr(err, want) != NULL, "%s", err);
	ck_assert_msg(strstr(err, tmp) != NULL, "%s", err);

	/* The first store is unharmed; after it closes, the directory is free. */
	{
		gl_irow c1 = irow("c1", "container", "Started", 1);
		gl_sop ops[] = {{.kind = GL_SOP_INSTANCE_PUT, .irow = &c1}};

		commit_ok(s, ops, 1);
	}
	gl_store_close(s);
	s2 = open_ok(tmp);
	gl_store_close(s2);

	unit_rmrf(tmp);
	free(tmp);
}
END_TEST

/* ---- disk full ----------------------------------------------------------- */

START_TEST(disk_full_is_enospc)
{
	char *tmp = unit_tmpdir();
	gl_irow c1 = irow("c1", "container", "Started", 1);
	gl_sop first[] = {{.kind = GL_SOP_INSTANCE_PUT, .irow = &c1},
	                  CFG_PUT("c1", "user.a", "1", 2)};
	size_t big_len = 2 << 20;
	char *big = malloc(big_len);
	gl_sop bad[] = {
		CFG_PUT("c1", "user.b", "2", 3),
		{.kind = GL_SOP_CONFIG_PUT, .instance = "c1", .key = "user.big", .value = big,
		 .vlen = big_len, .mtime_ns = 3},
	};
	gl_store *s;
	char *d;
	int r;

	/* A private mount namespace: the tmpfs vanishes with this forked case. */
	if (unshare(CLONE_NEWNS) < 0 || mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL) < 0 ||
	    mount("tmpfs", tmp, "tmpfs", 0, "size=512k,mode=0700") < 0) {
		fprintf(stderr, "disk_full_is_enospc: skipped: cannot mount a tmpfs: %s\n",
		        strerror(errno));
		free(big);
		rmdir(tmp);
		free(tmp);
		return;
	}
	ck_assert_ptr_nonnull(big);
	memset(big, 'z', big_len);

	s = open_ok(tmp);
	commit_ok(s, first, 2);
	r = gl_store_commit(s, bad, 2);
	ck_assert_msg(r == -ENOSPC, "commit: %d %s", r, s->errmsg);
	fprintf(stderr, "disk full as expected: %s\n", s->errmsg);

	/* Nothing of the batch; and small writes still go through. */
	d = load_dump(s);
	ck_assert_str_eq(d, "I c1 container Started 0 0 - 0 - 1 1\nC c1 user.a 31 2\n");
	free(d);
	commit_ok(s, bad, 1);
	gl_store_close(s);

	d = reopen_dump(tmp);
	ck_assert_str_eq(d, "I c1 container Started 0 0 - 0 - 1 1\n"
	                    "C c1 user.a 31 2\nC c1 user.b 32 3\n");
	free(d);

	umount(tmp);
	rmdir(tmp);
	free(big);
	free(tmp);
}
END_TEST

/* The write of one batch and the sync of another run on two threads, and
 * either may set the message while the loop reads it: a copy is always
 * one whole message, never a mix. */
static atomic_bool err_stop;

static void *err_setter(void *arg)
{
	gl_store *st = arg;
	char a[301], b[301];

	memset(a, 'a', 300);
	memset(b, 'b', 300);
	a[300] = b[300] = '\0';
	for (unsigned i = 0; !atomic_load(&err_stop); i++)
		gl_store_set_err(st, "%s", i % 2 ? a : b);
	return NULL;
}

START_TEST(error_message_is_whole)
{
	gl_store st = {0};
	char big[600], out[512], small[8];
	pthread_t t;

	memset(big, 'x', sizeof(big) - 1);
	big[sizeof(big) - 1] = '\0';
	gl_store_set_err(&st, "%s", big);
	ck_assert_uint_eq(strlen(st.errmsg), sizeof(st.errmsg) - 1);
	gl_store_err(&st, small, sizeof(small));
	ck_assert_str_eq(small, "xxxxxxx");

	atomic_store(&err_stop, false);
	ck_assert_int_eq(pthread_create(&t, NULL, err_setter, &st), 0);
	for (int i = 0; i < 20000; i++) {
		size_t n;

		gl_store_err(&st, out, sizeof(out));
		n = strlen(out);
		if (n == sizeof(st.errmsg) - 1)
			continue; /* the setter has not begun yet */
		ck_assert_uint_eq(n, 300);
		ck_assert_msg(strspn(out, out[0] == 'a' ? "a" : "b") == 300, "torn: %s", out);
	}
	atomic_store(&err_stop, true);
	pthread_join(t, NULL);
}
END_TEST

static Suite *store_suite(void)
{
	Suite *s = suite_create("store");
	TCase *tc;

	tc = tcase_create("roundtrip");
	tcase_add_test(tc, create_commit_reload);
	tcase_add_test(tc, open_needs_parent);
	tcase_add_test(tc, survives_crash);
	tcase_add_test(tc, write_and_sync_overlap);
	tcase_add_test(tc, load_stops_on_callback);
	tcase_add_test(tc, empty_file_is_new);
	suite_add_tcase(s, tc);

	tc = tcase_create("atomic");
	tcase_add_test(tc, batch_fails_whole_bad_op);
	tcase_add_test(tc, batch_fails_whole_trigger);
	tcase_add_test(tc, disk_full_is_enospc);
	tcase_add_test(tc, error_message_is_whole);
	suite_add_tcase(s, tc);

	tc = tcase_create("events");
	tcase_add_test(tc, event_pruning);
	suite_add_tcase(s, tc);

	tc = tcase_create("refusal");
	tcase_add_test(tc, refuse_text_file);
	tcase_add_test(tc, refuse_random_bytes);
	tcase_add_test(tc, refuse_foreign_db);
	tcase_add_test(tc, refuse_newer_schema);
	tcase_add_test(tc, refuse_corrupt);
	tcase_add_test(tc, second_open_is_busy);
	suite_add_tcase(s, tc);
	return s;
}

UNIT_MAIN(store_suite)
