"""pytest fixtures: a real guestlinkd on a temporary state directory and
mount point, torn down by a finalizer that always runs (SIGTERM, wait,
`umount -l` if still mounted, no child process left behind).

GUESTLINKD (environment) names the daemon binary; default build/guestlinkd.
GL_TEST_TIMEOUT bounds each test (seconds, default 90)."""

import ctypes
import os
import shutil
import signal
import subprocess

import pytest

import glutil
from glutil import Guestlinkd

TEST_TIMEOUT = int(os.environ.get("GL_TEST_TIMEOUT", "90"))

# Orphaned grandchildren (a `cat` started by a shell in the background) are
# re-parented to us, so the left-behind check sees them too.
PR_SET_CHILD_SUBREAPER = 36
ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)

# A shell without job control starts background commands with SIGINT
# ignored, and an ignored signal stays ignored across exec: tests that
# send SIGINT (Ctrl-C) to cat or to tools/run-demo.sh would then hang.
# Handled signals are reset to the default at exec.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_collection_modifyitems(config, items):
    reason = glutil.prerequisite_missing()
    if reason:
        for item in items:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.failed:
        for d in getattr(item, "_gl_daemons", []):
            text = d.all_logs()
            rep.sections.append((f"guestlinkd output ({d.base})", text[-30000:]))


@pytest.fixture(autouse=True)
def _timeout():
    """A hung test is killed: its daemons get SIGKILL (which aborts every
    request blocked on their mounts) and the test fails."""
    def expired(signum, frame):
        for d in list(glutil.LIVE):
            if d.running:
                d.proc.kill()
        pytest.fail(f"test did not finish within {TEST_TIMEOUT}s", pytrace=True)

    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(TEST_TIMEOUT)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def _teardown(daemons):
    problems = []
    for d in daemons:
        if d.running:
            d.proc.send_signal(signal.SIGTERM)
            try:
                rc = d.proc.wait(glutil.STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                problems.append(f"guestlinkd {d.base}: still running {glutil.STOP_TIMEOUT}s "
                                f"after SIGTERM; killed")
                d.proc.kill()
                d.proc.wait()
            else:
                if rc != 0:
                    problems.append(f"guestlinkd {d.base}: exit status {rc} on SIGTERM")
                elif glutil.is_mounted(d.mnt):
                    problems.append(f"guestlinkd {d.base}: exited 0 but {d.mnt} is still mounted")
        if d.stuck:
            problems.append(f"guestlinkd {d.base}: {len(d.stuck)} daemon(s) killed with -9 "
                            f"could not finish exiting and no new daemon freed them")
            glutil.abort_mount(d.mnt)
            for p in d.stuck:
                p.wait(glutil.STOP_TIMEOUT)
            d.stuck.clear()
        if glutil.is_mounted(d.mnt):
            subprocess.run(["umount", "-l", d.mnt], capture_output=True)
        for path in d.logs:
            with open(path, "rb") as f:
                marker = glutil.sanitizer_report(f.read().decode(errors="replace"))
            if marker:
                problems.append(f"guestlinkd {d.base}: sanitizer report ({marker}) in {path}")
        if d in glutil.LIVE:
            glutil.LIVE.remove(d)
        for path in d.scratch_dirs:
            shutil.rmtree(path, ignore_errors=True)

    # Readers of events files end with EOF when the daemon stops; anything
    # still alive a moment later is stuck or was leaked by the test.
    problems += glutil.kill_leftover_children(3.0)
    return problems


@pytest.fixture
def daemon_factory(request, tmp_path):
    """make(name="gl", args=(), start=True, state=None, mnt=None, bare=False)
    -> Guestlinkd (bare: no options but --state-dir and --mount).
    Every daemon made is stopped and checked at the end of the test."""
    daemons = []
    request.node._gl_daemons = daemons

    def make(name="gl", args=(), start=True, state=None, mnt=None, bare=False):
        d = Guestlinkd(tmp_path / name, args=args, state=state, mnt=mnt, bare=bare)
        daemons.append(d)
        if start:
            d.start()
        return d

    yield make
    problems = _teardown(daemons)
    if problems:
        pytest.fail("teardown:\n  " + "\n  ".join(problems), pytrace=False)


@pytest.fixture
def gl(daemon_factory):
    """A running guestlinkd with an empty tree."""
    return daemon_factory()


@pytest.fixture
def c1(gl):
    """A running guestlinkd with one container instance, c1."""
    gl.mkinstance("c1")
    return gl
