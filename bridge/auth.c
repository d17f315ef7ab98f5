/* The host's ed25519 identity and the agent handshake's signature
 * (bridge/auth.h). */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <sodium.h>

#include "bridge/auth.h"

#define CTX_LEN (sizeof(GL_AUTH_CONTEXT)) /* the context string and its NUL */
#define KEY_FILE_MAX 512

int gl_auth_init(void)
{
	return sodium_init() < 0 ? -EIO : 0;
}

void gl_auth_hex(const uint8_t *p, size_t n, char *out)
{
	static const char digits[] = "0123456789abcdef";
	size_t i;

	for (i = 0; i < n; i++) {
		out[2 * i] = digits[p[i] >> 4];
		out[2 * i + 1] = digits[p[i] & 15];
	}
	out[2 * n] = '\0';
}

static int hexval(char c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	if (c >= 'a' && c <= 'f')
		return c - 'a' + 10;
	if (c >= 'A' && c <= 'F')
		return c - 'A' + 10;
	return -1;
}

int gl_auth_unhex(const char *s, size_t slen, uint8_t *out, size_t n)
{
	size_t i;

	if (slen != 2 * n)
		return -EINVAL;
	for (i = 0; i < n; i++) {
		int hi = hexval(s[2 * i]), lo = hexval(s[2 * i + 1]);

		if (hi < 0 || lo < 0)
			return -EINVAL;
		out[i] = (uint8_t)(hi << 4 | lo);
	}
	return 0;
}

void gl_auth_nonce(uint8_t nonce[GL_AUTH_NONCE])
{
	randombytes_buf(nonce, GL_AUTH_NONCE);
}

/* The signed message; 0, or -EINVAL for an instance id over the limit
 * (which therefore can never be signed nor verified). */
static int auth_message(const uint8_t nonce[GL_AUTH_NONCE], const char *instance,
			uint8_t *msg, size_t *len)
{
	size_t ilen;

	if (!instance)
		instance = "";
	ilen = strlen(instance);
	if (ilen > GL_AUTH_INSTANCE_MAX)
		return -EINVAL;
	memcpy(msg, GL_AUTH_CONTEXT, CTX_LEN);
	memcpy(msg + CTX_LEN, nonce, GL_AUTH_NONCE);
	memcpy(msg + CTX_LEN + GL_AUTH_NONCE, instance, ilen);
	*len = CTX_LEN + GL_AUTH_NONCE + ilen;
	return 0;
}

void gl_auth_sign(const uint8_t sk[GL_AUTH_SK], const uint8_t nonce[GL_AUTH_NONCE],
		  const char *instance, uint8_t sig[GL_AUTH_SIG])
{
	uint8_t msg[CTX_LEN + GL_AUTH_NONCE + GL_AUTH_INSTANCE_MAX];
	size_t len;

	if (auth_message(nonce, instance, msg, &len) < 0) {
		/* all zeros never verifies */
		memset(sig, 0, GL_AUTH_SIG);
		return;
	}
	crypto_sign_detached(sig, NULL, msg, len, sk);
}

bool gl_auth_verify(const uint8_t pk[GL_AUTH_PK], const uint8_t nonce[GL_AUTH_NONCE],
		    const char *instance, const uint8_t sig[GL_AUTH_SIG])
{
	uint8_t msg[CTX_LEN + GL_AUTH_NONCE + GL_AUTH_INSTANCE_MAX];
	size_t len;

	if (auth_message(nonce, instance, msg, &len) < 0)
		return false;
	return crypto_sign_verify_detached(sig, msg, len, pk) == 0;
}

/* ---- key files ---------------------------------------------------------- */

/* Read a small regular file whole into buf (NUL-terminated). */
static int read_small(const char *path, char *buf, size_t cap, size_t *len, mode_t *mode)
{
	struct stat st;
	ssize_t n;
	size_t got = 0;
	int fd, r = 0;

	fd = open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY);
	if (fd < 0)
		return -errno;
	if (fstat(fd, &st) < 0) {
		r = -errno;
		goto out;
	}
	if (!S_ISREG(st.st_mode)) {
		r = -EINVAL;
		goto out;
	}
	for (;;) {
		n = read(fd, buf + got, cap - 1 - got);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			r = -errno;
			goto out;
		}
		if (n == 0)
			break;
		got += (size_t)n;
		if (got == cap - 1) {
			r = -EFBIG;
			goto out;
		}
	}
	buf[got] = '\0';
	*len = got;
	if (mode)
		*mode = st.st_mode;
out:
	close(fd);
	return r;
}

static int fsync_dir(const char *dir)
{
	int fd, r = 0;

	fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (fd < 0)
		return -errno;
	if (fsync(fd) < 0)
		r = -errno;
	close(fd);
	return r;
}

/* Write `data` to a new temporary file in dir with exactly `mode`, then
 * put it at `path`: by rename (replace) or by link (only if absent:
 * -EEXIST otherwise, which keeps a key made meanwhile by someone else). */
static int write_file(const char *dir, const char *path, const char *data, size_t len,
		      mode_t mode, bool replace)
{
	char tmp[PATH_MAX];
	size_t off = 0;
	ssize_t n;
	int fd, r;

	if (snprintf(tmp, sizeof(tmp), "%s/.host.tmp.XXXXXX", dir) >= (int)sizeof(tmp))
		return -ENAMETOOLONG;
	fd = mkostemp(tmp, O_CLOEXEC);
	if (fd < 0)
		return -errno;
	if (fchmod(fd, mode) < 0) {
		r = -errno;
		goto fail;
	}
	while (off < len) {
		n = write(fd, data + off, len - off);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			r = -errno;
			goto fail;
		}
		off += (size_t)n;
	}
	if (fsync(fd) < 0) {
		r = -errno;
		goto fail;
	}
	close(fd);
	fd = -1;
	if (replace)
		r = rename(tmp, path) < 0 ? -errno : 0;
	else
		r = link(tmp, path) < 0 ? -errno : 0;
	if (r < 0 || !replace)
		unlink(tmp);
	if (r < 0)
		return r;
	return fsync_dir(dir);

fail:
	close(fd);
	unlink(tmp);
	return r;
}

static void set_err(char *err, size_t errlen, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));

static void set_err(char *err, size_t errlen, const char *fmt, ...)
{
	va_list ap;

	if (!err || !errlen)
		return;
	va_start(ap, fmt);
	vsnprintf(err, errlen, fmt, ap);
	va_end(ap);
}

/* host.key exactly as written by us: 128 lowercase hex digits, "\n", and a
 * secret key whose public half is the one its seed derives. */
static int parse_host_key(const char *buf, size_t len, uint8_t pk[GL_AUTH_PK],
			  uint8_t sk[GL_AUTH_SK])
{
	uint8_t pk2[GL_AUTH_PK], sk2[GL_AUTH_SK];
	size_t i;
	int r = -EINVAL;

	if (len != 2 * GL_AUTH_SK + 1 || buf[2 * GL_AUTH_SK] != '\n')
		return -EINVAL;
	for (i = 0; i < 2 * GL_AUTH_SK; i++)
		if (!((buf[i] >= '0' && buf[i] <= '9') || (buf[i] >= 'a' && buf[i] <= 'f')))
			return -EINVAL;
	if (gl_auth_unhex(buf, 2 * GL_AUTH_SK, sk, GL_AUTH_SK) < 0)
		return -EINVAL;
	if (crypto_sign_seed_keypair(pk2, sk2, sk) == 0 &&
	    sodium_memcmp(sk2, sk, GL_AUTH_SK) == 0) {
		memcpy(pk, pk2, GL_AUTH_PK);
		r = 0;
	}
	sodium_memzero(sk2, sizeof(sk2));
	if (r < 0)
		sodium_memzero(sk, GL_AUTH_SK);
	return r;
}

int gl_auth_host_keys(const char *dir, uint8_t pk[GL_AUTH_PK], uint8_t sk[GL_AUTH_SK], char *err,
		      size_t errlen)
{
	char kpath[PATH_MAX], ppath[PATH_MAX];
	char buf[KEY_FILE_MAX], publine[2 * GL_AUTH_PK + 2];
	size_t len;
	mode_t mode;
	int r, tries;

	r = gl_auth_init();
	if (r < 0) {
		set_err(err, errlen, "libsodium cannot be initialised");
		return r;
	}
	if (snprintf(kpath, sizeof(kpath), "%s/host.key", dir) >= (int)sizeof(kpath) ||
	    snprintf(ppath, sizeof(ppath), "%s/host.pub", dir) >= (int)sizeof(ppath)) {
		set_err(err, errlen, "%s: path too long", dir);
		return -ENAMETOOLONG;
	}

	for (tries = 0;; tries++) {
		r = read_small(kpath, buf, sizeof(buf), &len, &mode);
		if (r == 0)
			break;
		if (r != -ENOENT || tries > 0) {
			set_err(err, errlen, "%s: %s", kpath,
				r == -EFBIG || r == -EINVAL ? "not a host key file" : strerror(-r));
			return r == -EFBIG ? -EINVAL : r;
		}
		/* absent: make a key pair */
		crypto_sign_keypair(pk, sk);
		gl_auth_hex(sk, GL_AUTH_SK, buf);
		buf[2 * GL_AUTH_SK] = '\n';
		r = write_file(dir, kpath, buf, 2 * GL_AUTH_SK + 1, 0600, false);
		sodium_memzero(buf, sizeof(buf));
		sodium_memzero(sk, GL_AUTH_SK);
		if (r < 0 && r != -EEXIST) {
			set_err(err, errlen, "%s: cannot create: %s", kpath, strerror(-r));
			return r;
		}
		/* read back what is there now: ours, or a racing creator's */
	}

	r = parse_host_key(buf, len, pk, sk);
	sodium_memzero(buf, sizeof(buf));
	if (r < 0) {
		set_err(err, errlen, "%s: not a host key file (refused, left as it is)", kpath);
		return r;
	}
	if (mode & 077) {
		sodium_memzero(sk, GL_AUTH_SK);
		set_err(err, errlen, "%s: readable by others (mode %04o); it must be 0600", kpath,
			(unsigned)(mode & 07777));
		return -EPERM;
	}

	gl_auth_hex(pk, GL_AUTH_PK, publine);
	publine[2 * GL_AUTH_PK] = '\n';
	publine[2 * GL_AUTH_PK + 1] = '\0';
	r = read_small(ppath, buf, sizeof(buf), &len, &mode);
	if (r == 0 && len == 2 * GL_AUTH_PK + 1 && memcmp(buf, publine, len) == 0 &&
	    (mode & 07777) == 0644)
		return 0;
	r = write_file(dir, ppath, publine, 2 * GL_AUTH_PK + 1, 0644, true);
	if (r < 0) {
		sodium_memzero(sk, GL_AUTH_SK);
		set_err(err, errlen, "%s: cannot write: %s", ppath, strerror(-r));
		return r;
	}
	return 0;
}

static bool is_space(char c)
{
	return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f';
}

int gl_auth_load_pub(const char *path, uint8_t pk[GL_AUTH_PK], char *err, size_t errlen)
{
	char buf[KEY_FILE_MAX];
	const char *s;
	size_t len, bin_len;
	int r;

	r = read_small(path, buf, sizeof(buf), &len, NULL);
	if (r < 0) {
		set_err(err, errlen, "%s: %s", path,
			r == -EFBIG || r == -EINVAL ? "not a public key file" : strerror(-r));
		return r == -EFBIG ? -EINVAL : r;
	}
	s = buf;
	while (len && is_space(*s)) {
		s++;
		len--;
	}
	while (len && is_space(s[len - 1]))
		len--;

	if (len == 2 * GL_AUTH_PK && gl_auth_unhex(s, len, pk, GL_AUTH_PK) == 0)
		return 0;
	if (len == 44 && sodium_base642bin(pk, GL_AUTH_PK, s, len, NULL, &bin_len, NULL,
					   sodium_base64_VARIANT_ORIGINAL) == 0 &&
	    bin_len == GL_AUTH_PK)
		return 0;
	set_err(err, errlen, "%s: not an ed25519 public key (64 hex digits or 44 base64 chars)",
		path);
	return -EINVAL;
}
