/* The model: commit pipeline, overlay staging, events, subscribers,
 * persistence through the SQLite store. */
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h>
#include <uv.h>

#include "core/model.h"
#include "tests/unit/fake_store.h"
#include "tests/unit/unit.h"

/* ---- helpers ------------------------------------------------------------ */

typedef struct done {
	int calls;
	int status;
} done;

static void done_cb(void *arg, int status)
{
	done *d = arg;

	d->calls++;
	d->status = status;
}

static uv_loop_t loop;
static fake_store fstore;

static gl_model *open_fake(const gl_limits *lim)
{
	char err[256];
	gl_model *m;

	fake_store_reset(&fstore);
	ck_assert_int_eq(uv_loop_init(&loop), 0);
	m = gl_model_open(&loop, &fstore.base, lim, err, sizeof(err));
	ck_assert_msg(m != NULL, "%s", err);
	return m;
}

/* The same over the split store (write, then sync), which the model
 * pipelines. */
static gl_model *open_split(void)
{
	char err[256];
	gl_model *m;

	fake_store_reset(&fstore);
	fstore.base.ops = &fake_split_ops;
	ck_assert_int_eq(uv_loop_init(&loop), 0);
	m = gl_model_open(&loop, &fstore.base, NULL, err, sizeof(err));
	ck_assert_msg(m != NULL, "%s", err);
	return m;
}

/* Turn the loop until the split store has seen `n` writes (5 s at most). */
static void run_until_writes(int n)
{
	for (int k = 0; k < 5000 && fake_count(&fstore, &fstore.commits) < n; k++) {
		uv_run(&loop, UV_RUN_NOWAIT);
		usleep(1000);
	}
	ck_assert_int_eq(fake_count(&fstore, &fstore.commits), n);
}

/* Turn the loop for about `ms` milliseconds. */
static void run_for(int ms)
{
	for (int k = 0; k < ms; k++) {
		uv_run(&loop, UV_RUN_NOWAIT);
		usleep(1000);
	}
}

static void close_all(gl_model *m)
{
	gl_model_close(m);
	uv_run(&loop, UV_RUN_DEFAULT);
	ck_assert_int_eq(uv_loop_close(&loop), 0);
}

static int submit(gl_model *m, gl_op_kind kind, const char *inst, const char *key,
		  const char *value, done *d)
{
	gl_op op = {.kind = kind,
		    .instance = inst,
		    .ilen = strlen(inst),
		    .key = key,
		    .klen = key ? strlen(key) : 0,
		    .value = value,
		    .vlen = value ? strlen(value) : 0};

	return gl_model_submit(m, &op, done_cb, d);
}

static int submit_attr(gl_model *m, const char *inst, gl_attr a, const char *value,
		       gl_origin origin, done *d)
{
	gl_op op = {.kind = GL_OP_ATTR_SET,
		    .origin = origin,
		    .attr = a,
		    .instance = inst,
		    .ilen = strlen(inst),
		    .value = value,
		    .vlen = strlen(value)};

	return gl_model_submit(m, &op, done_cb, d);
}

/* Run the loop until every op submitted so far has been answered. */
static void settle(void)
{
	for (int k = 0; k < 100; k++)
		uv_run(&loop, UV_RUN_NOWAIT);
	uv_run(&loop, UV_RUN_DEFAULT);
}

static void do_ok(gl_model *m, gl_op_kind kind, const char *inst, const char *key,
		  const char *value)
{
	done d = {0};

	ck_assert_int_eq(submit(m, kind, inst, key, value, &d), 0);
	settle();
	ck_assert_int_eq(d.calls, 1);
	ck_assert_int_eq(d.status, 0);
}

typedef struct sink {
	int notified;
} sink;

static void sink_notify(gl_sub *s, void *arg)
{
	((sink *)arg)->notified++;
}

/* Pop the next event line, or "" if none. */
static const char *next_line(gl_sub *s, char *buf, size_t len, uint64_t *seq)
{
	const gl_event *ev = gl_sub_peek(s);

	buf[0] = '\0';
	if (!ev)
		return buf;
	snprintf(buf, len, "%.*s", (int)ev->line_len, ev->line);
	if (seq)
		*seq = ev->seq;
	gl_sub_pop(s);
	return buf;
}

/* The metadata part of an event line (the timestamp varies). */
static const char *meta_of(const char *line)
{
	const char *p = strstr(line, "\"metadata\":");

	return p ? p : "";
}

/* ---- cases -------------------------------------------------------------- */

START_TEST(create_and_read)
{
	gl_model *m = open_fake(NULL);
	gl_instance *i;
	const gl_entry *e;
	gl_buf b = GL_BUF_INIT;

	do_ok(m, GL_OP_CREATE, "c1", NULL, NULL);
	do_ok(m, GL_OP_CONFIG_SET, "c1", "user.foo", "bar");
	i = gl_model_find(m, "c1");
	ck_assert_ptr_nonnull(i);
	ck_assert(!gl_instance_is_vm(i));
	e = gl_instance_config_get(i, "user.foo", 8);
	ck_assert_ptr_nonnull(e);
	ck_assert_uint_eq(e->len, 3);
	ck_assert_str_eq(e->value, "bar");
	e = gl_instance_config_get(i, "volatile.cloud-init.instance-id", 31);
	ck_assert_ptr_nonnull(e);
	ck_assert_uint_eq(e->len, 36);
	ck_assert_int_eq(e->value[14], '4'); /* UUID v4 */

	ck_assert_int_eq(gl_instance_attr(i, GL_ATTR_STATE, &b), 0);
	ck_assert_str_eq(b.data, "Stopped");
	ck_assert_str_eq(gl_instance_guest_state(i), "");
	gl_buf_free(&b);
	close_all(m);
}
END_TEST

START_TEST(callbacks_never_synchronous)
{
	gl_model *m = open_fake(NULL);
	done d = {0};

	ck_assert_int_eq(submit(m, GL_OP_CREATE, "c1", NULL, NULL, &d), 0);
	ck_assert_int_eq(d.calls, 0);
	/* an op that fails in staging is also answered later, not now */
	done e = {0};
	ck_assert_int_eq(submit(m, GL_OP_CONFIG_UNSET, "c1", "user.none", NULL, &e), 0);
	ck_assert_int_eq(e.calls, 0);
	settle();
	ck_assert_int_eq(d.calls, 1);
	ck_assert_int_eq(e.calls, 1);
	ck_assert_int_eq(e.status, -ENOENT);
	close_all(m);
}
END_TEST

START_TEST(invalid_on_its_face)
{
	gl_limits lim;
	gl_model *m;
	done d = {0};
	static char big[2000];

	gl_limits_default(&lim);
	lim.max_value = 1000;
	m = open_fake(&lim);
	memset(big, 'x', sizeof(big) - 1);
	ck_assert_int_eq(submit(m, GL_OP_CREATE, "1bad", NULL, NULL, &d), -EINVAL);
	ck_assert_int_eq(submit(m, GL_OP_CREATE, "bad_", NULL, NULL, &d), -EINVAL);
	ck_assert_int_eq(submit(m, GL_OP_CONFIG_SET, "c1", "nodot", "v", &d), -EINVAL);
	ck_assert_int_eq(submit(m, GL_OP_CONFIG_SET, "c1", "user.a/b", "v", &d), -EINVAL);
	ck_assert_int_eq(submit(m, GL_OP_CONFIG_SET, "c1", "user.big", big, &d), -EFBIG);
	ck_assert_int_eq(submit(m, GL_OP_DEVICE_SET, "c1", "d", "[1]", &d), -EINVAL);
	ck_assert_int_eq(submit(m, GL_OP_DEVICE_SET, "c1", "d", "{\"path\":\"/x\"}", &d), -EINVAL);
	ck_assert_int_eq(submit_attr(m, "c1", GL_ATTR_TYPE, "vm", GL_ORIGIN_HOST, &d), -EINVAL);
	ck_assert_int_eq(submit_attr(m, "c1", GL_ATTR_STATE, "ready", GL_ORIGIN_HOST, &d), -EINVAL);
	ck_assert_int_eq(submit_attr(m, "c1", GL_ATTR_INIT_PID, "0", GL_ORIGIN_HOST, &d), -EINVAL);
	ck_assert_int_eq(submit_attr(m, "c1", GL_ATTR_INIT_PID, "12a", GL_ORIGIN_HOST, &d), -EINVAL);
	ck_assert_int_eq(submit_attr(m, "c1", GL_ATTR_VSOCK_CID, "2", GL_ORIGIN_HOST, &d), -EINVAL);
	ck_assert_int_eq(submit_attr(m, "c1", GL_ATTR_CGROUP, "rel/path", GL_ORIGIN_HOST, &d),
			 -EINVAL);
	ck_assert_int_eq(submit_attr(m, "c1", GL_ATTR_CGROUP, "/a/../b", GL_ORIGIN_HOST, &d),
			 -EINVAL);
	ck_assert_int_eq(submit_attr(m, "c1", GL_ATTR_AGENT, "online", GL_ORIGIN_HOST, &d), -EINVAL);
	settle();
	ck_assert_int_eq(d.calls, 0);
	ck_assert_int_eq(fstore.commits, 0);
	close_all(m);
}
END_TEST

START_TEST(staging_errors)
{
	gl_model *m = open_fake(NULL);
	done a = {0}, b = {0}, c = {0}, e = {0};

	do_ok(m, GL_OP_CREATE, "c1", NULL, NULL);
	submit(m, GL_OP_CREATE, "c1", NULL, NULL, &a);
	submit(m, GL_OP_CONFIG_SET, "nope", "user.a", "1", &b);
	submit(m, GL_OP_DEVICE_UNSET, "c1", "eth0", NULL, &c);
	submit(m, GL_OP_DELETE, "nope", NULL, NULL, &e);
	settle();
	ck_assert_int_eq(a.status, -EEXIST);
	ck_assert_int_eq(b.status, -ENOENT);
	ck_assert_int_eq(c.status, -ENOENT);
	ck_assert_int_eq(e.status, -ENOENT);
	close_all(m);
}
END_TEST

START_TEST(group_commit_one_batch)
{
	gl_model *m = open_fake(NULL);
	done d[8] = {{0}};
	char key[32];

	do_ok(m, GL_OP_CREATE, "c1", NULL, NULL);
	fstore.commits = 0;
	for (int k = 0; k < 8; k++) {
		snprintf(key, sizeof(key), "user.k%d", k);
		ck_assert_int_eq(submit(m, GL_OP_CONFIG_SET, "c1", key, "v", &d[k]), 0);
	}
	settle();
	ck_assert_int_eq(fstore.commits, 1); /* eight writers, one transaction */
	for (int k = 0; k < 8; k++)
		ck_assert_int_eq(d[k].status, 0);
	close_all(m);
}
END_TEST

START_TEST(overlay_within_batch)
{
	gl_model *m = open_fake(NULL);
	gl_sub *s;
	sink sk = {0};
	done d[5] = {{0}};
	char line[512];
	uint64_t seq = 0;

	do_ok(m, GL_OP_CREATE, "c1", NULL, NULL);
	s = gl_sub_new(m, gl_model_find(m, "c1"), GL_EV_ALL, sink_notify, &sk);
	/* all in one loop turn: one batch, each op staged on the ones before */
	submit(m, GL_OP_CONFIG_SET, "c1", "user.a", "1", &d[0]);
	submit(m, GL_OP_CONFIG_SET, "c1", "user.a", "2", &d[1]);
	submit(m, GL_OP_CONFIG_SET, "c1", "user.a", "2", &d[2]); /* no change: no event */
	submit(m, GL_OP_CONFIG_UNSET, "c1", "user.a", NULL, &d[3]);
	submit(m, GL_OP_CONFIG_UNSET, "c1", "user.a", NULL, &d[4]); /* already gone */
	settle();
	ck_assert_int_eq(d[3].status, 0);
	ck_assert_int_eq(d[4].status, -ENOENT);
	ck_assert_int_eq(sk.notified, 1);
	ck_assert_str_eq(meta_of(next_line(s, line, sizeof(line), &seq)),
			 "\"metadata\":{\"key\":\"user.a\",\"old_value\":\"\",\"value\":\"1\"}}\n");
	ck_assert_uint_eq(seq, 2); /* 1 was instance-created */
	ck_assert_str_eq(meta_of(next_line(s, line, sizeof(line), &seq)),
			 "\"metadata\":{\"key\":\"user.a\",\"old_value\":\"1\",\"value\":\"2\"}}\n");
	ck_assert_uint_eq(seq, 3);
	ck_assert_str_eq(meta_of(next_line(s, line, sizeof(line), &seq)),
			 "\"metadata\":{\"key\":\"user.a\",\"old_value\":\"2\",\"value\":\"\"}}\n");
	ck_assert_uint_eq(seq, 4);
	ck_assert_str_eq(next_line(s, line, sizeof(line), NULL), "");
	ck_assert_ptr_null(gl_instance_config_get(gl_model_find(m, "c1"), "user.a", 6));
	ck_assert_uint_eq(gl_instance_seq(gl_model_find(m, "c1")), 4);
	gl_sub_free(s);
	close_all(m);
}
END_TEST

START_TEST(event_shapes)
{
	gl_model *m = open_fake(NULL);
	gl_sub *s, *g;
	char line[1024];
	const gl_event *ev;

	do_ok(m, GL_OP_CREATE, "c1", NULL, NULL);
	s = gl_sub_new(m, gl_model_find(m, "c1"), GL_EV_CONFIG | GL_EV_DEVICE, NULL, NULL);
	g = gl_sub_new(m, NULL, GL_EV_ALL, NULL, NULL);
	do_ok(m, GL_OP_CONFIG_SET, "c1", "user.x", "<a&b>");
	do_ok(m, GL_OP_CONFIG_SET, "c1", "cloud-init.user-data", "#cloud-config");
	do_ok(m, GL_OP_CONFIG_SET, "c1", "security.nesting", "true");
	do_ok(m, GL_OP_DEVICE_SET, "c1", "zero", "{\"type\":\"unix-char\",\"path\":\"/dev/zero\"}");
	do_ok(m, GL_OP_DEVICE_SET, "c1", "zero",
	      "{\"type\":\"unix-char\",\"path\":\"/dev/zero\"}"); /* same: nothing */
	do_ok(m, GL_OP_DEVICE_SET, "c1", "zero",
	      "{\"path\":\"/dev/zero2\",\"type\":\"unix-char\",\"mode\":\"0600\"}");
	do_ok(m, GL_OP_DEVICE_UNSET, "c1", "zero", NULL);

	ck_assert_str_eq(meta_of(next_line(s, line, sizeof(line), NULL)),
			 "\"metadata\":{\"key\":\"user.x\",\"old_value\":\"\",\"value\":"
			 "\"\\u003ca\\u0026b\\u003e\"}}\n");
	next_line(s, line, sizeof(line), NULL);
	ck_assert_str_eq(meta_of(line), "\"metadata\":{\"action\":\"added\",\"config\":{\"path\":"
					"\"/dev/zero\",\"type\":\"unix-char\"},\"name\":\"zero\"}}\n");
	ck_assert(strncmp(line, "{\"type\":\"device\",\"timestamp\":\"", 30) == 0);
	next_line(s, line, sizeof(line), NULL);
	ck_assert_str_eq(meta_of(line), "\"metadata\":{\"action\":\"removed\",\"config\":{\"path\":"
					"\"/dev/zero\",\"type\":\"unix-char\"},\"name\":\"zero\"}}\n");
	next_line(s, line, sizeof(line), NULL);
	ck_assert_str_eq(meta_of(line),
			 "\"metadata\":{\"action\":\"added\",\"config\":{\"mode\":\"0600\",\"path\":"
			 "\"/dev/zero2\",\"type\":\"unix-char\"},\"name\":\"zero\"}}\n");
	next_line(s, line, sizeof(line), NULL);
	ck_assert(strstr(line, "\"action\":\"removed\"") != NULL);
	ck_assert_str_eq(next_line(s, line, sizeof(line), NULL), "");

	/* the global stream has lifecycle events and the instance name */
	ev = gl_sub_peek(g);
	ck_assert_ptr_nonnull(ev);
	ck_assert_int_eq(ev->type, GL_EV_CONFIG);
	ck_assert(strstr(ev->gline, ",\"instance\":\"c1\"}\n") != NULL);
	gl_sub_pop(g);
	ev = gl_sub_peek(g);
	ck_assert_int_eq(ev->type, GL_EV_LIFECYCLE); /* cloud-init.* is no config event */
	ck_assert(strstr(ev->line, "\"action\":\"instance-updated\"") != NULL);
	gl_sub_free(s);
	gl_sub_free(g);
	close_all(m);
}
END_TEST

START_TEST(state_and_guest_state)
{
	gl_model *m = open_fake(NULL);
	gl_instance *i;
	done d = {0};
	gl_sub *s;
	char line[512];

	do_ok(m, GL_OP_CREATE, "c1", NULL, NULL);
	s = gl_sub_new(m, gl_model_find(m, "c1"), GL_EV_ALL, NULL, NULL);
	submit_attr(m, "c1", GL_ATTR_STATE, "Started", GL_ORIGIN_HOST, &d);
	settle();
	i = gl_model_find(m, "c1");
	ck_assert_str_eq(gl_instance_guest_state(i), "");
	submit_attr(m, "c1", GL_ATTR_STATE, "Ready", GL_ORIGIN_GUEST, &d);
	settle();
	ck_assert_str_eq(gl_instance_guest_state(i), "Ready");
	submit_attr(m, "c1", GL_ATTR_STATE, "Stopped", GL_ORIGIN_DAEMON, &d);
	settle();
	ck_assert_str_eq(gl_instance_guest_state(i), "");
	ck_assert(strstr(next_line(s, line, sizeof(line), NULL), "instance-started"));
	ck_assert(strstr(next_line(s, line, sizeof(line), NULL), "instance-ready"));
	ck_assert(strstr(next_line(s, line, sizeof(line), NULL), "instance-stopped"));
	submit_attr(m, "c1", GL_ATTR_TYPE, "virtual-machine", GL_ORIGIN_HOST, &d);
	submit_attr(m, "c1", GL_ATTR_VSOCK_CID, "42", GL_ORIGIN_HOST, &d);
	settle();
	ck_assert(gl_instance_is_vm(i));
	gl_buf b = GL_BUF_INIT;
	gl_instance_attr(i, GL_ATTR_VSOCK_CID, &b);
	ck_assert_str_eq(b.data, "42");
	gl_buf_free(&b);
	gl_sub_free(s);
	close_all(m);
}
END_TEST

START_TEST(store_failure_changes_nothing)
{
	gl_model *m = open_fake(NULL);
	gl_sub *s;
	done a = {0}, b = {0};

	do_ok(m, GL_OP_CREATE, "c1", NULL, NULL);
	do_ok(m, GL_OP_CONFIG_SET, "c1", "user.a", "old");
	s = gl_sub_new(m, gl_model_find(m, "c1"), GL_EV_ALL, NULL, NULL);
	fstore.fail = -ENOSPC;
	submit(m, GL_OP_CONFIG_SET, "c1", "user.a", "new", &a);
	submit(m, GL_OP_CREATE, "c2", NULL, NULL, &b);
	settle();
	ck_assert_int_eq(a.status, -ENOSPC);
	ck_assert_int_eq(b.status, -ENOSPC);
	ck_assert_str_eq(gl_instance_config_get(gl_model_find(m, "c1"), "user.a", 6)->value, "old");
	ck_assert_ptr_null(gl_model_find(m, "c2"));
	ck_assert_ptr_null(gl_sub_peek(s));
	ck_assert_uint_eq(gl_instance_seq(gl_model_find(m, "c1")), 2);
	/* and the sequence resumes without a hole once the disk has room */
	fstore.fail = 0;
	do_ok(m, GL_OP_CONFIG_SET, "c1", "user.a", "new");
	ck_assert_uint_eq(gl_sub_peek(s)->seq, 3);
	gl_sub_free(s);
	close_all(m);
}
END_TEST

/* ---- the pipeline (a store with separate write and sync) ----------------- */

/* A batch is written while the one before it is still syncing, staged over
 * it; neither is seen, evented or answered before both are durable. */
START_TEST(pipeline_stages_over_unsynced)
{
	gl_model *m = open_split();
	gl_sub *s;
	done a = {0}, b = {0};
	char line[512];
	uint64_t seq = 0;

	do_ok(m, GL_OP_CREATE, "c1", NULL, NULL);
	s = gl_sub_new(m, gl_model_find(m, "c1"), GL_EV_ALL, NULL, NULL);
	fake_hold(&fstore, true);
	submit(m, GL_OP_CONFIG_SET, "c1", "user.a", "1", &a);
	run_until_writes(2);
	submit(m, GL_OP_CONFIG_SET, "c1", "user.a", "2", &b);
	run_until_writes(3); /* written while the first is held in its sync */
	run_for(20);
	ck_assert_int_eq(a.calls + b.calls, 0);
	ck_assert_ptr_null(gl_instance_config_get(gl_model_find(m, "c1"), "user.a", 6));
	ck_assert_ptr_null(gl_sub_peek(s));
	fake_hold(&fstore, false);
	settle();
	ck_assert_int_eq(a.calls, 1);
	ck_assert_int_eq(a.status, 0);
	ck_assert_int_eq(b.calls, 1);
	ck_assert_int_eq(b.status, 0);
	ck_assert_str_eq(gl_instance_config_get(gl_model_find(m, "c1"), "user.a", 6)->value, "2");
	/* the second was staged over the first: its old value is "1" */
	ck_assert_str_eq(meta_of(next_line(s, line, sizeof(line), &seq)),
			 "\"metadata\":{\"key\":\"user.a\",\"old_value\":\"\",\"value\":\"1\"}}\n");
	ck_assert_uint_eq(seq, 2);
	ck_assert_str_eq(meta_of(next_line(s, line, sizeof(line), &seq)),
			 "\"metadata\":{\"key\":\"user.a\",\"old_value\":\"1\",\"value\":\"2\"}}\n");
	ck_assert_uint_eq(seq, 3);
	gl_sub_free(s);
	close_all(m);
}
END_TEST

/* A batch staged over one whose sync then fails fails with it, even though
 * its own sync worked: nothing of either is applied or evented. */
START_TEST(pipeline_sync_failure_fails_later_batches)
{
	gl_model *m = open_split();
	gl_sub *s;
	done a = {0}, b = {0}, c = {0};

	do_ok(m, GL_OP_CREATE, "c1", NULL, NULL);
	s = gl_sub_new(m, gl_model_find(m, "c1"), GL_EV_ALL, NULL, NULL);
	fake_hold(&fstore, true);
	fstore.fail = -EIO;
	fstore.fail_sync_at = 2; /* the first batch below */
	submit(m, GL_OP_CONFIG_SET, "c1", "user.a", "1", &a);
	run_until_writes(2);
	submit(m, GL_OP_CONFIG_SET, "c1", "user.b", "1", &b);
	run_until_writes(3);
	fake_hold(&fstore, false);
	settle();
	ck_assert_int_eq(fake_count(&fstore, &fstore.syncs), 3);
	ck_assert_int_eq(a.status, -EIO);
	ck_assert_int_eq(b.calls, 1);
	ck_assert_int_eq(b.status, -EIO);
	ck_assert_ptr_null(gl_instance_config_get(gl_model_find(m, "c1"), "user.a", 6));
	ck_assert_ptr_null(gl_instance_config_get(gl_model_find(m, "c1"), "user.b", 6));
	ck_assert_ptr_null(gl_sub_peek(s));
	ck_assert_uint_eq(gl_instance_seq(gl_model_find(m, "c1")), 1);
	/* what comes after is staged on the durable state again */
	submit(m, GL_OP_CONFIG_UNSET, "c1", "user.a", NULL, &c);
	settle();
	ck_assert_int_eq(c.status, -ENOENT);
	do_ok(m, GL_OP_CONFIG_SET, "c1", "user.a", "x");
	ck_assert_uint_eq(gl_sub_peek(s)->seq, 2);
	gl_sub_free(s);
	close_all(m);
}
END_TEST

/* A batch whose write failed is not part of the overlay of the next one. */
START_TEST(pipeline_failed_write_not_staged_over)
{
	gl_model *m = open_split();
	done a = {0}, b = {0};

	do_ok(m, GL_OP_CREATE, "c1", NULL, NULL);
	fake_hold(&fstore, true);
	fstore.fail = -ENOSPC;
	fstore.fail_write_at = 2;
	submit(m, GL_OP_CONFIG_SET, "c1", "user.a", "1", &a);
	run_until_writes(2);
	submit(m, GL_OP_CONFIG_UNSET, "c1", "user.a", NULL, &b);
	run_for(20);
	fake_hold(&fstore, false);
	settle();
	ck_assert_int_eq(a.status, -ENOSPC);
	ck_assert_int_eq(b.status, -ENOENT); /* user.a never existed */
	close_all(m);
}
END_TEST

/* At most MAX_INFLIGHT (4) batches are written and unsynced; the next
 * waits, and every op is answered in order once the syncs go through. */
START_TEST(pipeline_bounded_and_ordered)
{
	gl_model *m = open_split();
	done d[6] = {{0}};
	char key[32];

	do_ok(m, GL_OP_CREATE, "c1", NULL, NULL);
	fake_hold(&fstore, true);
	for (int k = 0; k < 6; k++) {
		snprintf(key, sizeof(key), "user.k%d", k);
		submit(m, GL_OP_CONFIG_SET, "c1", key, "v", &d[k]);
		if (k < 4)
			run_until_writes(k + 2);
	}
	run_for(50);
	ck_assert_int_eq(fake_count(&fstore, &fstore.commits), 5); /* 1 + 4 */
	fake_hold(&fstore, false);
	settle();
	for (int k = 0; k < 6; k++) {
		ck_assert_int_eq(d[k].calls, 1);
		ck_assert_int_eq(d[k].status, 0);
	}
	ck_assert_uint_eq(gl_instance_seq(gl_model_find(m, "c1")), 7);
	close_all(m);
}
END_TEST

/* Closing with batches in flight waits for them and answers them in order. */
static int close_order[3], close_n;

static void order_cb(void *arg, int status)
{
	close_order[close_n++] = (int)(intptr_t)arg * (status ? -1 : 1);
}

START_TEST(pipeline_close_reports_in_order)
{
	gl_model *m = open_split();
	gl_op op = {.kind = GL_OP_CONFIG_SET, .instance = "c1", .ilen = 2, .key = "user.a",
		    .klen = 6, .value = "v", .vlen = 1};

	do_ok(m, GL_OP_CREATE, "c1", NULL, NULL);
	close_n = 0;
	fake_hold(&fstore, true);
	ck_assert_int_eq(gl_model_submit(m, &op, order_cb, (void *)(intptr_t)1), 0);
	run_until_writes(2);
	op.key = "user.b";
	ck_assert_int_eq(gl_model_submit(m, &op, order_cb, (void *)(intptr_t)2), 0);
	run_until_writes(3);
	op.key = "user.c";
	ck_assert_int_eq(gl_model_submit(m, &op, order_cb, (void *)(intptr_t)3), 0);
	fake_hold(&fstore, false);
	gl_model_close(m); /* the third is still queued: cancelled */
	ck_assert_int_eq(close_n, 3);
	ck_assert_int_eq(close_order[0], 1);
	ck_assert_int_eq(close_order[1], 2);
	ck_assert_int_eq(close_order[2], -3);
	uv_run(&loop, UV_RUN_DEFAULT);
	ck_assert_int_eq(uv_loop_close(&loop), 0);
}
END_TEST

START_TEST(slow_subscriber_dropped)
{
	gl_limits lim;
	gl_model *m;
	gl_sub *slow, *fast;
	sink sk = {0};
	char v[32];
	int got = 0;

	gl_limits_default(&lim);
	lim.max_sub_bytes = 2000;
	m = open_fake(&lim);
	do_ok(m, GL_OP_CREATE, "c1", NULL, NULL);
	slow = gl_sub_new(m, gl_model_find(m, "c1"), GL_EV_ALL, sink_notify, &sk);
	fast = gl_sub_new(m, gl_model_find(m, "c1"), GL_EV_ALL, NULL, NULL);
	for (int k = 0; k < 100; k++) {
		snprintf(v, sizeof(v), "%d", k);
		do_ok(m, GL_OP_CONFIG_SET, "c1", "user.n", v);
		while (gl_sub_peek(fast)) {
			gl_sub_pop(fast);
			got++;
		}
	}
	ck_assert_int_eq(got, 100);
	ck_assert_int_eq(gl_sub_status_get(slow), GL_SUB_DROPPED);
	ck_assert_ptr_null(gl_sub_peek(slow));
	ck_assert_int_eq(sk.notified, 2); /* first event, then the drop */
	ck_assert_int_eq(gl_sub_status_get(fast), GL_SUB_LIVE);
	gl_sub_free(slow);
	gl_sub_free(fast);
	close_all(m);
}
END_TEST

START_TEST(delete_ends_subscribers)
{
	gl_model *m = open_fake(NULL);
	gl_sub *s, *g;
	sink sk = {0};
	char line[512];

	do_ok(m, GL_OP_CREATE, "c1", NULL, NULL);
	s = gl_sub_new(m, gl_model_find(m, "c1"), GL_EV_ALL, sink_notify, &sk);
	g = gl_sub_new(m, NULL, GL_EV_ALL, NULL, NULL);
	do_ok(m, GL_OP_DELETE, "c1", NULL, NULL);
	ck_assert_ptr_null(gl_model_find(m, "c1"));
	ck_assert_int_eq(gl_sub_status_get(s), GL_SUB_ENDED);
	ck_assert(strstr(next_line(s, line, sizeof(line), NULL), "instance-deleted"));
	ck_assert_ptr_null(gl_sub_peek(s));
	ck_assert(gl_sub_peek(g) != NULL);
	ck_assert_int_eq(gl_sub_status_get(g), GL_SUB_LIVE);
	/* re-created: a new instance, new uid, sequence from 1 */
	do_ok(m, GL_OP_CREATE, "c1", NULL, NULL);
	ck_assert_uint_eq(gl_instance_seq(gl_model_find(m, "c1")), 1);
	gl_sub_free(s);
	gl_sub_free(g);
	close_all(m);
}
END_TEST

START_TEST(resume_since)
{
	gl_limits lim;
	gl_model *m;
	gl_sub *s;
	bool gap;
	char v[16];

	gl_limits_default(&lim);
	lim.history = 8;
	m = open_fake(&lim);
	do_ok(m, GL_OP_CREATE, "c1", NULL, NULL);
	for (int k = 0; k < 5; k++) {
		snprintf(v, sizeof(v), "%d", k);
		do_ok(m, GL_OP_CONFIG_SET, "c1", "user.n", v);
	}
	/* seq is now 6; resume after 4 gets 5 and 6 */
	s = gl_sub_new_since(m, gl_model_find(m, "c1"), GL_EV_ALL, 4, &gap, NULL, NULL);
	ck_assert(!gap);
	ck_assert_uint_eq(gl_sub_peek(s)->seq, 5);
	gl_sub_pop(s);
	ck_assert_uint_eq(gl_sub_peek(s)->seq, 6);
	gl_sub_pop(s);
	ck_assert_ptr_null(gl_sub_peek(s));
	gl_sub_free(s);
	for (int k = 0; k < 20; k++) {
		snprintf(v, sizeof(v), "x%d", k);
		do_ok(m, GL_OP_CONFIG_SET, "c1", "user.n", v);
	}
	s = gl_sub_new_since(m, gl_model_find(m, "c1"), GL_EV_ALL, 2, &gap, NULL, NULL);
	ck_assert(gap);
	ck_assert_uint_eq(gl_sub_peek(s)->seq, 26 - 8 + 1);
	gl_sub_free(s);
	close_all(m);
}
END_TEST

START_TEST(meta_data_composition)
{
	gl_model *m = open_fake(NULL);
	gl_buf b = GL_BUF_INIT;
	gl_instance *i;
	char want[256];

	do_ok(m, GL_OP_CREATE, "c1", NULL, NULL);
	i = gl_model_find(m, "c1");
	gl_instance_meta_data(i, &b);
	snprintf(want, sizeof(want), "#cloud-config\ninstance-id: %s\nlocal-hostname: c1\n",
		 gl_instance_config_get(i, "volatile.cloud-init.instance-id", 31)->value);
	ck_assert_str_eq(b.data, want);
	gl_buf_reset(&b);
	do_ok(m, GL_OP_CONFIG_SET, "c1", "user.meta-data", "foo: meta\nbar: 2");
	do_ok(m, GL_OP_CONFIG_SET, "c1", "volatile.cloud-init.instance-id", "iid-1");
	gl_instance_meta_data(gl_model_find(m, "c1"), &b);
	ck_assert_str_eq(b.data, "#cloud-config\ninstance-id: iid-1\nlocal-hostname: c1\n"
				 "foo: meta\nbar: 2");
	gl_buf_free(&b);
	close_all(m);
}
END_TEST

typedef struct obs_log {
	int added, removed, config, attr;
} obs_log;

static void obs_fn(void *arg, const gl_change *c)
{
	obs_log *l = arg;

	switch (c->kind) {
	case GL_CHANGE_INSTANCE_ADDED: l->added++; break;
	case GL_CHANGE_INSTANCE_REMOVED: l->removed++; break;
	case GL_CHANGE_CONFIG: l->config++; break;
	case GL_CHANGE_ATTR: l->attr++; break;
	default: break;
	}
}

START_TEST(observers)
{
	gl_model *m = open_fake(NULL);
	obs_log l = {0};
	done d = {0};

	gl_model_observe(m, obs_fn, &l);
	do_ok(m, GL_OP_CREATE, "c1", NULL, NULL);
	do_ok(m, GL_OP_CONFIG_SET, "c1", "user.a", "1");
	do_ok(m, GL_OP_CONFIG_SET, "c1", "user.a", "1"); /* no change, no observer call */
	submit_attr(m, "c1", GL_ATTR_INIT_PID, "123", GL_ORIGIN_HOST, &d);
	settle();
	do_ok(m, GL_OP_DELETE, "c1", NULL, NULL);
	ck_assert_int_eq(l.added, 1);
	ck_assert_int_eq(l.config, 1);
	ck_assert_int_eq(l.attr, 1);
	ck_assert_int_eq(l.removed, 1);
	gl_model_unobserve(m, obs_fn, &l);
	close_all(m);
}
END_TEST

START_TEST(close_cancels_queued)
{
	gl_model *m = open_fake(NULL);
	done a = {0};

	submit(m, GL_OP_CREATE, "c1", NULL, NULL, &a);
	gl_model_close(m);
	ck_assert_int_eq(a.calls, 1);
	ck_assert_int_eq(a.status, -ECANCELED);
	uv_run(&loop, UV_RUN_DEFAULT);
	ck_assert_int_eq(uv_loop_close(&loop), 0);
}
END_TEST

/* ---- persistence through SQLite ----------------------------------------- */

static gl_model *open_sqlite(const char *dir, gl_store **st)
{
	char err[512];
	gl_model *m;

	ck_assert_msg(gl_store_sqlite_open(dir, st, err, sizeof(err)) == 0, "%s", err);
	ck_assert_int_eq(uv_loop_init(&loop), 0);
	m = gl_model_open(&loop, *st, NULL, err, sizeof(err));
	ck_assert_msg(m != NULL, "%s", err);
	return m;
}

START_TEST(persists_across_reopen)
{
	char *dir = unit_tmpdir();
	gl_store *st;
	gl_model *m = open_sqlite(dir, &st);
	gl_instance *i;
	char id[64];
	done d = {0};

	do_ok(m, GL_OP_CREATE, "c1", NULL, NULL);
	do_ok(m, GL_OP_CREATE, "vm1", NULL, "virtual-machine");
	do_ok(m, GL_OP_CONFIG_SET, "c1", "user.foo", "bar\n\001baz");
	do_ok(m, GL_OP_CONFIG_SET, "c1", "user.zz", "");
	do_ok(m, GL_OP_DEVICE_SET, "c1", "share", "{\"type\":\"disk\",\"path\":\"/mnt\"}");
	submit_attr(m, "c1", GL_ATTR_STATE, "Ready", GL_ORIGIN_GUEST, &d);
	submit_attr(m, "vm1", GL_ATTR_VSOCK_UDS, "/run/vm1.sock", GL_ORIGIN_HOST, &d);
	settle();
	snprintf(id, sizeof(id), "%s",
		 gl_instance_config_get(gl_model_find(m, "c1"), "volatile.cloud-init.instance-id",
					31)->value);
	uint64_t seq = gl_instance_seq(gl_model_find(m, "c1"));
	gl_model_close(m);
	uv_run(&loop, UV_RUN_DEFAULT);
	uv_loop_close(&loop);
	gl_store_close(st);

	m = open_sqlite(dir, &st);
	i = gl_model_find(m, "c1");
	ck_assert_ptr_nonnull(i);
	ck_assert_uint_eq(gl_instance_config_get(i, "user.foo", 8)->len, 8);
	ck_assert(memcmp(gl_instance_config_get(i, "user.foo", 8)->value, "bar\n\001baz", 8) == 0);
	ck_assert_uint_eq(gl_instance_config_get(i, "user.zz", 7)->len, 0);
	ck_assert_str_eq(gl_instance_config_get(i, "volatile.cloud-init.instance-id", 31)->value, id);
	ck_assert_str_eq(gl_instance_device_get(i, "share", 5)->value,
			 "{\"path\":\"/mnt\",\"type\":\"disk\"}");
	ck_assert_str_eq(gl_instance_guest_state(i), "Ready");
	ck_assert_uint_eq(gl_instance_seq(i), seq);
	ck_assert(gl_instance_is_vm(gl_model_find(m, "vm1")));
	gl_buf b = GL_BUF_INIT;
	gl_instance_attr(gl_model_find(m, "vm1"), GL_ATTR_VSOCK_UDS, &b);
	ck_assert_str_eq(b.data, "/run/vm1.sock");
	gl_buf_free(&b);
	/* the sequence continues after a restart */
	do_ok(m, GL_OP_CONFIG_SET, "c1", "user.foo", "x");
	ck_assert_uint_eq(gl_instance_seq(gl_model_find(m, "c1")), seq + 1);
	do_ok(m, GL_OP_DELETE, "vm1", NULL, NULL);
	gl_model_close(m);
	uv_run(&loop, UV_RUN_DEFAULT);
	uv_loop_close(&loop);
	gl_store_close(st);

	m = open_sqlite(dir, &st);
	ck_assert_ptr_null(gl_model_find(m, "vm1"));
	size_t n;
	gl_model_instances(m, &n);
	ck_assert_uint_eq(n, 1);
	close_all(m);
	gl_store_close(st);
	unit_rmrf(dir);
	free(dir);
}
END_TEST

START_TEST(binding_starts_and_stops)
{
	gl_model *m = open_fake(NULL);
	gl_instance *i;
	done d = {0};
	gl_sub *s;
	gl_buf b = GL_BUF_INIT;
	char line[512];

	do_ok(m, GL_OP_CREATE, "c1", NULL, NULL);
	s = gl_sub_new(m, gl_model_find(m, "c1"), GL_EV_ALL, NULL, NULL);
	submit_attr(m, "c1", GL_ATTR_INIT_PID, "4242", GL_ORIGIN_HOST, &d);
	settle();
	i = gl_model_find(m, "c1");
	gl_instance_attr(i, GL_ATTR_STATE, &b);
	ck_assert_str_eq(b.data, "Started");
	ck_assert_int_eq(gl_instance_init_pid(i), 4242);
	submit_attr(m, "c1", GL_ATTR_STATE, "Ready", GL_ORIGIN_GUEST, &d);
	submit_attr(m, "c1", GL_ATTR_INIT_PID, "", GL_ORIGIN_DAEMON, &d);
	settle();
	gl_buf_reset(&b);
	gl_instance_attr(i, GL_ATTR_STATE, &b);
	ck_assert_str_eq(b.data, "Stopped");
	ck_assert_str_eq(gl_instance_guest_state(i), "");
	ck_assert_int_eq(gl_instance_init_pid(i), 0);
	ck_assert(strstr(next_line(s, line, sizeof(line), NULL), "instance-started"));
	ck_assert(strstr(next_line(s, line, sizeof(line), NULL), "instance-ready"));
	ck_assert(strstr(next_line(s, line, sizeof(line), NULL), "instance-stopped"));
	ck_assert_str_eq(next_line(s, line, sizeof(line), NULL), "");
	gl_buf_free(&b);
	gl_sub_free(s);
	close_all(m);
}
END_TEST

static Suite *model_suite(void)
{
	Suite *s = suite_create("model");
	TCase *t = tcase_create("core");

	tcase_add_test(t, create_and_read);
	tcase_add_test(t, callbacks_never_synchronous);
	tcase_add_test(t, invalid_on_its_face);
	tcase_add_test(t, staging_errors);
	tcase_add_test(t, group_commit_one_batch);
	tcase_add_test(t, overlay_within_batch);
	tcase_add_test(t, event_shapes);
	tcase_add_test(t, state_and_guest_state);
	tcase_add_test(t, store_failure_changes_nothing);
	tcase_add_test(t, pipeline_stages_over_unsynced);
	tcase_add_test(t, pipeline_sync_failure_fails_later_batches);
	tcase_add_test(t, pipeline_failed_write_not_staged_over);
	tcase_add_test(t, pipeline_bounded_and_ordered);
	tcase_add_test(t, pipeline_close_reports_in_order);
	tcase_add_test(t, slow_subscriber_dropped);
	tcase_add_test(t, delete_ends_subscribers);
	tcase_add_test(t, resume_since);
	tcase_add_test(t, meta_data_composition);
	tcase_add_test(t, observers);
	tcase_add_test(t, close_cancels_queued);
	tcase_add_test(t, persists_across_reopen);
	tcase_add_test(t, binding_starts_and_stops);
	suite_add_tcase(s, t);
	return s;
}

UNIT_MAIN(model_suite)
