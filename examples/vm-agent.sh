#!/bin/bash
# A VM and its guest agent, end to end, without a VM: issue 5's story played
# through the vsock emulator (tools/vsock-mux) with the agent in its own pid,
# mount and network namespaces (no network interface at all).
#
# usage: vm-agent.sh [BUILD_DIR]      (as root; BUILD_DIR defaults to ./build)
#
# It starts its own guestlinkd (FUSE tree, private control socket), a
# Firecracker-style emulator for vm1, and guestlink-agent inside the
# namespaces, whose /dev/lxd/sock exists only in there. Then it checks, step
# by step: the agent file, ping, exec (streams, exit status, stdin), push and
# pull, stat, ls, devlxd through the agent, wait ready, wait agent, status.
# Exits 0 only if every step gave what it should; everything it started is
# stopped and removed on the way out.
#
#   host                                 emulator              guest namespaces
#   guestlinkd --dial vm1.sock--------> vsock-mux ----------> guest/listen-7361 (agent)
#   guestlinkd <--vm1.sock_7362-------- vsock-mux <---------- guest/host (agent's devlxd leg)
#                                                            /dev/lxd/sock (the agent serves it)
set -euo pipefail

usage() {
	echo "usage: $0 [BUILD_DIR]   (run as root; needs unshare, nsenter, curl)" >&2
	exit 2
}
case "${1:-}" in -h | --help) usage ;; esac
[ $# -le 1 ] || usage
build=$(cd "${1:-build}" 2>/dev/null && pwd) || usage
for b in guestlinkd guestlink-agent guestlinkctl tools/vsock-mux; do
	[ -x "$build/$b" ] || { echo "vm-agent: $build/$b is not built (make)" >&2; exit 2; }
done
[ "$(id -u)" = 0 ] || { echo "vm-agent: run as root (FUSE, namespaces)" >&2; exit 2; }

tmp=$(mktemp -d /tmp/glvm.XXXXXX)
chmod 755 "$tmp"
mnt=$tmp/mnt
ctl=("$build/guestlinkctl" -s "$tmp/control.sock")
pids=()
nsinit=
step=starting

cleanup() {
	local rc=$?
	trap - EXIT
	[ "$rc" = 0 ] || { echo "vm-agent: FAILED at: $step" >&2; tail -n 20 "$tmp"/*.log >&2 2>/dev/null || true; }
	# The guest's init ending takes every process of the guest with it.
	[ -z "$nsinit" ] || kill -TERM "$nsinit" 2>/dev/null || true
	for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
	for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
	umount -l "$mnt" 2>/dev/null || true
	umount -l "$tmp/stage" 2>/dev/null || true
	rm -rf "$tmp"
	exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

ok() { echo "ok: $*"; }
fail() { echo "vm-agent: $*" >&2; exit 1; }
# until SECONDS CMD...: retry CMD every 50 ms.
until_ok() {
	local end=$((SECONDS + $1))
	shift
	until "$@" 2>/dev/null; do
		[ "$SECONDS" -lt "$end" ] || return 1
		sleep 0.05
	done
}
# Run in the guest: the agent's pid, mount and network namespaces.
guest() { nsenter -t "$nsinit" -p -m -n -- "$@"; }

step="guestlinkd"
mkdir -p "$tmp/state" "$mnt"
"$build/guestlinkd" --state-dir "$tmp/state" --mount "$mnt" \
	--control-socket "$tmp/control.sock" 2>"$tmp/guestlinkd.log" &
pids+=($!)
until_ok 10 mountpoint -q "$mnt" || fail "guestlinkd did not mount $mnt"
until_ok 10 test -S "$tmp/control.sock" -a -s "$tmp/state/host.pub" ||
	fail "no control socket or host.pub"
ok "guestlinkd on $mnt, control socket $tmp/control.sock"

step="vm1 and its emulated VMM"
mkdir "$mnt/vm1"
echo virtual-machine > "$mnt/vm1/type"
printf '%s\n' 'hello from the host' > "$mnt/vm1/config/user.foo"
mkdir "$tmp/guest"
"$build/tools/vsock-mux" --uds "$tmp/vm1.sock" --guest "$tmp/guest" 2>"$tmp/vsock-mux.log" &
pids+=($!)
until_ok 10 test -S "$tmp/vm1.sock" || fail "vsock-mux did not listen"
echo "$tmp/vm1.sock" > "$mnt/vm1/vsock-uds"
until_ok 10 test -S "$tmp/vm1.sock_7362" || fail "guestlinkd did not listen on vm1.sock_7362"
[ "$(cat "$mnt/vm1/agent")" = "status: offline" ] || fail "agent file: $(cat "$mnt/vm1/agent")"
ok "vm1: virtual-machine, vsock-uds $tmp/vm1.sock, agent offline"

step="the guest's namespaces"
# pid 1 of the guest: a tmpfs /dev with the usual nodes, so that
# /dev/lxd/sock exists only in here; no network interface but a down lo.
mkdir "$tmp/stage" "$tmp/keys" "$tmp/files"
cp "$tmp/state/host.pub" "$tmp/keys/host.pub" # in a real guest: /etc/guestlink/host.pub
unshare --pid --fork --mount --net --mount-proc --propagation private /bin/sh -c '
	set -e
	mount -t tmpfs -o mode=0755,size=1m vm-dev "$1"
	for n in null zero full random urandom tty; do
		touch "$1/$n"
		mount --bind "/dev/$n" "$1/$n"
	done
	ln -s /proc/self/fd "$1/fd"
	mount --move "$1" /dev
	: > "$2"
	trap "exit 0" TERM
	sleep infinity &
	wait' sh "$tmp/stage" "$tmp/guest-ready" </dev/null &
pids+=($!)
find_init() {
	nsinit=$(cat "/proc/$1/task/$1/children" 2>/dev/null) || true
	nsinit=${nsinit%% *}
	[ -n "$nsinit" ]
}
until_ok 10 find_init "${pids[-1]}" || fail "the guest's init did not start"
until_ok 10 test -e "$tmp/guest-ready" || fail "the guest's /dev is not ready"
ok "guest namespaces (init pid $nsinit), network interfaces:" \
	$(guest sh -c 'tail -n +3 /proc/net/dev | cut -d: -f1')

step="guestlink-agent"
# --transport unix:DIR: the emulator's guest side. Never the vsock default
# here: on a machine that is itself a VM, CID 2 is its own hypervisor.
guest "$build/guestlink-agent" --transport "unix:$tmp/guest" --host-key "$tmp/keys/host.pub" \
	--devlxd-socket /dev/lxd/sock 2>"$tmp/agent.log" &
pids+=($!)
"${ctl[@]}" wait vm1 agent --timeout 20 || fail "the agent did not come online"
agent=$(cat "$mnt/vm1/agent")
[[ "$agent" =~ ^status:\ online$'\n'version:\ [^$'\n']+$'\n'last-ping:\ [0-9T:.-]+Z$'\n'rtt-us:\ [0-9]+$ ]] ||
	fail "agent file: $agent"
ok "agent online:" $agent

step="ping"
out=$("${ctl[@]}" ping vm1)
[[ "$out" =~ ^vm1:\ agent\ [^,]+,\ up\ [0-9.]+\ s,\ rtt\ [0-9.]+\ ms$ ]] || fail "ping: $out"
ok "$out"

step="exec: streams and exit status"
rc=0
out=$("${ctl[@]}" exec vm1 -T -- sh -c 'echo out; echo err >&2; exit 3' 2>"$tmp/err") || rc=$?
[ "$rc" = 3 ] && [ "$out" = out ] && [ "$(cat "$tmp/err")" = err ] ||
	fail "exec: exit $rc, stdout '$out', stderr '$(cat "$tmp/err")'"
ok "exec: stdout 'out', stderr 'err', exit 3"

step="exec: stdin"
out=$(printf 'data' | "${ctl[@]}" exec vm1 -- cat)
[ "$out" = data ] || fail "exec cat: '$out'"
out=$("${ctl[@]}" exec vm1 -T -- sh -c 'echo $$')
ok "exec: stdin reaches cat; a command runs as pid $out of the guest's pid namespace"

step="exec: killed by a signal, timeout"
rc=0
"${ctl[@]}" exec vm1 -T -- sh -c 'kill -TERM $$' || rc=$?
[ "$rc" = 143 ] || fail "exec killed by SIGTERM: exit $rc"
rc=0
"${ctl[@]}" exec vm1 -T --timeout 0.5 -- sleep 10 2>/dev/null || rc=$?
[ "$rc" = 124 ] || fail "exec --timeout: exit $rc"
ok "exec: SIGTERM -> 143, --timeout -> 124"

step="push and pull"
head -c 3000000 /dev/urandom > "$tmp/file"
"${ctl[@]}" push vm1 "$tmp/file" "$tmp/files/file" --mode 0600 --no-progress
"${ctl[@]}" pull vm1 "$tmp/files/file" "$tmp/back" --no-progress
cmp "$tmp/file" "$tmp/back" || fail "pull: the bytes differ"
[ "$(stat -c %a "$tmp/files/file")" = 600 ] || fail "push --mode: $(stat -c %a "$tmp/files/file")"
ok "push + pull: 3000000 bytes round trip, mode 0600"

step="stat and ls"
out=$("${ctl[@]}" stat vm1 "$tmp/files/file")
grep -qx 'type: file' <<<"$out" && grep -qx 'mode: 0600' <<<"$out" &&
	grep -qx 'size: 3000000' <<<"$out" || fail "stat: $out"
rc=0
err=$("${ctl[@]}" stat vm1 /nope 2>&1) || rc=$?
[ "$rc" = 1 ] && [ "$err" = "guestlinkctl: stat /nope: No such file or directory" ] ||
	fail "stat /nope: exit $rc, '$err'"
out=$("${ctl[@]}" ls vm1 /etc)
grep -qx hostname <<<"$out" || fail "ls /etc has no hostname"
ok "stat: type file, mode 0600, size 3000000; stat /nope: exit 1; ls /etc: $(wc -l <<<"$out") names"

step="devlxd through the agent"
out=$(guest curl -sS --unix-socket /dev/lxd/sock http://lxd/1.0/config/user.foo)
[ "$out" = 'hello from the host' ] || fail "devlxd user.foo: '$out'"
ok "curl /dev/lxd/sock in the guest: user.foo = '$out'"

step="wait ready"
echo Started > "$mnt/vm1/state" # what the VMM's manager records when it boots the VM
"${ctl[@]}" wait vm1 ready --timeout 30 &
waiter=$!
sleep 0.2
kill -0 "$waiter" 2>/dev/null || fail "wait ready returned before the guest was Ready"
code=$(guest curl -sS -o /dev/null -w '%{http_code}' --unix-socket /dev/lxd/sock \
	-X PATCH -d '{"state":"Ready"}' http://lxd/1.0)
[ "$code" = 200 ] || fail "PATCH /1.0: HTTP $code"
wait "$waiter" || fail "wait ready: exit $?"
[ "$(cat "$mnt/vm1/state")" = Ready ] || fail "state: $(cat "$mnt/vm1/state")"
ok "the guest PATCHed Ready: wait ready returned 0; M/vm1/state = Ready"

step="status"
out=$("${ctl[@]}" status vm1)
grep -qx 'status: online' <<<"$out" || fail "status: $out"
ok "status:" $out

echo "vm-agent: every step worked"
