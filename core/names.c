/* Validation of names and device JSON (core/names.h). */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "core/json.h"
#include "core/names.h"

static bool is_alpha(unsigned char c)
{
	return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z');
}

static bool is_digit(unsigned char c)
{
	return c >= '0' && c <= '9';
}

static bool is_ctl(unsigned char c)
{
	return c < 0x20 || c == 0x7f;
}

static bool has_ctl(const char *s, size_t n)
{
	size_t i;

	for (i = 0; i < n; i++)
		if (is_ctl((unsigned char)s[i]))
			return true;
	return false;
}

int gl_name_instance_check(const char *s, size_t n)
{
	size_t i;

	if (n == 0)
		return -EINVAL;
	if (n > GL_NAME_MAX_INSTANCE)
		return -ENAMETOOLONG;
	if (!is_alpha((unsigned char)s[0]) || s[n - 1] == '-')
		return -EINVAL;
	for (i = 1; i < n; i++) {
		unsigned char c = (unsigned char)s[i];

		if (!is_alpha(c) && !is_digit(c) && c != '-')
			return -EINVAL;
	}
	return 0;
}

/* The rules config keys and device names share: 1..max bytes, no '/', no
 * NUL or control bytes, no leading '.', no trailing '~'. */
static int file_name_check(const char *s, size_t n, size_t max)
{
	size_t i;

	if (n == 0)
		return -EINVAL;
	if (n > max)
		return -ENAMETOOLONG;
	if (s[0] == '.' || s[n - 1] == '~')
		return -EINVAL;
	for (i = 0; i < n; i++) {
		unsigned char c = (unsigned char)s[i];

		if (c == '/' || is_ctl(c))
			return -EINVAL;
	}
	return 0;
}

int gl_name_key_check(const char *s, size_t n)
{
	int r;

	r = file_name_check(s, n, GL_NAME_MAX_KEY);
	if (r < 0)
		return r;
	if (!memchr(s, '.', n))
		return -EINVAL;
	return 0;
}

int gl_name_device_check(const char *s, size_t n)
{
	return file_name_check(s, n, GL_NAME_MAX_DEVICE);
}

/* Reasons that name a key or quote jansson are built here; one per thread
 * so the pointer stays valid until the same thread's next failing parse. */
static __thread char parse_err[320];

static int cmp_str(const void *a, const void *b)
{
	return strcmp(*(const char *const *)a, *(const char *const *)b);
}

int gl_device_parse(const char *json, size_t n, gl_buf *canon, const char **err)
{
	const char *reason = NULL;
	const char **keys = NULL;
	json_error_t jerr;
	json_t *root, *val, *type;
	const char *key;
	size_t nkeys, i, klen, start = canon->len;
	int r = -EINVAL;

	/* DECODE_ANY so that a scalar is "not a JSON object", not a syntax error. */
	root = json_loadb(json, n, JSON_REJECT_DUPLICATES | JSON_DECODE_ANY, &jerr);
	if (!root) {
		snprintf(parse_err, sizeof(parse_err), "invalid JSON: %s", jerr.text);
		reason = parse_err;
		goto out;
	}
	if (!json_is_object(root)) {
		reason = "not a JSON object";
		goto out;
	}

	nkeys = json_object_size(root);
	keys = malloc((nkeys ? nkeys : 1) * sizeof(*keys));
	if (!keys) {
		r = -ENOMEM;
		reason = "out of memory";
		goto out;
	}

	i = 0;
	json_object_foreach(root, key, val) {
		klen = strlen(key);
		if (klen == 0) {
			reason = "empty key";
			goto out;
		}
		if (has_ctl(key, klen)) {
			reason = "key contains a control character";
			goto out;
		}
		if (!json_is_string(val)) {
			snprintf(parse_err, sizeof(parse_err), "value of \"%.255s\" is not a string",
			         key);
			reason = parse_err;
			goto out;
		}
		keys[i++] = key;
	}

	type = json_object_get(root, "type");
	if (!type) {
		reason = "missing \"type\"";
		goto out;
	}
	if (json_string_length(type) == 0) {
		reason = "empty \"type\"";
		goto out;
	}

	qsort(keys, nkeys, sizeof(*keys), cmp_str);

	r = gl_buf_addc(canon, '{');
	for (i = 0; r == 0 && i < nkeys; i++) {
		val = json_object_get(root, keys[i]);
		if (i)
			r = gl_buf_addc(canon, ',');
		if (r == 0)
			r = gl_json_quote(canon, keys[i], strlen(keys[i]), false);
		if (r == 0)
			r = gl_buf_addc(canon, ':');
		if (r == 0)
			r = gl_json_quote(canon, json_string_value(val), json_string_length(val),
			                  false);
	}
	if (r == 0)
		r = gl_buf_addc(canon, '}');
	if (r < 0) {
		reason = "out of memory";
		canon->len = start;
		if (canon->data)
			canon->data[start] = '\0';
	}

out:
	if (r < 0 && err)
		*err = reason;
	free(keys);
	json_decref(root);
	return r;
}

bool gl_key_guest_visible(const char *key)
{
	return strncmp(key, "user.", 5) == 0 || strncmp(key, "cloud-init.", 11) == 0;
}

bool gl_key_evented(const char *key)
{
	return strncmp(key, "user.", 5) == 0;
}
