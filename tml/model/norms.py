"""RMSNorm that always normalises in fp32."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

RMS_NORM_EPS = 1e-6  # DeepSeek-V2/V3's; nn.RMSNorm's default (the dtype's machine epsilon) is 1.2e-7 in fp32


class RMSNorm(nn.RMSNorm):
    """nn.RMSNorm computed in fp32 and cast back to the input's dtype.

    Under autocast the MLA latents arrive in bf16/fp16 while the norm weight stays fp32; torch then falls back
    to an unfused kernel (with a warning), and a fp16 sum of squares can overflow. Upcasting fixes both. Still
    an nn.RMSNorm, so optimizer grouping by module type keeps it out of weight decay.
    """

    def __init__(self, normalized_shape: int, eps: float = RMS_NORM_EPS) -> None:
        super().__init__(normalized_shape, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.float() if self.weight is not None else None
        return F.rms_norm(x.float(), self.normalized_shape, weight, self.eps).to(x.dtype)
