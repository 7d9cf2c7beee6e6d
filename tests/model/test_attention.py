"""MLA and MHA attention: the training path, the absorbed and naive decode paths, and fp16 safety."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import debug_model_config
from tml.model.attention import (
    MultiHeadAttention,
    MultiHeadLatentAttention,
    attend_cached,
    build_attention,
    causal_attention_padded,
)
from tml.model.kv_cache import KVCache, LatentCache

DECODE_ATOL = 1e-5  # fp32: absorbed and naive differ only in summation order
PREFILL, DECODE = 6, 8
# YaRN on, reading 4x the 4 tokens "trained at": the 14 positions below are mostly past them, as DeepSeek's are.
YARN = dict(rope_yarn_factor=4.0, rope_yarn_original_block_size=4, rope_yarn_mscale=0.707)
WITH_AND_WITHOUT_YARN = pytest.mark.parametrize("overrides", [dict(), YARN], ids=["plain-rope", "yarn"])


def yarn_temperature(overrides: dict) -> float:
    """YaRN's softmax scale multiplier, written out: (0.1 * mscale * ln s + 1)^2, 1 without YaRN."""
    if not overrides:
        return 1.0
    return (0.1 * overrides["rope_yarn_mscale"] * math.log(overrides["rope_yarn_factor"]) + 1) ** 2


def mla_module(q_lora_rank: int = 0, **overrides) -> MultiHeadLatentAttention:
    torch.manual_seed(0)
    # nope != v and nope + rope != v, so a wrong head split or scale cannot cancel out.
    config = debug_model_config(q_lora_rank=q_lora_rank, qk_nope_head_dim=12, qk_rope_head_dim=8, v_head_dim=20,
                                **overrides)
    return MultiHeadLatentAttention(config).eval()


def decode_outputs(attn: MultiHeadLatentAttention, x: torch.Tensor, absorb: bool) -> torch.Tensor:
    """Prefill PREFILL tokens, then feed one token, then chunks of 3 and the rest, through the cache."""
    cache = LatentCache(x.shape[0], x.shape[1], attn.kv_lora_rank, attn.rope_dim)
    steps = [(0, PREFILL), (PREFILL, PREFILL + 1), (PREFILL + 1, PREFILL + 4), (PREFILL + 4, x.shape[1])]
    return torch.cat([attn(x[:, a:b], cache, absorb=absorb) for a, b in steps], dim=1)


@WITH_AND_WITHOUT_YARN
@pytest.mark.parametrize("q_lora_rank", [0, 16])
def test_absorbed_decode_matches_naive_decode(q_lora_rank, overrides):
    attn = mla_module(q_lora_rank, **overrides)
    x = torch.randn(2, PREFILL + DECODE, 64)
    with torch.no_grad():
        absorbed, naive = decode_outputs(attn, x, absorb=True), decode_outputs(attn, x, absorb=False)
    torch.testing.assert_close(absorbed, naive, atol=DECODE_ATOL, rtol=0)


@WITH_AND_WITHOUT_YARN
@pytest.mark.parametrize("absorb", [True, False])
def test_cached_decode_matches_full_forward(absorb, overrides):
    attn = mla_module(**overrides)
    x = torch.randn(2, PREFILL + DECODE, 64)
    with torch.no_grad():
        torch.testing.assert_close(decode_outputs(attn, x, absorb), attn(x), atol=DECODE_ATOL, rtol=0)


def test_absorbed_decode_never_expands_latents_into_per_head_keys():
    attn = mla_module()
    expansions = []
    attn.kv_up.register_forward_hook(lambda *_: expansions.append(1))
    cache = LatentCache(1, 8, attn.kv_lora_rank, attn.rope_dim)
    with torch.no_grad():
        attn(torch.randn(1, 4, 64), cache)  # prefill expands once, through SDPA
        expansions.clear()
        attn(torch.randn(1, 1, 64), cache, absorb=True)
        assert expansions == []
        attn(torch.randn(1, 1, 64), cache, absorb=False)
        assert expansions == [1]


@WITH_AND_WITHOUT_YARN
def test_full_forward_equals_explicit_attention_with_mla_scale(overrides):
    """SDPA must be called causal with scale 1/sqrt(nope + rope) over [q_nope | q_rope] . [k_nope | k_rope], times
    YaRN's temperature when it is on."""
    attn = mla_module(**overrides)
    x = torch.randn(1, 10, 64)
    with torch.no_grad():
        q_nope, q_rope = attn.query(x, 0)
        k, v = attn.expand(*attn.latent(x, 0))
        scale = yarn_temperature(overrides) / math.sqrt(12 + 8)
        scores = torch.cat((q_nope, q_rope), dim=-1) @ k.transpose(-2, -1) * scale
        scores = scores.masked_fill(torch.ones(10, 10, dtype=torch.bool).triu(1), float("-inf"))
        y = (torch.softmax(scores, dim=-1) @ v).transpose(1, 2).reshape(1, 10, -1)
        torch.testing.assert_close(attn(x), attn.out_proj(y), atol=DECODE_ATOL, rtol=0)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def interleaved_rope(x: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    """DeepSeek-V3's RoPE: dims (2i, 2i+1) are one complex number, rotated by position * theta^(-2i/d)."""
    length, dim = x.shape[-2], x.shape[-1]
    angles = torch.outer(torch.arange(length, dtype=torch.float32), theta ** (-torch.arange(0, dim, 2) / dim))
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], dim // 2, 2))
    return torch.view_as_real(pairs * torch.polar(torch.ones_like(angles), angles)).flatten(-2)


def deepseek_attention(attn: MultiHeadLatentAttention, x: torch.Tensor) -> torch.Tensor:
    """MLA written from the DeepSeek-V2 paper's equations (37)-(47), sharing only the weights with tml.

    DeepSeek interleaves the RoPE dims where tml pairs dim i with i + d/2; permuting the RoPE rows of the weights
    maps one layout onto the other.
    """
    H, nope, rope, v_dim, rank = attn.n_head, attn.nope_dim, attn.rope_dim, attn.v_dim, attn.kv_lora_rank
    B, T, _ = x.shape
    to_interleaved = torch.arange(rope).view(2, rope // 2).t().reshape(-1)  # slot 2i <- i, slot 2i+1 <- i + d/2
    if attn.low_rank_query:
        c_q = rms_norm(F.linear(x, attn.q_down.weight, attn.q_down.bias), attn.q_norm.weight)  # (37)
        q = F.linear(c_q, attn.q_up.weight, attn.q_up.bias)  # (38), (39) before RoPE
    else:
        q = F.linear(x, attn.q_proj.weight, attn.q_proj.bias)
    q = q.view(B, T, H, nope + rope).transpose(1, 2)
    q_nope, q_rope = q[..., :nope], interleaved_rope(q[..., nope:][..., to_interleaved])
    compressed = F.linear(x, attn.kv_down.weight, attn.kv_down.bias)
    c_kv = rms_norm(compressed[..., :rank], attn.kv_norm.weight)  # (41)
    k_rope = interleaved_rope(compressed[..., rank:][..., to_interleaved])  # (43): one key for all heads
    k_nope, v = F.linear(c_kv, attn.kv_up.weight).view(B, T, H, nope + v_dim).transpose(1, 2).split([nope, v_dim], -1)
    scores = q_nope @ k_nope.transpose(-2, -1) + q_rope @ k_rope.unsqueeze(1).transpose(-2, -1)
    scores = scores / math.sqrt(nope + rope)
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))  # (46)
    heads = (torch.softmax(scores, dim=-1) @ v).transpose(1, 2).reshape(B, T, H * v_dim)
    return F.linear(heads, attn.out_proj.weight, attn.out_proj.bias)  # (47)


@pytest.mark.parametrize(("q_lora_rank", "bias"), [(0, False), (16, False), (16, True)])
def test_mla_matches_the_deepseek_v2_equations(q_lora_rank, bias):
    """Checked against an independent implementation, so a change that moves every tml path alike (the RoPE key
    taken from the latent, a normed RoPE key, per-head RoPE keys, a misplaced norm) still fails."""
    torch.manual_seed(0)
    config = debug_model_config(q_lora_rank=q_lora_rank, bias=bias, qk_nope_head_dim=12, qk_rope_head_dim=8,
                                v_head_dim=20)
    attn = MultiHeadLatentAttention(config).eval()
    with torch.no_grad():
        for param in attn.parameters():
            if param.dim() == 1:  # biases and norm gains away from their 0 / 1 init, so a missing one shows
                param.add_(0.1 * torch.randn_like(param))
        x = torch.randn(2, 12, 64)
        torch.testing.assert_close(attn(x), deepseek_attention(attn, x), atol=DECODE_ATOL, rtol=0)


def test_cached_attention_does_not_overflow_in_fp16():
    # Dot products of 16 dims of 100 * 100 = 160,000, beyond fp16's 65,504: only an fp32 softmax survives.
    q = torch.full((1, 2, 1, 16), 100.0, dtype=torch.float16)
    k = torch.full((1, 2, 5, 16), 100.0, dtype=torch.float16)
    k[:, :, -1] = -100.0
    v = torch.randn(1, 2, 5, 8, dtype=torch.float16)
    out = attend_cached(q, k, v, scale=1.0, start=4)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    torch.testing.assert_close(out, v[:, :, :4].float().mean(dim=2, keepdim=True).half(), atol=1e-3, rtol=0)


def test_absorbed_decode_does_not_overflow_in_fp16():
    attn = mla_module().half()
    with torch.no_grad():
        attn.kv_up.weight.fill_(1.0)  # q in latent space becomes 12 * 10 = 120 per latent dim
    cache = LatentCache(1, 4, attn.kv_lora_rank, attn.rope_dim, dtype=torch.float16)
    cache.update(torch.full((1, 3, attn.kv_lora_rank), 30.0), torch.zeros(1, 3, attn.rope_dim))
    q_nope = torch.full((1, 4, 1, attn.nope_dim), 10.0, dtype=torch.float16)
    q_rope = torch.zeros(1, 4, 1, attn.rope_dim, dtype=torch.float16)
    latent, rope_key = cache.update(torch.full((1, 1, attn.kv_lora_rank), 30.0), torch.zeros(1, 1, attn.rope_dim))
    # Scores reach 120 * 30 * 32 = 115,200 before scaling: an fp16 matmul would give inf and then NaN.
    out = attn._absorbed_attention(q_nope, q_rope, latent, rope_key, start=3)
    assert torch.isfinite(out).all()
    # Equal scores mix the identical latents unchanged; W_UV of ones then sums the 32 latent dims of 30.
    torch.testing.assert_close(out.float(), torch.full(out.shape, 32 * 30.0), rtol=1e-3, atol=0)


@pytest.mark.parametrize(("qk_dim", "v_dim"), [(24, 16), (16, 24), (16, 16)])
def test_padded_attention_equals_plain_sdpa_values_and_gradients(qk_dim, v_dim):
    q, k = torch.randn(2, 3, 9, qk_dim, requires_grad=True), torch.randn(2, 3, 9, qk_dim, requires_grad=True)
    v = torch.randn(2, 3, 9, v_dim, requires_grad=True)
    padded = causal_attention_padded(q, k, v, scale=0.3, dropout_p=0.0)
    plain = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3)
    torch.testing.assert_close(padded, plain)
    grad_out = torch.randn_like(plain)
    padded_grads = torch.autograd.grad(padded, (q, k, v), grad_out)
    plain_grads = torch.autograd.grad(plain, (q, k, v), grad_out)
    for ours, reference in zip(padded_grads, plain_grads, strict=True):
        torch.testing.assert_close(ours, reference)


def grouped_and_equivalent_mha(n_kv_head: int, **overrides) -> tuple[MultiHeadAttention, MultiHeadAttention]:
    """A GQA module and the MHA module whose key/value heads are its heads repeated for each query group."""
    torch.manual_seed(0)
    grouped = MultiHeadAttention(debug_model_config(attention="mha", n_kv_head=n_kv_head, n_embd=64, n_head=4,
                                                    **overrides)).eval()
    full = MultiHeadAttention(debug_model_config(attention="mha", n_embd=64, n_head=4, **overrides)).eval()
    head_dim, group = 16, 4 // n_kv_head
    q_w, k_w, v_w = grouped.qkv_proj.weight.split([64, n_kv_head * head_dim, n_kv_head * head_dim])
    repeat = lambda w: w.view(n_kv_head, head_dim, 64).repeat_interleave(group, dim=0).reshape(64, 64)  # noqa: E731
    with torch.no_grad():
        full.qkv_proj.weight.copy_(torch.cat((q_w, repeat(k_w), repeat(v_w))))
        full.out_proj.weight.copy_(grouped.out_proj.weight)
    return grouped, full


@WITH_AND_WITHOUT_YARN
@pytest.mark.parametrize("n_kv_head", [1, 2])
def test_grouped_query_attention_equals_mha_with_each_key_value_head_repeated_for_its_group(n_kv_head, overrides):
    """Query head h reads key/value head h // (n_head / n_kv_head), in training and in cached decode alike."""
    grouped, full = grouped_and_equivalent_mha(n_kv_head, **overrides)
    x = torch.randn(2, PREFILL + DECODE, 64)
    with torch.no_grad():
        torch.testing.assert_close(grouped(x), full(x), atol=DECODE_ATOL, rtol=0)
        cache = KVCache(2, x.shape[1], n_kv_head, 16)
        steps = [(0, PREFILL), (PREFILL, PREFILL + 1), (PREFILL + 1, PREFILL + 4), (PREFILL + 4, x.shape[1])]
        decoded = torch.cat([grouped(x[:, a:b], cache) for a, b in steps], dim=1)
    torch.testing.assert_close(decoded, full(x), atol=DECODE_ATOL, rtol=0)
    assert cache.key.shape[1] == n_kv_head  # the cache holds the key/value heads only


def test_mha_with_n_kv_head_equal_to_n_head_keeps_the_fused_gpt2_projection():
    """Checkpoints of MHA runs from before n_kv_head existed load unchanged: same parameter names and shapes."""
    explicit = MultiHeadAttention(debug_model_config(attention="mha", n_kv_head=4))
    default = MultiHeadAttention(debug_model_config(attention="mha"))
    shapes = [{name: tensor.shape for name, tensor in module.state_dict().items()} for module in (explicit, default)]
    assert shapes[0] == shapes[1]
    assert explicit.qkv_proj.weight.shape == (3 * 64, 64)


@pytest.mark.parametrize(("attention", "head_dim"), [("mla", 16 + 8), ("mha", 64 // 4)])
def test_yarn_multiplies_the_softmax_scale_of_both_attentions_and_leaves_it_exact_without(attention, head_dim):
    plain, yarn = (build_attention(debug_model_config(attention=attention, **overrides)) for overrides in (dict(), YARN))
    assert plain.scale == 1.0 / math.sqrt(head_dim)
    assert yarn.scale == pytest.approx(yarn_temperature(YARN) / math.sqrt(head_dim), rel=1e-12)


@pytest.mark.parametrize("attention", ["mla", "mha"])
def test_yarn_changes_what_attention_computes_past_the_original_context(attention):
    """Not a setting that is read and dropped: the same weights attend otherwise with YaRN on."""
    x = torch.randn(1, 16, 64)
    outputs = []
    for overrides in (dict(), YARN):
        torch.manual_seed(0)
        with torch.no_grad():
            outputs.append(build_attention(debug_model_config(attention=attention, **overrides)).eval()(x))
    assert not torch.allclose(*outputs, atol=1e-4)


@pytest.mark.parametrize("attention", ["mla", "mha"])
def test_yarn_rotates_queries_and_keys_alike_so_scores_depend_only_on_the_distance(attention):
    """One token repeated: its rotated query . key depends on t - s alone only if both turn at YaRN's frequencies
    (MLA's q_rope and its shared RoPE key, MHA's whole heads)."""
    torch.manual_seed(0)
    attn = build_attention(debug_model_config(attention=attention, **YARN)).eval()
    x = torch.randn(1, 1, 64).expand(1, 16, 64)
    with torch.no_grad():
        if attention == "mla":
            q, k = attn.query(x, 0)[1], attn.latent(x, 0)[1].unsqueeze(1)
        else:
            q, k, _ = attn.query_key_value(x, 0)
    scores = q[0, 0] @ k[0, 0].T  # [t, s]
    torch.testing.assert_close(scores[5:, 5:], scores[:-5, :-5], atol=1e-4, rtol=0)  # both shifted by 5
