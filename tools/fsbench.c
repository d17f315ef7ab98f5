/* fsbench: the load driver of `make bench`. Each run prints one
 * machine-readable line on stdout, e.g.
 *   read ops=123456 secs=5.00 rate=24691.2 errors=0
 *
 *   fsbench read PATH SECONDS           open + read until EOF + close, in a loop
 *   fsbench stat PATH SECONDS           stat(PATH) in a loop
 *   fsbench write DIR NWRITERS SECONDS  N threads, thread i rewrites DIR/user.b<i>:
 *                                       open(O_WRONLY|O_CREAT|O_TRUNC), write
 *                                       "value-<n>\n", close; counts successful closes
 *                                       (also prints lat_avg_us, the average time of
 *                                       one loop, and cpu_busy, how busy the machine's
 *                                       CPUs were, in %)
 *   fsbench fsync DIR NWRITERS SECONDS  the raw baseline: the same loop on plain files
 *                                       DIR/fsbench.<i>, with fdatasync before close
 *   fsbench spawn MNT TIMEOUT CMD ARGS...
 *                                       start CMD, wait until MNT is a mount point that
 *                                       answers stat(), print its pid and the elapsed
 *                                       time, and leave it running (its stdout is
 *                                       sent to stderr, so $(fsbench spawn ...) returns)
 *
 * Exit status: 0 when at least one operation succeeded and none failed,
 * 1 otherwise (the line is printed either way). */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <libgen.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static double now_s(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static int parse_secs(const char *s, double *out)
{
	char *end;
	double v;

	errno = 0;
	v = strtod(s, &end);
	if (errno || end == s || *end || v <= 0 || v > 3600) {
		fprintf(stderr, "fsbench: bad duration: %s\n", s);
		return -EINVAL;
	}
	*out = v;
	return 0;
}

static int parse_count(const char *s, unsigned max, unsigned *out)
{
	char *end;
	unsigned long v;

	errno = 0;
	v = strtoul(s, &end, 10);
	if (errno || end == s || *end || v < 1 || v > max) {
		fprintf(stderr, "fsbench: bad count: %s (1..%u)\n", s, max);
		return -EINVAL;
	}
	*out = (unsigned)v;
	return 0;
}

/* Print the first few failures only: a broken target fails every op. */
static void report_error(const char *what, const char *path, int err)
{
	static atomic_uint reported;

	if (atomic_fetch_add(&reported, 1) < 5)
		fprintf(stderr, "fsbench: %s %s: %s\n", what, path, strerror(err));
}

/* The machine's CPU time so far, from the first line of /proc/stat, in
 * clock ticks: all of it, and the part spent idle or waiting for I/O. */
typedef struct cpu_ticks {
	unsigned long long total, idle;
} cpu_ticks;

static bool read_cpu_ticks(cpu_ticks *t)
{
	unsigned long long v[8] = {0};
	FILE *f = fopen("/proc/stat", "r");
	int n;

	if (!f)
		return false;
	n = fscanf(f, "cpu %llu %llu %llu %llu %llu %llu %llu %llu", &v[0], &v[1], &v[2], &v[3],
	           &v[4], &v[5], &v[6], &v[7]);
	fclose(f);
	if (n < 5)
		return false;
	t->total = v[0] + v[1] + v[2] + v[3] + v[4] + v[5] + v[6] + v[7];
	t->idle = v[3] + v[4];
	return true;
}

/* How busy the machine's CPUs were between a and b, in percent; -1 if
 * unknown. */
static double cpu_busy_pct(const cpu_ticks *a, const cpu_ticks *b)
{
	unsigned long long total = b->total - a->total, idle = b->idle - a->idle;

	return total ? 100.0 * (double)(total - idle) / (double)total : -1.0;
}

static int print_result(const char *name, unsigned nthreads, uint64_t ops, uint64_t errors,
                        double secs, double busy)
{
	if (nthreads)
		printf("%s writers=%u ops=%" PRIu64 " secs=%.2f rate=%.1f errors=%" PRIu64
		       " lat_avg_us=%.1f cpu_busy=%.0f\n",
		       name, nthreads, ops, secs, (double)ops / secs, errors,
		       ops ? secs * 1e6 * nthreads / (double)ops : 0.0, busy);
	else
		printf("%s ops=%" PRIu64 " secs=%.2f rate=%.1f errors=%" PRIu64 "\n", name, ops, secs,
		       (double)ops / secs, errors);
	fflush(stdout);
	return ops > 0 && errors == 0 ? 0 : 1;
}

/* ---- read / stat ------------------------------------------------------- */

/* cat's buffer size: one READ request per read(2) under direct_io. */
static char read_buf[128 * 1024];

static int read_once(const char *path)
{
	ssize_t n;
	int fd;
	int err = 0;

	fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0) {
		err = -errno;
		report_error("open", path, -err);
		return err;
	}
	do {
		n = read(fd, read_buf, sizeof(read_buf));
	} while (n > 0 || (n < 0 && errno == EINTR));
	if (n < 0) {
		err = -errno;
		report_error("read", path, -err);
	}
	if (close(fd) < 0 && !err) {
		err = -errno;
		report_error("close", path, -err);
	}
	return err;
}

static int stat_once(const char *path)
{
	struct stat st;

	if (stat(path, &st) < 0) {
		int err = -errno;

		report_error("stat", path, -err);
		return err;
	}
	return 0;
}

static int run_loop(const char *name, const char *path, double secs, int (*op)(const char *))
{
	uint64_t ops = 0, errors = 0;
	double start, end, elapsed;

	start = now_s();
	end = start + secs;
	do {
		if (op(path) == 0)
			ops++;
		else
			errors++;
		elapsed = now_s() - start;
	} while (start + elapsed < end);
	return print_result(name, 0, ops, errors, elapsed, -1.0);
}

/* ---- write / fsync ----------------------------------------------------- */

typedef struct writer {
	pthread_t tid;
	const char *dir;
	unsigned idx;
	bool sync; /* fdatasync before close: the raw baseline */
	uint64_t ops;
	uint64_t errors;
} writer;

static atomic_bool stop_flag;
static pthread_barrier_t start_barrier;

static int write_once(const char *path, uint64_t n, bool sync)
{
	char val[64];
	int len, fd, err = 0;
	ssize_t w;

	len = snprintf(val, sizeof(val), "value-%" PRIu64 "\n", n);
	fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
	if (fd < 0) {
		err = -errno;
		report_error("open", path, -err);
		return err;
	}
	w = write(fd, val, (size_t)len);
	if (w < 0) {
		err = -errno;
		report_error("write", path, -err);
	} else if (w != len) {
		err = -EIO;
		report_error("short write", path, EIO);
	}
	if (!err && sync && fdatasync(fd) < 0) {
		err = -errno;
		report_error("fdatasync", path, -err);
	}
	/* For guestlink the commit happens here: close() returns once durable. */
	if (close(fd) < 0 && !err) {
		err = -errno;
		report_error("close", path, -err);
	}
	return err;
}

static void *writer_main(void *arg)
{
	writer *w = arg;
	char path[4096];
	uint64_t n = 0;

	snprintf(path, sizeof(path), "%s/%s%u", w->dir, w->sync ? "fsbench." : "user.b", w->idx);
	pthread_barrier_wait(&start_barrier);
	while (!atomic_load_explicit(&stop_flag, memory_order_relaxed)) {
		if (write_once(path, n++, w->sync) == 0)
			w->ops++;
		else
			w->errors++;
	}
	return NULL;
}

static int run_writers(const char *name, const char *dir, unsigned nw, double secs, bool sync)
{
	writer *ws;
	uint64_t ops = 0, errors = 0;
	struct timespec ts;
	double start, elapsed, busy = -1.0;
	cpu_ticks t0, t1;
	bool have_ticks;
	unsigned i, started = 0;
	int ret = 1;

	ws = calloc(nw, sizeof(*ws));
	if (!ws) {
		fprintf(stderr, "fsbench: out of memory\n");
		return 1;
	}
	pthread_barrier_init(&start_barrier, NULL, nw + 1);
	for (i = 0; i < nw; i++) {
		int r;

		ws[i].dir = dir;
		ws[i].idx = i;
		ws[i].sync = sync;
		r = pthread_create(&ws[i].tid, NULL, writer_main, &ws[i]);
		if (r) {
			/* The barrier counts on every thread: give up outright. */
			fprintf(stderr, "fsbench: pthread_create: %s\n", strerror(r));
			exit(1);
		}
		started++;
	}
	pthread_barrier_wait(&start_barrier);
	start = now_s();
	have_ticks = read_cpu_ticks(&t0);
	ts.tv_sec = (time_t)secs;
	ts.tv_nsec = (long)((secs - (double)ts.tv_sec) * 1e9);
	while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
		;
	atomic_store(&stop_flag, true);
	for (i = 0; i < started; i++) {
		pthread_join(ws[i].tid, NULL);
		ops += ws[i].ops;
		errors += ws[i].errors;
	}
	/* Ops in flight at the stop finish and are counted, so is their time. */
	elapsed = now_s() - start;
	if (have_ticks && read_cpu_ticks(&t1))
		busy = cpu_busy_pct(&t0, &t1);
	ret = print_result(name, nw, ops, errors, elapsed, busy);
	pthread_barrier_destroy(&start_barrier);
	free(ws);
	return ret;
}

/* ---- spawn ------------------------------------------------------------- */

/* MNT is mounted (its device differs from its parent's) and answers. */
static bool mount_ready(const char *mnt, dev_t parent_dev)
{
	struct stat st;

	return stat(mnt, &st) == 0 && st.st_dev != parent_dev;
}

static int run_spawn(const char *mnt, double timeout, char **cmd)
{
	char parent[4096];
	const char *pdir;
	struct stat pst;
	double start, elapsed;
	pid_t pid;
	int status;

	/* The parent by name, not MNT/..: MNT may not exist yet (guestlinkd
	 * creates it). */
	snprintf(parent, sizeof(parent), "%s", mnt);
	pdir = dirname(parent);
	if (stat(pdir, &pst) < 0) {
		fprintf(stderr, "fsbench: stat %s: %s\n", pdir, strerror(errno));
		return 1;
	}
	if (mount_ready(mnt, pst.st_dev)) {
		fprintf(stderr, "fsbench: %s is already a mount point\n", mnt);
		return 1;
	}
	start = now_s();
	pid = fork();
	if (pid < 0) {
		fprintf(stderr, "fsbench: fork: %s\n", strerror(errno));
		return 1;
	}
	if (pid == 0) {
		/* Keep our stdout (often a pipe the caller reads to EOF) out of
		 * the long-lived child: its output goes to stderr. */
		dup2(STDERR_FILENO, STDOUT_FILENO);
		execvp(cmd[0], cmd);
		fprintf(stderr, "fsbench: exec %s: %s\n", cmd[0], strerror(errno));
		_exit(127);
	}
	for (;;) {
		if (mount_ready(mnt, pst.st_dev))
			break;
		if (waitpid(pid, &status, WNOHANG) == pid) {
			fprintf(stderr, "fsbench: %s exited (status %d) before %s was mounted\n",
			        cmd[0], WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status),
			        mnt);
			return 1;
		}
		if (now_s() - start > timeout) {
			fprintf(stderr, "fsbench: %s not mounted after %.1f s\n", mnt, timeout);
			kill(pid, SIGTERM);
			printf("spawn pid=%d secs=timeout\n", (int)pid);
			return 1;
		}
		usleep(1000);
	}
	elapsed = now_s() - start;
	printf("spawn pid=%d secs=%.3f\n", (int)pid, elapsed);
	fflush(stdout);
	return 0;
}

static void usage(void)
{
	fprintf(stderr, "usage: fsbench read PATH SECONDS\n"
	                "       fsbench stat PATH SECONDS\n"
	                "       fsbench write DIR NWRITERS SECONDS\n"
	                "       fsbench fsync DIR NWRITERS SECONDS\n"
	                "       fsbench spawn MNT TIMEOUT CMD [ARGS...]\n");
}

int main(int argc, char **argv)
{
	double secs;
	unsigned nw;

	if (argc < 2) {
		usage();
		return 2;
	}
	if (!strcmp(argv[1], "read") || !strcmp(argv[1], "stat")) {
		if (argc != 4 || parse_secs(argv[3], &secs) < 0) {
			usage();
			return 2;
		}
		return run_loop(argv[1], argv[2], secs, argv[1][0] == 'r' ? read_once : stat_once);
	}
	if (!strcmp(argv[1], "write") || !strcmp(argv[1], "fsync")) {
		if (argc != 5 || parse_count(argv[3], 1024, &nw) < 0 ||
		    parse_secs(argv[4], &secs) < 0) {
			usage();
			return 2;
		}
		return run_writers(argv[1], argv[2], nw, secs, argv[1][0] == 'f');
	}
	if (!strcmp(argv[1], "spawn")) {
		if (argc < 5 || parse_secs(argv[3], &secs) < 0) {
			usage();
			return 2;
		}
		return run_spawn(argv[2], secs, argv + 4);
	}
	usage();
	return 2;
}
