"""File semantics of values: reads add one newline, writes drop one; the
commit at close; sizes, mtimes, limits, truncation, appends, attributes,
devices and meta-data."""

import errno
import os
import re
import stat
import time

from glutil import (MIB, EventReader, config_event, errno_of, parse_event, read_bytes, shape,
                    write_bytes, write_errno)

UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"


def key(d, name="user.foo", inst="c1"):
    return d.p(inst, "config", name)


def test_echo_then_cat(c1):
    c1.sh("echo bar > c1/config/user.foo")
    assert c1.sh("cat c1/config/user.foo").stdout == "bar\n"
    assert read_bytes(key(c1)) == b"bar\n"
    assert "user.foo" in os.listdir(c1.p("c1", "config"))


def test_printf_without_newline(c1):
    c1.sh("printf bar > c1/config/user.foo")
    assert read_bytes(key(c1)) == b"bar\n"


def test_multi_line_values(c1):
    c1.sh("printf 'a\\nb\\n' > c1/config/user.ml")
    assert read_bytes(key(c1, "user.ml")) == b"a\nb\n"
    c1.sh("printf 'a\\nb' > c1/config/user.ml")
    assert read_bytes(key(c1, "user.ml")) == b"a\nb\n"
    # Only one newline is dropped: a trailing blank line stays in the value.
    c1.sh("printf 'a\\n\\n' > c1/config/user.ml")
    assert read_bytes(key(c1, "user.ml")) == b"a\n\n"
    assert c1.sh("cat c1/config/user.ml").stdout == "a\n\n"


def test_round_trip_read_then_write(c1):
    # (b"" would be an open with O_TRUNC and no write: test_truncate_only_open)
    for value in (b"x", b"two\nlines", b"trailing\n", b"\n", b"\n\n", b"tab\tand \x01 ctl"):
        write_bytes(key(c1), value)
        content = read_bytes(key(c1))
        stored = value[:-1] if value.endswith(b"\n") else value  # one newline dropped
        assert content == stored + b"\n"
        write_bytes(key(c1), content)  # writing back what was read changes nothing
        assert read_bytes(key(c1)) == content


def test_empty_values(c1):
    # Each command's close() returns only once its value is durable, also
    # for opens closed without any write (`: >`, touch): read at once.
    c1.sh("printf '' > c1/config/user.e1; echo > c1/config/user.e2; : > c1/config/user.e3; "
          "touch c1/config/user.e4")
    for k in ("user.e1", "user.e2", "user.e3", "user.e4"):
        assert read_bytes(key(c1, k)) == b"\n", k
        assert os.stat(key(c1, k)).st_size == 1, k
    assert {"user.e1", "user.e2", "user.e3", "user.e4"} <= set(os.listdir(c1.p("c1", "config")))


def test_truncate_only_open(c1):
    # open(O_TRUNC) + close() without a write empties the value before
    # close() returns: the closing process holds no other descriptor.
    write_bytes(key(c1), "full\n")
    r = EventReader(c1.p("c1", "events"))
    fd = os.open(key(c1), os.O_WRONLY | os.O_TRUNC)
    os.close(fd)
    assert read_bytes(key(c1)) == b"\n"
    assert shape(parse_event(r.next())) == config_event("user.foo", "full", "")
    r.quiet(0.2)
    r.close()


def test_redirection_is_one_change(c1):
    # bash opens with O_TRUNC, dup2()s, and closes the first descriptor
    # before writing: that close must not commit an empty value.
    write_bytes(key(c1), "old\n")
    r = EventReader(c1.p("c1", "events"))
    c1.sh("echo new > c1/config/user.foo; : > c1/config/user.foo")
    assert shape(parse_event(r.next())) == config_event("user.foo", "old", "new")
    assert shape(parse_event(r.next())) == config_event("user.foo", "new", "")
    r.quiet(0.3)
    r.close()
    # a descriptor kept open elsewhere defers the truncate-only commit to
    # the last close
    write_bytes(key(c1), "kept\n")
    fd1 = os.open(key(c1), os.O_WRONLY | os.O_TRUNC)
    fd2 = os.dup(fd1)
    os.close(fd1)
    assert read_bytes(key(c1)) == b"kept\n"
    os.close(fd2)
    assert read_bytes(key(c1)) == b"\n"


def test_write_in_pieces_is_one_value(c1):
    data = b"".join(b"line %d\n" % i for i in range(1000))
    write_bytes(key(c1), data, chunk=7)
    assert read_bytes(key(c1)) == data


def test_small_reads_see_one_snapshot(c1):
    data = bytes(range(256)) * 64
    write_bytes(key(c1), data)
    fd = os.open(key(c1), os.O_RDONLY)
    try:
        first = os.read(fd, 5)
        write_bytes(key(c1), b"changed meanwhile")
        rest = b""
        while True:
            b = os.read(fd, 1000)
            if not b:
                break
            rest += b
    finally:
        os.close(fd)
    assert first + rest == data + b"\n"
    assert read_bytes(key(c1)) == b"changed meanwhile\n"


def test_one_mib_value_limit(c1):
    f = key(c1, "user.big")
    big = b"x" * MIB
    write_bytes(f, big)
    assert read_bytes(f) == big + b"\n"
    assert os.stat(f).st_size == MIB + 1
    # The newline a writer adds does not count.
    write_bytes(f, b"y" * MIB + b"\n")
    assert read_bytes(f) == b"y" * MIB + b"\n"
    # One byte over the limit: EFBIG, from write or close, and nothing changes.
    err, where = write_errno(f, b"z" * (MIB + 1))
    assert err == errno.EFBIG, (os.strerror(err), where)
    assert read_bytes(f) == b"y" * MIB + b"\n"
    err, where = write_errno(key(c1, "user.new"), b"z" * (MIB + 2))
    assert err == errno.EFBIG
    assert "user.new" not in os.listdir(c1.p("c1", "config"))


def test_efbig_from_shell(c1):
    c1.sh("echo small > c1/config/user.big")
    p = c1.bash("head -c 1048578 /dev/zero | tr '\\0' z > c1/config/user.big", check=False)
    assert p.returncode != 0 and "File too large" in p.stderr, p.stderr
    assert read_bytes(key(c1, "user.big")) == b"small\n"


def test_max_value_size_flag(daemon_factory):
    d = daemon_factory(args=["--max-value-size", "4K"])
    d.mkinstance("c1")
    write_bytes(key(d), b"a" * 4096)
    assert read_bytes(key(d)) == b"a" * 4096 + b"\n"
    assert write_errno(key(d), b"b" * 4097)[0] == errno.EFBIG
    assert read_bytes(key(d)) == b"a" * 4096 + b"\n"
    d.restart()
    assert write_errno(key(d), b"b" * 4097)[0] == errno.EFBIG


def test_max_value_size_plain_number(daemon_factory):
    d = daemon_factory(args=["--max-value-size", "100"])
    d.mkinstance("c1")
    write_bytes(key(d), b"a" * 100)
    assert write_errno(key(d), b"a" * 101)[0] == errno.EFBIG
    assert write_errno(d.p("c1", "devices", "d"), '{"type":"disk","path":"/' + "p" * 100 + '"}')[0] \
        == errno.EFBIG
    assert os.listdir(d.p("c1", "devices")) == []


def test_stat_size_is_read_size(c1):
    write_bytes(key(c1), "bar\n")
    write_bytes(c1.p("c1", "devices", "share"), '{"type":"disk","path":"/mnt"}')
    write_bytes(key(c1, "user.meta-data"), "foo: 1\n")
    for f in ("config/user.foo", "devices/share", "meta-data", "state", "type", "init-pid",
              "cgroup", "config/user.meta-data"):
        assert os.stat(c1.p("c1", f)).st_size == len(read_bytes(c1.p("c1", f))), f
    assert os.stat(c1.p("c1", "events")).st_size == 0
    assert os.stat(c1.p("events")).st_size == 0
    # wc -c trusts st_size for small files: it must be the exact byte count.
    assert c1.sh("wc -c < c1/config/user.foo").stdout.strip() == "4"


def test_mtime_changes_on_write(c1):
    f = key(c1)
    write_bytes(f, "one\n")
    m1 = os.stat(f).st_mtime_ns
    time.sleep(0.02)
    write_bytes(f, "two\n")
    m2 = os.stat(f).st_mtime_ns
    assert m2 > m1
    assert abs(m2 / 1e9 - time.time()) < 5
    # The instance's mtime follows its last change.
    assert os.stat(c1.p("c1")).st_mtime_ns >= m2


def test_o_append(c1):
    c1.sh("echo bar > c1/config/user.foo; echo more >> c1/config/user.foo")
    assert read_bytes(key(c1)) == b"bar\nmore\n"


def test_write_without_trunc_starts_from_current_content(c1):
    write_bytes(key(c1), "bar\n")
    fd = os.open(key(c1), os.O_WRONLY)
    os.write(fd, b"X")
    os.close(fd)
    assert read_bytes(key(c1)) == b"Xar\n"


def test_write_with_a_gap_is_einval(c1):
    write_bytes(key(c1), "bar\n")
    fd = os.open(key(c1), os.O_WRONLY | os.O_TRUNC)
    try:
        assert errno_of(os.pwrite, fd, b"x", 100) == errno.EINVAL
        # a refused write refuses the whole open file: not even the
        # truncation its open made is committed
        assert errno_of(os.write, fd, b"y") == errno.EINVAL
    finally:
        assert errno_of(os.close, fd) == errno.EINVAL
    assert read_bytes(key(c1)) == b"bar\n"


def test_truncate(c1):
    write_bytes(key(c1), "bar\n")
    c1.sh("truncate -s 0 c1/config/user.foo")
    assert read_bytes(key(c1)) == b"\n"
    write_bytes(key(c1), "bar\n")
    os.truncate(key(c1), 2)
    assert read_bytes(key(c1)) == b"ba\n"
    fd = os.open(key(c1), os.O_RDWR)
    os.ftruncate(fd, 0)
    os.write(fd, b"new\n")
    os.close(fd)
    assert read_bytes(key(c1)) == b"new\n"


def test_close_of_readers_commits_nothing(c1):
    write_bytes(key(c1), "bar\n")
    m = os.stat(key(c1)).st_mtime_ns
    fd = os.open(key(c1), os.O_RDWR)
    os.read(fd, 10)
    fd2 = os.dup(fd)
    os.close(fd2)
    os.close(fd)
    assert os.stat(key(c1)).st_mtime_ns == m


def test_fsync_commits(c1):
    fd = os.open(key(c1), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, b"synced\n")
        os.fsync(fd)
        assert read_bytes(key(c1)) == b"synced\n"
    finally:
        os.close(fd)
    assert read_bytes(key(c1)) == b"synced\n"


def test_key_name_limits(c1):
    k255 = "user." + "k" * 250
    write_bytes(key(c1, k255), "long\n")
    assert read_bytes(key(c1, k255)) == b"long\n"
    assert k255 in os.listdir(c1.p("c1", "config"))
    odd = "user.ünï-cödé_key.with.dots"
    write_bytes(key(c1, odd), "ok\n")
    assert odd in os.listdir(c1.p("c1", "config"))


def test_attributes(c1):
    assert read_bytes(c1.p("c1", "type")) == b"container\n"
    state = read_bytes(c1.p("c1", "state"))
    assert state in (b"Stopped\n", b"Started\n", b"Ready\n")
    for s in ("Started", "Ready", "Stopped"):
        c1.sh(f"echo {s} > c1/state")
        assert read_bytes(c1.p("c1", "state")) == s.encode() + b"\n"
    pid = str(os.getpid())
    c1.sh(f"echo {pid} > c1/init-pid")
    assert read_bytes(c1.p("c1", "init-pid")) == pid.encode() + b"\n"
    c1.sh("echo > c1/init-pid")
    assert read_bytes(c1.p("c1", "init-pid")) == b"\n"
    c1.sh("echo /lxc.payload.c1 > c1/cgroup")
    assert read_bytes(c1.p("c1", "cgroup")) == b"/lxc.payload.c1\n"
    c1.sh("echo virtual-machine > c1/type")
    c1.sh("echo 42 > c1/vsock-cid; echo /run/fc/c1.vsock > c1/vsock-uds")
    assert read_bytes(c1.p("c1", "vsock-cid")) == b"42\n"
    assert read_bytes(c1.p("c1", "vsock-uds")) == b"/run/fc/c1.vsock\n"
    assert len(read_bytes(c1.p("c1", "agent"))) >= 1


def test_devices_are_canonical_json(c1):
    c1.sh("printf '{\"type\":\"disk\",\"path\":\"/mnt\"}' > c1/devices/share")
    assert c1.sh("cat c1/devices/share").stdout == '{"path":"/mnt","type":"disk"}\n'
    write_bytes(c1.p("c1", "devices", "eth0"),
                '{\n  "type": "nic",\n  "nictype": "bridged",\n  "parent": "br<0>&"\n}\n')
    assert read_bytes(c1.p("c1", "devices", "eth0")) == \
        b'{"nictype":"bridged","parent":"br<0>&","type":"nic"}\n'
    assert sorted(os.listdir(c1.p("c1", "devices"))) == ["eth0", "share"]
    # Reading and writing back round-trips.
    c1.sh("cat c1/devices/share > /tmp/gl-dev.$$ && cat /tmp/gl-dev.$$ > c1/devices/share; "
          "rm -f /tmp/gl-dev.$$")
    assert read_bytes(c1.p("c1", "devices", "share")) == b'{"path":"/mnt","type":"disk"}\n'


def test_meta_data_composition(c1):
    md = read_bytes(c1.p("c1", "meta-data")).decode()
    m = re.fullmatch(r"#cloud-config\ninstance-id: (" + UUID + r")\nlocal-hostname: c1\n", md)
    assert m, md
    iid = m.group(1)
    cfg = c1.p("c1", "config", "volatile.cloud-init.instance-id")
    if os.path.exists(cfg):
        assert read_bytes(cfg) == iid.encode() + b"\n"
    c1.sh("printf 'foo: meta\\nbar: 2\\n' > c1/config/user.meta-data")
    want = f"#cloud-config\ninstance-id: {iid}\nlocal-hostname: c1\nfoo: meta\nbar: 2"
    assert read_bytes(c1.p("c1", "meta-data")) == want.encode()
    assert c1.sh("cat c1/meta-data").stdout == want
    assert os.stat(c1.p("c1", "meta-data")).st_size == len(want)
    # Verbatim: keys that repeat the generated ones simply follow.
    c1.sh("printf 'instance-id: mine\\n\\n' > c1/config/user.meta-data")
    assert read_bytes(c1.p("c1", "meta-data")) == \
        f"#cloud-config\ninstance-id: {iid}\nlocal-hostname: c1\ninstance-id: mine\n".encode()
    c1.sh("rm c1/config/user.meta-data")
    assert read_bytes(c1.p("c1", "meta-data")).decode() == md
    # Another instance gets another id and its own hostname.
    os.mkdir(c1.p("web-2"))
    md2 = read_bytes(c1.p("web-2", "meta-data")).decode()
    m2 = re.fullmatch(r"#cloud-config\ninstance-id: (" + UUID + r")\nlocal-hostname: web-2\n", md2)
    assert m2 and m2.group(1) != iid


def test_read_only_files_mode(c1):
    for f in ("meta-data", "events"):
        assert stat.S_IMODE(os.stat(c1.p("c1", f)).st_mode) == 0o444
