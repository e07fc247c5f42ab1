#!/usr/bin/env bash
# Build the lab's base image (default tag imsrelay-base:bookworm) from scratch,
# without pulling anything from an image registry.
#
#   docker/build-base-image.sh            # build unless the image already exists
#   docker/build-base-image.sh --force    # rebuild even if it exists
#   docker/build-base-image.sh --tag NAME # another tag (or IMSRELAY_BASE_IMAGE=NAME)
#
# How: `debootstrap --variant=minbase` lays a Debian bookworm root file system in a
# temporary directory with every package the three image roles need (Python 3.11
# for the imsrelay sites, nsd for the lab DNS, Postfix for the "Internet" peer, plus
# a few tools: swaks, dig, ip, ps), the apt caches are emptied, and the tree is
# streamed into `docker import`. Only Debian's package mirror is contacted (over
# plain HTTP, as apt does; the packages are checked against Debian's keyring).
#
# Needs: root, docker, debootstrap (installed with apt-get when missing).
# Environment:
#   IMSRELAY_BASE_IMAGE   image tag to build (default imsrelay-base:bookworm)
#   DEBIAN_MIRROR         mirror URL (default: the host's Debian mirror, else
#                         http://deb.debian.org/debian)
#   DEBOOTSTRAP_CACHE     directory kept between runs for downloaded .deb files
#                         (default /var/cache/imsrelay-debootstrap; "" disables)
#   EXTRA_PACKAGES        comma-separated extra packages to include
set -euo pipefail

TAG="${IMSRELAY_BASE_IMAGE:-imsrelay-base:bookworm}"
SUITE=bookworm
FORCE=0
CACHE_DIR="${DEBOOTSTRAP_CACHE-/var/cache/imsrelay-debootstrap}"

usage() { sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; }

while [ $# -gt 0 ]; do
    case "$1" in
        --force|-f) FORCE=1 ;;
        --tag) shift; TAG="${1:?--tag needs a value}" ;;
        --tag=*) TAG="${1#--tag=}" ;;
        -h|--help) usage; exit 0 ;;
        *) echo "build-base-image: unknown argument: $1" >&2; usage >&2; exit 2 ;;
    esac
    shift
done

log() { printf '[build-base-image] %s\n' "$*" >&2; }

if [ "$FORCE" -eq 0 ] && docker image inspect "$TAG" >/dev/null 2>&1; then
    log "image $TAG already exists; nothing to do (use --force to rebuild)"
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    echo "build-base-image: debootstrap needs root" >&2
    exit 1
fi

# Packages beyond the minbase set (debootstrap resolves their Depends, not Recommends).
PACKAGES=(
    ca-certificates       # TLS roots for anything that talks TLS
    netbase               # /etc/services, /etc/protocols (postfix needs them)
    iproute2 procps       # ip, ss, ps: debugging inside containers
    bind9-dnsutils        # dig: look at the lab DNS from inside a container
    python3 python3-venv python3-pip   # imsrelay sites (Python 3.11)
    dovecot-imapd dovecot-pop3d        # the sites' IMAP4 and POP3 (imsrelay/access)
    nsd                   # lab DNS server
    postfix               # the "Internet" peer MTA
    swaks libnet-ssleay-perl libio-socket-ssl-perl perl-openssl-defaults  # SMTP client (+TLS)
)
INCLUDE="$(printf '%s,' "${PACKAGES[@]}")"
INCLUDE="${INCLUDE%,}"
if [ -n "${EXTRA_PACKAGES:-}" ]; then
    INCLUDE="$INCLUDE,$EXTRA_PACKAGES"
fi

if ! command -v debootstrap >/dev/null 2>&1; then
    log "installing debootstrap"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
fi

# Mirror: reuse the host's Debian mirror when it is configured, since that is the
# one known to be reachable here.
if [ -z "${DEBIAN_MIRROR:-}" ]; then
    DEBIAN_MIRROR="$(grep -rhoE '^(URIs:|deb) +https?://[^ ]+/debian/?( |$)' \
        /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null \
        | awk '{print $2}' | head -n1 || true)"
    DEBIAN_MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
fi

ROOTFS="$(mktemp -d /var/tmp/imsrelay-rootfs.XXXXXX)"
cleanup() {
    # debootstrap may leave /proc or /sys mounted inside the tree if it fails.
    for m in proc sys dev/pts dev; do
        if mountpoint -q "$ROOTFS/$m" 2>/dev/null; then umount -l "$ROOTFS/$m" || true; fi
    done
    rm -rf --one-file-system "$ROOTFS"
}
trap cleanup EXIT

CACHE_ARGS=()
if [ -n "$CACHE_DIR" ]; then
    mkdir -p "$CACHE_DIR"
    CACHE_ARGS=(--cache-dir="$CACHE_DIR")
fi

start=$(date +%s)
log "debootstrap $SUITE (minbase) from $DEBIAN_MIRROR into $ROOTFS"
log "including: $INCLUDE"
# debootstrap is quiet for minutes: print one progress line every 15 s (its last
# I: line: retrieving, validating, unpacking or configuring which package).
DEBIAN_FRONTEND=noninteractive debootstrap \
        --variant=minbase --merged-usr --components=main \
        "${CACHE_ARGS[@]}" --include="$INCLUDE" \
        "$SUITE" "$ROOTFS" "$DEBIAN_MIRROR" >"$ROOTFS.log" 2>&1 &
boot_pid=$!
while kill -0 "$boot_pid" 2>/dev/null; do
    for _ in 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15; do
        kill -0 "$boot_pid" 2>/dev/null || break
        sleep 1
    done
    kill -0 "$boot_pid" 2>/dev/null || break
    log "debootstrap, $(( $(date +%s) - start ))s: $(grep '^I: ' "$ROOTFS.log" 2>/dev/null | tail -n 1 | cut -c4-)"
done
if ! wait "$boot_pid"; then
    log "debootstrap failed; last lines of its log ($ROOTFS.log):"
    tail -n 40 "$ROOTFS.log" >&2
    if [ -f "$ROOTFS/debootstrap/debootstrap.log" ]; then
        tail -n 40 "$ROOTFS/debootstrap/debootstrap.log" >&2
    fi
    exit 1
fi
rm -f "$ROOTFS.log"
log "debootstrap done in $(( $(date +%s) - start ))s"

# Tidy the tree: apt sources for later `apt-get install` in derived images, dpkg
# excludes so those installs stay small, no caches, no docs, no service autostart.
cat >"$ROOTFS/etc/apt/sources.list" <<EOF
deb $DEBIAN_MIRROR $SUITE main
deb $DEBIAN_MIRROR $SUITE-updates main
deb http://deb.debian.org/debian-security $SUITE-security main
EOF
cat >"$ROOTFS/etc/dpkg/dpkg.cfg.d/01-imsrelay-nodoc" <<'EOF'
path-exclude=/usr/share/doc/*
path-include=/usr/share/doc/*/copyright
path-exclude=/usr/share/man/*
path-exclude=/usr/share/info/*
path-exclude=/usr/share/locale/*
EOF
cat >"$ROOTFS/etc/apt/apt.conf.d/01-imsrelay-container" <<'EOF'
APT::Install-Recommends "false";
APT::Install-Suggests "false";
Acquire::Languages "none";
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/*.bin || true"; };
EOF
# Services are started by the container's command, never by package scripts.
printf '#!/bin/sh\nexit 101\n' >"$ROOTFS/usr/sbin/policy-rc.d"
chmod 0755 "$ROOTFS/usr/sbin/policy-rc.d"
# Docker provides these at run time; keep the image neutral.
: >"$ROOTFS/etc/hostname"
rm -f "$ROOTFS/etc/resolv.conf" "$ROOTFS/etc/hosts"
: >"$ROOTFS/etc/resolv.conf"
printf '127.0.0.1\tlocalhost\n' >"$ROOTFS/etc/hosts"
rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/cache/apt/*.bin \
       "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/var/log/*.log \
       "$ROOTFS"/var/log/apt/* "$ROOTFS"/tmp/* "$ROOTFS"/var/tmp/* \
       "$ROOTFS"/usr/share/man/* "$ROOTFS"/usr/share/info/* \
       "$ROOTFS"/usr/share/locale/* "$ROOTFS"/debootstrap 2>/dev/null || true
find "$ROOTFS/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete 2>/dev/null || true
find "$ROOTFS" -xdev -name '__pycache__' -type d -prune -exec rm -rf {} + 2>/dev/null || true

pyver="$(chroot "$ROOTFS" python3 -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])')"
log "python3 in image: $pyver"

log "importing into docker as $TAG"
tar --numeric-owner --xattrs -C "$ROOTFS" -c . | docker import \
    -c 'ENV LANG=C.UTF-8' \
    -c 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    -c 'CMD ["/bin/bash"]' \
    -m "imsrelay lab base: debootstrap $SUITE minbase + python3 nsd postfix swaks" \
    - "$TAG" >/dev/null
docker image inspect "$TAG" --format '{{.Id}} {{.Size}}' | \
    awk -v t="$TAG" '{printf "[build-base-image] built %s %s (%.0f MB)\n", t, $1, $2/1048576}' >&2
log "total $(( $(date +%s) - start ))s"
