#!/usr/bin/env bash
# GPU check (about 3 minutes on an H200): the reference config (configs/reference.yaml: 12x768 post-LN MLA, block
# 512, batch 20 x 4 accumulation, fp16 mixed precision), eagerly, for 200 optimizer steps on one GPU, greedy decode
# from its checkpoint with the latent KV cache, then 60 steps each compiled and as MHA; prints JSON with tokens/s,
# MFU (against the datasheet peak in tml/train/throughput.py) and peak GPU memory. Details: gpu_check.py.
# All five variants (about 5 minutes in all): TML_GPU_CHECK_VARIANTS=compiled,mha,bf16,muon,zero2 (zero2 last: it
# starts a process group in this process). PYTHON=... picks the interpreter (default python3).
# Data: 20 books from ../shared/data/gutenberg or ./shared/data/gutenberg (or TML_GPU_CHECK_BOOKS=DIR): no network.
#   bash benchmarks/gpu_check.sh [--section.key value ...]   (the JSON also goes to gpu_check.json, or
#   TML_GPU_CHECK_JSON=FILE, rewritten after each stage: what finished survives a crash later on)
set -euo pipefail
cd "$(dirname "$0")/.."
BOOKS="${TML_GPU_CHECK_BOOKS:-}"
for candidate in ../shared/data/gutenberg shared/data/gutenberg; do
  if [ -z "$BOOKS" ] && [ -d "$candidate" ]; then BOOKS="$candidate"; fi
done
if [ -z "$BOOKS" ]; then echo "gpu_check: no Gutenberg books found; set TML_GPU_CHECK_BOOKS=DIR" >&2; exit 1; fi
exec "${PYTHON:-python3}" benchmarks/gpu_check.py --books "$BOOKS" --variants "${TML_GPU_CHECK_VARIANTS:-compiled,mha}" \
  ${TML_GPU_CHECK_STEPS:+--steps "$TML_GPU_CHECK_STEPS"} \
  ${TML_GPU_CHECK_VARIANT_STEPS:+--variant-steps "$TML_GPU_CHECK_VARIANT_STEPS"} \
  ${TML_GPU_CHECK_DIR:+--work "$TML_GPU_CHECK_DIR"} --json "${TML_GPU_CHECK_JSON:-gpu_check.json}" "$@"
