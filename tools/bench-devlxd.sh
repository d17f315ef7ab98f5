#!/bin/bash
# bench-devlxd: the devlxd figures of issue 4, each beside its baseline
# measured in the same run. Run as root (FUSE mount, pid namespaces).
# docs/benchmarks-devlxd.md explains every figure.
#
#   1. GET /1.0/config/user.foo over the devlxd socket, from inside a pid
#      namespace bound to the instance: 1 client keep-alive, a new
#      connection per request, 4 clients keep-alive; req/s, p50/p99 and
#      server CPU per request, beside tools/floor (a minimal epoll server
#      answering "bar") driven the same way.
#   2. The same with BENCH_INSTANCES instances registered (tools/glgen),
#      beside the 1-instance rates.
#   3. Event fan-out: one write of the key file on the host, BENCH_SUBS
#      WebSocket subscribers of the instance; time until the last one has
#      the event, p50/p99 over BENCH_CHANGES changes.
#   4. Daemon RSS with BENCH_IDLE idle connections (from 10 instances, under
#      the per-instance connection cap).
#
# Environment:
#   BUILD            build directory (default build)
#   BENCH_SECS       seconds per rate measurement (default 2)
#   BENCH_REPEAT     rounds per rate figure, the median run of each server kept (default 3)
#   BENCH_INSTANCES  instances for figure 2 (default 10000)
#   BENCH_SUBS       WebSocket subscribers for figure 3 (default 1000)
#   BENCH_CHANGES    changes for figure 3 (default 100)
#   BENCH_IDLE       idle connections for figure 4 (default 10000)
#   BENCH_DIR        where state dirs and mounts go (default /var/tmp)
#   BENCH_PIN        same (default): servers and clients on CPU 0; split:
#                    servers on CPU 0, clients on CPU 1; none: no pinning
#   BENCH_STRICT=1   exit 1 when a target is missed (default: report only)
set -uo pipefail

cd "$(dirname "$0")/.." || exit 1
BUILD=${BUILD:-build}
SECS=${BENCH_SECS:-2}
REPEAT=${BENCH_REPEAT:-3}
NINST=${BENCH_INSTANCES:-10000}
NSUBS=${BENCH_SUBS:-1000}
NCHANGES=${BENCH_CHANGES:-100}
NIDLE=${BENCH_IDLE:-10000}
BASE=${BENCH_DIR:-/var/tmp}
PIN=${BENCH_PIN:-same}
STRICT=${BENCH_STRICT:-0}

DAEMON=$BUILD/guestlinkd
LOADGEN=$BUILD/tools/loadgen
FLOOR=$BUILD/tools/floor
GLGEN=$BUILD/tools/glgen

die() {
	echo "bench-devlxd: $*" >&2
	exit 1
}

[ "$(id -u)" -eq 0 ] || die "run as root: FUSE mount and pid namespaces"
for b in "$DAEMON" "$LOADGEN" "$FLOOR" "$GLGEN"; do
	[ -x "$b" ] || die "$b is missing; run make first"
done
"$DAEMON" --help 2>&1 | grep -q -- --devlxd-socket ||
	die "$DAEMON has no --devlxd-socket option"
[ -e /dev/fuse ] || die "/dev/fuse is missing"

WORK=$(mktemp -d "$BASE/guestlink-bench-devlxd.XXXXXX") || die "cannot create a directory in $BASE"
# Sockets get a short directory of their own (sun_path is 108 bytes).
SOCKS=$(mktemp -d /tmp/gl-bench.XXXXXX) || die "cannot create a directory in /tmp"
LOG=$WORK/servers.log

# ---- processes and clean-up ------------------------------------------------

PIDS=()    # servers and helpers we started, stopped with SIGTERM
INITS=()   # container inits, stopped with SIGKILL
MOUNTS=()

stop_pid() {
	local pid=$1 i
	kill -TERM "$pid" 2>/dev/null || return 0
	for ((i = 0; i < 1000; i++)); do
		kill -0 "$pid" 2>/dev/null || break
		sleep 0.01
	done
	if kill -0 "$pid" 2>/dev/null; then
		echo "bench-devlxd: pid $pid ignored SIGTERM for 10 s; killing it" >&2
		kill -KILL "$pid" 2>/dev/null
	fi
	wait "$pid" 2>/dev/null
	return 0
}

forget() {
	local p keep=()
	for p in "${PIDS[@]}"; do
		[ "$p" = "$1" ] || keep+=("$p")
	done
	PIDS=("${keep[@]}")
}

# shellcheck disable=SC2317 # invoked by the trap
cleanup() {
	local pid m
	trap - EXIT INT TERM
	for pid in "${INITS[@]}"; do
		kill -KILL "$pid" 2>/dev/null
	done
	for pid in "${PIDS[@]}"; do
		stop_pid "$pid"
	done
	for m in "${MOUNTS[@]}"; do
		if mountpoint -q "$m" 2>/dev/null || ! stat "$m" >/dev/null 2>&1; then
			umount -l "$m" 2>/dev/null
		fi
	done
	if [ -s "$LOG" ] && [ "${KEEP_LOG:-0}" = 1 ]; then
		cp "$LOG" "$WORK.log" && echo "bench-devlxd: server log kept in $WORK.log" >&2
	fi
	rm -rf --one-file-system "$WORK" "$SOCKS"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Pinned to one CPU by default: on a VM a request that crosses CPUs costs
# mostly wake-up latency (IPIs, idle exits), the same for any server and
# different from run to run (11,000 to 130,000 req/s for the floor here,
# depending on where the scheduler put the client). On one CPU what is left
# is each server's own cost per request, which is what the targets compare.
NCPU=$(getconf _NPROCESSORS_ONLN)
case $PIN in
same)
	SERVER_CPU=0
	CLIENT_CPU=0
	;;
split)
	[ "$NCPU" -ge 2 ] || die "BENCH_PIN=split needs 2 CPUs"
	SERVER_CPU=0
	CLIENT_CPU=1
	;;
none)
	SERVER_CPU=
	CLIENT_CPU=
	;;
*) die "BENCH_PIN must be same, split or none" ;;
esac

pin() {
	[ -n "$SERVER_CPU" ] || return 0
	taskset -a -cp "$SERVER_CPU" "$1" >/dev/null || echo "bench-devlxd: cannot pin $1" >&2
}

wait_socket() {
	local i
	for ((i = 0; i < 1000; i++)); do
		[ -S "$1" ] && return 0
		sleep 0.01
	done
	return 1
}

# start_daemon STATE MNT SOCK: sets DPID.
start_daemon() {
	local i
	mkdir -p "$1" "$2"
	MOUNTS+=("$2")
	"$DAEMON" --state-dir "$1" --mount "$2" --devlxd-socket "$3" >>"$LOG" 2>&1 &
	DPID=$!
	PIDS+=("$DPID")
	for ((i = 0; i < 6000; i++)); do
		mountpoint -q "$2" && [ -S "$3" ] && break
		kill -0 "$DPID" 2>/dev/null || {
			KEEP_LOG=1
			die "guestlinkd exited at start (log: $WORK.log)"
		}
		sleep 0.01
	done
	if ! mountpoint -q "$2" || [ ! -S "$3" ]; then
		KEEP_LOG=1
		die "guestlinkd did not come up within 60 s (log: $WORK.log)"
	fi
	pin "$DPID"
}

stop_daemon() {
	stop_pid "$1"
	forget "$1"
	if mountpoint -q "$2"; then
		echo "bench-devlxd: $2 still mounted after the daemon stopped" >&2
		umount -l "$2"
	fi
}

# container: a process in a new pid namespace; sets CT to its host pid.
container() {
	local u i kids=
	unshare --pid --fork --mount-proc sleep infinity </dev/null >/dev/null 2>&1 &
	u=$!
	for ((i = 0; i < 500; i++)); do
		kids=$(cat "/proc/$u/task/$u/children" 2>/dev/null)
		[ -n "$kids" ] && break
		sleep 0.01
	done
	[ -n "$kids" ] || die "unshare did not start its init"
	CT=${kids%% *}
	INITS+=("$CT")
}

# value KEY LINE: the value of KEY=... in one of loadgen's result lines.
value() {
	local kv
	for kv in $2; do
		case $kv in "$1"=*)
			echo "${kv#*=}"
			return 0
			;;
		esac
	done
	return 1
}

FAILED=0

# lg CT ARGS...: one loadgen run inside CT's pid namespace (on the client
# CPU); sets OUT and RATE (empty on failure).
lg() {
	local ct=$1
	shift
	local pre=(nsenter -t "$ct" -p --)
	[ -n "$CLIENT_CPU" ] && pre+=(taskset -c "$CLIENT_CPU")
	OUT=$("${pre[@]}" "$LOADGEN" "$@" 2>>"$LOG")
	echo "  $OUT" >&2
	RATE=$(value rate "$OUT")
	if ! value errors "$OUT" | grep -qx 0; then
		FAILED=$((FAILED + 1))
		KEEP_LOG=1
		echo "bench-devlxd: loadgen $* failed (log: $WORK.log)" >&2
		RATE=
	fi
}

calc() {
	awk "BEGIN { printf \"%s\", $1 }" </dev/null
}

commas() {
	printf "%.0f" "$1" | sed ':a;s/\B[0-9]\{3\}\>/,&/;ta'
}

ROWS=()
MET=0
MISSED=0

row() {
	ROWS+=("$(printf '%-42s %-22s %-30s %-6s %-8s %s' "$@")")
}

verdict() {
	if [ "$(calc "($1 $2 $3) ? 1 : 0")" = 1 ]; then
		MET=$((MET + 1))
		V=OK
	else
		MISSED=$((MISSED + 1))
		V=MISSED
	fi
}

# ratio_row NAME GL BASE BASELABEL TARGET
ratio_row() {
	local pct
	if [ -z "$2" ] || [ -z "$3" ]; then
		row "$1" "${2:-failed}" "$4 ${3:-failed}" "" ">= $5%" "NOT MEASURED"
		MISSED=$((MISSED + 1))
		return
	fi
	pct=$(calc "100 * $2 / $3")
	verdict "$pct" ">=" "$5"
	row "$1" "$(commas "$2") req/s" "$4 $(commas "$3") req/s" "$(printf %.0f "$pct")%" \
		">= $5%" "$V"
}

# lat_row GLP50 GLP99 GLCPU FLP50 FLP99 FLCPU
lat_row() {
	row "  p50 / p99 latency" "$(printf '%.0f / %.0f us' "${1:-0}" "${2:-0}")" \
		"floor $(printf '%.0f / %.0f us' "${4:-0}" "${5:-0}")" "" "" ""
	row "  server CPU per request" "$(printf '%.1f us' "${3:-0}")" \
		"floor $(printf '%.1f us' "${6:-0}")" "" "" ""
}

load=$(cut -d' ' -f1 /proc/loadavg)
if [ "$(calc "($load > 0.5) ? 1 : 0")" = 1 ]; then
	echo "bench-devlxd: warning: load average $load at the start: the figures will be noisy" >&2
fi
where=
[ -n "$SERVER_CPU" ] && where=" (servers on CPU $SERVER_CPU, clients on CPU $CLIENT_CPU)"
echo "guestlink devlxd bench: $(date -u +%Y-%m-%dT%H:%MZ), $NCPU CPUs, $(uname -r)," \
	"$SECS s per rate, median of $REPEAT, pinning: $PIN$where" >&2

REQ=(--path /1.0/config/user.foo --expect-body bar --duration "$SECS")

# versus A B ARGS...: REPEAT rounds of one loadgen run against server A
# then one against server B (A and B: "CT SOCKET PID LABEL", both up), so
# that drift during the run (builds, other guests of the VM host) hits both
# alike; each side reports its median run (by rate). Sets A_RATE A_P50
# A_P99 A_CPU and the same for B (A_RATE/B_RATE empty on failure).
versus() {
	local a=$1 b=$2 i side ct sock pid label line n
	local -a runs_A=() runs_B=()
	shift 2
	for ((i = 0; i < REPEAT; i++)); do
		for side in A B; do
			if [ "$side" = A ]; then
				read -r ct sock pid label <<<"$a"
			else
				read -r ct sock pid label <<<"$b"
			fi
			lg "$ct" --socket "$sock" "$@" --server-pid "$pid" --label "$label"
			[ -n "$RATE" ] || continue
			if [ "$side" = A ]; then
				runs_A+=("$RATE $OUT")
			else
				runs_B+=("$RATE $OUT")
			fi
		done
	done
	for side in A B; do
		if [ "$side" = A ]; then
			n=${#runs_A[@]}
			line=$(printf '%s\n' "${runs_A[@]}" | sort -g | sed -n "$(((n + 1) / 2))p")
		else
			n=${#runs_B[@]}
			line=$(printf '%s\n' "${runs_B[@]}" | sort -g | sed -n "$(((n + 1) / 2))p")
		fi
		if [ "$n" -ne "$REPEAT" ]; then
			line=
		fi
		printf -v "${side}_RATE" %s "$(value rate "$line")"
		printf -v "${side}_P50" %s "$(value p50_us "$line")"
		printf -v "${side}_P99" %s "$(value p99_us "$line")"
		printf -v "${side}_CPU" %s "$(value srv_cpu_us_per_req "$line")"
	done
}

container
CT1=$CT

# ---- 1. one instance, beside the floor ------------------------------------------

"$FLOOR" --socket "$SOCKS/floor.sock" >>"$LOG" 2>&1 &
FLOOR_PID=$!
PIDS+=("$FLOOR_PID")
wait_socket "$SOCKS/floor.sock" || die "floor did not start"
pin "$FLOOR_PID"

ST1=$WORK/state1
MNT1=$WORK/mnt1
S1=$SOCKS/one.sock
start_daemon "$ST1" "$MNT1" "$S1"
D1=$DPID
mkdir "$MNT1/c1" || die "cannot create c1"
echo bar >"$MNT1/c1/config/user.foo" || die "cannot set c1 user.foo"
echo "$CT1" >"$MNT1/c1/init-pid" || die "cannot bind c1"

GL1="$CT1 $S1 $D1 devlxd"
FL="$CT1 $SOCKS/floor.sock $FLOOR_PID floor"
for mode in ka close four; do
	case $mode in
	ka)
		name="GET user.foo, 1 client, keep-alive" target=70 args=()
		;;
	close)
		name="GET user.foo, connection per request" target=60 args=(--close)
		;;
	four)
		name="GET user.foo, 4 clients, keep-alive" target=70 args=(--clients 4)
		;;
	esac
	echo "$name:" >&2
	versus "$GL1" "$FL" "${REQ[@]}" "${args[@]}"
	ratio_row "$name" "$A_RATE" "$B_RATE" floor "$target"
	lat_row "$A_P50" "$A_P99" "$A_CPU" "$B_P50" "$B_P99" "$B_CPU"
done
stop_pid "$FLOOR_PID"
forget "$FLOOR_PID"

# ---- 3. event fan-out (on the 1-instance daemon) -----------------------------------

echo "fan-out, $NSUBS WebSocket subscribers, $NCHANGES changes:" >&2
pre=(nsenter -t "$CT1" -p --)
[ -n "$CLIENT_CPU" ] && pre+=(taskset -c "$CLIENT_CPU")
OUT=$("${pre[@]}" "$LOADGEN" --socket "$S1" --ws-fanout "$NSUBS" --changes "$NCHANGES" \
	--trigger "$MNT1/c1/config/user.foo" --label fanout 2>>"$LOG")
echo "  $OUT" >&2
if value errors "$OUT" | grep -qx 0; then
	row "event fan-out to $NSUBS WebSocket subs" \
		"$(printf 'p50 %.1f / p99 %.1f ms' "$(value p50_ms "$OUT")" "$(value p99_ms "$OUT")")" \
		"write+close alone p50 $(printf %.1f "$(value write_p50_ms "$OUT")") ms" "" "" ""
else
	FAILED=$((FAILED + 1))
	KEEP_LOG=1
	row "event fan-out to $NSUBS WebSocket subs" "failed" "" "" "" ""
fi
echo bar >"$MNT1/c1/config/user.foo" || die "cannot reset c1 user.foo"

# ---- 2. many instances, beside one ------------------------------------------------------

BIG=$WORK/big
BIGMNT=$WORK/bigmnt
SB=$SOCKS/big.sock
echo "$NINST instances:" >&2
if ! out=$("$GLGEN" --no-events "$BIG" "$NINST" 1 2>>"$LOG"); then
	KEEP_LOG=1
	die "glgen failed (log: $WORK.log)"
fi
echo "  $out" >&2
start_daemon "$BIG" "$BIGMNT" "$SB"
DB=$DPID
echo bar >"$BIGMNT/i00000/config/user.foo" || die "cannot set i00000 user.foo"
container
CTB=$CT
echo "$CTB" >"$BIGMNT/i00000/init-pid" || die "cannot bind i00000"

GLB="$CTB $SB $DB devlxd-$NINST"
for mode in ka close four; do
	case $mode in
	ka) name="$NINST instances, 1 client, keep-alive" args=() ;;
	close) name="$NINST instances, conn. per request" args=(--close) ;;
	four) name="$NINST instances, 4 clients" args=(--clients 4) ;;
	esac
	echo "$name:" >&2
	versus "$GLB" "$GL1" "${REQ[@]}" "${args[@]}"
	ratio_row "$name" "$A_RATE" "$B_RATE" "1 instance" 95
done
stop_daemon "$D1" "$MNT1"

# ---- 4. RSS with idle connections ----------------------------------------------------------

# From 10 instances, NIDLE/10 each: under the default cap of 1024
# connections per instance. Each loadgen holds its connections for HOLD
# seconds, then reports how many the daemon left open.
rss0=$(awk '/^VmRSS:/ { print $2 }' "/proc/$DB/status")
per=$(((NIDLE + 9) / 10))
HOLD=6
IDLE_PIDS=()
IDLE_OUT=()
for i in 0 1 2 3 4 5 6 7 8 9; do
	name=$(printf 'i%05d' "$i")
	if [ "$i" -eq 0 ]; then
		ct=$CTB
	else
		container
		ct=$CT
		echo "$ct" >"$BIGMNT/$name/init-pid" || die "cannot bind $name"
	fi
	f=$WORK/idle.$i
	IDLE_OUT+=("$f")
	nsenter -t "$ct" -p -- "$LOADGEN" --socket "$SB" --idle "$per" --hold "$HOLD" \
		--label "idle$i" >"$f" 2>>"$LOG" &
	IDLE_PIDS+=($!)
	PIDS+=($!)
done
opened=0
for f in "${IDLE_OUT[@]}"; do
	for ((j = 0; j < 3000; j++)); do
		grep -q 'mode=idle open=' "$f" 2>/dev/null && break
		sleep 0.01
	done
	n=$(value open "$(head -1 "$f")") || n=0
	opened=$((opened + n))
done
sleep 1
rss1=$(awk '/^VmRSS:/ { print $2 }' "/proc/$DB/status")
for p in "${IDLE_PIDS[@]}"; do
	wait "$p" 2>/dev/null
	forget "$p"
done
still=0
for f in "${IDLE_OUT[@]}"; do
	n=$(value still_open "$(tail -1 "$f")") || n=0
	still=$((still + n))
done
echo "  idle: opened $opened, still open at the end $still; VmRSS $rss0 -> $rss1 KiB" >&2
if [ "$opened" -gt 0 ]; then
	row "daemon RSS, $opened idle connections" "$(printf %.1f "$(calc "$rss1 / 1024")") MiB" \
		"before: $(printf %.1f "$(calc "$rss0 / 1024")") MiB" \
		"" "" "$(printf '%.1f KiB/conn' "$(calc "($rss1 - $rss0) / $opened")")"
fi
[ "$still" -eq "$opened" ] || {
	echo "bench-devlxd: the daemon closed $((opened - still)) idle connections" >&2
}
stop_daemon "$DB" "$BIGMNT"

# ---- the table ------------------------------------------------------------------------

echo
printf '%-42s %-22s %-30s %-6s %-8s %s\n' figure guestlink baseline ratio target verdict
printf '%s\n' "${ROWS[@]}"
echo
echo "$MET targets met, $MISSED missed, $FAILED measurements failed ($NCPU CPUs, $SECS s per rate," \
	"pinning: $PIN)"
if [ "$FAILED" -gt 0 ]; then
	exit 1
fi
if [ "$STRICT" = 1 ] && [ "$MISSED" -gt 0 ]; then
	exit 1
fi
exit 0
