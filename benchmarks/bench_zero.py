"""Step time of DDP vs DeepSpeed ZeRO-1/2/3 with two local processes on the same model, as JSON lines.

Each strategy runs in its own `python benchmarks/bench_zero.py --strategy S` (Fabric starts the second rank by
re-running that command), driving the model exactly as tml/train/loop.py does: under DeepSpeed `fabric.backward`
then `engine.step()` on every micro-batch, under DDP `no_backward_sync` and one optimizer step. Random tokens,
warm-up steps excluded. On CPU this measures the cost of ZeRO's extra collectives over gloo, not GPU memory.

    python benchmarks/bench_zero.py --config configs/small.yaml --batch-size 2 --steps 5
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from tml.config import load_yaml_config  # noqa: E402
from tml.model import Transformer  # noqa: E402
from tml.train.fabric import build_fabric, is_deepspeed  # noqa: E402
from tml.train.optim import build_optimizer  # noqa: E402

STRATEGIES = {"ddp": ("ddp", 2), "zero1": ("deepspeed", 1), "zero2": ("deepspeed", 2), "zero3": ("deepspeed", 3)}
RUN_TIMEOUT_S = 900  # one strategy, including DeepSpeed's first-use op build


def bench(args: argparse.Namespace) -> dict | None:
    strategy, stage = STRATEGIES[args.strategy]
    overrides = [f"--train.batch_size={args.batch_size}", f"--train.grad_accum={args.grad_accum}",
                 "--train.devices=2", f"--train.strategy={strategy}", f"--train.zero_stage={stage}",
                 f"--train.precision={args.precision}", "--train.accelerator=cpu"]
    config = load_yaml_config(args.config, overrides)
    tc = config.train
    fabric = build_fabric(tc)
    fabric.launch()
    deepspeed = is_deepspeed(fabric)
    torch.manual_seed(0)
    with nullcontext() if deepspeed else fabric.init_module():  # as the loop: never under ZeRO-3's zero.Init
        model = Transformer(config.model)
    optimizer = build_optimizer(model, tc)
    if deepspeed:
        model, optimizer = fabric.setup(model, optimizer)
        engine = fabric.strategy.model
    else:
        model, optimizer = fabric.setup(model), fabric.setup_optimizers(optimizer)
    shape = (tc.batch_size, config.model.block_size)
    x = torch.randint(0, config.model.vocab_size, shape, device=fabric.device)
    y = torch.randint(0, config.model.vocab_size, shape, device=fabric.device)

    def step() -> None:
        for micro in range(tc.grad_accum):
            with nullcontext() if deepspeed else fabric.no_backward_sync(model, enabled=micro < tc.grad_accum - 1):
                _, loss = model(x, y, return_logits=False)
                fabric.backward(loss if deepspeed else loss / tc.grad_accum)
            if deepspeed:
                engine.step()
        if not deepspeed:
            fabric.clip_gradients(model, optimizer, max_norm=tc.grad_clip, error_if_nonfinite=False)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    fabric.barrier()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    fabric.barrier()
    seconds = (time.perf_counter() - start) / args.steps
    result = {
        "strategy": args.strategy, "config": args.config, "processes": fabric.world_size,
        "precision": tc.precision, "micro_batch": tc.batch_size, "grad_accum": tc.grad_accum,
        "block_size": config.model.block_size, "step_s": round(seconds, 4),
        "tokens_per_s": round(tc.batch_size * tc.grad_accum * config.model.block_size * fabric.world_size / seconds),
        "torch_threads": torch.get_num_threads(),
    }
    rank0 = fabric.global_rank == 0
    model = optimizer = engine = None  # free the engine before the process group goes (gloo exits cleanly)
    gc.collect()
    fabric.barrier()
    dist.destroy_process_group()
    return result if rank0 else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/small.yaml")
    parser.add_argument("--strategy", choices=sorted(STRATEGIES), help="one strategy (default: all, in turn)")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--grad-accum", type=int, default=2)
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (2 processes share the CPU)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.strategy:
        result = bench(args)
        if result is not None:
            print(json.dumps(result), flush=True)
        return
    for name in STRATEGIES:
        command = [sys.executable, __file__, *sys.argv[1:], "--strategy", name]
        done = subprocess.run(command, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        print(lines[-1] if lines else json.dumps({"strategy": name, "error": done.stderr[-500:]}), flush=True)


if __name__ == "__main__":
    main()
