"""Block formats: the element and scale formats a recipe quantizes its operands to.

Every recipe runs in every format; the recipe says which operands are quantized, how (RN or SR,
the RHT on wgrad operands, 1-D blocks or 2-D weight tiles), the format what they become:

==================== ======= ====== ====================== =========================================
format               element block  block scale            tensor scale / choice
==================== ======= ====== ====================== =========================================
nvfp4 (default)      E2M1    16     E4M3                   fp32 S_dec from the amax (``nvfp4.py``)
nvfp4_4over6         E2M1    16     E4M3                   fp32, E4M3 bound 256; per block the
                                                           scale to 4 or to 6, by MAE
nvfp4_4over6_mse     E2M1    16     E4M3                   the same, by MSE (``four_over_six.py``)
mxfp4                E2M1    32     E8M0, floor (OCP)      none (``mx.py``)
mxfp4_ceil / _even / E2M1    32     E8M0, torchao's other  none
_rceil / _te                        rules; TE's
mxfp8 (+ the same    E4M3    32     E8M0                   none (``mxfp8_te``: Transformer
rule variants)                                             Engine's MXFP8BlockScaling)
==================== ======= ====== ====================== =========================================

Where a recipe switch has no definition in a format's own library:

- 2-D weight tiles are ``block x block``: 16x16 under NVFP4 (TE's), 32x32 under MX, one scale
  per tile (for MX, the E8M0 rule applied to the tile's amax).
- The RHT stays the 16x16 transform of NVFP4 (``nvfp4.rht``), applied before the quantizer
  whatever the block size.
- Stochastic rounding is the rule of ``nvfp4.round_sr_abs`` on the element's own grid (E2M1 or
  E4M3), the same 8 random bits per element in the same order; under four over six the scale is
  chosen on the RN candidates first (``four_over_six.py``).
- MX formats have no tensor scale: an ``amax`` argument (a slice's whole-tensor amax) is ignored.
- A last dimension (or, with 2-D tiles, a row count) that is not a multiple of 32 is quantized
  as if zero-padded to one; padding zeros change no block amax.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from nvfp4bench.quant import four_over_six, mx
from nvfp4bench.quant.nvfp4 import (BLOCK, NVFP4Tensor, block_amax, check_sr, dequantize_blocks,
                                    draw_noise, e2m1_values, prepare_operand, row_blocks,
                                    tensor_amax, tile_amax)
from nvfp4bench.quant.nvfp4 import dequantize as nvfp4_dequantize
from nvfp4bench.quant.nvfp4 import quantize as nvfp4_quantize

DEFAULT_FORMAT = "nvfp4"
MX_BLOCK = 32
# Elements per row chunk of the formats' eager quantizer: their temporaries stay in cache
# (4096^2 RN, one thread, whole tensor vs chunks, side by side on a loaded 2-core machine:
# four over six 2137 -> 652 ms, MXFP4 557 -> 228 ms, MXFP8 412 -> 300 ms).
CHUNK_ELEMENTS = 1 << 16
_TENSOR_SCALE_BITS = 32


@dataclass(frozen=True)
class Format:
    """One block format (module docstring). ``scale`` is ``"e4m3"`` (NVFP4's E4M3 block scales
    under an fp32 tensor scale) or ``"e8m0"`` (MX); ``scale_rule`` the E8M0 rule
    (``mx.SCALE_RULES``); ``four_over_six`` None or its error mode (``"mae"``, ``"mse"``) with
    ``e4m3_bound`` the E4M3 bound of its tensor scale."""

    name: str
    element: mx.Element
    block: int
    scale: str
    description: str
    scale_rule: str | None = None
    four_over_six: str | None = None
    e4m3_bound: float = 448.0

    @property
    def is_nvfp4(self) -> bool:
        """Plain NVFP4: the arithmetic of ``nvfp4.py`` and its compiled kernels."""
        return self.scale == "e4m3" and self.four_over_six is None

    def tile(self, two_d: bool) -> tuple[int, int]:
        """The scale block: ``(1, block)``, or ``(block, block)`` for 2-D weight tiles."""
        return (self.block, self.block) if two_d else (1, self.block)

    @property
    def bits_per_element(self) -> float:
        """Storage bits per element, block scales included (an 8-bit scale per block; the one
        fp32 tensor scale of the NVFP4 family is not counted)."""
        return self.element.bits + 8 / self.block


def _nvfp4_family(name: str, description: str, **kw) -> Format:
    return Format(name, mx.E2M1, BLOCK, "e4m3", description, **kw)


def _mx(name: str, element: mx.Element, rule: str, description: str) -> Format:
    return Format(name, element, MX_BLOCK, "e8m0", description, scale_rule=rule)


_MX_RULES = {"floor": "OCP v1.0: 2^floor(log2 amax) over the element's largest power of two",
             "ceil": "2^ceil(log2 amax) over the element's largest power of two",
             "even": "amax rounded to the element's mantissa bits, then as floor",
             "rceil": "the smallest power of two >= amax / the element's max, as cuBLAS",
             "te": "as rceil, with Transformer Engine's reciprocal for the smallest code: TE's "
                   "MXFP8 arithmetic"}

FORMATS: dict[str, Format] = {f.name: f for f in (
    _nvfp4_family("nvfp4", "NVFP4: E2M1, 16-element blocks, E4M3 scales, fp32 tensor scale"),
    _nvfp4_family("nvfp4_4over6", "NVFP4 four over six: per block the scale to 4 or 6, by MAE "
                  "(E4M3 bound 256)", four_over_six="mae", e4m3_bound=256.0),
    _nvfp4_family("nvfp4_4over6_mse", "NVFP4 four over six, by MSE (E4M3 bound 256)",
                  four_over_six="mse", e4m3_bound=256.0),
    *(_mx(f"mxfp4{'' if rule == 'floor' else '_' + rule}", mx.E2M1, rule,
          f"MXFP4: E2M1, 32-element blocks, E8M0 scales ({text})")
      for rule, text in _MX_RULES.items()),
    *(_mx(f"mxfp8{'' if rule == 'floor' else '_' + rule}", mx.E4M3, rule,
          f"MXFP8: E4M3, 32-element blocks, E8M0 scales ({text})")
      for rule, text in _MX_RULES.items()),
)}


def get_format(format: str | Format | None) -> Format:
    """A registered format by name (None: ``nvfp4``), or a ``Format`` itself."""
    if isinstance(format, Format):
        return format
    name = DEFAULT_FORMAT if format is None else format
    try:
        return FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown format {name!r}; expected one of {sorted(FORMATS)}") from None


# --------------------------------------------------------------------------------------------
# Quantizing one prepared operand (2-D fp32, blocks along the last dimension)
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BlockScaledTensor:
    """A quantized 2-D tensor in a format other than plain NVFP4.

    values: fp32, the shape of the input: each element's value on its element grid (signed)
    scales: (M, K / block): E8M0 codes (uint8) for MX, float8_e4m3fn for four over six; with
            2-D tiles every row carries its tile's scale
    s_dec:  fp32 0-d, the tensor decode scale (four over six), or None (MX)
    """

    values: torch.Tensor
    scales: torch.Tensor
    s_dec: torch.Tensor | None
    format: Format
    tile: tuple[int, int]

    @property
    def shape(self) -> torch.Size:
        return self.values.shape


def _padded(x: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """x zero-padded at the end to multiples of (rows, cols)."""
    m, k = x.shape
    pad_m, pad_k = -m % rows, -k % cols
    if not (pad_m or pad_k):
        return x
    return torch.nn.functional.pad(x, (0, pad_k, 0, pad_m))


def _mx_blocks(x: torch.Tensor, fmt: Format, two_d: bool, noise, mode: str):
    """(values, codes) of an MX quantization of the prepared x (padding cropped off)."""
    m, k = x.shape
    rows, block = fmt.tile(two_d)
    xp = _padded(x, rows, block)
    x3 = xp.view(xp.shape[0], -1, block)
    codes = mx.e8m0_codes(tile_amax(x3.abs().amax(dim=-1, keepdim=True), rows), fmt.element,
                          fmt.scale_rule)
    y = x3 * mx.e8m0_encode(codes, fmt.scale_rule)
    if noise is None:
        values = fmt.element.round_rn(y)
    else:
        noise = _padded(noise, rows, block).view(x3.shape)
        values = torch.copysign(fmt.element.round_sr_abs(y.abs(), noise, mode), y)
    return values.view(xp.shape)[:m, :k], codes.squeeze(-1)[:m, :-(-k // block)]


def _mx_dequantize(values: torch.Tensor, codes: torch.Tensor, block: int) -> torch.Tensor:
    """``fl(element * 2^(c - 127))`` of (M, K) element values and their (M, ceil(K / block))
    codes, block by block."""
    m, k = values.shape
    padded = _padded(values, 1, block)
    x_hat = padded.view(m, -1, block) * mx.e8m0_values(codes).unsqueeze(-1)
    return x_hat.view(m, -1)[:, :k]


def _four_over_six_blocks(x: torch.Tensor, fmt: Format, two_d: bool, amax):
    """(x3, s_b, enc_b, S_dec, product) of a four-over-six quantization of the prepared x: its
    blocks (rows, K/16, 16), the kept scales and the kept RN candidate's ``fl(q * s_b)``."""
    x3 = row_blocks(x)
    tile_rows = fmt.tile(two_d)[0]
    bamax = tile_amax(block_amax(x3), tile_rows)
    amax = tensor_amax(bamax, amax, x.device)
    scale, encode, s_dec, _, product = four_over_six.choose_scales(
        x3, bamax, amax, bound=fmt.e4m3_bound, mode=fmt.four_over_six, tile_rows=tile_rows)
    return x3, scale, encode, s_dec, product


def fake_quantize_prepared(x: torch.Tensor, fmt: Format, two_d: bool, noise, mode: str,
                           amax=None) -> torch.Tensor:
    """``dequantize(quantize(x))`` in fp32 for a prepared (2-D, fp32, contiguous) x in a format
    other than plain NVFP4. ``noise``: the SR draws (``nvfp4.draw_noise`` of x's shape) or None
    for RN; ``mode`` the SR mode.

    Runs over whole tiles of rows, about ``CHUNK_ELEMENTS`` at a time, so that the many
    temporaries of one chunk stay in cache (the same bits: blocks and tiles lie within a chunk,
    and four over six takes the whole tensor's amax first)."""
    m, k = x.shape
    tile_rows = fmt.tile(two_d)[0]
    rows = max(tile_rows, CHUNK_ELEMENTS // max(k, 1) // tile_rows * tile_rows)
    if rows >= m:
        return _fake_quantize_rows(x, fmt, two_d, noise, mode, amax)
    if fmt.scale == "e4m3" and amax is None:
        amax = x.abs().amax()  # the tensor amax every chunk's S_enc comes from
    out = torch.empty_like(x)
    for start in range(0, m, rows):
        part = slice(start, start + rows)
        out[part] = _fake_quantize_rows(x[part], fmt, two_d,
                                        None if noise is None else noise[part], mode, amax)
    return out


def _fake_quantize_rows(x: torch.Tensor, fmt: Format, two_d: bool, noise, mode: str, amax):
    """``fake_quantize_prepared`` of whole tiles of rows (amax: the tensor's, or None)."""
    if fmt.scale == "e8m0":
        values, codes = _mx_blocks(x, fmt, two_d, noise, mode)
        return _mx_dequantize(values, codes, fmt.block)
    x3, scale, encode, s_dec, product = _four_over_six_blocks(x, fmt, two_d, amax)
    if noise is None:  # RN: x_hat = fl(fl(q * s_b) * S_dec) from the kept candidate
        return (product * s_dec).view(x.shape)
    return dequantize_blocks(x3, scale, encode, s_dec, noise.view(x3.shape), mode).view(x.shape)


def _two_d(tile) -> bool:
    return tuple(tile)[0] > 1


def _nvfp4_tile(two_d: bool) -> tuple[int, int]:
    """The tile argument ``prepare_operand`` checks shapes against (16-element rules)."""
    return (BLOCK, BLOCK) if two_d else (1, BLOCK)


def quantize(x: torch.Tensor, *, format: str | Format | None = None, tile=(1, BLOCK),
             rht: bool = False, sr: bool = False, generator: torch.Generator | None = None,
             sr_mode: str = "hardware", amax: torch.Tensor | None = None):
    """Quantize a 2-D tensor, blocks along its last dimension, to ``format``: an
    ``NVFP4Tensor`` for ``nvfp4`` (``nvfp4.quantize``), a ``BlockScaledTensor`` otherwise.
    ``tile``: (1, 16) blocks or (16, 16) for 2-D tiles (the format's own block size is used:
    (1, 32) / (32, 32) for MX); the other arguments as ``nvfp4.quantize``."""
    fmt = get_format(format)
    two_d = _two_d(tile)
    if fmt.is_nvfp4:
        return nvfp4_quantize(x, tile=tile, rht=rht, sr=sr, generator=generator,
                              sr_mode=sr_mode, amax=amax)
    if sr:
        check_sr(generator, sr_mode)
    with torch.no_grad():
        x, _ = prepare_operand(x.detach(), _nvfp4_tile(two_d), rht, "quantize")
        noise = draw_noise(x.shape, generator, sr_mode, x.device) if sr else None
        if fmt.scale == "e8m0":
            values, codes = _mx_blocks(x, fmt, two_d, noise, sr_mode)
            return BlockScaledTensor(values, codes.to(torch.uint8), None, fmt, fmt.tile(two_d))
        x3, scale, encode, s_dec, _ = _four_over_six_blocks(x, fmt, two_d, amax)
        if noise is not None:
            noise = noise.view(x3.shape)
        values = e2m1_values(x3, encode, noise, sr_mode if sr else "rn").view(x.shape)
        return BlockScaledTensor(values, scale.squeeze(-1).to(torch.float8_e4m3fn), s_dec, fmt,
                                 fmt.tile(two_d))


def dequantize(q, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The fp32 values of a quantized tensor (``NVFP4Tensor`` or ``BlockScaledTensor``), cast to
    ``dtype``."""
    if isinstance(q, NVFP4Tensor):
        return nvfp4_dequantize(q, dtype)
    if q.format.scale == "e8m0":
        return _mx_dequantize(q.values, q.scales.to(torch.int32), q.format.block).to(dtype)
    m, k = q.values.shape
    blocks = q.values.view(m, k // BLOCK, BLOCK) * q.scales.float().unsqueeze(-1)
    return (blocks * q.s_dec).view(m, k).to(dtype)
