/* The whole devlxd face as a guest in c1 sees it (see devlxd_fuzz.h):
 * routing and redirects, config keys in the path, devices, meta-data, the
 * events stream and its WebSocket, image export with Range and
 * preconditions, and everything of the HTTP layer underneath.
 *
 * Input: byte 0 picks how the bytes are split into reads (fuzz_util.h),
 * bytes 1-2 seed the split sizes, the rest is what the guest sends on one
 * connection (then it half-closes and reads until the server hangs up).
 * The server must free the connection and everything it started for it. */
#include <stdint.h>
#include <string.h>

#include "fuzz/devlxd_fuzz.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	static char out[16];
	size_t got = 0;

	dx_init();
	if (size < 3)
		return 0;
	dx_play(data + 3, size - 3, data[0], (uint32_t)data[1] << 8 | data[2], out, sizeof(out),
		&got);
	if (got && (got < 9 || (memcmp(out, "HTTP/1.1 ", 9) && memcmp(out, "HTTP/1.0 ", 9))))
		fz_die("the server wrote something that is not a response");
	return 0;
}
