# syntax=docker/dockerfile:1
# The dit-serve HTTP API: FastAPI + uvicorn and the API dependencies of pyproject.toml only (none of the
# [worker] extra's machine-learning or GPU libraries). Build from the repository root:
#   docker build -f docker/api.Dockerfile -t dit-serve-api .
ARG PYTHON_IMAGE=python:3.11-slim

# ---- build: a virtual environment with the package and its API dependencies ----
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src

# Dependencies first, in their own layer, so that a code change does not reinstall them: the
# [project] dependencies of pyproject.toml, without any extra.
COPY pyproject.toml README* ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install --no-cache-dir -r /tmp/requirements.txt

# Then the code; `pip install .` without the [worker] extra, dependencies already in place.
COPY app ./app
COPY worker ./worker
COPY models ./models
COPY dit_serve ./dit_serve
COPY evaluation ./evaluation
COPY cli ./cli
RUN pip install --no-cache-dir --no-deps .

# ---- runtime ----
FROM ${PYTHON_IMAGE}
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    DIT_HOST=0.0.0.0 \
    DIT_PORT=8000 \
    DIT_DATA_DIR=/data \
    DIT_OUTPUT_DIR=/data/outputs

# A fixed non-root uid/gid, the same as the worker image's, so both can share the outputs volume.
RUN groupadd --system --gid 10001 dit \
    && useradd --system --uid 10001 --gid dit --create-home --home-dir /home/dit --shell /usr/sbin/nologin dit \
    && mkdir -p /data/outputs \
    && chown -R dit:dit /data
COPY --from=build /opt/venv /opt/venv

USER dit
WORKDIR /home/dit
EXPOSE 8000

# Liveness only (/readyz stays 503 until a worker is live, which is not the API's fault).
# python:3.11-slim has no curl, hence urllib; a non-2xx answer raises, so the check fails.
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('DIT_PORT', '8000'), timeout=4)"]

CMD ["dit-serve", "api"]
