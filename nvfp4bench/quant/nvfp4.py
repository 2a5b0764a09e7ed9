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
order, because other algebraically equal orders round differently (see ``block_scales_f32``).

Rounding of the final E2M1 cast: round to nearest with ties to the even code (RN), or stochastic
rounding (SR) between the two neighbouring magnitudes, for gradients only. Before quantization an
operand may be rotated by the random Hadamard transform (RHT) along its last dimension, in tiles
of 16 elements, as TE does for the wgrad operands.

Functions
---------
``quantize`` returns an :class:`NVFP4Tensor` (codes, block scales, amax), ``dequantize`` turns it
back into fp32, ``fake_quantize`` (in ``nvfp4bench.quant.kernels``, which runs the formulas of
this module as eager PyTorch or compiled kernels) fuses both without materialising codes (the
training hot path), ``pack`` packs codes two per byte, ``rht`` rotates a tensor. Every function takes a 2-D tensor
and blocks along its last dimension, whose length must be a multiple of 16 (the row count too
with 16x16 tiles; with 1x16 blocks any row count, as if zero-padded); callers transpose for a
columnwise copy, as TE's columnwise path does, or call ``kernels.fake_quantize_columnwise``, which
makes the (RN or SR, not rotated) columnwise copy of an (..., M, C) tensor without transposing
it first.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import math
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

# fp32 bit fields used by the E2M1 cast (see ``_grid_step_bits``)
_F32_EXPONENT_MASK = 0x7F800000  # the 8 exponent bits
_F32_EXPONENT_ONE = 1 << 23  # one unit of the exponent field: a factor of 2
_F32_HALF = 0x3F000000  # bits of 0.5, the smallest E2M1 grid step
_F32_E4M3_MIN_STEP = 0x3B000000  # bits of 2**-9, the E4M3 subnormal step
_F32_EXPONENT_NEGATE = 0x7F000000  # minus the bits of 2**s: the bits of 2**-s



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
def global_encode_scale(amax: torch.Tensor,
                        numerator: float = GLOBAL_ENCODE_NUMERATOR) -> torch.Tensor:
    """``S_enc = min(fl(2688 / amax), FLT_MAX)``, and 1 where amax is 0 or S_enc underflows to 0.

    A true division: PyTorch evaluates ``2688 / tensor`` as ``tensor.reciprocal() * 2688``, two
    roundings that differ from ``fl(2688 / amax)`` for about a quarter of all amax values.
    ``numerator``: ``6 * E4M3 bound``, 2688 but for a format with another bound (4over6: 1536).
    """
    amax = amax.float()
    s_enc = torch.clamp(torch.full_like(amax, numerator).div_(amax), max=FLT_MAX)
    return torch.where((amax == 0) | (s_enc == 0), torch.ones_like(s_enc), s_enc)


def global_decode_scale(amax: torch.Tensor) -> torch.Tensor:
    """``S_dec = fl(1 / S_enc)``: may be subnormal; never flushed."""
    return torch.reciprocal(global_encode_scale(amax))


def e4m3_cast(v: torch.Tensor) -> torch.Tensor:
    """fp32 values in [0, 448] -> the nearest E4M3 value (RNE, subnormals kept), as fp32."""
    return v.to(torch.float8_e4m3fn).float()


def e4m3_round(v: torch.Tensor) -> torch.Tensor:
    """``e4m3_cast`` in fp32 arithmetic (for compiled kernels, which then need no FP8 cast):
    round to a multiple of the E4M3 step ``2 ** max(e - 3, -9)`` (3 mantissa bits; 2**-9 is the
    subnormal step) with ties to even. Scaling by the step and its reciprocal is exact."""
    exponent = torch.bitwise_and(v.view(torch.int32), _F32_EXPONENT_MASK)  # bits of 2 ** e
    step = (exponent - 3 * _F32_EXPONENT_ONE).clamp(min=_F32_E4M3_MIN_STEP).view(torch.float32)
    return torch.round(v * _reciprocal_pow2(step)) * step


def block_scales_f32(bamax: torch.Tensor, amax: torch.Tensor, to_e4m3=e4m3_cast):
    """``s_b`` (fp32 holding E4M3 values), ``enc_b`` and ``S_dec``, in the order of section 2.

    Bit-exactness: ``bamax * fl(S_enc * fl(1/6))`` is not ``(bamax / 6) * S_enc`` (TE 2.8-2.13),
    and ``1 / (s_b * S_dec)`` is not ``S_enc / s_b`` (torchao, ModelOpt); both differ in the last
    bit for about 0.1 % of blocks. The clamp to 448 comes before the E4M3 rounding because
    PyTorch's cast turns values above 464 into NaN instead of saturating.
    """
    s_enc = global_encode_scale(amax)
    s_dec = torch.reciprocal(s_enc)
    multiplier = s_enc * torch.reciprocal(torch.full_like(s_enc, E2M1_MAX))  # fl(S_enc * fl(1/6))
    scale = to_e4m3(torch.clamp(bamax.float() * multiplier, max=E4M3_MAX))
    # product first, then the reciprocal; a zero scale gives 1/0 = inf -> FLT_MAX
    encode = torch.clamp(torch.reciprocal(scale * s_dec), max=FLT_MAX)
    return scale, encode, s_dec


def tensor_amax(bamax: torch.Tensor, amax, device) -> torch.Tensor:
    """The given amax as an fp32 0-d tensor, or the max of the block amaxes."""
    if amax is not None:
        return torch.as_tensor(amax, dtype=torch.float32, device=device)
    return bamax.max() if bamax.numel() else torch.zeros((), device=device)


# --------------------------------------------------------------------------------------------
# The E2M1 cast
# --------------------------------------------------------------------------------------------
def _grid_step(magnitude: torch.Tensor) -> torch.Tensor:
    """Spacing of the E2M1 grid around |y| in [0, 6]: 0.5 below 2, 1 below 4, 2 up to 6."""
    return torch.where(magnitude < 2.0, 0.5, torch.where(magnitude < 4.0, 1.0, 2.0))


def _grid_step_bits(y: torch.Tensor) -> torch.Tensor:
    """``_grid_step`` of |y| <= 6 from the exponent bits of y (either sign): ``2 ** max(e - 1, -1)``
    where ``2 ** e <= |y| < 2 ** (e + 1)``; integer ops, no comparison masks."""
    exponent = torch.bitwise_and(y.view(torch.int32), _F32_EXPONENT_MASK)  # bits of 2 ** e
    return (exponent - _F32_EXPONENT_ONE).clamp(min=_F32_HALF).view(torch.float32)


def _reciprocal_pow2(step: torch.Tensor) -> torch.Tensor:
    """``1 / step`` for a power of two 2 ** s (normal): 2 ** -s, by negating the exponent field."""
    return (_F32_EXPONENT_NEGATE - step.view(torch.int32)).view(torch.float32)


def grid_steps_bits(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(step, 1 / step)`` of the E2M1 grid around y, |y| <= 6, from y's exponent bits: the
    fastest form in eager PyTorch (integer ops on whole tensors)."""
    step = _grid_step_bits(y)
    return step, _reciprocal_pow2(step)


def grid_steps_compare(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(step, 1 / step)`` of the E2M1 grid around y, |y| <= 6, by two comparisons of |y|: the
    same powers of two as ``grid_steps_bits`` for every such y, -0 and subnormals included (a NaN
    gets other steps from the two, and a NaN from the product that uses them either way), in the
    form compiled kernels vectorise (inductor's CPU code moves an int32 <-> fp32 bit cast through
    memory, element by element)."""
    magnitude = y.abs()
    below_2, below_4 = magnitude < 2.0, magnitude < 4.0
    step = torch.where(below_2, 0.5, torch.where(below_4, 1.0, 2.0))
    inverse = torch.where(below_2, 2.0, torch.where(below_4, 1.0, 0.5))
    return step, inverse


def _round_rn(scaled: torch.Tensor, grid_steps=grid_steps_bits) -> torch.Tensor:
    """RN cast of fp32 values to signed E2M1 magnitudes: clamp to [-6, 6], round to the nearest
    grid value, ties to the even code.

    On each binade the grid is uniform (step 0.5 on [0, 2), 1 on [2, 4), 2 on [4, 6]), and rounding
    to a multiple of the step with ties to even multiples is rounding to the even code:
    0.25 -> 0, 0.75 -> 1, 1.25 -> 1, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4 (all ties to even).
    Scaling by the step and its reciprocal (powers of two) is exact, ``round`` is RNE, and all of
    it is symmetric in the sign, so a tiny negative value becomes -0. ``grid_steps``: either
    form of ``(step, 1 / step)`` (the same values).
    """
    y = scaled.clamp(min=-E2M1_MAX, max=E2M1_MAX)
    step, inverse = grid_steps(y)
    return torch.round(y * inverse) * step


def round_sr_abs(magnitude: torch.Tensor, noise: torch.Tensor, mode: str,
                 grid_steps=grid_steps_bits, limit: float = E2M1_MAX) -> torch.Tensor:
    """SR cast of magnitudes |y| >= 0 with the given random draws.

    In grid steps ``t = |y| / step`` (exact), ``lo = floor(t)`` and ``f = t - lo`` (exact).
    ``hardware``: ``noise`` holds 8 random bits ``r`` per element (uint8), up when
    ``r < floor(256 f)`` (i.e. when ``(r + 1) / 256 <= f``; ``256 f`` is exact). ``ideal``:
    ``noise`` is uniform in [0, 1), up when ``noise < f``. A value on the grid has ``f = 0`` and
    never moves. ``grid_steps`` as in ``_round_rn``; ``limit``: the largest grid value (another
    element type's grid and max, ``mx.Element``).
    """
    a = magnitude.clamp(max=limit)
    step, inverse = grid_steps(a)
    t = a * inverse
    low = torch.floor(t)
    fraction = t - low
    up = noise < (torch.floor(fraction * 256.0) if mode == "hardware" else fraction)
    return (low + up) * step


def check_sr(generator, mode: str) -> None:
    if mode not in SR_MODES:
        raise ValueError(f"sr_mode must be one of {SR_MODES}, got {mode!r}")
    if not isinstance(generator, torch.Generator):
        raise ValueError("stochastic rounding needs an explicit, seeded torch.Generator "
                         "(pass generator=torch.Generator(device).manual_seed(seed))")


# The one hook into the SR draws (``shared_noise``): None, or a CPU generator that every draw
# of the current context takes its bits from instead of the caller's generator.
_SHARED_NOISE: contextvars.ContextVar[torch.Generator | None] = contextvars.ContextVar(
    "nvfp4_shared_noise", default=None)


@contextlib.contextmanager
def shared_noise(cpu_generator: torch.Generator):
    """Within the block (this thread or task), every SR draw of the quantizer comes from
    ``cpu_generator`` on the CPU and is then moved to the tensor's device, so that a CPU run
    and a GPU run round with the same random bits (a CUDA generator draws other numbers than a
    CPU one). The caller's generator is still checked (``check_sr``), never drawn from. For
    checking the arithmetic across devices; training never uses it."""
    if not isinstance(cpu_generator, torch.Generator) or cpu_generator.device.type != "cpu":
        raise ValueError("shared_noise needs a torch.Generator on the CPU")
    token = _SHARED_NOISE.set(cpu_generator)
    try:
        yield
    finally:
        _SHARED_NOISE.reset(token)


def draw_noise(shape, generator, mode: str, device) -> torch.Tensor:
    """The random draws of one SR cast, from ``generator``: 8 random bits per element (uint8,
    taken four at a time from uniform int32 draws, 3x faster than one draw each) for
    ``hardware``; fp32 uniform in [0, 1) for ``ideal``. Inside ``shared_noise`` the bits come
    from its CPU generator instead, then move to ``device``."""
    check_sr(generator, mode)
    shared = _SHARED_NOISE.get()
    if shared is not None:
        return _draw(shape, shared, mode, torch.device("cpu")).to(device)
    return _draw(shape, generator, mode, device)


def _draw(shape, generator, mode: str, device) -> torch.Tensor:
    """``draw_noise``'s draws themselves, from ``generator`` on ``device``."""
    shape = torch.Size(shape)
    if mode == "ideal":
        return torch.rand(shape, generator=generator, device=device)
    words = torch.randint(-2 ** 31, 2 ** 31, ((shape.numel() + 3) // 4,), generator=generator,
                          dtype=torch.int32, device=device)
    return words.view(torch.uint8)[:shape.numel()].view(shape)


def round_e2m1_rn(scaled: torch.Tensor) -> torch.Tensor:
    """RN cast of fp32 values to E2M1 magnitudes, signed: clamp to [-6, 6], nearest, ties to even
    (see ``_round_rn``). The sign is kept, so a tiny negative value becomes -0."""
    return _round_rn(scaled.float())


def round_e2m1_sr(scaled: torch.Tensor, generator: torch.Generator,
                  mode: str = "hardware") -> torch.Tensor:
    """SR cast to E2M1: round |y| up to the next magnitude with probability f, else down.

    With ``lo <= |y| <= hi`` the neighbouring magnitudes and ``f = (|y| - lo) / (hi - lo)``:
    ``hardware`` rounds up with probability ``floor(256 f) / 256`` (8 random bits ``r`` per
    element: up when ``r < floor(256 f)``, i.e. when ``(r + 1) / 256 <= f``); ``ideal`` rounds up
    with probability f (a continuous uniform). A value on the grid never moves.
    """
    noise = draw_noise(scaled.shape, generator, mode, scaled.device)
    return torch.copysign(round_sr_abs(scaled.float().abs(), noise, mode), scaled)


def e2m1_codes(values: torch.Tensor, sign_of: torch.Tensor) -> torch.Tensor:
    """E2M1 codes (uint8 0..15) of grid values; the sign bit comes from the sign of the input,
    so a tiny negative value that rounds to 0 becomes code 8."""
    lut = _CODE_OF_TWICE_MAGNITUDE.to(values.device)
    codes = lut[(values.abs() * 2).to(torch.int64)]
    return codes | (torch.signbit(sign_of).to(torch.uint8) << 3)


# --------------------------------------------------------------------------------------------
# The two passes over the tensor: block amax, then x -> x_hat
# --------------------------------------------------------------------------------------------
def row_blocks(x: torch.Tensor) -> torch.Tensor:
    """View (M, K) as (M, K / 16, 16): ``[i, j, :]`` is the j-th 1x16 block of row i."""
    m, k = x.shape
    return x.view(m, k // BLOCK, BLOCK)


def block_amax(x3: torch.Tensor) -> torch.Tensor:
    """max |x| per 1x16 block: (rows, K/16, 16) -> (rows, K/16, 1)."""
    return x3.abs().amax(dim=-1, keepdim=True)


def tile_amax(bamax: torch.Tensor, tile_rows: int) -> torch.Tensor:
    """1x16 block amax (M, K/16, 1) -> the amax of each T x 16 tile, repeated on its T rows."""
    if tile_rows == 1:
        return bamax
    m, kb, _ = bamax.shape
    tiles = bamax.view(m // tile_rows, tile_rows, kb, 1).amax(dim=1, keepdim=True)
    return tiles.expand(-1, tile_rows, -1, -1).reshape(m, kb, 1)


def e2m1_values(x3, encode, noise, mode: str, grid_steps=grid_steps_bits) -> torch.Tensor:
    """``e2m1(fl(x * enc_b))``, signed. SR works on magnitudes and restores x's sign at the end:
    exact, as IEEE products and the rounding are symmetric in the sign."""
    if noise is None:
        return _round_rn(x3 * encode, grid_steps)
    return torch.copysign(round_sr_abs(x3.abs() * encode, noise, mode, grid_steps), x3)


def dequantize_blocks(x3, scale, encode, s_dec, noise, mode: str, out=None,
                      grid_steps=grid_steps_bits) -> torch.Tensor:
    """``x_hat = fl(fl(e2m1(fl(x * enc_b)) * f32(s_b)) * S_dec)``.

    ``x3`` is (a chunk of) x as (rows, K/16, 16); ``scale`` and ``encode`` (fp32 ``s_b`` and
    ``enc_b``) are (rows, K/16, 1); ``s_dec`` is 0-d; ``noise`` is None for RN; ``grid_steps``
    how the E2M1 cast finds its grid step (``grid_steps_bits`` or ``grid_steps_compare``: the
    same bits).
    """
    values = e2m1_values(x3, encode, noise, mode, grid_steps)
    return torch.mul(values * scale, s_dec, out=out)


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


@functools.lru_cache(maxsize=8)
def device_rht_matrix(device: torch.device) -> torch.Tensor:
    """``rht_matrix(device)``, made once per device and shared (never modify it in place): the
    matrix is built on the CPU, and a blocking CPU -> GPU copy per call would make the host wait
    for the GPU's queue each time."""
    return rht_matrix(device)


def rht(x: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` along its last dimension, 16 elements at a time: ``v_rot = v @ R``.

    As TE does: the input is rounded to bf16, rotated in fp32, and rounded to bf16 again before
    amax and quantization. Returns fp32 (holding bf16 values), the shape of ``x``.
    """
    check_2d(x, "rht")
    m, k = x.shape
    tiles = x.to(torch.bfloat16).float().view(m, k // BLOCK, BLOCK)
    rotated = torch.matmul(tiles, device_rht_matrix(x.device))
    return rotated.to(torch.bfloat16).float().view(m, k)


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------
def check_2d(x: torch.Tensor, what: str, tile: tuple[int, int] = (1, BLOCK)) -> None:
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


def prepare_operand(x: torch.Tensor, tile, rht_on: bool, what: str,
                    rotate=None) -> tuple[torch.Tensor, tuple]:
    """x checked (2-D, the tile fits) as contiguous fp32, rotated by the RHT when ``rht_on``
    (``rotate``: a function computing ``rht``'s bits, e.g. on compiled kernels; default
    ``rht``), and the checked tile."""
    tile = _check_tile(tile)
    check_2d(x, what, (BLOCK, BLOCK) if tile == (BLOCK, BLOCK) else (1, BLOCK))
    if rht_on and tile != (1, BLOCK):
        raise ValueError(f"{what}: the RHT is applied to 1x16 (columnwise wgrad) operands only")
    x = (rotate or rht)(x) if rht_on else x.float()
    return x.contiguous(), tile


def quantize(x: torch.Tensor, *, tile=(1, BLOCK), rht: bool = False, sr: bool = False,
             generator: torch.Generator | None = None, sr_mode: str = "hardware",
             amax: torch.Tensor | None = None) -> NVFP4Tensor:
    """Quantize a 2-D tensor to NVFP4, blocks along the last dimension.

    tile:      (1, 16) blocks, or (16, 16) tiles (2-D weight scaling; one scale per tile)
    rht:       rotate the last dimension by the RHT first (1x16 only; the caller passes the
               transposed operand, as TE's columnwise path does); amax is the rotated tensor's
    sr:        stochastic rounding of the final E2M1 cast, drawing from ``generator``
    amax:      the tensor amax to derive S_enc from, when ``x`` is one slice of a larger tensor
               that is quantized piece by piece (with ``rht``, the rotated tensor's amax);
               default: max |x|. It must be >= max |x|, or the largest blocks saturate.

    With 1x16 blocks the row count is free (as if the rows were zero-padded to 16).
    """
    if sr:
        check_sr(generator, sr_mode)
    with torch.no_grad():
        return _quantize_2d(*prepare_operand(x.detach(), tile, rht, "quantize"), sr, generator, sr_mode,
                            amax)


def _quantize_2d(x: torch.Tensor, tile, sr: bool, generator, sr_mode: str, amax) -> NVFP4Tensor:
    """quantize of a prepared 2-D tensor (always eager: not the hot path)."""
    x3 = row_blocks(x)
    bamax = tile_amax(block_amax(x3), tile[0])
    amax = tensor_amax(bamax, amax, x.device)
    scale, encode, _ = block_scales_f32(bamax, amax)
    noise = draw_noise(x3.shape, generator, sr_mode, x.device) if sr else None
    values = e2m1_values(x3, encode, noise, sr_mode if sr else "rn")  # signed
    return NVFP4Tensor(codes=e2m1_codes(values, x3).view(x.shape),
                       scales=scale.squeeze(-1).to(torch.float8_e4m3fn), amax=amax, tile=tile)


def dequantize(q: NVFP4Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``x_hat = fl(fl(e2m1(code) * f32(s_b)) * S_dec)`` in fp32, then cast to ``dtype``."""
    values = E2M1_VALUES.to(q.codes.device)[(q.codes & 7).to(torch.int64)]
    values = torch.where((q.codes & SIGN_BIT) != 0, -values, values)
    m, k = q.codes.shape
    blocks = values.view(m, k // BLOCK, BLOCK) * q.scales.float().unsqueeze(-1)
    return (blocks * global_decode_scale(q.amax)).view(m, k).to(dtype)


def check_tokens_first(x: torch.Tensor, what: str) -> None:
    if x.dim() < 2 or not x.is_floating_point():
        raise ValueError(f"{what}: expected a floating-point (..., M, C) tensor, got {x.dtype} "
                         f"of shape {tuple(x.shape)}")


def padded_tokens(m: int) -> int:
    """M rounded up to a multiple of 16: the token count of a columnwise (wgrad) copy."""
    return -(-m // BLOCK) * BLOCK


def columnwise_copy(x: torch.Tensor) -> torch.Tensor:
    """The high-precision columnwise copy of an (..., M, C) operand, TE's layout for the wgrad:
    each matrix transposed, (C, M), its tokens zero-padded to Mp (a multiple of 16), stacked as
    fp32 (prod(...) * C, Mp). The copy (C rows) may have any row count."""
    check_tokens_first(x, "columnwise_copy")
    *batch, m, c = x.shape
    mp = padded_tokens(m)
    copy = torch.empty(c * math.prod(batch), mp, device=x.device)
    copy[:, m:].zero_()
    if batch:
        copy.view(*batch, c, mp)[..., :m].copy_(x.mT)
    elif mp == m:
        copy.copy_(x.mT)  # a 2-D transpose into a contiguous tensor: torch's blocked copy
    else:
        copy[:, :m].copy_(x.mT.contiguous())  # the same, then a plain copy of the rows
    return copy


def pack(codes: torch.Tensor) -> torch.Tensor:
    """Two codes per byte, the element with the even index in the low nibble: (M, K) -> (M, K/2)."""
    if codes.dim() != 2 or codes.shape[-1] % 2:
        raise ValueError(f"pack: expected 2-D codes with an even last dimension, "
                         f"got {tuple(codes.shape)}")
    codes = codes.to(torch.uint8)
    return codes[:, 0::2] | (codes[:, 1::2] << 4)
