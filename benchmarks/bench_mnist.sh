#!/usr/bin/env bash
# The bench of docs/benchmarks.md: baseline, the shipped accelerated policies and their matched-FLOPs
# fewer-steps baselines on mar_mnist, interleaved, median of 5 after warm-up. Pass --eval to add
# FID / class accuracy per row (marcache.evaluation), extra arguments are forwarded.
set -euo pipefail
cd "$(dirname "$0")/.."
CKPT=${CKPT:-}   # empty: the model's shipped weights
exec .venv/bin/marcache bench --model mar_mnist ${CKPT:+--checkpoint "$CKPT"} \
  --policy gtr --policy gtr_fts --policy recap \
  --batch-size 64 --repeats 5 --threads 1 --out docs/bench_mar_mnist "$@"
