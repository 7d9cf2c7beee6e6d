import json
import math
import os
import re
import signal
import subprocess
import sys

import pytest
import torch
from lightning import Fabric
from lightning.fabric.plugins.precision import MixedPrecision
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.optim.optimizer import register_optimizer_step_pre_hook

import tml.model.transformer as transformer_module
import tml.train.loop as loop_module
from tests.conftest import REPO_ROOT, debug_model_config
from tests.train.conftest import requires_muon, tiny_run_config
from tml.config import ConfigError, dump_yaml, load_yaml_config
from tml.data.packed import PackedDataset
from tml.model import Transformer
from tml.model.diagnostics import attention_statistics
from tml.run_dir import SUMMARY_FILE
from tml.train.checkpoint import CheckpointError, checkpoints_dir, load_model_weights, read_meta, safe_load
from tml.train.evaluate import val_window_indices
from tml.train.loop import MAX_NONFINITE_STEPS, MAX_OVERFLOWED_STEPS, TrainingDiverged, resume_schedule_notices, train
from tml.train.optim import CosineWithWarmup
from tml.train.preemption import PreemptionFlag
from tml.train.throughput import flops_rate

SUBPROCESS_TIMEOUT_S = 240  # a 2-process CPU run on a busy 2-core machine; far above its usual ~30 s


def summary(run_dir) -> dict:
    return json.loads((run_dir / SUMMARY_FILE).read_text())


def scalars(run_dir, tag):
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def scalar_tags(run_dir):
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return events.Tags()["scalars"]


def test_tiny_run_lowers_the_loss_and_writes_tensorboard_scalars(tmp_path, tiny_shards):
    result = train(tiny_run_config(tiny_shards, tmp_path, max_steps=12))
    losses = [value for _, value in scalars(tmp_path, "train/loss")]
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.2
    for tag in ("train/lr", "train/grad_norm", "train/tokens_per_s", "train/mfu"):
        assert len(scalars(tmp_path, tag)) == 12
    val_loss = scalars(tmp_path, "val/loss")
    val_ppl = scalars(tmp_path, "val/perplexity")
    assert [step for step, _ in val_loss] == [6, 12]
    assert val_ppl[-1][1] == pytest.approx(math.exp(val_loss[-1][1]), rel=1e-5)
    assert result.val_perplexity == pytest.approx(math.exp(result.val_loss))
    assert result.final_step == 12 and not result.stopped_early and not result.preempted
    assert read_meta(tmp_path / "checkpoints" / "last")["step"] == 12
    assert (tmp_path / "config.yaml").is_file()


def test_a_finished_run_writes_summary_json_with_numbers(tmp_path, tiny_shards, capsys):
    config = tiny_run_config(tiny_shards, tmp_path, max_steps=4, val_interval=2)
    result = train(config)
    written = summary(tmp_path)
    # MFU's denominator, measured on CPU at the start: on record, so two runs' MFUs can be compared
    peak = written["peak_flops_per_device"]
    assert peak > 1e9 and f"MFU against {flops_rate(peak)} per device" in capsys.readouterr().out
    assert written == {**written, "final_step": 4, "max_steps": 4, "stopped_early": False, "preempted": False,
                       "diverged": False,
                       "tokens_seen": 4 * config.train.batch_size * config.model.block_size,
                       "params": Transformer(config.model).num_params(non_embedding=False),
                       "checkpoints": str(checkpoints_dir(tmp_path).resolve())}
    assert written["val_loss"] == pytest.approx(result.val_loss) and written["best_val_loss"] == result.best_val_loss
    assert written["val_perplexity"] == pytest.approx(result.val_perplexity)
    assert isinstance(written["wall_s"], float) and written["wall_s"] > 0
    assert not (tmp_path / f"{SUMMARY_FILE}.tmp").exists()


def test_a_run_says_its_global_batch_and_a_finished_one_run_again_says_there_is_nothing_to_train(
        tmp_path, tiny_shards, capsys):
    config = tiny_run_config(tiny_shards, tmp_path, max_steps=2, val_interval=2, ckpt_interval=2)
    train(config)
    out = capsys.readouterr().out
    assert "global batch: 4 sequences x 1 accumulation x 1 ranks of 32 tokens = 128 tokens per optimizer step" in out
    config.train.resume, config.train.max_steps = "auto", 1
    assert train(config).final_step == 2
    assert "already at step 2 of train.max_steps 1: nothing to train" in capsys.readouterr().out


def test_training_starts_by_printing_the_models_size_cache_and_flops_and_notes_them_in_config_yaml(
        tmp_path, tiny_shards, capsys):
    config = tiny_run_config(tiny_shards, tmp_path, max_steps=1, val_interval=1)
    train(config)
    model = Transformer(config.model)
    [line] = [line for line in capsys.readouterr().out.splitlines() if line.startswith("model: ")]
    assert line.startswith(f"model: {model.num_params(non_embedding=False):,} parameters "
                           f"({model.num_params():,} non-embedding) | KV cache 40 numbers/token/layer, "
                           f"{model.kv_cache_bytes_per_token(torch.float32)} B/token in float32 (MHA of this width")
    assert line.endswith(f"{model.flops_per_token() / 1e9:.3g} GFLOPs/token (train)")
    assert (tmp_path / "config.yaml").read_text().startswith(f"# {line}\n")
    assert load_yaml_config(tmp_path / "config.yaml").model == config.model  # the comment keeps it loadable


def test_a_model_vocabulary_smaller_than_the_shards_is_refused_naming_the_key_and_the_way_out(tmp_path, tiny_shards):
    config = tiny_run_config(tiny_shards, tmp_path)
    config.model = debug_model_config(vocab_size=128)
    with pytest.raises(ConfigError, match=r"model.vocab_size=128 is smaller .* \(256\).*--model.vocab_size 256"):
        train(config)
    assert not tmp_path.joinpath("config.yaml").exists()


def test_early_stopping_fires_on_a_plateau(tmp_path, tiny_shards):
    # lr 0: the weights never change, so every validation after the first is "no improvement"
    config = tiny_run_config(tiny_shards, tmp_path, max_steps=50, lr=0.0, min_lr=0.0, val_interval=2,
                             early_stop_patience=2, ckpt_interval=100)
    result = train(config)
    assert result.stopped_early and result.final_step == 6
    assert read_meta(tmp_path / "checkpoints" / "last")["step"] == 6
    assert read_meta(tmp_path / "checkpoints" / "best")["step"] == 2
    written = summary(tmp_path)
    assert written["stopped_early"] is True and written["final_step"] == 6 and written["max_steps"] == 50


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])  # CPU runs 16-mixed as bf16-mixed
def test_mixed_precision_runs_on_cpu(tmp_path, tiny_shards, precision, capsys):
    result = train(tiny_run_config(tiny_shards, tmp_path, max_steps=3, precision=precision, val_interval=3))
    assert math.isfinite(result.val_loss)
    [line] = [line for line in capsys.readouterr().out.splitlines() if line.startswith("model: ")]
    assert "B/token in bfloat16" in line  # the cache's dtype as the run computes, not fp16's on CPU


def test_fp16_scaler_skips_an_overflowed_step_and_lowers_the_scale():
    """The fp16 logic the loop relies on (Fabric's 16-mixed plugin), checked with torch's GradScaler on CPU."""
    precision = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0**16))
    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.SGD([weight], lr=0.1)

    precision.backward((weight * torch.tensor([1.0, float("inf"), 1.0])).sum(), None)
    precision.optimizer_step(optimizer)
    assert torch.equal(weight.detach(), torch.ones(3))  # skipped
    assert precision.scaler.get_scale() == 2.0**15  # halved
    optimizer.zero_grad()

    precision.backward(weight.sum(), None)
    precision.optimizer_step(optimizer)
    assert torch.allclose(weight.detach(), torch.full((3,), 0.9))  # unscaled gradient 1, lr 0.1
    assert precision.state_dict()["scale"] == 2.0**15  # what checkpoints save and restore


FP16_OVERFLOWING_SCALE = 2.0**20  # overflows the debug model's fp16 backward at steps 1, 3, 6 and 12 (halving each time)


def use_real_fp16_on_cpu(monkeypatch, init_scale: float = FP16_OVERFLOWING_SCALE) -> None:
    """Run the loop under Fabric's real 16-mixed plugin (fp16 autocast + GradScaler), which on CPU Fabric would
    otherwise turn into bf16: the loss-scaling path a GPU run takes, exercised end to end on CPU."""

    def build_fp16_fabric(train_config, loggers=None):
        scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
        return Fabric(accelerator="cpu", devices=1, loggers=loggers,
                      plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])

    monkeypatch.setattr(loop_module, "build_fabric", build_fp16_fabric)


def saved_scaler_state(run_dir):
    return safe_load(checkpoints_dir(run_dir) / "last" / "trainer.pt")["precision"]


def test_fp16_run_skips_overflowed_steps_lowers_the_scale_and_still_learns(tmp_path, tiny_shards, monkeypatch):
    use_real_fp16_on_cpu(monkeypatch)
    result = train(tiny_run_config(tiny_shards, tmp_path, max_steps=12, precision="16-mixed"))
    grad_norms = [value for _, value in scalars(tmp_path, "train/grad_norm")]
    assert not math.isfinite(grad_norms[0])  # the first step overflowed: the scaler skipped it
    assert sum(map(math.isfinite, grad_norms)) >= 6  # the others stepped
    assert saved_scaler_state(tmp_path)["scale"] < FP16_OVERFLOWING_SCALE  # halved on overflow, and saved
    losses = [value for _, value in scalars(tmp_path, "train/loss")]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.2
    assert result.final_step == 12 and math.isfinite(result.val_loss)  # overflows are not divergence
    state, _ = load_model_weights(checkpoints_dir(tmp_path) / "last")
    assert all(torch.isfinite(t).all() for t in state.values())


class PreemptAtStep(PreemptionFlag):
    """Raised when the loop reads it for the `step`-th time (it reads once per optimizer step)."""

    def __init__(self, step: int) -> None:
        super().__init__()
        self.step, self.reads = step, 0

    @property
    def requested(self) -> bool:
        self.reads += 1
        return self.reads >= self.step


def test_fp16_run_preempted_and_resumed_matches_an_uninterrupted_run_bit_for_bit(tmp_path, tiny_shards, monkeypatch):
    """The grad scaler's scale and growth counter travel in the checkpoint: without them the resumed run would
    overflow and skip different steps."""
    use_real_fp16_on_cpu(monkeypatch)
    settings = dict(max_steps=12, precision="16-mixed", val_interval=100, ckpt_interval=100)
    train(tiny_run_config(tiny_shards, tmp_path / "whole", **settings))
    interrupted = tiny_run_config(tiny_shards, tmp_path / "split", **settings)
    assert train(interrupted, preemption=PreemptAtStep(5)).final_step == 5
    assert saved_scaler_state(tmp_path / "split")["scale"] < FP16_OVERFLOWING_SCALE
    interrupted.train.resume = "auto"
    assert train(interrupted, preemption=PreemptionFlag()).final_step == 12

    assert saved_scaler_state(tmp_path / "split") == saved_scaler_state(tmp_path / "whole")
    whole, _ = load_model_weights(checkpoints_dir(tmp_path / "whole") / "last")
    split, _ = load_model_weights(checkpoints_dir(tmp_path / "split") / "last")
    for name, value in whole.items():
        assert torch.equal(split[name], value), name


def test_persistent_nan_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(
        tmp_path, tiny_shards, monkeypatch):
    original = Transformer.forward
    calls = {"n": 0}

    def forward_turning_nan(self, idx, targets=None, **kwargs):  # fault injection: the loss goes NaN from step 5
        logits, loss = original(self, idx, targets, **kwargs)
        calls["n"] += self.training
        return logits, loss * math.nan if self.training and calls["n"] > 4 else loss

    monkeypatch.setattr(Transformer, "forward", forward_turning_nan)
    config = tiny_run_config(tiny_shards, tmp_path, max_steps=30, ckpt_interval=2, val_interval=100)
    with pytest.raises(TrainingDiverged, match=f"non-finite for {MAX_NONFINITE_STEPS} consecutive steps .*"
                                               r"Lower train.lr or raise train.warmup_frac\.$"):
        train(config)
    # Step 4's weights gave the first NaN (step 5): set aside, and `last` is the checkpoint before them.
    assert read_meta(tmp_path / "checkpoints" / "last")["step"] == 2
    assert read_meta(tmp_path / "checkpoints" / "diverged-step-0000004")["step"] == 4
    state, _ = load_model_weights(tmp_path / "checkpoints" / "last")
    assert all(torch.isfinite(t).all() for t in state.values())
    written = summary(tmp_path)  # a sweep's script learns why the run ended
    assert written["diverged"] is True and written["final_step"] == 4 + MAX_NONFINITE_STEPS
    assert written["val_loss"] is None and written["best_val_loss"] is None  # never validated: null, not NaN


class NaNGradient(torch.autograd.Function):
    """Passes a finite loss through and sends NaN gradients back: the blow-up of a too-high lr, one step early."""

    @staticmethod
    def forward(ctx, loss):
        return loss.view_as(loss)

    @staticmethod
    def backward(ctx, grad):
        return grad * math.nan


def nan_gradients_from_step(monkeypatch, first_bad: int, last_bad: int = 10**9) -> None:
    original = Transformer.forward
    calls = {"n": 0}

    def forward(self, idx, targets=None, **kwargs):
        logits, loss = original(self, idx, targets, **kwargs)
        calls["n"] += self.training  # one training forward per step (grad_accum 1)
        return logits, NaNGradient.apply(loss) if self.training and first_bad <= calls["n"] <= last_bad else loss

    monkeypatch.setattr(Transformer, "forward", forward)


def test_nan_gradients_with_a_finite_loss_are_neither_applied_nor_saved(tmp_path, tiny_shards, monkeypatch):
    nan_gradients_from_step(monkeypatch, first_bad=3)
    config = tiny_run_config(tiny_shards, tmp_path, max_steps=30, ckpt_interval=1, val_interval=100)
    root = checkpoints_dir(tmp_path)
    with pytest.raises(TrainingDiverged, match=re.escape(
            "non-finite for 5 consecutive steps (steps 3 to 7); stopping. The checkpoint whose weights led into it "
            f"is kept as diverged-step-0000002. `last` is step-0000001 in {root}, saved before the divergence: "
            "--train.resume auto continues from it.")):
        train(config)
    assert read_meta(root / "last")["step"] == 1  # not step 3, whose update was NaN, nor step 2, which led into it
    assert sorted(path.name for path in root.glob("*step-*")) == ["diverged-step-0000002", "step-0000001"]
    state, _ = load_model_weights(tmp_path / "checkpoints" / "last")
    assert all(torch.isfinite(t).all() for t in state.values())
    losses = [value for _, value in scalars(tmp_path, "train/loss")]
    assert all(map(math.isfinite, losses))  # the weights were never touched by a NaN update
    assert scalars(tmp_path, "train/grad_norm")[-1][0] == 7  # the step the message ends at is on the curves too


def test_a_run_that_blew_up_from_its_first_steps_leaves_nothing_to_resume_and_restarts_cleanly(tmp_path, tiny_shards):
    config = tiny_run_config(tiny_shards, tmp_path, max_steps=12, lr=1e4, min_lr=0.0, warmup_frac=0.0,
                             ckpt_interval=1, val_interval=100)
    with pytest.raises(TrainingDiverged, match="No checkpoint from before the divergence is left: a new run starts "
                                               "afresh"):
        train(config)
    root = checkpoints_dir(tmp_path)
    assert not (root / "last").exists() and not list(root.glob("step-*")) and list(root.glob("diverged-step-*"))
    config.train.lr, config.train.min_lr, config.train.resume = 3e-3, 3e-4, "auto"
    result = train(config)  # what the message promises: the same command with a sane lr trains
    assert result.final_step == 12 and math.isfinite(result.val_loss)


def test_fp16_gradients_that_overflow_at_every_scale_end_the_run_as_diverged(tmp_path, tiny_shards, monkeypatch):
    use_real_fp16_on_cpu(monkeypatch, init_scale=2.0**8)  # a scale at which the debug model does not overflow
    nan_gradients_from_step(monkeypatch, first_bad=2)
    config = tiny_run_config(tiny_shards, tmp_path, max_steps=100, precision="16-mixed", val_interval=1000,
                             ckpt_interval=1000)
    with pytest.raises(TrainingDiverged, match=f"the fp16 gradients overflowed at every loss scale tried for "
                                               f"{MAX_OVERFLOWED_STEPS} consecutive steps \\(steps 2 to {1 + MAX_OVERFLOWED_STEPS}\\).*"
                                               r"or use bf16-mixed \(fp16's range is narrow\)\.$"):
        train(config)
    assert summary(tmp_path)["final_step"] == 1 + MAX_OVERFLOWED_STEPS


def test_a_run_stopped_between_validations_says_from_which_step_its_final_val_loss_is(tmp_path, tiny_shards, capsys):
    config = tiny_run_config(tiny_shards, tmp_path, max_steps=8, val_interval=2, ckpt_interval=100)
    assert train(config, preemption=PreemptAtStep(3)).final_step == 3
    [row] = [line for line in capsys.readouterr().out.splitlines() if "final val loss" in line]
    assert re.search(r"final val loss\W+\d+\.\d{4} \(step 2\)", row), row


def test_a_stop_request_at_the_last_step_leaves_a_complete_run_not_a_preempted_one(tmp_path, tiny_shards):
    """A scheduler that requeued it would only find nothing left to train."""
    config = tiny_run_config(tiny_shards, tmp_path, max_steps=3, val_interval=3, ckpt_interval=100)
    result = train(config, preemption=PreemptAtStep(3))
    assert result.final_step == 3 and not result.preempted and math.isfinite(result.val_loss)
    assert summary(tmp_path)["preempted"] is False and read_meta(checkpoints_dir(tmp_path) / "last")["step"] == 3


def test_a_stop_request_on_a_skipped_step_still_saves_the_unchanged_weights(tmp_path, tiny_shards, monkeypatch):
    nan_gradients_from_step(monkeypatch, first_bad=3, last_bad=3)
    config = tiny_run_config(tiny_shards, tmp_path, max_steps=8, val_interval=100, ckpt_interval=100)
    assert train(config, preemption=PreemptAtStep(3)).preempted
    assert read_meta(checkpoints_dir(tmp_path) / "last")["step"] == 3  # a requeued job continues from here
    state, _ = load_model_weights(checkpoints_dir(tmp_path) / "last")
    assert all(torch.isfinite(t).all() for t in state.values())


def test_a_blow_up_with_a_finite_loss_first_says_the_checkpoint_left_is_likely_damaged(tmp_path, tiny_shards,
                                                                                      monkeypatch):
    original = Transformer.forward
    calls = {"n": 0}

    def forward_blowing_up(self, idx, targets=None, **kwargs):  # huge but finite losses at steps 3-4, then NaN
        logits, loss = original(self, idx, targets, **kwargs)
        calls["n"] += self.training
        if self.training and calls["n"] >= 3:
            loss = loss * (1000.0 if calls["n"] < 5 else math.nan)
        return logits, loss

    monkeypatch.setattr(Transformer, "forward", forward_blowing_up)
    config = tiny_run_config(tiny_shards, tmp_path, max_steps=30, ckpt_interval=1, val_interval=100)
    with pytest.raises(TrainingDiverged, match=r"`last` is step-0000003 .* Its train loss \(5\d{3}\) was "
                                               r"already above the first step's \(5\.\d+\), so its weights are "
                                               r"likely damaged too: a new run \(another --train.out_dir than "):
        train(config)


def test_a_few_nan_gradient_steps_are_skipped_and_the_run_carries_on(tmp_path, tiny_shards, monkeypatch, capsys):
    nan_gradients_from_step(monkeypatch, first_bad=3, last_bad=4)
    result = train(tiny_run_config(tiny_shards, tmp_path, max_steps=8, val_interval=8, ckpt_interval=8))
    skipped = [line for line in capsys.readouterr().out.splitlines() if "skipped: non-finite" in line]
    assert [line.split("|")[0].split()[1] for line in skipped] == ["3", "4"]
    assert result.final_step == 8 and math.isfinite(result.val_loss)
    norms = [value for _, value in scalars(tmp_path, "train/grad_norm")]
    assert [math.isfinite(norm) for norm in norms] == [True, True, False, False, True, True, True, True]
    state, _ = load_model_weights(tmp_path / "checkpoints" / "last")
    assert all(torch.isfinite(t).all() for t in state.values())


def test_preemption_signal_saves_last_and_resume_continues(tmp_path, tiny_shards):
    flag = PreemptionFlag().install([signal.SIGUSR1])
    os.kill(os.getpid(), signal.SIGUSR1)
    config = tiny_run_config(tiny_shards, tmp_path, max_steps=6, val_interval=100, ckpt_interval=100)
    result = train(config, preemption=flag)
    assert result.preempted and result.final_step == 1
    assert read_meta(tmp_path / "checkpoints" / "last")["step"] == 1
    assert summary(tmp_path)["stop_reason"] == "SIGUSR1"  # a sweep's script tells Ctrl-C from a scheduler
    config.train.resume = "auto"
    resumed = train(config, preemption=PreemptionFlag())
    assert not resumed.preempted and resumed.final_step == 6
    assert summary(tmp_path)["stop_reason"] is None


def test_resume_with_a_longer_run_follows_the_new_schedule_from_the_saved_step(tmp_path, tiny_shards, capsys):
    quiet = dict(val_interval=100, ckpt_interval=100)
    train(tiny_run_config(tiny_shards, tmp_path, max_steps=6, **quiet))  # ends at its min_lr
    longer = tiny_run_config(tiny_shards, tmp_path, max_steps=16, lr=2e-3, min_lr=1e-4, warmup_frac=0.5,
                             resume="auto", **quiet)
    used = []
    hook = register_optimizer_step_pre_hook(lambda optimizer, *_: used.append(optimizer.param_groups[0]["lr"]))
    try:
        assert train(longer).final_step == 16
    finally:
        hook.remove()
    curve = CosineWithWarmup(max_steps=16, warmup_steps=8, min_ratio=1e-4 / 2e-3)
    expected = [2e-3 * curve(step) for step in range(6, 16)]
    assert used == pytest.approx(expected)  # from the first resumed step on, whatever the optimizer state said
    assert [lr for step, lr in scalars(tmp_path, "train/lr") if step > 6] == pytest.approx(expected)
    assert used[0] == pytest.approx(2e-3 * 7 / 9) and used[2] == pytest.approx(2e-3)  # the new warm-up and peak
    assert used[-1] == pytest.approx(1e-4)  # the new min_lr at the new last step
    assert ("resuming with changed settings: train.max_steps 6 -> 16, train.lr 0.003 -> 0.002, "
            "train.min_lr 0.0003 -> 0.0001, train.warmup_frac 0.1 -> 0.5") in capsys.readouterr().out


def test_resume_with_another_model_or_a_fresh_run_over_a_run_is_refused_before_anything_is_written(
        tmp_path, tiny_shards):
    config = tiny_run_config(tiny_shards, tmp_path, max_steps=2, val_interval=2, ckpt_interval=2)
    train(config)
    before = {path: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()}
    config.model, config.train.resume = debug_model_config(attention="mha"), "auto"
    with pytest.raises(CheckpointError, match="model.attention mla -> mha .*--model.attention mla"):
        train(config)
    config.model, config.train.resume = debug_model_config(), "none"
    with pytest.raises(CheckpointError, match="up to step 2 .*--train.resume auto continues it"):
        train(config)
    assert {path: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()} == before


def test_a_start_refused_after_fabric_started_gives_the_caller_its_signals_back(tmp_path, tiny_shards):
    """A corrupted `last` is found while the checkpoint loads, after the stop handlers are in: they come off again."""
    config = tiny_run_config(tiny_shards, tmp_path, max_steps=2, val_interval=2, ckpt_interval=2)
    train(config)
    weights = checkpoints_dir(tmp_path) / "last" / "model.pt"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only the sha256 check at load time sees it
    weights.write_bytes(bytes(data))
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}
    config.train.resume, config.train.max_steps = "auto", 4
    with pytest.raises(CheckpointError, match="model.pt is corrupted"):
        train(config)
    assert {sig: signal.getsignal(sig) for sig in before} == before


def test_a_run_stopped_before_its_first_validation_shows_no_best_val_loss(tmp_path, tiny_shards, capsys):
    config = tiny_run_config(tiny_shards, tmp_path, max_steps=6, val_interval=100, ckpt_interval=100)
    flag = PreemptAtStep(1)
    flag.signal_number = signal.SIGUSR1  # as the handler records it
    assert train(config, preemption=flag).preempted
    out = capsys.readouterr().out.splitlines()
    [row] = [line for line in out if "best val loss" in line]
    assert re.fullmatch(r".*best val loss\W*-\W*", row), row
    [row] = [line for line in out if "stopped by" in line]  # what stopped it, not only that something did
    assert re.fullmatch(r".*stopped by\W*SIGUSR1\W*", row), row
    written = summary(tmp_path)  # what is known: no validation yet, so null rather than a made-up number
    assert written["preempted"] is True and written["final_step"] == 1 and written["tokens_seen"] > 0
    assert written["best_val_loss"] is written["val_loss"] is written["val_perplexity"] is None


def test_activation_checkpointing_trains_exactly_as_without(tmp_path, tiny_shards, monkeypatch):
    settings = dict(max_steps=4, val_interval=4, ckpt_interval=4)
    plain = train(tiny_run_config(tiny_shards, tmp_path / "plain", **settings))
    recomputed_blocks = []
    real_checkpoint = transformer_module.checkpoint
    monkeypatch.setattr(transformer_module, "checkpoint",
                        lambda block, *args, **kwargs: recomputed_blocks.append(block) or real_checkpoint(
                            block, *args, **kwargs))
    recomputed = train(tiny_run_config(tiny_shards, tmp_path / "recomputed", activation_checkpointing=True,
                                       **settings))
    assert len(recomputed_blocks) == 4 * debug_model_config().n_layer  # every block of every training step
    assert scalars(tmp_path / "recomputed", "train/loss") == scalars(tmp_path / "plain", "train/loss")
    assert recomputed.val_loss == plain.val_loss


@pytest.mark.slow
def test_compiled_run_with_activation_checkpointing_matches_eager(tmp_path, tiny_shards):
    settings = dict(max_steps=3, val_interval=3, ckpt_interval=3)
    eager = train(tiny_run_config(tiny_shards, tmp_path / "eager", **settings))
    compiled = train(tiny_run_config(tiny_shards, tmp_path / "compiled", compile=True, activation_checkpointing=True,
                                     **settings))
    eager_losses = [value for _, value in scalars(tmp_path / "eager", "train/loss")]
    compiled_losses = [value for _, value in scalars(tmp_path / "compiled", "train/loss")]
    assert compiled_losses[0] == pytest.approx(eager_losses[0], rel=1e-5)
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-2)  # see the compiled test below for why 1e-2
    assert compiled.val_loss == pytest.approx(eager.val_loss, rel=1e-2)


@pytest.mark.slow
def test_compiled_run_matches_eager_and_saves_weights_a_plain_model_loads(tmp_path, tiny_shards):
    settings = dict(max_steps=4, val_interval=4, ckpt_interval=4)
    eager = train(tiny_run_config(tiny_shards, tmp_path / "eager", **settings))
    compiled = train(tiny_run_config(tiny_shards, tmp_path / "compiled", compile=True, **settings))
    eager_losses = [value for _, value in scalars(tmp_path / "eager", "train/loss")]
    compiled_losses = [value for _, value in scalars(tmp_path / "compiled", "train/loss")]
    assert compiled_losses[0] == pytest.approx(eager_losses[0], rel=1e-5)  # same weights, same math, fused kernels
    # After updates: Adam normalises each gradient, so fused kernels' last-bit differences grow (torch 2.5 drifts
    # 0.3% by step 4; 2.13 stays under 0.1%).
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-2)
    assert compiled.val_loss == pytest.approx(eager.val_loss, rel=1e-2)
    state, config = load_model_weights(checkpoints_dir(tmp_path / "compiled") / "last")
    assert not any(name.startswith("_orig_mod.") for name in state)  # no torch.compile wrapper in the keys
    Transformer(config.model).load_state_dict(state)  # strict: what `tml generate` and `tml eval` do


@pytest.mark.slow
def test_an_eager_run_resumes_compiled_and_a_compiled_one_eagerly(tmp_path, tiny_shards, capsys):
    """configs/reference.yaml compiles since the GPU check: a reference run an older tml trained eagerly resumes."""
    settings = dict(val_interval=100, ckpt_interval=100)
    train(tiny_run_config(tiny_shards, tmp_path, max_steps=2, **settings))
    assert train(tiny_run_config(tiny_shards, tmp_path, max_steps=4, compile=True, resume="auto",
                                 **settings)).final_step == 4
    assert "train.compile false -> true" in capsys.readouterr().out  # listed, not refused
    resumed = train(tiny_run_config(tiny_shards, tmp_path, max_steps=6, resume="auto", **settings))
    assert resumed.final_step == 6 and math.isfinite(resumed.val_loss)
    assert [step for step, _ in scalars(tmp_path, "train/loss")] == [1, 2, 3, 4, 5, 6]


def test_a_muon_lr_an_adamw_run_does_not_use_is_named(tmp_path, tiny_shards, capsys):
    train(tiny_run_config(tiny_shards, tmp_path, max_steps=1, val_interval=100, muon_lr=0.02))
    assert "train.muon_lr 0.02 is unused: it is Muon's lr, and train.optimizer is adamw" in capsys.readouterr().out


def launch(config, timeout=SUBPROCESS_TIMEOUT_S, **popen):
    """Run launch/local.py on `config` (written as YAML next to its out_dir)."""
    path = config.train.out_dir + ".yaml"
    with open(path, "w") as handle:
        handle.write(dump_yaml(config))
    return subprocess.run([sys.executable, str(REPO_ROOT / "launch" / "local.py"), "--config", path],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout, **popen)


@pytest.mark.slow
@pytest.mark.timeout(2 * SUBPROCESS_TIMEOUT_S + 30)
@pytest.mark.parametrize("optimizer", ["adamw", pytest.param("muon", marks=requires_muon)])  # Muon: each rank
# orthogonalises the same averaged gradient
def test_two_process_ddp_matches_one_process_with_doubled_accumulation(tmp_path, tiny_shards, optimizer):
    common = dict(max_steps=6, batch_size=4, val_interval=3, ckpt_interval=6, log_interval=1, lr=1e-3,
                  optimizer=optimizer)
    single = tiny_run_config(tiny_shards, tmp_path / "single", grad_accum=2, devices=1, **common)
    ddp = tiny_run_config(tiny_shards, tmp_path / "ddp", grad_accum=1, devices=2, strategy="ddp", **common)
    for config in (single, ddp):
        done = launch(config)
        assert done.returncode == 0, done.stderr[-3000:]
    # Only rank 0 logs: one event file, one scalar per step, one console line per step.
    assert len(list((tmp_path / "ddp" / "tensorboard").glob("events.out.tfevents.*"))) == 1
    assert [step for step, _ in scalars(tmp_path / "ddp", "train/loss")] == list(range(1, 7))
    assert [step for step, _ in scalars(tmp_path / "ddp", "attention/max_logit")] == [3, 6]  # rank 0 measures alone
    assert done.stdout.count("step       6 | loss") == 1
    weights_single, _ = load_model_weights(tmp_path / "single" / "checkpoints" / "last")
    weights_ddp, _ = load_model_weights(tmp_path / "ddp" / "checkpoints" / "last")
    # Muon's Newton-Schulz runs in bf16 (torch's, as Keller Jordan's): the fp32 all-reduce's other summation order
    # flips some bf16 roundings of an update (measured: up to 4e-5 on weights of about 0.05 after these 6 steps)
    atol, rel = (1e-5, 1e-4) if optimizer == "adamw" else (1e-4, 1e-3)
    for name, value in weights_single.items():
        torch.testing.assert_close(weights_ddp[name], value, rtol=rel, atol=atol, msg=name)
    assert read_meta(tmp_path / "ddp" / "checkpoints" / "last")["world_size"] == 2
    loss_single = [v for _, v in scalars(tmp_path / "single", "val/loss")]
    loss_ddp = [v for _, v in scalars(tmp_path / "ddp", "val/loss")]
    assert loss_ddp == pytest.approx(loss_single, rel=rel)


def test_wandb_runs_offline_without_a_key_and_a_restart_continues_the_same_run(tmp_path, tiny_shards, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))  # nor a key that `wandb login` stored
    monkeypatch.setenv("WANDB_SILENT", "true")
    config = tiny_run_config(tiny_shards, tmp_path, max_steps=2, val_interval=2, ckpt_interval=2)
    config.log.wandb, config.log.run_name, config.log.wandb_group = True, "lr=3e-3", "lr-sweep"
    train(config)
    run_id = read_meta(tmp_path / "checkpoints" / "last")["wandb_run_id"]
    [records] = (tmp_path / "wandb").glob(f"offline-run-*/run-{run_id}.wandb")
    # The run record holds the group and name as bare protobuf strings; the logged config has them in JSON quotes.
    assert re.search(rb'(?<!")lr-sweep', records.read_bytes()) and re.search(rb'(?<!")lr=3e-3', records.read_bytes())
    config.train.max_steps, config.train.resume = 3, "auto"
    train(config)
    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(run.name.endswith(f"-{run_id}") for run in runs)
    assert read_meta(tmp_path / "checkpoints" / "last")["wandb_run_id"] == run_id


def test_tokens_seen_and_wall_time_add_up_across_a_resume_with_another_batch_size(tmp_path, tiny_shards):
    first = tiny_run_config(tiny_shards, tmp_path, max_steps=4, val_interval=100, ckpt_interval=100)
    train(first)
    first_wall = summary(tmp_path)["wall_s"]
    resumed = tiny_run_config(tiny_shards, tmp_path, max_steps=6, val_interval=100, ckpt_interval=100,
                              batch_size=2, resume="auto")
    train(resumed)
    block = first.model.block_size
    written = summary(tmp_path)
    assert written["tokens_seen"] == 4 * 4 * block + 2 * 2 * block  # counted, not 6 steps x the new batch
    assert [value for step, value in scalars(tmp_path, "train/tokens") if step in (4, 6)] == [16 * block, 20 * block]
    assert written["wall_s"] > first_wall  # the first segment's time is carried over


def test_a_run_started_from_other_weights_begins_with_them_and_a_fresh_schedule_and_keeps_its_own_on_resume(
        tmp_path, tiny_shards, capsys):
    source = tiny_run_config(tiny_shards, tmp_path / "source", max_steps=3, val_interval=3, ckpt_interval=3)
    train(source)
    # lr 0 all along: the new run's weights stay exactly what it started from. Dropout may differ from the source's.
    tuned = tiny_run_config(tiny_shards, tmp_path / "tuned", max_steps=2, val_interval=2, ckpt_interval=2, lr=0.0,
                            min_lr=0.0, init_from=str(tmp_path / "source"))
    tuned.model.dropout = 0.1
    result = train(tuned)
    assert f"initial weights from {checkpoints_dir(tmp_path / 'source') / 'step-0000003'} (step 3)" in (
        capsys.readouterr().out)
    assert result.final_step == 2  # its own steps, from 0: a fresh schedule, not the source's step 3
    started_from, _ = load_model_weights(tmp_path / "source")
    trained, _ = load_model_weights(tmp_path / "tuned" / "checkpoints" / "last")
    for name, value in started_from.items():
        assert torch.equal(trained[name], value), name

    tuned.train.max_steps, tuned.train.resume, tuned.train.lr = 3, "auto", 1e-3
    tuned.train.init_from = None  # a resume without it keeps the record of where the run started
    train(tuned)
    out, err = capsys.readouterr()
    assert "resumed from" in out and "initial weights" not in out  # its own checkpoint, not the source's weights
    assert "train.init_from" not in out and f"init_from: {tmp_path / 'source'}" in (
        tmp_path / "tuned" / "config.yaml").read_text()
    tuned.train.max_steps, tuned.train.init_from = 4, str(tmp_path / "elsewhere")
    train(tuned)
    assert f"train.init_from={tmp_path / 'elsewhere'} ignored: this run resumes its own weights (it started from " \
           f"{tmp_path / 'source'})" in capsys.readouterr().err


def test_starting_from_weights_of_another_shape_is_refused_before_anything_is_written(tmp_path, tiny_shards):
    source = tiny_run_config(tiny_shards, tmp_path / "source", max_steps=1, val_interval=1, ckpt_interval=1)
    train(source)
    other = tiny_run_config(tiny_shards, tmp_path / "other", init_from=str(tmp_path / "source"))
    other.model.n_layer = 3
    with pytest.raises(CheckpointError, match=r"its model has another shape \(model.n_layer 2 there, 3 here\)"):
        train(other)
    assert not (tmp_path / "other").exists()


class ReportsNorm:
    """What DeepSpeed's engine answers for the last step's gradient norm: None (not computed), a float or a tensor."""

    def __init__(self, norm):
        self.norm = norm

    def get_global_grad_norm(self):
        return self.norm


@pytest.mark.parametrize("reported, expected, known", [(None, math.nan, False), (2.5, 2.5, True),
                                                       (torch.tensor([1.5], dtype=torch.float16), 1.5, True)])
def test_deepspeeds_reported_grad_norm_becomes_a_float32_scalar_on_the_device(reported, expected, known):
    norm, norm_known = loop_module.deepspeed_grad_norm(ReportsNorm(reported), torch.device("cpu"))
    assert norm.shape == () and norm.dtype == torch.float32 and norm_known is known
    assert math.isnan(norm.item()) if math.isnan(expected) else norm.item() == expected


def test_a_wsd_runs_checkpoint_branched_to_a_shorter_length_is_a_run_of_that_length(tmp_path, tiny_shards, capsys):
    """WSD's promise: a long run's checkpoint before its decay, continued with a shorter max_steps in a directory of
    its own, ends with exactly the weights of a run trained for that length from the start (and is a new run in
    wandb: its own id, while the long run keeps its own)."""
    wsd = dict(schedule="wsd", warmup_frac=0.0, decay_frac=0.25, val_interval=100, ckpt_interval=2, keep_checkpoints=9)
    train(tiny_run_config(tiny_shards, tmp_path / "long", max_steps=8, **wsd))  # decays over steps 6 and 7
    train(tiny_run_config(tiny_shards, tmp_path / "six", max_steps=6, **wsd))  # decays over step 5
    capsys.readouterr()
    from_step_4 = checkpoints_dir(tmp_path / "long") / "step-0000004"
    train(tiny_run_config(tiny_shards, tmp_path / "branch", max_steps=6, resume=str(from_step_4), **wsd))
    assert f"resumed from {from_step_4} at step 4: a branch of that run" in capsys.readouterr().out
    branch, _ = load_model_weights(tmp_path / "branch" / "checkpoints" / "last")
    six, _ = load_model_weights(tmp_path / "six" / "checkpoints" / "last")
    for name, value in six.items():
        assert torch.equal(branch[name], value), name
    long_id = read_meta(from_step_4)["wandb_run_id"]
    assert read_meta(tmp_path / "branch" / "checkpoints" / "last")["wandb_run_id"] != long_id
    assert read_meta(tmp_path / "long" / "checkpoints" / "last")["wandb_run_id"] == long_id
    branch_summary = summary(tmp_path / "branch")
    assert (branch_summary["branched_from"], branch_summary["branched_at_step"]) == (str(from_step_4.resolve()), 4)
    assert summary(tmp_path / "six")["branched_from"] is None
    # Continued as its own run (auto), a branch still says where it came from.
    train(tiny_run_config(tiny_shards, tmp_path / "branch", max_steps=7, resume="auto", **wsd))
    assert summary(tmp_path / "branch")["branched_from"] == str(from_step_4.resolve())


def test_a_resume_says_when_a_budget_was_partly_trained_at_another_global_batch(tmp_path):
    config = tiny_run_config(tmp_path, tmp_path, max_tokens=100_000)  # batch 4 x 1 device x 32 tokens = 128 a step
    tokens_per_step = 4 * config.model.block_size
    assert config.train.max_steps == 100_000 // tokens_per_step
    assert resume_schedule_notices(config, None, 10, 10 * tokens_per_step, tokens_per_step) == []
    [notice] = resume_schedule_notices(config, None, 10, 5 * tokens_per_step, tokens_per_step)  # half batch
    ends_at = 5 * tokens_per_step + (config.train.max_steps - 10) * tokens_per_step
    assert notice == (f"note: {5 * tokens_per_step:,} tokens were trained at another global batch; train.max_tokens "
                      f"is counted in steps of today's {tokens_per_step:,} tokens, so the run ends at {ends_at:,} tokens")


def test_a_branch_says_when_it_starts_inside_its_decay_or_from_annealed_weights(tmp_path):
    wsd = dict(schedule="wsd", warmup_frac=0.0, decay_frac=0.5)
    long = tiny_run_config(tmp_path, tmp_path, max_steps=20, **wsd)  # decays from step 10
    branch = tiny_run_config(tmp_path, tmp_path, max_steps=10, **wsd)  # decays from step 5
    assert resume_schedule_notices(branch, long.train, 4, 0, 0) == []  # before both decays: a clean branch
    [inside] = resume_schedule_notices(branch, long.train, 7, 0, 0)
    lr = 3e-4 + (3e-3 - 3e-4) * (1 - math.sqrt(3 / 5))
    assert inside == (f"note: step 7 is inside this run's decay (from step 5): it starts at lr {lr:.3g}, not at the "
                      "peak, and decays over 3 steps instead of 5")
    longer = tiny_run_config(tmp_path, tmp_path, max_steps=40, **wsd)
    [annealed] = resume_schedule_notices(longer, long.train, 15, 0, 0)
    assert annealed.startswith("note: the checkpoint at step 15 was in its run's decay (from step 10, lr ")
    assert resume_schedule_notices(branch, None, 7, 0, 0) == []  # its own run, resumed in its decay


@pytest.mark.parametrize(("precision", "warned"), [("bf16-mixed", True), ("32-true", False)])
def test_a_bf16_run_on_a_cpu_without_native_bf16_says_fp32_would_be_faster(tmp_path, tiny_shards, monkeypatch, capsys,
                                                                             precision, warned):
    import tml.train.throughput as throughput

    measured = {"bf16": 0.8e9, "fp32": 60e9}  # an AMD EPYC without AVX512 here: bf16 matmuls 75x slower
    monkeypatch.setattr(throughput, "measure_cpu_peak_flops", lambda dtype="fp32", seconds=0, size=0: measured[dtype])
    train(tiny_run_config(tiny_shards, tmp_path, max_steps=1, val_interval=1, precision=precision))
    out = capsys.readouterr().out
    assert ("MFU against 0.8 GFLOP/s per device" in out) is warned
    assert ("it has no native bf16 (AVX512-BF16 or AMX), so train.precision bf16-mixed would train faster here as "
            "--train.precision 32-true" in out) is warned


def test_each_validation_logs_the_attention_statistics_of_the_model_as_it_then_is(tmp_path, tiny_shards):
    config = tiny_run_config(tiny_shards, tmp_path, max_steps=4, val_interval=2, ckpt_interval=2)
    train(config)
    layers = range(config.model.n_layer)
    expected_tags = {"attention/max_logit"} | {f"attention/{what}/layer_{layer:02d}" for layer in layers
                                               for what in ("max_logit", "entropy", "cache_rank")}
    assert expected_tags <= set(scalar_tags(tmp_path))
    assert [step for step, _ in scalars(tmp_path, "attention/max_logit")] == [2, 4]
    # The numbers are tml inspect's, on 8 validation windows spread over the split, of the weights at that step.
    val_set = PackedDataset(config.data.shard_dir, "val", config.model.block_size, config.model.block_size)
    windows = torch.stack([val_set[i][0] for i in val_window_indices(len(val_set), 8)])
    for step in (2, 4):
        model = Transformer(config.model)
        model.load_state_dict(safe_load(checkpoints_dir(tmp_path) / f"step-{step:07d}" / "model.pt"))
        expected = attention_statistics(model, windows)
        logged = {tag: dict(scalars(tmp_path, tag))[step] for tag in expected_tags}
        assert logged["attention/max_logit"] == pytest.approx(max(s.max_logit for s in expected), rel=1e-5)
        for layer in expected:
            name = f"layer_{layer.layer:02d}"
            assert logged[f"attention/max_logit/{name}"] == pytest.approx(layer.max_logit, rel=1e-5)
            assert logged[f"attention/entropy/{name}"] == pytest.approx(layer.mean_entropy, rel=1e-5)
            assert logged[f"attention/cache_rank/{name}"] == pytest.approx(layer.cache_effective_rank, rel=1e-5)


def test_attention_statistics_can_be_turned_off(tmp_path, tiny_shards):
    config = tiny_run_config(tiny_shards, tmp_path, max_steps=2, val_interval=2, ckpt_interval=2)
    config.log.attention_stats = False
    train(config)
    assert "val/loss" in scalar_tags(tmp_path) and not any(tag.startswith("attention/") for tag in scalar_tags(tmp_path))


def test_attention_statistics_leave_training_bit_identical(tmp_path, tiny_shards):
    """They run in eval mode between training steps: no dropout draw, no mode or state left changed."""
    weights = {}
    for watched in (True, False):
        config = tiny_run_config(tiny_shards, tmp_path / str(watched), max_steps=4, val_interval=2, ckpt_interval=4)
        config.model, config.log.attention_stats = debug_model_config(dropout=0.1), watched
        train(config)
        weights[watched] = safe_load(checkpoints_dir(tmp_path / str(watched)) / "last" / "model.pt")
    assert all(torch.equal(weights[True][name], value) for name, value in weights[False].items())
