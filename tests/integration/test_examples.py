"""The scripts in examples/ run and exit 0 against a real daemon."""

import os
import subprocess

from glutil import REPO, read_bytes, wait_opened

EX = os.path.join(REPO, "examples")


def run_example(name, *args, timeout=30):
    return subprocess.run([os.path.join(EX, name)] + list(args), capture_output=True, text=True,
                          timeout=timeout)


def test_usage_lines():
    for name in ("set-keys.sh", "watch-events.sh", "devices.sh"):
        p = run_example(name)
        assert p.returncode != 0
        assert p.stderr.startswith("usage: "), (name, p.stderr)


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
