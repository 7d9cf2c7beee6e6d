"""Training throughput (tokens/s) and MFU of the tiny and small configs on this machine, as JSON.

Times the loop's hot path exactly as tml/train/loop.py runs it (Fabric forward under autocast, backward,
clipping, optimizer step: AdamW, or Muon with --optimizer muon) on random tokens, after warm-up steps. MFU is against the matmul peak measured at start-up
on CPU (tml.train.throughput), or the datasheet peak on a known GPU. The micro-batch is reduced (--batch-size)
so a CPU measurement takes seconds; tokens/s hardly depends on it at these sizes.

    python benchmarks/bench_train.py --configs configs/tiny.yaml configs/small.yaml --steps 5
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from tml.config import load_yaml_config  # noqa: E402
from tml.model import Transformer  # noqa: E402
from tml.train.fabric import build_fabric, resolve_precision  # noqa: E402
from tml.train.optim import build_optimizer  # noqa: E402
from tml.train.throughput import mfu, peak_flops, precision_dtype  # noqa: E402


def saved_for_backward_bytes(fabric, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    """Bytes autograd keeps from one forward until backward (distinct storages, the weights included)."""
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        _, loss = model(x, y, return_logits=False)
    fabric.backward(loss)
    return sum(saved.values())


def bench(config_path: str, steps: int, warmup: int, batch_size: int, precision: str | None,
          activation_checkpointing: bool = False, optimizer: str | None = None) -> dict:
    overrides = [f"--train.batch_size={batch_size}", "--train.grad_accum=1", "--train.devices=1"]
    if precision:
        overrides.append(f"--train.precision={precision}")
    if optimizer:
        overrides.append(f"--train.optimizer={optimizer}")
    config = load_yaml_config(config_path, overrides)
    fabric = build_fabric(config.train)
    torch.manual_seed(0)
    with fabric.init_module():
        model = Transformer(config.model)
    model.activation_checkpointing = activation_checkpointing
    optimizer = build_optimizer(model, config.train)
    model, optimizer = fabric.setup(model), fabric.setup_optimizers(optimizer)
    shape = (config.train.batch_size, config.model.block_size)
    x = torch.randint(0, config.model.vocab_size, shape, device=fabric.device)
    y = torch.randint(0, config.model.vocab_size, shape, device=fabric.device)

    def step() -> None:
        _, loss = model(x, y, return_logits=False)
        fabric.backward(loss)
        fabric.clip_gradients(model, optimizer, max_norm=config.train.grad_clip, error_if_nonfinite=False)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    saved_bytes = saved_for_backward_bytes(fabric, model, x, y)
    optimizer.zero_grad(set_to_none=True)
    if fabric.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if fabric.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / steps
    tokens_per_s = shape[0] * shape[1] / seconds
    precision = resolve_precision(config.train, fabric.device.type)  # as build_fabric ran it: bf16 for fp16 on CPU
    peak = peak_flops(fabric.device, precision)
    flops_per_token = model.flops_per_token()
    return {
        "config": config_path,
        "device": str(fabric.device),
        "precision": precision,
        "matmul_dtype": precision_dtype(precision),
        "threads": torch.get_num_threads(),
        "params": model.num_params(non_embedding=False),
        "batch_size": shape[0],
        "block_size": shape[1],
        "activation_checkpointing": activation_checkpointing,
        "optimizer": config.train.optimizer,
        "saved_for_backward_mb": round(saved_bytes / 1e6, 1),
        "seconds_per_step": round(seconds, 4),
        "tokens_per_s": round(tokens_per_s, 1),
        "flops_per_token": flops_per_token,
        "peak_flops_per_device": peak,
        "mfu": round(mfu(tokens_per_s, flops_per_token, peak) or 0.0, 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["configs/tiny.yaml", "configs/small.yaml"])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--precision", default=None, help="override train.precision (e.g. 32-true)")
    parser.add_argument("--optimizer", default=None, help="override train.optimizer (adamw or muon)")
    parser.add_argument("--activation-checkpointing", action="store_true",
                        help="recompute each block's activations in backward (train.activation_checkpointing)")
    args = parser.parse_args()
    results = [bench(path, args.steps, args.warmup, args.batch_size, args.precision, args.activation_checkpointing,
                     args.optimizer) for path in args.configs]
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
