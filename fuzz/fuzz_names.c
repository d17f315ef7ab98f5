/* Config key names and values, device names and device JSON, attribute
 * values (core/names.c, core/model.c's validation and commit path), against
 * an in-memory model over the fake store.
 *
 * Input: byte 0 picks the mode, byte 1 the length of the name (taken from
 * the bytes after it), the rest is the value.
 *   mode 0  the pure checks, each compared with a reference written here
 *           from the rules in core/names.h; gl_device_parse's canonical form
 *           must parse again to itself; gl_model_check_value must agree.
 *   mode 1  CONFIG_SET name=value on c1 through the model: on success the
 *           stored value is exactly the input, the event lines are JSON and
 *           (valid UTF-8 values) carry the value unchanged; then UNSET.
 *   mode 2  DEVICE_SET: accepted iff name and JSON are valid, stored value
 *           is the canonical form; then UNSET.
 *   mode 3  ATTR_SET of a non-binding attribute (picked by byte 1; no
 *           name) on c2: accepted iff gl_attr_check accepts the value. */
#include <errno.h>
#include <jansson.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <uv.h>

#include "core/model.h"
#include "core/names.h"
#include "fuzz/fuzz_util.h"
#include "tests/unit/fake_store.h"

static uv_loop_t loop;
static fake_store fstore;
static gl_model *model;

static void check(bool ok, const char *what)
{
	if (!ok)
		fz_die(what);
}

/* ---- references from the documented rules ---------------------------------- */

static bool ctl(unsigned char c)
{
	return c < 0x20 || c == 0x7f;
}

static int ref_instance(const char *s, size_t n)
{
	if (n == 0)
		return -EINVAL;
	if (n > GL_NAME_MAX_INSTANCE)
		return -ENAMETOOLONG;
	for (size_t i = 0; i < n; i++) {
		unsigned char c = (unsigned char)s[i];
		bool alpha = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z');

		if (i == 0 && !alpha)
			return -EINVAL;
		if (!alpha && !(c >= '0' && c <= '9') && c != '-')
			return -EINVAL;
	}
	return s[n - 1] == '-' ? -EINVAL : 0;
}

static int ref_file_name(const char *s, size_t n, size_t max, bool need_dot)
{
	bool dot = false;

	if (n == 0)
		return -EINVAL;
	if (n > max)
		return -ENAMETOOLONG;
	for (size_t i = 0; i < n; i++) {
		unsigned char c = (unsigned char)s[i];

		if (c == '/' || ctl(c))
			return -EINVAL;
		dot |= c == '.';
	}
	if (s[0] == '.' || s[n - 1] == '~' || (need_dot && !dot))
		return -EINVAL;
	return 0;
}

static bool utf8_valid(const char *s, size_t n)
{
	const unsigned char *p = (const unsigned char *)s;
	size_t i = 0;

	while (i < n) {
		unsigned c = p[i], need, min, cp;

		if (c < 0x80) {
			i++;
			continue;
		}
		if (c >= 0xc2 && c <= 0xdf) {
			need = 1, min = 0x80, cp = c & 0x1f;
		} else if (c >= 0xe0 && c <= 0xef) {
			need = 2, min = 0x800, cp = c & 0x0f;
		} else if (c >= 0xf0 && c <= 0xf4) {
			need = 3, min = 0x10000, cp = c & 0x07;
		} else {
			return false;
		}
		for (unsigned k = 1; k <= need; k++) {
			if (i + k >= n || (p[i + k] & 0xc0) != 0x80)
				return false;
			cp = cp << 6 | (p[i + k] & 0x3f);
		}
		if (cp < min || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff))
			return false;
		i += need + 1;
	}
	return true;
}

/* ---- the model ------------------------------------------------------------------- */

static void done_cb(void *arg, int status)
{
	*(int *)arg = status;
}

static int submit(gl_op_kind kind, gl_attr attr, const char *inst, const char *key, size_t klen,
		  const char *val, size_t vlen)
{
	int st = 1;
	gl_op o = {.kind = kind,
		   .origin = GL_ORIGIN_HOST,
		   .attr = attr,
		   .instance = inst,
		   .ilen = strlen(inst),
		   .key = key,
		   .klen = klen,
		   .value = val,
		   .vlen = vlen};
	int r = gl_model_submit(model, &o, done_cb, &st);

	if (r)
		return r;
	while (st == 1)
		uv_run(&loop, UV_RUN_ONCE);
	return st;
}

static void init(void)
{
	char err[256];
	static bool done;

	if (done)
		return;
	done = true;
	fake_store_reset(&fstore);
	if (uv_loop_init(&loop))
		fz_die("uv_loop_init");
	model = gl_model_open(&loop, &fstore.base, NULL, err, sizeof(err));
	if (!model)
		fz_die(err);
	if (submit(GL_OP_CREATE, 0, "c1", NULL, 0, "container", 9) ||
	    submit(GL_OP_CREATE, 0, "c2", NULL, 0, "container", 9))
		fz_die("cannot create the instances");
}

/* ---- modes ------------------------------------------------------------------------- */

static void pure_checks(const char *s, size_t n)
{
	gl_buf canon = GL_BUF_INIT, again = GL_BUF_INIT;
	const char *why = NULL;
	int r;

	check(gl_name_instance_check(s, n) == ref_instance(s, n), "instance name check");
	check(gl_name_key_check(s, n) == ref_file_name(s, n, GL_NAME_MAX_KEY, true),
	      "config key check");
	check(gl_name_device_check(s, n) == ref_file_name(s, n, GL_NAME_MAX_DEVICE, false),
	      "device name check");

	r = gl_device_parse(s, n, &canon, &why);
	check(r == 0 || r == -EINVAL, "device_parse result");
	check(r == 0 || why != NULL, "device_parse gave no reason");
	check(gl_model_check_value(model, GL_OP_DEVICE_SET, 0, s, n, false) == r,
	      "check_value disagrees with device_parse");
	if (r == 0) {
		check(canon.len > 1 && canon.data[0] == '{' && canon.data[canon.len - 1] == '}',
		      "canonical device JSON shape");
		check(gl_device_parse(canon.data, canon.len, &again, NULL) == 0,
		      "canonical device JSON does not parse");
		check(again.len == canon.len && memcmp(again.data, canon.data, canon.len) == 0,
		      "canonical device JSON is not a fixed point");
		/* a whole valid document is also a valid prefix */
		check(gl_model_check_value(model, GL_OP_DEVICE_SET, 0, s, n, true) == 0,
		      "partial check refuses a valid document");
	}
	for (int a = 0; a < GL_ATTR_COUNT; a++) {
		int c = gl_attr_check((gl_attr)a, s, n);

		check(c == 0 || c == -EINVAL, "attr_check result");
		check(gl_model_check_value(model, GL_OP_ATTR_SET, (gl_attr)a, s, n, false) == c,
		      "check_value disagrees with attr_check");
	}
	gl_buf_free(&canon);
	gl_buf_free(&again);
}

static void check_events(gl_sub *sub, const char *key, size_t klen, const char *val,
			 size_t vlen)
{
	const gl_event *ev;

	while ((ev = gl_sub_peek(sub))) {
		json_error_t jerr;
		json_t *j = json_loadb(ev->line, ev->line_len, JSON_ALLOW_NUL, &jerr);
		json_t *g = json_loadb(ev->gline, ev->gline_len, JSON_ALLOW_NUL, &jerr);
		json_t *meta;

		check(j && g && json_is_object(j) && json_is_object(g), "event line is not JSON");
		check(ev->line_len && ev->line[ev->line_len - 1] == '\n', "event line without LF");
		meta = json_object_get(j, "metadata");
		check(json_is_object(meta), "event without metadata");
		if (ev->type == GL_EV_CONFIG && val && utf8_valid(val, vlen) &&
		    utf8_valid(key, klen)) {
			json_t *v = json_object_get(meta, "value");
			json_t *k = json_object_get(meta, "key");

			check(json_is_string(v) && json_string_length(v) == vlen &&
				      memcmp(json_string_value(v), val, vlen) == 0,
			      "config event value differs from the value set");
			check(json_is_string(k) && json_string_length(k) == klen &&
				      memcmp(json_string_value(k), key, klen) == 0,
			      "config event key differs from the key set");
		}
		json_decref(j);
		json_decref(g);
		gl_sub_pop(sub);
	}
}

static void config_mode(const char *key, size_t klen, const char *val, size_t vlen)
{
	gl_instance *i = gl_model_find(model, "c1");
	gl_sub *sub = gl_sub_new(model, i, GL_EV_ALL, NULL, NULL);
	bool ok = gl_name_key_check(key, klen) == 0;
	const gl_entry *e;
	int r;

	if (!sub)
		fz_die("gl_sub_new");
	r = submit(GL_OP_CONFIG_SET, 0, "c1", key, klen, val, vlen);
	check(ok ? r == 0 : (r == -EINVAL || r == -ENAMETOOLONG), "config set result");
	check_events(sub, key, klen, val, vlen);
	if (ok) {
		i = gl_model_find(model, "c1");
		e = gl_instance_config_get(i, key, klen);
		check(e && e->len == vlen && memcmp(e->value, val, vlen) == 0 &&
			      e->value[vlen] == '\0',
		      "stored config value differs");
		check(submit(GL_OP_CONFIG_UNSET, 0, "c1", key, klen, NULL, 0) == 0,
		      "config unset failed");
		check_events(sub, key, klen, NULL, 0);
		i = gl_model_find(model, "c1");
		check(gl_instance_config_get(i, key, klen) == NULL, "config key still set");
	}
	gl_sub_free(sub);
}

static void device_mode(const char *name, size_t nlen, const char *val, size_t vlen)
{
	gl_buf canon = GL_BUF_INIT;
	bool ok = gl_name_device_check(name, nlen) == 0 &&
		  gl_device_parse(val, vlen, &canon, NULL) == 0;
	gl_instance *i = gl_model_find(model, "c1");
	gl_sub *sub = gl_sub_new(model, i, GL_EV_ALL, NULL, NULL);
	const gl_entry *e;
	int r;

	if (!sub)
		fz_die("gl_sub_new");
	r = submit(GL_OP_DEVICE_SET, 0, "c1", name, nlen, val, vlen);
	check(ok ? r == 0 : (r == -EINVAL || r == -ENAMETOOLONG), "device set result");
	check_events(sub, name, nlen, NULL, 0);
	if (ok) {
		i = gl_model_find(model, "c1");
		e = gl_instance_device_get(i, name, nlen);
		check(e && e->len == canon.len && memcmp(e->value, canon.data, canon.len) == 0,
		      "stored device JSON is not the canonical form");
		check(submit(GL_OP_DEVICE_UNSET, 0, "c1", name, nlen, NULL, 0) == 0,
		      "device unset failed");
		check_events(sub, name, nlen, NULL, 0);
	}
	gl_sub_free(sub);
	gl_buf_free(&canon);
}

static void attr_mode(unsigned which, const char *val, size_t vlen)
{
	/* init-pid would bind a real process; the agent status is read-only */
	static const gl_attr attrs[] = {GL_ATTR_TYPE, GL_ATTR_STATE, GL_ATTR_CGROUP,
					GL_ATTR_VSOCK_CID, GL_ATTR_VSOCK_UDS};
	gl_attr a = attrs[which % (sizeof(attrs) / sizeof(attrs[0]))];
	bool ok = gl_attr_check(a, val, vlen) == 0;
	gl_buf text = GL_BUF_INIT;
	int r = submit(GL_OP_ATTR_SET, a, "c2", NULL, 0, val, vlen);

	check(ok ? r == 0 : r == -EINVAL, "attr set result");
	if (ok && a != GL_ATTR_STATE) {
		/* state is the model's to derive; the others read back as set */
		check(gl_instance_attr(gl_model_find(model, "c2"), a, &text) == 0, "attr read");
		check(text.len == vlen && (vlen == 0 || memcmp(text.data, val, vlen) == 0),
		      "attribute reads back differently");
	}
	gl_buf_free(&text);
	/* back to unbound so that every input starts from the same c2 */
	if (a == GL_ATTR_CGROUP || a == GL_ATTR_VSOCK_CID || a == GL_ATTR_VSOCK_UDS)
		check(submit(GL_OP_ATTR_SET, a, "c2", NULL, 0, "", 0) == 0, "attr unbind");
	else if (a == GL_ATTR_TYPE)
		check(submit(GL_OP_ATTR_SET, a, "c2", NULL, 0, "container", 9) == 0, "type reset");
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	size_t klen;
	char *key, *val;
	size_t vlen;
	unsigned mode;

	init();
	if (size < 2) {
		pure_checks((const char *)data, size);
		return 0;
	}
	mode = data[0] & 3;
	klen = mode == 3 ? 0 : data[1];
	if (klen > size - 2)
		klen = size - 2;
	vlen = size - 2 - klen;
	/* exact-size copies, so that ASan sees any over-read */
	key = malloc(klen ? klen : 1);
	val = malloc(vlen ? vlen : 1);
	if (!key || !val)
		fz_die("out of memory");
	memcpy(key, data + 2, klen);
	memcpy(val, data + 2 + klen, vlen);
	switch (mode) {
	case 0:
		pure_checks(val, vlen);
		pure_checks(key, klen);
		break;
	case 1:
		config_mode(key, klen, val, vlen);
		break;
	case 2:
		device_mode(key, klen, val, vlen);
		break;
	default:
		attr_mode(data[1], val, vlen);
	}
	free(key);
	free(val);
	return 0;
}
