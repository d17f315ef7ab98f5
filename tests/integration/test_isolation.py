"""The isolation audit (issue 6): from inside instance c1, try to read or
change anything of instance c2 or of the host. Every attack below must fail,
and each test says how it fails. Path, header and query tricks live in
test_devlxd_ns.py (test_no_path_reaches_another_instance); the VM transports
are audited in test_vm_host.py.

What the daemon trusts (docs/security.md): the kernel's SO_PEERCRED of the
process that connected, checked through a pidfd for as long as the
connection is used. Nothing the client sends (ancillary data, headers,
paths) can change who it is."""

import array
import os
import socket
import subprocess
import tempfile
import time

import pytest

from devlxd_util import PYTHON, devlxd, devlxd_factory, get_req, http_error, mask_dates
from devlxd_util import assert_bytes
from test_devlxd_ns import C2_SECRET, body_of, no_secret, two

__all__ = ["devlxd", "devlxd_factory"]  # the fixtures, imported for pytest

NO_INSTANCE = http_error(500, "Internal Server Error", "pid not in container?")
REQ = get_req("/1.0/config/user.foo")


def read_all(s, timeout=5.0):
    s.settimeout(timeout)
    out = b""
    while True:
        try:
            b = s.recv(65536)
        except socket.timeout:
            break
        if not b:
            break
        out += b
    return out


# ---- forged credentials ------------------------------------------------------------------------

SCM_SPOOF = r"""
import os, socket, struct, sys
pid, uid, gid = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
s.connect(sys.argv[4])
req = b"GET /1.0/config/user.foo HTTP/1.1\r\nHost: lxd\r\nConnection: close\r\n\r\n"
try:
    s.sendmsg([req], [(socket.SOL_SOCKET, socket.SCM_CREDENTIALS,
                       struct.pack("iII", pid, uid, gid))])
    sent = "spoofed"
except OSError as e:
    # the kernel refuses credentials the sender may not claim
    s.sendall(req)
    sent = "refused:%d" % e.errno
out = b""
while True:
    b = s.recv(65536)
    if not b:
        break
    out += b
sys.stdout.write(sent + "\n")
sys.stdout.flush()
sys.stdout.buffer.write(out)
"""


def test_spoofed_scm_credentials(devlxd):
    """SCM_CREDENTIALS naming c2's init (sent by host root, who may claim
    any pid) or uid 0 (sent by a non-root process of c1) change nothing: the
    daemon never reads ancillary credentials, only SO_PEERCRED, which the
    kernel fills in at connect()."""
    ct1, a1, ct2, a2 = two(devlxd)
    sock = devlxd.sock
    # Host root claims to be c2's init: still "no instance".
    p = subprocess.run([PYTHON, "-c", SCM_SPOOF, str(ct2.pid), "0", "0", sock],
                       capture_output=True, timeout=30)
    sent, _, resp = p.stdout.partition(b"\n")
    assert sent == b"spoofed", p
    assert_bytes(mask_dates(resp), NO_INSTANCE, "host process claiming c2's init pid")
    no_secret(resp, "SCM_CREDENTIALS spoof")
    # uid 1000 in c1 claims uid 0: the kernel refuses it (EPERM), and the
    # request answered over the same connection is still a non-root one.
    p = ct1.run([PYTHON, "-c", SCM_SPOOF, "1", "0", "0", "/dev/lxd/sock"], uid=1000)
    sent, _, resp = p.stdout.partition(b"\n")
    assert sent == b"refused:1", p
    assert_bytes(mask_dates(resp), http_error(401, "Unauthorized",
                                              "Access denied for non-root user"),
                 "uid 1000 claiming uid 0")
    # And c2 is untouched.
    assert body_of(a2, "/1.0/config/user.foo") == C2_SECRET.encode()


# ---- a connection handed to another instance ----------------------------------------------------

RECV_FD = r"""
import array, os, socket, sys
path = sys.argv[1]
l = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
l.bind(path)
os.chmod(path, 0o777)
l.listen(1)
sys.stdout.write("listening\n"); sys.stdout.flush()
c, _ = l.accept()
fds = array.array("i")
msg, anc, flags, addr = c.recvmsg(16, socket.CMSG_LEN(fds.itemsize))
for level, kind, data in anc:
    if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
        fds.frombytes(data[:fds.itemsize])
s = socket.socket(fileno=fds[0])
c.recv(1)            # the sender says "go" (after it exited, or not)
s.sendall(b"GET /1.0/config/user.foo HTTP/1.1\r\nHost: lxd\r\nConnection: close\r\n\r\n")
out = b""
s.settimeout(5)
while True:
    b = s.recv(65536)
    if not b:
        break
    out += b
sys.stdout.buffer.write(out)
"""

SEND_FD = r"""
import os, socket, sys, time
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect("/dev/lxd/sock")
c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
c.connect(sys.argv[1])
c.sendmsg([b"x"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, bytes(__import__("array").array("i", [s.fileno()])))])
s.close()
if sys.argv[2] == "exit":
    # hand the "go" byte to a child that outlives us: the connecting process is gone
    if os.fork() == 0:
        time.sleep(0.3)
        c.send(b"g")
        os._exit(0)
    os._exit(0)
c.send(b"g")
time.sleep(3)
"""


@pytest.mark.parametrize("sender", ["exits", "stays"])
def test_connection_passed_between_instances(devlxd, sender):
    """A process of c2 connects to its /dev/lxd/sock and passes the socket
    to c1 over SCM_RIGHTS.
    - When the process that connected has exited, the connection speaks for
      nobody: c1 gets 500 "pid not in container?", never c2's data (the
      pidfd taken at accept says the connector is gone).
    - While that process lives, the connection still speaks for it: c2 has
      delegated its view, as handing over a file it read would. That is
      c2's own choice, so the test only checks that c1's own instance is
      not confused with c2 and that nothing of c2 changes."""
    ct1, a1, ct2, a2 = two(devlxd)
    stage = tempfile.mkdtemp(prefix="gl-iso-", dir="/tmp")
    path = os.path.join(stage, "pass.sock")
    try:
        rx = ct1.popen([PYTHON, "-u", "-c", RECV_FD, path])
        assert rx.stdout.readline() == b"listening\n"
        tx = ct2.run([PYTHON, "-c", SEND_FD, path, "exit" if sender == "exits" else "stay"],
                     timeout=30)
        out, err = rx.communicate(timeout=30)
        assert rx.returncode == 0, err
        if sender == "exits":
            assert_bytes(mask_dates(out), NO_INSTANCE, "connection of an exited c2 process")
            no_secret(out, "passed connection")
        else:
            assert out.startswith(b"HTTP/1.1 200 OK"), out
            assert out.endswith(C2_SECRET.encode()), out
        del tx
        # c1's own connections still see c1; c2 still has its data.
        assert body_of(a1, "/1.0/config/user.foo") == b"bar"
        assert body_of(a2, "/1.0/config/user.foo") == C2_SECRET.encode()
    finally:
        subprocess.run(["rm", "-rf", stage])


# ---- a recycled pid --------------------------------------------------------------------------

RECYCLE = r"""
import os, socket, sys
want = int(sys.argv[1])
# ask the kernel for exactly the pid c2's init had: ns_last_pid is the pid
# handed out last in this (the host's) pid namespace
for attempt in range(50):
    with open("/proc/sys/kernel/ns_last_pid", "w") as f:
        f.write(str(want - 1))
    pid = os.fork()
    if pid == 0:
        if os.getpid() != want:
            os._exit(3)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(sys.argv[2])
        s.sendall(b"GET /1.0/config/user.foo HTTP/1.1\r\nHost: lxd\r\nConnection: close\r\n\r\n")
        out = b""
        while True:
            b = s.recv(65536)
            if not b:
                break
            out += b
        sys.stdout.buffer.write(out)
        sys.stdout.flush()
        os._exit(0)
    _, st = os.waitpid(pid, 0)
    if os.WEXITSTATUS(st) == 0:
        sys.exit(0)
sys.exit(9)
"""


def test_recycled_pid_of_a_dead_init(devlxd):
    """c2's init exits; a host process then gets exactly that pid (forced
    through ns_last_pid) and connects: it is no instance (500)."""
    ct1, a1, ct2, a2 = two(devlxd)
    old_pid = ct2.pid
    sock = devlxd.sock
    ct2.stop()
    devlxd.wait_attr("c2", "state", b"Stopped\n")
    p = subprocess.run([PYTHON, "-c", RECYCLE, str(old_pid), sock], capture_output=True,
                       timeout=60)
    if p.returncode == 9:
        pytest.skip(f"pid {old_pid} could not be recycled (taken meanwhile)")
    assert p.returncode == 0, p
    assert_bytes(mask_dates(p.stdout), NO_INSTANCE, f"a new process with c2's old pid {old_pid}")
    # Re-binding c2's init-pid to the new holder of that pid is an
    # operator's act; nothing the new process did made it c2.
    assert devlxd.attr("c2", "init-pid") == b"\n"
    assert body_of(a1, "/1.0/config/user.foo") == b"bar"


# ---- changing pid namespace after connecting ------------------------------------------------------

SETNS = r"""
import ctypes, os, socket, sys
target = int(sys.argv[1])
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(sys.argv[2])
fd = os.open(f"/proc/{target}/ns/pid", os.O_RDONLY)
libc = ctypes.CDLL(None, use_errno=True)
if libc.setns(fd, 0x20000000) != 0:   # CLONE_NEWPID
    sys.exit("setns: errno %d" % ctypes.get_errno())
pid = os.fork()     # the child is in the target's pid namespace
if pid == 0:
    s.sendall(b"GET /1.0/config/user.foo HTTP/1.1\r\nHost: lxd\r\nConnection: close\r\n\r\n")
    out = b""
    while True:
        b = s.recv(65536)
        if not b:
            break
        out += b
    sys.stdout.buffer.write(out)
    sys.stdout.flush()
    os._exit(0)
os.waitpid(pid, 0)
"""


def test_changing_pid_namespace_after_connecting(devlxd):
    """A host process connects (no instance), then joins c2's pid namespace
    and has a child there speak on the connection: still no instance. The
    identity is the connecting process's, fixed at connect()."""
    ct1, a1, ct2, a2 = two(devlxd)
    p = subprocess.run([PYTHON, "-c", SETNS, str(ct2.pid), devlxd.sock],
                       capture_output=True, timeout=30)
    assert p.returncode == 0, p
    assert_bytes(mask_dates(p.stdout), NO_INSTANCE, "connected on the host, then setns into c2")
    no_secret(p.stdout, "setns")


# ---- image export outside the images directory ----------------------------------------------------

def test_image_export_never_leaves_the_images_dir(devlxd):
    """A link in the images directory named like an image (and marked
    public) that points at a host file is not followed: 404. Fingerprints
    with '/', '..' or NUL never name a file (test_devlxd_ns)."""
    ct1, a1, ct2, a2 = two(devlxd)
    images = devlxd.images
    os.makedirs(images, exist_ok=True)
    fp = "ab" * 32
    secret = os.path.join(tempfile.mkdtemp(prefix="gl-iso-host-", dir="/tmp"), "shadow")
    with open(secret, "wb") as f:
        f.write(b"host-secret-5b2c")
    os.symlink(secret, os.path.join(images, fp + ".tar.gz"))
    open(os.path.join(images, fp + ".public"), "wb").close()
    res = a1.exchange(get_req(f"/1.0/images/{fp}/export"))
    assert res.data.startswith(b"HTTP/1.1 404 Not Found\r\n"), res.data
    assert b"host-secret-5b2c" not in res.data
    for target in ("..%2F..%2F..%2Fetc%2Fpasswd", "%2Fetc%2Fpasswd", "ab%00cd",
                   "..", fp + "%2F..%2F..%2Fshadow"):
        res = a1.exchange(get_req(f"/1.0/images/{target}/export"))
        assert res.data.startswith(b"HTTP/1.1 404 Not Found\r\n") or \
            res.data.startswith(b"HTTP/1.1 301 "), (target, res.data)
        assert b"root:" not in res.data and b"host-secret" not in res.data
    subprocess.run(["rm", "-rf", os.path.dirname(secret)])


# ---- VM transports ------------------------------------------------------------------------------

from test_vm_host import mkvm, scratch  # noqa: E402,F401  (fixtures)
from vm_util import vmenv, vmenv_factory  # noqa: E402,F401  (fixtures)


@pytest.fixture
def vmd_raw(daemon_factory):
    """A daemon whose VM transports take raw HTTP (--vm-devlxd-auth none):
    whoever speaks there is the VM's root, so what they say is audited
    here; the default (the agent's preamble) is audited below."""
    return daemon_factory(args=["--vm-devlxd-auth", "none"])

VM2_SECRET = "vm2-secret-41aa"


def raw_exchange(path, data, timeout=5.0):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(path)
    s.sendall(data)
    out = read_all(s, timeout)
    s.close()
    return out


def test_vm_transport_cannot_claim_another_vm(vmd_raw, scratch):
    """What arrives on vm1's transport (<uds>_7362) is vm1, whatever it says:
    headers, paths and queries naming vm2, a CONNECT line as if to reach
    another port, get vm1's data or an error, never vm2's."""
    vmd = vmd_raw
    uds1, uds2 = os.path.join(scratch, "vm1.sock"), os.path.join(scratch, "vm2.sock")
    mkvm(vmd, "vm1", uds1, {"user.foo": "one"})
    mkvm(vmd, "vm2", uds2, {"user.foo": VM2_SECRET, "user.meta-data": VM2_SECRET})
    t1 = uds1 + "_7362"
    tricks = [
        b"GET /1.0/config/user.foo HTTP/1.1\r\nHost: vm2\r\nConnection: close\r\n\r\n",
        b"GET /1.0/config/user.foo HTTP/1.1\r\nHost: lxd\r\nX-LXD-Instance: vm2\r\n"
        b"Forwarded: for=vm2\r\nConnection: close\r\n\r\n",
        b"GET /1.0/config/user.foo?instance=vm2&project=vm2 HTTP/1.1\r\nHost: lxd\r\n"
        b"Connection: close\r\n\r\n",
        b"GET /1.0/config/..%2F..%2Fvm2%2Fconfig%2Fuser.foo HTTP/1.1\r\nHost: lxd\r\n"
        b"Connection: close\r\n\r\n",
        b"GET /vm2/1.0/meta-data HTTP/1.1\r\nHost: lxd\r\nConnection: close\r\n\r\n",
        b"CONNECT 7362\nGET /1.0/config/user.foo HTTP/1.1\r\nHost: lxd\r\nConnection: close"
        b"\r\n\r\n",
        b"GET " + uds2.encode() + b"_7362 HTTP/1.1\r\nHost: lxd\r\nConnection: close\r\n\r\n",
    ]
    for t in tricks:
        out = raw_exchange(t1, t)
        assert VM2_SECRET.encode() not in out, (t, out)
        assert out.startswith(b"HTTP/1.1 "), (t, out)
    # and vm1's own answer is vm1's
    out = raw_exchange(t1, tricks[0])
    assert out.endswith(b"\r\n\r\none"), out


# Straight to the emulator's guest end, as any process of the guest could
# (AF_VSOCK needs no privilege): CONNECT to the host's devlxd port, then HTTP.
RAW_GUEST = r"""
import os, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(10)
s.connect(sys.argv[1])
s.sendall(b"CONNECT 7362\n")
line = b""
while not line.endswith(b"\n"):
    b = s.recv(1)
    if not b:
        break
    line += b
out = b""
try:
    s.sendall(sys.argv[2].encode().decode("unicode_escape").encode("latin-1"))
    while True:
        b = s.recv(65536)
        if not b:
            break
        out += b
except (ConnectionResetError, BrokenPipeError):
    pass
sys.stdout.write(repr((line, out)))
"""


def test_vm_guest_uid_reaches_the_host(vmenv):
    """With the default --vm-devlxd-auth token: through the agent, a
    non-root process of the guest gets LXD's 401 and root gets 200; a guest
    process that skips the agent and dials the host's devlxd port itself
    (it has no token) gets nothing, whatever it sends."""
    vm = vmenv.mkvm("vm1", config={"user.foo": "bar"})
    status, out = vm.ns.curl("http://lxd/1.0/config/user.foo", "-i")
    assert status == 0 and out.startswith(b"HTTP/1.1 200 OK\r\n"), out
    assert out.endswith(b"\r\n\r\nbar"), out
    for uid in (1000, 65534):
        p = subprocess.run(vm.ns.nsenter(["curl", "-sS", "-i", "--max-time", "10", "--unix-socket",
                                          "/dev/lxd/sock", "http://lxd/1.0/config/user.foo"],
                                         uid=uid), capture_output=True, timeout=20)
        assert p.stdout.startswith(b"HTTP/1.1 401 Unauthorized\r\n"), (uid, p.stdout, p.stderr)
        assert p.stdout.endswith(b"\r\n\r\nAccess denied for non-root user\n"), p.stdout
        assert b"bar" not in p.stdout
    # (as the guest's root: the emulator's socket file is root's, where a
    # real VM's AF_VSOCK would let any uid connect; without the token root
    # gets no more than anyone)
    host_end = os.path.join(vm.guest, "host")
    tok = "00" * 32
    for data in (r"GET /1.0/config/user.foo HTTP/1.1\r\nHost: lxd\r\n\r\n",
                 r"GLDEVLXD1 - 0\nGET /1.0/config/user.foo HTTP/1.1\r\nHost: lxd\r\n\r\n",
                 rf"GLDEVLXD1 {tok} 0\nGET /1.0 HTTP/1.1\r\nHost: lxd\r\n\r\n",
                 r"PATCH /1.0 HTTP/1.1\r\nHost: lxd\r\nContent-Length: 17\r\n\r\n"
                 r'{"state":"Ready"}'):
        p = subprocess.run(vm.ns.nsenter([PYTHON, "-c", RAW_GUEST, host_end, data]),
                           capture_output=True, timeout=30)
        assert p.returncode == 0, p.stderr
        line, out = eval(p.stdout)  # our own repr
        # the emulator put it through to the host, which said nothing
        assert line in (b"OK\n",) or line.startswith(b"OK "), (data, line)
        assert out == b"", (data, out)
    with open(vmenv.gl.p("vm1", "state"), "rb") as f:
        assert f.read() != b"Ready\n"
    # the agent still serves root afterwards
    status, out = vm.ns.curl("http://lxd/1.0/config/user.foo")
    assert (status, out) == (0, b"bar")
