/* bridge/agentlink.c: the host's side of the agent handshake, against a
 * fake agent written here (a gl_fconn on the other end of a socketpair, or
 * behind a fake hybrid-vsock VMM socket). */
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include <sodium.h>

#include "bridge/agentlink.h"
#include "tests/unit/unit.h"

enum agent_mode {
	AG_GOOD,
	AG_SILENT,
	AG_REQUEST_FIRST,
	AG_CLOSE_AFTER_AUTH,
	AG_OVERSIZE_HELLO,
	AG_AUTH_OK_FIRST,
	AG_BAD_NONCE,
	AG_UNKNOWN_FIRST,
	AG_ERROR_AFTER_AUTH,
};

static struct {
	uv_loop_t loop;
	uv_timer_t tick;
	uint8_t pk[GL_AUTH_PK], sk[GL_AUTH_SK];
	uint8_t agent_pk[GL_AUTH_PK]; /* the key the fake agent trusts */
	/* fake agent */
	enum agent_mode mode;
	const char *agent_instance;
	gl_fconn *ag;
	uint8_t nonce[GL_AUTH_NONCE];
	int ag_auths;       /* AUTH frames received */
	int ag_good_auths;  /* ... whose signature verified */
	int ag_frames_after; /* frames after AUTH_OK */
	uint32_t ag_last_id;
	uint8_t ag_last_type;
	int ag_closed, ag_closed_err;
	bool ag_token_present;
	char ag_token[160];  /* AUTH's "devlxd_token" */
	char ag_auth_keys[160]; /* AUTH's keys, sorted, comma separated */
	/* host */
	const uint8_t *token; /* opts.devlxd_token */
	gl_agentlink *link;
	bool in_api;
	int cbs, cb_in_api, status;
	gl_fconn *hc;
	gl_agent_hello hello;
	int host_frames;
	uint32_t host_last_len;
	int host_closed, host_closed_err;
	/* fake VMM for the hybrid dial */
	int lfd;
	char *dir;
	char connect_line[64];
} F;

static uint64_t now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

static void on_tick(uv_timer_t *t)
{
}

static void setup(void)
{
	memset(&F, 0, sizeof(F));
	F.lfd = -1;
	signal(SIGPIPE, SIG_IGN);
	ck_assert_int_eq(gl_auth_init(), 0);
	crypto_sign_keypair(F.pk, F.sk);
	memcpy(F.agent_pk, F.pk, GL_AUTH_PK);
	F.agent_instance = "vm1";
	ck_assert_int_eq(uv_loop_init(&F.loop), 0);
	uv_timer_init(&F.loop, &F.tick);
	uv_timer_start(&F.tick, on_tick, 2, 2);
	uv_unref((uv_handle_t *)&F.tick);
}

#define RUN_UNTIL(cond, ms)                                                    \
	do {                                                                    \
		uint64_t end_ = now_ms() + (ms);                                \
		while (!(cond) && now_ms() < end_) {                            \
			uv_run(&F.loop, UV_RUN_NOWAIT);                         \
			if (!(cond))                                            \
				usleep(200);                                    \
		}                                                               \
	} while (0)

static void teardown(void)
{
	if (F.hc)
		gl_fconn_close(F.hc);
	if (F.ag)
		gl_fconn_close(F.ag);
	RUN_UNTIL(!F.hc && !F.ag, 3000);
	uv_close((uv_handle_t *)&F.tick, NULL);
	uv_run(&F.loop, UV_RUN_DEFAULT);
	ck_assert_int_eq(uv_loop_close(&F.loop), 0);
	if (F.lfd >= 0)
		close(F.lfd);
	if (F.dir) {
		unit_rmrf(F.dir);
		free(F.dir);
	}
}

/* ---- the fake agent ------------------------------------------------------- */

static void ag_send_json(uint8_t type, json_t *j)
{
	ck_assert_ptr_nonnull(j);
	ck_assert_int_eq(gl_fconn_send_json(F.ag, 0, type, 0, j), 0);
	json_decref(j);
}

static json_t *hello_json(void)
{
	char hex[2 * GL_AUTH_NONCE + 1];

	gl_auth_nonce(F.nonce);
	gl_auth_hex(F.nonce, GL_AUTH_NONCE, hex);
	if (F.mode == AG_BAD_NONCE)
		hex[10] = 'x';
	return json_pack("{s:s, s:s, s:s}", "version", "9.9.9", "nonce", hex, "instance",
			 F.agent_instance);
}

/* What a freshly connected agent says first. */
static void ag_open(void)
{
	switch (F.mode) {
	case AG_SILENT:
		break;
	case AG_REQUEST_FIRST:
		ck_assert_int_eq(gl_fconn_send(F.ag, 1, GL_FRAME_REQUEST, 0, "{\"op\":\"ping\"}",
					       13), 0);
		ag_send_json(GL_FRAME_HELLO, hello_json());
		break;
	case AG_AUTH_OK_FIRST:
		ag_send_json(GL_FRAME_AUTH_OK,
			     json_pack("{s:s, s:i}", "version", "x", "uptime_ms", 1));
		break;
	case AG_OVERSIZE_HELLO: {
		char *pad = malloc(GL_FRAME_MAX_AUTH + 1);

		memset(pad, 'p', GL_FRAME_MAX_AUTH);
		pad[GL_FRAME_MAX_AUTH] = '\0';
		ag_send_json(GL_FRAME_HELLO, json_pack("{s:s, s:s}", "version", "9", "pad", pad));
		free(pad);
		break;
	}
	case AG_UNKNOWN_FIRST:
		ck_assert_int_eq(gl_fconn_send(F.ag, 0, 42, 0, "future", 6), 0);
		/* fall through */
	default:
		ag_send_json(GL_FRAME_HELLO, hello_json());
	}
}

static void ag_frame(gl_fconn *c, const gl_frame *f, void *arg)
{
	uint8_t sig[GL_AUTH_SIG];
	const char *hex;
	json_t *j;

	if (f->type != GL_FRAME_AUTH || F.ag_auths) {
		F.ag_frames_after++;
		F.ag_last_id = f->id;
		F.ag_last_type = f->type;
		return;
	}
	F.ag_auths++;
	ck_assert_uint_eq(f->id, 0);
	j = gl_frame_json(f, NULL, 0);
	ck_assert_ptr_nonnull(j);
	ck_assert_ptr_nonnull(json_string_value(json_object_get(j, "version")));
	hex = json_string_value(json_object_get(j, "sig"));
	ck_assert_ptr_nonnull(hex);
	ck_assert_uint_eq(strlen(hex), 128);
	ck_assert_int_eq(gl_auth_unhex(hex, 128, sig, sizeof(sig)), 0);
	{
		json_t *t = json_object_get(j, "devlxd_token");
		const char *k;
		json_t *v;
		size_t n = 0;

		F.ag_token_present = t != NULL;
		if (t) {
			ck_assert(json_is_string(t));
			snprintf(F.ag_token, sizeof(F.ag_token), "%s", json_string_value(t));
		}
		/* jansson keeps insertion order: the bytes the host packed */
		json_object_foreach(j, k, v)
			n += (size_t)snprintf(F.ag_auth_keys + n, sizeof(F.ag_auth_keys) - n,
					      "%s%s", n ? "," : "", k);
	}
	json_decref(j);
	if (gl_auth_verify(F.agent_pk, F.nonce, F.agent_instance, sig))
		F.ag_good_auths++;
	else {
		/* as the real agent: close without a word */
		gl_fconn_close(c);
		return;
	}
	if (F.mode == AG_CLOSE_AFTER_AUTH) {
		gl_fconn_close(c);
		return;
	}
	if (F.mode == AG_ERROR_AFTER_AUTH) {
		gl_fconn_send_error(c, 0, EPERM, "no");
		return;
	}
	gl_fconn_set_max_payload(c, GL_FRAME_MAX);
	ag_send_json(GL_FRAME_AUTH_OK,
		     json_pack("{s:s, s:I}", "version", "9.9.9-ok", "uptime_ms",
			       (json_int_t)1234567));
	/* right behind AUTH_OK, in the same write burst: a frame over the
	 * 4 KiB handshake limit, which the authenticated link must take */
	{
		uint8_t *big = calloc(1, 100000);

		ck_assert_int_eq(gl_fconn_send(c, 77, GL_FRAME_DATA, GL_FRAME_END, big, 100000), 0);
		free(big);
	}
}

static void ag_closed(gl_fconn *c, int err, void *arg)
{
	F.ag_closed++;
	F.ag_closed_err = err;
	F.ag = NULL;
}

static const gl_fconn_cbs ag_cbs = { .frame = ag_frame, .closed = ag_closed };

static void ag_start(int fd, const void *pre, size_t npre)
{
	int err = 0;

	F.ag = gl_fconn_new(&F.loop, fd, pre, npre, NULL, &ag_cbs, NULL, &err);
	ck_assert_ptr_nonnull(F.ag);
}

/* ---- the host ------------------------------------------------------------- */

static void host_frame(gl_fconn *c, const gl_frame *f, void *arg)
{
	ck_assert_ptr_eq(arg, &F);
	F.host_frames++;
	F.host_last_len = f->len;
}

static void host_closed(gl_fconn *c, int err, void *arg)
{
	F.host_closed++;
	F.host_closed_err = err;
	F.hc = NULL;
}

static const gl_fconn_cbs host_cbs = { .frame = host_frame, .closed = host_closed };

static void on_link(void *arg, int status, gl_fconn *c, const gl_agent_hello *h)
{
	ck_assert_ptr_eq(arg, &F);
	if (F.in_api)
		F.cb_in_api++;
	F.cbs++;
	F.status = status;
	if (status == 0) {
		ck_assert_ptr_nonnull(c);
		ck_assert_ptr_nonnull(h);
		F.hello = *h;
		F.hc = c;
		gl_fconn_rebind(c, &host_cbs, &F);
	} else {
		ck_assert_ptr_null(c);
	}
	F.link = NULL;
}

static void opts(gl_agentlink_opts *o, const char *instance, uint64_t ms)
{
	memset(o, 0, sizeof(*o));
	gl_vsock_dial_opts_default(&o->dial);
	o->handshake_ms = ms;
	o->instance_id = instance;
	o->sk = F.sk;
	o->devlxd_token = F.token;
}

/* Host on one end of a socketpair, the fake agent on the other. */
static void start_pair(const char *instance, uint64_t ms)
{
	gl_agentlink_opts o;
	int sv[2];

	ck_assert_int_eq(socketpair(AF_UNIX, SOCK_STREAM, 0, sv), 0);
	opts(&o, instance, ms);
	F.in_api = true;
	ck_assert_int_eq(gl_agentlink_start_fd(&F.loop, sv[0], &o, on_link, &F, &F.link), 0);
	F.in_api = false;
	ck_assert_ptr_nonnull(F.link);
	ag_start(sv[1], NULL, 0);
	ag_open();
}

/* ---- cases ---------------------------------------------------------------- */

START_TEST(success)
{
	uint64_t t0 = now_ms();

	start_pair("vm1", 2000);
	ck_assert_int_eq(F.cbs, 0);
	RUN_UNTIL(F.cbs, 3000);
	ck_assert_int_eq(F.cbs, 1);
	ck_assert_int_eq(F.cb_in_api, 0);
	ck_assert_int_eq(F.status, 0);
	ck_assert_int_eq(F.ag_auths, 1);
	ck_assert_int_eq(F.ag_good_auths, 1);
	/* no token given: AUTH is exactly as before */
	ck_assert(!F.ag_token_present);
	ck_assert_str_eq(F.ag_auth_keys, "version,sig");
	ck_assert_str_eq(F.hello.version, "9.9.9-ok");
	ck_assert_uint_eq(F.hello.uptime_ms, 1234567);
	ck_assert_uint_le(F.hello.rtt_us, (now_ms() - t0) * 1000 + 1000);
	/* the frame right behind AUTH_OK reached the user's callbacks */
	RUN_UNTIL(F.host_frames == 1, 2000);
	ck_assert_int_eq(F.host_frames, 1);
	ck_assert_uint_eq(F.host_last_len, 100000);
	/* and the link is usable both ways, with no deadline left on it */
	ck_assert_int_eq(gl_fconn_send(F.hc, 5, GL_FRAME_REQUEST, 0, "{\"op\":\"ping\"}", 13), 0);
	RUN_UNTIL(F.ag_frames_after == 1, 2000);
	ck_assert_int_eq(F.ag_frames_after, 1);
	ck_assert_uint_eq(F.ag_last_id, 5);
	ck_assert_uint_eq(F.ag_last_type, GL_FRAME_REQUEST);
	RUN_UNTIL(0, 2200);
	ck_assert_int_eq(F.host_closed, 0);
	ck_assert_ptr_nonnull(F.hc);
}
END_TEST

START_TEST(auth_carries_devlxd_token)
{
	uint8_t tok[GL_AGENTLINK_TOKEN];

	for (size_t k = 0; k < sizeof(tok); k++)
		tok[k] = (uint8_t)(k * 7 + 0xa0);
	F.token = tok;
	start_pair("vm1", 2000);
	/* copied at start: the caller's buffer may change afterwards */
	memset(tok, 0, sizeof(tok));
	RUN_UNTIL(F.cbs, 3000);
	ck_assert_int_eq(F.status, 0);
	ck_assert_int_eq(F.ag_good_auths, 1);
	ck_assert(F.ag_token_present);
	ck_assert_str_eq(F.ag_token, "a0a7aeb5bcc3cad1d8dfe6edf4fb020910171e252c333a41484f565d646b7279");
	ck_assert_str_eq(F.ag_auth_keys, "version,sig,devlxd_token");
}
END_TEST

START_TEST(agent_without_instance_id)
{
	F.agent_instance = "";
	start_pair("vm1", 2000);
	RUN_UNTIL(F.cbs, 3000);
	ck_assert_int_eq(F.status, 0);
	ck_assert_int_eq(F.ag_good_auths, 1);
}
END_TEST

START_TEST(unknown_type_skipped)
{
	F.mode = AG_UNKNOWN_FIRST;
	start_pair("vm1", 2000);
	RUN_UNTIL(F.cbs, 3000);
	ck_assert_int_eq(F.status, 0);
}
END_TEST

START_TEST(wrong_instance_eperm)
{
	F.agent_instance = "vm2";
	start_pair("vm1", 2000);
	RUN_UNTIL(F.cbs && F.ag_closed, 3000);
	ck_assert_int_eq(F.cbs, 1);
	ck_assert_int_eq(F.status, -EPERM);
	ck_assert_int_eq(F.ag_auths, 0); /* never signed for another VM */
	ck_assert_int_eq(F.ag_closed, 1);
}
END_TEST

START_TEST(agent_closes_after_auth_eperm)
{
	F.mode = AG_CLOSE_AFTER_AUTH;
	start_pair("vm1", 2000);
	RUN_UNTIL(F.cbs, 3000);
	ck_assert_int_eq(F.cbs, 1);
	ck_assert_int_eq(F.status, -EPERM);
	ck_assert_int_eq(F.ag_good_auths, 1);
}
END_TEST

START_TEST(agent_trusts_another_key_eperm)
{
	uint8_t sk2[GL_AUTH_SK];

	crypto_sign_keypair(F.agent_pk, sk2);
	start_pair("vm1", 2000);
	RUN_UNTIL(F.cbs, 3000);
	ck_assert_int_eq(F.cbs, 1);
	ck_assert_int_eq(F.status, -EPERM);
	ck_assert_int_eq(F.ag_auths, 1);
	ck_assert_int_eq(F.ag_good_auths, 0);
}
END_TEST

START_TEST(silence_etimedout)
{
	uint64_t t0 = now_ms();

	F.mode = AG_SILENT;
	start_pair("vm1", 150);
	RUN_UNTIL(F.cbs, 3000);
	ck_assert_int_eq(F.cbs, 1);
	ck_assert_int_eq(F.status, -ETIMEDOUT);
	ck_assert_uint_ge(now_ms() - t0, 140);
	ck_assert_uint_le(now_ms() - t0, 1500);
}
END_TEST

/* Agents that break the handshake's order or content: -EPROTO, and no
 * AUTH signed where the host gave up before asking for one. */
static const struct {
	const char *what;
	int mode;
	bool never_signs;
} eproto_agents[] = {
	{"REQUEST before HELLO", AG_REQUEST_FIRST, true},
	{"AUTH_OK before HELLO", AG_AUTH_OK_FIRST, false},
	{"HELLO with a bad nonce", AG_BAD_NONCE, true},
	{"ERROR instead of AUTH_OK", AG_ERROR_AFTER_AUTH, false},
};

START_TEST(handshake_breakers_eproto)
{
	F.mode = eproto_agents[_i].mode;
	start_pair("vm1", 2000);
	RUN_UNTIL(F.cbs, 3000);
	ck_assert_msg(F.cbs == 1, "%s: %d callbacks", eproto_agents[_i].what, F.cbs);
	ck_assert_msg(F.status == -EPROTO, "%s: status %d", eproto_agents[_i].what, F.status);
	if (eproto_agents[_i].never_signs)
		ck_assert_msg(F.ag_auths == 0, "%s: %d AUTHs", eproto_agents[_i].what, F.ag_auths);
}
END_TEST

START_TEST(oversize_hello)
{
	F.mode = AG_OVERSIZE_HELLO;
	start_pair("vm1", 2000);
	RUN_UNTIL(F.cbs && F.ag_closed, 3000);
	ck_assert_int_eq(F.cbs, 1);
	ck_assert_int_eq(F.status, -EMSGSIZE);
	/* the host told the agent why: an ERROR id 0 */
	ck_assert_int_eq(F.ag_frames_after, 1);
	ck_assert_uint_eq(F.ag_last_type, GL_FRAME_ERROR);
	ck_assert_uint_eq(F.ag_last_id, 0);
}
END_TEST

START_TEST(agent_gone_before_hello)
{
	gl_agentlink_opts o;
	int sv[2];

	ck_assert_int_eq(socketpair(AF_UNIX, SOCK_STREAM, 0, sv), 0);
	opts(&o, "vm1", 2000);
	ck_assert_int_eq(gl_agentlink_start_fd(&F.loop, sv[0], &o, on_link, &F, &F.link), 0);
	close(sv[1]);
	RUN_UNTIL(F.cbs, 3000);
	ck_assert_int_eq(F.cbs, 1);
	ck_assert_int_eq(F.status, -ECONNRESET);
}
END_TEST

START_TEST(cancel_no_callback)
{
	F.mode = AG_SILENT;
	start_pair("vm1", 100);
	gl_agentlink_cancel(F.link);
	F.link = NULL;
	RUN_UNTIL(F.ag_closed, 2000);
	ck_assert_int_eq(F.ag_closed, 1);
	RUN_UNTIL(0, 200);
	ck_assert_int_eq(F.cbs, 0);
}
END_TEST

START_TEST(bad_args)
{
	gl_agentlink_opts o;
	gl_agentlink *l = NULL;
	char longid[GL_AUTH_INSTANCE_MAX + 2];
	int sv[2];

	ck_assert_int_eq(socketpair(AF_UNIX, SOCK_STREAM, 0, sv), 0);
	opts(&o, "vm1", 100);
	o.sk = NULL;
	ck_assert_int_eq(gl_agentlink_start_fd(&F.loop, sv[0], &o, on_link, &F, &l), -EINVAL);
	ck_assert_int_eq(fcntl(sv[0], F_GETFD), -1); /* taken, and closed */
	memset(longid, 'x', sizeof(longid) - 1);
	longid[sizeof(longid) - 1] = '\0';
	opts(&o, longid, 100);
	ck_assert_int_eq(gl_agentlink_start_fd(&F.loop, sv[1], &o, on_link, &F, &l), -EINVAL);
	ck_assert_int_eq(F.cbs, 0);
}
END_TEST

/* ---- through the hybrid-vsock dial (bridge/vsock.c) ----------------------- */

static void vmm_listen(const char *path)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };

	F.lfd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	ck_assert_int_ge(F.lfd, 0);
	snprintf(sa.sun_path, sizeof(sa.sun_path), "%s", path);
	ck_assert_int_eq(bind(F.lfd, (struct sockaddr *)&sa, sizeof(sa)), 0);
	ck_assert_int_eq(listen(F.lfd, 8), 0);
}

/* Accept the host's dial, read its CONNECT line, answer "OK <n>\n" with
 * the agent's HELLO in the same write (a guest's first bytes may share the
 * segment), then play the agent. */
static bool vmm_step(void)
{
	gl_buf b = GL_BUF_INIT;
	size_t n = 0;
	json_t *j;
	int fd;

	fd = accept(F.lfd, NULL, NULL);
	if (fd < 0)
		return false;
	while (n < sizeof(F.connect_line) - 1) {
		char ch;
		ssize_t r = read(fd, &ch, 1);

		if (r < 0 && errno == EAGAIN) {
			usleep(1000);
			continue;
		}
		ck_assert_int_eq(r, 1);
		F.connect_line[n++] = ch;
		if (ch == '\n')
			break;
	}
	gl_buf_adds(&b, "OK 1073741824\n");
	j = hello_json();
	ck_assert_int_eq(gl_frame_append_json(&b, 0, GL_FRAME_HELLO, 0, j), 0);
	json_decref(j);
	ck_assert_int_eq(write(fd, b.data, b.len), (ssize_t)b.len);
	gl_buf_free(&b);
	ag_start(fd, NULL, 0);
	return true;
}

START_TEST(dial_hybrid)
{
	gl_agentlink_opts o;
	gl_vsock_addr to;
	uint64_t end;
	bool accepted = false;

	F.dir = unit_tmpdir();
	memset(&to, 0, sizeof(to));
	to.kind = GL_VSOCK_HYBRID;
	to.port = GL_VSOCK_AGENT_PORT;
	snprintf(to.path, sizeof(to.path), "%s/vm.sock", F.dir);
	vmm_listen(to.path);
	opts(&o, "vm1", 2000);
	F.in_api = true;
	ck_assert_int_eq(gl_agentlink_start(&F.loop, &to, &o, on_link, &F, &F.link), 0);
	F.in_api = false;
	end = now_ms() + 3000;
	while (!F.cbs && now_ms() < end) {
		uv_run(&F.loop, UV_RUN_NOWAIT);
		if (!accepted)
			accepted = vmm_step();
		usleep(200);
	}
	ck_assert(accepted);
	ck_assert_str_eq(F.connect_line, "CONNECT 7361\n");
	ck_assert_int_eq(F.cbs, 1);
	ck_assert_int_eq(F.cb_in_api, 0);
	ck_assert_int_eq(F.status, 0);
	ck_assert_str_eq(F.hello.version, "9.9.9-ok");
	RUN_UNTIL(F.host_frames == 1, 2000);
	ck_assert_uint_eq(F.host_last_len, 100000);
}
END_TEST

START_TEST(dial_nobody_listens)
{
	gl_agentlink_opts o;
	gl_vsock_addr to;

	F.dir = unit_tmpdir();
	memset(&to, 0, sizeof(to));
	to.kind = GL_VSOCK_HYBRID;
	to.port = GL_VSOCK_AGENT_PORT;
	snprintf(to.path, sizeof(to.path), "%s/missing.sock", F.dir);
	opts(&o, "vm1", 2000);
	o.dial.deadline_ms = 0; /* one attempt */
	ck_assert_int_eq(gl_agentlink_start(&F.loop, &to, &o, on_link, &F, &F.link), 0);
	RUN_UNTIL(F.cbs, 3000);
	ck_assert_int_eq(F.cbs, 1);
	ck_assert_int_eq(F.status, -ENOENT);
}
END_TEST

START_TEST(dial_cancel)
{
	gl_agentlink_opts o;
	gl_vsock_addr to;

	F.dir = unit_tmpdir();
	memset(&to, 0, sizeof(to));
	to.kind = GL_VSOCK_HYBRID;
	to.port = GL_VSOCK_AGENT_PORT;
	snprintf(to.path, sizeof(to.path), "%s/missing.sock", F.dir);
	opts(&o, "vm1", 2000);
	ck_assert_int_eq(gl_agentlink_start(&F.loop, &to, &o, on_link, &F, &F.link), 0);
	RUN_UNTIL(0, 30);
	gl_agentlink_cancel(F.link);
	F.link = NULL;
	RUN_UNTIL(0, 200);
	ck_assert_int_eq(F.cbs, 0);
}
END_TEST

static Suite *agentlink_suite(void)
{
	Suite *s = suite_create("agentlink");
	TCase *t = tcase_create("handshake");
	TCase *d = tcase_create("dial");

	tcase_add_checked_fixture(t, setup, teardown);
	tcase_add_test(t, success);
	tcase_add_test(t, auth_carries_devlxd_token);
	tcase_add_test(t, agent_without_instance_id);
	tcase_add_test(t, unknown_type_skipped);
	tcase_add_test(t, wrong_instance_eperm);
	tcase_add_test(t, agent_closes_after_auth_eperm);
	tcase_add_test(t, agent_trusts_another_key_eperm);
	tcase_add_test(t, silence_etimedout);
	tcase_add_loop_test(t, handshake_breakers_eproto, 0,
			    (int)(sizeof(eproto_agents) / sizeof(eproto_agents[0])));
	tcase_add_test(t, oversize_hello);
	tcase_add_test(t, agent_gone_before_hello);
	tcase_add_test(t, cancel_no_callback);
	tcase_add_test(t, bad_args);
	suite_add_tcase(s, t);

	tcase_add_checked_fixture(d, setup, teardown);
	tcase_add_test(d, dial_hybrid);
	tcase_add_test(d, dial_nobody_listens);
	tcase_add_test(d, dial_cancel);
	suite_add_tcase(s, d);
	return s;
}

UNIT_MAIN(agentlink_suite)
