"""devlxd conformance: every request of ../shared/specs/lxd-5.0.2-captures,
sent byte for byte over the devlxd socket from inside a pid + mount
namespace bound to the captures' instance, must get LXD 5.0.2's response
byte for byte (the Date header aside, and it must be a current
IMF-fixdate). Where guestlink deliberately differs (PATCH /1.0, spec §4.3)
the test says so and checks guestlink's documented bytes instead.

The instance is set up as the captures' README describes: c1 with user.foo,
user.meta-data, cloud-init.user-data, security.devlxd.images=true, its
cloud-init instance-id, the disk devices share and root (an instance device
here: guestlink has no profiles), and c2 for the two-container capture.
One daemon serves the whole module; tests that change the instance put it
back."""

import email.utils
import hashlib
import json
import os
import time

import pytest

from devlxd_util import (CAPTURES, STREAM_HEAD, WSReader, assert_bytes, capture_files,
                         load_capture, make_image, mask_dates, mask_timestamps, ModuleEnv,
                         parse_capture, set_image_public, setup_c1, setup_c2, show, ws_frame,
                         ws_parse)

# Files whose every HTTP exchange is checked by the generic test; the others
# (state changes, event streams, images) have their own tests below.
DEDICATED = ("10-", "11-", "12-", "13-", "24-")


def _generic():
    out = []
    if not os.path.isdir(CAPTURES):
        return out
    for f in capture_files():
        if f.startswith(DEDICATED):
            continue
        for i, ex in enumerate(parse_capture(os.path.join(CAPTURES, f))):
            if ex["kind"] == "http":
                out.append(pytest.param(ex, id=f"{f[:-4]}#{i}"))
    return out


GENERIC = _generic()


def test_captures_present():
    assert os.path.isdir(CAPTURES), f"capture directory {CAPTURES} is missing (set GL_CAPTURES)"
    names = capture_files()
    assert len(names) >= 24, names
    assert len(GENERIC) >= 50, len(GENERIC)


@pytest.fixture(scope="module")
def cap(tmp_path_factory):
    image = {}

    def prepare(state):
        image["fp"], image["path"] = make_image(os.path.join(state, "images"))

    with ModuleEnv(tmp_path_factory.mktemp("devlxd-conformance"), prepare) as env:
        env.image = image
        env.c1 = setup_c1(env)
        env.c2 = setup_c2(env)
        env.a1 = env.c1.agent()
        env.a2 = env.c2.agent()
        env.uid_agents = {}
        yield env


def agent_for(cap, ex):
    """The caller the capture was taken with."""
    title = ex["title"]
    if ex["file"].endswith("23-nonroot-user.txt"):
        uid = 65534 if "--user 65534" in title else 1000
        if uid not in cap.uid_agents:
            cap.uid_agents[uid] = cap.c1.agent(uid=uid)
        return cap.uid_agents[uid]
    if title.startswith("c2:"):
        return cap.a2
    return cap.a1


def kept_open(ex):
    """The capture client's read timed out (about 2 s): LXD kept the
    connection open after the response."""
    return ex["secs"] >= 1.5


def split_http(b):
    head, sep, body = b.partition(b"\r\n\r\n")
    return head + sep, body


def compare(got, want, what, config_list=False):
    got_m = mask_dates(got)
    want_m = mask_dates(want, check=False)
    if config_list:
        # Go map order: the list order is random in LXD (file 03 shows two).
        gh, gb = split_http(got_m)
        wh, wb = split_http(want_m)
        assert_bytes(gh, wh, what + " (head)")
        assert gb.endswith(b"\n") and wb.endswith(b"\n"), (gb, wb)
        g, w = json.loads(gb), json.loads(wb)
        assert len(g) == len(set(g)) and set(g) == set(w), f"{what}: {gb!r} vs {wb!r}"
        assert gb == (json.dumps(g, separators=(",", ":")) + "\n").encode(), gb
        return
    assert_bytes(got_m, want_m, what)


def exchange(agent, req, ex_secs=0.0, timeout=5.0, want=None):
    """Send req on a new connection and read the response: to EOF, or (a
    connection LXD keeps open) `want` bytes and 0.3 s more, in which the
    server must neither close nor send anything else."""
    if ex_secs >= 1.5:
        if want is None:
            res = agent.exchange(req, timeout=timeout, idle=0.7)
        else:
            res = agent.exchange(req, timeout=timeout, want=want, linger=0.3)
        assert not res.eof, f"the server closed a connection LXD keeps open: {res!r}"
    else:
        res = agent.exchange(req, timeout=timeout)
        assert res.eof, f"the server kept open a connection LXD closes: {res!r}"
    return res


@pytest.mark.parametrize("ex", GENERIC)
def test_capture(cap, ex):
    agent = agent_for(cap, ex)
    res = exchange(agent, ex["request"], ex["secs"], want=len(ex["response"]))
    compare(res.data, ex["response"], f"{os.path.basename(ex['file'])}: {ex['title']}",
            config_list=ex["file"].endswith("03-get-config.txt"))


def _keepalive_variants():
    """The curl view of the captures: the same routed requests without
    `Connection: close` get the same bytes minus that header, and the
    connection stays open (spec §0, §2.2)."""
    out = []
    for p in GENERIC:
        ex = p.values[0]
        req, resp = ex["request"], ex["response"]
        if (b"\r\nConnection: close\r\n" not in req or b"\r\nDate: " not in resp
                or not resp.startswith(b"HTTP/1.1 ") or req.count(b" HTTP/1.1\r\n") != 1
                or b"\r\nConnection: close\r\n" not in resp):
            continue
        out.append(pytest.param(ex, id=p.id + "-keepalive"))
    return out


@pytest.mark.parametrize("ex", _keepalive_variants())
def test_capture_keepalive(cap, ex):
    agent = agent_for(cap, ex)
    req = ex["request"].replace(b"\r\nConnection: close\r\n", b"\r\n", 1)
    want = ex["response"].replace(b"\r\nConnection: close\r\n", b"\r\n", 1)
    res = exchange(agent, req, ex_secs=2.0, want=len(want))
    compare(res.data, want, f"{ex['title']} without Connection: close",
            config_list=ex["file"].endswith("03-get-config.txt"))


# ---- 10: PATCH /1.0 ----------------------------------------------------------------------

def rebind(cap, name, container):
    """Unbind and bind again: a new start, which forgets the guest state."""
    cap.unbind(name)
    cap.wait_attr(name, "state", b"Stopped\n")
    cap.bind(name, container.pid)
    cap.wait_attr(name, "state", b"Started\n")


def test_10_patch_ready(cap):
    """LXD 5.0.2 answers PATCH /1.0 like GET and keeps "state":"" (file 10).
    guestlink implements newer LXD's instance_ready_state instead (spec
    §4.3, DESIGN.md): 200 with an empty application/octet-stream body, and
    GET /1.0 then reports the state the guest set."""
    patch, after = load_capture("10")
    assert b'{"state":"Ready"}' in patch["request"]
    try:
        res = exchange(cap.a1, patch["request"])
        want = (b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nDate: <DATE>\r\n"
                b"Content-Length: 0\r\nConnection: close\r\n\r\n")
        assert_bytes(mask_dates(res.data), want, "PATCH /1.0 (guestlink semantics, spec §4.3)")
        assert cap.attr("c1", "state") == b"Ready\n"
        res = exchange(cap.a1, after["request"])
        body = b'{"state":"Ready","api_version":"1.0","instance_type":"container","location":"none"}\n'
        want = mask_dates(after["response"], check=False).replace(
            b'{"state":""', b'{"state":"Ready"').replace(b"Content-Length: 79",
                                                         b"Content-Length: %d" % len(body))
        assert_bytes(mask_dates(res.data), want, "GET /1.0 after PATCH (spec §4.3)")
    finally:
        rebind(cap, "c1", cap.c1)
    # A new start forgets what the guest set: 5.0.2's bytes again.
    res = exchange(cap.a1, after["request"])
    compare(res.data, after["response"], "GET /1.0 after a restart")


# ---- events: host actions as the captures record them ------------------------------------

class HostActions:
    """Replays the capture's `HOST hh:mm:ss: lxc ...` lines on the FUSE tree."""

    def __init__(self, env):
        self.env = env
        self.devices = {}

    def apply(self, line):
        cmd = line.split(": ", 1)[1].split()
        assert cmd[0] == "lxc" and cmd[1] == "config", line
        if cmd[2] == "set":
            name = cmd[3]
            for kv in cmd[4:]:
                k, v = kv.split("=", 1)
                self.env.set(name, k, v)
        elif cmd[2] == "unset":
            self.env.unset(cmd[3], cmd[4])
        elif cmd[2:4] == ["device", "add"]:
            name, dev, dtype = cmd[4], cmd[5], cmd[6]
            conf = dict(kv.split("=", 1) for kv in cmd[7:])
            conf["type"] = dtype
            self.devices[(name, dev)] = conf
            self.env.device(name, dev, conf)
        elif cmd[2:4] == ["device", "set"]:
            name, dev = cmd[4], cmd[5]
            conf = dict(self.devices[(name, dev)])
            conf.update(dict(kv.split("=", 1) for kv in cmd[6:]))
            self.devices[(name, dev)] = conf
            self.env.device(name, dev, conf)
        elif cmd[2:4] == ["device", "remove"]:
            name, dev = cmd[4], cmd[5]
            self.devices.pop((name, dev), None)
            self.env.undevice(name, dev)
        else:
            raise AssertionError(f"unknown host action {line!r}")


def host_lines(ex):
    return [h for h in ex.get("host", []) if h.startswith("HOST ")]


def restore_config(cap):
    for k in ("user.foo",):
        if cap.attr("c1", f"config/{k}") != b"bar\n":
            cap.set("c1", k, "bar")
    if cap.attr("c2", "config/user.foo") != b"c2value\n":
        cap.set("c2", "user.foo", "c2value")


def event_lines(resp):
    head, sep, rest = resp.partition(b"\n\n")
    return head + sep, [x + b"\n" for x in rest.split(b"\n") if x]


def test_11_plain_stream(cap):
    try:
        for ex in load_capture("11"):
            want_head, want_lines = event_lines(ex["response"])
            assert want_head == STREAM_HEAD
            conn = cap.a1.connect()
            conn.send(ex["request"])
            conn.read_until(lambda b: b"\n\n" in b, what="the stream head")
            head, _, conn.buf = conn.buf.partition(b"\n\n")
            assert_bytes(head + b"\n\n", want_head, ex["title"] or "plain stream head")
            acts = HostActions(cap)
            for h in host_lines(ex):
                acts.apply(h)
            conn.read_until(lambda b: b.count(b"\n") >= len(want_lines), what="the events")
            got = [x + b"\n" for x in conn.buf.split(b"\n") if x]
            assert [mask_timestamps(x) for x in got] == \
                [mask_timestamps(x, check=False) for x in want_lines], got
            conn.recv(timeout=0.3)
            assert conn.buf.count(b"\n") == len(want_lines), f"extra events: {conn.buf!r}"
            # LXD keeps the hijacked stream open whatever the request said.
            assert not conn.eof
            conn.close()
    finally:
        restore_config(cap)


def check_ws_session(cap, agent, ex, acts, wait_ping=False):
    """One captured WebSocket session: handshake bytes, the first ping,
    the events caused by the capture's host actions (exact payloads,
    timestamps masked), nothing else, and the close handshake."""
    conn = agent.connect()
    conn.send(ex["handshake_request"])
    conn.read_until(lambda b: b"\r\n\r\n" in b, what="the 101 response")
    head, _, conn.buf = conn.buf.partition(b"\r\n\r\n")
    assert_bytes(head + b"\r\n\r\n", ex["handshake_response"], "WebSocket handshake")
    ws = WSReader(conn)
    t, fin, op, masked, payload = ws.next(3.0)
    assert (fin, op, masked, payload) == (True, 0x9, False, b"keepalive"), "first frame"
    assert t < 1.0, f"first ping after {t:.2f}s"
    for h in host_lines(ex):
        acts.apply(h)
    want = [f for f in ex["frames"] if f[2] == 0x1]
    for w in want:
        t, fin, op, masked, payload = ws.next_data(5.0)
        assert (fin, op, masked) == (bool(w[1]), w[2], bool(w[3])), (t, fin, op, masked, payload)
        assert mask_timestamps(payload) == mask_timestamps(w[5], check=False), \
            f"event frame differs:\n want {w[5]!r}\n got  {payload!r}"
    ws.quiet(0.5)
    if wait_ping:
        # LXD pings every 10 s (frames at t=+10.001 and +20.002 in file 12).
        f = ws.next(12.0 - (time.monotonic() - ws.t0))
        assert f[2] == 0x9 and f[4] == b"keepalive" and 9.0 <= f[0] <= 11.5, f
    ws.send(ws_frame(0x8, b"\x03\xe8"))
    conn.read_eof(5.0)
    after = b"".join(ex["after_close"])
    assert after == b"\x88\x02\x03\xe8"
    rest = conn.buf
    # Pings may still have been in flight; what matters is the close echo.
    frames = []
    while rest:
        fr, used = ws_parse(rest)
        assert used, f"trailing bytes after close: {rest!r}"
        frames += fr
        rest = rest[used:]
    assert [f for f in frames if f[1] != 0x9] == [(True, 0x8, False, b"\x03\xe8")], frames
    conn.close()


def test_12_websocket_events(cap):
    (ex,) = load_capture("12")
    try:
        check_ws_session(cap, cap.a1, ex, HostActions(cap), wait_ping=True)
    finally:
        restore_config(cap)
        for d in ("zero",):
            if os.path.exists(cap.gl.p("c1", "devices", d)):
                cap.undevice("c1", d)
        for k in ("user.new", "user.a", "user.b", "cloud-init.vendor-data", "limits.memory"):
            if os.path.exists(cap.gl.p("c1", "config", k)):
                cap.unset("c1", k)


@pytest.mark.parametrize("which", ["type=device", "type=config", "type=bogus"])
def test_13_websocket_filters(cap, which):
    (ex,) = [e for e in load_capture("13") if which in e["title"]]
    try:
        check_ws_session(cap, cap.a1, ex, HostActions(cap))
    finally:
        restore_config(cap)
        if os.path.exists(cap.gl.p("c1", "devices", "zero")):
            cap.undevice("c1", "zero")


def test_25_websocket_isolation(cap):
    (ex,) = [e for e in load_capture("25") if e["kind"] == "ws"]
    try:
        check_ws_session(cap, cap.a1, ex, HostActions(cap))
    finally:
        restore_config(cap)


# ---- 24: image export ----------------------------------------------------------------------

CAPTURED_FP = "05fb4e3cbc61661ad118936ddaeb0ebea0dd66aa8c4f6d1e01601294b2a37d32"


def image_head(fp, path, close=False):
    st = os.stat(path)
    lm = email.utils.formatdate(int(st.st_mtime), usegmt=True)
    return (b"HTTP/1.1 200 OK\r\nAccept-Ranges: bytes\r\n"
            b"Content-Disposition: inline;filename=" + fp.encode() + b".tar.gz\r\n"
            b"Content-Length: %d\r\n" % st.st_size +
            b"Content-Type: application/octet-stream\r\n"
            b"Last-Modified: " + lm.encode() + b"\r\nDate: <DATE>\r\n" +
            (b"Connection: close\r\n" if close else b"") + b"\r\n")


def fetch_image(agent, target, close):
    req = (b"GET /1.0/images/" + target.encode() + b"/export HTTP/1.1\r\nHost: lxd\r\n" +
           (b"Connection: close\r\n" if close else b"") + b"\r\n")
    if close:
        res = agent.exchange(req, timeout=30, digest=True)
        assert res.eof
    else:
        res = agent.exchange(req, timeout=30, idle=1.0, digest=True)
        assert not res.eof, "the connection was closed after a keep-alive download"
    head, sep, _ = res.data.partition(b"\r\n\r\n")
    assert sep, res
    return head + sep, res


def test_24_image_export(cap):
    fp, path = cap.image["fp"], cap.image["path"]
    private, unknown, flag_off = [e for e in load_capture("24") if e["kind"] == "http"]
    with open(path, "rb") as f:
        data = f.read()
    try:
        # Private: LXD's 404 envelope naming the fingerprint as requested.
        req = private["request"].replace(CAPTURED_FP.encode(), fp.encode())
        want = private["response"].replace(CAPTURED_FP.encode(), fp.encode())
        res = exchange(cap.a1, req)
        compare(res.data, want, "private image")
        # Unknown fingerprint: the other envelope.
        res = exchange(cap.a1, unknown["request"])
        compare(res.data, unknown["response"], "unknown image")
        # Public, full fingerprint and 12-digit prefix (the capture's curl
        # view: keep-alive), and with Connection: close.
        set_image_public(cap.images, fp, True)
        for target, close in ((fp, False), (fp[:12], False), (fp, True)):
            head, res = fetch_image(cap.a1, target, close)
            assert_bytes(mask_dates(head), image_head(fp, path, close), f"export {target}")
            assert res.total == len(head) + len(data), (res.total, len(head), len(data))
            assert res.sha256 == hashlib.sha256(head + data).hexdigest(), "image bytes differ"
        # security.devlxd.images=false: plain 403.
        cap.set("c1", "security.devlxd.images", "false")
        req = flag_off["request"].replace(CAPTURED_FP.encode(), fp.encode())
        res = exchange(cap.a1, req)
        compare(res.data, flag_off["response"], "image export with the flag off")
    finally:
        set_image_public(cap.images, fp, False)
        cap.set("c1", "security.devlxd.images", "true")


def test_24_image_export_ranges(cap):
    """Go's http.ServeContent semantics [G]: a Range gets 206 with
    Content-Range and only those bytes; If-Modified-Since at the file's
    mtime gets 304 and no body."""
    fp, path = cap.image["fp"], cap.image["path"]
    with open(path, "rb") as f:
        data = f.read()
    st = os.stat(path)
    lm = email.utils.formatdate(int(st.st_mtime), usegmt=True).encode()
    set_image_public(cap.images, fp, True)
    try:
        res = exchange(cap.a1, b"GET /1.0/images/" + fp.encode() + b"/export HTTP/1.1\r\n"
                       b"Host: lxd\r\nRange: bytes=10-19\r\nConnection: close\r\n\r\n")
        head, _, body = res.data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 206 Partial Content\r\n"), show(head)
        assert b"\r\nContent-Range: bytes 10-19/%d\r\n" % len(data) in head, show(head)
        assert b"\r\nContent-Length: 10\r\n" in head, show(head)
        assert body == data[10:20]
        res = exchange(cap.a1, b"GET /1.0/images/" + fp.encode() + b"/export HTTP/1.1\r\n"
                       b"Host: lxd\r\nIf-Modified-Since: " + lm + b"\r\n"
                       b"Connection: close\r\n\r\n")
        head, _, body = res.data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 304 Not Modified\r\n"), show(head)
        assert body == b""
    finally:
        set_image_public(cap.images, fp, False)


def test_module_daemon_still_serving(cap):
    """Last: after every capture, the daemon is up and c1 and c2 still
    read their own values."""
    assert cap.gl.running
    res = exchange(cap.a1, b"GET /1.0/config/user.foo HTTP/1.1\r\nHost: lxd\r\n"
                   b"Connection: close\r\n\r\n")
    assert res.data.endswith(b"\r\n\r\nbar")
    res = exchange(cap.a2, b"GET /1.0/config/user.foo HTTP/1.1\r\nHost: lxd\r\n"
                   b"Connection: close\r\n\r\n")
    assert res.data.endswith(b"\r\n\r\nc2value")
