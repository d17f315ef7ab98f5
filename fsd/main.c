/* guestlinkd: the host daemon. One libuv loop owns the model, the store's
 * commit queue and the FUSE session; it runs in the foreground and logs to
 * stderr. */
#include <errno.h>
#include <getopt.h>
#include <limits.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <fcntl.h>
#include <sys/file.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <unistd.h>
#include <uv.h>

#include "core/model.h"
#include "core/store.h"
#include "bridge/auth.h"
#include "bridge/ctl.h"
#include "bridge/devlxd.h"
#include "bridge/vm.h"
#include "fsd/fs.h"
#include "fsd/log.h"

#ifndef GUESTLINK_VERSION
#define GUESTLINK_VERSION "0.1.0"
#endif

struct daemon {
	uv_loop_t loop;
	uv_signal_t sigint, sigterm;
	gl_store *store;
	gl_model *model;
	gl_fs *fs;
	gl_devlxd *devlxd;
	gl_vm *vm;
	gl_ctl *ctl;
	bool stopping;
};

static void usage(FILE *f)
{
	fprintf(f,
	        "Usage: guestlinkd --state-dir DIR --mount MNT [options]\n"
	        "\n"
	        "Keep a live model of container and VM instances (config, devices,\n"
	        "cloud-init meta-data, state, events) and show it as a FUSE tree on MNT.\n"
	        "Runs in the foreground; SIGINT or SIGTERM unmounts and exits.\n"
	        "\n"
	        "Options:\n"
	        "  --state-dir DIR          where the database lives (required; created\n"
	        "                           if missing, its parent must exist)\n"
	        "  --mount MNT              mount point (required; created if missing)\n"
	        "  --max-value-size BYTES   largest config value or device JSON\n"
	        "                           (default 1M; suffixes K, M, G)\n"
	        "  --max-queue-bytes BYTES  events queued per reader before it is dropped\n"
	        "                           (default 4M; suffixes K, M, G)\n"
	        "  --devlxd-socket PATH     serve LXD's guest API (/dev/lxd/sock) on PATH\n"
	        "                           for every instance (bind-mount it into each\n"
	        "                           container at /dev/lxd/sock)\n"
	        "  --images-dir DIR         images for /1.0/images/*/export\n"
	        "                           (default STATE-DIR/images)\n"
	        "  --max-header-bytes N     devlxd request head limit (default 1M+4K; 431)\n"
	        "  --max-conns N            devlxd connections in all (default 16384;\n"
	        "                           when full the oldest idle one is closed)\n"
	        "  --max-conns-per-instance N  (default 1024)\n"
	        "  --max-subscribers N      event subscribers per instance (default 1024)\n"
	        "  --header-timeout MS      a request head must arrive within MS\n"
	        "                           (default 10000)\n"
	        "  --idle-timeout MS        close idle keep-alive connections after MS\n"
	        "                           (default 0: never, as LXD 5.0.2)\n"
	        "  --control-socket PATH    root-only socket for guestlinkctl (default\n"
	        "                           " GL_CTL_DEFAULT_PATH "; \"none\": no socket)\n"
	        "  --agent-ping-interval MS how often each VM's agent is pinged\n"
	        "                           (default 5000; 0: only at connect)\n"
	        "  --max-agent-conns N      agent operations in flight per VM; more wait\n"
	        "                           in line (default 256)\n"
	        "  --vsock-port N           AF_VSOCK port where VMs bound by vsock-cid reach\n"
	        "                           devlxd (default 7362; hybrid vsock-uds VMs use\n"
	        "                           <uds>_7362)\n"
	        "  --af-vsock auto|on|off   serve VMs bound by vsock-cid over AF_VSOCK\n"
	        "                           (listen, dial their agents); auto (default):\n"
	        "                           on when /dev/vhost-vsock exists\n"
	        "  --vm-devlxd-auth token|none  token (default): a connection on a VM's\n"
	        "                           devlxd transport must start with its agent's\n"
	        "                           preamble (token, guest uid; non-root gets 401);\n"
	        "                           none: raw HTTP, every caller is the VM's root\n"
	        "  --no-allow-other         only root may enter the mount\n"
	        "  --debug                  trace every FUSE request on stderr\n"
	        "  -v, --verbose            log debug messages\n"
	        "  -h, --help               show this help and exit\n"
	        "  -V, --version            show the version and exit\n");
}

/* "1048576", "64K", "1M", "2MiB". 0 or -EINVAL. */
static int parse_size(const char *s, size_t *out)
{
	unsigned long long v, mul = 1;
	char *end;

	if (!*s || *s == '-')
		return -EINVAL;
	errno = 0;
	v = strtoull(s, &end, 10);
	if (errno || end == s)
		return -EINVAL;
	switch (*end) {
	case 'k':
	case 'K':
		mul = 1ULL << 10;
		end++;
		break;
	case 'm':
	case 'M':
		mul = 1ULL << 20;
		end++;
		break;
	case 'g':
	case 'G':
		mul = 1ULL << 30;
		end++;
		break;
	}
	if (mul > 1 && (strcmp(end, "iB") == 0 || strcmp(end, "B") == 0))
		end += strlen(end);
	if (*end || v == 0 || v > SIZE_MAX / mul)
		return -EINVAL;
	*out = v * mul;
	return 0;
}

/* Make `dir` exist (one level). 0 or -errno; logs why. */
static int ensure_dir(const char *what, const char *dir, mode_t mode)
{
	struct stat st;

	if (stat(dir, &st) == 0) {
		if (!S_ISDIR(st.st_mode)) {
			log_error("%s %s is not a directory", what, dir);
			return -ENOTDIR;
		}
		return 0;
	}
	if (errno != ENOENT) {
		log_error("%s %s: %s", what, dir, strerror(errno));
		return -errno;
	}
	if (mkdir(dir, mode) < 0) {
		log_error("cannot create %s %s: %s", what, dir, strerror(errno));
		return -errno;
	}
	log_info("created %s %s", what, dir);
	return 0;
}

/* The absolute path of mnt, even when mnt itself is a dead mount that
 * realpath cannot stat. */
static int absolute_path(const char *mnt, char *out, size_t len)
{
	char parent[PATH_MAX], copy[PATH_MAX];
	const char *base;
	char *slash;

	if (realpath(mnt, out))
		return 0;
	if (strlen(mnt) >= sizeof(copy))
		return -ENAMETOOLONG;
	strcpy(copy, mnt);
	while ((slash = strrchr(copy, '/')) && slash[1] == '\0' && slash != copy)
		*slash = '\0';
	slash = strrchr(copy, '/');
	if (!slash) {
		base = copy;
		strcpy(parent, ".");
	} else {
		*slash = '\0';
		base = slash + 1;
		strcpy(parent, slash == copy ? "/" : copy);
	}
	if (!realpath(parent, out))
		return -errno;
	if (strlen(out) + strlen(base) + 2 > len)
		return -ENAMETOOLONG;
	if (strcmp(out, "/") != 0)
		strcat(out, "/");
	strcat(out, base);
	return 0;
}

/* Undo mountinfo's octal escapes (\040 for a space) in place. */
static void unescape(char *s)
{
	char *w = s;

	for (; *s; s++) {
		if (s[0] == '\\' && s[1] >= '0' && s[1] <= '3' && s[2] >= '0' && s[2] <= '7' &&
		    s[3] >= '0' && s[3] <= '7') {
			*w++ = (char)((s[1] - '0') * 64 + (s[2] - '0') * 8 + (s[3] - '0'));
			s += 3;
		} else {
			*w++ = *s;
		}
	}
	*w = '\0';
}

/* True if /proc/self/mountinfo lists a guestlink FUSE mount on path; its
 * device number in *dev (the name of its fusectl directory). */
static bool guestlink_mount(const char *path, unsigned long *dev)
{
	FILE *f = fopen("/proc/self/mountinfo", "re");
	char *line = NULL, *mp, *sep, *fstype, *source, *devs, *save;
	unsigned int major, minor;
	size_t cap = 0;
	bool found = false;
	int i;

	if (!f)
		return false;
	while (!found && getline(&line, &cap, f) > 0) {
		/* id parent maj:min root mountpoint opts [optional...] - fstype source superopts */
		mp = strtok_r(line, " ", &save);
		devs = NULL;
		for (i = 0; mp && i < 4; i++) {
			mp = strtok_r(NULL, " ", &save);
			if (i == 1)
				devs = mp;
		}
		if (!mp || !devs)
			continue;
		sep = strtok_r(NULL, " ", &save);
		while (sep && strcmp(sep, "-") != 0)
			sep = strtok_r(NULL, " ", &save);
		fstype = sep ? strtok_r(NULL, " ", &save) : NULL;
		source = fstype ? strtok_r(NULL, " ", &save) : NULL;
		if (!source)
			continue;
		unescape(mp);
		unescape(source);
		found = strcmp(mp, path) == 0 && strcmp(fstype, "fuse.guestlink") == 0 &&
		        strcmp(source, "guestlink") == 0;
		/* the kernel's own dev_t: 12 bits of major above 20 of minor */
		if (found && dev)
			*dev = sscanf(devs, "%u:%u", &major, &minor) == 2
			               ? (unsigned long)major << 20 | minor
			               : 0;
	}
	free(line);
	fclose(f);
	return found;
}

static bool guestlink_mounted(const char *path)
{
	return guestlink_mount(path, NULL);
}

/* mnt made absolute without looking at the file system: nothing on the
 * way may be asked, a stuck mount would never answer. */
static int lexical_path(const char *mnt, char *out, size_t len)
{
	char buf[PATH_MAX], *tok, *save;
	size_t n = 0;

	if (mnt[0] == '/') {
		if (strlen(mnt) >= sizeof(buf))
			return -ENAMETOOLONG;
		strcpy(buf, mnt);
	} else {
		if (!getcwd(buf, sizeof(buf)))
			return -errno;
		if (strlen(buf) + strlen(mnt) + 2 > sizeof(buf))
			return -ENAMETOOLONG;
		strcat(buf, "/");
		strcat(buf, mnt);
	}
	out[0] = '\0';
	for (tok = strtok_r(buf, "/", &save); tok; tok = strtok_r(NULL, "/", &save)) {
		if (strcmp(tok, ".") == 0)
			continue;
		if (strcmp(tok, "..") == 0) {
			while (n > 0 && out[--n] != '/')
				;
			out[n] = '\0';
			continue;
		}
		if (n + strlen(tok) + 2 > len)
			return -ENAMETOOLONG;
		out[n++] = '/';
		strcpy(out + n, tok);
		n += strlen(tok);
	}
	if (n == 0)
		strcpy(out, "/");
	return 0;
}

/* Is process pid exiting: its main thread gone, some other thread not? */
static bool exiting(long pid)
{
	char path[64], buf[512], *st;
	ssize_t n;
	int fd;

	snprintf(path, sizeof(path), "/proc/%ld/stat", pid);
	fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return false;
	n = read(fd, buf, sizeof(buf) - 1);
	close(fd);
	if (n <= 0)
		return false;
	buf[n] = '\0';
	st = strrchr(buf, ')');
	return st && st[1] == ' ' && (st[2] == 'Z' || st[2] == 'X');
}

/* Abort the FUSE connection `dev` through fusectl (mounted if need be). */
static int abort_connection(unsigned long dev)
{
	const char *dir = "/sys/fs/fuse/connections";
	char path[96];
	int fd, r;

	snprintf(path, sizeof(path), "%s/%lu/abort", dir, dev);
	fd = open(path, O_WRONLY | O_CLOEXEC);
	if (fd < 0 && errno == ENOENT && mount("fusectl", dir, "fusectl", 0, NULL) == 0)
		fd = open(path, O_WRONLY | O_CLOEXEC);
	if (fd < 0)
		return -errno;
	r = write(fd, "1", 1) == 1 ? 0 : -errno;
	close(fd);
	return r;
}

/* A guestlinkd killed (kill -9) while a thread of it waited in the kernel
 * for a directory lock of its own mount, held by a client that waits for
 * the answer of the dead loop thread, cannot finish exiting: that thread
 * cannot be killed, it keeps /dev/fuse open, so the connection lives on
 * without a server and the client (and anyone who looks at the mount, this
 * daemon's stat() included) waits forever. It still holds the state
 * directory's lock. Abort the connection of the guestlink mount on `mnt`:
 * the waiting client gets an error, the thread returns, the old process
 * ends and its lock is released. */
static void recover_stuck_predecessor(const char *state_dir, const char *mnt)
{
	char path[PATH_MAX], buf[32];
	unsigned long dev = 0;
	ssize_t n;
	long pid;
	int fd, i, r;

	if (snprintf(path, sizeof(path), "%s/" GL_STORE_LOCK_NAME, state_dir) >= (int)sizeof(path))
		return;
	fd = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
	if (fd < 0)
		return;
	if (flock(fd, LOCK_EX | LOCK_NB) == 0)
		goto out; /* nobody holds it (closing the descriptor releases it) */
	n = pread(fd, buf, sizeof(buf) - 1, 0);
	buf[n > 0 ? n : 0] = '\0';
	pid = strtol(buf, NULL, 10);
	if (pid <= 0 || !exiting(pid))
		goto out; /* alive: the store refuses the busy directory */
	if (lexical_path(mnt, path, sizeof(path)) < 0 || !guestlink_mount(path, &dev) || !dev) {
		log_warn("guestlinkd pid %ld is exiting but still holds %s; no guestlink mount on "
		         "%s to abort", pid, state_dir, mnt);
		goto out;
	}
	log_warn("guestlinkd pid %ld was killed but cannot finish exiting (a thread waits on "
	         "its mount %s): aborting that mount's FUSE connection", pid, path);
	r = abort_connection(dev);
	if (r < 0) {
		log_warn("cannot abort FUSE connection %lu: %s", dev, strerror(-r));
		goto out;
	}
	for (i = 0; i < 100 && flock(fd, LOCK_EX | LOCK_NB) < 0; i++)
		usleep(50 * 1000);
out:
	close(fd);
}

/* A daemon that died leaves its mount answering ENOTCONN: detach it. */
static void clean_leftover_mount(const char *mnt)
{
	char path[PATH_MAX];
	struct stat st;
	int i;

	for (i = 0; i < 8; i++) {
		bool dead = stat(mnt, &st) < 0 && errno == ENOTCONN;

		if (!dead && (absolute_path(mnt, path, sizeof(path)) < 0 || !guestlink_mounted(path)))
			return;
		if (umount2(mnt, MNT_DETACH) < 0) {
			log_warn("cannot detach the leftover mount on %s: %s", mnt, strerror(errno));
			return;
		}
		log_info("detached a leftover guestlink mount on %s", mnt);
	}
}

/* The long name of option `c`, for messages (argv[optind - 1] is the
 * value when it came as a separate argument). */
static const char *opt_name(const struct option *o, int c)
{
	for (; o->name; o++)
		if (o->val == c)
			return o->name;
	return "?";
}

/* True if `path` (which may not exist yet) lies under the mount point. */
static bool inside_mount(const char *path, const char *mntabs)
{
	char abs[PATH_MAX];
	size_t n = strlen(mntabs);

	if (absolute_path(path, abs, sizeof(abs)) < 0)
		return strncmp(path, mntabs, n) == 0 && path[n] == '/';
	return strncmp(abs, mntabs, n) == 0 && (abs[n] == '/' || (n == 1 && abs[0] == '/'));
}

static void close_signals(struct daemon *d)
{
	if (!uv_is_closing((uv_handle_t *)&d->sigint))
		uv_close((uv_handle_t *)&d->sigint, NULL);
	if (!uv_is_closing((uv_handle_t *)&d->sigterm))
		uv_close((uv_handle_t *)&d->sigterm, NULL);
}

static void on_fs_ended(gl_fs *fs, void *arg)
{
	struct daemon *d = arg;

	/* The control connections first (they hold VM links), then the VMs'
	 * transports, then the guests' connections (event subscriptions). */
	if (d->ctl) {
		gl_ctl_stop(d->ctl);
		d->ctl = NULL;
	}
	if (d->vm) {
		gl_vm_stop(d->vm);
		d->vm = NULL;
	}
	if (d->devlxd) {
		gl_devlxd_stop(d->devlxd);
		d->devlxd = NULL;
	}
	/* Answers the requests still waiting for a commit (the in-flight
	 * batch finishes, the rest is cancelled) while the mount is there. */
	gl_model_close(d->model);
	d->model = NULL;
	gl_fs_destroy(d->fs);
	d->fs = NULL;
	close_signals(d);
	log_info("stopped");
}

static void on_signal(uv_signal_t *h, int signum)
{
	struct daemon *d = h->data;

	if (d->stopping) {
		log_info("%s again: still stopping", strsignal(signum));
		return;
	}
	d->stopping = true;
	log_info("%s: unmounting", strsignal(signum));
	gl_fs_stop(d->fs);
}

int main(int argc, char **argv)
{
	static const struct option longopts[] = {
		{"state-dir", required_argument, NULL, 's'},
		{"mount", required_argument, NULL, 'm'},
		{"max-value-size", required_argument, NULL, 'x'},
		{"max-queue-bytes", required_argument, NULL, 'q'},
		{"no-allow-other", no_argument, NULL, 'n'},
		{"devlxd-socket", required_argument, NULL, 'S'},
		{"images-dir", required_argument, NULL, 'I'},
		{"max-header-bytes", required_argument, NULL, 'H'},
		{"max-conns", required_argument, NULL, 'C'},
		{"max-conns-per-instance", required_argument, NULL, 'P'},
		{"max-subscribers", required_argument, NULL, 'B'},
		{"header-timeout", required_argument, NULL, 'T'},
		{"idle-timeout", required_argument, NULL, 'i'},
		{"control-socket", required_argument, NULL, 'c'},
		{"agent-ping-interval", required_argument, NULL, 'p'},
		{"max-agent-conns", required_argument, NULL, 'a'},
		{"vsock-port", required_argument, NULL, 'k'},
		{"af-vsock", required_argument, NULL, 'A'},
		{"vm-devlxd-auth", required_argument, NULL, 'D'},
		{"debug", no_argument, NULL, 'd'},
		{"verbose", no_argument, NULL, 'v'},
		{"help", no_argument, NULL, 'h'},
		{"version", no_argument, NULL, 'V'},
		{NULL, 0, NULL, 0},
	};
	const char *state_dir = NULL, *mnt = NULL;
	gl_fs_opts fo = {.allow_other = true};
	struct daemon d;
	char err[512];
	gl_limits lim;
	gl_devlxd_opts dopts;
	gl_vm_opts vopts;
	const char *ctl_path = GL_CTL_DEFAULT_PATH;
	int af_vsock = -1; /* auto */
	uint8_t pk[GL_AUTH_PK];
	char images[PATH_MAX], mntabs[PATH_MAX];
	size_t n;
	int c, r, status = 1;

	gl_limits_default(&lim);
	gl_devlxd_opts_default(&dopts);
	gl_vm_opts_default(&vopts);
	dopts.socket_path = NULL; /* the devlxd face runs only when asked for */
	dopts.images_dir = NULL;
	opterr = 0; /* our own messages, in the log's format */
	while ((c = getopt_long(argc, argv, "vhV", longopts, NULL)) != -1) {
		switch (c) {
		case 's':
			state_dir = optarg;
			break;
		case 'm':
			mnt = optarg;
			break;
		case 'x':
			if (parse_size(optarg, &lim.max_value) < 0) {
				log_error("--max-value-size: not a size: %s", optarg);
				return 2;
			}
			break;
		case 'q':
			if (parse_size(optarg, &lim.max_sub_bytes) < 0) {
				log_error("--max-queue-bytes: not a size: %s", optarg);
				return 2;
			}
			break;
		case 'n':
			fo.allow_other = false;
			break;
		case 'S':
			dopts.socket_path = optarg;
			break;
		case 'I':
			dopts.images_dir = optarg;
			break;
		case 'H':
		case 'C':
		case 'P':
		case 'B':
		case 'T':
		case 'i':
			if (parse_size(optarg, &n) < 0 && strcmp(optarg, "0") != 0) {
				log_error("--%s: not a number: %s", opt_name(longopts, c), optarg);
				return 2;
			}
			if (strcmp(optarg, "0") == 0)
				n = 0;
			if (c == 'H')
				dopts.max_header_bytes = n;
			else if (c == 'C')
				dopts.max_conns = (unsigned)n;
			else if (c == 'P')
				dopts.max_conns_per_instance = (unsigned)n;
			else if (c == 'B')
				dopts.max_subs_per_instance = (unsigned)n;
			else if (c == 'T')
				dopts.header_timeout_ms = n;
			else
				dopts.idle_timeout_ms = n;
			break;
		case 'c':
			ctl_path = optarg;
			break;
		case 'A':
			if (!strcmp(optarg, "auto")) {
				af_vsock = -1;
			} else if (!strcmp(optarg, "on")) {
				af_vsock = 1;
			} else if (!strcmp(optarg, "off")) {
				af_vsock = 0;
			} else {
				log_error("--af-vsock: auto, on or off, not %s", optarg);
				return 2;
			}
			break;
		case 'D':
			if (!strcmp(optarg, "token")) {
				vopts.devlxd_no_auth = false;
			} else if (!strcmp(optarg, "none")) {
				vopts.devlxd_no_auth = true;
			} else {
				log_error("--vm-devlxd-auth: token or none, not %s", optarg);
				return 2;
			}
			break;
		case 'p':
		case 'a':
		case 'k': {
			unsigned long long v;
			char *end;

			errno = 0;
			v = strtoull(optarg, &end, 10);
			if (errno || end == optarg || *end || *optarg == '-' ||
			    (c == 'p' && v > 86400000ULL) || (c == 'a' && (v < 1 || v > 1000000)) ||
			    (c == 'k' && (v < 1 || v > 0xfffffffeULL))) {
				log_error("--%s: not a valid number: %s", opt_name(longopts, c),
				          optarg);
				return 2;
			}
			if (c == 'p')
				vopts.ping_interval_ms = v;
			else if (c == 'a')
				vopts.max_agent_conns = (unsigned)v;
			else
				vopts.vsock_port = (uint32_t)v;
			break;
		}
		case 'd':
			fo.debug = true;
			break;
		case 'v':
			gl_log_set_level(GL_LOG_DEBUG);
			break;
		case 'h':
			usage(stdout);
			return 0;
		case 'V':
			printf("guestlinkd %s\n", GUESTLINK_VERSION);
			return 0;
		default:
			log_error("unknown option, or missing value: %s (see --help)",
			          argv[optind - 1]);
			return 2;
		}
	}
	if (optind < argc) {
		log_error("unexpected argument: %s", argv[optind]);
		usage(stderr);
		return 2;
	}
	if (!state_dir || !mnt) {
		log_error("%s is required (see --help)", !state_dir ? "--state-dir" : "--mount");
		return 2;
	}

	signal(SIGPIPE, SIG_IGN);
	memset(&d, 0, sizeof(d));

	if (ensure_dir("state directory", state_dir, 0700) < 0)
		return 1;
	recover_stuck_predecessor(state_dir, mnt);
	err[0] = '\0';
	r = gl_store_sqlite_open(state_dir, &d.store, err, sizeof(err));
	if (r < 0) {
		if (err[0])
			log_error("%s", err);
		else
			log_error("%s: %s", state_dir, strerror(-r));
		return 1;
	}
	r = uv_loop_init(&d.loop);
	if (r < 0) {
		log_error("uv_loop_init: %s", uv_strerror(r));
		goto out_store;
	}
	err[0] = '\0';
	d.model = gl_model_open(&d.loop, d.store, &lim, err, sizeof(err));
	if (!d.model) {
		log_error("cannot load %s: %s", state_dir, err[0] ? err : "unknown error");
		goto out_loop;
	}

	clean_leftover_mount(mnt);
	if (ensure_dir("mount point", mnt, 0755) < 0)
		goto out_model;
	/* absolute: the tree compares it with paths read from /proc */
	if (absolute_path(mnt, mntabs, sizeof(mntabs)) < 0) {
		log_error("mount point %s: cannot resolve its path", mnt);
		goto out_model;
	}
	fo.mountpoint = mntabs;
	if (strcmp(ctl_path, "none") != 0 && inside_mount(ctl_path, mntabs)) {
		/* bind() there would ask the tree for a socket node */
		log_error("control socket %s is inside the mount point %s: give another "
		          "--control-socket (or none), or mount elsewhere", ctl_path, mntabs);
		goto out_model;
	}
	r = gl_fs_start(&d.loop, d.model, &fo, on_fs_ended, &d, &d.fs);
	if (r < 0)
		goto out_model;

	uv_signal_init(&d.loop, &d.sigint);
	uv_signal_init(&d.loop, &d.sigterm);
	d.sigint.data = d.sigterm.data = &d;
	uv_signal_start(&d.sigint, on_signal, SIGINT);
	uv_signal_start(&d.sigterm, on_signal, SIGTERM);

	/* The devlxd server runs even without a host socket: VMs reach it
	 * through their transports. */
	if (!dopts.images_dir) {
		snprintf(images, sizeof(images), "%s/images", state_dir);
		dopts.images_dir = images;
	}
	err[0] = '\0';
	r = gl_devlxd_start(&d.loop, d.model, &dopts, &d.devlxd, err, sizeof(err));
	if (r < 0) {
		log_error("devlxd socket %s: %s", dopts.socket_path ? dopts.socket_path : "(none)",
		          err[0] ? err : strerror(-r));
		goto out_stop;
	}
	if (dopts.socket_path)
		log_info("devlxd API on %s", dopts.socket_path);

	err[0] = '\0';
	if (gl_auth_init() < 0 ||
	    gl_auth_host_keys(state_dir, pk, vopts.sk, err, sizeof(err)) < 0) {
		log_error("host key in %s: %s", state_dir, err[0] ? err : "cannot initialise libsodium");
		goto out_stop;
	}
	/* a host of vhost-vsock guests has /dev/vhost-vsock; without it an
	 * AF_VSOCK connect could only leave this machine for its own
	 * hypervisor (specs/vsock.md §4) */
	vopts.af_vsock = af_vsock < 0 ? access("/dev/vhost-vsock", F_OK) == 0 : af_vsock == 1;
	if (!vopts.af_vsock)
		log_debug("AF_VSOCK off: VMs bound by vsock-cid are not served");
	err[0] = '\0';
	r = gl_vm_start(&d.loop, d.model, d.devlxd, &vopts, &d.vm, err, sizeof(err));
	explicit_bzero(vopts.sk, sizeof(vopts.sk));
	if (r < 0) {
		log_error("VM transports: %s", err[0] ? err : strerror(-r));
		goto out_stop;
	}
	if (strcmp(ctl_path, "none") != 0) {
		err[0] = '\0';
		r = gl_ctl_start(&d.loop, d.model, d.vm, ctl_path, &d.ctl, err, sizeof(err));
		if (r < 0) {
			log_error("control socket: %s", err[0] ? err : strerror(-r));
			goto out_stop;
		}
		log_info("control socket on %s", ctl_path);
	}

	log_info("serving %s on %s", state_dir, mnt);

	uv_run(&d.loop, UV_RUN_DEFAULT);
	status = 0;
	goto out_loop;

out_stop:
	/* the mount is up: unmount through the normal path, then exit 1 */
	d.stopping = true;
	status = 1;
	gl_fs_stop(d.fs);
	uv_run(&d.loop, UV_RUN_DEFAULT);
	goto out_loop;


out_model:
	gl_model_close(d.model);
	d.model = NULL;
out_loop:
	/* Let closing handles finish, then close the loop. */
	uv_run(&d.loop, UV_RUN_DEFAULT);
	if (uv_loop_close(&d.loop) != 0)
		log_debug("loop closed with handles still open");
out_store:
	gl_store_close(d.store);
	return status;
}
