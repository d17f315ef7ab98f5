/* PATCH /1.0 bodies (bridge/devlxd.c patch_api: jansson, then the state
 * value through the model) on the devlxd server of devlxd_fuzz.h.
 *
 * Input: byte 0 picks the framing, the rest is the body:
 *   bit 0-1  0: Content-Length  1: chunked (chunk sizes from byte 0's
 *            upper bits)  2: Content-Length one byte short  3: a
 *            Content-Length one byte over (the body ends early)
 *   bit 2    HTTP/1.0 with keep-alive, then a GET /1.0 on the same connection
 * The request is sent in one piece; the answer must be an HTTP response
 * with one of the statuses PATCH /1.0 can give, also when the body was cut
 * short by the client's half-close (Go answers 400 "unexpected EOF"). */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fuzz/devlxd_fuzz.h"

static void check(bool ok, const char *what)
{
	if (!ok)
		fz_die(what);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	static char out[65536];
	gl_buf req = GL_BUF_INIT;
	size_t got = 0;
	char status[4];
	const uint8_t *body;
	size_t n;
	unsigned mode;
	bool ten;

	dx_init();
	if (size < 1)
		return 0;
	mode = data[0] & 3;
	ten = data[0] & 4;
	body = data + 1;
	n = size - 1;
	gl_buf_printf(&req, "PATCH /1.0 HTTP/1.%c\r\nHost: lxd\r\n%sContent-Type: application/json\r\n",
		      ten ? '0' : '1', ten ? "Connection: keep-alive\r\n" : "");
	switch (mode) {
	case 1: {
		fz_rng r;
		size_t off = 0;

		fz_rng_init(&r, data[0]);
		gl_buf_adds(&req, "Transfer-Encoding: chunked\r\n\r\n");
		while (off < n) {
			size_t c = 1 + fz_rng_next(&r) % (1u + (data[0] >> 3) * 8u);

			if (c > n - off)
				c = n - off;
			gl_buf_printf(&req, "%zx\r\n", c);
			gl_buf_add(&req, body + off, c);
			gl_buf_adds(&req, "\r\n");
			off += c;
		}
		gl_buf_adds(&req, "0\r\n\r\n");
		break;
	}
	case 2:
		gl_buf_printf(&req, "Content-Length: %zu\r\n\r\n", n ? n - 1 : 0);
		gl_buf_add(&req, body, n);
		break;
	case 3:
		gl_buf_printf(&req, "Content-Length: %zu\r\n\r\n", n + 1);
		gl_buf_add(&req, body, n);
		break;
	default:
		gl_buf_printf(&req, "Content-Length: %zu\r\n\r\n", n);
		gl_buf_add(&req, body, n);
	}
	if (ten && mode != 3)
		gl_buf_adds(&req, "GET /1.0 HTTP/1.1\r\nHost: lxd\r\n\r\n");
	check(req.data != NULL, "out of memory");
	dx_play((const uint8_t *)req.data, req.len, 0, 0, out, sizeof(out), &got);
	gl_buf_free(&req);
	check(got >= 12 && memcmp(out, ten ? "HTTP/1.0 " : "HTTP/1.1 ", 9) == 0,
	      "the answer is not an HTTP response");
	memcpy(status, out + 9, 3);
	status[3] = '\0';
	check(strcmp(status, "200") == 0 || strcmp(status, "400") == 0 ||
		      strcmp(status, "413") == 0 || strcmp(status, "500") == 0,
	      "PATCH /1.0 answered with an unexpected status");
	return 0;
}
