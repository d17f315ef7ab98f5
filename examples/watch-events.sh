#!/bin/sh
# Follow the events of one instance, or of every instance.
#
# usage: watch-events.sh [-n COUNT] MNT [INSTANCE]
#
# Prints one line per change: the event type and what changed. Each line of
# MNT/INSTANCE/events is one JSON object in LXD's format (MNT/events adds
# "instance"). Stops after COUNT events with -n, when the instance is
# removed, or when guestlinkd stops; Ctrl-C ends it at once.
set -eu

usage() {
	echo "usage: $0 [-n COUNT] MNT [INSTANCE]" >&2
	exit 2
}
count=0
while getopts n: opt; do
	case $opt in
	n) count=$OPTARG ;;
	*) usage ;;
	esac
done
shift $((OPTIND - 1))
if [ $# -lt 1 ] || [ $# -gt 2 ]; then
	usage
fi
case $count in
'' | *[!0-9]*) usage ;;
esac
if [ $# -eq 2 ]; then
	file=$1/$2/events
else
	file=$1/events
fi
[ -e "$file" ] || {
	echo "watch-events: $file does not exist" >&2
	exit 1
}

# A field of a flat JSON object, good enough for a demo; use jq for more.
field() {
	printf '%s\n' "$1" | sed -n "s/.*\"$2\":\"\\([^\"]*\\)\".*/\\1/p"
}

# cat follows the file forever (a read blocks until the next event);
# head -n stops after COUNT lines.
read_events() {
	if [ "$count" -gt 0 ]; then
		head -n "$count" "$file"
	else
		cat "$file"
	fi
}

read_events | while IFS= read -r line; do
	# the first field; "type" also appears inside a device's config
	type=$(printf '%s\n' "$line" | sed -n 's/^{"type":"\([^"]*\)".*/\1/p')
	inst=$(field "$line" instance)
	case $type in
	config) what="$(field "$line" key) = \"$(field "$line" value)\" (was \"$(field "$line" old_value)\")" ;;
	device) what="$(field "$line" action) device $(field "$line" name)" ;;
	lifecycle) what=$(field "$line" action) ;;
	*) what=$line ;;
	esac
	printf '%s %-9s %s%s\n' "$(field "$line" timestamp)" "$type" "${inst:+$inst: }" "$what"
done
