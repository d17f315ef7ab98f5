"""devlxd conformance through the guest agent: every request of
../shared/specs/lxd-5.0.2-captures, sent byte for byte on the agent's
/dev/lxd/sock from inside the VM's pid + mount + network namespaces (the
agent relays it over the emulated vsock to guestlinkd's devlxd port), must
get the bytes the container suite expects (Date masked).

The replay code is test_devlxd_conformance.py's (imported, not copied);
the instances c1 and c2 are virtual machines here, set up like the
captures' containers. Differences that belong to VMs:
- `GET /1.0` says "instance_type":"virtual-machine" (spec §8, devlxd-api.md
  line "a VM would say virtual-machine"); the expected bytes get that value
  and the matching Content-Length.
- 23-nonroot-user runs as uid 1000 / 65534 in the guest: the agent reads
  the caller's SO_PEERCRED uid and vouches for it in the preamble of its
  vsock connection (docs/control-protocol.md), and the host answers
  non-root 401 exactly as for a container.
- A restart (test 10) is the host writing `state`, not an init re-bind."""

import hashlib
import os
import re

import pytest

from devlxd_util import (C1_CONFIG, C1_DEVICES, C2_CONFIG, C1_INSTANCE_ID, C2_INSTANCE_ID,
                         assert_bytes, load_capture, make_image, mask_dates, set_image_public,
                         show)
import test_devlxd_conformance as conformance
from test_devlxd_conformance import (CAPTURED_FP, GENERIC, _keepalive_variants, compare,
                                     exchange, fetch_image, image_head)
from vm_util import ModuleVMEnv

CONTAINER_ONLY = {}

CT = b'"instance_type":"container"'
VMT = b'"instance_type":"virtual-machine"'
CL_RE = re.compile(rb"\r\nContent-Length: (\d+)\r\n")


def vmize(resp, req=b""):
    """The capture's bytes as a VM gets them: instance_type, with each
    response's Content-Length fixed (responses may be pipelined; a HEAD
    /1.0 answer has GET /1.0's length and no body)."""
    if req.startswith(b"HEAD /1.0 ") and b"\r\nContent-Length: 79\r\n" in resp:
        return resp.replace(b"\r\nContent-Length: 79\r\n",
                            b"\r\nContent-Length: %d\r\n" % (79 + len(VMT) - len(CT)), 1)
    if CT not in resp:
        return resp
    out = b""
    rest = resp
    while rest:
        head, sep, body = rest.partition(b"\r\n\r\n")
        m = CL_RE.search(head + b"\r\n")
        if not sep or not m:
            return out + rest.replace(CT, VMT)
        n = int(m.group(1))
        this, rest = body[:n], body[n:]
        if CT in this:
            this = this.replace(CT, VMT)
            head = (head + b"\r\n").replace(m.group(0), b"\r\nContent-Length: %d\r\n" % len(this))[:-2]
        out += head + sep + this
    return out


def skip_if_container_only(ex):
    why = CONTAINER_ONLY.get(os.path.basename(ex["file"]))
    if why:
        pytest.skip(f"container-only capture: {why}")


@pytest.fixture(scope="module")
def cap(tmp_path_factory):
    image = {}

    def prepare(state):
        image["fp"], image["path"] = make_image(os.path.join(state, "images"))

    with ModuleVMEnv(tmp_path_factory.mktemp("devlxd-vm-conformance"), prepare) as env:
        env.image = image
        env.images = os.path.join(env.gl.state, "images")
        env.vm1 = env.mkvm("c1", config=C1_CONFIG, devices=C1_DEVICES,
                           instance_id=C1_INSTANCE_ID)
        env.vm2 = env.mkvm("c2", config=C2_CONFIG, instance_id=C2_INSTANCE_ID)
        env.a1 = env.vm1.ns.agent()
        env.a2 = env.vm2.ns.agent()
        env.uid_agents = {}
        yield env


def agent_for(cap, ex):
    """The caller the capture was taken with, in the guest."""
    if ex["file"].endswith("23-nonroot-user.txt"):
        uid = 65534 if "--user 65534" in ex["title"] else 1000
        if uid not in cap.uid_agents:
            cap.uid_agents[uid] = cap.vm1.ns.agent(uid=uid)
        return cap.uid_agents[uid]
    return cap.a2 if ex["title"].startswith("c2:") else cap.a1


def test_agent_socket_is_in_the_guest_only(cap):
    """The clients below really talk to the agent: the socket exists in
    the guest's mount namespace and nowhere on the host."""
    from vm_util import is_socket
    assert not os.path.exists("/dev/lxd/sock")
    assert is_socket(cap.vm1.ns.path("/dev/lxd/sock"))
    ns = cap.vm1.ns.pid
    for kind in ("pid", "mnt", "net"):
        assert os.readlink(f"/proc/{ns}/ns/{kind}") != os.readlink(f"/proc/self/ns/{kind}"), kind
    info = cap.a1.call("info")
    assert info["pid"] < 1000, info  # a pid of the guest's pid namespace
    assert cap.vm1.agent_file().startswith("status: online\n")


@pytest.mark.parametrize("ex", GENERIC)
def test_capture(cap, ex):
    skip_if_container_only(ex)
    want = vmize(ex["response"], ex["request"])
    res = exchange(agent_for(cap, ex), ex["request"], ex["secs"], want=len(want))
    compare(res.data, want, f"{os.path.basename(ex['file'])}: {ex['title']}",
            config_list=ex["file"].endswith("03-get-config.txt"))


@pytest.mark.parametrize("ex", _keepalive_variants())
def test_capture_keepalive(cap, ex):
    skip_if_container_only(ex)
    req = ex["request"].replace(b"\r\nConnection: close\r\n", b"\r\n", 1)
    want = vmize(ex["response"], ex["request"]).replace(b"\r\nConnection: close\r\n", b"\r\n", 1)
    res = exchange(agent_for(cap, ex), req, ex_secs=2.0, want=len(want))
    compare(res.data, want, f"{ex['title']} without Connection: close",
            config_list=ex["file"].endswith("03-get-config.txt"))


def restart(cap, name):
    """A new start of a VM (the host sets its state), which forgets what
    the guest set."""
    cap.set_state(name, "Stopped")
    cap.set_state(name, "Started")


def test_10_patch_ready(cap):
    patch, after = load_capture("10")
    try:
        res = exchange(cap.a1, patch["request"])
        want = (b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nDate: <DATE>\r\n"
                b"Content-Length: 0\r\nConnection: close\r\n\r\n")
        assert_bytes(mask_dates(res.data), want, "PATCH /1.0 (guestlink semantics, spec §4.3)")
        assert cap.attr("c1", "state") == b"Ready\n"
        res = exchange(cap.a1, after["request"])
        body = (b'{"state":"Ready","api_version":"1.0","instance_type":"virtual-machine",'
                b'"location":"none"}\n')
        want = mask_dates(after["response"], check=False).replace(
            b'{"state":""', b'{"state":"Ready"').replace(CT, VMT).replace(
            b"Content-Length: 79", b"Content-Length: %d" % len(body))
        assert_bytes(mask_dates(res.data), want, "GET /1.0 after PATCH (spec §4.3)")
    finally:
        restart(cap, "c1")
    res = exchange(cap.a1, after["request"])
    compare(res.data, vmize(after["response"]), "GET /1.0 after a restart")


# The stream and WebSocket cases need nothing of a container: the
# container suite's own tests run on this module's `cap`.

def test_11_plain_stream(cap):
    conformance.test_11_plain_stream(cap)


def test_12_websocket_events(cap):
    conformance.test_12_websocket_events(cap)


@pytest.mark.parametrize("which", ["type=device", "type=config", "type=bogus"])
def test_13_websocket_filters(cap, which):
    conformance.test_13_websocket_filters(cap, which)


def test_25_websocket_isolation(cap):
    conformance.test_25_websocket_isolation(cap)


def test_24_image_export(cap):
    """guestlink serves image export to VMs as to containers (LXD 5.0.2's
    agent did not route it; newer LXD does, devlxd_images_vm)."""
    fp, path = cap.image["fp"], cap.image["path"]
    private, unknown, flag_off = [e for e in load_capture("24") if e["kind"] == "http"]
    with open(path, "rb") as f:
        data = f.read()
    try:
        req = private["request"].replace(CAPTURED_FP.encode(), fp.encode())
        want = private["response"].replace(CAPTURED_FP.encode(), fp.encode())
        compare(exchange(cap.a1, req).data, want, "private image")
        compare(exchange(cap.a1, unknown["request"]).data, unknown["response"], "unknown image")
        set_image_public(cap.images, fp, True)
        for target, close in ((fp, False), (fp[:12], False), (fp, True)):
            head, res = fetch_image(cap.a1, target, close)
            assert_bytes(mask_dates(head), image_head(fp, path, close), f"export {target}")
            assert res.total == len(head) + len(data), (res.total, len(head), len(data))
            assert res.sha256 == hashlib.sha256(head + data).hexdigest(), "image bytes differ"
        cap.set("c1", "security.devlxd.images", "false")
        req = flag_off["request"].replace(CAPTURED_FP.encode(), fp.encode())
        compare(exchange(cap.a1, req).data, flag_off["response"], "image export, flag off")
    finally:
        set_image_public(cap.images, fp, False)
        cap.set("c1", "security.devlxd.images", "true")


def test_module_daemon_still_serving(cap):
    assert cap.gl.running
    for a, want in ((cap.a1, b"bar"), (cap.a2, b"c2value")):
        res = exchange(a, b"GET /1.0/config/user.foo HTTP/1.1\r\nHost: lxd\r\n"
                       b"Connection: close\r\n\r\n")
        assert res.data.endswith(b"\r\n\r\n" + want), show(res.data)
    assert cap.vm1.agent_file().startswith("status: online\n")
    assert cap.vm2.agent_file().startswith("status: online\n")
