/* Validation of everything a user can name or write: instance names, config
 * keys, device names, device JSON, attribute values. Pure functions. */
#ifndef GUESTLINK_CORE_NAMES_H
#define GUESTLINK_CORE_NAMES_H

#include <stdbool.h>
#include <stddef.h>

#include "core/buf.h"

#define GL_NAME_MAX_INSTANCE 63
#define GL_NAME_MAX_KEY 255
#define GL_NAME_MAX_DEVICE 255

/* LXD's instance name rules: 1-63 bytes of [A-Za-z0-9-], starting with a
 * letter, not ending with '-'. 0, -EINVAL, or -ENAMETOOLONG. */
int gl_name_instance_check(const char *s, size_t n);

/* A config key: 1-255 bytes, no '/', NUL, control bytes (< 0x20, 0x7f),
 * contains a '.', does not start with '.', does not end with '~'.
 * (LXD keys are dotted namespaces; names without a dot, dot-files and '~'
 * backups are the scratch files of editors, see docs/fuse-tree.md.)
 * 0, -EINVAL or -ENAMETOOLONG. */
int gl_name_key_check(const char *s, size_t n);

/* A device name: 1-255 bytes, no '/', NUL, control bytes, does not start
 * with '.', does not end with '~'. 0, -EINVAL or -ENAMETOOLONG. */
int gl_name_device_check(const char *s, size_t n);

/* Parse a device value: a JSON object whose values are all strings and that
 * has a non-empty "type". On success append its canonical form (compact, keys
 * sorted byte-wise, Go escaping without HTML escapes, no newline) to `canon`
 * and return 0. Otherwise return -EINVAL and, if `err` is not NULL, set *err
 * to a static human-readable reason. */
int gl_device_parse(const char *json, size_t n, gl_buf *canon, const char **err);

/* True if the prefix makes a key visible to guests ("user." or "cloud-init."). */
bool gl_key_guest_visible(const char *key);
/* True if changes to the key emit config events ("user."). */
bool gl_key_evented(const char *key);

#endif
