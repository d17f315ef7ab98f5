/* The daemon's log: one line per message on stderr,
 * "guestlinkd: <level>: message". Loop thread and notifier thread may both
 * log; each line is written with one write(2). */
#ifndef GUESTLINK_FSD_LOG_H
#define GUESTLINK_FSD_LOG_H

typedef enum gl_log_level {
	GL_LOG_ERROR,
	GL_LOG_WARNING,
	GL_LOG_INFO,
	GL_LOG_DEBUG,
} gl_log_level;

/* Messages above `max` are dropped. Default GL_LOG_INFO. */
void gl_log_set_level(gl_log_level max);
gl_log_level gl_log_get_level(void);
void gl_log(gl_log_level level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

#define log_error(...) gl_log(GL_LOG_ERROR, __VA_ARGS__)
#define log_warn(...) gl_log(GL_LOG_WARNING, __VA_ARGS__)
#define log_info(...) gl_log(GL_LOG_INFO, __VA_ARGS__)
#define log_debug(...) gl_log(GL_LOG_DEBUG, __VA_ARGS__)

#endif
