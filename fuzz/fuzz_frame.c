/* Control-channel frames (bridge/frame.c): the byte stream a peer sends,
 * fed to gl_frame_reader in reads whose sizes come from the input.
 *
 * Input: byte 0 picks the read sizes (fuzz_util.h), byte 1 the payload
 * limit (even: GL_FRAME_MAX_AUTH, odd: GL_FRAME_MAX; >= 128: 64 bytes),
 * the rest is the stream. Checks:
 *   - the frames returned, encoded again with gl_frame_append, are exactly
 *     the bytes consumed, whatever the read sizes;
 *   - -EMSGSIZE exactly when the next header announces more than the limit,
 *     and nothing after it is looked at;
 *   - gl_frame_reader_pending is what is left;
 *   - gl_frame_json gives an object or NULL with a reason, and an object
 *     survives gl_frame_append_json + gl_frame_json unchanged. */
#include <errno.h>
#include <jansson.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bridge/frame.h"
#include "fuzz/fuzz_util.h"

static void check(bool ok, const char *what)
{
	if (!ok)
		fz_die(what);
}

static uint32_t be32(const uint8_t *p)
{
	return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static void check_json(const gl_frame *f)
{
	char err[128] = "";
	json_t *j = gl_frame_json(f, err, sizeof(err));
	gl_buf b = GL_BUF_INIT;
	gl_frame_reader r;
	gl_frame g;
	json_t *k;

	if (!j) {
		check(err[0] != '\0', "gl_frame_json gave no reason");
		return;
	}
	check(json_is_object(j), "gl_frame_json returned a non-object");
	check(gl_frame_append_json(&b, f->id, f->type, f->flags, j) == 0, "append_json failed");
	gl_frame_reader_init(&r, GL_FRAME_MAX);
	check(gl_frame_reader_feed(&r, b.data, b.len) == 0, "feed failed");
	check(gl_frame_next(&r, &g) == 1, "re-encoded JSON frame not read back");
	check(g.id == f->id && g.type == f->type && g.flags == f->flags, "header changed");
	k = gl_frame_json(&g, NULL, 0);
	check(k && json_equal(j, k), "JSON changed through append_json");
	json_decref(k);
	json_decref(j);
	gl_frame_reader_free(&r);
	gl_buf_free(&b);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	gl_frame_reader r;
	gl_buf again = GL_BUF_INIT;
	fz_rng rng;
	size_t off = 0, used = 0;
	uint32_t max;
	bool stop = false;
	int nframes = 0;

	if (size < 2)
		return 0;
	max = data[1] >= 128 ? 64 : (data[1] & 1) ? GL_FRAME_MAX : GL_FRAME_MAX_AUTH;
	fz_rng_init(&rng, data[0] * 2654435761u);
	gl_frame_reader_init(&r, max);
	data += 2;
	size -= 2;
	while (!stop && off < size) {
		size_t c = fz_chunk(&rng, data[-2], size - off);
		gl_frame f;
		int k;

		check(gl_frame_reader_feed(&r, data + off, c) == 0, "feed failed");
		off += c;
		while ((k = gl_frame_next(&r, &f)) == 1) {
			check(f.len <= max, "frame over the limit returned");
			check(gl_frame_append(&again, f.id, f.type, f.flags, f.payload, f.len) == 0,
			      "append failed");
			used += GL_FRAME_HDR + f.len;
			check(again.len == used && memcmp(again.data, data, used) == 0,
			      "frames differ from the bytes consumed");
			if (f.type != GL_FRAME_DATA && nframes++ < 16)
				check_json(&f);
		}
		if (k < 0) {
			check(k == -EMSGSIZE, "unexpected error from gl_frame_next");
			check(off - used >= GL_FRAME_HDR && be32(data + used) > max,
			      "-EMSGSIZE without an oversize header");
			stop = true;
		} else {
			check(k == 0, "gl_frame_next result");
			/* not a whole frame left: too short, or a payload not all in */
			check(off - used < GL_FRAME_HDR ||
				      (be32(data + used) <= max &&
				       off - used < GL_FRAME_HDR + (size_t)be32(data + used)),
			      "a whole frame was left unread");
		}
		check(gl_frame_reader_pending(&r) == off - used, "pending count");
	}
	gl_frame_reader_free(&r);
	gl_buf_free(&again);
	return 0;
}
