#!/bin/bash
# bench-vm: the VM figures of issue 5, each beside its baseline measured in
# the same run, through tools/vsock-mux with the agent in its own pid +
# mount + network namespaces (never AF_VSOCK: this machine is a VM itself).
# Run as root. docs/benchmarks-vm.md explains every figure.
#
#   1. readiness: agent start -> the host's first successful answer
#      (`guestlinkctl wait vm1 agent` returns), beside starting `true` in
#      the same namespaces (nsenter) and the process start of the agent
#      itself (start -> its control listener exists).
#   2. ping p50/p99 (a control-socket request, i.e. a new authenticated
#      agent connection each), beside a raw Unix-socket echo through the
#      same emulator: one echo on a new CONNECT'ed stream, and one byte on
#      a held stream.
#   3. exec true p50/p99 (control socket), guestlinkctl exec true, beside
#      fork+exec of true on the host.
#   4. push / pull of a BENCH_VM_FILE_MB file (default 1024) with
#      guestlinkctl, beside `cat` through the same emulator path (a sink /
#      source in the guest's listener directory; the sink fsyncs as the
#      agent does).
#   5. devlxd GET /1.0/config/user.foo through the agent (loadgen inside the
#      VM's namespaces) req/s, beside the container path (loadgen in a
#      container on the host socket).
#
# Environment: BUILD (default build), BENCH_VM_N (round trips per latency
# figure, default 500), BENCH_VM_FILE_MB (default 1024), BENCH_SECS (seconds
# per loadgen run, default 2), BENCH_DIR (for the big files, default /var/tmp).
set -uo pipefail

cd "$(dirname "$0")/.." || exit 1
export BUILD=${BUILD:-build}
export GUESTLINKD=$PWD/$BUILD/guestlinkd
export BENCH_VM_N=${BENCH_VM_N:-500}
export BENCH_VM_FILE_MB=${BENCH_VM_FILE_MB:-1024}
export BENCH_SECS=${BENCH_SECS:-2}
export BENCH_DIR=${BENCH_DIR:-/var/tmp}

die() {
	echo "bench-vm: $*" >&2
	exit 1
}

[ "$(id -u)" -eq 0 ] || die "run as root: FUSE mount and namespaces"
for b in guestlinkd guestlink-agent guestlinkctl tools/vsock-mux tools/loadgen; do
	[ -x "$BUILD/$b" ] || die "$BUILD/$b is missing; run make first"
done
[ -e /dev/fuse ] || die "/dev/fuse is missing"

exec /usr/bin/python3 -c "$(cat <<'PY'
import json, os, shutil, socket, statistics, subprocess, sys, tempfile, threading, time

sys.path.insert(0, os.path.join(os.getcwd(), "tests", "integration"))
import glutil
from devlxd_util import Container, make_sockdir, wait_socket, reap_orphans
from vm_util import (CTL, ModuleVMEnv, FrameConn, REQUEST, RESPONSE, ERROR, END, DATA, wait_for,
                     AGENT_PORT)

BUILD = os.environ["BUILD"]
N = int(os.environ["BENCH_VM_N"])
FILE_MB = int(os.environ["BENCH_VM_FILE_MB"])
SECS = os.environ["BENCH_SECS"]
LOADGEN = os.path.abspath(os.path.join(BUILD, "tools", "loadgen"))
ECHO_PORT, SINK_PORT, SOURCE_PORT = 7400, 7401, 7402


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * p / 100))]


def lat(name, xs, base_name=None, base=None):
    line = f"  {name:<58} p50 {pct(xs, 50) * 1e6:9.0f} us   p99 {pct(xs, 99) * 1e6:9.0f} us"
    print(line)
    if base is not None:
        print(f"  {'  baseline: ' + base_name:<58} p50 {pct(base, 50) * 1e6:9.0f} us   "
              f"p99 {pct(base, 99) * 1e6:9.0f} us")
    sys.stdout.flush()


def rate(name, mb, secs, base_name, base_secs):
    print(f"  {name:<58} {mb / secs:9.1f} MiB/s   ({secs:.2f} s)")
    print(f"  {'  baseline: ' + base_name:<58} {mb / base_secs:9.1f} MiB/s   ({base_secs:.2f} s)")
    sys.stdout.flush()


# ---- guest-side helpers of the baselines: listeners in the guest dir ----------

def serve(path, handler):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.listen(64)

    def loop():
        while True:
            try:
                c, _ = s.accept()
            except OSError:
                return
            threading.Thread(target=handler, args=(c,), daemon=True).start()
    threading.Thread(target=loop, daemon=True).start()
    return s


def pump(read, write, size=1 << 20):
    while True:
        b = read(size)
        if not b:
            return
        write(b)


def echo(c):
    with c:
        pump(c.recv, c.sendall, 65536)


def sink_to(path):
    def h(c):
        with c, open(path, "wb") as f:
            pump(c.recv, f.write)
            f.flush()
            os.fsync(f.fileno())
    return h


def source_from(path):
    def h(c):
        with c, open(path, "rb") as f:
            pump(f.read, c.sendall)
    return h


def vsock_connect(uds, port):
    """The host side of hybrid vsock: CONNECT <port>, read OK <n>."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(uds)
    s.sendall(b"CONNECT %d\n" % port)
    line = b""
    while not line.endswith(b"\n"):
        b = s.recv(1)
        if not b:
            raise OSError("vsock-mux closed the CONNECT")
        line += b
    assert line.startswith(b"OK "), line
    return s


def op(env, req, timeout=30):
    c = FrameConn(env.control, timeout)
    try:
        c.request(1, req)
        _, _, ctl = c.until_end(1, timeout)
        assert ctl[-1][0] == RESPONSE, ctl
        return ctl[-1][2]
    finally:
        c.close()


def main():
    base = tempfile.mkdtemp(prefix="guestlink-bench-vm.", dir=os.environ["BENCH_DIR"])
    sockdir = make_sockdir()
    try:
        mod = ModuleVMEnv(base, extra=["--devlxd-socket", os.path.join(sockdir, "sock")])
        env = mod.__enter__()
        try:
            wait_socket(os.path.join(sockdir, "sock"), env.gl.proc)
            run(env, sockdir, base)
        finally:
            mod.__exit__(None, None, None)
    finally:
        shutil.rmtree(base, ignore_errors=True)
        shutil.rmtree(sockdir, ignore_errors=True)


def run(env, sockdir, base):
    vm = env.mkvm("vm1", config={"user.foo": "bar"}, agent=False)
    vm.start_ns()
    print("bench-vm: guestlinkd + tools/vsock-mux (firecracker mode) + guestlink-agent in "
          "pid/mount/net namespaces")

    # 1. readiness
    ready, spawn, nsb = [], [], []
    for i in range(5):
        w = env.ctl_popen("wait", "vm1", "agent", "--timeout", "30")
        time.sleep(0.3)
        t0 = time.monotonic()
        vm.start_agent(wait=False)
        listen = os.path.join(vm.guest, f"listen-{AGENT_PORT}")
        while not os.path.exists(listen):
            time.sleep(0.0005)
        spawn.append(time.monotonic() - t0)
        rc = w.wait(30)
        ready.append(time.monotonic() - t0)
        w.stdout.close()
        w.stderr.close()
        assert rc == 0, "wait agent failed"
        t0 = time.monotonic()
        subprocess.run(vm.ns.nsenter(["true"]), check=True)
        nsb.append(time.monotonic() - t0)
        if i < 4:
            vm.kill_agent()
            try:
                os.unlink(listen)
            except OSError:
                pass
            vm.wait_offline()
    print("1. readiness (agent start -> first answer seen by the host), 5 starts")
    lat("agent start -> wait agent returns", ready, "nsenter true (process start in the VM)", nsb)
    lat("  of which: start -> agent listening", spawn)

    # 2. ping vs raw echo
    echo_srv = serve(os.path.join(vm.guest, f"listen-{ECHO_PORT}"), echo)
    pings = []
    for _ in range(N):
        t0 = time.monotonic()
        op(env, {"op": "ping", "instance": "vm1"})
        pings.append(time.monotonic() - t0)
    fresh, held = [], []
    for _ in range(N):
        t0 = time.monotonic()
        s = vsock_connect(vm.uds, ECHO_PORT)
        s.sendall(b"x")
        assert s.recv(1) == b"x"
        fresh.append(time.monotonic() - t0)
        s.close()
    s = vsock_connect(vm.uds, ECHO_PORT)
    for _ in range(N):
        t0 = time.monotonic()
        s.sendall(b"x")
        assert s.recv(1) == b"x"
        held.append(time.monotonic() - t0)
    s.close()
    echo_srv.close()
    print(f"2. control round trip, {N} each")
    lat("ping (control socket, new agent link each)", pings,
        "echo on a new CONNECT'ed emulator stream", fresh)
    lat("  floor: 1 byte echo on a held stream", held)
    cli = []
    for _ in range(min(N, 100)):
        t0 = time.monotonic()
        p = env.ctl("ping", "vm1")
        cli.append(time.monotonic() - t0)
        assert p.returncode == 0, p.stderr
    lat("guestlinkctl ping (process included), 100", cli)

    # 3. exec true
    ex, host = [], []
    for _ in range(N):
        t0 = time.monotonic()
        r = op(env, {"op": "exec", "instance": "vm1", "argv": ["true"]})
        ex.append(time.monotonic() - t0)
        assert r.get("exit_code") == 0, r
    for _ in range(N):
        t0 = time.monotonic()
        subprocess.run(["true"], check=True)
        host.append(time.monotonic() - t0)
    print(f"3. exec true, {N} each")
    lat("exec true (control socket)", ex, "fork+exec true on the host", host)
    cli = []
    for _ in range(100):
        t0 = time.monotonic()
        p = env.ctl("exec", "vm1", "-T", "--", "true")
        cli.append(time.monotonic() - t0)
        assert p.returncode == 0, p.stderr
    lat("guestlinkctl exec vm1 -- true, 100", cli)

    # 4. push / pull
    big = os.path.join(base, "big")
    with open(big, "wb") as f:
        chunk = os.urandom(1 << 20)
        for _ in range(FILE_MB):
            f.write(chunk)
    gdir = tempfile.mkdtemp(prefix="gl-bench-vm-guest.", dir=os.environ["BENCH_DIR"])
    try:
        target = os.path.join(gdir, "pushed")
        t0 = time.monotonic()
        p = env.ctl("push", "vm1", big, target, timeout=3600)
        push = time.monotonic() - t0
        assert p.returncode == 0, p.stderr
        assert os.path.getsize(target) == FILE_MB << 20
        back = os.path.join(base, "pulled")
        t0 = time.monotonic()
        p = env.ctl("pull", "vm1", target, back, timeout=3600)
        pull = time.monotonic() - t0
        assert p.returncode == 0, p.stderr
        assert os.path.getsize(back) == FILE_MB << 20
        os.unlink(back)
        # baselines: cat through the same emulator path
        sinkf = os.path.join(gdir, "sunk")
        sk = serve(os.path.join(vm.guest, f"listen-{SINK_PORT}"), sink_to(sinkf))
        t0 = time.monotonic()
        s = vsock_connect(vm.uds, SINK_PORT)
        cat = subprocess.Popen(["cat", big], stdout=subprocess.PIPE)
        while True:
            b = cat.stdout.read(1 << 20)
            if not b:
                break
            s.sendall(b)
        cat.wait()
        s.close()
        wait_for(lambda: os.path.exists(sinkf) and os.path.getsize(sinkf) == FILE_MB << 20, 600,
                 "the sink", 0.001)
        push_base = time.monotonic() - t0
        sk.close()
        src = serve(os.path.join(vm.guest, f"listen-{SOURCE_PORT}"), source_from(target))
        t0 = time.monotonic()
        s = vsock_connect(vm.uds, SOURCE_PORT)
        out = open(back, "wb")
        cat = subprocess.Popen(["cat"], stdin=subprocess.PIPE, stdout=out)
        while True:
            b = s.recv(1 << 20)
            if not b:
                break
            cat.stdin.write(b)
        cat.stdin.close()
        cat.wait()
        out.close()
        pull_base = time.monotonic() - t0
        src.close()
        assert os.path.getsize(back) == FILE_MB << 20
        print(f"4. file transfer, {FILE_MB} MiB")
        rate("guestlinkctl push", FILE_MB, push, "cat | emulator stream -> file (fsync)", push_base)
        rate("guestlinkctl pull", FILE_MB, pull, "file -> emulator stream | cat", pull_base)
    finally:
        shutil.rmtree(gdir, ignore_errors=True)
        for f in (big, os.path.join(base, "pulled")):
            if os.path.exists(f):
                os.unlink(f)

    # 5. devlxd through the agent vs the container path
    os.mkdir(env.gl.p("c1"))
    env.set("c1", "user.foo", "bar")
    ct = Container(sockdir, "c1")
    try:
        glutil.write_bytes(env.gl.p("c1", "init-pid"), f"{ct.pid}\n")
        print(f"5. devlxd GET /1.0/config/user.foo, median of 3 runs of {SECS} s each")
        for mode in ([], ["--close"]):
            for who, argv in (("VM (through the agent)", vm.ns.nsenter),
                              ("container (host socket)", lambda a: ct.nsenter(a))):
                runs = []
                for _ in range(3):
                    p = subprocess.run(argv([LOADGEN, "--socket", "/dev/lxd/sock", "--duration",
                                             SECS, "--expect-body", "bar", "--label", "x"] + mode),
                                       capture_output=True, text=True, timeout=120)
                    runs.append(dict(x.split("=", 1) for x in p.stdout.split() if "=" in x))
                # the median run by rate (the machine is shared: one run can be unlucky)
                kv = sorted(runs, key=lambda r: float(r.get("rate", 0)))[1]
                tag = "keep-alive" if not mode else "new connection each"
                name = f"{who}, {tag}" if who.startswith("VM") else f"  baseline: {who}, {tag}"
                print(f"  {name:<58} {float(kv.get('rate', 0)):9.0f} req/s   "
                      f"p50 {kv.get('p50_us', '?'):>6} us  p99 {kv.get('p99_us', '?'):>6} us"
                      f"  errors={kv.get('errors', '?')}")
                sys.stdout.flush()
    finally:
        ct.stop()


main()
PY
)"
