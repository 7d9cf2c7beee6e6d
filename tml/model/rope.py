"""Rotary position embedding (RoPE) in the rotate-half layout of GPT-NeoX and Llama: dim i pairs with i + dim/2.

DeepSeek-V2/V3 store their RoPE dims interleaved (2i pairs with 2i+1). It is the same rotation once the RoPE rows
of the query and key projections are permuted, which loading DeepSeek weights into tml would have to do.

The angles are computed on the fly in fp32 from the absolute positions instead of being stored as buffers:
a buffer would be cast to bf16/fp16 with the model (`model.to(dtype)`) and lose the precision that long
positions need, and recomputing dim/2 frequencies per call costs nothing next to attention.
"""

from __future__ import annotations

import torch


def rotary_angles(dim: int, start: int, length: int, theta: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape [length, dim/2] for positions start .. start+length-1, in fp32."""
    inv_freq = theta ** (-torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim)
    positions = torch.arange(start, start + length, device=device, dtype=torch.float32)
    angles = torch.outer(positions, inv_freq)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, start: int, theta: float) -> torch.Tensor:
    """Rotate the last dim of x [..., T, dim] as positions start .. start+T-1; returns x's dtype.

    Pairs are (i, i + dim/2). Rotating in fp32 keeps bf16 keys exact up to the final cast, so a key rotated
    once into the cache equals the same key rotated inside a full forward pass.
    """
    length, dim = x.shape[-2], x.shape[-1]
    cos, sin = rotary_angles(dim, start, length, theta, x.device)
    x1, x2 = x.float().chunk(2, dim=-1)
    rotated = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return rotated.to(x.dtype)
