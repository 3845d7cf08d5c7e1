# syntax=docker/dockerfile:1.7
# aqua-pipeline: `python -m pipeline serve` as a non-root user; configuration comes only from AQUA_PIPELINE_* env vars.
# Build:  docker build -t aqua-pipeline .        Run:  docker run -p 8080:8080 --env-file prod.env aqua-pipeline
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- builder: a self-contained venv at /opt/venv, made by the same script the container test runs -----------------
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHON=python3
WORKDIR /src
# A C compiler for the CSV verifier's extension (pipeline/_csvscan.c); only this stage has it. DL3008 (pin apt
# versions) is ignored: the compiler comes with the base image's Debian release and never reaches the runtime image.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
COPY pyproject.toml README.md ./
COPY pipeline ./pipeline
COPY infra/docker-install.sh ./infra/docker-install.sh
# The pip cache lives in a BuildKit cache mount, so it speeds up rebuilds without ending up in any layer.
RUN --mount=type=cache,target=/root/.cache/pip sh infra/docker-install.sh /opt/venv /src

# ---- runtime: the interpreter, the venv, nothing else ---------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="aqua-pipeline" \
      org.opencontainers.image.description="Zuora AQuA export callbacks -> S3, manifests and completion events" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 pipeline \
    && useradd --system --uid 10001 --gid pipeline --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin pipeline
COPY --from=builder /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    AQUA_PIPELINE_HTTP__HOST=0.0.0.0 \
    AQUA_PIPELINE_HTTP__PORT=8080 \
    AQUA_PIPELINE_LOG_FORMAT=json
USER 10001:10001
EXPOSE 8080
# SIGTERM makes the service shut down gracefully (readiness off, drain, stop accepting, hand back unfinished jobs).
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('AQUA_PIPELINE_HTTP__PORT', '8080'), timeout=4).close()"]
ENTRYPOINT ["python", "-m", "pipeline"]
CMD ["serve"]
