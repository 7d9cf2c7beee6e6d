"""RoPE: a norm-preserving rotation whose dot products depend only on the distance between positions."""

from __future__ import annotations

import torch

from tml.model.rope import apply_rotary

THETA = 10000.0


def test_rotation_preserves_vector_norm():
    x = torch.randn(2, 3, 10, 8)
    torch.testing.assert_close(apply_rotary(x, 0, THETA).norm(dim=-1), x.norm(dim=-1))


def test_query_key_product_depends_only_on_relative_position():
    q, k = torch.randn(8), torch.randn(8)
    def score(q_pos: int, k_pos: int) -> torch.Tensor:
        return apply_rotary(q.view(1, 8), q_pos, THETA) @ apply_rotary(k.view(1, 8), k_pos, THETA).T
    torch.testing.assert_close(score(5, 2), score(105, 102))
    assert not torch.allclose(score(5, 2), score(5, 3))


def test_offset_start_equals_the_matching_slice_of_a_full_rotation():
    x = torch.randn(1, 12, 6)
    torch.testing.assert_close(apply_rotary(x, 0, THETA)[:, 7:], apply_rotary(x[:, 7:], 7, THETA))


def test_dims_are_paired_rotate_half_style_i_with_i_plus_half():
    """Dim 0 rotates into dim 2 of a 4-dim vector (GPT-NeoX layout), not into dim 1 (DeepSeek's interleaved one)."""
    rotated = apply_rotary(torch.tensor([[[1.0, 0.0, 0.0, 0.0]]]).expand(1, 2, 4), 0, THETA)[0, 1]
    one_radian = torch.tensor(1.0)
    torch.testing.assert_close(rotated, torch.tensor([one_radian.cos(), 0.0, one_radian.sin(), 0.0]))


def test_position_zero_is_identity_and_dtype_is_kept():
    x = torch.randn(4, 6, dtype=torch.bfloat16)
    out = apply_rotary(x, 0, THETA)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out[0], x[0])
