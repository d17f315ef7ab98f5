/* bridge/auth.c: the host's key files and the handshake's signature. */
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <string.h>
#include <sys/stat.h>

#include <sodium.h>

#include "bridge/auth.h"
#include "tests/unit/unit.h"

static char *dir;

static void setup(void)
{
	ck_assert_int_eq(gl_auth_init(), 0);
	ck_assert_int_eq(gl_auth_init(), 0);
	dir = unit_tmpdir();
}

static void teardown(void)
{
	unit_rmrf(dir);
	free(dir);
}

static char *path_of(const char *name)
{
	char *p;

	ck_assert_int_gt(asprintf(&p, "%s/%s", dir, name), 0);
	return p;
}

/* Whole file into a new string; *len its size. */
static char *slurp(const char *path, size_t *len, mode_t *mode)
{
	struct stat st;
	char *p;
	int fd;

	fd = open(path, O_RDONLY);
	ck_assert_int_ge(fd, 0);
	ck_assert_int_eq(fstat(fd, &st), 0);
	p = calloc(1, (size_t)st.st_size + 1);
	ck_assert_ptr_nonnull(p);
	ck_assert_int_eq(read(fd, p, (size_t)st.st_size), st.st_size);
	close(fd);
	*len = (size_t)st.st_size;
	if (mode)
		*mode = st.st_mode & 07777;
	return p;
}

static void put(const char *path, const char *s, mode_t mode)
{
	int fd;

	fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, mode);
	ck_assert_int_ge(fd, 0);
	ck_assert_int_eq(write(fd, s, strlen(s)), (ssize_t)strlen(s));
	ck_assert_int_eq(fchmod(fd, mode), 0);
	close(fd);
}

static bool all_lower_hex(const char *s, size_t n)
{
	size_t i;

	for (i = 0; i < n; i++)
		if (!((s[i] >= '0' && s[i] <= '9') || (s[i] >= 'a' && s[i] <= 'f')))
			return false;
	return true;
}

/* ---- key files ------------------------------------------------------------ */

START_TEST(keys_created_and_reloaded)
{
	uint8_t pk[GL_AUTH_PK], sk[GL_AUTH_SK], pk2[GL_AUTH_PK], sk2[GL_AUTH_SK];
	char *kp = path_of("host.key"), *pp = path_of("host.pub");
	char err[256] = "", hex[2 * GL_AUTH_SK + 1];
	char *key, *pub, *pub2;
	size_t klen, plen, plen2;
	mode_t kmode, pmode;
	uint8_t seedpk[GL_AUTH_PK], seedsk[GL_AUTH_SK];

	umask(022);
	ck_assert_int_eq(gl_auth_host_keys(dir, pk, sk, err, sizeof(err)), 0);
	key = slurp(kp, &klen, &kmode);
	pub = slurp(pp, &plen, &pmode);
	ck_assert_uint_eq(kmode, 0600);
	ck_assert_uint_eq(pmode, 0644);
	ck_assert_uint_eq(klen, 129);
	ck_assert_uint_eq(plen, 65);
	ck_assert_int_eq(key[128], '\n');
	ck_assert_int_eq(pub[64], '\n');
	ck_assert(all_lower_hex(key, 128));
	ck_assert(all_lower_hex(pub, 64));
	gl_auth_hex(sk, GL_AUTH_SK, hex);
	ck_assert_mem_eq(key, hex, 128);
	gl_auth_hex(pk, GL_AUTH_PK, hex);
	ck_assert_mem_eq(pub, hex, 64);
	/* the pair is consistent: the seed derives the same keys */
	ck_assert_int_eq(crypto_sign_seed_keypair(seedpk, seedsk, sk), 0);
	ck_assert_mem_eq(seedpk, pk, GL_AUTH_PK);
	ck_assert_mem_eq(seedsk, sk, GL_AUTH_SK);

	/* reload: same keys, files untouched */
	ck_assert_int_eq(gl_auth_host_keys(dir, pk2, sk2, err, sizeof(err)), 0);
	ck_assert_mem_eq(pk2, pk, GL_AUTH_PK);
	ck_assert_mem_eq(sk2, sk, GL_AUTH_SK);

	/* host.pub missing, or wrong: rewritten from host.key */
	ck_assert_int_eq(unlink(pp), 0);
	ck_assert_int_eq(gl_auth_host_keys(dir, pk2, sk2, err, sizeof(err)), 0);
	pub2 = slurp(pp, &plen2, &pmode);
	ck_assert_uint_eq(plen2, 65);
	ck_assert_mem_eq(pub2, pub, 65);
	ck_assert_uint_eq(pmode, 0644);
	free(pub2);
	put(pp, "0000\n", 0600);
	ck_assert_int_eq(gl_auth_host_keys(dir, pk2, sk2, err, sizeof(err)), 0);
	pub2 = slurp(pp, &plen2, &pmode);
	ck_assert_uint_eq(plen2, 65);
	ck_assert_mem_eq(pub2, pub, 65);
	ck_assert_uint_eq(pmode, 0644);
	free(pub2);

	/* and gl_auth_load_pub reads what was written */
	ck_assert_int_eq(gl_auth_load_pub(pp, pk2, err, sizeof(err)), 0);
	ck_assert_mem_eq(pk2, pk, GL_AUTH_PK);

	/* no temporary files left behind */
	{
		char *cmd;
		int n;

		ck_assert_int_gt(asprintf(&cmd, "test $(ls -A %s | wc -l) -eq 2", dir), 0);
		n = system(cmd);
		free(cmd);
		ck_assert_int_eq(n, 0);
	}
	free(key);
	free(pub);
	free(kp);
	free(pp);
}
END_TEST

START_TEST(keys_modes_under_strict_umask)
{
	uint8_t pk[GL_AUTH_PK], sk[GL_AUTH_SK];
	char *pp = path_of("host.pub"), *kp = path_of("host.key");
	size_t len;
	mode_t mode;
	char *s;

	umask(077);
	ck_assert_int_eq(gl_auth_host_keys(dir, pk, sk, NULL, 0), 0);
	s = slurp(pp, &len, &mode);
	ck_assert_uint_eq(mode, 0644);
	free(s);
	s = slurp(kp, &len, &mode);
	ck_assert_uint_eq(mode, 0600);
	free(s);
	free(pp);
	free(kp);
}
END_TEST

/* Each of these host.key contents is refused, and left byte for byte. */
START_TEST(corrupt_host_key_refused)
{
	static const char *bad[] = {
		"",
		"\n",
		"not a key\n",
		/* 128 digits without the newline */
		"00000000000000000000000000000000000000000000000000000000000000000000000000000000"
		"000000000000000000000000000000000000000000000000",
	};
	uint8_t pk[GL_AUTH_PK], sk[GL_AUTH_SK], rpk[GL_AUTH_PK], rsk[GL_AUTH_SK];
	char *kp = path_of("host.key"), *pp = path_of("host.pub");
	char good[2 * GL_AUTH_SK + 2], variant[2 * GL_AUTH_SK + 8], err[256];
	char *after;
	size_t len, i;
	mode_t mode;

	crypto_sign_keypair(rpk, rsk);
	gl_auth_hex(rsk, GL_AUTH_SK, good);
	strcat(good, "\n");

	for (i = 0; i < sizeof(bad) / sizeof(bad[0]) + 4; i++) {
		const char *content;

		strcpy(variant, good);
		if (i < sizeof(bad) / sizeof(bad[0]))
			content = bad[i];
		else if (i == sizeof(bad) / sizeof(bad[0]))
			/* seed changed: the pk half no longer matches */
			content = (variant[5] = variant[5] == 'a' ? 'b' : 'a', variant);
		else if (i == sizeof(bad) / sizeof(bad[0]) + 1)
			content = (variant[127] = variant[127] == '0' ? '1' : '0', variant);
		else if (i == sizeof(bad) / sizeof(bad[0]) + 2)
			content = (strcat(variant, "\n"), variant); /* a trailing extra byte */
		else {
			/* uppercase: not what we write */
			size_t k;

			for (k = 0; k < 128; k++)
				if (variant[k] >= 'a' && variant[k] <= 'f')
					variant[k] = (char)(variant[k] - 'a' + 'A');
			content = variant;
		}
		unlink(pp);
		put(kp, content, 0600);
		err[0] = '\0';
		ck_assert_int_eq(gl_auth_host_keys(dir, pk, sk, err, sizeof(err)), -EINVAL);
		ck_assert_msg(strstr(err, "host.key") != NULL, "err: %s", err);
		after = slurp(kp, &len, &mode);
		ck_assert_uint_eq(len, strlen(content));
		ck_assert_mem_eq(after, content, len);
		ck_assert_uint_eq(mode, 0600);
		free(after);
		ck_assert_int_eq(access(pp, F_OK), -1);
	}

	/* the good one loads, and gives the pair it holds */
	put(kp, good, 0600);
	ck_assert_int_eq(gl_auth_host_keys(dir, pk, sk, err, sizeof(err)), 0);
	ck_assert_mem_eq(pk, rpk, GL_AUTH_PK);
	ck_assert_mem_eq(sk, rsk, GL_AUTH_SK);

	/* readable by others: refused, untouched */
	put(kp, good, 0644);
	ck_assert_int_eq(gl_auth_host_keys(dir, pk, sk, err, sizeof(err)), -EPERM);
	after = slurp(kp, &len, &mode);
	ck_assert_uint_eq(mode, 0644);
	ck_assert_mem_eq(after, good, len);
	free(after);

	/* a directory in its place */
	unlink(kp);
	ck_assert_int_eq(mkdir(kp, 0700), 0);
	ck_assert_int_lt(gl_auth_host_keys(dir, pk, sk, err, sizeof(err)), 0);
	rmdir(kp);
	free(kp);
	free(pp);
}
END_TEST

START_TEST(missing_dir)
{
	uint8_t pk[GL_AUTH_PK], sk[GL_AUTH_SK];
	char err[256] = "";
	char *d = path_of("nope");

	ck_assert_int_eq(gl_auth_host_keys(d, pk, sk, err, sizeof(err)), -ENOENT);
	ck_assert_str_ne(err, "");
	free(d);
}
END_TEST

/* ---- public key files ----------------------------------------------------- */

START_TEST(pub_files)
{
	uint8_t pk[GL_AUTH_PK], sk[GL_AUTH_SK], got[GL_AUTH_PK];
	char hex[2 * GL_AUTH_PK + 1], b64[64], upper[2 * GL_AUTH_PK + 1], buf[256];
	char *p = path_of("k.pub"), err[256];
	size_t i;

	crypto_sign_keypair(pk, sk);
	gl_auth_hex(pk, GL_AUTH_PK, hex);
	sodium_bin2base64(b64, sizeof(b64), pk, GL_AUTH_PK, sodium_base64_VARIANT_ORIGINAL);
	ck_assert_uint_eq(strlen(b64), 44);
	for (i = 0; i <= 2 * GL_AUTH_PK; i++)
		upper[i] = (hex[i] >= 'a' && hex[i] <= 'f') ? (char)(hex[i] - 32) : hex[i];

	/* hex, exactly as guestlinkd writes it */
	snprintf(buf, sizeof(buf), "%s\n", hex);
	put(p, buf, 0644);
	memset(got, 0, sizeof(got));
	ck_assert_int_eq(gl_auth_load_pub(p, got, err, sizeof(err)), 0);
	ck_assert_mem_eq(got, pk, GL_AUTH_PK);
	/* surrounded by whitespace, no newline, uppercase */
	snprintf(buf, sizeof(buf), " \t\n%s \r\n\n", upper);
	put(p, buf, 0644);
	memset(got, 0, sizeof(got));
	ck_assert_int_eq(gl_auth_load_pub(p, got, err, sizeof(err)), 0);
	ck_assert_mem_eq(got, pk, GL_AUTH_PK);
	put(p, hex, 0644);
	memset(got, 0, sizeof(got));
	ck_assert_int_eq(gl_auth_load_pub(p, got, err, sizeof(err)), 0);
	ck_assert_mem_eq(got, pk, GL_AUTH_PK);
	/* base64 */
	snprintf(buf, sizeof(buf), "%s\n", b64);
	put(p, buf, 0644);
	memset(got, 0, sizeof(got));
	ck_assert_int_eq(gl_auth_load_pub(p, got, err, sizeof(err)), 0);
	ck_assert_mem_eq(got, pk, GL_AUTH_PK);

	/* not keys */
	put(p, "", 0644);
	ck_assert_int_eq(gl_auth_load_pub(p, got, err, sizeof(err)), -EINVAL);
	hex[63] = 'g';
	put(p, hex, 0644);
	ck_assert_int_eq(gl_auth_load_pub(p, got, err, sizeof(err)), -EINVAL);
	hex[63] = '\0'; /* 63 digits */
	put(p, hex, 0644);
	ck_assert_int_eq(gl_auth_load_pub(p, got, err, sizeof(err)), -EINVAL);
	b64[43] = 'A'; /* no padding: not 32 bytes in standard base64 */
	put(p, b64, 0644);
	ck_assert_int_eq(gl_auth_load_pub(p, got, err, sizeof(err)), -EINVAL);
	snprintf(buf, sizeof(buf), "%s %s", upper, upper); /* two keys */
	put(p, buf, 0644);
	err[0] = '\0';
	ck_assert_int_eq(gl_auth_load_pub(p, got, err, sizeof(err)), -EINVAL);
	ck_assert_msg(strstr(err, "k.pub") != NULL, "err: %s", err);
	ck_assert_int_eq(unlink(p), 0);
	ck_assert_int_eq(gl_auth_load_pub(p, got, err, sizeof(err)), -ENOENT);
	ck_assert_int_lt(gl_auth_load_pub(dir, got, err, sizeof(err)), 0);
	free(p);
}
END_TEST

/* ---- hex ------------------------------------------------------------------ */

START_TEST(hex_round_trip)
{
	static const uint8_t in[] = { 0x00, 0x01, 0x7f, 0x80, 0xab, 0xff };
	uint8_t out[6];
	char s[13];

	gl_auth_hex(in, sizeof(in), s);
	ck_assert_str_eq(s, "00017f80abff");
	ck_assert_int_eq(gl_auth_unhex("00017F80ABFF", 12, out, 6), 0);
	ck_assert_mem_eq(out, in, 6);
	ck_assert_int_eq(gl_auth_unhex("00017f80abf", 11, out, 6), -EINVAL);
	ck_assert_int_eq(gl_auth_unhex("00017f80abfff0", 14, out, 6), -EINVAL);
	ck_assert_int_eq(gl_auth_unhex("00017f80abfz", 12, out, 6), -EINVAL);
	ck_assert_int_eq(gl_auth_unhex(" 0017f80abff", 12, out, 6), -EINVAL);
	gl_auth_hex(in, 0, s);
	ck_assert_str_eq(s, "");
}
END_TEST

/* ---- signatures ----------------------------------------------------------- */

START_TEST(sign_verify)
{
	uint8_t pk[GL_AUTH_PK], sk[GL_AUTH_SK], pk2[GL_AUTH_PK], sk2[GL_AUTH_SK];
	uint8_t nonce[GL_AUTH_NONCE], nonce2[GL_AUTH_NONCE], sig[GL_AUTH_SIG], sig2[GL_AUTH_SIG];
	uint8_t msg[24 + GL_AUTH_NONCE + 3];
	char longid[GL_AUTH_INSTANCE_MAX + 2];

	crypto_sign_keypair(pk, sk);
	crypto_sign_keypair(pk2, sk2);
	gl_auth_nonce(nonce);
	gl_auth_nonce(nonce2);
	ck_assert(memcmp(nonce, nonce2, GL_AUTH_NONCE) != 0);

	gl_auth_sign(sk, nonce, "vm1", sig);
	ck_assert(gl_auth_verify(pk, nonce, "vm1", sig));

	/* exactly this message is signed: the context, its NUL, nonce, id */
	ck_assert_uint_eq(strlen(GL_AUTH_CONTEXT), 23);
	memcpy(msg, "guestlink-agent-auth-v1", 24);
	memcpy(msg + 24, nonce, GL_AUTH_NONCE);
	memcpy(msg + 24 + GL_AUTH_NONCE, "vm1", 3);
	ck_assert_int_eq(crypto_sign_verify_detached(sig, msg, sizeof(msg), pk), 0);
	/* Ed25519 is deterministic */
	crypto_sign_detached(sig2, NULL, msg, sizeof(msg), sk);
	ck_assert_mem_eq(sig2, sig, GL_AUTH_SIG);

	/* wrong nonce, instance, key; a flipped bit */
	ck_assert(!gl_auth_verify(pk, nonce2, "vm1", sig));
	ck_assert(!gl_auth_verify(pk, nonce, "vm2", sig));
	ck_assert(!gl_auth_verify(pk, nonce, "vm1 ", sig));
	ck_assert(!gl_auth_verify(pk, nonce, "", sig));
	ck_assert(!gl_auth_verify(pk, nonce, NULL, sig));
	ck_assert(!gl_auth_verify(pk2, nonce, "vm1", sig));
	memcpy(sig2, sig, GL_AUTH_SIG);
	sig2[10] ^= 0x04;
	ck_assert(!gl_auth_verify(pk, nonce, "vm1", sig2));
	gl_auth_sign(sk2, nonce, "vm1", sig2);
	ck_assert(!gl_auth_verify(pk, nonce, "vm1", sig2));

	/* NULL == "" */
	gl_auth_sign(sk, nonce, NULL, sig);
	ck_assert(gl_auth_verify(pk, nonce, "", sig));
	ck_assert(gl_auth_verify(pk, nonce, NULL, sig));
	ck_assert(!gl_auth_verify(pk, nonce, "vm1", sig));

	/* the longest id works; one more byte never does */
	memset(longid, 'i', sizeof(longid));
	longid[GL_AUTH_INSTANCE_MAX] = '\0';
	gl_auth_sign(sk, nonce, longid, sig);
	ck_assert(gl_auth_verify(pk, nonce, longid, sig));
	longid[GL_AUTH_INSTANCE_MAX] = 'i';
	longid[GL_AUTH_INSTANCE_MAX + 1] = '\0';
	gl_auth_sign(sk, nonce, longid, sig);
	ck_assert(!gl_auth_verify(pk, nonce, longid, sig));
}
END_TEST

static Suite *auth_suite(void)
{
	Suite *s = suite_create("auth");
	TCase *t = tcase_create("auth");

	tcase_add_checked_fixture(t, setup, teardown);
	tcase_add_test(t, keys_created_and_reloaded);
	tcase_add_test(t, keys_modes_under_strict_umask);
	tcase_add_test(t, corrupt_host_key_refused);
	tcase_add_test(t, missing_dir);
	tcase_add_test(t, pub_files);
	tcase_add_test(t, hex_round_trip);
	tcase_add_test(t, sign_verify);
	suite_add_tcase(s, t);
	return s;
}

UNIT_MAIN(auth_suite)
