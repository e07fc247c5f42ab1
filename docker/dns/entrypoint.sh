#!/bin/sh
# Start nsd in the foreground serving every /etc/nsd/zones/NAME.zone as zone NAME
# (root.zone: the root zone ".", the rest of the Internet for the sealed lab).
# The zone directory is mounted from config/dns/ by docker-compose.yml.
set -eu
ZONES_DIR="${NSD_ZONES_DIR:-/etc/nsd/zones}"
mkdir -p /run/nsd /var/lib/nsd
: >/run/nsd/zones.conf
found=0
for f in "$ZONES_DIR"/*.zone; do
    [ -e "$f" ] || continue
    name="$(basename "$f" .zone)"
    [ "$name" = "root" ] && name="."
    printf 'zone:\n    name: "%s"\n    zonefile: "%s"\n' "$name" "$f" >>/run/nsd/zones.conf
    echo "nsd: serving zone $name from $f" >&2
    found=1
done
if [ "$found" -eq 0 ]; then
    echo "nsd: no *.zone files in $ZONES_DIR (mount config/dns there)" >&2
    exit 1
fi
nsd-checkconf /etc/nsd/nsd.conf
for f in "$ZONES_DIR"/*.zone; do
    name="$(basename "$f" .zone)"
    [ "$name" = "root" ] && name="."
    nsd-checkzone "$name" "$f" >&2
done
exec nsd -d -c /etc/nsd/nsd.conf "$@"
