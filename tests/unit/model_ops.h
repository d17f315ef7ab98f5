/* A model on a loop for unit tests that drive it op by op: the test file
 * opens `model` on `loop`, and submit() runs one op to completion. Include
 * once per test binary (it defines file-static state). */
#ifndef GUESTLINK_TESTS_MODEL_OPS_H
#define GUESTLINK_TESTS_MODEL_OPS_H

#include <check.h>
#include <uv.h>

#include "core/model.h"

static uv_loop_t loop;
static gl_model *model;
static int pending;

static void done_cb(void *arg, int status)
{
	*(int *)arg = status;
	pending--;
}

/* Submit o and run the loop until it is applied; its status. */
static int submit(gl_op *o)
{
	int st = 1;

	pending++;
	ck_assert_int_eq(gl_model_submit(model, o, done_cb, &st), 0);
	while (pending)
		uv_run(&loop, UV_RUN_ONCE);
	return st;
}

#endif
