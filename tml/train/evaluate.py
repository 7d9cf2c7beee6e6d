"""Validation loss over a fixed set of windows, the same at every call and for every world size.

The windows are `val_batches * batch_size` windows spread evenly over the validation split (all of them when the
split is smaller), dealt round-robin to the ranks. Every rank runs the same number of full batches (ZeRO-3
gathers parameters inside forward, so a rank that stopped early would hang the others, and a compiled model would
recompile for a smaller last batch); the padding windows have their targets masked with the loss's ignore index
so they weigh nothing. Sums are all-reduced, so the mean is
over tokens of the whole set and identical on every rank. Perplexity = exp(mean loss).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from lightning import Fabric

from tml.model.transformer import IGNORE_INDEX


@dataclass
class EvalResult:
    loss: float
    perplexity: float
    windows: int


def val_window_indices(num_windows: int, wanted: int) -> list[int]:
    """`wanted` indices spread evenly over range(num_windows), deterministic; all windows when there are fewer."""
    if num_windows <= 0:
        raise ValueError("the validation split has no windows; add books or lower model.block_size")
    if wanted >= num_windows:
        return list(range(num_windows))
    return [(i * num_windows) // wanted for i in range(wanted)]


def fixed_windows(dataset, count: int) -> torch.Tensor:
    """`count` input windows [count, T] spread evenly over the dataset, the same at every call (training's attention
    statistics: tml/model/diagnostics.py)."""
    return torch.stack([dataset[i][0] for i in val_window_indices(len(dataset), count)])


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else math.inf  # exp overflows float64 past ~709


def format_perplexity(value: float) -> str:
    """`843.27`, or `1.23e+196` for a run far from trained: two decimals of a 197-digit number tell nothing."""
    return f"{value:.2f}" if value < 1e6 else f"{value:.3g}"


@torch.no_grad()
def evaluate(fabric: Fabric, model: torch.nn.Module, dataset, batch_size: int, val_batches: int) -> EvalResult:
    indices = val_window_indices(len(dataset), val_batches * batch_size)
    rank, world = fabric.global_rank, fabric.world_size
    mine = indices[rank::world]
    # Whole batches only: a smaller last batch is a new input shape, which a compiled model recompiles for.
    per_rank = batch_size * math.ceil(len(indices) / (world * batch_size))
    real = [True] * len(mine) + [False] * (per_rank - len(mine))
    mine = mine + [indices[0]] * (per_rank - len(mine))

    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=fabric.device)
    token_count = torch.zeros((), dtype=torch.float64, device=fabric.device)
    for start in range(0, per_rank, batch_size):
        batch = [dataset[i] for i in mine[start : start + batch_size]]
        x = torch.stack([pair[0] for pair in batch])
        y = torch.stack([pair[1] for pair in batch])
        keep = torch.tensor(real[start : start + batch_size])
        y[~keep] = IGNORE_INDEX
        tokens = int((y != IGNORE_INDEX).sum())  # counted before the copy: no wait for the device per batch
        x, y = fabric.to_device((x, y))
        _, loss = model(x, y, return_logits=False)
        if tokens > 0:  # a batch of padding only has a NaN mean loss
            loss_sum += loss.double() * tokens
            token_count += tokens
    model.train(was_training)

    totals = fabric.all_reduce(torch.stack([loss_sum, token_count]), reduce_op="sum")
    mean_loss = (totals[0] / totals[1]).item()
    return EvalResult(loss=mean_loss, perplexity=perplexity(mean_loss), windows=len(indices))
