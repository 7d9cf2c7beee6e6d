"""The model's shape. Field names are part of the YAML schema: keep them stable.

Each field's meaning is in ModelConfig's `Attributes:` docstring, which jsonargparse shows in `--help`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

GPT2_PADDED_VOCAB = 50304  # GPT-2's 50,257 tokens rounded up to a multiple of 128 for fast matmuls
MLP_EXPANSION = 4  # GPT-2's hidden width multiple
# SwiGLU's three matrices at 2/3 of GELU's hidden width hold as many parameters as GELU's two; rounded up to a
# multiple, as Llama does, so the matmuls tile onto tensor cores (768 -> 2048 exactly). Llama's 256 suits widths of
# 4096; at tml's small widths 64 tiles as well and adds less (64 -> 192 units, not 256).
SWIGLU_HIDDEN_MULTIPLE = 64
# Fields only MLA reads, and the one only the mha baseline reads (its key/value heads: below n_head, GQA or MQA).
MLA_ONLY = ("kv_lora_rank", "q_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim")
MHA_ONLY = ("n_kv_head",)
# YaRN's settings, read only when rope_yarn_factor is above 1.
YARN_SETTINGS = ("rope_yarn_original_block_size", "rope_yarn_beta_fast", "rope_yarn_beta_slow", "rope_yarn_mscale")
YARN_FIELDS = ("rope_yarn_factor", *YARN_SETTINGS)  # the settings are read only when rope_yarn_factor > 1


class ModelConfigError(ValueError):
    """A model configuration that cannot describe a working transformer."""


@dataclass
class ModelConfig:
    """A decoder-only transformer with Multi-head Latent Attention (MLA) or standard multi-head attention.

    Attributes:
        vocab_size: embedding rows; at least the tokenizer's vocabulary (GPT-2's, padded to a multiple of 128)
        block_size: context length in tokens
        n_layer: transformer blocks
        n_head: attention heads
        n_kv_head: key/value heads of the mha baseline: 0 = n_head (MHA), 1 = multi-query (MQA), a divisor of
            n_head in between = grouped-query (GQA), whose cache is n_kv_head/n_head of MHA's; MLA leaves it 0.
            n_head itself is the same model as 0 and is stored as 0
        n_embd: width of the residual stream
        attention: mla (compressed latent KV cache, DeepSeek-V2) or mha (standard multi-head attention)
        norm: post (the norm after each residual add, as in the original Transformer) or pre (before each sublayer)
        norm_type: layernorm (GPT-2's) or rmsnorm (DeepSeek-V2/V3's and Llama's: no mean, no bias, computed in fp32),
            in every block and, pre-LN, before the output layer
        mlp: gelu (GPT-2's: 4 * n_embd hidden units) or swiglu (DeepSeek-V2/V3's and Llama's gated MLP: 2/3 of
            that width rounded up to a multiple of 64, so about GELU's parameter count: exactly at n_embd 768)
        q_lora_rank: rank of the low-rank query projection; 0 = full-rank query
        kv_lora_rank: width of MLA's compressed key-value latent, the bulk of its KV cache
        qk_nope_head_dim: per-head query/key dims without rotary position (MLA)
        qk_rope_head_dim: per-head query/key dims with rotary position, key part shared across heads (MLA); even
        v_head_dim: per-head value dims (MLA)
        rope_theta: RoPE base; larger stretches the rotary wavelengths
        rope_yarn_factor: YaRN context extension s (Peng et al. 2023; DeepSeek-V2 went from 4K to 128K with it):
            1 = off; above 1, rotary pairs slow enough to matter over rope_yarn_original_block_size tokens turn s
            times slower (NTK-by-parts) and the softmax scale is sharpened (rope_yarn_mscale), so a model trained
            at that length reads s times as many
        rope_yarn_original_block_size: the context the weights were trained at (L), which YaRN's cut-offs are
            measured against; required when rope_yarn_factor is above 1
        rope_yarn_beta_fast: rotary pairs turning more than this many times within L keep their frequency (the
            YaRN paper's beta)
        rope_yarn_beta_slow: pairs turning fewer times than this within L have it divided by rope_yarn_factor (the
            paper's alpha); those between are blended along a linear ramp
        rope_yarn_mscale: coefficient of YaRN's attention temperature: the softmax scale is multiplied by
            (0.1 * mscale * ln(rope_yarn_factor) + 1)^2; 1 = the YaRN paper's, DeepSeek-V2 uses 0.707
        dropout: dropout probability on the embeddings, the attention weights (training forward only) and the
            outputs of attention and of the MLP, as in nanoGPT
        bias: biases in the linear layers and LayerNorms (RMSNorm has none), except MLA's key/value up-projection,
            which never has one (see tml/model/attention.py)
        tie_embeddings: share the token embedding with the output projection
    """

    vocab_size: int = GPT2_PADDED_VOCAB
    block_size: int = 512
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int = 0
    n_embd: int = 768
    attention: Literal["mla", "mha"] = "mla"
    norm: Literal["post", "pre"] = "post"
    norm_type: Literal["layernorm", "rmsnorm"] = "layernorm"
    mlp: Literal["gelu", "swiglu"] = "gelu"
    q_lora_rank: int = 0
    kv_lora_rank: int = 256
    qk_nope_head_dim: int = 64
    qk_rope_head_dim: int = 32
    v_head_dim: int = 64
    rope_theta: float = 10000.0
    rope_yarn_factor: float = 1.0
    rope_yarn_original_block_size: int = 0
    rope_yarn_beta_fast: float = 32.0
    rope_yarn_beta_slow: float = 1.0
    rope_yarn_mscale: float = 1.0
    dropout: float = 0.0
    bias: bool = False
    tie_embeddings: bool = True

    def __post_init__(self) -> None:
        self.validate()
        if self.attention == "mha" and self.n_kv_head == self.n_head:  # one spelling of MHA, for resume and compare
            self.n_kv_head = 0

    def validate(self) -> None:
        def fail(field: str, why: str) -> None:
            raise ModelConfigError(f"model.{field}={getattr(self, field)!r}: {why}")

        for field in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, field) <= 0:
                fail(field, "must be a positive integer")
        if self.attention not in ("mla", "mha"):
            fail("attention", "must be 'mla' or 'mha'")
        if self.norm not in ("post", "pre"):
            fail("norm", "must be 'post' or 'pre'")
        if self.norm_type not in ("layernorm", "rmsnorm"):
            fail("norm_type", "must be 'layernorm' or 'rmsnorm'")
        if self.mlp not in ("gelu", "swiglu"):
            fail("mlp", "must be 'gelu' or 'swiglu'")
        if self.n_embd % self.n_head != 0:
            fail("n_embd", f"must be divisible by n_head={self.n_head}")
        if self.n_kv_head < 0:
            fail("n_kv_head", "must be >= 0 (0 means one key/value head per query head, as in MHA)")
        if self.attention == "mla" and self.n_kv_head != 0:
            fail("n_kv_head", "applies to attention=mha only (grouped-query attention); MLA shares its latent "
                              "across all heads already, so leave it 0")
        if self.attention == "mha" and self.n_kv_head and self.n_head % self.n_kv_head != 0:
            fail("n_kv_head", f"must divide n_head={self.n_head}: each key/value head serves a whole group of "
                              "query heads")
        if self.q_lora_rank < 0:
            fail("q_lora_rank", "must be >= 0 (0 means a full-rank query)")
        if self.rope_theta <= 0:
            fail("rope_theta", "must be positive")
        self._validate_yarn(fail)
        if not 0.0 <= self.dropout < 1.0:
            fail("dropout", "must be in [0, 1)")
        if self.attention == "mla":
            for field in ("kv_lora_rank", "qk_nope_head_dim", "v_head_dim"):
                if getattr(self, field) <= 0:
                    fail(field, "must be a positive integer for MLA")
            if self.qk_rope_head_dim <= 0 or self.qk_rope_head_dim % 2 != 0:
                fail("qk_rope_head_dim", "must be a positive even number (RoPE rotates pairs)")
        else:
            head_dim = self.mha_head_dim
            if head_dim % 2 != 0:
                fail("n_embd", f"gives an odd MHA head dim {head_dim}; RoPE rotates pairs")

    def _validate_yarn(self, fail: Callable[[str, str], None]) -> None:
        for field in YARN_FIELDS:
            if not math.isfinite(getattr(self, field)):
                fail(field, "must be a finite number")
        if self.rope_yarn_factor < 1.0:
            fail("rope_yarn_factor", "must be >= 1 (1 = no YaRN scaling; s > 1 extends the context s times)")
        if self.rope_yarn_original_block_size < 0:
            fail("rope_yarn_original_block_size", "must be >= 0")
        if self.rope_yarn_factor > 1.0 and self.rope_yarn_original_block_size == 0:
            fail("rope_yarn_original_block_size", f"must be set (> 0) with model.rope_yarn_factor="
                                                  f"{self.rope_yarn_factor!r}: the context the weights were trained at")
        if self.rope_yarn_beta_slow <= 0:
            fail("rope_yarn_beta_slow", "must be positive (a number of turns within the original context)")
        if self.rope_yarn_beta_fast <= self.rope_yarn_beta_slow:
            fail("rope_yarn_beta_fast", f"must be above model.rope_yarn_beta_slow={self.rope_yarn_beta_slow!r}: "
                                        "pairs turning faster keep their frequency, slower ones are interpolated")
        if self.rope_yarn_mscale < 0:
            fail("rope_yarn_mscale", "must be >= 0 (0 = no attention temperature)")

    @property
    def mha_head_dim(self) -> int:
        """Per-head width of the mha baseline (MLA sets its head dims by field)."""
        return self.n_embd // self.n_head

    @property
    def mlp_hidden_dim(self) -> int:
        """Hidden units of the MLP: GELU's 4 * n_embd, or SwiGLU's 2/3 of that rounded up (SWIGLU_HIDDEN_MULTIPLE)."""
        if self.mlp == "gelu":
            return MLP_EXPANSION * self.n_embd
        return SWIGLU_HIDDEN_MULTIPLE * -(-2 * MLP_EXPANSION * self.n_embd // (3 * SWIGLU_HIDDEN_MULTIPLE))  # ceil

    @property
    def kv_heads(self) -> int:
        """Key/value heads the mha baseline really has (n_kv_head, or n_head when it is 0)."""
        return self.n_kv_head or self.n_head

    @property
    def unread_fields(self) -> tuple[str, ...]:
        """The other attention kind's fields, which shape nothing here: MLA's ranks for an mha model, n_kv_head
        for an MLA one (tables show them empty, comparisons skip them); and YaRN's settings when it is off."""
        other_kind = MHA_ONLY if self.attention == "mla" else MLA_ONLY
        return other_kind if self.rope_yarn_factor > 1.0 else (*other_kind, *YARN_SETTINGS)

    @property
    def attention_kind(self) -> str:
        """What the attention is called in the literature: MLA, MHA, GQA or MQA."""
        if self.attention == "mla":
            return "MLA"
        return "MHA" if self.kv_heads == self.n_head else "MQA" if self.kv_heads == 1 else "GQA"
