"""AdamW with GPT-style grouped weight decay (or Muon for the hidden matrices: tml/train/muon.py), and a learning-rate
schedule with linear warm-up: cosine or WSD.

Decay rule (minGPT's and early nanoGPT's, decided by module type so it never depends on parameter names; today's
nanoGPT decays every tensor of 2+ dims, embeddings included):
- a weight of dimension >= 2 owned by an `nn.Linear` decays: these are the matrices that can grow without bound;
- everything else does not: biases, norm weights (LayerNorm/RMSNorm gains pull towards 1, not 0) and embeddings
  (decaying rare tokens' rows towards zero hurts them most). A tied LM head *is* the embedding, so it follows the
  embedding and does not decay.
Any other parameter (a module type the rule does not know) is refused by name, so a new layer cannot silently
land in the wrong group.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from tml.train.config import TrainConfig
from tml.train.muon import MuonWithAdamW

NO_DECAY_MODULES: tuple[type[nn.Module], ...] = (nn.Embedding, nn.LayerNorm, nn.RMSNorm)
# The decaying matrices that are no hidden layer: Muon leaves an untied LM head (a classifier) to AdamW.
OUTPUT_MATRICES = ("lm_head.weight",)


def decay_groups(model: nn.Module) -> tuple[list[str], list[str]]:
    """Split parameter names into (decay, no_decay) by the module-type rule above; shared tensors count once."""
    decay: list[str] = []
    no_decay: list[str] = []
    # A tied LM head shares the embedding's tensor: decide by the embedding whichever module is visited first.
    embedding_ids = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            if id(param) in seen or not param.requires_grad:
                continue
            seen.add(id(param))
            full_name = f"{module_name}.{param_name}" if module_name else param_name
            if id(param) in embedding_ids:
                no_decay.append(full_name)
            elif isinstance(module, nn.Linear) and param_name == "weight" and param.dim() >= 2:
                decay.append(full_name)
            elif param_name == "bias" or isinstance(module, NO_DECAY_MODULES) or _is_norm(module):
                no_decay.append(full_name)
            else:
                raise ValueError(
                    f"parameter {full_name} ({type(module).__name__}, shape {tuple(param.shape)}) is not covered by "
                    "the weight-decay rule in tml/train/optim.py; extend the rule before training this model"
                )
    return decay, no_decay


def _is_norm(module: nn.Module) -> bool:
    """Custom norm classes (the model's own RMSNorm) are recognised by name, as nn.RMSNorm may not be used."""
    return "norm" in type(module).__name__.lower()


def build_optimizer(model: nn.Module, train: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over the two decay groups, or (train.optimizer muon) Muon over the hidden matrices and AdamW over the
    rest: the decaying group less an untied LM head goes to Muon (tml/train/muon.py)."""
    decay, no_decay = decay_groups(model)
    params = dict(model.named_parameters())
    betas = (train.beta1, train.beta2)
    if train.optimizer == "muon":
        # named as in the model itself, also when torch.compile wrapped it (`_orig_mod.lm_head.weight`)
        head = [name for name in decay if name.removeprefix("_orig_mod.") in OUTPUT_MATRICES]
        hidden = [name for name in decay if name not in head]
        adamw_groups = [{"params": [params[name] for name in names], "weight_decay": weight_decay}
                        for names, weight_decay in ((head, train.weight_decay), (no_decay, 0.0)) if names]
        return MuonWithAdamW([{"params": [params[name] for name in hidden], "weight_decay": train.weight_decay}],
                             adamw_groups, lr=train.lr, muon_lr=train.lr if train.muon_lr is None else train.muon_lr,
                             momentum=train.muon_momentum, betas=betas)
    groups = [
        {"params": [params[name] for name in decay], "weight_decay": train.weight_decay},
        {"params": [params[name] for name in no_decay], "weight_decay": 0.0},
    ]
    # torch's default foreach kernels, not fused: Fabric's fp16 clipping refuses an optimizer that unscales its own
    # gradients, which fused AdamW does. betas from the config (0.95: GPT-3's choice for stability)
    return torch.optim.AdamW(groups, lr=train.lr, betas=betas)


@dataclass
class CosineWithWarmup:
    """Multiplier on the base lr at optimizer step `step`: linear warm-up, then cosine down to min_lr at the last step.

    Warm-up steps 0 .. W-1 use (step+1)/(W+1) of the peak (never 0, as nanoGPT), so the peak itself is used once, at
    step W, where the cosine starts.

    A callable object rather than a lambda so LambdaLR.state_dict() saves its fields with the checkpoint; a resume
    takes only the step count from there (restore_schedule_step), so the current config governs the curve.
    """

    max_steps: int
    warmup_steps: int
    min_ratio: float  # min_lr / lr

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        decay_steps = max(1, self.max_steps - 1 - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / decay_steps)
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass
class WarmupStableDecay:
    """Multiplier on the base lr: the same linear warm-up, then the peak held, then a 1-sqrt decay to min_lr over the
    last `decay_steps` steps, reaching it at the last step.

    The lr before the decay does not depend on max_steps, so one long run's checkpoints can each be continued with a
    shorter or longer max_steps and a decay of their own: one run, many training lengths (Hägele et al. 2024, "Scaling
    Laws and Compute-Optimal Training Beyond Fixed Training Durations"; 1-sqrt matched cosine there, linear did not).
    """

    max_steps: int
    warmup_steps: int
    decay_steps: int
    min_ratio: float  # min_lr / lr

    @property
    def decay_start(self) -> int:
        return self.max_steps - self.decay_steps

    def __call__(self, step: int) -> float:
        # The decay is checked first: a warm-up as long as the run (a short branch, a budget) still ends at min_lr.
        if step >= self.decay_start:
            progress = min(1.0, (step - self.decay_start + 1) / self.decay_steps)  # 1 at the last step, max_steps - 1
            return self.min_ratio + (1.0 - self.min_ratio) * (1.0 - math.sqrt(progress))
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        return 1.0


def schedule_curve(train: TrainConfig) -> CosineWithWarmup | WarmupStableDecay:
    """The lr multiplier per step that train describes: warmup = warmup_steps, else warmup_frac * max_steps; lr
    reaches train.lr right after warm-up and train.min_lr at the last step (cosine: a warm-up as long as the run
    ends in its ramp; WSD decays on the last step whatever the warm-up, keeping the ramp's slope before it)."""
    if train.warmup_steps is not None:  # as given, even past max_steps: the ramp's slope is what runs share
        warmup_steps = train.warmup_steps
    else:
        warmup_steps = int(train.warmup_frac * train.max_steps)
    min_ratio = train.min_lr / train.lr if train.lr > 0 else 0.0
    if train.schedule == "wsd":
        # A decay that would overlap the warm-up starts after it; at least the last step decays, so the run ends at
        # min_lr even when the warm-up would take all of it (its ramp keeps its slope: runs share one warm-up).
        decay_steps = max(1, min(int(train.decay_frac * train.max_steps), train.max_steps - warmup_steps))
        return WarmupStableDecay(train.max_steps, warmup_steps, decay_steps, min_ratio)
    return CosineWithWarmup(train.max_steps, warmup_steps, min_ratio)


def build_scheduler(optimizer: torch.optim.Optimizer, train: TrainConfig) -> LambdaLR:
    return LambdaLR(optimizer, schedule_curve(train))


def branch_schedule_notes(source: TrainConfig, branch: TrainConfig, step: int) -> list[str]:
    """What a run continuing a WSD run's checkpoint at `step` on another schedule (a branch, or the run given another
    max_steps) should know about its lr: the checkpoint was already annealed in its own run's decay (this run takes
    it back up), or the step is inside this run's own decay (it starts part-way down it). Said because the lr curve
    shows it only after the fact."""
    notes = []
    curve = schedule_curve(source)
    # A checkpoint at step S has trained steps 0 .. S-1: at decay_start itself it has seen the peak only.
    if isinstance(curve, WarmupStableDecay) and step > curve.decay_start:
        notes.append(f"the checkpoint at step {step:,} was in its run's decay (from step {curve.decay_start:,}, lr "
                     f"{source.lr * curve(step - 1):.3g}): its weights were annealed, and this run takes lr "
                     "back up; a checkpoint from before that decay branches cleanly")
    curve = schedule_curve(branch)
    if isinstance(curve, WarmupStableDecay) and curve.decay_start < step < branch.max_steps:
        notes.append(f"step {step:,} is inside this run's decay (from step {curve.decay_start:,}): it starts at lr "
                     f"{branch.lr * curve(step):.3g}, not at the peak, and decays over {branch.max_steps - step:,} "
                     f"steps instead of {curve.decay_steps:,}")
    return notes


def restore_schedule_step(scheduler: LambdaLR, saved: dict[str, Any]) -> None:
    """Continue at a saved schedule's step count under the *current* config's schedule.

    LambdaLR.load_state_dict would also bring back the saved base lrs and CosineWithWarmup fields, so a resume
    with a new max_steps or lr would silently keep the old curve. Those come from the config built into
    `scheduler`; the optimizer's lrs (just restored from its checkpoint) are set to that curve at the saved step,
    which with an unchanged config are exactly the values the uninterrupted run would have used.
    """
    step = saved["last_epoch"]
    current = {
        "base_lrs": list(scheduler.base_lrs),
        "lr_lambdas": [vars(fn).copy() for fn in scheduler.lr_lambdas],
        "_last_lr": [base * fn(step) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas, strict=True)],
    }
    scheduler.load_state_dict({**saved, **current})
    for group, lr in zip(scheduler.optimizer.param_groups, current["_last_lr"], strict=True):
        group["lr"] = lr
