/* core/buf.c and core/json.c: the buffer, and JSON bytes as Go's
 * encoding/json writes them (specs/devlxd-api.md §4 and §6.6). */
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "core/buf.h"
#include "core/json.h"
#include "tests/unit/unit.h"

/* ---- buf ----------------------------------------------------------------- */

START_TEST(buf_grows_and_terminates)
{
	gl_buf b = GL_BUF_INIT;
	size_t i;

	for (i = 0; i < 10000; i++) {
		ck_assert_int_eq(gl_buf_addc(&b, (char)('a' + i % 26)), 0);
		ck_assert_uint_eq(b.len, i + 1);
		ck_assert_int_eq(b.data[b.len], '\0');
		ck_assert_uint_gt(b.cap, b.len);
	}
	for (i = 0; i < 10000; i++)
		ck_assert_int_eq(b.data[i], 'a' + i % 26);

	gl_buf_reset(&b);
	ck_assert_uint_eq(b.len, 0);
	ck_assert_ptr_nonnull(b.data);
	ck_assert_str_eq(b.data, "");
	ck_assert_uint_ge(b.cap, 10000);

	ck_assert_int_eq(gl_buf_add(&b, "x\0y", 3), 0);
	ck_assert_uint_eq(b.len, 3);
	ck_assert_int_eq(memcmp(b.data, "x\0y", 4), 0);
	ck_assert_int_eq(gl_buf_adds(&b, "zz"), 0);
	ck_assert_int_eq(memcmp(b.data, "x\0yzz", 6), 0);
	ck_assert_int_eq(gl_buf_add(&b, NULL, 0), 0);
	ck_assert_uint_eq(b.len, 5);

	gl_buf_free(&b);
	ck_assert_ptr_null(b.data);
	ck_assert_uint_eq(b.len, 0);
	ck_assert_uint_eq(b.cap, 0);
}
END_TEST

START_TEST(buf_reserve_overflow)
{
	gl_buf b = GL_BUF_INIT;

	ck_assert_int_eq(gl_buf_adds(&b, "abc"), 0);
	ck_assert_int_eq(gl_buf_reserve(&b, SIZE_MAX), -ENOMEM);
	ck_assert_int_eq(gl_buf_reserve(&b, SIZE_MAX - 3), -ENOMEM);
	ck_assert_str_eq(b.data, "abc");
	ck_assert_int_eq(gl_buf_reserve(&b, 1000), 0);
	ck_assert_uint_ge(b.cap, 1004);
	gl_buf_free(&b);
}
END_TEST

START_TEST(buf_printf)
{
	gl_buf b = GL_BUF_INIT;
	char big[1000];

	ck_assert_int_eq(gl_buf_printf(&b, "%d-%s", 42, "x"), 0);
	ck_assert_str_eq(b.data, "42-x");
	ck_assert_uint_eq(b.len, 4);

	/* Longer than the room left: exercises the second pass. */
	memset(big, 'q', sizeof(big) - 1);
	big[sizeof(big) - 1] = '\0';
	ck_assert_int_eq(gl_buf_printf(&b, "[%s]", big), 0);
	ck_assert_uint_eq(b.len, 4 + 1 + 999 + 1);
	ck_assert_int_eq(b.data[4], '[');
	ck_assert_int_eq(b.data[5 + 998], 'q');
	ck_assert_int_eq(b.data[b.len - 1], ']');
	ck_assert_int_eq(b.data[b.len], '\0');

	ck_assert_int_eq(gl_buf_printf(&b, "%s", ""), 0);
	ck_assert_uint_eq(b.len, 1005);
	gl_buf_free(&b);
}
END_TEST

START_TEST(buf_steal)
{
	gl_buf b = GL_BUF_INIT;
	size_t len = 99;
	char *p;

	/* Empty: a fresh "" the caller frees. */
	p = gl_buf_steal(&b, &len);
	ck_assert_ptr_nonnull(p);
	ck_assert_str_eq(p, "");
	ck_assert_uint_eq(len, 0);
	free(p);

	ck_assert_int_eq(gl_buf_adds(&b, "hello"), 0);
	p = gl_buf_steal(&b, &len);
	ck_assert_str_eq(p, "hello");
	ck_assert_uint_eq(len, 5);
	ck_assert_ptr_null(b.data);
	ck_assert_uint_eq(b.len, 0);
	ck_assert_uint_eq(b.cap, 0);
	free(p);

	/* Reusable afterwards; len may be NULL. */
	ck_assert_int_eq(gl_buf_adds(&b, "again"), 0);
	p = gl_buf_steal(&b, NULL);
	ck_assert_str_eq(p, "again");
	free(p);
}
END_TEST

/* ---- gl_json_quote ------------------------------------------------------- */

static void check_quote(const char *in, size_t n, bool html, const char *want)
{
	gl_buf b = GL_BUF_INIT;

	ck_assert_int_eq(gl_json_quote(&b, in, n, html), 0);
	ck_assert_str_eq(b.data, want);
	ck_assert_uint_eq(b.len, strlen(want));
	gl_buf_free(&b);
}

#define Q(lit, html, want) check_quote(lit, sizeof(lit) - 1, html, want)

START_TEST(quote_plain_and_short_escapes)
{
	Q("", false, "\"\"");
	Q("abc", false, "\"abc\"");
	Q("a\"b\\c", false, "\"a\\\"b\\\\c\"");
	Q("\n\r\t", false, "\"\\n\\r\\t\"");
	/* Go (1.19, LXD 5.0.2's) has no \b or \f short escapes. */
	Q("\b\f", false, "\"\\u0008\\u000c\"");
	Q("\x01\x1f", false, "\"\\u0001\\u001f\"");
	Q("a\0b", false, "\"a\\u0000b\"");
	Q("/\x7f ~", false, "\"/\x7f ~\"");
	Q("{\"k\":[1]}", false, "\"{\\\"k\\\":[1]}\"");
}
END_TEST

START_TEST(quote_html)
{
	Q("<a href=\"x\">&amp;</a>", false, "\"<a href=\\\"x\\\">&amp;</a>\"");
	Q("<a href=\"x\">&amp;</a>", true,
	  "\"\\u003ca href=\\\"x\\\"\\u003e\\u0026amp;\\u003c/a\\u003e\"");
	Q("<>&\n", true, "\"\\u003c\\u003e\\u0026\\n\"");
	Q("/\x7f", true, "\"/\x7f\"");
}
END_TEST

START_TEST(quote_utf8_valid)
{
	Q("\xc3\xa9", false, "\"\xc3\xa9\"");                 /* é */
	Q("\xe2\x82\xac", false, "\"\xe2\x82\xac\"");         /* € */
	Q("\xf0\x9f\x98\x80", false, "\"\xf0\x9f\x98\x80\""); /* 😀 */
	Q("\xef\xbf\xbd", false, "\"\xef\xbf\xbd\"");         /* U+FFFD itself */
	Q("\xf4\x8f\xbf\xbf", false, "\"\xf4\x8f\xbf\xbf\""); /* U+10FFFF */
	Q("\xed\x9f\xbf", false, "\"\xed\x9f\xbf\"");         /* U+D7FF */
	Q("\xe2\x80\xa7", false, "\"\xe2\x80\xa7\"");         /* U+2027: not escaped */
	Q("\xe2\x80\xa8", false, "\"\\u2028\"");
	Q("\xe2\x80\xa9", true, "\"\\u2029\"");
	Q("a\xe2\x80\xa8" "b\xe2\x80\xa9" "c", false, "\"a\\u2028b\\u2029c\"");
}
END_TEST

START_TEST(quote_utf8_invalid)
{
	/* Each byte Go's utf8.DecodeRune rejects becomes one \ufffd. */
	Q("\x80", false, "\"\\ufffd\"");
	Q("a\xbf" "b", false, "\"a\\ufffdb\"");
	Q("\xff\xfe", false, "\"\\ufffd\\ufffd\"");
	Q("\xf5\x80\x80\x80", false, "\"\\ufffd\\ufffd\\ufffd\\ufffd\"");
	/* overlong */
	Q("\xc0\x80", false, "\"\\ufffd\\ufffd\"");
	Q("\xc1\xbf", false, "\"\\ufffd\\ufffd\"");
	Q("\xe0\x80\x80", false, "\"\\ufffd\\ufffd\\ufffd\"");
	Q("\xe0\x9f\xbf", false, "\"\\ufffd\\ufffd\\ufffd\"");
	Q("\xf0\x80\x80\x80", false, "\"\\ufffd\\ufffd\\ufffd\\ufffd\"");
	Q("\xf0\x8f\xbf\xbf", false, "\"\\ufffd\\ufffd\\ufffd\\ufffd\"");
	/* surrogates */
	Q("\xed\xa0\x80", false, "\"\\ufffd\\ufffd\\ufffd\"");
	Q("\xed\xbf\xbf", false, "\"\\ufffd\\ufffd\\ufffd\"");
	/* above U+10FFFF */
	Q("\xf4\x90\x80\x80", false, "\"\\ufffd\\ufffd\\ufffd\\ufffd\"");
	/* truncated, at the end and before other bytes */
	Q("\xe2\x82", false, "\"\\ufffd\\ufffd\"");
	Q("\xe2\x82" "a", false, "\"\\ufffd\\ufffda\"");
	Q("\xf0\x9f\x98", false, "\"\\ufffd\\ufffd\\ufffd\"");
	Q("\xc3", false, "\"\\ufffd\"");
	Q("\xc3" "\xc3\xa9", false, "\"\\ufffd\xc3\xa9\"");
	/* a lead byte followed by a new sequence: only the lead is lost */
	Q("\xe2\xe2\x82\xac", false, "\"\\ufffd\xe2\x82\xac\"");
	Q("\xe2\x82\xac\x80<", true, "\"\xe2\x82\xac\\ufffd\\u003c\"");
}
END_TEST

START_TEST(flat_object)
{
	const char *keys[] = {"a", "b<", "c"};
	const char *vals[] = {"1", "x&y", "n\0l"};
	const size_t vlens[] = {1, 3, 3};
	gl_buf b = GL_BUF_INIT;

	ck_assert_int_eq(gl_json_flat_object(&b, keys, vals, NULL, 0, false), 0);
	ck_assert_str_eq(b.data, "{}");
	gl_buf_reset(&b);

	ck_assert_int_eq(gl_json_flat_object(&b, keys, vals, vlens, 3, false), 0);
	ck_assert_str_eq(b.data, "{\"a\":\"1\",\"b<\":\"x&y\",\"c\":\"n\\u0000l\"}");
	gl_buf_reset(&b);

	ck_assert_int_eq(gl_json_flat_object(&b, keys, vals, vlens, 3, true), 0);
	ck_assert_str_eq(b.data,
	                 "{\"a\":\"1\",\"b\\u003c\":\"x\\u0026y\",\"c\":\"n\\u0000l\"}");
	gl_buf_reset(&b);

	/* vlens NULL: values are C strings. */
	ck_assert_int_eq(gl_json_flat_object(&b, keys, vals, NULL, 2, false), 0);
	ck_assert_str_eq(b.data, "{\"a\":\"1\",\"b<\":\"x&y\"}");
	gl_buf_free(&b);
}
END_TEST

/* ---- gl_json_timestamp --------------------------------------------------- */

/* 2026-11-22T23:42:31Z, the capture's day. */
#define T0 1795390951LL
/* 2026-07-04T12:00:00Z, in summer time. */
#define T1 1783166400LL

static void check_ts(const char *tz, long long ns, const char *want)
{
	gl_buf b = GL_BUF_INIT;

	ck_assert_int_eq(setenv("TZ", tz, 1), 0);
	tzset();
	ck_assert_int_eq(gl_json_timestamp(&b, ns), 0);
	ck_assert_str_eq(b.data, want);
	gl_buf_free(&b);
}

START_TEST(timestamp_utc)
{
	check_ts("UTC", T0 * 1000000000LL + 347887743, "2026-11-22T23:42:31.347887743Z");
	check_ts("UTC", T0 * 1000000000LL + 498508330, "2026-11-22T23:42:31.49850833Z");
	check_ts("UTC", T0 * 1000000000LL + 500000000, "2026-11-22T23:42:31.5Z");
	check_ts("UTC", T0 * 1000000000LL + 1, "2026-11-22T23:42:31.000000001Z");
	check_ts("UTC", T0 * 1000000000LL + 10, "2026-11-22T23:42:31.00000001Z");
	check_ts("UTC", T0 * 1000000000LL, "2026-11-22T23:42:31Z");
	check_ts("UTC", 0, "1970-01-01T00:00:00Z");
	check_ts("UTC", -1, "1969-12-31T23:59:59.999999999Z");
	/* A POSIX zone with no offset is UTC too. */
	check_ts("GMT0", T0 * 1000000000LL + 120000000, "2026-11-22T23:42:31.12Z");
}
END_TEST

START_TEST(timestamp_offsets)
{
	const char *est = "EST5EDT,M3.2.0,M11.1.0";

	check_ts(est, T0 * 1000000000LL + 347887743, "2026-11-22T18:42:31.347887743-05:00");
	check_ts(est, T1 * 1000000000LL, "2026-07-04T08:00:00-04:00");
	check_ts("IST-5:30", T0 * 1000000000LL + 100, "2026-11-23T05:12:31.0000001+05:30");
	check_ts("NST3:30", T0 * 1000000000LL, "2026-11-22T20:12:31-03:30");
	check_ts("XYZ-14", T0 * 1000000000LL, "2026-11-23T13:42:31+14:00");
}
END_TEST

START_TEST(timestamp_tzdata)
{
	/* Named zones need tzdata; the POSIX cases above do not. */
	if (access("/usr/share/zoneinfo/Asia/Kolkata", R_OK) != 0) {
		fprintf(stderr, "timestamp_tzdata: no tzdata, skipped\n");
		return;
	}
	check_ts("Asia/Kolkata", T0 * 1000000000LL + 347887743,
	         "2026-11-23T05:12:31.347887743+05:30");
	check_ts("America/New_York", T1 * 1000000000LL + 5, "2026-07-04T08:00:00.000000005-04:00");
}
END_TEST

static Suite *buf_json_suite(void)
{
	Suite *s = suite_create("buf_json");
	TCase *tc;

	tc = tcase_create("buf");
	tcase_add_test(tc, buf_grows_and_terminates);
	tcase_add_test(tc, buf_reserve_overflow);
	tcase_add_test(tc, buf_printf);
	tcase_add_test(tc, buf_steal);
	suite_add_tcase(s, tc);

	tc = tcase_create("quote");
	tcase_add_test(tc, quote_plain_and_short_escapes);
	tcase_add_test(tc, quote_html);
	tcase_add_test(tc, quote_utf8_valid);
	tcase_add_test(tc, quote_utf8_invalid);
	tcase_add_test(tc, flat_object);
	suite_add_tcase(s, tc);

	tc = tcase_create("timestamp");
	tcase_add_test(tc, timestamp_utc);
	tcase_add_test(tc, timestamp_offsets);
	tcase_add_test(tc, timestamp_tzdata);
	suite_add_tcase(s, tc);
	return s;
}

UNIT_MAIN(buf_json_suite)
