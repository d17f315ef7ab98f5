#!/usr/bin/python3
"""make soak: a mixed load on every face of guestlinkd, with faults injected,
then a check that nothing acknowledged was lost.

Load (all at once, on this machine's cores):
  - FUSE writers (open/write/close, sed -i, rm) on keys of two containers'
    instances, and mkdir/rmdir of scratch instances;
  - a counter key written in strictly increasing steps, watched by
    subscribers that stay: a plain devlxd event stream inside container c1
    that resumes with ?since=&skip= after every daemon restart, and a reader
    of MNT/c1/events on the host;
  - devlxd requests from inside the containers (loadgen: keep-alive and a
    connection per request), and WebSocket subscribers that never read;
  - when the VM parts are built: guestlinkctl exec and push/pull through the
    vsock muxer emulator to an agent in its own namespaces.
Faults: kill -9 of the daemon at random moments (then a restart), kill -9
of load clients mid-request, and the state directory's file system (a small
tmpfs) filled until writes fail, then freed.
Checks, printed as a table (and written to $BUILD/soak-report.md):
  - every write whose close() returned 0 is in the store, in the FUSE tree
    and on the devlxd socket (or was overwritten by a later attempt);
  - no event reached a staying subscriber twice or out of order, and each
    subscriber caught up with the last counter value after the last restart;
  - the daemon's RSS and open fds do not grow from one life to the next;
  - the daemon never died unless we killed it.
Exit status 0 only when every check passed."""

import argparse
import json
import os
import random
import re
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILD = os.path.join(REPO, os.environ.get("BUILD", "build"))
os.environ.setdefault("GUESTLINKD", os.path.join(BUILD, "guestlinkd"))
sys.path.insert(0, os.path.join(REPO, "tests", "integration"))

import glutil  # noqa: E402
import devlxd_util  # noqa: E402
from devlxd_util import Container  # noqa: E402

try:
    import vm_util  # noqa: E402
except ImportError:  # the VM parts are optional for the soak
    vm_util = None

PYTHON = "/usr/bin/python3"
LOADGEN = os.path.join(BUILD, "tools", "loadgen")


class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.c = {}

    def add(self, k, n=1):
        with self.lock:
            self.c[k] = self.c.get(k, 0) + n

    def get(self, k):
        return self.c.get(k, 0)


ST = Stats()
STOP = threading.Event()
T0 = time.monotonic()
EPISODES = []  # (time, what): kills, restarts, disk full and freed, for loss reports
PROBLEMS = []


def problem(msg):
    PROBLEMS.append(msg)
    print(f"soak: PROBLEM: {msg}", file=sys.stderr, flush=True)


# ---- the daemon and its lives ------------------------------------------------------------------

class Daemon:
    def __init__(self, base, sock, extra):
        self.gl = glutil.Guestlinkd(base, args=["--devlxd-socket", sock] + extra)
        self.lock = threading.RLock()
        self.killing = False
        self.lives = []  # per life: list of (t, rss_kib, nfds)
        self.up = threading.Event()

    def start(self):
        with self.lock:
            self.gl.start()
            EPISODES.append((time.monotonic() - T0, "started"))
            self.lives.append([])
            self.up.set()

    def kill9(self):
        with self.lock:
            self.up.clear()
            self.killing = True
            EPISODES.append((time.monotonic() - T0, "kill -9"))
            if not self.gl.kill9():
                # a thread waited on the mount: the next start frees it
                ST.add("kills that left the daemon unable to exit (freed by the next start)")
            self.killing = False
            ST.add("daemon kills")

    def sample(self):
        with self.lock:
            if not self.gl.running:
                return
            pid = self.gl.proc.pid
            try:
                with open(f"/proc/{pid}/status") as f:
                    rss = int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1))
                nfds = len(os.listdir(f"/proc/{pid}/fd"))
            except (OSError, AttributeError):
                return
            self.lives[-1].append((time.monotonic(), rss, nfds))

    def check_alive(self):
        with self.lock:
            if self.killing or self.gl.proc is None:
                return
            rc = self.gl.proc.poll()
            if rc is not None and self.up.is_set():
                self.up.clear()
                problem(f"the daemon died by itself (status {rc}); log tail:\n"
                        f"{self.gl.log()[-3000:]}")


# ---- FUSE writers ----------------------------------------------------------------------------

class Ledger:
    """What each key must hold: the value of the last acknowledged write
    (None: removed), plus every value attempted after it whose outcome is
    unknown (a failed close() may or may not have reached the store)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.acked = {}
        self.maybe = {}
        self.history = {}  # key: the last few (time, what, value) for a report

    def _note(self, key, what, value):
        h = self.history.setdefault(key, [])
        h.append((time.monotonic() - T0, what, value))
        del h[:-8]

    def attempt(self, key, value):
        with self.lock:
            self.maybe.setdefault(key, set()).add(value)
            self._note(key, "attempt", value)

    def ack(self, key, value):
        with self.lock:
            self.acked[key] = value
            self.maybe[key] = set()
            self._note(key, "ack", value)
        ST.add("acknowledged writes")

    def refused(self, key, err):
        with self.lock:
            self._note(key, "refused", err.strerror)

    def allowed(self, key):
        with self.lock:
            return {self.acked.get(key)} | self.maybe.get(key, set())


LEDGER = Ledger()


def fuse_writer(d, idx, insts):
    rnd = random.Random(idx)
    n = 0
    while not STOP.is_set():
        if not d.up.wait(1):
            continue
        inst = insts[rnd.randrange(len(insts))]
        key = f"user.soak.w{idx}.{rnd.randrange(16)}"
        path = d.gl.p(inst, "config", key)
        n += 1
        op = rnd.random()
        try:
            if op < 0.8:
                value = f"v{idx}-{n}"
                LEDGER.attempt((inst, key), value)
                with open(path, "w") as f:
                    f.write(value)
                LEDGER.ack((inst, key), value)
            elif op < 0.9:
                # sed -i: a temporary file renamed over the key
                value = f"s{idx}-{n}"
                LEDGER.attempt((inst, key), value)
                with open(path, "w") as f:
                    f.write("x")
                LEDGER.ack((inst, key), "x")
                LEDGER.attempt((inst, key), value)
                r = subprocess.run(["sed", "-i", f"s/.*/{value}/", path], capture_output=True)
                if r.returncode == 0:
                    LEDGER.ack((inst, key), value)
                else:
                    ST.add("writes refused (sed)")
            else:
                LEDGER.attempt((inst, key), None)
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
                LEDGER.ack((inst, key), None)
        except OSError as e:
            ST.add(f"writes refused ({os.strerror(e.errno)})")
            time.sleep(0.05)


def instance_churn(d, idx):
    n = 0
    while not STOP.is_set():
        if not d.up.wait(1):
            continue
        name = f"scratch{idx}"
        try:
            os.mkdir(d.gl.p(name))
            with open(d.gl.p(name, "config", "user.x"), "w") as f:
                f.write(str(n))
            subprocess.run(["rm", "-r", d.gl.p(name)], capture_output=True, check=True)
            ST.add("instances created and removed")
        except (OSError, subprocess.CalledProcessError):
            ST.add("instance churn errors (daemon down or disk full)")
            time.sleep(0.1)
        n += 1


# ---- the counter and its subscribers -----------------------------------------------------------

CTR = {"acked": 0, "attempted": 0}


def counter_writer(d):
    v = 0
    while not STOP.is_set():
        if not d.up.wait(1):
            continue
        v += 1
        CTR["attempted"] = v
        try:
            with open(d.gl.p("c1", "config", "user.soak.ctr"), "w") as f:
                f.write(str(v))
            CTR["acked"] = v
            ST.add("counter writes")
        except OSError:
            time.sleep(0.05)
        time.sleep(0.002)


SUBSCRIBER = r"""
import json, socket, sys, time
base, n, reconnects = None, 0, 0
def out(o):
    sys.stdout.write(json.dumps(o) + "\n"); sys.stdout.flush()
def get(path):
    s = socket.socket(socket.AF_UNIX); s.settimeout(5); s.connect("/dev/lxd/sock")
    s.sendall(("GET %s HTTP/1.1\r\nHost: lxd\r\nConnection: close\r\n\r\n" % path).encode())
    d = b""
    while True:
        b = s.recv(65536)
        if not b: break
        d += b
    head, _, body = d.partition(b"\r\n\r\n")
    return head.split(b" ")[1] == b"200", body
first = True
while True:
    try:
        q = "since=now" if base is None else "since=%d&skip=%d" % (base, n)
        s = socket.socket(socket.AF_UNIX); s.connect("/dev/lxd/sock")
        s.sendall(("GET /1.0/events?type=config&%s HTTP/1.1\r\nHost: lxd\r\n\r\n" % q).encode())
        f = s.makefile("rb")
        st = f.readline()
        if not st.startswith(b"HTTP/1.1 200"):
            raise OSError("status " + st.decode(errors="replace"))
        while f.readline() not in (b"\r\n", b"\n", b""):  # LXD's head ends lines in \n
            pass
        if not first:
            reconnects += 1
            out({"reconnect": reconnects})
        first = False
        for line in f:
            ev = json.loads(line)
            if ev["type"] == "resync":
                base, n = ev["metadata"]["seq"], 0
                ok, body = get("/1.0/config/user.soak.ctr")
                out({"resync": base, "reread": int(body) if ok and body else 0})
                continue
            n += 1
            md = ev["metadata"]
            if md.get("key") == "user.soak.ctr" and md.get("value"):
                out({"value": int(md["value"])})
        raise OSError("stream ended")
    except (OSError, ValueError) as e:
        time.sleep(0.2)
"""


class Subscriber:
    """The devlxd stream subscriber in c1: events strictly increasing."""

    def __init__(self, ct):
        self.proc = ct.popen([PYTHON, "-u", "-c", SUBSCRIBER])
        self.last_event = 0
        self.last_seen = 0
        self.events = 0
        self.reconnects = 0
        self.resyncs = 0
        self.dups = 0
        self.reorders = 0
        self.t = threading.Thread(target=self.pump, daemon=True)
        self.t.start()

    def pump(self):
        for line in self.proc.stdout:
            o = json.loads(line)
            if "value" in o:
                v = o["value"]
                self.events += 1
                if v == self.last_event:
                    self.dups += 1
                elif v < self.last_event:
                    self.reorders += 1
                self.last_event = max(self.last_event, v)
                self.last_seen = max(self.last_seen, v)
            elif "reconnect" in o:
                self.reconnects = o["reconnect"]
            elif "resync" in o:
                self.resyncs += 1
                self.last_seen = max(self.last_seen, o["reread"])

    def close(self):
        devlxd_util.kill_tree(self.proc)


def host_events_reader(d, out):
    """MNT/c1/events: strictly increasing counter values within each open
    (the file ends when the daemon dies; it is opened again)."""
    while not STOP.is_set():
        if not d.up.wait(1):
            continue
        last = 0
        try:
            with open(d.gl.p("c1", "events"), "rb") as f:
                out["opens"] += 1
                for line in f:
                    ev = json.loads(line)
                    md = ev.get("metadata", {})
                    if md.get("key") == "user.soak.ctr" and md.get("value"):
                        v = int(md["value"])
                        out["events"] += 1
                        if v <= last:
                            out["bad"] += 1
                        last = v
                    if STOP.is_set():
                        break
        except (OSError, ValueError):
            time.sleep(0.1)


# ---- devlxd load -------------------------------------------------------------------------------

LG_PROCS = []


def loadgen_loop(ct, args, label):
    while not STOP.is_set():
        p = ct.popen([LOADGEN, "--socket", "/dev/lxd/sock", "--duration", "5", "--label", label,
                      "--expect-status", "200"] + args)
        LG_PROCS.append(p)
        out, _ = p.communicate()
        LG_PROCS.remove(p)
        m = re.search(rb"reqs=(\d+)", out)
        if m:
            ST.add("devlxd requests answered", int(m.group(1)))
        if p.returncode < 0 or p.returncode == 137:
            ST.add("load clients killed mid-request")


WS_IDLE = r"""
import socket, time
conns = []
for i in range(20):
    try:
        s = socket.socket(socket.AF_UNIX); s.connect("/dev/lxd/sock")
        s.sendall(b"GET /1.0/events HTTP/1.1\r\nHost: lxd\r\nUpgrade: websocket\r\n"
                  b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                  b"Sec-WebSocket-Version: 13\r\n\r\n")
        conns.append(s)
    except OSError:
        pass
time.sleep(5)
"""


def lazy_ws_loop(ct):
    while not STOP.is_set():
        p = ct.popen([PYTHON, "-c", WS_IDLE])
        p.communicate()
        ST.add("never-reading WebSocket subscribers", 20)


# ---- the VM: agent exec and file transfers through the emulator ----------------------------------

def vm_parts_missing():
    if vm_util is None:
        return "tests/integration/vm_util.py is missing"
    return vm_util.vm_missing()


def vm_exec_loop(d, env):
    n = 0
    while not STOP.is_set():
        if not d.up.wait(1):
            continue
        n += 1
        try:
            r = env.ctl("exec", "vm1", "--", "sh", "-c", f"echo {n}; echo e{n} >&2; exit {n % 7}",
                        timeout=30)
        except subprocess.TimeoutExpired:
            problem(f"guestlinkctl exec {n} did not end within 30 s")
            continue
        if r.returncode == n % 7 and r.stdout == f"{n}\n".encode() and \
                r.stderr == f"e{n}\n".encode():
            ST.add("VM execs")
        elif r.returncode in (69, 255):
            ST.add("VM execs failed cleanly (daemon killed or link reset)")
            time.sleep(0.2)
        else:
            problem(f"exec {n}: exit {r.returncode}, stdout {r.stdout[:80]!r}, "
                    f"stderr {r.stderr[:200]!r}")


def vm_transfer_loop(d, env, work):
    rnd = random.Random(7)
    n = 0
    while not STOP.is_set():
        if not d.up.wait(1):
            continue
        n += 1
        data = rnd.randbytes(rnd.randrange(1, 2 << 20))
        src = os.path.join(work, "push.bin")
        back = os.path.join(work, "pull.bin")
        with open(src, "wb") as f:
            f.write(data)
        remote = f"/tmp/gl-soak-{os.getpid()}.bin"
        r = env.ctl("push", "vm1", src, remote, "--no-progress", timeout=60)
        if r.returncode != 0:
            ST.add("VM transfers failed cleanly (daemon killed or link reset)")
            if r.returncode not in (1, 69, 255):
                problem(f"push: exit {r.returncode}: {r.stderr[:200]!r}")
            time.sleep(0.2)
            continue
        r = env.ctl("pull", "vm1", remote, back, "--no-progress", timeout=60)
        if r.returncode != 0:
            ST.add("VM transfers failed cleanly (daemon killed or link reset)")
            if os.path.exists(back):
                problem(f"pull failed with exit {r.returncode} but left {back}")
                os.unlink(back)
            time.sleep(0.2)
            continue
        with open(back, "rb") as f:
            got = f.read()
        os.unlink(back)
        if got != data:
            problem(f"transfer {n}: {len(data)} bytes pushed, {len(got)} different bytes pulled")
        else:
            ST.add("VM transfers (push + pull, byte-exact)")
            ST.add("VM bytes moved", 2 * len(data))


def vm_resetter(vm, rnd):
    """Snapshot/restore: the emulator resets every vsock connection."""
    while not STOP.wait(rnd.uniform(20, 45)):
        try:
            vm.mux.reset()
            ST.add("vsock transport resets")
        except Exception as e:  # the emulator must stay up
            problem(f"vsock-mux reset failed: {e!r}")


# ---- faults ------------------------------------------------------------------------------------

def killer(d, seconds, rnd):
    t_end = time.monotonic() + seconds
    while not STOP.is_set():
        wait = rnd.uniform(15, 40)
        if time.monotonic() + wait > t_end - 20:
            return
        if STOP.wait(wait):
            return
        d.kill9()
        time.sleep(rnd.uniform(0.1, 1.0))
        d.start()


def client_killer(rnd):
    while not STOP.wait(rnd.uniform(2, 6)):
        procs = list(LG_PROCS)
        if procs:
            devlxd_util.kill_tree(rnd.choice(procs))


def disk_filler(d, state, at, hold):
    """Fill the state directory's file system, then write large values
    until the daemon refuses one with ENOSPC (small writes may still fit in
    the WAL's reused pages), hold, and free the space."""
    if STOP.wait(at):
        return
    path = os.path.join(state, "filler")
    chunk = b"\0" * (1 << 20)
    try:
        with open(path, "wb") as f:
            while True:
                f.write(chunk)
                f.flush()
    except OSError:
        pass
    ST.add("disk-full episodes")
    EPISODES.append((time.monotonic() - T0, "disk full"))
    big = "B" * (256 << 10)
    refused = 0
    t_end = time.monotonic() + hold
    while time.monotonic() < t_end and not STOP.is_set():
        if not d.up.wait(1):
            continue
        key = ("c2", "user.soak.big")
        LEDGER.attempt(key, big)
        try:
            with open(d.gl.p("c2", "config", "user.soak.big"), "w") as f:
                f.write(big)
            LEDGER.ack(key, big)
        except OSError as e:
            LEDGER.refused(key, e)
            if e.errno == 28:
                refused += 1
                ST.add("writes refused (No space left on device)")
        time.sleep(0.05)
    os.unlink(path)
    EPISODES.append((time.monotonic() - T0, "disk freed"))
    if refused == 0:
        problem("the disk was full but no write was refused with ENOSPC")


def sampler(d):
    while not STOP.wait(1):
        d.sample()
        d.check_alive()


# ---- checks ------------------------------------------------------------------------------------

def short(v):
    return repr(v) if v is None or len(v) <= 24 else f"{v[:12]!r}... ({len(v)} bytes)"


def explain_loss(db, inst, key):
    """What the soak did to a lost key, and what the store's event history
    says happened to it, for the report."""
    lines = [f"  what {inst}/{key} went through (soak clock, s):"]
    for t, what, v in LEDGER.history.get((inst, key), []):
        lines.append(f"    {t:8.3f} {what} {short(v) if what != 'refused' else v}")
    for t, what in EPISODES[-12:]:
        lines.append(f"    {t:8.3f} [{what}]")
    rows = db.execute("SELECT seq, line FROM events WHERE instance = ? ORDER BY seq", (inst,))
    hits = []
    for seq, line in rows:
        try:
            ev = json.loads(bytes(line))
        except ValueError:
            continue
        md = ev.get("metadata", {})
        if md.get("key") == key or md.get("config", {}).get("key") == key:
            hits.append(f"    event {seq} at {ev.get('timestamp')}: "
                        f"{short(json.dumps(md)[:200])}")
    lines += ["  its events in the store:"] + (hits[-6:] or ["    none"])
    PROBLEMS[-1] += "\n" + "\n".join(lines)
    print("\n".join(lines), file=sys.stderr, flush=True)


def verify(d, cts, state):
    """Every acknowledged write, on every face."""
    db = sqlite3.connect(f"file:{os.path.join(state, 'guestlink.db')}?mode=ro", uri=True)
    lost = 0
    checked = 0
    keys = sorted(LEDGER.acked)
    by_inst = {}
    for inst, key in keys:
        allowed = LEDGER.allowed((inst, key))
        try:
            with open(d.gl.p(inst, "config", key)) as f:
                fuse = f.read()
                fuse = fuse[:-1] if fuse.endswith("\n") else fuse
        except FileNotFoundError:
            fuse = None
        row = db.execute("SELECT value FROM config WHERE instance = ? AND key = ?",
                         (inst, key)).fetchone()
        store = None if row is None else bytes(row[0]).decode()
        checked += 1
        if fuse not in allowed or store not in allowed or fuse != store:
            lost += 1
            problem(f"{inst}/{key}: FUSE {str(fuse)[:80]!r}, store {str(store)[:80]!r}, acknowledged "
                    f"{str(LEDGER.acked[(inst, key)])[:80]!r} ({len(allowed)} values allowed)")
            explain_loss(db, inst, key)
        by_inst.setdefault(inst, {})[key] = fuse
    # devlxd: one request per key from inside each container
    for inst, ct in cts.items():
        want = by_inst.get(inst, {})
        code = ("import json,socket,sys\nres={}\nfor k in json.loads(sys.argv[1]):\n"
                " s=socket.socket(socket.AF_UNIX);s.connect('/dev/lxd/sock')\n"
                " s.sendall(('GET /1.0/config/%s HTTP/1.0\\r\\nHost: lxd\\r\\n"
                "\\r\\n'%k).encode())\n d=b''\n while True:\n  b=s.recv(65536)\n"
                "  if not b: break\n  d+=b\n h,_,body=d.partition(b'\\r\\n\\r\\n')\n"
                " res[k]=body.decode() if h.split(b' ')[1]==b'200' else None\n"
                "print(json.dumps(res))\n")
        p = ct.run([PYTHON, "-c", code, json.dumps(sorted(want))], timeout=120)
        got = json.loads(p.stdout)
        for k, v in want.items():
            if got.get(k) != v:
                lost += 1
                problem(f"{inst}/{k}: devlxd {str(got.get(k))[:80]!r}, FUSE {str(v)[:80]!r}")
    db.close()
    return checked, lost


def life_growth(d):
    """Peak RSS and fds of each full life; the last may not exceed the first
    by more than a margin."""
    lives = [l for l in d.lives if len(l) >= 10]
    rows = [(max(s[1] for s in l), max(s[2] for s in l)) for l in lives]
    if len(rows) >= 2:
        (r0, f0), (r1, f1) = rows[0], rows[-1]
        if r1 > r0 * 1.5 + 8192:
            problem(f"daemon RSS grew from {r0} KiB (first life) to {r1} KiB (last)")
        if f1 > f0 + 64:
            problem(f"daemon fds grew from {f0} (first life) to {f1} (last)")
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=int, default=int(os.environ.get("SOAK_SECONDS", 600)))
    ap.add_argument("--seed", type=int, default=int(time.time()))
    ap.add_argument("--disk-mib", type=int, default=48)
    ap.add_argument("--report", default=os.path.join(BUILD, "soak-report.md"))
    a = ap.parse_args()
    rnd = random.Random(a.seed)
    if os.geteuid() != 0:
        sys.exit("soak: needs root (FUSE, namespaces, tmpfs)")
    base = tempfile.mkdtemp(prefix="gl-soak-", dir="/tmp")
    state = os.path.join(base, "state")
    os.makedirs(state)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={a.disk_mib}m", "gl-soak", state],
                   check=True)
    sockdir = tempfile.mkdtemp(prefix="gl-sk-", dir="/tmp")
    sock = os.path.join(sockdir, "sock")
    ctl_dir = tempfile.mkdtemp(prefix="gl-sc-", dir="/tmp")
    d = Daemon(base, sock, ["--control-socket", os.path.join(ctl_dir, "control.sock"),
                            "--af-vsock", "off"])
    d.gl.state = state
    cts = {}
    sub = None
    env = vm = vm_work = None
    threads = []
    t0 = time.monotonic()
    try:
        d.start()
        for name in ("c1", "c2"):
            os.mkdir(d.gl.p(name))
            ct = Container(sockdir, name)
            cts[name] = ct
            with open(d.gl.p(name, "init-pid"), "w") as f:
                f.write(str(ct.pid))
            with open(d.gl.p(name, "config", "user.foo"), "w") as f:
                f.write("bar")  # what loadgen asks for
        sub = Subscriber(cts["c1"])
        host_ev = {"opens": 0, "events": 0, "bad": 0}
        why = vm_parts_missing()
        if why:
            print(f"soak: no VM load: {why}", file=sys.stderr)
        else:
            env = vm_util.VMEnv(d.gl, os.path.dirname(d.gl.control_socket))
            vm_util.wait_for(lambda: os.path.exists(env.host_pub), 10.0, "host.pub")
            vm = env.mkvm("vm1")
            vm_work = tempfile.mkdtemp(prefix="gl-soak-vm-", dir="/tmp")
        targets = [
            (fuse_writer, (d, i, ["c1", "c2"])) for i in range(4)] + [
            (instance_churn, (d, 0)), (counter_writer, (d,)),
            (host_events_reader, (d, host_ev)),
            (loadgen_loop, (cts["c1"], ["--clients", "2"], "keepalive")),
            (loadgen_loop, (cts["c2"], ["--clients", "1", "--close"], "close")),
            (lazy_ws_loop, (cts["c2"],)),
            (killer, (d, a.seconds, rnd)), (client_killer, (rnd,)),
            (disk_filler, (d, state, a.seconds * 0.4, min(10, a.seconds * 0.1))),
            (sampler, (d,)),
        ]
        if env:
            targets += [(vm_exec_loop, (d, env)), (vm_exec_loop, (d, env)),
                        (vm_transfer_loop, (d, env, vm_work)), (vm_resetter, (vm, rnd))]
        for fn, args in targets:
            t = threading.Thread(target=fn, args=args, daemon=True)
            t.start()
            threads.append(t)
        print(f"soak: running {a.seconds}s (seed {a.seed})", file=sys.stderr, flush=True)
        STOP.wait(a.seconds)
        STOP.set()
        for t in threads:
            t.join(30)
        for p in list(LG_PROCS):
            devlxd_util.kill_tree(p)
        elapsed = time.monotonic() - t0
        if not d.gl.running:
            d.start()
        # the subscriber catches up with the last counter value
        deadline = time.monotonic() + 20
        while sub.last_seen < CTR["acked"] and time.monotonic() < deadline:
            time.sleep(0.1)
        if sub.last_seen < CTR["acked"]:
            problem(f"the devlxd subscriber saw counter {sub.last_seen}, the last acknowledged "
                    f"value is {CTR['acked']}")
        if sub.dups or sub.reorders:
            problem(f"devlxd subscriber: {sub.dups} duplicate and {sub.reorders} out-of-order "
                    f"events")
        if host_ev["bad"]:
            problem(f"MNT/c1/events: {host_ev['bad']} events out of order or repeated")
        if sub.reconnects < ST.get("daemon kills"):
            problem(f"the devlxd subscriber reconnected {sub.reconnects} times for "
                    f"{ST.get('daemon kills')} daemon kills")
        if vm:
            try:
                vm.wait_online(30)
                r = env.ctl("ping", "vm1", timeout=30)
                if r.returncode != 0:
                    problem(f"ping after the soak: exit {r.returncode}: {r.stderr!r}")
            except AssertionError as e:
                problem(f"the agent link did not come back: {str(e)[:300]}")
        checked, lost = verify(d, cts, state)
        rows = life_growth(d)
        d.gl.stop()
    finally:
        STOP.set()
        if sub:
            sub.close()
        if env:
            for p in env.close():
                problem(p)
        for ct in cts.values():
            ct.stop()
        if d.gl.running:
            d.gl.stop(signal.SIGKILL)
        subprocess.run(["umount", "-l", d.gl.mnt], capture_output=True)
        if PROBLEMS:
            keep = os.path.join(os.path.dirname(a.report), "soak-logs")
            os.makedirs(keep, exist_ok=True)
            for log in d.gl.logs:
                subprocess.run(["cp", log, keep], capture_output=True)
            print(f"soak: daemon logs kept in {keep}", file=sys.stderr)
        subprocess.run(["umount", "-l", state], capture_output=True)
        subprocess.run(["rm", "-rf", base, sockdir, ctl_dir] + ([vm_work] if vm_work else []),
                       capture_output=True)

    kills = ST.get("daemon kills")
    lines = [
        f"Soak of {elapsed:.0f} s (seed {a.seed}), on {os.cpu_count()} CPUs.",
        "",
        "| what | figure |",
        "|---|---|",
        f"| devlxd requests answered | {ST.get('devlxd requests answered'):,} "
        f"({ST.get('devlxd requests answered') / elapsed:,.0f}/s) |",
        f"| FUSE writes acknowledged | {ST.get('acknowledged writes'):,} "
        f"({ST.get('acknowledged writes') / elapsed:,.0f}/s) |",
        f"| counter events delivered to the devlxd subscriber | {sub.events:,} "
        f"({sub.events / elapsed:,.0f}/s) |",
        f"| counter events read from MNT/c1/events | {host_ev['events']:,} "
        f"({host_ev['events'] / elapsed:,.0f}/s, over {host_ev['opens']} opens) |",
        f"| instances created and removed | {ST.get('instances created and removed'):,} |",
        f"| never-reading WebSocket subscribers | "
        f"{ST.get('never-reading WebSocket subscribers'):,} |",
        f"| VM execs through the agent (output and exit code checked) | "
        f"{ST.get('VM execs'):,} |",
        f"| VM push + pull round trips, byte-exact | "
        f"{ST.get('VM transfers (push + pull, byte-exact)'):,} "
        f"({ST.get('VM bytes moved') / 2**20:,.0f} MiB moved) |",
        f"| VM operations failed cleanly during faults | "
        f"{ST.get('VM execs failed cleanly (daemon killed or link reset)') + ST.get('VM transfers failed cleanly (daemon killed or link reset)'):,} |",
        f"| daemon kill -9 and restarts | {kills} |",
        f"| of which the killed daemon could not exit until the next start aborted its mount "
        f"| {ST.get('kills that left the daemon unable to exit (freed by the next start)')} |",
        f"| vsock transport resets (snapshot/restore) | {ST.get('vsock transport resets')} |",
        f"| load clients killed mid-request | {ST.get('load clients killed mid-request')} |",
        f"| disk-full episodes | {ST.get('disk-full episodes')} |",
    ]
    for k in sorted(ST.c):
        if k.startswith("writes refused"):
            lines.append(f"| FUSE {k} | {ST.c[k]:,} |")
    lines += [
        f"| subscriber reconnects / resyncs | {sub.reconnects} / {sub.resyncs} |",
        f"| duplicate or out-of-order events | {sub.dups + sub.reorders + host_ev['bad']} |",
        f"| acknowledged keys checked on FUSE, store and devlxd | {checked:,} |",
        f"| acknowledged writes lost | {lost} |",
        f"| daemon peak RSS / open fds, first and last of {len(rows)} lives | "
        + (f"{rows[0][0] // 1024} MiB / {rows[0][1]}, {rows[-1][0] // 1024} MiB / {rows[-1][1]} "
           f"(highest {max(r for r, _ in rows) // 1024} MiB / {max(f for _, f in rows)})"
           if rows else "not sampled") + " |",
        f"| daemon deaths not caused by the soak | "
        f"{sum(1 for p in PROBLEMS if 'died by itself' in p)} |",
        "",
        "Result: " + ("PASS" if not PROBLEMS else f"FAIL ({len(PROBLEMS)} problems)"),
    ]
    report = "\n".join(lines) + "\n"
    print(report)
    os.makedirs(os.path.dirname(a.report), exist_ok=True)
    with open(a.report, "w") as f:
        f.write(report)
    for p in PROBLEMS:
        print("  - " + p.splitlines()[0])
    sys.exit(0 if not PROBLEMS else 1)


if __name__ == "__main__":
    main()
