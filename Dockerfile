# token-proxy container image.
#
#   docker build -t token-proxy:0.1.0 .
#   docker network create token-proxy
#   docker run --rm --network token-proxy -p 127.0.0.1:8080:8080 --stop-timeout 20 \
#     -e TOKEN_PROXY_CLIENT_ID=... -e TOKEN_PROXY_ALLOW_ANONYMOUS_REMOTE=true \
#     -v "$PWD/secrets/token_proxy_client_secret:/run/secrets/token_proxy_client_secret:ro" \
#     token-proxy:0.1.0
#
# Both stages use the same base image, tag-pinned, so the virtual environment built in the
# first one runs unchanged in the second. Where builds must be reproducible, pin the digest
# as well (python:3.11.15-slim-bookworm@sha256:...), and bump both FROM lines together.

FROM python:3.11.15-slim-bookworm AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /src
RUN python -m venv /opt/venv
COPY pyproject.toml README.md ./
COPY proxy ./proxy
# Every dependency ships manylinux wheels, so the builder needs no compiler either; the wheel
# is built first so that only the installed package, not the source tree, reaches the venv.
# The `speed` extra brings uvloop and orjson, as `make run` does.
RUN /opt/venv/bin/pip wheel --no-deps --wheel-dir /wheels . \
    && /opt/venv/bin/pip install "$(echo /wheels/*.whl)[speed]" \
    && /opt/venv/bin/python -m compileall -q /opt/venv/lib


FROM python:3.11.15-slim-bookworm

# A fixed numeric UID/GID, so Kubernetes' runAsNonRoot can verify it and secret files can be
# made readable for it (fsGroup 10001, or `chown 10001` on the host).
RUN groupadd --system --gid 10001 token-proxy \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin token-proxy

COPY --from=builder /opt/venv /opt/venv

# TOKEN_PROXY_HOST=0.0.0.0: a proxy on the container's loopback could only serve processes
# sharing its network namespace, so the image listens on every interface. The proxy then
# refuses to start (exit 2, with a message saying so) unless [[clients]] team keys are
# configured or TOKEN_PROXY_ALLOW_ANONYMOUS_REMOTE=true says the network around the container
# is private (published only on the host's loopback, -p 127.0.0.1:8080:8080, on a Docker
# network that no untrusted container joins). A sidecar
# sharing the app's network namespace (network_mode: service:..., a Kubernetes Pod) should set
# TOKEN_PROXY_HOST=127.0.0.1 instead, which needs neither. Being an environment variable, it
# outranks `host` in a TOML file: change the address with TOKEN_PROXY_HOST or --host.
# DL3064 reads "TOKEN" in the name as a secret; the value is a listen address.
# hadolint ignore=DL3064
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    TOKEN_PROXY_HOST=0.0.0.0

# Secrets: mount files under /run/secrets (the default TOKEN_PROXY_SECRETS_DIR when it exists),
# e.g. /run/secrets/token_proxy_client_secret, or point TOKEN_PROXY_CLIENT_SECRET_FILE at one.
USER 10001:10001
EXPOSE 8080
# On SIGTERM the proxy lets requests in flight finish for shutdown_timeout (15 s by default),
# cuts off the rest and exits within about a second more: Docker's default of 10 s before it
# kills is too short, so run it with --stop-timeout 20 (compose: stop_grace_period: 20s).
STOPSIGNAL SIGTERM

# `token-proxy health --ready` loads the settings as `run` does (environment, secrets
# directory, TOKEN_PROXY_CONFIG) and asks /-/ready on the port they give, on loopback; there
# is no curl in the image. A --port given to `run` on the command line must be given here too
# (docker run --health-cmd 'token-proxy health --ready --port 9000').
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["token-proxy", "health", "--ready"]

ENTRYPOINT ["token-proxy"]
CMD ["run"]
