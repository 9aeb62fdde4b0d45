# syntax=docker/dockerfile:1
# The exchange relay role: RabbitMQ queues -> AMQP exchanges. No redis, no hiredis.
#   docker build -f docker/exchange-relay.Dockerfile -t message-proxy/exchange-relay .
# stream-bridge.Dockerfile is this file with the role's lines changed (a test keeps them in step);
# docs/IMAGES.md has the reasons and the measured sizes.

# One pinned base for both stages: the venv's python symlink and its bytecode point into it.
ARG PYTHON_IMAGE=python:3.12.12-alpine3.23

FROM ${PYTHON_IMAGE} AS builder
ARG UV_VERSION=0.13.9
# Bytecode is written only by slim-venv.sh (-OO, into the venv's pycache/, which is where the
# runtime looks for the stdlib's too: the base image ships no .pyc at all).
ENV UV_NO_CACHE=1 \
    UV_COMPILE_BYTECODE=0 \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=never \
    UV_PYTHON=/usr/local/bin/python3.12 \
    UV_PROJECT_ENVIRONMENT=/app/.venv \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONPYCACHEPREFIX=/app/.venv/pycache
WORKDIR /app
# strip (binutils) lives in this stage only
RUN apk add --no-cache binutils \
    && pip install --no-cache-dir --root-user-action=ignore "uv==${UV_VERSION}"

# Dependencies first: this layer is rebuilt only when the lock changes.
COPY pyproject.toml uv.lock ./
RUN uv sync --locked --no-dev --no-editable --no-install-project --extra speed

# Then the project itself, installed (not editable) and slimmed in one step. The modules named
# after the venv are imported once slimmed: what the worker imports as it starts (the CLI imports
# lazily; encodings.idna on its first connection, the HEALTHCHECK's too), so that a broken venv
# fails here and their stdlib bytecode is cached.
COPY docker/slim-venv.sh /usr/local/bin/slim-venv
COPY README.md ./
COPY proxy ./proxy
COPY workers ./workers
RUN uv sync --locked --no-dev --no-editable --extra speed \
    && sh /usr/local/bin/slim-venv --system-caches /app/.venv \
        workers.exchange_relay proxy.worker proxy.sidecar proxy.logs \
        proxy.sinks.amqp_exchange uvloop proxy.probe encodings.idna

FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="message-proxy exchange-relay" \
      org.opencontainers.image.description="RabbitMQ queues to AMQP exchanges, at-least-once"
ENV PATH=/app/.venv/bin:$PATH \
    PYTHONOPTIMIZE=2 \
    PYTHONPYCACHEPREFIX=/app/.venv/pycache \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONSAFEPATH=1 \
    PYTHONUNBUFFERED=1 \
    MESSAGE_PROXY_CONFIG=/etc/message-proxy/config.toml
COPY --from=builder /app/.venv /app/.venv
# nobody: a numeric user needs no passwd entry and no layer
USER 65534
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
    CMD ["/app/.venv/bin/python", "-m", "proxy.probe"]
ENTRYPOINT ["/app/.venv/bin/python", "-m", "workers.exchange_relay"]
