"""Attention statistics: effective rank, the recomputed attention against the module's, logits and entropy."""

from __future__ import annotations

import math

import pytest
import torch

from tests.conftest import debug_model_config
from tml.model.attention import build_attention
from tml.model.diagnostics import (
    attention_scores,
    attention_statistics,
    cache_matrix,
    effective_rank,
    layer_statistics,
)
from tml.model.transformer import Transformer

OUTPUT_ATOL = 1e-5  # fp32: the recomputation and SDPA differ only in summation order
STATISTIC_REL = 1e-5
# nope != v and nope + rope != v for MLA, so a wrong head split or scale cannot cancel out; GQA and MQA group heads.
ATTENTION_KINDS = {
    "mla": dict(attention="mla", qk_nope_head_dim=12, qk_rope_head_dim=8, v_head_dim=20),
    "mla-low-rank-query": dict(attention="mla", q_lora_rank=16),
    "mha": dict(attention="mha"),
    "gqa": dict(attention="mha", n_kv_head=2),
    "mqa": dict(attention="mha", n_kv_head=1),
}


def attention_output(attn, scores: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """The module's output [B,T,C] rebuilt from attention_scores (softmax, mix the values, merge heads, out_proj): equal
    to its forward only when the scores are the ones it really computes."""
    B, H, T, _ = scores.shape
    y = (torch.softmax(scores, dim=-1) @ values.float()).to(values.dtype)
    return attn.out_proj(y.transpose(1, 2).reshape(B, T, -1))


def attention_module(kind: str):
    torch.manual_seed(0)
    return build_attention(debug_model_config(**ATTENTION_KINDS[kind])).eval()


def test_effective_rank_of_a_rank_one_matrix_is_one():
    matrix = torch.outer(torch.randn(50), torch.randn(8))
    assert effective_rank(matrix) == pytest.approx(1.0, abs=1e-6)


def test_effective_rank_of_an_orthogonal_square_matrix_is_its_width():
    q, _ = torch.linalg.qr(torch.randn(12, 12, dtype=torch.float64))
    assert effective_rank(q) == pytest.approx(12.0, rel=1e-9)


def test_effective_rank_of_a_diagonal_is_exp_of_the_entropy_of_its_normalised_spectrum():
    spectrum = [4.0, 2.0, 1.0, 1.0, 0.0]
    p = [s / sum(spectrum) for s in spectrum if s > 0]
    expected = math.exp(-sum(x * math.log(x) for x in p))
    assert effective_rank(torch.diag(torch.tensor(spectrum))) == pytest.approx(expected, rel=1e-9)
    assert effective_rank(torch.zeros(3, 4)) == 0.0


@pytest.mark.parametrize("kind", ATTENTION_KINDS)
def test_recomputed_attention_output_equals_the_modules_forward(kind):
    attn = attention_module(kind)
    x = torch.randn(2, 12, 64)
    with torch.no_grad():
        torch.testing.assert_close(attention_output(attn, *attention_scores(attn, x)), attn(x), atol=OUTPUT_ATOL,
                                   rtol=0)


def brute_force_max_logit_and_entropy(attn, x: torch.Tensor) -> tuple[float, float]:
    """Every head, window, query and earlier key one at a time, with plain Python softmax and entropy."""
    if attn.__class__.__name__ == "MultiHeadLatentAttention":
        q_nope, q_rope = attn.query(x, 0)
        q = torch.cat((q_nope, q_rope), dim=-1)
        k, _ = attn.expand(*attn.latent(x, 0))
        key_head = list(range(attn.n_head))
    else:
        q, k, _ = attn.query_key_value(x, 0)
        key_head = [h * attn.n_kv_head // attn.n_head for h in range(attn.n_head)]
    B, H, T, _ = q.shape
    max_logit, entropies = -math.inf, []
    for b in range(B):
        for h in range(H):
            for t in range(T):
                logits = [float(q[b, h, t] @ k[b, key_head[h], s]) * attn.scale for s in range(t + 1)]
                max_logit = max(max_logit, *logits)
                weights = [math.exp(v - max(logits)) for v in logits]
                probs = [w / sum(weights) for w in weights]
                entropies.append(-sum(p * math.log(p) for p in probs if p > 0))
    return max_logit, sum(entropies) / len(entropies)


@pytest.mark.parametrize("kind", ["mla", "gqa"])
def test_max_logit_and_entropy_match_a_brute_force_computation(kind):
    attn = attention_module(kind)
    x = torch.randn(2, 5, 64) * 4  # larger inputs than init gives: logits far from 0, attention far from uniform
    with torch.no_grad():
        stats = layer_statistics(attn, x)
        max_logit, entropy = brute_force_max_logit_and_entropy(attn, x)
    assert stats.max_logit == pytest.approx(max_logit, rel=STATISTIC_REL)
    assert stats.mean_entropy == pytest.approx(entropy, rel=STATISTIC_REL)
    assert 0 < stats.mean_entropy < math.log(5)


@pytest.mark.parametrize(("kind", "width"), [("mla", 32), ("mha", 2 * 4 * 16), ("gqa", 2 * 2 * 16), ("mqa", 2 * 16)])
def test_cache_width_is_what_the_layer_caches_per_token(kind, width):
    attn = attention_module(kind)
    with torch.no_grad():
        stats = layer_statistics(attn, torch.randn(2, 12, 64))
    assert stats.cache_width == width
    assert 1 < stats.cache_effective_rank <= width and stats.cache_rank_fraction == stats.cache_effective_rank / width


def test_cache_matrix_is_centred_so_a_shared_offset_is_not_a_used_dimension():
    attn = attention_module("mha")
    x = torch.randn(3, 8, 64)
    with torch.no_grad():
        attn.qkv_proj.weight.zero_()
        attn.qkv_proj.bias = torch.nn.Parameter(torch.ones(attn.qkv_proj.out_features))  # every token the same
        assert effective_rank(cache_matrix(attn, x)[:, attn.n_kv_head * attn.head_dim:]) == 0.0  # the values


@pytest.mark.parametrize("used", [2, 5])
def test_a_latent_limited_to_k_dimensions_reports_an_effective_rank_of_about_k(used):
    torch.manual_seed(0)
    model = Transformer(debug_model_config()).eval()
    idx = torch.randint(0, 256, (4, 32))
    with torch.no_grad():
        full = attention_statistics(model, idx)
        for block in model.blocks:  # the latent copies `used` coordinates of the input and is 0 elsewhere
            latent_rows = block.attn.kv_down.weight[: block.attn.kv_lora_rank]
            latent_rows.zero_()
            latent_rows[:, :used].copy_(torch.eye(block.attn.kv_lora_rank, used))
        limited = attention_statistics(model, idx)
    for stats in limited:
        assert used - 0.5 < stats.cache_effective_rank <= used + 1e-6
    assert all(stats.cache_effective_rank > 4 * used for stats in full)


@pytest.mark.parametrize("norm", ["post", "pre"])
def test_each_layer_is_measured_on_the_input_its_attention_really_reads(norm):
    torch.manual_seed(0)
    model = Transformer(debug_model_config(norm=norm))
    idx = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        stats = attention_statistics(model, idx)
        embedded = model.tok_emb(idx)
        first_input = model.blocks[0].norm_attn(embedded) if norm == "pre" else embedded
        expected = layer_statistics(model.blocks[0].attn, first_input)
    assert [s.layer for s in stats] == list(range(model.config.n_layer))
    assert stats[0] == expected
    if norm == "pre":  # the block's input is not what its attention reads
        with torch.no_grad():
            assert stats[0].max_logit != layer_statistics(model.blocks[0].attn, embedded).max_logit


def test_statistics_leave_the_model_as_they_found_it():
    model = Transformer(debug_model_config(dropout=0.1)).train()
    idx = torch.randint(0, 256, (2, 16))
    first, second = attention_statistics(model, idx), attention_statistics(model, idx)
    assert first == second  # eval mode: dropout off, so the same numbers twice
    assert model.training and torch.is_grad_enabled()
    assert all(not block.attn._forward_pre_hooks for block in model.blocks)


@pytest.mark.parametrize("kind", ["mla", "gqa"])
def test_windows_taken_a_few_at_a_time_give_the_numbers_of_all_at_once(kind):
    """Memory that does not grow with --windows: the cache's Gram matrix summed over passes has the spectrum of the
    whole centred cache matrix, and logits and entropies are per window anyway."""
    torch.manual_seed(0)
    model = Transformer(debug_model_config(**ATTENTION_KINDS[kind])).eval()
    idx = torch.randint(0, 256, (5, 16))
    with torch.no_grad():
        together = attention_statistics(model, idx, windows_per_pass=5)
        apart = attention_statistics(model, idx, windows_per_pass=2)
        x = model.tok_emb(idx)  # post-LN: block 0's attention reads the embeddings
        direct = effective_rank(cache_matrix(model.blocks[0].attn, x))
    for one, other in zip(together, apart, strict=True):
        assert other.cache_effective_rank == pytest.approx(one.cache_effective_rank, rel=1e-9)
        assert other.max_logit == one.max_logit
        assert other.mean_entropy == pytest.approx(one.mean_entropy, rel=1e-12)
    assert together[0].cache_effective_rank == pytest.approx(direct, rel=1e-6)  # eigenvalues of X'X = SVD of X
