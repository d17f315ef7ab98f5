/* minfs: the benchmark baseline. A minimal libfuse3 low-level file system
 * serving one static file ("bar\n", 4 bytes), single-threaded
 * (fuse_session_loop), so that guestlinkd's per-request cost can be set
 * beside the cheapest possible FUSE answer on the same kernel.
 *
 *   minfs [--direct-io] [--noflush] [--entry-timeout S] [--attr-timeout S]
 *         [--depth N] [-o OPTS] [--debug] MNT
 *
 * --depth N puts the file N levels down: N-1 directories named a, b, c, ...
 * then `file` (--depth 3: MNT/a/b/file, the depth of MNT/c1/config/user.foo).
 * --noflush sets FOPEN_NOFLUSH on opens, as guestlinkd does for read-only
 * opens (nothing to commit): close() then sends no FLUSH. Without it minfs
 * answers FLUSH with 0, never ENOSYS (which the kernel would remember and
 * stop sending FLUSH altogether).
 * The defaults are libfuse's (cached I/O, 1 s timeouts, depth 1). The
 * configuration that matches guestlink's live files is
 *   --direct-io --noflush --entry-timeout 1 --attr-timeout 0 --depth 3
 *   -o default_permissions,allow_other
 * (docs/benchmarks.md). */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include <fuse_lowlevel.h>

#define MAX_DEPTH 8

static const char file_data[] = "bar\n";
static const char file_name[] = "file";

/* Inode layout: 1 is the root, 2..depth are the directories a, b, ...,
 * depth+1 is the file. */
static struct {
	int depth;
	int direct_io;
	int noflush;
	double entry_timeout;
	double attr_timeout;
} cfg = {
	.depth = 1,
	.entry_timeout = 1.0,
	.attr_timeout = 1.0,
};

static fuse_ino_t file_ino(void)
{
	return (fuse_ino_t)cfg.depth + 1;
}

static int is_dir(fuse_ino_t ino)
{
	return ino >= 1 && ino <= (fuse_ino_t)cfg.depth;
}

/* The name of the only child of directory `dir`. */
static void child_name(fuse_ino_t dir, char *out, size_t outlen)
{
	if (dir == (fuse_ino_t)cfg.depth)
		snprintf(out, outlen, "%s", file_name);
	else
		snprintf(out, outlen, "%c", (char)('a' + (dir - 1)));
}

static int fill_stat(fuse_ino_t ino, struct stat *st)
{
	memset(st, 0, sizeof(*st));
	st->st_ino = ino;
	if (is_dir(ino)) {
		st->st_mode = S_IFDIR | 0755;
		st->st_nlink = ino == (fuse_ino_t)cfg.depth ? 2 : 3;
	} else if (ino == file_ino()) {
		st->st_mode = S_IFREG | 0644;
		st->st_nlink = 1;
		st->st_size = sizeof(file_data) - 1;
	} else {
		return -ENOENT;
	}
	return 0;
}

static void minfs_lookup(fuse_req_t req, fuse_ino_t parent, const char *name)
{
	struct fuse_entry_param e;
	char want[8];

	if (!is_dir(parent)) {
		fuse_reply_err(req, ENOTDIR);
		return;
	}
	child_name(parent, want, sizeof(want));
	if (strcmp(name, want) != 0) {
		fuse_reply_err(req, ENOENT);
		return;
	}
	memset(&e, 0, sizeof(e));
	e.ino = parent + 1;
	e.attr_timeout = cfg.attr_timeout;
	e.entry_timeout = cfg.entry_timeout;
	fill_stat(e.ino, &e.attr);
	fuse_reply_entry(req, &e);
}

static void minfs_getattr(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	struct stat st;

	if (fill_stat(ino, &st) < 0) {
		fuse_reply_err(req, ENOENT);
		return;
	}
	fuse_reply_attr(req, &st, cfg.attr_timeout);
}

static void minfs_readdir(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
                          struct fuse_file_info *fi)
{
	struct {
		const char *name;
		fuse_ino_t ino;
	} ents[3];
	char child[8];
	char buf[512];
	size_t len = 0;
	int i;

	if (!is_dir(ino)) {
		fuse_reply_err(req, ENOTDIR);
		return;
	}
	child_name(ino, child, sizeof(child));
	ents[0].name = ".";
	ents[0].ino = ino;
	ents[1].name = "..";
	ents[1].ino = ino == 1 ? 1 : ino - 1;
	ents[2].name = child;
	ents[2].ino = ino + 1;
	for (i = (int)off; i < 3; i++) {
		struct stat st;
		size_t n;

		memset(&st, 0, sizeof(st));
		st.st_ino = ents[i].ino;
		fill_stat(ents[i].ino, &st);
		n = fuse_add_direntry(req, buf + len, sizeof(buf) - len, ents[i].name, &st, i + 1);
		if (n > sizeof(buf) - len || len + n > size)
			break;
		len += n;
	}
	fuse_reply_buf(req, buf, len);
}

static void minfs_open(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	if (is_dir(ino)) {
		fuse_reply_err(req, EISDIR);
		return;
	}
	if (ino != file_ino()) {
		fuse_reply_err(req, ENOENT);
		return;
	}
	if ((fi->flags & O_ACCMODE) != O_RDONLY) {
		fuse_reply_err(req, EACCES);
		return;
	}
	fi->direct_io = cfg.direct_io;
	fi->noflush = cfg.noflush;
	fuse_reply_open(req, fi);
}

static void minfs_read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
                       struct fuse_file_info *fi)
{
	size_t len = sizeof(file_data) - 1;

	if (off < 0 || (size_t)off >= len) {
		fuse_reply_buf(req, NULL, 0);
		return;
	}
	len -= (size_t)off;
	fuse_reply_buf(req, file_data + off, len < size ? len : size);
}

static void minfs_flush(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	fuse_reply_err(req, 0);
}

static void minfs_release(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	fuse_reply_err(req, 0);
}

static const struct fuse_lowlevel_ops minfs_ops = {
	.lookup = minfs_lookup,
	.getattr = minfs_getattr,
	.readdir = minfs_readdir,
	.open = minfs_open,
	.read = minfs_read,
	.flush = minfs_flush,
	.release = minfs_release,
};

static void usage(FILE *f, const char *argv0)
{
	fprintf(f,
	        "usage: %s [options] MNT\n"
	        "  --direct-io          open the file with direct_io (no page cache)\n"
	        "  --noflush            open the file with noflush (close sends no FLUSH)\n"
	        "  --entry-timeout S    entry cache timeout in seconds (default 1)\n"
	        "  --attr-timeout S     attribute cache timeout in seconds (default 1)\n"
	        "  --depth N            file at MNT/a/b/.../file, N levels down (1..%d, default 1)\n"
	        "  -o OPTS              extra mount options (e.g. default_permissions,allow_other)\n"
	        "  --debug              libfuse debug output\n"
	        "  -h, --help           this text\n",
	        argv0, MAX_DEPTH);
}

static int parse_seconds(const char *s, double *out)
{
	char *end;
	double v;

	errno = 0;
	v = strtod(s, &end);
	if (errno || end == s || *end || v < 0)
		return -EINVAL;
	*out = v;
	return 0;
}

int main(int argc, char **argv)
{
	static const struct option longopts[] = {
		{ "direct-io", no_argument, NULL, 'D' },
		{ "noflush", no_argument, NULL, 'N' },
		{ "entry-timeout", required_argument, NULL, 'E' },
		{ "attr-timeout", required_argument, NULL, 'A' },
		{ "depth", required_argument, NULL, 'd' },
		{ "debug", no_argument, NULL, 'g' },
		{ "help", no_argument, NULL, 'h' },
		{ NULL, 0, NULL, 0 },
	};
	char *fargv[8];
	int fargc = 0;
	char optbuf[1024] = "fsname=minfs,subtype=minfs";
	struct fuse_args args;
	struct fuse_session *se;
	const char *mnt;
	int debug = 0;
	int ret = 1;
	int c;

	while ((c = getopt_long(argc, argv, "o:h", longopts, NULL)) != -1) {
		switch (c) {
		case 'D':
			cfg.direct_io = 1;
			break;
		case 'N':
			cfg.noflush = 1;
			break;
		case 'E':
			if (parse_seconds(optarg, &cfg.entry_timeout) < 0) {
				fprintf(stderr, "minfs: bad --entry-timeout: %s\n", optarg);
				return 2;
			}
			break;
		case 'A':
			if (parse_seconds(optarg, &cfg.attr_timeout) < 0) {
				fprintf(stderr, "minfs: bad --attr-timeout: %s\n", optarg);
				return 2;
			}
			break;
		case 'd': {
			char *end;
			long v = strtol(optarg, &end, 10);

			if (*end || end == optarg || v < 1 || v > MAX_DEPTH) {
				fprintf(stderr, "minfs: bad --depth: %s\n", optarg);
				return 2;
			}
			cfg.depth = (int)v;
			break;
		}
		case 'o':
			if (strlen(optbuf) + 1 + strlen(optarg) >= sizeof(optbuf)) {
				fprintf(stderr, "minfs: -o options too long\n");
				return 2;
			}
			strcat(optbuf, ",");
			strcat(optbuf, optarg);
			break;
		case 'g':
			debug = 1;
			break;
		case 'h':
			usage(stdout, argv[0]);
			return 0;
		default:
			usage(stderr, argv[0]);
			return 2;
		}
	}
	if (optind != argc - 1) {
		usage(stderr, argv[0]);
		return 2;
	}
	mnt = argv[optind];

	fargv[fargc++] = argv[0];
	fargv[fargc++] = "-o";
	fargv[fargc++] = optbuf;
	if (debug)
		fargv[fargc++] = "-d";
	fargv[fargc] = NULL;
	args = (struct fuse_args)FUSE_ARGS_INIT(fargc, fargv);

	se = fuse_session_new(&args, &minfs_ops, sizeof(minfs_ops), NULL);
	if (!se) {
		fprintf(stderr, "minfs: fuse_session_new failed\n");
		goto out_args;
	}
	if (fuse_set_signal_handlers(se) != 0) {
		fprintf(stderr, "minfs: cannot set signal handlers\n");
		goto out_session;
	}
	if (fuse_session_mount(se, mnt) != 0) {
		fprintf(stderr, "minfs: cannot mount on %s\n", mnt);
		goto out_signals;
	}
	/* A positive result is the signal that stopped the loop: a clean stop. */
	ret = fuse_session_loop(se) < 0 ? 1 : 0;
	fuse_session_unmount(se);
out_signals:
	fuse_remove_signal_handlers(se);
out_session:
	fuse_session_destroy(se);
out_args:
	fuse_opt_free_args(&args);
	return ret;
}
