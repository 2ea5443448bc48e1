# The dispatcher service. Other services run from the same image with another command, e.g.
#   docker run ... ops-pipeline signal-engine
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
# Production points DATABASE_URL at RDS; without it an embedded Postgres is started under /app/.pgdata.
ENV OPS_PIPELINE_DATA_DIR=/home/ops/.pgdata
ENTRYPOINT ["python", "-m", "services.dispatcher"]
