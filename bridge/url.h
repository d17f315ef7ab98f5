/* Request-target handling with the semantics of Go's net/url and of the
 * gorilla/mux router LXD 5.0.2 uses (specs/devlxd-api.md §2.1, §2.3): the
 * devlxd face must accept, reject, clean and redirect exactly the paths
 * LXD does. Pure functions over caller-owned bytes; results that point into
 * the input are borrowed from it, buffers are the caller's. */
#ifndef GUESTLINK_BRIDGE_URL_H
#define GUESTLINK_BRIDGE_URL_H

#include <stdbool.h>
#include <stddef.h>

#include "core/buf.h"

/* The parts of a request-target as Go's url.ParseRequestURI splits them.
 * Every pointer points into the target passed to gl_url_parse_request. */
typedef struct gl_url {
	const char *scheme; /* absolute-form only; as sent (Go lower-cases it) */
	size_t scheme_len;
	const char *authority; /* absolute-form "//authority"; NULL when absent */
	size_t authority_len;
	const char *raw_path; /* the escaped path as sent; may be empty */
	size_t raw_path_len;
	const char *query; /* after '?'; NULL when there is no '?' */
	size_t query_len;
	bool force_query; /* the target ends in a lone '?' */
	bool opaque;      /* "scheme:rest" without a leading '/': raw_path holds rest */
	bool star;        /* the target is "*" */
} gl_url;

/* Split and validate a request-target (origin-form, absolute-form or "*").
 * 0, or -EINVAL for anything Go answers with 400 before routing: control
 * bytes, a target that is neither '/'-rooted nor has a scheme, a bad
 * authority, a bad percent-escape in the path. */
int gl_url_parse_request(const char *target, size_t n, gl_url *u);

/* Percent-decode s[0..n) onto out. `query` decodes '+' as a space (Go's
 * QueryUnescape); otherwise it is Go's PathUnescape. 0, -EINVAL on a bad
 * escape (out then holds garbage), -ENOMEM. */
int gl_url_unescape(const char *s, size_t n, bool query, gl_buf *out);

/* Go's escape(s, encodePath): what URL.EscapedPath computes for a path. */
int gl_url_escape_path(const char *s, size_t n, gl_buf *out);

/* Go's validEncoded(s, encodePath). */
bool gl_url_valid_encoded_path(const char *s, size_t n);

/* gorilla/mux's cleanPath: path.Clean on a rooted path, keeping a trailing
 * slash. Appends to out. 0 or -ENOMEM. */
int gl_url_clean_path(const char *p, size_t n, gl_buf *out);

/* The path the router matches (Go's URL.EscapedPath) and the decoded path
 * (URL.Path) of a parsed target, appended to `escaped` and `decoded`.
 * *raw_kept is set when Go would keep RawPath (the sent form differs from
 * the default encoding). 0, -EINVAL (bad escape), -ENOMEM. */
int gl_url_paths(const gl_url *u, gl_buf *decoded, gl_buf *escaped, bool *raw_kept);

/* The same in one buffer: decoded path, NUL, escaped path, NUL appended
 * to out; their lengths in *dlen and *elen. */
int gl_url_paths_into(const gl_url *u, gl_buf *out, size_t *dlen, size_t *elen, bool *raw_kept);

/* True when gl_url_clean_path would return p unchanged. */
bool gl_url_is_clean(const char *p, size_t n);

/* The Location gorilla/mux sends when the escaped path is not clean:
 * url.String() of the request URL with Path replaced by `clean`. */
int gl_url_redirect_location(const gl_url *u, bool raw_kept, const char *decoded,
			     size_t decoded_len, const char *clean, size_t clean_len, gl_buf *out);

/* The first value of `key` in a raw query, as Go's Request.FormValue reads
 * it (url.ParseQuery: '&' separated, pairs holding ';' or a bad escape
 * skipped). Returns 1 and the decoded value in out, 0 when absent, -ENOMEM. */
int gl_url_query_get(const char *q, size_t n, const char *key, gl_buf *out);

/* Go's net/http hasToken: `token` (lower case) appears in v as a
 * comma/space separated element, compared without case. */
bool gl_http_has_token(const char *v, size_t n, const char *token);

/* textproto.TrimString: strip ' ', '\t', '\r', '\n' at both ends. */
void gl_http_trim(const char **s, size_t *n);

#endif
