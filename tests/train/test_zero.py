"""DeepSpeed ZeRO-2 and ZeRO-3 with two CPU processes through launch/local.py: train, save, resume and export.

Each stage costs two 2-process runs (one uninterrupted, one resumed from its mid-run checkpoint), shared by all
the assertions below; one in-process single-process run is the numerical reference for both stages.
DeepSpeed builds a C++ communication op on first use (about 40 s on 2 cores); TORCH_EXTENSIONS_DIR keeps it
in a stable cache so that cost is paid once per machine, not once per run.
"""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lightning import Fabric

from tests.conftest import REPO_ROOT, debug_model_config
from tests.train.conftest import tiny_run_config
from tests.train.test_loop import scalar_tags, scalars
from tml.config import dump_yaml
from tml.data.packed import PackedDataset
from tml.model import Transformer
from tml.pretrained import export
from tml.train.checkpoint import checkpoints_dir, load_model_weights, step_name
from tml.train.config import TrainConfig
from tml.train.evaluate import evaluate
from tml.train.fabric import deepspeed_config
from tml.train.loop import DEEPSPEED_MIN_SCALE_MESSAGE, MAX_OVERFLOWED_STEPS, train
from tml.train.zero_export import ZeroCheckpointError, fp32_state_dict, verify_deepspeed_checkpoint

RUN_TIMEOUT_S = 240  # one 2-process run incl. the first-use op build; usually 15-25 s once the op is cached
STEPS, RESUME_STEP = 6, 3
# The same global batch of 16 windows per step: 2 ranks x 2 micro-batches of 4 vs 1 process x 4 micro-batches.
COMMON = dict(max_steps=STEPS, batch_size=4, val_interval=RESUME_STEP, ckpt_interval=RESUME_STEP,
              keep_checkpoints=2, log_interval=1, lr=3e-3, grad_clip=1.0)
# fp32 sums taken in another order (reduce-scatter across ranks), amplified a little by Adam's normalisation: up to
# 1.4e-5 on an AMD EPYC (AVX2 kernels), less on AVX512 machines; one step moves a weight by about lr = 3e-3.
WEIGHT_RTOL, WEIGHT_ATOL = 1e-4, 5e-5
VAL_LOSS_RTOL = 1e-5  # the same fp32 weights on the same windows; only the batching of the sum differs


def extensions_env() -> dict[str, str]:
    cache = os.environ.get("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "tml" / "torch_extensions"))
    return {**os.environ, "TORCH_EXTENSIONS_DIR": cache}


def launch_local(config) -> subprocess.CompletedProcess:
    """launch/local.py in its own process group, so a hung gloo rank is killed with it on timeout."""
    path = Path(config.train.out_dir + ".yaml")
    path.write_text(dump_yaml(config))
    process = subprocess.Popen([sys.executable, str(REPO_ROOT / "launch" / "local.py"), "--config", str(path)],
                               cwd=REPO_ROOT, env=extensions_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"{path.name} did not finish in {RUN_TIMEOUT_S} s:\n{stderr[-3000:]}")
    if process.returncode != 0:
        pytest.fail(f"{path.name} exited with {process.returncode}:\n{stderr[-3000:]}")
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def step_dir(run_dir: Path, step: int) -> Path:
    return checkpoints_dir(run_dir) / step_name(step)


@pytest.fixture(scope="module")
def single_run(tiny_shards, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single") / "run"
    train(tiny_run_config(tiny_shards, out, grad_accum=4, devices=1, **COMMON))
    return out


@pytest.fixture(scope="module", params=[2, 3], ids=["zero2", "zero3-recompute"])
def zero_runs(request, tiny_shards, tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp(f"zero{request.param}")
    # ZeRO-3 also recomputes activations: its parameters are gathered again inside the recomputed forward, the
    # combination most likely to break, and the numbers must still equal the plain single-process run's.
    settings = dict(strategy="deepspeed", zero_stage=request.param, devices=2, grad_accum=2,
                    activation_checkpointing=request.param == 3, **COMMON)
    full = launch_local(tiny_run_config(tiny_shards, root / "full", **settings))
    resumed = launch_local(tiny_run_config(tiny_shards, root / "resumed", **settings,
                                           resume=str(step_dir(root / "full", RESUME_STEP))))
    return SimpleNamespace(stage=request.param, root=root, full=root / "full", resumed=root / "resumed",
                           resumed_output=resumed.stdout + resumed.stderr, full_output=full.stdout + full.stderr)


def exported(run_dir: Path, step: int, tmp_path: Path) -> dict[str, torch.Tensor]:
    path, _, _ = export(step_dir(run_dir, step), tmp_path / f"{run_dir.name}-{step}.pt")
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.mark.slow
@pytest.mark.timeout(2 * RUN_TIMEOUT_S + 60)
def test_zero_training_lowers_the_loss_and_saves_deepspeed_checkpoints(zero_runs):
    losses = [value for _, value in scalars(zero_runs.full, "train/loss")]
    assert len(losses) == STEPS
    assert losses[-1] < losses[0] - 0.2
    val = dict(scalars(zero_runs.full, "val/loss"))
    assert val[STEPS] < val[RESUME_STEP]
    shards = sorted(p.name for p in (step_dir(zero_runs.full, STEPS) / "deepspeed" / "checkpoint").glob("*.pt"))
    assert "zero_pp_rank_1_mp_rank_00_optim_states.pt" in shards  # optimizer state really sharded over 2 ranks
    # log.attention_stats: rank 0 measures the plain module under ZeRO-2; ZeRO-3's parameters are partitioned
    if zero_runs.stage == 2:
        assert [step for step, _ in scalars(zero_runs.full, "attention/max_logit")] == sorted(val)
    else:
        assert not any(tag.startswith("attention/") for tag in scalar_tags(zero_runs.full))


@pytest.mark.slow
@pytest.mark.timeout(2 * RUN_TIMEOUT_S + 60)
def test_zero_matches_one_process_with_the_same_global_batch(zero_runs, single_run, tmp_path):
    """Accumulation, loss scaling and clipping happen once: the engine's weights equal plain single-process ones."""
    weights = exported(zero_runs.full, STEPS, tmp_path)
    reference, _ = load_model_weights(step_dir(single_run, STEPS))
    assert weights.keys() == reference.keys()
    for name, value in reference.items():
        torch.testing.assert_close(weights[name], value, rtol=WEIGHT_RTOL, atol=WEIGHT_ATOL, msg=name)


@pytest.mark.slow
@pytest.mark.timeout(2 * RUN_TIMEOUT_S + 60)
def test_zero_resume_from_a_mid_run_checkpoint_is_bit_identical(zero_runs, tmp_path):
    assert f"resumed from {step_dir(zero_runs.full, RESUME_STEP)}" in zero_runs.resumed_output
    uninterrupted = exported(zero_runs.full, STEPS, tmp_path)
    resumed = exported(zero_runs.resumed, STEPS, tmp_path)
    for name, value in uninterrupted.items():
        assert torch.equal(resumed[name], value), name
    full_losses = scalars(zero_runs.full, "train/loss")[RESUME_STEP:]
    assert scalars(zero_runs.resumed, "train/loss") == full_losses


@pytest.mark.slow
@pytest.mark.timeout(2 * RUN_TIMEOUT_S + 60)
def test_exported_weights_load_into_a_fresh_transformer_and_reproduce_the_engines_val_loss(
    zero_runs, tiny_shards, tmp_path
):
    model = Transformer(debug_model_config())
    model.load_state_dict(exported(zero_runs.full, STEPS, tmp_path))  # strict: every name and shape matches
    config = tiny_run_config(tiny_shards, tmp_path)
    block = config.model.block_size
    val_set = PackedDataset(config.data.shard_dir, "val", block, block)
    fabric = Fabric(accelerator="cpu", devices=1, precision="32-true")
    result = evaluate(fabric, model, val_set, config.train.batch_size, config.train.val_batches)
    engine_val_loss = dict(scalars(zero_runs.full, "val/loss"))[STEPS]
    assert result.loss == pytest.approx(engine_val_loss, rel=VAL_LOSS_RTOL)


@pytest.mark.slow
@pytest.mark.timeout(2 * RUN_TIMEOUT_S + 60)
def test_eval_of_a_zero_run_prints_only_its_result_on_stdout(zero_runs, tmp_path):
    """DeepSpeed's notices while the shards are consolidated go to stderr: `tml eval ... > result.txt` holds one line."""
    text = tmp_path / "held-out.txt"
    text.write_text("x!y!z!" * 40)  # GPT-2 ids under the debug model's vocab_size of 256
    done = subprocess.run([sys.executable, "-m", "tml.cli", "eval", "--checkpoint", str(zero_runs.full), "--data",
                           str(text)], capture_output=True, text=True, timeout=RUN_TIMEOUT_S, cwd=REPO_ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"{text}: ") and done.stdout.count("\n") == 1, done.stdout


@pytest.mark.slow
@pytest.mark.timeout(2 * RUN_TIMEOUT_S)
def test_zero3_with_torch_compile_trains_like_the_plain_single_process_run(single_run, tiny_shards, tmp_path):
    """Fabric compiles the DeepSpeed engine it wraps: ZeRO-3's parameter hooks run inside the compiled forward."""
    run = tmp_path / "compiled"
    launch_local(tiny_run_config(tiny_shards, run, strategy="deepspeed", zero_stage=3, devices=1, grad_accum=4,
                                 compile=True, **COMMON))
    weights = exported(run, STEPS, tmp_path)
    reference, _ = load_model_weights(step_dir(single_run, STEPS))
    for name, value in reference.items():
        torch.testing.assert_close(weights[name], value, rtol=WEIGHT_RTOL, atol=WEIGHT_ATOL, msg=name)


# ------------------------------------------------------------------------- export errors (fast, no processes)


def fake_checkpoint(root: Path, shard_content) -> Path:
    """The directory layout DeepSpeed writes (`latest` naming the tag folder), with one given shard."""
    (root / "checkpoint").mkdir(parents=True)
    (root / "latest").write_text("checkpoint")
    torch.save(shard_content, root / "checkpoint" / "mp_rank_00_model_states.pt")
    return root


def test_consolidation_refuses_a_directory_that_is_not_a_deepspeed_checkpoint(tmp_path):
    with pytest.raises(ZeroCheckpointError, match="latest is missing"):
        fp32_state_dict(tmp_path)
    with pytest.raises(ZeroCheckpointError, match="not a directory"):
        fp32_state_dict(tmp_path / "absent")


def test_consolidation_given_the_shard_folder_names_the_checkpoint_directory(tmp_path):
    root = fake_checkpoint(tmp_path / "ckpt", {"module": {}})
    with pytest.raises(ZeroCheckpointError, match=f"did you mean its parent {root}"):
        fp32_state_dict(root / "checkpoint")


class RunsCode:
    """Unpickling this touches a file: what an unsafe load of a tampered checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return shutil.copyfile, (__file__, str(self.marker))


def test_a_shard_that_would_run_code_is_refused_before_deepspeed_unpickles_it(tmp_path):
    marker = tmp_path / "code-ran"
    root = fake_checkpoint(tmp_path / "ckpt", {"module": {}, "payload": RunsCode(marker)})
    shard = root / "checkpoint" / "mp_rank_00_model_states.pt"
    with pytest.raises(ZeroCheckpointError, match=f"cannot load {shard} safely"):
        verify_deepspeed_checkpoint(root)
    with pytest.raises(ZeroCheckpointError):
        fp32_state_dict(root)
    assert not marker.exists()
    torch.load(shard, weights_only=False)  # the unsafe load DeepSpeed would do: the payload runs
    assert marker.exists()


# ------------------------------------------------------- DeepSpeed's own fp16 loss scaling (one CPU process each)

# DeepSpeed's CPU accelerator declines fp16 and tml turns 16-mixed into bf16-mixed on CPU. The driver lifts both, so
# the real fp16 engine, its DynamicLossScaler and the checkpoints holding it run here (CPU fp16 matmuls: slow, but
# the debug model is small). `overflow` multiplies the training loss so its fp16 gradients overflow at any scale;
# `max_overflowed` moves the loop's own limit out of the way, so DeepSpeed's scaler gives up first.
DEEPSPEED_FP16_DRIVER = """
import sys
from deepspeed.accelerator import get_accelerator
import tml.train.fabric, tml.train.loop
from tml.config import load_yaml_config
from tml.model import Transformer

type(get_accelerator()).is_fp16_supported = lambda self: True
keep_fp16 = lambda train, accelerator, notify=False: train.precision
tml.train.fabric.resolve_precision = tml.train.loop.resolve_precision = keep_fp16
config_path, mode, max_overflowed = sys.argv[1], sys.argv[2], int(sys.argv[3])
if mode == "overflow":
    forward = Transformer.forward
    def overflowing(self, *args, **kwargs):
        logits, loss = forward(self, *args, **kwargs)
        return logits, (loss * 1e30 if self.training else loss)
    Transformer.forward = overflowing
tml.train.loop.MAX_OVERFLOWED_STEPS = max_overflowed or tml.train.loop.MAX_OVERFLOWED_STEPS
try:
    tml.train.loop.train(load_yaml_config(config_path))
except tml.train.loop.TrainingDiverged as error:
    print(f"diverged: {error}")
    sys.exit(3)
"""
FP16_SETTINGS = dict(strategy="deepspeed", zero_stage=2, devices=1, precision="16-mixed", accelerator="cpu",
                     grad_accum=2, batch_size=4, log_interval=1, lr=3e-3)


def run_deepspeed_fp16(config, mode: str = "train", max_overflowed: int = 0) -> subprocess.CompletedProcess:
    path = Path(config.train.out_dir + ".yaml")
    path.write_text(dump_yaml(config))
    done = subprocess.run([sys.executable, "-c", DEEPSPEED_FP16_DRIVER, str(path), mode, str(max_overflowed)],
                          cwd=REPO_ROOT, env={**extensions_env(), "DS_ACCELERATOR": "cpu"}, capture_output=True,
                          text=True, timeout=RUN_TIMEOUT_S)
    assert done.returncode in (0, 3), done.stderr[-3000:]
    return done


@pytest.mark.slow
@pytest.mark.timeout(3 * RUN_TIMEOUT_S)
def test_deepspeed_fp16_checkpoints_resume_bit_identical_and_export(tiny_shards, tmp_path):
    """Its optimizer shards hold DeepSpeed's DynamicLossScaler, which the weights-only check must accept."""
    settings = dict(max_steps=4, val_interval=2, ckpt_interval=2, **FP16_SETTINGS)
    run_deepspeed_fp16(tiny_run_config(tiny_shards, tmp_path / "full", **settings))
    run_deepspeed_fp16(tiny_run_config(tiny_shards, tmp_path / "resumed", **settings,
                                       resume=str(step_dir(tmp_path / "full", 2))))
    uninterrupted, resumed = exported(tmp_path / "full", 4, tmp_path), exported(tmp_path / "resumed", 4, tmp_path)
    assert all(torch.equal(resumed[name], value) for name, value in uninterrupted.items())
    losses = [value for _, value in scalars(tmp_path / "full", "train/loss")]
    assert len(losses) == 4 and all(map(math.isfinite, losses))


@pytest.mark.slow
@pytest.mark.timeout(3 * RUN_TIMEOUT_S)
@pytest.mark.parametrize("max_overflowed", [0, 100], ids=["tml-limit", "deepspeed-gives-up-first"])
def test_deepspeed_fp16_overflow_at_every_scale_ends_the_run_as_diverged(tiny_shards, tmp_path, max_overflowed):
    """tml's limit comes first (the scale is down to 1); where DeepSpeed's scaler raises, the run still ends as
    diverged, with summary.json and the message, not a bare traceback."""
    config = tiny_run_config(tiny_shards, tmp_path / "run", max_steps=60, val_interval=100, ckpt_interval=100,
                             **FP16_SETTINGS)
    done = run_deepspeed_fp16(config, "overflow", max_overflowed)
    assert done.returncode == 3, done.stdout[-2000:] + done.stderr[-2000:]
    if max_overflowed:
        expected = "the fp16 gradients overflowed at DeepSpeed's minimum loss scale for 18 consecutive steps"
    else:
        expected = f"overflowed at every loss scale tried for {MAX_OVERFLOWED_STEPS} consecutive steps"
    assert expected in done.stdout
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    # DeepSpeed raises inside step 18, which never completes: the run ends at step 17 either way.
    assert summary["diverged"] and summary["final_step"] == 17 == MAX_OVERFLOWED_STEPS


def test_the_overflow_limit_comes_before_deepspeeds_fp16_scaler_gives_up(monkeypatch):
    """DeepSpeed's DynamicLossScaler, built from tml's fp16 config, raises at its minimum scale: the loop must have
    declared the divergence by then, and torch's GradScaler must have tried a scale of 1."""
    from deepspeed.runtime.fp16 import loss_scaler

    monkeypatch.setattr(loss_scaler.dist, "get_rank", lambda: 0)  # only its log lines ask
    fp16 = deepspeed_config(TrainConfig(strategy="deepspeed", accelerator="cuda", precision="16-mixed"))["fp16"]
    scaler = loss_scaler.DynamicLossScaler(init_scale=2 ** fp16["initial_scale_power"],
                                           scale_window=fp16["loss_scale_window"], min_scale=fp16["min_loss_scale"],
                                           delayed_shift=fp16["hysteresis"], consecutive_hysteresis=False)
    absorbed = 0
    with pytest.raises(Exception, match=DEEPSPEED_MIN_SCALE_MESSAGE):
        while True:
            scaler.update_scale(True)
            absorbed += 1
    assert MAX_OVERFLOWED_STEPS <= absorbed
    assert torch.amp.GradScaler("cpu").get_scale() / 2 ** (MAX_OVERFLOWED_STEPS - 1) == 1.0


@pytest.mark.slow
@pytest.mark.timeout(RUN_TIMEOUT_S + 60)
def test_a_zero_resume_steps_with_the_optimizer_settings_it_lists_as_changed(zero_runs, tiny_shards, tmp_path):
    """DeepSpeed's load brings back its base optimizer's saved groups, as torch's does: the config's go back over them."""
    if zero_runs.stage != 2:
        pytest.skip("one ZeRO stage shows it: the groups are the base optimizer's under every stage")
    config = tiny_run_config(tiny_shards, tmp_path / "changed", strategy="deepspeed", zero_stage=2, devices=2,
                             grad_accum=2, **{**COMMON, "max_steps": RESUME_STEP + 1},
                             resume=str(step_dir(zero_runs.full, RESUME_STEP)), weight_decay=0.0, beta2=0.99)
    done = launch_local(config)
    assert "train.weight_decay 0.1 -> 0.0" in done.stdout and "train.beta2 0.95 -> 0.99" in done.stdout
    shard = step_dir(tmp_path / "changed", RESUME_STEP + 1) / "deepspeed" / "checkpoint" / \
        "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    groups = torch.load(shard, weights_only=False)["optimizer_state_dict"]["base_optimizer_state"]["param_groups"]
    assert [(group["weight_decay"], tuple(group["betas"])) for group in groups] == [(0.0, (0.9, 0.99))] * 2
