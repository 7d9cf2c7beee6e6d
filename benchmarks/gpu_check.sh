#!/usr/bin/env bash
# GPU check (< 5 minutes on one modern GPU): the reference config (configs/reference.yaml: 12x768x12 post-LN MLA,
# block 512, batch 20 x 4 accumulation, fp16 mixed precision) for 200 optimizer steps on one GPU; prints JSON with
# tokens/s, MFU (against the datasheet peak in tml/train/throughput.py) and peak GPU memory.
# Data: 20 books from ../shared/data/gutenberg or ./shared/data/gutenberg (or TML_GPU_CHECK_BOOKS=DIR): no network.
#   bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
BOOKS="${TML_GPU_CHECK_BOOKS:-}"
for candidate in ../shared/data/gutenberg shared/data/gutenberg; do
  if [ -z "$BOOKS" ] && [ -d "$candidate" ]; then BOOKS="$candidate"; fi
done
if [ -z "$BOOKS" ]; then echo "gpu_check: no Gutenberg books found; set TML_GPU_CHECK_BOOKS=DIR" >&2; exit 1; fi
WORK="${TML_GPU_CHECK_DIR:-$(mktemp -d)}"
STEPS="${TML_GPU_CHECK_STEPS:-200}"
python - "$BOOKS" "$WORK" "$STEPS" <<'PY'
import json, statistics, sys, time
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tml.config import load_yaml_config
from tml.data.prepare import prepare_data
from tml.train.loop import train

books, work, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
if not torch.cuda.is_available():
    sys.exit("gpu_check: no CUDA device visible")
config = load_yaml_config("configs/reference.yaml", [
    f"--data.source={books}", "--data.max_books=20", f"--data.shard_dir={work}/shards", f"--data.raw_dir={work}/raw",
    f"--train.max_steps={steps}", "--train.val_interval=100000", "--train.ckpt_interval=100000",
    "--train.val_batches=10", "--train.log_interval=10", f"--train.out_dir={work}/run", "--train.resume=none",
    "--train.devices=1", "--log.wandb=false",
])
prepare_data(config.data)
start = time.perf_counter()
result = train(config)
wall = time.perf_counter() - start
events = EventAccumulator(f"{work}/run/tensorboard")
events.Reload()
def values(tag):
    return [e.value for e in events.Scalars(tag)] if tag in events.Tags()["scalars"] else []
tokens_per_s = values("train/tokens_per_s")[2:]  # the first windows include CUDA warm-up
mfu = values("train/mfu")[2:]
print(json.dumps({
    "gpu": torch.cuda.get_device_name(0),
    "precision": config.train.precision,
    "steps": result.final_step,
    "tokens_per_step": config.train.batch_size * config.train.grad_accum * config.model.block_size,
    "tokens_per_s_median": statistics.median(tokens_per_s) if tokens_per_s else None,
    "mfu_median": statistics.median(mfu) if mfu else None,
    "peak_memory_gib": max(values("train/peak_memory_gib"), default=None),
    "train_loss_last": values("train/loss")[-1],
    "val_loss": result.val_loss,
    "val_perplexity": result.val_perplexity,
    "wall_s_train": round(wall, 1),
}, indent=1))
PY
