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
  ``UNFOLD_CHUNK_BYTES`` (256 MiB) at a time. All taps are one tensor with one amax: amax(X)
  (also when some pixels are in no tap), or with the RHT the amax of the rotated im2col(X)^T
  over all taps (from a first pass over the chunks when there are several). With RN, taps that
  read the same input rows shifted by whole output rows (for k4 s2: rows i and i + 2) hold the
  same 16-token blocks when the output width is a multiple of 16, so each such block is
  quantized once, in a shared "plane" (``_planes``): half the work for the CNN's convolutions.
  SR copies draw their bits tap by tap (only their RHT rotation is shared). Neither the
  chunking nor the sharing changes a bit (tested).
- ConvTranspose2d is the adjoint of Conv2d (same geometry, input and output swapped): its fprop
  is a Conv2d dgrad (X rowwise along C_in, W along C_in per tap), its dgrad a Conv2d fprop on dY
  (gradient role, SR), its wgrad contracts over the input tokens with dY unfolded tap by tap
  (gradient role, columnwise, RHT/SR; shared planes with RN) and X columnwise (activation role).
- Layout: the GEMMs run on NHWC copies; an NCHW input costs one permuting copy of X per forward
  (and of dY, dX per backward), a channels_last one none.

Choices made here
-----------------
- A baseline recipe (``quantized=False``): ``quantized(module, recipe)`` returns ``module`` itself,
  the baseline's twin being the high-precision layer.
- Stochastic rounding draws from the ``generator`` given to ``quantized`` / ``QuantizedMatmul``
  (on the layer's device); a recipe with SR and no generator raises ValueError (no hidden seed).
- Compute dtype: under autocast the input and the bias are cast to the autocast dtype, as
  torch's own layers cast them (TE, too, receives bf16 activations and casts the bias to the
  activation dtype); without autocast the bias is cast to the input's dtype. The forward output
  and dX come back in that dtype, dW in the parameter's dtype.
- Weights under autocast: the weight is never cast. Its NVFP4 copies (the fprop copy, and the
  dgrad copy of a 1-D recipe) are quantized from the parameter in its own dtype (the fp32
  master weight), because that is what Transformer Engine quantizes: its weight quantizer reads
  the fp32 parameter directly. Rounding W to bf16 first would change about 0.5-0.8 % of the
  E2M1 codes and 1.6-2.3 % of the block scales (measured against TE's source by the te helper).
  The high-precision parts of the backward follow the same rule, as TE does:
  fwd_only's dgrad multiplies the parameter itself (fp32; TE's high_precision dgrad reads the
  saved parameter) and its wgrad the layer's input in the compute dtype (TE saves the original
  bf16 input); chain_rule / fwd_rht multiply the forward's dequantized copies, kept in fp32 as
  nvfp4.md section 2 says (TE dequantizes them to bf16: a documented difference, see the te
  backend). dY is used in the dtype it arrives in (bf16 under autocast).
- Convolution outputs and input gradients keep the input's memory format (channels_last or NCHW).
- Tensor amax of the attention matmul operands: one amax over the whole batched tensor.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from nvfp4bench import nvfp4
from nvfp4bench.gemm import ConvGeometry, axis_window, bias_grad, gemm
from nvfp4bench.nvfp4 import BLOCK, padded_tokens
from nvfp4bench.recipes import Recipe, get_recipe

ROW_BLOCK = (1, BLOCK)
TILE_2D = (BLOCK, BLOCK)
# A conv wgrad unfolds its input this many bytes (fp32) at a time, at least one plane (tap).
UNFOLD_CHUNK_BYTES = 256 * 2**20


# --------------------------------------------------------------------------------------------
# Quantization roles (pure functions of the recipe and one generator)
# --------------------------------------------------------------------------------------------
def _rowwise(x: torch.Tensor, **kw) -> torch.Tensor:
    """fake_quantize with blocks along the last dim of an (..., R, C) tensor, one tensor amax."""
    return nvfp4.fake_quantize(x.reshape(-1, x.shape[-1]), **kw).view(x.shape)


def _token_buffer(rows: int, m: int, device) -> torch.Tensor:
    """fp32 (rows, Mp) whose padding columns are zero; the caller fills ``[:, :m]``."""
    buf = torch.empty(rows, padded_tokens(m), device=device)
    buf[:, m:].zero_()
    return buf


def _tokens_last_cnhw(src_cnhw: torch.Tensor) -> torch.Tensor:
    """The columnwise copy of a (C, N, H, W) view (an NCHW tensor permuted), tokens (N, H, W):
    fp32 (C, Mp), one copy."""
    c, n, h, w = src_cnhw.shape
    buf = _token_buffer(c, n * h * w, src_cnhw.device)
    buf[:, :n * h * w].view(c, n, h, w).copy_(src_cnhw)
    return buf


def rotate_fp32(rows: torch.Tensor) -> torch.Tensor:
    """``v @ R`` per 16-element tile of the last dim, fp32, no bf16 rounding: fwd_rht's dY."""
    r, k = rows.shape
    rotation = nvfp4.device_rht_matrix(rows.device)
    return torch.matmul(rows.view(r, k // BLOCK, BLOCK), rotation).view(r, k)


@dataclass(frozen=True)
class Columnwise:
    """How a wgrad operand is made from its high-precision tokens-last copy (C, Mp).

    quantize: NVFP4, 1x16 blocks along the tokens (rotated first by the RHT when ``rht``; SR
    when ``sr``); rotate_fp32: rotated by R in fp32 and not quantized (fwd_rht's dY^T); neither:
    the high-precision values.
    """

    quantize: bool = False
    rht: bool = False
    sr: bool = False
    rotate_fp32: bool = False

    @property
    def deterministic_blocks(self) -> bool:
        """A quantized block is a function of its 16 values and the tensor amax alone (RN):
        a block that appears in several taps of an unfolded tensor may be quantized once."""
        return self.quantize and not self.sr

    def apply(self, buf: torch.Tensor, generator=None, amax=None) -> torch.Tensor:
        """The operand from the tokens-last fp32 ``buf`` (one chunk of it: ``amax`` is then the
        whole tensor's, of the rotated tensor with the RHT; None: the chunk's own)."""
        if self.rotate_fp32:
            return rotate_fp32(buf)
        if not self.quantize:
            return buf
        return nvfp4.fake_quantize(buf, rht=self.rht, sr=self.sr,
                                   generator=generator if self.sr else None, amax=amax)

    def of_tokens(self, t: torch.Tensor, generator=None) -> torch.Tensor:
        """``apply(nvfp4.columnwise_copy(t))`` for an (..., M, C) tensor; with
        ``nvfp4.fake_quantize_columnwise`` (no copy first on the compiled backend) when no RHT
        comes first."""
        if self.quantize and not self.rht:
            return nvfp4.fake_quantize_columnwise(t, sr=self.sr,
                                                  generator=generator if self.sr else None)
        return self.apply(nvfp4.columnwise_copy(t), generator)


HIGH_PRECISION = Columnwise()


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
    @property
    def gradient_columns(self) -> Columnwise:
        return Columnwise(quantize=True, rht=self.rht, sr=self.sr)

    @property
    def activation_columns(self) -> Columnwise:
        return Columnwise(quantize=True, rht=self.rht)


# --------------------------------------------------------------------------------------------
# What the backward multiplies: one policy per recipe.backward_override
# --------------------------------------------------------------------------------------------
class QuantizedGradients:
    """``backward_override=None``: dgrad Q_sr(dY) D(W); wgrad Q_sr(dY^T H) Q(X^T H)^T."""

    def reads_forward_x(self, roles: Roles) -> bool:
        return False

    def reads_forward_w(self, roles: Roles) -> bool:
        return roles.weight_tile == TILE_2D

    def dgrad_operands(self, roles, dy, w, wq):
        return roles.gradient(dy), roles.weight_t(w, wq)

    def wgrad_columns(self, roles) -> tuple[Columnwise, Columnwise]:
        """(gradient, activation): how the wgrad's dY^T and X^T are made."""
        return roles.gradient_columns, roles.activation_columns


class ChainRule:
    """``"dequantized"``: dY in high precision times the forward's dequantized W and X.

    With the RHT (fwd_rht) the wgrad instead multiplies (H dY^T in fp32) by a fresh RN copy
    Q(H X^T): H cancels, only the rounding of X differs from the forward's.
    """

    def reads_forward_x(self, roles):
        return not roles.rht

    def reads_forward_w(self, roles):
        return True

    def dgrad_operands(self, roles, dy, w, wq):
        return dy.float(), wq.mT

    def wgrad_columns(self, roles):
        if roles.rht:
            return Columnwise(rotate_fp32=True), roles.activation_columns
        return HIGH_PRECISION, HIGH_PRECISION  # X^T: the forward's Q(X), read from ctx


class StraightThrough:
    """``"high_precision"``: the original W and X (the straight-through estimator)."""

    def reads_forward_x(self, roles):
        return False

    def reads_forward_w(self, roles):
        return False

    def dgrad_operands(self, roles, dy, w, wq):
        return dy.float(), w.mT.float()

    def wgrad_columns(self, roles):
        return HIGH_PRECISION, HIGH_PRECISION


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


def _save(ctx, op: Op, x, xq, w, wq) -> None:
    policy = op.policy
    ctx.save_for_backward(xq if policy.reads_forward_x(op.roles) else x,
                          wq if policy.reads_forward_w(op.roles) else w)


def _is_channels_last(x: torch.Tensor) -> bool:
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def _nhwc(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> contiguous fp32 (N, H, W, C): a view of a channels_last fp32 tensor, else
    one copy (layout and dtype at once)."""
    v = x.permute(0, 2, 3, 1)
    if x.dtype == torch.float32 and v.is_contiguous():
        return v
    return torch.empty(v.shape, device=x.device).copy_(v)


def _nchw(t_nhwc: torch.Tensor, dtype: torch.dtype, channels_last: bool) -> torch.Tensor:
    """(N, H, W, C) -> (N, C, H, W) in ``dtype``, channels_last or contiguous (as the input was):
    no copy when it already is, else one (layout and dtype at once)."""
    v = t_nhwc.permute(0, 3, 1, 2)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    if v.dtype == dtype and v.is_contiguous(memory_format=fmt):
        return v
    out = torch.empty(v.shape, dtype=dtype, device=v.device, memory_format=fmt)
    n, c, h, w = v.shape
    if v.dtype == dtype and not channels_last and t_nhwc.is_contiguous() and v.is_cpu:
        # image by image as 2-D transposes: torch's blocked transpose copy, ~2x faster on CPU
        for i in range(n):
            out[i].view(c, h * w).copy_(t_nhwc[i].view(h * w, c).t())
        return out
    return out.copy_(v)


def _at(ndim: int, hw: tuple[int, int], rows: slice, cols: slice) -> tuple:
    """An index tuple selecting ``rows`` and ``cols`` along the spatial dims ``hw``."""
    idx = [slice(None)] * ndim
    idx[hw[0]], idx[hw[1]] = rows, cols
    return tuple(idx)


def _gather(dst: torch.Tensor, src: torch.Tensor, window, hw: tuple[int, int]) -> None:
    """One tap of im2col: ``dst[out] = src[in]`` for ``window = ((out_rows, out_cols), (in_rows,
    in_cols))`` along the spatial dims ``hw`` of both; the rest of ``dst`` (the pixels that read
    zero padding) is zeroed. Reads the unpadded ``src`` directly: no padded copy is made."""
    (orow, ocol), (irow, icol) = window
    nd, (hd, wd) = dst.dim(), hw
    h, w = dst.shape[hd], dst.shape[wd]
    every = slice(None)
    for strip in (slice(0, orow.start), slice(orow.stop, h)):
        if strip.stop > strip.start:
            dst[_at(nd, hw, strip, every)].zero_()
    for strip in (slice(0, ocol.start), slice(ocol.stop, w)):
        if strip.stop > strip.start:
            dst[_at(nd, hw, orow, strip)].zero_()
    if orow.stop > orow.start and ocol.stop > ocol.start:
        dst[_at(nd, hw, orow, ocol)].copy_(src[_at(src.dim(), hw, irow, icol)])


def _is_identity(window, src: torch.Tensor, dst: torch.Tensor, hw: tuple[int, int]) -> bool:
    """True when tap ``window`` reads every pixel of ``src`` once, in place: dst[out] = src
    with out and in the full ranges (a 1x1 convolution, the centre tap of a stride-1 3x3)."""
    (orow, ocol), (irow, icol) = window
    full = [(o, i, dst.shape[d], src.shape[d]) for o, i, d in ((orow, irow, hw[0]),
                                                                 (ocol, icol, hw[1]))]
    return all(o == slice(0, n) and i == slice(0, m, 1) and n == m for o, i, n, m in full)


def _tap(buf: torch.Tensor, src: torch.Tensor, window, hw: tuple[int, int]) -> torch.Tensor:
    """Tap ``window`` of im2col(src) in ``buf``'s shape: ``src`` itself when the tap reads it
    whole (the same values in the same contiguous layout: the same GEMM), else gathered."""
    if src.is_contiguous() and _is_identity(window, src, buf, hw):
        return src
    _gather(buf, src, window, hw)
    return buf


def _scatter_add(dst: torch.Tensor, part: torch.Tensor, window, hw: tuple[int, int]) -> None:
    """col2im of one tap: ``dst[in] += part[out]`` (the pixels of ``part`` that fall on the
    zero padding are dropped, as cropping a padded result would)."""
    (orow, ocol), (irow, icol) = window
    if orow.stop > orow.start and ocol.stop > ocol.start:
        dst[_at(dst.dim(), hw, irow, icol)] += part[_at(part.dim(), hw, orow, ocol)]


def _amax(t: torch.Tensor) -> torch.Tensor:
    """max |t| as fp32, in one pass without an |t| temporary."""
    lo, hi = torch.aminmax(t.detach())
    return torch.maximum(-lo, hi).float()


# --------------------------------------------------------------------------------------------
# The unfolded wgrad operand of a convolution
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Plane:
    """Rows ``k = 0 .. rows-1`` of the strided input plane starting at padded input offset
    ``(row0, col0)``: padded pixel ``(row0 + k * stride_h, col0 + o * stride_w)``, o < out_w.
    Tap ``t`` of ``taps = ((t, d), ...)`` is the plane's rows ``d .. d + out_h - 1``."""

    taps: tuple[tuple[int, int], ...]
    row0: int
    col0: int
    rows: int


def _planes(g: ConvGeometry, oh: int, ow: int, share: bool) -> list[Plane]:
    """The planes that hold every tap of im2col. One plane per tap, unless ``share``: taps with
    the same column offset whose row offsets differ by whole strides read the same input rows
    shifted by whole output rows, and with ``ow % 16 == 0`` every 16-token block (16 pixels of
    one output row) of one is a block of the other, so one plane serves them all. A plane is
    split where its taps leave a gap of more than ``oh`` rows, so that every plane row belongs
    to some tap (an RHT amax over the planes is then the amax over the taps)."""
    if not (share and ow % BLOCK == 0):
        return [Plane(((t, 0),), *g.offset(t), oh) for t in range(g.taps)]
    sh = g.stride[0]
    classes: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for t in range(g.taps):
        r, c = g.offset(t)
        classes.setdefault((c, r % sh), []).append((r, t))
    planes = []
    for (col0, _), members in classes.items():
        members.sort()
        group, row0 = [], members[0][0]
        for r, t in members:
            d = (r - row0) // sh
            if group and d - group[-1][1] > oh:  # a gap: rows between would be in no tap
                planes.append(Plane(tuple(group), row0, col0, oh + group[-1][1]))
                group, row0, d = [], r, 0
            group.append((t, d))
        planes.append(Plane(tuple(group), row0, col0, oh + group[-1][1]))
    return planes


def _fill_planes(planes: list[Plane], src: torch.Tensor, g: ConvGeometry, oh: int, ow: int):
    """The tokens-last buffer of ``planes``: fp32 (len(planes) * C, Lp), plane p's rows
    ``[p * C, (p + 1) * C)`` holding its pixels in (N, rows, ow) order (zero rows after a shorter
    plane's own, zero token padding up to Lp, a multiple of 16). src is (C, N, H, W), unpadded."""
    c, n, h, w = src.shape
    rows = max(p.rows for p in planes)
    length = n * rows * ow
    buf = _token_buffer(len(planes) * c, length, src.device)
    body = buf[:, :length].view(len(planes), c, n, rows, ow)
    for k, p in enumerate(planes):
        r_win = axis_window(p.row0, g.stride[0], g.padding[0], p.rows, h)
        c_win = axis_window(p.col0, g.stride[1], g.padding[1], ow, w)
        _gather(body[k, :, :, :p.rows], src, ((r_win[0], c_win[0]), (r_win[1], c_win[1])), (2, 3))
        if p.rows < rows:
            body[k, :, :, p.rows:].zero_()
    return buf, rows


def _unfolded(src: torch.Tensor, g: ConvGeometry, oh: int, ow: int, spec: Columnwise,
              generator, whole_amax=None):
    """Yield ``(t, operand)`` for every tap t: the wgrad operand (C, Mp), made by ``spec`` from
    tap t of im2col(src)^T (tokens last, zero-padded), src (C, N, H, W) unpadded.

    The unfolded tensor is one tensor with one amax: ``whole_amax`` (the amax of the activation
    tensor, also when some pixels are in no tap) without the RHT; with the RHT the amax of the
    rotated im2col(src)^T over all taps, from a first pass over the chunks when there are
    several. It is built ``UNFOLD_CHUNK_BYTES`` at a time (at least one plane), each chunk
    converted in one call. Taps that share their 16-token blocks (``_planes``) share the
    deterministic work: with RN the whole quantization (each block is quantized once: half the
    work for a k4 s2 convolution), with SR the RHT rotation (every tap's copy then draws its own
    random bits). Neither the chunking nor the sharing changes a bit (tested).
    """
    c, n = src.shape[:2]
    m = n * oh * ow
    planes = _planes(g, oh, ow, spec.quantize and (spec.deterministic_blocks or spec.rht))
    per_row = 4 * c * n * ow
    chunks, size = [[]], 0
    for p in planes:
        if chunks[-1] and size + per_row * p.rows > UNFOLD_CHUNK_BYTES:
            chunks.append([])
            size = 0
        chunks[-1].append(p)
        size += per_row * p.rows
    amax = None
    if spec.quantize and not spec.rht:
        amax = whole_amax
    elif spec.quantize and len(chunks) > 1:
        amax = torch.stack([nvfp4.rht(_fill_planes(ch, src, g, oh, ow)[0]).abs().amax()
                            for ch in chunks]).amax()
    for ch in chunks:
        buf, rows = _fill_planes(ch, src, g, oh, ow)
        if rows == oh:  # every plane is one tap, stored as (C, Mp): no copy
            out = spec.apply(buf, generator, amax)
            for k, p in enumerate(ch):
                yield p.taps[0][0], out[k * c:(k + 1) * c]
            continue
        # shared planes: ow % 16 == 0, so m is a multiple of 16 and Mp == m
        taps = [(t, k, d) for k, p in enumerate(ch) for t, d in p.taps]
        if spec.deterministic_blocks:
            body = spec.apply(buf, generator, amax)[:, :n * rows * ow]
            body = body.view(len(ch), c, n, rows, ow)
            for t, k, d in taps:
                yield t, body[k, :, :, d:d + oh].reshape(c, m)
            continue
        # SR with the RHT: rotate each plane once, then quantize every tap's own copy
        rotated = nvfp4.rht(buf)
        chunk_amax = rotated.abs().amax() if amax is None else amax  # one chunk: all taps
        body = rotated[:, :n * rows * ow].view(len(ch), c, n, rows, ow)
        stacked = torch.empty(len(taps) * c, m, device=src.device)
        for i, (t, k, d) in enumerate(taps):
            stacked[i * c:(i + 1) * c].view(c, n, oh, ow).copy_(body[k, :, :, d:d + oh])
        del rotated, body
        out = nvfp4.fake_quantize(stacked, sr=True, generator=generator, amax=chunk_amax)
        for i, (t, _, _) in enumerate(taps):
            yield t, out[i * c:(i + 1) * c]


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
                y += bias.float()
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
                g_spec, a_spec = policy.wgrad_columns(roles)
                gt = g_spec.of_tokens(dy, roles.generator)
                xt = a_spec.of_tokens(x_saved, roles.generator)
                batch = dy.shape[:-2]
                dw = gemm(gt.view(*batch, n, -1), xt.view(*batch, k, -1)).to(ctx.dtypes[1])
            if ctx.has_bias and ctx.needs_input_grad[2]:
                db = bias_grad(dy.reshape(-1, dy.shape[-1]))
        return dx, dw, db, None


def _per_tap(w2d: torch.Tensor, taps: int) -> torch.Tensor:
    """(R, taps * C) -> contiguous (taps, R, C): tap t's columns as one matrix."""
    r, k = w2d.shape
    return w2d.reshape(r, taps, k // taps).transpose(0, 1).contiguous()


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
            # X quantized along C per pixel: (N, H, W, C_in); padding pixels are zeros
            xq = op.roles.activation(_nhwc(x))
            # W viewed (C_out, K), K = (kh, kw, C_in): 1x16 along C_in or 16x16 tiles per tap
            wq = op.roles.weight(w.permute(0, 2, 3, 1).reshape(cout, taps * c))
            w_taps = _per_tap(wq, taps)  # (T, C_out, C_in)
            # fprop: Y (M, C_out) = sum_t im2col_t(Q(X)) (M, C_in) @ Q_w(W)_t (C_out, C_in)^T
            a = torch.empty(n, oh, ow, c, device=x.device)  # one tap of im2col at a time
            y, p = None, None
            for t in range(taps):
                at = _tap(a, xq, g.window(t, oh, ow, h, wd), (1, 2))
                if y is None:
                    y = gemm(at.view(m, c), w_taps[t])
                else:  # one reused product buffer; the sum runs in tap order
                    p = gemm(at.view(m, c), w_taps[t], out=p if p is not None else
                             torch.empty_like(y))
                    y.add_(p)
            if bias is not None:
                y += bias.float()
        _save(ctx, op, x, xq, w, wq)
        ctx.op, ctx.has_bias, ctx.shape = op, bias is not None, (n, c, h, wd, oh, ow)
        ctx.channels_last, ctx.dtypes = _is_channels_last(x), (x.dtype, w.dtype)
        return _nchw(y.view(n, oh, ow, cout), x.dtype, ctx.channels_last)

    @staticmethod
    def backward(ctx, dy):
        op, policy, roles, g = ctx.op, ctx.op.policy, ctx.op.roles, ctx.op.geometry
        x_saved, w_saved = ctx.saved_tensors
        n, c, h, wd, oh, ow = ctx.shape
        cout, taps, m = dy.shape[1], g.taps, n * oh * ow
        _check_generator(op, dy.device)
        dx = dw = db = None
        with _fp32_region(dy.device):
            dy_tokens = None
            if ctx.needs_input_grad[0] or (ctx.has_bias and ctx.needs_input_grad[2]):
                dy_tokens = _nhwc(dy).view(m, cout)  # (M, C_out)
            if ctx.needs_input_grad[0]:
                from_fwd = policy.reads_forward_w(roles)
                w2d = None if from_fwd else w_saved.permute(0, 2, 3, 1).reshape(cout, taps * c)
                # dgrad: dX = sum_t col2im_t(B(dY) (M, C_out) @ D(W)_t (C_in, C_out)^T)
                gq, wdq = policy.dgrad_operands(roles, dy_tokens, w2d,
                                                w_saved if from_fwd else None)  # D(W): (K, C_out)
                wdq = wdq.contiguous().view(taps, c, cout)
                dx_nhwc = torch.zeros(n, h, wd, c, device=dy.device)
                p = torch.empty(m, c, device=dy.device)  # one reused product buffer
                for t in range(taps):
                    _scatter_add(dx_nhwc, gemm(gq, wdq[t], out=p).view(n, oh, ow, c),
                                 g.window(t, oh, ow, h, wd), (1, 2))
                dx = _nchw(dx_nhwc, ctx.dtypes[0], ctx.channels_last)
            if ctx.needs_input_grad[1]:
                # wgrad: dW_t (C_out, C_in) = B(dY^T) (C_out, Mp) @ A(im2col_t(X)^T) (C_in, Mp)^T
                g_spec, a_spec = policy.wgrad_columns(roles)
                gt = g_spec.apply(_tokens_last_cnhw(dy.permute(1, 0, 2, 3)), roles.generator)
                if policy.reads_forward_x(roles):  # the forward's Q(X), (N, H, W, C_in)
                    src = x_saved.permute(3, 0, 1, 2)
                else:
                    src = x_saved.permute(1, 0, 2, 3)
                whole = _amax(x_saved) if a_spec.quantize and not a_spec.rht else None
                dw_taps = torch.empty(taps, cout, c, device=dy.device)
                for t, xt in _unfolded(src, g, oh, ow, a_spec, roles.generator, whole):
                    dw_taps[t] = gemm(gt, xt)
                kh, kw = g.kernel
                dw = dw_taps.view(kh, kw, cout, c).permute(2, 3, 0, 1)
                dw = torch.empty(dw.shape, dtype=ctx.dtypes[1], device=dy.device).copy_(dw)
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
        m = n * h * wd
        with _fp32_region(x.device):
            xq = op.roles.activation(_nhwc(x)).view(m, cin)  # (M, C_in)
            # W viewed (K', C_in), K' = (kh, kw, C_out): the fprop contracts over C_in
            wq = op.roles.weight(w.permute(2, 3, 1, 0).reshape(taps * cout, cin))
            # fprop (a Conv2d dgrad): Y = sum_t col2im_t(Q(X) (M, C_in) @ Q_w(W)_t (C_out, C_in)^T)
            y = torch.zeros(n, oh, ow, cout, device=x.device)
            p = torch.empty(m, cout, device=x.device)  # one reused product buffer
            for t in range(taps):
                _scatter_add(y, gemm(xq, wq[t * cout:(t + 1) * cout], out=p).view(n, h, wd, cout),
                             g.window(t, h, wd, oh, ow), (1, 2))
            if bias is not None:
                y += bias.float()
        _save(ctx, op, x, xq, w, wq)
        ctx.op, ctx.has_bias, ctx.shape = op, bias is not None, (n, cin, h, wd, oh, ow)
        ctx.channels_last, ctx.dtypes = _is_channels_last(x), (x.dtype, w.dtype)
        return _nchw(y, x.dtype, ctx.channels_last)

    @staticmethod
    def backward(ctx, dy):
        op, policy, roles, g = ctx.op, ctx.op.policy, ctx.op.roles, ctx.op.geometry
        x_saved, w_saved = ctx.saved_tensors
        n, cin, h, wd, oh, ow = ctx.shape
        cout, taps, m = dy.shape[1], g.taps, n * h * wd
        _check_generator(op, dy.device)
        dx = dw = db = None
        with _fp32_region(dy.device):
            dy_nhwc = None
            if ctx.needs_input_grad[0] or (ctx.has_bias and ctx.needs_input_grad[2]):
                dy_nhwc = _nhwc(dy)  # (N, OH, OW, C_out)
            if ctx.needs_input_grad[0]:
                from_fwd = policy.reads_forward_w(roles)
                w2d = None if from_fwd else w_saved.permute(2, 3, 1, 0).reshape(taps * cout, cin)
                # dgrad (a Conv2d fprop on dY): dX (M, C_in) = sum_t im2col_t(B(dY)) (M, C_out)
                #                                              @ D(W)_t (C_in, C_out)^T
                gq, wdq = policy.dgrad_operands(roles, dy_nhwc, w2d,
                                                w_saved if from_fwd else None)  # D(W): (C_in, K')
                wd_taps = _per_tap(wdq, taps)  # (T, C_in, C_out)
                a = torch.empty(n, h, wd, cout, device=dy.device)
                acc, p = None, None
                for t in range(taps):
                    at = _tap(a, gq, g.window(t, h, wd, oh, ow), (1, 2))
                    if acc is None:
                        acc = gemm(at.view(m, cout), wd_taps[t])
                    else:  # one reused product buffer; the sum runs in tap order
                        p = gemm(at.view(m, cout), wd_taps[t], out=p if p is not None else
                                 torch.empty_like(acc))
                        acc.add_(p)
                dx = _nchw(acc.view(n, h, wd, cin), ctx.dtypes[0], ctx.channels_last)
            if ctx.needs_input_grad[1]:
                # wgrad: dW_t (C_out, C_in) = B(im2col_t(dY)^T) (C_out, Mp) @ A(X^T) (C_in, Mp)^T
                g_spec, a_spec = policy.wgrad_columns(roles)
                if policy.reads_forward_x(roles):  # the forward's Q(X), (M, C_in)
                    x_cnhw = x_saved.view(n, h, wd, cin).permute(3, 0, 1, 2)
                else:
                    x_cnhw = x_saved.permute(1, 0, 2, 3)
                xt = a_spec.apply(_tokens_last_cnhw(x_cnhw), roles.generator)
                whole = _amax(dy) if g_spec.quantize and not g_spec.rht else None
                dw_taps = torch.empty(taps, cout, cin, device=dy.device)
                for t, gt in _unfolded(dy.permute(1, 0, 2, 3), g, h, wd, g_spec,
                                       roles.generator, whole):
                    dw_taps[t] = gemm(gt, xt)
                kh, kw = g.kernel
                dw = dw_taps.view(kh, kw, cout, cin).permute(3, 2, 0, 1)
                dw = torch.empty(dw.shape, dtype=ctx.dtypes[1], device=dy.device).copy_(dw)
            if ctx.has_bias and ctx.needs_input_grad[2]:
                db = bias_grad(dy_nhwc.view(-1, cout))
        return dx, dw, db, None, None


# --------------------------------------------------------------------------------------------
# Thin modules
# --------------------------------------------------------------------------------------------
def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype activations are computed in: the autocast dtype of x's device when autocast is
    on (as torch's own layers cast), else x's own (floating) dtype."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype if x.is_floating_point() else torch.get_default_dtype()


def _in_compute_dtype(x: torch.Tensor, *others):
    """x and ``others`` (activations, a bias; None passes) cast to ``compute_dtype(x)``. A
    layer's weight is not among them: its NVFP4 copies are quantized from the parameter itself
    (module docstring, "Weights under autocast")."""
    dtype = compute_dtype(x)
    return tuple(None if t is None else t.to(dtype) for t in (x, *others))


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
        (x, b), w = _in_compute_dtype(x, self.bias), self.weight
        y = NVFP4Linear.apply(x.reshape(-1, x.shape[-1]), w, b, self.op)
        return y.view(*x.shape[:-1], w.shape[0])


def _check_4d(x: torch.Tensor, name: str) -> None:
    if x.dim() != 4:
        raise ValueError(f"{name}: expected a batched (N, C, H, W) input, got shape "
                         f"{tuple(x.shape)}; add the batch dim with x.unsqueeze(0)")


class QuantizedConv2d(_Quantized):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_4d(x, self.op.name)
        (x, b), w = _in_compute_dtype(x, self.bias), self.weight
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
        (x, b), w = _in_compute_dtype(x, self.bias), self.weight
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
        a, b = _in_compute_dtype(a, b)
        (m, k), n = a.shape[-2:], b.shape[-1]
        batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
        a3 = _pad_last(a.expand(*batch, m, k).reshape(-1, m, k), (False, True))
        b3 = _pad_last(b.expand(*batch, k, n).reshape(-1, k, n), (True, True))
        y = NVFP4Linear.apply(a3, b3.mT, None, self.op)  # (B, M, Np)
        return y[..., :n].reshape(*batch, m, n)
