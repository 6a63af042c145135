# syntax=docker/dockerfile:1
# A dit-serve batching worker: `pip install '.[worker]'` on top of an official PyTorch CUDA image, whose
# torch it keeps (pyproject's range ">=2.3,<2.15" accepts it; a constraint pins it so pip can only
# fail, never download a second torch). Build from the repository root:
#   docker build -f docker/worker.Dockerfile -t dit-serve-worker .
# torch 2.9 because current diffusers releases want torch >= 2.6; the image's Python is >= 3.11, as the
# project needs. CUDA 12.8 needs a recent host driver; for an older one, or another torch:
#   --build-arg BASE_IMAGE=pytorch/pytorch:<torch>-cuda<x.y>-cudnn9-runtime
ARG BASE_IMAGE=pytorch/pytorch:2.9.1-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    DIT_DATA_DIR=/data \
    DIT_OUTPUT_DIR=/data/outputs \
    DIT_DEVICE=auto \
    DIT_METRICS_HOST=0.0.0.0 \
    DIT_METRICS_PORT=9400 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
WORKDIR /opt/dit-serve

# Dependencies first, in their own layer: the [project] dependencies plus the [worker] extra, with the
# installed torch pinned as a constraint.
COPY pyproject.toml README* ./
RUN python -c "import importlib.metadata as m; print('torch==' + m.version('torch'))" > /tmp/constraints.txt \
    && python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; print('\n'.join(p['dependencies'] + p['optional-dependencies']['worker']))" \
        > /tmp/requirements.txt \
    && pip install --no-cache-dir -c /tmp/constraints.txt -r /tmp/requirements.txt \
    && python -c "import torch, diffusers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'diffusers', diffusers.__version__)"

COPY app ./app
COPY worker ./worker
COPY models ./models
COPY dit_serve ./dit_serve
COPY evaluation ./evaluation
COPY cli ./cli
RUN pip install --no-cache-dir --no-deps .

# Non-root, the same uid/gid as the API image so both can write the shared outputs volume.
RUN groupadd --system --gid 10001 dit \
    && useradd --system --uid 10001 --gid dit --create-home --home-dir /home/dit --shell /usr/sbin/nologin dit \
    && mkdir -p /data/outputs \
    && chown -R dit:dit /data
USER dit
WORKDIR /home/dit

# With no DIT_MODELS the worker serves the bundled models, which ship inside the package. Real
# checkpoints: mount them read-only elsewhere (e.g. /models) and set
# DIT_MODELS='["my-dit=/models/DiT-XL-2-256"]'. Outputs (local storage) go to /data/outputs, which
# compose mounts as a named volume shared with the API.
VOLUME ["/data"]
# Prometheus metrics of this worker (DIT_METRICS_PORT); docker/prometheus/prometheus.yml scrapes it.
EXPOSE 9400

# Healthy when this container's worker is registered in Redis (`dit:workers`, a sorted set of worker
# name -> expiry time, refreshed by its heartbeat thread). Worker names start with the hostname, which
# is the container id, so each replica checks itself (or DIT_WORKER_NAME, when set).
HEALTHCHECK --interval=15s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python", "-c", "import os, socket, sys, time, redis; from dit_serve.catalog import WORKERS_KEY; me = os.environ.get('DIT_WORKER_NAME'); r = redis.Redis.from_url(os.environ['REDIS_URL'], socket_timeout=3, socket_connect_timeout=3); live = [n.decode() for n in r.zrangebyscore(WORKERS_KEY, time.time(), '+inf')]; sys.exit(0 if any(n == me if me else n.startswith(socket.gethostname() + '.') for n in live) else 1)"]

CMD ["dit-serve", "worker"]
