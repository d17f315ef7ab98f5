/* core/names.c: instance names, config keys, device names, device JSON. */
#include <errno.h>
#include <string.h>

#include "core/names.h"
#include "tests/unit/unit.h"

#define INST(lit) gl_name_instance_check(lit, sizeof(lit) - 1)
#define KEY(lit) gl_name_key_check(lit, sizeof(lit) - 1)
#define DEV(lit) gl_name_device_check(lit, sizeof(lit) - 1)

START_TEST(instance_names)
{
	char name[80];

	ck_assert_int_eq(INST("c1"), 0);
	ck_assert_int_eq(INST("a"), 0);
	ck_assert_int_eq(INST("Web-01"), 0);
	ck_assert_int_eq(INST("a-b-c"), 0);
	ck_assert_int_eq(INST("a--b"), 0);

	ck_assert_int_eq(INST(""), -EINVAL);
	ck_assert_int_eq(INST("1abc"), -EINVAL);  /* leading digit */
	ck_assert_int_eq(INST("-abc"), -EINVAL);  /* leading '-' */
	ck_assert_int_eq(INST("abc-"), -EINVAL);  /* trailing '-' */
	ck_assert_int_eq(INST("a_b"), -EINVAL);
	ck_assert_int_eq(INST("a.b"), -EINVAL);
	ck_assert_int_eq(INST("a b"), -EINVAL);
	ck_assert_int_eq(INST("a/b"), -EINVAL);
	ck_assert_int_eq(INST("a\0b"), -EINVAL);
	ck_assert_int_eq(INST("caf\xc3\xa9"), -EINVAL);
	ck_assert_int_eq(INST("abc\n"), -EINVAL);

	/* 63 is the limit. */
	memset(name, 'x', sizeof(name));
	ck_assert_int_eq(gl_name_instance_check(name, 63), 0);
	ck_assert_int_eq(gl_name_instance_check(name, 64), -ENAMETOOLONG);
	ck_assert_int_eq(gl_name_instance_check(name, 80), -ENAMETOOLONG);
}
END_TEST

START_TEST(key_names)
{
	char key[300];

	ck_assert_int_eq(KEY("user.foo"), 0);
	ck_assert_int_eq(KEY("cloud-init.user-data"), 0);
	ck_assert_int_eq(KEY("security.devlxd"), 0);
	ck_assert_int_eq(KEY("volatile.cloud-init.instance-id"), 0);
	ck_assert_int_eq(KEY("user.a b"), 0);
	ck_assert_int_eq(KEY("user.\xc3\xa9t\xc3\xa9"), 0);
	ck_assert_int_eq(KEY("user."), 0);
	ck_assert_int_eq(KEY("user.~x"), 0);
	ck_assert_int_eq(KEY("user.x.swp"), 0);

	ck_assert_int_eq(KEY(""), -EINVAL);
	ck_assert_int_eq(KEY("user/foo"), -EINVAL);
	ck_assert_int_eq(KEY("user.foo/bar"), -EINVAL);
	ck_assert_int_eq(KEY("user.f\0o"), -EINVAL);     /* NUL inside the length */
	ck_assert_int_eq(KEY("user.f\no"), -EINVAL);
	ck_assert_int_eq(KEY("user.f\to"), -EINVAL);
	ck_assert_int_eq(KEY("user.\x1f"), -EINVAL);
	ck_assert_int_eq(KEY("user.\x7f"), -EINVAL);
	ck_assert_int_eq(KEY("userfoo"), -EINVAL);        /* no dot */
	ck_assert_int_eq(KEY("4913"), -EINVAL);           /* vim's probe file */
	ck_assert_int_eq(KEY(".user.foo.swp"), -EINVAL);  /* leading dot */
	ck_assert_int_eq(KEY("."), -EINVAL);
	ck_assert_int_eq(KEY("user.foo~"), -EINVAL);      /* trailing '~' */

	/* 255 bytes is the limit. */
	memset(key, 'k', sizeof(key));
	memcpy(key, "user.", 5);
	ck_assert_int_eq(gl_name_key_check(key, 255), 0);
	ck_assert_int_eq(gl_name_key_check(key, 256), -ENAMETOOLONG);
	ck_assert_int_eq(gl_name_key_check(key, 300), -ENAMETOOLONG);
}
END_TEST

START_TEST(device_names)
{
	char name[300];

	ck_assert_int_eq(DEV("share"), 0);
	ck_assert_int_eq(DEV("eth0"), 0);
	ck_assert_int_eq(DEV("root"), 0);
	ck_assert_int_eq(DEV("my.disk"), 0);
	ck_assert_int_eq(DEV("a"), 0);

	ck_assert_int_eq(DEV(""), -EINVAL);
	ck_assert_int_eq(DEV("a/b"), -EINVAL);
	ck_assert_int_eq(DEV("a\0b"), -EINVAL);
	ck_assert_int_eq(DEV("a\nb"), -EINVAL);
	ck_assert_int_eq(DEV("a\x7f"), -EINVAL);
	ck_assert_int_eq(DEV(".share.swp"), -EINVAL);
	ck_assert_int_eq(DEV("share~"), -EINVAL);

	memset(name, 'd', sizeof(name));
	ck_assert_int_eq(gl_name_device_check(name, 255), 0);
	ck_assert_int_eq(gl_name_device_check(name, 256), -ENAMETOOLONG);
}
END_TEST

START_TEST(key_prefixes)
{
	ck_assert(gl_key_guest_visible("user.foo"));
	ck_assert(gl_key_guest_visible("user."));
	ck_assert(gl_key_guest_visible("cloud-init.user-data"));
	ck_assert(!gl_key_guest_visible("security.devlxd"));
	ck_assert(!gl_key_guest_visible("volatile.cloud-init.instance-id"));
	ck_assert(!gl_key_guest_visible("User.foo"));
	ck_assert(!gl_key_guest_visible("user"));
	ck_assert(!gl_key_guest_visible("cloud-init"));

	ck_assert(gl_key_evented("user.foo"));
	ck_assert(!gl_key_evented("cloud-init.user-data"));
	ck_assert(!gl_key_evented("limits.cpu"));
	ck_assert(!gl_key_evented("userx.foo"));
}
END_TEST

/* ---- device JSON --------------------------------------------------------- */

static void dev_ok(const char *json, size_t n, const char *want)
{
	gl_buf b = GL_BUF_INIT;
	const char *err = "unset";

	ck_assert_int_eq(gl_buf_adds(&b, "prefix:"), 0);
	ck_assert_msg(gl_device_parse(json, n, &b, &err) == 0, "rejected %s: %s", json, err);
	ck_assert_str_eq(err, "unset");
	ck_assert_str_eq(b.data + 7, want);
	ck_assert_uint_eq(b.len, 7 + strlen(want));
	gl_buf_free(&b);
}

/* Rejected with a reason starting with want_err; canon left as it was. */
static void dev_bad(const char *json, size_t n, const char *want_err)
{
	gl_buf b = GL_BUF_INIT;
	const char *err = NULL;

	ck_assert_int_eq(gl_buf_adds(&b, "prefix:"), 0);
	ck_assert_int_eq(gl_device_parse(json, n, &b, &err), -EINVAL);
	ck_assert_ptr_nonnull(err);
	ck_assert_msg(strncmp(err, want_err, strlen(want_err)) == 0, "%s: got \"%s\", want \"%s\"",
	              json, err, want_err);
	ck_assert_str_eq(b.data, "prefix:");
	ck_assert_uint_eq(b.len, 7);
	/* err may be NULL. */
	ck_assert_int_eq(gl_device_parse(json, n, &b, NULL), -EINVAL);
	gl_buf_free(&b);
}

#define DEV_OK(lit, want) dev_ok(lit, sizeof(lit) - 1, want)
#define DEV_BAD(lit, want) dev_bad(lit, sizeof(lit) - 1, want)

START_TEST(device_json_valid)
{
	DEV_OK("{\"type\":\"disk\",\"path\":\"/mnt\"}", "{\"path\":\"/mnt\",\"type\":\"disk\"}");
	DEV_OK("  {\n \"type\" : \"disk\" ,\"source\":\"/var/tmp/lxdshare\",\"path\":\"/mnt/share\"}\n",
	       "{\"path\":\"/mnt/share\",\"source\":\"/var/tmp/lxdshare\",\"type\":\"disk\"}");
	DEV_OK("{\"type\":\"nic\"}", "{\"type\":\"nic\"}");
	/* Byte-wise order: upper case before lower case, '.' before letters. */
	DEV_OK("{\"type\":\"x\",\"b\":\"1\",\"B\":\"2\",\"a.b\":\"3\",\"a\":\"4\"}",
	       "{\"B\":\"2\",\"a\":\"4\",\"a.b\":\"3\",\"b\":\"1\",\"type\":\"x\"}");
	/* Re-escaped the Go way, without HTML escapes; empty values allowed. */
	DEV_OK("{\"type\":\"disk\",\"p\":\"<&>\\u00e9\\/\\b\\u2028\",\"e\":\"\"}",
	       "{\"e\":\"\",\"p\":\"<&>\xc3\xa9/\\u0008\\u2028\",\"type\":\"disk\"}");
	/* Keys may hold anything but control bytes. */
	DEV_OK("{\"type\":\"d\",\"a b/c\":\"v\"}", "{\"a b/c\":\"v\",\"type\":\"d\"}");
	/* Values may hold control bytes (escaped on output). */
	DEV_OK("{\"type\":\"d\",\"v\":\"l1\\nl2\\u0001\"}",
	       "{\"type\":\"d\",\"v\":\"l1\\nl2\\u0001\"}");
}
END_TEST

START_TEST(device_json_invalid)
{
	DEV_BAD("[]", "not a JSON object");
	DEV_BAD("[{\"type\":\"disk\"}]", "not a JSON object");
	DEV_BAD("\"disk\"", "not a JSON object");
	DEV_BAD("42", "not a JSON object");
	DEV_BAD("null", "not a JSON object");

	DEV_BAD("{\"type\":\"disk\",\"path\":1}", "value of \"path\" is not a string");
	DEV_BAD("{\"type\":\"disk\",\"path\":null}", "value of \"path\" is not a string");
	DEV_BAD("{\"type\":\"disk\",\"path\":true}", "value of \"path\" is not a string");
	DEV_BAD("{\"type\":\"disk\",\"path\":{}}", "value of \"path\" is not a string");
	DEV_BAD("{\"type\":\"disk\",\"path\":[\"a\"]}", "value of \"path\" is not a string");
	DEV_BAD("{\"type\":7}", "value of \"type\" is not a string");

	DEV_BAD("{}", "missing \"type\"");
	DEV_BAD("{\"path\":\"/mnt\"}", "missing \"type\"");
	DEV_BAD("{\"Type\":\"disk\"}", "missing \"type\"");
	DEV_BAD("{\"type\":\"\",\"path\":\"/mnt\"}", "empty \"type\"");

	DEV_BAD("{\"type\":\"disk\",\"\":\"x\"}", "empty key");
	DEV_BAD("{\"type\":\"disk\",\"a\\nb\":\"x\"}", "key contains a control character");
	DEV_BAD("{\"type\":\"disk\",\"a\\u007f\":\"x\"}", "key contains a control character");

	DEV_BAD("{\"type\":\"disk\",\"type\":\"nic\"}", "invalid JSON: ");
	DEV_BAD("{\"type\":\"disk\"} x", "invalid JSON: ");
	DEV_BAD("{\"type\":\"disk\"}{}", "invalid JSON: ");
	DEV_BAD("{\"type\":\"disk\",}", "invalid JSON: ");
	DEV_BAD("{\"type\":\"disk\"", "invalid JSON: ");
	DEV_BAD("", "invalid JSON: ");
	DEV_BAD("{\"type\":\"d\xff\"}", "invalid JSON: ");
	DEV_BAD("{\"type\":\"\xed\xa0\x80\"}", "invalid JSON: ");
	DEV_BAD("{\"type\":\"disk\",\"p\":\"a\\u0000b\"}", "invalid JSON: ");
	DEV_BAD("{\"type\":\"disk\"}\0", "invalid JSON: ");
}
END_TEST

START_TEST(device_json_messages)
{
	gl_buf b = GL_BUF_INIT;
	const char *err = NULL;
	const char *dup = "{\"type\":\"disk\",\"type\":\"nic\"}";

	ck_assert_int_eq(gl_device_parse(dup, strlen(dup), &b, &err), -EINVAL);
	ck_assert_msg(strstr(err, "duplicate") != NULL, "%s", err);
	gl_buf_free(&b);
}
END_TEST

static Suite *names_suite(void)
{
	Suite *s = suite_create("names");
	TCase *tc;

	tc = tcase_create("names");
	tcase_add_test(tc, instance_names);
	tcase_add_test(tc, key_names);
	tcase_add_test(tc, device_names);
	tcase_add_test(tc, key_prefixes);
	suite_add_tcase(s, tc);

	tc = tcase_create("device_json");
	tcase_add_test(tc, device_json_valid);
	tcase_add_test(tc, device_json_invalid);
	tcase_add_test(tc, device_json_messages);
	suite_add_tcase(s, tc);
	return s;
}

UNIT_MAIN(names_suite)
