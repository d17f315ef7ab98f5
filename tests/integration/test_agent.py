"""guestlink-agent on its test transport (--transport unix:DIR), driven
with raw frames on DIR/listen-7361 (docs/control-protocol.md): the
handshake and its refusals, every operation, faults, and the devlxd proxy
against a fake host that plays the emulator's guest side at DIR/host.

The agent binary sits next to GUESTLINKD (build/ or build-san/); the key
pair and the AUTH signatures come from tools/agentprobe."""

import errno
import json
import os
import random
import select
import shutil
import signal
import socket
import stat
import struct
import subprocess
import tempfile
import threading
import time

import pytest

import glutil

BUILD_DIR = os.path.dirname(glutil.GUESTLINKD)
AGENT = os.environ.get("GUESTLINK_AGENT") or os.path.join(BUILD_DIR, "guestlink-agent")
PROBE = os.path.join(BUILD_DIR, "tools", "agentprobe")

HELLO, AUTH, AUTH_OK, REQUEST, RESPONSE, DATA, CANCEL, ERROR = range(1, 9)
END, STDERR = 1, 2
HDR = struct.Struct(">IIBB")
CHUNK = 64 * 1024
MIB = 1024 * 1024

pytestmark = pytest.mark.skipif(
    not (os.access(AGENT, os.X_OK) and os.access(PROBE, os.X_OK)),
    reason=f"{AGENT} or {PROBE} is not built")


def frame(fid, ftype, flags=0, payload=b""):
    if isinstance(payload, dict):
        payload = json.dumps(payload).encode()
    return HDR.pack(len(payload), fid, ftype, flags) + payload


class Closed(Exception):
    pass


class Conn:
    """One connection to the agent's control socket, read frame by frame."""

    def __init__(self, path):
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.s.connect(path)
        self.buf = b""
        self.hello = None
        self.auth_ok = None

    def close(self):
        self.s.close()

    def send(self, fid, ftype, flags=0, payload=b""):
        self.s.sendall(frame(fid, ftype, flags, payload))

    def _fill(self, n, timeout):
        deadline = time.monotonic() + timeout
        while len(self.buf) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no frame within {timeout}s")
            r, _, _ = select.select([self.s], [], [], left)
            if not r:
                continue
            try:
                chunk = self.s.recv(1 << 20)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                raise Closed(len(self.buf))
            self.buf += chunk

    def frame(self, timeout=10.0):
        """(id, type, flags, payload bytes)."""
        self._fill(HDR.size, timeout)
        length, fid, ftype, flags = HDR.unpack(self.buf[:HDR.size])
        self._fill(HDR.size + length, timeout)
        payload = self.buf[HDR.size:HDR.size + length]
        self.buf = self.buf[HDR.size + length:]
        return fid, ftype, flags, payload

    def expect_closed(self, timeout=10.0):
        """Every frame received before the end of the stream."""
        got = []
        while True:
            try:
                got.append(self.frame(timeout))
            except Closed as e:
                assert e.args[0] == 0, f"stream ended inside a frame ({e.args[0]} bytes)"
                return got

    def handshake(self, sk, instance=None, sign_instance=None, token=None):
        fid, ftype, flags, payload = self.frame()
        assert (fid, ftype, flags) == (0, HELLO, 0)
        self.hello = json.loads(payload)
        inst = self.hello["instance"] if sign_instance is None else sign_instance
        sig = sign(sk, self.hello["nonce"], inst)
        auth = {"version": "test", "sig": sig}
        if token is not None:
            auth["devlxd_token"] = token
        self.send(0, AUTH, 0, auth)
        fid, ftype, flags, payload = self.frame()
        assert (fid, ftype, flags) == (0, AUTH_OK, 0), payload
        self.auth_ok = json.loads(payload)
        return self.auth_ok

    # ---- requests ----------------------------------------------------------

    def request(self, fid, req, flags=0):
        self.send(fid, REQUEST, flags, req)

    def answer(self, fid, timeout=10.0):
        """The single END frame of request fid: (type, json)."""
        got_id, ftype, flags, payload = self.frame(timeout)
        assert got_id == fid, (got_id, ftype, payload)
        assert flags & END, (ftype, flags, payload)
        return ftype, json.loads(payload)

    def exec_collect(self, fid, timeout=20.0):
        """stdout, stderr, final (type, json) of exec fid; every frame of
        this connection is expected to belong to fid."""
        out, err = [], []
        while True:
            got_id, ftype, flags, payload = self.frame(timeout)
            assert got_id == fid, (got_id, ftype, payload)
            if ftype == DATA:
                assert len(payload) <= CHUNK
                assert not flags & END
                (err if flags & STDERR else out).append(payload)
                continue
            assert ftype in (RESPONSE, ERROR) and flags & END, (ftype, flags, payload)
            return b"".join(out), b"".join(err), (ftype, json.loads(payload))

    def run(self, fid, argv, **kw):
        req = {"op": "exec", "argv": argv}
        req.update(kw)
        self.request(fid, req)
        return self.exec_collect(fid)

    def read_file(self, fid, path):
        self.request(fid, {"op": "read", "path": path})
        got_id, ftype, flags, payload = self.frame()
        assert got_id == fid
        if ftype == ERROR:
            assert flags & END
            return json.loads(payload), None
        assert (ftype, flags) == (RESPONSE, 0), (ftype, flags, payload)
        meta = json.loads(payload)
        chunks = []
        while True:
            got_id, ftype, flags, payload = self.frame()
            assert (got_id, ftype) == (fid, DATA), (got_id, ftype, payload)
            assert len(payload) <= CHUNK
            chunks.append(payload)
            if flags & END:
                break
        return meta, chunks

    def write_file(self, fid, path, data, mode=None, chunk=CHUNK):
        req = {"op": "write", "path": path, "size": len(data)}
        if mode is not None:
            req["mode"] = mode
        self.request(fid, req)
        off = 0
        while True:
            piece = data[off:off + chunk]
            off += len(piece)
            last = off >= len(data)
            self.send(fid, DATA, END if last else 0, piece)
            if last:
                break
        return self.answer(fid)


def sign(sk, nonce, instance):
    return subprocess.check_output([PROBE, "sign", sk, nonce, instance], text=True).strip()


class Agent:
    def __init__(self, base, instance=None, devlxd=True, args=(), wrap=()):
        self.base = base
        self.keys = os.path.join(base, "k")
        self.tdir = os.path.join(base, "t")
        os.makedirs(self.keys)
        os.makedirs(self.tdir)
        subprocess.check_output([PROBE, "keygen", self.keys])
        self.sk = os.path.join(self.keys, "host.key")
        self.pub = os.path.join(self.keys, "host.pub")
        self.listen = os.path.join(self.tdir, "listen-7361")
        self.host = os.path.join(self.tdir, "host")
        # nested: the agent creates the missing directories
        self.devlxd = os.path.join(base, "dev", "lxd", "sock")
        self.log = os.path.join(base, "agent.log")
        cmd = [AGENT, "--host-key", self.pub, "--transport", "unix:" + self.tdir,
               "--devlxd-socket", self.devlxd if devlxd else "none", "-vv"]
        if instance is not None:
            cmd += ["--instance-id", instance]
        cmd += list(args)
        self.logf = open(self.log, "wb")
        self.proc = subprocess.Popen(list(wrap) + cmd, stdout=self.logf,
                                     stderr=subprocess.STDOUT)
        self.wrapped = bool(wrap)
        deadline = time.monotonic() + 10
        # the socket file appears at bind(), before listen(): wait for the
        # agent to say it listens
        while "listening on" not in self.logtext():
            assert self.proc.poll() is None, f"agent exited: {self.logtext()}"
            assert time.monotonic() < deadline, "agent did not listen within 10s"
            time.sleep(0.01)

    def logtext(self):
        with open(self.log, "rb") as f:
            return f.read().decode(errors="replace")

    def connect(self, auth=True):
        c = Conn(self.listen)
        if auth:
            c.handshake(self.sk)
        return c

    def stop(self):
        problems = []
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            if self.wrapped:
                # unshare --fork does not forward signals: the agent is its child
                try:
                    with open(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children") as f:
                        for pid in f.read().split():
                            os.kill(int(pid), signal.SIGTERM)
                except OSError:
                    pass
            try:
                rc = self.proc.wait(10)
                if rc != 0:
                    problems.append(f"agent exit status {rc} on SIGTERM")
            except subprocess.TimeoutExpired:
                problems.append("agent still running 10s after SIGTERM")
                self.proc.kill()
                self.proc.wait()
        self.logf.close()
        marker = glutil.sanitizer_report(self.logtext())
        if marker:
            problems.append(f"sanitizer report ({marker}) in {self.log}")
        return problems


@pytest.fixture
def agent_factory():
    made, dirs = [], []

    def make(**kw):
        # short: sun_path holds 108 bytes
        base = tempfile.mkdtemp(prefix="gla-")
        dirs.append(base)
        a = Agent(base, **kw)
        made.append(a)
        return a

    yield make
    problems = []
    for a in made:
        problems += a.stop()
    problems += glutil.kill_leftover_children(3.0)
    for a in made:
        if problems:
            problems.append(f"agent log {a.base}:\n{a.logtext()[-4000:]}")
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)
    if problems:
        pytest.fail("teardown:\n  " + "\n  ".join(problems), pytrace=False)


@pytest.fixture
def agent(agent_factory):
    return agent_factory(instance="vm-test")


@pytest.fixture
def conn(agent):
    c = agent.connect()
    yield c
    c.close()


def procs_with(marker):
    """Pids (not zombies) whose command line is exactly marker."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
            with open(f"/proc/{d}/stat") as f:
                st = f.read()
        except OSError:
            continue
        if cmd.strip() == marker and st[st.rindex(")") + 2] != "Z":
            out.append(int(d))
    return out


def wait_for(pred, timeout=5.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"{what}: not within {timeout}s"
        time.sleep(0.02)


# ---- handshake -------------------------------------------------------------


def test_handshake(agent):
    c = agent.connect(auth=False)
    ok = c.handshake(agent.sk)
    assert set(c.hello) == {"version", "nonce", "instance"}
    assert c.hello["version"] == "0.2.0"
    assert c.hello["instance"] == "vm-test"
    assert len(c.hello["nonce"]) == 64 and int(c.hello["nonce"], 16) >= 0
    assert set(ok) == {"version", "uptime_ms"}
    assert ok["version"] == "0.2.0"
    assert isinstance(ok["uptime_ms"], int) and 0 <= ok["uptime_ms"] < 60000
    c2 = agent.connect(auth=False)
    _, _, _, p = c2.frame()
    assert json.loads(p)["nonce"] != c.hello["nonce"], "nonce reused"
    c.close()
    c2.close()


def test_no_instance_id_is_empty(agent_factory):
    a = agent_factory()
    c = a.connect()
    assert c.hello["instance"] == ""
    c.close()


def test_wrong_key_closed(agent, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    subprocess.check_output([PROBE, "keygen", str(other)])
    c = agent.connect(auth=False)
    _, _, _, p = c.frame()
    nonce = json.loads(p)["nonce"]
    c.send(0, AUTH, 0, {"version": "test", "sig": sign(str(other / "host.key"), nonce, "vm-test")})
    assert c.expect_closed() == []


def test_signature_over_other_instance_closed(agent):
    c = agent.connect(auth=False)
    with pytest.raises(Closed):
        c.handshake(agent.sk, sign_instance="vm-other")


def test_replayed_auth_closed(agent):
    c1 = agent.connect(auth=False)
    _, _, _, p = c1.frame()
    auth = frame(0, AUTH, 0, {"version": "test",
                              "sig": sign(agent.sk, json.loads(p)["nonce"], "vm-test")})
    c1.s.sendall(auth)
    fid, ftype, _, _ = c1.frame()
    assert (fid, ftype) == (0, AUTH_OK)
    c2 = agent.connect(auth=False)
    c2.frame()  # its own HELLO, another nonce
    c2.s.sendall(auth)
    assert c2.expect_closed() == []
    # the first connection is unaffected
    c1.request(1, {"op": "ping"})
    assert c1.answer(1)[0] == RESPONSE
    c1.close()


def test_request_before_auth_closed(agent):
    c = agent.connect(auth=False)
    c.frame()
    c.request(1, {"op": "exec", "argv": ["/bin/touch", os.path.join(agent.base, "pwned")]})
    assert c.expect_closed() == []
    time.sleep(0.2)
    assert not os.path.exists(os.path.join(agent.base, "pwned"))


def test_garbage_auth_closed(agent):
    for payload in (b"not json", b'{"sig": 5}', b'{"sig": "abcd"}', b"{}"):
        c = agent.connect(auth=False)
        c.frame()
        c.send(0, AUTH, 0, payload)
        assert c.expect_closed() == [], payload


def test_unknown_type_before_auth_closed(agent):
    c = agent.connect(auth=False)
    c.frame()
    c.send(0, 99, 0, b"{}")
    assert c.expect_closed() == []


def test_oversize_before_auth(agent):
    c = agent.connect(auth=False)
    c.frame()
    # a header announcing 4097 bytes: refused before the payload is read
    c.s.sendall(HDR.pack(4097, 0, AUTH, 0))
    got = c.expect_closed()
    assert len(got) == 1, got
    fid, ftype, flags, payload = got[0]
    assert (fid, ftype) == (0, ERROR)
    assert json.loads(payload)["errno"] == errno.EMSGSIZE or "error" in json.loads(payload)
    agent.connect().close()


def test_handshake_timeout(agent):
    c = agent.connect(auth=False)
    c.frame()
    t0 = time.monotonic()
    assert c.expect_closed(timeout=10) == []
    took = time.monotonic() - t0
    assert 4.0 <= took <= 8.0, took


def test_truncated_frame_then_close(agent):
    for cut in (3, 10, 40):
        c = agent.connect(auth=False)
        _, _, _, p = c.frame()
        full = frame(0, AUTH, 0, {"version": "t", "sig": sign(agent.sk, json.loads(p)["nonce"],
                                                                "vm-test")})
        c.s.sendall(full[:cut])
        c.close()
    c = agent.connect()
    c.request(7, {"op": "ping"})
    assert c.answer(7)[0] == RESPONSE
    # and truncated after authentication
    c.s.sendall(frame(8, REQUEST, 0, {"op": "ping"})[:12])
    c.close()
    c = agent.connect()
    c.request(9, {"op": "ping"})
    assert c.answer(9)[0] == RESPONSE
    c.close()


def test_oversize_after_auth(conn):
    conn.s.sendall(HDR.pack(MIB + 1, 5, DATA, 0))
    got = conn.expect_closed()
    assert [(f[0], f[1]) for f in got] == [(0, ERROR)]


def test_max_payload_after_auth(conn, agent):
    # exactly 1 MiB is allowed once authenticated
    data = b"x" * MIB
    conn.request(3, {"op": "write", "path": os.path.join(agent.base, "big")})
    conn.send(3, DATA, END, data)
    ftype, ans = conn.answer(3)
    assert (ftype, ans) == (RESPONSE, {"size": MIB})


# ---- framing on an authenticated connection ---------------------------------


def test_unknown_type_skipped(conn):
    conn.send(4, 99, 0, b"whatever")
    conn.send(0, 200, END, b"")
    conn.send(5, RESPONSE, END, b"{}")  # a type only the agent sends
    conn.send(77, DATA, 0, b"no such request")
    conn.send(78, CANCEL, 0, b"")
    conn.request(6, {"op": "ping"})
    ftype, ans = conn.answer(6)
    assert ftype == RESPONSE


def test_unknown_op_einval(conn):
    conn.request(1, {"op": "reboot"})
    ftype, ans = conn.answer(1)
    assert ftype == ERROR and ans["errno"] == errno.EINVAL
    conn.send(2, REQUEST, 0, b"[1,2]")
    ftype, ans = conn.answer(2)
    assert ftype == ERROR and ans["errno"] == errno.EINVAL
    conn.request(3, {"op": "ping"})
    assert conn.answer(3)[0] == RESPONSE


def test_ping(conn):
    before = time.time_ns()
    conn.request(42, {"op": "ping"})
    ftype, ans = conn.answer(42)
    after = time.time_ns()
    assert ftype == RESPONSE
    assert set(ans) == {"version", "uptime_ms", "time_ns"}
    assert ans["version"] == "0.2.0"
    assert before - 10**9 <= ans["time_ns"] <= after + 10**9
    assert 0 <= ans["uptime_ms"] < 60000


def test_many_pings_pipelined(conn):
    ids = list(range(1, 501))
    conn.s.sendall(b"".join(frame(i, REQUEST, 0, {"op": "ping"}) for i in ids))
    seen = set()
    for _ in ids:
        fid, ftype, flags, _ = conn.frame()
        assert (ftype, flags) == (RESPONSE, END)
        seen.add(fid)
    assert seen == set(ids)


# ---- exec ------------------------------------------------------------------


def test_exec_streams_and_exit_code(conn):
    out, err, (ftype, ans) = conn.run(1, ["/bin/sh", "-c", "echo out; echo err >&2; exit 3"])
    assert (out, err) == (b"out\n", b"err\n")
    assert (ftype, ans) == (RESPONSE, {"exit_code": 3})


def test_exec_stdin(conn):
    conn.request(2, {"op": "exec", "argv": ["/bin/cat"], "stdin": True})
    conn.send(2, DATA, 0, b"hello ")
    conn.send(2, DATA, 0, b"world\n")
    conn.send(2, DATA, END, b"")
    out, err, (ftype, ans) = conn.exec_collect(2)
    assert (out, err, ftype, ans) == (b"hello world\n", b"", RESPONSE, {"exit_code": 0})


def test_exec_stdin_large(conn):
    data = random.randbytes(3 * MIB)
    conn.request(2, {"op": "exec", "argv": ["/bin/sh", "-c", "sha256sum | cut -c1-64"],
                     "stdin": True})
    for off in range(0, len(data), CHUNK):
        conn.send(2, DATA, 0, data[off:off + CHUNK])
    conn.send(2, DATA, END, b"")
    import hashlib
    out, err, (ftype, ans) = conn.exec_collect(2)
    assert out.decode().strip() == hashlib.sha256(data).hexdigest()
    assert ans == {"exit_code": 0}


def test_exec_no_stdin_is_devnull(conn):
    out, _, (_, ans) = conn.run(3, ["/bin/sh", "-c", "cat; echo rc=$?"])
    assert out == b"rc=0\n" and ans == {"exit_code": 0}


def test_exec_signal(conn):
    out, err, (ftype, ans) = conn.run(4, ["/bin/sh", "-c", "echo x; kill -TERM $$"])
    assert out == b"x\n"
    assert (ftype, ans) == (RESPONSE, {"exit_code": 143, "signal": 15})


def test_exec_timeout(conn):
    t0 = time.monotonic()
    out, err, (ftype, ans) = conn.run(5, ["/bin/sh", "-c", "echo started; exec sleep 1005"],
                                      timeout_ms=300)
    took = time.monotonic() - t0
    assert out == b"started\n"
    assert (ftype, ans) == (RESPONSE, {"exit_code": 137, "signal": 9, "timed_out": True})
    assert 0.25 <= took < 5, took
    assert procs_with("sleep 1005") == []


def test_exec_cancel(conn):
    conn.request(6, {"op": "exec", "argv": ["/bin/sh", "-c", "echo go; exec sleep 1006"]})
    fid, ftype, flags, p = conn.frame()
    assert (fid, ftype, p) == (6, DATA, b"go\n")
    conn.send(6, CANCEL, 0, {"signal": 15})
    out, err, (ftype, ans) = conn.exec_collect(6)
    assert (ftype, ans) == (RESPONSE, {"exit_code": 143, "signal": 15})
    # default: SIGKILL, to the whole group
    conn.request(7, {"op": "exec", "argv": ["/bin/sh", "-c",
                                            "trap '' TERM; sleep 1007 & echo go; wait"]})
    assert conn.frame()[3] == b"go\n"
    wait_for(lambda: procs_with("sleep 1007"), what="sleep 1007 running")
    conn.send(7, CANCEL, 0, b"")
    out, err, (ftype, ans) = conn.exec_collect(7)
    assert ans == {"exit_code": 137, "signal": 9}
    wait_for(lambda: not procs_with("sleep 1007"), what="the group killed")


def test_exec_env_cwd(conn, agent):
    out, err, (_, ans) = conn.run(8, ["/bin/sh", "-c", "echo $FOO; pwd; echo ${HOME-unset}"],
                                  env={"FOO": "bar baz"}, cwd=agent.base)
    assert out == f"bar baz\n{os.path.realpath(agent.base)}\nunset\n".encode()
    assert ans == {"exit_code": 0}
    # without env: the agent's environment
    out, _, _ = conn.run(9, ["/bin/sh", "-c", "echo ${PATH:+set}"])
    assert out == b"set\n"


def test_exec_own_process_group(conn):
    out, _, (_, ans) = conn.run(10, ["/bin/sh", "-c", "ps -o pgid= -o sid= -p $$; echo $$"])
    pgid, sid, pid = out.split()
    assert pgid == pid and sid == pid


def test_exec_cannot_start(conn, agent):
    conn.request(11, {"op": "exec", "argv": ["/nonexistent/cmd"]})
    ftype, ans = conn.answer(11)
    assert ftype == ERROR and ans["errno"] == errno.ENOENT
    conn.request(12, {"op": "exec", "argv": ["/bin/true"], "cwd": "/nonexistent-dir"})
    ftype, ans = conn.answer(12)
    assert ftype == ERROR and ans["errno"] == errno.ENOENT
    noexec = os.path.join(agent.base, "noexec")
    with open(noexec, "w") as f:
        f.write("#!/bin/sh\n")
    os.chmod(noexec, 0o644)
    conn.request(13, {"op": "exec", "argv": [noexec]})
    ftype, ans = conn.answer(13)
    assert ftype == ERROR and ans["errno"] == errno.EACCES
    for bad in ({"argv": []}, {"argv": "ls"}, {"argv": ["ls", 1]}, {},
                {"argv": ["true"], "env": {"A": 1}}, {"argv": ["true"], "timeout_ms": -1}):
        req = {"op": "exec"}
        req.update(bad)
        conn.request(14, req)
        ftype, ans = conn.answer(14)
        assert ftype == ERROR and ans["errno"] == errno.EINVAL, bad
    conn.request(15, {"op": "ping"})
    assert conn.answer(15)[0] == RESPONSE


def test_exec_duplicate_id(conn):
    conn.request(16, {"op": "exec", "argv": ["/bin/sh", "-c", "read x; echo $x"], "stdin": True})
    conn.request(16, {"op": "ping"})
    ftype, ans = conn.answer(16)
    assert ftype == ERROR and ans["errno"] == errno.EBUSY
    conn.send(16, DATA, END, b"still here\n")
    out, _, (_, ans) = conn.exec_collect(16)
    assert out == b"still here\n" and ans == {"exit_code": 0}


def test_exec_background_child_does_not_hang(conn):
    t0 = time.monotonic()
    out, _, (_, ans) = conn.run(17, ["/bin/sh", "-c", "sleep 1017 & echo bg"])
    assert out == b"bg\n" and ans == {"exit_code": 0}
    assert time.monotonic() - t0 < 5
    # the background sleep keeps its life: only CANCEL / connection loss kill groups
    for pid in procs_with("sleep 1017"):
        os.kill(pid, signal.SIGKILL)


def test_exec_cancel_reaches_background_children(conn):
    # the leader exits at once; its background child keeps the pipes open
    conn.request(18, {"op": "exec", "argv": ["/bin/sh", "-c", "sleep 1018 & echo bg"]})
    assert conn.frame()[3] == b"bg\n"
    wait_for(lambda: procs_with("sleep 1018"), what="background sleep")
    time.sleep(0.2)
    conn.send(18, CANCEL, 0, b"")
    out, _, (ftype, ans) = conn.exec_collect(18)
    assert (ftype, ans) == (RESPONSE, {"exit_code": 0})
    wait_for(lambda: not procs_with("sleep 1018"), what="the group killed")


def test_exec_output_backpressure(conn, agent):
    # 80 MiB while the host reads nothing for a while: without flow control
    # the agent would queue it all (and drop the link past its hard limit).
    size = 80 * MIB
    conn.request(18, {"op": "exec", "argv": ["/usr/bin/head", "-c", str(size), "/dev/zero"]})
    time.sleep(1.5)
    with open(f"/proc/{agent.proc.pid}/status") as f:
        rss = [int(line.split()[1]) for line in f if line.startswith("VmRSS")][0]
    assert rss < 48 * 1024, f"agent RSS {rss} KiB while output is held back"
    total = 0
    while True:
        fid, ftype, flags, p = conn.frame(30)
        assert fid == 18
        if ftype == DATA:
            assert len(p) <= CHUNK and not flags & STDERR
            total += len(p)
            continue
        assert (ftype, json.loads(p)) == (RESPONSE, {"exit_code": 0})
        break
    assert total == size


def test_200_concurrent_execs(conn):
    n = 200
    conn.s.sendall(b"".join(
        frame(i, REQUEST, 0, {"op": "exec",
                              "argv": ["/bin/sh", "-c", f"echo {i}; echo e{i} >&2; exit {i % 7}"]})
        for i in range(1, n + 1)))
    out = {i: b"" for i in range(1, n + 1)}
    err = {i: b"" for i in range(1, n + 1)}
    done = {}
    while len(done) < n:
        fid, ftype, flags, p = conn.frame(60)
        assert fid in out and fid not in done
        if ftype == DATA:
            if flags & STDERR:
                err[fid] += p
            else:
                out[fid] += p
        else:
            assert (ftype, flags) == (RESPONSE, END), p
            done[fid] = json.loads(p)
    for i in range(1, n + 1):
        assert out[i] == f"{i}\n".encode()
        assert err[i] == f"e{i}\n".encode()
        assert done[i] == {"exit_code": i % 7}


def test_connection_loss_kills_execs(agent):
    c = agent.connect()
    c.request(1, {"op": "exec", "argv": ["/bin/sh", "-c",
                                         "trap '' HUP TERM; sleep 1019 & sleep 1019 & echo go; wait"]})
    assert c.frame()[3] == b"go\n"
    wait_for(lambda: len(procs_with("sleep 1019")) == 2, what="two sleeps")
    c.close()
    wait_for(lambda: not procs_with("sleep 1019"), what="the group killed after the link died")
    agent.connect().close()


# ---- files -----------------------------------------------------------------


def test_write_read_roundtrip(conn, agent):
    path = os.path.join(agent.base, "f.txt")
    ftype, ans = conn.write_file(1, path, b"hello\n", mode=0o600)
    assert (ftype, ans) == (RESPONSE, {"size": 6})
    assert open(path, "rb").read() == b"hello\n"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    meta, chunks = conn.read_file(2, path)
    assert meta == {"size": 6, "mode": 0o600}
    assert chunks == [b"hello\n"]
    # default mode, replacing the file (whatever the umask)
    old = os.umask(0o077)
    try:
        ftype, ans = conn.write_file(3, path, b"again")
    finally:
        os.umask(old)
    assert open(path, "rb").read() == b"again"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644
    assert sorted(os.listdir(agent.base)) == sorted(["k", "t", "dev", "agent.log", "f.txt"])


def test_read_empty_and_errors(conn, agent):
    empty = os.path.join(agent.base, "empty")
    open(empty, "w").close()
    meta, chunks = conn.read_file(1, empty)
    assert meta["size"] == 0 and chunks == [b""]
    ans, _ = conn.read_file(2, "/nonexistent/file")
    assert ans["errno"] == errno.ENOENT
    ans, _ = conn.read_file(3, agent.base)
    assert ans["errno"] == errno.EISDIR
    ans, _ = conn.read_file(4, "relative/path")
    assert ans["errno"] == errno.EINVAL


def test_3mib_roundtrip(conn, agent):
    data = random.randbytes(3 * MIB + 12345)
    path = os.path.join(agent.base, "big.bin")
    ftype, ans = conn.write_file(1, path, data, mode=0o640, chunk=50000)
    assert (ftype, ans) == (RESPONSE, {"size": len(data)})
    meta, chunks = conn.read_file(2, path)
    assert meta == {"size": len(data), "mode": 0o640}
    assert b"".join(chunks) == data
    assert all(len(c) == CHUNK for c in chunks[:-1])
    assert chunks[-1] and len(chunks[-1]) == len(data) % CHUNK


def test_read_exact_chunk_multiple(conn, agent):
    data = random.randbytes(2 * CHUNK)
    path = os.path.join(agent.base, "even.bin")
    with open(path, "wb") as f:
        f.write(data)
    meta, chunks = conn.read_file(1, path)
    # the last DATA chunk carries END: no empty trailer
    assert [len(c) for c in chunks] == [CHUNK, CHUNK]
    assert b"".join(chunks) == data


def test_read_backpressure(conn, agent):
    # 96 MiB (sparse) while the host reads nothing for a while: the agent
    # reads the disk only as fast as the connection drains
    path = os.path.join(agent.base, "sparse")
    with open(path, "wb") as f:
        f.truncate(96 * MIB)
    os.chmod(path, 0o644)
    conn.request(1, {"op": "read", "path": path})
    time.sleep(1.5)
    with open(f"/proc/{agent.proc.pid}/status") as f:
        rss = [int(line.split()[1]) for line in f if line.startswith("VmRSS")][0]
    assert rss < 48 * 1024, f"agent RSS {rss} KiB while the file is held back"
    fid, ftype, flags, p = conn.frame()
    assert (fid, ftype, json.loads(p)) == (1, RESPONSE, {"size": 96 * MIB, "mode": 0o644})
    total = 0
    while True:
        fid, ftype, flags, p = conn.frame(30)
        assert (fid, ftype) == (1, DATA) and len(p) <= CHUNK
        total += len(p)
        if flags & END:
            break
    assert total == 96 * MIB


def test_read_proc_file(conn):
    # size 0 in stat, content when read
    meta, chunks = conn.read_file(1, "/proc/self/status")
    assert meta["size"] == 0
    assert b"".join(chunks).startswith(b"Name:")


def test_write_errors(conn, agent):
    conn.request(1, {"op": "write", "path": "/nonexistent-dir/f"})
    ftype, ans = conn.answer(1)
    assert ftype == ERROR and ans["errno"] == errno.ENOENT
    conn.request(2, {"op": "write", "path": os.path.join(agent.base, "f"), "mode": "0644"})
    ftype, ans = conn.answer(2)
    assert ftype == ERROR and ans["errno"] == errno.EINVAL
    # onto a directory: refused at rename, no temporary file left
    d = os.path.join(agent.base, "adir")
    os.mkdir(d)
    conn.request(3, {"op": "write", "path": d})
    conn.send(3, DATA, END, b"x")
    ftype, ans = conn.answer(3)
    assert ftype == ERROR and ans["errno"] in (errno.EISDIR, errno.EEXIST)
    assert not [n for n in os.listdir(agent.base) if ".gl-" in n]


def open_files_in(pid, d):
    """What process pid holds open inside directory d (an O_TMPFILE shows
    as "d/#123 (deleted)")."""
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith(d + "/"):
            out.append(target)
    return out


def start_partial_write(agent, c, d):
    target = os.path.join(d, "target")
    with open(target, "wb") as f:
        f.write(b"original")
    before = sorted(os.listdir(d))
    c.request(1, {"op": "write", "path": target, "size": 4 * MIB})
    c.send(1, DATA, 0, b"A" * CHUNK)
    c.send(1, DATA, 0, b"B" * CHUNK)
    # the temporary file is open beside the target while the write is open
    wait_for(lambda: open_files_in(agent.proc.pid, d), what="temporary file open")
    return target, before


def test_write_atomic_on_connection_loss(agent):
    d = os.path.join(agent.base, "w")
    os.mkdir(d)
    c = agent.connect()
    target, before = start_partial_write(agent, c, d)
    # unnamed (O_TMPFILE): nothing is visible even while it is written
    assert sorted(os.listdir(d)) == before
    c.close()
    wait_for(lambda: not open_files_in(agent.proc.pid, d), what="temporary file dropped")
    assert open(target, "rb").read() == b"original"
    assert sorted(os.listdir(d)) == before
    agent.connect().close()


def test_write_agent_killed_leaves_nothing(agent):
    d = os.path.join(agent.base, "w")
    os.mkdir(d)
    c = agent.connect()
    target, before = start_partial_write(agent, c, d)
    agent.proc.kill()
    agent.proc.wait(10)
    assert c.expect_closed() == []
    assert open(target, "rb").read() == b"original"
    assert sorted(os.listdir(d)) == before


def test_write_cancel(conn, agent):
    d = os.path.join(agent.base, "w")
    os.mkdir(d)
    target, before = start_partial_write(agent, conn, d)
    conn.send(1, CANCEL, 0, b"")
    ftype, ans = conn.answer(1)
    assert ftype == ERROR and ans["errno"] == errno.ECANCELED
    conn.send(1, DATA, END, b"late")  # dropped: not in flight any more
    conn.request(2, {"op": "ping"})
    assert conn.answer(2)[0] == RESPONSE
    assert not open_files_in(agent.proc.pid, d)
    assert open(target, "rb").read() == b"original"
    assert sorted(os.listdir(d)) == before


def test_write_in_root_dir_name(conn, agent):
    # a target directly under "/" (the temporary file's directory is "/")
    name = f"/gl-agent-test-{os.getpid()}"
    try:
        assert conn.write_file(1, name, b"root") == (RESPONSE, {"size": 4})
        assert open(name, "rb").read() == b"root"
    finally:
        if os.path.exists(name):
            os.unlink(name)


def test_stat(conn, agent):
    f = os.path.join(agent.base, "s.txt")
    with open(f, "wb") as fh:
        fh.write(b"12345")
    os.chmod(f, 0o751)
    os.chown(f, 1234, 5678)
    ln = os.path.join(agent.base, "link")
    os.symlink("s.txt", ln)
    conn.request(1, {"op": "stat", "path": f})
    ftype, ans = conn.answer(1)
    st = os.lstat(f)
    assert (ftype, ans) == (RESPONSE, {"type": "file", "mode": 0o751, "size": 5, "uid": 1234,
                                       "gid": 5678, "mtime_ns": st.st_mtime_ns})
    conn.request(2, {"op": "stat", "path": ln})
    assert conn.answer(2)[1]["type"] == "symlink"
    conn.request(3, {"op": "stat", "path": agent.base})
    assert conn.answer(3)[1]["type"] == "dir"
    conn.request(4, {"op": "stat", "path": "/dev/null"})
    assert conn.answer(4)[1]["type"] == "other"
    conn.request(5, {"op": "stat", "path": "/nonexistent"})
    ftype, ans = conn.answer(5)
    assert ftype == ERROR and ans["errno"] == errno.ENOENT


def test_list(conn, agent):
    d = os.path.join(agent.base, "L")
    os.mkdir(d)
    with open(os.path.join(d, "b"), "wb") as f:
        f.write(b"xyz")
    os.mkdir(os.path.join(d, "a"), 0o700)
    os.chmod(os.path.join(d, "a"), 0o700)
    os.symlink("b", os.path.join(d, "c"))
    conn.request(1, {"op": "list", "path": d})
    ftype, ans = conn.answer(1)
    assert ftype == RESPONSE
    assert ans == {"entries": [
        {"name": "a", "type": "dir", "size": os.lstat(os.path.join(d, "a")).st_size,
         "mode": 0o700},
        {"name": "b", "type": "file", "size": 3, "mode": 0o644},
        {"name": "c", "type": "symlink", "size": 1, "mode": 0o777},
    ]}
    os.mkdir(os.path.join(agent.base, "E"))
    conn.request(2, {"op": "list", "path": os.path.join(agent.base, "E")})
    assert conn.answer(2) == (RESPONSE, {"entries": []})
    conn.request(3, {"op": "list", "path": os.path.join(d, "b")})
    ftype, ans = conn.answer(3)
    assert ftype == ERROR and ans["errno"] == errno.ENOTDIR


def test_list_large_dir_several_frames(conn, agent):
    d = os.path.join(agent.base, "big")
    os.mkdir(d)
    names = [f"{i:05d}-" + "n" * 200 for i in range(4000)]
    random.shuffle(names)
    for n in names:
        open(os.path.join(d, n), "w").close()
    conn.request(1, {"op": "list", "path": d})
    got, frames = [], 0
    while True:
        fid, ftype, flags, p = conn.frame(30)
        assert (fid, ftype) == (1, RESPONSE)
        assert len(p) <= MIB
        frames += 1
        got += json.loads(p)["entries"]
        if flags & END:
            break
    assert frames >= 2
    assert [e["name"] for e in got] == sorted(names)


# ---- devlxd proxy ----------------------------------------------------------


class FakeHost:
    """The emulator's guest side at DIR/host: reads "CONNECT <port>\\n",
    answers "OK\\n", reads the agent's preamble line ("GLDEVLXD1 <token>
    <uid>\\n", kept in `preambles`), then answers one HTTP request per
    connection. As guestlinkd, it closes a connection whose preamble has no
    token ("-": the announce, or a client before any AUTH) without a byte."""

    def __init__(self, path, body=b'{"ok":true}', silent=0):
        self.path = path
        self.body = body
        self.silent = silent  # this many first connections get no HTTP answer
        self.held = []
        self.requests = []  # (port, request bytes after the preamble)
        self.preambles = []
        self.srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.srv.bind(path)
        self.srv.listen(64)
        self.stop_flag = False
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def _run(self):
        while not self.stop_flag:
            try:
                s, _ = self.srv.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(s,), daemon=True).start()

    def _serve(self, s):
        try:
            line = b""
            while not line.endswith(b"\n"):
                b = s.recv(1)
                if not b:
                    return
                line += b
            port = int(line.split()[1])
            s.sendall(b"OK\n")
            pre = b""
            while not pre.endswith(b"\n"):
                b = s.recv(1)
                if not b:
                    break
                pre += b
            self.preambles.append(pre)
            if pre.split(b" ")[1:2] == [b"-"]:
                self.requests.append((port, b""))
                if self.silent > 0:
                    self.silent -= 1
                    self.held.append(s)
                    s = None
                return
            req = b""
            while b"\r\n\r\n" not in req:
                b = s.recv(4096)
                if not b:
                    break
                req += b
            self.requests.append((port, req))
            if self.silent > 0:
                self.silent -= 1
                self.held.append(s)
                s = None
                return
            s.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                      b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(self.body)
                      + self.body)
        finally:
            if s is not None:
                s.close()

    def close(self):
        self.stop_flag = True
        # wake the accept() first and wait for its thread: a closed fd
        # number is soon reused (by the next test's FakeHost), and a thread
        # still in accept() on it would serve that one's connections
        try:
            self.srv.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.t.join(5)
        self.srv.close()
        for s in self.held:
            s.close()


def recv_all(s, timeout=20):
    """Everything until the end of the stream (a reset counts as the end:
    a Unix socket closed with our request unread resets)."""
    s.settimeout(timeout)
    out = b""
    while True:
        try:
            b = s.recv(1 << 20)
        except ConnectionResetError:
            return out
        if not b:
            return out
        out += b


def test_devlxd_socket_created(agent):
    st = os.stat(agent.devlxd)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o666
    assert stat.S_IMODE(os.stat(os.path.dirname(agent.devlxd)).st_mode) == 0o755


TOKEN = "3c" * 32


def give_token(agent, token=TOKEN):
    """An authenticated connection whose AUTH carries the devlxd token."""
    c = agent.connect(auth=False)
    c.handshake(agent.sk, token=token)
    c.close()


def test_devlxd_proxy_and_announce(agent):
    host = FakeHost(agent.host, body=b'{"value":"bar"}')
    try:
        # the announce arrives by itself once the host listens
        wait_for(lambda: host.requests, timeout=5, what="announce")
        # no token yet (no AUTH seen): "-", and no request behind it
        assert host.requests[0] == (7362, b"")
        assert host.preambles[0] == b"GLDEVLXD1 - 0\n"
        # a client before any AUTH: "-" too, and the host closes it
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(agent.devlxd)
        s.sendall(b"GET /1.0 HTTP/1.1\r\nHost: lxd\r\n\r\n")
        assert recv_all(s) == b""
        s.close()
        assert host.preambles[-1] == b"GLDEVLXD1 - %d\n" % os.getuid()
        give_token(agent)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(agent.devlxd)
        s.sendall(b"GET /1.0/config/user.foo HTTP/1.1\r\nHost: lxd\r\n\r\n")
        got = recv_all(s)
        s.close()
        assert got == (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                       b"Content-Length: 15\r\nConnection: close\r\n\r\n{\"value\":\"bar\"}")
        assert host.requests[-1] == (7362, b"GET /1.0/config/user.foo HTTP/1.1\r\n"
                                           b"Host: lxd\r\n\r\n")
        assert host.preambles[-1] == b"GLDEVLXD1 %s %d\n" % (TOKEN.encode(), os.getuid())
        assert len(host.requests) == 3, "announced more than once"
    finally:
        host.close()


AS_UID_GET = r"""
import os, socket, sys
# the socket's directory is opened before dropping root: the test's
# tmp_path above it is root's alone
d = os.open(os.path.dirname(sys.argv[1]), os.O_PATH)
uid = int(sys.argv[2])
os.setgroups([])
os.setgid(uid)
os.setuid(uid)
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(10)
s.connect("/proc/self/fd/%d/%s" % (d, os.path.basename(sys.argv[1])))
s.sendall(b"GET /1.0 HTTP/1.1\r\nHost: lxd\r\nConnection: close\r\n\r\n")
out = b""
while True:
    b = s.recv(65536)
    if not b:
        break
    out += b
sys.stdout.buffer.write(out.partition(b"\r\n\r\n")[2])
"""


def devlxd_get(agent, uid=0):
    """GET /1.0 on the agent's socket, as `uid`: the answer's body."""
    p = subprocess.run(["/usr/bin/python3", "-c", AS_UID_GET, agent.devlxd, str(uid)],
                       capture_output=True, timeout=20)
    assert p.returncode == 0, p.stderr
    return p.stdout


def test_devlxd_preamble_token_and_uid(agent):
    """The token of the latest verified AUTH and the caller's uid go in
    front of every relayed connection; an AUTH that fails changes nothing."""
    host = FakeHost(agent.host)
    tok1, tok2 = "0f" * 32, "a1" * 16 + "5e" * 16
    try:
        wait_for(lambda: host.requests, timeout=5, what="announce")
        c = agent.connect(auth=False)
        c.handshake(agent.sk, token=tok1)
        assert devlxd_get(agent) == b'{"ok":true}'
        assert host.preambles[-1] == b"GLDEVLXD1 %s 0\n" % tok1.encode()
        assert devlxd_get(agent, uid=1000) == b'{"ok":true}'
        assert host.preambles[-1] == b"GLDEVLXD1 %s 1000\n" % tok1.encode()
        # a bad signature carrying a token: ignored
        bad = agent.connect(auth=False)
        bad.frame()
        bad.send(0, AUTH, 0, {"version": "t", "sig": "00" * 64, "devlxd_token": tok2})
        bad.expect_closed()
        # a good one without a token keeps the one it has
        agent.connect().close()
        assert devlxd_get(agent, uid=65534) == b'{"ok":true}'
        assert host.preambles[-1] == b"GLDEVLXD1 %s 65534\n" % tok1.encode()
        # the latest wins
        c2 = agent.connect(auth=False)
        c2.handshake(agent.sk, token=tok2.upper())
        assert devlxd_get(agent) == b'{"ok":true}'
        assert host.preambles[-1] == b"GLDEVLXD1 %s 0\n" % tok2.encode()
        c.close()
        c2.close()
    finally:
        host.close()


def test_devlxd_proxy_large_body_backpressure(agent):
    body = random.randbytes(8 * MIB)
    host = FakeHost(agent.host, body=body)
    try:
        wait_for(lambda: host.requests, timeout=5, what="announce")
        give_token(agent)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(agent.devlxd)
        s.sendall(b"GET /big HTTP/1.1\r\nHost: lxd\r\n\r\n")
        time.sleep(1.0)  # a slow reader
        got = recv_all(s)
        s.close()
        assert got.endswith(body) and got.startswith(b"HTTP/1.1 200 OK\r\n")
    finally:
        host.close()


def test_devlxd_dial_failure_closes_client(agent):
    def closed_without_answer():
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(agent.devlxd)
        try:
            s.sendall(b"GET /1.0 HTTP/1.1\r\nHost: lxd\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # closed already: as good
        assert recv_all(s, timeout=10) == b""
        s.close()

    # nobody at DIR/host
    closed_without_answer()
    # a host that answers the CONNECT with EOF (the VMM's RST)
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(agent.host)
    srv.listen(8)

    def rst():
        for _ in range(8):
            try:
                c, _ = srv.accept()
            except OSError:
                return
            c.close()
    threading.Thread(target=rst, daemon=True).start()
    closed_without_answer()
    srv.close()


def test_announce_retries_until_host_up(agent):
    time.sleep(0.5)  # several failed attempts first
    host = FakeHost(agent.host)
    try:
        t0 = time.monotonic()
        wait_for(lambda: host.requests, timeout=5, what="announce after the host came up")
        assert time.monotonic() - t0 < 2.0
        time.sleep(1.5)
        assert len(host.requests) == 1
    finally:
        host.close()


def test_announce_unanswered_is_retried(agent):
    host = FakeHost(agent.host, silent=1)
    try:
        wait_for(lambda: host.requests, timeout=5, what="first announce")
        t0 = time.monotonic()
        wait_for(lambda: len(host.requests) == 2, timeout=10, what="announce retried")
        assert 4.0 <= time.monotonic() - t0 <= 7.0
        time.sleep(1.5)
        assert len(host.requests) == 2
        # the proxy still works afterwards
        give_token(agent)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(agent.devlxd)
        s.sendall(b"GET /1.0 HTTP/1.1\r\nHost: lxd\r\n\r\n")
        assert recv_all(s).endswith(b'{"ok":true}')
        s.close()
    finally:
        host.close()


def test_devlxd_none(agent_factory):
    a = agent_factory(devlxd=False)
    assert not os.path.exists(a.devlxd)
    a.connect().close()


# ---- command line ----------------------------------------------------------


def test_cli_usage_and_errors(tmp_path):
    r = subprocess.run([AGENT, "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--host-key" in r.stdout and "--transport" in r.stdout
    r = subprocess.run([AGENT, "--version"], capture_output=True, text=True)
    assert (r.returncode, r.stdout) == (0, "guestlink-agent 0.2.0\n")
    r = subprocess.run([AGENT, "--transport", "unix:" + str(tmp_path)], capture_output=True,
                       text=True)
    assert r.returncode == 2 and "--host-key" in r.stderr
    bad = tmp_path / "bad.pub"
    bad.write_text("not a key\n")
    r = subprocess.run([AGENT, "--host-key", str(bad), "--transport", "unix:" + str(tmp_path),
                        "--devlxd-socket", "none"], capture_output=True, text=True, timeout=10)
    assert r.returncode == 1 and "bad.pub" in r.stderr
    keys = tmp_path / "keys"
    subprocess.check_output([PROBE, "keygen", str(keys)])
    taken = tmp_path / "taken"
    taken.write_text("a file\n")
    short = tempfile.mkdtemp(prefix="gla-")
    try:
        r = subprocess.run([AGENT, "--host-key", str(keys / "host.pub"), "--transport",
                            "unix:" + short, "--devlxd-socket", str(taken)],
                           capture_output=True, text=True, timeout=10)
        assert r.returncode == 1 and "not a socket" in r.stderr, r.stderr
        assert taken.read_text() == "a file\n"
        assert os.listdir(short) == []  # the control socket is gone again
    finally:
        shutil.rmtree(short, ignore_errors=True)
    r = subprocess.run([AGENT, "--host-key", str(bad), "--transport", "tcp:1"],
                       capture_output=True, text=True, timeout=10)
    assert r.returncode == 2
    r = subprocess.run([AGENT, "--host-key", str(bad), "--port", "0"], capture_output=True,
                       text=True, timeout=10)
    assert r.returncode == 2


def test_max_conns(agent_factory):
    a = agent_factory(args=("--max-conns", "2"))
    c1 = a.connect()
    c2 = a.connect()
    c3 = Conn(a.listen)
    assert c3.expect_closed() == []
    c1.close()
    time.sleep(0.2)
    c4 = a.connect()
    c4.request(1, {"op": "ping"})
    assert c4.answer(1)[0] == RESPONSE
    for c in (c2, c3, c4):
        c.close()


def test_sigterm_kills_running_execs(agent_factory):
    a = agent_factory()
    c = a.connect()
    c.request(1, {"op": "exec", "argv": ["/bin/sh", "-c", "sleep 1031 & echo go; wait"]})
    assert c.frame()[3] == b"go\n"
    a.proc.send_signal(signal.SIGTERM)
    assert a.proc.wait(10) == 0
    wait_for(lambda: not procs_with("sleep 1031"), what="execs killed on stop")
    assert not os.path.exists(a.listen) and not os.path.exists(a.devlxd)
    c.close()


def test_agent_in_namespaces(agent_factory):
    """The agent needs no network at all: in its own pid, mount and network
    namespaces (no interface but a down lo), on the Unix transport."""
    if not shutil.which("unshare"):
        pytest.skip("unshare(1) is missing")
    a = agent_factory(instance="vm-ns",
                      wrap=("unshare", "--net", "--pid", "--mount", "--fork", "--mount-proc",
                            "--kill-child"))
    c = a.connect()
    out, _, (_, ans) = c.run(1, ["/bin/sh", "-c",
                                 "cat /proc/1/comm; tail -n +3 /proc/net/dev | cut -d: -f1"])
    init, ifaces = out.split(b"\n", 1)
    assert ans == {"exit_code": 0}
    assert init == b"guestlink-agent"  # pid 1 of its own pid namespace
    assert ifaces.split() == [b"lo"]
    c.request(2, {"op": "ping"})
    assert c.answer(2)[0] == RESPONSE
    c.close()
