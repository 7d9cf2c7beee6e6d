"""Rotary position embedding (RoPE) in the rotate-half layout of GPT-NeoX and Llama: dim i pairs with i + dim/2.

DeepSeek-V2/V3 store their RoPE dims interleaved (2i pairs with 2i+1). It is the same rotation once the RoPE rows
of the query and key projections are permuted, which loading DeepSeek weights into tml would have to do.

The angles are computed in fp32 from the absolute positions instead of being stored as buffers: a buffer would
be cast to bf16/fp16 with the model (`model.to(dtype)`) and lose the precision that long positions need. The
last few tables are remembered instead (rotary_angles).

YaRN (Peng et al. 2023) extends a trained context L by a factor s, as DeepSeek-V2 did from 4K to 128K on MLA's
shared RoPE key: "NTK-by-parts" interpolation of the frequencies (RotaryScaling) plus a softmax temperature.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from tml.model.config import ModelConfig

# YaRN's attention temperature: sqrt(1/t) = YARN_TEMPERATURE_SLOPE * mscale * ln(s) + 1, the slope the paper fitted
# on LLaMA's perplexity at extended contexts (mscale 1); DeepSeek-V2 keeps the form with mscale 0.707.
YARN_TEMPERATURE_SLOPE = 0.1
# Angle tables kept by rotary_angles: a few (start, length) pairs are all a forward pass, a decode step or a
# validation uses at a time, and each is [length, dim/2] fp32.
RECENT_ANGLES = 8


@dataclass(frozen=True)
class RotaryScaling:
    """YaRN's NTK-by-parts frequencies for a context `factor` times the `original_length` the model was trained at.

    A pair that turns many times within L (more than beta_fast) has learnt local, relative offsets: its frequency is
    kept, since interpolating it would crowd neighbouring tokens together. A pair that turns less than beta_slow
    times has only ever seen part of a turn, an absolute position signal: its frequency is divided by the factor
    (position interpolation), so positions up to s * L stay within the angles it was trained on. Pairs between
    blend the two along a linear ramp in the pair index, whose ends are the cut-offs rounded outwards (floor and
    ceil), as in the YaRN reference code and DeepSeek-V2's: so tml's angles equal theirs.

    The default, factor 1, is plain RoPE.
    """

    factor: float = 1.0
    original_length: int = 0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0

    @classmethod
    def from_config(cls, config: ModelConfig) -> RotaryScaling:
        return cls(config.rope_yarn_factor, config.rope_yarn_original_block_size, config.rope_yarn_beta_fast,
                   config.rope_yarn_beta_slow, config.rope_yarn_mscale)

    @property
    def active(self) -> bool:
        return self.factor > 1.0

    @property
    def softmax_scale_factor(self) -> float:
        """What the softmax scale is multiplied by: (0.1 * mscale * ln s + 1)^2, 1 without scaling.

        Interpolated angles make attention more uniform (its entropy rises with the context); YaRN sharpens it back
        by scaling q and k each by 0.1 ln s + 1, i.e. the logits by its square. DeepSeek-V2 applies it to the whole
        softmax scale (its mscale_all_dim), nope dims included, which is what this factor is for.
        """
        if not self.active:
            return 1.0
        return (YARN_TEMPERATURE_SLOPE * self.mscale * math.log(self.factor) + 1.0) ** 2

    def ramp_ends(self, dim: int, theta: float) -> tuple[int, int]:
        """The pair indices where the ramp starts (last kept pair) and ends (first fully interpolated pair).

        Pair i has wavelength 2 pi theta^(2i/dim), so it turns r = L / wavelength times within L; solving for i
        gives the pair that turns exactly r times.
        """
        def pair_index_turning(rotations: float) -> float:
            return dim * math.log(self.original_length / (2 * math.pi * rotations)) / (2 * math.log(theta))

        # Clamped as DeepSeek-V2's yarn_find_correction_range clamps them (to dim - 1, not dim/2 - 1).
        low = max(math.floor(pair_index_turning(self.beta_fast)), 0)
        return low, min(math.ceil(pair_index_turning(self.beta_slow)), dim - 1)

    def inverse_frequencies(self, dim: int, theta: float, device: torch.device) -> torch.Tensor:
        """The dim/2 rotary frequencies (radians per position) in fp32; plain RoPE's when the factor is 1."""
        inv_freq = theta ** (-torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim)
        if not self.active:
            return inv_freq
        low, high = self.ramp_ends(dim, theta)
        pair = torch.arange(dim // 2, device=device, dtype=torch.float32)
        interpolated = ((pair - low) / max(high - low, 1)).clamp(0.0, 1.0)  # 0: kept, 1: divided by the factor
        # Written as a blend whose weights are exactly 0 or 1 at the ends, so kept pairs keep their frequency and
        # interpolated ones get exactly frequency / s.
        return inv_freq * (1.0 - interpolated) + (inv_freq / self.factor) * interpolated


NO_SCALING = RotaryScaling()


def rotary_angles(dim: int, start: int, length: int, theta: float, device: torch.device,
                  scaling: RotaryScaling = NO_SCALING) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape [length, dim/2] for positions start .. start+length-1, in fp32.

    Eagerly, the last few results are kept: every layer's query and key rotate by the same positions, and decoding
    a token otherwise launched some 200 small kernels on a GPU to compute them again (12 layers, twice each).
    Under torch.compile they are computed in the graph, which fuses them; inference-mode tensors are kept apart, as
    autograd refuses them in a later training step.
    """
    if torch.compiler.is_compiling():
        return _angles(dim, start, length, theta, device, scaling)
    return _recent_angles(dim, start, length, theta, device, scaling, torch.is_inference_mode_enabled())


def _angles(dim: int, start: int, length: int, theta: float, device: torch.device,
            scaling: RotaryScaling) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = scaling.inverse_frequencies(dim, theta, device)
    positions = torch.arange(start, start + length, device=device, dtype=torch.float32)
    angles = torch.outer(positions, inv_freq)
    return angles.cos(), angles.sin()


@functools.lru_cache(maxsize=RECENT_ANGLES)
def _recent_angles(dim: int, start: int, length: int, theta: float, device: torch.device, scaling: RotaryScaling,
                   inference_mode: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """_angles, remembered; `inference_mode` is part of the key only (the caller's mode, which made the tensors)."""
    with torch.no_grad():
        return _angles(dim, start, length, theta, device, scaling)


def apply_rotary(x: torch.Tensor, start: int, theta: float, scaling: RotaryScaling = NO_SCALING) -> torch.Tensor:
    """Rotate the last dim of x [..., T, dim] as positions start .. start+T-1; returns x's dtype.

    Pairs are (i, i + dim/2). Rotating in fp32 keeps bf16 keys exact up to the final cast, so a key rotated
    once into the cache equals the same key rotated inside a full forward pass.
    """
    length, dim = x.shape[-2], x.shape[-1]
    cos, sin = rotary_angles(dim, start, length, theta, x.device, scaling)
    x1, x2 = x.float().chunk(2, dim=-1)
    rotated = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return rotated.to(x.dtype)
