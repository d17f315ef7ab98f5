"""The scripts in examples/ run and exit 0: against a real daemon, or, for
vm-agent.sh, with everything it starts itself."""

import os
import re
import shutil
import stat
import subprocess

import pytest

from glutil import GUESTLINKD, REPO, read_bytes, wait_opened

EX = os.path.join(REPO, "examples")
# The build directory of the daemon under test (build/ or build-san/).
BUILD = os.path.dirname(GUESTLINKD)
VM_BINARIES = ("guestlinkd", "guestlink-agent", "guestlinkctl", "tools/vsock-mux")
VM_TOOLS = ("unshare", "nsenter", "curl")


def run_example(name, *args, timeout=30):
    return subprocess.run([os.path.join(EX, name)] + list(args), capture_output=True, text=True,
                          timeout=timeout)


def test_usage_lines():
    for name in ("set-keys.sh", "watch-events.sh", "devices.sh"):
        p = run_example(name)
        assert p.returncode != 0
        assert p.stderr.startswith("usage: "), (name, p.stderr)
    # vm-agent.sh runs with no argument at all: ask it for help, and give it
    # too many arguments or a build directory that does not exist
    for args in (["--help"], ["build", "extra"], ["/nonexistent/build"]):
        p = run_example("vm-agent.sh", *args)
        assert p.returncode == 2, (args, p.returncode)
        assert p.stderr.startswith("usage: "), (args, p.stderr)
        assert p.stdout == "", (args, p.stdout)


def test_set_keys(gl):
    p = run_example("set-keys.sh", gl.mnt, "web1", "user.a=1", "user.b=two words",
                    "cloud-init.user-data=#cloud-config")
    assert p.returncode == 0, p.stderr
    assert "user.b = two words" in p.stdout
    assert read_bytes(gl.p("web1", "config", "user.b")) == b"two words\n"
    p = run_example("set-keys.sh", gl.mnt, "web1")
    assert p.returncode == 0, p.stderr
    assert read_bytes(gl.p("web1", "config", "user.port")) == b"8080\n"


def test_devices(c1):
    p = run_example("devices.sh", c1.mnt, "c1")
    assert p.returncode == 0, p.stdout + p.stderr
    assert '{"path":"/mnt/data","source":"/srv/share","type":"disk"}' in p.stdout
    assert "refused" in p.stdout
    assert os.listdir(c1.p("c1", "devices")) == []


def test_watch_events(c1):
    w = subprocess.Popen([os.path.join(EX, "watch-events.sh"), "-n", "3", c1.mnt, "c1"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_opened(c1.p("c1", "events"))
    c1.sh("echo bar > c1/config/user.foo; echo Started > c1/state; "
          "printf '{\"type\":\"disk\",\"path\":\"/mnt\"}' > c1/devices/share")
    out, err = w.communicate(timeout=10)
    assert w.returncode == 0, err
    lines = out.splitlines()
    assert len(lines) == 3, out
    assert "config" in lines[0] and 'user.foo = "bar" (was "")' in lines[0]
    assert "instance-started" in lines[1]
    assert "added device share" in lines[2]


def test_watch_all_events(gl):
    w = subprocess.Popen([os.path.join(EX, "watch-events.sh"), "-n", "2", gl.mnt],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_opened(gl.p("events"))
    gl.sh("mkdir c9; echo 1 > c9/config/user.x")
    out, err = w.communicate(timeout=10)
    assert w.returncode == 0, err
    lines = out.splitlines()
    assert "c9: instance-created" in lines[0], out
    assert "c9: user.x" in lines[1], out


# ---- examples/vm-agent.sh --------------------------------------------------

def _vm_missing():
    for b in VM_BINARIES:
        if not os.access(os.path.join(BUILD, b), os.X_OK):
            return f"{BUILD}/{b} is not built (make all)"
    for t in VM_TOOLS:
        if not shutil.which(t):
            return f"{t} is not installed"
    return None


needs_vm = pytest.mark.skipif(_vm_missing() is not None, reason=str(_vm_missing()))

# The steps vm-agent.sh reports, in order: the start of each "ok:" line.
VM_STEPS = [
    "ok: guestlinkd on ",
    "ok: vm1: virtual-machine, vsock-uds ",
    "ok: guest namespaces (init pid ",
    "ok: agent online: status: online version: ",
    "ok: vm1: agent ",
    "ok: exec: stdout 'out', stderr 'err', exit 3",
    "ok: exec: stdin reaches cat; a command runs as pid ",
    "ok: exec: SIGTERM -> 143, --timeout -> 124",
    "ok: push + pull: 3000000 bytes round trip, mode 0600",
    "ok: stat: type file, mode 0600, size 3000000; stat /nope: exit 1; ls /etc: ",
    "ok: curl /dev/lxd/sock in the guest: user.foo = 'hello from the host'",
    "ok: the guest PATCHed Ready: wait ready returned 0; M/vm1/state = Ready",
    "ok: status: status: online version: ",
]


def _left_behind(tmp):
    """Mounts and processes that still refer to the script's directory."""
    left = []
    with open("/proc/self/mountinfo") as f:
        left += [line.strip() for line in f if tmp in line]
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if tmp in cmd:
            left.append(f"pid {pid}: {cmd}")
    return left


def _vm_tmp(stdout):
    first = stdout.splitlines()[0] if stdout else ""
    assert first.startswith("ok: guestlinkd on /tmp/glvm."), stdout
    return first[len("ok: guestlinkd on "):].rsplit("/mnt,", 1)[0]


@needs_vm
def test_vm_agent():
    p = run_example("vm-agent.sh", BUILD, timeout=80)
    assert p.returncode == 0, p.stdout + p.stderr
    lines = p.stdout.splitlines()
    assert len(lines) == len(VM_STEPS) + 1, p.stdout
    for line, want in zip(lines, VM_STEPS):
        assert line.startswith(want), (line, want)
    assert lines[-1] == "vm-agent: every step worked"
    # the guest had no network interface but its (down) loopback
    assert lines[2].endswith("network interfaces: lo"), lines[2]
    # the command ran in the guest's pid namespace, not on the host
    m = re.search(r"runs as pid (\d+) of the guest's pid namespace$", lines[6])
    assert m and 1 < int(m.group(1)) < 1000, lines[6]
    # it cleaned up after itself
    tmp = _vm_tmp(p.stdout)
    assert not os.path.exists(tmp), tmp
    assert _left_behind(tmp) == []


@needs_vm
def test_vm_agent_fails_and_cleans_up(tmp_path):
    """A step that goes wrong makes the script exit non-zero, name the step,
    and still stop and remove everything: here a guestlinkctl whose ping
    fails."""
    build = tmp_path / "build"
    (build / "tools").mkdir(parents=True)
    for b in VM_BINARIES:
        if b != "guestlinkctl":
            os.symlink(os.path.join(BUILD, b), build / b)
    ctl = build / "guestlinkctl"
    ctl.write_text("#!/bin/sh\n"
                   "for a in \"$@\"; do [ \"$a\" = ping ] && exit 1; done\n"
                   f"exec {os.path.join(BUILD, 'guestlinkctl')} \"$@\"\n")
    ctl.chmod(ctl.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    p = run_example("vm-agent.sh", str(build), timeout=80)
    assert p.returncode == 1, p.stdout + p.stderr
    assert "vm-agent: FAILED at: ping" in p.stderr, p.stderr
    assert "every step worked" not in p.stdout
    assert p.stdout.splitlines()[-1].startswith("ok: agent online: "), p.stdout
    tmp = _vm_tmp(p.stdout)
    assert not os.path.exists(tmp), tmp
    assert _left_behind(tmp) == []


def test_vm_agent_missing_binary(tmp_path):
    p = run_example("vm-agent.sh", str(tmp_path))
    assert p.returncode == 2, p.stdout + p.stderr
    assert p.stderr == f"vm-agent: {tmp_path}/guestlinkd is not built (make)\n"
