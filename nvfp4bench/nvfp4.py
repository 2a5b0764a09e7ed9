"""NVFP4 quantization, exactly as Transformer Engine (2.14+) computes it, in plain PyTorch.

How NVFP4 stores a tensor
-------------------------
Every element is an E2M1 code (4 bits: sign, 2 exponent bits, 1 mantissa bit) whose magnitudes are
``0, 0.5, 1, 1.5, 2, 3, 4, 6``. Each block of 16 consecutive elements along the contraction
dimension (or each 16x16 tile, for 2-D weight scaling) shares one FP8 E4M3 decode scale ``s_b``,
and the whole tensor shares one fp32 decode scale ``S_dec`` derived from its amax::

    S_enc = fl(2688 / amax)        (2688 = 6 * 448; 1 when amax is 0 or inf)
    S_dec = fl(1 / S_enc)
    s_b   = e4m3(min(fl(bamax * fl(S_enc * fl(1/6))), 448))
    enc_b = min(fl(1 / fl(f32(s_b) * S_dec)), FLT_MAX)
    code  = E2M1(fl(x * enc_b))
    x_hat = fl(fl(e2m1(code) * f32(s_b)) * S_dec)

``fl`` is one IEEE fp32 rounding (nearest, ties to even). Each formula is evaluated in exactly that
order, because other algebraically equal orders round differently (see ``_block_scales``).

Rounding of the final E2M1 cast: round to nearest with ties to the even code (RN), or stochastic
rounding (SR) between the two neighbouring magnitudes, for gradients only. Before quantization an
operand may be rotated by the random Hadamard transform (RHT) along its last dimension, in tiles
of 16 elements, as TE does for the wgrad operands.

Functions
---------
``quantize`` returns an :class:`NVFP4Tensor` (codes, block scales, amax), ``dequantize`` turns it
back into fp32, ``fake_quantize`` fuses both without materialising codes (the training hot path),
``pack`` packs codes two per byte, ``rht`` rotates a tensor. Every function takes a 2-D tensor
whose dimensions are multiples of 16 and blocks along the last dimension; callers transpose for a
columnwise copy, as TE's columnwise path does.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

E2M1_MAX = 6.0  # largest E2M1 magnitude
E4M3_MAX = 448.0  # largest finite float8_e4m3fn
BLOCK = 16  # elements per scaling block
GLOBAL_ENCODE_NUMERATOR = E2M1_MAX * E4M3_MAX  # 2688
FLT_MAX = torch.finfo(torch.float32).max

# E2M1 magnitudes by code 0..7; codes 8..15 are the same magnitudes negated (8 is -0).
E2M1_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
SIGN_BIT = 8
# Code of each magnitude, indexed by 2 * magnitude (0, .5, 1, 1.5, 2, -, 3, -, 4, -, -, -, 6).
_CODE_OF_TWICE_MAGNITUDE = torch.tensor([0, 1, 2, 3, 4, 0, 5, 0, 6, 0, 0, 0, 7], dtype=torch.uint8)

# TE's fixed sign vector of the random Hadamard transform, the same for all layers and steps.
RHT_SIGNS = (1, 1, 1, -1, 1, -1, -1, -1, -1, -1, -1, 1, -1, 1, -1, -1)

SR_MODES = ("hardware", "ideal")
_VALID_TILES = ((1, BLOCK), (BLOCK, BLOCK))


@dataclass(frozen=True)
class NVFP4Tensor:
    """A quantized 2-D tensor: what TE stores for one copy of an operand.

    codes:  uint8, the shape of the input, one E2M1 code 0..15 per element (see ``pack``)
    scales: float8_e4m3fn, (M, K / 16): the decode scale of each block; with 16x16 tiles every
            row carries the scale of its tile
    amax:   fp32 0-d tensor, max |x| over the tensor (after the RHT when it was applied)
    tile:   the block shape, (1, 16) or (16, 16)
    """

    codes: torch.Tensor
    scales: torch.Tensor
    amax: torch.Tensor
    tile: tuple[int, int] = (1, BLOCK)

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape


# --------------------------------------------------------------------------------------------
# Scales
# --------------------------------------------------------------------------------------------
def global_encode_scale(amax: torch.Tensor) -> torch.Tensor:
    """``S_enc = min(fl(2688 / amax), FLT_MAX)``, and 1 where amax is 0 or S_enc underflows to 0."""
    amax = amax.float()
    s_enc = torch.clamp(GLOBAL_ENCODE_NUMERATOR / amax, max=FLT_MAX)
    return torch.where((amax == 0) | (s_enc == 0), torch.ones_like(s_enc), s_enc)


def global_decode_scale(amax: torch.Tensor) -> torch.Tensor:
    """``S_dec = fl(1 / S_enc)``: may be subnormal; never flushed."""
    return torch.reciprocal(global_encode_scale(amax))


def _block_scales(bamax: torch.Tensor, amax: torch.Tensor):
    """Block decode scales ``s_b`` (E4M3), their encode scales ``enc_b`` (fp32) and ``S_dec``.

    Bit-exactness: ``bamax * fl(S_enc * fl(1/6))`` is not ``(bamax / 6) * S_enc`` (TE 2.8-2.13),
    and ``1 / (s_b * S_dec)`` is not ``S_enc / s_b`` (torchao, ModelOpt); both differ in the last
    bit for about 0.1 % of blocks. The clamp to 448 comes before the E4M3 cast because PyTorch's
    cast turns values above 464 into NaN instead of saturating.
    """
    s_enc = global_encode_scale(amax)
    s_dec = torch.reciprocal(s_enc)
    one_sixth = torch.reciprocal(torch.tensor(E2M1_MAX, device=amax.device))  # fl(1/6)
    multiplier = s_enc * one_sixth
    scale_e4m3 = torch.clamp(bamax.float() * multiplier, max=E4M3_MAX).to(torch.float8_e4m3fn)
    # product first, then the reciprocal; a zero scale gives 1/0 = inf -> FLT_MAX
    encode = torch.clamp(torch.reciprocal(scale_e4m3.float() * s_dec), max=FLT_MAX)
    return scale_e4m3, encode, s_dec


def _block_amax(x: torch.Tensor, tile: tuple[int, int]) -> torch.Tensor:
    """max |x| per block: (M, K/16) for 1x16 blocks, (M/16, K/16) for 16x16 tiles."""
    m, k = x.shape
    if tile == (1, BLOCK):
        return torch.linalg.vector_norm(x.view(m, k // BLOCK, BLOCK), ord=float("inf"), dim=-1)
    return torch.linalg.vector_norm(x.view(m // BLOCK, BLOCK, k // BLOCK, BLOCK),
                                    ord=float("inf"), dim=(1, 3))


def _expand_tiles(per_block: torch.Tensor, tile: tuple[int, int]) -> torch.Tensor:
    """Per-block values -> one value per row-block, (M, K/16), so rows carry their tile's value."""
    if tile == (1, BLOCK):
        return per_block
    return per_block.repeat_interleave(BLOCK, dim=0)


# --------------------------------------------------------------------------------------------
# The E2M1 cast
# --------------------------------------------------------------------------------------------
def _grid_step(magnitude: torch.Tensor) -> torch.Tensor:
    """Spacing of the E2M1 grid around |y| in [0, 6]: 0.5 below 2, 1 below 4, 2 up to 6."""
    return torch.where(magnitude < 2.0, 0.5, torch.where(magnitude < 4.0, 1.0, 2.0))


def round_e2m1_rn(scaled: torch.Tensor) -> torch.Tensor:
    """RN cast of fp32 values to E2M1 magnitudes, signed: clamp to [-6, 6], nearest, ties to even.

    On each binade the grid is uniform (step 0.5 on [0, 2), 1 on [2, 4), 2 on [4, 6]), and rounding
    to a multiple of the step with ties to even multiples is rounding to the even code:
    0.25 -> 0, 0.75 -> 1, 1.25 -> 1, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4 (all ties to even).
    """
    magnitude = scaled.abs().clamp_(max=E2M1_MAX)
    step = _grid_step(magnitude)
    rounded = torch.round(magnitude / step).mul_(step)  # step is a power of two: exact
    return torch.copysign(rounded, scaled)


def round_e2m1_sr(scaled: torch.Tensor, generator: torch.Generator,
                  mode: str = "hardware") -> torch.Tensor:
    """SR cast to E2M1: round |y| up to the next magnitude with probability f, else down.

    With ``lo <= |y| <= hi`` the neighbouring magnitudes and ``f = (|y| - lo) / (hi - lo)``:
    ``hardware`` rounds up with probability ``floor(256 f) / 256`` (8 random bits ``r`` per
    element: up when ``r < floor(256 f)``, i.e. when ``(r + 1) / 256 <= f``); ``ideal`` rounds up
    with probability f (a continuous uniform). A value on the grid never moves.
    """
    if mode not in SR_MODES:
        raise ValueError(f"sr_mode must be one of {SR_MODES}, got {mode!r}")
    if not isinstance(generator, torch.Generator):
        raise ValueError("stochastic rounding needs an explicit, seeded torch.Generator "
                         "(pass generator=torch.Generator(device).manual_seed(seed))")
    magnitude = scaled.abs().clamp_(max=E2M1_MAX)
    step = _grid_step(magnitude)
    low = torch.floor(magnitude / step).mul_(step)
    fraction = (magnitude - low).div_(step)  # exact: step is a power of two
    if mode == "hardware":
        bits = torch.randint(0, 256, magnitude.shape, generator=generator, dtype=torch.uint8,
                             device=magnitude.device)
        threshold = (bits.float() + 1.0).mul_(1.0 / 256.0)
    else:
        threshold = torch.rand(magnitude.shape, generator=generator, device=magnitude.device)
    rounded = torch.where(threshold <= fraction if mode == "hardware" else threshold < fraction,
                          low + step, low)
    return torch.copysign(rounded, scaled)


def _codes_of(signed_values: torch.Tensor) -> torch.Tensor:
    """E2M1 codes (uint8 0..15) of signed grid values; the sign bit comes from the sign of the
    scaled input, so a tiny negative value that rounds to 0 becomes code 8."""
    lut = _CODE_OF_TWICE_MAGNITUDE.to(signed_values.device)
    codes = lut[(signed_values.abs() * 2).to(torch.int64)]
    return codes | (torch.signbit(signed_values).to(torch.uint8) << 3)


# --------------------------------------------------------------------------------------------
# Random Hadamard transform
# --------------------------------------------------------------------------------------------
def hadamard_matrix(n: int = BLOCK) -> torch.Tensor:
    """Sylvester Hadamard matrix: ``H[i, j] = (-1) ** popcount(i & j)``, fp32, entries +-1."""
    idx = torch.arange(n)
    anded = idx[:, None] & idx[None, :]
    popcount = torch.zeros_like(anded)
    for bit in range(max(n - 1, 1).bit_length()):
        popcount += (anded >> bit) & 1
    return (1 - 2 * (popcount % 2)).float()


def rht_matrix(device: torch.device | str | None = None) -> torch.Tensor:
    """``R = diag(s) @ H16 / 4``, fp32, orthonormal (``R @ R.T == I`` exactly: entries are +-1/4)."""
    signs = torch.tensor(RHT_SIGNS, dtype=torch.float32)
    return (signs[:, None] * hadamard_matrix(BLOCK) / 4.0).to(device)


def rht(x: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` along its last dimension, 16 elements at a time: ``v_rot = v @ R``.

    As TE does: the input is rounded to bf16, rotated in fp32, and rounded to bf16 again before
    amax and quantization. Returns fp32 (holding bf16 values), the shape of ``x``.
    """
    _check_2d(x, "rht")
    m, k = x.shape
    tiles = x.to(torch.bfloat16).float().view(m, k // BLOCK, BLOCK)
    rotated = torch.matmul(tiles, rht_matrix(x.device))
    return rotated.to(torch.bfloat16).float().view(m, k)


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------
def _check_2d(x: torch.Tensor, what: str, tile: tuple[int, int] = (1, BLOCK)) -> None:
    if x.dim() != 2:
        raise ValueError(f"{what}: expected a 2-D tensor, got shape {tuple(x.shape)}; "
                         f"reshape to (rows, K) with blocks along the last dimension")
    if not x.is_floating_point():
        raise ValueError(f"{what}: expected a floating-point tensor, got {x.dtype}")
    m, k = x.shape
    if m % tile[0] or k % BLOCK or (tile[0] > 1 and m % BLOCK):
        raise ValueError(f"{what}: both dimensions of a quantized operand must be multiples of "
                         f"{BLOCK}, got {tuple(x.shape)}; zero-pad the operand (padding zeros "
                         f"change neither amax nor a GEMM)")


def _check_tile(tile) -> tuple[int, int]:
    tile = tuple(tile)
    if tile not in _VALID_TILES:
        raise ValueError(f"tile must be one of {_VALID_TILES}, got {tile}")
    return tile


def _prepare(x: torch.Tensor, tile, rht_on: bool, what: str) -> tuple[torch.Tensor, tuple]:
    tile = _check_tile(tile)
    _check_2d(x, what, (BLOCK, BLOCK) if tile == (BLOCK, BLOCK) else (1, BLOCK))
    if rht_on and tile != (1, BLOCK):
        raise ValueError(f"{what}: the RHT is applied to 1x16 (columnwise wgrad) operands only")
    x = rht(x) if rht_on else x.float()
    return x.contiguous(), tile


def _scaled(x: torch.Tensor, tile: tuple[int, int]):
    """``fl(x * enc_b)`` for every element, with the scales it used."""
    bamax = _block_amax(x, tile)
    amax = bamax.max() if bamax.numel() else torch.zeros((), device=x.device)
    scale_e4m3, encode, s_dec = _block_scales(bamax, amax)
    m, k = x.shape
    encode = _expand_tiles(encode, tile)
    scaled = (x.view(m, k // BLOCK, BLOCK) * encode.unsqueeze(-1)).view(m, k)
    return scaled, _expand_tiles(scale_e4m3, tile), amax, s_dec


def _round(scaled: torch.Tensor, sr: bool, generator, sr_mode: str) -> torch.Tensor:
    return round_e2m1_sr(scaled, generator, sr_mode) if sr else round_e2m1_rn(scaled)


def quantize(x: torch.Tensor, *, tile=(1, BLOCK), rht: bool = False, sr: bool = False,
             generator: torch.Generator | None = None, sr_mode: str = "hardware") -> NVFP4Tensor:
    """Quantize a 2-D tensor to NVFP4, blocks along the last dimension.

    tile:      (1, 16) blocks, or (16, 16) tiles (2-D weight scaling; one scale per tile)
    rht:       rotate the last dimension by the RHT first (1x16 only; the caller passes the
               transposed operand, as TE's columnwise path does); amax is the rotated tensor's
    sr:        stochastic rounding of the final E2M1 cast, drawing from ``generator``
    """
    x, tile = _prepare(x, tile, rht, "quantize")
    scaled, scales, amax, _ = _scaled(x, tile)
    return NVFP4Tensor(codes=_codes_of(_round(scaled, sr, generator, sr_mode)), scales=scales,
                       amax=amax, tile=tile)


def dequantize(q: NVFP4Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``x_hat = fl(fl(e2m1(code) * f32(s_b)) * S_dec)`` in fp32, then cast to ``dtype``."""
    values = E2M1_VALUES.to(q.codes.device)[(q.codes & 7).to(torch.int64)]
    values = torch.where((q.codes & SIGN_BIT) != 0, -values, values)
    m, k = q.codes.shape
    blocks = values.view(m, k // BLOCK, BLOCK) * q.scales.float().unsqueeze(-1)
    return (blocks * global_decode_scale(q.amax)).view(m, k).to(dtype)


def fake_quantize(x: torch.Tensor, *, tile=(1, BLOCK), rht: bool = False, sr: bool = False,
                  generator: torch.Generator | None = None,
                  sr_mode: str = "hardware") -> torch.Tensor:
    """``dequantize(quantize(x, ...))`` in fp32, without materialising codes: the QAT hot path."""
    x, tile = _prepare(x, tile, rht, "fake_quantize")
    scaled, scales, amax, s_dec = _scaled(x, tile)
    values = _round(scaled, sr, generator, sr_mode)
    m, k = x.shape
    blocks = values.view(m, k // BLOCK, BLOCK).mul_(scales.float().unsqueeze(-1))
    return blocks.mul_(s_dec).view(m, k)


def pack(codes: torch.Tensor) -> torch.Tensor:
    """Two codes per byte, the element with the even index in the low nibble: (M, K) -> (M, K/2)."""
    if codes.dim() != 2 or codes.shape[-1] % 2:
        raise ValueError(f"pack: expected 2-D codes with an even last dimension, "
                         f"got {tuple(codes.shape)}")
    codes = codes.to(torch.uint8)
    return codes[:, 0::2] | (codes[:, 1::2] << 4)
