/* bridge/frame.c: the control channel's frames, encoded and read back from
 * a byte stream cut at every possible place. */
#include <errno.h>
#include <stdint.h>
#include <string.h>

#include "bridge/frame.h"
#include "tests/unit/unit.h"

/* ---- helpers -------------------------------------------------------------- */

struct want {
	uint32_t id;
	uint8_t type, flags;
	size_t len;
	uint8_t seed; /* payload byte i is seed + i */
};

static const struct want stream_frames[] = {
	{ 0, GL_FRAME_HELLO, 0, 0, 0 },
	{ 1, GL_FRAME_REQUEST, 0, 1, 7 },
	{ 0xfffffffe, GL_FRAME_DATA, GL_FRAME_END | GL_FRAME_STDERR, 300, 3 },
	{ 77, 200, 0xff, 9, 99 }, /* an unknown type: returned as is */
	{ 2, GL_FRAME_DATA, GL_FRAME_END, 0, 0 },
	{ 0x01020304, GL_FRAME_RESPONSE, 0, 4096, 250 },
};
#define NFRAMES (sizeof(stream_frames) / sizeof(stream_frames[0]))

static void build_stream(gl_buf *b)
{
	uint8_t p[4096];
	size_t i, k;

	for (k = 0; k < NFRAMES; k++) {
		const struct want *w = &stream_frames[k];

		for (i = 0; i < w->len; i++)
			p[i] = (uint8_t)(w->seed + i);
		ck_assert_int_eq(gl_frame_append(b, w->id, w->type, w->flags, p, w->len), 0);
	}
}

static void check_frame(const gl_frame *f, size_t k)
{
	const struct want *w = &stream_frames[k];
	uint8_t p[4096];
	size_t i;

	ck_assert_uint_eq(f->id, w->id);
	ck_assert_uint_eq(f->type, w->type);
	ck_assert_uint_eq(f->flags, w->flags);
	ck_assert_uint_eq(f->len, w->len);
	for (i = 0; i < w->len; i++)
		p[i] = (uint8_t)(w->seed + i);
	ck_assert(memcmp(f->payload, p, w->len) == 0);
}

/* Feed [from, to) and check every frame that becomes whole. */
static size_t feed_and_take(gl_frame_reader *r, const gl_buf *b, size_t from, size_t to,
			    size_t got)
{
	gl_frame f;
	int n;

	ck_assert_int_eq(gl_frame_reader_feed(r, b->data + from, to - from), 0);
	while ((n = gl_frame_next(r, &f)) == 1) {
		ck_assert_uint_lt(got, NFRAMES);
		check_frame(&f, got);
		got++;
	}
	ck_assert_int_eq(n, 0);
	return got;
}

/* ---- cases ---------------------------------------------------------------- */

START_TEST(header_bytes)
{
	static const uint8_t want[GL_FRAME_HDR] = { 0x01, 0x02, 0x03, 0x04, 0xa0, 0xb0,
						    0xc0, 0xd0, 0x06, 0x03 };
	uint8_t out[GL_FRAME_HDR];
	gl_buf b = GL_BUF_INIT;

	gl_frame_hdr(out, 0x01020304, 0xa0b0c0d0, GL_FRAME_DATA, GL_FRAME_END | GL_FRAME_STDERR);
	ck_assert_mem_eq(out, want, sizeof(want));

	ck_assert_int_eq(gl_frame_append(&b, 5, 0x63, 0, "abc", 3), 0);
	ck_assert_uint_eq(b.len, 13);
	ck_assert_mem_eq(b.data, "\0\0\0\x03\0\0\0\x05\x63\0abc", 13);
	gl_buf_free(&b);
}
END_TEST

START_TEST(every_split_point)
{
	gl_buf b = GL_BUF_INIT;
	gl_frame_reader r;
	size_t cut, got;

	build_stream(&b);
	for (cut = 0; cut <= b.len; cut++) {
		gl_frame_reader_init(&r, GL_FRAME_MAX_AUTH);
		got = feed_and_take(&r, &b, 0, cut, 0);
		got = feed_and_take(&r, &b, cut, b.len, got);
		ck_assert_uint_eq(got, NFRAMES);
		ck_assert_uint_eq(gl_frame_reader_pending(&r), 0);
		gl_frame_reader_free(&r);
	}
	gl_buf_free(&b);
}
END_TEST

START_TEST(two_cuts_and_bytewise)
{
	gl_buf b = GL_BUF_INIT;
	gl_frame_reader r;
	size_t c1, c2, i, got;

	build_stream(&b);
	/* two cuts: the first anywhere in the first three frames, the second
	 * at every 31st byte after it */
	for (c1 = 0; c1 < 3 * GL_FRAME_HDR + 1 + 300; c1++) {
		for (c2 = c1; c2 <= b.len; c2 += 31) {
			gl_frame_reader_init(&r, GL_FRAME_MAX_AUTH);
			got = feed_and_take(&r, &b, 0, c1, 0);
			got = feed_and_take(&r, &b, c1, c2, got);
			got = feed_and_take(&r, &b, c2, b.len, got);
			ck_assert_uint_eq(got, NFRAMES);
			gl_frame_reader_free(&r);
		}
	}
	/* one byte at a time, with the pending count checked on the way */
	gl_frame_reader_init(&r, GL_FRAME_MAX_AUTH);
	got = 0;
	for (i = 0; i < b.len; i++) {
		got = feed_and_take(&r, &b, i, i + 1, got);
		ck_assert_uint_lt(gl_frame_reader_pending(&r), GL_FRAME_HDR + 4096);
	}
	ck_assert_uint_eq(got, NFRAMES);
	ck_assert_uint_eq(gl_frame_reader_pending(&r), 0);
	gl_frame_reader_free(&r);
	gl_buf_free(&b);
}
END_TEST

START_TEST(pending_counts_partial)
{
	gl_buf b = GL_BUF_INIT;
	gl_frame_reader r;
	gl_frame f;

	ck_assert_int_eq(gl_frame_append(&b, 9, GL_FRAME_DATA, 0, "hello", 5), 0);
	ck_assert_int_eq(gl_frame_append(&b, 9, GL_FRAME_DATA, GL_FRAME_END, "", 0), 0);
	gl_frame_reader_init(&r, 16);
	ck_assert_int_eq(gl_frame_reader_feed(&r, b.data, 12), 0);
	ck_assert_uint_eq(gl_frame_reader_pending(&r), 12);
	ck_assert_int_eq(gl_frame_next(&r, &f), 0);
	ck_assert_int_eq(gl_frame_reader_feed(&r, b.data + 12, b.len - 12), 0);
	ck_assert_int_eq(gl_frame_next(&r, &f), 1);
	ck_assert_uint_eq(f.len, 5);
	ck_assert_mem_eq(f.payload, "hello", 5);
	ck_assert_uint_eq(gl_frame_reader_pending(&r), GL_FRAME_HDR);
	ck_assert_int_eq(gl_frame_next(&r, &f), 1);
	ck_assert_uint_eq(f.len, 0);
	ck_assert_uint_eq(f.flags, GL_FRAME_END);
	ck_assert_uint_eq(gl_frame_reader_pending(&r), 0);
	ck_assert_int_eq(gl_frame_next(&r, &f), 0);
	gl_frame_reader_free(&r);
	gl_buf_free(&b);
}
END_TEST

START_TEST(max_edges_reader)
{
	uint8_t hdr[GL_FRAME_HDR];
	gl_buf b = GL_BUF_INIT;
	gl_frame_reader r;
	gl_frame f;
	char *p;

	/* exactly the limit: accepted */
	p = calloc(1, GL_FRAME_MAX_AUTH + 1);
	ck_assert_ptr_nonnull(p);
	memset(p, 'x', GL_FRAME_MAX_AUTH + 1);
	ck_assert_int_eq(gl_frame_append(&b, 0, GL_FRAME_HELLO, 0, p, GL_FRAME_MAX_AUTH), 0);
	gl_frame_reader_init(&r, GL_FRAME_MAX_AUTH);
	ck_assert_int_eq(gl_frame_reader_feed(&r, b.data, b.len), 0);
	ck_assert_int_eq(gl_frame_next(&r, &f), 1);
	ck_assert_uint_eq(f.len, GL_FRAME_MAX_AUTH);
	ck_assert_mem_eq(f.payload, p, GL_FRAME_MAX_AUTH);
	gl_frame_reader_free(&r);

	/* one over: refused on the header alone, before any payload byte */
	gl_frame_hdr(hdr, GL_FRAME_MAX_AUTH + 1, 0, GL_FRAME_HELLO, 0);
	gl_frame_reader_init(&r, GL_FRAME_MAX_AUTH);
	ck_assert_int_eq(gl_frame_reader_feed(&r, hdr, GL_FRAME_HDR - 1), 0);
	ck_assert_int_eq(gl_frame_next(&r, &f), 0);
	ck_assert_int_eq(gl_frame_reader_feed(&r, hdr + GL_FRAME_HDR - 1, 1), 0);
	ck_assert_int_eq(gl_frame_next(&r, &f), -EMSGSIZE);
	ck_assert_int_eq(gl_frame_next(&r, &f), -EMSGSIZE);
	gl_frame_reader_free(&r);

	/* the largest u32 length */
	gl_frame_hdr(hdr, UINT32_MAX, 1, GL_FRAME_DATA, 0);
	gl_frame_reader_init(&r, GL_FRAME_MAX);
	ck_assert_int_eq(gl_frame_reader_feed(&r, hdr, GL_FRAME_HDR), 0);
	ck_assert_int_eq(gl_frame_next(&r, &f), -EMSGSIZE);
	gl_frame_reader_free(&r);

	/* a raised limit takes effect for the next header */
	gl_frame_reader_init(&r, GL_FRAME_MAX_AUTH);
	gl_buf_reset(&b);
	ck_assert_int_eq(gl_frame_append(&b, 3, GL_FRAME_RESPONSE, 0, p, GL_FRAME_MAX_AUTH + 1),
			 0);
	ck_assert_int_eq(gl_frame_reader_feed(&r, b.data, b.len), 0);
	r.max = GL_FRAME_MAX;
	ck_assert_int_eq(gl_frame_next(&r, &f), 1);
	ck_assert_uint_eq(f.len, GL_FRAME_MAX_AUTH + 1);
	gl_frame_reader_free(&r);
	gl_buf_free(&b);
	free(p);
}
END_TEST

START_TEST(max_edges_append)
{
	gl_buf b = GL_BUF_INIT;
	gl_frame_reader r;
	gl_frame f;
	uint8_t *p;

	p = malloc(GL_FRAME_MAX + 1);
	ck_assert_ptr_nonnull(p);
	memset(p, 0x5a, GL_FRAME_MAX + 1);
	ck_assert_int_eq(gl_frame_append(&b, 1, GL_FRAME_DATA, 0, p, GL_FRAME_MAX + 1),
			 -EMSGSIZE);
	ck_assert_uint_eq(b.len, 0);
	ck_assert_int_eq(gl_frame_append(&b, 1, GL_FRAME_DATA, 0, p, GL_FRAME_MAX), 0);
	ck_assert_uint_eq(b.len, GL_FRAME_HDR + GL_FRAME_MAX);
	ck_assert_mem_eq(b.data, "\0\x10\0\0\0\0\0\x01\x06\0", GL_FRAME_HDR);

	gl_frame_reader_init(&r, GL_FRAME_MAX);
	ck_assert_int_eq(gl_frame_reader_feed(&r, b.data, b.len), 0);
	ck_assert_int_eq(gl_frame_next(&r, &f), 1);
	ck_assert_uint_eq(f.len, GL_FRAME_MAX);
	ck_assert_mem_eq(f.payload, p, GL_FRAME_MAX);
	gl_frame_reader_free(&r);
	gl_buf_free(&b);
	free(p);
}
END_TEST

START_TEST(json_helpers)
{
	gl_buf b = GL_BUF_INIT;
	gl_frame_reader r;
	gl_frame f;
	char err[128];
	json_t *j;

	j = json_pack("{s:s, s:i}", "op", "ping", "n", 1);
	ck_assert_ptr_nonnull(j);
	ck_assert_int_eq(gl_frame_append_json(&b, 42, GL_FRAME_REQUEST, 0, j), 0);
	json_decref(j);
	ck_assert_uint_eq(b.len, GL_FRAME_HDR + 19);
	ck_assert_mem_eq(b.data, "\0\0\0\x13\0\0\0\x2a\x04\0{\"op\":\"ping\",\"n\":1}",
			 GL_FRAME_HDR + 19);

	gl_frame_reader_init(&r, GL_FRAME_MAX_AUTH);
	ck_assert_int_eq(gl_frame_reader_feed(&r, b.data, b.len), 0);
	ck_assert_int_eq(gl_frame_next(&r, &f), 1);
	j = gl_frame_json(&f, err, sizeof(err));
	ck_assert_ptr_nonnull(j);
	ck_assert_str_eq(json_string_value(json_object_get(j, "op")), "ping");
	ck_assert_int_eq(json_integer_value(json_object_get(j, "n")), 1);
	json_decref(j);
	gl_frame_reader_free(&r);
	gl_buf_free(&b);

	/* not JSON, not an object, empty, duplicate keys */
	f = (gl_frame){ .len = 5, .payload = (const uint8_t *)"{\"a\":" };
	err[0] = '\0';
	ck_assert_ptr_null(gl_frame_json(&f, err, sizeof(err)));
	ck_assert_str_ne(err, "");
	f = (gl_frame){ .len = 3, .payload = (const uint8_t *)"[1]" };
	ck_assert_ptr_null(gl_frame_json(&f, err, sizeof(err)));
	ck_assert_str_eq(err, "payload is not a JSON object");
	f = (gl_frame){ .len = 0, .payload = (const uint8_t *)"" };
	ck_assert_ptr_null(gl_frame_json(&f, NULL, 0));
	f = (gl_frame){ .len = 13, .payload = (const uint8_t *)"{\"a\":1,\"a\":2}" };
	ck_assert_ptr_null(gl_frame_json(&f, NULL, 0));
	/* the payload is not NUL-terminated: only len bytes count */
	f = (gl_frame){ .len = 2, .payload = (const uint8_t *)"{}garbage" };
	j = gl_frame_json(&f, NULL, 0);
	ck_assert_ptr_nonnull(j);
	ck_assert_uint_eq(json_object_size(j), 0);
	json_decref(j);

	/* ERROR payloads */
	j = gl_frame_error_json(ENOENT, "%s: %s", "/etc/nope", "no such file");
	ck_assert_ptr_nonnull(j);
	ck_assert_str_eq(json_string_value(json_object_get(j, "error")),
			 "/etc/nope: no such file");
	ck_assert_int_eq(json_integer_value(json_object_get(j, "errno")), ENOENT);
	ck_assert_uint_eq(json_object_size(j), 2);
	json_decref(j);
	/* text that is not UTF-8 still gives an ERROR payload */
	j = gl_frame_error_json(EACCES, "%s", "bad \xff name");
	ck_assert_ptr_nonnull(j);
	ck_assert_int_eq(json_integer_value(json_object_get(j, "errno")), EACCES);
	json_decref(j);
}
END_TEST

static Suite *frame_suite(void)
{
	Suite *s = suite_create("frame");
	TCase *t = tcase_create("frame");

	tcase_add_test(t, header_bytes);
	tcase_add_test(t, every_split_point);
	tcase_add_test(t, two_cuts_and_bytewise);
	tcase_add_test(t, pending_counts_partial);
	tcase_add_test(t, max_edges_reader);
	tcase_add_test(t, max_edges_append);
	tcase_add_test(t, json_helpers);
	suite_add_tcase(s, t);
	return s;
}

UNIT_MAIN(frame_suite)
