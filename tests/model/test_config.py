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
    ("rope_yarn_factor", 0.5),  # YaRN extends a context; it does not shrink one
    ("rope_yarn_factor", float("inf")),
    ("rope_yarn_original_block_size", -512),
    ("rope_yarn_beta_slow", 0.0),
    ("rope_yarn_beta_fast", 1.0),  # not above beta_slow=1: no pair would keep its frequency
    ("rope_yarn_mscale", -0.707),
    ("rope_yarn_mscale", float("nan")),
]


@pytest.mark.parametrize(("field", "value"), INVALID_FIELDS)
def test_invalid_field_raises_naming_it(field, value):
    with pytest.raises(ModelConfigError, match=f"model.{field}="):
        debug_model_config(**{field: value})


def test_a_yarn_factor_without_the_context_trained_at_is_refused_naming_both():
    with pytest.raises(ModelConfigError, match=r"model.rope_yarn_original_block_size=0: must be set \(> 0\) with "
                                               r"model.rope_yarn_factor=4.0: the context the weights were trained at"):
        debug_model_config(rope_yarn_factor=4.0)
    debug_model_config(rope_yarn_factor=4.0, rope_yarn_original_block_size=8)


def test_yarns_settings_are_unread_while_it_is_off():
    """A sweep over beta_fast with YaRN off would train one model twice; comparisons skip them likewise."""
    off, on = debug_model_config(), debug_model_config(rope_yarn_factor=4.0, rope_yarn_original_block_size=8)
    yarn_settings = {"rope_yarn_original_block_size", "rope_yarn_beta_fast", "rope_yarn_beta_slow", "rope_yarn_mscale"}
    assert yarn_settings <= set(off.unread_fields) and "rope_yarn_factor" not in off.unread_fields
    assert not yarn_settings & set(on.unread_fields)


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
