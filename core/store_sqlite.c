/* The embedded store: one SQLite database in WAL mode (core/store.h).
 *
 * Every write is one IMMEDIATE transaction run with statements prepared
 * once at open, so a batch of any size costs one WAL append; the sync is
 * one fdatasync of the WAL, done by us rather than inside SQLite's COMMIT
 * (synchronous=NORMAL), so that it can overlap the next batch's write.
 * That is exactly the durability of synchronous=FULL, whose COMMIT does
 * the same fdatasync after the same append; checkpoints still sync the WAL
 * before copying it and the database after.
 * The state directory is owned through an flock()ed lock file, taken before
 * the database is touched. A database that is not ours is refused before
 * anything is written to it (not even the WAL switch, which rewrites the
 * header). */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <sqlite3.h>

#include "core/store.h"

#define APP_ID 0x676c6e6b /* 'glnk' */
#define SCHEMA_VERSION 1

enum {
	ST_BEGIN,
	ST_COMMIT,
	ST_ROLLBACK,
	ST_INST_PUT,
	ST_INST_DEL,
	ST_CFG_DEL_ALL,
	ST_DEV_DEL_ALL,
	ST_EV_DEL_ALL,
	ST_CFG_PUT,
	ST_CFG_DEL,
	ST_DEV_PUT,
	ST_DEV_DEL,
	ST_EV_PUT,
	ST_EV_PRUNE,
	ST_COUNT
};

static const char *const stmt_sql[ST_COUNT] = {
	[ST_BEGIN] = "BEGIN IMMEDIATE",
	[ST_COMMIT] = "COMMIT",
	[ST_ROLLBACK] = "ROLLBACK",
	[ST_INST_PUT] = "INSERT INTO instances(name, type, state, guest_state, init_pid, cgroup,"
	                " vsock_cid, vsock_uds, ctime, mtime) VALUES (?,?,?,?,?,?,?,?,?,?)"
	                " ON CONFLICT(name) DO UPDATE SET type = excluded.type,"
	                " state = excluded.state, guest_state = excluded.guest_state,"
	                " init_pid = excluded.init_pid, cgroup = excluded.cgroup,"
	                " vsock_cid = excluded.vsock_cid, vsock_uds = excluded.vsock_uds,"
	                " ctime = excluded.ctime, mtime = excluded.mtime",
	[ST_INST_DEL] = "DELETE FROM instances WHERE name = ?",
	[ST_CFG_DEL_ALL] = "DELETE FROM config WHERE instance = ?",
	[ST_DEV_DEL_ALL] = "DELETE FROM devices WHERE instance = ?",
	[ST_EV_DEL_ALL] = "DELETE FROM events WHERE instance = ?",
	[ST_CFG_PUT] = "INSERT INTO config(instance, key, value, mtime) VALUES (?,?,?,?)"
	               " ON CONFLICT(instance, key) DO UPDATE SET value = excluded.value,"
	               " mtime = excluded.mtime",
	[ST_CFG_DEL] = "DELETE FROM config WHERE instance = ? AND key = ?",
	[ST_DEV_PUT] = "INSERT INTO devices(instance, key, value, mtime) VALUES (?,?,?,?)"
	               " ON CONFLICT(instance, key) DO UPDATE SET value = excluded.value,"
	               " mtime = excluded.mtime",
	[ST_DEV_DEL] = "DELETE FROM devices WHERE instance = ? AND key = ?",
	[ST_EV_PUT] = "INSERT OR REPLACE INTO events(instance, seq, line) VALUES (?,?,?)",
	[ST_EV_PRUNE] = "DELETE FROM events WHERE instance = ? AND seq <= ?",
};

static const char schema_sql[] =
	"CREATE TABLE IF NOT EXISTS instances ("
	" name TEXT NOT NULL PRIMARY KEY, type TEXT NOT NULL, state TEXT NOT NULL,"
	" guest_state INTEGER NOT NULL, init_pid INTEGER NOT NULL, cgroup TEXT NOT NULL,"
	" vsock_cid INTEGER NOT NULL, vsock_uds TEXT NOT NULL,"
	" ctime INTEGER NOT NULL, mtime INTEGER NOT NULL) WITHOUT ROWID;"
	"CREATE TABLE IF NOT EXISTS config ("
	" instance TEXT NOT NULL, key TEXT NOT NULL, value BLOB NOT NULL,"
	" mtime INTEGER NOT NULL, PRIMARY KEY (instance, key)) WITHOUT ROWID;"
	"CREATE TABLE IF NOT EXISTS devices ("
	" instance TEXT NOT NULL, key TEXT NOT NULL, value BLOB NOT NULL,"
	" mtime INTEGER NOT NULL, PRIMARY KEY (instance, key)) WITHOUT ROWID;"
	"CREATE TABLE IF NOT EXISTS events ("
	" instance TEXT NOT NULL, seq INTEGER NOT NULL, line BLOB NOT NULL,"
	" PRIMARY KEY (instance, seq)) WITHOUT ROWID;";

typedef struct sq_store {
	gl_store base; /* first: a gl_store * is a sq_store * */
	sqlite3 *db;
	sqlite3_stmt *st[ST_COUNT];
	int lock_fd;
	int wal_fd; /* our own descriptor on the WAL, for sync() */
	int broken; /* atomic: a sync failed, refuse everything */
	int persist_wal;
	char *path; /* the database file, for messages */
	char *wal_path;
} sq_store;

static const gl_store_ops sq_ops;

__attribute__((format(printf, 2, 3))) static void set_err(sq_store *s, const char *fmt, ...)
{
	char msg[sizeof(s->base.errmsg)];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	gl_store_set_err(&s->base, "%s", msg);
}

/* -errno for a failed SQLite call: disk full is the one failure callers act on. */
static int map_rc(sq_store *s, int rc)
{
	int sys;

	if ((rc & 0xff) == SQLITE_FULL)
		return -ENOSPC;
	/* The system errno is only fresh after an I/O error. */
	if ((rc & 0xff) == SQLITE_IOERR) {
		sys = sqlite3_system_errno(s->db);
		if (sys == ENOSPC || sys == EDQUOT)
			return -ENOSPC;
	}
	return -EIO;
}

/* Run a statement to completion and reset it. SQLITE_OK or the error code,
 * with the message kept in errmsg (the reset would not keep it for us). */
static int run(sq_store *s, sqlite3_stmt *st, const char *what)
{
	int rc;

	do
		rc = sqlite3_step(st);
	while (rc == SQLITE_ROW);
	if (rc == SQLITE_DONE) {
		sqlite3_reset(st);
		return SQLITE_OK;
	}
	set_err(s, "%s: %s: %s", s->path, what, sqlite3_errmsg(s->db));
	sqlite3_reset(st);
	return rc;
}

/* ---- open ---------------------------------------------------------------- */

static int make_dir(sq_store *s, const char *dir)
{
	struct stat stbuf;
	int r;

	if (mkdir(dir, 0700) == 0)
		return 0;
	r = -errno;
	if (r == -EEXIST) {
		if (stat(dir, &stbuf) == 0 && S_ISDIR(stbuf.st_mode))
			return 0;
		r = -ENOTDIR;
	}
	set_err(s, "cannot create state directory %s: %s", dir, strerror(-r));
	return r;
}

static int take_lock(sq_store *s, const char *dir)
{
	char path[4096], pidbuf[32];
	ssize_t got;
	long pid;
	int fd, r, len;

	len = snprintf(path, sizeof(path), "%s/" GL_STORE_LOCK_NAME, dir);
	if (len < 0 || (size_t)len >= sizeof(path)) {
		set_err(s, "state directory path too long: %s", dir);
		return -ENAMETOOLONG;
	}
	fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0600);
	if (fd < 0) {
		r = -errno;
		set_err(s, "cannot open %s: %s", path, strerror(-r));
		return r;
	}
	if (flock(fd, LOCK_EX | LOCK_NB) < 0) {
		r = -errno;
		if (r == -EWOULDBLOCK) {
			r = -EBUSY;
			got = pread(fd, pidbuf, sizeof(pidbuf) - 1, 0);
			pidbuf[got > 0 ? got : 0] = '\0';
			pid = strtol(pidbuf, NULL, 10);
			if (pid > 0)
				set_err(s, "state directory %s is in use by another guestlinkd (pid %ld)",
				        dir, pid);
			else
				set_err(s, "state directory %s is in use by another guestlinkd", dir);
		} else {
			set_err(s, "cannot lock %s: %s", path, strerror(-r));
		}
		close(fd);
		return r;
	}
	len = snprintf(pidbuf, sizeof(pidbuf), "%ld\n", (long)getpid());
	if (ftruncate(fd, 0) < 0 || pwrite(fd, pidbuf, (size_t)len, 0) < 0) {
		/* Only a hint for the message above: failing to write it is harmless. */
	}
	s->lock_fd = fd;
	return 0;
}

/* Why a read-only probe of the file failed, as the open's result. */
static int probe_failed(sq_store *s, int rc)
{
	int sys;

	switch (rc & 0xff) {
	case SQLITE_NOTADB:
		set_err(s, "%s is not a SQLite database", s->path);
		return -EINVAL;
	case SQLITE_CORRUPT:
		set_err(s, "%s is corrupt: %s", s->path, sqlite3_errmsg(s->db));
		return -EINVAL;
	case SQLITE_NOMEM:
		set_err(s, "%s: out of memory", s->path);
		return -ENOMEM;
	default:
		sys = (rc & 0xff) == SQLITE_IOERR || (rc & 0xff) == SQLITE_CANTOPEN
		              ? sqlite3_system_errno(s->db)
		              : 0;
		set_err(s, "cannot read %s: %s", s->path, sqlite3_errmsg(s->db));
		return sys > 0 ? -sys : -EIO;
	}
}

/* One integer from a one-row query; SQLITE_OK or the error code. */
static int query_int(sq_store *s, const char *sql, int64_t *val)
{
	sqlite3_stmt *st = NULL;
	int rc;

	rc = sqlite3_prepare_v2(s->db, sql, -1, &st, NULL);
	if (rc != SQLITE_OK)
		return rc;
	rc = sqlite3_step(st);
	if (rc == SQLITE_ROW) {
		*val = sqlite3_column_int64(st, 0);
		rc = SQLITE_OK;
	} else if (rc == SQLITE_DONE) {
		*val = 0;
		rc = SQLITE_OK;
	}
	sqlite3_finalize(st);
	return rc;
}

static int quick_check(sq_store *s)
{
	sqlite3_stmt *st = NULL;
	const char *msg, *nl;
	int rc, r = 0;

	rc = sqlite3_prepare_v2(s->db, "PRAGMA quick_check(1)", -1, &st, NULL);
	if (rc != SQLITE_OK)
		return probe_failed(s, rc);
	rc = sqlite3_step(st);
	if (rc != SQLITE_ROW) {
		r = probe_failed(s, rc == SQLITE_DONE ? SQLITE_CORRUPT : rc);
		goto out;
	}
	msg = (const char *)sqlite3_column_text(st, 0);
	if (!msg)
		msg = "(no result)";
	if (strcmp(msg, "ok") == 0)
		goto out;
	/* SQLite starts the report with a "*** in database main ***" line. */
	if (strncmp(msg, "***", 3) == 0 && (nl = strchr(msg, '\n')))
		msg = nl + 1;
	nl = strchr(msg, '\n');
	set_err(s, "%s is corrupt: %.*s", s->path, nl ? (int)(nl - msg) : (int)strlen(msg), msg);
	r = -EINVAL;
out:
	sqlite3_finalize(st);
	return r;
}

/* Refuse anything that is not a guestlink database (or a new, empty one)
 * without writing to it. *fresh is set when the schema must be created. */
static int check_file(sq_store *s, bool *fresh)
{
	int64_t app_id, version, objects;
	int rc, r;

	rc = query_int(s, "PRAGMA application_id", &app_id);
	if (rc == SQLITE_OK)
		rc = query_int(s, "PRAGMA user_version", &version);
	if (rc == SQLITE_OK)
		rc = query_int(s, "SELECT count(*) FROM sqlite_master", &objects);
	if (rc != SQLITE_OK)
		return probe_failed(s, rc);

	/* A foreign application id with no tables yet is still someone else's file. */
	if (app_id != APP_ID && (objects > 0 || app_id != 0)) {
		set_err(s, "%s belongs to another application (application_id 0x%08" PRIx32 ")",
		        s->path, (uint32_t)app_id);
		return -EINVAL;
	}
	if (app_id == APP_ID && version > SCHEMA_VERSION) {
		set_err(s, "%s was written by a newer guestlink (schema %" PRId64 ")", s->path,
		        version);
		return -EINVAL;
	}
	if (objects > 0) {
		r = quick_check(s);
		if (r < 0)
			return r;
	}
	*fresh = app_id != APP_ID || version != SCHEMA_VERSION;
	return 0;
}

static int exec_sql(sq_store *s, const char *sql)
{
	char *msg = NULL;
	int rc;

	rc = sqlite3_exec(s->db, sql, NULL, NULL, &msg);
	if (rc != SQLITE_OK) {
		set_err(s, "%s: %s: %s", s->path, sql, msg ? msg : sqlite3_errstr(rc));
		sqlite3_free(msg);
	}
	return rc;
}

static int setup(sq_store *s, bool fresh)
{
	sqlite3_stmt *st = NULL;
	const char *mode;
	int rc;

	rc = sqlite3_prepare_v2(s->db, "PRAGMA journal_mode=WAL", -1, &st, NULL);
	if (rc == SQLITE_OK)
		rc = sqlite3_step(st);
	if (rc != SQLITE_ROW) {
		set_err(s, "%s: cannot enable WAL: %s", s->path, sqlite3_errmsg(s->db));
		sqlite3_finalize(st);
		return map_rc(s, rc);
	}
	mode = (const char *)sqlite3_column_text(st, 0);
	if (!mode || strcmp(mode, "wal") != 0) {
		set_err(s, "%s: cannot enable WAL (journal mode stays %s)", s->path,
		        mode ? mode : "unknown");
		sqlite3_finalize(st);
		return -EIO;
	}
	sqlite3_finalize(st);

	/* A modest page cache: the model holds everything in memory anyway.
	 * The WAL is trimmed back to 8 MiB (twice the autocheckpoint size)
	 * after a large batch grew it. */
	rc = exec_sql(s, "PRAGMA synchronous=NORMAL; PRAGMA cache_size=-4096;"
	                 "PRAGMA journal_size_limit=8388608;");
	if (rc != SQLITE_OK)
		return map_rc(s, rc);

	if (fresh) {
		rc = exec_sql(s, "BEGIN IMMEDIATE");
		if (rc == SQLITE_OK)
			rc = exec_sql(s, schema_sql);
		if (rc == SQLITE_OK)
			rc = exec_sql(s, "PRAGMA application_id=1735159403;" /* 0x676c6e6b */
			                 "PRAGMA user_version=1;");
		if (rc == SQLITE_OK)
			rc = exec_sql(s, "COMMIT");
		if (rc != SQLITE_OK) {
			int r = map_rc(s, rc);

			if (!sqlite3_get_autocommit(s->db))
				sqlite3_exec(s->db, "ROLLBACK", NULL, NULL, NULL);
			return r;
		}
	}
	return 0;
}

static void sq_free(sq_store *s)
{
	size_t i;

	for (i = 0; i < ST_COUNT; i++)
		sqlite3_finalize(s->st[i]);
	/* With a size limit, the close would truncate the persistent WAL to
	 * zero bytes; keep its blocks for the next start. */
	if (s->persist_wal)
		sqlite3_exec(s->db, "PRAGMA journal_size_limit=-1", NULL, NULL, NULL);
	sqlite3_close_v2(s->db);
	if (s->lock_fd >= 0)
		close(s->lock_fd);
	if (s->wal_fd >= 0)
		close(s->wal_fd);
	sqlite3_free(s->path);
	sqlite3_free(s->wal_path);
	free(s);
}

/* Our descriptor on the WAL (reading the database made SQLite create it;
 * PERSIST_WAL keeps it, the same file, until we close), and the state
 * directory synced once so that the names of both files are durable. */
static int open_wal(sq_store *s, const char *dir)
{
	int fd, r;

	s->wal_fd = open(s->wal_path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
	if (s->wal_fd < 0) {
		r = -errno;
		set_err(s, "cannot open %s: %s", s->wal_path, strerror(-r));
		return r;
	}
	fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (fd < 0 || fsync(fd) < 0) {
		r = -errno;
		set_err(s, "cannot sync state directory %s: %s", dir, strerror(-r));
		if (fd >= 0)
			close(fd);
		return r;
	}
	close(fd);
	return 0;
}

int gl_store_sqlite_open(const char *dir, gl_store **out, char *err, size_t errlen)
{
	bool fresh = false;
	int rc, r, had_wal, fd;
	sq_store *s;
	size_t i;

	*out = NULL;
	s = calloc(1, sizeof(*s));
	if (!s) {
		if (err && errlen)
			snprintf(err, errlen, "out of memory");
		return -ENOMEM;
	}
	s->base.ops = &sq_ops;
	s->lock_fd = -1;
	s->wal_fd = -1;

	if (sqlite3_threadsafe() == 0) {
		/* commit() runs on pool threads. */
		set_err(s, "SQLite was built without thread support");
		r = -ENOTSUP;
		goto fail;
	}
	r = make_dir(s, dir);
	if (r < 0)
		goto fail;
	r = take_lock(s, dir);
	if (r < 0)
		goto fail;

	s->path = sqlite3_mprintf("%s/guestlink.db", dir);
	if (!s->path) {
		set_err(s, "out of memory");
		r = -ENOMEM;
		goto fail;
	}
	s->wal_path = sqlite3_mprintf("%s-wal", s->path);
	if (!s->wal_path) {
		set_err(s, "out of memory");
		r = -ENOMEM;
		goto fail;
	}
	had_wal = access(s->wal_path, F_OK) == 0;

	/* Config values may be secrets (cloud-init user-data): create the file
	 * private whatever the umask; SQLite gives its WAL and shm the same mode. */
	fd = open(s->path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0600);
	if (fd >= 0)
		close(fd);

	rc = sqlite3_open_v2(s->path, &s->db,
	                     SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_NOMUTEX,
	                     NULL);
	if (rc != SQLITE_OK) {
		if (!s->db) {
			set_err(s, "out of memory");
			r = -ENOMEM;
		} else {
			r = sqlite3_system_errno(s->db);
			r = r > 0 ? -r : -EIO;
			set_err(s, "cannot open %s: %s", s->path, sqlite3_errmsg(s->db));
		}
		goto fail;
	}
	/* Closing a refused database must leave its files as they were: with a
	 * WAL already there, no checkpoint into the main file (and the WAL
	 * stays); without one, the checkpoint of the empty WAL our reads made
	 * writes nothing and removes it again. Back to normal once the file is
	 * known to be ours. */
	sqlite3_db_config(s->db, SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, had_wal, NULL);
	sqlite3_busy_timeout(s->db, 5000);

	r = check_file(s, &fresh);
	if (r < 0)
		goto fail;
	sqlite3_db_config(s->db, SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, 0, NULL);
	/* Keep the WAL file (checkpointed, not removed) across restarts: commits
	 * then overwrite allocated blocks instead of growing the file, which
	 * makes each fdatasync a metadata commit as well on ext4. */
	s->persist_wal = 1;
	sqlite3_file_control(s->db, "main", SQLITE_FCNTL_PERSIST_WAL, &s->persist_wal);
	r = setup(s, fresh);
	if (r < 0)
		goto fail;

	for (i = 0; i < ST_COUNT; i++) {
		rc = sqlite3_prepare_v3(s->db, stmt_sql[i], -1, SQLITE_PREPARE_PERSISTENT,
		                        &s->st[i], NULL);
		if (rc != SQLITE_OK) {
			set_err(s, "%s: cannot prepare \"%s\": %s", s->path, stmt_sql[i],
			        sqlite3_errmsg(s->db));
			r = -EIO;
			goto fail;
		}
	}

	r = open_wal(s, dir);
	if (r < 0)
		goto fail;

	s->base.errmsg[0] = '\0';
	if (err && errlen)
		err[0] = '\0';
	*out = &s->base;
	return 0;

fail:
	if (err && errlen)
		snprintf(err, errlen, "%s", s->base.errmsg);
	sq_free(s);
	return r;
}

/* ---- commit -------------------------------------------------------------- */

static void bind_blob(sqlite3_stmt *st, int i, const char *v, size_t n)
{
	/* A NULL pointer would bind SQL NULL, not an empty value. */
	sqlite3_bind_blob64(st, i, v ? v : "", n, SQLITE_STATIC);
}

static void bind_text(sqlite3_stmt *st, int i, const char *v)
{
	/* NULL binds SQL NULL, which the NOT NULL columns refuse: a bad op
	 * fails the batch instead of storing garbage. */
	sqlite3_bind_text(st, i, v, -1, SQLITE_STATIC);
}

static const char *const sop_names[] = {
	[GL_SOP_INSTANCE_PUT] = "instance put", [GL_SOP_INSTANCE_DEL] = "instance delete",
	[GL_SOP_CONFIG_PUT] = "config put",     [GL_SOP_CONFIG_DEL] = "config delete",
	[GL_SOP_DEVICE_PUT] = "device put",     [GL_SOP_DEVICE_DEL] = "device delete",
	[GL_SOP_EVENT_PUT] = "event put",
};

static int exec_op(sq_store *s, const gl_sop *op)
{
	const char *what = (unsigned)op->kind <= GL_SOP_EVENT_PUT ? sop_names[op->kind] : "op";
	const gl_irow *ir = op->irow;
	sqlite3_stmt *st;
	int rc, i;

	switch (op->kind) {
	case GL_SOP_INSTANCE_PUT:
		if (!ir) {
			set_err(s, "%s: instance put without a row", s->path);
			return SQLITE_MISUSE;
		}
		st = s->st[ST_INST_PUT];
		bind_text(st, 1, ir->name);
		bind_text(st, 2, ir->type);
		bind_text(st, 3, ir->state);
		sqlite3_bind_int(st, 4, ir->guest_state);
		sqlite3_bind_int64(st, 5, ir->init_pid);
		bind_text(st, 6, ir->cgroup ? ir->cgroup : "");
		sqlite3_bind_int64(st, 7, ir->vsock_cid);
		bind_text(st, 8, ir->vsock_uds ? ir->vsock_uds : "");
		sqlite3_bind_int64(st, 9, ir->ctime_ns);
		sqlite3_bind_int64(st, 10, ir->mtime_ns);
		return run(s, st, what);

	case GL_SOP_INSTANCE_DEL:
		if (!op->instance) {
			set_err(s, "%s: instance delete without a name", s->path);
			return SQLITE_MISUSE;
		}
		for (i = ST_INST_DEL; i <= ST_EV_DEL_ALL; i++) {
			st = s->st[i];
			bind_text(st, 1, op->instance);
			rc = run(s, st, what);
			if (rc != SQLITE_OK)
				return rc;
		}
		return SQLITE_OK;

	case GL_SOP_CONFIG_PUT:
	case GL_SOP_DEVICE_PUT:
		st = s->st[op->kind == GL_SOP_CONFIG_PUT ? ST_CFG_PUT : ST_DEV_PUT];
		bind_text(st, 1, op->instance);
		bind_text(st, 2, op->key);
		bind_blob(st, 3, op->value, op->vlen);
		sqlite3_bind_int64(st, 4, op->mtime_ns);
		return run(s, st, what);

	case GL_SOP_CONFIG_DEL:
	case GL_SOP_DEVICE_DEL:
		st = s->st[op->kind == GL_SOP_CONFIG_DEL ? ST_CFG_DEL : ST_DEV_DEL];
		bind_text(st, 1, op->instance);
		bind_text(st, 2, op->key);
		return run(s, st, what);

	case GL_SOP_EVENT_PUT:
		st = s->st[ST_EV_PUT];
		bind_text(st, 1, op->instance);
		sqlite3_bind_int64(st, 2, (sqlite3_int64)op->seq);
		bind_blob(st, 3, op->value, op->vlen);
		rc = run(s, st, what);
		/* Pruning is a range delete: doing it once every PRUNE_EVERY
		 * events instead of once per event saves most of its cost. */
		if (rc != SQLITE_OK || op->seq <= GL_STORE_EVENT_HISTORY ||
		    op->seq % GL_STORE_EVENT_PRUNE_EVERY)
			return rc;
		st = s->st[ST_EV_PRUNE];
		bind_text(st, 1, op->instance);
		sqlite3_bind_int64(st, 2, (sqlite3_int64)(op->seq - GL_STORE_EVENT_HISTORY));
		return run(s, st, what);
	}

	set_err(s, "%s: unknown op kind %d", s->path, (int)op->kind);
	return SQLITE_MISUSE;
}

static int sq_write(gl_store *base, const gl_sop *ops, size_t n)
{
	sq_store *s = (sq_store *)base;
	size_t i;
	int rc, r;

	if (__atomic_load_n(&s->broken, __ATOMIC_ACQUIRE)) {
		set_err(s, "%s: a sync failed earlier; no writes until guestlinkd restarts",
		        s->wal_path);
		return -EIO;
	}
	rc = run(s, s->st[ST_BEGIN], "begin");
	if (rc != SQLITE_OK)
		return map_rc(s, rc);

	for (i = 0; i < n; i++) {
		rc = exec_op(s, &ops[i]);
		if (rc != SQLITE_OK)
			goto fail;
	}

	rc = run(s, s->st[ST_COMMIT], "commit");
	if (rc != SQLITE_OK)
		goto fail;
	return 0;

fail:
	r = map_rc(s, rc);
	/* Some errors (disk full, I/O) already rolled the transaction back. */
	if (!sqlite3_get_autocommit(s->db)) {
		char keep[sizeof(s->base.errmsg)];

		gl_store_err(&s->base, keep, sizeof(keep));
		run(s, s->st[ST_ROLLBACK], "rollback");
		gl_store_set_err(&s->base, "%s", keep);
	}
	return r;
}

static int sq_sync(gl_store *base)
{
	sq_store *s = (sq_store *)base;
	int e;

	if (__atomic_load_n(&s->broken, __ATOMIC_ACQUIRE)) {
		set_err(s, "%s: a sync failed earlier; no writes until guestlinkd restarts",
		        s->wal_path);
		return -EIO;
	}
	if (fdatasync(s->wal_fd) == 0)
		return 0;
	/* The kernel may have dropped the pages it could not write: a retry
	 * would succeed and prove nothing. */
	e = errno;
	__atomic_store_n(&s->broken, 1, __ATOMIC_RELEASE);
	set_err(s, "%s: fdatasync failed: %s; no writes until guestlinkd restarts", s->wal_path,
	        strerror(e));
	return e == ENOSPC || e == EDQUOT ? -ENOSPC : -EIO;
}

static int sq_commit(gl_store *base, const gl_sop *ops, size_t n)
{
	int r = sq_write(base, ops, n);

	return r ? r : sq_sync(base);
}

/* ---- load ---------------------------------------------------------------- */

static const char *col_text(sqlite3_stmt *st, int i)
{
	const char *t = (const char *)sqlite3_column_text(st, i);

	return t ? t : "";
}

typedef int (*row_fn)(sq_store *s, sqlite3_stmt *st, const gl_store_loader *l);

static int row_instance(sq_store *s, sqlite3_stmt *st, const gl_store_loader *l)
{
	gl_irow ir = {
		.name = col_text(st, 0),
		.type = col_text(st, 1),
		.state = col_text(st, 2),
		.guest_state = sqlite3_column_int(st, 3),
		.init_pid = sqlite3_column_int64(st, 4),
		.cgroup = col_text(st, 5),
		.vsock_cid = sqlite3_column_int64(st, 6),
		.vsock_uds = col_text(st, 7),
		.ctime_ns = sqlite3_column_int64(st, 8),
		.mtime_ns = sqlite3_column_int64(st, 9),
	};

	return l->instance(l->arg, &ir);
}

/* Values come as NUL-terminated text (column_text on a BLOB adds the NUL
 * without conversion) so callers may treat them as C strings. */
static int row_config(sq_store *s, sqlite3_stmt *st, const gl_store_loader *l)
{
	const char *v = col_text(st, 2);

	return l->config(l->arg, col_text(st, 0), col_text(st, 1), v,
	                 (size_t)sqlite3_column_bytes(st, 2), sqlite3_column_int64(st, 3));
}

static int row_device(sq_store *s, sqlite3_stmt *st, const gl_store_loader *l)
{
	const char *v = col_text(st, 2);

	return l->device(l->arg, col_text(st, 0), col_text(st, 1), v,
	                 (size_t)sqlite3_column_bytes(st, 2), sqlite3_column_int64(st, 3));
}

static int row_seq(sq_store *s, sqlite3_stmt *st, const gl_store_loader *l)
{
	return l->seq(l->arg, col_text(st, 0), (uint64_t)sqlite3_column_int64(st, 1));
}

static int load_rows(sq_store *s, const char *sql, row_fn fn, const gl_store_loader *l)
{
	sqlite3_stmt *st = NULL;
	int rc, r = 0;

	rc = sqlite3_prepare_v2(s->db, sql, -1, &st, NULL);
	if (rc != SQLITE_OK) {
		set_err(s, "%s: load: %s", s->path, sqlite3_errmsg(s->db));
		return -EIO;
	}
	while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
		r = fn(s, st, l);
		if (r != 0)
			break;
	}
	if (r == 0 && rc != SQLITE_DONE) {
		set_err(s, "%s: load: %s", s->path, sqlite3_errmsg(s->db));
		r = (rc & 0xff) == SQLITE_NOMEM ? -ENOMEM : -EIO;
	}
	sqlite3_finalize(st);
	return r;
}

static int sq_load(gl_store *base, const gl_store_loader *l)
{
	sq_store *s = (sq_store *)base;
	int r = 0;

	/* One read transaction, so the four passes see one state. */
	if (exec_sql(s, "BEGIN") != SQLITE_OK)
		return -EIO;
	if (l->instance)
		r = load_rows(s,
		              "SELECT name, type, state, guest_state, init_pid, cgroup,"
		              " vsock_cid, vsock_uds, ctime, mtime FROM instances ORDER BY name",
		              row_instance, l);
	if (r == 0 && l->config)
		r = load_rows(s, "SELECT instance, key, value, mtime FROM config", row_config, l);
	if (r == 0 && l->device)
		r = load_rows(s, "SELECT instance, key, value, mtime FROM devices", row_device, l);
	if (r == 0 && l->seq)
		/* one index probe per instance, not a scan of every event row */
		r = load_rows(s,
		              "SELECT name, s FROM (SELECT name, (SELECT max(seq) FROM events "
		              "WHERE instance = name) AS s FROM instances) WHERE s IS NOT NULL",
		              row_seq, l);
	sqlite3_exec(s->db, "COMMIT", NULL, NULL, NULL);
	return r;
}

/* ---- close --------------------------------------------------------------- */

static void sq_close(gl_store *base)
{
	sq_free((sq_store *)base);
}

static const gl_store_ops sq_ops = {
	.commit = sq_commit,
	.write = sq_write,
	.sync = sq_sync,
	.load = sq_load,
	.close = sq_close,
};
