#!/bin/sh
# Start nsd in the foreground serving every /etc/nsd/zones/NAME.zone as zone NAME
# (root.zone: the root zone ".", the rest of the Internet for the sealed lab).
# The zone directory is mounted from config/dns/ by docker-compose.yml.
# NSD_ZONES_OVERLAY=DIR (a compose profile's, e.g. two-servers): a zone that
# /etc/nsd/zones/DIR/ also has is served from there instead.
set -eu
ZONES_DIR="${NSD_ZONES_DIR:-/etc/nsd/zones}"
OVERLAY="${NSD_ZONES_OVERLAY:-}"
case "$OVERLAY" in */*|.*) echo "nsd: NSD_ZONES_OVERLAY=$OVERLAY: give a directory name under $ZONES_DIR" >&2; exit 1 ;; esac
if [ -n "$OVERLAY" ] && [ ! -d "$ZONES_DIR/$OVERLAY" ]; then
    echo "nsd: NSD_ZONES_OVERLAY=$OVERLAY: no directory $ZONES_DIR/$OVERLAY" >&2
    exit 1
fi
zone_file() {   # the file zone NAME is served from
    if [ -n "$OVERLAY" ] && [ -f "$ZONES_DIR/$OVERLAY/$1.zone" ]; then
        printf '%s' "$ZONES_DIR/$OVERLAY/$1.zone"
    else
        printf '%s' "$ZONES_DIR/$1.zone"
    fi
}
mkdir -p /run/nsd /var/lib/nsd
: >/run/nsd/zones.conf
found=0
for f in "$ZONES_DIR"/*.zone; do
    [ -e "$f" ] || continue
    f="$(zone_file "$(basename "$f" .zone)")"
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
    f="$(zone_file "$(basename "$f" .zone)")"
    name="$(basename "$f" .zone)"
    [ "$name" = "root" ] && name="."
    nsd-checkzone "$name" "$f" >&2
done
exec nsd -d -c /etc/nsd/nsd.conf "$@"
