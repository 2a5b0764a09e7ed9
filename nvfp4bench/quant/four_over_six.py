"""NVFP4 "four over six": per block, the better of two block scales (Cook et al., arXiv 2512.02010).

Plain NVFP4 scales a block so that its amax lands on 6, the largest E2M1 value; the step from 4
to 6 is then the coarsest part of the grid. Four over six also tries the scale that lands the
amax on 4 (a scale 1.5x larger) and keeps, block by block, whichever candidate quantizes the
block with the smaller error. The arithmetic is Transformer Engine's (its 4over6 kernel and its
reference quantizer, ``NVFP4QuantizerRef`` with ``nvfp4_use_4over6``), in this order of fp32
roundings, with ``E`` the E4M3 bound of the tensor scale (256 by default, as TE uses, so that
the 1.5x scale stays below 448; 448 possible)::

    S_enc = fl(6 E / amax)   (1 when amax is 0 or inf; FLT_MAX at most)      S_dec = fl(1 / S_enc)
    base  = fl(fl(amax_b / 6) * S_enc)                (not NVFP4's amax_b * fl(S_enc * fl(1/6)))
    s_6   = e4m3(min(base, 448))                 s_4 = e4m3(min(fl(base * 1.5), 448))
    enc_k = min(fl(1 / fl(s_k * S_dec)), FLT_MAX)
    q_k   = E2M1_RN(fl(x * enc_k))                                     for k = 4 and k = 6
    err_k = sum over the block's 16 elements, in order, of |d| (MAE) or fl(d * d) (MSE), where
            d = fl(fl(fl(fl(q_k * s_k) * amax) / fl(6 E)) - x)
    keep k = 4 where err_4 < err_6, else 6 (a tie keeps 6)

The sum is sequential in fp32, element 0 first. With 16x16 tiles (2-D weights) both candidates
share one scale per tile and the tile's error is the sum of its 16 rows' errors in a fixed tree:
row i + row i+8 (i < 8), then i + i+4, i + i+2, 0 + 1. The kept block is dequantized as NVFP4:
``x_hat = fl(fl(q * s_k) * S_dec)``.

Beyond Transformer Engine (which refuses 4over6 with stochastic rounding): with SR the choice is
made exactly as above, on the RN candidates, and the block is then rounded stochastically with
the kept scale ``enc_k``; the choice depends on the block alone, the rounding on the random bits.
"""
from __future__ import annotations

import torch

from nvfp4bench.quant.nvfp4 import (E2M1_MAX, E4M3_MAX, FLT_MAX, e4m3_cast, global_encode_scale,
                                    round_e2m1_rn)

ERROR_MODES = ("mae", "mse")
E4M3_BOUNDS = (256.0, 448.0)
MAP4_EXPANSION = 1.5  # 6 / 4: the scale that puts a block's amax on 4


def candidate_scales(bamax: torch.Tensor, amax: torch.Tensor, bound: float):
    """``(s_4, s_6, enc_4, enc_6, S_dec)``: the two candidates' E4M3 block scales (as fp32) and
    encode scales, from the block amaxes and the tensor amax (docstring order)."""
    s_enc = global_encode_scale(amax, E2M1_MAX * bound)
    s_dec = torch.reciprocal(s_enc)
    base = bamax.float() / E2M1_MAX * s_enc
    scale4 = e4m3_cast(torch.clamp(base * MAP4_EXPANSION, max=E4M3_MAX))
    scale6 = e4m3_cast(torch.clamp(base, max=E4M3_MAX))
    encode4 = torch.clamp(torch.reciprocal(scale4 * s_dec), max=FLT_MAX)
    encode6 = torch.clamp(torch.reciprocal(scale6 * s_dec), max=FLT_MAX)
    return scale4, scale6, encode4, encode6, s_dec


def block_errors(x3: torch.Tensor, scale: torch.Tensor, encode: torch.Tensor,
                 amax: torch.Tensor, bound: float, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(err_k, fl(q_k * s_k))`` for one candidate: err_k of each block (rows, K/16, 1) of x3
    (rows, K/16, 16), the sum of the 16 element errors accumulated element 0 first, as TE's
    kernel does; and the candidate's products, which x_hat is made from."""
    product = round_e2m1_rn(x3 * encode) * scale
    d = (product * amax) / (E2M1_MAX * bound) - x3
    per_element = (d.abs() if mode == "mae" else d * d).movedim(-1, 0).contiguous()
    total = per_element[0].clone()
    for term in per_element[1:]:  # 15 adds over all blocks at once, in TE's order
        total += term
    return total.unsqueeze(-1), product


def tile_errors(errors: torch.Tensor, tile_rows: int) -> torch.Tensor:
    """Per-row block errors (M, K/16, 1) -> each 16x16 tile's error, summed over its 16 rows in
    TE's tree order (i + i+8, i + i+4, i + i+2, 0 + 1), repeated on its rows."""
    if tile_rows == 1:
        return errors
    m, kb, _ = errors.shape
    rows = errors.view(m // tile_rows, tile_rows, kb, 1)
    while rows.shape[1] > 1:
        half = rows.shape[1] // 2
        rows = rows[:, :half] + rows[:, half:]
    return rows.expand(-1, tile_rows, -1, -1).reshape(m, kb, 1)


def choose_scales(x3: torch.Tensor, bamax: torch.Tensor, amax: torch.Tensor, *, bound: float,
                  mode: str, tile_rows: int = 1):
    """``(s_b, enc_b, S_dec, keeps_4, product)`` of four over six for the blocks of x3 (rows,
    K/16, 16), bamax the amax of each block's tile (rows, K/16, 1), amax the tensor's (0-d fp32);
    ``product`` is the kept RN candidate's ``fl(q * s_b)`` (x_hat = fl(product * S_dec))."""
    if mode not in ERROR_MODES:
        raise ValueError(f"four over six: error mode must be one of {ERROR_MODES}, got {mode!r}")
    if bound not in E4M3_BOUNDS:
        raise ValueError(f"four over six: the E4M3 bound must be one of {E4M3_BOUNDS}, "
                         f"got {bound!r}")
    scale4, scale6, encode4, encode6, s_dec = candidate_scales(bamax, amax, bound)
    error4, product4 = block_errors(x3, scale4, encode4, amax, bound, mode)
    error6, product6 = block_errors(x3, scale6, encode6, amax, bound, mode)
    keeps_4 = tile_errors(error4, tile_rows) < tile_errors(error6, tile_rows)
    return (torch.where(keeps_4, scale4, scale6), torch.where(keeps_4, encode4, encode6), s_dec,
            keeps_4, torch.where(keeps_4, product4, product6))
