# syntax=docker/dockerfile:1
# The RefundSaga worker image. The same image runs the one-shot `migrate` service, the
# `webhooks` receiver and, for a staging run, the processor and AMS sandboxes (see
# docker-compose.yml).
#
#   docker build -t refundsaga-worker .
#
# No secrets are baked in: every setting comes from REFUND_* environment variables at run time.
# Both stages use the same pinned base, so the virtualenv's interpreter links stay valid.

# --- build: install the project and its runtime dependencies into a virtualenv ---------------
FROM python:3.11.15-slim-bookworm AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/venv

WORKDIR /src
# Only what `pip install .` needs; .dockerignore keeps .env, .git, .venv and tests out anyway.
COPY pyproject.toml README.md *.py ./
COPY refundsaga ./refundsaga
COPY workflows ./workflows
COPY activities ./activities
COPY console ./console
COPY sandboxes ./sandboxes

# Runtime dependencies only: no `[dev]` extra.
RUN /opt/venv/bin/pip install .
# The workflow sandbox re-imports the workflow modules for every run: ship their bytecode so
# a run does not recompile them (PYTHONDONTWRITEBYTECODE keeps them from being written later).
RUN /opt/venv/bin/python -m compileall -q /opt/venv/lib/python3.11/site-packages

# --- runtime: the virtualenv and the entry point, run as an unprivileged user ----------------
FROM python:3.11.15-slim-bookworm AS runtime

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    REFUND_DATA_DIR=/data

RUN groupadd --system --gid 10001 refund \
    && useradd --system --uid 10001 --gid refund --home-dir /app --no-create-home \
        --shell /usr/sbin/nologin refund \
    && mkdir -p /app /data \
    && chown refund:refund /data

COPY --from=build /opt/venv /opt/venv

WORKDIR /app
COPY worker.py ./

USER 10001:10001

# worker.py handles SIGTERM: it stops polling and gives in-flight activities 30 s to finish,
# so give the container longer than that to stop (compose: stop_grace_period).
STOPSIGNAL SIGTERM
CMD ["python", "worker.py"]
