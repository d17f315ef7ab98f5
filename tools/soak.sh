#!/bin/bash
# make soak: see tools/soak.py. SOAK_SECONDS (default 600) bounds the run.
set -euo pipefail
cd "$(dirname "$0")/.."
export BUILD=${BUILD:-build}
exec /usr/bin/python3 tools/soak.py --seconds "${SOAK_SECONDS:-600}" "$@"
