/* JSON output byte-compatible with Go's encoding/json, which is what LXD
 * writes (specs/devlxd-api.md §4 and §6.6). jansson is used for parsing; it
 * cannot produce Go's exact escaping (\u003c, \u2028, invalid UTF-8 as
 * \ufffd), so output goes through these. */
#ifndef GUESTLINK_CORE_JSON_H
#define GUESTLINK_CORE_JSON_H

#include <stdbool.h>
#include <stddef.h>

#include "core/buf.h"

/* Append s[0..n) as a JSON string literal, quotes included. `html` escapes
 * '<', '>' and '&' as \u003c \u003e \u0026 (event JSON does, GET bodies do
 * not). Invalid UTF-8 becomes \ufffd; U+2028/2029 are escaped.
 * 0 or -ENOMEM. */
int gl_json_quote(gl_buf *out, const char *s, size_t n, bool html);

/* A flat object of string values: {"k1":"v1",...} with keys in the order
 * given (callers pass them sorted byte-wise). 0 or -ENOMEM. */
int gl_json_flat_object(gl_buf *out, const char *const *keys, const char *const *vals,
                        const size_t *vlens, size_t n, bool html);

/* RFC 3339 timestamp as Go prints time.Time in JSON: local time, up to nine
 * fractional digits with trailing zeros dropped, 'Z' or ±hh:mm.
 * `ns` is nanoseconds since the epoch. 0 or -ENOMEM. */
int gl_json_timestamp(gl_buf *out, long long ns);

#endif
