/* The hybrid-vsock handshake lines (bridge/vsock.c): gl_vsock_parse_connect,
 * the CONNECT line as Firecracker reads and parses it (specs/vsock.md
 * §1.2), and gl_vsock_parse_ok, the reply.
 *
 * Input: byte 0 even: the rest is a byte stream from a client; the line is
 * cut from it the way Firecracker reads (10 bytes, then up to "\n" or 32
 * bytes) and also parsed at its raw length. Byte 0 odd: the rest is a reply
 * line for gl_vsock_parse_ok.
 * For pure-ASCII lines the result is compared with a reference written
 * here from the spec: ASCII whitespace splits words, word 1 is "connect"
 * in any case, word 2 an optional '+' and decimal digits fitting a u32. */
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "bridge/vsock.h"
#include "fuzz/fuzz_util.h"

static void check(bool ok, const char *what)
{
	if (!ok)
		fz_die(what);
}

static bool ascii_white(unsigned char c)
{
	return (c >= 0x09 && c <= 0x0d) || c == ' ';
}

/* -1: not decidable by this reference (non-ASCII bytes); else 0/-EINVAL */
static int ref_connect(const char *p, size_t n, uint32_t *port)
{
	const char *w[3];
	size_t wl[3], nw = 0, i = 0;
	uint64_t v = 0;
	size_t k = 0;

	for (size_t j = 0; j < n; j++)
		if ((unsigned char)p[j] >= 0x80)
			return -1;
	if (n < 10 || n > 32 || (n < 32 && p[n - 1] != '\n'))
		return -EINVAL;
	for (size_t j = 9; j + 1 < n; j++)
		if (p[j] == '\n')
			return -EINVAL;
	while (i < n && nw < 3) {
		while (i < n && ascii_white((unsigned char)p[i]))
			i++;
		if (i == n)
			break;
		w[nw] = p + i;
		while (i < n && !ascii_white((unsigned char)p[i]))
			i++;
		wl[nw] = (size_t)(p + i - w[nw]);
		nw++;
	}
	if (nw < 2 || wl[0] != 7 || strncasecmp(w[0], "connect", 7) != 0)
		return -EINVAL;
	if (wl[1] && w[1][0] == '+')
		k = 1;
	if (k == wl[1])
		return -EINVAL;
	for (; k < wl[1]; k++) {
		if (w[1][k] < '0' || w[1][k] > '9')
			return -EINVAL;
		v = v * 10 + (uint64_t)(w[1][k] - '0');
		if (v > UINT32_MAX)
			return -EINVAL;
	}
	*port = (uint32_t)v;
	return 0;
}

static void one_line(const char *p, size_t n)
{
	char *copy = malloc(n ? n : 1); /* exact size: ASan sees over-reads */
	uint32_t port = 0xdeadbeef, rport = 0;
	int r, ref;

	if (!copy)
		fz_die("out of memory");
	memcpy(copy, p, n);
	r = gl_vsock_parse_connect(copy, n, &port);
	check(r == 0 || r == -EINVAL, "parse_connect result");
	ref = ref_connect(copy, n, &rport);
	if (ref != -1) {
		check(r == ref, "parse_connect disagrees with the reference");
		check(r || port == rport, "parse_connect port differs from the reference");
	}
	free(copy);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	const char *p = (const char *)data + 1;
	size_t n, line;

	if (size < 1)
		return 0;
	n = size - 1;
	if (data[0] & 1) {
		char *copy = malloc(n ? n : 1);
		int r;

		if (!copy)
			fz_die("out of memory");
		memcpy(copy, p, n);
		r = gl_vsock_parse_ok(copy, n);
		check(r == ((n >= 2 && copy[0] == 'O' && copy[1] == 'K' && (n == 2 || copy[2] == ' '))
				    ? 0
				    : -EPROTO),
		      "parse_ok disagrees with the reference");
		free(copy);
		return 0;
	}
	/* Firecracker's read: 10 bytes at once, then one at a time to "\n" or 32 */
	if (n >= 10) {
		line = 10;
		while (line < 32 && line < n && p[line - 1] != '\n')
			line++;
		one_line(p, line);
	}
	one_line(p, n);
	/* what a client writes must parse back to its port */
	{
		char buf[40];
		uint32_t want = 52, got = 0;
		int k;

		if (n >= 4)
			want = (uint32_t)data[1] << 24 | (uint32_t)data[2] << 16 |
			       (uint32_t)data[3] << 8 | data[4];
		k = snprintf(buf, sizeof(buf), "CONNECT %u\n", want);

		check(gl_vsock_parse_connect(buf, (size_t)k, &got) == 0 && got == want,
		      "a CONNECT line we write does not parse back");
	}
	return 0;
}
