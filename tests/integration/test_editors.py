"""Editors and atomic replace: sed -i, vim (both backup strategies), mv, and
Python's temp file + os.replace. Each edit is one change (one event), and
no scratch file is left behind."""

import errno
import os
import tempfile

import pytest

from glutil import EventReader, config_event, device_event, parse_event, read_bytes, shape, write_bytes


@pytest.fixture
def foo(c1):
    """c1 with user.foo=bar and a reader of c1/events opened afterwards."""
    write_bytes(c1.p("c1", "config", "user.foo"), "bar\n")
    c1.events = EventReader(c1.p("c1", "events"))
    c1.cfg = c1.p("c1", "config")
    yield c1
    c1.events.close()


def only_event(d, expected):
    assert shape(parse_event(d.events.next())) == expected
    d.events.quiet(0.3)


def config_names(d):
    return sorted(os.listdir(d.cfg))


def test_sed_in_place(foo):
    foo.sh("sed -i s/bar/baz/ c1/config/user.foo")
    assert read_bytes(os.path.join(foo.cfg, "user.foo")) == b"baz\n"
    only_event(foo, config_event("user.foo", "bar", "baz"))
    assert [n for n in config_names(foo) if n.startswith("sed")] == []
    assert "user.foo" in config_names(foo)


def test_sed_in_place_multi_line(foo):
    write_bytes(os.path.join(foo.cfg, "user.ml"), "one\ntwo\nthree\n")
    foo.events.next()
    foo.sh("sed -i '2d' c1/config/user.ml")
    assert read_bytes(os.path.join(foo.cfg, "user.ml")) == b"one\nthree\n"
    only_event(foo, config_event("user.ml", "one\ntwo\nthree", "one\nthree"))


def test_sed_on_device(foo):
    foo.sh("printf '{\"type\":\"disk\",\"path\":\"/mnt\"}' > c1/devices/share")
    assert parse_event(foo.events.next())["metadata"]["action"] == "added"
    foo.sh("sed -i 's|/mnt|/srv|' c1/devices/share")
    assert read_bytes(foo.p("c1", "devices", "share")) == b'{"path":"/srv","type":"disk"}\n'
    assert [shape(parse_event(x)) for x in foo.events.take(2)] == [
        device_event("removed", "share", {"path": "/mnt", "type": "disk"}),
        device_event("added", "share", {"path": "/srv", "type": "disk"}),
    ]
    foo.events.quiet(0.3)
    assert os.listdir(foo.p("c1", "devices")) == ["share"]


def test_sed_producing_bad_device_json_fails(foo):
    foo.sh("printf '{\"type\":\"disk\",\"path\":\"/mnt\"}' > c1/devices/share")
    foo.events.next()
    p = foo.sh("sed -i 's/disk\"/disk\",/' c1/devices/share", check=False)
    assert p.returncode != 0
    assert read_bytes(foo.p("c1", "devices", "share")) == b'{"path":"/mnt","type":"disk"}\n'
    foo.events.quiet(0.3)


VIM_VARIANTS = {
    # -es alone starts in Vi-compatible mode: 'backupcopy' is "yes".
    "compatible": ["vim", "-es"],
    # Vim's own default, 'backupcopy' "auto": vim probes with a file named
    # 4913 first; the daemon refuses all-digit names so vim writes in place.
    "nocompatible": ["vim", "-N", "-u", "NONE", "-es"],
    "defaults.vim": ["vim", "-u", "DEFAULTS", "-es"],
    "backupcopy=yes": ["vim", "-N", "-u", "NONE", "-es", "-c", "set backupcopy=yes"],
}


@pytest.mark.parametrize("variant", sorted(VIM_VARIANTS))
def test_vim(foo, variant):
    argv = VIM_VARIANTS[variant]
    cmd = " ".join(f"'{a}'" for a in argv) + " -c '%s/bar/qux/' -c wq c1/config/user.foo"
    p = foo.sh(cmd, check=False, timeout=30)
    assert p.returncode == 0, (p.stdout, p.stderr)
    assert read_bytes(os.path.join(foo.cfg, "user.foo")) == b"qux\n"
    only_event(foo, config_event("user.foo", "bar", "qux"))
    names = config_names(foo)
    assert [n for n in names if n.endswith("~") or n.endswith(".swp") or n.isdigit()] == [], names


def test_vim_reports_backupcopy(foo):
    # Which strategy did "auto" choose? The probe must have failed, so the
    # buffer was written in place (the file is the same node afterwards).
    ino = os.stat(os.path.join(foo.cfg, "user.foo")).st_ino
    p = foo.sh("vim -N -u NONE -es -c '%s/bar/qux/' -c wq c1/config/user.foo", check=False)
    assert p.returncode == 0, p.stderr
    assert os.stat(os.path.join(foo.cfg, "user.foo")).st_ino == ino
    only_event(foo, config_event("user.foo", "bar", "qux"))


def test_vim_creates_new_key(foo):
    p = foo.sh("vim -N -u NONE -es -c 'call setline(1, \"fresh\")' -c wq c1/config/user.new",
               check=False)
    assert p.returncode == 0, p.stderr
    assert read_bytes(os.path.join(foo.cfg, "user.new")) == b"fresh\n"
    only_event(foo, config_event("user.new", "", "fresh"))


def test_mv_scratch_over_key(foo):
    # bash's noclobber opens with O_EXCL; "tmpfile" is no key name (no dot),
    # so this is a scratch file.
    foo.bash("set -C; printf 'from scratch\\n' > c1/config/tmpfile; ls c1/config | grep -qx tmpfile")
    foo.events.quiet(0.2)
    foo.sh("mv c1/config/tmpfile c1/config/user.foo")
    assert read_bytes(os.path.join(foo.cfg, "user.foo")) == b"from scratch\n"
    only_event(foo, config_event("user.foo", "bar", "from scratch"))
    assert "tmpfile" not in config_names(foo)


def test_mv_from_another_file_system(foo, tmp_path):
    src = tmp_path / "value"
    src.write_text("moved in\n")
    foo.sh(f"mv {src} c1/config/user.foo")
    assert read_bytes(os.path.join(foo.cfg, "user.foo")) == b"moved in\n"
    assert not src.exists()
    # mv unlinks the target and copies: the last event carries the new value.
    evs = []
    while True:
        try:
            line = foo.events.next(0.5)
        except AssertionError:
            break
        evs.append(parse_event(line)["metadata"])
    assert evs and evs[-1]["value"] == "moved in", evs


def test_cp_over_key(foo, tmp_path):
    src = tmp_path / "value"
    src.write_text("copied\n")
    foo.sh(f"cp {src} c1/config/user.foo")
    assert read_bytes(os.path.join(foo.cfg, "user.foo")) == b"copied\n"
    only_event(foo, config_event("user.foo", "bar", "copied"))


def test_python_tempfile_replace(foo):
    with tempfile.NamedTemporaryFile(dir=foo.cfg, delete=False) as tf:
        tf.write(b"atomic\n")
        name = tf.name
    foo.events.quiet(0.2)  # the scratch file is not a key: no event yet
    assert os.path.basename(name) in config_names(foo)
    assert os.stat(name).st_size == 7
    assert read_bytes(name) == b"atomic\n"
    os.replace(name, os.path.join(foo.cfg, "user.foo"))
    assert read_bytes(os.path.join(foo.cfg, "user.foo")) == b"atomic\n"
    only_event(foo, config_event("user.foo", "bar", "atomic"))
    assert [n for n in config_names(foo) if n.startswith("tmp")] == []
    # The renamed node now answers as the key.
    assert os.stat(os.path.join(foo.cfg, "user.foo")).st_size == 7


def test_replace_with_invalid_name_target_fails(foo):
    with tempfile.NamedTemporaryFile(dir=foo.cfg, delete=False) as tf:
        tf.write(b"x")
    bad = os.path.join(foo.cfg, "nodot")
    # scratch -> scratch is a plain rename
    os.replace(tf.name, bad)
    assert "nodot" in config_names(foo)
    os.unlink(bad)
    assert "nodot" not in config_names(foo)
    foo.events.quiet(0.2)


def test_scratch_files_are_not_keys(foo):
    fd = os.open(os.path.join(foo.cfg, "scratch"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, b"not a key")
    os.close(fd)
    assert read_bytes(os.path.join(foo.cfg, "scratch")) == b"not a key"
    foo.events.quiet(0.3)
    # All-digit names are refused: that is what makes vim write in place.
    try:
        os.open(os.path.join(foo.cfg, "4913"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as e:
        assert e.errno == errno.EPERM
    else:
        pytest.fail("4913 was created")
    # Scratch files are not in the model: gone after a restart.
    foo.events.close()
    foo.restart()
    foo.events = EventReader(foo.p("c1", "events"))
    assert "scratch" not in os.listdir(foo.cfg)


def test_cp_and_mv_create_devices(foo):
    # cp and mv (across file systems) create the target with O_EXCL; a
    # device name is still a device, not a scratch file.
    src = os.path.join(foo.base, "dev.json")
    with open(src, "w") as f:
        f.write('{"type":"disk","path":"/a"}\n')
    foo.sh(f"cp {src} c1/devices/viacp")
    assert read_bytes(foo.p("c1", "devices", "viacp")) == \
        b'{"path":"/a","type":"disk"}\n'
    foo.sh(f"mv {src} c1/devices/viamv")
    assert read_bytes(foo.p("c1", "devices", "viamv")) == \
        b'{"path":"/a","type":"disk"}\n'


def test_sed_in_devices(foo):
    foo.sh("printf '{\"type\":\"disk\",\"path\":\"/a\"}' > c1/devices/d")
    foo.sh("sed -i 's|/a|/b|' c1/devices/d")
    assert read_bytes(foo.p("c1", "devices", "d")) == b'{"path":"/b","type":"disk"}\n'
    assert sorted(os.listdir(foo.p("c1", "devices"))) == ["d"]
