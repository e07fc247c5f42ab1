#!/usr/bin/env bash
# Build wheels for imsrelay and all its run-time dependencies on the host, into
# docker/wheels/, so the site image installs with
#   pip install --no-index --find-links /tmp/wheels imsrelay
# and needs no network (nor PyPI's TLS chain) inside `docker build`.
#
#   docker/build-wheels.sh              # wheels for the repo this script lives in
#   PYTHON=/usr/bin/python3.11 docker/build-wheels.sh   # this interpreter only
#
# The images run CPython 3.11 on Debian bookworm (glibc 2.36) on the host's CPU
# architecture. With a host CPython 3.11 we simply `pip wheel .` (which also
# builds any dependency that ships only as an sdist). Without one we build the
# imsrelay wheel (pure Python) with whatever Python is there and then let pip
# download the dependencies as cp311 manylinux wheels for the target, whatever the
# host interpreter is.
#
# Layout: the dependencies' wheels in docker/wheels/, imsrelay's own wheel in
# docker/wheels/self/, so the image installs them in two layers and a change to
# imsrelay's code does not reinstall the dependencies. The imsrelay wheel is
# reproducible (SOURCE_DATE_EPOCH): unchanged code gives identical bytes, and
# `docker build` reuses its cached layer.
#
# docker/wheels/ is emptied first, so no stale imsrelay wheel can be installed.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/.." && pwd)"
OUT="$HERE/wheels"

log() { printf '[build-wheels] %s\n' "$*" >&2; }

if [ ! -f "$REPO/pyproject.toml" ]; then
    echo "build-wheels: no pyproject.toml in $REPO" >&2
    exit 1
fi

pick_python() {
    local c candidates=(python3.11 python3 python)
    # An explicit PYTHON is the one to use, 3.11 or not.
    [ -n "${PYTHON:-}" ] && candidates=("$PYTHON")
    for c in "${candidates[@]}"; do
        [ -n "$c" ] || continue
        command -v "$c" >/dev/null 2>&1 || continue
        if "$c" -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else 1)' 2>/dev/null; then
            echo "$c"; return 0
        fi
    done
    return 1
}

rm -rf "$OUT"
mkdir -p "$OUT"
start=$(date +%s)
export PIP_DISABLE_PIP_VERSION_CHECK=1
export SOURCE_DATE_EPOCH="${SOURCE_DATE_EPOCH:-315532800}"   # 1980-01-01: reproducible wheels

if PY="$(pick_python)"; then
    log "using $PY ($("$PY" -c 'import sys; print(sys.version.split()[0])')): pip wheel $REPO"
    "$PY" -m pip wheel --quiet --wheel-dir "$OUT" "$REPO"
else
    PY="${PYTHON:-python3}"
    command -v "$PY" >/dev/null 2>&1 || { echo "build-wheels: no python3 on PATH" >&2; exit 1; }
    arch="$(uname -m)"
    log "no CPython 3.11 on the host; building imsrelay with $PY and downloading cp311 $arch wheels"
    "$PY" -m pip wheel --quiet --no-deps --wheel-dir "$OUT" "$REPO"
    "$PY" -m pip download --quiet --dest "$OUT" --find-links "$OUT" \
        --only-binary=:all: --implementation cp --python-version 3.11 --abi cp311 --abi abi3 --abi none \
        --platform "manylinux_2_36_$arch" --platform "manylinux_2_28_$arch" \
        --platform "manylinux_2_17_$arch" --platform "manylinux2014_$arch" --platform any \
        imsrelay
fi

if ! ls "$OUT"/imsrelay-*.whl >/dev/null 2>&1; then
    echo "build-wheels: no imsrelay wheel was produced in $OUT" >&2
    exit 1
fi
mkdir -p "$OUT/self"
mv "$OUT"/imsrelay-*.whl "$OUT/self/"
count=$(find "$OUT" -maxdepth 1 -name '*.whl' | wc -l)
log "$(basename "$OUT"/self/imsrelay-*.whl) in $OUT/self/, $count dependency wheels in $OUT, in $(( $(date +%s) - start ))s"
