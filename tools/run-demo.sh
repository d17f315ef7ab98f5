#!/bin/bash
# What `make run` starts after deps + build: guestlinkd on ./state, mounted
# on ./mnt, with an instance "demo". Ctrl-C stops it (clean unmount).
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
setsid "$DAEMON" --state-dir "$STATE" --mount "$MNT" "${extra[@]}" &
pid=$!

# shellcheck disable=SC2317 # invoked by the trap
stop() {
	trap - INT TERM
	echo
	echo "run-demo: stopping guestlinkd (pid $pid)"
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

m=$(realpath "$MNT")
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

Press Ctrl-C here to stop the daemon (it unmounts $m).
MSG

rc=0
wait "$pid" || rc=$?
# wait returns early (status > 128) when a trapped signal arrives; the trap
# handler exits. Reaching here means the daemon ended on its own.
echo "run-demo: guestlinkd exited with status $rc"
exit "$rc"
