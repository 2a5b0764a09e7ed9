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
order, because other algebraically equal orders round differently (see ``_block_scales_f32``).

Rounding of the final E2M1 cast: round to nearest with ties to the even code (RN), or stochastic
rounding (SR) between the two neighbouring magnitudes, for gradients only. Before quantization an
operand may be rotated by the random Hadamard transform (RHT) along its last dimension, in tiles
of 16 elements, as TE does for the wgrad operands.

Functions
---------
``quantize`` returns an :class:`NVFP4Tensor` (codes, block scales, amax), ``dequantize`` turns it
back into fp32, ``fake_quantize`` fuses both without materialising codes (the training hot path),
``pack`` packs codes two per byte, ``rht`` rotates a tensor. Every function takes a 2-D tensor
and blocks along its last dimension, whose length must be a multiple of 16 (the row count too
with 16x16 tiles; with 1x16 blocks any row count, as if zero-padded); callers transpose for a
columnwise copy, as TE's columnwise path does, or call ``fake_quantize_columnwise``, which
makes the (RN or SR, not rotated) columnwise copy of an (..., M, C) tensor without transposing
it first.

Backends (speed only; the bits are the same)
--------------------------------------------
``fake_quantize`` makes two passes over the tensor: the block amax, then the elementwise
``x -> x_hat`` (scale, E2M1 cast, dequantize), with the scale math on the small (M, K/16) block
tensors in between. They run as eager PyTorch (``"eager"``, the default; on a one-thread CPU in
row chunks of ``EAGER_CHUNK`` elements so that the temporaries stay in cache) or as one graph
made by ``torch.compile`` per call (``"compiled"``; ``"auto"`` compiles CPU tensors of at least
``COMPILE_MIN_NUMEL`` elements and falls back to eager, with one warning, when compiling fails).
Pick one with ``set_backend(name)`` or ``with use_backend(name):``. Both run the same
functions in the same order (``_dequantized``, ``_block_scales_f32``); the only difference is
the E4M3 rounding of the block scales, the FP8 cast in eager and exact fp32 arithmetic in the
kernels (tested equal on every rounding boundary). Every fp32 operation on x is a product, a
scaling by a power of two, a round/floor or a comparison: no sum that contraction (FMA) or
reassociation could change, and inductor's C++ flags keep ``-ffp-contract=off
-fno-unsafe-math-optimizations`` anyway. The tests check both backends against the NumPy
reference, bit for bit. SR draws its random bits eagerly from the caller's ``torch.Generator``,
so both backends consume the same bits.
"""
from __future__ import annotations

import contextlib
import functools
import math
import warnings
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

BACKENDS = ("eager", "compiled", "auto")
# "auto" compiles tensors with at least this many elements. One compiled call costs ~40 us of
# dynamo overhead; it still beat eager from 192 elements up (1 thread: 60 vs 100 us), so the bound
# only keeps tiny tensors (and their size-1 recompilations) eager.
COMPILE_MIN_NUMEL = 1 << 12


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
    """``S_enc = min(fl(2688 / amax), FLT_MAX)``, and 1 where amax is 0 or S_enc underflows to 0.

    A true division: PyTorch evaluates ``2688 / tensor`` as ``tensor.reciprocal() * 2688``, two
    roundings that differ from ``fl(2688 / amax)`` for about a quarter of all amax values.
    """
    amax = amax.float()
    s_enc = torch.clamp(torch.full_like(amax, GLOBAL_ENCODE_NUMERATOR).div_(amax), max=FLT_MAX)
    return torch.where((amax == 0) | (s_enc == 0), torch.ones_like(s_enc), s_enc)


def global_decode_scale(amax: torch.Tensor) -> torch.Tensor:
    """``S_dec = fl(1 / S_enc)``: may be subnormal; never flushed."""
    return torch.reciprocal(global_encode_scale(amax))


def _e4m3_cast(v: torch.Tensor) -> torch.Tensor:
    """fp32 values in [0, 448] -> the nearest E4M3 value (RNE, subnormals kept), as fp32."""
    return v.to(torch.float8_e4m3fn).float()


def _e4m3_round(v: torch.Tensor) -> torch.Tensor:
    """``_e4m3_cast`` in fp32 arithmetic (for compiled kernels, which then need no FP8 cast):
    round to a multiple of the E4M3 step ``2 ** max(e - 3, -9)`` (3 mantissa bits; 2**-9 is the
    subnormal step) with ties to even. Scaling by the step and its reciprocal is exact."""
    exponent = torch.bitwise_and(v.view(torch.int32), _F32_EXPONENT_MASK)  # bits of 2 ** e
    step = (exponent - 3 * _F32_EXPONENT_ONE).clamp(min=_F32_E4M3_MIN_STEP).view(torch.float32)
    return torch.round(v * _reciprocal_pow2(step)) * step


def _block_scales_f32(bamax: torch.Tensor, amax: torch.Tensor, to_e4m3=_e4m3_cast):
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


def _tensor_amax(bamax: torch.Tensor, amax, device) -> torch.Tensor:
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


def _round_rn(scaled: torch.Tensor) -> torch.Tensor:
    """RN cast of fp32 values to signed E2M1 magnitudes: clamp to [-6, 6], round to the nearest
    grid value, ties to the even code.

    On each binade the grid is uniform (step 0.5 on [0, 2), 1 on [2, 4), 2 on [4, 6]), and rounding
    to a multiple of the step with ties to even multiples is rounding to the even code:
    0.25 -> 0, 0.75 -> 1, 1.25 -> 1, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4 (all ties to even).
    Scaling by the step and its reciprocal (powers of two) is exact, ``round`` is RNE, and all of
    it is symmetric in the sign, so a tiny negative value becomes -0.
    """
    y = scaled.clamp(min=-E2M1_MAX, max=E2M1_MAX)
    step = _grid_step_bits(y)
    return torch.round(y * _reciprocal_pow2(step)) * step


def _round_sr_abs(magnitude: torch.Tensor, noise: torch.Tensor, mode: str) -> torch.Tensor:
    """SR cast of magnitudes |y| >= 0 with the given random draws.

    In grid steps ``t = |y| / step`` (exact), ``lo = floor(t)`` and ``f = t - lo`` (exact).
    ``hardware``: ``noise`` holds 8 random bits ``r`` per element (uint8), up when
    ``r < floor(256 f)`` (i.e. when ``(r + 1) / 256 <= f``; ``256 f`` is exact). ``ideal``:
    ``noise`` is uniform in [0, 1), up when ``noise < f``. A value on the grid has ``f = 0`` and
    never moves.
    """
    a = magnitude.clamp(max=E2M1_MAX)
    step = _grid_step_bits(a)
    t = a * _reciprocal_pow2(step)
    low = torch.floor(t)
    fraction = t - low
    up = noise < (torch.floor(fraction * 256.0) if mode == "hardware" else fraction)
    return (low + up) * step


def _check_sr(generator, mode: str) -> None:
    if mode not in SR_MODES:
        raise ValueError(f"sr_mode must be one of {SR_MODES}, got {mode!r}")
    if not isinstance(generator, torch.Generator):
        raise ValueError("stochastic rounding needs an explicit, seeded torch.Generator "
                         "(pass generator=torch.Generator(device).manual_seed(seed))")


def _draw_noise(shape, generator, mode: str, device) -> torch.Tensor:
    """The random draws of one SR cast, from ``generator``: 8 random bits per element (uint8,
    taken four at a time from uniform int32 draws, 3x faster than one draw each) for
    ``hardware``; fp32 uniform in [0, 1) for ``ideal``."""
    _check_sr(generator, mode)
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
    noise = _draw_noise(scaled.shape, generator, mode, scaled.device)
    return torch.copysign(_round_sr_abs(scaled.float().abs(), noise, mode), scaled)


def _codes_of(values: torch.Tensor, sign_of: torch.Tensor) -> torch.Tensor:
    """E2M1 codes (uint8 0..15) of grid values; the sign bit comes from the sign of the input,
    so a tiny negative value that rounds to 0 becomes code 8."""
    lut = _CODE_OF_TWICE_MAGNITUDE.to(values.device)
    codes = lut[(values.abs() * 2).to(torch.int64)]
    return codes | (torch.signbit(sign_of).to(torch.uint8) << 3)


# --------------------------------------------------------------------------------------------
# The two passes over the tensor: block amax, then x -> x_hat
# --------------------------------------------------------------------------------------------
EAGER_CHUNK = 1 << 18  # elements per chunk of the eager CPU path: its temporaries stay in cache


def _row_blocks(x: torch.Tensor) -> torch.Tensor:
    """View (M, K) as (M, K / 16, 16): ``[i, j, :]`` is the j-th 1x16 block of row i."""
    m, k = x.shape
    return x.view(m, k // BLOCK, BLOCK)


def _block_amax(x3: torch.Tensor) -> torch.Tensor:
    """max |x| per 1x16 block: (rows, K/16, 16) -> (rows, K/16, 1)."""
    return x3.abs().amax(dim=-1, keepdim=True)


def _tile_amax(bamax: torch.Tensor, tile_rows: int) -> torch.Tensor:
    """1x16 block amax (M, K/16, 1) -> the amax of each T x 16 tile, repeated on its T rows."""
    if tile_rows == 1:
        return bamax
    m, kb, _ = bamax.shape
    tiles = bamax.view(m // tile_rows, tile_rows, kb, 1).amax(dim=1, keepdim=True)
    return tiles.expand(-1, tile_rows, -1, -1).reshape(m, kb, 1)


def _e2m1_values(x3, encode, noise, mode: str) -> torch.Tensor:
    """``e2m1(fl(x * enc_b))``, signed. SR works on magnitudes and restores x's sign at the end:
    exact, as IEEE products and the rounding are symmetric in the sign."""
    if noise is None:
        return _round_rn(x3 * encode)
    return torch.copysign(_round_sr_abs(x3.abs() * encode, noise, mode), x3)


def _dequantized(x3, scale, encode, s_dec, noise, mode: str, out=None) -> torch.Tensor:
    """``x_hat = fl(fl(e2m1(fl(x * enc_b)) * f32(s_b)) * S_dec)``.

    ``x3`` is (a chunk of) x as (rows, K/16, 16); ``scale`` and ``encode`` (fp32 ``s_b`` and
    ``enc_b``) are (rows, K/16, 1); ``s_dec`` is 0-d; ``noise`` is None for RN.
    """
    return torch.mul(_e2m1_values(x3, encode, noise, mode) * scale, s_dec, out=out)


# Compiled kernels: each is one torch.compile graph (one call, one set of guards: the per-call
# overhead, not the arithmetic, dominates the small tensors of a transformer's layers), one
# function per rounding (dynamo's recompilation limit counts per function). The block scales are
# returned as well: an output is computed once, vectorized over blocks, where an intermediate
# would be inlined into the elementwise loop, in scalar code with three divisions per block
# (measured on (520, 192): 121 us per call against 146 us).
def _fake_quantize_graph(x3, tile_rows: int, amax, noise, mode: str):
    """Block amax, tile max, tensor amax (unless given), scales and x_hat of (M, K/16, 16) x3."""
    bamax = _tile_amax(_block_amax(x3), tile_rows)
    if amax is None:
        amax = bamax.amax()
    scale, encode, s_dec = _block_scales_f32(bamax, amax, _e4m3_round)  # FP8 rounding in fp32
    return _dequantized(x3, scale, encode, s_dec, noise, mode), scale, encode


def _rn_kernel(x3, tile_rows: int, amax):
    return _fake_quantize_graph(x3, tile_rows, amax, None, "rn")


def _sr_kernel(x3, tile_rows: int, amax, noise, mode: str):
    return _fake_quantize_graph(x3, tile_rows, amax, noise, mode)


def _fake_quantize_compiled(x: torch.Tensor, tile_rows: int, amax, noise, mode: str):
    """The compiled path: one kernel call on 1x16 blocks (M, K/16, 16), whatever the tile;
    reshaping outside it keeps every view a view (inside, dynamic shapes would make
    ``view(M, K)`` a copy)."""
    x3 = _plain(_row_blocks(x))
    if noise is None:
        out, _, _ = _compiled(_rn_kernel)(x3, tile_rows, amax)
    else:
        out, _, _ = _compiled(_sr_kernel)(x3, tile_rows, amax, _plain(noise.view(x3.shape)), mode)
    return out.view(x.shape)


def _plain(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a tensor that is not a view (``detach`` drops ``_base``; same data): dynamo
    guards a view's base layout too, and each new base layout would cost a recompilation."""
    return t.detach()


def _columns_graph(x3, mp: int, amax, noise, mode: str):
    """fake_quantize of each ``x3[b]^T`` (C, Mp) computed in x's own (B, M, C) layout, where a
    block is 16 consecutive rows of one column (read along the contiguous C, no transposed copy
    first); returns (B, C, Mp / 16, 16), the transposed layout, written once."""
    b, m, c = x3.shape
    blocks = torch.constant_pad_nd(x3, (0, 0, 0, mp - m)).view(b, mp // BLOCK, BLOCK, c)
    bamax = blocks.abs().amax(dim=2, keepdim=True)  # (B, Mp/16, 1, C)
    if amax is None:
        amax = bamax.amax()
    scale, encode, s_dec = _block_scales_f32(bamax, amax, _e4m3_round)
    if noise is not None:  # drawn for the (B * C, Mp) result: element [b, c, t] for token t
        noise = noise.view(b, c, mp // BLOCK, BLOCK).permute(0, 2, 3, 1)
    out = _dequantized(blocks, scale, encode, s_dec, noise, mode)
    return out.permute(0, 3, 1, 2).contiguous(), scale, encode


def _columns_rn_kernel(x3, mp: int, amax):
    return _columns_graph(x3, mp, amax, None, "rn")


def _columns_sr_kernel(x3, mp: int, amax, noise, mode: str):
    return _columns_graph(x3, mp, amax, noise, mode)


def _fake_quantize_columns_compiled(x: torch.Tensor, amax, noise, mode: str):
    """(..., M, C) x -> (prod(...) * C, Mp), as one (B, M, C) kernel call."""
    m, c = x.shape[-2:]
    x3, mp = _plain(x.reshape(-1, m, c)), padded_tokens(m)
    if noise is None:
        out, _, _ = _compiled(_columns_rn_kernel)(x3, mp, amax)
    else:
        out, _, _ = _compiled(_columns_sr_kernel)(x3, mp, amax, _plain(noise), mode)
    return out.view(-1, mp)


def _fake_quantize_columns_eager(x: torch.Tensor, amax, noise, mode: str):
    """Eager: the copy first, then the (chunked) eager path; faster in eager PyTorch than
    ``_columns_graph`` on large CPU tensors (about 2x on 4096 x 1024, one thread)."""
    return _fake_quantize_eager(columnwise_copy(x), 1, amax, noise, mode)


def _chunked_eager() -> bool:
    """Chunk the eager CPU path only on one intra-op thread. Measured on 4096 x 4096 on a shared
    2-core machine: one thread, 2**18-element chunks are 3.5x faster than whole tensors; two
    threads, every op of every chunk is a parallel region whose wake-ups, when the machine is
    oversubscribed, cost more than the cache saves (medians 0.5-2.3x slower, 10x outliers)."""
    return torch.get_num_threads() == 1


def _row_chunks(rows: int, row_numel: int, device) -> list:
    """Slices of the rows of about ``EAGER_CHUNK`` elements each (one slice on a GPU, or when
    ``_chunked_eager()`` says no)."""
    if device.type != "cpu" or rows * row_numel <= EAGER_CHUNK or not _chunked_eager():
        return [slice(0, rows)]
    step = max(1, EAGER_CHUNK // row_numel)
    return [slice(i, i + step) for i in range(0, rows, step)]


def _fake_quantize_eager(x: torch.Tensor, tile_rows: int, amax, noise, mode: str):
    """The eager path: the same functions, chunk by chunk on the CPU so that every temporary is
    small and stays in cache; the output is the only full-size new tensor."""
    x3 = _row_blocks(x)
    chunks = _row_chunks(x.shape[0], x.shape[1], x.device)
    bamax = x3.new_empty((x3.shape[0], x3.shape[1], 1))
    for c in chunks:
        torch.amax(x3[c].abs(), dim=-1, keepdim=True, out=bamax[c])
    bamax = _tile_amax(bamax, tile_rows)
    if amax is None:
        amax = bamax.amax()
    scale, encode, s_dec = _block_scales_f32(bamax, amax, _e4m3_cast)
    noise = None if noise is None else noise.view(x3.shape)
    out = torch.empty_like(x3)
    for c in chunks:
        _dequantized(x3[c], scale[c], encode[c], s_dec, None if noise is None else noise[c], mode,
                     out=out[c])
    return out.view(x.shape)


# --------------------------------------------------------------------------------------------
# Backends
# --------------------------------------------------------------------------------------------
_state = {"backend": "eager", "compile_error": None, "recompile_limit_warned": False}
_compiled_kernels: dict = {}


def set_backend(name: str) -> str:
    """Run fake_quantize as ``"eager"`` PyTorch, ``"compiled"`` (torch.compile; errors raise) or
    ``"auto"`` (compiled for CPU tensors of >= ``COMPILE_MIN_NUMEL`` elements, eager when
    compiling fails, with one warning). Returns the previous backend. The results are the same
    bits on the CPU (tested); ``"compiled"`` on CUDA is untested."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    previous, _state["backend"] = _state["backend"], name
    return previous


def get_backend() -> str:
    """The backend that ``set_backend`` selected (``"eager"`` unless changed)."""
    return _state["backend"]


@contextlib.contextmanager
def use_backend(name: str):
    """``with use_backend("compiled"): ...`` selects a backend for a block of code."""
    previous = set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def _use_compiled(x: torch.Tensor) -> bool:
    backend = _state["backend"]
    if backend == "eager" or x.numel() == 0:
        return False
    if backend == "compiled":
        return True
    # auto: CPU only. On CUDA inductor emits Triton, whose fp32 division and reciprocal need not
    # be IEEE-rounded (the scale math divides); untested there, and eager is fast on a GPU.
    return (x.device.type == "cpu" and _state["compile_error"] is None
            and x.numel() >= COMPILE_MIN_NUMEL)


def _compiled(kernel):
    """``torch.compile(kernel)``, made on first use, with dynamic shapes: one compilation serves
    every shape (a new one for a size-1 dimension, the other tile, SR mode or a given amax: at
    most 2 per function over every model and recipe in ``benchmarks/bench_layers.py steps``)."""
    fn = _compiled_kernels.get(kernel.__name__)
    if fn is None:
        fn = _compiled_kernels[kernel.__name__] = torch.compile(
            kernel, dynamic=True, fullgraph=True, options=_ieee_inductor_options())
    return fn


def _ieee_inductor_options() -> dict:
    """Inductor options that make its GPU (Triton) code round as eager PyTorch does: fp32
    ``x / y`` and ``1 / x`` as IEEE divisions (``div_rn``; Triton's default ``div.full`` is
    approximate) and no flushing of subnormals to zero. No effect on CPU code. Only the options
    this torch version knows."""
    import torch._inductor.config as inductor_config
    known = inductor_config.get_config_copy()
    wanted = {"eager_numerics.division_rounding": True, "eager_numerics.disable_ftz": True}
    return {k: v for k, v in wanted.items() if k in known}


def _is_recompile_limit(err: Exception) -> bool:
    """dynamo's ``FailOnRecompileLimitHit`` (by name: ``torch._dynamo.exc`` is private)."""
    return any(c.__name__ == "FailOnRecompileLimitHit" for c in type(err).__mro__)


def _run_compiled(compiled, eager, *args):
    """``compiled(*args)``; under ``"auto"`` a failed compilation warns once and falls back to
    ``eager(*args)`` from then on; under ``"compiled"`` it raises. A kernel that has reached
    dynamo's recompilation limit (``torch._dynamo.config.recompile_limit`` variants: shapes
    with a size-1 dimension, tiles, SR modes, ...) runs its further variants eager, either
    way, with one warning: the same bits, and the compiled variants stay in use."""
    try:
        return compiled(*args)
    except Exception as err:  # noqa: BLE001 - any compiler failure: report once, then go eager
        if _is_recompile_limit(err):
            if not _state["recompile_limit_warned"]:
                _state["recompile_limit_warned"] = True
                warnings.warn("nvfp4: a compiled kernel reached dynamo's recompilation limit; "
                              "its new shape variants run eager (same bits)", RuntimeWarning,
                              stacklevel=3)
            return eager(*args)
        if _state["backend"] == "compiled":
            raise
        _state["compile_error"] = f"{type(err).__name__}: {err}"
        warnings.warn(f"nvfp4: torch.compile failed, using eager kernels from now on "
                      f"({_state['compile_error'][:300]})", RuntimeWarning, stacklevel=3)
        return eager(*args)


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
    _check_2d(x, "rht")
    m, k = x.shape
    tiles = x.to(torch.bfloat16).float().view(m, k // BLOCK, BLOCK)
    rotated = torch.matmul(tiles, device_rht_matrix(x.device))
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


def _fake_quantize_2d(x: torch.Tensor, tile, sr: bool, generator, sr_mode: str,
                      amax=None) -> torch.Tensor:
    """fake_quantize of a prepared (fp32, contiguous, checked) 2-D tensor."""
    if amax is not None:
        amax = torch.as_tensor(amax, dtype=torch.float32, device=x.device)
    if x.numel() == 0:
        return x.clone()
    noise = _draw_noise(x.shape, generator, sr_mode, x.device) if sr else None
    args = (x, tile[0], amax, noise, sr_mode if sr else "rn")
    if _use_compiled(x):
        return _run_compiled(_fake_quantize_compiled, _fake_quantize_eager, *args)
    return _fake_quantize_eager(*args)


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
        _check_sr(generator, sr_mode)
    with torch.no_grad():
        return _quantize_2d(*_prepare(x.detach(), tile, rht, "quantize"), sr, generator, sr_mode,
                            amax)


def _quantize_2d(x: torch.Tensor, tile, sr: bool, generator, sr_mode: str, amax) -> NVFP4Tensor:
    """quantize of a prepared 2-D tensor (always eager: not the hot path)."""
    x3 = _row_blocks(x)
    bamax = _tile_amax(_block_amax(x3), tile[0])
    amax = _tensor_amax(bamax, amax, x.device)
    scale, encode, _ = _block_scales_f32(bamax, amax)
    noise = _draw_noise(x3.shape, generator, sr_mode, x.device) if sr else None
    values = _e2m1_values(x3, encode, noise, sr_mode if sr else "rn")  # signed
    return NVFP4Tensor(codes=_codes_of(values, x3).view(x.shape),
                       scales=scale.squeeze(-1).to(torch.float8_e4m3fn), amax=amax, tile=tile)


def dequantize(q: NVFP4Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``x_hat = fl(fl(e2m1(code) * f32(s_b)) * S_dec)`` in fp32, then cast to ``dtype``."""
    values = E2M1_VALUES.to(q.codes.device)[(q.codes & 7).to(torch.int64)]
    values = torch.where((q.codes & SIGN_BIT) != 0, -values, values)
    m, k = q.codes.shape
    blocks = values.view(m, k // BLOCK, BLOCK) * q.scales.float().unsqueeze(-1)
    return (blocks * global_decode_scale(q.amax)).view(m, k).to(dtype)


def fake_quantize(x: torch.Tensor, *, tile=(1, BLOCK), rht: bool = False, sr: bool = False,
                  generator: torch.Generator | None = None,
                  sr_mode: str = "hardware",
                  amax: torch.Tensor | None = None) -> torch.Tensor:
    """``dequantize(quantize(x, ...))`` in fp32, without materialising codes: the QAT hot path.

    Runs on the backend ``set_backend`` chose; SR draws its random bits from ``generator`` in
    eager PyTorch either way, so both backends give the same bits for the same generator state.
    The result carries no autograd history.
    """
    if sr:  # refuse a bad SR call before any work
        _check_sr(generator, sr_mode)
    with torch.no_grad():  # no autograd history: the QAT layers define their own backward
        x, tile = _prepare(x.detach(), tile, rht, "fake_quantize")
        return _fake_quantize_2d(x, tile, sr, generator, sr_mode, amax)


def _check_tokens_first(x: torch.Tensor, what: str) -> None:
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
    _check_tokens_first(x, "columnwise_copy")
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


def fake_quantize_columnwise(x: torch.Tensor, *, sr: bool = False,
                             generator: torch.Generator | None = None, sr_mode: str = "hardware",
                             amax: torch.Tensor | None = None) -> torch.Tensor:
    """``fake_quantize(columnwise_copy(x), ...)``: the same bits, random draws and amax (one over
    all matrices). The compiled backend makes no copy first: it reads the blocks (16
    consecutive rows of one column) in x's layout and writes the result transposed. No RHT
    (for that: ``fake_quantize(columnwise_copy(x), rht=True)``).
    """
    if sr:
        _check_sr(generator, sr_mode)
    _check_tokens_first(x, "fake_quantize_columnwise")
    with torch.no_grad():
        x = x.detach().float().contiguous()
        if amax is not None:
            amax = torch.as_tensor(amax, dtype=torch.float32, device=x.device)
        shape = (math.prod(x.shape[:-2]) * x.shape[-1], padded_tokens(x.shape[-2]))
        if x.numel() == 0:
            return x.new_zeros(shape)
        noise = _draw_noise(shape, generator, sr_mode, x.device) if sr else None
        args = (x, amax, noise, sr_mode if sr else "rn")
        if _use_compiled(x):
            return _run_compiled(_fake_quantize_columns_compiled, _fake_quantize_columns_eager,
                                 *args)
        return _fake_quantize_columns_eager(*args)


def pack(codes: torch.Tensor) -> torch.Tensor:
    """Two codes per byte, the element with the even index in the low nibble: (M, K) -> (M, K/2)."""
    if codes.dim() != 2 or codes.shape[-1] % 2:
        raise ValueError(f"pack: expected 2-D codes with an even last dimension, "
                         f"got {tuple(codes.shape)}")
    codes = codes.to(torch.uint8)
    return codes[:, 0::2] | (codes[:, 1::2] << 4)
