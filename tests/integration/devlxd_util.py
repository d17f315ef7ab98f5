"""Helpers for the devlxd tests (issue 4): a guestlinkd with its devlxd
socket, "containers" (a process tree in new pid + mount namespaces, the
socket's directory bind-mounted at /dev/lxd as LXD does), a small agent
that runs inside a container and talks to the socket for the test, the
LXD 5.0.2 capture files, and the byte comparisons.

The fixtures `devlxd` (function scope, on top of conftest's daemon_factory)
and `devlxd_module` (a factory for module-scoped environments) are meant to
be imported by the test modules: `from devlxd_util import devlxd`.

Why an agent: the daemon tells instances apart by the pid namespace of the
process that connected, so every request of a test must come from a process
inside the right namespace. Starting one `nsenter ... python3` per request
would cost ~50 ms each; the agent is started once per container (and uid)
and executes small JSON commands (connect, send, recv, exchange, ...) sent
on its stdin."""

import ast
import atexit
import base64
import email.utils
import hashlib
import json
import os
import re
import select
import shutil
import signal
from signal import SIGKILL
import stat
import subprocess
import tempfile
import time

def _readable(f, timeout):
    """select() for one descriptor, without select()'s FD_SETSIZE limit
    (tests hold thousands of connections open)."""
    p = select.poll()
    p.register(f, select.POLLIN | select.POLLHUP | select.POLLERR)
    return bool(p.poll(max(0, timeout) * 1000))


import pytest

import glutil
from glutil import GUESTLINKD, REPO, Guestlinkd, write_bytes

CAPTURES = os.environ.get("GL_CAPTURES") or os.path.realpath(
    os.path.join(REPO, "..", "shared", "specs", "lxd-5.0.2-captures"))
BUILD = os.path.dirname(GUESTLINKD)
LOADGEN = os.path.join(BUILD, "tools", "loadgen")
PYTHON = "/usr/bin/python3"
SOCK_IN_CONTAINER = "/dev/lxd/sock"

# The instance of the captures (captures README).
C1_INSTANCE_ID = "856fc818-f65d-440f-b283-2b893183ee4d"
C2_INSTANCE_ID = "75b5bb7f-80c7-423f-ad4f-b76d0e90f044"
C1_CONFIG = {
    "user.foo": "bar",
    "user.meta-data": "foo: meta\nbar: 2",
    "cloud-init.user-data": "#cloud-config\npackages:\n  - hello",
    "security.devlxd.images": "true",
    "volatile.cloud-init.instance-id": C1_INSTANCE_ID,
    # 05b reads these two as "non-user keys that exist".
    "volatile.base_image": "05fb4e3cbc61661ad118936ddaeb0ebea0dd66aa8c4f6d1e01601294b2a37d32",
    "image.os": "Debian",
}
C1_DEVICES = {
    # LXD's comes from the default profile; guestlink has no profiles.
    "root": {"path": "/", "pool": "default", "type": "disk"},
    "share": {"path": "/mnt/share", "source": "/var/tmp/lxdshare", "type": "disk"},
}
C2_CONFIG = {
    "user.foo": "c2value",
    "volatile.cloud-init.instance-id": C2_INSTANCE_ID,
}


# ---- the daemon's devlxd option ---------------------------------------------------------

_HELP = None


def devlxd_missing():
    """Why the daemon cannot serve devlxd, or None."""
    global _HELP
    if not os.access(GUESTLINKD, os.X_OK):
        return f"no daemon binary at {GUESTLINKD} (run make, or set GUESTLINKD)"
    if _HELP is None:
        p = subprocess.run([GUESTLINKD, "--help"], capture_output=True, text=True, timeout=10)
        _HELP = p.stdout + p.stderr
    if "--devlxd-socket" not in _HELP:
        return f"{GUESTLINKD} has no --devlxd-socket option (devlxd not wired into fsd/main.c)"
    return None


def require_devlxd():
    """A daemon without the devlxd face fails these tests: the feature is
    what they test, not a prerequisite of the machine."""
    why = devlxd_missing()
    if why:
        pytest.fail(why, pytrace=False)


def make_sockdir():
    """A short directory for the socket (sun_path holds 107 bytes; pytest's
    tmp paths can be longer), world-readable so that non-root callers in a
    container reach /dev/lxd/sock."""
    d = tempfile.mkdtemp(prefix="gl-devlxd-", dir="/tmp")
    os.chmod(d, 0o755)
    return d


def wait_socket(path, proc=None, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if stat.S_ISSOCK(os.lstat(path).st_mode):
                return
        except FileNotFoundError:
            pass
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"guestlinkd exited with {proc.returncode} before creating {path}")
        time.sleep(0.01)
    raise AssertionError(f"no socket at {path} within {timeout}s")


# ---- containers -------------------------------------------------------------------------------

# Runs as pid 1 of the new pid namespace, in the new mount namespace: a
# tmpfs over /dev with the few nodes a process needs, and the socket's
# directory bind-mounted at /dev/lxd (what LXD does), staged under $2 and
# moved over /dev in one step. Nothing of it is visible on the host.
CONTAINER_SH = r'''
set -e
sockdir=$1
stage=$2
mount -t tmpfs -o mode=0755,size=1m gl-dev "$stage"
for n in null zero full random urandom tty; do
	touch "$stage/$n"
	mount --bind "/dev/$n" "$stage/$n"
done
mkdir "$stage/pts" "$stage/shm" "$stage/lxd"
ln -s /proc/self/fd "$stage/fd"
ln -s /proc/self/fd/0 "$stage/stdin"
ln -s /proc/self/fd/1 "$stage/stdout"
ln -s /proc/self/fd/2 "$stage/stderr"
mount --bind "$sockdir" "$stage/lxd"
mount --move "$stage" /dev
echo ready
exec sleep infinity >/dev/null 2>&1
'''


class Container:
    """A stand-in container: `unshare --pid --fork --mount-proc --mount`
    whose init (pid 1 inside) sleeps. `pid` is that init's host pid, what
    MNT/<name>/init-pid takes."""

    def __init__(self, sockdir, name="c"):
        self.name = name
        self.stage = tempfile.mkdtemp(prefix=f"gl-ct-{name}-", dir="/tmp")
        self.proc = subprocess.Popen(
            ["unshare", "--pid", "--fork", "--mount-proc", "--mount", "--propagation", "private",
             "/bin/sh", "-c", CONTAINER_SH, "sh", sockdir, self.stage],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.agents = []
        line = _readline(self.proc.stdout, 10.0)
        if line != b"ready\n":
            err = self.proc.stderr.read1(65536) if self.proc.poll() is not None else b""
            self.stop()
            raise AssertionError(f"container {name} did not start: {line!r} {err!r}")
        self.pid = self._init_pid()

    def _init_pid(self):
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                with open(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children") as f:
                    kids = f.read().split()
                if kids:
                    return int(kids[0])
            except OSError:
                pass
            time.sleep(0.01)
        raise AssertionError(f"no init process under unshare (pid {self.proc.pid})")

    @property
    def alive(self):
        return self.proc.poll() is None

    def nsenter(self, argv, uid=None, mount=True):
        """argv run inside the container (pid namespace, and mount
        namespace unless mount=False), as `uid` (gid = uid, no groups)."""
        pre = ["nsenter", "-t", str(self.pid), "-p"] + (["-m"] if mount else []) + ["--"]
        if uid is not None:
            pre += ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]
        return pre + list(argv)

    def popen(self, argv, uid=None, mount=True, **kw):
        """Started in a session of its own: kill_tree() ends nsenter and
        the process it forked into the namespace."""
        kw.setdefault("start_new_session", True)
        kw.setdefault("stdin", subprocess.DEVNULL)
        kw.setdefault("stdout", subprocess.PIPE)
        kw.setdefault("stderr", subprocess.PIPE)
        return subprocess.Popen(self.nsenter(argv, uid, mount), **kw)

    def run(self, argv, uid=None, mount=True, timeout=60, check=True, **kw):
        p = subprocess.run(self.nsenter(argv, uid, mount), capture_output=True, timeout=timeout,
                           **kw)
        if check and p.returncode != 0:
            raise AssertionError(f"{argv!r} in container {self.name} exited {p.returncode}:\n"
                                 f"stdout: {p.stdout[-4000:]!r}\nstderr: {p.stderr[-4000:]!r}")
        return p

    def agent(self, uid=None):
        a = Agent(self, uid=uid)
        self.agents.append(a)
        return a

    def stop(self):
        """Kill the init: the kernel kills everything else in the namespace."""
        for a in self.agents:
            a.close()
        self.agents = []
        if self.proc.poll() is None:
            try:
                os.kill(self.pid, SIGKILL)
            except (ProcessLookupError, AttributeError):
                self.proc.kill()
            # The init's exit waits until every process of the namespace is
            # reaped; one whose nsenter was killed was re-parented to pytest
            # (a child subreaper), so reap such orphans while waiting.
            deadline = time.monotonic() + 10
            while self.proc.poll() is None and time.monotonic() < deadline:
                reap_orphans(keep=(self.proc.pid,))
                time.sleep(0.01)
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        self.proc.stdout.close()
        self.proc.stderr.close()
        try:
            os.rmdir(self.stage)
        except OSError:
            pass


class _Lines:
    """Lines from a pipe, with a timeout per line."""

    def __init__(self, f):
        self.fd = f.fileno()
        self.buf = b""

    def readline(self, timeout):
        """One line, or what came before EOF/timeout (no newline then)."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0 or not _readable(self.fd, left):
                break
            b = os.read(self.fd, 1 << 20)
            if not b:
                break
            self.buf += b
        line, nl, self.buf = self.buf.partition(b"\n")
        return line + nl


def reap_orphans(keep=()):
    """Reap exited children that no Popen object waits for."""
    for pid, st, _ in glutil.live_children():
        if st == "Z" and pid not in keep:
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass


def kill_tree(proc):
    """SIGKILL a process started with start_new_session and everything in
    its process group (nsenter's child inside the namespace included)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def _readline(f, timeout):
    """One line from a pipe read byte by byte (nothing read past it)."""
    fd = f.fileno()
    buf = b""
    deadline = time.monotonic() + timeout
    while not buf.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0 or not _readable(fd, left):
            break
        b = os.read(fd, 1)
        if not b:
            break
        buf += b
    return buf


# ---- the agent ------------------------------------------------------------------------------

# Runs inside a container (or on the host for "no instance" callers), stdlib
# only. One JSON command a line on stdin, one JSON answer a line on stdout.
AGENT_SRC = r'''
import base64, hashlib, json, os, resource, select, socket, sys, time

try:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
except (ValueError, OSError):
    pass

SOCK = sys.argv[1]
conns = {}

def _readable(f, timeout):
    p = select.poll()
    p.register(f, select.POLLIN | select.POLLHUP | select.POLLERR)
    return bool(p.poll(max(0, timeout) * 1000))

next_id = [1]

def connect(path=None):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path or SOCK)
    except BaseException:
        s.close()
        raise
    cid = next_id[0]
    next_id[0] += 1
    conns[cid] = s
    return cid

def recv(s, timeout=5.0, idle=None, want=None, digest=False, any=False, linger=None):
    """Read until EOF, until `want` bytes (then, with `linger`, on for that
    many seconds to catch extra bytes or an EOF), until `idle` seconds pass
    without data (once some arrived), until the first data (`any`), or
    until `timeout`."""
    data = bytearray()
    h = hashlib.sha256() if digest else None
    total = 0
    eof = reset = False
    start = time.monotonic()
    deadline = start + timeout
    last = start
    while True:
        now = time.monotonic()
        limit = deadline - now
        if idle is not None and total:
            limit = min(limit, last + idle - now)
        if limit <= 0:
            break
        if not _readable(s, limit):
            break
        try:
            b = s.recv(1 << 20)
        except ConnectionResetError:
            eof = reset = True
            break
        if not b:
            eof = True
            break
        total += len(b)
        last = time.monotonic()
        if digest:
            keep = max(0, 65536 - len(data))
            data += b[:keep]
            h.update(b)
        else:
            data += b
        if want is not None and total >= want:
            if not linger:
                break
            want = None
            deadline = min(deadline, last + linger)
        if any:
            break
    out = {"data": base64.b64encode(bytes(data)).decode(), "eof": eof, "reset": reset,
           "total": total, "elapsed": time.monotonic() - start}
    if digest:
        out["sha256"] = h.hexdigest()
    return out

def orphan_exchange(data, timeout):
    """Connect, then let the connecting process die; its child (same pid
    namespace, not the peer the server saw) sends the request."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(SOCK)
            rr, ww = os.pipe()
            if os.fork() == 0:
                os.close(ww)
                os.read(rr, 1)          # EOF once the connecting process is gone
                time.sleep(0.2)
                s.sendall(data)
                res = recv(s, timeout=timeout)
                os.write(w, json.dumps(res).encode())
                os._exit(0)
            os._exit(0)
        except BaseException as e:
            os.write(w, json.dumps({"exc": repr(e)}).encode())
            os._exit(1)
    os.close(w)
    os.waitpid(pid, 0)
    out = b""
    while True:
        b = os.read(r, 1 << 20)
        if not b:
            break
        out += b
    os.close(r)
    return json.loads(out or b'{"exc": "no answer"}')

def handle(cmd):
    op = cmd["op"]
    if op == "info":
        with open("/proc/self/status") as f:
            nspid = [l.split()[1:] for l in f if l.startswith("NSpid:")][0]
        return {"pid": os.getpid(), "uid": os.getuid(), "gid": os.getgid(), "nspid": nspid}
    if op == "connect":
        return {"id": connect(cmd.get("path"))}
    if op == "send":
        conns[cmd["id"]].sendall(base64.b64decode(cmd["data"]))
        return {}
    if op == "recv":
        return recv(conns[cmd["id"]], cmd.get("timeout", 5.0), cmd.get("idle"), cmd.get("want"),
                    cmd.get("digest", False), cmd.get("any", False))
    if op == "shutdown":
        conns[cmd["id"]].shutdown(socket.SHUT_WR)
        return {}
    if op == "close":
        s = conns.pop(cmd["id"], None)
        if s:
            s.close()
        return {}
    if op == "exchange":
        cid = connect(cmd.get("path"))
        s = conns[cid]
        try:
            for i, part in enumerate(cmd["parts"]):
                if i:
                    time.sleep(cmd.get("gap", 0.0))
                s.sendall(base64.b64decode(part))
            if cmd.get("shut_wr"):
                s.shutdown(socket.SHUT_WR)
            return recv(s, cmd.get("timeout", 5.0), cmd.get("idle"), cmd.get("want"),
                        cmd.get("digest", False), linger=cmd.get("linger"))
        finally:
            conns.pop(cid).close()
    if op == "open_many":
        ids, errors = [], []
        for _ in range(cmd["n"]):
            try:
                ids.append(connect(cmd.get("path")))
            except OSError as e:
                errors.append(e.errno)
        return {"ids": ids, "errors": errors}
    if op == "count_closed":
        closed = 0
        for cid in cmd["ids"]:
            s = conns.get(cid)
            if s is None or _readable(s, 0):
                closed += 1
        return {"closed": closed}
    if op == "close_many":
        for cid in cmd["ids"]:
            s = conns.pop(cid, None)
            if s:
                s.close()
        return {}
    if op == "orphan_exchange":
        return orphan_exchange(base64.b64decode(cmd["data"]), cmd.get("timeout", 5.0))
    if op == "py":
        ns = {"connect": connect, "conns": conns, "recv": recv, "SOCK": SOCK}
        exec(cmd["code"], ns)
        return {"result": ns.get("result")}
    raise ValueError("unknown op " + op)

for line in sys.stdin:
    try:
        out = handle(json.loads(line))
    except Exception as e:
        out = {"exc": repr(e), "errno": getattr(e, "errno", None)}
    sys.stdout.write(json.dumps(out) + "\n")
    sys.stdout.flush()
'''


class AgentError(AssertionError):
    def __init__(self, ans):
        super().__init__(f"agent: {ans.get('exc')}")
        self.errno = ans.get("errno")
        self.ans = ans


class Result:
    """What a read returned: data (bytes), eof, reset, total, elapsed,
    sha256 (digest reads: data holds the first 64 KiB only)."""

    def __init__(self, ans):
        self.data = base64.b64decode(ans["data"])
        self.eof = ans["eof"]
        self.reset = ans.get("reset", False)
        self.total = ans["total"]
        self.elapsed = ans["elapsed"]
        self.sha256 = ans.get("sha256")

    def __repr__(self):
        return f"Result(eof={self.eof}, total={self.total}, data={self.data[:600]!r})"


_AGENT_FILE = None


def agent_file():
    """AGENT_SRC in a file every container can read (/tmp is the host's
    file system in their mount namespaces): a short command line in ps."""
    global _AGENT_FILE
    if _AGENT_FILE is None or not os.path.exists(_AGENT_FILE):
        d = tempfile.mkdtemp(prefix="gl-agent-", dir="/tmp")
        os.chmod(d, 0o755)
        path = os.path.join(d, "devlxd_agent.py")
        with open(path, "w") as f:
            f.write(AGENT_SRC)
        os.chmod(path, 0o644)
        atexit.register(shutil.rmtree, d, True)
        _AGENT_FILE = path
    return _AGENT_FILE


class Agent:
    """The agent in `container` (None: on the host, in no instance)."""

    def __init__(self, container=None, uid=None, sock=None):
        self.container = container
        src_argv = [PYTHON, "-u", agent_file(), sock or SOCK_IN_CONTAINER]
        if container is None:
            assert sock, "a host agent needs the host path of the socket"
            argv = src_argv
            if uid is not None:
                argv = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"] + argv
        else:
            argv = container.nsenter(src_argv, uid=uid)
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, start_new_session=True)
        self.lines = _Lines(self.proc.stdout)
        self.info = self.call("info")

    def call(self, op, rpc_timeout=None, **kw):
        """Run one command; kw are its arguments (a `timeout` among them is
        the command's own). Waits up to rpc_timeout for the answer."""
        if rpc_timeout is None:
            rpc_timeout = 30.0 + kw.get("timeout", 0) + kw.get("gap", 0) * len(kw.get("parts", ()))
        kw["op"] = op
        assert self.proc.poll() is None, \
            f"agent exited with {self.proc.returncode}: {self.proc.stderr.read()!r}"
        self.proc.stdin.write((json.dumps(kw) + "\n").encode())
        self.proc.stdin.flush()
        line = self.lines.readline(rpc_timeout)
        if not line.endswith(b"\n"):
            raise AssertionError(f"agent gave no answer to {op} within {rpc_timeout}s: {line!r}")
        ans = json.loads(line)
        if "exc" in ans:
            raise AgentError(ans)
        return ans

    def exchange(self, data, timeout=5.0, idle=None, want=None, gap=0.0, digest=False,
                 shut_wr=False, linger=None):
        """Connect, send `data` (bytes, or a list of parts sent `gap`
        seconds apart), read (see the agent's recv), close."""
        parts = data if isinstance(data, list) else [data]
        ans = self.call("exchange", parts=[base64.b64encode(p).decode() for p in parts],
                        timeout=timeout, idle=idle, want=want, gap=gap, digest=digest,
                        shut_wr=shut_wr, linger=linger)
        return Result(ans)

    def get(self, path, headers=b"", close=True, timeout=5.0):
        """GET path with Host: lxd; returns the parsed response."""
        req = (b"GET " + path.encode() + b" HTTP/1.1\r\nHost: lxd\r\n" + headers +
               (b"Connection: close\r\n" if close else b"") + b"\r\n")
        res = self.exchange(req, timeout=timeout, idle=None if close else 0.5)
        return parse_response(res.data)

    def connect(self):
        return RConn(self, self.call("connect")["id"])

    def py(self, code, timeout=60.0):
        return self.call("py", code=code, rpc_timeout=timeout)["result"]

    def close(self):
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                kill_tree(self.proc)
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            try:
                f.close()
            except OSError:
                pass


class RConn:
    """A connection held open by an agent; reads accumulate in `buf`."""

    def __init__(self, agent, cid):
        self.agent = agent
        self.id = cid
        self.buf = b""
        self.eof = False
        self.reset = False

    def send(self, data):
        self.agent.call("send", id=self.id, data=base64.b64encode(data).decode())

    def try_send(self, data):
        """send, returning the errno of a failure (0 on success)."""
        try:
            self.send(data)
            return 0
        except AgentError as e:
            return e.errno or -1

    def recv(self, timeout=1.0, idle=None, want=None, any=True):
        """Read what arrives within timeout: by default returns with the
        first data (any=False: wait for EOF, `want` bytes or `idle`)."""
        res = Result(self.agent.call("recv", id=self.id, timeout=timeout, idle=idle, want=want,
                                     any=any))
        self.buf += res.data
        self.eof = self.eof or res.eof
        self.reset = self.reset or res.reset
        return res.data

    def read_until(self, pred, timeout=10.0, what="data"):
        """Read until pred(self.buf) is true; fails on timeout or EOF."""
        deadline = time.monotonic() + timeout
        while not pred(self.buf):
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {what} within {timeout}s; have {self.buf[-2000:]!r}")
            if self.eof:
                raise AssertionError(f"EOF before {what}; have {self.buf[-2000:]!r}")
            self.recv(timeout=min(left, 0.5))
        return self.buf

    def read_eof(self, timeout=5.0):
        """Read until the server closes; fails on timeout."""
        deadline = time.monotonic() + timeout
        while not self.eof:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"server did not close within {timeout}s; "
                                     f"have {self.buf[-2000:]!r}")
            self.recv(timeout=min(left, 0.5))
        return self.buf

    def take(self, n):
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def shutdown(self):
        self.agent.call("shutdown", id=self.id)

    def close(self):
        self.agent.call("close", id=self.id)


# ---- the environment: daemon + socket + containers ------------------------------------------


class DevlxdEnv:
    """A guestlinkd serving devlxd on `sock`, and the containers of a test."""

    def __init__(self, gl, sockdir):
        self.gl = gl
        self.sockdir = sockdir
        self.sock = os.path.join(sockdir, "sock")
        self.containers = []
        self.host_agents = []

    @property
    def images(self):
        return os.path.join(self.gl.state, "images")

    def container(self, name=None, bind=True):
        """A new container; bound to instance `name` when given."""
        c = Container(self.sockdir, name or "x")
        self.containers.append(c)
        if name and bind:
            self.bind(name, c.pid)
        return c

    def bind(self, name, pid):
        write_bytes(self.gl.p(name, "init-pid"), f"{pid}\n")

    def unbind(self, name):
        write_bytes(self.gl.p(name, "init-pid"), "\n")

    def host_agent(self, uid=None):
        a = Agent(None, uid=uid, sock=self.sock)
        self.host_agents.append(a)
        return a

    # the model, through the FUSE tree
    def mkinstance(self, name, config=None, devices=None):
        os.mkdir(self.gl.p(name))
        for k, v in (config or {}).items():
            self.set(name, k, v)
        for k, v in (devices or {}).items():
            self.device(name, k, v)

    def set(self, name, key, value):
        """Store exactly `value` (the tree drops one trailing newline)."""
        if isinstance(value, str):
            value = value.encode()
        write_bytes(self.gl.p(name, "config", key), value + b"\n")

    def unset(self, name, key):
        os.unlink(self.gl.p(name, "config", key))

    def device(self, name, dev, obj):
        write_bytes(self.gl.p(name, "devices", dev), json.dumps(obj) + "\n")

    def undevice(self, name, dev):
        os.unlink(self.gl.p(name, "devices", dev))

    def attr(self, name, attr):
        return glutil.read_bytes(self.gl.p(name, attr))

    def wait_attr(self, name, attr, value, timeout=5.0):
        deadline = time.monotonic() + timeout
        while True:
            got = self.attr(name, attr)
            if got == value:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"{name}/{attr} reads {got!r}, not {value!r}, "
                                     f"after {timeout}s")
            time.sleep(0.02)

    def daemon_fds(self):
        return len(os.listdir(f"/proc/{self.gl.proc.pid}/fd"))

    def close(self):
        for a in self.host_agents:
            a.close()
        for c in self.containers:
            c.stop()
        self.containers = []
        shutil.rmtree(self.sockdir, ignore_errors=True)


def start_env(gl, sockdir):
    gl.start()
    wait_socket(os.path.join(sockdir, "sock"), gl.proc)
    return DevlxdEnv(gl, sockdir)


@pytest.fixture
def devlxd_factory(daemon_factory):
    """make(*extra_args) -> DevlxdEnv: a running guestlinkd with
    --devlxd-socket (plus extra_args, e.g. "--header-timeout", "2000") and
    no instance. Everything made is torn down after the test."""
    require_devlxd()
    made = []

    def make(*extra):
        sockdir = make_sockdir()
        try:
            gl = daemon_factory(name=f"gl{len(made)}",
                                args=["--devlxd-socket", os.path.join(sockdir, "sock")] +
                                list(extra), start=False)
            env = start_env(gl, sockdir)
        except BaseException:
            shutil.rmtree(sockdir, ignore_errors=True)
            raise
        made.append(env)
        return env

    yield make
    for env in made:
        env.close()


@pytest.fixture
def devlxd(devlxd_factory):
    """A running guestlinkd with --devlxd-socket and no instance."""
    return devlxd_factory()


def stop_module_daemon(gl):
    """conftest's checks for a daemon that outlives one test: stops with 0
    on SIGTERM, leaves no mount, no sanitizer report. Returns problems."""
    problems = []
    if gl.running:
        gl.proc.send_signal(signal.SIGTERM)
        try:
            rc = gl.proc.wait(glutil.STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            problems.append(f"guestlinkd {gl.base}: still running after SIGTERM; killed")
            gl.proc.kill()
            gl.proc.wait()
        else:
            if rc != 0:
                problems.append(f"guestlinkd {gl.base}: exit status {rc} on SIGTERM")
    elif gl.proc is not None:
        problems.append(f"guestlinkd {gl.base}: died during the module (status "
                        f"{gl.proc.returncode})")
    if glutil.is_mounted(gl.mnt):
        subprocess.run(["umount", "-l", gl.mnt], capture_output=True)
    for path in gl.logs:
        with open(path, "rb") as f:
            marker = glutil.sanitizer_report(f.read().decode(errors="replace"))
        if marker:
            problems.append(f"guestlinkd {gl.base}: sanitizer report ({marker}) in {path}")
    if gl in glutil.LIVE:
        glutil.LIVE.remove(gl)
    glutil.reap_zombies()
    return problems


class ModuleEnv:
    """Context manager for a module-scoped DevlxdEnv (conftest's fixtures
    are per test). `prepare(state_dir)` runs before the daemon starts."""

    def __init__(self, base, prepare=None):
        self.base = str(base)
        self.prepare = prepare
        self.env = None

    def __enter__(self):
        require_devlxd()
        sockdir = make_sockdir()
        gl = Guestlinkd(os.path.join(self.base, "gl"),
                        args=["--devlxd-socket", os.path.join(sockdir, "sock")])
        os.makedirs(gl.state, exist_ok=True)
        if self.prepare:
            self.prepare(gl.state)
        self.gl = gl
        self.sockdir = sockdir
        try:
            self.env = start_env(gl, sockdir)
        except BaseException:
            stop_module_daemon(gl)
            shutil.rmtree(sockdir, ignore_errors=True)
            raise
        return self.env

    def __exit__(self, *exc):
        self.env.close()
        problems = stop_module_daemon(self.gl)
        if problems and exc[0] is None:
            raise AssertionError("module teardown:\n  " + "\n  ".join(problems) +
                                 "\n---- daemon log (tail) ----\n" + self.gl.all_logs()[-20000:])
        return False


# ---- the capture instance (captures README) --------------------------------------------------


def setup_c1(env, bind=True):
    """Instance c1 as in the captures, bound to a new container; returns it."""
    env.mkinstance("c1", C1_CONFIG, C1_DEVICES)
    return env.container("c1", bind=bind)


def setup_c2(env, bind=True):
    env.mkinstance("c2", C2_CONFIG)
    return env.container("c2", bind=bind)


def make_image(images_dir, size=3 * 1024 * 1024, avoid=("abc", "0000")):
    """A random "image" named by its SHA-256, as LXD names images, with the
    .tar.gz extension of the capture; private (no .public marker). The
    fingerprint never starts with one of `avoid` (prefixes other tests look
    up expecting no match)."""
    os.makedirs(images_dir, exist_ok=True)
    while True:
        data = os.urandom(size)
        fp = hashlib.sha256(data).hexdigest()
        if not fp.startswith(avoid):
            break
    path = os.path.join(images_dir, fp + ".tar.gz")
    with open(path, "wb") as f:
        f.write(data)
    return fp, path


def set_image_public(images_dir, fp, public):
    marker = os.path.join(images_dir, fp + ".public")
    if public:
        open(marker, "wb").close()
    elif os.path.exists(marker):
        os.unlink(marker)


# ---- the capture files ----------------------------------------------------------------------


def _lit(line):
    v = ast.literal_eval(line.strip())
    assert isinstance(v, bytes), line
    return v


FRAME_RE = re.compile(r"^FRAME t=\+([0-9.]+) fin=(\d) opcode=(\d+) masked=(\d) len=(\d+) "
                      r"payload=(b.*)$")
RESP_RE = re.compile(r"^<<< RESPONSE \(repr, (\d+) bytes, ([0-9.]+)s\)$")


def parse_capture(path):
    """The exchanges of one capture file, in order. Each is a dict:
    kind "http": title, request, response, length, secs;
    kind "ws": title, handshake_request, handshake_response, frames
    [(t, fin, opcode, masked, len, payload)], after_close [bytes], host [str]."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    out = []
    title = ""
    i = 0
    cur_ws = None
    while i < len(lines):
        line = lines[i]
        if line.startswith("## "):
            title = line[3:].strip()
            if cur_ws is not None and not title.startswith("host actions"):
                cur_ws = None
        elif line.startswith("HOST ") and out:
            # host actions belong to the exchange just before them
            out[-1].setdefault("host", []).append(line)
        elif line == ">>> REQUEST (repr)":
            req = _lit(lines[i + 1])
            m = RESP_RE.match(lines[i + 2])
            assert m, (path, lines[i + 2])
            i += 3
            parts = []
            while i < len(lines) and lines[i].startswith(("b'", 'b"')):
                parts.append(_lit(lines[i]))
                i += 1
            resp = b"".join(parts)
            assert len(resp) == int(m.group(1)), (path, title, len(resp), m.group(1))
            out.append({"kind": "http", "title": title, "request": req, "response": resp,
                        "length": int(m.group(1)), "secs": float(m.group(2)), "file": path})
            cur_ws = None
            continue
        elif line == ">>> HANDSHAKE REQUEST (repr)":
            cur_ws = {"kind": "ws", "title": title, "handshake_request": _lit(lines[i + 1]),
                      "frames": [], "after_close": [], "file": path}
            assert lines[i + 2] == "<<< HANDSHAKE RESPONSE (repr)"
            cur_ws["handshake_response"] = _lit(lines[i + 3])
            out.append(cur_ws)
            i += 4
            continue
        elif cur_ws is not None and line.startswith("FRAME "):
            m = FRAME_RE.match(line)
            assert m, line
            cur_ws["frames"].append((float(m.group(1)), int(m.group(2)), int(m.group(3)),
                                     int(m.group(4)), int(m.group(5)), _lit(m.group(6))))
        elif cur_ws is not None and line.startswith("after close: server sent "):
            cur_ws["after_close"].append(_lit(line[len("after close: server sent "):]))
        i += 1
    return out


def capture_files():
    return sorted(f for f in os.listdir(CAPTURES) if f.endswith(".txt"))


def load_capture(name):
    for f in capture_files():
        if f.startswith(name):
            return parse_capture(os.path.join(CAPTURES, f))
    raise AssertionError(f"no capture {name} in {CAPTURES}")


# ---- bytes: dates, timestamps, responses ---------------------------------------------------

IMF_RE = re.compile(rb"(Mon|Tue|Wed|Thu|Fri|Sat|Sun), \d\d (Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|"
                    rb"Oct|Nov|Dec) \d{4} \d\d:\d\d:\d\d GMT")
DATE_HDR_RE = re.compile(rb"\r\nDate: ([^\r\n]*)\r\n")
TS_RE = re.compile(rb'"timestamp":"([^"]*)"')


def mask_dates(b, check=True):
    """Every `Date:` header value replaced by <DATE>; with check, each must
    be an IMF-fixdate within 10 s of now (the captured ones are not)."""
    def sub(m):
        v = m.group(1)
        if check:
            assert IMF_RE.fullmatch(v), f"Date header {v!r} is not an IMF-fixdate"
            t = email.utils.parsedate_to_datetime(v.decode()).timestamp()
            assert abs(t - time.time()) < 10, f"Date header {v!r} is not now"
        return b"\r\nDate: <DATE>\r\n"
    return DATE_HDR_RE.sub(sub, b)


def mask_timestamps(b, check=True):
    def sub(m):
        if check:
            assert glutil.TIMESTAMP.match(m.group(1).decode()), \
                f"bad event timestamp {m.group(1)!r}"
        return b'"timestamp":"<TS>"'
    return TS_RE.sub(sub, b)


def parse_response(b):
    """(status, [(name, value)], body) of one HTTP response: with a
    Content-Length, chunked (decoded), or none (body = the rest)."""
    head, sep, body = b.partition(b"\r\n\r\n")
    assert sep, f"no end of head in {b[:2000]!r}"
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ")[1])
    hdrs = [tuple(x.split(b": ", 1)) for x in lines[1:]]
    if header(hdrs, "Transfer-Encoding") == b"chunked":
        out = b""
        while True:
            size, _, body = body.partition(b"\r\n")
            n = int(size, 16)
            out += body[:n]
            assert body[n:n + 2] == b"\r\n", "bad chunk framing"
            body = body[n + 2:]
            if n == 0:
                break
        body = out
    return status, hdrs, body


def header(hdrs, name):
    """The value of header `name` (str or bytes, any case), or None."""
    if isinstance(name, str):
        name = name.encode()
    for k, v in hdrs:
        if k.lower() == name.lower():
            return v
    return None


def show(b):
    """Bytes as one repr line per protocol line, for readable diffs."""
    return "\n".join(repr(x) for x in re.split(rb"(?<=\n)", b) if x)


def assert_bytes(got, want, what=""):
    if got != want:
        raise AssertionError(f"{what}: response differs\n--- want ---\n{show(want)}\n"
                             f"--- got ---\n{show(got)}")


# ---- WebSocket frames (client side) -----------------------------------------------------------

WS_KEY = "dGhlIHNhbXBsZSBub25jZQ=="


def ws_handshake(path="/1.0/events", key=WS_KEY, extra=b""):
    return (b"GET " + path.encode() + b" HTTP/1.1\r\nHost: lxd\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Key: " + key.encode() +
            b"\r\nSec-WebSocket-Version: 13\r\n" + extra + b"\r\n")


def ws_accept(key):
    h = hashlib.sha1((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest()
    return base64.b64encode(h).decode()


def ws_frame(opcode, payload=b"", fin=True, mask=b"\x11\x22\x33\x44", rsv=0, length=None):
    """A client frame (masked unless mask is None); `length` overrides the
    length field (for malformed frames)."""
    n = len(payload) if length is None else length
    b0 = (0x80 if fin else 0) | (rsv << 4) | opcode
    m = 0x80 if mask is not None else 0
    if n < 126:
        head = bytes([b0, m | n])
    elif n < 65536:
        head = bytes([b0, m | 126]) + n.to_bytes(2, "big")
    else:
        head = bytes([b0, m | 127]) + n.to_bytes(8, "big")
    if mask is None:
        return head + payload
    return head + mask + bytes(c ^ mask[i % 4] for i, c in enumerate(payload))


def ws_parse(buf):
    """Complete server frames at the start of buf: ([(fin, opcode, masked,
    payload)], bytes consumed)."""
    frames = []
    off = 0
    while len(buf) - off >= 2:
        b0, b1 = buf[off], buf[off + 1]
        n = b1 & 0x7F
        hl = 2
        if n == 126:
            if len(buf) - off < 4:
                break
            n = int.from_bytes(buf[off + 2:off + 4], "big")
            hl = 4
        elif n == 127:
            if len(buf) - off < 10:
                break
            n = int.from_bytes(buf[off + 2:off + 10], "big")
            hl = 10
        if b1 & 0x80:
            hl += 4
        if len(buf) - off < hl + n:
            break
        payload = buf[off + hl:off + hl + n]
        frames.append((bool(b0 & 0x80), b0 & 0x0F, bool(b1 & 0x80), payload))
        off += hl + n
    return frames, off


class WSReader:
    """Frames of a WebSocket held open by an agent (after the 101)."""

    def __init__(self, conn):
        self.conn = conn
        self.t0 = time.monotonic()
        self.frames = []  # (t, fin, opcode, masked, payload)

    def _pump(self, timeout):
        self.conn.recv(timeout=timeout)
        self._parse()

    def _parse(self):
        fr, used = ws_parse(self.conn.buf)
        self.conn.take(used)
        now = time.monotonic() - self.t0
        for f in fr:
            self.frames.append((now,) + f)

    def next(self, timeout=10.0):
        """The next frame; fails on timeout or EOF."""
        deadline = time.monotonic() + timeout
        if not self.frames:
            self._parse()
        while not self.frames:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no WebSocket frame within {timeout}s")
            if self.conn.eof:
                raise AssertionError(f"EOF while waiting for a frame; rest {self.conn.buf!r}")
            self._pump(min(left, 0.5))
        return self.frames.pop(0)

    def next_data(self, timeout=10.0):
        """The next text message's frame, skipping pings."""
        while True:
            f = self.next(timeout)
            if f[2] != 0x9:
                return f

    def quiet(self, timeout=0.5, allow_ping=True):
        """No frame (other than pings) arrives within timeout."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self._pump(min(left, 0.3))
            extra = [f for f in self.frames if not (allow_ping and f[2] == 0x9)]
            assert not extra, f"unexpected frames: {extra!r}"
        self.frames = []

    def send(self, frame):
        self.conn.send(frame)


def open_ws(agent, path="/1.0/events", key=WS_KEY):
    """Handshake on a new connection of `agent`; returns (WSReader, head)."""
    conn = agent.connect()
    conn.send(ws_handshake(path, key))
    conn.read_until(lambda b: b"\r\n\r\n" in b, what="the 101 response")
    head, _, rest = conn.buf.partition(b"\r\n\r\n")
    conn.buf = rest
    ws = WSReader(conn)
    return ws, head + b"\r\n\r\n"


def open_stream(agent, path="/1.0/events", close=False):
    """A plain event stream; returns (conn, head)."""
    conn = agent.connect()
    conn.send(b"GET " + path.encode() + b" HTTP/1.1\r\nHost: lxd\r\n" +
              (b"Connection: close\r\n" if close else b"") + b"\r\n")
    conn.read_until(lambda b: b"\n\n" in b, what="the stream head")
    head, _, rest = conn.buf.partition(b"\n\n")
    conn.buf = rest
    return conn, head + b"\n\n"


def stream_lines(conn, n, timeout=10.0):
    """n event lines from a plain stream."""
    conn.read_until(lambda b: b.count(b"\n") >= n, timeout=timeout, what=f"{n} event lines")
    parts = conn.buf.split(b"\n")
    lines = [p + b"\n" for p in parts[:n]]
    conn.buf = b"\n".join(parts[n:])
    return lines


STREAM_HEAD = (b"HTTP/1.1 200 OK\nConnection: keep-alive\nContent-Type: application/json\n"
               b"X-Content-Type-Options: nosniff\n\n")


def http_error(status, reason, text, close=True, version=b"1.1"):
    """Go's http.Error response bytes, Date masked."""
    body = text.encode() + b"\n"
    return (b"HTTP/" + version + b" " + str(status).encode() + b" " + reason.encode() + b"\r\n"
            b"Content-Type: text/plain; charset=utf-8\r\nX-Content-Type-Options: nosniff\r\n"
            b"Date: <DATE>\r\nContent-Length: " + str(len(body)).encode() + b"\r\n" +
            (b"Connection: close\r\n" if close else b"") + b"\r\n" + body)


def http_ok(ctype, body, close=True):
    return (b"HTTP/1.1 200 OK\r\nContent-Type: " + ctype.encode() + b"\r\nDate: <DATE>\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n" +
            (b"Connection: close\r\n" if close else b"") + b"\r\n" + body)


def get_req(path, close=True, extra=b""):
    return (b"GET " + path.encode() + b" HTTP/1.1\r\nHost: lxd\r\n" + extra +
            (b"Connection: close\r\n" if close else b"") + b"\r\n")
