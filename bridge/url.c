/* Go net/url and gorilla/mux path rules, byte for byte (see url.h). */
#include "bridge/url.h"

#include <errno.h>
#include <string.h>

static int hexval(unsigned char c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	if (c >= 'a' && c <= 'f')
		return c - 'a' + 10;
	if (c >= 'A' && c <= 'F')
		return c - 'A' + 10;
	return -1;
}

static bool is_alnum(unsigned char c)
{
	return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9');
}

/* shouldEscape(c, encodePath) */
static bool path_should_escape(unsigned char c)
{
	if (is_alnum(c))
		return false;
	switch (c) {
	case '-': case '_': case '.': case '~':
		return false;
	case '$': case '&': case '+': case ',': case '/': case ':': case ';': case '=': case '@':
		return false;
	case '?':
		return true;
	default:
		return true;
	}
}

/* shouldEscape(c, encodeHost) for ASCII bytes */
static bool host_should_escape(unsigned char c)
{
	if (is_alnum(c))
		return false;
	switch (c) {
	case '!': case '$': case '&': case '\'': case '(': case ')': case '*': case '+':
	case ',': case ';': case '=': case ':': case '[': case ']': case '<': case '>':
	case '"': case '-': case '_': case '.': case '~':
		return false;
	default:
		return true;
	}
}

/* Validation half of Go's unescape() for the host and userinfo modes. */
static int check_escapes(const char *s, size_t n, bool host)
{
	for (size_t i = 0; i < n;) {
		unsigned char c = (unsigned char)s[i];

		if (c == '%') {
			if (i + 2 >= n || hexval((unsigned char)s[i + 1]) < 0 ||
			    hexval((unsigned char)s[i + 2]) < 0)
				return -EINVAL;
			/* in a host, %-escapes are for non-ASCII bytes (and %25) */
			if (host && hexval((unsigned char)s[i + 1]) < 8 && memcmp(s + i, "%25", 3) != 0)
				return -EINVAL;
			i += 3;
			continue;
		}
		if (host && c < 0x80 && host_should_escape(c))
			return -EINVAL;
		i++;
	}
	return 0;
}

int gl_url_unescape(const char *s, size_t n, bool query, gl_buf *out)
{
	int r = gl_buf_reserve(out, n + 1);

	if (r)
		return r;
	for (size_t i = 0; i < n;) {
		char c = s[i];

		if (c == '%') {
			int h, l;

			if (i + 2 >= n)
				return -EINVAL;
			h = hexval((unsigned char)s[i + 1]);
			l = hexval((unsigned char)s[i + 2]);
			if (h < 0 || l < 0)
				return -EINVAL;
			out->data[out->len++] = (char)(h << 4 | l);
			i += 3;
			continue;
		}
		out->data[out->len++] = (query && c == '+') ? ' ' : c;
		i++;
	}
	out->data[out->len] = '\0';
	return 0;
}

int gl_url_escape_path(const char *s, size_t n, gl_buf *out)
{
	static const char hex[] = "0123456789ABCDEF";
	int r = gl_buf_reserve(out, n * 3 + 1);

	if (r)
		return r;
	for (size_t i = 0; i < n; i++) {
		unsigned char c = (unsigned char)s[i];

		if (path_should_escape(c)) {
			out->data[out->len++] = '%';
			out->data[out->len++] = hex[c >> 4];
			out->data[out->len++] = hex[c & 15];
		} else {
			out->data[out->len++] = (char)c;
		}
	}
	out->data[out->len] = '\0';
	return 0;
}

bool gl_url_valid_encoded_path(const char *s, size_t n)
{
	for (size_t i = 0; i < n; i++) {
		switch (s[i]) {
		case '!': case '$': case '&': case '\'': case '(': case ')': case '*': case '+':
		case ',': case ';': case '=': case ':': case '@': case '[': case ']': case '%':
			break;
		default:
			if (path_should_escape((unsigned char)s[i]))
				return false;
		}
	}
	return true;
}

int gl_url_clean_path(const char *p, size_t n, gl_buf *out)
{
	size_t start = out->len, w, dotdot, r = 0;
	bool rooted_in = n > 0 && p[0] == '/';
	int rc;

	if (n == 0)
		return gl_buf_addc(out, '/');
	/* room for "/" + p + "/" */
	rc = gl_buf_reserve(out, n + 3);
	if (rc)
		return rc;
	out->data[start] = '/';
	w = 1;
	dotdot = 1;
	if (rooted_in)
		r = 1;
	while (r < n) {
		if (p[r] == '/') {
			r++;
		} else if (p[r] == '.' && (r + 1 == n || p[r + 1] == '/')) {
			r++;
		} else if (p[r] == '.' && p[r + 1] == '.' && (r + 2 == n || p[r + 2] == '/')) {
			r += 2;
			if (w > dotdot) {
				w--;
				while (w > dotdot && out->data[start + w] != '/')
					w--;
			}
		} else {
			if (w != 1)
				out->data[start + w++] = '/';
			for (; r < n && p[r] != '/'; r++)
				out->data[start + w++] = p[r];
		}
	}
	/* path.Clean drops a trailing slash; cleanPath puts it back */
	if (p[n - 1] == '/' && w != 1)
		out->data[start + w++] = '/';
	out->len = start + w;
	out->data[out->len] = '\0';
	return 0;
}

static bool valid_port(const char *s, size_t n)
{
	if (n == 0)
		return true;
	if (s[0] != ':')
		return false;
	for (size_t i = 1; i < n; i++)
		if (s[i] < '0' || s[i] > '9')
			return false;
	return true;
}

static const char *memrchr_c(const char *s, size_t n, char c)
{
	while (n--)
		if (s[n] == c)
			return s + n;
	return NULL;
}

/* Go's parseAuthority: userinfo@host:port, validated, never decoded here. */
static int check_authority(const char *a, size_t n)
{
	const char *at = memrchr_c(a, n, '@');
	const char *host = at ? at + 1 : a;
	size_t hlen = n - (size_t)(host - a);

	if (hlen && host[0] == '[') {
		const char *rb = memrchr_c(host, hlen, ']');

		if (!rb)
			return -EINVAL;
		if (!valid_port(rb + 1, hlen - (size_t)(rb + 1 - host)))
			return -EINVAL;
	} else {
		const char *colon = memrchr_c(host, hlen, ':');

		if (colon && !valid_port(colon, hlen - (size_t)(colon - host)))
			return -EINVAL;
	}
	if (check_escapes(host, hlen, true))
		return -EINVAL;
	if (at) {
		size_t ulen = (size_t)(at - a);

		for (size_t i = 0; i < ulen; i++) {
			unsigned char c = (unsigned char)a[i];

			if (is_alnum(c) || strchr("-._:~!$&'()*+,;=%@", c))
				continue;
			return -EINVAL;
		}
		if (check_escapes(a, ulen, false))
			return -EINVAL;
	}
	return 0;
}

int gl_url_parse_request(const char *t, size_t n, gl_url *u)
{
	const char *rest;
	size_t rlen, i;

	memset(u, 0, sizeof(*u));
	if (n == 0)
		return -EINVAL;
	for (i = 0; i < n; i++) {
		unsigned char c = (unsigned char)t[i];

		if (c < 0x20 || c == 0x7f)
			return -EINVAL;
	}
	if (n == 1 && t[0] == '*') {
		u->star = true;
		u->raw_path = t;
		u->raw_path_len = 1;
		return 0;
	}
	/* getScheme */
	rest = t;
	rlen = n;
	for (i = 0; i < n; i++) {
		unsigned char c = (unsigned char)t[i];

		if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z'))
			continue;
		if ((c >= '0' && c <= '9') || c == '+' || c == '-' || c == '.') {
			if (i == 0)
				break;
			continue;
		}
		if (c == ':') {
			if (i == 0)
				return -EINVAL; /* "missing protocol scheme" */
			u->scheme = t;
			u->scheme_len = i;
			rest = t + i + 1;
			rlen = n - i - 1;
		}
		break;
	}
	/* query */
	{
		const char *q = memchr(rest, '?', rlen);

		if (q && q == rest + rlen - 1) {
			u->force_query = true;
			rlen--;
		} else if (q) {
			u->query = q + 1;
			u->query_len = rlen - (size_t)(q + 1 - rest);
			rlen = (size_t)(q - rest);
		}
	}
	if (rlen == 0 || rest[0] != '/') {
		if (!u->scheme)
			return -EINVAL; /* "invalid URI for request" */
		u->opaque = true;
		u->raw_path = rest;
		u->raw_path_len = rlen;
		return 0;
	}
	if (u->scheme && rlen >= 2 && rest[1] == '/') {
		const char *a = rest + 2;
		size_t alen = rlen - 2;
		const char *sl = memchr(a, '/', alen);

		if (sl)
			alen = (size_t)(sl - a);
		if (check_authority(a, alen))
			return -EINVAL;
		u->authority = a;
		u->authority_len = alen;
		rest = a + alen;
		rlen = rlen - 2 - alen;
	}
	u->raw_path = rest;
	u->raw_path_len = rlen;
	/* setPath: the escapes must decode */
	for (i = 0; i < rlen; i++) {
		if (rest[i] == '%') {
			if (i + 2 >= rlen || hexval((unsigned char)rest[i + 1]) < 0 ||
			    hexval((unsigned char)rest[i + 2]) < 0)
				return -EINVAL;
			i += 2;
		}
	}
	return 0;
}

int gl_url_paths_into(const gl_url *u, gl_buf *out, size_t *dlen, size_t *elen, bool *raw_kept)
{
	size_t n = u->raw_path_len, d0, e0;
	char *d, *e;
	int r;

	*raw_kept = false;
	/* decoded (<= n) + NUL + escaped (<= 3 n) + NUL, with no realloc in between */
	r = gl_buf_reserve(out, 4 * n + 4);
	if (r)
		return r;
	d0 = out->len;
	d = out->data + d0;
	if (u->star) {
		memcpy(d, "*\0*", 4);
		*dlen = *elen = 1;
		out->len += 3;
		out->data[out->len] = '\0';
		return 0;
	}
	if (!u->opaque) {
		for (size_t i = 0; i < n;) {
			if (u->raw_path[i] == '%') {
				int h, l;

				if (i + 2 >= n)
					return -EINVAL;
				h = hexval((unsigned char)u->raw_path[i + 1]);
				l = hexval((unsigned char)u->raw_path[i + 2]);
				if (h < 0 || l < 0)
					return -EINVAL;
				*d++ = (char)(h << 4 | l);
				i += 3;
			} else {
				*d++ = u->raw_path[i++];
			}
		}
	}
	*dlen = (size_t)(d - (out->data + d0));
	*d++ = '\0';
	e0 = (size_t)(d - out->data);
	e = d;
	if (!u->opaque) {
		static const char hex[] = "0123456789ABCDEF";
		const char *src = out->data + d0;

		for (size_t i = 0; i < *dlen; i++) {
			unsigned char c = (unsigned char)src[i];

			if (path_should_escape(c)) {
				*e++ = '%';
				*e++ = hex[c >> 4];
				*e++ = hex[c & 15];
			} else {
				*e++ = (char)c;
			}
		}
		*elen = (size_t)(e - (out->data + e0));
		/* RawPath is kept when the sent form is not the default encoding;
		 * the router then matches the sent form if it is a valid one */
		if (*elen != n || memcmp(out->data + e0, u->raw_path, n) != 0) {
			*raw_kept = true;
			if (gl_url_valid_encoded_path(u->raw_path, n)) {
				memcpy(out->data + e0, u->raw_path, n);
				*elen = n;
				e = out->data + e0 + n;
			}
		}
	} else {
		*elen = 0;
	}
	*e = '\0';
	out->len = (size_t)(e - out->data);
	return 0;
}

bool gl_url_is_clean(const char *p, size_t n)
{
	if (n == 0 || p[0] != '/')
		return false;
	for (size_t i = 0; i < n; i++) {
		if (p[i] != '/')
			continue;
		/* "//", "/./", "/../", or a final "/." or "/.." */
		if (i + 1 < n && p[i + 1] == '/')
			return false;
		if (i + 1 < n && p[i + 1] == '.') {
			size_t k = i + 2;

			if (k < n && p[k] == '.')
				k++;
			if (k == n || p[k] == '/')
				return false;
		}
	}
	return true;
}

int gl_url_paths(const gl_url *u, gl_buf *decoded, gl_buf *escaped, bool *raw_kept)
{
	size_t d0 = decoded->len, e0 = escaped->len;
	int r;

	*raw_kept = false;
	if (u->star || u->opaque) {
		/* Path "*" is never escaped (Go issue 11202); an opaque URL has no Path */
		if (u->star) {
			r = gl_buf_addc(decoded, '*');
			if (!r)
				r = gl_buf_addc(escaped, '*');
			return r;
		}
		r = gl_buf_add(decoded, "", 0);
		if (!r)
			r = gl_buf_add(escaped, "", 0);
		return r;
	}
	r = gl_url_unescape(u->raw_path, u->raw_path_len, false, decoded);
	if (r)
		return r;
	r = gl_url_escape_path(decoded->data + d0, decoded->len - d0, escaped);
	if (r)
		return r;
	/* RawPath is kept when the sent form is not the default encoding; the
	 * router then matches the sent form if it is a valid encoding */
	if (escaped->len - e0 != u->raw_path_len ||
	    memcmp(escaped->data + e0, u->raw_path, u->raw_path_len) != 0) {
		*raw_kept = true;
		if (gl_url_valid_encoded_path(u->raw_path, u->raw_path_len)) {
			escaped->len = e0;
			r = gl_buf_add(escaped, u->raw_path, u->raw_path_len);
		}
	}
	return r;
}

int gl_url_redirect_location(const gl_url *u, bool raw_kept, const char *decoded,
			     size_t decoded_len, const char *clean, size_t clean_len, gl_buf *out)
{
	int r = 0;

	if (u->scheme) {
		for (size_t i = 0; i < u->scheme_len && !r; i++) {
			char c = u->scheme[i];

			r = gl_buf_addc(out, (c >= 'A' && c <= 'Z') ? (char)(c + 32) : c);
		}
		if (!r)
			r = gl_buf_addc(out, ':');
		if (!r && (u->authority_len || clean_len))
			r = gl_buf_adds(out, "//");
		if (!r && u->authority)
			r = gl_buf_add(out, u->authority, u->authority_len);
	}
	if (r)
		return r;
	/* url.String() writes EscapedPath() of the new Path: the old RawPath
	 * only if it still decodes to it, otherwise the cleaned (already
	 * escaped) path escaped once more, as Go does */
	if (raw_kept && gl_url_valid_encoded_path(u->raw_path, u->raw_path_len) &&
	    decoded_len == clean_len && memcmp(decoded, clean, clean_len) == 0)
		r = gl_buf_add(out, u->raw_path, u->raw_path_len);
	else if (clean_len == 1 && clean[0] == '*')
		r = gl_buf_addc(out, '*');
	else
		r = gl_url_escape_path(clean, clean_len, out);
	if (!r && (u->force_query || (u->query && u->query_len))) {
		r = gl_buf_addc(out, '?');
		if (!r && u->query)
			r = gl_buf_add(out, u->query, u->query_len);
	}
	return r;
}

int gl_url_query_get(const char *q, size_t n, const char *key, gl_buf *out)
{
	size_t klen = strlen(key);
	gl_buf k = GL_BUF_INIT;
	size_t pos = 0;
	int found = 0;

	while (pos < n && !found) {
		const char *pair = q + pos;
		const char *amp = memchr(pair, '&', n - pos);
		size_t plen = amp ? (size_t)(amp - pair) : n - pos;
		const char *eq;
		size_t o0 = out->len;

		pos += plen + (amp ? 1 : 0);
		if (plen == 0 || memchr(pair, ';', plen))
			continue;
		eq = memchr(pair, '=', plen);
		gl_buf_reset(&k);
		if (gl_url_unescape(pair, eq ? (size_t)(eq - pair) : plen, true, &k))
			continue;
		if (eq) {
			if (gl_url_unescape(eq + 1, plen - (size_t)(eq + 1 - pair), true, out)) {
				out->len = o0;
				if (out->data)
					out->data[o0] = '\0';
				continue;
			}
		} else if (gl_buf_add(out, "", 0)) {
			found = -ENOMEM;
			break;
		}
		if (k.len == klen && memcmp(k.data, key, klen) == 0) {
			found = 1;
		} else {
			out->len = o0;
			if (out->data)
				out->data[o0] = '\0';
		}
	}
	gl_buf_free(&k);
	return found;
}

bool gl_http_has_token(const char *v, size_t n, const char *token)
{
	size_t tl = strlen(token);

	if (tl == 0 || tl > n)
		return false;
	for (size_t sp = 0; sp + tl <= n; sp++) {
		size_t k;

		if (sp > 0 && v[sp - 1] != ' ' && v[sp - 1] != ',' && v[sp - 1] != '\t')
			continue;
		if (sp + tl != n && v[sp + tl] != ' ' && v[sp + tl] != ',' && v[sp + tl] != '\t')
			continue;
		for (k = 0; k < tl; k++) {
			char c = v[sp + k];

			if (c >= 'A' && c <= 'Z')
				c = (char)(c + 32);
			if (c != token[k])
				break;
		}
		if (k == tl)
			return true;
	}
	return false;
}

void gl_http_trim(const char **s, size_t *n)
{
	while (*n && ((*s)[0] == ' ' || (*s)[0] == '\t' || (*s)[0] == '\r' || (*s)[0] == '\n')) {
		(*s)++;
		(*n)--;
	}
	while (*n && ((*s)[*n - 1] == ' ' || (*s)[*n - 1] == '\t' || (*s)[*n - 1] == '\r' ||
		      (*s)[*n - 1] == '\n'))
		(*n)--;
}
