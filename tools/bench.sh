#!/bin/bash
# make bench: guestlinkd's figures, each beside its baseline measured in the
# same run, with the targets of issue 3. Run as root. docs/benchmarks.md
# explains every figure.
#
# Environment:
#   BUILD            build directory (default build)
#   BENCH_SECS       seconds per round of a measurement (default 1)
#   BENCH_ROUNDS     rounds per figure (default 5): a figure and its baselines
#                    run in turn, round after round, and each reports the median
#   BENCH_INSTANCES  instances for the start-up figures (default 10000)
#   BENCH_KEYS       user keys per instance (default 20)
#   BENCH_DIR        where the state dirs and mount points go; must be a disk
#                    file system, as fdatasync means nothing on tmpfs
#                    (default /var/tmp)
#   BENCH_PERF=DIR   afterwards, repeat the cat and 1-writer runs under
#                    `perf record -g` of guestlinkd, data in DIR
#   BENCH_STRICT=1   exit 1 when a target is missed (default: report only)
set -uo pipefail

cd "$(dirname "$0")/.." || exit 1
BUILD=${BUILD:-build}
SECS=${BENCH_SECS:-1}
ROUNDS=${BENCH_ROUNDS:-5}
NINST=${BENCH_INSTANCES:-10000}
NKEYS=${BENCH_KEYS:-20}
BASE=${BENCH_DIR:-/var/tmp}
PERF_DIR=${BENCH_PERF:-}
STRICT=${BENCH_STRICT:-0}

DAEMON=$BUILD/guestlinkd
FSBENCH=$BUILD/tools/fsbench
MINFS=$BUILD/tools/minfs
GLGEN=$BUILD/tools/glgen
# guestlinkd's mount options, so that minfs pays the same permission checks.
MOUNT_OPTS=default_permissions,allow_other

die() {
	echo "bench: $*" >&2
	exit 1
}

[ "$(id -u)" -eq 0 ] || die "run as root: FUSE mounts (sudo make bench)"
for b in "$DAEMON" "$FSBENCH" "$MINFS" "$GLGEN"; do
	[ -x "$b" ] || die "$b is missing; run make first"
done
[ -e /dev/fuse ] || die "/dev/fuse is missing"
case $SECS$ROUNDS$NINST$NKEYS in
*[!0-9.]*) die "BENCH_SECS, BENCH_ROUNDS, BENCH_INSTANCES, BENCH_KEYS must be numbers" ;;
esac

WORK=$(mktemp -d "$BASE/guestlink-bench.XXXXXX") || die "cannot create a directory in $BASE"
LOG=$WORK/daemon.log
case $WORK in
*[[:space:]]*)
	rmdir "$WORK"
	die "BENCH_DIR must not contain blanks"
	;;
esac
case $(stat -f -c %T "$WORK") in
tmpfs | ramfs) echo "bench: warning: $WORK is on $(stat -f -c %T "$WORK"): fdatasync" \
	"is free there, the durable-write figures mean nothing" >&2 ;;
esac

# ---- processes and clean-up ------------------------------------------------

PIDS=()
MOUNTS=()

# The process has not exited. Servers started by `fsbench spawn` are not
# our children: once they exit they stay zombies until init reaps them,
# which can take a second, so a zombie counts as gone.
alive() {
	local st
	st=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
	st=${st##*) }
	[ "${st%% *}" != Z ]
}

# Stop one process that `fsbench spawn` left running (not our child, so
# no `wait`): SIGTERM, up to 10 s, then SIGKILL.
stop_pid() {
	local pid=$1 i
	alive "$pid" || return 0
	kill -TERM "$pid" 2>/dev/null || return 0
	for ((i = 0; i < 2000; i++)); do
		alive "$pid" || return 0
		sleep 0.005
	done
	echo "bench: pid $pid ignored SIGTERM for 10 s; killing it" >&2
	kill -KILL "$pid" 2>/dev/null
}

# Forget a stopped pid, so that the exit trap never signals a reused one.
forget_pid() {
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
	for pid in "${PIDS[@]}"; do
		stop_pid "$pid"
	done
	for m in "${MOUNTS[@]}"; do
		if mountpoint -q "$m" 2>/dev/null || ! stat "$m" >/dev/null 2>&1; then
			umount -l "$m" 2>/dev/null
		fi
	done
	if [ -s "$LOG" ] && [ "${KEEP_LOG:-0}" = 1 ]; then
		cp "$LOG" "$WORK.log" && echo "bench: log of the servers kept in $WORK.log" >&2
	fi
	rm -rf --one-file-system "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# value KEY LINE: the value of KEY=... in one of fsbench's result lines.
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

# spawn MNT CMD...: start a file system server, wait for its mount; sets
# SPAWN_PID and SPAWN_SECS.
spawn() {
	local mnt=$1 out
	shift
	MOUNTS+=("$mnt")
	out=$("$FSBENCH" spawn "$mnt" 120 "$@" 2>>"$LOG")
	SPAWN_PID=$(value pid "$out") || SPAWN_PID=
	SPAWN_SECS=$(value secs "$out") || SPAWN_SECS=
	[ -n "$SPAWN_PID" ] && PIDS+=("$SPAWN_PID")
	if [ -z "$SPAWN_SECS" ] || [ "$SPAWN_SECS" = timeout ]; then
		KEEP_LOG=1
		die "$1 did not mount $mnt (log: $WORK.log)"
	fi
}

# Stop a daemon and check that it left no mount behind.
stop_daemon() {
	local pid=$1 mnt=$2
	stop_pid "$pid"
	forget_pid "$pid"
	if mountpoint -q "$mnt"; then
		echo "bench: $mnt still mounted after the daemon stopped" >&2
		umount -l "$mnt"
	fi
}

# pin PID CPUS: move every thread of PID onto CPUS (threads it creates later
# inherit the mask of their creator).
ALL_CPUS=0-$(($(getconf _NPROCESSORS_ONLN) - 1))
pin() {
	taskset -a -cp "$2" "$1" >/dev/null || echo "bench: cannot pin $1 to CPU $2" >&2
}

vmrss_kib() {
	awk '/^VmRSS:/ { print $2 }' "/proc/$1/status"
}

# Drop the page cache, so that the next start reads its database from disk
# as after a boot. Sets CACHE to what happened.
drop_caches() {
	sync
	if echo 3 2>/dev/null >/proc/sys/vm/drop_caches; then
		CACHE=cold
	else
		CACHE="cache not dropped"
	fi
}

# ---- arithmetic and the table ----------------------------------------------

calc() {
	awk "BEGIN { printf \"%s\", $1 }" </dev/null
}

# 1234567.8 -> 1,234,568
commas() {
	printf "%.0f" "$1" | sed ':a;s/\B[0-9]\{3\}\>/,&/;ta'
}

ms_since() {
	calc "($EPOCHREALTIME - $1) * 1000"
}

ROWS=()
MET=0
MISSED=0
FAILED=0

# row FIGURE GUESTLINK BASELINE RATIO TARGET VERDICT
row() {
	ROWS+=("$(printf '%-40s %-16s %-29s %-6s %-9s %s' "$@")")
}

# verdict VALUE OP LIMIT: sets V to OK or MISSED, and counts it. (Globals,
# not $(...): a subshell would lose the counts.)
verdict() {
	if [ "$(calc "($1 $2 $3) ? 1 : 0")" = 1 ]; then
		MET=$((MET + 1))
		V=OK
	else
		MISSED=$((MISSED + 1))
		V=MISSED
	fi
}

# run ARGS...: one fsbench run (on CPU $CLIENT_CPU if set); sets RATE,
# empty on failure.
CLIENT_CPU=
run() {
	local out
	if [ -n "$CLIENT_CPU" ]; then
		out=$(taskset -c "$CLIENT_CPU" "$FSBENCH" "$@" 2>>"$LOG")
	else
		out=$("$FSBENCH" "$@" 2>>"$LOG")
	fi
	echo "  $out" >&2
	RATE=$(value rate "$out")
	BUSY=$(value cpu_busy "$out") || BUSY=
	if ! value errors "$out" | grep -qx 0; then
		FAILED=$((FAILED + 1))
		RATE=
		KEEP_LOG=1
		echo "bench: fsbench $* failed (log: $WORK.log)" >&2
	fi
}

# median RATE...: the median, or nothing if a round failed ("-").
median() {
	case " $* " in *" - "*) return 0 ;; esac
	printf '%s\n' "$@" | sort -g | sed -n "$((($# + 1) / 2))p"
}

# measure VAR "FSBENCH ARGS" [VAR "ARGS"]...: after a warm-up, BENCH_ROUNDS
# rounds in which every command runs once for BENCH_SECS in turn; each VAR
# gets its median rate, and VAR_cpu the median of how busy the CPUs were
# (writers only). Taking turns spreads any disturbance (other load, a slow disk
# moment) over all of them instead of one.
measure() {
	local -a names=() cmds=() rates=() busys=()
	local i r
	while [ $# -ge 2 ]; do
		names+=("$1")
		cmds+=("$2")
		shift 2
	done
	# A short unmeasured run of each first: the first second of a fresh
	# mount, or of threads just moved to another CPU, is slower.
	for i in "${!names[@]}"; do
		# shellcheck disable=SC2086
		taskset -c "${CLIENT_CPU:-$ALL_CPUS}" "$FSBENCH" ${cmds[i]} 0.3 >/dev/null 2>>"$LOG"
	done
	for ((r = 0; r < ROUNDS; r++)); do
		for i in "${!names[@]}"; do
			# shellcheck disable=SC2086 # split on purpose: paths hold no blanks
			run ${cmds[i]} "$SECS"
			rates[i]="${rates[i]:-} ${RATE:--}"
			busys[i]="${busys[i]:-} ${BUSY:--}"
		done
	done
	for i in "${!names[@]}"; do
		# shellcheck disable=SC2086
		printf -v "${names[i]}" '%s' "$(median ${rates[i]})"
		# shellcheck disable=SC2086
		printf -v "${names[i]}_cpu" '%s' "$(median ${busys[i]})"
	done
}

# ratio_row NAME GL BASE LABEL [TARGET%]: GL beside BASE, and with a
# TARGET a verdict.
ratio_row() {
	local pct
	if [ -z "$2" ] || [ -z "$3" ]; then
		if [ -n "${5:-}" ]; then
			row "$1" "${2:-failed}" "$4 ${3:-failed}" "" ">= $5%" "NOT MEASURED"
		else
			row "$1" "${2:-failed}" "$4 ${3:-failed}" "" "" ""
		fi
		return
	fi
	pct=$(calc "100 * $2 / $3")
	if [ -n "${5:-}" ]; then
		verdict "$pct" ">=" "$5"
		row "$1" "$(commas "$2") ops/s" "$4 $(commas "$3") ops/s" "$(printf %.0f "$pct")%" \
			">= $5%" "$V"
	else
		row "$1" "$(commas "$2") ops/s" "$4 $(commas "$3") ops/s" "$(printf %.0f "$pct")%" "" ""
	fi
}

read -r load1 _ </proc/loadavg
echo "guestlink bench: $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) CPUs, $(uname -r)," \
	"$ROUNDS x $SECS s per figure, in $WORK ($(stat -f -c %T "$WORK")), load $load1" >&2
if [ "$(calc "($load1 > 0.5) ? 1 : 0")" = 1 ]; then
	echo "bench: warning: the machine is busy (load $load1); the figures will be noisy" >&2
fi

# Every daemon of the run serves devlxd on a socket of its own, never on the
# system's default path.
DAEMON_OPTS=()
if "$DAEMON" --help 2>/dev/null | grep -q -- --devlxd-socket; then
	DAEMON_OPTS=(--devlxd-socket)
fi
# Nor on the system's control socket, nor AF_VSOCK: two of them run at once.
EXTRA_OPTS=()
if "$DAEMON" --help 2>/dev/null | grep -q -- --control-socket; then
	EXTRA_OPTS+=(--control-socket none)
fi
if "$DAEMON" --help 2>/dev/null | grep -q -- --af-vsock; then
	EXTRA_OPTS+=(--af-vsock off)
fi
# start_daemon STATE MNT: spawn guestlinkd.
start_daemon() {
	local sock=()
	[ ${#DAEMON_OPTS[@]} -gt 0 ] && sock=("${DAEMON_OPTS[@]}" "$1.sock")
	spawn "$2" "$DAEMON" --state-dir "$1" --mount "$2" "${sock[@]}" "${EXTRA_OPTS[@]}"
}

# ---- 1. cat and stat -------------------------------------------------------

GL_STATE=$WORK/state
GL_MNT=$WORK/gl
mkdir -p "$GL_STATE"
start_daemon "$GL_STATE" "$GL_MNT"
GL_PID=$SPAWN_PID
mkdir "$GL_MNT/c1" || die "mkdir $GL_MNT/c1 failed"
echo bar >"$GL_MNT/c1/config/user.foo" || die "echo bar > user.foo failed"
[ "$(cat "$GL_MNT/c1/config/user.foo")" = bar ] || die "user.foo does not read back"
GL_FILE=$GL_MNT/c1/config/user.foo

# The headline baseline: guestlink's mode for live files (direct_io,
# attr_timeout 0, entry_timeout 1 s, same depth, same mount options, and
# noflush as guestlinkd sets it on read-only opens).
mkdir -p "$WORK/min" "$WORK/minnp" "$WORK/minc"
spawn "$WORK/min" "$MINFS" --direct-io --noflush --entry-timeout 1 --attr-timeout 0 \
	--depth 3 -o "$MOUNT_OPTS" "$WORK/min"
MIN_PID=$SPAWN_PID
# Context: the same without default_permissions (no permission GETATTRs),
# and libfuse's default caching (page cache, 1 s timeouts).
spawn "$WORK/minnp" "$MINFS" --direct-io --noflush --entry-timeout 1 --attr-timeout 0 \
	--depth 3 -o allow_other "$WORK/minnp"
MINNP_PID=$SPAWN_PID
spawn "$WORK/minc" "$MINFS" --depth 3 -o "$MOUNT_OPTS" "$WORK/minc"
MINC_PID=$SPAWN_PID
SERVERS=("$GL_PID" "$MIN_PID" "$MINNP_PID" "$MINC_PID")
gl="" mh="" mp="" mc="" # set by measure

# Pinned: every server thread and the client on CPU 0. On a VM a FUSE
# round trip between two CPUs costs mostly wake-up latency (IPIs, idle
# exits), the same for any server, and varies from run to run; on one CPU
# what is left is each server's own CPU cost per request, which is what the
# target is about, and it is stable. That is the headline. The unpinned
# figures (as a user runs it) follow as context.
for op in read stat; do
	if [ "$op" = read ]; then
		name="cat user.foo (open+read+close)"
	else
		name="stat user.foo"
	fi
	echo "$op, pinned to CPU 0 (guestlink, minfs, minfs w/o default_permissions," \
		"minfs cached):" >&2
	for pid in "${SERVERS[@]}"; do
		pin "$pid" 0
	done
	CLIENT_CPU=0
	measure gl "$op $GL_FILE" mh "$op $WORK/min/a/b/file" mp "$op $WORK/minnp/a/b/file" \
		mc "$op $WORK/minc/a/b/file"
	ratio_row "$name, 1 CPU" "$gl" "$mh" minfs 80
	ratio_row "  context: minfs w/o default_perm." "$gl" "$mp" minfs
	ratio_row "  context: minfs default caching" "$gl" "$mc" minfs

	echo "$op, unpinned (guestlink, minfs):" >&2
	for pid in "${SERVERS[@]}"; do
		pin "$pid" "$ALL_CPUS"
	done
	CLIENT_CPU=
	measure gl "$op $GL_FILE" mh "$op $WORK/min/a/b/file"
	ratio_row "$name, unpinned" "$gl" "$mh" minfs
done

# ---- 2. durable writes -----------------------------------------------------

RAW=$WORK/raw # same file system as the state dir
mkdir -p "$RAW"
# Context for the 8-writer figure: the same daemon with its state dir on
# tmpfs, where fdatasync is free. What it reaches with 8 writers is the
# ceiling that the FUSE round trips alone leave on this machine's CPUs.
TMPFS=$WORK/tmpfs
mkdir -p "$TMPFS"
MOUNTS+=("$TMPFS")
TMP_PID=
if mount -t tmpfs -o size=256m guestlink-bench "$TMPFS"; then
	mkdir -p "$TMPFS/state"
	start_daemon "$TMPFS/state" "$WORK/gltmp"
	TMP_PID=$SPAWN_PID
	mkdir "$WORK/gltmp/c1" || die "mkdir $WORK/gltmp/c1 failed"
else
	echo "bench: cannot mount a tmpfs: no tmpfs context row" >&2
fi
w1="" r1="" w8="" r8="" w8t="" w16=""
w1_cpu="" w8_cpu="" w8t_cpu=""
echo "write, 1 writer (guestlink, raw fdatasync):" >&2
measure w1 "write $GL_MNT/c1/config 1" r1 "fsync $RAW 1"
echo "write, 8 writers (guestlink, raw fdatasync, guestlink on tmpfs, guestlink 16 writers):" >&2
if [ -n "$TMP_PID" ]; then
	measure w8 "write $GL_MNT/c1/config 8" r8 "fsync $RAW 8" w8t "write $WORK/gltmp/c1/config 8" \
		w16 "write $GL_MNT/c1/config 16"
else
	measure w8 "write $GL_MNT/c1/config 8" r8 "fsync $RAW 8" w16 "write $GL_MNT/c1/config 16"
fi
if [ -n "$w1" ] && [ -n "$r1" ]; then
	pct=$(calc "100 * $w1 / $r1")
	verdict "$pct" ">=" 60
	row "durable write, 1 writer" "$(commas "$w1") ops/s" "raw fdatasync $(commas "$r1") ops/s" \
		"$(printf %.0f "$pct")%" ">= 60%" "$V"
else
	row "durable write, 1 writer" "${w1:-failed}" "raw ${r1:-failed}" "" ">= 60%" "NOT MEASURED"
fi
if [ -n "$w8" ] && [ -n "$w1" ]; then
	x=$(calc "$w8 / $w1")
	verdict "$x" ">=" 4
	row "durable writes, 8 writers" "$(commas "$w8") ops/s" "1 writer $(commas "$w1") ops/s" \
		"$(printf %.1fx "$x")" ">= 4x" "$V"
else
	row "durable writes, 8 writers" "${w8:-failed}" "1 writer ${w1:-failed}" "" ">= 4x" \
		"NOT MEASURED"
fi
ratio_row "  context: raw fdatasync, 8 files" "$w8" "$r8" raw
# xrow LABEL RATE: a rate beside the 1-writer rate, as a multiple.
xrow() {
	if [ -n "$2" ] && [ -n "$w1" ]; then
		row "$1" "$(commas "$2") ops/s" "1 writer $(commas "$w1") ops/s" \
			"$(printf %.1fx "$(calc "$2 / $w1")")" "" ""
	fi
}
xrow "  context: 16 writers" "$w16"
xrow "  context: 8 writers, state on tmpfs" "$w8t"
if [ -n "$w1_cpu" ] && [ -n "$w8_cpu" ]; then
	row "  context: CPUs busy, 1 / 8 writers" "${w1_cpu}% / ${w8_cpu}%" \
		"tmpfs, 8 writers: ${w8t_cpu:-?}%" "" "" ""
fi
if [ -n "$TMP_PID" ]; then
	stop_daemon "$TMP_PID" "$WORK/gltmp"
	umount "$TMPFS"
fi

if [ -n "$PERF_DIR" ]; then
	mkdir -p "$PERF_DIR"
	echo "perf: recording guestlinkd (pid $GL_PID) into $PERF_DIR" >&2
	perf record -q -g -p "$GL_PID" -o "$PERF_DIR/read.data" -- \
		"$FSBENCH" read "$GL_FILE" 3 >&2 2>>"$LOG"
	perf record -q -g -p "$GL_PID" -o "$PERF_DIR/write1.data" -- \
		"$FSBENCH" write "$GL_MNT/c1/config" 1 3 >&2 2>>"$LOG"
fi

stop_daemon "$GL_PID" "$GL_MNT"
for pid in "$MIN_PID" "$MINNP_PID" "$MINC_PID"; do
	stop_pid "$pid"
	forget_pid "$pid"
done

# ---- 3. many instances -----------------------------------------------------

BIG_STATE=$WORK/big
BIG_MNT=$WORK/bigmnt
label="$NINST x $NKEYS keys"
echo "start-up with $NINST instances x $NKEYS keys:" >&2
if ! out=$("$GLGEN" "$BIG_STATE" "$NINST" "$NKEYS" 2>>"$LOG"); then
	KEEP_LOG=1
	die "glgen failed (log: $WORK.log)"
fi
echo "  $out, database $(du -sm "$BIG_STATE" | cut -f1) MiB" >&2
drop_caches

start_daemon "$BIG_STATE" "$BIG_MNT"
BIG_PID=$SPAWN_PID
startup_ms=$(calc "$SPAWN_SECS * 1000")
rss=$(vmrss_kib "$BIG_PID")
t=$EPOCHREALTIME
# shellcheck disable=SC2012 # ls itself is what is measured
nls=$(ls "$BIG_MNT" | wc -l)
ls_ms=$(ms_since "$t")
t=$EPOCHREALTIME
ls "$BIG_MNT" >/dev/null
ls2_ms=$(ms_since "$t")
t=$EPOCHREALTIME
# shellcheck disable=SC2012
nll=$(ls -l "$BIG_MNT" | wc -l)
ll_ms=$(ms_since "$t")
rss2=$(vmrss_kib "$BIG_PID")
t=$EPOCHREALTIME
stop_daemon "$BIG_PID" "$BIG_MNT"
down_ms=$(ms_since "$t")
# The same start again, with the database in the page cache.
start_daemon "$BIG_STATE" "$BIG_MNT"
warm_ms=$(calc "$SPAWN_SECS * 1000")
stop_daemon "$SPAWN_PID" "$BIG_MNT"
echo "  startup=${startup_ms} ms ($CACHE) rss=${rss} KiB ls=${ls_ms} ms (${nls} names)" \
	"ls-again=${ls2_ms} ms ls-l=${ll_ms} ms (${nll} lines) rss-after-ls-l=${rss2} KiB" \
	"shutdown=${down_ms} ms startup-again=${warm_ms} ms" >&2

if [ "$nls" -ne $((NINST + 1)) ]; then
	echo "bench: ls listed $nls names, expected $((NINST + 1)) (instances + events)" >&2
	FAILED=$((FAILED + 1))
fi
row "start-up, $label" "$(printf %.0f "$startup_ms") ms" "start -> mount ready, $CACHE" \
	"" "" ""
row "  start-up again" "$(printf %.0f "$warm_ms") ms" "database in page cache" "" "" ""
rss_mib=$(calc "$rss / 1024")
verdict "$rss_mib" "<" 64
row "daemon RSS after start" "$(printf %.1f "$rss_mib") MiB" "VmRSS" "" "< 64 MiB" "$V"
row "  after ls -l" "$(printf %.1f "$(calc "$rss2 / 1024")") MiB" "VmRSS" "" "" ""
row "ls MNT (first)" "$(printf %.0f "$ls_ms") ms" "$nls names" "" "" ""
row "ls MNT (again)" "$(printf %.0f "$ls2_ms") ms" "" "" "" ""
row "ls -l MNT | wc -l" "$(printf %.0f "$ll_ms") ms" "$nll lines" "" "" ""
row "  shutdown (SIGTERM -> exit)" "$(printf %.0f "$down_ms") ms" "" "" "" ""

# ---- the table -------------------------------------------------------------

echo
printf '%-40s %-16s %-29s %-6s %-9s %s\n' figure guestlink baseline ratio target verdict
printf '%s\n' "${ROWS[@]}"
echo
echo "$MET targets met, $MISSED missed, $FAILED measurements failed" \
	"($(nproc) CPUs; each figure the median of $ROUNDS x $SECS s)"

[ "$FAILED" -eq 0 ] || exit 1
[ "$STRICT" = 1 ] && [ "$MISSED" -gt 0 ] && exit 1
exit 0
