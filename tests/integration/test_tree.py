"""The shape of the tree: instances as directories, their fixed files, and
what can and cannot be created or removed where."""

import errno
import os
import stat

from glutil import errno_of, read_bytes, write_bytes

CONTAINER_FILES = {"config", "devices", "meta-data", "events", "state", "type", "init-pid", "cgroup"}
VM_FILES = {"config", "devices", "meta-data", "events", "state", "type", "vsock-cid", "vsock-uds",
            "agent"}


def test_empty_root_has_events_only(gl):
    assert sorted(os.listdir(gl.mnt)) == ["events"]
    assert gl.sh("ls").stdout == "events\n"


def test_mkdir_and_ls_instance(gl):
    gl.sh("mkdir c1")
    assert gl.sh("ls c1").stdout.split() == sorted(CONTAINER_FILES)
    assert set(os.listdir(gl.mnt)) == {"events", "c1"}
    assert stat.S_ISDIR(os.stat(gl.p("c1")).st_mode)
    assert read_bytes(gl.p("c1", "type")) == b"container\n"
    # A fresh instance has no user keys and no devices.
    assert [k for k in os.listdir(gl.p("c1", "config")) if k.startswith("user.")] == []
    assert os.listdir(gl.p("c1", "devices")) == []


def test_many_instances_listed(gl):
    names = [f"i{n}" for n in range(50)]
    for n in names:
        os.mkdir(gl.p(n))
    assert set(os.listdir(gl.mnt)) == set(names) | {"events"}
    assert os.stat(gl.mnt).st_nlink == 2 + len(names)


def test_vm_has_vm_files(c1):
    c1.sh("echo virtual-machine > c1/type")
    assert read_bytes(c1.p("c1", "type")) == b"virtual-machine\n"
    assert set(os.listdir(c1.p("c1"))) == VM_FILES
    assert stat.S_IMODE(os.stat(c1.p("c1", "agent")).st_mode) == 0o444
    c1.sh("echo container > c1/type")
    assert set(os.listdir(c1.p("c1"))) == CONTAINER_FILES


def test_type_change_is_seen_at_once(c1):
    # The kernel caches names for up to a second; a type change alters the
    # fixed file set, so the daemon must invalidate those names at once.
    os.stat(c1.p("c1", "init-pid"))
    os.stat(c1.p("c1", "cgroup"))
    write_bytes(c1.p("c1", "type"), "virtual-machine\n")
    assert errno_of(os.stat, c1.p("c1", "init-pid")) == errno.ENOENT
    assert errno_of(os.stat, c1.p("c1", "cgroup")) == errno.ENOENT
    os.stat(c1.p("c1", "vsock-cid"))
    write_bytes(c1.p("c1", "type"), "container\n")
    assert errno_of(os.stat, c1.p("c1", "vsock-cid")) == errno.ENOENT
    os.stat(c1.p("c1", "init-pid"))


def test_rmdir_instance(c1):
    c1.sh("echo bar > c1/config/user.foo")
    c1.sh("rmdir c1")
    assert os.listdir(c1.mnt) == ["events"]
    assert errno_of(os.stat, c1.p("c1")) == errno.ENOENT
    assert errno_of(read_bytes, c1.p("c1", "config", "user.foo")) == errno.ENOENT
    assert errno_of(os.rmdir, c1.p("c1")) == errno.ENOENT


def test_rm_r_instance(c1):
    c1.sh("echo bar > c1/config/user.foo; echo 2 > c1/config/user.two; "
          "printf '{\"type\":\"disk\",\"path\":\"/mnt\"}' > c1/devices/share")
    p = c1.sh("rm -r c1", check=False)
    assert (p.returncode, p.stderr) == (0, "")
    assert os.listdir(c1.mnt) == ["events"]
    p = c1.sh("rm -rf c1", check=False)
    assert (p.returncode, p.stderr) == (0, "")


def test_fixed_entries_survive_unlink(c1):
    write_bytes(c1.p("c1", "config", "user.foo"), "bar\n")
    for f in ("state", "type", "meta-data", "events", "init-pid", "cgroup"):
        os.unlink(c1.p("c1", f))
        assert os.path.exists(c1.p("c1", f)), f
    for d in ("config", "devices"):
        os.rmdir(c1.p("c1", d))
        assert os.path.isdir(c1.p("c1", d)), d
    assert read_bytes(c1.p("c1", "config", "user.foo")) == b"bar\n"
    assert set(os.listdir(c1.p("c1"))) == CONTAINER_FILES


def test_rm_key_and_device(c1):
    c1.sh("echo bar > c1/config/user.foo; printf '{\"type\":\"disk\",\"path\":\"/mnt\"}' > c1/devices/share")
    c1.sh("rm c1/config/user.foo c1/devices/share")
    assert "user.foo" not in os.listdir(c1.p("c1", "config"))
    assert os.listdir(c1.p("c1", "devices")) == []
    p = c1.bash("cat c1/config/user.foo", check=False)
    assert p.returncode != 0 and "No such file or directory" in p.stderr
    assert errno_of(os.unlink, c1.p("c1", "config", "user.foo")) == errno.ENOENT


def test_recreated_instance_is_a_new_one(c1):
    iid = read_bytes(c1.p("c1", "meta-data"))
    write_bytes(c1.p("c1", "config", "user.foo"), "old\n")
    fd = os.open(c1.p("c1", "config", "user.foo"), os.O_RDONLY)
    try:
        os.rmdir(c1.p("c1"))
        os.mkdir(c1.p("c1"))
        assert "user.foo" not in os.listdir(c1.p("c1", "config"))
        assert read_bytes(c1.p("c1", "meta-data")) != iid
        write_bytes(c1.p("c1", "config", "user.foo"), "new\n")
        # The old descriptor names the removed instance, never the new one.
        assert errno_of(os.read, fd, 100) == errno.ENOENT
        assert errno_of(os.fstat, fd) == errno.ENOENT
    finally:
        os.close(fd)


def test_root_refuses_files_and_renames(c1):
    assert errno_of(os.open, c1.p("file"), os.O_WRONLY | os.O_CREAT, 0o644) == errno.EPERM
    assert errno_of(os.unlink, c1.p("events")) == errno.EPERM
    assert os.path.exists(c1.p("events"))
    assert errno_of(os.rename, c1.p("c1"), c1.p("c2")) == errno.EPERM
    assert errno_of(os.symlink, "c1", c1.p("link")) == errno.EPERM
    assert errno_of(os.mknod, c1.p("node"), stat.S_IFREG | 0o644) == errno.EPERM
    assert sorted(os.listdir(c1.mnt)) == ["c1", "events"]
    p = c1.bash("mv c1 c2", check=False)
    assert p.returncode != 0
    assert sorted(os.listdir(c1.mnt)) == ["c1", "events"]


def test_mkdir_inside_instance_is_eperm(c1):
    for d in ("c1/sub", "c1/config/sub", "c1/devices/sub", "c1/config/user.dir"):
        assert errno_of(os.mkdir, c1.p(d)) == errno.EPERM, d
    p = c1.bash("mkdir c1/config/x", check=False)
    assert p.returncode != 0 and "Operation not permitted" in p.stderr
    assert set(os.listdir(c1.p("c1"))) == CONTAINER_FILES
    assert os.listdir(c1.p("c1", "devices")) == []


def test_create_file_in_instance_dir_fails(c1):
    err = errno_of(os.open, c1.p("c1", "newfile"), os.O_WRONLY | os.O_CREAT, 0o644)
    assert err in (errno.EPERM, errno.EACCES, errno.EINVAL), os.strerror(err)
    assert set(os.listdir(c1.p("c1"))) == CONTAINER_FILES


def test_modes_and_owners(c1):
    write_bytes(c1.p("c1", "config", "user.foo"), "bar\n")
    write_bytes(c1.p("c1", "devices", "share"), '{"type":"disk","path":"/mnt"}')
    want = {
        "": stat.S_IFDIR | 0o755, "events": stat.S_IFREG | 0o444,
        "c1": stat.S_IFDIR | 0o755, "c1/config": stat.S_IFDIR | 0o755,
        "c1/devices": stat.S_IFDIR | 0o755, "c1/meta-data": stat.S_IFREG | 0o444,
        "c1/events": stat.S_IFREG | 0o444, "c1/state": stat.S_IFREG | 0o644,
        "c1/type": stat.S_IFREG | 0o644, "c1/init-pid": stat.S_IFREG | 0o644,
        "c1/cgroup": stat.S_IFREG | 0o644, "c1/config/user.foo": stat.S_IFREG | 0o644,
        "c1/devices/share": stat.S_IFREG | 0o644,
    }
    for path, mode in want.items():
        st = os.stat(c1.p(path))
        assert (oct(st.st_mode), st.st_uid, st.st_gid) == (oct(mode), 0, 0), path
    assert os.stat(c1.p("c1")).st_nlink == 4
    assert os.stat(c1.p("c1", "config")).st_nlink == 2


def test_chmod_chown_utime_accepted_and_ignored(c1):
    f = c1.p("c1", "config", "user.foo")
    write_bytes(f, "bar\n")
    os.chmod(f, 0o600)
    os.chown(f, 0, 0)
    os.utime(f, (0, 0))
    assert stat.S_IMODE(os.stat(f).st_mode) == 0o644
    assert read_bytes(f) == b"bar\n"
