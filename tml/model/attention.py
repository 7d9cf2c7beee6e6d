"""Multi-head Latent Attention (MLA, DeepSeek-V2) and the multi-head attention (MHA) baseline.

Both modules share one call signature, `forward(x, cache=None, absorb=True)`:
- no cache, or an empty cache (prefill): causal attention over x with scaled_dot_product_attention, filling
  the cache when one is given;
- a cache that already holds positions (decode): the new tokens attend over everything cached, with the
  softmax computed in fp32 so fp16 scores cannot overflow.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from tml.model.config import ModelConfig
from tml.model.kv_cache import KVCache, LatentCache
from tml.model.norms import RMSNorm
from tml.model.rope import RotaryScaling, apply_rotary


def attend_cached(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, start: int) -> torch.Tensor:
    """Causal attention of T new queries at positions start.. over S = start+T cached keys, in fp32.

    q [B,H,T,dk], k [B,Hkv,S,dk], v [B,Hkv,S,dv] -> [B,H,T,dv] in q's dtype, with H a multiple of Hkv: each
    key/value head serves H/Hkv consecutive query heads (GQA; Hkv = H for MHA and MLA's naive path). The group's
    queries are folded into one matmul with their shared keys, so the cache is read once, never copied per head.
    """
    B, H, T, dk = q.shape
    kv_heads = k.shape[1]
    group = H // kv_heads
    scores = (q.float().reshape(B, kv_heads, group * T, dk) @ k.float().transpose(-2, -1)) * scale
    scores = _mask_future(scores.view(B, kv_heads, group, T, -1), start)
    probs = torch.softmax(scores, dim=-1).view(B, kv_heads, group * T, -1)
    return (probs @ v.float()).view(B, H, T, -1).to(q.dtype)


def causal_attention_padded(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                            dropout_p: float) -> torch.Tensor:
    """scaled_dot_product_attention for MLA, whose value head dim differs from the query/key one.

    The fused flash kernels need one head dim for q, k and v; with unequal dims torch silently falls back to
    the math kernel, which materialises the T x T scores (3x slower prefill at T=2048 on CPU). Zero-padding the
    narrower side changes nothing (zero key dims add 0 to q.k; zero value dims are sliced off) as long as the
    scale is passed explicitly, since the default would be computed from the padded width.
    """
    qk_dim, v_dim = q.shape[-1], v.shape[-1]
    if v_dim < qk_dim:
        v = F.pad(v, (0, qk_dim - v_dim))
    elif qk_dim < v_dim:
        q, k = F.pad(q, (0, v_dim - qk_dim)), F.pad(k, (0, v_dim - qk_dim))
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, dropout_p=dropout_p)
    return y[..., :v_dim]


def _mask_future(scores: torch.Tensor, start: int) -> torch.Tensor:
    """Hide key s from query t (absolute position start+t) when s > start+t; a no-op for one new token."""
    new_tokens, total = scores.shape[-2], scores.shape[-1]
    if new_tokens == 1:
        return scores
    query_pos = torch.arange(start, start + new_tokens, device=scores.device)[:, None]
    key_pos = torch.arange(total, device=scores.device)[None, :]
    return scores.masked_fill(key_pos > query_pos, float("-inf"))


class MultiHeadLatentAttention(nn.Module):
    """MLA: keys and values are rebuilt from a shared low-rank latent; RoPE rides on a separate shared key.

    Per token: c = RMSNorm(W_DKV x)[:kv_lora_rank] (the latent) and k_rope = RoPE(W_DKV x)[kv_lora_rank:]
    (one rotary key for all heads). Per head: [k_nope | v] = W_UKV c, and the query is [q_nope | q_rope].
    The cache holds only c and k_rope, which is what makes MLA's cache small.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.nope_dim = config.qk_nope_head_dim
        self.rope_dim = config.qk_rope_head_dim
        self.v_dim = config.v_head_dim
        self.kv_lora_rank = config.kv_lora_rank
        self.rope_theta = config.rope_theta
        self.rope_scaling = RotaryScaling.from_config(config)
        self.dropout = config.dropout
        # Passed explicitly everywhere: the padded SDPA call and the absorbed path (dot products over
        # kv_lora_rank + rope dims) see other widths, from which a default scale would be wrong. YaRN's temperature
        # multiplies it whole, nope dims included, as DeepSeek-V2 does.
        self.scale = self.rope_scaling.softmax_scale_factor / math.sqrt(self.nope_dim + self.rope_dim)

        q_out = config.n_head * (self.nope_dim + self.rope_dim)
        self.low_rank_query = config.q_lora_rank > 0
        if not self.low_rank_query:
            self.q_proj = nn.Linear(config.n_embd, q_out, bias=config.bias)
        else:
            self.q_down = nn.Linear(config.n_embd, config.q_lora_rank, bias=config.bias)
            self.q_norm = RMSNorm(config.q_lora_rank)
            self.q_up = nn.Linear(config.q_lora_rank, q_out, bias=config.bias)
        self.kv_down = nn.Linear(config.n_embd, self.kv_lora_rank + self.rope_dim, bias=config.bias)
        self.kv_norm = RMSNorm(self.kv_lora_rank)
        # No bias on the up-projection (as in DeepSeek-V2): a key bias only adds a per-query constant to the
        # scores and a value bias a constant to the output, so it buys nothing and would complicate absorption.
        self.kv_up = nn.Linear(self.kv_lora_rank, config.n_head * (self.nope_dim + self.v_dim), bias=False)
        self.out_proj = nn.Linear(config.n_head * self.v_dim, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def query(self, x: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """q_nope [B,H,T,nope] and rotated q_rope [B,H,T,rope]."""
        B, T, _ = x.shape
        q = self.q_up(self.q_norm(self.q_down(x))) if self.low_rank_query else self.q_proj(x)
        q = q.view(B, T, self.n_head, self.nope_dim + self.rope_dim).transpose(1, 2)
        q_nope, q_rope = q.split([self.nope_dim, self.rope_dim], dim=-1)
        return q_nope, apply_rotary(q_rope, start, self.rope_theta, self.rope_scaling)

    def latent(self, x: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The normed latent [B,T,r] and the rotated shared RoPE key [B,T,rope]: exactly what the cache stores."""
        latent, rope_key = self.kv_down(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        return self.kv_norm(latent), apply_rotary(rope_key, start, self.rope_theta, self.rope_scaling)

    def expand(self, latent: torch.Tensor, rope_key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-head keys [B,H,S,nope+rope] and values [B,H,S,v] from latents (training and naive decode)."""
        B, S, _ = latent.shape
        kv = self.kv_up(latent).view(B, S, self.n_head, self.nope_dim + self.v_dim).transpose(1, 2)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        k_rope = rope_key.unsqueeze(1).expand(B, self.n_head, S, self.rope_dim)
        return torch.cat((k_nope, k_rope), dim=-1), v

    def forward(self, x: torch.Tensor, cache: LatentCache | None = None, absorb: bool = True) -> torch.Tensor:
        B, T, _ = x.shape
        start = cache.length if cache is not None else 0
        q_nope, q_rope = self.query(x, start)
        latent, rope_key = self.latent(x, start)
        if cache is not None:
            latent, rope_key = cache.update(latent, rope_key)

        if start == 0:
            k, v = self.expand(latent, rope_key)
            q = torch.cat((q_nope, q_rope), dim=-1)
            y = causal_attention_padded(q, k, v, self.scale, self.dropout if self.training else 0.0)
        elif absorb:
            y = self._absorbed_attention(q_nope, q_rope, latent, rope_key, start)
        else:
            k, v = self.expand(latent, rope_key)
            y = attend_cached(torch.cat((q_nope, q_rope), dim=-1), k, v, self.scale, start)

        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.v_dim)
        return self.resid_dropout(self.out_proj(y))

    def _absorbed_attention(self, q_nope: torch.Tensor, q_rope: torch.Tensor, latent: torch.Tensor,
                            rope_key: torch.Tensor, start: int) -> torch.Tensor:
        """Attention computed in latent space; never builds per-head keys or values.

        q_nope . (W_UK c) = (W_UK^T q_nope) . c, so each head's query is moved into latent space once and
        compared with the cached latents directly; likewise sum_s p_s (W_UV c_s) = W_UV (sum_s p_s c_s), so
        values are mixed as latents and W_UV is applied once per query after attention. Per step this costs
        O(S * H * (2r + rope)) instead of the O(S * r * H * (nope + v)) of re-expanding every cached latent.
        Computed in fp32 (operands upcast) so fp16 scores cannot overflow before the softmax.
        Shapes: q_nope [B,H,T,nope], q_rope [B,H,T,rope], latent [B,S,r], rope_key [B,S,rope] -> [B,H,T,v].
        """
        B, H, T, _ = q_nope.shape
        w_uk, w_uv = self.kv_up.weight.view(H, self.nope_dim + self.v_dim, self.kv_lora_rank).split(
            [self.nope_dim, self.v_dim], dim=1)
        q_latent = torch.einsum("bhtn,hnr->bhtr", q_nope.float(), w_uk.float())
        # Heads are folded into the query axis so each product is one batched matmul over the shared cache
        # (broadcasting the cache across heads would copy it H times).
        latent32 = latent.float()
        scores = (q_latent.reshape(B, H * T, -1) @ latent32.transpose(1, 2)
                  + q_rope.float().reshape(B, H * T, -1) @ rope_key.float().transpose(1, 2))
        scores = _mask_future(scores.view(B, H, T, -1) * self.scale, start)
        probs = torch.softmax(scores, dim=-1)
        mixed_latent = (probs.view(B, H * T, -1) @ latent32).view(B, H, T, self.kv_lora_rank)
        y = torch.einsum("bhtr,hvr->bhtv", mixed_latent, w_uv.float())
        return y.to(q_nope.dtype)


class MultiHeadAttention(nn.Module):
    """Multi-head attention with RoPE on the full head dim: the like-for-like baseline for MLA.

    With model.n_kv_head below n_head it is grouped-query attention (GQA; 1 = multi-query, MQA): each key/value
    head serves n_head/n_kv_head consecutive query heads, and the cache holds only the key/value heads. That is
    the baseline TransMLA compares MLA with at an equal KV cache.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.n_kv_head = config.kv_heads
        self.head_dim = config.mha_head_dim
        self.rope_theta = config.rope_theta
        self.rope_scaling = RotaryScaling.from_config(config)
        self.dropout = config.dropout
        self.scale = self.rope_scaling.softmax_scale_factor / math.sqrt(self.head_dim)  # with YaRN's temperature
        # One projection for q, k and v, laid out [q heads | k heads | v heads]: with n_kv_head = n_head this is
        # the fused 3 * n_embd projection of GPT-2.
        self.qkv_proj = nn.Linear(config.n_embd, (self.n_head + 2 * self.n_kv_head) * self.head_dim, bias=config.bias)
        self.out_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def query_key_value(self, x: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rotated queries [B,H,T,d], rotated keys [B,Hkv,T,d] (what the cache stores) and values [B,Hkv,T,d]."""
        B, T, _ = x.shape
        heads = self.qkv_proj(x).view(B, T, self.n_head + 2 * self.n_kv_head, self.head_dim).transpose(1, 2)
        queries_and_keys, v = heads.split([self.n_head + self.n_kv_head, self.n_kv_head], dim=1)
        # One rotation (and one set of angles) for queries and keys together.
        q, k = apply_rotary(queries_and_keys, start, self.rope_theta, self.rope_scaling).split(
            [self.n_head, self.n_kv_head], dim=1)
        return q, k, v

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, absorb: bool = True) -> torch.Tensor:
        """`absorb` is accepted for a uniform block interface; MHA has nothing to absorb."""
        B, T, C = x.shape
        start = cache.length if cache is not None else 0
        q, k, v = self.query_key_value(x, start)
        if cache is not None:
            k, v = cache.update(k, v)
        if start == 0:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale,
                                               enable_gqa=self.n_kv_head < self.n_head,
                                               dropout_p=self.dropout if self.training else 0.0)
        else:
            y = attend_cached(q, k, v, self.scale, start)
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.resid_dropout(self.out_proj(y))


def build_attention(config: ModelConfig) -> MultiHeadLatentAttention | MultiHeadAttention:
    return MultiHeadLatentAttention(config) if config.attention == "mla" else MultiHeadAttention(config)
