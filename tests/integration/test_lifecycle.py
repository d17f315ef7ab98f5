"""The daemon's life: flags, start-up, clean shutdown on signals and on an
external umount, the leftover mount of a crashed daemon, restarts that keep
everything, and refusal of a store it must not touch."""

import errno
import hashlib
import os
import signal
import stat
import sqlite3
import subprocess
import time

import pytest

from glutil import (GUESTLINKD, REPO, errno_of, is_mounted, mount_entries, private_args, read_bytes,
                    write_bytes)


def tree(d):
    """Every file's content under the mount, events files excepted."""
    out = {}
    for root, dirs, files in os.walk(d.mnt):
        dirs.sort()
        for f in sorted(files):
            p = os.path.join(root, f)
            rel = os.path.relpath(p, d.mnt)
            if os.path.basename(rel) != "events":
                out[rel] = read_bytes(p)
    return out


def test_help_lists_every_flag():
    p = subprocess.run([GUESTLINKD, "--help"], capture_output=True, text=True, timeout=10)
    assert p.returncode == 0
    text = p.stdout + p.stderr
    for flag in ("--state-dir", "--mount", "--max-value-size", "--max-queue-bytes",
                 "--no-allow-other", "--debug", "--verbose", "--help", "--version"):
        assert flag in text, f"{flag} missing from --help"
    v = subprocess.run([GUESTLINKD, "-V"], capture_output=True, text=True, timeout=10)
    assert v.returncode == 0 and v.stdout.strip()


def test_bad_command_lines_fail_clearly(tmp_path):
    cases = [
        [],
        ["--mount", str(tmp_path / "m")],
        ["--state-dir", str(tmp_path / "s")],
        ["--state-dir", str(tmp_path / "s"), "--mount", str(tmp_path / "m"), "--bogus"],
        ["--state-dir", str(tmp_path / "s"), "--mount", str(tmp_path / "m"),
         "--max-value-size", "lots"],
        ["--state-dir", str(tmp_path / "no" / "such" / "dir"), "--mount", str(tmp_path / "m")],
    ]
    for args in cases:
        p = subprocess.run([GUESTLINKD] + args, capture_output=True, text=True, timeout=10)
        assert p.returncode != 0, args
        assert p.stderr.strip(), f"no message for {args}"
        assert not is_mounted(tmp_path / "m")


def test_bare_command_line(daemon_factory):
    # The command line exactly: guestlinkd --state-dir S --mount M
    # (other tests also give each daemon a private devlxd socket).
    d = daemon_factory(bare=True)
    assert d.cmdline()[1:] == ["--state-dir", d.state, "--mount", d.mnt]
    d.mkinstance("c1")
    write_bytes(d.p("c1", "config", "user.foo"), "bar\n")
    assert read_bytes(d.p("c1", "config", "user.foo")) == b"bar\n"
    assert d.stop(signal.SIGTERM) == 0
    assert not is_mounted(d.mnt)


def test_devlxd_socket_directory_is_created(daemon_factory, tmp_path):
    # `--devlxd-socket /run/guestlink/devlxd.sock` on a fresh machine: the
    # socket's missing directories are made, the socket is mode 0666.
    sock = str(tmp_path / "run" / "guestlink" / "devlxd.sock")
    d = daemon_factory(args=["--devlxd-socket", sock])
    st = os.stat(sock)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o666
    assert d.stop(signal.SIGTERM) == 0


def test_sigterm_unmounts_and_exits_0(gl):
    gl.mkinstance("c1")
    assert gl.stop(signal.SIGTERM) == 0
    assert not is_mounted(gl.mnt)
    assert os.listdir(gl.mnt) == []


def test_sigint_unmounts_and_exits_0(gl):
    assert gl.stop(signal.SIGINT) == 0
    assert not is_mounted(gl.mnt)


def test_sigterm_with_open_files_and_parked_reads(c1):
    write_bytes(c1.p("c1", "config", "user.foo"), "bar")
    fd = os.open(c1.p("c1", "config", "user.foo"), os.O_RDONLY)
    ev = subprocess.Popen(["cat", c1.p("c1", "events")], stdout=subprocess.PIPE)
    time.sleep(0.2)
    assert c1.stop() == 0
    assert ev.wait(3) == 0  # parked read answered with EOF
    ev.stdout.close()
    assert not is_mounted(c1.mnt)
    # The connection is gone: the last close of a descriptor gets ENOTCONN.
    assert errno_of(os.close, fd) in (0, errno.ENOTCONN)


def test_external_umount_exits_0(gl):
    subprocess.run(["umount", gl.mnt], check=True)
    assert gl.wait_exit(5) == 0
    assert not is_mounted(gl.mnt)


def test_leftover_mount_is_cleaned_at_start(c1):
    write_bytes(c1.p("c1", "config", "user.foo"), "bar")
    c1.kill9()
    assert is_mounted(c1.mnt)
    assert errno_of(os.stat, c1.mnt) == errno.ENOTCONN
    c1.start()
    assert len(mount_entries(c1.mnt)) == 1, mount_entries(c1.mnt)
    assert read_bytes(c1.p("c1", "config", "user.foo")) == b"bar\n"
    # And the next stop is clean.
    assert c1.stop() == 0
    assert not is_mounted(c1.mnt)


def test_missing_mount_point_is_created(daemon_factory, tmp_path):
    d = daemon_factory(start=False, mnt=tmp_path / "not" / "yet")
    os.makedirs(os.path.dirname(d.mnt))
    d.start()
    assert os.path.ismount(d.mnt)


def test_restart_keeps_everything(c1):
    c1.sh("echo bar > c1/config/user.foo; printf 'a\\nb\\n\\n' > c1/config/user.ml; "
          "echo '#cloud-config' > c1/config/cloud-init.user-data; "
          "echo true > c1/config/security.devlxd; "
          "printf '{\"type\":\"disk\",\"path\":\"/mnt\"}' > c1/devices/share; "
          "echo Started > c1/state; echo $$ > c1/init-pid; echo /lxc/c1 > c1/cgroup; "
          "mkdir v1; echo virtual-machine > v1/type; echo 77 > v1/vsock-cid; "
          "echo /run/v1.sock > v1/vsock-uds; printf 'foo: 1' > v1/config/user.meta-data")
    write_bytes(c1.p("c1", "config", "user.bin"), bytes(range(1, 256)))
    before = tree(c1)
    mtime = os.stat(c1.p("c1", "config", "user.foo")).st_mtime_ns
    c1.restart()
    assert tree(c1) == before
    assert os.stat(c1.p("c1", "config", "user.foo")).st_mtime_ns == mtime
    # After kill -9 as well.
    c1.kill9()
    c1.start()
    assert tree(c1) == before


def test_removed_instance_stays_removed(c1):
    os.mkdir(c1.p("c2"))
    write_bytes(c1.p("c2", "config", "user.x"), "1")
    os.rmdir(c1.p("c2"))
    c1.restart()
    assert sorted(os.listdir(c1.mnt)) == ["c1", "events"]


def sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def refused(daemon_factory, tmp_path, db_bytes=None, make_db=None):
    state = tmp_path / "state"
    state.mkdir()
    db = state / "guestlink.db"
    if db_bytes is not None:
        db.write_bytes(db_bytes)
    if make_db:
        make_db(str(db))
    digest = sha(db)
    d = daemon_factory(start=False, state=state)
    d.start(wait=False)
    rc = d.wait_exit(10)
    assert rc not in (0, None) and rc > 0, rc
    assert not is_mounted(d.mnt)
    assert sha(db) == digest, "the refused database was modified"
    log = d.log()
    assert "guestlink.db" in log, log
    return log


def test_garbage_database_is_refused(daemon_factory, tmp_path):
    log = refused(daemon_factory, tmp_path, db_bytes=b"this is not a database\n" * 300)
    assert "not a SQLite database" in log, log


def test_random_bytes_database_is_refused(daemon_factory, tmp_path):
    import random
    rnd = random.Random(3)
    refused(daemon_factory, tmp_path, db_bytes=bytes(rnd.getrandbits(8) for _ in range(8192)))


def test_foreign_database_is_refused(daemon_factory, tmp_path):
    def make(path):
        db = sqlite3.connect(path)
        db.execute("PRAGMA application_id = 1234")
        db.execute("CREATE TABLE t(x)")
        db.execute("INSERT INTO t VALUES (42)")
        db.commit()
        db.close()
    log = refused(daemon_factory, tmp_path, make_db=make)
    assert "another application" in log, log


def test_second_daemon_on_same_state_dir_is_refused(daemon_factory):
    first = daemon_factory("first")
    first.mkinstance("c1")
    second = daemon_factory("second", start=False, state=first.state)
    second.start(wait=False)
    rc = second.wait_exit(10)
    assert rc > 0
    assert "in use" in second.log(), second.log()
    assert not is_mounted(second.mnt)
    write_bytes(first.p("c1", "config", "user.still"), "works")
    assert read_bytes(first.p("c1", "config", "user.still")) == b"works\n"


def test_run_demo_script(tmp_path):
    env = dict(os.environ, BUILD=os.path.dirname(GUESTLINKD), STATE=str(tmp_path / "state"),
               MNT=str(tmp_path / "mnt"), GUESTLINKD_ARGS=" ".join(private_args(str(tmp_path))))
    p = subprocess.Popen([os.path.join(REPO, "tools", "run-demo.sh")], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    out = b""
    deadline = time.monotonic() + 15
    try:
        while b"Ctrl-C" not in out:
            assert time.monotonic() < deadline, out
            line = p.stdout.readline()
            assert line, f"run-demo.sh ended early: {out.decode()}"
            out += line
        mnt = tmp_path / "mnt"
        assert read_bytes(str(mnt / "demo" / "config" / "user.greeting")) == b"hello\n"
        # Ctrl-C in a terminal: SIGINT to the whole foreground process group.
        os.killpg(p.pid, signal.SIGINT)
        rest, _ = p.communicate(timeout=15)
        assert p.returncode == 0, (out + rest).decode()
        assert not is_mounted(mnt)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        if is_mounted(tmp_path / "mnt"):
            subprocess.run(["umount", "-l", str(tmp_path / "mnt")])
    # A second run finds the demo instance and keeps it.
    p = subprocess.Popen([os.path.join(REPO, "tools", "run-demo.sh")], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        out = b""
        while b"Ctrl-C" not in out:
            line = p.stdout.readline()
            assert line, out
            out += line
        write_bytes(str(tmp_path / "mnt" / "demo" / "config" / "user.greeting"), "changed")
        os.killpg(p.pid, signal.SIGTERM)
        p.communicate(timeout=15)
        assert p.returncode == 0
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        if is_mounted(tmp_path / "mnt"):
            subprocess.run(["umount", "-l", str(tmp_path / "mnt")])


def test_kill9_while_clients_wait_is_recovered(c1):
    """kill -9 while a thread of the daemon waits in the kernel for a lock of
    its own mount, held by a client that waits for the dead loop's answer:
    that process cannot finish exiting and its mount never answers. The
    next daemon aborts the stuck connection: it comes up, the old process
    ends, the client gets an error instead of waiting forever, and every
    acknowledged write is there. Kills land at random; the case is retried
    until one kill leaves the daemon stuck (about one in three here)."""
    cfg = c1.p("c1", "config")
    script = (f"cd {cfg} && while :; do echo v > user.l$0; sed -i s/v/w/ user.l$0; "
              "rm -f user.t$0; echo 1 > user.t$0; done")
    for attempt in range(40):
        write_bytes(c1.p("c1", "config", "user.kept"), f"{attempt}\n")
        loads = [subprocess.Popen(["bash", "-c", script, str(k)], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL) for k in range(6)]
        time.sleep(0.2 + attempt % 5 * 0.1)
        exited = c1.kill9(timeout=3)
        if exited:
            for p in loads:
                p.kill()
                p.wait(10)
            c1.start()
            continue
        # Stuck: the load is still blocked on the dead mount. Start anew.
        c1.start()  # reaps the stuck process, or fails the test
        for p in loads:
            p.kill()
            p.wait(10)  # no client is left waiting on the old connection
        assert read_bytes(c1.p("c1", "config", "user.kept")) == f"{attempt}\n".encode()
        assert "aborting that mount's FUSE connection" in c1.log()
        return
    pytest.skip("no kill -9 in 40 landed while the daemon's notifier waited on a lock")
