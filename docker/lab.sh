#!/usr/bin/env bash
# docker/lab.sh — one entry point for the imsrelay Docker lab (docker-compose.yml).
#
# Usage: docker/lab.sh COMMAND [ARGS]
#   up [--servers SiteA=2] [SERVICE...]
#                          build whatever is missing (base image, wheels, images),
#                          start the lab (or only SERVICE... and what they depend
#                          on) and wait until every container is healthy and the
#                          one-shot `setup` (imsrelay org-setup: the article's
#                          Check Now / Request Now / Site Addressing) has finished;
#                          --servers SiteA=2: SiteA as two servers, ServerA
#                          (10.10.10.10) and Server1 (10.10.10.11; compose file
#                          docker/servers.override.yml added to every command)
#   build [SERVICE...]     the same builds, without starting anything
#   wait                   wait until every lab container is healthy (and `setup`
#                          has exited 0)
#   status                 containers, health, addresses and the published ports
#   smoke                  quick check of the infrastructure: lab DNS answers, the
#                          Internet peer accepts a mail and files it in a Maildir
#   keys                   make new throwaway replication keys for the three sites
#                          (config/docker/keys/, lab-only, committed) and write
#                          their public keys into config/docker/site?.toml
#   logs [ARGS...]         docker-compose logs (e.g. `logs -f sitea`)
#   down [-v|--volumes]    stop and remove containers and network (-v: the data
#                          volumes too: queues, directories, Maildirs)
#   compose ARGS...        any docker-compose command with the lab's project
#                          name and base image (e.g. `compose exec sitea sh`)
#
# Environment:
#   IMSRELAY_BASE_IMAGE   base image of every lab image. When unset, this script
#                         picks: the registry images (python:3.11-slim-bookworm,
#                         debian:bookworm-slim) when they are already local or
#                         IMSRELAY_LAB_PULL=1; otherwise imsrelay-base:bookworm,
#                         built here from Debian packages (no registry needed).
#   IMSRELAY_LAB_PULL=1   allow pulling base images from a registry.
#   IMSRELAY_LAB_SERVERS  SiteA=2: SiteA as two servers (what --servers SiteA=2
#                         sets); the other commands see by themselves whether the
#                         lab that is there runs SiteA as two servers.
#   COMPOSE_PROJECT_NAME  compose project (default imsrelay): names the network
#                         (imsrelay_lab), volumes and containers.
#   LAB_WAIT_TIMEOUT      seconds `up`/`wait` wait for health (default 240).
#   LAB_SKIP_WHEELS=1     do not rebuild docker/wheels/ (use what is there).
#
# Nothing here contacts a registry unless IMSRELAY_LAB_PULL=1: Debian packages
# (debootstrap) and PyPI (pip, on the host) are the only downloads.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/.." && pwd)"
cd "$REPO"

export COMPOSE_PROJECT_NAME="${COMPOSE_PROJECT_NAME:-imsrelay}"
LAB_WAIT_TIMEOUT="${LAB_WAIT_TIMEOUT:-240}"
LOCAL_BASE="imsrelay-base:bookworm"
REGISTRY_BASES=(python:3.11-slim-bookworm debian:bookworm-slim)
SITES=(sitea siteb sitec)
SITE_IMAGE_SERVICES=(sitea sitea-server1 siteb sitec setup console)   # services built from the root Dockerfile (imsrelay:lab)
ONE_SHOT=setup                                  # runs once after the sites are healthy, then exits
ALL_SERVICES=(dns sitea siteb sitec internet setup console)
SERVERS_OVERRIDE="$REPO/docker/servers.override.yml"   # SiteA as two servers (IMSRELAY_LAB_SERVERS=SiteA=2)
SERVERS_SERVICES=(sitea-server1)                # the services that override adds
LAB_SUBNET="10.10.10.0/24"

log() { printf '[lab] %s\n' "$*" >&2; }
die() { printf '[lab] error: %s\n' "$*" >&2; exit 1; }

# --- docker-compose (v1 binary, or the v2 plugin) ---------------------------------
if command -v docker-compose >/dev/null 2>&1; then
    COMPOSE=(docker-compose)
elif docker compose version >/dev/null 2>&1; then
    COMPOSE=(docker compose)
else
    die "neither docker-compose nor 'docker compose' is installed"
fi
compose() {
    local files=(-f "$REPO/docker-compose.yml")
    if servers_on; then files+=(-f "$SERVERS_OVERRIDE"); fi
    "${COMPOSE[@]}" "${files[@]}" "$@"
}

image_exists() { docker image inspect "$1" >/dev/null 2>&1; }

# --- SiteA as one server or two (IMSRELAY_LAB_SERVERS; docker/servers.override.yml) ---
servers_on() { [ "${IMSRELAY_LAB_SERVERS:-}" = SiteA=2 ]; }

project_containers() {   # [SERVICE]: this project's containers, running or not
    local filters=(--filter "label=com.docker.compose.project=$COMPOSE_PROJECT_NAME")
    [ $# -gt 0 ] && filters+=(--filter "label=com.docker.compose.service=$1")
    docker ps -aq "${filters[@]}" 2>/dev/null
}

running_servers() {   # the topology of this project's containers: SiteA=2, or nothing
    if [ -n "$(project_containers "${SERVERS_SERVICES[0]}")" ]; then printf 'SiteA=2'; fi
}

servers_option() {   # --servers SiteA=N / IMSRELAY_LAB_SERVERS -> SiteA=2 or nothing (SiteA=1)
    case "${1,,}" in
        ""|sitea=1) printf '' ;;
        sitea=2) printf 'SiteA=2' ;;
        *) die "servers $1: the Docker lab runs SiteA=1 or SiteA=2 (the embedded lab, imsrelay lab --servers, runs more)" ;;
    esac
}

# --- which base image ---------------------------------------------------------------
choose_base_image() {
    if [ -n "${IMSRELAY_BASE_IMAGE:-}" ]; then
        if [ "${IMSRELAY_BASE_IMAGE%%:*}" = "${LOCAL_BASE%%:*}" ] && ! image_exists "$IMSRELAY_BASE_IMAGE"; then
            "$HERE/build-base-image.sh" --tag "$IMSRELAY_BASE_IMAGE"
        fi
        log "base image: $IMSRELAY_BASE_IMAGE (from IMSRELAY_BASE_IMAGE)"
        return
    fi
    local have_all=1 b
    for b in "${REGISTRY_BASES[@]}"; do image_exists "$b" || have_all=0; done
    if [ "${IMSRELAY_LAB_PULL:-0}" = 1 ] || [ "$have_all" = 1 ]; then
        log "base images: ${REGISTRY_BASES[*]} (registry images)"
        return    # docker-compose.yml's defaults apply
    fi
    export IMSRELAY_BASE_IMAGE="$LOCAL_BASE"
    if ! image_exists "$LOCAL_BASE"; then
        log "no registry base images here: building $LOCAL_BASE with debootstrap"
        "$HERE/build-base-image.sh" --tag "$LOCAL_BASE"
    fi
    log "base image: $LOCAL_BASE (local, no registry)"
}

# --- arguments: services, and whether sites are among them --------------------------
services_or_all() {
    if [ $# -gt 0 ]; then printf '%s\n' "$@"; return; fi
    printf '%s\n' "${ALL_SERVICES[@]}"
    if servers_on; then printf '%s\n' "${SERVERS_SERVICES[@]}"; fi
}

wants_sites() {   # is any of the services built from the site image?
    local s t
    for s in "$@"; do for t in "${SITE_IMAGE_SERVICES[@]}"; do [ "$s" = "$t" ] && return 0; done; done
    return 1
}

site_config_file() {   # sitea -> config/docker/siteA.toml (two servers: config/docker/servers/siteA-ServerA.toml)
    case "$1" in
        sitea-server1) printf 'config/docker/servers/siteA-Server1.toml'; return ;;
        sitea) if servers_on; then printf 'config/docker/servers/siteA-ServerA.toml'; return; fi ;;
    esac
    local letter="${1#site}"
    printf 'config/docker/site%s.toml' "$(printf '%s' "$letter" | tr '[:lower:]' '[:upper:]')"
}

check_site_configs() {
    local s f missing=0
    for s in "$@"; do
        case "$s" in sitea|sitea-server1|siteb|sitec) ;; *) continue ;; esac
        f="$(site_config_file "$s")"
        # A missing bind-mount source would be created by Docker as a directory.
        if [ ! -f "$REPO/$f" ]; then log "missing $f (mounted as /etc/imsrelay/site.toml in $s)"; missing=1; fi
        f="$(basename "$f" .toml)"
        f="config/docker/keys/${f%%-*}.pem"   # siteA-Server1 -> the site's key, siteA.pem
        if [ ! -f "$REPO/$f" ]; then log "missing $f (mounted as /etc/imsrelay/replication-key.pem in $s; docker/lab.sh keys makes new ones)"; missing=1; fi
    done
    [ "$missing" = 0 ] || die "site configuration missing"
}

do_keys() {
    # New throwaway lab keys: config/docker/keys/site?.pem and the public keys in
    # config/docker/site?.toml, written by imsrelay.lab.docker_configs (needs the
    # imsrelay package and `cryptography`: the checkout's .venv, or $PYTHON).
    local py="${PYTHON:-}"
    [ -n "$py" ] || { [ -x "$REPO/.venv/bin/python" ] && py="$REPO/.venv/bin/python"; } || py=python3
    PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" "$py" -m imsrelay.lab.docker_configs regenerate-keys
    log "new lab keys written; restart the sites to use them (docker/lab.sh down; docker/lab.sh up)"
}

check_subnet_free() {
    local own="${COMPOSE_PROJECT_NAME}_lab" line name
    while read -r line; do
        name="${line%% *}"
        case " $line " in
            *" $LAB_SUBNET "*) [ "$name" = "$own" ] || die "docker network '$name' already uses $LAB_SUBNET; remove it (docker network rm $name) or stop that lab first" ;;
        esac
    done < <(docker network ls -q | xargs -r docker network inspect \
                 -f '{{.Name}} {{range .IPAM.Config}}{{.Subnet}} {{end}}' 2>/dev/null)
}

build_wheels() {
    [ "${LAB_SKIP_WHEELS:-0}" = 1 ] && { log "LAB_SKIP_WHEELS=1: using docker/wheels/ as it is"; return; }
    if "$HERE/build-wheels.sh"; then return; fi
    if [ -z "${IMSRELAY_BASE_IMAGE:-}" ]; then
        # Registry mode: the image can still pip-install from PyPI inside the build.
        log "wheel build failed; the site image will install from PyPI instead"
        rm -rf "$HERE/wheels"
    else
        die "wheel build failed (needed: the image build has no PyPI access)"
    fi
}

do_build() {   # [SERVICE...]
    local svcs
    mapfile -t svcs < <(services_or_all "$@")
    choose_base_image
    if wants_sites "${svcs[@]}"; then build_wheels; fi
    # The three sites and `setup` share one image (imsrelay:lab): build it once,
    # via the first of them asked for.
    local build=() s site_done=0
    for s in "${svcs[@]}"; do
        if wants_sites "$s"; then
            [ "$site_done" = 1 ] && continue
            site_done=1
        fi
        build+=("$s")
    done
    local t0=$SECONDS
    compose build "${build[@]}"
    log "images built in $((SECONDS - t0))s"
}

# --- health -------------------------------------------------------------------------
lab_containers() { compose ps -q 2>/dev/null | sed '/^$/d'; }

container_state() {   # -> "name status health service exit-code"
    docker inspect -f '{{.Name}} {{.State.Status}} {{if .State.Health}}{{.State.Health.Status}}{{else}}none{{end}} {{index .Config.Labels "com.docker.compose.service"}} {{.State.ExitCode}}' "$1" \
        | sed 's#^/##'
}

do_wait() {
    local deadline=$((SECONDS + LAB_WAIT_TIMEOUT)) ids id name status health pending bad
    while :; do
        mapfile -t ids < <(lab_containers)
        [ "${#ids[@]}" -gt 0 ] || die "no lab containers are running"
        pending=() bad=() bad_ids=()
        for id in "${ids[@]}"; do
            read -r name status health service code < <(container_state "$id")
            if [ "$service" = "$ONE_SHOT" ]; then
                # The one-shot setup: done when it exited 0.
                case "$status" in
                    exited) [ "$code" = 0 ] || { bad+=("$name(exit $code)"); bad_ids+=("$id"); } ;;
                    created|running|restarting) pending+=("$name($status)") ;;
                    *) bad+=("$name($status)"); bad_ids+=("$id") ;;
                esac
            elif [ "$status" != running ] || [ "$health" = unhealthy ]; then
                bad+=("$name($status/$health)"); bad_ids+=("$id")
            elif [ "$health" != healthy ] && [ "$health" != none ]; then
                pending+=("$name($health)")
            fi
        done
        if [ "${#bad[@]}" -gt 0 ]; then
            log "not running, unhealthy or failed: ${bad[*]}"
            for id in "${bad_ids[@]}"; do
                read -r name _ < <(container_state "$id")
                log "---- last log lines of $name ----"
                docker logs --tail 30 "$id" 2>&1 | sed 's/^/    /' >&2
            done
            return 1
        fi
        if [ "${#pending[@]}" -eq 0 ]; then
            log "all ${#ids[@]} lab containers healthy or done"
            return 0
        fi
        if [ "$SECONDS" -ge "$deadline" ]; then
            log "timed out after ${LAB_WAIT_TIMEOUT}s waiting for: ${pending[*]}"
            return 1
        fi
        sleep 2
    done
}

do_status() {
    compose ps
    local id name status health service code ip
    while read -r id; do
        read -r name status health service code < <(container_state "$id")
        [ "$status" = exited ] && health="exit=$code"
        ip="$(docker inspect -f '{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}' "$id")"
        printf '  %-26s %-8s %-10s %s\n' "$name" "$status" "$health" "$ip"
    done < <(lab_containers)
    cat <<'EOF'
Published on 127.0.0.1 (defaults; LAB_*_PORT variables override); each admin
port also serves GET /ready and the message API /api/v1 (bearer token):
EOF
    if servers_on; then
        cat <<'EOF'
  sitea    SMTP 2510  admin 8510     (10.10.10.10, ServerA.SiteA.microsoft.com: SiteA's bridgehead)
  sitea-server1 SMTP 2511 admin 8511 (10.10.10.11, Server1.SiteA.microsoft.com: SiteA's second server)
           (docker/servers.override.yml: microsoft.com's MX are both servers, preference 10)
EOF
    else
        echo '  sitea    SMTP 2510  admin 8510     (10.10.10.10, Server1.SiteA.microsoft.com)'
    fi
    cat <<'EOF'
  siteb    SMTP 2515  admin 8515     (10.10.10.15, Server1.SiteB.microsoft.com)
  sitec    SMTP 2520  admin 8520     (10.10.10.20, Server1.SiteC.microsoft.com)
  internet SMTP 2600                 (10.10.10.100, mail.example.net: alice, bob)
  dns      5353 udp+tcp              (10.10.10.53, nsd: microsoft.com, example.net)
  console  http://127.0.0.1:8580/    (10.10.10.8, the web console: log in with the admin token)
EOF
}

do_smoke() {
    local mx port="${LAB_INTERNET_SMTP_PORT:-2600}" tag
    mx="$(compose exec -T internet dig +short MX microsoft.com | tr -d '\r')"
    [ -n "$mx" ] || die "smoke: the lab DNS gave no MX for microsoft.com"
    log "smoke: MX microsoft.com (asked from the internet container): $mx"
    tag="lab-smoke-$(date +%s)-$$"
    python3 - "$port" "$tag" <<'EOF'
import smtplib, sys
from email.message import EmailMessage
port, tag = int(sys.argv[1]), sys.argv[2]
msg = EmailMessage()
msg["From"], msg["To"], msg["Subject"] = "smoke@example.net", "alice@example.net", tag
msg.set_content("imsrelay lab smoke test\n")
with smtplib.SMTP("127.0.0.1", port, timeout=15) as s:
    s.send_message(msg)
EOF
    local i
    for i in $(seq 1 20); do
        if compose exec -T internet sh -c "grep -rlq '$tag' /home/alice/Maildir/new/" 2>/dev/null; then
            log "smoke: mail for alice@example.net delivered to /home/alice/Maildir/new/ ($tag)"
            return 0
        fi
        sleep 1
    done
    die "smoke: mail $tag not found in alice's Maildir"
}

cmd="${1:-}"
[ $# -gt 0 ] && shift
asked="${IMSRELAY_LAB_SERVERS+set}"
if [ -n "$asked" ]; then IMSRELAY_LAB_SERVERS="$(servers_option "$IMSRELAY_LAB_SERVERS")"; fi
if [ "$cmd" = up ] && [ "${1:-}" = --servers ]; then
    [ $# -ge 2 ] || die "up --servers: give SiteA=2"
    want="$(servers_option "$2")"
    shift 2
    if [ -n "$asked" ] && [ "$IMSRELAY_LAB_SERVERS" != "$want" ]; then
        die "--servers $want and IMSRELAY_LAB_SERVERS=$IMSRELAY_LAB_SERVERS disagree"
    fi
    IMSRELAY_LAB_SERVERS="$want" asked=set
fi
running="$(running_servers)"
if [ -z "$asked" ]; then
    # not asked: the topology of the lab that is there (status, logs, down ... see all of it)
    IMSRELAY_LAB_SERVERS="$running"
elif [ "$cmd" = up ] && [ -n "$(project_containers)" ] && [ "$IMSRELAY_LAB_SERVERS" != "$running" ]; then
    if [ -n "$running" ]; then running="two servers"; else running="one server"; fi
    die "this lab runs SiteA as $running, and its volumes belong to that topology: docker/lab.sh down -v first"
fi
export IMSRELAY_LAB_SERVERS
case "$cmd" in
    up)
        mapfile -t svcs < <(services_or_all "$@")
        check_site_configs "${svcs[@]}"
        check_subnet_free
        do_build "$@"
        t0=$SECONDS
        compose up -d --remove-orphans "${svcs[@]}"
        do_wait || { log "the lab did not come up healthy (docker/lab.sh logs; docker/lab.sh down)"; exit 1; }
        log "lab up in $((SECONDS - t0))s after the build"
        do_status
        ;;
    build) do_build "$@" ;;
    wait) do_wait ;;
    status) do_status ;;
    smoke) do_smoke ;;
    keys) do_keys ;;
    logs) compose logs "$@" ;;
    down)
        args=(down --remove-orphans)
        case "${1:-}" in -v|--volumes) args+=(--volumes) ;; "") ;; *) die "down: unknown option $1" ;; esac
        compose "${args[@]}"
        ;;
    compose)
        # Give compose the same base image choice as `up` without building anything.
        if [ -z "${IMSRELAY_BASE_IMAGE:-}" ] && [ "${IMSRELAY_LAB_PULL:-0}" != 1 ] && image_exists "$LOCAL_BASE"; then
            export IMSRELAY_BASE_IMAGE="$LOCAL_BASE"
        fi
        compose "$@"
        ;;
    ""|-h|--help|help) sed -n '2,45p' "$0" | sed 's/^# \{0,1\}//' ;;
    *) die "unknown command '$cmd' (try: docker/lab.sh help)" ;;
esac
