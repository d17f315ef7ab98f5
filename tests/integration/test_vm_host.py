"""guestlinkd's VM side (issue 5), from the host: the hybrid vsock devlxd
listener "<uds>_7362" of each VM and what it serves, the `agent` file, and
the root-only control socket (local requests, and agent requests with no
agent to reach). The part with a real agent behind tools/vsock-mux runs
when those binaries are built; test_vm.py drives the whole story.

Frames are spoken from Python: struct ">IIBB" (length, id, type, flags)
and a payload (docs/control-protocol.md). Nothing here touches AF_VSOCK."""

import errno
import json
import os
import shutil
import signal
import socket
import stat
import struct
import subprocess
import tempfile
import time

import pytest

import glutil
from devlxd_util import devlxd, devlxd_factory  # noqa: F401 (fixtures)
from glutil import GUESTLINKD, read_bytes, write_bytes

BUILD = os.path.dirname(GUESTLINKD)


def _bin(rel):
    """rel in the daemon's build directory, else in build/ (a sanitizer
    build of the daemon may drive the plain agent and emulator)."""
    for d in (BUILD, os.path.join(glutil.REPO, "build")):
        if os.access(os.path.join(d, rel), os.X_OK):
            return os.path.join(d, rel)
    return os.path.join(BUILD, rel)


AGENT = _bin("guestlink-agent")
MUX = _bin(os.path.join("tools", "vsock-mux"))

HELLO, AUTH, AUTH_OK, REQUEST, RESPONSE, DATA, CANCEL, ERROR = range(1, 9)
END, STDERR = 1, 2


@pytest.fixture(autouse=True)
def _needs_vm_side():
    if not glutil.daemon_supports("--control-socket"):
        pytest.skip(f"{GUESTLINKD} has no --control-socket (the VM side is not built in)")


@pytest.fixture
def scratch():
    """A short directory under /tmp (the model takes vsock-uds paths of at
    most 96 bytes; pytest's tmp_path is long), removed afterwards."""
    d = tempfile.mkdtemp(prefix="glvm-")
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


# ---- frames ---------------------------------------------------------------------------------

class Ctl:
    """One connection to the control socket."""

    def __init__(self, path, timeout=10.0):
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.s.settimeout(timeout)
        self.s.connect(path)
        self.buf = b""

    def send(self, id_, type_, payload=b"", flags=0):
        if not isinstance(payload, bytes):
            payload = json.dumps(payload).encode()
        self.s.sendall(struct.pack(">IIBB", len(payload), id_, type_, flags) + payload)

    def request(self, id_, **fields):
        self.send(id_, REQUEST, fields)

    def _fill(self, n):
        while len(self.buf) < n:
            chunk = self.s.recv(65536)
            if not chunk:
                return False
            self.buf += chunk
        return True

    def recv(self, timeout=None):
        """(id, type, flags, payload bytes), or None at EOF."""
        if timeout is not None:
            self.s.settimeout(timeout)
        if not self._fill(10):
            assert not self.buf, f"EOF inside a frame header: {self.buf!r}"
            return None
        n, id_, t, f = struct.unpack(">IIBB", self.buf[:10])
        assert self._fill(10 + n), "EOF inside a frame"
        p = self.buf[10:10 + n]
        self.buf = self.buf[10 + n:]
        return id_, t, f, p

    def answer(self, timeout=None):
        """The next frame, its payload parsed as JSON."""
        fr = self.recv(timeout)
        assert fr is not None, "control socket closed without an answer"
        id_, t, f, p = fr
        return id_, t, f, json.loads(p)

    def quiet(self, timeout):
        self.s.settimeout(timeout)
        try:
            got = self.s.recv(1, socket.MSG_PEEK)
        except socket.timeout:
            return
        raise AssertionError(f"unexpected bytes on the control socket: {got!r}")

    def close(self):
        self.s.close()


def err(e, text):
    return {"error": text, "errno": e}


# ---- helpers ------------------------------------------------------------------------------

def wait_for(pred, timeout=5.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout}s")
        time.sleep(0.01)


def is_socket(path):
    try:
        return stat.S_ISSOCK(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


def mkvm(gl, name, uds=None, config=None):
    gl.mkinstance(name, "virtual-machine")
    for k, v in (config or {}).items():
        write_bytes(gl.p(name, "config", k), v + "\n")
    if uds:
        write_bytes(gl.p(name, "vsock-uds"), uds + "\n")
        wait_for(lambda: is_socket(uds + "_7362"), what=f"{uds}_7362")


def http(path, method="GET", body=b"", timeout=5.0):
    """One request (Connection: close) on a Unix socket; (status line,
    headers dict, body) of the raw answer."""
    def run(sock_path):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        s.connect(sock_path)
        head = f"{method} {path} HTTP/1.1\r\nHost: lxd\r\nConnection: close\r\n"
        if body or method in ("PATCH", "PUT", "POST"):
            head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        s.sendall(head.encode() + b"\r\n" + body)
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        s.close()
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        hdrs = {}
        for ln in lines[1:]:
            k, _, v = ln.partition(b":")
            hdrs[k.decode().lower()] = v.strip().decode()
        return lines[0], hdrs, rest
    return run


def get(sock_path, path):
    return http(path)(sock_path)


@pytest.fixture
def vmd(daemon_factory):
    """A running guestlinkd (private devlxd and control sockets) with a short
    ping interval, so that the monitor's work shows quickly, and
    --vm-devlxd-auth none: the tests speak HTTP straight on <uds>_7362, as
    the VM's root."""
    return daemon_factory(args=["--agent-ping-interval", "300", "--vm-devlxd-auth", "none"])


@pytest.fixture
def vmd_token(daemon_factory):
    """As vmd, with the default --vm-devlxd-auth token: only what the
    VM's authenticated agent relays is served on <uds>_7362."""
    return daemon_factory(args=["--agent-ping-interval", "300"])


# ---- the devlxd listener of a hybrid-vsock VM -----------------------------------------------

def test_uds_listener_follows_the_binding(vmd, scratch):
    uds = os.path.join(scratch, "vm1.sock")
    mkvm(vmd, "vm1", uds)
    st = os.lstat(uds + "_7362")
    assert stat.S_IMODE(st.st_mode) == 0o600, oct(st.st_mode)
    # an open connection of the VM is closed with its transport
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c.settimeout(5)
    c.connect(uds + "_7362")
    write_bytes(vmd.p("vm1", "vsock-uds"), "\n")
    wait_for(lambda: not os.path.exists(uds + "_7362"), what="listener removed on unbind")
    assert c.recv(100) == b""
    c.close()
    # bound again: back; moved: the old one goes, the new one comes
    write_bytes(vmd.p("vm1", "vsock-uds"), uds + "\n")
    wait_for(lambda: is_socket(uds + "_7362"), what="listener after rebinding")
    uds2 = os.path.join(scratch, "vm1b.sock")
    write_bytes(vmd.p("vm1", "vsock-uds"), uds2 + "\n")
    wait_for(lambda: is_socket(uds2 + "_7362") and not os.path.exists(uds + "_7362"),
             what="listener moved")
    os.rmdir(vmd.p("vm1"))
    wait_for(lambda: not os.path.exists(uds2 + "_7362"), what="listener removed with the VM")


def test_devlxd_over_the_uds_answers_that_vm(vmd, scratch):
    uds1, uds2 = os.path.join(scratch, "vm1.sock"), os.path.join(scratch, "vm2.sock")
    mkvm(vmd, "vm1", uds1, {"user.foo": "one", "user.only1": "x"})
    mkvm(vmd, "vm2", uds2, {"user.foo": "two"})
    status, hdrs, body = get(uds1 + "_7362", "/1.0/config/user.foo")
    assert status == b"HTTP/1.1 200 OK", (status, hdrs, body)
    assert body == b"one"
    assert hdrs["content-length"] == "3"
    status, _, body = get(uds2 + "_7362", "/1.0/config/user.foo")
    assert (status, body) == (b"HTTP/1.1 200 OK", b"two")
    # each sees only its own keys
    _, _, body = get(uds1 + "_7362", "/1.0/config")
    assert json.loads(body) == ["/1.0/config/user.foo", "/1.0/config/user.only1"], body
    _, _, body = get(uds2 + "_7362", "/1.0/config")
    assert json.loads(body) == ["/1.0/config/user.foo"], body
    status, _, body = get(uds2 + "_7362", "/1.0/config/user.only1")
    assert status == b"HTTP/1.1 404 Not Found", (status, body)
    _, _, body = get(uds1 + "_7362", "/1.0")
    assert json.loads(body) == {"api_version": "1.0", "instance_type": "virtual-machine",
                                "location": "none", "state": ""}, body
    # a change on the host is seen at once
    write_bytes(vmd.p("vm1", "config", "user.foo"), "changed\n")
    assert get(uds1 + "_7362", "/1.0/config/user.foo")[2] == b"changed"


def test_vm_patch_ready_over_the_uds(vmd, scratch):
    uds = os.path.join(scratch, "vm1.sock")
    mkvm(vmd, "vm1", uds)
    write_bytes(vmd.p("vm1", "state"), "Started\n")
    status, _, body = http("/1.0", "PATCH", b'{"state":"Ready"}')(uds + "_7362")
    assert status == b"HTTP/1.1 200 OK", (status, body)
    assert read_bytes(vmd.p("vm1", "state")) == b"Ready\n"
    assert json.loads(get(uds + "_7362", "/1.0")[2])["state"] == "Ready"


def test_agent_file_offline(vmd, scratch):
    uds = os.path.join(scratch, "vm1.sock")
    mkvm(vmd, "vm1", uds)
    time.sleep(0.5)  # the monitor has tried (nothing listens at uds)
    assert read_bytes(vmd.p("vm1", "agent")) == b"status: offline\n"
    # a VM without a transport too
    mkvm(vmd, "vm2")
    assert read_bytes(vmd.p("vm2", "agent")) == b"status: offline\n"


def test_devlxd_without_a_host_socket(daemon_factory, scratch):
    # VMs need the devlxd server even when no --devlxd-socket is given
    gl = daemon_factory(args=["--control-socket", os.path.join(scratch, "ctl.sock"),
                              "--vm-devlxd-auth", "none"], start=False)
    gl._private = []  # no private devlxd socket either
    gl.start()
    assert "--devlxd-socket" not in gl.cmdline()
    assert "devlxd API on" not in gl.log()
    uds = os.path.join(scratch, "vm1.sock")
    mkvm(gl, "vm1", uds, {"user.foo": "bar"})
    assert get(uds + "_7362", "/1.0/config/user.foo")[2] == b"bar"
    assert gl.stop() == 0


def socket_inodes(pid):
    out = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            out.add(int(link[8:-1]))
    return out


def test_cid_vms_are_left_alone_without_af_vsock(vmd, scratch):
    # the test daemons run with --af-vsock off (this machine is a VM): a VM
    # bound by cid only has no transport, and no AF_VSOCK socket is made
    assert vmd.option("--af-vsock") == "off"
    mkvm(vmd, "vm1")
    write_bytes(vmd.p("vm1", "vsock-cid"), "42\n")
    time.sleep(0.3)
    c = Ctl(vmd.control_socket)
    c.request(1, op="ping", instance="vm1")
    assert c.answer() == (1, ERROR, END, err(errno.EINVAL,
                                             "vm1 is not a VM with a vsock transport"))
    c.close()
    with open("/proc/net/unix") as f:
        unix = {int(ln.split()[6]) for ln in f.readlines()[1:] if len(ln.split()) > 6}
    other = socket_inodes(vmd.proc.pid) - unix
    assert not other, f"sockets other than AF_UNIX: {other}"
    # with a hybrid transport as well, that one is used
    uds = os.path.join(scratch, "vm1.sock")
    write_bytes(vmd.p("vm1", "vsock-uds"), uds + "\n")
    wait_for(lambda: is_socket(uds + "_7362"), what="hybrid listener")


# ---- the control socket ---------------------------------------------------------------------

def test_control_socket_mode(vmd):
    st = os.lstat(vmd.control_socket)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600, oct(st.st_mode)


NOBODY_CLIENT = r"""
import json, socket, struct, sys
s = socket.socket(socket.AF_UNIX)
s.settimeout(5)
try:
    s.connect(sys.argv[1])
except OSError as e:
    print("connect", e.errno); sys.exit(0)
p = json.dumps({"op": "status", "instance": "vm1"}).encode()
try:
    s.sendall(struct.pack(">IIBB", len(p), 1, 4, 0) + p)
    got = s.recv(100)
except OSError as e:
    print("io", e.errno); sys.exit(0)
print("recv", len(got))
"""


def test_control_socket_refuses_non_root(daemon_factory, scratch):
    path = os.path.join(scratch, "control.sock")
    gl = daemon_factory(args=["--control-socket", path])
    mkvm(gl, "vm1")
    argv = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
            "/usr/bin/python3", "-c", NOBODY_CLIENT, path]
    # the file's mode keeps nobody out
    out = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert out.stdout.strip() == f"connect {errno.EACCES}", out
    # and with the mode opened up, SO_PEERCRED does: closed without a word
    os.chmod(path, 0o666)
    out = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert out.stdout.strip() in ("recv 0", f"io {errno.ECONNRESET}", f"io {errno.EPIPE}"), out
    # root still gets its answer
    c = Ctl(path)
    c.request(1, op="status", instance="vm1")
    assert c.answer() == (1, ERROR, END, err(errno.EINVAL,
                                             "vm1 is not a VM with a vsock transport"))
    c.close()


def test_wait_ready_container(devlxd):
    # a container's guest PATCHes Ready through the devlxd socket
    gl = devlxd.gl
    devlxd.mkinstance("c1")
    c = Ctl(gl.control_socket)
    try:
        c.request(7, op="wait", instance="c1", timeout_ms=0, **{"for": "ready"})
        ct = devlxd.container("c1")
        a = ct.agent()
        c.quiet(0.3)  # Started is not Ready
        body = b'{"state":"Ready"}'
        res = a.exchange(b"PATCH /1.0 HTTP/1.1\r\nHost: lxd\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)
        assert res.data.startswith(b"HTTP/1.1 200 OK\r\n"), res.data
        assert c.answer(5) == (7, RESPONSE, END, {})
        # already Ready: at once
        c.request(8, op="wait", instance="c1", **{"for": "ready"})
        assert c.answer(5) == (8, RESPONSE, END, {})
    finally:
        c.close()


def test_wait_ready_vm_and_timeout(vmd, scratch):
    uds = os.path.join(scratch, "vm1.sock")
    mkvm(vmd, "vm1", uds)
    write_bytes(vmd.p("vm1", "state"), "Started\n")
    c = Ctl(vmd.control_socket)
    t0 = time.monotonic()
    c.request(1, op="wait", instance="vm1", timeout_ms=300, **{"for": "ready"})
    assert c.answer(5) == (1, ERROR, END, err(errno.ETIMEDOUT,
                                              "timed out waiting for vm1 to be ready"))
    assert 0.25 < time.monotonic() - t0 < 3
    # two waits in flight on one connection; the guest's PATCH answers both
    c.request(2, op="wait", instance="vm1", timeout_ms=10000, **{"for": "ready"})
    c.request(3, op="wait", instance="vm1", **{"for": "ready"})
    c.quiet(0.2)
    status, _, _ = http("/1.0", "PATCH", b'{"state":"Ready"}')(uds + "_7362")
    assert status == b"HTTP/1.1 200 OK"
    got = sorted([c.answer(5), c.answer(5)])
    assert got == [(2, RESPONSE, END, {}), (3, RESPONSE, END, {})]
    # a wait for an instance that is removed
    mkvm(vmd, "vm2")
    c.request(4, op="wait", instance="vm2", **{"for": "ready"})
    c.quiet(0.1)
    os.rmdir(vmd.p("vm2"))
    assert c.answer(5) == (4, ERROR, END, err(errno.ENOENT, "vm2 was removed"))
    # cancelled
    mkvm(vmd, "vm3")
    c.request(5, op="wait", instance="vm3", **{"for": "agent"})
    c.send(5, CANCEL, {})
    assert c.answer(5) == (5, ERROR, END, err(errno.ECANCELED, "cancelled"))
    c.close()


def test_agent_ops_without_an_agent(vmd, scratch):
    uds = os.path.join(scratch, "vm1.sock")
    mkvm(vmd, "vm1", uds)
    vmd.mkinstance("c1")
    mkvm(vmd, "vm2")  # no transport
    c = Ctl(vmd.control_socket)
    c.request(1, op="ping", instance="nope")
    assert c.answer() == (1, ERROR, END, err(errno.ENOENT, "no instance nope"))
    c.request(2, op="exec", instance="c1", argv=["true"])
    assert c.answer() == (2, ERROR, END, err(errno.EINVAL,
                                             "c1 is not a VM with a vsock transport"))
    c.request(3, op="stat", instance="vm2", path="/")
    assert c.answer() == (3, ERROR, END, err(errno.EINVAL,
                                             "vm2 is not a VM with a vsock transport"))
    t0 = time.monotonic()
    c.request(4, op="ping", instance="vm1")
    assert c.answer(10) == (4, ERROR, END, err(errno.EHOSTUNREACH,
                                               "agent of vm1 is not reachable"))
    assert time.monotonic() - t0 < 5
    # the connection still serves local requests afterwards
    c.request(5, op="status", instance="vm1")
    assert c.answer() == (5, RESPONSE, END, {"online": False, "version": "", "last_ping_ns": 0,
                                             "rtt_us": 0})
    c.request(6, op="frobnicate", instance="vm1")
    assert c.answer() == (6, ERROR, END, err(errno.EINVAL, 'unknown op "frobnicate"'))
    c.request(7, op="wait", instance="c1", **{"for": "agent"})
    assert c.answer() == (7, ERROR, END, err(errno.EINVAL, "c1 is not a virtual machine"))
    c.close()


def test_stale_control_socket_is_replaced(daemon_factory, scratch):
    path = os.path.join(scratch, "control.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.close()  # the file stays, nobody accepts: stale
    assert is_socket(path)
    gl = daemon_factory(args=["--control-socket", path])
    c = Ctl(path)
    c.request(1, op="status", instance="nope")
    assert c.answer() == (1, ERROR, END, err(errno.ENOENT, "no instance nope"))
    c.close()
    assert gl.stop() == 0
    assert not os.path.exists(path)


def test_live_control_socket_is_refused(daemon_factory, scratch):
    path = os.path.join(scratch, "control.sock")
    first = daemon_factory("first", args=["--control-socket", path])
    second = daemon_factory("second", args=["--control-socket", path], start=False)
    second.start(wait=False)
    rc = second.wait_exit(10)
    assert rc == 1, second.log()
    assert f"control socket {path} is in use" in second.log(), second.log()
    assert not glutil.is_mounted(second.mnt)
    # the first is untouched
    c = Ctl(path)
    c.request(1, op="status", instance="nope")
    assert c.answer()[1] == ERROR
    c.close()
    assert first.running


def test_control_socket_none(daemon_factory, scratch):
    gl = daemon_factory(args=["--control-socket", "none"])
    assert "control socket" not in gl.log()
    assert gl.stop() == 0


def test_control_socket_parent_dirs_created(daemon_factory, scratch):
    path = os.path.join(scratch, "run", "guestlink", "control.sock")
    gl = daemon_factory(args=["--control-socket", path])
    assert is_socket(path)
    assert gl.stop() == 0


def test_help_lists_the_vm_options():
    out = subprocess.run([GUESTLINKD, "--help"], capture_output=True, text=True).stdout
    for opt in ("--control-socket", "--agent-ping-interval", "--max-agent-conns", "--vsock-port",
                "--vm-devlxd-auth token|none"):
        assert opt in out, opt
    for bad in (["--agent-ping-interval", "x"], ["--max-agent-conns", "0"], ["--vsock-port", "-1"],
                ["--vm-devlxd-auth", "tokens"], ["--vm-devlxd-auth", ""]):
        p = subprocess.run([GUESTLINKD, "--state-dir", "/nonexistent/s", "--mount", "/nonexistent/m"]
                           + bad, capture_output=True, text=True)
        assert p.returncode == 2 and bad[0] in p.stderr, (bad, p.stderr)


# ---- with a real agent behind the emulator --------------------------------------------------

class Guest:
    """tools/vsock-mux playing the VMM at `uds`, and the agent behind it in
    unix:DIR mode (no namespaces: this is about the host side)."""

    def __init__(self, gl, scratch, uds, iid="", name="g"):
        self.dir = os.path.join(scratch, name)
        os.makedirs(self.dir, exist_ok=True)
        self.uds = uds
        self.gl = gl
        self.mux = subprocess.Popen([MUX, "--uds", uds, "--guest", self.dir],
                                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE)
        line = self.mux.stderr.readline()
        assert b"ready" in line, line
        self.iid = iid
        self.agent = None

    def start_agent(self, key=None, devlxd=None):
        """devlxd: the path of the agent's local devlxd socket (default none)."""
        argv = [AGENT, "--host-key", key or os.path.join(self.gl.state, "host.pub"),
                "--transport", "unix:" + self.dir, "--devlxd-socket", devlxd or "none"]
        if self.iid:
            argv += ["--instance-id", self.iid]
        self.agent = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL)
        return self.agent

    def kill_agent(self):
        if self.agent and self.agent.poll() is None:
            self.agent.kill()
        if self.agent:
            self.agent.wait()
        self.agent = None

    def close(self):
        self.kill_agent()
        if self.mux.poll() is None:
            self.mux.terminate()
        self.mux.wait(10)
        self.mux.stderr.close()


@pytest.fixture
def guest_bins():
    for b in (AGENT, MUX):
        if not os.access(b, os.X_OK):
            pytest.skip(f"{b} is not built")


def children_of(pid):
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    st = f.read()
            except OSError:
                continue
            if int(st[st.rindex(")") + 2:].split()[1]) == pid:
                out.append(int(d))
    return out


def agent_lines(gl, name):
    return dict(ln.split(": ", 1) for ln in read_bytes(gl.p(name, "agent")).decode().splitlines())


def test_monitor_and_relay_with_a_real_agent(guest_bins, vmd_token, scratch):
    vmd = vmd_token  # the default: the agent announces itself with a tokenless preamble
    uds = os.path.join(scratch, "vm1.sock")
    iid = "856fc818-f65d-440f-b283-2b893183ee4d"
    mkvm(vmd, "vm1", uds, {"volatile.cloud-init.instance-id": iid})
    g = Guest(vmd, scratch, uds, iid)
    try:
        t0 = time.monotonic()
        g.start_agent()
        # the agent's announcement on the devlxd port makes the monitor dial
        wait_for(lambda: read_bytes(vmd.p("vm1", "agent")).startswith(b"status: online\n"),
                 timeout=5, what="agent online")
        assert time.monotonic() - t0 < 2.5
        info = agent_lines(vmd, "vm1")
        assert list(info) == ["status", "version", "last-ping", "rtt-us"], info
        assert info["status"] == "online" and info["version"]
        assert glutil.re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", info["last-ping"])
        assert int(info["rtt-us"]) >= 0
        # pings move last-ping on
        first = info["last-ping"]
        wait_for(lambda: agent_lines(vmd, "vm1")["last-ping"] != first, timeout=3,
                 what="a later ping")

        c = Ctl(vmd.control_socket)
        c.request(1, op="wait", instance="vm1", **{"for": "agent"})
        assert c.answer() == (1, RESPONSE, END, {})
        c.request(2, op="status", instance="vm1")
        _, t, f, st = c.answer()
        assert (t, f, st["online"], st["version"]) == (RESPONSE, END, True, info["version"])
        c.close()

        # a relayed ping
        c = Ctl(vmd.control_socket)
        c.request(9, op="ping", instance="vm1")
        id_, t, f, p = c.answer()
        assert (id_, t, f) == (9, RESPONSE, END) and p["version"] == info["version"]
        assert c.recv(5) is None  # the relay is over: closed
        c.close()

        # exec with stdin, output streamed back unchanged, exit code
        c = Ctl(vmd.control_socket)
        c.request(3, op="exec", instance="vm1", argv=["sh", "-c", "cat; echo err >&2; exit 3"],
                  stdin=True)
        c.send(3, DATA, b"hello ")
        c.send(3, DATA, b"world", flags=END)
        out, errb, last = b"", b"", None
        while True:
            fr = c.recv(10)
            assert fr is not None, "relay closed early"
            id_, t, f, p = fr
            assert id_ == 3
            if t == DATA:
                if f & STDERR:
                    errb += p
                else:
                    out += p
                continue
            last = (t, f, json.loads(p))
            break
        assert (out, errb) == (b"hello world", b"err\n")
        assert last == (RESPONSE, END, {"exit_code": 3})
        c.close()

        # the agent dies under a relay: ECONNRESET, connection lost
        c = Ctl(vmd.control_socket)
        # (short: a killed agent leaves its command running, reparented to us)
        c.request(4, op="exec", instance="vm1", argv=["sleep", "1"])
        time.sleep(0.3)
        g.kill_agent()
        assert c.answer(5) == (4, ERROR, END, err(errno.ECONNRESET,
                                                  "agent of vm1: connection lost"))
        c.close()
        wait_for(lambda: read_bytes(vmd.p("vm1", "agent")).startswith(b"status: offline\n"),
                 timeout=3, what="agent offline")
        info2 = agent_lines(vmd, "vm1")
        assert list(info2) == ["status", "version", "last-ping"], info2
        assert info2["version"] == info["version"]

        # back quickly once the agent is back
        t0 = time.monotonic()
        g.start_agent()
        wait_for(lambda: read_bytes(vmd.p("vm1", "agent")).startswith(b"status: online\n"),
                 timeout=5, what="agent online again")
        assert time.monotonic() - t0 < 2.5

        # the VM is removed under a relay: ENOENT
        c = Ctl(vmd.control_socket)
        c.request(5, op="exec", instance="vm1", argv=["sleep", "30"])
        time.sleep(0.3)
        os.rmdir(vmd.p("vm1"))
        assert c.answer(5) == (5, ERROR, END, err(errno.ENOENT, "vm1 was removed"))
        c.close()
        # the agent link was closed too: the agent killed the command
        wait_for(lambda: not children_of(g.agent.pid), timeout=5, what="command killed")
    finally:
        g.close()


def test_wrong_instance_id_is_refused(guest_bins, vmd, scratch):
    uds = os.path.join(scratch, "vm1.sock")
    mkvm(vmd, "vm1", uds, {"volatile.cloud-init.instance-id": "right-id"})
    g = Guest(vmd, scratch, uds, "another-vms-id")
    try:
        g.start_agent()
        time.sleep(1.0)
        assert read_bytes(vmd.p("vm1", "agent")) == b"status: offline\n"
        assert vmd.log().count("agent of vm1 refused the link") == 1, vmd.log()
        c = Ctl(vmd.control_socket)
        c.request(1, op="ping", instance="vm1")
        assert c.answer(10) == (1, ERROR, END, err(errno.EHOSTUNREACH,
                                                   "agent of vm1 is not reachable"))
        c.close()
    finally:
        g.close()


def test_agent_conns_are_capped_and_queued(guest_bins, daemon_factory, scratch):
    gl = daemon_factory(args=["--max-agent-conns", "1"])
    uds = os.path.join(scratch, "vm1.sock")
    mkvm(gl, "vm1", uds)
    g = Guest(gl, scratch, uds)
    try:
        g.start_agent()
        wait_for(lambda: read_bytes(gl.p("vm1", "agent")).startswith(b"status: online\n"),
                 timeout=5, what="agent online")
        conns = []
        t0 = time.monotonic()
        for k in range(3):
            c = Ctl(gl.control_socket)
            c.request(k + 1, op="exec", instance="vm1", argv=["sleep", "0.4"])
            conns.append(c)
        ends = []
        for k, c in enumerate(conns):
            assert c.answer(10) == (k + 1, RESPONSE, END, {"exit_code": 0})
            ends.append(time.monotonic() - t0)
            c.close()
        # one at a time, in order
        assert ends[2] >= 1.1, ends
        assert ends[0] < ends[1] < ends[2], ends
    finally:
        g.close()


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for ln in f:
            if ln.startswith("VmRSS:"):
                return int(ln.split()[1])
    raise AssertionError("no VmRSS")


def test_relay_streams_files_with_backpressure(guest_bins, vmd, scratch):
    import hashlib
    uds = os.path.join(scratch, "vm1.sock")
    mkvm(vmd, "vm1", uds)
    g = Guest(vmd, scratch, uds)
    try:
        g.start_agent()
        wait_for(lambda: read_bytes(vmd.p("vm1", "agent")).startswith(b"status: online\n"),
                 timeout=5, what="agent online")
        data = os.urandom(1 << 20) * 24  # 24 MiB
        target = os.path.join(scratch, "file")
        # write: DATA chunks of 64 KiB, the last flagged END
        c = Ctl(vmd.control_socket, timeout=30)
        c.request(1, op="write", instance="vm1", path=target, mode=0o640, size=len(data))
        for off in range(0, len(data), 65536):
            last = off + 65536 >= len(data)
            c.send(1, DATA, data[off:off + 65536], flags=END if last else 0)
        assert c.answer(30) == (1, RESPONSE, END, {"size": len(data)})
        assert c.recv(5) is None
        c.close()
        with open(target, "rb") as f:
            assert hashlib.sha256(f.read()).digest() == hashlib.sha256(data).digest()
        assert stat.S_IMODE(os.stat(target).st_mode) == 0o640
        # read, with the reader stalled first: the daemon buffers a bounded amount
        c = Ctl(vmd.control_socket, timeout=30)
        r0 = rss_kib(vmd.proc.pid)
        c.request(2, op="read", instance="vm1", path=target)
        time.sleep(1.0)
        grew = rss_kib(vmd.proc.pid) - r0
        assert grew < 12 * 1024, f"daemon grew by {grew} KiB while the reader stalled"
        id_, t, f, p = c.recv()
        assert (id_, t, f) == (2, RESPONSE, 0), (id_, t, f, p)
        assert json.loads(p)["size"] == len(data)
        h, n = hashlib.sha256(), 0
        while True:
            id_, t, f, p = c.recv()
            assert (id_, t) == (2, DATA), (id_, t, p[:200])
            h.update(p)
            n += len(p)
            if f & END:
                break
        assert n == len(data) and h.digest() == hashlib.sha256(data).digest()
        assert c.recv(5) is None
        c.close()
    finally:
        g.close()


def test_vm_transport_comes_back_after_restart(vmd, scratch):
    uds = os.path.join(scratch, "vm1.sock")
    mkvm(vmd, "vm1", uds, {"user.foo": "kept"})
    vmd.restart()
    wait_for(lambda: is_socket(uds + "_7362"), what="listener after restart")
    assert get(uds + "_7362", "/1.0/config/user.foo")[2] == b"kept"
    # a daemon killed with -9 leaves its socket file: replaced as stale
    vmd.kill9()
    assert is_socket(uds + "_7362")
    vmd.start()
    assert get(uds + "_7362", "/1.0/config/user.foo")[2] == b"kept"


def test_stop_tells_waiters(vmd, scratch):
    mkvm(vmd, "vm1")
    c = Ctl(vmd.control_socket)
    c.request(1, op="wait", instance="vm1", **{"for": "ready"})
    c.quiet(0.1)
    assert vmd.stop() == 0
    assert c.answer(5) == (1, ERROR, END, err(errno.ESHUTDOWN, "guestlinkd is stopping"))
    assert c.recv(5) is None
    c.close()


# ---- who may speak on <uds>_7362 (--vm-devlxd-auth token, the default) ----------------------

GET_FOO = b"GET /1.0/config/user.foo HTTP/1.1\r\nHost: lxd\r\nConnection: close\r\n\r\n"
PATCH_READY = (b"PATCH /1.0 HTTP/1.1\r\nHost: lxd\r\nContent-Type: application/json\r\n"
               b"Content-Length: 17\r\nConnection: close\r\n\r\n{\"state\":\"Ready\"}")


def raw(path, data, timeout=10.0):
    """Send data, read to the end: (bytes, seconds until the end)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(path)
    t0 = time.monotonic()
    try:
        if data:
            s.sendall(data)
    except (BrokenPipeError, ConnectionResetError):
        pass
    out = b""
    while True:
        try:
            b = s.recv(65536)
        except ConnectionResetError:
            break
        if not b:
            break
        out += b
    s.close()
    return out, time.monotonic() - t0


def test_vm_transport_wants_the_agents_preamble(vmd_token, scratch):
    """Without the agent's token, a connection on the VM's transport is
    closed without a byte: raw HTTP, "-", a wrong token, or a line that
    is not the preamble. None of them is served (a PATCH changes nothing)."""
    uds = os.path.join(scratch, "vm1.sock")
    mkvm(vmd_token, "vm1", uds, {"user.foo": "secret-foo-77"})
    write_bytes(vmd_token.p("vm1", "state"), "Started\n")
    t = uds + "_7362"
    tok = b"5a" * 32
    bad = [
        GET_FOO,
        PATCH_READY,
        b"GLDEVLXD1 - 0\n" + GET_FOO,
        b"GLDEVLXD1 - 0\n" + PATCH_READY,
        b"GLDEVLXD1 " + tok + b" 0\n" + GET_FOO,          # not this VM's token
        b"GLDEVLXD1 " + b"00" * 32 + b" 0\n" + PATCH_READY,
        b"GLDEVLXD1 " + tok[:-1] + b" 0\n" + GET_FOO,      # 63 hex
        b"GLDEVLXD1 " + tok + b" 4294967295\n" + GET_FOO,   # uid out of range
        b"GLDEVLXD1 " + tok + b" -1\n" + GET_FOO,
        b"GLDEVLXD1 " + tok + b" \n" + GET_FOO,
        b"GLDEVLXD2 " + tok + b" 0\n" + GET_FOO,
        b"\n" + GET_FOO,
        b"x" * 200,                                         # over the line's cap
    ]
    for data in bad:
        out, secs = raw(t, data)
        assert out == b"", (data, out)
        assert secs < 3.0, (data, secs)
    assert read_bytes(vmd_token.p("vm1", "state")) == b"Started\n"
    # silent, or a line that never ends: closed at the 5 s deadline
    for data in (b"", b"GLDEVLXD1 " + tok):
        out, secs = raw(t, data, timeout=15)
        assert out == b"" and 4.0 <= secs <= 8.0, (data, out, secs)
    assert "secret-foo-77" not in vmd_token.log()
    # the daemon is fine: its tree still answers
    assert read_bytes(vmd_token.p("vm1", "config", "user.foo")) == b"secret-foo-77\n"


def test_agent_vouches_for_its_callers_uid(guest_bins, vmd_token, scratch):
    """Through the real agent (which got the token in AUTH): root is served,
    another uid gets the container's 401."""
    uds = os.path.join(scratch, "vm1.sock")
    iid = "5cbd7c4c-3f1b-4b57-9a43-0a9d3c0e3f11"
    mkvm(vmd_token, "vm1", uds, {"volatile.cloud-init.instance-id": iid, "user.foo": "bar"})
    g = Guest(vmd_token, scratch, uds, iid)
    sock = os.path.join(scratch, "lxd", "sock")
    try:
        g.start_agent(devlxd=sock)
        wait_for(lambda: read_bytes(vmd_token.p("vm1", "agent")).startswith(b"status: online\n"),
                 timeout=5, what="agent online")

        def curl(uid=None, path="/1.0/config/user.foo"):
            pre = [] if uid is None else ["setpriv", f"--reuid={uid}", f"--regid={uid}",
                                          "--clear-groups"]
            p = subprocess.run(pre + ["curl", "-sS", "-i", "--max-time", "10", "--unix-socket",
                                      sock, "http://lxd" + path],
                               capture_output=True, timeout=20)
            return p.stdout

        out = curl()
        assert out.startswith(b"HTTP/1.1 200 OK\r\n") and out.endswith(b"\r\n\r\nbar"), out
        for uid in (1000, 65534):
            out = curl(uid)
            assert out.startswith(b"HTTP/1.1 401 Unauthorized\r\n"), (uid, out)
            assert b"\r\nContent-Length: 32\r\n" in out, (uid, out)
            assert out.endswith(b"\r\n\r\nAccess denied for non-root user\n"), (uid, out)
        assert curl(0).endswith(b"\r\n\r\nbar")
    finally:
        g.close()
