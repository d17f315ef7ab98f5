"""Helpers for the VM tests (issue 5): a guestlinkd with a private control
socket, VMs played by the vsock muxer emulator (tools/vsock-mux) and the
guest agent (guestlink-agent --transport unix:DIR) in its own pid + mount +
network namespace with no interface, guestlinkctl, and the control
protocol's frames spoken from Python.

One VM:

    host                                   emulator                 "guest" namespaces
    guestlinkd --- dial <D>/vm1.sock ----> vsock-mux ----------> <D>/guest/listen-7361 (agent)
    guestlinkd <-- <D>/vm1.sock_7362 <---- vsock-mux <---------- <D>/guest/host (agent's devlxd leg)
                                                                 /dev/lxd/sock (agent, ns only)

The agent is NEVER started without --transport unix: (its default would
dial AF_VSOCK CID 2, the hypervisor of this machine).

Fixtures: `vmenv` (a daemon, no VM yet) and `vm1` (a daemon with vm1 whose
agent is online), both function-scoped on top of conftest's daemon_factory."""

import json
import os
import re
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
from glutil import GUESTLINKD, write_bytes
from devlxd_util import Container, DevlxdEnv

BUILD = os.path.dirname(GUESTLINKD)
AGENT = os.path.abspath(os.environ.get("GL_AGENT") or os.path.join(BUILD, "guestlink-agent"))
CTL = os.path.abspath(os.environ.get("GL_CTL") or os.path.join(BUILD, "guestlinkctl"))
MUX = os.path.join(BUILD, "tools", "vsock-mux")
AGENTPROBE = os.path.join(BUILD, "tools", "agentprobe")
PYTHON = "/usr/bin/python3"
SOCK_IN_GUEST = "/dev/lxd/sock"
AGENT_PORT = 7361
DEVLXD_PORT = 7362

# Frame types and flags (docs/control-protocol.md).
HELLO, AUTH, AUTH_OK, REQUEST, RESPONSE, DATA, CANCEL, ERROR = range(1, 9)
END, STDERR = 1, 2
FRAME_MAX = 1 << 20

# guestlinkctl's exit codes (its brief and man page).
EX_FAILED, EX_USAGE, EX_UNAVAILABLE, EX_TIMEOUT, EX_EXEC_OWN = 1, 2, 69, 124, 255

AGENT_FILE_RE = re.compile(r"\Astatus: online\nversion: (\S+)\n"
                           r"last-ping: (\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z)\n"
                           r"rtt-us: (\d+)\n\Z")


def vm_missing():
    """The binaries the VM face needs that are not built, as one message."""
    missing = [p for p in (GUESTLINKD, AGENT, CTL, MUX) if not os.access(p, os.X_OK)]
    if missing:
        return "not built: " + ", ".join(missing)
    if not glutil.daemon_supports("--control-socket"):
        return f"{GUESTLINKD} has no --control-socket option"
    return None


def require_vm():
    """These binaries are what the tests test: their absence fails."""
    why = vm_missing()
    if why:
        pytest.fail(why, pytrace=False)


_VERSION = None


def agent_version():
    """The version `guestlink-agent --version` prints (its last word)."""
    global _VERSION
    if _VERSION is None:
        p = subprocess.run([AGENT, "--version"], capture_output=True, text=True, timeout=10)
        words = (p.stdout or p.stderr).split()
        _VERSION = words[-1] if words else ""
    return _VERSION


def wait_for(pred, timeout=10.0, what="condition", step=0.01):
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout}s")
        time.sleep(step)


def is_socket(path):
    try:
        return stat.S_ISSOCK(os.lstat(path).st_mode)
    except OSError:
        return False


def short_dir(prefix):
    """A short directory for sockets (sun_path holds 107 bytes and the
    daemon also listens on <uds>_7362)."""
    d = tempfile.mkdtemp(prefix=prefix, dir="/tmp")
    os.chmod(d, 0o755)
    return d


def children_of(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def keygen(d):
    """A host key pair in d (host.key, host.pub) via tools/agentprobe; the
    public key's path. Without agentprobe: 32 random bytes as the public
    key (a key nobody holds the secret of, which is all a wrong key needs)."""
    os.makedirs(d, exist_ok=True)
    if os.access(AGENTPROBE, os.X_OK):
        subprocess.run([AGENTPROBE, "keygen", d], check=True, capture_output=True, timeout=10)
    else:
        with open(os.path.join(d, "host.pub"), "w") as f:
            f.write(os.urandom(32).hex() + "\n")
    return os.path.join(d, "host.pub")


# ---- frames ---------------------------------------------------------------------------


def frame(ftype, fid=0, payload=b"", flags=0, length=None):
    if isinstance(payload, (dict, list)):
        payload = json.dumps(payload).encode()
    n = len(payload) if length is None else length
    return struct.pack(">IIBB", n, fid, ftype, flags) + payload


class FrameConn:
    """A raw connection to the daemon's control socket, frames both ways."""

    def __init__(self, path, timeout=10.0):
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # blocking connect: waits for room in the listen backlog (with a
        # timeout set, a full backlog fails at once with EAGAIN)
        self.s.connect(path)
        self.s.settimeout(timeout)
        self.buf = b""
        self.eof = False

    def fileno(self):
        return self.s.fileno()

    def send(self, ftype, fid=0, payload=b"", flags=0):
        self.s.sendall(frame(ftype, fid, payload, flags))

    def request(self, fid, obj, flags=0):
        self.send(REQUEST, fid, obj, flags)

    def feed(self):
        """One recv; False at EOF."""
        try:
            b = self.s.recv(1 << 20)
        except ConnectionResetError:
            b = b""
        if not b:
            self.eof = True
            return False
        self.buf += b
        return True

    def parse(self):
        """A whole frame from buf, or None: (id, type, flags, payload)."""
        if len(self.buf) < 10:
            return None
        n, fid, ftype, flags = struct.unpack(">IIBB", self.buf[:10])
        if len(self.buf) < 10 + n:
            return None
        payload = self.buf[10:10 + n]
        self.buf = self.buf[10 + n:]
        return fid, ftype, flags, payload

    def next(self, timeout=10.0):
        """The next frame, or None at EOF. Fails on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            f = self.parse()
            if f is not None:
                return f
            if self.eof:
                return None
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no frame within {timeout}s (have {self.buf[:200]!r})")
            self.s.settimeout(left)
            try:
                self.feed()
            except socket.timeout:
                pass

    def until_end(self, fid, timeout=30.0):
        """Frames of `fid` up to its END (RESPONSE END or ERROR): returns
        (stdout bytes, stderr bytes, [(type, flags, json)]) and raises on EOF."""
        out, err, ctl = [], [], []
        deadline = time.monotonic() + timeout
        while True:
            f = self.next(max(0.01, deadline - time.monotonic()))
            assert f is not None, f"EOF before the end of request {fid}: {ctl!r}"
            i, t, fl, p = f
            if i != fid:
                continue
            if t == DATA:
                (err if fl & STDERR else out).append(p)
                continue
            ctl.append((t, fl, json.loads(p) if p else None))
            if t == ERROR or (t == RESPONSE and fl & END):
                return b"".join(out), b"".join(err), ctl

    def close(self):
        self.s.close()


# ---- the emulator ---------------------------------------------------------------------


class Mux:
    """tools/vsock-mux playing the VMM for one VM."""

    def __init__(self, d, uds, guest, mode=None, inactive=False, extra=()):
        self.uds = uds
        self.guest = guest
        self.control = os.path.join(d, f"mux{len(os.listdir(d))}.ctl")
        self.log_path = os.path.join(d, f"mux{len(os.listdir(d))}.log")
        argv = [MUX, "--uds", uds, "--guest", guest, "--control", self.control]
        if mode:
            argv += ["--mode", mode]
        if inactive:
            argv.append("--inactive")
        argv += list(extra)
        os.makedirs(guest, exist_ok=True)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        wait_for(lambda: "vsock-mux: ready" in self.log() or self.proc.poll() is not None,
                 10.0, "vsock-mux ready")
        assert self.proc.poll() is None, f"vsock-mux exited {self.proc.returncode}: {self.log()}"

    def log(self):
        try:
            with open(self.log_path, "rb") as f:
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def command(self, line, answer=False, timeout=5.0):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        try:
            s.connect(self.control)
            s.sendall(line.encode() + b"\n")
            if not answer:
                # give it the time to act before the caller goes on
                s.settimeout(0.3)
                try:
                    s.recv(4096)
                except (socket.timeout, OSError):
                    pass
                return None
            buf = b""
            while not buf.endswith(b"\n"):
                b = s.recv(4096)
                if not b:
                    break
                buf += b
            return buf.decode()
        finally:
            s.close()

    def reset(self):
        self.command("reset")

    def activate(self):
        self.command("activate")

    def stats(self):
        return json.loads(self.command("stats", answer=True))

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


# ---- the guest: namespaces + agent --------------------------------------------------------

# pid 1 of the guest's pid namespace, in its new mount and network
# namespaces: a tmpfs over /dev with the few nodes a process needs (staged
# under $1 and moved over /dev in one step), so that the agent's
# /dev/lxd/sock exists only in here. The network namespace has no
# interface but a down lo: the guest reaches the host only through the
# emulator's Unix sockets.
GUEST_SH = r'''
set -e
stage=$1
mount -t tmpfs -o mode=0755,size=1m gl-dev "$stage"
for n in null zero full random urandom tty; do
	touch "$stage/$n"
	mount --bind "/dev/$n" "$stage/$n"
done
mkdir "$stage/pts" "$stage/shm"
ln -s /proc/self/fd "$stage/fd"
ln -s /proc/self/fd/0 "$stage/stdin"
ln -s /proc/self/fd/1 "$stage/stdout"
ln -s /proc/self/fd/2 "$stage/stderr"
mount --move "$stage" /dev
mount -t sysfs -o ro gl-sys /sys
echo ready
exec sleep infinity >/dev/null 2>&1
'''


class GuestNS(Container):
    """The VM's inside: `unshare --pid --fork --mount --net --mount-proc`
    whose init sleeps; `pid` is that init's host pid. A Container but for
    the network namespace and the /dev it sets up: its popen, agent (a
    devlxd_util.Agent in the guest), alive and stop are the Container's."""

    def __init__(self, name):  # not Container's: another namespace script
        self.name = name
        self.stage = tempfile.mkdtemp(prefix=f"gl-vmns-{name}-", dir="/tmp")
        self.proc = subprocess.Popen(
            ["unshare", "--pid", "--fork", "--mount", "--net", "--mount-proc",
             "--propagation", "private", "/bin/sh", "-c", GUEST_SH, "sh", self.stage],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.agents = []
        from devlxd_util import _readline
        line = _readline(self.proc.stdout, 10.0)
        if line != b"ready\n":
            self.stop()
            raise AssertionError(f"guest namespaces of {name} did not start: {line!r}")
        self.pid = wait_for(lambda: (children_of(self.proc.pid) or [None])[0], 5.0,
                            "the guest's init")

    def nsenter(self, argv, uid=None, mount=True):
        pre = ["nsenter", "-t", str(self.pid), "-p", "-n"] + (["-m"] if mount else []) + ["--"]
        if uid is not None:
            pre += ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]
        return pre + list(argv)

    def run(self, argv, timeout=60, check=True, **kw):
        p = subprocess.run(self.nsenter(argv), capture_output=True, timeout=timeout, **kw)
        if check and p.returncode != 0:
            raise AssertionError(f"{argv!r} in {self.name} exited {p.returncode}:\n"
                                 f"stdout: {p.stdout[-4000:]!r}\nstderr: {p.stderr[-4000:]!r}")
        return p

    def path(self, p):
        """A path of the guest's mount namespace, seen from the host."""
        return f"/proc/{self.pid}/root{p}"

    def curl(self, url, *args, timeout=15):
        """curl on the guest's /dev/lxd/sock: (exit status, stdout bytes)."""
        p = self.run(["curl", "-sS", "--max-time", str(timeout), "--unix-socket", SOCK_IN_GUEST]
                     + list(args) + [url], check=False, timeout=timeout + 5)
        return p.returncode, p.stdout


class VM:
    """One VM of a VMEnv: its instance, emulator, namespaces and agent."""

    def __init__(self, env, name):
        self.env = env
        self.name = name
        self.dir = short_dir(f"gl-vm-{name}-")
        self.uds = os.path.join(self.dir, "vm.sock")
        self.guest = os.path.join(self.dir, "guest")
        os.makedirs(self.guest)
        os.chmod(self.guest, 0o755)
        self.mux = None
        self.ns = None
        self.agent_proc = None
        self.agent_logs = []
        self.host_key = os.path.join(self.dir, "host.pub")

    # the emulator
    def start_mux(self, **kw):
        self.mux = Mux(self.dir, self.uds, self.guest, **kw)
        return self.mux

    def stop_mux(self):
        if self.mux:
            self.mux.stop()

    # the guest
    def start_ns(self):
        self.ns = GuestNS(self.name)
        return self.ns

    def start_agent(self, key=None, instance_id=None, extra=(), wait=True):
        """guestlink-agent in the guest's namespaces, through nsenter (so
        killing the agent leaves the namespaces up)."""
        assert self.ns and self.ns.alive
        key = key or self.host_key
        argv = [AGENT, "--transport", "unix:" + self.guest, "--host-key", key,
                "--devlxd-socket", SOCK_IN_GUEST, "-v"]
        assert argv[2].startswith("unix:")  # never AF_VSOCK on this machine
        if instance_id:
            argv += ["--instance-id", instance_id]
        argv += list(extra)
        log = os.path.join(self.dir, f"agent{len(self.agent_logs)}.log")
        self.agent_logs.append(log)
        with open(log, "wb") as f:
            self.agent_proc = subprocess.Popen(self.ns.nsenter(argv), stdin=subprocess.DEVNULL,
                                               stdout=f, stderr=f, start_new_session=True)
        if wait:
            # the sockets of a killed agent are still there: its own
            # "listening" line (-v) says this one is up
            def up():
                with open(log, "rb") as f:
                    said = b" listening " in f.read()
                return said and is_socket(os.path.join(self.guest, f"listen-{AGENT_PORT}")) and \
                    is_socket(self.ns.path(SOCK_IN_GUEST)) and self.agent_pid()
            wait_for(lambda: self.agent_proc.poll() is not None or up(), 10.0,
                     f"agent of {self.name} listening")
            assert self.agent_proc.poll() is None, \
                f"agent exited {self.agent_proc.returncode}:\n{self.agent_log()}"
        return self.agent_proc

    def agent_pid(self):
        """The agent's host pid (nsenter's child)."""
        if not self.agent_proc or self.agent_proc.poll() is not None:
            return None
        kids = children_of(self.agent_proc.pid)
        return kids[0] if kids else None

    def kill_agent(self, sig=signal.SIGKILL):
        pid = self.agent_pid()
        if pid:
            os.kill(pid, sig)
        if self.agent_proc:
            try:
                self.agent_proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.agent_proc.pid, signal.SIGKILL)
                self.agent_proc.wait()
            rc = self.agent_proc.returncode
            self.agent_proc = None
            return rc
        return None

    def agent_log(self):
        out = []
        for p in self.agent_logs:
            try:
                with open(p, "rb") as f:
                    out.append(f"---- {p} ----\n" + f.read().decode(errors="replace"))
            except OSError:
                pass
        return "".join(out)

    # the host's view
    def p(self, *parts):
        return self.env.gl.p(self.name, *parts)

    def agent_file(self):
        return glutil.read_bytes(self.p("agent")).decode()

    def wait_online(self, timeout=10.0):
        def ok():
            return AGENT_FILE_RE.match(self.agent_file())
        try:
            return wait_for(ok, timeout, f"{self.name}/agent online")
        except AssertionError:
            raise AssertionError(f"{self.name}/agent reads {self.agent_file()!r} after "
                                 f"{timeout}s\n{self.agent_log()}\n{self.mux.log() if self.mux else ''}") \
                from None

    def wait_offline(self, timeout=10.0):
        return wait_for(lambda: self.agent_file().startswith("status: offline\n"), timeout,
                        f"{self.name}/agent offline")

    def bind(self, uds=None):
        write_bytes(self.p("vsock-uds"), (uds or self.uds) + "\n")

    def unbind(self):
        write_bytes(self.p("vsock-uds"), "\n")

    def ctl(self, *args, **kw):
        return self.env.ctl(*args, **kw)

    def sanitizer_problems(self):
        """Sanitizer reports in the agent's and the emulator's logs (a
        SANITIZE=1 build)."""
        out = []
        for path in self.agent_logs + ([self.mux.log_path] if self.mux else []):
            try:
                with open(path, "rb") as f:
                    text = f.read().decode(errors="replace")
            except OSError:
                continue
            marker = glutil.sanitizer_report(text)
            if marker:
                out.append(f"{self.name}: sanitizer report ({marker}) in {os.path.basename(path)}:"
                           f"\n{text[-6000:]}")
        return out

    def close(self):
        """Stop everything; returns the problems found (sanitizer reports,
        an emulator that did not exit 0 on SIGTERM)."""
        problems = []
        if self.agent_proc:
            # SIGTERM, so that a sanitizer build reports leaks at exit
            rc = self.kill_agent(signal.SIGTERM)
            if rc not in (0, -signal.SIGTERM, None):
                problems.append(f"{self.name}: guestlink-agent exited {rc} on SIGTERM")
        if self.ns:
            self.ns.stop()
        if self.mux and self.mux.proc.poll() is None:
            rc = self.mux.stop()
            if rc != 0:
                problems.append(f"{self.name}: vsock-mux exited {rc} on SIGTERM")
        problems += self.sanitizer_problems()
        shutil.rmtree(self.dir, ignore_errors=True)
        return problems


class VMEnv:
    """A guestlinkd with a private control socket, and the VMs of a test."""

    def __init__(self, gl, ctl_dir):
        self.gl = gl
        self.ctl_dir = ctl_dir
        self.control = os.path.join(ctl_dir, "control.sock")
        self.vms = {}

    @property
    def host_pub(self):
        return os.path.join(self.gl.state, "host.pub")

    # the model through the FUSE tree, as DevlxdEnv writes and reads it
    # (those methods use nothing but self.gl)
    set = DevlxdEnv.set
    unset = DevlxdEnv.unset
    device = DevlxdEnv.device
    undevice = DevlxdEnv.undevice
    attr = DevlxdEnv.attr
    wait_attr = DevlxdEnv.wait_attr

    def set_state(self, name, state):
        write_bytes(self.gl.p(name, "state"), state + "\n")

    def mkvm(self, name="vm1", config=None, devices=None, mux=True, agent=True, bind=True,
             instance_id=None, key=None, mux_kw=None, agent_extra=(), online=True):
        """Instance `name` of type virtual-machine with config/devices; its
        emulator, bound through vsock-uds; its namespaces and agent (with
        the daemon's public key unless `key`). Waits for the agent file to
        read online unless told otherwise."""
        os.mkdir(self.gl.p(name))
        write_bytes(self.gl.p(name, "type"), "virtual-machine\n")
        for k, v in (config or {}).items():
            self.set(name, k, v)
        for k, v in (devices or {}).items():
            self.device(name, k, v)
        vm = VM(self, name)
        self.vms[name] = vm
        shutil.copyfile(self.host_pub, vm.host_key)
        if mux:
            vm.start_mux(**(mux_kw or {}))
        if bind:
            vm.bind()
        if agent:
            vm.start_ns()
            vm.start_agent(key=key, instance_id=instance_id, extra=agent_extra)
            if online and mux and bind and key is None:
                vm.wait_online()
        return vm

    def ctl(self, *args, input=None, timeout=60, stdin=None, env=None):
        """guestlinkctl -s CONTROL args...: CompletedProcess with bytes."""
        argv = [CTL, "-s", self.control] + [str(a) for a in args]
        kw = {}
        if input is not None:
            kw["input"] = input
        else:
            kw["stdin"] = stdin if stdin is not None else subprocess.DEVNULL
        return subprocess.run(argv, capture_output=True, timeout=timeout, env=env, **kw)

    def ctl_popen(self, *args, **kw):
        kw.setdefault("stdin", subprocess.DEVNULL)
        kw.setdefault("stdout", subprocess.PIPE)
        kw.setdefault("stderr", subprocess.PIPE)
        return subprocess.Popen([CTL, "-s", self.control] + [str(a) for a in args], **kw)

    def frames(self):
        return FrameConn(self.control)

    def close(self):
        """Stop every VM; returns their problems."""
        problems = []
        for vm in self.vms.values():
            problems += vm.close()
        self.vms = {}
        shutil.rmtree(self.ctl_dir, ignore_errors=True)
        return problems


def start_vmenv(daemon_factory, name="gl", extra=()):
    require_vm()
    ctl_dir = short_dir("gl-ctl-")
    gl = daemon_factory(name=name, args=["--control-socket", os.path.join(ctl_dir, "control.sock")]
                        + list(extra), start=False)
    gl.start()
    env = VMEnv(gl, ctl_dir)
    try:
        wait_for(lambda: is_socket(env.control) and os.path.exists(env.host_pub) or
                 not gl.running, 10.0, "the control socket and host.pub")
    except AssertionError:
        env.close()
        raise AssertionError(f"no control socket / host.pub:\n{gl.log()}") from None
    assert gl.running, gl.log()
    return env


@pytest.fixture
def vmenv_factory(daemon_factory):
    made = []

    def make(*extra, name=None):
        env = start_vmenv(daemon_factory, name or f"gl{len(made)}", extra)
        made.append(env)
        return env

    yield make
    problems = []
    for env in made:
        problems += env.close()
    if problems:
        pytest.fail("VM teardown:\n  " + "\n  ".join(problems), pytrace=False)


@pytest.fixture
def vmenv(vmenv_factory):
    """A running guestlinkd with a private control socket, no VM."""
    return vmenv_factory()


@pytest.fixture
def vm1(vmenv):
    """vmenv with vm1 (user.foo=bar) whose agent is online; returns the VM."""
    return vmenv.mkvm("vm1", config={"user.foo": "bar"})


class ModuleVMEnv:
    """Context manager for a module-scoped VMEnv (conftest's fixtures are
    per test). `prepare(state_dir)` runs before the daemon starts."""

    def __init__(self, base, prepare=None, extra=()):
        self.base = str(base)
        self.prepare = prepare
        self.extra = list(extra)
        self.env = None

    def __enter__(self):
        from devlxd_util import stop_module_daemon
        require_vm()
        ctl_dir = short_dir("gl-ctl-")
        gl = glutil.Guestlinkd(os.path.join(self.base, "gl"),
                               args=["--control-socket", os.path.join(ctl_dir, "control.sock")] +
                               self.extra)
        os.makedirs(gl.state, exist_ok=True)
        if self.prepare:
            self.prepare(gl.state)
        self.gl = gl
        try:
            gl.start()
            env = VMEnv(gl, ctl_dir)
            wait_for(lambda: (is_socket(env.control) and os.path.exists(env.host_pub)) or
                     not gl.running, 10.0, "the control socket and host.pub")
            assert gl.running, gl.log()
        except BaseException:
            stop_module_daemon(gl)
            shutil.rmtree(ctl_dir, ignore_errors=True)
            raise
        self.env = env
        return env

    def __exit__(self, *exc):
        from devlxd_util import stop_module_daemon
        problems = self.env.close()
        problems += stop_module_daemon(self.gl)
        if problems and exc[0] is None:
            raise AssertionError("module teardown:\n  " + "\n  ".join(problems) +
                                 "\n---- daemon log (tail) ----\n" + self.gl.all_logs()[-20000:])
        return False
