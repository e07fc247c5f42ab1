# imsrelay site image: one container = one Exchange 5.5 site's IMS.
#
#   docker build -t imsrelay:lab .                                   # can pull
#   docker build --build-arg BASE_IMAGE=imsrelay-base:bookworm \
#                -t imsrelay:lab .                                   # cannot pull
#
# BASE_IMAGE: any Debian-like image with CPython 3.11 and its venv module:
# python:3.11-slim-bookworm from a registry, or imsrelay-base:bookworm built
# locally by docker/build-base-image.sh (no registry needed).
#
# Install: from the wheels that docker/build-wheels.sh put in docker/wheels/
# (dependencies) and docker/wheels/self/ (imsrelay), with no network needed during
# the build, when they are there; otherwise a normal `pip install` of the source
# tree, which needs PyPI from inside the build. Dependencies and imsrelay are two
# layers: a code change reinstalls only imsrelay.
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PATH=/opt/imsrelay/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

# An unprivileged user owns the data directory; the SMTP port (25) is bound
# thanks to net.ipv4.ip_unprivileged_port_start=0 (Docker's default since 20.10,
# and set explicitly in docker-compose.yml).
RUN set -eu; \
    useradd --system --user-group --home-dir /var/lib/imsrelay --no-create-home \
            --shell /usr/sbin/nologin imsrelay; \
    install -d -o imsrelay -g imsrelay -m 0750 /var/lib/imsrelay; \
    install -d -m 0755 /etc/imsrelay

# IMAP4 and POP3 (imsrelay/access): Dovecot, run by the site as its own user.
# Already in imsrelay-base:bookworm (docker/build-base-image.sh); else from Debian.
RUN set -eu; \
    if [ ! -x /usr/lib/dovecot/imap ] || [ ! -x /usr/lib/dovecot/pop3 ]; then \
        apt-get update; \
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends dovecot-imapd dovecot-pop3d; \
        rm -rf /var/lib/apt/lists/*; \
    fi; \
    dovecot --version

# The wheel directories are optional: a wildcard that matches nothing is
# allowed as long as another source (pyproject.toml) exists.
COPY pyproject.toml docker/wheels/*.whl /tmp/wheels/
RUN set -eu; \
    python3 -m venv /opt/imsrelay; \
    if ls /tmp/wheels/*.whl >/dev/null 2>&1; then \
        echo "installing the dependencies from host-built wheels"; \
        pip install --no-index /tmp/wheels/*.whl; \
    fi; \
    rm -rf /tmp/wheels

COPY pyproject.toml docker/wheels/self/*.whl /tmp/self/
COPY pyproject.toml README.m[d] /tmp/src/
COPY imsrelay/ /tmp/src/imsrelay/
RUN set -eu; \
    if ls /tmp/self/imsrelay-*.whl >/dev/null 2>&1; then \
        echo "installing imsrelay from the host-built wheel"; \
        pip install --no-index --no-deps /tmp/self/imsrelay-*.whl; \
        pip check; \
    else \
        echo "no wheels in docker/wheels/: installing from source with PyPI"; \
        pip install /tmp/src; \
    fi; \
    rm -rf /tmp/self /tmp/src; \
    imsrelay --version

USER imsrelay
WORKDIR /var/lib/imsrelay
EXPOSE 25 110 143 465 587 993 995 8025

# Logs: key=value lines a person can read (docker logs); IMSRELAY_LOG_FORMAT=json
# in the environment gives one JSON object per line for a log collector.
# Healthy when the site is ready: GET /ready on the admin endpoint answers 200
# (listening, spool recovered, directory provisioned); 503 or no answer: not yet.
HEALTHCHECK --interval=2s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request as u; u.build_opener(u.ProxyHandler({})).open('http://127.0.0.1:8025/ready', timeout=4)"]

ENTRYPOINT ["imsrelay"]
CMD ["serve", "--config", "/etc/imsrelay/site.toml"]
