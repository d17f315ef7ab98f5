/* Helpers shared by the libFuzzer harnesses (fuzz/fuzz_*.c): a client that
 * plays bytes into a server running on a libuv loop in the same thread, in
 * chunks whose sizes come from the input, and a tiny deterministic PRNG.
 *
 * Everything here is single-threaded and leaves nothing behind between two
 * inputs: the client socket is closed before fz_drive() returns. */
#ifndef GUESTLINK_FUZZ_UTIL_H
#define GUESTLINK_FUZZ_UTIL_H

#include <errno.h>
#include <ftw.h>
#include <glob.h>
#include <poll.h>
#include <signal.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>
#include <uv.h>

/* xorshift32; a zero seed is replaced so the sequence never sticks at 0 */
typedef struct fz_rng {
	uint32_t s;
} fz_rng;

static inline void fz_rng_init(fz_rng *r, uint32_t seed)
{
	r->s = seed ? seed : 0x9e3779b9u;
}

static inline uint32_t fz_rng_next(fz_rng *r)
{
	uint32_t x = r->s;

	x ^= x << 13;
	x ^= x >> 17;
	x ^= x << 5;
	r->s = x;
	return x;
}

/* The size of the next chunk of p[0..left) to send: `mode` 0 sends
 * everything at once, 255 up to and including each blank line (so that
 * what follows an HTTP head, an upgrade say, is a read of its own),
 * otherwise chunks of 1..(1 << (mode % 12)) bytes. */
static inline size_t fz_chunk_at(fz_rng *r, unsigned mode, const uint8_t *p, size_t left)
{
	size_t max, n;

	if (mode == 0)
		return left;
	if (mode == 255) {
		const uint8_t *e = p ? memmem(p, left, "\r\n\r\n", 4) : NULL;

		return e ? (size_t)(e - p) + 4 : left;
	}
	max = (size_t)1 << (mode % 12);
	n = 1 + fz_rng_next(r) % max;
	return n < left ? n : left;
}

static inline size_t fz_chunk(fz_rng *r, unsigned mode, size_t left)
{
	return fz_chunk_at(r, mode == 255 ? 254 : mode, NULL, left);
}

/* What a harness made on disk (sockets, files) is removed at exit, and also
 * when a check or a sanitizer ends the process. */
static void (*fz_cleanup_fn)(void);

static inline void fz_cleanup(void)
{
	void (*fn)(void) = fz_cleanup_fn;

	fz_cleanup_fn = NULL;
	if (fn)
		fn();
}

/* (Not the sanitizers' death callback: libFuzzer's own is there, and it
 * writes the crash input. What a crash leaves, fz_tmpdir removes later.) */
static inline void fz_on_exit(void (*fn)(void))
{
	fz_cleanup_fn = fn;
	atexit(fz_cleanup);
}

static inline void fz_die(const char *what)
{
	fprintf(stderr, "fuzz harness: %s\n", what);
	fz_cleanup();
	abort();
}

static inline int fz_rm_one(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
	(void)st;
	(void)flag;
	(void)ftw;
	remove(path);
	return 0;
}

/* A new directory /tmp/gl-fuzz-<tag>-<pid> for sockets and files (the
 * caller removes what it put there at exit). Those of harness processes
 * that no longer run (a crash skips the cleanup) are removed first. */
static inline char *fz_tmpdir(const char *tag)
{
	char path[96];
	glob_t g;
	char *p;

	if (glob("/tmp/gl-fuzz-*-*", GLOB_NOSORT, NULL, &g) == 0) {
		for (size_t i = 0; i < g.gl_pathc; i++) {
			const char *dash = strrchr(g.gl_pathv[i], '-');
			char *end;
			long pid = strtol(dash + 1, &end, 10);

			if (*end == '\0' && pid > 0 && kill((pid_t)pid, 0) < 0 && errno == ESRCH)
				nftw(g.gl_pathv[i], fz_rm_one, 8, FTW_DEPTH | FTW_PHYS);
		}
		globfree(&g);
	}
	snprintf(path, sizeof(path), "/tmp/gl-fuzz-%s-%d", tag, (int)getpid());
	nftw(path, fz_rm_one, 8, FTW_DEPTH | FTW_PHYS);
	if (mkdir(path, 0700) < 0)
		fz_die("cannot make the harness's directory");
	p = strdup(path);
	if (!p)
		fz_die("out of memory");
	return p;
}

/* Read and discard (or keep in out[0..cap)) what the server sent. Returns
 * 1 on EOF or a reset, 0 otherwise. */
static inline int fz_read_some(int fd, char *out, size_t cap, size_t *have)
{
	char junk[16384];

	for (;;) {
		char *dst = junk;
		size_t room = sizeof(junk);
		ssize_t k;

		if (out && *have < cap) {
			dst = out + *have;
			room = cap - *have;
		}
		k = read(fd, dst, room);
		if (k > 0) {
			if (dst != junk)
				*have += (size_t)k;
			continue;
		}
		if (k == 0)
			return 1;
		if (errno == EINTR)
			continue;
		if (errno == EAGAIN)
			return 0;
		return 1; /* ECONNRESET and the like: the server hung up */
	}
}

/* Wait for the loop's backend or for `fd` (in `ev`) for at most ms. */
static inline void fz_wait(uv_loop_t *loop, int fd, short ev, int ms)
{
	struct pollfd p[2] = {{.fd = uv_backend_fd(loop), .events = POLLIN},
			      {.fd = fd, .events = ev}};
	int t = uv_backend_timeout(loop);

	if (t < 0 || t > ms)
		t = ms;
	poll(p, fd >= 0 ? 2 : 1, t);
}

typedef struct fz_drive_opts {
	unsigned split;     /* fz_chunk mode */
	uint32_t seed;      /* for the chunk sizes */
	char *out;          /* keep the first out_cap bytes of the answer */
	size_t out_cap;
	size_t *out_len;
} fz_drive_opts;

/* Play data[0..n) into the connected, non-blocking stream socket `fd`
 * while running `loop`, chunk by chunk: after each chunk the loop runs
 * once so that the server reads it on its own (chunk boundaries are read
 * boundaries). Then half-close, read everything until the server hangs
 * up, and close fd. */
static inline void fz_drive(uv_loop_t *loop, int fd, const uint8_t *data, size_t n,
			    const fz_drive_opts *o)
{
	static int debug = -1;
	static char dbg[65536];
	fz_rng rng;
	size_t off = 0, have = 0, cap = o->out_cap;
	char *keep = o->out;
	bool eof = false, shut = false;

	if (debug < 0)
		debug = getenv("FZ_DEBUG") != NULL;
	if (debug) {
		/* FZ_DEBUG=1: keep more, to show what the server answered */
		keep = dbg;
		cap = sizeof(dbg);
	}
	fz_rng_init(&rng, o->seed);
	while (!eof) {
		if (off < n) {
			size_t c = fz_chunk_at(&rng, o->split, data + off, n - off);
			ssize_t k = send(fd, data + off, c, MSG_NOSIGNAL);

			if (k > 0) {
				off += (size_t)k;
			} else if (k < 0 && errno != EAGAIN && errno != EINTR) {
				off = n; /* the server is gone: nothing more will be taken */
			}
		} else if (!shut) {
			shutdown(fd, SHUT_WR);
			shut = true;
		}
		uv_run(loop, UV_RUN_NOWAIT);
		if (fz_read_some(fd, keep, cap, &have)) {
			eof = true;
			break;
		}
		uv_run(loop, UV_RUN_NOWAIT);
		if (shut)
			fz_wait(loop, fd, POLLIN, 50);
	}
	if (debug) {
		fprintf(stderr, "---- %zu bytes sent, %zu received:\n", n, have);
		fwrite(dbg, 1, have, stderr);
		fprintf(stderr, "\n----\n");
		if (have > o->out_cap)
			have = o->out_cap;
		if (o->out)
			memcpy(o->out, dbg, have);
	}
	if (o->out_len)
		*o->out_len = have;
	close(fd);
}

#endif
