#!/usr/bin/env bash
# The whole service on one H100 or H200 in one prepared run of at most 8 minutes (bench/gpu_service.py):
# DiT-XL/2-256 from its config with random weights, bf16; the sampler alone at the service's batch and
# at batch 32 with the whole transformer compiled (MFU); API + worker (--compile default) + Redis under
# 64 closed-loop clients (service ÷ sampler images/s), with cache: "auto" (speed-up), and static against
# continuous batching under Poisson arrivals at 50% and 90% of the measured capacity (p99).
# PYTHON picks the interpreter (python3). Results go to $OUT/gpu-service.json as each stage ends,
# worker and API logs to $OUT/gpu-service-logs/.
# Extra flags go to bench/gpu_service.py (later ones win); on a CPU: `bench/gpu.sh --tiny --device cpu
# --dtype fp32` runs every stage with a 2-layer DiT and a tiny workload.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-bench/results}"
mkdir -p "$out"
exec "${PYTHON:-python3}" -m bench.gpu_service --device cuda --dtype bf16 --json "$out/gpu-service.json" "$@"
