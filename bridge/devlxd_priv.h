/* Internals shared by the devlxd endpoint files (devlxd.c, images.c). */
#ifndef GUESTLINK_BRIDGE_DEVLXD_PRIV_H
#define GUESTLINK_BRIDGE_DEVLXD_PRIV_H

#include <stdbool.h>
#include <stddef.h>

#include "bridge/http.h"

/* GET /1.0/images/{fingerprint}/export once the caller may export
 * (specs/devlxd-api.md §7): `fp` is the route variable, still escaped.
 * Images are files <images_dir>/<fingerprint>[<ext>], public when
 * <images_dir>/<fingerprint>.public exists. Answers the request, now or
 * later (file I/O runs on libuv's pool, never on the loop). */
void gl__devlxd_image_export(gl_http_conn *c, const gl_http_req *r, const char *images_dir,
			     const char *fp, size_t fplen);

/* LXD's error envelope for the image API (JSON + "\n" + "\n"). */
int gl__devlxd_envelope(gl_http_conn *c, int code, const char *msg, size_t len);

/* shared.IsTrue / shared.IsFalse of LXD: "true|1|yes|on" / "false|0|no|off",
 * any case. */
bool gl__lxd_is_true(const char *v, size_t n);
bool gl__lxd_is_false(const char *v, size_t n);

#endif
