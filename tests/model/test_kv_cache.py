"""The caches hold exactly the numbers the formulas promise, and refuse to overflow."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import debug_model_config
from tml.model import Transformer
from tml.model.kv_cache import LatentCache, cache_numbers_per_token, new_layer_cache

MAX_LEN = 16


def allocated_bytes_per_token(cache: list) -> int:
    tensors = [t for layer in cache for t in vars(layer).values() if isinstance(t, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors) // MAX_LEN


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mla_cache_bytes_match_latent_plus_rope_formula(dtype):
    config = debug_model_config()
    model = Transformer(config).to(dtype)
    expected = config.n_layer * (config.kv_lora_rank + config.qk_rope_head_dim) * dtype.itemsize
    assert model.kv_cache_bytes_per_token(dtype) == expected
    assert allocated_bytes_per_token(model.new_cache(1, MAX_LEN)) == expected


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mha_cache_bytes_match_keys_plus_values_formula(dtype):
    config = debug_model_config(attention="mha")
    model = Transformer(config).to(dtype)
    expected = config.n_layer * 2 * config.n_embd * dtype.itemsize
    assert model.kv_cache_bytes_per_token(dtype) == expected
    assert allocated_bytes_per_token(model.new_cache(1, MAX_LEN)) == expected


@pytest.mark.parametrize("n_kv_head", [1, 2])
def test_grouped_query_cache_holds_only_the_key_value_heads(n_kv_head):
    config = debug_model_config(attention="mha", n_kv_head=n_kv_head)
    model = Transformer(config)
    expected = config.n_layer * 2 * n_kv_head * (config.n_embd // config.n_head) * 4
    assert model.kv_cache_bytes_per_token(torch.float32) == expected
    assert allocated_bytes_per_token(model.new_cache(1, MAX_LEN)) == expected


def test_reference_size_mla_cache_is_at_most_a_fifth_of_mha():
    reference = dict(n_layer=12, n_embd=768, n_head=12, kv_lora_rank=256, qk_rope_head_dim=32)
    mla_numbers = cache_numbers_per_token(debug_model_config(**reference))
    mha_numbers = cache_numbers_per_token(debug_model_config(**reference, attention="mha"))
    assert (mla_numbers, mha_numbers) == (288, 1536)
    assert 5 * mla_numbers <= mha_numbers


def test_update_returns_everything_cached_so_far():
    cache = LatentCache(batch_size=1, max_len=MAX_LEN, kv_lora_rank=4, rope_dim=2)
    first, second = torch.randn(1, 3, 4), torch.randn(1, 2, 4)
    cache.update(first, torch.zeros(1, 3, 2))
    latent, _ = cache.update(second, torch.zeros(1, 2, 2))
    assert cache.length == 5
    torch.testing.assert_close(latent, torch.cat((first, second), dim=1))


def test_appending_past_capacity_raises_with_the_sizes():
    cache = new_layer_cache(debug_model_config(attention="mha"), batch_size=1, max_len=4)
    kv = torch.zeros(1, 4, 3, 16)
    cache.update(kv, kv)
    with pytest.raises(ValueError, match="at most 4 positions"):
        cache.update(kv, kv)


def test_truncate_rewinds_the_write_position():
    cache = LatentCache(batch_size=1, max_len=MAX_LEN, kv_lora_rank=4, rope_dim=2)
    cache.update(torch.randn(1, 5, 4), torch.randn(1, 5, 2))
    cache.truncate(2)
    assert cache.length == 2
    with pytest.raises(ValueError, match="truncate"):
        cache.truncate(3)
