"""The events files: LXD's exact event lines, in order, blocking reads that
signals end at once, O_NONBLOCK, poll(), slow readers dropped, EOF when
the instance goes away, and what survives a restart."""

import errno
import os
import select
import signal
import sqlite3
import subprocess
import threading
import time

import pytest

from glutil import (EventReader, config_event, device_event, errno_of, lifecycle_event,
                    parse_event, ts_ns, poll_readable, read_bytes, shape, write_bytes)


def until_marker(reader, marker_key, timeout=10.0):
    """Read lines up to and including the config event for `marker_key`."""
    out = []
    deadline = time.monotonic() + timeout
    while True:
        line = reader.next(max(0.01, deadline - time.monotonic()))
        assert line is not None, f"EOF before the marker; got {out!r}"
        ev = parse_event(line)
        out.append(ev)
        if ev["type"] == "config" and ev["metadata"]["key"] == marker_key:
            return out


def without_key_updates(events):
    """Drop lifecycle instance-updated lines about non-user keys: what a
    change of cloud-init.* or security.* may produce besides nothing."""
    return [e for e in events
            if not (e["type"] == "lifecycle" and e["metadata"]["action"] == "instance-updated"
                    and "key" in e["metadata"].get("context", {}))]


def test_instance_event_stream(c1):
    r = EventReader(c1.p("c1", "events"))
    sh = c1.sh
    sh("echo bar > c1/config/user.foo")
    sh("echo baz > c1/config/user.foo")
    sh("echo baz > c1/config/user.foo")  # unchanged: no event
    sh("echo '#cloud-config' > c1/config/cloud-init.user-data")
    sh("echo true > c1/config/security.devlxd")
    sh("echo 1 > c1/config/limits.cpu")
    sh("printf '{\"type\":\"disk\",\"path\":\"/mnt\"}' > c1/devices/share")
    sh("printf '{\"type\":\"disk\",\"path\":\"/mnt\"}' > c1/devices/share")  # unchanged
    sh("printf '{\"type\":\"disk\",\"path\":\"/srv\",\"readonly\":\"true\"}' > c1/devices/share")
    sh("rm c1/devices/share")
    sh("rm c1/config/user.foo")
    sh("echo > c1/config/user.empty")  # "" -> "" compares equal: no event
    sh("echo Started > c1/state")
    sh("echo end > c1/config/user.end")
    got = [shape(e) for e in without_key_updates(until_marker(r, "user.end"))]
    assert got == [
        config_event("user.foo", "", "bar"),
        config_event("user.foo", "bar", "baz"),
        device_event("added", "share", {"path": "/mnt", "type": "disk"}),
        device_event("removed", "share", {"path": "/mnt", "type": "disk"}),
        device_event("added", "share", {"path": "/srv", "readonly": "true", "type": "disk"}),
        device_event("removed", "share", {"path": "/srv", "readonly": "true", "type": "disk"}),
        config_event("user.foo", "baz", ""),
        lifecycle_event("instance-started", "c1"),
        config_event("user.end", "", "end"),
    ]
    r.quiet(0.2)
    r.close()


def test_global_event_stream(gl):
    r = EventReader(gl.p("events"))
    gl.sh("mkdir c1 && echo bar > c1/config/user.foo && mkdir c2 && echo 1 > c2/config/user.n && "
          "echo Started > c1/state && rmdir c2")
    lines = r.take(6)
    got = []
    for line, inst in zip(lines, ["c1", "c1", "c2", "c2", "c1", "c2"]):
        got.append(shape(parse_event(line, instance=inst)))
    assert got == [
        lifecycle_event("instance-created", "c1", {"type": "container"}),
        config_event("user.foo", "", "bar"),
        lifecycle_event("instance-created", "c2", {"type": "container"}),
        config_event("user.n", "", "1"),
        lifecycle_event("instance-started", "c1"),
        lifecycle_event("instance-deleted", "c2"),
    ]
    r.quiet(0.2)
    r.close()


def test_event_strings_use_go_escaping(c1):
    r = EventReader(c1.p("c1", "events"))
    value = "<a href='x'>&amp;</a>\n\ttab \x01\x7f \u00e9 \u2028 \"q\" \\ /"
    write_bytes(c1.p("c1", "config", "user.esc"), value.encode())
    ev = parse_event(r.next())  # parse_event compares with Go's encoding byte for byte
    assert ev["metadata"] == {"key": "user.esc", "old_value": "", "value": value}
    raw = r.lines[-1]
    assert b"\\u003ca href='x'\\u003e\\u0026amp;\\u003c/a\\u003e\\n\\ttab \\u0001\x7f" in raw
    assert b"\\u2028" in raw
    r.close()


def test_every_reader_gets_every_event(c1):
    readers = [EventReader(c1.p("c1", "events")) for _ in range(3)]
    glob = EventReader(c1.p("events"))
    for i in range(20):
        write_bytes(c1.p("c1", "config", "user.k"), str(i))
    for r in readers:
        vals = [parse_event(x)["metadata"]["value"] for x in r.take(20)]
        assert vals == [str(i) for i in range(20)]
    assert [parse_event(x, "c1")["metadata"]["value"] for x in glob.take(20)] == \
        [str(i) for i in range(20)]
    # A reader opened now sees only what happens from now on.
    late = EventReader(c1.p("c1", "events"))
    late.quiet(0.3)
    write_bytes(c1.p("c1", "config", "user.k"), "late")
    assert parse_event(late.next())["metadata"]["value"] == "late"
    for r in readers + [glob, late]:
        r.close()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL, signal.SIGTERM])
def test_blocked_reader_ends_at_once_on_signal(c1, sig):
    for path in (c1.p("c1", "events"), c1.p("events")):
        r = EventReader(path)
        time.sleep(0.2)  # let cat park its read in the daemon
        t0 = time.monotonic()
        r.proc.send_signal(sig)
        try:
            rc = r.proc.wait(2)
        except subprocess.TimeoutExpired:
            pytest.fail(f"cat {path} still blocked 2 s after signal {sig!r}")
        assert rc == -sig
        assert time.monotonic() - t0 < 2
        r.close()
    # The daemon is fine afterwards.
    write_bytes(c1.p("c1", "config", "user.after"), "ok")
    assert read_bytes(c1.p("c1", "config", "user.after")) == b"ok\n"


def test_ctrl_c_of_shell_pipeline(c1):
    # What Ctrl-C does in a terminal: SIGINT to the whole process group.
    p = subprocess.Popen(["sh", "-c", "cat c1/events | cat > /dev/null"], cwd=c1.mnt,
                         start_new_session=True)
    time.sleep(0.3)
    os.killpg(p.pid, signal.SIGINT)
    p.wait(2)


def test_nonblocking_read(c1):
    fd = os.open(c1.p("c1", "events"), os.O_RDONLY | os.O_NONBLOCK)
    try:
        assert errno_of(os.read, fd, 4096) == errno.EAGAIN
        write_bytes(c1.p("c1", "config", "user.nb"), "1")
        deadline = time.monotonic() + 5
        while True:
            try:
                data = os.read(fd, 4096)
                break
            except BlockingIOError:
                assert time.monotonic() < deadline, "event never became readable"
                time.sleep(0.01)
        assert parse_event(data)["metadata"]["key"] == "user.nb"
        assert errno_of(os.read, fd, 4096) == errno.EAGAIN
    finally:
        os.close(fd)


def test_poll_and_select_wake_on_change(c1):
    fd = os.open(c1.p("c1", "events"), os.O_RDONLY)
    try:
        assert poll_readable(fd, 0.2) == []
        t = threading.Timer(0.3, write_bytes, (c1.p("c1", "config", "user.p"), "1"))
        t.start()
        t0 = time.monotonic()
        ready = poll_readable(fd, 5)
        t.join()
        assert ready and ready[0][1] & select.POLLIN, ready
        assert time.monotonic() - t0 < 3
        assert parse_event(os.read(fd, 65536))["metadata"]["value"] == "1"
        # select() goes through the same poll operation.
        t = threading.Timer(0.3, write_bytes, (c1.p("c1", "config", "user.p"), "2"))
        t.start()
        rl, _, _ = select.select([fd], [], [], 5)
        t.join()
        assert rl == [fd]
        assert parse_event(os.read(fd, 65536))["metadata"]["value"] == "2"
        assert poll_readable(fd, 0.1) == []
    finally:
        os.close(fd)


def test_poll_on_regular_files(c1):
    write_bytes(c1.p("c1", "config", "user.foo"), "bar")
    fd = os.open(c1.p("c1", "config", "user.foo"), os.O_RDONLY)
    try:
        p = select.poll()
        p.register(fd, select.POLLIN | select.POLLOUT)
        (got_fd, ev), = p.poll(1000)
        assert ev & select.POLLIN
    finally:
        os.close(fd)


def test_small_reads_split_lines(c1):
    fd = os.open(c1.p("c1", "events"), os.O_RDONLY)
    try:
        write_bytes(c1.p("c1", "config", "user.long"), "v" * 300)
        write_bytes(c1.p("c1", "config", "user.long"), "w" * 300)
        data = b""
        while data.count(b"\n") < 2:
            chunk = os.read(fd, 7)
            assert 0 < len(chunk) <= 7
            data += chunk
        l1, l2, rest = data.split(b"\n", 2)
        assert rest == b""
        assert parse_event(l1 + b"\n")["metadata"]["value"] == "v" * 300
        assert parse_event(l2 + b"\n")["metadata"]["old_value"] == "v" * 300
        # A big read returns whole lines only.
        for i in range(5):
            write_bytes(c1.p("c1", "config", "user.k"), str(i))
        time.sleep(0.2)
        data = os.read(fd, 1 << 20)
        assert data.endswith(b"\n")
        assert [parse_event(x + b"\n")["metadata"]["value"] for x in data.split(b"\n")[:-1]] == \
            [str(i) for i in range(5)][:data.count(b"\n")]
    finally:
        os.close(fd)


def test_head_reads_lines_and_exits(c1):
    p = subprocess.Popen(["head", "-n", "2", c1.p("c1", "events")], stdout=subprocess.PIPE)
    time.sleep(0.3)
    c1.sh("echo 1 > c1/config/user.a; echo 2 > c1/config/user.b; echo 3 > c1/config/user.c")
    out, _ = p.communicate(timeout=5)
    lines = out.splitlines(keepends=True)
    assert [parse_event(x)["metadata"]["key"] for x in lines] == ["user.a", "user.b"]


def test_reader_ends_when_instance_is_removed(c1):
    r = EventReader(c1.p("c1", "events"))
    time.sleep(0.1)
    os.rmdir(c1.p("c1"))
    t0 = time.monotonic()
    lines = []
    while True:
        line = r.next(5)
        if line is None:
            break
        lines.append(parse_event(line))
    assert r.proc.wait(5) == 0
    assert time.monotonic() - t0 < 3
    assert [shape(e) for e in lines] == [lifecycle_event("instance-deleted", "c1")]
    r.close()


def test_slow_reader_dropped_normal_reader_keeps_up(c1):
    n_writers, per_writer = 8, 1250  # 10,000 changes of ~1 KB event lines
    for t in range(n_writers):
        write_bytes(c1.p("c1", "config", f"user.w{t}"), "start")
    write_bytes(c1.p("c1", "config", "user.probe"), "probe")
    slow = os.open(c1.p("c1", "events"), os.O_RDONLY)  # never read during the flood
    normal = EventReader(c1.p("c1", "events"))
    stop = threading.Event()
    latencies = []
    errors = []

    def writer(t):
        try:
            path = c1.p("c1", "config", f"user.w{t}")
            for i in range(per_writer):
                write_bytes(path, "%06d" % i + "x" * 400)
        except Exception as e:  # reported below
            errors.append(e)

    def prober():
        while not stop.is_set():
            t0 = time.monotonic()
            os.stat(c1.p("c1", "config", "user.probe"))
            assert read_bytes(c1.p("c1", "config", "user.probe")) == b"probe\n"
            latencies.append(time.monotonic() - t0)
            time.sleep(0.05)

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(n_writers)]
    probe = threading.Thread(target=prober)
    probe.start()
    for th in threads:
        th.start()
    seen = {}
    count = 0
    for _ in range(n_writers * per_writer):
        ev = parse_event(normal.next(60))
        k = ev["metadata"]["key"]
        i = int(ev["metadata"]["value"][:6])
        assert i == seen.get(k, -1) + 1, f"{k}: event {i} after {seen.get(k)}"
        seen[k] = i
        count += 1
        normal.lines.clear()  # keep memory flat
    for th in threads:
        th.join()
    stop.set()
    probe.join()
    assert not errors, errors
    assert count == n_writers * per_writer
    assert seen == {f"user.w{t}": per_writer - 1 for t in range(n_writers)}
    normal.quiet(0.2)
    try:
        assert errno_of(os.read, slow, 65536) == errno.ENOBUFS
        assert errno_of(os.read, slow, 65536) == errno.ENOBUFS
    finally:
        os.close(slow)
    assert max(latencies) < 2.0, f"daemon stalled {max(latencies):.2f}s during the flood"
    normal.close()


def test_max_queue_bytes_flag(daemon_factory):
    d = daemon_factory(args=["--max-queue-bytes", "8K"])
    d.mkinstance("c1")
    slow = os.open(d.p("c1", "events"), os.O_RDONLY)
    normal = EventReader(d.p("c1", "events"))
    try:
        for i in range(20):  # ~20 x 1 KB lines: more than 8 KiB
            write_bytes(d.p("c1", "config", "user.k"), "%03d" % i + "v" * 500)
        assert len(normal.take(20)) == 20
        assert errno_of(os.read, slow, 65536) == errno.ENOBUFS
    finally:
        os.close(slow)
        normal.close()


def sqlite_seqs(state_dir, instance):
    db = sqlite3.connect(f"file:{state_dir}/guestlink.db?mode=ro", uri=True)
    try:
        return [r[0] for r in db.execute("SELECT seq FROM events WHERE instance = ? ORDER BY seq",
                                         (instance,))]
    except sqlite3.Error as e:
        pytest.skip(f"store schema has no events(instance, seq) table: {e}")
    finally:
        db.close()


def test_events_order_and_seq_across_restart(c1):
    r = EventReader(c1.p("c1", "events"))
    g = EventReader(c1.p("events"))
    write_bytes(c1.p("c1", "config", "user.a"), "1")
    before = parse_event(r.next())
    parse_event(g.next(), "c1")
    # SIGTERM answers parked reads with EOF. Let both readers park first: a
    # read that arrives after the unmount gets ENOTCONN instead.
    time.sleep(0.3)
    rc = c1.stop()
    assert rc == 0
    assert r.wait_eof(3) == 0
    assert g.wait_eof(3) == 0
    seqs1 = sqlite_seqs(c1.state, "c1")
    c1.start()
    r2 = EventReader(c1.p("c1", "events"))
    r2.quiet(0.3)  # nothing replayed
    write_bytes(c1.p("c1", "config", "user.a"), "2")
    write_bytes(c1.p("c1", "config", "user.b"), "3")
    e1, e2 = (parse_event(x) for x in r2.take(2))
    assert shape(e1) == config_event("user.a", "1", "2")
    assert shape(e2) == config_event("user.b", "", "3")
    assert ts_ns(e1["timestamp"]) > ts_ns(before["timestamp"])
    assert ts_ns(e2["timestamp"]) >= ts_ns(e1["timestamp"])
    c1.stop()
    seqs2 = sqlite_seqs(c1.state, "c1")
    assert seqs2[:len(seqs1)] == seqs1
    assert seqs2 == list(range(seqs2[0], seqs2[0] + len(seqs2))), seqs2
    assert len(seqs2) == len(seqs1) + 2
    r2.wait_eof(3)
    c1.start()
    for x in (r, g, r2):
        x.close()
