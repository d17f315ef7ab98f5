/* agentprobe: the pieces of the agent handshake that tests cannot do
 * without libsodium.
 *
 *   agentprobe keygen DIR                   write DIR/host.key and DIR/host.pub
 *                                           (DIR is created if missing) and
 *                                           print the public key
 *   agentprobe sign SKFILE NONCEHEX INSTANCE
 *                                           print AUTH's "sig" (128 hex digits)
 *
 * Exit status: 0 done, 1 failure, 2 usage. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "bridge/auth.h"

static int usage(void)
{
	fprintf(stderr, "usage: agentprobe keygen DIR\n"
			"       agentprobe sign SKFILE NONCEHEX INSTANCE\n");
	return 2;
}

/* The secret key file as bridge/auth.h writes it: 128 hex digits, "\n". */
static int load_sk(const char *path, uint8_t sk[GL_AUTH_SK])
{
	char text[GL_AUTH_SK * 2 + 8];
	size_t n;
	FILE *f;

	f = fopen(path, "re");
	if (!f)
		return -errno;
	n = fread(text, 1, sizeof(text), f);
	fclose(f);
	while (n > 0 && (text[n - 1] == '\n' || text[n - 1] == ' '))
		n--;
	return gl_auth_unhex(text, n, sk, GL_AUTH_SK);
}

int main(int argc, char **argv)
{
	uint8_t pk[GL_AUTH_PK], sk[GL_AUTH_SK], nonce[GL_AUTH_NONCE], sig[GL_AUTH_SIG];
	char err[256], hex[GL_AUTH_SIG * 2 + 1];
	int ret;

	if (argc < 2)
		return usage();
	if (gl_auth_init() < 0) {
		fprintf(stderr, "agentprobe: libsodium failed to initialise\n");
		return 1;
	}
	if (!strcmp(argv[1], "keygen") && argc == 3) {
		if (mkdir(argv[2], 0700) < 0 && errno != EEXIST) {
			fprintf(stderr, "agentprobe: mkdir %s: %s\n", argv[2], strerror(errno));
			return 1;
		}
		ret = gl_auth_host_keys(argv[2], pk, sk, err, sizeof(err));
		if (ret < 0) {
			fprintf(stderr, "agentprobe: keygen %s: %s\n", argv[2], err);
			return 1;
		}
		gl_auth_hex(pk, sizeof(pk), hex);
		printf("%s\n", hex);
		return 0;
	}
	if (!strcmp(argv[1], "sign") && argc == 5) {
		ret = load_sk(argv[2], sk);
		if (ret < 0) {
			fprintf(stderr, "agentprobe: %s: %s\n", argv[2],
				ret == -EINVAL ? "not a secret key file" : strerror(-ret));
			return 1;
		}
		if (gl_auth_unhex(argv[3], strlen(argv[3]), nonce, sizeof(nonce)) < 0) {
			fprintf(stderr, "agentprobe: the nonce must be %u hex digits\n",
				GL_AUTH_NONCE * 2);
			return 1;
		}
		gl_auth_sign(sk, nonce, argv[4], sig);
		gl_auth_hex(sig, sizeof(sig), hex);
		printf("%s\n", hex);
		return 0;
	}
	return usage();
}
