"""Helpers for the integration suite: a real guestlinkd process, event
readers, shell and syscall helpers, and the exact event-line checks.

Fixtures live in conftest.py; this module holds the plain code so that test
files can import it (`from glutil import ...`)."""

import collections
import errno
import json
import os
import queue
import re
import select
import signal
import subprocess
import threading
import time

REPO = os.path.realpath(os.path.join(os.path.dirname(__file__), "..", ".."))
GUESTLINKD = os.path.abspath(os.environ.get("GUESTLINKD") or os.path.join(REPO, "build", "guestlinkd"))
MOUNT_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0
MIB = 1024 * 1024

# Every daemon started by the current test; the timeout handler kills them so
# that a test blocked on the mount gets unstuck.
LIVE = []


_FLAGS = {}


def daemon_supports(flag):
    """Whether `guestlinkd --help` lists `flag` (cached)."""
    if flag not in _FLAGS:
        try:
            out = subprocess.run([GUESTLINKD, "--help"], capture_output=True, text=True,
                                 timeout=10).stdout
        except OSError:
            out = ""
        _FLAGS[flag] = flag in out
    return _FLAGS[flag]


def _short_sock(base, name, scratch_dirs):
    """base/name, or a socket in a short new directory when that path would
    not fit sun_path (108 bytes)."""
    sock = os.path.join(base, name)
    if len(sock) > 100:
        import tempfile
        d = tempfile.mkdtemp(prefix="gl-t-")
        if scratch_dirs is not None:
            scratch_dirs.append(d)
        sock = os.path.join(d, name)
    return sock


def private_args(base, scratch_dirs=None):
    """Options that keep a test daemon off host-wide paths: its devlxd
    socket and its control socket in its own directory (when the daemon has
    those faces). A short directory made for a socket is appended to
    scratch_dirs, for removal."""
    args = []
    if daemon_supports("--devlxd-socket"):
        args += ["--devlxd-socket", _short_sock(base, "devlxd.sock", scratch_dirs)]
    if daemon_supports("--control-socket"):
        args += ["--control-socket", _short_sock(base, "control.sock", scratch_dirs)]
    if daemon_supports("--af-vsock"):
        # this machine is a VM: never an AF_VSOCK connect from a test
        args += ["--af-vsock", "off"]
    return args


def prerequisite_missing():
    """Why the suite cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root: guestlinkd mounts a FUSE file system"
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing"
    return None


def _unescape_mountinfo(s):
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), s)


def mount_entries(path):
    """Mount-table entries whose mount point is `path` (dead ones included,
    which os.path.ismount cannot see: stat fails with ENOTCONN). The mount
    point itself is never looked at: a stuck mount would never answer."""
    path = os.path.abspath(path)
    path = os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if _unescape_mountinfo(fields[4]) == path:
                sep = fields.index("-")
                out.append((fields[sep + 1], fields[sep + 2]))  # fstype, source
    return out


def is_mounted(path):
    return bool(mount_entries(path))


def abort_mount(path):
    """Abort the FUSE connection of the mount on `path` (fusectl): every
    request waiting on it fails at once. True if there was one."""
    path = os.path.abspath(path)
    path = os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))
    conns = "/sys/fs/fuse/connections"
    with open("/proc/self/mountinfo") as f:
        devs = [line.split()[2] for line in f if _unescape_mountinfo(line.split()[4]) == path]
    if not devs:
        return False
    if not os.listdir(conns):
        subprocess.run(["mount", "-t", "fusectl", "fusectl", conns], capture_output=True)
    for dev in devs:
        major, minor = (int(x) for x in dev.split(":"))
        try:
            with open(f"{conns}/{major << 20 | minor}/abort", "w") as f:
                f.write("1")
        except OSError:
            pass
    return True


def errno_of(fn, *args, **kw):
    """Run fn; the errno of the OSError it raised, or 0."""
    try:
        fn(*args, **kw)
    except OSError as e:
        return e.errno
    return 0


def read_bytes(path, bufsize=65536):
    """open + read to EOF + close, with plain syscalls."""
    fd = os.open(path, os.O_RDONLY)
    try:
        chunks = []
        while True:
            b = os.read(fd, bufsize)
            if not b:
                break
            chunks.append(b)
        return b"".join(chunks)
    finally:
        os.close(fd)


def write_bytes(path, data, flags=os.O_WRONLY | os.O_CREAT | os.O_TRUNC, chunk=None):
    """open + write + close, with plain syscalls; an error of any step
    (write or close) raises OSError. `chunk` splits the data into writes."""
    if isinstance(data, str):
        data = data.encode()
    fd = os.open(path, flags, 0o644)
    try:
        step = chunk or max(len(data), 1)
        off = 0
        while off < len(data):
            n = os.write(fd, data[off:off + step])
            assert n > 0
            off += n
    except BaseException:
        try:
            os.close(fd)
        except OSError:
            pass
        raise
    os.close(fd)


def write_errno(path, data, **kw):
    """errno of write_bytes (0 on success). Also tells whether it came from
    write() or close(): returns (errno, 'write'|'close'|'open'|None)."""
    if isinstance(data, str):
        data = data.encode()
    flags = kw.get("flags", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as e:
        return e.errno, "open"
    where, err = None, 0
    try:
        if data:
            os.write(fd, data)
    except OSError as e:
        err, where = e.errno, "write"
    try:
        os.close(fd)
    except OSError as e:
        if not err:
            err, where = e.errno, "close"
    return err, where


def run(cmd, cwd=None, check=True, timeout=30, shell="/bin/sh", env=None, input=None):
    """Run `cmd` with a real shell; returns CompletedProcess with str output."""
    p = subprocess.run([shell, "-c", cmd], cwd=cwd, capture_output=True, timeout=timeout,
                       env=env, input=input)
    p.stdout = p.stdout.decode(errors="replace")
    p.stderr = p.stderr.decode(errors="replace")
    if check and p.returncode != 0:
        raise AssertionError(f"{shell} -c {cmd!r} exited {p.returncode}\nstdout: {p.stdout}\n"
                             f"stderr: {p.stderr}")
    return p


def bash(cmd, **kw):
    """bash prints the errno text of a failed write ("write error: Invalid
    argument"); dash only says "I/O error"."""
    return run(cmd, shell="/bin/bash", **kw)


# ---- the daemon -----------------------------------------------------------------


class Guestlinkd:
    """One guestlinkd on base/state mounted on base/mnt, run in the
    foreground as a child of pytest with its stderr in a log file."""

    def __init__(self, base, args=(), state=None, mnt=None, bare=False):
        self.base = str(base)
        self.bare = bare  # exactly --state-dir and --mount, no private_args()
        self.scratch_dirs = []
        self._private = None
        self.state = str(state or os.path.join(self.base, "state"))
        self.mnt = str(mnt or os.path.join(self.base, "mnt"))
        self.args = list(args)
        self.proc = None
        self.logs = []
        self.stuck = []  # killed daemons still exiting (see kill9)
        self.log_path = None
        self.expect_dead = False

    # paths
    def p(self, *parts):
        return os.path.join(self.mnt, *parts)

    def option(self, name):
        """The value the daemon gets for option `name` (its private one
        unless the test gave its own), or None."""
        argv = self.cmdline()
        if name in argv:
            k = len(argv) - 1 - argv[::-1].index(name)
            return argv[k + 1] if k + 1 < len(argv) else None
        return None

    @property
    def control_socket(self):
        return self.option("--control-socket")

    def cmdline(self, extra=()):
        args = self.args + list(extra)
        if self._private is None:
            self._private = private_args(self.base, self.scratch_dirs)
        own = [] if self.bare else self._private
        # an option the test gives itself wins over the private one
        for opt in ("--devlxd-socket", "--control-socket", "--af-vsock"):
            if opt in args and opt in own:
                k = own.index(opt)
                own = own[:k] + own[k + 2:]
        return [GUESTLINKD, "--state-dir", self.state, "--mount", self.mnt] + own + args

    def start(self, *extra, wait=True):
        assert self.proc is None or self.proc.poll() is not None, "already running"
        assert os.access(GUESTLINKD, os.X_OK), \
            f"no daemon binary at {GUESTLINKD} (run make, or set GUESTLINKD)"
        os.makedirs(self.base, exist_ok=True)
        self.log_path = os.path.join(self.base, f"guestlinkd.{len(self.logs)}.log")
        self.logs.append(self.log_path)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.cmdline(extra), stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT)
        if self not in LIVE:
            LIVE.append(self)
        self.expect_dead = False
        if wait:
            self.wait_mounted()
            self.reap_stuck()
        return self

    def reap_stuck(self, timeout=10):
        """A daemon that kill9() left exiting must be gone once the next one
        is up (guestlinkd aborts its predecessor's stuck connection)."""
        while self.stuck:
            p = self.stuck[0]
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                raise AssertionError(f"guestlinkd pid {p.pid}, killed with -9, still exists "
                                     f"{timeout}s after the next daemon started:\n"
                                     f"{self.log()}") from None
            self.stuck.pop(0)

    def wait_mounted(self, timeout=MOUNT_TIMEOUT):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            # ismount alone is not enough after a kill -9: the dead mount's
            # root may still answer lstat() from the kernel's attribute
            # cache. The daemon logs "serving" once its own mount is up.
            if os.path.ismount(self.mnt) and " serving " in self.log():
                return
            rc = self.proc.poll()
            if rc is not None:
                raise AssertionError(f"guestlinkd exited with status {rc} before mounting "
                                     f"{self.mnt}:\n{self.log()}")
            time.sleep(0.01)
        raise AssertionError(f"{self.mnt} was not mounted within {timeout}s:\n{self.log()}")

    def wait_exit(self, timeout=STOP_TIMEOUT):
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"guestlinkd (pid {self.proc.pid}) still runs after {timeout}s:\n"
                                 f"{self.log()}") from None

    @property
    def running(self):
        return self.proc is not None and self.proc.poll() is None

    def stop(self, sig=signal.SIGTERM, timeout=STOP_TIMEOUT):
        """Signal and wait; returns the exit status."""
        if not self.running:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(sig)
        return self.wait_exit(timeout)

    def restart(self, *extra):
        rc = self.stop()
        assert rc == 0, f"guestlinkd exited with {rc} on SIGTERM:\n{self.log()}"
        assert not is_mounted(self.mnt), f"{self.mnt} still mounted after SIGTERM"
        return self.start(*extra)

    def kill9(self, timeout=5):
        """SIGKILL: the mount is left behind, dead (ENOTCONN). Returns False
        when the process could not finish exiting within `timeout`: killed
        while a thread of it waited in the kernel for a lock of its own
        mount (held by a client waiting for the dead loop). Then it is
        remembered, and start() checks that the next daemon frees it."""
        self.proc.kill()
        self.expect_dead = True
        try:
            self.proc.wait(timeout)
            return True
        except subprocess.TimeoutExpired:
            self.stuck.append(self.proc)
            self.proc = None
            return False

    def log(self, which=-1):
        if not self.logs:
            return "(no log)"
        with open(self.logs[which], "rb") as f:
            return f.read().decode(errors="replace")

    def all_logs(self):
        return "".join(f"---- {p} ----\n{self.log(i)}" for i, p in enumerate(self.logs))

    # conveniences on the tree
    def mkinstance(self, name="c1", type_=None):
        os.mkdir(self.p(name))
        if type_:
            write_bytes(self.p(name, "type"), type_ + "\n")
        return self.p(name)

    def sh(self, cmd, **kw):
        kw.setdefault("cwd", self.mnt)
        return run(cmd, **kw)

    def bash(self, cmd, **kw):
        kw.setdefault("cwd", self.mnt)
        return bash(cmd, **kw)


# ---- events ------------------------------------------------------------------------


class EventReader:
    """`cat PATH` in a subprocess (or any argv), its lines collected by a
    thread. Waits until the file is open, so that no change made after the
    constructor returns can be missed."""

    def __init__(self, path, argv=None):
        self.path = path
        self.q = queue.Queue()
        self.lines = []
        self.proc = subprocess.Popen(argv or ["cat", path], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
        self.thread = threading.Thread(target=self._pump, daemon=True)
        self.thread.start()
        self.wait_open()

    def _pump(self):
        for line in self.proc.stdout:
            self.q.put(line)
        self.q.put(None)

    def wait_open(self, timeout=5.0):
        target = os.path.realpath(self.path)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                for fd in os.listdir(f"/proc/{self.proc.pid}/fd"):
                    try:
                        if os.readlink(f"/proc/{self.proc.pid}/fd/{fd}") == target:
                            return
                    except OSError:
                        pass
            except OSError:
                pass
            if self.proc.poll() is not None:
                raise AssertionError(f"reader of {self.path} exited with {self.proc.returncode}: "
                                     f"{self.proc.stderr.read().decode(errors='replace')}")
            time.sleep(0.005)
        raise AssertionError(f"reader never opened {self.path}")

    def next(self, timeout=5.0):
        """The next raw line (bytes), or None at EOF. Fails on timeout."""
        try:
            line = self.q.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no event on {self.path} within {timeout}s "
                                 f"(seen so far: {self.lines!r})") from None
        if line is not None:
            self.lines.append(line)
        return line

    def take(self, n, timeout=10.0):
        deadline = time.monotonic() + timeout
        out = []
        for _ in range(n):
            line = self.next(max(0.01, deadline - time.monotonic()))
            assert line is not None, f"EOF after {len(out)} of {n} lines: {out!r}"
            out.append(line)
        return out

    def quiet(self, timeout=0.3):
        """Assert that no line arrives within `timeout`."""
        try:
            line = self.q.get(timeout=timeout)
        except queue.Empty:
            return
        raise AssertionError(f"unexpected line on {self.path}: {line!r}")

    def wait_eof(self, timeout=5.0):
        line = self.next(timeout)
        assert line is None, f"expected EOF on {self.path}, got {line!r}"
        return self.proc.wait(timeout)

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.thread.join(5)
        self.proc.stdout.close()
        self.proc.stderr.close()


# Go's encoding/json, which LXD uses for events: compact, and in strings
# HTML-escaped <>&, \u2028/\u2029, \n \r \t short, other controls as \u00xx.
def _go_str(s):
    out = ['"']
    for ch in s:
        o = ord(ch)
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\r":
            out.append("\\r")
        elif ch == "\t":
            out.append("\\t")
        elif o < 0x20 or ch in "<>&" or o in (0x2028, 0x2029):
            out.append("\\u%04x" % o)
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def go_json(v):
    if isinstance(v, str):
        return _go_str(v)
    if isinstance(v, dict):
        return "{" + ",".join(_go_str(k) + ":" + go_json(x) for k, x in v.items()) + "}"
    if isinstance(v, list):
        return "[" + ",".join(go_json(x) for x in v) + "]"
    if v is None:
        return "null"
    if v is True:
        return "true"
    if v is False:
        return "false"
    return json.dumps(v)


TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{0,8}[1-9])?(Z|[+-]\d\d:\d\d)$")


def ts_ns(ts):
    """An event timestamp as integer nanoseconds since the epoch."""
    import datetime
    m = re.fullmatch(r"(.{19})(?:\.(\d+))?(Z|[+-]\d\d:\d\d)", ts)
    assert m, ts
    base = datetime.datetime.fromisoformat(m.group(1) + ("+00:00" if m.group(3) == "Z" else m.group(3)))
    return int(base.timestamp()) * 10**9 + int((m.group(2) or "").ljust(9, "0"))


def parse_event(raw, instance=None):
    """Check one event line byte for byte against LXD's shape and return it
    as a dict. `instance`: the line comes from MNT/events and must end with
    "instance":"<name>"."""
    assert isinstance(raw, bytes) and raw.endswith(b"\n") and b"\n" not in raw[:-1], raw
    obj = json.loads(raw, object_pairs_hook=collections.OrderedDict)
    keys = ["type", "timestamp", "metadata"] + (["instance"] if instance else [])
    assert list(obj) == keys, f"top-level fields {list(obj)} != {keys}: {raw!r}"
    assert TIMESTAMP.match(obj["timestamp"]), f"bad timestamp {obj['timestamp']!r}"
    md = obj["metadata"]
    if obj["type"] == "config":
        assert list(md) == ["key", "old_value", "value"], raw
        assert md["key"].startswith("user."), f"config event for a non-user key: {raw!r}"
        assert all(isinstance(md[k], str) for k in md)
    elif obj["type"] == "device":
        assert list(md) == ["action", "config", "name"], raw
        assert md["action"] in ("added", "removed"), raw
        assert list(md["config"]) == sorted(md["config"]), f"device config keys unsorted: {raw!r}"
        assert all(isinstance(x, str) for x in md["config"].values())
    elif obj["type"] == "lifecycle":
        # LXD's lifecycle metadata is a struct: action, source, [context].
        assert list(md) in (["action", "source"], ["action", "source", "context"]), raw
        assert re.fullmatch(r"instance-[a-z]+", md["action"]), raw
        assert re.fullmatch(r"/1\.0/instances/[A-Za-z][A-Za-z0-9-]*", md["source"]), raw
        if instance:
            assert md["source"] == "/1.0/instances/" + instance, raw
    else:
        raise AssertionError(f"unknown event type: {raw!r}")
    if instance:
        assert obj["instance"] == instance, raw
    # Byte-exact: compact Go encoding with sorted metadata keys.
    assert go_json(obj) + "\n" == raw.decode(), f"not Go's encoding:\n{raw!r}\n{go_json(obj)!r}"
    return obj


def config_event(key, old, new):
    return ("config", {"key": key, "old_value": old, "value": new})


def device_event(action, name, config):
    return ("device", {"action": action, "config": dict(sorted(config.items())), "name": name})


def lifecycle_event(action, name, context=None):
    md = {"action": action, "source": "/1.0/instances/" + name}
    if context is not None:
        md["context"] = context
    return ("lifecycle", md)


def shape(ev):
    """(type, metadata as plain dicts) of a parsed event, for comparisons."""
    return ev["type"], json.loads(json.dumps(ev["metadata"]))


def poll_readable(fd, timeout):
    p = select.poll()
    p.register(fd, select.POLLIN)
    return p.poll(int(timeout * 1000))


def wait_opened(path, timeout=5.0):
    """Wait until some process has `path` open (a reader started by a
    script, whose pid we do not know)."""
    target = os.path.realpath(path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                fds = os.listdir(f"/proc/{pid}/fd")
            except OSError:
                continue
            for fd in fds:
                try:
                    if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                        return
                except OSError:
                    pass
        time.sleep(0.01)
    raise AssertionError(f"nobody opened {path} within {timeout}s")


def live_children():
    """(pid, state, cmdline) of this process's children (pytest is a child
    subreaper, so orphaned grandchildren count too)."""
    me = os.getpid()
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                stat = f.read()
            rest = stat[stat.rindex(")") + 2:].split()
            st, ppid = rest[0], int(rest[1])
            if ppid != me:
                continue
            with open(f"/proc/{d}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except (OSError, ValueError):
            continue
        out.append((int(d), st, cmd))
    return out


def kill_leftover_children(timeout=3.0):
    """Children of this process still alive `timeout` seconds from now (after
    reaping zombies) are stuck or were leaked by a test: kill them and return
    one problem line for each."""
    deadline = time.monotonic() + timeout
    while True:
        reap_zombies()
        left = [c for c in live_children() if c[1] != "Z"]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    problems = []
    for pid, st, cmd in left:
        problems.append(f"child process left behind: pid {pid} state {st}: {cmd}")
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    reap_zombies()
    return problems


def reap_zombies():
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def sanitizer_report(text):
    for marker in ("ERROR: AddressSanitizer", "ERROR: LeakSanitizer", "runtime error:",
                   "WARNING: ThreadSanitizer", "SUMMARY: UndefinedBehaviorSanitizer"):
        if marker in text:
            return marker
    return None


ENOBUFS = errno.ENOBUFS
