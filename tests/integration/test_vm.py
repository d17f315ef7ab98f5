"""VMs end to end (issue 5): guestlinkd + tools/vsock-mux + guestlink-agent
in its own pid, mount and network namespaces (no interface), driven with
guestlinkctl on the host and with clients on the guest's /dev/lxd/sock.

First every line of the issue's user block, then every fault of its list.
The replayed-challenge fault is test_agent.py's (helper D: it needs the
raw handshake against the agent); the devlxd conformance suite through the
agent is test_devlxd_vm_conformance.py."""

import errno
import hashlib
import json
import os
import re
import select
import signal
import socket
import subprocess
import threading
import time

import pytest

import glutil
from devlxd_util import (STREAM_HEAD, get_req, http_ok, mask_dates, mask_timestamps, open_stream,
                         open_ws, stream_lines)
from vm_util import (AGENTPROBE, AGENT_FILE_RE, DATA, END, ERROR, EX_TIMEOUT, EX_UNAVAILABLE, FRAME_MAX,
                     REQUEST, RESPONSE, STDERR, FrameConn, agent_version, frame, keygen, wait_for)
from vm_util import vm1, vmenv, vmenv_factory  # noqa: F401 (fixtures)

MIB = 1024 * 1024
UNREACHABLE = b"guestlinkctl: agent of vm1 is not reachable\n"
PING_RE = re.compile(rb"\Avm1: agent (\S+), up [0-9.]+ s, rtt [0-9.]+ ms\n\Z")


def out(p):
    return f"exit {p.returncode}\nstdout: {p.stdout[-3000:]!r}\nstderr: {p.stderr[-3000:]!r}"


def ping_ok(vm):
    p = vm.ctl("ping", vm.name, timeout=20)
    assert p.returncode == 0, out(p)
    assert PING_RE.match(p.stdout), out(p)
    return p


def daemon_ok(env):
    """The daemon still runs and answers a local request."""
    assert env.gl.running, env.gl.log()
    c = env.frames()
    try:
        c.request(1, {"op": "status", "instance": "nope-such-vm"})
        _, _, ctl = c.until_end(1, 10)
        assert ctl[-1][0] == ERROR and ctl[-1][2]["errno"] == errno.ENOENT, ctl
    finally:
        c.close()


def sha(b):
    return hashlib.sha256(b).hexdigest()


# ---- the user block -------------------------------------------------------------------------


def test_agent_file_online(vm1):
    """cat M/vm1/agent: online, the agent's version, last ping time (RFC 3339
    UTC, ms), round-trip time."""
    text = vm1.agent_file()
    m = AGENT_FILE_RE.match(text)
    assert m, text
    assert m.group(1) == agent_version(), (text, agent_version())
    ts = glutil.ts_ns(m.group(2)) / 1e9
    assert abs(ts - time.time()) < 30, text
    st = os.stat(vm1.p("agent"))
    assert st.st_size == len(text.encode()), (st.st_size, text)
    assert glutil.write_errno(vm1.p("agent"), "status: online\n")[0] in (errno.EACCES, errno.EROFS,
                                                                       errno.EPERM)
    assert vm1.agent_file() == text or AGENT_FILE_RE.match(vm1.agent_file())


def test_agent_file_offline_without_agent(vmenv):
    vm = vmenv.mkvm("vm1", agent=False)
    time.sleep(0.5)
    assert vm.agent_file() == "status: offline\n"


def test_ping(vm1):
    p = ping_ok(vm1)
    assert PING_RE.match(p.stdout).group(1).decode() == agent_version()


def test_ping_returns_the_moment_the_agent_answers(vmenv):
    """Readiness: a ping started before the agent returns 0 once it starts
    (guestlinkctl wait agent is the blocking form; ping retries within its
    deadline or fails 69 — either way it must not succeed before the
    agent runs)."""
    vm = vmenv.mkvm("vm1", agent=False)
    w = vmenv.ctl_popen("wait", "vm1", "agent", "--timeout", "30")
    time.sleep(0.5)
    assert w.poll() is None, "wait agent returned with no agent"
    vm.start_ns()
    t0 = time.monotonic()
    vm.start_agent()
    rc = w.wait(20)
    took = time.monotonic() - t0
    assert rc == 0, (rc, w.stderr.read())
    assert took < 5, f"wait agent took {took:.2f}s after the agent started"
    w.stdout.close()
    w.stderr.close()
    ping_ok(vm)


def test_exec_streams_and_exit_code(vm1):
    p = vm1.ctl("exec", "vm1", "--", "sh", "-c", "echo out; echo err >&2; exit 3")
    assert p.returncode == 3, out(p)
    assert p.stdout == b"out\n", out(p)
    assert p.stderr == b"err\n", out(p)


def test_exec_streams_as_written(vm1):
    """Output is streamed: the first line arrives long before the end."""
    pr = vm1.env.ctl_popen("exec", "vm1", "--", "sh", "-c", "echo first; sleep 2; echo second")
    t0 = time.monotonic()
    line = pr.stdout.readline()
    t1 = time.monotonic() - t0
    rest = pr.stdout.read()
    rc = pr.wait(10)
    pr.stderr.close()
    pr.stdout.close()
    assert (line, rest, rc) == (b"first\n", b"second\n", 0)
    assert t1 < 1.5, f"first line after {t1:.2f}s: not streamed"


def test_exec_stdin(vm1):
    p = vm1.ctl("exec", "vm1", "--", "cat", input=b"data")
    assert (p.returncode, p.stdout) == (0, b"data"), out(p)
    blob = os.urandom(3 * MIB + 7)
    p = vm1.ctl("exec", "vm1", "--", "sha256sum", input=blob)
    assert p.returncode == 0, out(p)
    assert p.stdout.split()[0].decode() == sha(blob), out(p)


def test_exec_runs_in_the_guest(vm1):
    """The command runs in the agent's namespaces: only lo, its own pids."""
    p = vm1.ctl("exec", "vm1", "--", "ls", "/sys/class/net")
    assert (p.returncode, p.stdout) == (0, b"lo\n"), out(p)
    p = vm1.ctl("exec", "vm1", "--", "cat", "/proc/net/dev")
    names = [x.split(b":")[0].strip() for x in p.stdout.splitlines()[2:]]
    assert names == [b"lo"], out(p)
    p = vm1.ctl("exec", "vm1", "--", "sh", "-c", "test -S /dev/lxd/sock && echo $PPID")
    assert p.returncode == 0, out(p)
    assert int(p.stdout) < 1000, out(p)  # a pid of the guest's namespace


def test_exec_env_cwd_and_signal(vm1):
    p = vm1.ctl("exec", "vm1", "--env", "A=1", "--env", "B=two words", "--cwd", "/tmp", "--",
                "sh", "-c", 'echo "$A|$B|$(pwd)"')
    assert (p.returncode, p.stdout) == (0, b"1|two words|/tmp\n"), out(p)
    p = vm1.ctl("exec", "vm1", "--", "sh", "-c", "kill -TERM $$")
    assert p.returncode == 128 + signal.SIGTERM, out(p)
    p = vm1.ctl("exec", "vm1", "--", "/nonexistent/cmd")
    assert p.returncode != 0 and b"No such file or directory" in p.stderr, out(p)


def test_exec_timeout(vm1):
    t0 = time.monotonic()
    p = vm1.ctl("exec", "vm1", "--timeout", "1", "--", "sleep", "30")
    assert p.returncode == EX_TIMEOUT, out(p)
    assert time.monotonic() - t0 < 10


def test_push_pull_round_trip(vm1, tmp_path):
    small = tmp_path / "file"
    small.write_bytes(b"hello\x00world\n")
    big = tmp_path / "big"
    data = os.urandom(20 * MIB + 13)
    big.write_bytes(data)
    guest_dir = f"/tmp/gl-vmt-{os.getpid()}"
    vm1.ns.run(["mkdir", "-p", guest_dir])
    try:
        for src, name in ((small, "small"), (big, "big")):
            p = vm1.ctl("push", "vm1", str(src), f"{guest_dir}/{name}", timeout=120)
            assert (p.returncode, p.stdout) == (0, b""), out(p)
            back = tmp_path / (name + ".back")
            p = vm1.ctl("pull", "vm1", f"{guest_dir}/{name}", str(back), timeout=120)
            assert p.returncode == 0, out(p)
            assert back.read_bytes() == src.read_bytes(), f"{name}: pulled bytes differ"
        # the guest has the bytes (its view of the file system)
        p = vm1.ctl("exec", "vm1", "--", "sha256sum", f"{guest_dir}/big")
        assert p.stdout.split()[0].decode() == sha(data), out(p)
        # --mode
        p = vm1.ctl("push", "vm1", str(small), f"{guest_dir}/m", "--mode", "0600")
        assert p.returncode == 0, out(p)
        p = vm1.ctl("stat", "vm1", f"{guest_dir}/m", "--json")
        assert p.returncode == 0, out(p)
        st = json.loads(p.stdout)
        assert st["mode"] & 0o7777 == 0o600 and st["type"] == "file" and st["size"] == 12, st
        # an empty file round trip
        empty = tmp_path / "empty"
        empty.write_bytes(b"")
        assert vm1.ctl("push", "vm1", str(empty), f"{guest_dir}/e").returncode == 0
        p = vm1.ctl("pull", "vm1", f"{guest_dir}/e", str(tmp_path / "e.back"))
        assert p.returncode == 0 and (tmp_path / "e.back").read_bytes() == b"", out(p)
        # pull of a missing file: exit 1, a clear message, no local file
        p = vm1.ctl("pull", "vm1", f"{guest_dir}/missing", str(tmp_path / "m.back"))
        assert p.returncode == 1, out(p)
        assert b"No such file or directory" in p.stderr, out(p)
        assert not (tmp_path / "m.back").exists()
    finally:
        vm1.ns.run(["rm", "-rf", guest_dir], check=False)


def test_stat(vm1):
    p = vm1.ctl("stat", "vm1", "/etc/hostname", "--json")
    assert p.returncode == 0, out(p)
    st = json.loads(p.stdout)
    host = os.lstat("/etc/hostname")  # the guest's mount namespace shares /etc
    assert st["type"] == "file", st
    assert (st["size"], st["mode"] & 0o7777, st["uid"], st["gid"]) == \
        (host.st_size, host.st_mode & 0o7777, host.st_uid, host.st_gid), st
    assert st["mtime_ns"] == host.st_mtime_ns, st
    p = vm1.ctl("stat", "vm1", "/etc/hostname")
    assert p.returncode == 0 and b"file" in p.stdout and str(host.st_size).encode() in p.stdout, \
        out(p)
    p = vm1.ctl("stat", "vm1", "/nope")
    assert p.returncode == 1, out(p)
    assert p.stderr == b"guestlinkctl: stat /nope: No such file or directory\n", out(p)
    p = vm1.ctl("stat", "vm1", "/etc", "--json")
    assert json.loads(p.stdout)["type"] == "dir", out(p)


def test_ls(vm1, tmp_path):
    d = tmp_path / "lsdir"
    d.mkdir()
    names = ["b", "a", "Z", "dir", "with space"] + [f"n{i:04d}" for i in range(3000)]
    for n in names:
        if n == "dir":
            (d / n).mkdir()
        else:
            (d / n).write_bytes(b"x" * len(n))
    p = vm1.ctl("ls", "vm1", str(d))
    assert p.returncode == 0, out(p)
    assert p.stdout.decode().split("\n")[:-1] == sorted(names, key=lambda s: s.encode()), \
        out(p)
    p = vm1.ctl("ls", "vm1", str(d), "--json")
    assert p.returncode == 0, out(p)
    js = json.loads(p.stdout)
    entries = js["entries"] if isinstance(js, dict) else js
    by = {e["name"]: e for e in entries}
    assert set(by) == set(names)
    assert by["dir"]["type"] == "dir" and by["with space"]["size"] == 10, (by["dir"], by["with space"])
    p = vm1.ctl("ls", "vm1", "/etc")
    assert p.returncode == 0, out(p)
    want = sorted(os.listdir("/etc"), key=lambda s: s.encode())
    assert p.stdout.decode().split("\n")[:-1] == want, out(p)


def patch_ready(vm):
    rc, body = vm.ns.curl("http://lxd/1.0", "-X", "PATCH", "-d", '{"state":"Ready"}')
    assert rc == 0 and body == b"", (rc, body)


def test_wait_ready(vm1):
    env = vm1.env
    p = env.ctl("wait", "vm1", "ready", "--timeout", "1")
    assert p.returncode == EX_TIMEOUT, out(p)
    w = env.ctl_popen("wait", "vm1", "ready", "--timeout", "30")
    time.sleep(0.5)
    assert w.poll() is None, "wait ready returned before the guest was Ready"
    patch_ready(vm1)
    rc = w.wait(10)
    assert rc == 0, (rc, w.stderr.read())
    w.stdout.close()
    w.stderr.close()
    assert env.attr("vm1", "state") == b"Ready\n"
    rc, body = vm1.ns.curl("http://lxd/1.0")
    assert body == (b'{"state":"Ready","api_version":"1.0","instance_type":"virtual-machine",'
                    b'"location":"none"}\n'), body
    # already so: at once
    t0 = time.monotonic()
    assert env.ctl("wait", "vm1", "ready").returncode == 0
    assert time.monotonic() - t0 < 2


def test_wait_agent(vm1):
    t0 = time.monotonic()
    p = vm1.ctl("wait", "vm1", "agent", "--timeout", "10")
    assert p.returncode == 0, out(p)
    assert time.monotonic() - t0 < 2
    vm1.kill_agent()
    vm1.wait_offline()
    p = vm1.ctl("wait", "vm1", "agent", "--timeout", "1")
    assert p.returncode == EX_TIMEOUT, out(p)


def test_devlxd_same_answers_as_a_container(vm1):
    """The guest's /dev/lxd/sock answers what a container's does (the
    capture-by-capture replay is test_devlxd_vm_conformance.py)."""
    env = vm1.env
    env.set("vm1", "user.meta-data", "foo: meta")
    env.device("vm1", "eth0", {"type": "nic", "name": "eth0"})
    rc, body = vm1.ns.curl("http://lxd/1.0/config/user.foo")
    assert (rc, body) == (0, b"bar")
    rc, body = vm1.ns.curl("http://lxd/1.0/config")
    assert rc == 0 and sorted(json.loads(body)) == ["/1.0/config/user.foo",
                                                    "/1.0/config/user.meta-data"], body
    rc, body = vm1.ns.curl("http://lxd/1.0/devices")
    assert body == b'{"eth0":{"name":"eth0","type":"nic"}}\n', body
    rc, body = vm1.ns.curl("http://lxd/1.0")
    assert body == (b'{"state":"","api_version":"1.0","instance_type":"virtual-machine",'
                    b'"location":"none"}\n'), body
    rc, body = vm1.ns.curl("http://lxd/1.0/config/user.missing")
    assert body == b"not found\n", body
    # a change on the host is seen at once in the guest
    env.set("vm1", "user.foo", "changed")
    rc, body = vm1.ns.curl("http://lxd/1.0/config/user.foo")
    assert body == b"changed"
    # exact bytes of one response, Date masked
    a = vm1.ns.agent()
    res = a.exchange(get_req("/1.0/config/user.foo"))
    assert mask_dates(res.data) == http_ok("application/octet-stream", b"changed"), res


def test_devlxd_events_through_the_agent(vm1):
    env = vm1.env
    a = vm1.ns.agent()
    conn, head = open_stream(a)
    assert head == STREAM_HEAD, head
    ws, whead = open_ws(a, "/1.0/events?type=config")
    assert whead.startswith(b"HTTP/1.1 101 Switching Protocols\r\n"), whead
    time.sleep(0.2)
    env.set("vm1", "user.x", "1")
    env.device("vm1", "d0", {"type": "none"})
    lines = stream_lines(conn, 2)
    want_cfg = b'{"type":"config","timestamp":"<TS>","metadata":{"key":"user.x","old_value":"","value":"1"}}\n'
    assert mask_timestamps(lines[0]) == want_cfg, lines
    assert mask_timestamps(lines[1]) == (b'{"type":"device","timestamp":"<TS>","metadata":'
                                         b'{"action":"added","config":{"type":"none"},"name":"d0"}}\n'), lines
    f = ws.next_data(5)
    assert (f[1], f[2]) == (True, 0x1), f
    assert mask_timestamps(f[4]) == want_cfg, f  # LXD ends the payload with \n
    ws.quiet(0.5)
    conn.close()


# ---- faults -----------------------------------------------------------------------------------


def test_wrong_host_key(vmenv, tmp_path):
    wrong = keygen(str(tmp_path / "otherkey"))
    vm = vmenv.mkvm("vm1", key=wrong)
    time.sleep(2.0)
    assert vm.agent_file() == "status: offline\n", vm.agent_file()
    t0 = time.monotonic()
    p = vm.ctl("ping", "vm1", timeout=30)
    assert p.returncode == EX_UNAVAILABLE, out(p)
    assert time.monotonic() - t0 < 10
    assert p.stderr == UNREACHABLE, out(p)
    assert p.stdout == b""
    # the right key makes it work, without restarting the daemon
    vm.kill_agent()
    vm.start_agent()
    vm.wait_online()
    ping_ok(vm)


def test_wrong_instance_id(vmenv):
    """An agent that says it belongs to another VM is not used."""
    vm = vmenv.mkvm("vm1", config={"volatile.cloud-init.instance-id": "aaaa"},
                    instance_id="bbbb", online=False)
    time.sleep(1.5)
    assert vm.agent_file() == "status: offline\n"
    assert vm.ctl("ping", "vm1").returncode == EX_UNAVAILABLE
    vm.kill_agent()
    vm.start_agent(instance_id="aaaa")
    vm.wait_online()


def test_control_socket_oversize_frame(vm1):
    env = vm1.env
    c = env.frames()
    c.s.sendall(frame(REQUEST, 1, b"", length=FRAME_MAX + 1))
    f = c.next(5)
    assert f is not None and f[0] == 0 and f[1] == ERROR and f[2] & END, f
    assert c.next(5) is None, "connection not closed after an oversize frame"
    c.close()
    daemon_ok(env)
    ping_ok(vm1)


def test_control_socket_truncated_and_bad_frames(vm1):
    env = vm1.env
    # half a header, then close
    s = socket.socket(socket.AF_UNIX)
    s.connect(env.control)
    s.sendall(b"\x00\x00\x00")
    s.close()
    # a header announcing 100 bytes, 10 sent, then close
    s = socket.socket(socket.AF_UNIX)
    s.connect(env.control)
    s.sendall(frame(REQUEST, 1, b"0123456789", length=100))
    s.close()
    # an unknown type is skipped; the connection goes on
    c = env.frames()
    c.send(200, 5, b"whatever")
    c.request(2, {"op": "status", "instance": "vm1"})
    _, _, ctl = c.until_end(2)
    assert ctl[-1][0] == RESPONSE and ctl[-1][2]["online"] is True, ctl
    assert ctl[-1][2]["version"] == agent_version(), ctl
    # not JSON / unknown op / missing instance: errors, connection stays
    c.send(REQUEST, 3, b"{not json")
    _, _, ctl = c.until_end(3)
    assert ctl[-1][0] == ERROR and ctl[-1][2]["errno"] == errno.EINVAL, ctl
    c.request(4, {"op": "frobnicate", "instance": "vm1"})
    _, _, ctl = c.until_end(4)
    assert ctl[-1][0] == ERROR and ctl[-1][2]["errno"] == errno.EINVAL, ctl
    c.request(5, {"op": "ping", "instance": "nope"})
    _, _, ctl = c.until_end(5)
    assert ctl[-1][0] == ERROR and ctl[-1][2]["errno"] == errno.ENOENT, ctl
    c.close()
    daemon_ok(env)
    ping_ok(vm1)


def test_ping_of_a_container_or_unbound_vm(vmenv):
    os.mkdir(vmenv.gl.p("c1"))
    p = vmenv.ctl("ping", "c1")
    assert p.returncode == 1, out(p)
    p = vmenv.ctl("ping", "nope")
    assert p.returncode == 1, out(p)
    c = vmenv.frames()
    c.request(1, {"op": "ping", "instance": "c1"})
    _, _, ctl = c.until_end(1)
    assert ctl[-1][0] == ERROR and ctl[-1][2]["errno"] == errno.EINVAL, ctl
    c.close()


def test_guest_never_answers_connect(vmenv):
    """vsock-mux --inactive: connects sit in the backlog unanswered; ping
    fails within its deadline (2 s dial) with 69, the daemon is fine."""
    vm = vmenv.mkvm("vm1", mux_kw={"inactive": True}, online=False)
    t0 = time.monotonic()
    p = vm.ctl("ping", "vm1", timeout=30)
    took = time.monotonic() - t0
    assert p.returncode == EX_UNAVAILABLE, out(p)
    assert took < 6, f"ping took {took:.2f}s"
    assert p.stderr == UNREACHABLE, out(p)
    assert vm.agent_file() == "status: offline\n"
    daemon_ok(vmenv)
    vm.mux.activate()
    vm.wait_online(15)
    ping_ok(vm)


def test_agent_killed_mid_exec(vm1):
    pr = vm1.env.ctl_popen("exec", "vm1", "--", "sh", "-c", "echo started; exec sleep 60")
    assert pr.stdout.readline() == b"started\n"
    vm1.kill_agent()
    rc = pr.wait(10)
    err = pr.stderr.read()
    pr.stdout.close()
    pr.stderr.close()
    assert rc == 255, (rc, err)
    assert err == b"guestlinkctl: agent of vm1: connection lost\n", err
    daemon_ok(vm1.env)
    vm1.start_agent()
    vm1.wait_online()
    ping_ok(vm1)


def _new_entries(d, before):
    return sorted(set(os.listdir(d)) - set(before))


def test_agent_killed_mid_push(vm1, tmp_path):
    """The target keeps its old bytes and no temporary file is left in its
    directory."""
    gdir = tmp_path / "target"
    gdir.mkdir()
    target = gdir / "file"
    target.write_bytes(b"old contents\n")
    before = os.listdir(gdir)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    pr = vm1.env.ctl_popen("push", "vm1", str(fifo), str(target))
    w = os.open(fifo, os.O_WRONLY)
    try:
        os.write(w, os.urandom(MIB))
        # the agent has started writing (a temp in the target's dir, or an
        # unnamed O_TMPFILE): give the bytes time to get there
        time.sleep(1.0)
        vm1.kill_agent()
        rc = pr.wait(10)
    finally:
        os.close(w)
    err = pr.stderr.read()
    pr.stdout.close()
    pr.stderr.close()
    assert rc == EX_UNAVAILABLE, (rc, err)  # "the connection to it was lost" (--help)
    assert err.endswith(b"guestlinkctl: agent of vm1: connection lost\n"), err
    assert target.read_bytes() == b"old contents\n"
    left = _new_entries(gdir, before)
    assert left == [], f"left in the target's directory: {left}"
    daemon_ok(vm1.env)


def test_agent_killed_mid_pull(vm1, tmp_path):
    """No local file (nor temp) is left after a pull that died."""
    big = tmp_path / "sparse"
    with open(big, "wb") as f:
        f.truncate(8 << 30)  # 8 GiB of holes: plenty of time to kill
    local_dir = tmp_path / "local"
    local_dir.mkdir()
    local = local_dir / "back"
    pr = vm1.env.ctl_popen("pull", "vm1", str(big), str(local))

    def growing():
        return any(os.path.getsize(local_dir / n) > MIB for n in os.listdir(local_dir))
    try:
        wait_for(growing, 20, "the pull to write locally")
    finally:
        vm1.kill_agent()
    rc = pr.wait(20)
    err = pr.stderr.read()
    pr.stdout.close()
    pr.stderr.close()
    assert rc == EX_UNAVAILABLE, (rc, err)
    assert err.endswith(b"guestlinkctl: agent of vm1: connection lost\n"), err
    assert os.listdir(local_dir) == [], os.listdir(local_dir)
    daemon_ok(vm1.env)


def test_vmm_socket_missing_or_stale(vmenv, tmp_path):
    vm = vmenv.mkvm("vm1", mux=False, agent=False, bind=False)
    missing = os.path.join(vm.dir, "missing.sock")
    vm.bind(missing)
    t0 = time.monotonic()
    p = vm.ctl("ping", "vm1", timeout=30)
    assert p.returncode == EX_UNAVAILABLE, out(p)
    assert p.stderr == UNREACHABLE, out(p)
    assert time.monotonic() - t0 < 6
    # stale: a socket file nobody listens on
    stale = os.path.join(vm.dir, "stale.sock")
    s = socket.socket(socket.AF_UNIX)
    s.bind(stale)
    s.close()
    vm.bind(stale)
    p = vm.ctl("ping", "vm1", timeout=30)
    assert p.returncode == EX_UNAVAILABLE, out(p)
    assert p.stderr == UNREACHABLE, out(p)
    p = vm.ctl("exec", "vm1", "--", "true", timeout=30)
    assert (p.returncode, p.stderr) == (255, UNREACHABLE), out(p)
    assert vm.agent_file() == "status: offline\n"
    daemon_ok(vmenv)
    # bound to the real emulator afterwards: it works
    vm.start_mux()
    vm.bind()
    vm.start_ns()
    vm.start_agent()
    vm.wait_online()
    ping_ok(vm)


def _exec_many(env, n, argv_of, timeout=120):
    """n exec requests, one control connection each (an agent op makes the
    connection a relay), all in flight at once: {i: (out, err, last)}."""
    conns = {}
    for i in range(n):
        c = FrameConn(env.control, timeout=30)
        c.request(1, {"op": "exec", "instance": "vm1", "argv": argv_of(i)})
        conns[c.fileno()] = (i, c)
    res = {}
    bufs = {i: ([], []) for i in range(n)}
    poller = select.poll()
    for fd in conns:
        poller.register(fd, select.POLLIN)
    deadline = time.monotonic() + timeout
    while len(res) < n:
        left = deadline - time.monotonic()
        assert left > 0, f"{n - len(res)} execs did not end within {timeout}s"
        for fd, _ in poller.poll(int(min(left, 1) * 1000)):
            i, c = conns[fd]
            c.feed()
            while True:
                f = c.parse()
                if f is None:
                    break
                _, t, fl, p = f
                if t == DATA:
                    bufs[i][1 if fl & STDERR else 0].append(p)
                elif t == ERROR or (t == RESPONSE and fl & END):
                    res[i] = (b"".join(bufs[i][0]), b"".join(bufs[i][1]), (t, json.loads(p)))
            if i in res or c.eof:
                if i not in res:
                    res[i] = (b"".join(bufs[i][0]), b"".join(bufs[i][1]), ("EOF", None))
                poller.unregister(fd)
                c.close()
    return res


def _thousand(vm):
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 8192)), hard))
    n = 1000
    res = _exec_many(vm.env, n, lambda i: ["sh", "-c", f"echo {i}; exit {i % 200}"])
    bad = {i: r for i, r in res.items()
           if r != (f"{i}\n".encode(), b"", (RESPONSE, {"exit_code": i % 200}))}
    assert not bad, f"{len(bad)} of {n} wrong, e.g. {list(bad.items())[:3]}"
    daemon_ok(vm.env)
    ping_ok(vm)


def test_thousand_concurrent_execs(vm1):
    """1,000 execs in flight at once, every part with its default limits
    (the daemon queues beyond --max-agent-conns; whatever the agent's own
    cap, no request may fail)."""
    _thousand(vm1)


def test_thousand_concurrent_execs_agent_cap_raised(vmenv):
    """The same with the agent's --max-conns above the daemon's default
    --max-agent-conns (256): the relay path itself under load."""
    _thousand(vmenv.mkvm("vm1", agent_extra=["--max-conns", "1024"]))


def test_thousand_concurrent_execs_all_at_once(vmenv_factory):
    """1,000 execs really at once: daemon --max-agent-conns 1024 and agent
    --max-conns 2048, so the agent runs 1,000 commands together. Every
    command's output must arrive before its exit code."""
    env = vmenv_factory("--max-agent-conns", "1024")
    for _ in range(2):
        _thousand(env.vms.get("vm1") or env.mkvm("vm1", agent_extra=["--max-conns", "2048"]))


def _agent_link(vm, sk):
    """A link to vm's agent the way the daemon makes one: through the
    emulator (CONNECT 7361 on the VMM socket), HELLO, AUTH signed with the
    daemon's key (tools/agentprobe sign), AUTH_OK. A FrameConn."""
    s = socket.socket(socket.AF_UNIX)
    s.connect(vm.uds)
    s.sendall(b"CONNECT 7361\n")
    line = b""
    while not line.endswith(b"\n"):
        b = s.recv(1)
        assert b, f"emulator closed after CONNECT ({line!r})"
        line += b
    assert line.startswith(b"OK "), line
    c = FrameConn.__new__(FrameConn)
    c.s, c.buf, c.eof = s, b"", False
    s.settimeout(30)
    fid, t, fl, p = c.next(10)
    assert (fid, t) == (0, 1), (fid, t, p)  # HELLO
    hello = json.loads(p)
    sig = subprocess.run([AGENTPROBE, "sign", sk, hello["nonce"], hello["instance"]],
                         capture_output=True, text=True, check=True).stdout.strip()
    c.send(2, 0, {"version": "test", "sig": sig})
    fid, t, fl, p = c.next(10)
    assert (fid, t) == (0, 3), (fid, t, p)  # AUTH_OK
    return c


def test_agent_thousand_links_at_once(vmenv):
    """1,000 authenticated links to the agent (through the emulator, as the
    daemon makes them), one exec on each, all sent at once: each command's
    stdout must arrive before its exit code (an agent whose loop stalls must
    not drop output it has not read yet)."""
    vm = vmenv.mkvm("vm1", agent_extra=["--max-conns", "2048"])
    sk = os.path.join(vmenv.gl.state, "host.key")
    n = 1000
    links = [_agent_link(vm, sk) for _ in range(n)]
    try:
        for i, c in enumerate(links):
            c.request(1, {"op": "exec", "argv": ["sh", "-c", f"echo {i}; exit {i % 200}"]})
        bad = {}
        for i, c in enumerate(links):
            o, e, ctl = c.until_end(1, 120)
            if (o, e, ctl) != (f"{i}\n".encode(), b"", [(RESPONSE, END, {"exit_code": i % 200})]):
                bad[i] = (o, e, ctl)
        assert not bad, f"{len(bad)} of {n} wrong, e.g. {list(bad.items())[:3]}"
    finally:
        for c in links:
            c.close()
    ping_ok(vm)


def test_thousand_concurrent_execs_cli(vmenv):
    """The same through guestlinkctl, 200 at a time for 1,000 (agent cap
    raised as above: this tests the CLI path)."""
    vm1 = vmenv.mkvm("vm1", agent_extra=["--max-conns", "1024"])
    procs = []
    rcs = {}
    for i in range(1000):
        procs.append((i, vm1.env.ctl_popen("exec", "vm1", "-T", "--", "sh", "-c",
                                           f"echo {i}; exit {i % 100}")))
        if len(procs) >= 200 or i == 999:
            for j, pr in procs:
                o, e = pr.communicate(timeout=120)
                rcs[j] = (pr.returncode, o, e)
            procs = []
    bad = {i: r for i, r in rcs.items() if r[:2] != (i % 100, f"{i}\n".encode())}
    assert not bad, f"{len(bad)} wrong, e.g. {list(bad.items())[:3]}"


def test_vm_removed_while_execs_run(vm1):
    """rm -r M/vm1 while 20 execs run and a guest holds an event stream:
    the execs end with an error, the guest's stream ends, the daemon goes
    on."""
    env = vm1.env
    a = vm1.ns.agent()
    stream, _ = open_stream(a)
    result = {}

    def run():
        result.update(_exec_many(env, 20, lambda i: ["sleep", "60"], timeout=30))
    t = threading.Thread(target=run)
    t.start()
    time.sleep(1.5)
    subprocess.run(["rm", "-r", vm1.p()], check=True, timeout=10)
    t.join(40)
    assert not t.is_alive()
    assert len(result) == 20
    for i, (o, e, last) in result.items():
        assert last[0] == ERROR and last[1]["errno"] in (errno.ENOENT, errno.ECONNRESET), last
    stream.read_eof(5)
    daemon_ok(env)
    assert not os.path.exists(vm1.uds + "_7362")
    # the daemon goes on: a new VM of that name works
    vm1.env.vms.pop("vm1")
    assert vm1.close() == []
    vm = env.mkvm("vm1")
    ping_ok(vm)


def test_snapshot_restore(vm1):
    """vsock-mux "reset" kills every vsock connection (a VMM restore): the
    in-flight exec fails cleanly, the agent file goes offline and back
    online by itself, and a guest event client resumes with ?since= and
    misses nothing."""
    env = vm1.env
    a = vm1.ns.agent()
    # a guest subscriber with the documented resume protocol
    conn, head = open_stream(a, "/1.0/events?type=config&since=now")
    assert head.startswith(b"HTTP/1.1 200 OK\n"), head
    (first,) = stream_lines(conn, 1)
    ev = json.loads(first)
    assert ev["type"] == "resync", first
    base, n = ev["metadata"]["seq"], 0
    env.set("vm1", "user.a", "1")
    (line,) = stream_lines(conn, 1)
    assert json.loads(line)["metadata"]["key"] == "user.a"
    n += 1
    pr = env.ctl_popen("exec", "vm1", "--", "sh", "-c", "echo started; exec sleep 60")
    assert pr.stdout.readline() == b"started\n"
    online_before = vm1.agent_file()
    assert online_before.startswith("status: online\n")

    seen_offline = threading.Event()
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            try:
                if vm1.agent_file().startswith("status: offline\n"):
                    seen_offline.set()
                    return
            except OSError:
                pass
            time.sleep(0.002)
    w = threading.Thread(target=watch)
    w.start()
    vm1.mux.reset()
    rc = pr.wait(10)
    err = pr.stderr.read()
    pr.stdout.close()
    pr.stderr.close()
    assert (rc, err) == (255, b"guestlinkctl: agent of vm1: connection lost\n"), (rc, err)
    # events while the guest's stream is down
    conn.read_eof(5)
    env.set("vm1", "user.b", "2")
    env.set("vm1", "user.c", "3")
    w.join(5)
    stop.set()
    assert seen_offline.is_set(), "the agent file never read offline after the reset"
    vm1.wait_online(15)
    ping_ok(vm1)
    # resume: exactly b and c
    conn2, head = open_stream(a, f"/1.0/events?type=config&since={base}&skip={n}")
    lines = stream_lines(conn2, 2)
    keys = [json.loads(x)["metadata"]["key"] for x in lines]
    assert keys == ["user.b", "user.c"], lines
    conn2.recv(timeout=0.5)
    assert conn2.buf == b"", conn2.buf
    conn2.close()


@pytest.mark.parametrize("mode", ["vhost-device", "cloud-hypervisor"])
def test_other_vmm_modes(vmenv, mode):
    """The other VMMs' hybrid vsock (tools/vsock-mux --mode): vhost-device
    answers "OK <port>", cloud-hypervisor takes the CONNECT line in pieces.
    The daemon's client and the agent's guest side work with each."""
    vm = vmenv.mkvm("vm1", config={"user.foo": "bar"}, mux_kw={"mode": mode})
    ping_ok(vm)
    p = vm.ctl("exec", "vm1", "--", "sh", "-c", "echo out; exit 7")
    assert (p.returncode, p.stdout) == (7, b"out\n"), out(p)
    rc, body = vm.ns.curl("http://lxd/1.0/config/user.foo")
    assert (rc, body) == (0, b"bar")
