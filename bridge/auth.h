/* The host's ed25519 identity and the agent handshake's signature
 * (docs/control-protocol.md "Authentication"). libsodium does the
 * cryptography; this file only fixes what is signed and how keys are
 * stored.
 *
 *   signed message = "guestlink-agent-auth-v1" NUL || nonce (32 bytes)
 *                    || instance id (the HELLO's "instance" string, may be empty)
 *
 * Key files:
 *   <state-dir>/host.key  the 64-byte secret key as 128 lowercase hex digits
 *                         and "\n", mode 0600, created at first start;
 *   <state-dir>/host.pub  the 32-byte public key as 64 lowercase hex digits
 *                         and "\n", mode 0644. This file is what a guest
 *                         gets as /etc/guestlink/host.pub.
 * A public key file may also hold the key in standard base64 (44 chars);
 * surrounding whitespace is ignored. */
#ifndef GUESTLINK_BRIDGE_AUTH_H
#define GUESTLINK_BRIDGE_AUTH_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define GL_AUTH_CONTEXT "guestlink-agent-auth-v1"
#define GL_AUTH_NONCE 32u
#define GL_AUTH_PK 32u
#define GL_AUTH_SK 64u
#define GL_AUTH_SIG 64u
#define GL_AUTH_INSTANCE_MAX 255u

/* sodium_init() once; 0 or -EIO. Safe to call many times. */
int gl_auth_init(void);

/* Load <dir>/host.key (and rewrite <dir>/host.pub from it when missing or
 * different), or create both when host.key is absent. A host.key that is
 * not exactly what this file writes is refused, never overwritten.
 * 0, or -errno with a message in err. */
int gl_auth_host_keys(const char *dir, uint8_t pk[GL_AUTH_PK], uint8_t sk[GL_AUTH_SK], char *err,
		      size_t errlen);
/* Read a public key file (hex or base64). 0 or -errno (-EINVAL: not a key)
 * with a message in err. */
int gl_auth_load_pub(const char *path, uint8_t pk[GL_AUTH_PK], char *err, size_t errlen);

void gl_auth_nonce(uint8_t nonce[GL_AUTH_NONCE]); /* randombytes_buf */
/* Detached signature over the message above. instance NULL == "". */
void gl_auth_sign(const uint8_t sk[GL_AUTH_SK], const uint8_t nonce[GL_AUTH_NONCE],
		  const char *instance, uint8_t sig[GL_AUTH_SIG]);
bool gl_auth_verify(const uint8_t pk[GL_AUTH_PK], const uint8_t nonce[GL_AUTH_NONCE],
		    const char *instance, const uint8_t sig[GL_AUTH_SIG]);

/* Lowercase hex without NUL handling surprises: out must hold 2n+1. */
void gl_auth_hex(const uint8_t *p, size_t n, char *out);
/* Exactly 2n hex digits (either case) -> n bytes. 0 or -EINVAL. */
int gl_auth_unhex(const char *s, size_t slen, uint8_t *out, size_t n);

#endif
