"""``Matmul``: ``torch.matmul(a, b)`` as a plain layer of its own.

The models write their attention matmuls (``q @ k^T``, ``attn @ v``) as ``Matmul`` modules so
that they can be instrumented, or swapped for ``linear.QuantizedMatmul`` by the quantization
swap (``quantize_attention``). It imports nothing of nvfp4bench: a model that uses it depends on
a plain layer, not on the quantizer.
"""
from __future__ import annotations

import torch
import torch.nn as nn


class Matmul(nn.Module):
    """``torch.matmul(a, b)`` as a module, so that a model's attention matmuls can be swapped."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.matmul(a, b)
