"""Per-layer inference caches: the MLA latent cache and the MHA key/value cache.

Both preallocate `max_len` positions once, so a decode step writes in place instead of concatenating
(which would copy the whole cache every token). `length` is the number of positions already cached, which is
also the absolute position of the next token: attention reads it to place RoPE correctly.
"""

from __future__ import annotations

import torch

from tml.model.config import ModelConfig


class _PreallocatedCache:
    """Shared bookkeeping: capacity checks and the write cursor."""

    def __init__(self, max_len: int) -> None:
        self.max_len = max_len
        self.length = 0

    def _advance(self, new_tokens: int) -> tuple[int, int]:
        start, end = self.length, self.length + new_tokens
        if end > self.max_len:
            raise ValueError(
                f"KV cache holds at most {self.max_len} positions; appending {new_tokens} after {start} would need {end}"
            )
        self.length = end
        return start, end

    def truncate(self, length: int) -> None:
        """Forget every position from `length` on (reuse a prefilled prefix, e.g. to decode again from it)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of length {self.length} to {length}")
        self.length = length


class LatentCache(_PreallocatedCache):
    """MLA cache: the RMS-normed KV latent and the already rotated shared RoPE key of every token.

    That is kv_lora_rank + qk_rope_head_dim numbers per token per layer; per-head keys and values are never
    stored (the absorbed decode path never even builds them).
    """

    def __init__(self, batch_size: int, max_len: int, kv_lora_rank: int, rope_dim: int,
                 device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__(max_len)
        self.latent = torch.zeros(batch_size, max_len, kv_lora_rank, device=device, dtype=dtype)
        self.rope_key = torch.zeros(batch_size, max_len, rope_dim, device=device, dtype=dtype)

    @staticmethod
    def numbers_per_token(config: ModelConfig) -> int:
        return config.kv_lora_rank + config.qk_rope_head_dim

    def update(self, latent: torch.Tensor, rope_key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append latent [B,T,r] and rope_key [B,T,d]; return views of everything cached so far."""
        start, end = self._advance(latent.shape[1])
        self.latent[:, start:end] = latent
        self.rope_key[:, start:end] = rope_key
        return self.latent[:, :end], self.rope_key[:, :end]


class KVCache(_PreallocatedCache):
    """MHA cache: rotated keys and values of every key/value head, 2 * n_kv_head * head_dim numbers per token per
    layer (2 * n_embd for plain MHA)."""

    def __init__(self, batch_size: int, max_len: int, kv_heads: int, head_dim: int,
                 device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__(max_len)
        self.key = torch.zeros(batch_size, kv_heads, max_len, head_dim, device=device, dtype=dtype)
        self.value = torch.zeros(batch_size, kv_heads, max_len, head_dim, device=device, dtype=dtype)

    @staticmethod
    def numbers_per_token(config: ModelConfig) -> int:
        return 2 * config.kv_heads * config.mha_head_dim

    def update(self, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append key and value [B,Hkv,T,hd]; return views of everything cached so far."""
        start, end = self._advance(key.shape[2])
        self.key[:, :, start:end] = key
        self.value[:, :, start:end] = value
        return self.key[:, :, :end], self.value[:, :, :end]


LayerCache = LatentCache | KVCache
# The dtype an inference cache holds for a run trained at each train.precision: mixed precision computes, and
# would cache, in 16 bits.
PRECISION_CACHE_DTYPE = {"16-mixed": torch.float16, "bf16-mixed": torch.bfloat16, "32-true": torch.float32}


def mha_numbers_per_token(config: ModelConfig) -> int:
    """What MHA of this width caches per token per layer, K and V of every head: the figure MLA, GQA and MQA are
    measured against (from the config alone, even where an MHA of this width could not be built)."""
    return 2 * config.n_embd


def cache_numbers_per_token(config: ModelConfig) -> int:
    """Numbers one layer caches per token for this config's attention kind."""
    return (LatentCache if config.attention == "mla" else KVCache).numbers_per_token(config)


def kv_cache_bytes_per_token(config: ModelConfig, dtype: torch.dtype = torch.bfloat16) -> int:
    """Cache bytes one token costs across all layers; needs only the config, not a built model."""
    return config.n_layer * cache_numbers_per_token(config) * dtype.itemsize


def new_layer_cache(config: ModelConfig, batch_size: int, max_len: int,
                    device: torch.device | None = None, dtype: torch.dtype | None = None) -> LayerCache:
    if config.attention == "mla":
        return LatentCache(batch_size, max_len, config.kv_lora_rank, config.qk_rope_head_dim, device, dtype)
    return KVCache(batch_size, max_len, config.kv_heads, config.mha_head_dim, device, dtype)
