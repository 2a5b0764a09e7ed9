"""MX block scaling (OCP Microscaling Formats v1.0): elements and E8M0 shared scales.

An MX block is 32 consecutive elements that share one E8M0 scale, a bare power of two
``2 ** (code - 127)`` (code 0..254; 255 is NaN), with no tensor-wide scale. The elements are
E2M1 (MXFP4) or E4M3 (MXFP8). Quantizing a block::

    code  = e8m0(amax_b)                      one of the scale rules below
    y     = fl(x * enc(code))                 enc: 1 / the scale (a power of two: exact)
    elem  = cast(y)                           RN, saturating at the element's max (6 or 448)
    x_hat = fl(elem * 2 ** (code - 127))      exact: a power of two times a short significand

Scale rules (torchao 0.18's ``ScaleCalculationMode``; ``e`` is the exponent field of the fp32
``amax_b``, ``m`` its mantissa field, ``p`` the element's largest power of two: 2 for E2M1
(6 = 1.5 * 2**2), 8 for E4M3 (448 = 1.75 * 2**8))::

    floor   code = e - p                          the OCP v1.0 rule: floor(log2 amax_b) - p
    ceil    code = e + (m > 0) - p                ceil(log2 amax_b) - p
    even    code = e' - p                          e' the exponent field of amax_b rounded to
                                                   mbits mantissa bits, half up (bits + 2**(22-mbits),
                                                   then the mantissa cleared)
    rceil   code = ceil(log2 fl(amax_b / max)) + 127  the exact ceiling (cuBLAS's and the
                                                   ``cvt.rp.satfinite.ue8m0x2.f32`` rule)
    te      code = ceil(log2 fl(amax_b * r)) + 127    Transformer Engine's MXFP8 kernels: as
                                                   rceil, but the product with the fp32
                                                   reciprocal r = fl(1 / max), not a quotient

``floor``, ``ceil`` and ``even`` clamp the unbiased exponent to [-127, 128] before adding the bias
(128 + 127 is the NaN code), multiply by ``1 / max(2 ** (code - 127), 2 ** -126)`` (so a block
whose code is 0, amax_b < 2 ** (p - 126), is scaled by 2 ** 126 and decoded by 2 ** -127, exactly
as torchao does), and turn a NaN amax into code 255. ``rceil`` clamps to [-127, 127], maps an
infinite ``amax_b / max`` to 254 and a NaN to 255, and multiplies by ``2 ** (127 - code)``, by
2 ** -127 for code 254, and by 1 for code 0 (torchao's reciprocal). ``te`` clamps and maps the
same way and multiplies by ``2 ** (127 - code)`` for every code below 254 (code 0 by 2 ** 127),
by 2 ** -127 for code 254 (TE's ``exp2f_rcp``).

``te`` and ``rceil`` pick the same code for every fp32 amax: r = fl(1/448) = (1 + 0.75 * 2**-24)
/ 448 and fl(1/6) = (1 + 0.5 * 2**-24) / 6 are too close to 1/max for the product and the
quotient to round onto different sides of a power of two (checked over every positive finite
fp32 amax by ``python -m benchmarks.e8m0_rules``). They differ only in the reciprocal of code 0,
the blocks with amax_b <= max * 2 ** -127, which torchao scales by 1 (to zero) and TE by 2**127.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from nvfp4bench.quant.nvfp4 import (E2M1_MAX, E4M3_MAX, grid_steps_bits, round_e2m1_rn,
                                    round_sr_abs)

E8M0_BIAS = 127
E8M0_NAN = 255
E8M0_INF = 254  # rceil: the code of an infinite amax / max
SCALE_RULES = ("floor", "ceil", "even", "rceil", "te")

_F32_MANTISSA_BITS = 23
_F32_MANTISSA_MASK = (1 << _F32_MANTISSA_BITS) - 1
_F32_EXPONENT_AND_SIGN = ((1 << 9) - 1) << _F32_MANTISSA_BITS
_F32_MIN_NORMAL = 2.0 ** -126
_F32_EXPONENT_MASK = 0x7F800000
_F32_EXPONENT_ONE = 1 << _F32_MANTISSA_BITS
_F32_E4M3_MIN_STEP = 0x3B000000  # bits of 2**-9, the E4M3 subnormal step


def e4m3_grid_steps(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(step, 1 / step)`` of the E4M3 grid around a >= 0 (fp32, <= 448): ``2 ** max(e - 3, -9)``
    where ``2 ** e <= a < 2 ** (e + 1)`` (3 mantissa bits; 2**-9 is the subnormal step)."""
    exponent = torch.bitwise_and(a.view(torch.int32), _F32_EXPONENT_MASK)
    step_bits = (exponent - 3 * _F32_EXPONENT_ONE).clamp(min=_F32_E4M3_MIN_STEP)
    inverse_bits = 0x7F000000 - step_bits  # the bits of 2 ** -s
    return step_bits.view(torch.float32), inverse_bits.view(torch.float32)


@dataclass(frozen=True)
class Element:
    """An element type of a block format: its largest magnitude and its RN / SR casts."""

    name: str
    max: float  # largest finite magnitude
    max_pow2: int  # floor(log2(max))
    mantissa_bits: int
    bits: int  # storage bits per element

    def round_rn(self, y: torch.Tensor) -> torch.Tensor:
        """fp32 -> the nearest element value (ties to even), saturating at +-max, signed."""
        if self.name == "e2m1":
            return round_e2m1_rn(y)
        return y.clamp(min=-self.max, max=self.max).to(torch.float8_e4m3fn).float()

    def round_sr_abs(self, a: torch.Tensor, noise: torch.Tensor, mode: str) -> torch.Tensor:
        """SR of magnitudes a >= 0 between the two neighbouring element values, saturating at max:
        ``nvfp4.round_sr_abs``'s rule (8 random bits per element for ``hardware``) on this grid."""
        steps = grid_steps_bits if self.name == "e2m1" else e4m3_grid_steps
        return round_sr_abs(a, noise, mode, steps, limit=self.max)


E2M1 = Element("e2m1", E2M1_MAX, 2, 1, 4)
E4M3 = Element("e4m3", E4M3_MAX, 8, 3, 8)


def e8m0_codes(bamax: torch.Tensor, element: Element, rule: str) -> torch.Tensor:
    """The E8M0 code (int32, 0..255) of each block from its fp32 amax, by ``rule`` (module
    docstring)."""
    if rule in ("rceil", "te"):
        return _round_up_codes(_descale(bamax, element, rule))
    if rule not in SCALE_RULES:
        raise ValueError(f"unknown E8M0 scale rule {rule!r}; expected one of {SCALE_RULES}")
    bits = bamax.float().view(torch.int32)
    if rule == "even":
        half = 1 << (_F32_MANTISSA_BITS - element.mantissa_bits - 1)
        bits = (bits + half) & _F32_EXPONENT_AND_SIGN
    exponent = ((bits >> _F32_MANTISSA_BITS) & 0xFF) - E8M0_BIAS
    if rule == "ceil":
        exponent = exponent + ((bits & _F32_MANTISSA_MASK) > 0).int()
    codes = (exponent - element.max_pow2).clamp(min=-E8M0_BIAS, max=E8M0_BIAS + 1) + E8M0_BIAS
    return torch.where(torch.isnan(bamax), E8M0_NAN, codes)


def _ceil_log2(v: torch.Tensor) -> torch.Tensor:
    """Exact ``ceil(log2 v)`` of fp32 v > 0 (subnormals too), as int32: v = f * 2**e with
    f in [0.5, 1) (``frexp``, exact), so ceil(log2 v) is e, or e - 1 when f is exactly 0.5."""
    fraction, exponent = torch.frexp(v)
    return exponent - (fraction == 0.5).int()


def _descale(bamax: torch.Tensor, element: Element, rule: str) -> torch.Tensor:
    """``fl(amax / max)`` (rceil, a true division) or ``fl(amax * fl(1 / max))`` (te)."""
    if rule == "rceil":
        return bamax.float() / element.max
    reciprocal = torch.tensor(1.0 / element.max, dtype=torch.float32, device=bamax.device)
    return bamax.float() * reciprocal


def _round_up_codes(descale: torch.Tensor) -> torch.Tensor:
    """The smallest power of two >= descale as an E8M0 code, saturating at 254 (2 ** 127); an
    infinite descale is 254, a NaN 255, zero and descale <= 2 ** -127 are 0."""
    finite = torch.isfinite(descale) & (descale > 0)
    exponent = _ceil_log2(torch.where(finite, descale, torch.ones_like(descale)))
    exponent = torch.where(finite, exponent, -E8M0_BIAS)  # 0 -> the smallest code
    codes = exponent.clamp(min=-E8M0_BIAS, max=E8M0_BIAS) + E8M0_BIAS
    codes = torch.where(torch.isinf(descale), E8M0_INF, codes)
    return torch.where(torch.isnan(descale), E8M0_NAN, codes)


def _pow2(exponent: torch.Tensor) -> torch.Tensor:
    """``2 ** exponent`` as fp32 for integer exponents in [-149, 127]: exact (``ldexp``)."""
    return torch.ldexp(torch.ones_like(exponent, dtype=torch.float32), exponent)


def e8m0_values(codes: torch.Tensor) -> torch.Tensor:
    """The decode scale ``2 ** (code - 127)`` as fp32 (code 0 is the subnormal 2**-127), NaN for
    code 255."""
    scale = _pow2(codes - E8M0_BIAS)
    return torch.where(codes == E8M0_NAN, torch.nan, scale)


def e8m0_encode(codes: torch.Tensor, rule: str) -> torch.Tensor:
    """What x is multiplied by before the element cast, per block (module docstring): the
    reciprocal of the scale, with torchao's rule at the ends of the code range."""
    if rule in ("rceil", "te"):
        encode = _pow2(E8M0_BIAS - codes.clamp(max=E8M0_INF - 1))
        if rule == "rceil":
            encode = torch.where(codes == 0, 1.0, encode)
        encode = torch.where(codes == E8M0_INF, 2.0 ** -127, encode)
        return torch.where(codes == E8M0_NAN, torch.nan, encode)
    scale = torch.clamp(_pow2(codes.clamp(max=E8M0_INF) - E8M0_BIAS), min=_F32_MIN_NORMAL)
    return torch.where(codes == E8M0_NAN, 0.0, torch.reciprocal(scale))
