import math
from dataclasses import replace

import pytest
import torch
from torch import nn

from tests.conftest import debug_model_config
from tml.model import Transformer
from tml.train.config import TrainConfig, TrainConfigError
from tml.train.optim import (
    CosineWithWarmup,
    WarmupStableDecay,
    branch_schedule_notes,
    build_optimizer,
    build_scheduler,
    decay_groups,
    restore_schedule_step,
)


def test_linear_weights_decay_and_biases_norms_embeddings_do_not():
    model = Transformer(debug_model_config(bias=True))
    decay, no_decay = decay_groups(model)
    params = dict(model.named_parameters())
    assert decay and no_decay
    assert all(params[name].dim() >= 2 and not name.startswith("tok_emb") for name in decay)
    assert "tok_emb.weight" in no_decay
    assert any(name.endswith("bias") for name in no_decay)
    assert any("norm" in name for name in no_decay)
    assert any("kv_norm" in name for name in no_decay)  # the MLA latent RMSNorm
    assert not any(name.endswith("bias") or "norm" in name for name in decay)
    # every trainable tensor lands in exactly one group; the tied head is the embedding, counted once
    assert len(set(decay) | set(no_decay)) == len(decay) + len(no_decay) == len(params)
    assert "lm_head.weight" not in decay


def test_swiglus_three_matrices_decay_and_the_blocks_rmsnorm_gains_do_not():
    model = Transformer(debug_model_config(mlp="swiglu", norm_type="rmsnorm", norm="pre", bias=True))
    decay, no_decay = decay_groups(model)
    for matrix in ("fc_gate", "fc_in", "fc_out"):
        assert f"blocks.0.mlp.{matrix}.weight" in decay and f"blocks.0.mlp.{matrix}.bias" in no_decay
    assert {"blocks.0.norm_attn.weight", "blocks.0.norm_mlp.weight", "norm_final.weight"} <= set(no_decay)
    assert len(set(decay) | set(no_decay)) == len(dict(model.named_parameters()))


def test_tied_head_follows_the_embedding_even_when_visited_first():
    class HeadFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(4, 10, bias=False)
            self.emb = nn.Embedding(10, 4)
            self.head.weight = self.emb.weight

    decay, no_decay = decay_groups(HeadFirst())
    assert decay == [] and no_decay == ["head.weight"]


def test_unknown_parameter_kind_is_refused_by_name():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(3))

    with pytest.raises(ValueError, match="scale"):
        decay_groups(Odd())


def test_optimizer_groups_carry_the_configured_decay():
    model = Transformer(debug_model_config())
    optimizer = build_optimizer(model, TrainConfig(weight_decay=0.1))
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))


def lrs_over_run(train: TrainConfig) -> list[float]:
    optimizer = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=train.lr)
    scheduler = build_scheduler(optimizer, train)
    lrs = []
    for _ in range(train.max_steps):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return lrs


def test_schedule_warms_up_linearly_then_decays_to_min_lr_at_the_last_step():
    train = TrainConfig(max_steps=100, lr=3e-4, min_lr=3e-5, warmup_frac=0.1)
    lrs = lrs_over_run(train)
    assert lrs[0] == pytest.approx(3e-4 / 11)  # step 0: first of 10 warm-up steps, not 0
    assert lrs[9] == pytest.approx(3e-4 * 10 / 11)  # last warm-up step, just below the peak
    assert lrs[10] == pytest.approx(3e-4)  # cosine starts at the peak: the peak is used once
    assert lrs.count(max(lrs)) == 1
    assert lrs[-1] == pytest.approx(3e-5)  # last step lands on min_lr
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))  # monotone decay
    midpoint = 10 + (99 - 10) / 2
    assert lrs[int(midpoint)] == pytest.approx(3e-5 + 0.5 * (3e-4 - 3e-5) * (1 + math.cos(math.pi * 44 / 89)))


def test_reference_schedule_values():
    train = TrainConfig()  # the reference: 18,370 steps, 10% warm-up
    optimizer = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=train.lr)
    lam = build_scheduler(optimizer, train).lr_lambdas[0]
    assert lam.warmup_steps == 1837
    assert train.lr * lam(1836) == pytest.approx(3e-4 * 1837 / 1838)  # the last warm-up step
    assert train.lr * lam(1837) == pytest.approx(3e-4)  # the peak, once
    assert train.lr * lam(18_369) == pytest.approx(3e-5)


def test_schedule_state_round_trips():
    train = TrainConfig(max_steps=20, warmup_frac=0.2)
    optimizer = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=train.lr)
    scheduler = build_scheduler(optimizer, train)
    for _ in range(7):
        optimizer.step()
        scheduler.step()
    state = scheduler.state_dict()
    fresh_opt = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=train.lr)
    fresh = build_scheduler(fresh_opt, train)
    fresh.load_state_dict(state)
    fresh_opt.param_groups[0]["lr"] = fresh.get_last_lr()[0]
    assert fresh.get_last_lr() == scheduler.get_last_lr()
    optimizer.step(), scheduler.step(), fresh_opt.step(), fresh.step()
    assert fresh.get_last_lr() == scheduler.get_last_lr()


def scheduler_after(train: TrainConfig, steps: int):
    optimizer = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=train.lr)
    scheduler = build_scheduler(optimizer, train)
    for _ in range(steps):
        optimizer.step()
        scheduler.step()
    return optimizer, scheduler


def resumed_lrs(saved_state: dict, train: TrainConfig, stale_lr: float) -> list[float]:
    """The lrs a resumed run uses until train.max_steps; its optimizer comes back with the saved run's lr."""
    optimizer = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=train.lr)
    scheduler = build_scheduler(optimizer, train)  # the loop builds it before loading the optimizer's state
    optimizer.param_groups[0]["lr"] = stale_lr  # what optimizer.load_state_dict restores
    restore_schedule_step(scheduler, saved_state)
    lrs = []
    for _ in range(scheduler.last_epoch, train.max_steps):
        assert optimizer.param_groups[0]["lr"] == scheduler.get_last_lr()[0]  # the rate used is the one logged
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return lrs


def test_restored_schedule_follows_the_current_config_from_the_saved_step():
    old = TrainConfig(max_steps=10, lr=3e-4, min_lr=3e-5, warmup_frac=0.1)
    optimizer, scheduler = scheduler_after(old, 10)  # finished: the old curve sits at min_lr
    new = TrainConfig(max_steps=40, lr=1e-3, min_lr=1e-5, warmup_frac=0.5)  # 20 warm-up steps: 10 still to come
    lrs = resumed_lrs(scheduler.state_dict(), new, optimizer.param_groups[0]["lr"])
    curve = CosineWithWarmup(max_steps=40, warmup_steps=20, min_ratio=1e-5 / 1e-3)
    assert lrs == pytest.approx([1e-3 * curve(step) for step in range(10, 40)])
    assert lrs[0] == pytest.approx(1e-3 * 11 / 21)  # step 10: the new warm-up, not the old min_lr
    assert lrs[10] == pytest.approx(1e-3)  # the new peak right after warm-up
    assert lrs[-1] == pytest.approx(1e-5)  # the new min_lr at the new last step
    assert lrs == pytest.approx(lrs_over_run(new)[10:])  # as if the run had had the new config all along


def test_restored_schedule_with_an_unchanged_config_is_exactly_the_uninterrupted_one():
    train = TrainConfig(max_steps=30, warmup_frac=0.2)
    optimizer, scheduler = scheduler_after(train, 4)
    assert resumed_lrs(scheduler.state_dict(), train, optimizer.param_groups[0]["lr"]) == lrs_over_run(train)[4:]


def test_wsd_warms_up_holds_the_peak_then_decays_to_min_lr_at_the_last_step():
    train = TrainConfig(max_steps=100, lr=3e-4, min_lr=3e-5, warmup_frac=0.1, schedule="wsd", decay_frac=0.2)
    lrs = lrs_over_run(train)
    assert lrs[:10] == pytest.approx(lrs_over_run(TrainConfig(max_steps=100, warmup_frac=0.1))[:10])  # cosine's
    assert lrs[10:80] == [pytest.approx(3e-4)] * 70  # the stable phase: steps 10 .. 79 at the peak
    assert lrs[80] == pytest.approx(3e-5 + (3e-4 - 3e-5) * (1 - math.sqrt(1 / 20)))  # 1-sqrt decay over 20 steps
    assert lrs[89] == pytest.approx(3e-5 + (3e-4 - 3e-5) * (1 - math.sqrt(10 / 20)))
    assert all(a > b for a, b in zip(lrs[79:], lrs[80:], strict=False))  # strictly falling to the end
    assert lrs[-1] == pytest.approx(3e-5)


def test_wsd_lr_before_its_decay_does_not_depend_on_max_steps():
    """Why WSD: a checkpoint of a long run is, up to its decay, a checkpoint of any shorter run with this warm-up."""
    short = WarmupStableDecay(max_steps=100, warmup_steps=10, decay_steps=20, min_ratio=0.1)
    long = WarmupStableDecay(max_steps=1000, warmup_steps=10, decay_steps=200, min_ratio=0.1)
    assert [short(step) for step in range(80)] == [long(step) for step in range(80)]


def test_a_wsd_run_resumed_with_a_longer_max_steps_decays_at_its_new_end():
    train = TrainConfig(max_steps=100, warmup_frac=0.1, schedule="wsd", decay_frac=0.2)
    optimizer, scheduler = scheduler_after(train, 60)  # still in the stable phase
    longer = TrainConfig(max_steps=200, warmup_frac=0.05, schedule="wsd", decay_frac=0.1)  # the same 10 warm-up steps
    lrs = resumed_lrs(scheduler.state_dict(), longer, optimizer.param_groups[0]["lr"])
    assert lrs == pytest.approx(lrs_over_run(longer)[60:])
    assert lrs[:120] == [pytest.approx(train.lr)] * 120 and lrs[-1] == pytest.approx(train.min_lr)


def test_wsd_schedule_settings_are_checked():
    with pytest.raises(TrainConfigError, match=r"train.decay_frac=0.95: with warmup_frac=0.1 must be at most 0.9"):
        TrainConfig(schedule="wsd", decay_frac=0.95)
    TrainConfig(schedule="wsd", warmup_frac=0.3, decay_frac=0.7)  # warm-up, then decay at once: allowed
    with pytest.raises(TrainConfigError, match=r"train.decay_frac=0: must be in \(0, 1\]"):
        TrainConfig(decay_frac=0)
    with pytest.raises(TrainConfigError, match=r"train.schedule='linear': must be one of cosine, wsd"):
        TrainConfig(schedule="linear")


@pytest.mark.parametrize("max_steps", [1, 2, 3, 7])
def test_wsd_on_a_few_steps_still_ends_at_min_lr(max_steps):
    train = TrainConfig(max_steps=max_steps, lr=1e-3, min_lr=1e-4, warmup_frac=0.3, schedule="wsd", decay_frac=0.7)
    lrs = lrs_over_run(train)
    assert lrs[-1] == pytest.approx(1e-4) and all(0 < lr <= 1e-3 for lr in lrs)


def test_warmup_steps_set_the_warm_up_whatever_max_steps_is():
    for max_steps in (50, 200):
        lrs = lrs_over_run(TrainConfig(max_steps=max_steps, lr=1e-3, warmup_frac=0.5, warmup_steps=10))
        assert lrs[:10] == pytest.approx([1e-3 * (step + 1) / 11 for step in range(10)])  # not half the run
        assert lrs[10] == pytest.approx(1e-3)
    short, long = (lrs_over_run(TrainConfig(max_steps=n, warmup_steps=10, schedule="wsd", decay_frac=0.2))
                   for n in (50, 200))
    assert short[:40] == long[:40]  # a WSD run and a branch of another length share warm-up and plateau
    # Longer than the run: the run is all ramp, at the ramp's own slope (5 of its 10 steps).
    assert lrs_over_run(TrainConfig(max_steps=5, lr=1e-3, warmup_steps=10))[-1] == pytest.approx(1e-3 * 5 / 11)
    with pytest.raises(TrainConfigError, match=r"train.warmup_steps=-1: must be >= 0"):
        TrainConfig(warmup_steps=-1)


@pytest.mark.parametrize(("max_steps", "warmup_steps"), [(1, 5), (9, 9), (9, 100), (10, 9)])
def test_wsd_whose_warm_up_would_take_the_whole_run_still_decays_on_its_last_step(max_steps, warmup_steps):
    train = TrainConfig(max_steps=max_steps, lr=1e-3, min_lr=1e-4, warmup_steps=warmup_steps, schedule="wsd")
    optimizer, scheduler = scheduler_after(train, max_steps)  # the loop steps the scheduler past the last step too
    lrs = lrs_over_run(train)
    assert lrs[-1] == pytest.approx(1e-4) and scheduler.get_last_lr()[0] == pytest.approx(1e-4)


def test_wsd_cut_short_keeps_its_warm_up_ramp_and_decays_on_the_last_step():
    """A budget or a short branch with the long run's warm-up: the same ramp, then min_lr on its last step."""
    lrs = lrs_over_run(TrainConfig(max_steps=6, lr=1e-3, min_lr=1e-4, warmup_steps=10, schedule="wsd"))
    assert lrs[:5] == pytest.approx([1e-3 * (step + 1) / 11 for step in range(5)])
    assert lrs[5] == pytest.approx(1e-4)


def test_a_checkpoint_at_the_decay_start_has_seen_only_the_peak_and_branches_without_notes():
    long = TrainConfig(max_steps=12, warmup_steps=0, schedule="wsd", decay_frac=0.25)  # decays from step 9
    assert branch_schedule_notes(long, replace(long, max_steps=20), 9) == []
    assert len(branch_schedule_notes(long, replace(long, max_steps=20), 10)) == 1  # one step annealed
    short = replace(long, max_steps=8)  # decays from step 6
    assert branch_schedule_notes(long, short, 6) == []  # its whole decay still ahead
    assert "decays over 1 steps instead of 2" in branch_schedule_notes(long, short, 7)[0]
