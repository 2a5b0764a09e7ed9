"""NVFP4 quantized Linear, Conv2d, ConvTranspose2d and attention matmul: the emulator's layers.

How a quantized layer trains
----------------------------
A linear layer with X (M x K, M tokens), W (N x K) and dY (M x N) runs three GEMMs. Each operand
is fake-quantized (quantize, then dequantize to fp32, ``nvfp4.fake_quantize``) in the role it has
in that GEMM, and the GEMM itself runs in fp32 on the dequantized operands (``gemm.gemm``); its
output goes back to the compute dtype and is never re-quantized (nvfp4.md section 3)::

    fprop  Y  = Q(X) Q_w(W)^T       Q: 1x16 blocks along the contraction dim, RN
    dgrad  dX = B(dY) D(W)          contraction over N;  Q_w: 1x16 along K, or 16x16 tiles (2-D)
    wgrad  dW = B(dY^T) A(X^T)^T    contraction over the M tokens: copies run along M

``recipe.backward_override`` picks B, D, A (the registry ``BACKWARDS``; H is the RHT along the
tokens, in 16-token tiles, when ``recipe.rht``):

    None (quantized gradients: nvfp4_full, 2d_rht, 2d_rht_sr, sr_only)
        B(dY) = Q_sr(dY)            1x16 along N; SR when recipe.stochastic_rounding
        D(W)  = Q_w(W)              2-D: the forward's 16x16 copy itself (its exact transpose)
              = Q_N(W)              1-D: a fresh copy of the high-precision W, 1x16 along N
        B(dY^T) = Q_sr(dY^T H),  A(X^T) = Q(X^T H)       (H H^T = I cancels in the GEMM)
    "dequantized" (chain_rule; fwd_rht when recipe.rht)
        B = identity (high-precision dY), D(W) = Q_w(W) the forward's copy, A(X^T) = Q(X)^T
        fwd_rht: A(X^T) = Q(X^T H) (RN) and B(dY^T) = dY^T H in fp32, so that
                 B A^T = dY^T H Q(X^T H)^T: H cancels, only X's rounding differs
    "high_precision" (fwd_only)
        B, D, A = identity: dY times the original W and X (straight-through estimator)

Each weight is quantized once per forward: the fprop copy is saved for dgrad (2-D and chain
rule); a 1-D recipe's dgrad needs its own copy along N, made in backward from W. The forward's
dequantized X is saved only when the wgrad reads it (chain rule). Bias gradients are
``sum_tokens dY`` from the high-precision dY.

Padding: a columnwise (wgrad) copy zero-pads the token count M to a multiple of 16 (the RHT
tiles need it; zeros change neither an amax nor a GEMM). K and N of a Linear / the channel counts
of a convolution must be multiples of 16 (``quantized`` raises ValueError naming the layer).
``QuantizedMatmul`` zero-pads its contraction and output dims instead (257 tokens with a CLS).

Convolutions (nvfp4.md section 6): the GEMMs of an NHWC implicit-GEMM kernel, summed tap by tap
(``gemm.py``), K = (kh, kw, C_in) with C_in fastest:
- Conv2d fprop: X is quantized along C per pixel of the zero-padded input (a 1x16 block of
  im2col(X) is 16 channels of one pixel; tensor amax; padding zeros stay zero), W viewed as
  [C_out, kh*kw*C_in] (1x16 along C_in per tap, or 16x16 (C_out, C_in) tiles per tap);
  ``Y = sum_t im2col_t(Q(X)) Q_w(W_t)^T``. Only one tap of im2col exists at a time.
- Conv2d dgrad: ``dX = sum_t col2im_t(B(dY) D(W)_t)``, dY along C_out per pixel, D(W) along C_out.
- Conv2d wgrad: ``dW_t = B(dY^T) A(im2col_t(X)^T)^T`` per tap: the columnwise copies (and RHT
  tiles) of im2col(X) run along its token axis, so X is unfolded into tokens-last (taps * C_in,
  Mp) fp32 buffers, ``UNFOLD_CHUNK_BYTES`` (256 MiB) at a time but at least one tap, each chunk
  quantized in one call; peak extra memory is about 3 chunks (buffer, rotated copy, quantized
  copy). All taps are one tensor with one amax: amax(X) (also when some pixels are in no tap),
  or with the RHT the amax of the rotated im2col(X)^T over all taps (from a first pass over the
  chunks when there are several). The chunking changes no bit (tested).
- ConvTranspose2d is the adjoint of Conv2d (same geometry, input and output swapped): its fprop
  is a Conv2d dgrad (X rowwise along C_in, W along C_in per tap), its dgrad a Conv2d fprop on the
  padded dY (gradient role, SR), its wgrad contracts over the input tokens with dY unfolded tap by
  tap (gradient role, columnwise, RHT/SR) and X columnwise (activation role).

Choices made here
-----------------
- A baseline recipe (``quantized=False``): ``quantized(module, recipe)`` returns ``module`` itself,
  the baseline's twin being the high-precision layer.
- Stochastic rounding draws from the ``generator`` given to ``quantized`` / ``QuantizedMatmul``
  (on the layer's device); a recipe with SR and no generator raises ValueError (no hidden seed).
- Compute dtype: under autocast the input, weight and bias are cast to the autocast dtype as
  torch's own layers are; otherwise weight and bias are cast to the input's dtype. The forward
  output, dX and dW come back in those dtypes.
- Convolution outputs and input gradients keep the input's memory format (channels_last or NCHW).
- Tensor amax of the attention matmul operands: one amax over the whole batched tensor.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from nvfp4bench import nvfp4
from nvfp4bench.gemm import BLOCK, ConvGeometry, bias_grad, gemm, padded_tokens
from nvfp4bench.recipes import Recipe, get_recipe

ROW_BLOCK = (1, BLOCK)
TILE_2D = (BLOCK, BLOCK)
# A conv wgrad unfolds its input this many bytes (fp32) at a time, at least one kernel tap.
UNFOLD_CHUNK_BYTES = 256 * 2**20


# --------------------------------------------------------------------------------------------
# Quantization roles (pure functions of the recipe and one generator)
# --------------------------------------------------------------------------------------------
def _rowwise(x: torch.Tensor, **kw) -> torch.Tensor:
    """fake_quantize with blocks along the last dim of an (..., R, C) tensor, one tensor amax."""
    return nvfp4.fake_quantize(x.reshape(-1, x.shape[-1]), **kw).view(x.shape)


def tokens_last(t: torch.Tensor) -> torch.Tensor:
    """The wgrad buffer of an (..., M, C) operand: fp32 zeros (prod(...) * C + 1, Mp) holding t^T.

    Tokens run along the last dim, zero-padded to Mp (a multiple of 16). The extra last row is
    scratch for ``_quantize_tokens_last`` (it carries the tensor amax of a chunked operand).
    """
    *batch, m, c = t.shape
    buf = _scratch_buffer(c * math.prod(batch), m, t.device)
    buf[:-1].view(*batch, c, -1)[..., :m].copy_(t.mT)
    return buf


def _scratch_buffer(rows: int, m: int, device) -> torch.Tensor:
    """fp32 (rows + 1, Mp) whose padding columns and last row are zero; the rest is for the caller
    to fill (every element of [:rows, :m])."""
    buf = torch.empty(rows + 1, padded_tokens(m), device=device)
    buf[:, m:].zero_()
    buf[-1].zero_()
    return buf


def _quantize_tokens_last(buf: torch.Tensor, amax, *, rht: bool, sr: bool = False,
                          generator=None) -> torch.Tensor:
    """fake_quantize rows ``buf[:-1]`` (1x16 along tokens), rotated first when ``rht``.

    ``amax`` (or None: the rows' own) is the amax of the whole tensor (of the rotated tensor
    with the RHT) when ``buf`` is one chunk of it. It is imposed by writing it into the scratch
    row: S_enc depends on the tensor amax only and each row's blocks on that row only, so the
    real rows quantize exactly as with that amax.
    """
    x = nvfp4.rht(buf) if rht else buf
    x[-1].zero_()
    if amax is not None:
        x[-1, 0] = amax
    return nvfp4.fake_quantize(x, sr=sr, generator=generator)[:-1]


def rotate_fp32(rows: torch.Tensor) -> torch.Tensor:
    """``v @ R`` per 16-element tile of the last dim, fp32, no bf16 rounding: fwd_rht's dY."""
    r, k = rows.shape
    return torch.matmul(rows.view(r, k // BLOCK, BLOCK), nvfp4.rht_matrix(rows.device)).view(r, k)


@dataclass(frozen=True)
class Roles:
    """How each GEMM operand is quantized under one recipe (nvfp4.md section 3).

    weight_tile: (16, 16) for a 2-D recipe's weights; (1, 16) otherwise and for the second
    operand of an attention matmul, which is an activation.
    """

    recipe: Recipe
    generator: torch.Generator | None = None
    weight_tile: tuple[int, int] = ROW_BLOCK

    @property
    def rht(self) -> bool:
        return self.recipe.rht

    @property
    def sr(self) -> bool:
        return self.recipe.stochastic_rounding

    # fprop: X rowwise RN, W in its tiles RN
    def activation(self, x: torch.Tensor) -> torch.Tensor:
        return _rowwise(x)

    def weight(self, w: torch.Tensor) -> torch.Tensor:
        return _rowwise(w, tile=self.weight_tile)

    # dgrad: dY rowwise along N (SR), W^T along N
    def gradient(self, dy: torch.Tensor) -> torch.Tensor:
        return _rowwise(dy, sr=self.sr, generator=self.generator)

    def weight_t(self, w: torch.Tensor | None, wq: torch.Tensor | None) -> torch.Tensor:
        if self.weight_tile == TILE_2D:
            return wq.mT  # the forward's 16x16 tiles, transposed: one W in both passes
        return _rowwise(w.mT)  # a fresh 1x16 copy along N

    # wgrad: tokens-last copies along M, RHT when on; the gradient with SR
    def gradient_t(self, buf: torch.Tensor, amax=None) -> torch.Tensor:
        return _quantize_tokens_last(buf, amax, rht=self.rht, sr=self.sr,
                                     generator=self.generator)

    def activation_t(self, buf: torch.Tensor, amax=None) -> torch.Tensor:
        return _quantize_tokens_last(buf, amax, rht=self.rht)


# --------------------------------------------------------------------------------------------
# What the backward multiplies: one policy per recipe.backward_override
# --------------------------------------------------------------------------------------------
class QuantizedGradients:
    """``backward_override=None``: dgrad Q_sr(dY) D(W); wgrad Q_sr(dY^T H) Q(X^T H)^T."""

    def reads_forward_x(self, roles: Roles) -> bool:
        return False

    def reads_forward_w(self, roles: Roles) -> bool:
        return roles.weight_tile == TILE_2D

    def quantizes_wgrad(self, roles: Roles) -> tuple[bool, bool]:
        """(gradient, activation): which tokens-last operands are NVFP4 (and need one amax)."""
        return True, True

    def dgrad_operands(self, roles, dy, w, wq):
        return roles.gradient(dy), roles.weight_t(w, wq)

    def wgrad_gradient(self, roles, buf, amax=None):
        return roles.gradient_t(buf, amax)

    def wgrad_activation(self, roles, buf, amax=None):
        return roles.activation_t(buf, amax)


class ChainRule:
    """``"dequantized"``: dY in high precision times the forward's dequantized W and X.

    With the RHT (fwd_rht) the wgrad instead multiplies (H dY^T in fp32) by a fresh RN copy
    Q(H X^T): H cancels, only the rounding of X differs from the forward's.
    """

    def reads_forward_x(self, roles):
        return not roles.rht

    def reads_forward_w(self, roles):
        return True

    def quantizes_wgrad(self, roles):
        return False, roles.rht

    def dgrad_operands(self, roles, dy, w, wq):
        return dy.float(), wq.mT

    def wgrad_gradient(self, roles, buf, amax=None):
        return rotate_fp32(buf[:-1]) if roles.rht else buf[:-1]

    def wgrad_activation(self, roles, buf, amax=None):
        return roles.activation_t(buf, amax) if roles.rht else buf[:-1]


class StraightThrough:
    """``"high_precision"``: the original W and X (the straight-through estimator)."""

    def reads_forward_x(self, roles):
        return False

    def reads_forward_w(self, roles):
        return False

    def quantizes_wgrad(self, roles):
        return False, False

    def dgrad_operands(self, roles, dy, w, wq):
        return dy.float(), w.mT.float()

    def wgrad_gradient(self, roles, buf, amax=None):
        return buf[:-1]

    def wgrad_activation(self, roles, buf, amax=None):
        return buf[:-1]


BACKWARDS = {None: QuantizedGradients(), "dequantized": ChainRule(),
             "high_precision": StraightThrough()}


@dataclass(frozen=True)
class Op:
    """Everything a quantized op's autograd function needs besides tensors."""

    roles: Roles
    name: str
    geometry: ConvGeometry | None = None

    @property
    def policy(self):
        """What the backward GEMMs multiply: ``BACKWARDS[recipe.backward_override]``."""
        return BACKWARDS[self.roles.recipe.backward_override]


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _fp32_region(device: torch.device):
    """Autocast off: the emulated GEMMs run in fp32 on dequantized operands."""
    with torch.autocast(device.type, enabled=False):
        yield


def _check_generator(op: Op, device: torch.device) -> None:
    g = op.roles.generator
    if op.roles.sr and g.device.type != device.type:
        raise ValueError(f"{op.name}: stochastic rounding on {device} needs a torch.Generator on "
                         f"that device, got one on {g.device}")


def _tap_rows(src_cnhw: torch.Tensor, g: ConvGeometry, taps: range, oh: int, ow: int):
    """Taps ``taps`` of im2col(src)^T, tokens last: fp32 (len(taps) * C + 1, Mp), zero-padded,
    the last row scratch (see ``tokens_last``). src is the zero-padded (C, N, Hp, Wp) input."""
    c, n = src_cnhw.shape[:2]
    m = n * oh * ow
    buf = _scratch_buffer(len(taps) * c, m, src_cnhw.device)
    for i, t in enumerate(taps):
        rows, cols = g.tap_window(t, oh, ow)
        buf[i * c:(i + 1) * c, :m].view(c, n, oh, ow).copy_(src_cnhw[:, :, rows, cols])
    return buf


def _unfolded_operand(src_cnhw, g: ConvGeometry, oh: int, ow: int, convert, *,
                      quantized: bool, rht: bool, whole: torch.Tensor):
    """Yield, tap by tap, the wgrad operand (C, Mp) made of im2col(src)^T by ``convert``.

    The unfolded tensor is built ``UNFOLD_CHUNK_BYTES`` at a time (at least one tap), each
    chunk converted (quantized) in one call. A quantized operand has one amax over all taps:
    amax(whole) without the RHT (the activation tensor's, also when some pixels are in no tap);
    with the RHT the amax of the rotated im2col(src)^T, the chunk's own when one chunk holds
    every tap, else from a first pass over the chunks.
    """
    c = src_cnhw.shape[0]
    per_tap = 4 * c * padded_tokens(src_cnhw.shape[1] * oh * ow)
    step = max(1, UNFOLD_CHUNK_BYTES // per_tap)
    chunks = [range(t, min(t + step, g.taps)) for t in range(0, g.taps, step)]
    amax = None
    if quantized and not rht:
        amax = whole.detach().abs().amax().float()
    elif quantized and len(chunks) > 1:
        amax = torch.stack([nvfp4.rht(_tap_rows(src_cnhw, g, ch, oh, ow)[:-1]).abs().amax()
                            for ch in chunks]).amax()
    for ch in chunks:
        operand = convert(_tap_rows(src_cnhw, g, ch, oh, ow), amax)
        yield from operand.split(c, 0)


def _save(ctx, op: Op, x, xq, w, wq) -> None:
    policy = op.policy
    ctx.save_for_backward(xq if policy.reads_forward_x(op.roles) else x,
                          wq if policy.reads_forward_w(op.roles) else w)


def _is_channels_last(x: torch.Tensor) -> bool:
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def _nchw(t_nhwc: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """(N, H, W, C) -> (N, C, H, W), channels_last or contiguous (as the input was)."""
    out = t_nhwc.permute(0, 3, 1, 2)
    return out.contiguous(memory_format=torch.channels_last if channels_last
                          else torch.contiguous_format)


def _pad_nhwc(x: torch.Tensor, padding: tuple[int, int]) -> torch.Tensor:
    """(N, C, H, W) -> zero-padded (N, H + 2 ph, W + 2 pw, C), contiguous."""
    n, c, h, w = x.shape
    ph, pw = padding
    if ph == 0 and pw == 0:
        return x.permute(0, 2, 3, 1).contiguous()
    out = x.new_zeros(n, h + 2 * ph, w + 2 * pw, c)
    out[:, ph:ph + h, pw:pw + w].copy_(x.permute(0, 2, 3, 1))
    return out


def _pad_cnhw(x: torch.Tensor, padding: tuple[int, int]) -> torch.Tensor:
    """(N, C, H, W) -> zero-padded (C, N, H + 2 ph, W + 2 pw), contiguous: a tap window of it
    copies straight into tokens-last rows."""
    n, c, h, w = x.shape
    ph, pw = padding
    out = x.new_zeros(c, n, h + 2 * ph, w + 2 * pw)
    out[:, :, ph:ph + h, pw:pw + w].copy_(x.permute(1, 0, 2, 3))
    return out


# --------------------------------------------------------------------------------------------
# Autograd functions: one per op
# --------------------------------------------------------------------------------------------
class NVFP4Linear(torch.autograd.Function):
    """Y = X W^T (+ b) with NVFP4 operands. x (..., M, K), w (..., N, K) (2-D for a Linear,
    batched for a matmul), K and N multiples of 16; M any."""

    @staticmethod
    def forward(ctx, x, w, bias, op: Op):
        with _fp32_region(x.device):
            # fprop: Y (..., M, N) = Q(X) (..., M, K) @ Q_w(W)^T (..., K, N)
            xq = op.roles.activation(x)
            wq = op.roles.weight(w)
            y = gemm(xq, wq)
            if bias is not None:
                y = y + bias.float()
        _save(ctx, op, x, xq, w, wq)
        ctx.op, ctx.has_bias, ctx.dtypes = op, bias is not None, (x.dtype, w.dtype)
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        op, policy, roles = ctx.op, ctx.op.policy, ctx.op.roles
        x_saved, w_saved = ctx.saved_tensors
        _check_generator(op, dy.device)
        dx = dw = db = None
        with _fp32_region(dy.device):
            if ctx.needs_input_grad[0]:
                # dgrad: dX (..., M, K) = B(dY) (..., M, N) @ D(W) (..., K, N)^T
                from_fwd = policy.reads_forward_w(roles)
                g, wd = policy.dgrad_operands(roles, dy, None if from_fwd else w_saved,
                                              w_saved if from_fwd else None)
                dx = gemm(g, wd).to(ctx.dtypes[0])
            if ctx.needs_input_grad[1]:
                # wgrad: dW (..., N, K) = B(dY^T) (..., N, Mp) @ A(X^T) (..., K, Mp)^T
                n, k = dy.shape[-1], x_saved.shape[-1]
                gt = policy.wgrad_gradient(roles, tokens_last(dy))
                xt = policy.wgrad_activation(roles, tokens_last(x_saved))
                batch = dy.shape[:-2]
                dw = gemm(gt.view(*batch, n, -1), xt.view(*batch, k, -1)).to(ctx.dtypes[1])
            if ctx.has_bias and ctx.needs_input_grad[2]:
                db = bias_grad(dy.reshape(-1, dy.shape[-1]))
        return dx, dw, db, None


class NVFP4Conv2d(torch.autograd.Function):
    """Conv2d (groups=1) as an implicit GEMM, tap by tap (module docstring)."""

    @staticmethod
    def forward(ctx, x, w, bias, op: Op):
        g = op.geometry
        n, c, h, wd = x.shape
        cout, taps = w.shape[0], g.taps
        oh, ow = g.out_size(h, wd)
        m = n * oh * ow
        with _fp32_region(x.device):
            # X quantized along C per pixel of the zero-padded input: (N, Hp, Wp, C_in)
            xq = op.roles.activation(_pad_nhwc(x, g.padding))
            # W viewed (C_out, K), K = (kh, kw, C_in): 1x16 along C_in or 16x16 tiles per tap
            wq = op.roles.weight(w.permute(0, 2, 3, 1).reshape(cout, taps * c))
            # fprop: Y (M, C_out) = sum_t im2col_t(Q(X)) (M, C_in) @ Q_w(W)_t (C_out, C_in)^T
            y = None
            for t in range(taps):
                rows, cols = g.tap_window(t, oh, ow)
                p = gemm(xq[:, rows, cols].reshape(m, c), wq[:, t * c:(t + 1) * c])
                y = p if y is None else y.add_(p)
            if bias is not None:
                y = y + bias.float()
        _save(ctx, op, x, xq, w, wq)
        ctx.op, ctx.has_bias, ctx.shape = op, bias is not None, (n, c, h, wd, oh, ow)
        ctx.channels_last, ctx.dtypes = _is_channels_last(x), (x.dtype, w.dtype)
        return _nchw(y.view(n, oh, ow, cout), ctx.channels_last).to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        op, policy, roles, g = ctx.op, ctx.op.policy, ctx.op.roles, ctx.op.geometry
        x_saved, w_saved = ctx.saved_tensors
        n, c, h, wd, oh, ow = ctx.shape
        cout, taps, m = dy.shape[1], g.taps, n * oh * ow
        ph, pw = g.padding
        _check_generator(op, dy.device)
        dx = dw = db = None
        with _fp32_region(dy.device):
            dy_tokens = dy.permute(0, 2, 3, 1).reshape(m, cout)  # (M, C_out)
            if ctx.needs_input_grad[0]:
                w2d = None if policy.reads_forward_w(roles) else \
                    w_saved.permute(0, 2, 3, 1).reshape(cout, taps * c)
                wq = w_saved if policy.reads_forward_w(roles) else None
                # dgrad: dX = sum_t col2im_t(B(dY) (M, C_out) @ D(W)_t (C_in, C_out)^T)
                gq, wdq = policy.dgrad_operands(roles, dy_tokens, w2d, wq)  # D(W): (K, C_out)
                dx_pad = torch.zeros(n, h + 2 * ph, wd + 2 * pw, c, device=dy.device)
                for t in range(taps):
                    rows, cols = g.tap_window(t, oh, ow)
                    dx_pad[:, rows, cols] += gemm(gq, wdq[t * c:(t + 1) * c]).view(n, oh, ow, c)
                dx = _nchw(dx_pad[:, ph:ph + h, pw:pw + wd], ctx.channels_last)
                dx = dx.to(ctx.dtypes[0])
            if ctx.needs_input_grad[1]:
                # wgrad: dW_t (C_out, C_in) = B(dY^T) (C_out, Mp) @ A(im2col_t(X)^T) (C_in, Mp)^T
                q_grad, q_act = policy.quantizes_wgrad(roles)
                gt = policy.wgrad_gradient(roles, tokens_last(dy_tokens))
                if policy.reads_forward_x(roles):  # the forward's Q(X), (N, Hp, Wp, C_in)
                    src = x_saved.permute(3, 0, 1, 2)
                else:
                    src = _pad_cnhw(x_saved, g.padding)
                xts = _unfolded_operand(src, g, oh, ow,
                                        lambda buf, amax: policy.wgrad_activation(roles, buf, amax),
                                        quantized=q_act, rht=roles.rht, whole=x_saved)
                dw_taps = [gemm(gt, xt) for xt in xts]  # each (C_out, C_in)
                kh, kw = g.kernel
                dw = torch.stack(dw_taps, 1).view(cout, kh, kw, c).permute(0, 3, 1, 2)
                dw = dw.contiguous().to(ctx.dtypes[1])
            if ctx.has_bias and ctx.needs_input_grad[2]:
                db = bias_grad(dy_tokens)
        return dx, dw, db, None


class NVFP4ConvTranspose2d(torch.autograd.Function):
    """ConvTranspose2d (groups=1): the adjoint of the Conv2d of ``op.geometry`` (docstring)."""

    @staticmethod
    def forward(ctx, x, w, bias, op: Op, out_size: tuple[int, int]):
        g = op.geometry
        n, cin, h, wd = x.shape
        cout, taps = w.shape[1], g.taps
        oh, ow = out_size  # the adjoint Conv2d maps (oh, ow) -> (h, wd)
        ph, pw = g.padding
        m = n * h * wd
        with _fp32_region(x.device):
            xq = op.roles.activation(x.permute(0, 2, 3, 1).reshape(m, cin))  # (M, C_in)
            # W viewed (K', C_in), K' = (kh, kw, C_out): the fprop contracts over C_in
            wq = op.roles.weight(w.permute(2, 3, 1, 0).reshape(taps * cout, cin))
            # fprop (a Conv2d dgrad): Y = sum_t col2im_t(Q(X) (M, C_in) @ Q_w(W)_t (C_out, C_in)^T)
            y_pad = torch.zeros(n, oh + 2 * ph, ow + 2 * pw, cout, device=x.device)
            for t in range(taps):
                rows, cols = g.tap_window(t, h, wd)
                y_pad[:, rows, cols] += gemm(xq, wq[t * cout:(t + 1) * cout]).view(n, h, wd, cout)
            y = y_pad[:, ph:ph + oh, pw:pw + ow]
            if bias is not None:
                y = y + bias.float()
        _save(ctx, op, x, xq, w, wq)
        ctx.op, ctx.has_bias, ctx.shape = op, bias is not None, (n, cin, h, wd, oh, ow)
        ctx.channels_last, ctx.dtypes = _is_channels_last(x), (x.dtype, w.dtype)
        return _nchw(y, ctx.channels_last).to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        op, policy, roles, g = ctx.op, ctx.op.policy, ctx.op.roles, ctx.op.geometry
        x_saved, w_saved = ctx.saved_tensors
        n, cin, h, wd, oh, ow = ctx.shape
        cout, taps, m = dy.shape[1], g.taps, n * h * wd
        _check_generator(op, dy.device)
        dx = dw = db = None
        with _fp32_region(dy.device):
            if ctx.needs_input_grad[0]:
                w2d = None if policy.reads_forward_w(roles) else \
                    w_saved.permute(2, 3, 1, 0).reshape(taps * cout, cin)
                wq = w_saved if policy.reads_forward_w(roles) else None
                # dgrad (a Conv2d fprop on dY): dX (M, C_in) = sum_t im2col_t(B(dY)) (M, C_out)
                #                                              @ D(W)_t (C_in, C_out)^T
                dy_pad = _pad_nhwc(dy, g.padding)  # (N, Hp, Wp, C_out); padding quantizes to 0
                gq, wdq = policy.dgrad_operands(roles, dy_pad, w2d, wq)  # D(W): (C_in, K')
                acc = None
                for t in range(taps):
                    rows, cols = g.tap_window(t, h, wd)
                    p = gemm(gq[:, rows, cols].reshape(m, cout), wdq[:, t * cout:(t + 1) * cout])
                    acc = p if acc is None else acc.add_(p)
                dx = _nchw(acc.view(n, h, wd, cin), ctx.channels_last).to(ctx.dtypes[0])
            if ctx.needs_input_grad[1]:
                # wgrad: dW_t (C_out, C_in) = B(im2col_t(dY)^T) (C_out, Mp) @ A(X^T) (C_in, Mp)^T
                q_grad, q_act = policy.quantizes_wgrad(roles)
                x_tokens = x_saved if policy.reads_forward_x(roles) else \
                    x_saved.permute(0, 2, 3, 1).reshape(m, cin)
                xt = policy.wgrad_activation(roles, tokens_last(x_tokens))
                src = _pad_cnhw(dy, g.padding)  # (C_out, N, Hp, Wp)
                gts = _unfolded_operand(src, g, h, wd,
                                        lambda buf, amax: policy.wgrad_gradient(roles, buf, amax),
                                        quantized=q_grad, rht=roles.rht, whole=dy)
                dw_taps = [gemm(gt, xt) for gt in gts]  # each (C_out, C_in)
                kh, kw = g.kernel
                dw = torch.stack(dw_taps).view(kh, kw, cout, cin).permute(3, 2, 0, 1)
                dw = dw.contiguous().to(ctx.dtypes[1])
            if ctx.has_bias and ctx.needs_input_grad[2]:
                db = bias_grad(dy.permute(0, 2, 3, 1).reshape(-1, cout))
        return dx, dw, db, None, None


# --------------------------------------------------------------------------------------------
# Thin modules
# --------------------------------------------------------------------------------------------
def _compute_dtype_inputs(x: torch.Tensor, *params):
    """Cast to the autocast dtype as torch's layers do; else weight and bias to x's dtype."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        dtype = torch.get_autocast_dtype(dev)
    else:
        dtype = x.dtype if x.is_floating_point() else torch.get_default_dtype()
    return tuple(None if t is None else t.to(dtype) for t in (x, *params))


class _Quantized(nn.Module):
    """Shares ``weight`` and ``bias`` (the same Parameter objects) with the layer it twins."""

    def __init__(self, module: nn.Module, roles: Roles, name: str,
                 geometry: ConvGeometry | None = None):
        super().__init__()
        self.weight = module.weight
        self.bias = module.bias
        self.op = Op(roles, name, geometry)

    @property
    def recipe(self) -> Recipe:
        return self.op.roles.recipe

    def extra_repr(self) -> str:
        return f"{self.op.name}, recipe={self.recipe.name}"


class QuantizedLinear(_Quantized):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, w, b = _compute_dtype_inputs(x, self.weight, self.bias)
        y = NVFP4Linear.apply(x.reshape(-1, x.shape[-1]), w, b, self.op)
        return y.view(*x.shape[:-1], w.shape[0])


def _check_4d(x: torch.Tensor, name: str) -> None:
    if x.dim() != 4:
        raise ValueError(f"{name}: expected a batched (N, C, H, W) input, got shape "
                         f"{tuple(x.shape)}; add the batch dim with x.unsqueeze(0)")


class QuantizedConv2d(_Quantized):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_4d(x, self.op.name)
        x, w, b = _compute_dtype_inputs(x, self.weight, self.bias)
        return NVFP4Conv2d.apply(x, w, b, self.op)


class QuantizedConvTranspose2d(_Quantized):
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
        x, w, b = _compute_dtype_inputs(x, self.weight, self.bias)
        out = self.output_shape(x.shape[-2], x.shape[-1], output_size)
        return NVFP4ConvTranspose2d.apply(x, w, b, self.op, out)


def _conv_geometry(module: nn.Module, name: str) -> ConvGeometry:
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


def _check_channels(name: str, what: str, cin: int, cout: int) -> None:
    bad = [f"{label}={v}" for label, v in ((f"in_{what}", cin), (f"out_{what}", cout)) if v % BLOCK]
    if bad:
        raise ValueError(f"{name}: NVFP4 needs {what} counts that are multiples of {BLOCK}, got "
                         f"{', '.join(bad)} (in_{what}={cin}, out_{what}={cout}); keep this layer "
                         f"in high precision or change its width")


def _twin_linear(module, roles, name):
    _check_channels(name, "features", module.in_features, module.out_features)
    return QuantizedLinear(module, roles, name)


def _twin_conv2d(module, roles, name):
    _check_channels(name, "channels", module.in_channels, module.out_channels)
    return QuantizedConv2d(module, roles, name, _conv_geometry(module, name))


def _twin_conv_transpose2d(module, roles, name):
    _check_channels(name, "channels", module.in_channels, module.out_channels)
    return QuantizedConvTranspose2d(module, roles, name, _conv_geometry(module, name))


# Layer type -> constructor of its quantized twin.
TWINS = {nn.Linear: _twin_linear, nn.Conv2d: _twin_conv2d,
         nn.ConvTranspose2d: _twin_conv_transpose2d}


def _resolve(recipe: Recipe | str, generator, what: str) -> Recipe:
    recipe = get_recipe(recipe) if isinstance(recipe, str) else recipe
    if recipe.stochastic_rounding and not isinstance(generator, torch.Generator):
        raise ValueError(f"{what}: recipe {recipe.name!r} uses stochastic rounding; pass "
                         f"generator=torch.Generator(device).manual_seed(seed)")
    return recipe


def quantized(module: nn.Module, recipe: Recipe | str, *,
              generator: torch.Generator | None = None, name: str | None = None) -> nn.Module:
    """The NVFP4 twin of ``module`` (nn.Linear, nn.Conv2d or nn.ConvTranspose2d) under ``recipe``.

    The twin shares ``weight`` and ``bias`` (the same Parameters). A baseline recipe
    (``quantized=False``) returns ``module`` itself. ``generator`` feeds stochastic rounding
    (required when the recipe has SR). ``name`` labels errors (default: the module's repr).
    """
    name = name or repr(module)
    recipe = _resolve(recipe, generator, name)
    if not recipe.quantized:
        return module
    for kind, twin in TWINS.items():
        if isinstance(module, kind):
            tile = recipe.weight_tile
            return twin(module, Roles(recipe, generator, tile), name)
    raise TypeError(f"{name}: no NVFP4 twin for {type(module).__name__}; supported: "
                    f"{', '.join(k.__name__ for k in TWINS)}")


# --------------------------------------------------------------------------------------------
# Attention matmuls (opt-in extension)
# --------------------------------------------------------------------------------------------
class Matmul(nn.Module):
    """``torch.matmul(a, b)`` as a module, so that a model's attention matmuls can be swapped."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.matmul(a, b)


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

    def __init__(self, recipe: Recipe | str, *, generator: torch.Generator | None = None):
        super().__init__()
        recipe = _resolve(recipe, generator, "QuantizedMatmul")
        if not recipe.quantized:
            raise ValueError(f"QuantizedMatmul: recipe {recipe.name!r} quantizes nothing; "
                             f"use Matmul")
        self.op = Op(Roles(recipe, generator, ROW_BLOCK), "QuantizedMatmul")

    def extra_repr(self) -> str:
        return f"recipe={self.op.roles.recipe.name}"

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if a.dim() < 2 or b.dim() < 2:
            raise ValueError(f"QuantizedMatmul: expected (..., M, K) @ (..., K, N), got "
                             f"{tuple(a.shape)} @ {tuple(b.shape)}")
        a, b = _compute_dtype_inputs(a, b)
        (m, k), n = a.shape[-2:], b.shape[-1]
        batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
        a3 = _pad_last(a.expand(*batch, m, k).reshape(-1, m, k), (False, True))
        b3 = _pad_last(b.expand(*batch, k, n).reshape(-1, k, n), (True, True))
        y = NVFP4Linear.apply(a3, b3.mT, None, self.op)  # (B, M, Np)
        return y[..., :n].reshape(*batch, m, n)
