/* Request-target handling (bridge/url.c): the input is a request-target as
 * a client sends it. Besides "no crash, no over-read" it checks the
 * properties the devlxd router relies on:
 *   - every pointer gl_url_parse_request returns lies inside the target;
 *   - gl_url_paths and gl_url_paths_into agree;
 *   - cleaning is idempotent and gl_url_is_clean(p) holds exactly when
 *     cleaning p changes nothing;
 *   - PathUnescape(escape(s)) == s for any bytes s, and escape's output is
 *     valid encoding. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bridge/url.h"
#include "fuzz/fuzz_util.h"

static void check(bool ok, const char *what)
{
	if (!ok)
		fz_die(what);
}

static bool inside(const char *p, size_t n, const char *base, size_t bn)
{
	return !p || (p >= base && p + n <= base + bn);
}

static void check_clean(const char *p, size_t n)
{
	gl_buf c1 = GL_BUF_INIT, c2 = GL_BUF_INIT;
	bool same;

	check(gl_url_clean_path(p, n, &c1) == 0, "clean_path failed");
	check(c1.len > 0 && c1.data[0] == '/', "clean path not rooted");
	check(gl_url_clean_path(c1.data, c1.len, &c2) == 0, "clean_path failed (2)");
	check(c1.len == c2.len && memcmp(c1.data, c2.data, c1.len) == 0,
	      "clean_path is not idempotent");
	check(gl_url_is_clean(c1.data, c1.len), "is_clean false on a cleaned path");
	same = c1.len == n && memcmp(c1.data, p, n) == 0;
	check(gl_url_is_clean(p, n) == same, "is_clean disagrees with clean_path");
	gl_buf_free(&c1);
	gl_buf_free(&c2);
}

static void check_escape(const char *s, size_t n)
{
	gl_buf e = GL_BUF_INIT, d = GL_BUF_INIT, q = GL_BUF_INIT;

	check(gl_url_escape_path(s, n, &e) == 0, "escape_path failed");
	check(gl_url_valid_encoded_path(e.data ? e.data : "", e.len),
	      "escape_path output is not valid encoding");
	check(gl_url_unescape(e.data ? e.data : "", e.len, false, &d) == 0,
	      "unescape of escape_path output failed");
	check(d.len == n && (n == 0 || memcmp(d.data, s, n) == 0),
	      "unescape(escape(s)) != s");
	/* both modes on the raw bytes: only memory safety is asked of them */
	gl_url_unescape(s, n, true, &q);
	gl_buf_reset(&q);
	gl_url_unescape(s, n, false, &q);
	gl_buf_free(&e);
	gl_buf_free(&d);
	gl_buf_free(&q);
}

static void check_target(const char *t, size_t n)
{
	static const char *const keys[] = {"type", "", "a", "since"};
	gl_buf dec = GL_BUF_INIT, esc = GL_BUF_INIT, one = GL_BUF_INIT, loc = GL_BUF_INIT;
	gl_buf clean = GL_BUF_INIT, val = GL_BUF_INIT;
	size_t dlen = 0, elen = 0;
	bool rk1 = false, rk2 = false;
	gl_url u;
	int r1, r2;

	memset(&u, 0, sizeof(u));
	if (gl_url_parse_request(t, n, &u))
		return;
	check(inside(u.scheme, u.scheme_len, t, n), "scheme outside the target");
	check(inside(u.authority, u.authority_len, t, n), "authority outside the target");
	check(inside(u.raw_path, u.raw_path_len, t, n), "raw_path outside the target");
	check(inside(u.query, u.query_len, t, n), "query outside the target");

	r1 = gl_url_paths(&u, &dec, &esc, &rk1);
	r2 = gl_url_paths_into(&u, &one, &dlen, &elen, &rk2);
	check(r1 == r2, "paths and paths_into disagree on the result");
	if (r1 == 0) {
		check(rk1 == rk2, "paths and paths_into disagree on raw_kept");
		check(dlen == dec.len && elen == esc.len, "paths and paths_into lengths differ");
		check(one.len == dlen + 1 + elen, "paths_into length");
		check(dlen == 0 || memcmp(one.data, dec.data, dlen) == 0, "decoded path differs");
		check(one.data[dlen] == '\0' && one.data[dlen + 1 + elen] == '\0',
		      "paths_into not NUL-separated");
		check(elen == 0 || memcmp(one.data + dlen + 1, esc.data, elen) == 0,
		      "escaped path differs");
		if (elen && !gl_url_is_clean(esc.data, elen)) {
			check(gl_url_clean_path(esc.data, elen, &clean) == 0, "clean failed");
			check(gl_url_redirect_location(&u, rk1, dec.data ? dec.data : "", dlen,
						       clean.data, clean.len, &loc) == 0,
			      "redirect_location failed");
		}
	}
	if (u.query) {
		for (size_t k = 0; k < sizeof(keys) / sizeof(keys[0]); k++) {
			int r = gl_url_query_get(u.query, u.query_len, keys[k], &val);

			check(r == 0 || r == 1, "query_get result");
			gl_buf_reset(&val);
		}
	}
	gl_buf_free(&dec);
	gl_buf_free(&esc);
	gl_buf_free(&one);
	gl_buf_free(&loc);
	gl_buf_free(&clean);
	gl_buf_free(&val);
}

static void check_tokens(const char *s, size_t n)
{
	const char *t = s;
	size_t tn = n;

	gl_http_has_token(s, n, "close");
	gl_http_has_token(s, n, "keep-alive");
	gl_http_has_token(s, n, "");
	gl_http_trim(&t, &tn);
	check(t >= s && t + tn <= s + n, "trim outside the input");
	check(tn == 0 || !strchr(" \t\r\n", t[0]) || t[0] == '\0', "trim left a leading blank");
	check(tn == 0 || !strchr(" \t\r\n", t[tn - 1]) || t[tn - 1] == '\0',
	      "trim left a trailing blank");
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	/* a copy of exactly `size` bytes, so that ASan sees any over-read */
	char *p = malloc(size ? size : 1);

	if (!p)
		return 0;
	memcpy(p, data, size);
	check_target(p, size);
	check_clean(p, size);
	check_escape(p, size);
	check_tokens(p, size);
	free(p);
	return 0;
}
