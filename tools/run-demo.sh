#!/bin/bash
# What `make run` starts after deps + build: guestlinkd on ./state, mounted
# on ./mnt, with an instance "demo" and LXD's guest API on
# ./state/devlxd/sock; a stand-in container (pid + mount namespaces, the
# socket bind-mounted at /dev/lxd/sock) is bound to "demo". Ctrl-C stops
# both (clean unmount).
# BUILD, STATE and MNT (environment) override build/, ./state and ./mnt;
# GUESTLINKD_ARGS adds options for the daemon.
set -euo pipefail

cd "$(dirname "$0")/.."
BUILD=${BUILD:-build}
DAEMON=$BUILD/guestlinkd
STATE=${STATE:-./state}
MNT=${MNT:-./mnt}

if [ ! -x "$DAEMON" ]; then
	echo "run-demo: $DAEMON is missing; run make first" >&2
	exit 1
fi
if [ "$(id -u)" -ne 0 ]; then
	echo "run-demo: guestlinkd mounts a FUSE file system; run as root (sudo make run)" >&2
	exit 1
fi

mkdir -p "$STATE"
# A leftover mount of a crashed daemon makes mkdir fail (ENOTCONN); the
# daemon cleans it up and creates the mount point itself.
mkdir -p "$MNT" 2>/dev/null || true
# In its own session, so that Ctrl-C reaches only this script, which then
# stops the daemon with one SIGTERM (two signals could race its shutdown).
read -r -a extra <<<"${GUESTLINKD_ARGS:-}"
# where guestlinkctl finds the daemon: the default, unless the extra
# options name another control socket
CTLSOCK=/run/guestlink/control.sock
for ((k = 0; k < ${#extra[@]}; k++)); do
	case "${extra[k]}" in
	--control-socket) CTLSOCK=${extra[k + 1]:-} ;;
	--control-socket=*) CTLSOCK=${extra[k]#--control-socket=} ;;
	esac
done
mkdir -p "$STATE/devlxd"
SOCKDIR=$(realpath "$STATE/devlxd")
setsid "$DAEMON" --state-dir "$STATE" --mount "$MNT" --devlxd-socket "$SOCKDIR/sock" \
	"${extra[@]}" &
pid=$!
ct=""
ctpid=""
stage=""

# The stand-in container: its own pid and mount namespaces, a private /dev
# (tmpfs with the usual nodes) where the socket's directory is /dev/lxd.
start_container() {
	stage=$(mktemp -d /tmp/gl-demo-dev.XXXXXX)
	# shellcheck disable=SC2016 # expanded by the inner shell
	setsid unshare --pid --fork --mount-proc --mount --propagation private /bin/sh -c '
		set -e
		mount -t tmpfs -o mode=0755,size=1m gl-dev "$2"
		for n in null zero full random urandom tty; do
			touch "$2/$n"; mount --bind "/dev/$n" "$2/$n"
		done
		mkdir "$2/lxd" "$2/pts" "$2/shm"
		ln -s /proc/self/fd "$2/fd"
		mount --bind "$1" "$2/lxd"
		mount --move "$2" /dev
		exec sleep infinity' sh "$SOCKDIR" "$stage" </dev/null >/dev/null 2>&1 &
	ct=$!
	for _ in $(seq 50); do
		ctpid=$(awk '{print $1}' "/proc/$ct/task/$ct/children" 2>/dev/null)
		[ -n "$ctpid" ] && [ -e "/proc/$ctpid/root/dev/lxd/sock" ] && return 0
		sleep 0.1
	done
	echo "run-demo: the demo container did not start" >&2
	return 1
}

# shellcheck disable=SC2317 # invoked by the trap
stop() {
	trap - INT TERM
	echo
	echo "run-demo: stopping guestlinkd (pid $pid)"
	if [ -n "$ct" ]; then
		# killing the namespace's init takes everything in it down;
		# killing unshare alone would orphan it
		if [ -n "$ctpid" ]; then
			kill -KILL "$ctpid" 2>/dev/null || true
		fi
		wait "$ct" 2>/dev/null || true
		kill -KILL "$ct" 2>/dev/null || true
	fi
	# the container's /dev was mounted here and moved away: empty on the host
	if [ -n "$stage" ]; then
		rmdir "$stage" 2>/dev/null || true
	fi
	kill -TERM "$pid" 2>/dev/null || true
	rc=0
	wait "$pid" || rc=$?
	if mountpoint -q "$MNT"; then
		echo "run-demo: $MNT is still mounted" >&2
		rc=1
	fi
	exit "$rc"
}
trap stop INT TERM

for _ in $(seq 100); do
	if mountpoint -q "$MNT"; then
		break
	fi
	if ! kill -0 "$pid" 2>/dev/null; then
		rc=0
		wait "$pid" || rc=$?
		echo "run-demo: guestlinkd exited with status $rc before mounting" >&2
		exit 1
	fi
	sleep 0.1
done
if ! mountpoint -q "$MNT"; then
	echo "run-demo: $MNT was not mounted within 10 s" >&2
	kill -TERM "$pid" 2>/dev/null || true
	wait "$pid" || true
	exit 1
fi

if [ ! -d "$MNT/demo" ]; then
	mkdir "$MNT/demo"
	echo hello > "$MNT/demo/config/user.greeting"
fi
if start_container; then
	echo "$ctpid" > "$MNT/demo/init-pid"
fi

m=$(realpath "$MNT")
ctl=$BUILD/guestlinkctl
if [ "$CTLSOCK" != /run/guestlink/control.sock ]; then
	ctl="$ctl -s $CTLSOCK"
fi
cat <<MSG

guestlinkd is running (pid $pid): state in $(realpath "$STATE"), tree mounted on $m.
Try, in another shell (as root):

  ls $m $m/demo
  cat $m/demo/config/user.greeting
  echo world > $m/demo/config/user.greeting
  printf '{"type":"disk","path":"/mnt"}' > $m/demo/devices/share
  cat $m/demo/meta-data
  cat $m/demo/events          # blocks; shows each change as a JSON line
  cat $m/events               # every instance, plus created/removed lines
  mkdir $m/c1; rm -r $m/c1

A container bound to "demo" (init pid $ctpid) sees LXD's guest API at
/dev/lxd/sock. Inside it:

  nsenter -t $ctpid -p -m curl -s --unix-socket /dev/lxd/sock http://lxd/1.0/config/user.greeting
  nsenter -t $ctpid -p -m curl -s --unix-socket /dev/lxd/sock http://lxd/1.0/meta-data
  nsenter -t $ctpid -p -m curl -s --unix-socket /dev/lxd/sock -X PATCH -d '{"state":"Ready"}' http://lxd/1.0
  cat $m/demo/state           # Ready

guestlinkctl talks to the daemon through its control socket ($CTLSOCK):

  $ctl wait demo ready --timeout 60   # returns once demo is Ready (the PATCH above)
  $ctl help

Its other commands (ping, exec, push, pull, stat, ls, status) drive the
guest agent of a VM. To see them work without a VM (vsock emulator, agent
in its own namespaces), run in another shell: examples/vm-agent.sh $BUILD

Press Ctrl-C here to stop the daemon (it unmounts $m).
MSG

rc=0
wait "$pid" || rc=$?
# wait returns early (status > 128) when a trapped signal arrives; the trap
# handler exits. Reaching here means the daemon ended on its own.
echo "run-demo: guestlinkd exited with status $rc"
exit "$rc"
