"""The transformer: cached decoding equals the full forward, causality, init, learning, limits and sampling."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.conftest import debug_model_config
from tml.model import Transformer
from tml.model import transformer as transformer_module
from tml.model.norms import RMSNorm
from tml.model.transformer import sample_next_token

DECODE_ATOL = 1e-5  # fp32 logits of the debug model
PROMPT = 5
OVERFIT_STEPS = 100  # the debug model memorises one batch to under a fifth of its start loss in ~60
# DeepSeek-V2/V3's block (and Llama's): pre-norm RMSNorm and a SwiGLU MLP.
DEEPSEEK_BLOCK = dict(norm="pre", norm_type="rmsnorm", mlp="swiglu")
# YaRN reading the debug model's 32 tokens as 4x the 8 it was "trained at", with DeepSeek-V2's temperature.
YARN = dict(rope_yarn_factor=4.0, rope_yarn_original_block_size=8, rope_yarn_mscale=0.707)

VARIANTS = {
    "mla-post": dict(),
    "mla-pre": dict(norm="pre"),
    "mla-lowrank-q-post": dict(q_lora_rank=16),
    "mla-lowrank-q-pre": dict(q_lora_rank=16, norm="pre"),
    "mla-bias-dropout": dict(bias=True, dropout=0.1),  # dropout is off in eval mode; biases must be cached alike
    "mha-post": dict(attention="mha"),
    "mha-pre": dict(attention="mha", norm="pre"),
    "gqa-post": dict(attention="mha", n_kv_head=2),
    "mqa-pre": dict(attention="mha", n_kv_head=1, norm="pre"),
    "mla-deepseek-block": DEEPSEEK_BLOCK,
    "mla-rmsnorm-swiglu-post-bias": dict(norm_type="rmsnorm", mlp="swiglu", bias=True),
    "gqa-deepseek-block": dict(attention="mha", n_kv_head=2, **DEEPSEEK_BLOCK),
    "mla-yarn": YARN,
    "gqa-yarn": dict(attention="mha", n_kv_head=2, **YARN),
}


def build(**overrides) -> Transformer:
    torch.manual_seed(0)
    return Transformer(debug_model_config(**overrides)).eval()


def all_logits(model: Transformer, idx: torch.Tensor) -> torch.Tensor:
    logits, _ = model(idx, targets=idx)  # with targets, forward returns every position's logits
    return logits


@pytest.mark.parametrize("absorb", [True, False], ids=["absorbed", "naive"])
@pytest.mark.parametrize("variant", VARIANTS.values(), ids=VARIANTS.keys())
def test_incremental_decode_matches_full_forward_at_every_position(variant, absorb):
    model = build(**variant)
    idx = torch.randint(0, 256, (2, model.config.block_size))
    with torch.no_grad():
        full = all_logits(model, idx)
        cache = model.new_cache(batch_size=2)
        step_logits = [model(idx[:, :1], cache=cache, absorb=absorb)[0]]
        step_logits += [model(idx[:, t:t + 1], cache=cache, absorb=absorb)[0] for t in range(1, idx.shape[1])]
    torch.testing.assert_close(torch.cat(step_logits, dim=1), full, atol=DECODE_ATOL, rtol=0)


@pytest.mark.parametrize("q_lora_rank", [0, 16])
def test_absorbed_decode_matches_naive_decode_after_a_prompt(q_lora_rank):
    model = build(q_lora_rank=q_lora_rank)
    idx = torch.randint(0, 256, (3, 20))
    outputs = {}
    with torch.no_grad():
        for absorb in (True, False):
            cache = model.new_cache(batch_size=3)
            model(idx[:, :PROMPT], cache=cache)
            outputs[absorb] = torch.cat([model(idx[:, t:t + 1], cache=cache, absorb=absorb)[0]
                                         for t in range(PROMPT, idx.shape[1])], dim=1)
    torch.testing.assert_close(outputs[True], outputs[False], atol=DECODE_ATOL, rtol=0)


@pytest.mark.parametrize("attention", ["mla", "mha"])
def test_changing_a_future_token_leaves_earlier_logits_unchanged(attention):
    model = build(attention=attention)
    idx = torch.randint(0, 256, (1, 16))
    changed = idx.clone()
    changed[0, 10] = (idx[0, 10] + 1) % 256
    with torch.no_grad():
        before, after = all_logits(model, idx), all_logits(model, changed)
    torch.testing.assert_close(before[:, :10], after[:, :10], atol=0, rtol=0)
    assert not torch.allclose(before[:, 10:], after[:, 10:])


@pytest.mark.parametrize("overrides", [dict(attention="mla"), dict(attention="mha"), DEEPSEEK_BLOCK],
                         ids=["mla", "mha", "mla-deepseek-block"])
def test_init_follows_gpt2_statistics(overrides):
    model = Transformer(debug_model_config(**overrides, n_embd=128, n_layer=4, bias=True, vocab_size=1024))
    residual_std = 0.02 / math.sqrt(2 * 4)
    for name, param in model.named_parameters():
        if name.endswith(("attn.out_proj.weight", "mlp.fc_out.weight")):
            assert param.std().item() == pytest.approx(residual_std, rel=0.1), name
        elif name.endswith(".bias"):
            assert torch.all(param == 0), name
        elif "norm" in name:
            assert torch.all(param == 1), name
        else:
            assert param.std().item() == pytest.approx(0.02, rel=0.1), name


@pytest.mark.parametrize("norm", ["post", "pre"])
def test_the_default_block_is_gpt2s_layernorm_and_gelu_mlp_parameter_for_parameter(norm):
    """The defaults are the reference setup: the same parameters as before model.mlp and model.norm_type, and the
    same numbers as GPT-2's block written out by hand."""
    model = build(norm=norm, bias=True)
    shapes = {name: tuple(p.shape) for name, p in model.state_dict().items() if ".attn." not in name}
    expected = {"tok_emb.weight": (256, 64), "lm_head.weight": (256, 64)}
    for layer in range(2):
        for norm_name in ("norm_attn", "norm_mlp"):
            expected |= {f"blocks.{layer}.{norm_name}.weight": (64,), f"blocks.{layer}.{norm_name}.bias": (64,)}
        expected |= {f"blocks.{layer}.mlp.fc_in.weight": (256, 64), f"blocks.{layer}.mlp.fc_in.bias": (256,),
                     f"blocks.{layer}.mlp.fc_out.weight": (64, 256), f"blocks.{layer}.mlp.fc_out.bias": (64,)}
    if norm == "pre":
        expected |= {"norm_final.weight": (64,), "norm_final.bias": (64,)}
    assert shapes == expected

    def layer_norm(x: torch.Tensor, module: nn.Module) -> torch.Tensor:
        return F.layer_norm(x, (64,), module.weight, module.bias, eps=1e-5)

    def gelu_mlp(x: torch.Tensor, mlp: nn.Module) -> torch.Tensor:
        return F.linear(F.gelu(F.linear(x, mlp.fc_in.weight, mlp.fc_in.bias)), mlp.fc_out.weight, mlp.fc_out.bias)

    idx = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        x = model.tok_emb(idx)
        for block in model.blocks:
            if norm == "pre":
                x = x + block.attn(layer_norm(x, block.norm_attn))
                x = x + gelu_mlp(layer_norm(x, block.norm_mlp), block.mlp)
            else:
                x = layer_norm(x + block.attn(x), block.norm_attn)
                x = layer_norm(x + gelu_mlp(x, block.mlp), block.norm_mlp)
        if norm == "pre":
            x = layer_norm(x, model.norm_final)
        torch.testing.assert_close(all_logits(model, idx), F.linear(x, model.tok_emb.weight), rtol=0, atol=0)


def test_rmsnorm_blocks_hold_no_layernorm_and_swiglu_three_matrices_of_about_gelus_parameters():
    model = build(**DEEPSEEK_BLOCK)
    assert not any(isinstance(module, nn.LayerNorm) for module in model.modules())
    norms = [model.norm_final] + [norm for block in model.blocks for norm in (block.norm_attn, block.norm_mlp)]
    assert all(type(norm) is RMSNorm for norm in norms)
    hidden = model.config.mlp_hidden_dim  # 192: 2/3 of 256 rounded up to a multiple of 64
    assert {name: tuple(p.shape) for name, p in model.blocks[0].mlp.named_parameters()} == {
        "fc_gate.weight": (hidden, 64), "fc_in.weight": (hidden, 64), "fc_out.weight": (64, hidden)}
    gelu = build(norm="pre")
    assert model.num_params() - gelu.num_params() == 2 * (3 * 64 * 192 - 2 * 64 * 256)
    # At GPT-2 small's width 2/3 of 3072 is a multiple of 64 already: the same parameters, exactly.
    gpt2_small = {mlp: transformer_module.MLP(debug_model_config(n_embd=768, n_head=12, mlp=mlp))
                  for mlp in ("gelu", "swiglu")}
    assert sum(p.numel() for p in gpt2_small["swiglu"].parameters()) == 2 * 768 * 3072 == sum(
        p.numel() for p in gpt2_small["gelu"].parameters())


def test_embeddings_are_tied_to_the_output_layer():
    model = build()
    assert model.lm_head.weight is model.tok_emb.weight
    assert build(tie_embeddings=False).lm_head.weight is not build(tie_embeddings=False).tok_emb.weight


@pytest.mark.parametrize("variant", [dict(), dict(attention="mha"), dict(norm="pre", q_lora_rank=16), DEEPSEEK_BLOCK],
                         ids=["mla", "mha", "mla-pre-lowrank-q", "mla-deepseek-block"])
def test_overfits_one_small_batch(variant):
    model = build(**variant).train()
    idx = torch.randint(0, 256, (4, 33))
    x, y = idx[:, :-1], idx[:, 1:]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first_loss = model(x, y)[1].item()
    for _ in range(OVERFIT_STEPS):
        _, loss = model(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    assert first_loss == pytest.approx(math.log(256), rel=0.1)  # untrained: near-uniform predictions
    assert loss.item() < 0.2 * first_loss


def test_loss_ignores_targets_of_minus_one():
    model = build()
    idx = torch.randint(0, 256, (1, 8))
    targets = idx.clone()
    targets[0, 4:] = -1
    logits, loss = model(idx, targets)
    expected = torch.nn.functional.cross_entropy(logits[0, :4], idx[0, :4])
    torch.testing.assert_close(loss, expected)


def test_training_forward_can_skip_returning_logits_with_the_same_loss():
    model = build()
    idx = torch.randint(0, 256, (2, 8))
    logits, loss = model(idx, idx)
    no_logits, same_loss = model(idx, idx, return_logits=False)
    assert logits.shape == (2, 8, 256) and no_logits is None
    assert torch.equal(same_loss, loss)


def test_a_loss_without_gradients_projects_a_chunk_of_positions_at_a_time_to_the_same_value(monkeypatch):
    model = build().eval()
    idx = torch.randint(0, 256, (3, 8))
    targets = idx.clone()
    targets[0, :5] = -1  # ignored targets count in no chunk's mean
    with torch.no_grad():
        _, whole = model(idx, targets)
        projected = []
        monkeypatch.setattr(transformer_module, "NO_GRAD_LOSS_CHUNK", 5)  # 24 positions: chunks of 5, 5, 5, 5, 4
        model.lm_head.register_forward_hook(lambda module, inputs, output: projected.append(inputs[0].shape[:-1].numel()))
        _, chunked = model(idx, targets, return_logits=False)
        assert projected == [5, 5, 5, 5, 4]
        torch.testing.assert_close(chunked, whole)
        assert model(idx, torch.full_like(targets, -1), return_logits=False)[1].isnan()  # as the mean of nothing is
    projected.clear()
    _, with_grad = model(idx, targets, return_logits=False)  # training: one projection, as autograd needs it anyway
    assert projected == [24] and with_grad.requires_grad


def loss_grads_and_saved_bytes(model: Transformer, idx: torch.Tensor) -> tuple[torch.Tensor, list, int]:
    """Loss, parameter gradients and the bytes autograd keeps for backward (tensors saved outside checkpoints)."""
    saved = {}

    def pack(tensor):
        saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)  # dropout masks: the same draws in both runs
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        _, loss = model(idx, idx, return_logits=False)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()], sum(saved.values())


@pytest.mark.parametrize("variant", [dict(dropout=0.1), dict(attention="mha", norm="pre", dropout=0.1),
                                     dict(DEEPSEEK_BLOCK, dropout=0.1)],
                         ids=["mla-post", "mha-pre", "mla-deepseek-block"])
def test_activation_checkpointing_changes_no_number_and_keeps_far_fewer_activations(variant):
    model = build(**variant, n_layer=4).train()
    idx = torch.randint(0, 256, (2, 32))
    loss, grads, kept = loss_grads_and_saved_bytes(model, idx)
    model.activation_checkpointing = True
    loss_ckpt, grads_ckpt, kept_ckpt = loss_grads_and_saved_bytes(model, idx)
    assert torch.equal(loss_ckpt, loss)  # dropout replays the same masks in the recomputation
    for grad, grad_ckpt in zip(grads, grads_ckpt, strict=True):
        torch.testing.assert_close(grad_ckpt, grad, rtol=1e-6, atol=1e-7)
    assert kept_ckpt < kept / 3  # only each block's input (and the head's inputs) stay alive


def test_activation_checkpointing_is_off_for_evaluation_and_decoding():
    model = build()
    model.activation_checkpointing = True
    idx = torch.randint(0, 256, (1, 8))
    with torch.no_grad():
        logits, _ = model(idx, idx)
    model.activation_checkpointing = False
    with torch.no_grad():
        assert torch.equal(model(idx, idx)[0], logits)
    model.activation_checkpointing = True
    torch.testing.assert_close(model.generate(idx[:, :4], 4, temperature=0.0), build().generate(idx[:, :4], 4,
                                                                                              temperature=0.0))


def test_activation_checkpointing_wraps_no_block_without_gradients_or_with_a_cache(monkeypatch):
    """The test above compares outputs, which checkpointing never changes; this one counts the wrapped blocks."""
    wrapped = []
    real_checkpoint = transformer_module.checkpoint
    monkeypatch.setattr(transformer_module, "checkpoint",
                        lambda block, *args, **kwargs: wrapped.append(block) or real_checkpoint(block, *args, **kwargs))
    model = build().train()
    model.activation_checkpointing = True
    idx = torch.randint(0, 256, (1, 8))
    with torch.no_grad():
        model(idx, idx)  # validation under no_grad
    model.eval()(idx, idx)  # eval mode
    cache = model.train().new_cache(1)
    model(idx, cache=cache)  # a cached prefill, even in train mode with gradients on
    assert wrapped == [] and cache[0].length == idx.shape[1]
    model(idx, idx)
    assert len(wrapped) == model.config.n_layer  # and training does wrap every block


def test_without_targets_only_the_last_position_is_returned():
    model = build()
    idx = torch.randint(0, 256, (2, 7))
    logits, loss = model(idx)
    assert logits.shape == (2, 1, 256) and loss is None
    torch.testing.assert_close(logits, all_logits(model, idx)[:, -1:])


def test_input_longer_than_block_size_raises_naming_both_lengths():
    model = build()
    with pytest.raises(ValueError, match="33 tokens but model.block_size is 32"):
        model(torch.zeros(1, 33, dtype=torch.long))


def test_generate_past_block_size_raises():
    model = build()
    with pytest.raises(ValueError, match="exceeds model.block_size=32"):
        model.generate(torch.zeros(1, 30, dtype=torch.long), max_new_tokens=3)


@pytest.mark.parametrize("overrides", [dict(attention="mla"), dict(attention="mha"), DEEPSEEK_BLOCK, YARN,
                                       dict(attention="mha", **YARN)],
                         ids=["mla", "mha", "mla-deepseek-block", "mla-yarn", "mha-yarn"])
def test_greedy_generate_equals_argmax_of_uncached_forward(overrides):
    model = build(**overrides)
    prompt = torch.randint(0, 256, (2, PROMPT))
    generated = model.generate(prompt, max_new_tokens=10, top_k=1)
    expected = prompt
    with torch.no_grad():
        for _ in range(10):
            expected = torch.cat((expected, model(expected)[0][:, -1].argmax(-1, keepdim=True)), dim=1)
    assert torch.equal(generated, expected)
    assert torch.equal(model.generate(prompt, 10, temperature=0.0), expected)
    assert torch.equal(model.generate(prompt, 10, top_p=1e-6, absorb=False), expected)


@pytest.mark.parametrize("attention", ["mla", "mha"])
def test_a_yarn_model_reads_and_generates_its_whole_block_of_four_times_the_original_context(attention):
    model = build(attention=attention, **YARN)
    assert model.config.block_size == 4 * YARN["rope_yarn_original_block_size"]
    idx = torch.randint(0, 256, (2, model.config.block_size))
    with torch.no_grad():
        logits, loss = model(idx, targets=idx)
    assert logits.shape == (2, 32, 256) and math.isfinite(loss.item())
    generated = model.generate(idx[:, :PROMPT], max_new_tokens=model.config.block_size - PROMPT)
    assert generated.shape == (2, model.config.block_size)


def test_generate_is_reproducible_with_a_seeded_generator():
    model = build()
    prompt = torch.randint(0, 256, (1, PROMPT))
    runs = [model.generate(prompt, 12, generator=torch.Generator().manual_seed(7)) for _ in range(2)]
    assert torch.equal(runs[0], runs[1])


def test_top_k_samples_only_the_k_most_likely_tokens():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.5, -1.0, 2.9]])
    generator = torch.Generator().manual_seed(0)
    samples = {sample_next_token(logits, top_k=3, generator=generator).item() for _ in range(300)}
    assert samples == {1, 3, 5}


def test_top_p_samples_only_the_smallest_nucleus():
    probs = torch.tensor([[0.05, 0.5, 0.3, 0.1, 0.05]])
    generator = torch.Generator().manual_seed(0)
    samples = {sample_next_token(probs.log(), top_p=0.75, generator=generator).item() for _ in range(300)}
    assert samples == {1, 2}  # 0.5 alone is short of 0.75; 0.5 + 0.3 reaches it


def test_high_temperature_flattens_and_low_temperature_sharpens():
    logits = torch.tensor([[2.0, 0.0]])
    generator = torch.Generator().manual_seed(0)
    def share_of_second(temperature: float) -> float:
        draws = [sample_next_token(logits, temperature, generator=generator).item() for _ in range(2000)]
        return sum(draws) / len(draws)
    assert share_of_second(0.25) < 0.01 < 0.08 < share_of_second(1.0) < 0.2 < 0.35 < share_of_second(10.0)


@pytest.mark.parametrize(("kwargs", "field"), [
    (dict(temperature=-1.0), "temperature"), (dict(top_k=0), "top_k"), (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
])
def test_invalid_sampling_arguments_raise_naming_them(kwargs, field):
    with pytest.raises(ValueError, match=field):
        build().generate(torch.zeros(1, 2, dtype=torch.long), 3, **kwargs)


@pytest.mark.parametrize("attention", ["mla", "mha"])
def test_flops_per_token_is_6n_plus_attention(attention):
    config = debug_model_config(attention=attention)
    model = Transformer(config)
    dense = sum(p.numel() for p in model.parameters())  # tied: the embedding table is the lm_head's matmul
    qk_plus_v = 16 + 8 + 16 if attention == "mla" else 2 * 64 // 4
    expected = 6 * dense + 6 * config.n_layer * config.n_head * config.block_size * qk_plus_v
    assert model.flops_per_token() == expected


FLOP_COUNT_RTOL = 0.01  # the formula counts norm weights as matmul weights: 320 of 126k parameters here


@pytest.mark.parametrize("overrides", [dict(), dict(v_head_dim=24), dict(q_lora_rank=16), dict(attention="mha"),
                                       dict(attention="mha", n_kv_head=2), DEEPSEEK_BLOCK],
                         ids=["mla", "mla-equal-dims", "mla-lowrank-q", "mha", "gqa", "mla-deepseek-block"])
def test_flops_per_token_matches_torch_flop_counter(overrides):
    """An independent count: torch's FlopCounterMode over one forward + backward, with the math attention
    kernel so the attention matmuls are visible to it. MLA's SDPA call pads v to the query/key width, real work
    that flops_per_token leaves out on purpose, so it is added to the expectation here."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    config = debug_model_config(**overrides)
    model = build(**overrides).train()
    idx = torch.randint(0, config.vocab_size, (2, config.block_size))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        _, loss = model(idx, targets=idx)
        loss.backward()
    counted_per_token = counter.get_total_flops() / idx.numel()
    expected = model.flops_per_token()
    if config.attention == "mla":
        qk_dim = config.qk_nope_head_dim + config.qk_rope_head_dim
        expected += 6 * config.n_layer * config.n_head * config.block_size * abs(qk_dim - config.v_head_dim)
    assert counted_per_token == pytest.approx(expected, rel=FLOP_COUNT_RTOL)


def test_num_params_non_embedding_excludes_the_token_table():
    model = build(tie_embeddings=False)
    assert model.num_params(non_embedding=False) - model.num_params() == 256 * 64
    assert model.num_params(non_embedding=False) == sum(p.numel() for p in model.parameters())


def test_ids_past_the_vocab_limit_are_never_sampled_even_at_a_huge_temperature():
    """The embedding's padding rows (GPT-2's 50,257 tokens padded to 50,304) have ids a tokenizer cannot decode."""
    model = build()
    logits = torch.zeros(64, 256)
    logits[:, 200:] = 5.0  # the padding rows are the most likely ones
    generator = torch.Generator().manual_seed(0)
    assert int(sample_next_token(logits, 1000.0, generator=generator, vocab_limit=200).max()) < 200
    assert int(sample_next_token(logits, 0.0, vocab_limit=200).max()) < 200  # greedy too
    out = model.generate(torch.zeros(4, 1, dtype=torch.long), 20, temperature=1000.0, generator=generator,
                         vocab_limit=100)
    assert int(out.max()) < 100


@pytest.mark.parametrize("temperature", [float("nan"), float("inf"), -1.0])
def test_a_temperature_that_is_not_a_finite_non_negative_number_is_refused(temperature):
    with pytest.raises(ValueError, match="temperature=.* must be a number >= 0"):
        sample_next_token(torch.zeros(1, 8), temperature)
