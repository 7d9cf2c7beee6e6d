"""What a model's attention does, layer by layer: how much of its KV cache it uses, how large its logits grow and
how spread its attention is, measured on a batch of text.

These are the curves MLA studies plot over training: the singular spectrum of the cached latent (TransMLA,
MHA2MLA; a kv_lora_rank sweep asks how much of the latent is used), the largest attention logit (Kimi K2's
"MaxLogit", which grows without bound in MLA without QK-Clip) and the attention entropy. The scores are recomputed
from each attention module's own projections rather than read out of its forward pass, so training's fused
attention stays as it is; tests/model/test_diagnostics.py checks the recomputed attention reproduces the module's
output, so the numbers are about the attention the model really runs.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from tml.model.attention import MultiHeadAttention, MultiHeadLatentAttention
from tml.model.transformer import Transformer

Attention = MultiHeadLatentAttention | MultiHeadAttention


@dataclass(frozen=True)
class LayerStatistics:
    """One layer's attention on a batch.

    cache_effective_rank: the effective rank of what the layer caches per token (centred; see cache_matrix), out of
        cache_width columns. MLA: its latent, without the shared RoPE key; MHA/GQA/MQA: keys and values.
    max_logit: the largest pre-softmax score q.k * scale over heads, windows and causal positions.
    mean_entropy: attention entropy in nats, averaged over heads, windows and query positions (query t attends over
        t+1 keys, so it is at most ln(t+1); the first query's is always 0).
    """

    layer: int
    cache_effective_rank: float
    cache_width: int
    max_logit: float
    mean_entropy: float

    @property
    def cache_rank_fraction(self) -> float:
        return self.cache_effective_rank / self.cache_width


def effective_rank(matrix: torch.Tensor) -> float:
    """exp of the Shannon entropy of the normalised singular values (Roy & Vetterli, 2007); 0 for a zero matrix.

    Unlike a count of singular values above a threshold it needs no tolerance and moves smoothly as a spectrum
    flattens: k equal singular values give exactly k, a dominant one pulls it towards 1. Computed in float64 on the
    CPU so that bf16 or fp16 activations lose nothing in the decomposition.
    """
    return spectrum_effective_rank(torch.linalg.svdvals(matrix.detach().to(device="cpu", dtype=torch.float64)))


def spectrum_effective_rank(singular_values: torch.Tensor) -> float:
    """effective_rank from the singular values themselves."""
    total = singular_values.sum()
    if total == 0:
        return 0.0
    p = singular_values / total
    return math.exp(torch.special.entr(p).sum().item())


def cache_matrix(attn: Attention, x: torch.Tensor) -> torch.Tensor:
    """What the layer caches for each of the B*T tokens of x [B,T,C], one token a row, columns centred (cache_rows)."""
    rows = cache_rows(attn, x)
    return rows - rows.mean(dim=0, keepdim=True)


def cache_rows(attn: Attention, x: torch.Tensor) -> torch.Tensor:
    """What the layer caches for each of the B*T tokens of x [B,T,C], one token a row, in fp32.

    MLA: the normed latent [B*T, kv_lora_rank], as the cache stores it. Its shared RoPE key (qk_rope_head_dim per
    token) is left out: it is a separate, fixed-width part of the cache that rotates with position, and the question
    is how much of the kv_lora_rank the model uses. MHA/GQA/MQA: the keys (rotated, as cached) and values of the kv
    heads [B*T, 2 * n_kv_head * head_dim]. Both are linear maps of the layer's n_embd-wide input, so a latent or the
    values use at most n_embd dimensions; only RoPE's rotation, different at each position, lets keys exceed it.
    Centred as in PCA: a direction every token shares (an offset, the norm's gain on a constant component) carries
    no information about which token was read, and would otherwise count as a used dimension.
    """
    B, T, _ = x.shape
    if isinstance(attn, MultiHeadLatentAttention):
        latent, _ = attn.latent(x, 0)
        rows = latent.reshape(B * T, -1)
    else:
        _, k, v = attn.query_key_value(x, 0)
        rows = torch.cat((k, v), dim=1).transpose(1, 2).reshape(B * T, -1)
    return rows.float()


def attention_scores(attn: Attention, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pre-softmax scores [B,H,T,T] in fp32 with future keys at -inf, and each query head's values [B,H,T,dv].

    Built from the module's own pieces over the whole window of x [B,T,C] from position 0, as its forward does
    without a cache; q and k are upcast before the product, as the module's cached path does.
    """
    T = x.shape[1]
    if isinstance(attn, MultiHeadLatentAttention):
        q_nope, q_rope = attn.query(x, 0)
        k, v = attn.expand(*attn.latent(x, 0))
        q = torch.cat((q_nope, q_rope), dim=-1)
    else:
        q, k, v = attn.query_key_value(x, 0)
        group = attn.n_head // attn.n_kv_head  # kv head j serves query heads j*group .. (j+1)*group-1
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = (q.float() @ k.float().transpose(-2, -1)) * attn.scale
    future = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)
    return scores.masked_fill(future, float("-inf")), v


# Windows per forward pass: the layer inputs held at once, whatever the number of windows asked for. The cache's
# spectrum is gathered as a width x width Gram matrix, so memory does not grow with the windows either.
WINDOWS_PER_PASS = 8


class LayerAccumulator:
    """One layer's statistics gathered over batches of windows: the cache's centred Gram matrix (whose eigenvalues are
    the squared singular values of the centred cache matrix), the largest logit and the entropy sum."""

    def __init__(self, layer: int) -> None:
        self.layer = layer
        self.gram: torch.Tensor | None = None
        self.row_sum: torch.Tensor | None = None
        self.rows = 0
        # Kept on the device as tensors: reading each window's to the host would wait for the GPU every time.
        self.max_logit: torch.Tensor | None = None
        self.entropy_sum: torch.Tensor | None = None
        self.windows = 0

    def add(self, attn: Attention, x: torch.Tensor) -> None:
        """Take in the attention's input x [B,T,C]; scores one window at a time (H*T*T of them in memory)."""
        for window in x.split(1):
            scores, _ = attention_scores(attn, window)
            largest = scores.max()  # -inf entries are masked, never the max
            entropy = torch.special.entr(torch.softmax(scores, dim=-1)).sum(dim=-1).mean()
            self.max_logit = largest if self.max_logit is None else torch.maximum(self.max_logit, largest)
            self.entropy_sum = entropy if self.entropy_sum is None else self.entropy_sum + entropy
            self.windows += 1
        rows = cache_rows(attn, x).to(device="cpu", dtype=torch.float64)
        gram, row_sum = rows.T @ rows, rows.sum(dim=0)
        self.gram = gram if self.gram is None else self.gram + gram
        self.row_sum = row_sum if self.row_sum is None else self.row_sum + row_sum
        self.rows += rows.shape[0]

    def result(self) -> LayerStatistics:
        centred = self.gram - torch.outer(self.row_sum, self.row_sum) / self.rows  # sum of (r - mean)(r - mean)^T
        singular_values = torch.linalg.eigvalsh(centred).clamp(min=0).sqrt()
        return LayerStatistics(layer=self.layer, cache_effective_rank=spectrum_effective_rank(singular_values),
                               cache_width=self.gram.shape[0], max_logit=self.max_logit.item(),
                               mean_entropy=self.entropy_sum.item() / self.windows)


def layer_statistics(attn: Attention, x: torch.Tensor, layer: int = 0) -> LayerStatistics:
    """The statistics of one attention module on its input x [B,T,C]."""
    accumulator = LayerAccumulator(layer)
    accumulator.add(attn, x)
    return accumulator.result()


def attention_statistics(model: Transformer, idx: torch.Tensor,
                         windows_per_pass: int = WINDOWS_PER_PASS) -> list[LayerStatistics]:
    """Each layer's LayerStatistics on the windows idx [B,T], `windows_per_pass` at a time."""
    return attention_statistics_over(model, idx.split(windows_per_pass))


def attention_metrics(statistics: list[LayerStatistics]) -> dict[str, float]:
    """The statistics as logger scalars: attention/max_logit (the largest over layers, Kimi K2's MaxLogit) and, per
    layer, attention/max_logit/layer_NN, attention/entropy/layer_NN and attention/cache_rank/layer_NN (the cache's
    effective rank, out of its width)."""
    metrics = {"attention/max_logit": max(layer.max_logit for layer in statistics)}
    for layer in statistics:
        metrics[f"attention/max_logit/layer_{layer.layer:02d}"] = layer.max_logit
        metrics[f"attention/entropy/layer_{layer.layer:02d}"] = layer.mean_entropy
        metrics[f"attention/cache_rank/layer_{layer.layer:02d}"] = layer.cache_effective_rank
    return metrics


@torch.no_grad()
def attention_statistics_over(model: Transformer, batches: Iterable[torch.Tensor]) -> list[LayerStatistics]:
    """Each layer's LayerStatistics over batches of windows [b,T] (made as they are read, so a caller need not hold
    them all): full-context forwards (no cache) in eval mode.

    Each block's attention input is caught by a forward pre-hook on block.attn, which is the residual stream in a
    post-LN block and its normed copy in a pre-LN one; the hooks are removed, and the model's mode restored, after.
    """
    accumulators = [LayerAccumulator(layer) for layer in range(len(model.blocks))]

    def taker(accumulator: LayerAccumulator, attn: nn.Module):
        return lambda module, args: accumulator.add(attn, args[0])

    was_training = model.training
    hooks = [block.attn.register_forward_pre_hook(taker(accumulator, block.attn))
             for accumulator, block in zip(accumulators, model.blocks, strict=True)]
    try:
        model.eval()
        for windows in batches:
            model(windows)
        return [accumulator.result() for accumulator in accumulators]
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
