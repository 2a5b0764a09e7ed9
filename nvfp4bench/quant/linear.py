"""NVFP4 Linear and attention matmul: the emulator's token-GEMM layers.

The three GEMMs and the roles of their operands are described in ``roles.py``; a Linear runs
them on (M, K) tokens, an attention matmul on a batch of them.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from nvfp4bench.quant.autograd import (QuantizedLayer, check_generator, fp32_region,
                                       in_compute_dtype, resolve_recipe, save_operands)
from nvfp4bench.quant.gemm import bias_grad, gemm
from nvfp4bench.quant.nvfp4 import padded_tokens
from nvfp4bench.quant.recipes import Recipe
from nvfp4bench.quant.formats import Format, get_format
from nvfp4bench.quant.roles import ROW_BLOCK, Op, Roles


class QuantizedLinearFunction(torch.autograd.Function):
    """Y = X W^T (+ b) with NVFP4 operands. x (..., M, K), w (..., N, K) (2-D for a Linear,
    batched for a matmul), K and N multiples of 16; M any."""

    @staticmethod
    def forward(ctx, x, w, bias, op: Op):
        with fp32_region(x.device):
            # --- fprop ---
            # fprop: Y (..., M, N) = Q(X) (..., M, K) @ Q_w(W)^T (..., K, N)
            if w.dim() == 2:  # a Linear: X and W quantized in one call
                xq, wq = op.roles.forward_operands(x, w)
            else:  # an attention matmul: batched operands
                xq, wq = op.roles.activation(x), op.roles.weight(w)
            y = gemm(xq, wq)
            if bias is not None:
                y += bias.float()
        save_operands(ctx, op, x, xq, w, wq)
        ctx.op, ctx.has_bias, ctx.dtypes = op, bias is not None, (x.dtype, w.dtype)
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        op, policy, roles = ctx.op, ctx.op.policy, ctx.op.roles
        x_saved, w_saved = ctx.saved_tensors
        check_generator(op, dy.device)
        dx = dw = db = None
        with fp32_region(dy.device):
            if ctx.needs_input_grad[0]:
                # --- dgrad ---
                # dgrad: dX (..., M, K) = B(dY) (..., M, N) @ D(W) (..., K, N)^T
                from_fwd = policy.reads_forward_w(roles)
                g, wd = policy.dgrad_operands(roles, dy, None if from_fwd else w_saved,
                                              w_saved if from_fwd else None)
                dx = gemm(g, wd).to(ctx.dtypes[0])
            if ctx.needs_input_grad[1]:
                # --- wgrad ---
                # wgrad: dW (..., N, K) = B(dY^T) (..., N, Mp) @ A(X^T) (..., K, Mp)^T
                n, k = dy.shape[-1], x_saved.shape[-1]
                g_spec, a_spec = policy.wgrad_columns(roles)
                gt = g_spec.of_tokens(dy, roles.generator)
                xt = a_spec.of_tokens(x_saved, roles.generator)
                batch = dy.shape[:-2]
                dw = gemm(gt.view(*batch, n, -1), xt.view(*batch, k, -1)).to(ctx.dtypes[1])
            if ctx.has_bias and ctx.needs_input_grad[2]:
                db = bias_grad(dy.reshape(-1, dy.shape[-1]))
        return dx, dw, db, None


class QuantizedLinear(QuantizedLayer):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (x, b), w = in_compute_dtype(x, self.bias), self.weight
        y = QuantizedLinearFunction.apply(x.reshape(-1, x.shape[-1]), w, b, self.op)
        return y.view(*x.shape[:-1], w.shape[0])


# --------------------------------------------------------------------------------------------
# Attention matmuls (opt-in extension)
# --------------------------------------------------------------------------------------------
def _pad_last(t: torch.Tensor, dims: tuple[int, int]) -> torch.Tensor:
    """Zero-pad the last two dims of t up to multiples of 16 where ``dims`` says (rows, cols)."""
    pr = padded_tokens(t.shape[-2]) - t.shape[-2] if dims[0] else 0
    pc = padded_tokens(t.shape[-1]) - t.shape[-1] if dims[1] else 0
    return F.pad(t, (0, pc, 0, pr)) if pr or pc else t


class QuantizedMatmul(nn.Module):
    """``a @ b`` for (..., M, K) @ (..., K, N) (batch dims broadcast) as NVFP4 GEMMs.

    The Linear's three GEMMs with X = a and W = b^T, where b is an activation: fprop a rowwise
    along K and b along K (columnwise), both RN 1x16; dgrad B(dY) D(b^T) with D a fresh 1x16
    copy of b along N (or, per recipe, b's forward copy / b itself); wgrad (db) from columnwise
    copies of dY and a along M (RHT/SR per recipe). K and N not multiples of 16 (e.g. 257 tokens
    with a CLS) are zero-padded, which is exact: a padded block has the same amax and values.
    One tensor amax per operand over all its batch matrices.
    """

    def __init__(self, recipe: Recipe | str, *, generator: torch.Generator | None = None,
                 kernels: str = "eager", format: str | Format | None = None):
        super().__init__()
        recipe = resolve_recipe(recipe, generator, "QuantizedMatmul")
        if not recipe.quantized:
            raise ValueError(f"QuantizedMatmul: recipe {recipe.name!r} quantizes nothing; "
                             f"use Matmul")
        self.op = Op(Roles(recipe, generator, ROW_BLOCK, kernels, get_format(format)),
                     "QuantizedMatmul")

    def extra_repr(self) -> str:
        fmt = self.op.roles.format
        return f"recipe={self.op.roles.recipe.name}" + (
            "" if fmt.is_nvfp4 else f", format={fmt.name}")

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if a.dim() < 2 or b.dim() < 2:
            raise ValueError(f"QuantizedMatmul: expected (..., M, K) @ (..., K, N), got "
                             f"{tuple(a.shape)} @ {tuple(b.shape)}")
        a, b = in_compute_dtype(a, b)
        (m, k), n = a.shape[-2:], b.shape[-1]
        batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
        a3 = _pad_last(a.expand(*batch, m, k).reshape(-1, m, k), (False, True))
        b3 = _pad_last(b.expand(*batch, k, n).reshape(-1, k, n), (True, True))
        y = QuantizedLinearFunction.apply(a3, b3.mT, None, self.op)  # (B, M, Np)
        return y[..., :n].reshape(*batch, m, n)
