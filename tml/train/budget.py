"""A training budget in tokens or FLOPs (train.max_tokens / train.max_flops), turned into train.max_steps.

Comparing MLA with MHA or GQA, or MLA ranks, is only fair at equal tokens or equal compute; at one width MLA has
fewer parameters but more attention FLOPs than MHA, so one max_steps is neither. A budget sets max_steps to the
most whole optimizer steps that fit in it: `steps * cost <= budget < (steps + 1) * cost`, with the cost of a step
its tokens (or those times the model's training FLOPs per token, the figure MFU uses). Config.__post_init__
(tml/config.py) applies it, so every entry point, SLURM's layout and a saved config rebuilt from a checkpoint see
an ordinary max_steps.

torch is imported only for a FLOPs budget, which needs the model's FLOPs per token: loading any other config
stays free of it (tml/config.py imports this module).
"""

from __future__ import annotations

from fractions import Fraction
from typing import TYPE_CHECKING

from tml.train.config import TrainConfig, TrainConfigError

if TYPE_CHECKING:
    from tml.config import Config
    from tml.model.config import ModelConfig


def tokens_per_step(config: Config) -> int:
    """Tokens one optimizer step trains on, over all ranks (devices x num_nodes is Fabric's world size): what the
    loop counts in tokens/s and summary.json's tokens_seen."""
    train = config.train
    return train.batch_size * train.grad_accum * train.devices * train.num_nodes * config.model.block_size


def flops_per_token(model: ModelConfig) -> int:
    """The model's training FLOPs per token (Transformer.flops_per_token), from a model built on the meta device:
    its shapes, no memory and no initialisation work."""
    import torch

    from tml.model import Transformer

    with torch.device("meta"):
        return Transformer(model).flops_per_token()


BUDGET_KEYS = ("max_tokens", "max_flops")  # train.*: at most one is set


def budget_key(train: TrainConfig) -> str | None:
    """"max_tokens" or "max_flops", whichever is set; None for a run without a budget."""
    return next((key for key in BUDGET_KEYS if getattr(train, key) is not None), None)


def horizon_key(train: TrainConfig) -> str:
    """The key that decides how long a run trains: `train.max_tokens` or `train.max_flops` when set (max_steps is then
    derived and a value given for it unused), else `train.max_steps`. Said in advice to train longer."""
    return f"train.{budget_key(train) or 'max_steps'}"


def budget_setting(config: Config) -> tuple[str, float] | None:
    """("max_tokens" or "max_flops", its value), or None for a run without a budget."""
    key = budget_key(config.train)
    return None if key is None else (key, getattr(config.train, key))


def step_cost(config: Config) -> tuple[int, int | None]:
    """(what one optimizer step spends of the budget, the FLOPs per token that went into it or None for tokens)."""
    tokens = tokens_per_step(config)
    if config.train.max_flops is None:
        return tokens, None
    per_token = flops_per_token(config.model)
    return per_token * tokens, per_token


def steps_for_budget(config: Config) -> int | None:
    """The max_steps a budget allows: floor(budget / cost of a step); None without a budget. A budget smaller than
    one step is refused (TrainConfigError naming the key, the budget and the step's cost)."""
    if (setting := budget_setting(config)) is None:
        return None
    key, budget = setting
    cost, per_token = step_cost(config)
    steps = int(Fraction(budget) // cost)  # exact: a float quotient could land one step over the budget
    if steps < 1:
        cost_words = f"{shown(key, cost)} FLOPs ({step_cost_words(config, per_token)})" if per_token else \
            f"{cost:,} tokens"
        raise TrainConfigError(f"train.{key}={shown(key, budget)} is less than one optimizer step, which costs "
                               f"{cost_words}: raise train.{key}, or lower train.batch_size, train.grad_accum, the "
                               "devices and nodes, or model.block_size")
    return steps


def shown(key: str, amount: float) -> str:
    """Tokens with thousands separators (81,920), FLOPs in exponent form (3e+15)."""
    return f"{round(amount):,}" if key == "max_tokens" else f"{amount:.4g}"


def step_cost_words(config: Config, per_token: int | None) -> str:
    """`flops_per_token 1.2e+06 x 81,920 tokens a step`, or `81,920 tokens a step`."""
    tokens = f"{tokens_per_step(config):,} tokens a step"
    return f"flops_per_token {per_token:.3g} x {tokens}" if per_token is not None else tokens


def describe_budget(config: Config) -> str | None:
    """`max_steps 1,234 from train.max_flops=3e+15 (flops_per_token 1.2e+06 x 81,920 tokens a step)`: where
    max_steps came from, for the start's and --dry-run's lines; None without a budget."""
    if (setting := budget_setting(config)) is None:
        return None
    key, budget = setting
    _, per_token = step_cost(config)
    return (f"max_steps {config.train.max_steps:,} from train.{key}={shown(key, budget)} "
            f"({step_cost_words(config, per_token)})")
