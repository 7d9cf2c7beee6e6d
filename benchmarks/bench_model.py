"""Model benchmark: KV-cache size, CPU decode speed (MLA absorbed / MLA naive / GQA / MHA), tiny train-step speed.

GQA is grouped-query attention with as many key/value heads as fit in MLA's cache (TransMLA's comparison: the
two at an equal cache budget).

Prints one JSON object. Run: python benchmarks/bench_model.py [--dtype float32|bfloat16] [--decode-steps N] [--threads N]
Your own model shape: add `--config FILE [--model.key value ...]`; the KV-cache and decode figures are then those
of that shape (MLA and MHA at its width, contexts up to its block_size) and the train-step part is left to
benchmarks/bench_train.py, which times a config's training. Without --config: the issue's reference shape.
On a machine shared with other jobs use --threads 1: OpenMP threads that wait on a busy core slow torch down
many times over.
Figures from a shared machine vary run to run; compare the ratios within one run.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without installing

import torch  # noqa: E402

from tml.config import ConfigError, load_yaml_config  # noqa: E402
from tml.model import ModelConfig, ModelConfigError, Transformer  # noqa: E402
from tml.model.kv_cache import KVCache, LatentCache, mha_numbers_per_token  # noqa: E402

# The reference model of the issue: GPT-2 small's shape, MLA with a 256-wide latent and a 32-dim RoPE key.
REFERENCE_SHAPE = dict(n_layer=12, n_head=12, n_embd=768, kv_lora_rank=256, qk_rope_head_dim=32,
                       qk_nope_head_dim=64, v_head_dim=64)
CONTEXTS = (256, 1024, 2048)  # cached tokens before the timed decode steps
WARMUP_STEPS = 1  # untimed decode steps per mode and context (first-call allocations, cache warm-up)
DEFAULT_DECODE_STEPS = 7  # timed steps per mode and context (median): enough to be steady, short on 2 busy cores
# A tiny training shape that does not depend on configs/ (which may change): what a CPU smoke run could train.
TINY_SHAPE = dict(n_layer=4, n_head=4, n_embd=256, block_size=256, kv_lora_rank=128)
TINY_BATCH = 8
TINY_YAML = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
TRAIN_SHAPE_FIELDS = ("n_layer", "n_head", "n_embd", "block_size", "kv_lora_rank", "qk_nope_head_dim",
                      "qk_rope_head_dim", "v_head_dim")
TRAIN_WARMUP_STEPS, TRAIN_TIMED_STEPS = 1, 4
CACHE_GOAL_FRACTION = 1 / 5  # the goal: MLA's cache at most a fifth of MHA's


def reference_shape() -> ModelConfig:
    # One position past the longest context: each timed step decodes the token after `context` cached ones.
    return ModelConfig(**REFERENCE_SHAPE, block_size=max(CONTEXTS) + 1)


def contexts_for(shape: ModelConfig) -> list[int]:
    """The CONTEXTS that fit the block, plus the longest one that does (block_size - 1 cached, one decoded)."""
    return sorted({c for c in CONTEXTS if c < shape.block_size} | {shape.block_size - 1})


def equal_cache_gqa(shape: ModelConfig) -> ModelConfig | None:
    """The shape as GQA with the most key/value heads (a divisor of n_head) whose cache fits in MLA's; None when
    not even one head fits, or MHA's head dim is odd."""
    mla_numbers = LatentCache.numbers_per_token(shape)
    head_dim = shape.mha_head_dim
    fitting = [k for k in range(1, shape.n_head) if shape.n_head % k == 0 and 2 * k * head_dim <= mla_numbers]
    if not fitting:
        return None
    try:
        return replace(shape, attention="mha", n_kv_head=max(fitting))
    except ModelConfigError:
        return None


def attention_variants(shape: ModelConfig) -> dict[str, ModelConfig]:
    """The shape as MLA, as GQA at MLA's cache budget and as MHA of the same width; GQA and MHA are left out where
    their head dim is odd (RoPE needs pairs)."""
    variants = {"mla": replace(shape, attention="mla", n_kv_head=0)}
    if (gqa := equal_cache_gqa(shape)) is not None:
        variants["gqa"] = gqa
    try:
        variants["mha"] = replace(shape, attention="mha", n_kv_head=0)
    except ModelConfigError:
        pass
    return variants


def build_model(config: ModelConfig, dtype: torch.dtype) -> Transformer:
    torch.manual_seed(0)
    return Transformer(config).to(dtype).eval()


@torch.no_grad()
def timed_decode_step(model: Transformer, cache: list, context: int, absorb: bool) -> float:
    """Seconds for one batch-1 decode step with exactly `context` tokens cached.

    The prefilled cache is rewound to `context` first: attention is causal, so its prefix is exactly what a
    prefill of `context` tokens would have cached.
    """
    for layer_cache in cache:
        layer_cache.truncate(context)
    token = torch.zeros(1, 1, dtype=torch.long)
    start = time.perf_counter()
    model(token, cache=cache, absorb=absorb)
    return time.perf_counter() - start


@torch.no_grad()
def bench_decode(shape: ModelConfig, dtype: torch.dtype, steps: int) -> dict:
    """Decode tokens/s per mode and context. The modes take turns step by step, so a burst of load from other
    processes slows all of them alike instead of skewing one."""
    results: dict = {}
    contexts = contexts_for(shape)
    prompt = torch.randint(0, shape.vocab_size, (1, max(contexts)))
    models, caches = {}, {}
    for attention, config in attention_variants(shape).items():
        models[attention] = build_model(config, dtype)
        caches[attention] = models[attention].new_cache(batch_size=1)
        start = time.perf_counter()
        models[attention](prompt, cache=caches[attention])
        results[f"{attention}_prefill_tokens_per_s"] = round(prompt.shape[1] / (time.perf_counter() - start), 1)
    results["max_abs_logit_diff_absorbed_vs_naive"] = absorbed_vs_naive_gap(models["mla"], caches["mla"], max(contexts))

    modes = {"mla_absorbed": ("mla", True), "mla_naive": ("mla", False), "gqa": ("gqa", True), "mha": ("mha", True)}
    modes = {name: mode for name, mode in modes.items() if mode[0] in models}
    for name in modes:
        results[name] = {}
    # Longest context first: a decode step overwrites only the position just past its context, so every
    # shorter context still sees exactly the prefilled prefix.
    for context in sorted(contexts, reverse=True):
        times: dict[str, list[float]] = {name: [] for name in modes}
        for step in range(WARMUP_STEPS + steps):
            for name, (attention, absorb) in modes.items():
                seconds = timed_decode_step(models[attention], caches[attention], context, absorb)
                if step >= WARMUP_STEPS:
                    times[name].append(seconds)
        for name in modes:
            results[name][str(context)] = round(1.0 / statistics.median(times[name]), 2)
    return {name: dict(sorted(value.items(), key=lambda kv: int(kv[0]))) if name in modes else value
            for name, value in results.items()}


@torch.no_grad()
def absorbed_vs_naive_gap(model: Transformer, cache: list, context: int) -> float:
    """Both decode paths on the same long cache must agree (a benchmark of a wrong path would be meaningless)."""
    token = torch.ones(1, 1, dtype=torch.long)
    logits = []
    for absorb in (True, False):
        for layer_cache in cache:
            layer_cache.truncate(context)
        logits.append(model(token, cache=cache, absorb=absorb)[0].float())
    return float((logits[0] - logits[1]).abs().max())


def train_step(model: Transformer, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, loss = model(x, y, return_logits=False)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def train_shapes() -> dict[str, tuple[ModelConfig, int]]:
    """The named tiny shape, plus configs/tiny.yaml's model and batch when that file is present."""
    shapes = {"tiny_4x256": (ModelConfig(**TINY_SHAPE), TINY_BATCH)}
    if TINY_YAML.is_file():
        config = load_yaml_config(TINY_YAML)
        shapes["configs/tiny.yaml"] = (config.model, config.train.batch_size)
    return shapes


def bench_train_step() -> dict:
    """Forward + backward + AdamW step with bf16 autocast, as a CPU smoke run trains.
    MLA, GQA and MHA of each shape alternate step by step, as in bench_decode."""
    results = {}
    for shape_name, (model_config, batch) in train_shapes().items():
        runs = {}
        for attention, variant in attention_variants(model_config).items():
            torch.manual_seed(0)
            model = Transformer(variant).train()
            x = torch.randint(0, model.config.vocab_size, (batch, model.config.block_size))
            optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)
            runs[attention] = (model, partial(train_step, model, optimizer, x, torch.roll(x, -1, 1)))
        times: dict[str, list[float]] = {attention: [] for attention in runs}
        for step in range(TRAIN_WARMUP_STEPS + TRAIN_TIMED_STEPS):
            for attention, (_, run) in runs.items():
                start = time.perf_counter()
                run()
                if step >= TRAIN_WARMUP_STEPS:
                    times[attention].append(time.perf_counter() - start)
        shape = {field: getattr(model_config, field) for field in TRAIN_SHAPE_FIELDS}
        results[shape_name] = {"shape": shape, "batch": batch, "autocast": "bfloat16"}
        for attention, (model, _) in runs.items():
            tokens_per_s = batch * model_config.block_size / statistics.median(times[attention])
            results[shape_name][attention] = {
                "tokens_per_s": round(tokens_per_s, 1),
                "params_non_embedding": model.num_params(),
                "flops_per_token": model.flops_per_token(),
                "achieved_gflops": round(tokens_per_s * model.flops_per_token() / 1e9, 2),
            }
    return results


def cache_sizes(shape: ModelConfig) -> dict:
    """Cache per token of the shape as MLA, as GQA at MLA's budget and as MHA, from the config alone."""
    def size(numbers: int) -> dict:
        return {"numbers_per_token_per_layer": numbers,
                "bytes_per_token_bf16": shape.n_layer * numbers * torch.bfloat16.itemsize,
                "bytes_per_token_fp32": shape.n_layer * numbers * torch.float32.itemsize}

    sizes = {"mla": size(LatentCache.numbers_per_token(shape))}
    if (gqa := equal_cache_gqa(shape)) is not None:
        sizes["gqa"] = {**size(KVCache.numbers_per_token(gqa)), "n_kv_head": gqa.n_kv_head}
    sizes["mha"] = size(mha_numbers_per_token(shape))
    sizes["mla_over_mha"] = round(sizes["mla"]["bytes_per_token_bf16"] / sizes["mha"]["bytes_per_token_bf16"], 4)
    return sizes


def model_shape(config_file: str | None, overrides: list[str]) -> tuple[str, ModelConfig]:
    """(where the shape comes from, the shape): the config file's model section with its overrides applied, or
    the reference shape when no file is named."""
    if config_file is None:
        if overrides:
            raise SystemExit(f"bench_model.py: {overrides[0]} needs --config FILE (overrides apply to a config)")
        return "reference", reference_shape()
    try:
        return config_file, load_yaml_config(config_file, overrides).model
    except ConfigError as error:
        raise SystemExit(f"bench_model.py: {error}") from None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="decode weights and cache dtype (CPU matmuls are fastest in float32)")
    parser.add_argument("--decode-steps", type=int, default=DEFAULT_DECODE_STEPS)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--config", help="measure this config's model shape (any --model.key value after it "
                                         "overrides it) instead of the reference shape")
    args, overrides = parser.parse_known_args()
    source, shape = model_shape(args.config, overrides)
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)

    start, cpu_start = time.perf_counter(), time.process_time()
    cache = cache_sizes(shape)
    decode = bench_decode(shape, dtype, args.decode_steps)
    train = bench_train_step() if args.config is None else "not run with --config: see benchmarks/bench_train.py"
    longest = str(max(contexts_for(shape)))
    report = {
        "machine": {"torch": torch.__version__, "threads": args.threads, "cpu": platform.processor() or platform.machine(),
                    "note": "shared CPU machine; compare ratios"},
        "shape": {"source": source, **asdict(shape)},
        "kv_cache_reference" if args.config is None else "kv_cache": cache,
        "decode_tokens_per_s": {"dtype": args.dtype, "batch": 1, "timed_steps": args.decode_steps, **decode},
        "absorbed_speedup_over_naive": {c: round(decode["mla_absorbed"][c] / decode["mla_naive"][c], 2)
                                        for c in decode["mla_naive"]},
        "train_step": train,
        # The goals are set for the reference shape; a small shape of one's own need not meet them.
        **({"goals": {
            "absorbed_faster_than_naive_at_longest_context": decode["mla_absorbed"][longest] > decode["mla_naive"][longest],
            "mla_cache_at_most_a_fifth_of_mha": cache["mla_over_mha"] <= CACHE_GOAL_FRACTION,
        }} if args.config is None else {}),
        "wall_s": round(time.perf_counter() - start, 1),
        "cpu_s": round(time.process_time() - cpu_start, 1),  # far below wall_s when other jobs hold the cores
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
