"""RoPE: a norm-preserving rotation whose dot products depend only on the distance between positions; YaRN's
scaling of its frequencies for a longer context."""

from __future__ import annotations

import math

import pytest
import torch

from tml.model.rope import NO_SCALING, RotaryScaling, apply_rotary, rotary_angles

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


# YaRN: a model trained at ORIGINAL tokens read at FACTOR times that. With 32 rotary dims and theta 1e4, pairs 0-1
# turn over 32 times within 512 tokens, pairs 8-15 less than once, pairs 2-7 in between: every kind is present.
DIM, ORIGINAL, FACTOR = 32, 512, 4.0
CPU = torch.device("cpu")


def plain_rope_frequencies(dim: int, theta: float) -> torch.Tensor:
    """RoPE's frequencies as tml computed them before YaRN, written out."""
    return theta ** (-torch.arange(0, dim, 2, dtype=torch.float32) / dim)


@pytest.mark.parametrize("scaling", [NO_SCALING, RotaryScaling(1.0, ORIGINAL, 16.0, 2.0, 0.707)],
                         ids=["default", "factor-1-with-settings"])
def test_without_a_yarn_factor_the_angles_are_bit_identical_to_plain_rope(scaling):
    positions = torch.arange(3, 3 + 40, dtype=torch.float32)
    angles = torch.outer(positions, plain_rope_frequencies(DIM, THETA))
    cos, sin = rotary_angles(DIM, 3, 40, THETA, CPU, scaling)
    assert torch.equal(cos, angles.cos()) and torch.equal(sin, angles.sin())
    x = torch.randn(2, 40, DIM)
    assert torch.equal(apply_rotary(x, 3, THETA, scaling), apply_rotary(x, 3, THETA))


def test_yarn_keeps_fast_pairs_divides_slow_ones_by_the_factor_and_ramps_between():
    """NTK-by-parts: wavelength below L/beta_fast -> the frequency exactly; above L/beta_slow -> frequency / s exactly;
    between -> strictly between the two."""
    scaling = RotaryScaling(FACTOR, ORIGINAL)
    plain = plain_rope_frequencies(DIM, THETA)
    scaled = scaling.inverse_frequencies(DIM, THETA, CPU)
    wavelength = 2 * math.pi / plain
    fast, slow = wavelength < ORIGINAL / scaling.beta_fast, wavelength > ORIGINAL / scaling.beta_slow
    between = ~fast & ~slow
    assert fast.any() and slow.any() and between.sum() >= 4
    assert torch.equal(scaled[fast], plain[fast])
    assert torch.equal(scaled[slow], plain[slow] / FACTOR)
    assert bool(((scaled[between] < plain[between]) & (scaled[between] > plain[between] / FACTOR)).all())


def test_yarn_ramp_is_linear_in_the_pair_index_from_the_last_kept_pair_to_the_first_divided_one():
    scaling = RotaryScaling(FACTOR, ORIGINAL)
    plain = plain_rope_frequencies(DIM, THETA)
    scaled = scaling.inverse_frequencies(DIM, THETA, CPU)
    interpolated = (1 - scaled / plain) / (1 - 1 / FACTOR)  # 0: kept, 1: divided by s
    low, high = scaling.ramp_ends(DIM, THETA)
    assert (low, high) == (1, 8)  # floor and ceil of the pairs turning 32 and 1 times within 512 tokens
    steps = interpolated[low:high + 1].diff()
    torch.testing.assert_close(steps, torch.full_like(steps, 1 / (high - low)))


def test_yarn_stretches_slow_pairs_so_position_s_times_p_turns_as_p_did():
    """Position interpolation on the slow pairs: the longer context reuses the angles the weights were trained on."""
    scaling = RotaryScaling(FACTOR, ORIGINAL)
    slow = slice(8, None)
    cos, _ = rotary_angles(DIM, 0, 4 * ORIGINAL, THETA, CPU, scaling)
    plain_cos, _ = rotary_angles(DIM, 0, ORIGINAL, THETA, CPU)
    torch.testing.assert_close(cos[::4, slow], plain_cos[:, slow])


@pytest.mark.parametrize(("factor", "mscale"), [(4.0, 1.0), (40.0, 0.707), (1.0, 0.707)])
def test_yarn_multiplies_the_softmax_scale_by_its_temperature_squared(factor, mscale):
    temperature = (0.1 * mscale * math.log(factor) + 1) ** 2  # 1 at factor 1
    assert RotaryScaling(factor, ORIGINAL, mscale=mscale).softmax_scale_factor == pytest.approx(temperature, rel=1e-15)


def test_angles_are_remembered_across_layers_and_equal_fresh_ones():
    first = rotary_angles(DIM, 5, 3, THETA, CPU)
    again = rotary_angles(DIM, 5, 3, THETA, CPU)  # the next layer of the same decode step
    assert again[0] is first[0] and again[1] is first[1]
    positions = torch.arange(5, 8, dtype=torch.float32)
    inv_freq = THETA ** (-torch.arange(0, DIM, 2, dtype=torch.float32) / DIM)
    torch.testing.assert_close(first[0], torch.outer(positions, inv_freq).cos())
    assert not first[0].requires_grad


def test_angles_made_in_inference_mode_do_not_reach_a_training_step():
    """tml eval runs under inference_mode; autograd refuses to save an inference tensor for backward."""
    x = torch.randn(2, 6, DIM)
    with torch.inference_mode():
        apply_rotary(x, 0, THETA)
    weight = torch.ones(DIM, requires_grad=True)
    apply_rotary(x * weight, 0, THETA).sum().backward()  # raised "Inference tensors cannot be saved" if shared
    assert weight.grad is not None


def test_compiled_rotation_has_no_graph_break():
    """The memo is skipped under torch.compile, which traces the angles into its graph instead."""
    explained = torch._dynamo.explain(lambda x: apply_rotary(x, 4, THETA))(torch.randn(1, 3, DIM))
    assert explained.graph_break_count == 0 and explained.graph_count == 1
