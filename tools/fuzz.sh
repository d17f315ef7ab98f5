#!/bin/bash
# Flag and file lists in this script are meant to split into words.
# shellcheck disable=SC2086
#
# Build every libFuzzer harness (fuzz/fuzz_*.c) into build-fuzz/ and run each
# for FUZZ_SECONDS (default 60) on a fresh copy of its seed corpus
# (fuzz/corpus/<harness>/). Fails on any crash, leak, timeout, out-of-memory
# or sanitizer report, or when an input kept in fuzz/crashes/<harness>/ still
# fails (a finding stays a failure until fixed), and prints one line per
# harness and a summary line.
#
#   FUZZ_SECONDS=N     seconds per harness
#   FUZZ_ONLY="a b"    run only these harnesses
#   FUZZ_KEEP=1        keep build-fuzz/corpus/<h> from the last run and add to it
#   FUZZ_BUILD_ONLY=1  build, do not run
#   CLANG=clang-14     the compiler (needs libFuzzer: Debian's libclang-rt-14-dev)
#
# Project sources are compiled with clang here, separately from build/, with
# coverage and ASan/UBSan; reproduce a finding with
#   build-fuzz/fuzz_<h> <file>
set -u

cd "$(dirname "$0")/.." || exit 1
SECONDS_EACH=${FUZZ_SECONDS:-60}
OUT=build-fuzz
CLANG=${CLANG:-}
if [ -z "$CLANG" ]; then
	for c in clang-14 clang; do
		if command -v "$c" >/dev/null 2>&1; then
			CLANG=$c
			break
		fi
	done
fi
if [ -z "$CLANG" ]; then
	echo "fuzz: clang not found (tools/install-deps.sh installs clang-14)" >&2
	exit 1
fi

PKGS="libuv jansson libsodium sqlite3"
PKG_CFLAGS=$(pkg-config --cflags $PKGS) || exit 1
PKG_LIBS="$(pkg-config --libs $PKGS) -lhttp_parser -lwslay -lpthread"
SAN="-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer"
COMMON="-std=gnu11 -g -O1 -D_GNU_SOURCE -DFUSE_USE_VERSION=35 -I. $PKG_CFLAGS $SAN"
# the project's warnings; -Werror only for the harnesses (clang may warn
# where the project's gcc build does not)
WARN="-Wall -Wextra -Wshadow -Wvla -Wformat=2 -Wno-unused-parameter"

# max_len per harness: requests and bodies need room, names and lines do not
max_len_of() {
	case $1 in
	http|devlxd|patch|ws) echo 16384 ;;
	frame|fconn) echo 65536 ;;
	connect) echo 64 ;;
	url|names) echo 4096 ;;
	*) echo 4096 ;;
	esac
}

mkdir -p "$OUT/obj/core" "$OUT/obj/bridge" "$OUT/logs" "$OUT/corpus" "$OUT/artifacts"

# ---- build ------------------------------------------------------------------

# shellcheck disable=SC2012 # project file names are plain
newest_header=$(ls -t core/*.h bridge/*.h 2>/dev/null | head -1)
objs=""
skipped=""
changed=""
for src in core/*.c bridge/*.c; do
	[ -f "$src" ] || continue
	obj="$OUT/obj/${src%.c}.o"
	if [ ! -f "$obj" ] || [ "$src" -nt "$obj" ] || [ "$newest_header" -nt "$obj" ]; then
		changed=1
		if ! $CLANG $COMMON $WARN -fsanitize=fuzzer-no-link -c -o "$obj" "$src" \
			2>"$OUT/logs/cc-$(basename "$src").log"; then
			# another part may be half-written: only harnesses that need
			# it fail (at link time)
			skipped="$skipped $src"
			rm -f "$obj"
			continue
		fi
	fi
	objs="$objs $obj"
done
if [ -n "$skipped" ]; then
	echo "fuzz: warning: did not compile:$skipped (see $OUT/logs/cc-*.log)" >&2
fi
if [ -n "$changed" ] || [ -n "$skipped" ] || [ ! -f "$OUT/libglfuzz.a" ]; then
	rm -f "$OUT/libglfuzz.a"
	ar rcs "$OUT/libglfuzz.a" $objs
fi

harnesses=""
for h in fuzz/fuzz_*.c; do
	name=$(basename "$h" .c)
	name=${name#fuzz_}
	if [ -n "${FUZZ_ONLY:-}" ]; then
		case " $FUZZ_ONLY " in
		*" $name "*) ;;
		*) continue ;;
		esac
	fi
	harnesses="$harnesses $name"
done

build_failed=""
for h in $harnesses; do
	bin="$OUT/fuzz_$h"
	fresh=1
	for dep in "fuzz/fuzz_$h.c" fuzz/*.h tests/unit/fake_store.h "$OUT/libglfuzz.a"; do
		if [ ! -f "$bin" ] || [ "$dep" -nt "$bin" ]; then
			fresh=""
		fi
	done
	if [ -n "$fresh" ]; then
		continue
	fi
	if ! $CLANG $COMMON $WARN -Werror -fsanitize=fuzzer -o "$bin" "fuzz/fuzz_$h.c" \
		"$OUT/libglfuzz.a" $PKG_LIBS >"$OUT/logs/build-$h.log" 2>&1; then
		build_failed="$build_failed $h"
		rm -f "$bin"
	fi
done

if [ -n "${FUZZ_BUILD_ONLY:-}" ]; then
	for h in $build_failed; do
		echo "fuzz: $h: build failed:" >&2
		tail -20 "$OUT/logs/build-$h.log" >&2
	done
	[ -z "$build_failed" ]
	exit $?
fi

# ---- run ----------------------------------------------------------------------

export ASAN_OPTIONS="detect_leaks=1:abort_on_error=0:allocator_may_return_null=1:detect_stack_use_after_return=1"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"

status=0
nok=0
nfail=0
total=0
table="$OUT/fuzz-table.txt"
printf '%-10s %12s %10s %8s  %s\n' harness executions exec/s corpus result >"$table"
for h in $harnesses; do
	log="$OUT/logs/run-$h.log"
	corpus="$OUT/corpus/$h"
	art="$OUT/artifacts/$h"
	case " $build_failed " in
	*" $h "*)
		printf '%-10s %12s %10s %8s  %s\n' "$h" - - - "BUILD FAILED ($OUT/logs/build-$h.log)" >>"$table"
		status=1
		nfail=$((nfail + 1))
		continue
		;;
	esac
	# every reproducer kept in fuzz/crashes/<h>/ first: a finding stays a
	# failure until it is fixed, however the fuzzing goes this time
	known=""
	for f in fuzz/crashes/"$h"/*; do
		case $f in
		*/README*|*"/*") continue ;;
		esac
		if ! "$OUT/fuzz_$h" -timeout=10 -rss_limit_mb=2048 "$f" >"$OUT/logs/known-$h.log" 2>&1; then
			known="$known $f"
		fi
	done
	if [ -n "$known" ]; then
		printf '%-10s %12s %10s %8s  %s\n' "$h" - - - "FAIL: reproduces$known" >>"$table"
		status=1
		nfail=$((nfail + 1))
		continue
	fi
	if [ -z "${FUZZ_KEEP:-}" ]; then
		rm -rf "$corpus"
	fi
	mkdir -p "$corpus" "$art"
	if [ -d "fuzz/corpus/$h" ]; then
		cp -n fuzz/corpus/"$h"/* "$corpus"/ 2>/dev/null
	fi
	dict=""
	if [ -f "fuzz/$h.dict" ]; then
		dict="-dict=fuzz/$h.dict"
	fi
	# libFuzzer's own limit ends the run; `timeout` only guards against a
	# harness that hangs outside an input
	timeout -k 10 $((SECONDS_EACH + 120)) "$OUT/fuzz_$h" \
		-max_total_time="$SECONDS_EACH" -timeout=10 -rss_limit_mb=2048 \
		-max_len="$(max_len_of "$h")" -print_final_stats=1 \
		-artifact_prefix="$art/" $dict "$corpus" >"$log" 2>&1
	rc=$?
	execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
	rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
	ncorp=$(find "$corpus" -type f | wc -l)
	result=ok
	if [ "$rc" -ne 0 ]; then
		kind=$(grep -Eo 'ERROR: (AddressSanitizer|LeakSanitizer|UndefinedBehaviorSanitizer|libFuzzer)[^ ]*( [a-z-]+)?' "$log" | head -1)
		[ -n "$kind" ] || kind=$(grep -Eo 'runtime error: .{0,60}' "$log" | head -1)
		[ -n "$kind" ] || kind="exit $rc"
		result="FAIL: $kind (log $log, input in $art/)"
		status=1
	elif grep -Eq '(ERROR: [A-Za-z]+Sanitizer|runtime error:|fuzz harness:)' "$log"; then
		result="FAIL: sanitizer report in $log"
		status=1
	fi
	printf '%-10s %12s %10s %8s  %s\n' "$h" "${execs:--}" "${rate:--}" "$ncorp" "$result" >>"$table"
	if [ "$result" = ok ]; then
		nok=$((nok + 1))
	else
		nfail=$((nfail + 1))
	fi
	total=$((total + ${execs:-0}))
done
cat "$table"
# one summary line, last (CI shows the last line)
echo "fuzz: $nok ok, $nfail failed, $total executions, ${SECONDS_EACH}s per harness"
exit $status
