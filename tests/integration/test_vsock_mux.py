"""tools/vsock-mux against raw sockets: every item of specs/vsock.md §7.

The host is played with plain Unix sockets on <uds>, the guest with Unix
listeners at DIR/listen-<port> and dials to DIR/host. Nothing here touches
AF_VSOCK. VSOCK_MUX (environment) names the binary; default tools/vsock-mux
in the directory of GUESTLINKD (so build-san/ under SANITIZE=1), else
build/tools/vsock-mux."""

import errno
import json
import os
import resource
import select
import shutil
import signal
import socket
import subprocess
import tempfile
import time

import pytest

REPO = os.path.realpath(os.path.join(os.path.dirname(__file__), "..", ".."))
# beside the daemon under test (build/ or build-san/), unless named
_BUILD = os.path.dirname(os.environ["GUESTLINKD"]) if os.environ.get("GUESTLINKD") \
    else os.path.join(REPO, "build")
MUX = os.path.abspath(os.environ.get("VSOCK_MUX") or os.path.join(_BUILD, "tools", "vsock-mux"))
FIRST_PORT = 1 << 30
RING = 64 * 1024

pytestmark = pytest.mark.skipif(not os.path.exists(MUX), reason=f"{MUX} not built")


class Mux:
    def __init__(self, mode="firecracker", inactive=False, max_conns=None, verbose=True,
                 uds_len=None):
        # sun_path is 108 bytes: keep the paths short, whatever pytest's tmp_path is
        self.base = tempfile.mkdtemp(prefix="vmux-")
        self.uds = os.path.join(self.base, "vm.sock")
        if uds_len:
            self.uds = os.path.join(self.base, "v" * (uds_len - len(self.base) - 1))
        self.dir = os.path.join(self.base, "g")
        self.ctl_path = os.path.join(self.base, "ctl")
        self.log = os.path.join(self.base, "log")
        args = [MUX, "--uds", self.uds, "--guest", self.dir, "--mode", mode,
                "--control", self.ctl_path]
        if inactive:
            args.append("--inactive")
        if max_conns is not None:
            args += ["--max-conns", str(max_conns)]
        if verbose:
            args.append("-v")
        self.logf = open(self.log, "wb")
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=self.logf)
        deadline = time.monotonic() + 5
        while b"vsock-mux: ready\n" not in self.read_log():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("vsock-mux did not start: " + self.read_log().decode())
            time.sleep(0.01)

    def read_log(self):
        with open(self.log, "rb") as f:
            return f.read()

    def ctl(self, cmd):
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(self.ctl_path)
            s.sendall(cmd.encode() + b"\n")
            return read_line(s, cap=4096).decode()

    def stats(self):
        return json.loads(self.ctl("stats"))

    def stop(self):
        """SIGTERM: exit status 0 and every socket file removed."""
        problems = []
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                rc = self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                rc = "hung"
            if rc != 0:
                problems.append(f"exit status {rc} on SIGTERM")
        self.logf.close()
        for p in (self.uds, os.path.join(self.dir, "host"), self.ctl_path):
            if os.path.exists(p):
                problems.append(f"{p} left behind")
        log = self.read_log().decode(errors="replace")
        if "AddressSanitizer" in log or "runtime error:" in log:
            problems.append("sanitizer report:\n" + log[-5000:])
        shutil.rmtree(self.base, ignore_errors=True)
        return problems


@pytest.fixture
def mux_factory():
    muxes = []

    def make(**kw):
        m = Mux(**kw)
        muxes.append(m)
        return m

    yield make
    problems = []
    for m in muxes:
        problems += m.stop()
    if problems:
        pytest.fail("teardown:\n  " + "\n  ".join(problems), pytrace=False)


@pytest.fixture
def mux(mux_factory):
    return mux_factory()


# ---- socket helpers ------------------------------------------------------------

def read_line(s, cap=64):
    """Byte by byte up to "\\n" (included), as specs/vsock.md §3 says a
    client must; b"" or a partial line on EOF."""
    out = b""
    while not out.endswith(b"\n") and len(out) < cap:
        b = s.recv(1)
        if not b:
            break
        out += b
    return out


def guest_listen(m, port, backlog=64):
    s = socket.socket(socket.AF_UNIX)
    s.bind(os.path.join(m.dir, f"listen-{port}"))
    s.listen(backlog)
    return s


def host_dial(m, data=None, path=None):
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(5)
    s.connect(path or m.uds)
    if data is not None:
        try:
            s.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # closed at once (the cap): the reader sees EOF
    return s


def host_connect(m, port, extra=b""):
    """A host client that got its OK line: (socket, the line)."""
    s = host_dial(m, b"CONNECT %d\n" % port + extra)
    line = read_line(s)
    assert line.startswith(b"OK "), line
    return s, line


def silent(s, seconds):
    """Nothing readable (no byte, no EOF) for `seconds`."""
    r, _, _ = select.select([s], [], [], seconds)
    return not r


def expect_eof(s, timeout=5):
    """The peer closed with no bytes at all."""
    s.settimeout(timeout)
    try:
        data = s.recv(4096)
    except ConnectionResetError:
        data = b""
    assert data == b"", data


def recv_exact(s, n, timeout=10):
    s.settimeout(timeout)
    out = bytearray()
    while len(out) < n:
        b = s.recv(min(1 << 20, n - len(out)))
        if not b:
            break
        out += b
    return bytes(out)


def recv_all(s, timeout=10):
    """Everything until EOF (or ECONNRESET)."""
    s.settimeout(timeout)
    out = bytearray()
    while True:
        try:
            b = s.recv(1 << 20)
        except ConnectionResetError:
            break
        if not b:
            break
        out += b
    return bytes(out)


def pattern(n, seed=0):
    unit = bytes((i * 7 + seed) % 251 for i in range(251))
    return (unit * (n // len(unit) + 1))[:n]


def send_until_blocked(s, chunk=16384, settle=0.3, cap=64 << 20):
    """Write non-blocking until the peer has stopped taking bytes for
    `settle` seconds; the bytes written."""
    s.setblocking(False)
    data = pattern(cap)
    off = 0
    quiet_since = None
    while off < cap:
        try:
            off += s.send(data[off:off + chunk])
            quiet_since = None
        except BlockingIOError:
            now = time.monotonic()
            if quiet_since is None:
                quiet_since = now
            elif now - quiet_since > settle:
                break
            time.sleep(0.02)
    s.setblocking(True)
    return data[:off]


def wait_for(cond, timeout=5, what="condition"):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


# ---- host side: the socket and the inactive device -------------------------------

def test_help_lists_every_option():
    out = subprocess.run([MUX, "--help"], capture_output=True, text=True, timeout=5)
    assert out.returncode == 0
    for opt in ("--uds", "--guest", "--mode", "--inactive", "--max-conns", "--control",
                "firecracker", "vhost-device", "cloud-hypervisor", "SIGUSR1", "SIGUSR2"):
        assert opt in out.stdout, opt


def test_listens_and_exits_clean_on_sigint(mux_factory):
    m = mux_factory()
    assert os.path.exists(m.uds) and os.path.exists(os.path.join(m.dir, "host"))
    m.proc.send_signal(signal.SIGINT)
    assert m.proc.wait(5) == 0
    assert not os.path.exists(m.uds)
    assert not os.path.exists(os.path.join(m.dir, "host"))


@pytest.mark.parametrize("how", ["SIGUSR2", "activate"])
def test_inactive_connects_wait_in_backlog(mux_factory, how):
    m = mux_factory(inactive=True)
    g = guest_listen(m, 5)
    h = host_dial(m, b"CONNECT 5\n")  # the connect itself lands in the backlog
    assert silent(h, 1.0), "an inactive device answered"
    assert m.stats()["active"] is False
    assert m.stats()["host_accepted"] == 0
    if how == "SIGUSR2":
        m.proc.send_signal(signal.SIGUSR2)
    else:
        assert m.ctl("activate") == "ok\n"
    assert read_line(h) == b"OK %d\n" % FIRST_PORT
    a, _ = g.accept()
    h.sendall(b"ping")
    assert recv_exact(a, 4) == b"ping"


# ---- the CONNECT line ---------------------------------------------------------------

GOOD_LINES = [
    b"CONNECT 5\n",
    b"connect 5\n",
    b"CoNnEcT 5\n",
    b"connect\t5\n",
    b"  connect   5  and more words\n",
    b"connect 0005\n",
    b"connect +5\n",              # Rust's u32 parse takes a leading '+'
    b"connect\xc2\xa05\n",        # U+00A0 is whitespace to split_whitespace
    b"connect 5" + b" " * 23,     # a full 32-byte buffer without "\n" is parsed
]

BAD_LINES = [
    b"CONNECTX 5\n",
    b"conect 5\n\n",
    b"connect -5\n",
    b"connect 4294967296\n",
    b"connect 5x\n",
    b"connect\n",                 # 8 bytes: the 10-byte read comes up short
    b"connect 5",                 # 9 bytes and nothing more
    b"connect 55",                # 10 bytes, then the next byte is missing
    b"connect 5\xff\n",           # not UTF-8
    b"\n\n\n\n\n\n\n\n\n\n",
    b"connect " + b"5" * 24,      # 32 bytes, a number too large
    b"x" * 40 + b"\n",
]


@pytest.mark.parametrize("line", GOOD_LINES)
def test_connect_line_accepted(mux, line):
    g = guest_listen(mux, 5)
    h = host_dial(mux, line)
    assert read_line(h) == b"OK %d\n" % FIRST_PORT
    a, _ = g.accept()
    a.sendall(b"hi")
    assert recv_exact(h, 2) == b"hi"


@pytest.mark.parametrize("line", BAD_LINES)
def test_connect_line_rejected_silently(mux, line):
    g = guest_listen(mux, 5)
    h = host_dial(mux, line)
    expect_eof(h)
    g.setblocking(False)
    with pytest.raises(BlockingIOError):
        g.accept()
    assert mux.stats()["host_failed"] == 1


def test_line_in_two_writes_fails(mux):
    """Firecracker reads the line at once, non-blocking: a byte that has not
    arrived yet when the event is handled is a failure."""
    guest_listen(mux, 5)
    h = host_dial(mux, b"CONNECT 5")
    time.sleep(0.3)
    try:
        h.sendall(b"\n")
    except (BrokenPipeError, ConnectionResetError):
        pass
    expect_eof(h)
    h2 = host_dial(mux, b"CONN")
    time.sleep(0.3)
    try:
        h2.sendall(b"ECT 5\n")
    except (BrokenPipeError, ConnectionResetError):
        pass
    expect_eof(h2)


@pytest.mark.parametrize("mode", ["firecracker", "vhost-device"])
def test_no_guest_listener_is_eof(mux_factory, mode):
    m = mux_factory(mode=mode)
    h = host_dial(m, b"CONNECT 9\n")
    expect_eof(h)
    # a stale socket file: bound once, nobody listening
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(os.path.join(m.dir, "listen-9"))
    stale.close()
    h = host_dial(m, b"CONNECT 9\n")
    expect_eof(h)
    assert m.stats()["host_failed"] == 2


def test_ok_ports_round_robin_from_2_30(mux):
    g = guest_listen(mux, 5)
    lines = []
    socks = []
    for _ in range(3):
        h, line = host_connect(mux, 5)
        socks.append(h)
        lines.append(line)
    assert lines == [b"OK %d\n" % (FIRST_PORT + i) for i in range(3)]
    # a freed port is not reused until the counter comes round
    socks[0].close()
    wait_for(lambda: mux.stats()["live"] == 2, what="the closed connection to go")
    h, line = host_connect(mux, 5)
    assert line == b"OK %d\n" % (FIRST_PORT + 3)
    for p in (line, *lines):
        assert FIRST_PORT <= int(p.split()[1]) < (1 << 31)
    g.close()


def test_ok_only_after_guest_listener_takes_it(mux):
    """The OK is the guest's RESPONSE: with the guest listener's backlog full
    there is no OK; the moment it has room, the OK comes."""
    g = guest_listen(mux, 5, backlog=0)
    filler = socket.socket(socket.AF_UNIX)
    filler.connect(os.path.join(mux.dir, "listen-5"))  # backlog 0 holds one
    h = host_dial(mux, b"CONNECT 5\n")
    assert silent(h, 0.5)
    assert mux.stats()["requests"] == 1
    f, _ = g.accept()  # room again
    assert read_line(h) == b"OK %d\n" % FIRST_PORT
    a, _ = g.accept()
    a.sendall(b"x")
    assert recv_exact(h, 1) == b"x"
    f.close()
    filler.close()


def test_bytes_after_line_forwarded_after_ok(mux):
    g = guest_listen(mux, 5)
    h = host_dial(mux, b"CONNECT 5\nHELLO")
    assert read_line(h) == b"OK %d\n" % FIRST_PORT
    a, _ = g.accept()
    assert recv_exact(a, 5) == b"HELLO"
    # the guest may speak first: its bytes follow the OK line on the stream
    a.sendall(b"AGENT-HELLO")
    assert recv_exact(h, 11) == b"AGENT-HELLO"


def test_full_32_byte_buffer_then_data(mux):
    g = guest_listen(mux, 5)
    h = host_dial(mux, b"connect 5" + b" " * 23 + b"DATA")
    assert read_line(h) == b"OK %d\n" % FIRST_PORT
    a, _ = g.accept()
    assert recv_exact(a, 4) == b"DATA"


# ---- the request expiry, swept lazily -------------------------------------------------

def full_backlog(m, port):
    g = guest_listen(m, port, backlog=0)
    filler = socket.socket(socket.AF_UNIX)
    filler.connect(os.path.join(m.dir, f"listen-{port}"))
    return g, filler


def test_unanswered_request_expires_only_when_swept(mux):
    g, filler = full_backlog(mux, 5)
    h = host_dial(mux, b"CONNECT 5\n")
    # 2 s pass: no OK, no EOF (nobody adds a connection)
    assert silent(h, 2.6)
    assert mux.stats()["expired"] == 0
    # a failed line does not add a connection: still no sweep
    bad = host_dial(mux, b"nonsense!!\n")
    expect_eof(bad)
    assert silent(h, 0.3)
    # a valid line adds one (even for a port nobody listens on): sweep
    other = host_dial(mux, b"CONNECT 77\n")
    expect_eof(other)
    expect_eof(h)
    st = mux.stats()
    assert st["expired"] == 1 and st["live"] == 0
    g.close()
    filler.close()


def test_late_answer_before_sweep_still_connects(mux):
    g, filler = full_backlog(mux, 5)
    h = host_dial(mux, b"CONNECT 5\n")
    assert silent(h, 2.3)  # past the expiry, but nothing swept
    f, _ = g.accept()
    assert read_line(h) == b"OK %d\n" % FIRST_PORT
    f.close()
    filler.close()


def test_vhost_device_has_no_request_expiry(mux_factory):
    m = mux_factory(mode="vhost-device")
    g, filler = full_backlog(m, 5)
    h = host_dial(m, b"CONNECT 5\n")
    assert silent(h, 2.3)
    other = host_dial(m, b"CONNECT 77\n")
    expect_eof(other)
    assert silent(h, 0.3)
    assert m.stats()["expired"] == 0
    f, _ = g.accept()
    assert read_line(h) == b"OK 5\n"
    f.close()
    filler.close()


# ---- the connection cap ----------------------------------------------------------------

@pytest.fixture
def many_fds():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, 16384)
    if want < 5000:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} is too low")
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_cap_1023_then_accept_and_close(mux, many_fds):
    g = guest_listen(mux, 5, backlog=4096)
    hosts = []
    for i in range(1023):
        h, line = host_connect(mux, 5)
        assert line == b"OK %d\n" % (FIRST_PORT + i)
        hosts.append(h)
    assert mux.stats()["live"] == 1023
    extra = host_dial(mux, b"CONNECT 5\n")
    expect_eof(extra)  # accepted, then closed at once: no line, no OK
    st = mux.stats()
    assert st["cap_refused"] == 1 and st["live"] == 1023
    # one goes, one more fits
    hosts.pop().close()
    wait_for(lambda: mux.stats()["live"] == 1022, what="a slot to free up")
    h, line = host_connect(mux, 5)
    hosts.append(h)
    for h in hosts:
        h.close()
    g.close()


def test_cap_counts_both_directions(mux_factory):
    m = mux_factory(max_conns=3)
    g = guest_listen(m, 5)
    hl = socket.socket(socket.AF_UNIX)
    hl.bind(m.uds + "_7362")
    hl.listen(8)
    h1, _ = host_connect(m, 5)
    h2, _ = host_connect(m, 5)
    gd = guest_dial(m, 7362)
    assert read_line(gd) == b"OK\n"
    assert m.stats()["live"] == 3
    expect_eof(host_dial(m, b"CONNECT 5\n"))
    # a guest dial over the cap is refused too (the guest sees ECONNRESET)
    gd2 = guest_dial(m, 7362)
    expect_eof(gd2)
    h1.close()
    wait_for(lambda: m.stats()["live"] == 2, what="a slot")
    gd3 = guest_dial(m, 7362)
    assert read_line(gd3) == b"OK\n"
    g.close()
    hl.close()


def test_vhost_device_has_no_cap(mux_factory, many_fds):
    m = mux_factory(mode="vhost-device", verbose=False)
    g = guest_listen(m, 5, backlog=4096)
    hosts = [host_connect(m, 5)[0] for _ in range(1030)]
    assert m.stats()["live"] == 1030
    for h in hosts:
        h.close()
    g.close()


# ---- guest-initiated ------------------------------------------------------------------------

def guest_dial(m, port, line=None):
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    s.connect(os.path.join(m.dir, "host"))
    try:
        s.sendall(line if line is not None else b"CONNECT %d\n" % port)
    except (BrokenPipeError, ConnectionResetError):
        pass
    return s


def test_guest_dial_ok_before_host_accepts(mux):
    hl = socket.socket(socket.AF_UNIX)
    hl.bind(mux.uds + "_7362")
    hl.listen(8)
    gd = guest_dial(mux, 7362)
    # OK arrives while nobody has called accept() on <uds>_7362
    assert read_line(gd) == b"OK\n"
    gd.sendall(b"early bytes")
    a, _ = hl.accept()
    assert recv_exact(a, 11) == b"early bytes"
    a.sendall(b"reply")
    assert recv_exact(gd, 5) == b"reply"
    st = mux.stats()
    assert st["guest_ok"] == 1 and st["live"] == 1


def test_guest_dial_missing_or_stale_is_reset(mux):
    gd = guest_dial(mux, 7362)
    expect_eof(gd)  # ENOENT: no OK, the agent reports ECONNRESET
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(mux.uds + "_7362")
    stale.close()  # file left behind, nobody listening: ECONNREFUSED
    gd = guest_dial(mux, 7362)
    expect_eof(gd)
    gd = guest_dial(mux, 0, line=b"hello there\n")
    expect_eof(gd)
    assert mux.stats()["guest_failed"] == 3


def test_guest_dial_path_too_long_is_reset(mux_factory):
    """"<uds>_<P>" must fit sun_path (107 bytes and a NUL): 100 + "_7" does,
    100 + "_1234567" does not, and that dial fails like a missing file."""
    m = mux_factory(uds_len=100)
    assert len(m.uds) == 100
    for port in (7, 1234567):
        if len(m.uds) + 1 + len(str(port)) <= 107:
            hl = socket.socket(socket.AF_UNIX)
            hl.bind(f"{m.uds}_{port}")
            hl.listen(4)
    assert read_line(guest_dial(m, 7)) == b"OK\n"
    expect_eof(guest_dial(m, 1234567))
    st = m.stats()
    assert st["guest_ok"] == 1 and st["guest_failed"] == 1
    hl.close()


def test_guest_dial_after_move_goes_to_new_path(mux):
    new = os.path.join(mux.base, "moved.sock")
    assert mux.ctl(f"move {new}") == "ok\n"
    assert not os.path.exists(mux.uds) and os.path.exists(new)
    hl = socket.socket(socket.AF_UNIX)
    hl.bind(new + "_7362")
    hl.listen(8)
    gd = guest_dial(mux, 7362)
    assert read_line(gd) == b"OK\n"
    hl.accept()
    g = guest_listen(mux, 5)
    h = host_dial(mux, b"CONNECT 5\n", path=new)
    assert read_line(h).startswith(b"OK ")
    g.accept()
    mux.uds = new  # teardown checks that the moved socket is removed


# ---- data and back-pressure ---------------------------------------------------------

def pair(m, port=5):
    g = guest_listen(m, port)
    h, _ = host_connect(m, port)
    a, _ = g.accept()
    g.close()
    return h, a


def test_guest_to_host_buffer_is_64k_and_nothing_dropped(mux):
    h, a = pair(mux)
    sent = send_until_blocked(a)  # the host does not read
    st = mux.stats()
    assert st["buffered_g2h"] == RING, st
    got = recv_exact(h, len(sent))
    assert got == sent
    # and it flows again
    a.sendall(b"tail")
    assert recv_exact(h, 4) == b"tail"


def test_host_to_guest_stops_reading_host(mux):
    h, a = pair(mux)
    sent = send_until_blocked(h)  # the guest does not read: host writes hit EAGAIN
    assert len(sent) < 8 << 20, len(sent)
    st = mux.stats()
    assert st["buffered_h2g"] == RING, st
    assert recv_exact(a, len(sent)) == sent


def test_bulk_both_ways(mux):
    import threading
    h, a = pair(mux)
    up, down = pattern(3 << 20, 1), pattern(3 << 20, 2)
    res = {}
    t1 = threading.Thread(target=lambda: res.__setitem__("g", recv_exact(a, len(down))))
    t2 = threading.Thread(target=lambda: res.__setitem__("h", recv_exact(h, len(up))))
    t1.start()
    t2.start()
    h.sendall(down)
    a.sendall(up)
    t1.join(20)
    t2.join(20)
    assert res["g"] == down and res["h"] == up


# ---- close and half-close ---------------------------------------------------------------

@pytest.mark.parametrize("how", ["close", "shut_wr"])
def test_host_close_or_shut_wr_is_full_close(mux, how):
    h, a = pair(mux)
    h.sendall(b"last words")
    if how == "close":
        h.close()
    else:
        h.shutdown(socket.SHUT_WR)
    assert recv_all(a) == b"last words"  # then EOF toward the guest
    # the guest cannot send any more: a full close, not a half-close
    time.sleep(0.1)
    with pytest.raises((BrokenPipeError, ConnectionResetError)):
        for _ in range(50):
            a.send(b"late")
            time.sleep(0.02)
    if how == "shut_wr":
        assert recv_all(h) == b""  # and the host gets EOF, none of "late"
    wait_for(lambda: mux.stats()["live"] == 0, what="the connection to go")


def test_host_close_drains_buffered_bytes_to_guest(mux):
    h, a = pair(mux)
    sent = send_until_blocked(h)
    h.close()
    assert recv_all(a) == sent


def test_guest_shut_wr_not_propagated(mux):
    h, a = pair(mux)
    a.sendall(b"xyz")
    a.shutdown(socket.SHUT_WR)
    assert recv_exact(h, 3) == b"xyz"
    assert silent(h, 1.0), "the guest's SHUT_WR reached the host"
    h.sendall(b"still open")
    assert recv_exact(a, 10) == b"still open"
    a.close()
    expect_eof(h)  # the full close does


def test_guest_full_close_flushes_buffer_first(mux):
    h, a = pair(mux)
    sent = send_until_blocked(a)
    assert mux.stats()["buffered_g2h"] == RING
    a.close()
    time.sleep(0.2)
    assert recv_all(h) == sent


def test_guest_abort_discards_buffered_data(mux):
    h, a = pair(mux)
    h.sendall(b"unread")  # left unread: the guest's close becomes a reset
    wait_for(lambda: mux.stats()["buffered_h2g"] == 0, what="the bytes to reach the guest")
    sent = send_until_blocked(a)
    assert mux.stats()["buffered_g2h"] == RING
    a.close()
    wait_for(lambda: mux.stats()["aborts"] == 1, what="the abort")
    got = recv_all(h)
    assert sent.startswith(got)
    assert len(got) <= len(sent) - RING, (len(got), len(sent))
    assert mux.stats()["live"] == 0


def test_host_abort_discards_buffered_data(mux):
    """The host's reset (a close with unread data) kills the connection:
    what was buffered for the guest is dropped, unlike a plain close."""
    h, a = pair(mux)
    a.sendall(b"unread")  # the host leaves it unread
    sent = send_until_blocked(h)  # the guest does not read either
    assert mux.stats()["buffered_h2g"] == RING
    h.close()
    wait_for(lambda: mux.stats()["live"] == 0, what="the connection to go")
    got = recv_all(a)
    assert sent.startswith(got)
    assert len(got) <= len(sent) - RING, (len(got), len(sent))


# ---- transport reset --------------------------------------------------------------------

@pytest.mark.parametrize("how", ["SIGUSR1", "reset"])
def test_transport_reset_kills_all_keeps_listeners(mux, how):
    h, a = pair(mux)
    hl = socket.socket(socket.AF_UNIX)
    hl.bind(mux.uds + "_7362")
    hl.listen(8)
    gd = guest_dial(mux, 7362)
    assert read_line(gd) == b"OK\n"
    b, _ = hl.accept()
    pending = host_dial(mux)  # accepted, no line yet
    wait_for(lambda: mux.stats()["pending_lines"] == 1, what="the pending line")
    assert mux.stats()["live"] == 2
    if how == "SIGUSR1":
        mux.proc.send_signal(signal.SIGUSR1)
    else:
        assert mux.ctl("reset") == "ok\n"
    for s in (h, a, gd, b, pending):
        assert recv_all(s) == b""
    st = mux.stats()
    assert st["live"] == 0 and st["resets"] == 1
    # listeners survive: both directions work again
    h2, a2 = pair(mux, 6)
    h2.sendall(b"again")
    assert recv_exact(a2, 5) == b"again"
    gd2 = guest_dial(mux, 7362)
    assert read_line(gd2) == b"OK\n"
    hl.close()


def test_control_unknown_command(mux):
    assert mux.ctl("frobnicate").startswith("error:")
    assert mux.ctl("move /nonexistent-dir/x.sock").startswith("error:")


# ---- vhost-device and cloud-hypervisor modes ---------------------------------------------

def test_vhost_device_reply_and_swallow(mux_factory):
    m = mux_factory(mode="vhost-device")
    g = guest_listen(m, 4242)
    h = host_dial(m, b"connect 4242\nSWALLOWED")
    assert read_line(h) == b"OK 4242\n"  # the guest port, not a host port
    a, _ = g.accept()
    h.sendall(b"kept")
    assert recv_exact(a, 4) == b"kept"  # "SWALLOWED" never arrives
    a.setblocking(False)
    with pytest.raises(BlockingIOError):
        a.recv(100)


def test_vhost_device_line_pieces_in_one_wakeup_fail(mux_factory):
    m = mux_factory(mode="vhost-device")
    guest_listen(m, 5)
    h = host_dial(m, b"CONNECT 5")
    time.sleep(0.3)
    try:
        h.sendall(b"\n")
    except (BrokenPipeError, ConnectionResetError):
        pass
    expect_eof(h)


def test_cloud_hypervisor_line_in_pieces(mux_factory):
    m = mux_factory(mode="cloud-hypervisor")
    g = guest_listen(m, 5)
    h = host_dial(m, b"CONN")
    time.sleep(0.2)
    h.sendall(b"ECT ")
    time.sleep(0.2)
    h.sendall(b" 5 \nAFTER")  # port text is trimmed; bytes after "\n" kept
    assert read_line(h) == b"OK %d\n" % FIRST_PORT
    a, _ = g.accept()
    assert recv_exact(a, 5) == b"AFTER"


@pytest.mark.parametrize("line,ok", [
    (b"connect 5\n", True),
    (b"CONNECT 5\n", True),
    (b"Connect 5\n", False),       # only the two spellings
    (b"connect\t5\n", False),      # exactly one space after the keyword
    (b"connect 5 6\n", False),     # the rest of the line is the port
    (b"connect 5" + b" " * 22 + b"\n", False),  # 32 bytes: the buffer is full
])
def test_cloud_hypervisor_syntax(mux_factory, line, ok):
    m = mux_factory(mode="cloud-hypervisor")
    g = guest_listen(m, 5)
    h = host_dial(m, line)
    if ok:
        assert read_line(h) == b"OK %d\n" % FIRST_PORT
        g.accept()
    else:
        expect_eof(h)


def test_vhost_device_line_has_no_length_cap(mux_factory):
    m = mux_factory(mode="vhost-device")
    g = guest_listen(m, 5)
    h = host_dial(m, b"connect" + b" " * 60 + b"5 trailing words\n")
    assert read_line(h) == b"OK 5\n"
    g.accept()
    # the same line is too long for Firecracker's 32-byte reader
    f = mux_factory()
    guest_listen(f, 5)
    expect_eof(host_dial(f, b"connect" + b" " * 60 + b"5 trailing words\n"))
