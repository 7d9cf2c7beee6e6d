"""train.optimizer muon: Muon over the hidden matrices, AdamW over the rest, as one optimizer the loop, the schedule,
the grad scaler and the checkpoints treat like AdamW."""

import copy

import pytest
import torch

from tests.conftest import debug_model_config
from tests.train.conftest import requires_muon, tiny_run_config
from tests.train.test_loop import scalars
from tests.train.test_resume import stopped_at_3_and_resumed
from tml.model import Transformer
from tml.train.checkpoint import CheckpointError, checkpoints_dir
from tml.train.config import TrainConfig, TrainConfigError
from tml.train.loop import train
from tml.train.muon import ADAMW, MUON, MuonWithAdamW
from tml.train.optim import build_optimizer, build_scheduler, decay_groups

MUON_TRAIN = dict(optimizer="muon", lr=3e-3, weight_decay=0.1, beta1=0.9, beta2=0.95, muon_momentum=0.95)


def names_by_algorithm(model, optimizer):
    names = {id(param): name for name, param in model.named_parameters()}
    grouped = {MUON: [], ADAMW: []}
    for group in optimizer.param_groups:
        grouped[group["algorithm"]] += [names[id(param)] for param in group["params"]]
    return grouped


@requires_muon
@pytest.mark.parametrize("tie_embeddings", [True, False])
def test_muon_takes_the_hidden_matrices_and_adamw_everything_else(tie_embeddings):
    model = Transformer(debug_model_config(bias=True, tie_embeddings=tie_embeddings))
    optimizer = build_optimizer(model, TrainConfig(**MUON_TRAIN))
    grouped = names_by_algorithm(model, optimizer)
    decay, no_decay = decay_groups(model)
    params = dict(model.named_parameters())
    assert grouped[MUON] == [name for name in decay if name != "lm_head.weight"]
    assert all(params[name].dim() == 2 and name.startswith("blocks.") for name in grouped[MUON])
    assert {"blocks.0.attn.kv_down.weight", "blocks.0.attn.kv_up.weight", "blocks.0.mlp.fc_in.weight"} <= set(
        grouped[MUON])
    assert set(no_decay) <= set(grouped[ADAMW]) and "tok_emb.weight" in grouped[ADAMW]
    assert ("lm_head.weight" in grouped[ADAMW]) is (not tie_embeddings)  # an untied head is a classifier: AdamW
    assert sorted(grouped[MUON] + grouped[ADAMW]) == sorted(params)  # every tensor once
    # Muon's matrices and an untied head decay; the AdamW group of embedding, biases and norms does not
    assert [(group["algorithm"], group["weight_decay"]) for group in optimizer.param_groups] == (
        [(MUON, 0.1)] + ([] if tie_embeddings else [(ADAMW, 0.1)]) + [(ADAMW, 0.0)])


@requires_muon
def test_an_untied_head_stays_with_adamw_when_torch_compile_wrapped_the_model():
    model = torch.compile(Transformer(debug_model_config(tie_embeddings=False)))  # compiles lazily: nothing runs
    grouped = names_by_algorithm(model, build_optimizer(model, TrainConfig(**MUON_TRAIN)))
    assert "_orig_mod.lm_head.weight" in grouped[ADAMW] and "_orig_mod.lm_head.weight" not in grouped[MUON]


@requires_muon
def test_a_step_is_exactly_torchs_muon_on_the_matrices_and_adamw_on_the_rest():
    torch.manual_seed(0)
    model = Transformer(debug_model_config(bias=True))
    reference = Transformer(debug_model_config(bias=True))
    reference.load_state_dict(model.state_dict())
    optimizer = build_optimizer(model, TrainConfig(**MUON_TRAIN, muon_lr=0.02))
    decay, no_decay = decay_groups(reference)
    ref_params = dict(reference.named_parameters())
    muon = torch.optim.Muon([ref_params[name] for name in decay], lr=0.02, weight_decay=0.1, momentum=0.95,
                            adjust_lr_fn="match_rms_adamw")
    adamw = torch.optim.AdamW([ref_params[name] for name in no_decay], lr=3e-3, betas=(0.9, 0.95), weight_decay=0.0)
    idx = torch.randint(0, model.config.vocab_size, (2, 16))
    for _ in range(3):
        for net, steps in ((model, [optimizer]), (reference, [muon, adamw])):
            net(idx, idx)[1].backward()
            for opt in steps:
                opt.step()
                opt.zero_grad(set_to_none=True)
    for name, param in model.named_parameters():
        assert torch.equal(param, ref_params[name]), name


@requires_muon
def test_the_schedule_scales_muons_lr_and_adamws_alike():
    model = Transformer(debug_model_config())
    train_config = TrainConfig(**MUON_TRAIN, muon_lr=0.02, min_lr=3e-4, max_steps=10, warmup_frac=0.2)
    optimizer = build_optimizer(model, train_config)
    scheduler = build_scheduler(optimizer, train_config)
    for _ in range(5):
        optimizer.step()
        scheduler.step()
    factor = scheduler.lr_lambdas[0](5)
    by_algorithm = {group["algorithm"]: group["lr"] for group in optimizer.param_groups}
    assert by_algorithm[MUON] == pytest.approx(0.02 * factor) and by_algorithm[ADAMW] == pytest.approx(3e-3 * factor)
    assert optimizer._muon.param_groups[0]["lr"] == by_algorithm[MUON]  # the inner optimizer steps with that lr


@requires_muon
def test_state_round_trips_so_a_restored_optimizer_continues_exactly():
    torch.manual_seed(0)
    model = Transformer(debug_model_config())
    optimizer = build_optimizer(model, TrainConfig(**MUON_TRAIN))
    idx = torch.randint(0, model.config.vocab_size, (2, 16))

    def step(net, opt):
        net(idx, idx)[1].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step(model, optimizer)
    saved_state = copy.deepcopy(optimizer.state_dict())  # as written to disk: not the live tensors
    restored_model = Transformer(debug_model_config())
    restored_model.load_state_dict(model.state_dict())
    restored = build_optimizer(restored_model, TrainConfig(**MUON_TRAIN))
    restored.load_state_dict(saved_state)
    assert restored._muon.state is restored.state  # the inner optimizers see the loaded state, not a stale one
    for _ in range(2):
        step(model, optimizer)
        step(restored_model, restored)
    for (name, param), other in zip(model.named_parameters(), restored_model.parameters(), strict=True):
        assert torch.equal(param, other), name


@requires_muon
def test_an_adamw_state_is_refused_rather_than_loaded_into_the_wrong_groups():
    model = Transformer(debug_model_config())
    adamw_state = build_optimizer(model, TrainConfig()).state_dict()
    with pytest.raises(ValueError, match="not a state of this Muon"):
        build_optimizer(model, TrainConfig(**MUON_TRAIN)).load_state_dict(adamw_state)


@requires_muon
def test_the_grad_scaler_unscales_every_group_and_skips_an_overflowed_step():
    model = Transformer(debug_model_config())
    optimizer = build_optimizer(model, TrainConfig(**MUON_TRAIN))
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    idx = torch.randint(0, model.config.vocab_size, (2, 16))
    before = {name: param.detach().clone() for name, param in model.named_parameters()}
    scaler.scale(model(idx, idx)[1]).backward()
    next(model.parameters()).grad[0, 0] = float("inf")
    scaler.step(optimizer)
    scaler.update()
    assert all(torch.equal(param, before[name]) for name, param in model.named_parameters())
    assert scaler.get_scale() == 512.0
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(model(idx, idx)[1]).backward()
    scaler.unscale_(optimizer)
    unscaled = model.blocks[0].attn.kv_up.weight.grad.clone()
    scaler.step(optimizer)
    assert not torch.equal(model.blocks[0].attn.kv_up.weight, before["blocks.0.attn.kv_up.weight"])
    assert unscaled.abs().max() < 10  # divided by the scale before Muon saw it


@pytest.mark.parametrize(("settings", "message"), [
    (dict(strategy="deepspeed"), "ZeRO hands the optimizer flat shards"),
    (dict(muon_momentum=1.0), r"train.muon_momentum=1.0: must be in \[0, 1\)"),
    (dict(muon_lr=-1.0), r"train.muon_lr=-1.0: must be >= 0"),
    (dict(optimizer="sgd"), "train.optimizer='sgd': must be one of adamw, muon"),
])
def test_settings_muon_cannot_run_with_are_refused_by_name(settings, message):
    with pytest.raises(TrainConfigError, match=message):
        TrainConfig(**{**MUON_TRAIN, **settings})


def test_a_torch_without_muon_is_refused_at_load_time_naming_the_version_needed(monkeypatch):
    monkeypatch.delattr(torch.optim, "Muon", raising=False)
    with pytest.raises(TrainConfigError, match=r"train.optimizer='muon': needs torch.optim.Muon .*torch >= 2.9"):
        TrainConfig(**MUON_TRAIN)
    TrainConfig()  # AdamW needs nothing new
    with pytest.raises(RuntimeError, match="torch >= 2.9"):
        MuonWithAdamW([], [], lr=1e-3, muon_lr=1e-3, momentum=0.9, betas=(0.9, 0.95))


@requires_muon
def test_a_muon_run_lowers_the_loss_and_resumes_bit_for_bit(tmp_path, tiny_shards, capsys):
    uninterrupted, resumed = stopped_at_3_and_resumed(tiny_shards, tmp_path, optimizer="muon")
    model = Transformer(debug_model_config())
    hidden = [p for name, p in model.named_parameters() if name.startswith("blocks.") and p.dim() == 2]
    others = [p for p in model.parameters() if all(p is not matrix for matrix in hidden)]
    out = capsys.readouterr().out
    assert (f"optimizer: Muon on {len(hidden)} hidden matrices ({sum(p.numel() for p in hidden):,} parameters), "
            f"AdamW on the other {len(others)} tensors ({sum(p.numel() for p in others):,} parameters)") in out
    losses = [value for _, value in scalars(uninterrupted.out_dir, "train/loss")]
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2 - 0.1
    assert all(torch.equal(resumed.model[name], value) for name, value in uninterrupted.model.items())
    assert {group["algorithm"] for group in resumed.optimizer["param_groups"]} == {MUON, ADAMW}
    for index, state in uninterrupted.optimizer["state"].items():
        for key, value in state.items():
            assert torch.equal(resumed.optimizer["state"][index][key], value), (index, key)


@requires_muon
def test_resuming_with_another_optimizer_is_refused_pointing_at_init_from(tmp_path, tiny_shards):
    config = tiny_run_config(tiny_shards, tmp_path, max_steps=2, val_interval=2, ckpt_interval=2)
    train(config)
    config.train.optimizer, config.train.resume = "muon", "auto"
    with pytest.raises(CheckpointError, match=r"train.optimizer adamw -> muon .*optimizer state is the saved "
                                              r"optimizer's; --train.init_from starts a new run"):
        train(config)
    assert (checkpoints_dir(tmp_path) / "last").exists()


@requires_muon
def test_a_copy_steps_its_own_groups_and_an_added_group_is_stepped_by_its_algorithm():
    torch.manual_seed(0)
    model = Transformer(debug_model_config())
    optimizer = build_optimizer(model, TrainConfig(**MUON_TRAIN))
    # deepcopy of both at once, as a pickle of a training state would hold them: the copy's groups hold the copy's
    # parameters, and its inner optimizers must step those
    copied_model, copied = copy.deepcopy((model, optimizer))
    assert copied._muon.param_groups[0] is copied.param_groups[0] and copied._adamw.state is copied.state
    idx = torch.randint(0, model.config.vocab_size, (2, 16))
    for net, opt in ((model, optimizer), (copied_model, copied)):
        net(idx, idx)[1].backward()
        opt.step()
    for (name, param), other in zip(model.named_parameters(), copied_model.parameters(), strict=True):
        assert torch.equal(param, other), name
    added = torch.nn.Parameter(torch.eye(4))
    optimizer.add_param_group({"params": [added], "algorithm": MUON})
    assert optimizer.param_groups[-1]["adjust_lr_fn"] == "match_rms_adamw"  # Muon's defaults filled in
    added.grad = torch.ones(4, 4)
    optimizer.step()
    assert not torch.equal(added, torch.eye(4)) and "momentum_buffer" in optimizer.state[added]  # Muon stepped it
    with pytest.raises(ValueError, match="needs 'algorithm'"):
        optimizer.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2, 2))]})


@requires_muon
def test_train_lr_is_train_lrs_curve_and_muons_own_is_logged_beside_it(tmp_path, tiny_shards):
    config = tiny_run_config(tiny_shards, tmp_path, optimizer="muon", muon_lr=0.02, max_steps=2, val_interval=2,
                             ckpt_interval=2, warmup_frac=0.0)
    train(config)
    curve = build_scheduler(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), config.train).lr_lambdas[0]
    assert [lr for _, lr in scalars(tmp_path, "train/lr")] == pytest.approx([3e-3 * curve(0), 3e-3 * curve(1)])
    assert [lr for _, lr in scalars(tmp_path, "train/muon_lr")] == pytest.approx([0.02 * curve(0), 0.02 * curve(1)])
