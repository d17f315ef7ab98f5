"""Every invalid input gets the right errno and changes nothing: not the
tree, not the values, and no event is emitted."""

import errno
import os

import pytest

from glutil import EventReader, errno_of, read_bytes, write_bytes, write_errno


def snapshot(d):
    """Everything visible in the tree, to prove that nothing changed."""
    out = {}
    for root, dirs, files in os.walk(d.mnt):
        dirs.sort()
        for f in sorted(files):
            p = os.path.join(root, f)
            rel = os.path.relpath(p, d.mnt)
            if rel == "events" or rel.endswith("/events"):
                out[rel] = None
                continue
            out[rel] = read_bytes(p)
    return out


@pytest.fixture
def busy(c1):
    """c1 with a key and a device, plus a reader of MNT/events to prove that
    failures emit nothing."""
    write_bytes(c1.p("c1", "config", "user.foo"), "bar\n")
    write_bytes(c1.p("c1", "devices", "share"), '{"type":"disk","path":"/mnt"}')
    c1.events = EventReader(c1.p("events"))
    c1.before = snapshot(c1)
    yield c1
    c1.events.quiet(0.2)
    assert snapshot(c1) == c1.before
    c1.events.close()


@pytest.mark.parametrize("name,err", [
    ("1abc", errno.EINVAL),
    ("-abc", errno.EINVAL),
    ("abc-", errno.EINVAL),
    ("a_b", errno.EINVAL),
    ("a.b", errno.EINVAL),
    ("a b", errno.EINVAL),
    ("caf\u00e9", errno.EINVAL),
    ("a" * 64, errno.ENAMETOOLONG),
])
def test_bad_instance_names(busy, name, err):
    assert errno_of(os.mkdir, busy.p(name)) == err


def test_bad_instance_name_from_shell(busy):
    p = busy.bash("mkdir 1abc", check=False)
    assert p.returncode != 0 and "Invalid argument" in p.stderr, p.stderr


def test_longest_instance_name_works(gl):
    os.mkdir(gl.p("a" * 63))
    assert os.listdir(gl.p("a" * 63, "config")) is not None


def test_instance_exists(busy):
    assert errno_of(os.mkdir, busy.p("c1")) == errno.EEXIST
    p = busy.bash("mkdir c1", check=False)
    assert p.returncode != 0 and "File exists" in p.stderr


@pytest.mark.parametrize("name,err", [
    ("nodot", errno.EINVAL),
    ("user.foo~", errno.EINVAL),
    (".user.foo", errno.EINVAL),
    ("user.ctl\x01", errno.EINVAL),
    ("user." + "k" * 251, errno.ENAMETOOLONG),
])
def test_bad_key_names(busy, name, err):
    path = busy.p("c1", "config", name)
    assert errno_of(os.open, path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644) == err
    assert errno_of(read_bytes, path) == errno.ENOENT


def test_bad_key_name_from_shell(busy):
    p = busy.bash("echo x > c1/config/bad", check=False)
    assert p.returncode != 0 and "Invalid argument" in p.stderr, p.stderr
    p = busy.bash("echo x > c1/config/user.$(printf 'k%.0s' $(seq 251))", check=False)
    assert p.returncode != 0 and "File name too long" in p.stderr, p.stderr


BAD_DEVICES = [
    ("not json", "not JSON"),
    ('["type","disk"]', "an array"),
    ('{"type":"disk","size":1}', "a non-string value"),
    ('{"type":"disk","opts":{"a":"b"}}', "a nested object"),
    ('{"path":"/mnt"}', "no type"),
    ('{"type":"","path":"/mnt"}', "an empty type"),
    ('{"type":"disk"} trailing', "trailing garbage"),
    ('{"type":"disk","type":"nic"}', "a duplicate key"),
]


@pytest.mark.parametrize("value,why", BAD_DEVICES)
def test_bad_device_json_from_shell(busy, value, why):
    qv = value.replace("'", "'\\''")
    for target in ("c1/devices/new", "c1/devices/share"):
        p = busy.bash(f"echo '{qv}' > {target}", check=False)
        assert p.returncode != 0, f"{why}: accepted by {target}"
        assert "Invalid argument" in p.stderr, p.stderr


@pytest.mark.parametrize("value,why", BAD_DEVICES)
def test_bad_device_json_from_syscalls(busy, value, why):
    for target in ("new", "share"):
        err, where = write_errno(busy.p("c1", "devices", target), value)
        assert err == errno.EINVAL, f"{why}: {os.strerror(err)} from {where}"


def test_incomplete_device_json_fails_at_close(busy):
    # Every write is a valid prefix; only the close can tell.
    fd = os.open(busy.p("c1", "devices", "share"), os.O_WRONLY | os.O_TRUNC)
    os.write(fd, b'{"type":"disk"')
    assert errno_of(os.close, fd) == errno.EINVAL


@pytest.mark.parametrize("attr,value", [
    ("type", "bogus"), ("state", "bogus"),
    ("init-pid", "abc"), ("init-pid", "-5"), ("init-pid", "12x"), ("cgroup", "relative/path"),
])
def test_bad_attribute_values(busy, attr, value):
    err, where = write_errno(busy.p("c1", attr), value + "\n")
    assert err == errno.EINVAL, f"{attr}={value!r}: {os.strerror(err)} from {where}"


def test_bad_attribute_from_shell(busy):
    for attr, value in (("type", "bogus"), ("state", "bogus"), ("init-pid", "abc")):
        p = busy.bash(f"echo {value} > c1/{attr}", check=False)
        assert p.returncode != 0 and "write error: Invalid argument" in p.stderr, (attr, p.stderr)
        # tee also reports errors that only close() sees
        p = busy.bash(f"echo {value} | tee c1/{attr}", check=False)
        assert p.returncode != 0 and "Invalid argument" in p.stderr, (attr, p.stderr)


def test_read_only_files_are_eacces(busy):
    for f in ("c1/meta-data", "c1/events", "events"):
        for flags in (os.O_WRONLY, os.O_RDWR, os.O_WRONLY | os.O_TRUNC, os.O_WRONLY | os.O_APPEND):
            assert errno_of(os.open, busy.p(f), flags) == errno.EACCES, (f, flags)
        p = busy.bash(f"echo x > {f}", check=False)
        assert p.returncode != 0 and "Permission denied" in p.stderr, p.stderr
    assert errno_of(os.truncate, busy.p("c1", "meta-data"), 0) in (errno.EACCES, errno.EPERM)


def test_agent_is_read_only(c1):
    write_bytes(c1.p("c1", "type"), "virtual-machine\n")
    before = read_bytes(c1.p("c1", "agent"))
    assert errno_of(os.open, c1.p("c1", "agent"), os.O_WRONLY) == errno.EACCES
    assert read_bytes(c1.p("c1", "agent")) == before


def test_unknown_paths_are_enoent(busy):
    for path in ("nope", "nope/config", "nope/config/user.foo", "c1/config/user.missing",
                 "c1/devices/missing", "c1/nofile"):
        assert errno_of(os.stat, busy.p(path)) == errno.ENOENT, path
    assert errno_of(os.open, busy.p("nope", "config", "user.x"), os.O_WRONLY | os.O_CREAT,
                    0o644) == errno.ENOENT
    assert errno_of(os.unlink, busy.p("c1", "config", "user.missing")) == errno.ENOENT
    assert errno_of(os.rmdir, busy.p("nope")) == errno.ENOENT
    p = busy.bash("cat nope/meta-data", check=False)
    assert p.returncode != 0 and "No such file or directory" in p.stderr


def test_mkdir_in_config_is_eperm(busy):
    assert errno_of(os.mkdir, busy.p("c1", "config", "user.d")) == errno.EPERM
    assert errno_of(os.mkdir, busy.p("c1", "devices", "d")) == errno.EPERM


def test_rename_key_is_exdev_but_mv_works(c1):
    write_bytes(c1.p("c1", "config", "user.a"), "A\n")
    assert errno_of(os.rename, c1.p("c1", "config", "user.a"), c1.p("c1", "config", "user.b")) \
        == errno.EXDEV
    assert read_bytes(c1.p("c1", "config", "user.a")) == b"A\n"
    c1.sh("mv c1/config/user.a c1/config/user.b")
    assert read_bytes(c1.p("c1", "config", "user.b")) == b"A\n"
    assert "user.a" not in os.listdir(c1.p("c1", "config"))


def test_rename_across_instances_is_exdev(c1):
    os.mkdir(c1.p("c2"))
    write_bytes(c1.p("c1", "config", "user.a"), "A\n")
    assert errno_of(os.rename, c1.p("c1", "config", "user.a"), c1.p("c2", "config", "user.a")) \
        == errno.EXDEV
    assert errno_of(os.rename, c1.p("c1", "config", "user.a"), c1.p("c1", "devices", "a")) \
        == errno.EXDEV
