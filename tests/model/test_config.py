"""Every invalid ModelConfig is refused with an error naming the field at fault."""

from __future__ import annotations

import pytest

from tests.conftest import debug_model_config
from tml.model import ModelConfigError

INVALID_FIELDS = [
    ("vocab_size", 0),
    ("block_size", -1),
    ("n_layer", 0),
    ("n_head", 0),
    ("n_embd", 0),
    ("n_embd", 66),  # not divisible by n_head=4
    ("attention", "gqa"),
    ("norm", "sandwich"),
    ("norm_type", "batchnorm"),
    ("mlp", "relu"),
    ("q_lora_rank", -1),
    ("kv_lora_rank", 0),
    ("qk_nope_head_dim", 0),
    ("qk_rope_head_dim", 0),
    ("qk_rope_head_dim", 7),  # RoPE rotates pairs
    ("v_head_dim", -4),
    ("rope_theta", 0.0),
    ("dropout", 1.0),
    ("dropout", -0.1),
    ("n_kv_head", -1),
    ("n_kv_head", 2),  # MLA has no key/value heads to group
]


@pytest.mark.parametrize(("field", "value"), INVALID_FIELDS)
def test_invalid_field_raises_naming_it(field, value):
    with pytest.raises(ModelConfigError, match=f"model.{field}="):
        debug_model_config(**{field: value})


def test_mha_with_odd_head_dim_raises_naming_n_embd():
    with pytest.raises(ModelConfigError, match="model.n_embd="):
        debug_model_config(attention="mha", n_embd=36, n_head=4)  # head dim 9 cannot be rotated in pairs


def test_mla_only_fields_are_not_checked_for_mha():
    debug_model_config(attention="mha", kv_lora_rank=0, qk_rope_head_dim=0)


def test_grouped_query_heads_must_divide_the_query_heads():
    with pytest.raises(ModelConfigError, match="model.n_kv_head=3: must divide n_head=4"):
        debug_model_config(attention="mha", n_kv_head=3)


@pytest.mark.parametrize(("n_kv_head", "kind"), [(0, "MHA"), (4, "MHA"), (2, "GQA"), (1, "MQA")])
def test_attention_kind_names_the_mha_variant_by_its_key_value_heads(n_kv_head, kind):
    config = debug_model_config(attention="mha", n_kv_head=n_kv_head)
    assert (config.attention_kind, config.kv_heads) == (kind, n_kv_head or 4)
    assert debug_model_config().attention_kind == "MLA"


def test_as_many_key_value_heads_as_query_heads_is_stored_as_plain_mha():
    """A sweep over n_kv_head 1, 2, 4 ends at MHA, which must be the same config as n_kv_head 0 (resume, compare)."""
    assert debug_model_config(attention="mha", n_kv_head=4) == debug_model_config(attention="mha")


@pytest.mark.parametrize(("n_embd", "hidden"), [(768, 2048), (64, 192), (1024, 2752), (4096, 10944)])
def test_swiglu_is_two_thirds_of_gelus_width_rounded_up_to_a_multiple_of_64(n_embd, hidden):
    config = debug_model_config(n_embd=n_embd, mlp="swiglu")
    assert config.mlp_hidden_dim == hidden
    assert debug_model_config(n_embd=n_embd).mlp_hidden_dim == 4 * n_embd  # GELU: GPT-2's 4x


def test_the_block_fields_are_read_whatever_the_attention():
    for attention in ("mla", "mha"):
        unread = debug_model_config(attention=attention, mlp="swiglu", norm_type="rmsnorm").unread_fields
        assert "mlp" not in unread and "norm_type" not in unread
