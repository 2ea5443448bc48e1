# One image for every service: the entry point is the `ops-pipeline` command line and the
# command names the service (default: the dispatcher), e.g.
#   docker run ... ops-pipeline                       # dispatcher
#   docker run ... ops-pipeline signal-engine
#   docker run ... ops-pipeline status --json         # an operator command, same image
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1

RUN useradd --create-home --uid 10001 ops
WORKDIR /app
COPY pyproject.toml README.md ./
COPY services ./services
COPY migrations ./migrations
COPY config ./config
RUN pip install -e .

USER ops
# Production points DATABASE_URL at RDS; without it an embedded Postgres is started under the data dir.
ENV OPS_PIPELINE_DATA_DIR=/home/ops/.pgdata
# /healthz, /readyz and /metrics of the long-running services.
ENV OPS_METRICS_PORT=9108
EXPOSE 9108
# Liveness: the service's loop went round recently. An operator command run from this image
# has no server; its container is not long-lived enough for a check to matter.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('OPS_METRICS_PORT', '9108'), timeout=4)" || exit 1
ENTRYPOINT ["ops-pipeline"]
CMD ["dispatcher"]
