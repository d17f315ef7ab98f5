/* The control channel's frames (docs/control-protocol.md): what the host
 * and the guest agent, and guestlinkctl and guestlinkd, exchange.
 *
 *   offset 0        4        8      9       10
 *          | length | id     | type | flags | payload (length bytes)
 *            u32 BE   u32 BE   u8     u8
 *
 * `length` counts the payload only. Control payloads are one JSON object;
 * DATA payloads are raw bytes (at most GL_FRAME_CHUNK each). Pure code: no
 * loop, no sockets; shared by guestlinkd, guestlink-agent and guestlinkctl. */
#ifndef GUESTLINK_BRIDGE_FRAME_H
#define GUESTLINK_BRIDGE_FRAME_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <jansson.h>

#include "core/buf.h"

#define GL_FRAME_HDR 10u
#define GL_FRAME_MAX (1u << 20)   /* payload limit once authenticated */
#define GL_FRAME_MAX_AUTH 4096u   /* payload limit before AUTH_OK */
#define GL_FRAME_CHUNK (64u << 10) /* DATA payloads are cut at this size */

typedef enum gl_frame_type {
	GL_FRAME_HELLO = 1,    /* agent -> host, id 0: {version, nonce, instance} */
	GL_FRAME_AUTH = 2,     /* host -> agent, id 0: {version, sig} */
	GL_FRAME_AUTH_OK = 3,  /* agent -> host, id 0: {version, uptime_ms} */
	GL_FRAME_REQUEST = 4,  /* {op, ...} opens request `id` */
	GL_FRAME_RESPONSE = 5, /* answer to `id`; END on the last frame of it */
	GL_FRAME_DATA = 6,     /* raw bytes of a stream of `id` */
	GL_FRAME_CANCEL = 7,   /* stop request `id` ({signal} for exec) */
	GL_FRAME_ERROR = 8,    /* {error, errno}; id 0: the connection is over */
} gl_frame_type;

enum {
	GL_FRAME_END = 1 << 0,    /* last frame of `id` in this direction */
	GL_FRAME_STDERR = 1 << 1, /* DATA: the exec's stderr (else stdout / stdin) */
};

typedef struct gl_frame {
	uint32_t len;
	uint32_t id;
	uint8_t type; /* any value: unknown types are the reader's to skip */
	uint8_t flags;
	const uint8_t *payload; /* borrowed; len bytes */
} gl_frame;

/* Write a header into out[GL_FRAME_HDR]. */
void gl_frame_hdr(uint8_t *out, uint32_t len, uint32_t id, uint8_t type, uint8_t flags);
/* Append one whole frame. 0, -EMSGSIZE (n > GL_FRAME_MAX), or -ENOMEM. */
int gl_frame_append(gl_buf *out, uint32_t id, uint8_t type, uint8_t flags, const void *p,
		    size_t n);
/* Append a frame whose payload is j serialised compactly (borrowed). */
int gl_frame_append_json(gl_buf *out, uint32_t id, uint8_t type, uint8_t flags,
			 const json_t *j);

/* Incremental reader over a byte stream. */
typedef struct gl_frame_reader {
	gl_buf in;
	size_t off;   /* start of the unread bytes in `in` */
	uint32_t max; /* largest payload accepted */
} gl_frame_reader;

void gl_frame_reader_init(gl_frame_reader *r, uint32_t max);
void gl_frame_reader_free(gl_frame_reader *r);
/* Add bytes read from the stream. 0 or -ENOMEM. */
int gl_frame_reader_feed(gl_frame_reader *r, const void *p, size_t n);
/* The next whole frame: 1 and *f (payload valid until the next feed or
 * next call), 0 when more bytes are needed, -EMSGSIZE when the header
 * announces a payload over r->max (the stream cannot be trusted further). */
int gl_frame_next(gl_frame_reader *r, gl_frame *f);
/* Bytes held that are not yet returned as frames. */
size_t gl_frame_reader_pending(const gl_frame_reader *r);

/* A frame's payload parsed as a JSON object: new reference, or NULL when
 * it is not one (with a short reason in err when err != NULL). */
json_t *gl_frame_json(const gl_frame *f, char *err, size_t errlen);

/* Build the payload of an ERROR frame: {"error": msg, "errno": e} (e > 0,
 * e.g. ENOENT). New reference. */
json_t *gl_frame_error_json(int e, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

#endif
