"""The fp32 RMSNorm: same result as nn.RMSNorm, safe for fp16 inputs, keeps the input dtype."""

from __future__ import annotations

import torch
from torch import nn

from tml.model.norms import RMSNorm


def test_matches_torch_rmsnorm_in_fp32():
    x = torch.randn(3, 5, 16)
    ours, reference = RMSNorm(16), nn.RMSNorm(16)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
        reference.weight.copy_(ours.weight)
    torch.testing.assert_close(ours(x), reference(x))


def test_fp16_input_whose_squares_overflow_fp16_stays_finite():
    x = torch.full((2, 64), 300.0, dtype=torch.float16)  # 300^2 * 64 far exceeds fp16's 65,504
    out = RMSNorm(64)(x)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out, torch.ones_like(out))


def test_bf16_autocast_input_warns_nothing(recwarn):
    RMSNorm(16)(torch.randn(2, 16, dtype=torch.bfloat16))
    assert not [w for w in recwarn if "Mismatch dtype" in str(w.message)]
