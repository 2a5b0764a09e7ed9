"""NVFP4 Conv2d and ConvTranspose2d: the emulator's convolution layers.

Convolutions (docs/nvfp4.md section 6): the GEMMs of an NHWC implicit-GEMM kernel, summed tap by
tap (``gemm.py``, ``taps.py``), K = (kh, kw, C_in) with C_in fastest:
- Conv2d fprop: X is quantized along C per pixel (a 1x16 block of im2col(X) is 16 channels of
  one pixel; tensor amax), W viewed as [C_out, kh*kw*C_in] (1x16 along C_in per tap, or 16x16
  (C_out, C_in) tiles per tap); ``Y = sum_t im2col_t(Q(X)) Q_w(W_t)^T``. The zero padding is
  never materialised: a padding pixel's block is all zeros, which quantize to zeros, so tap t's
  (M, C_in) matrix is gathered from the unpadded Q(X) with zeros where it reads padding
  (``ConvGeometry.window``). Only one tap of im2col exists at a time, in one reused buffer.
- Conv2d dgrad: ``dX = sum_t col2im_t(B(dY) D(W)_t)``, dY along C_out per pixel, D(W) along
  C_out; each tap's product is scatter-added, in tap order, into the unpadded dX (the parts
  that fall on padding are dropped, as cropping a padded result would).
- Conv2d wgrad: ``dW_t = B(dY^T) A(im2col_t(X)^T)^T`` per tap: the columnwise copies (and RHT
  tiles) of im2col(X) run along its token axis, so X is unfolded into tokens-last fp32 buffers,
  ``taps.unfold_chunk_bytes`` at a time (4 MiB on the CPU, 256 MiB on a GPU). All taps are one
  tensor with one amax: amax(X) (also when some pixels are in no tap), or with the RHT the amax
  of the rotated im2col(X)^T over all taps (from a first pass over the chunks when there are
  several). With RN, taps that read the same input rows shifted by whole output rows (for k4
  s2: rows i and i + 2) hold the same 16-token blocks when the output width is a multiple of
  16, so each such block is quantized once, in a shared "plane" (``_planes``): half the work
  for the CNN's convolutions. SR copies draw their bits tap by tap (only their RHT rotation is
  shared). Neither the chunking nor the sharing changes a bit (tested).
- ConvTranspose2d is the adjoint of Conv2d (same geometry, input and output swapped): its fprop
  is a Conv2d dgrad (X rowwise along C_in, W along C_in per tap), its dgrad a Conv2d fprop on dY
  (gradient role, SR), its wgrad contracts over the input tokens with dY unfolded tap by tap
  (gradient role, columnwise, RHT/SR; shared planes with RN) and X columnwise (activation role).
- Layout: the GEMMs run on NHWC copies; an NCHW input costs one permuting copy of X per forward
  (and of dY, dX per backward), a channels_last one none.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from nvfp4bench.quant.autograd import (QuantizedLayer, check_generator, fp32_region,
                                       in_compute_dtype, save_operands)
from nvfp4bench.quant.gemm import ConvGeometry, bias_grad, gemm
from nvfp4bench.quant.roles import Op, Roles, tokens_last_cnhw
from nvfp4bench.quant.taps import (abs_max, gather_taps, is_channels_last, per_tap, scatter_taps,
                                   to_nchw, to_nhwc, unfolded_operands)


class QuantizedConv2dFunction(torch.autograd.Function):
    """Conv2d (groups=1) as an implicit GEMM, tap by tap (module docstring)."""

    @staticmethod
    def forward(ctx, x, w, bias, op: Op):
        g = op.geometry
        n, c, h, wd = x.shape
        cout, taps = w.shape[0], g.taps
        oh, ow = g.out_size(h, wd)
        with fp32_region(x.device):
            # X quantized along C per pixel: (N, H, W, C_in); padding pixels are zeros
            # W viewed (C_out, K), K = (kh, kw, C_in): 1x16 along C_in or 16x16 tiles per tap
            xq, wq = op.roles.forward_operands(to_nhwc(x),
                                               w.permute(0, 2, 3, 1).reshape(cout, taps * c))
            # --- fprop ---
            # fprop: Y (M, C_out) = sum_t im2col_t(Q(X)) (M, C_in) @ Q_w(W)_t (C_out, C_in)^T
            y = gather_taps(xq, per_tap(wq, taps), g, (oh, ow), (h, wd))
            if bias is not None:
                y += bias.float()
        save_operands(ctx, op, x, xq, w, wq)
        ctx.op, ctx.has_bias, ctx.shape = op, bias is not None, (n, c, h, wd, oh, ow)
        ctx.channels_last, ctx.dtypes = is_channels_last(x), (x.dtype, w.dtype)
        return to_nchw(y.view(n, oh, ow, cout), x.dtype, ctx.channels_last)

    @staticmethod
    def backward(ctx, dy):
        op, policy, roles, g = ctx.op, ctx.op.policy, ctx.op.roles, ctx.op.geometry
        x_saved, w_saved = ctx.saved_tensors
        n, c, h, wd, oh, ow = ctx.shape
        cout, taps, m = dy.shape[1], g.taps, n * oh * ow
        check_generator(op, dy.device)
        dx = dw = db = None
        with fp32_region(dy.device):
            dy_tokens = None
            if ctx.needs_input_grad[0] or (ctx.has_bias and ctx.needs_input_grad[2]):
                dy_tokens = to_nhwc(dy).view(m, cout)  # (M, C_out)
            if ctx.needs_input_grad[0]:
                from_fwd = policy.reads_forward_w(roles)
                w2d = None if from_fwd else w_saved.permute(0, 2, 3, 1).reshape(cout, taps * c)
                # --- dgrad ---
                # dgrad: dX = sum_t col2im_t(B(dY) (M, C_out) @ D(W)_t (C_in, C_out)^T)
                gq, wdq = policy.dgrad_operands(roles, dy_tokens, w2d,
                                                w_saved if from_fwd else None)  # D(W): (K, C_out)
                dx_nhwc = scatter_taps(gq, wdq.contiguous().view(taps, c, cout), g, (oh, ow),
                                       (h, wd))
                dx = to_nchw(dx_nhwc, ctx.dtypes[0], ctx.channels_last)
            if ctx.needs_input_grad[1]:
                # --- wgrad ---
                # wgrad: dW_t (C_out, C_in) = B(dY^T) (C_out, Mp) @ A(im2col_t(X)^T) (C_in, Mp)^T
                g_spec, a_spec = policy.wgrad_columns(roles)
                gt = g_spec.apply(tokens_last_cnhw(dy.permute(1, 0, 2, 3)), roles.generator)
                if policy.reads_forward_x(roles):  # the forward's Q(X), (N, H, W, C_in)
                    src = x_saved.permute(3, 0, 1, 2)
                else:
                    src = x_saved.permute(1, 0, 2, 3)
                whole = abs_max(x_saved) if a_spec.quantize and not a_spec.rht else None
                dw_taps = torch.empty(taps, cout, c, device=dy.device)
                for t, xt in unfolded_operands(src, g, oh, ow, a_spec, roles.generator, whole):
                    dw_taps[t] = gemm(gt, xt)
                kh, kw = g.kernel
                dw = dw_taps.view(kh, kw, cout, c).permute(2, 3, 0, 1)
                dw = torch.empty(dw.shape, dtype=ctx.dtypes[1], device=dy.device).copy_(dw)
            if ctx.has_bias and ctx.needs_input_grad[2]:
                db = bias_grad(dy_tokens)
        return dx, dw, db, None


class QuantizedConvTranspose2dFunction(torch.autograd.Function):
    """ConvTranspose2d (groups=1): the adjoint of the Conv2d of ``op.geometry`` (docstring)."""

    @staticmethod
    def forward(ctx, x, w, bias, op: Op, out_size: tuple[int, int]):
        g = op.geometry
        n, cin, h, wd = x.shape
        cout, taps = w.shape[1], g.taps
        oh, ow = out_size  # the adjoint Conv2d maps (oh, ow) -> (h, wd)
        m = n * h * wd
        with fp32_region(x.device):
            # X (M, C_in); W viewed (K', C_in), K' = (kh, kw, C_out): the fprop contracts over C_in
            xq, wq = op.roles.forward_operands(to_nhwc(x).view(m, cin),
                                               w.permute(2, 3, 1, 0).reshape(taps * cout, cin))
            # --- fprop ---
            # fprop (a Conv2d dgrad): Y = sum_t col2im_t(Q(X) (M, C_in) @ Q_w(W)_t (C_out, C_in)^T)
            y = scatter_taps(xq, wq.view(taps, cout, cin), g, (h, wd), (oh, ow))
            if bias is not None:
                y += bias.float()
        save_operands(ctx, op, x, xq, w, wq)
        ctx.op, ctx.has_bias, ctx.shape = op, bias is not None, (n, cin, h, wd, oh, ow)
        ctx.channels_last, ctx.dtypes = is_channels_last(x), (x.dtype, w.dtype)
        return to_nchw(y, x.dtype, ctx.channels_last)

    @staticmethod
    def backward(ctx, dy):
        op, policy, roles, g = ctx.op, ctx.op.policy, ctx.op.roles, ctx.op.geometry
        x_saved, w_saved = ctx.saved_tensors
        n, cin, h, wd, oh, ow = ctx.shape
        cout, taps = dy.shape[1], g.taps
        check_generator(op, dy.device)
        dx = dw = db = None
        with fp32_region(dy.device):
            dy_nhwc = None
            if ctx.needs_input_grad[0] or (ctx.has_bias and ctx.needs_input_grad[2]):
                dy_nhwc = to_nhwc(dy)  # (N, OH, OW, C_out)
            if ctx.needs_input_grad[0]:
                from_fwd = policy.reads_forward_w(roles)
                w2d = None if from_fwd else w_saved.permute(2, 3, 1, 0).reshape(taps * cout, cin)
                # --- dgrad ---
                # dgrad (a Conv2d fprop on dY): dX (M, C_in) = sum_t im2col_t(B(dY)) (M, C_out)
                #                                              @ D(W)_t (C_in, C_out)^T
                gq, wdq = policy.dgrad_operands(roles, dy_nhwc, w2d,
                                                w_saved if from_fwd else None)  # D(W): (C_in, K')
                acc = gather_taps(gq, per_tap(wdq, taps), g, (h, wd), (oh, ow))  # (M, C_in)
                dx = to_nchw(acc.view(n, h, wd, cin), ctx.dtypes[0], ctx.channels_last)
            if ctx.needs_input_grad[1]:
                # --- wgrad ---
                # wgrad: dW_t (C_out, C_in) = B(im2col_t(dY)^T) (C_out, Mp) @ A(X^T) (C_in, Mp)^T
                g_spec, a_spec = policy.wgrad_columns(roles)
                if policy.reads_forward_x(roles):  # the forward's Q(X), (M, C_in)
                    x_cnhw = x_saved.view(n, h, wd, cin).permute(3, 0, 1, 2)
                else:
                    x_cnhw = x_saved.permute(1, 0, 2, 3)
                xt = a_spec.apply(tokens_last_cnhw(x_cnhw), roles.generator)
                whole = abs_max(dy) if g_spec.quantize and not g_spec.rht else None
                dw_taps = torch.empty(taps, cout, cin, device=dy.device)
                for t, gt in unfolded_operands(dy.permute(1, 0, 2, 3), g, h, wd, g_spec,
                                       roles.generator, whole):
                    dw_taps[t] = gemm(gt, xt)
                kh, kw = g.kernel
                dw = dw_taps.view(kh, kw, cout, cin).permute(3, 2, 0, 1)
                dw = torch.empty(dw.shape, dtype=ctx.dtypes[1], device=dy.device).copy_(dw)
            if ctx.has_bias and ctx.needs_input_grad[2]:
                db = bias_grad(dy_nhwc.view(-1, cout))
        return dx, dw, db, None, None



def _check_4d(x: torch.Tensor, name: str) -> None:
    if x.dim() != 4:
        raise ValueError(f"{name}: expected a batched (N, C, H, W) input, got shape "
                         f"{tuple(x.shape)}; add the batch dim with x.unsqueeze(0)")


class QuantizedConv2d(QuantizedLayer):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_4d(x, self.op.name)
        (x, b), w = in_compute_dtype(x, self.bias), self.weight
        return QuantizedConv2dFunction.apply(x, w, b, self.op)


class QuantizedConvTranspose2d(QuantizedLayer):
    def __init__(self, module: nn.ConvTranspose2d, roles: Roles, name: str,
                 geometry: ConvGeometry):
        super().__init__(module, roles, name, geometry)
        self.output_padding = tuple(module.output_padding)

    def output_shape(self, h: int, w: int, output_size=None) -> tuple[int, int]:
        g = self.op.geometry
        size = [(n - 1) * s - 2 * p + d * (k - 1) + 1 for n, s, p, d, k in
                zip((h, w), g.stride, g.padding, g.dilation, g.kernel)]
        if output_size is None:
            return tuple(n + op for n, op in zip(size, self.output_padding))
        want = tuple(output_size)[-2:]
        for n, o, s in zip(size, want, g.stride):
            if not n <= o < n + s:
                raise ValueError(f"{self.op.name}: output_size {want} is not reachable from input "
                                 f"{(h, w)} (minimum {tuple(size)})")
        return want

    def forward(self, x: torch.Tensor, output_size=None) -> torch.Tensor:
        _check_4d(x, self.op.name)
        (x, b), w = in_compute_dtype(x, self.bias), self.weight
        out = self.output_shape(x.shape[-2], x.shape[-1], output_size)
        return QuantizedConvTranspose2dFunction.apply(x, w, b, self.op, out)


def conv_geometry(module: nn.Module, name: str) -> ConvGeometry:
    if module.groups != 1:
        raise ValueError(f"{name}: quantized convolutions need groups=1, got {module.groups}")
    if module.padding_mode != "zeros":
        raise ValueError(f"{name}: quantized convolutions need padding_mode='zeros', "
                         f"got {module.padding_mode!r}")
    padding = module.padding
    if isinstance(padding, str):
        total = [d * (k - 1) for d, k in zip(module.dilation, module.kernel_size)]
        if padding == "valid":
            padding = (0, 0)
        elif all(t % 2 == 0 for t in total):  # 'same' with a symmetric padding
            padding = tuple(t // 2 for t in total)
        else:
            raise ValueError(f"{name}: padding='same' with an even effective kernel pads "
                             f"asymmetrically; give an explicit padding")
    return ConvGeometry.of(module.kernel_size, module.stride, padding, module.dilation)
