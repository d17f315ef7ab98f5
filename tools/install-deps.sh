#!/bin/sh
# Install what guestlink needs to build and test on Debian 12.
# Idempotent: when every package is already installed, apt is not touched,
# so `make run` / `make test` are quick the second time.
set -eu

PKGS="build-essential pkg-config libuv1-dev libfuse3-dev fuse3 libjansson-dev
libsqlite3-dev libsodium-dev check libhttp-parser-dev libwslay-dev python3-pytest
python3-websocket curl vim sqlite3 psmisc procps util-linux cloud-init
clang-14 libclang-rt-14-dev"

missing=""
for p in $PKGS; do
	st=$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null || true)
	if [ "$st" != "installed" ]; then
		missing="$missing $p"
	fi
done

if [ -z "$missing" ]; then
	echo "install-deps: all build and test dependencies are installed"
	exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
	echo "install-deps: missing packages:$missing" >&2
	echo "install-deps: as root, run: apt-get update && apt-get install -y$missing" >&2
	exit 1
fi

echo "install-deps: installing:$missing"
export DEBIAN_FRONTEND=noninteractive
apt-get update
# shellcheck disable=SC2086 # word splitting of the package list is wanted
apt-get install -y --no-install-recommends $missing
