/* glgen: fill a guestlink state directory straight through the store API,
 * for start-up benchmarks that need many instances without creating them
 * one mkdir at a time.
 *
 *   glgen [--no-events] STATEDIR NINST NKEYS
 *
 * Creates containers i00000, i00001, ... (Stopped, unbound), each with
 * NKEYS keys user.k00..  (values of about 10 bytes) and a random
 * volatile.cloud-init.instance-id, leaving the rows that mkdir followed by
 * NKEYS `echo > config/user.kNN` leave: the instance row, its config, and
 * its event history (seq 1 "instance-created", then one config event per
 * key), which core/model.c writes for every change. Instances are committed
 * in batches, each batch one transaction. Prints one line:
 *   glgen instances=N keys=K events=E secs=S */
#include <errno.h>
#include <inttypes.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <time.h>

#include "core/buf.h"
#include "core/json.h"
#include "core/store.h"

#define BATCH_INSTANCES 200
#define MAX_INSTANCES 999999
#define MAX_KEYS 9999

typedef struct gen_inst {
	char name[32];
	char uuid[40];
	gl_irow row;
	size_t ev_off; /* its events in the batch's event buffer, one after another */
} gen_inst;

static int64_t wall_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_REALTIME, &ts);
	return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static double mono_s(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* A random (version 4) UUID, the form LXD gives volatile.cloud-init.instance-id. */
static int make_uuid(char out[37])
{
	unsigned char b[16];
	size_t got = 0;

	while (got < sizeof(b)) {
		ssize_t n = getrandom(b + got, sizeof(b) - got, 0);

		if (n < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		got += (size_t)n;
	}
	b[6] = (unsigned char)((b[6] & 0x0f) | 0x40);
	b[8] = (unsigned char)((b[8] & 0x3f) | 0x80);
	snprintf(out, 37,
	         "%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x", b[0],
	         b[1], b[2], b[3], b[4], b[5], b[6], b[7], b[8], b[9], b[10], b[11], b[12], b[13],
	         b[14], b[15]);
	return 0;
}

/* Append one event line as core/model.c shapes it (specs/devlxd-api.md
 * §6.6). `meta` is the metadata object's JSON. Sets *len to its length. */
static int add_event(gl_buf *b, const char *type, int64_t ts, const gl_buf *meta, size_t *len)
{
	size_t start = b->len;
	int r;

	r = gl_buf_printf(b, "{\"type\":\"%s\",\"timestamp\":\"", type);
	if (!r)
		r = gl_json_timestamp(b, ts);
	if (!r)
		r = gl_buf_adds(b, "\",\"metadata\":");
	if (!r)
		r = gl_buf_add(b, meta->data, meta->len);
	if (!r)
		r = gl_buf_adds(b, "}\n");
	*len = b->len - start;
	return r;
}

/* The events of one new instance: "instance-created", then one config
 * event per key. Their lengths go to lens[0..1+nkeys). */
static int add_events(gl_buf *b, const char *name, int64_t ts, char (*keys)[32],
                      char (*vals)[32], unsigned long nkeys, size_t *lens)
{
	gl_buf meta = GL_BUF_INIT;
	unsigned long k;
	int r;

	r = gl_buf_printf(&meta,
	                  "{\"action\":\"instance-created\",\"source\":\"/1.0/instances/%s\","
	                  "\"context\":{\"type\":\"container\"}}",
	                  name);
	if (!r)
		r = add_event(b, "lifecycle", ts, &meta, &lens[0]);
	for (k = 0; !r && k < nkeys; k++) {
		gl_buf_reset(&meta);
		r = gl_buf_printf(&meta, "{\"key\":\"%s\",\"old_value\":\"\",\"value\":\"%s\"}",
		                  keys[k], vals[k]);
		if (!r)
			r = add_event(b, "config", ts, &meta, &lens[1 + k]);
	}
	gl_buf_free(&meta);
	return r;
}

static int parse_count(const char *s, unsigned long max, unsigned long *out)
{
	char *end;
	unsigned long v;

	errno = 0;
	v = strtoul(s, &end, 10);
	if (errno || end == s || *end || v > max)
		return -EINVAL;
	*out = v;
	return 0;
}

int main(int argc, char **argv)
{
	static const char id_key[] = "volatile.cloud-init.instance-id";
	unsigned long ninst, nkeys, done = 0, nevents = 0;
	char (*keys)[32] = NULL;
	char (*vals)[32] = NULL;
	gen_inst *insts = NULL;
	gl_sop *ops = NULL;
	size_t *evlens = NULL;
	gl_buf evbuf = GL_BUF_INIT;
	gl_store *store = NULL;
	const char *dir;
	char err[512] = "";
	size_t per_inst;
	bool events = true;
	double t0;
	int r, ret = 1, a = 1;
	unsigned long k;

	if (argc > 1 && !strcmp(argv[1], "--no-events")) {
		events = false;
		a++;
	}
	if (argc - a != 3 || parse_count(argv[a + 1], MAX_INSTANCES, &ninst) < 0 ||
	    parse_count(argv[a + 2], MAX_KEYS, &nkeys) < 0) {
		fprintf(stderr,
		        "usage: glgen [--no-events] STATEDIR NINST NKEYS (NINST <= %d, NKEYS <= %d)\n",
		        MAX_INSTANCES, MAX_KEYS);
		return 2;
	}
	dir = argv[a];
	if (mkdir(dir, 0700) < 0 && errno != EEXIST) {
		fprintf(stderr, "glgen: mkdir %s: %s\n", dir, strerror(errno));
		return 1;
	}
	t0 = mono_s();
	r = gl_store_sqlite_open(dir, &store, err, sizeof(err));
	if (r < 0) {
		fprintf(stderr, "glgen: cannot open store in %s: %s (%s)\n", dir, err, strerror(-r));
		return 1;
	}

	/* Key names and values are the same for every instance. */
	keys = calloc(nkeys ? nkeys : 1, sizeof(*keys));
	vals = calloc(nkeys ? nkeys : 1, sizeof(*vals));
	per_inst = 2 + nkeys + (events ? 1 + nkeys : 0);
	insts = calloc(BATCH_INSTANCES, sizeof(*insts));
	ops = calloc(BATCH_INSTANCES * per_inst, sizeof(*ops));
	evlens = calloc(BATCH_INSTANCES * (1 + nkeys), sizeof(*evlens));
	if (!keys || !vals || !insts || !ops || !evlens) {
		fprintf(stderr, "glgen: out of memory\n");
		goto out;
	}
	for (k = 0; k < nkeys; k++) {
		snprintf(keys[k], sizeof(keys[k]), "user.k%02lu", k);
		snprintf(vals[k], sizeof(vals[k]), "value-%04lu", k);
	}

	while (done < ninst) {
		unsigned long nb = ninst - done < BATCH_INSTANCES ? ninst - done : BATCH_INSTANCES;
		int64_t now = wall_ns();
		size_t n = 0;
		unsigned long i;

		/* First every string of the batch (the event buffer moves as it
		 * grows), then the ops that point into them. */
		gl_buf_reset(&evbuf);
		for (i = 0; i < nb; i++) {
			gen_inst *gi = &insts[i];

			snprintf(gi->name, sizeof(gi->name), "i%05lu", done + i);
			if ((r = make_uuid(gi->uuid)) < 0) {
				fprintf(stderr, "glgen: getrandom: %s\n", strerror(-r));
				goto out;
			}
			gi->row = (gl_irow){
				.name = gi->name,
				.type = "container",
				.state = "Stopped",
				.cgroup = "",
				.vsock_uds = "",
				.ctime_ns = now,
				.mtime_ns = now,
			};
			gi->ev_off = evbuf.len;
			if (events &&
			    add_events(&evbuf, gi->name, now, keys, vals, nkeys, &evlens[i * (1 + nkeys)])) {
				fprintf(stderr, "glgen: out of memory\n");
				goto out;
			}
		}
		for (i = 0; i < nb; i++) {
			gen_inst *gi = &insts[i];
			size_t off = gi->ev_off;

			ops[n++] = (gl_sop){
				.kind = GL_SOP_INSTANCE_PUT,
				.instance = gi->name,
				.irow = &gi->row,
				.mtime_ns = now,
			};
			ops[n++] = (gl_sop){
				.kind = GL_SOP_CONFIG_PUT,
				.instance = gi->name,
				.key = id_key,
				.value = gi->uuid,
				.vlen = strlen(gi->uuid),
				.mtime_ns = now,
			};
			for (k = 0; k < nkeys; k++)
				ops[n++] = (gl_sop){
					.kind = GL_SOP_CONFIG_PUT,
					.instance = gi->name,
					.key = keys[k],
					.value = vals[k],
					.vlen = strlen(vals[k]),
					.mtime_ns = now,
				};
			for (k = 0; events && k < 1 + nkeys; k++) {
				size_t len = evlens[i * (1 + nkeys) + k];

				ops[n++] = (gl_sop){
					.kind = GL_SOP_EVENT_PUT,
					.instance = gi->name,
					.seq = k + 1,
					.value = evbuf.data + off,
					.vlen = len,
				};
				off += len;
				nevents++;
			}
		}
		r = gl_store_commit(store, ops, n);
		if (r < 0) {
			fprintf(stderr, "glgen: commit of %s..: %s (%s)\n", insts[0].name,
			        strerror(-r), store->errmsg);
			goto out;
		}
		done += nb;
	}
	printf("glgen instances=%lu keys=%lu events=%lu secs=%.2f\n", ninst, nkeys, nevents,
	       mono_s() - t0);
	ret = 0;
out:
	gl_store_close(store);
	gl_buf_free(&evbuf);
	free(evlens);
	free(ops);
	free(insts);
	free(vals);
	free(keys);
	return ret;
}
