"""The block formats: the registry, four over six (known answers derived by hand from
``four_over_six.py``'s write-up and a property test against a NumPy reference), MX scale rules
and stochastic rounding by hand. MX against torchao: ``test_formats_torchao.py``; every format
through the layers: ``test_layers.py``."""
import math
import struct

import numpy as np
import pytest
import torch

from nvfp4bench.quant import formats, kernels, mx
from nvfp4bench.quant.formats import FORMATS, get_format


def test_registry_names_bits_and_errors():
    assert {"nvfp4", "nvfp4_4over6", "nvfp4_4over6_mse", "mxfp4", "mxfp4_rceil", "mxfp8",
            "mxfp8_even"} <= set(FORMATS)
    assert get_format(None) is FORMATS["nvfp4"] and get_format("mxfp8") is FORMATS["mxfp8"]
    assert [FORMATS[n].bits_per_element for n in ("nvfp4", "mxfp4", "mxfp8")] == [4.5, 4.25, 8.25]
    assert FORMATS["nvfp4"].is_nvfp4 and not FORMATS["nvfp4_4over6"].is_nvfp4
    assert FORMATS["mxfp4"].tile(True) == (32, 32) and FORMATS["nvfp4_4over6"].tile(True) == (16, 16)
    with pytest.raises(ValueError, match=r"unknown format 'fp4'; expected one of \["):
        get_format("fp4")


# ---------------------------------------------------------------------------------------------
# Four over six: known answers
# ---------------------------------------------------------------------------------------------
# E4M3 bound 256 and a tensor amax of 1536: S_enc = 1536 / 1536 = 1 = S_dec. Every block holds
# 1536, so base = 1536 / 6 = 256: s_6 = 256 (enc 2**-8, exact) and s_4 = 384 (enc fl(1/384),
# 2.98e-8 relative above 1/384, which moves none of the products below off its fp32 value:
# 960 * enc rounds to 2.5 exactly, a tie). Each element's error under 6 / under 4:
#   1536: 6 -> 1536 (0)       4 -> 1536 (0)
#   1152: 4.5 -> 4 -> 1024 (128)     3 -> 1152 (0)
#   1024: 4 -> 1024 (0)       2.67 -> 3 -> 1152 (128)
#    960: 3.75 -> 4 -> 1024 (64)     2.5 -> 2 (tie to the even code) -> 768 (192)
#    576: 2.25 -> 2 -> 512 (64)      1.5 -> 576 (0)
# and the error of the block's block is the sum over its 16 elements (zeros add 0).
KNOWN_BLOCKS = {
    # block: (values, MAE keeps, MSE keeps, x_hat under MAE, x_hat under MSE)
    "4 wins": ([1536, 1152, 1152], 4, 4, [1536, 1152, 1152], [1536, 1152, 1152]),
    "6 wins": ([1536, 1024, 1024], 6, 6, [1536, 1024, 1024], [1536, 1024, 1024]),
    # MAE 6: 5 * 64 = 320, 4: 192;  MSE 6: 5 * 4096 = 20480, 4: 192**2 = 36864
    "MAE 4, MSE 6": ([1536, 960, 576, 576, 576, 576], 4, 6, [1536, 768, 576, 576, 576, 576],
                     [1536, 1024, 512, 512, 512, 512]),
    # 128 against 128 (MAE), 16384 against 16384 (MSE): a tie keeps 6
    "tie": ([1536, 1152, 1024], 6, 6, [1536, 1024, 1024], [1536, 1024, 1024]),
}


def block_row(values):
    row = torch.zeros(16)
    row[:len(values)] = torch.tensor(values, dtype=torch.float32)
    return row


@pytest.mark.parametrize("name", list(KNOWN_BLOCKS))
@pytest.mark.parametrize("mode", ["mae", "mse"])
def test_four_over_six_known_answers(name, mode):
    values, keeps_mae, keeps_mse, hat_mae, hat_mse = KNOWN_BLOCKS[name]
    fmt = FORMATS["nvfp4_4over6" if mode == "mae" else "nvfp4_4over6_mse"]
    x = torch.stack([block_row(values), -block_row(values)])  # the sign changes nothing
    q = formats.quantize(x, format=fmt)
    keeps = keeps_mae if mode == "mae" else keeps_mse
    expected_scale = {4: 384.0, 6: 256.0}[keeps]
    assert q.scales.float().tolist() == [[expected_scale], [expected_scale]]
    assert q.s_dec.item() == 1.0
    hat = block_row(hat_mae if mode == "mae" else hat_mse)
    assert torch.equal(kernels.fake_quantize(x, format=fmt), torch.stack([hat, -hat]))


def test_four_over_six_16x16_tiles_sum_the_row_errors():
    """One 16x16 tile: row errors 6: 256 + 0, 4: 0 + 256 -> a tie, keeps 6; one more row with
    1152 (6: 128, 4: 0) -> 384 against 256, keeps 4."""
    tile = torch.zeros(16, 16)
    tile[0], tile[1] = block_row([1536, 1152, 1152]), block_row([1536, 1024, 1024])
    q = formats.quantize(tile, format="nvfp4_4over6", tile=(16, 16))
    assert (q.scales.float() == 256.0).all()
    tile[2] = block_row([1152])
    q = formats.quantize(tile, format="nvfp4_4over6", tile=(16, 16))
    assert (q.scales.float() == 384.0).all()
    assert torch.equal(formats.dequantize(q)[1, :3], torch.tensor([1536.0, 1152.0, 1152.0]))


def test_four_over_six_with_bound_448_has_one_candidate_where_1_5x_saturates():
    """Bound 448, amax 2688: base = 448, and 1.5 * 448 saturates to 448: both candidates are the
    same, the tie keeps 6, and the block is plain NVFP4's (whose scale is also 448 here)."""
    fmt = formats.Format("nvfp4_4over6_448", FORMATS["nvfp4"].element, 16, "e4m3", "test",
                         four_over_six="mae", e4m3_bound=448.0)
    x = block_row([2688, 1700, 500, -3])[None]
    q = formats.quantize(x, format=fmt)
    assert q.scales.float().item() == 448.0
    assert torch.equal(kernels.fake_quantize(x, format=fmt), kernels.fake_quantize(x))


# ---------------------------------------------------------------------------------------------
# Four over six: property test against a NumPy reference
# ---------------------------------------------------------------------------------------------
E2M1_GRID = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=np.float32)
F32 = np.float32


def e2m1_rn(y):
    """Nearest E2M1 magnitude of |y| (ties to the even code), signed; saturates at 6."""
    a = np.minimum(np.abs(y), F32(6))
    dist = np.abs(a[..., None] - E2M1_GRID)
    best = dist.min(-1, keepdims=True)
    candidates = np.where(dist == best, np.arange(8), 99)
    even = np.where(candidates % 2 == 0, candidates, 99).min(-1)
    code = np.where(even < 99, even, candidates.min(-1))
    return np.copysign(E2M1_GRID[code], y).astype(F32)


def e4m3(v):
    return torch.from_numpy(np.ascontiguousarray(v)).to(torch.float8_e4m3fn).float().numpy()


def reference_four_over_six(x, bound, mode):
    """x (blocks, 16) fp32 -> x_hat, keeps_4, err_4, err_6: the write-up, element by element in
    NumPy fp32 (one tensor amax over all blocks)."""
    amax = np.abs(x).max()
    with np.errstate(divide="ignore", over="ignore"):
        s_enc = np.minimum(F32(6 * bound) / amax, F32(np.finfo(F32).max))
    s_enc = F32(1) if amax == 0 or s_enc == 0 else s_enc
    s_dec = F32(1) / s_enc
    base = (np.abs(x).max(1) / F32(6)) * s_enc
    result = {}
    for k, scale in ((4, e4m3(np.minimum(base * F32(1.5), F32(448)))),
                     (6, e4m3(np.minimum(base, F32(448))))):
        with np.errstate(divide="ignore"):
            enc = np.minimum(F32(1) / (scale * s_dec), F32(np.finfo(F32).max))
        q = e2m1_rn(x * enc[:, None])
        err = np.zeros(len(x), dtype=F32)
        for i in range(16):
            d = ((q[:, i] * scale) * amax) / F32(6 * bound) - x[:, i]
            err = err + (np.abs(d) if mode == "mae" else d * d)
        result[k] = ((q * scale[:, None]) * s_dec, err)
    keeps_4 = result[4][1] < result[6][1]
    x_hat = np.where(keeps_4[:, None], result[4][0], result[6][0])
    return x_hat, keeps_4, result[4][1], result[6][1]


@pytest.mark.parametrize("mode", ["mae", "mse"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_four_over_six_keeps_the_candidate_with_the_smaller_error(mode, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(512, 16, generator=g) * torch.rand(512, 1, generator=g) * 10
    x[:128] = torch.distributions.StudentT(2.0).sample((128, 16)) * 3  # heavy tails
    x[128:160, 5:] = 0  # sparse blocks
    x[160] = 0
    fmt = FORMATS["nvfp4_4over6" if mode == "mae" else "nvfp4_4over6_mse"]
    x_hat, keeps_4, err4, err6 = reference_four_over_six(x.numpy(), 256.0, mode)
    ours = kernels.fake_quantize(x.reshape(64, 128), format=fmt).reshape(512, 16)
    assert torch.equal(ours, torch.from_numpy(x_hat))
    assert np.all(np.where(keeps_4, err4 < err6, err6 <= err4))
    assert 0.1 < keeps_4.mean() < 0.9, "both candidates are kept somewhere"
    assert (err4 == err6).any(), "ties occur (all-zero blocks at least)"


def test_four_over_six_beats_nvfp4_on_gaussian_blocks():
    x = torch.randn(256, 256, generator=torch.Generator().manual_seed(4))
    mse = {name: (kernels.fake_quantize(x, format=name) - x).pow(2).mean().item()
           for name in ("nvfp4", "nvfp4_4over6", "nvfp4_4over6_mse")}
    assert mse["nvfp4_4over6_mse"] < mse["nvfp4"] and mse["nvfp4_4over6"] < mse["nvfp4"]


def test_four_over_six_sr_keeps_the_rn_choice_and_rounds_between_neighbours():
    x = torch.randn(64, 64, generator=torch.Generator().manual_seed(5))
    fmt = FORMATS["nvfp4_4over6"]
    rn = formats.quantize(x, format=fmt)
    sr = [formats.quantize(x, format=fmt, sr=True, generator=torch.Generator().manual_seed(s))
          for s in (1, 1, 2)]
    assert all(torch.equal(q.scales.float(), rn.scales.float()) for q in sr)
    assert torch.equal(sr[0].values, sr[1].values) and not torch.equal(sr[0].values, sr[2].values)
    assert ((sr[0].values - rn.values).abs() <= 2).all()


# ---------------------------------------------------------------------------------------------
# MX: scale rules and SR by hand
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, amax, expected", [
    # amax 7 = 1.75 * 2**2: floor keeps 2**(2-2) = 1, 7 saturates to 6; the others take 2**1
    # and 7 / 2 = 3.5 ties to the even code 4 -> 8 (even: 1.75 rounds up to 2 at 1 mantissa bit;
    # rceil: 7 / 6 > 1)
    ("mxfp4", 7.0, 6.0), ("mxfp4_ceil", 7.0, 8.0), ("mxfp4_even", 7.0, 8.0),
    ("mxfp4_rceil", 7.0, 8.0),
    # amax 5 = 1.25 * 2**2: floor, even (1.25 stays below 1.75) and rceil (5 / 6 < 1) keep
    # scale 1, 5 ties to 4; ceil takes 2, 2.5 ties to 2 -> 4
    ("mxfp4", 5.0, 4.0), ("mxfp4_ceil", 5.0, 4.0), ("mxfp4_even", 5.0, 4.0),
    ("mxfp4_rceil", 5.0, 4.0),
    # MXFP8, amax 500 = 1.95 * 2**8: floor scale 1, 500 saturates to 448; ceil / rceil scale 2,
    # 250 -> 256 (E4M3 step 16 on [128, 256)) -> 512
    ("mxfp8", 500.0, 448.0), ("mxfp8_ceil", 500.0, 512.0), ("mxfp8_rceil", 500.0, 512.0),
    ("mxfp8_te", 500.0, 512.0),
    # amax 2**-125 (E4M3): 2**-125 / 448 <= 2**-127, code 0. rceil (torchao) scales by 1 and the
    # element flushes to 0; te (TE) scales by 2**127: 4 -> 4 * 2**-127
    ("mxfp8_rceil", 2.0 ** -125, 0.0), ("mxfp8_te", 2.0 ** -125, 2.0 ** -125),
])
def test_mx_scale_rules_by_hand(name, amax, expected):
    x = torch.zeros(1, 32)
    x[0, 0] = amax
    assert kernels.fake_quantize(x, format=name)[0, 0].item() == expected


def _te_e8m0_reference(value: float) -> int:
    """Transformer Engine's ``float_to_e8m0`` on the fp32 bits (its C++ test reference, written
    independently of ``mx.py``): the exponent field, plus one when any mantissa bit is set,
    except at 254 (satfinite) and for subnormals <= 2**-127."""
    if math.isnan(value):
        return 255
    if math.isinf(value):
        return 254
    bits = struct.unpack("<I", struct.pack("<f", value))[0]
    exponent, mantissa = bits >> 23, bits & 0x7FFFFF
    if mantissa and exponent != 254 and not (exponent == 0 and mantissa <= 0x400000):
        exponent += 1
    return exponent


@pytest.mark.parametrize("element", [mx.E2M1, mx.E4M3])
def test_te_rule_equals_transformer_engines_bitwise_e8m0_conversion(element):
    g = torch.Generator().manual_seed(11)
    amax = torch.cat([torch.rand(4000, generator=g) * 1000,
                      torch.exp2(torch.rand(4000, generator=g) * 270 - 145),  # 2**-145..2**125
                      element.max * torch.exp2(torch.arange(-140.0, 120.0)),  # code edges
                      torch.tensor([0.0, 2.0 ** -149, 3.0e38, float("inf"), float("nan")])])
    reciprocal = struct.unpack("<f", struct.pack("<f", 1.0 / element.max))[0]
    expected = []
    for a in amax.tolist():
        product = struct.unpack("<f", struct.pack("<f", a * reciprocal))[0]  # fp32 rounding
        expected.append(_te_e8m0_reference(product))
    codes = mx.e8m0_codes(amax, element, "te")
    assert codes.tolist() == expected
    assert torch.equal(codes, mx.e8m0_codes(amax, element, "rceil"))  # the codes agree


def test_te_rule_scales_by_the_reciprocal_of_every_code():
    """TE's ``exp2f_rcp``: 2**(127 - code) below 254 (code 0: 2**127), 2**-127 at 254, NaN at
    255; rceil keeps torchao's 1 for code 0."""
    codes = torch.tensor([0, 1, 127, 253, 254, 255])
    te = mx.e8m0_encode(codes, "te")
    assert te[:5].tolist() == [2.0 ** 127, 2.0 ** 126, 1.0, 2.0 ** -126, 2.0 ** -127]
    assert math.isnan(te[5].item())
    assert mx.e8m0_encode(codes, "rceil")[0].item() == 1.0


def test_mx_tiny_block_scale_code_0_is_decoded_by_2_to_the_minus_127():
    """amax < 2**-124 (E2M1): code 0; torchao scales by 2**126 (its floor) and decodes by
    2**-127, so the block comes back halved."""
    x = torch.zeros(1, 32)
    x[0, 0] = 2.0 ** -126
    q = formats.quantize(x, format="mxfp4")
    assert q.scales[0, 0].item() == 0 and q.values[0, 0].item() == 1.0
    assert kernels.fake_quantize(x, format="mxfp4")[0, 0].item() == 2.0 ** -127


@pytest.mark.parametrize("name, value, threshold, down, up", [
    # E2M1 at scale 1: 2.5 lies half way from 2 to 3: floor(256 * 0.5) = 128
    ("mxfp4", 2.5, 128, 2.0, 3.0),
    # E4M3 at scale 1: 250 on [240, 256] (step 16): f = 0.625, floor(160) = 160
    ("mxfp8", 250.0, 160, 240.0, 256.0),
])
def test_mx_hardware_sr_rounds_up_below_the_threshold(name, value, threshold, down, up):
    fmt = FORMATS[name]
    x = torch.zeros(1, 32)
    x[0, 0], x[0, 1] = fmt.element.max, value
    for noise_value, expected in ((threshold - 1, up), (threshold, down), (0, up), (255, down)):
        noise = torch.full((1, 32), noise_value, dtype=torch.uint8)
        out = formats.fake_quantize_prepared(x, fmt, False, noise, "hardware")
        assert out[0, 1].item() == expected and out[0, 0].item() == fmt.element.max


@pytest.mark.parametrize("name", ["mxfp4", "mxfp8", "nvfp4_4over6"])
def test_rows_and_columns_that_are_not_block_multiples_are_zero_padded(name):
    x = torch.randn(48, 48, generator=torch.Generator().manual_seed(6))
    padded = torch.zeros(64, 64)
    padded[:48, :48] = x
    for tile in ((1, 16), (16, 16)):
        whole = kernels.fake_quantize(padded, format=name, tile=tile)
        assert torch.equal(kernels.fake_quantize(x, format=name, tile=tile), whole[:48, :48])


@pytest.mark.parametrize("name", ["nvfp4_4over6_mse", "mxfp4", "mxfp8_rceil"])
@pytest.mark.parametrize("tile", [(1, 16), (16, 16)])
def test_row_chunks_give_the_bits_of_one_pass(name, tile, monkeypatch):
    """A tensor of several chunks (64 rows each here), RN and SR, equals one pass over it."""
    x = torch.randn(208, 96, generator=torch.Generator().manual_seed(7)) * 3
    x[150:] *= 40  # a later chunk holds the tensor amax
    kw = [{}, {"sr": True}]
    monkeypatch.setattr(formats, "CHUNK_ELEMENTS", 64 * 96)
    chunked = [kernels.fake_quantize(x, format=name, tile=tile,
                                     generator=torch.Generator().manual_seed(1), **k) for k in kw]
    monkeypatch.setattr(formats, "CHUNK_ELEMENTS", 1 << 40)
    whole = [kernels.fake_quantize(x, format=name, tile=tile,
                                   generator=torch.Generator().manual_seed(1), **k) for k in kw]
    for a, b in zip(chunked, whole):
        assert torch.equal(a, b)
