#include "fsd/log.h"

#include <stdarg.h>
#include <stdio.h>
#include <unistd.h>

static gl_log_level max_level = GL_LOG_INFO;

static const char *const level_names[] = {
	[GL_LOG_ERROR] = "error",
	[GL_LOG_WARNING] = "warning",
	[GL_LOG_INFO] = "info",
	[GL_LOG_DEBUG] = "debug",
};

void gl_log_set_level(gl_log_level max)
{
	max_level = max;
}

gl_log_level gl_log_get_level(void)
{
	return max_level;
}

void gl_log(gl_log_level level, const char *fmt, ...)
{
	char line[1024];
	va_list ap;
	int n, m;

	if (level > max_level)
		return;
	n = snprintf(line, sizeof(line), "guestlinkd: %s: ", level_names[level]);
	va_start(ap, fmt);
	m = vsnprintf(line + n, sizeof(line) - n - 1, fmt, ap);
	va_end(ap);
	if (m < 0)
		m = 0;
	n += m;
	if ((size_t)n > sizeof(line) - 2)
		n = sizeof(line) - 2; /* truncated; keep the newline */
	line[n++] = '\n';
	/* One write so that lines from two threads never interleave. */
	if (write(STDERR_FILENO, line, n) < 0)
		return;
}
