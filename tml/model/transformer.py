"""The decoder-only transformer: blocks, GPT-2 init, loss, cached generation and cost accounting."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from tml.model.attention import build_attention
from tml.model.config import ModelConfig
from tml.model.kv_cache import LayerCache, kv_cache_bytes_per_token, new_layer_cache
from tml.model.norms import RMSNorm

INIT_STD = 0.02  # GPT-2's weight init
IGNORE_INDEX = -1  # targets equal to this do not count in the loss
# Output projections that write into the residual stream: GPT-2 scales their init by 1/sqrt(2 * n_layer) so
# the stream's variance does not grow with depth (each block adds two of them). That is a pre-LN argument; post-LN
# renormalises the stream after every add, and keeps the scaling because the reference setup does. Both MLP forms
# name their output projection fc_out.
RESIDUAL_PROJECTIONS = ("attn.out_proj.weight", "mlp.fc_out.weight")
# Positions per vocabulary projection when a loss is computed without gradients (validation, `tml eval`): their fp32
# logits take this times the vocabulary times 4 bytes (0.4 GB at GPT-2's), however long the window or large the batch.
NO_GRAD_LOSS_CHUNK = 2048


class MLP(nn.Module):
    """GPT-2's MLP, fc_out(gelu(fc_in x)), or SwiGLU's (model.mlp): fc_out(silu(fc_gate x) * fc_in x), where the
    gate decides per hidden unit how much of fc_in's value passes (Shazeer 2020; DeepSeek-V2/V3, Llama)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        hidden = config.mlp_hidden_dim
        self.fc_gate = nn.Linear(config.n_embd, hidden, bias=config.bias) if config.mlp == "swiglu" else None
        self.fc_in = nn.Linear(config.n_embd, hidden, bias=config.bias)
        self.fc_out = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = F.gelu(self.fc_in(x)) if self.fc_gate is None else F.silu(self.fc_gate(x)) * self.fc_in(x)
        return self.dropout(self.fc_out(hidden))


def build_norm(config: ModelConfig) -> nn.Module:
    """A norm over the residual stream of model.norm_type: GPT-2's LayerNorm, or RMSNorm computed in fp32."""
    if config.norm_type == "rmsnorm":
        return RMSNorm(config.n_embd)
    return nn.LayerNorm(config.n_embd, bias=config.bias)


class Block(nn.Module):
    """Attention then MLP, each with a residual; the norm after the residual (post-LN) or before (pre-LN)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.pre_norm = config.norm == "pre"
        self.attn = build_attention(config)
        self.norm_attn = build_norm(config)
        self.mlp = MLP(config)
        self.norm_mlp = build_norm(config)

    def forward(self, x: torch.Tensor, cache: LayerCache | None = None, absorb: bool = True) -> torch.Tensor:
        if self.pre_norm:
            x = x + self.attn(self.norm_attn(x), cache, absorb)
            return x + self.mlp(self.norm_mlp(x))
        x = self.norm_attn(x + self.attn(x, cache, absorb))
        return self.norm_mlp(x + self.mlp(x))


class Transformer(nn.Module):
    """Decoder-only language model with MLA or MHA attention and RoPE positions (no learned position table)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        # Post-LN blocks already end in a norm; pre-LN leaves the residual stream un-normed, so it needs one.
        self.norm_final = build_norm(config) if config.norm == "pre" else nn.Identity()
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        # Recompute each block's activations in backward (train.activation_checkpointing): trades compute for
        # memory without changing a single number, so it is a training setting, not part of the model's shape.
        self.activation_checkpointing = False
        self.apply(self._init_weights)
        residual_std = INIT_STD / math.sqrt(2 * config.n_layer)
        for name, param in self.named_parameters():
            if name.endswith(RESIDUAL_PROJECTIONS):
                nn.init.normal_(param, mean=0.0, std=residual_std)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=INIT_STD)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, *,
                cache: list[LayerCache] | None = None, absorb: bool = True, return_logits: bool = True,
                ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Logits and mean cross-entropy (ignore_index -1).

        With targets, logits cover every position; without, only the last one ([B,1,V]), which is all that
        sampling needs and saves the vocabulary projection of the rest. `cache` (from `new_cache`) makes this
        an incremental step: idx holds only the new tokens and their positions continue the cache; MLA decodes it
        in latent space unless `absorb=False` (the naive expand-then-attend path, kept as the reference).
        `return_logits=False` (training and evaluation) returns (None, loss): Fabric's precision wrapper would
        otherwise copy the [B,T,V] logits to fp32 on the way out, 2 GB per reference micro-batch, for nothing.
        Without gradients it also projects NO_GRAD_LOSS_CHUNK positions at a time, so evaluating a long window never
        holds its whole [T,V] logits (20 GB for 100,000 tokens).
        """
        T = idx.shape[1]
        start = cache[0].length if cache is not None else 0
        if T > self.config.block_size:
            raise ValueError(f"input has {T} tokens but model.block_size is {self.config.block_size}")
        if start + T > self.config.block_size:
            raise ValueError(
                f"{start} cached + {T} new tokens exceed model.block_size={self.config.block_size}"
            )

        x = self.dropout(self.tok_emb(idx))
        recompute = self.activation_checkpointing and cache is None and self.training and torch.is_grad_enabled()
        for layer, block in enumerate(self.blocks):
            if recompute:  # non-reentrant: works under DDP, ZeRO and torch.compile; dropout replays its RNG
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x, cache[layer] if cache is not None else None, absorb)
        x = self.norm_final(x)

        if targets is None:
            return self.lm_head(x[:, -1:, :]), None
        if not return_logits and not torch.is_grad_enabled():
            return None, self._chunked_loss(x, targets)
        logits = self.lm_head(x)
        # fp32 loss: a bf16/fp16 log-softmax over 50k classes loses the small differences training follows.
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE_INDEX)
        return (logits if return_logits else None), loss

    def _chunked_loss(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The mean cross-entropy of forward's loss, from NO_GRAD_LOSS_CHUNK positions' logits at a time."""
        x, targets = x.reshape(-1, x.size(-1)), targets.reshape(-1)
        total = torch.zeros((), dtype=torch.float32, device=x.device)
        for start in range(0, x.size(0), NO_GRAD_LOSS_CHUNK):
            logits = self.lm_head(x[start : start + NO_GRAD_LOSS_CHUNK]).float()
            total += F.cross_entropy(logits, targets[start : start + NO_GRAD_LOSS_CHUNK], ignore_index=IGNORE_INDEX,
                                     reduction="sum")
        return total / (targets != IGNORE_INDEX).sum()  # nan with no counted target, as the mean's is

    def new_cache(self, batch_size: int, max_len: int | None = None) -> list[LayerCache]:
        """One empty cache per layer, on the model's device and in its dtype, for up to max_len positions."""
        max_len = self.config.block_size if max_len is None else max_len
        weight = self.tok_emb.weight
        return [new_layer_cache(self.config, batch_size, max_len, weight.device, weight.dtype)
                for _ in range(self.config.n_layer)]

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, generator: torch.Generator | None = None,
                 absorb: bool = True, vocab_limit: int | None = None) -> torch.Tensor:
        """Extend idx [B,T] by max_new_tokens sampled tokens using the KV cache; returns [B, T+max_new_tokens].

        temperature 0 means greedy decoding. Prompt plus new tokens must fit in block_size: RoPE positions past
        it were never trained, and cropping the context would invalidate the cached positions, so it raises.
        Dropout follows the module's mode, as in nanoGPT: call model.eval() first. `vocab_limit` (the tokenizer's
        vocabulary, 50,257 for GPT-2) keeps the padding rows of the embedding from ever being sampled: their ids
        decode to nothing, and a high temperature gives them real probability.
        """
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 0")
        total = idx.shape[1] + max_new_tokens
        if total > self.config.block_size:
            raise ValueError(
                f"prompt of {idx.shape[1]} tokens + max_new_tokens={max_new_tokens} = {total} exceeds "
                f"model.block_size={self.config.block_size}"
            )
        check_sampling_args(temperature, top_k, top_p, vocab_limit)
        if max_new_tokens == 0:
            return idx
        cache = self.new_cache(idx.shape[0], total)
        logits, _ = self(idx, cache=cache, absorb=absorb)
        for step in range(max_new_tokens):
            next_token = sample_next_token(logits[:, -1, :], temperature, top_k, top_p, generator, vocab_limit)
            idx = torch.cat((idx, next_token), dim=1)
            if step + 1 < max_new_tokens:
                logits, _ = self(next_token, cache=cache, absorb=absorb)
        return idx

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; non_embedding drops the token table (a lookup, no FLOPs). A tied lm_head goes with it."""
        total = sum(p.numel() for p in self.parameters())  # parameters() yields a tied tensor once
        return total - self.tok_emb.weight.numel() if non_embedding else total

    def kv_cache_bytes_per_token(self, dtype: torch.dtype = torch.bfloat16) -> int:
        """Cache bytes one token costs across all layers (MLA: latent + RoPE key; MHA: K and V)."""
        return kv_cache_bytes_per_token(self.config, dtype)

    def flops_per_token(self) -> int:
        """Training FLOPs per token (forward + backward) at full context, for MFU.

        6 * N for the matmuls of N weights (2 forward, 4 backward), with N the non-embedding parameters plus the
        lm_head when tied (its matmul runs even though its weights are the embedding table). Attention adds,
        per layer and per token over a context of T = block_size keys, 2*H*T*d_qk for q.k and 2*H*T*d_v for
        attn.v forward, times 3 for the backward: 6 * L * H * T * (d_qk + d_v). MHA: d_qk = d_v = n_embd/n_head
        (PaLM's 12 * L * H * d * T); MLA: d_qk = qk_nope_head_dim + qk_rope_head_dim, d_v = v_head_dim.
        Causal masking is ignored, as in the PaLM and nanoGPT conventions. MLA's SDPA call pads v to the query/key
        width for the fused kernels (tml/model/attention.py); that padding is not useful work and is not counted
        (at the reference shape it would add 1.8% to the total).
        """
        c = self.config
        matmul_params = self.num_params(non_embedding=True)
        if c.tie_embeddings:
            matmul_params += self.lm_head.weight.numel()
        if c.attention == "mla":
            qk_dim, v_dim = c.qk_nope_head_dim + c.qk_rope_head_dim, c.v_head_dim
        else:
            qk_dim = v_dim = c.mha_head_dim
        attention = 6 * c.n_layer * c.n_head * c.block_size * (qk_dim + v_dim)
        return 6 * matmul_params + attention


def check_sampling_args(temperature: float, top_k: int | None, top_p: float | None,
                        vocab_limit: int | None = None) -> None:
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature={temperature} must be a number >= 0 (0 means greedy)")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k={top_k} must be >= 1 (or None to disable)")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p={top_p} must be in (0, 1] (or None to disable)")
    if vocab_limit is not None and vocab_limit < 1:
        raise ValueError(f"vocab_limit={vocab_limit} must be >= 1 (or None for every row of the embedding)")


def sample_next_token(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                      top_p: float | None = None, generator: torch.Generator | None = None,
                      vocab_limit: int | None = None) -> torch.Tensor:
    """One token per row of logits [B,V] -> [B,1]: ids from vocab_limit on dropped, then temperature, top-k and
    nucleus (top-p) filtering."""
    check_sampling_args(temperature, top_k, top_p, vocab_limit)
    if vocab_limit is not None:
        logits = logits[:, :vocab_limit]  # a view: the ids kept are the row's first ones, so they stay the same
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth_largest = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        sorted_probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p; the most likely one always stays.
        drop_sorted = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)
