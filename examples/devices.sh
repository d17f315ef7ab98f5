#!/bin/sh
# Add, change, list and remove a device of an instance.
#
# usage: devices.sh MNT INSTANCE
#
# A device is a file in MNT/INSTANCE/devices/ holding a JSON object of
# string values with a "type". The daemon stores it in canonical form
# (compact, keys sorted); invalid JSON is refused with EINVAL and changes
# nothing.
set -eu

[ $# -eq 2 ] || {
	echo "usage: $0 MNT INSTANCE" >&2
	exit 2
}
dir=$1/$2/devices
[ -d "$1/$2" ] || mkdir "$1/$2"

echo "== add a disk device"
printf '{"type": "disk", "source": "/srv/share", "path": "/mnt/share"}\n' > "$dir/share"
cat "$dir/share"

echo "== change it in place with sed -i (one removed + added event pair)"
sed -i 's|/mnt/share|/mnt/data|' "$dir/share"
cat "$dir/share"

echo "== a NIC, written from a pretty-printed document"
cat > "$dir/eth0" <<'JSON'
{
  "type": "nic",
  "nictype": "bridged",
  "parent": "lxdbr0"
}
JSON
cat "$dir/eth0"

echo "== invalid devices are refused"
if printf '{"type": "disk", "readonly": true}\n' > "$dir/bad" 2>/dev/null; then
	# bash does not report errors of close(); check the file instead
	[ ! -e "$dir/bad" ] || {
		echo "devices: the invalid device was stored" >&2
		exit 1
	}
fi
[ ! -e "$dir/bad" ] && echo "bad: refused (non-string value)"

echo "== list"
ls "$dir"

echo "== remove"
rm "$dir/share" "$dir/eth0"
ls "$dir"
