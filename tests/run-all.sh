#!/bin/bash
# Run every test: the Check unit binaries in $BUILD/tests, then the pytest
# integration suite against $BUILD/guestlinkd. Ends with one line,
#   N passed, N failed[, N skipped]
# and exits non-zero if anything failed. `make check` runs this.
set -uo pipefail

cd "$(dirname "$0")/.." || exit 1
BUILD=${BUILD:-build}
PYTHON=/usr/bin/python3
# A hung suite must not hang CI; the suite normally takes about 3 minutes.
PYTEST_TIMEOUT=${PYTEST_TIMEOUT:-1200}

passed=0
failed=0
skipped=0
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# ---- unit tests (Check) -----------------------------------------------------
# Check prints "100%: Checks: 12, Failures: 0, Errors: 0" per suite run.
units=("$BUILD"/tests/test_*)
if [ ! -e "${units[0]}" ]; then
	echo "run-all: no unit test binaries in $BUILD/tests (did 'make unit' run?)" >&2
	failed=$((failed + 1))
else
	for t in "${units[@]}"; do
		[ -x "$t" ] || continue
		echo "== $t"
		rc=0
		"$t" >"$tmp/unit.out" 2>&1 || rc=$?
		cat "$tmp/unit.out"
		seen=0
		while read -r checks fails errs; do
			seen=1
			passed=$((passed + checks - fails - errs))
			failed=$((failed + fails + errs))
		done < <(sed -nE 's/^[0-9]+%: Checks: ([0-9]+), Failures: ([0-9]+), Errors: ([0-9]+).*/\1 \2 \3/p' \
			"$tmp/unit.out")
		if [ "$seen" -eq 0 ]; then
			echo "run-all: $t printed no Check summary (exit status $rc): counted as one failure" >&2
			failed=$((failed + 1))
		elif [ "$rc" -ne 0 ] && ! grep -qE 'Failures: [1-9]|Errors: [1-9]' "$tmp/unit.out"; then
			echo "run-all: $t exited with status $rc although every case passed: counted as one failure" >&2
			failed=$((failed + 1))
		fi
	done
fi

# ---- integration tests (pytest) ----------------------------------------------
GUESTLINKD=$(realpath -m "$BUILD/guestlinkd")
export GUESTLINKD
echo "== pytest tests/integration (GUESTLINKD=$GUESTLINKD)"
rc=0
timeout --signal=INT --kill-after=30 "$PYTEST_TIMEOUT" \
	"$PYTHON" -m pytest -q -rfEs -p no:cacheprovider \
	--junitxml="$tmp/junit.xml" tests/integration || rc=$?

if [ "$rc" -eq 5 ]; then
	echo "run-all: pytest collected no tests in tests/integration: counted as one failure" >&2
	failed=$((failed + 1))
elif [ "$rc" -eq 124 ]; then
	echo "run-all: pytest did not finish within ${PYTEST_TIMEOUT}s: counted as one failure" >&2
	failed=$((failed + 1))
fi
if [ -s "$tmp/junit.xml" ]; then
	# One verdict per test case, so a test that failed and then also errored in
	# teardown counts once.
	read -r jp jf js < <("$PYTHON" - "$tmp/junit.xml" <<'PY'
import sys
import xml.etree.ElementTree as ET
p = f = s = 0
for case in ET.parse(sys.argv[1]).getroot().iter("testcase"):
    tags = {child.tag for child in case}
    if tags & {"failure", "error"}:
        f += 1
    elif "skipped" in tags:
        s += 1
    else:
        p += 1
print(p, f, s)
PY
	)
	passed=$((passed + ${jp:-0}))
	failed=$((failed + ${jf:-0}))
	skipped=$((skipped + ${js:-0}))
	if [ "$rc" -ne 0 ] && [ "$rc" -ne 5 ] && [ "$rc" -ne 124 ] && [ "${jf:-0}" -eq 0 ]; then
		echo "run-all: pytest exited with status $rc but reported no failed test: counted as one failure" >&2
		failed=$((failed + 1))
	fi
elif [ "$rc" -ne 5 ] && [ "$rc" -ne 124 ]; then
	echo "run-all: pytest wrote no report (exit status $rc): counted as one failure" >&2
	failed=$((failed + 1))
fi

line="$passed passed, $failed failed"
if [ "$skipped" -gt 0 ]; then
	line="$line, $skipped skipped"
fi
echo "$line"
[ "$failed" -eq 0 ]
