/* JSON output with Go encoding/json's exact bytes (core/json.h). */
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

#include "core/json.h"

static const char hex[] = "0123456789abcdef";

/* Length of the valid UTF-8 sequence at s[0..n), 0 if it is invalid.
 * Same acceptance as Go's utf8.DecodeRune: no overlong forms, no
 * surrogates, nothing above U+10FFFF, no truncated sequences. *cp gets the
 * code point. s[0] is >= 0x80. */
static size_t utf8_len(const unsigned char *s, size_t n, uint32_t *cp)
{
	unsigned char c = s[0];
	unsigned char lo = 0x80, hi = 0xbf;
	size_t len, i;
	uint32_t v;

	if (c >= 0xc2 && c <= 0xdf) {
		len = 2;
		v = c & 0x1f;
	} else if (c >= 0xe0 && c <= 0xef) {
		len = 3;
		v = c & 0x0f;
		if (c == 0xe0)
			lo = 0xa0; /* overlong */
		else if (c == 0xed)
			hi = 0x9f; /* surrogates */
	} else if (c >= 0xf0 && c <= 0xf4) {
		len = 4;
		v = c & 0x07;
		if (c == 0xf0)
			lo = 0x90; /* overlong */
		else if (c == 0xf4)
			hi = 0x8f; /* above U+10FFFF */
	} else {
		return 0;
	}
	if (n < len)
		return 0;
	if (s[1] < lo || s[1] > hi)
		return 0;
	v = (v << 6) | (s[1] & 0x3f);
	for (i = 2; i < len; i++) {
		if (s[i] < 0x80 || s[i] > 0xbf)
			return 0;
		v = (v << 6) | (s[i] & 0x3f);
	}
	*cp = v;
	return len;
}

int gl_json_quote(gl_buf *out, const char *str, size_t n, bool html)
{
	const unsigned char *s = (const unsigned char *)str;
	size_t i = 0, start = 0, len;
	char esc[6];
	uint32_t cp;
	int r;

	/* Worst realistic case is one escape per few bytes; reserve once for
	 * the common case of nothing to escape. */
	r = gl_buf_reserve(out, n + 2);
	if (r < 0)
		return r;
	gl_buf_addc(out, '"');

	while (i < n) {
		unsigned char c = s[i];
		const char *rep = NULL;
		size_t rlen = 0;

		if (c < 0x80) {
			if (c >= 0x20 && c != '"' && c != '\\' &&
			    !(html && (c == '<' || c == '>' || c == '&'))) {
				i++;
				continue;
			}
			switch (c) {
			case '"':
				rep = "\\\"";
				rlen = 2;
				break;
			case '\\':
				rep = "\\\\";
				rlen = 2;
				break;
			case '\n':
				rep = "\\n";
				rlen = 2;
				break;
			case '\r':
				rep = "\\r";
				rlen = 2;
				break;
			case '\t':
				rep = "\\t";
				rlen = 2;
				break;
			default:
				esc[0] = '\\';
				esc[1] = 'u';
				esc[2] = '0';
				esc[3] = '0';
				esc[4] = hex[c >> 4];
				esc[5] = hex[c & 0xf];
				rep = esc;
				rlen = 6;
				break;
			}
			len = 1;
		} else {
			len = utf8_len(s + i, n - i, &cp);
			if (len == 0) {
				rep = "\\ufffd";
				rlen = 6;
				len = 1;
			} else if (cp == 0x2028 || cp == 0x2029) {
				rep = cp == 0x2028 ? "\\u2028" : "\\u2029";
				rlen = 6;
			} else {
				i += len;
				continue;
			}
		}

		r = gl_buf_add(out, s + start, i - start);
		if (r < 0)
			return r;
		r = gl_buf_add(out, rep, rlen);
		if (r < 0)
			return r;
		i += len;
		start = i;
	}

	r = gl_buf_add(out, s + start, n - start);
	if (r < 0)
		return r;
	return gl_buf_addc(out, '"');
}

int gl_json_flat_object(gl_buf *out, const char *const *keys, const char *const *vals,
                        const size_t *vlens, size_t n, bool html)
{
	size_t i;
	int r;

	r = gl_buf_addc(out, '{');
	for (i = 0; r == 0 && i < n; i++) {
		if (i)
			r = gl_buf_addc(out, ',');
		if (r == 0)
			r = gl_json_quote(out, keys[i], strlen(keys[i]), html);
		if (r == 0)
			r = gl_buf_addc(out, ':');
		if (r == 0)
			r = gl_json_quote(out, vals[i], vlens ? vlens[i] : strlen(vals[i]), html);
	}
	if (r == 0)
		r = gl_buf_addc(out, '}');
	return r;
}

int gl_json_timestamp(gl_buf *out, long long ns)
{
	long long sec = ns / 1000000000LL;
	long long frac = ns % 1000000000LL;
	char digits[10];
	struct tm tm;
	time_t t;
	long off;
	int r, nd, i;

	if (frac < 0) {
		frac += 1000000000LL;
		sec--;
	}
	t = (time_t)sec;
	if (!localtime_r(&t, &tm))
		return -EINVAL;

	r = gl_buf_printf(out, "%04d-%02d-%02dT%02d:%02d:%02d", tm.tm_year + 1900,
	                  tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec);
	if (r < 0)
		return r;

	if (frac) {
		for (i = 8; i >= 0; i--) {
			digits[i] = (char)('0' + frac % 10);
			frac /= 10;
		}
		nd = 9;
		while (digits[nd - 1] == '0')
			nd--;
		r = gl_buf_addc(out, '.');
		if (r == 0)
			r = gl_buf_add(out, digits, (size_t)nd);
		if (r < 0)
			return r;
	}

	/* Go prints the zone to the minute ("Z07:00"), truncating seconds. */
	off = tm.tm_gmtoff;
	if (off == 0)
		return gl_buf_addc(out, 'Z');
	off /= 60;
	if (off < 0)
		return gl_buf_printf(out, "-%02ld:%02ld", -off / 60, -off % 60);
	return gl_buf_printf(out, "+%02ld:%02ld", off / 60, off % 60);
}
