"""The GPU check: the reference setup on one GPU for a few hundred fp16 steps, then decode with the latent cache.

What the CPU suite cannot show: the real CUDA fp16 path (Fabric's 16-mixed with a GradScaler, SDPA kernels,
pinned-memory loading), its speed, and its memory. Runs `tml.train.loop.train` unchanged on the reference config
(12x768 post-LN MLA, block 512, batch 20 x 4 accumulation, 16-mixed), eagerly, for `--steps` optimizer steps,
reads the figures back from the run's TensorBoard scalars, times `generate` from the saved checkpoint (absorbed
and naive latent-cache decode), and prints one JSON object. `--variants` adds shorter runs that each change one thing:
torch.compile, the MHA baseline at the same width, GQA at MLA's cache, bf16 instead of fp16, DeepSpeed ZeRO-2
(its own fp16 engine), or Muon instead of AdamW.

    python benchmarks/gpu_check.py --books DIR [--steps 200] [--variants compiled,mha,bf16,muon,zero2] [--json FILE]
    python benchmarks/gpu_check.py --shards DIR ...   # already tokenized shards: no tokenizer files needed

`--allow-cpu` with small `--model.*` overrides runs the same code on CPU (the test suite does), so the script
is known to work before a GPU is at hand. Extra `--section.key value` arguments override the config.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from tml.config import Config, load_yaml_config  # noqa: E402
from tml.data.prepare import prepare_data  # noqa: E402
from tml.files import write_atomic  # noqa: E402
from tml.pretrained import load  # noqa: E402
from tml.train.checkpoint import checkpoints_dir  # noqa: E402
from tml.train.fabric import resolve_accelerator, resolve_precision  # noqa: E402
from tml.train.loop import train  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
WARMUP_LOG_WINDOWS = 2  # the first logged windows include CUDA context, cuBLAS and allocator warm-up
LOG_INTERVAL = 10  # steps per tokens/s window
MAX_BOOKS = 20  # ~10 MB of text: a few million tokens, tokenized in seconds, enough for 200 steps of 41k tokens
DECODE_PROMPT_TOKENS = 16
DECODE_NEW_TOKENS = 256
# Each variant changes one thing against the fp16 run, so its figures compare directly with the main ones.
VARIANTS: dict[str, list[str]] = {
    "compiled": ["--train.compile=true"],
    "mha": ["--model.attention=mha"],  # the MHA baseline at the same width and depth
    # GQA at MLA's cache budget (2 of the reference's 12 heads: 256 numbers a token a layer against MLA's 288)
    "gqa": ["--model.attention=mha", "--model.n_kv_head=2"],
    "bf16": ["--train.precision=bf16-mixed"],
    # DeepSpeed's own fp16 path (16-bit weights, its DynamicLossScaler) on one GPU, the reference's global batch
    "zero2": ["--train.strategy=deepspeed", "--train.zero_stage=2"],
    # Muon on the hidden matrices (Newton-Schulz in bf16 each step) under fp16's GradScaler: its step cost on a GPU
    "muon": ["--train.optimizer=muon"],
}


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--config", default=str(REPO_ROOT / "configs" / "reference.yaml"))
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--books", help="a directory of Gutenberg .txt files (the first 20 are used)")
    source.add_argument("--shards", help="a shard directory already built by tml-prepare")
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps of the fp16 run")
    parser.add_argument("--variants", default="", help=f"comma-separated, from {', '.join(VARIANTS)} (default none)")
    parser.add_argument("--variant-steps", type=int, default=60, help="optimizer steps of each variant run")
    parser.add_argument("--work", help="where shards and runs go (default: a new temporary directory)")
    parser.add_argument("--json", help="also write the JSON result to this file")
    parser.add_argument("--allow-cpu", action="store_true", help="run without CUDA (to test this script)")
    return parser.parse_known_args(argv)


def variant_names(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in VARIANTS]
    if unknown:
        raise SystemExit(f"gpu_check: unknown --variants {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    return names


def run_config(args: argparse.Namespace, overrides: list[str], work: Path, name: str, steps: int,
               extra: Sequence[str] = ()) -> Config:
    data = [f"--data.shard_dir={args.shards}"] if args.shards else [
        f"--data.source={args.books}", f"--data.max_books={MAX_BOOKS}", f"--data.shard_dir={work}/shards",
        f"--data.raw_dir={work}/raw"]
    return load_yaml_config(args.config, [
        *data, f"--train.max_steps={steps}", f"--train.val_interval={steps}", f"--train.ckpt_interval={steps}",
        "--train.val_batches=10", f"--train.log_interval={LOG_INTERVAL}", f"--train.out_dir={work}/{name}",
        "--train.resume=none", "--train.devices=1", "--log.wandb=false",
        "--train.compile=false",  # eager, as every variant but `compiled`: each changes one thing (reference compiles)
        *extra, *overrides,
    ])


def scalars(run_dir: Path, tag: str) -> list[float]:
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return [event.value for event in events.Scalars(tag)] if tag in events.Tags()["scalars"] else []


def median_after_warmup(values: list[float]) -> float | None:
    steady = values[WARMUP_LOG_WINDOWS:] or values
    return statistics.median(steady) if steady else None


def clear_run(work: Path, name: str) -> None:
    """A rerun with the same --work starts each run afresh (a fresh run refuses an out_dir holding checkpoints)."""
    shutil.rmtree(work / name, ignore_errors=True)


def train_and_measure(config: Config) -> dict:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = train(config)
    wall = time.perf_counter() - start
    run_dir = Path(config.train.out_dir)
    losses = scalars(run_dir, "train/loss")
    return {
        "precision": resolve_precision(config.train, resolve_accelerator(config.train)),  # as run: bf16 on CPU
        "compile": config.train.compile,
        "strategy": config.train.strategy if config.train.strategy != "deepspeed" else f"zero{config.train.zero_stage}",
        "attention": config.model.attention_kind,  # MLA, MHA, GQA or MQA
        "optimizer": config.train.optimizer,
        "steps": result.final_step,
        "tokens_per_step": config.train.batch_size * config.train.grad_accum * config.model.block_size,
        "tokens_per_s_median": median_after_warmup(scalars(run_dir, "train/tokens_per_s")),
        "mfu_median": median_after_warmup(scalars(run_dir, "train/mfu")),
        "peak_memory_gib": max(scalars(run_dir, "train/peak_memory_gib"), default=None),
        "train_loss_first": losses[0] if losses else None,
        "train_loss_last": losses[-1] if losses else None,
        "val_loss": result.val_loss,
        "val_perplexity": result.val_perplexity,
        "wall_s": round(wall, 1),
    }


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def decode_speed(run_dir: Path, device: torch.device) -> dict:
    """Tokens/s of greedy decode from the saved `last` checkpoint, absorbed vs naive latent-cache attention."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = load(checkpoints_dir(run_dir) / "last", device, dtype)
    new_tokens = min(DECODE_NEW_TOKENS, model.config.block_size - DECODE_PROMPT_TOKENS)
    prompt = torch.randint(0, model.config.vocab_size, (1, DECODE_PROMPT_TOKENS),
                           generator=torch.Generator().manual_seed(0)).to(device)
    figures: dict = {"dtype": str(dtype).removeprefix("torch."), "new_tokens": new_tokens}
    outputs = {}
    for absorb in (True, False):
        model.generate(prompt, 8, temperature=0.0, absorb=absorb)  # warm-up: kernels, allocator
        synchronize(device)
        start = time.perf_counter()
        outputs[absorb] = model.generate(prompt, new_tokens, temperature=0.0, absorb=absorb)
        synchronize(device)
        figures["absorbed_tokens_per_s" if absorb else "naive_tokens_per_s"] = round(
            new_tokens / (time.perf_counter() - start), 1)
    new = {absorb: tokens[:, DECODE_PROMPT_TOKENS:] for absorb, tokens in outputs.items()}  # not the prompt
    same = (new[True] == new[False])[0]
    figures["greedy_tokens_agree"] = float(same.float().mean())
    # One near-tie argmax flip in low precision changes every later token, so where they part says more.
    figures["greedy_first_difference"] = int(same.logical_not().nonzero()[0]) if not same.all() else None
    return figures


def prepare_shards(config: Config, prebuilt: bool) -> dict:
    if not prebuilt:
        prepare_data(config.data)
    return {"shard_dir": str(config.data.shard_dir), "prepared_here": not prebuilt}


def run_stage(report: dict, name: str, stage, json_path: str | None) -> bool:
    """Run one optional stage into report[name]; a failure is recorded (not raised), so the figures of the
    stages that worked still come back from a single GPU session. The JSON file is rewritten after each stage."""
    try:
        report[name] = stage()
        ok = True
    except Exception as error:  # any failure of a benchmark stage is a finding to report
        report[name] = {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()[-4000:]}
        ok = False
    if json_path:
        write_atomic(Path(json_path), (json.dumps(report, indent=1) + "\n").encode())
    return ok


def main(argv: list[str] | None = None) -> dict:
    """Run the check; exits non-zero (after printing the JSON) when a stage failed."""
    args, overrides = parse_args(argv)
    variants = variant_names(args.variants)  # a typo fails here, not after the main run
    cuda = torch.cuda.is_available()
    if not cuda and not args.allow_cpu:
        sys.exit("gpu_check: no CUDA device visible (pass --allow-cpu to run the script on CPU anyway)")
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="tml-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)

    config = run_config(args, overrides, work, "fp16", args.steps)
    device = torch.device("cuda" if cuda else "cpu")
    report = {
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "torch": torch.__version__,
        "model": {key: getattr(config.model, key) for key in ("n_layer", "n_head", "n_embd", "attention", "norm",
                                                               "kv_lora_rank", "block_size")},
    }
    # A stage too, so a data problem (no books, no tokenizer files on an offline GPU machine) still comes back as JSON.
    ok = run_stage(report, "data", lambda: prepare_shards(config, prebuilt=bool(args.shards)), args.json)
    if not ok:
        print(json.dumps(report, indent=1))
        sys.exit("gpu_check: the data could not be prepared; the error and traceback are in the JSON above")
    clear_run(work, "fp16")
    ok = run_stage(report, "run", lambda: train_and_measure(config), args.json)
    if ok:
        ok = run_stage(report, "decode", lambda: decode_speed(Path(config.train.out_dir), device), args.json)
    for name in variants:
        variant = run_config(args, overrides, work, name, args.variant_steps, VARIANTS[name])
        clear_run(work, name)
        ok = run_stage(report, f"{name}_run", lambda config=variant: train_and_measure(config), args.json) and ok
    print(json.dumps(report, indent=1))
    if not ok:
        sys.exit("gpu_check: a stage failed; its error and traceback are in the JSON above")
    return report


if __name__ == "__main__":
    main()
