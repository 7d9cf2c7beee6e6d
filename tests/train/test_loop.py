import math
import os
import signal
import subprocess
import sys

import pytest
import torch
from lightning.fabric.plugins.precision import MixedPrecision
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.conftest import REPO_ROOT
from tests.train.conftest import tiny_run_config
from tml.config import dump_yaml
from tml.model import Transformer
from tml.train.checkpoint import load_model_weights, read_meta
from tml.train.loop import MAX_NONFINITE_STEPS, TrainingDiverged, train
from tml.train.preemption import PreemptionFlag

SUBPROCESS_TIMEOUT_S = 240  # a 2-process CPU run on a busy 2-core machine; far above its usual ~30 s


def scalars(run_dir, tag):
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


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


def test_early_stopping_fires_on_a_plateau(tmp_path, tiny_shards):
    # lr 0: the weights never change, so every validation after the first is "no improvement"
    config = tiny_run_config(tiny_shards, tmp_path, max_steps=50, lr=0.0, min_lr=0.0, val_interval=2,
                             early_stop_patience=2, ckpt_interval=100)
    result = train(config)
    assert result.stopped_early and result.final_step == 6
    assert read_meta(tmp_path / "checkpoints" / "last")["step"] == 6
    assert read_meta(tmp_path / "checkpoints" / "best")["step"] == 2


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])  # CPU runs 16-mixed as bf16-mixed
def test_mixed_precision_runs_on_cpu(tmp_path, tiny_shards, precision):
    result = train(tiny_run_config(tiny_shards, tmp_path, max_steps=3, precision=precision, val_interval=3))
    assert math.isfinite(result.val_loss)


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
    with pytest.raises(TrainingDiverged, match=f"non-finite for {MAX_NONFINITE_STEPS} consecutive steps"):
        train(config)
    assert read_meta(tmp_path / "checkpoints" / "last")["step"] == 4
    state, _ = load_model_weights(tmp_path / "checkpoints" / "last")
    assert all(torch.isfinite(t).all() for t in state.values())


def test_preemption_signal_saves_last_and_resume_continues(tmp_path, tiny_shards):
    flag = PreemptionFlag().install([signal.SIGUSR1])
    os.kill(os.getpid(), signal.SIGUSR1)
    config = tiny_run_config(tiny_shards, tmp_path, max_steps=6, val_interval=100, ckpt_interval=100)
    result = train(config, preemption=flag)
    assert result.preempted and result.final_step == 1
    assert read_meta(tmp_path / "checkpoints" / "last")["step"] == 1
    config.train.resume = "auto"
    resumed = train(config, preemption=PreemptionFlag())
    assert not resumed.preempted and resumed.final_step == 6


def launch(config, timeout=SUBPROCESS_TIMEOUT_S, **popen):
    """Run launch/local.py on `config` (written as YAML next to its out_dir)."""
    path = config.train.out_dir + ".yaml"
    with open(path, "w") as handle:
        handle.write(dump_yaml(config))
    return subprocess.run([sys.executable, str(REPO_ROOT / "launch" / "local.py"), "--config", path],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout, **popen)


@pytest.mark.slow
@pytest.mark.timeout(2 * SUBPROCESS_TIMEOUT_S + 30)
def test_two_process_ddp_matches_one_process_with_doubled_accumulation(tmp_path, tiny_shards):
    common = dict(max_steps=6, batch_size=4, val_interval=3, ckpt_interval=6, log_interval=1, lr=1e-3)
    single = tiny_run_config(tiny_shards, tmp_path / "single", grad_accum=2, devices=1, **common)
    ddp = tiny_run_config(tiny_shards, tmp_path / "ddp", grad_accum=1, devices=2, strategy="ddp", **common)
    for config in (single, ddp):
        done = launch(config)
        assert done.returncode == 0, done.stderr[-3000:]
    weights_single, _ = load_model_weights(tmp_path / "single" / "checkpoints" / "last")
    weights_ddp, _ = load_model_weights(tmp_path / "ddp" / "checkpoints" / "last")
    for name, value in weights_single.items():
        torch.testing.assert_close(weights_ddp[name], value, rtol=1e-4, atol=1e-5, msg=name)
    assert read_meta(tmp_path / "ddp" / "checkpoints" / "last")["world_size"] == 2
    loss_single = [v for _, v in scalars(tmp_path / "single", "val/loss")]
    loss_ddp = [v for _, v in scalars(tmp_path / "ddp", "val/loss")]
    assert loss_ddp == pytest.approx(loss_single, rel=1e-4)


def test_wandb_runs_offline_without_a_key_and_a_restart_continues_the_same_run(tmp_path, tiny_shards, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    config = tiny_run_config(tiny_shards, tmp_path, max_steps=2, val_interval=2, ckpt_interval=2)
    config.log.wandb = True
    train(config)
    run_id = read_meta(tmp_path / "checkpoints" / "last")["wandb_run_id"]
    config.train.max_steps, config.train.resume = 3, "auto"
    train(config)
    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(run.name.endswith(f"-{run_id}") for run in runs)
    assert read_meta(tmp_path / "checkpoints" / "last")["wandb_run_id"] == run_id
