"""A run killed with SIGKILL and resumed with `--train.resume auto` ends bit-identical to an uninterrupted run."""

import dataclasses
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tests.conftest import REPO_ROOT, debug_model_config
from tests.train.conftest import requires_muon, tiny_run_config
from tests.train.test_loop import SUBPROCESS_TIMEOUT_S, launch
from tml.config import dump_yaml
from tml.train.checkpoint import checkpoints_dir, read_meta, safe_load, write_manifest
from tml.train.loop import train

POLL_S = 0.05


def final_state(run_dir):
    last = checkpoints_dir(run_dir) / "last"
    return safe_load(last / "model.pt"), safe_load(last / "optimizer.pt"), read_meta(last)["step"]


@pytest.mark.slow
@pytest.mark.timeout(3 * SUBPROCESS_TIMEOUT_S + 30)
def test_sigkilled_run_resumed_with_auto_matches_an_uninterrupted_run_bit_for_bit(tmp_path, tiny_shards):
    settings = dict(max_steps=20, batch_size=8, grad_accum=2, ckpt_interval=4, val_interval=8, keep_checkpoints=1)
    reference = tiny_run_config(tiny_shards, tmp_path / "reference", **settings)
    done = launch(reference)
    assert done.returncode == 0, done.stderr[-3000:]

    killed = tiny_run_config(tiny_shards, tmp_path / "killed", resume="auto", **settings)
    config_path = tmp_path / "killed.yaml"
    config_path.write_text(dump_yaml(killed))
    process = subprocess.Popen([sys.executable, str(REPO_ROOT / "launch" / "local.py"), "--config", str(config_path)],
                               cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = checkpoints_dir(killed.train.out_dir) / "last"
    deadline = time.monotonic() + SUBPROCESS_TIMEOUT_S
    try:
        while not last.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(POLL_S)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    killed_at = read_meta(last)["step"]
    assert killed_at < settings["max_steps"], "the run finished before it could be killed"

    resumed = launch(killed)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"at step {killed_at}" in resumed.stdout + resumed.stderr

    model_ref, optim_ref, step_ref = final_state(reference.train.out_dir)
    model_res, optim_res, step_res = final_state(killed.train.out_dir)
    assert step_ref == step_res == settings["max_steps"]
    for name, value in model_ref.items():
        assert torch.equal(model_res[name], value), name
    for index, state in optim_ref["state"].items():
        assert torch.equal(optim_res["state"][index]["exp_avg_sq"], state["exp_avg_sq"])


def test_resume_with_another_rank_count_or_dropout_prints_one_line_notices_not_warnings(
        tmp_path, tiny_shards, capsys, recwarn):
    config = tiny_run_config(tiny_shards, tmp_path, max_steps=2, val_interval=2, ckpt_interval=2)
    train(config)
    last = (checkpoints_dir(tmp_path) / "last").resolve()
    meta = read_meta(last)
    meta["world_size"] = 2  # as if saved by two DDP ranks, which all save the same data position
    (last / "meta.json").write_text(json.dumps(meta))
    write_manifest(last)
    capsys.readouterr()

    config.model, config.train.resume, config.train.max_steps = debug_model_config(dropout=0.1), "auto", 3
    assert train(config).final_step == 3
    out = capsys.readouterr().out
    notice = (f"{last} was saved with 2 ranks, this run has 1: the data stream continues from the saved position "
              "(rounded down to a whole global batch) and RNG states are re-seeded")
    assert out.count(notice) == 1
    assert "resuming with changed settings: model.dropout 0.0 -> 0.1, train.max_steps 2 -> 3" in out
    assert not [w for w in recwarn if "ranks, this run has" in str(w.message)]


def test_a_run_with_dropout_stopped_and_resumed_matches_an_uninterrupted_run_bit_for_bit(tmp_path, tiny_shards):
    """Dropout draws from torch's global generator, which the checkpoint restores: nothing in the resumed start
    (the CPU speed probe, the data loader's first iterator) may draw from it before the first step."""
    uninterrupted, resumed = stopped_at_3_and_resumed(tiny_shards, tmp_path, debug_model_config(dropout=0.1))
    assert all(torch.equal(resumed.model[name], value) for name, value in uninterrupted.model.items())


def stopped_at_3_and_resumed(tiny_shards, tmp_path, model=None, **train_settings):
    """Final states (model, optimizer) of a 6-step run trained straight through and of one stopped at step 3 (as a
    preemption stops it) and resumed with --train.resume auto."""
    from tests.train.test_loop import PreemptAtStep

    settings = dict(max_steps=6, ckpt_interval=100, val_interval=100, keep_checkpoints=1, **train_settings)
    runs = []
    for name in ("reference", "stopped"):
        config = tiny_run_config(tiny_shards, tmp_path / name, **settings)
        config.model = model or config.model
        if name == "stopped":
            assert train(config, preemption=PreemptAtStep(3)).final_step == 3
            config.train.resume = "auto"
        train(config)
        model_state, optimizer_state, step = final_state(config.train.out_dir)
        assert step == 6
        runs.append(SimpleNamespace(model=model_state, optimizer=optimizer_state, out_dir=Path(config.train.out_dir)))
    return runs


@pytest.mark.parametrize("optimizer", ["adamw", pytest.param("muon", marks=requires_muon)])
def test_optimizer_settings_changed_on_resume_are_the_ones_it_then_steps_with(tmp_path, tiny_shards, capsys, optimizer):
    config = tiny_run_config(tiny_shards, tmp_path, max_steps=2, val_interval=2, ckpt_interval=2, optimizer=optimizer)
    train(config)
    config.train = dataclasses.replace(config.train, resume="auto", max_steps=3, weight_decay=0.0, beta2=0.99,
                                       muon_momentum=0.5)
    train(config)
    out = capsys.readouterr().out
    assert "train.weight_decay 0.1 -> 0.0" in out and "train.beta2 0.95 -> 0.99" in out
    groups = safe_load(checkpoints_dir(tmp_path) / "last" / "optimizer.pt")["param_groups"]
    assert all(group["weight_decay"] == 0.0 for group in groups)  # listed as changed, and changed
    assert all(group["betas"] == (0.9, 0.99) for group in groups if group.get("algorithm", "adamw") == "adamw")
    assert all(group["momentum"] == 0.5 for group in groups if group.get("algorithm") == "muon")
    assert [group.get("algorithm") for group in groups][:1] == (["muon"] if optimizer == "muon" else [None])
