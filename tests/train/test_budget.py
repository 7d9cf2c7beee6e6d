"""train.max_tokens / train.max_flops: a budget turned into max_steps (tml/train/budget.py, via Config)."""

import json
import math
import re
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT, debug_model_config
from tests.train.conftest import tiny_run_config
from tml.config import Config, load_config
from tml.run_dir import SUMMARY_FILE
from tml.slurm import SlurmResources, config_for_job
from tml.train.budget import describe_budget, flops_per_token, horizon_key, steps_for_budget, tokens_per_step
from tml.train.config import TrainConfig, TrainConfigError
from tml.train.loop import train
from tml.train.resume import changed_settings

# The debug model's training FLOPs per token by hand (Transformer.flops_per_token's rule): 6 x the matmul weights
# (the non-embedding parameters, norms included, plus the tied lm_head), plus 6 x L x H x T x (d_qk + d_v).
# Per layer, MLA: q_proj 96x64, kv_down 40x64, kv_norm 32, kv_up 128x32, out_proj 64x64, norm 64, two MLP
# matrices 256x64, norm 64; d_qk = 16 + 8, d_v = 16. MHA: qkv_proj 192x64 instead of the four MLA projections and
# kv_norm; d_qk = d_v = 64 / 4.
LM_HEAD = 256 * 64
MLP_AND_NORMS = 2 * 256 * 64 + 64 + 64
MLA_FLOPS_PER_TOKEN = (6 * (2 * (96 * 64 + 40 * 64 + 32 + 128 * 32 + 64 * 64 + MLP_AND_NORMS) + LM_HEAD)
                       + 6 * 2 * 4 * 32 * (24 + 16))
MHA_FLOPS_PER_TOKEN = 6 * (2 * (192 * 64 + 64 * 64 + MLP_AND_NORMS) + LM_HEAD) + 6 * 2 * 4 * 32 * (16 + 16)


def budget_config(attention: str = "mla", **train) -> Config:
    """The debug model with 4 sequences x 2 accumulation x 32 tokens = 256 tokens a step on one device."""
    values = dict(batch_size=4, grad_accum=2, max_steps=999)
    values.update(train)
    return Config(model=debug_model_config(attention=attention), train=TrainConfig(**values))


def test_a_token_budget_trains_the_most_whole_steps_within_it():
    assert tokens_per_step(budget_config()) == 4 * 2 * 32 == 256
    for budget, steps in ((256, 1), (767, 2), (768, 3), (1000, 3), (256_000, 1000)):
        config = budget_config(max_tokens=budget)
        assert config.train.max_steps == steps_for_budget(config) == steps
        assert config.train.max_tokens == budget  # kept: the saved config says where max_steps came from


def test_a_flops_budget_costs_each_step_the_models_flops_per_token_times_its_tokens():
    assert flops_per_token(debug_model_config()) == MLA_FLOPS_PER_TOKEN == 757_632
    assert flops_per_token(debug_model_config(attention="mha")) == MHA_FLOPS_PER_TOKEN == 738_816
    step = MLA_FLOPS_PER_TOKEN * 256
    for budget, steps in ((5 * step - 1, 4), (5 * step, 5), (5 * step + 1, 5), (5.5 * step, 5)):
        assert budget_config(max_flops=float(budget)).train.max_steps == steps


@pytest.mark.parametrize("key", ["max_tokens", "max_flops"])
def test_the_steps_never_cost_more_than_the_budget_and_one_more_would(key):
    """steps x cost <= budget < (steps + 1) x cost, also where a float quotient would round up to the next step."""
    cost = 256 * (MLA_FLOPS_PER_TOKEN if key == "max_flops" else 1)
    budgets = [cost * n + extra for n in (1, 3, 1000, 10**9) for extra in (0, 1, cost - 1)]
    for budget in budgets:
        steps = budget_config(**{key: budget if key == "max_tokens" else float(budget)}).train.max_steps
        exact = int(budget) if key == "max_tokens" else float(budget)  # the float a max_flops budget really is
        assert steps * cost <= exact < (steps + 1) * cost, budget


def test_a_max_steps_given_beside_a_budget_is_not_used():
    assert budget_config(max_steps=7, max_tokens=2560).train.max_steps == 10
    assert budget_config(max_steps=7).train.max_steps == 7  # no budget: max_steps as given


def test_both_budgets_at_once_are_refused_naming_both_keys():
    with pytest.raises(TrainConfigError, match=r"train\.max_tokens=1000 and train\.max_flops=1e\+18 are both set"):
        TrainConfig(max_tokens=1000, max_flops=1e18)


@pytest.mark.parametrize(("key", "value"), [("max_flops", math.nan), ("max_flops", math.inf), ("max_flops", 0.0),
                                            ("max_flops", -1e18), ("max_tokens", 0), ("max_tokens", -5)])
def test_a_budget_that_is_not_a_positive_number_is_refused_by_name(key, value):
    with pytest.raises(TrainConfigError, match=rf"^train\.{key}={re.escape(repr(value))}: must be a number > 0"):
        TrainConfig(**{key: value})


def test_a_budget_smaller_than_one_step_is_refused_with_the_cost_of_a_step():
    with pytest.raises(TrainConfigError, match=r"^train\.max_tokens=255 is less than one optimizer step, which costs "
                                               r"256 tokens: raise train\.max_tokens"):
        budget_config(max_tokens=255)
    with pytest.raises(TrainConfigError, match=r"^train\.max_flops=1e\+06 is less than one optimizer step, which costs "
                                               r"1\.94e\+08 FLOPs \(flops_per_token 7\.58e\+05 x 256 tokens a step\)"):
        budget_config(max_flops=1e6)


def test_more_devices_or_nodes_take_fewer_steps_of_the_same_budget():
    assert budget_config(max_tokens=256 * 12).train.max_steps == 12
    assert budget_config(max_tokens=256 * 12, devices=2).train.max_steps == 6
    assert budget_config(max_tokens=256 * 12, devices=2, num_nodes=3).train.max_steps == 2
    assert budget_config(max_flops=256 * 12 * MLA_FLOPS_PER_TOKEN, num_nodes=4).train.max_steps == 3


def test_the_slurm_layout_resolves_the_budget_again_for_the_jobs_devices_and_nodes(tmp_path):
    config = budget_config(max_tokens=256 * 16, out_dir=str(tmp_path / "run"))
    assert config.train.max_steps == 16
    job, _ = config_for_job(config, SlurmResources(nodes=2, gpus_per_node=4))
    assert (job.train.devices, job.train.num_nodes, job.train.max_steps) == (4, 2, 2)


def test_mla_and_mha_of_one_width_train_different_steps_under_one_flops_budget():
    budget = 1e12
    mla, mha = budget_config(max_flops=budget), budget_config("mha", max_flops=budget)
    assert mla.train.max_steps == budget // (MLA_FLOPS_PER_TOKEN * 256) == 5155
    assert mha.train.max_steps == budget // (MHA_FLOPS_PER_TOKEN * 256) == 5287
    # At equal tokens they train alike.
    assert budget_config(max_tokens=10**6).train.max_steps == budget_config("mha", max_tokens=10**6).train.max_steps


def test_the_budget_is_said_as_where_max_steps_came_from():
    assert describe_budget(budget_config()) is None
    assert describe_budget(budget_config(max_tokens=1_000_000)) == (
        "max_steps 3,906 from train.max_tokens=1,000,000 (256 tokens a step)")
    assert describe_budget(budget_config(max_flops=3e12)) == (
        "max_steps 15,467 from train.max_flops=3e+12 (flops_per_token 7.58e+05 x 256 tokens a step)")


def test_advice_to_train_longer_names_the_key_that_decides_the_steps():
    assert horizon_key(TrainConfig()) == "train.max_steps"
    assert horizon_key(TrainConfig(max_tokens=10)) == "train.max_tokens"
    assert horizon_key(TrainConfig(max_flops=1e15)) == "train.max_flops"


def test_a_resume_with_a_bigger_budget_lists_the_budget_and_the_steps_it_gives():
    saved = budget_config(max_flops=1e12).to_dict()
    changes = changed_settings(saved, budget_config(max_flops=2e12))
    assert changes == [("train.max_steps", 5155, 10311), ("train.max_flops", 1e12, 2e12)]


def test_config_loading_with_a_token_budget_does_not_import_torch():
    """Only a FLOPs budget needs the model (and torch): launchers' --dry-run and config checks stay light."""
    code = ("import sys; from tml.config import load_config; "
            "config = load_config(['--train.max_tokens', '1000000']); "
            "from tml.train.budget import tokens_per_step; "
            "assert config.train.max_steps == 1_000_000 // tokens_per_step(config) > 1; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.slow
def test_a_run_with_a_token_budget_of_three_steps_trains_three_steps(tmp_path, tiny_shards, capsys):
    step_tokens = 4 * 32  # tiny_run_config: batch_size 4, grad_accum 1, one device, block_size 32
    config = tiny_run_config(tiny_shards, tmp_path, max_tokens=3 * step_tokens + step_tokens // 2, val_interval=3,
                             ckpt_interval=3)
    assert config.train.max_steps == 3
    assert train(config).final_step == 3
    summary = json.loads((tmp_path / SUMMARY_FILE).read_text())
    assert (summary["final_step"], summary["max_steps"], summary["tokens_seen"]) == (3, 3, 3 * step_tokens)
    assert "max_steps 3 from train.max_tokens=448 (128 tokens a step)" in capsys.readouterr().out


def test_a_token_budget_may_be_written_in_exponent_form():
    config = load_config(["--config", str(REPO_ROOT / "configs" / "tiny.yaml"), "--train.max_tokens", "1e6"])
    assert config.train.max_steps == 1_000_000 // (8 * 64)  # tiny: batch 8 x block 64, one device
    assert describe_budget(config) == "max_steps 1,953 from train.max_tokens=1,000,000 (512 tokens a step)"
