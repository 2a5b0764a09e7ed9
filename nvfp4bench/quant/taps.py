"""The implicit-GEMM taps of a convolution: im2col / col2im one tap at a time, and the
unfolded (tokens-last) wgrad operand, on NHWC copies.

See ``conv.py`` for how the taps make up a convolution's three GEMMs, and ``gemm.py`` for the
geometry (``ConvGeometry.window``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from nvfp4bench.quant import kernels
from nvfp4bench.quant.gemm import ConvGeometry, axis_window, gemm
from nvfp4bench.quant.nvfp4 import BLOCK
from nvfp4bench.quant.roles import Columnwise, token_buffer

TILE_2D = (BLOCK, BLOCK)
# A conv wgrad unfolds its input at most this many bytes (fp32) at a time, at least one plane
# (tap). On the CPU a cache-sized chunk: it lowers the peak memory of a quantized wgrad and runs
# faster than large chunks (cnn tiny, 128 px, batch 8, alternating steps: 2d_rht_sr 0.96x the
# step time with 4 MiB instead of 256 MiB, nvfp4_full 0.95x; at 256 px 0.94x). On a GPU large
# chunks keep the kernel launches few. The chunk size changes no bit (tested).
UNFOLD_CHUNK_BYTES = 256 * 2**20
UNFOLD_CHUNK_BYTES_CPU = 4 * 2**20


def unfold_chunk_bytes(device: torch.device) -> int:
    """The unfolding chunk of a wgrad on ``device`` (the comment above)."""
    if device.type == "cpu":
        return min(UNFOLD_CHUNK_BYTES, UNFOLD_CHUNK_BYTES_CPU)
    return UNFOLD_CHUNK_BYTES


def is_channels_last(x: torch.Tensor) -> bool:
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def to_nhwc(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> contiguous fp32 (N, H, W, C): a view of a channels_last fp32 tensor, else
    one copy (layout and dtype at once)."""
    v = x.permute(0, 2, 3, 1)
    if x.dtype == torch.float32 and v.is_contiguous():
        return v
    return torch.empty(v.shape, device=x.device).copy_(v)


def to_nchw(t_nhwc: torch.Tensor, dtype: torch.dtype, channels_last: bool) -> torch.Tensor:
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


def abs_max(t: torch.Tensor) -> torch.Tensor:
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


def _planes(g: ConvGeometry, oh: int, ow: int, share: bool, block: int = BLOCK) -> list[Plane]:
    """The planes that hold every tap of im2col. One plane per tap, unless ``share``: taps with
    the same column offset whose row offsets differ by whole strides read the same input rows
    shifted by whole output rows, and with ``ow % block == 0`` every token block (``block``
    pixels of one output row; 16 for NVFP4) of one is a block of the other, so one plane serves
    them all. A plane is
    split where its taps leave a gap of more than ``oh`` rows, so that every plane row belongs
    to some tap (an RHT amax over the planes is then the amax over the taps)."""
    if not (share and ow % block == 0):
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
    buf = token_buffer(len(planes) * c, length, src.device)
    body = buf[:, :length].view(len(planes), c, n, rows, ow)
    for k, p in enumerate(planes):
        r_win = axis_window(p.row0, g.stride[0], g.padding[0], p.rows, h)
        c_win = axis_window(p.col0, g.stride[1], g.padding[1], ow, w)
        _gather(body[k, :, :, :p.rows], src, ((r_win[0], c_win[0]), (r_win[1], c_win[1])), (2, 3))
        if p.rows < rows:
            body[k, :, :, p.rows:].zero_()
    return buf, rows


def unfolded_operands(src: torch.Tensor, g: ConvGeometry, oh: int, ow: int, spec: Columnwise,
              generator, whole_amax=None):
    """Yield ``(t, operand)`` for every tap t: the wgrad operand (C, Mp), made by ``spec`` from
    tap t of im2col(src)^T (tokens last, zero-padded), src (C, N, H, W) unpadded.

    The unfolded tensor is one tensor with one amax: ``whole_amax`` (the amax of the activation
    tensor, also when some pixels are in no tap) without the RHT; with the RHT the amax of the
    rotated im2col(src)^T over all taps, from a first pass over the chunks when there are
    several. It is built ``unfold_chunk_bytes(device)`` at a time (at least one plane), each
    chunk converted in one call. Taps that share their 16-token blocks (``_planes``) share the
    deterministic work: with RN the whole quantization (each block is quantized once: half the
    work for a k4 s2 convolution), with SR the RHT rotation (every tap's copy then draws its own
    random bits). Neither the chunking nor the sharing changes a bit (tested).
    """
    c, n = src.shape[:2]
    m = n * oh * ow
    planes = _planes(g, oh, ow, spec.quantize and (spec.deterministic_blocks or spec.rht),
                     spec.block)
    per_row = 4 * c * n * ow
    limit = unfold_chunk_bytes(src.device)
    chunks, size = [[]], 0
    for p in planes:
        if chunks[-1] and size + per_row * p.rows > limit:
            chunks.append([])
            size = 0
        chunks[-1].append(p)
        size += per_row * p.rows
    amax = None
    if spec.quantize and not spec.rht:
        amax = whole_amax
    elif spec.quantize and len(chunks) > 1:
        amax = torch.stack([kernels.apply_rht(_fill_planes(ch, src, g, oh, ow)[0],
                                              kernels=spec.kernels).abs().amax()
                            for ch in chunks]).amax()
    for ch in chunks:
        buf, rows = _fill_planes(ch, src, g, oh, ow)
        if rows == oh:  # every plane is one tap, stored as (C, Mp): no copy
            out = spec.apply(buf, generator, amax)
            for k, p in enumerate(ch):
                yield p.taps[0][0], out[k * c:(k + 1) * c]
            continue
        # shared planes: ow % block == 0, so m is a multiple of 16 and Mp == m
        taps = [(t, k, d) for k, p in enumerate(ch) for t, d in p.taps]
        if spec.deterministic_blocks:
            body = spec.apply(buf, generator, amax)[:, :n * rows * ow]
            body = body.view(len(ch), c, n, rows, ow)
            for t, k, d in taps:
                yield t, body[k, :, :, d:d + oh].reshape(c, m)
            continue
        # SR with the RHT: rotate each plane once, then quantize every tap's own copy
        rotated = kernels.apply_rht(buf, kernels=spec.kernels)
        chunk_amax = rotated.abs().amax() if amax is None else amax  # one chunk: all taps
        body = rotated[:, :n * rows * ow].view(len(ch), c, n, rows, ow)
        stacked = torch.empty(len(taps) * c, m, device=src.device)
        for i, (t, k, d) in enumerate(taps):
            stacked[i * c:(i + 1) * c].view(c, n, oh, ow).copy_(body[k, :, :, d:d + oh])
        del rotated, body
        out = kernels.fake_quantize(stacked, sr=True, generator=generator, amax=chunk_amax,
                                    kernels=spec.kernels, format=spec.format)
        for i, (t, _, _) in enumerate(taps):
            yield t, out[i * c:(i + 1) * c]



def per_tap(w2d: torch.Tensor, taps: int) -> torch.Tensor:
    """(R, taps * C) -> contiguous (taps, R, C): tap t's columns as one matrix."""
    r, k = w2d.shape
    return w2d.reshape(r, taps, k // taps).transpose(0, 1).contiguous()


# --------------------------------------------------------------------------------------------
# The two tap loops (shared by Conv2d and ConvTranspose2d, each the other's adjoint)
# --------------------------------------------------------------------------------------------
def gather_taps(src: torch.Tensor, w_taps: torch.Tensor, g: ConvGeometry,
                out_hw: tuple[int, int], in_hw: tuple[int, int]) -> torch.Tensor:
    """``sum_t gemm(im2col_t(src), w_taps[t])``, summed in tap order: src (N, *in_hw, C) NHWC,
    w_taps (T, R, C) -> fp32 (N * out_h * out_w, R). Conv2d fprop and ConvTranspose2d dgrad.

    One tap of im2col exists at a time, in one reused buffer (``_tap``), and one reused product
    buffer after the first tap."""
    n, c = src.shape[0], src.shape[-1]
    m = n * out_hw[0] * out_hw[1]
    a = torch.empty(n, *out_hw, c, device=src.device)
    acc, p = None, None
    for t in range(g.taps):
        at = _tap(a, src, g.window(t, *out_hw, *in_hw), (1, 2))
        if acc is None:
            acc = gemm(at.view(m, c), w_taps[t])
        else:
            p = gemm(at.view(m, c), w_taps[t], out=p if p is not None else torch.empty_like(acc))
            acc.add_(p)
    return acc


def scatter_taps(a: torch.Tensor, w_taps: torch.Tensor, g: ConvGeometry,
                 a_hw: tuple[int, int], out_hw: tuple[int, int]) -> torch.Tensor:
    """``sum_t col2im_t(gemm(a, w_taps[t]))``, scatter-added in tap order into zeros: a (M, K)
    the tokens of an (N, *a_hw) grid, w_taps (T, R, K) -> fp32 (N, *out_hw, R). Conv2d dgrad and
    ConvTranspose2d fprop. The parts of a product that fall on the padding are dropped."""
    n, r = a.shape[0] // (a_hw[0] * a_hw[1]), w_taps.shape[1]
    dst = torch.zeros(n, *out_hw, r, device=a.device)
    p = torch.empty(a.shape[0], r, device=a.device)  # one reused product buffer
    for t in range(g.taps):
        _scatter_add(dst, gemm(a, w_taps[t], out=p).view(n, *a_hw, r),
                     g.window(t, *a_hw, *out_hw), (1, 2))
    return dst
