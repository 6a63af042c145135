#!/usr/bin/env bash
# DiT-XL/2 256², 50 steps with CFG, batch 1/8/16/32/64, eager and compiled, on one H100 or H200:
# images/s and MFU, in a few minutes. Extra flags go to bench/gpu.py (later ones win), for example
# `bench/gpu.sh --tiny --device cpu --dtype fp32 --steps 2 --batches 1 2 --modes none` on a CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-bench/results}"
mkdir -p "$out"
exec python3 -m bench.gpu --device cuda --dtype bf16 --steps 50 --batches 1 8 16 32 64 \
  --modes none default reduce-overhead --json "$out/gpu.json" "$@"
