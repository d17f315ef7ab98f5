#!/bin/sh
# Set config keys of an instance from a script, then read them back.
#
# usage: set-keys.sh MNT INSTANCE [KEY=VALUE ...]
#
# MNT is where guestlinkd is mounted (./mnt after `make run`). INSTANCE is
# created if it does not exist. Without KEY=VALUE arguments a few user.*
# keys are set. Every write returns only once the value is durable; a
# rejected value makes the write fail and changes nothing.
set -eu

usage() {
	echo "usage: $0 MNT INSTANCE [KEY=VALUE ...]" >&2
	exit 2
}
[ $# -ge 2 ] || usage
mnt=$1
inst=$2
shift 2
if [ $# -eq 0 ]; then
	set -- user.app=web user.port=8080 "user.motd=Welcome to $inst"
fi

if [ ! -d "$mnt/$inst" ]; then
	mkdir "$mnt/$inst"
	echo "created instance $inst"
fi

# printf, not echo: values may start with '-' or hold backslashes. The
# file system drops one trailing newline, so value and newline round-trip.
for kv in "$@"; do
	key=${kv%%=*}
	value=${kv#*=}
	if [ "$key" = "$kv" ]; then
		echo "set-keys: '$kv' is not KEY=VALUE" >&2
		exit 2
	fi
	printf '%s\n' "$value" > "$mnt/$inst/config/$key"
done

# Read back: cat adds nothing; the file holds the value plus one newline.
status=0
for kv in "$@"; do
	key=${kv%%=*}
	value=${kv#*=}
	got=$(cat "$mnt/$inst/config/$key")
	if [ "$got" = "$value" ]; then
		printf '%s = %s\n' "$key" "$got"
	else
		printf 'set-keys: %s: wrote %s, read %s\n' "$key" "$value" "$got" >&2
		status=1
	fi
done
exit "$status"
