"""NVFP4 quantizer: known answers (docs/nvfp4.md section 8), an independent NumPy reference, and
properties (error bound, idempotence, SR neighbours and unbiasedness, determinism, RHT)."""
import warnings

import numpy as np
import pytest
import torch

from nvfp4bench.quant import kernels, nvfp4
from nvfp4bench.quant.kernels import fake_quantize
from nvfp4bench.quant.nvfp4 import dequantize, pack, quantize, rht, rht_matrix

GOLDEN_INPUT = [0, .25, .5, .75, 1, 1.25, 1.5, 1.75, 2, 2.5, 3, 3.5, 4, 5, 6, -6, 2688] + [0] * 15
GOLDEN_CODES = [0, 0, 1, 2, 2, 2, 3, 4, 4, 4, 5, 6, 6, 6, 7, 15, 7] + [0] * 15
GOLDEN_PACKED = "00 21 22 43 44 65 66 F7 07 00 00 00 00 00 00 00"

# RN cast of a scaled value: (input, E2M1 magnitude), each tie marked.
E2M1_RN_TABLE = [
    (0.0, 0.0), (0.25, 0.0),  # tie to even (code 0)
    (0.2500001, 0.5), (0.5, 0.5), (0.7499999, 0.5),
    (0.75, 1.0),  # tie to even (code 2)
    (1.25, 1.0),  # tie to even (code 2)
    (1.2500001, 1.5), (1.75, 2.0),  # tie to even (code 4)
    (2.5, 2.0),  # tie to even (code 4)
    (2.5000002, 3.0), (3.4999998, 3.0),
    (3.5, 4.0),  # tie to even (code 6)
    (5.0, 4.0),  # tie to even (code 6)
    (5.0000005, 6.0), (6.0, 6.0), (7.0, 6.0), (1e30, 6.0),  # saturate
]


def _bytes_hex(packed: torch.Tensor) -> str:
    return " ".join(f"{b:02X}" for b in packed.flatten().tolist())


# ---------------------------------------------------------------------------------------------
# Known answers
# ---------------------------------------------------------------------------------------------
def test_golden_vector_two_blocks():
    q = quantize(torch.tensor([GOLDEN_INPUT]))
    assert q.amax.item() == 2688.0
    assert q.scales.view(torch.uint8).tolist() == [[0x38, 0x7E]]  # 1.0 and 448
    assert q.codes.tolist() == [GOLDEN_CODES]
    assert _bytes_hex(pack(q.codes)) == GOLDEN_PACKED


def test_golden_vector_first_block_alone():
    q = quantize(torch.tensor([GOLDEN_INPUT[:16]]))
    assert q.amax.item() == 6.0
    assert q.scales.view(torch.uint8).tolist() == [[0x7E]]
    assert q.codes.tolist() == [GOLDEN_CODES[:16]]


def test_all_zero_tensor():
    q = quantize(torch.zeros(32, 48))
    assert q.amax.item() == 0.0
    assert (q.scales.view(torch.uint8) == 0).all() and (q.codes == 0).all()
    assert (dequantize(q) == 0).all()


@pytest.mark.parametrize("value, magnitude", E2M1_RN_TABLE)
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_e2m1_round_to_nearest_even(value, magnitude, sign):
    scaled = torch.tensor([sign * value], dtype=torch.float32)
    assert nvfp4.round_e2m1_rn(scaled).item() == sign * magnitude


def test_tiny_negative_keeps_its_sign_bit():
    q = quantize(torch.tensor([[-1e-3] + [0.0] * 14 + [6.0]]))
    assert q.codes[0, 0].item() == 8


def test_rht_one_hot_maps_to_row_of_r_and_r_is_orthonormal():
    r = rht_matrix()
    assert torch.equal(r @ r.T, torch.eye(16))
    assert torch.equal(rht(torch.eye(16)), r)
    assert set(r.abs().flatten().tolist()) == {0.25}


# ---------------------------------------------------------------------------------------------
# An independent reference: NumPy float32 for the scales, float64 integer arithmetic for E4M3
# ---------------------------------------------------------------------------------------------
def _e4m3_rne(v: np.ndarray) -> np.ndarray:
    """Round non-negative float32 values (<= 448) to float8_e4m3fn, ties to even, subnormals kept."""
    v = v.astype(np.float64)
    exponent = np.floor(np.log2(np.where(v > 0, v, 1.0)))
    step = 2.0 ** (np.maximum(exponent, -6) - 3)  # 3 mantissa bits; min normal exponent -6
    return (np.round(v / step) * step).astype(np.float32)  # np.round: half to even


def _e2m1_rne(y: np.ndarray) -> np.ndarray:
    """Boundaries of docs/nvfp4.md section 1, written as comparisons."""
    a = np.minimum(np.abs(y), 6.0)
    mag = np.select([a <= .25, a < .75, a <= 1.25, a < 1.75, a <= 2.5, a < 3.5, a <= 5.0],
                    [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0], 6.0)
    return np.copysign(mag, y).astype(np.float32)


def _reference_fake_quantize(x: np.ndarray, tile_rows: int) -> np.ndarray:
    f32 = np.float32
    m, k = x.shape
    amax = f32(np.abs(x).max())
    with np.errstate(divide="ignore", over="ignore"):
        s_enc = f32(f32(2688.0) / amax)
    s_enc = min(s_enc, f32(np.finfo(np.float32).max))
    if amax == 0 or s_enc == 0:
        s_enc = f32(1.0)
    s_dec = f32(f32(1.0) / s_enc)
    mult = f32(s_enc * f32(f32(1.0) / f32(6.0)))
    blocks = np.abs(x).reshape(m // tile_rows, tile_rows, k // 16, 16).max(axis=(1, 3))
    s_b = _e4m3_rne(np.minimum((blocks * mult).astype(np.float32), f32(448.0)))
    with np.errstate(divide="ignore", over="ignore"):
        enc = np.minimum((f32(1.0) / (s_b * s_dec).astype(np.float32)).astype(np.float32),
                         np.finfo(np.float32).max).astype(np.float32)
    enc = np.repeat(np.repeat(enc, tile_rows, axis=0), 16, axis=1)
    s_b = np.repeat(np.repeat(s_b, tile_rows, axis=0), 16, axis=1)
    values = _e2m1_rne((x * enc).astype(np.float32))
    return ((values * s_b).astype(np.float32) * s_dec).astype(np.float32)


def _adversarial(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 96, generator=g) * torch.exp(4 * torch.randn(64, 1, generator=g))
    x[0] = 0.0  # an all-zero row of blocks
    x[1, :16] = 1e-30  # a block whose scale underflows
    x[2, :16] = torch.tensor(GOLDEN_INPUT[:16])  # ties after scaling
    x[3, 5] = 1e4  # one huge value: most other blocks get subnormal scales
    return x


@pytest.mark.parametrize("tile", [(1, 16), (16, 16)])
@pytest.mark.parametrize("seed", range(4))
def test_matches_independent_reference_bit_for_bit(tile, seed):
    x = _adversarial(seed)
    ours = fake_quantize(x, tile=tile)
    ref = torch.from_numpy(_reference_fake_quantize(x.numpy(), tile[0]))
    assert torch.equal(ours.view(torch.int32), ref.view(torch.int32))
    assert torch.equal(dequantize(quantize(x, tile=tile)).view(torch.int32), ours.view(torch.int32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_any_float_input_dtype(dtype):
    x = _adversarial(7).clamp(-6e4, 6e4).to(dtype)
    ref = torch.from_numpy(_reference_fake_quantize(x.float().numpy(), 1))
    assert torch.equal(fake_quantize(x), ref)


def test_subnormal_global_decode_scale_is_not_flushed():
    x = torch.randn(32, 32, generator=torch.Generator().manual_seed(0)) * 1e-36
    s_dec = nvfp4.global_decode_scale(x.abs().max())  # amax / 2688 is below fp32's tiny
    assert 0 < s_dec.item() < torch.finfo(torch.float32).tiny
    assert fake_quantize(x).abs().max() > 0
    assert torch.equal(fake_quantize(x),
                       torch.from_numpy(_reference_fake_quantize(x.numpy(), 1)))


# ---------------------------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------------------------
def test_per_block_error_bound():
    """With u = s_b * S_dec the block's unit: |x - x_hat| <= u * step(|x| / u) / 2, the half grid
    step at x, or, where |x| exceeds 6u (s_b rounded down), |x| - 6u; up to fp32 rounding."""
    x = torch.randn(128, 256, generator=torch.Generator().manual_seed(0))
    q = quantize(x)
    s_dec = nvfp4.global_decode_scale(q.amax)
    unit = (q.scales.float() * s_dec).repeat_interleave(16, dim=1)
    half_step = nvfp4._grid_step((x.abs() / unit).clamp(max=6.0)) / 2 * unit
    bound = torch.maximum(half_step, x.abs() - 6 * unit)
    err = (x - dequantize(q)).abs()
    assert (err <= bound * (1 + 2 ** -20)).all()
    assert err.max() > 0  # quantization actually happened


def _representable(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x = e2m1 * s_b with S_enc = 1 (amax 2688) and each block's max code 7: x is exactly
    representable with these scales. Returns (x, its codes)."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (32, 64), generator=g, dtype=torch.uint8)
    codes[:, ::16] = 7  # each block reaches 6 * s_b, so its scale is recovered
    e4m3 = torch.randint(1, 127, (32, 4), generator=g, dtype=torch.uint8).view(torch.float8_e4m3fn)
    e4m3[0, 0] = 448.0  # the tensor's amax is 6 * 448 = 2688
    return dequantize(nvfp4.NVFP4Tensor(codes, e4m3, amax=torch.tensor(2688.0))), codes


def test_rn_is_idempotent_on_representable_values():
    x, codes = _representable(3)
    assert torch.equal(fake_quantize(x), x)
    assert torch.equal(quantize(x).codes, codes)  # -0 (code 8) keeps its sign bit


def test_2d_tiles_columnwise_copy_is_the_transpose():
    x = _adversarial(1)
    rowwise = fake_quantize(x, tile=(16, 16))
    columnwise = fake_quantize(x.t().contiguous(), tile=(16, 16))
    assert torch.equal(columnwise.t(), rowwise)
    q = quantize(x, tile=(16, 16))
    assert q.scales.shape == (64, 96 // 16)
    assert torch.equal(q.scales.view(torch.uint8)[0::16], q.scales.view(torch.uint8)[15::16])


@pytest.mark.parametrize("mode", ["hardware", "ideal"])
def test_sr_picks_one_of_the_two_neighbours_and_never_moves_grid_values(mode):
    x = _adversarial(2)
    rn = fake_quantize(x)
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([fake_quantize(x, sr=True, generator=g, sr_mode=mode) for _ in range(8)])
    q = quantize(x)
    unit = (q.scales.float() * nvfp4.global_decode_scale(q.amax)).repeat_interleave(16, dim=1)
    # every draw is within one grid step of x (or x's excess over 6 units, where s_b rounded down)
    step = nvfp4._grid_step((x.abs() / unit).clamp(max=6.0)) * unit
    assert ((draws - x).abs() <= torch.maximum(step, x.abs() - 6 * unit) * (1 + 2 ** -20)).all()
    assert torch.equal(draws[0], fake_quantize(x, sr=True, sr_mode=mode,
                                               generator=torch.Generator().manual_seed(0)))
    on_grid, _ = _representable(4)
    assert torch.equal(fake_quantize(on_grid, sr=True, generator=g, sr_mode=mode), on_grid)
    assert (draws != rn).any()  # SR differs from RN somewhere


def test_sr_is_unbiased_to_within_its_8_bit_quantization():
    """E[SR(y)] = lo + step * floor(256 f) / 256, so the bias is in [-step/256, 0]."""
    y = torch.linspace(0, 6, 16 * 64).view(64, 16)
    y[:, 15] = 6.0  # amax 6, S_enc 448, every scale 448: the scaled value is y itself
    g = torch.Generator().manual_seed(1)
    n = 2000
    mean = sum(nvfp4.round_e2m1_sr(y, g) for _ in range(n)) / n
    step = nvfp4._grid_step(y)
    expected_low = y - step / 256
    sigma = step / 2 / n ** 0.5  # sd of the mean of a two-point variable of spread `step`
    assert (mean <= y + 5 * sigma).all() and (mean >= expected_low - 5 * sigma).all()
    ideal = sum(nvfp4.round_e2m1_sr(y, g, "ideal") for _ in range(n)) / n
    assert ((ideal - y).abs() <= 5 * sigma).all()


def test_sr_same_seed_same_bits_other_seed_other_bits():
    x = _adversarial(4)
    a = fake_quantize(x, sr=True, generator=torch.Generator().manual_seed(5))
    b = fake_quantize(x, sr=True, generator=torch.Generator().manual_seed(5))
    c = fake_quantize(x, sr=True, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_sr_needs_an_explicit_generator():
    with pytest.raises(ValueError, match="torch.Generator"):
        fake_quantize(torch.randn(16, 16), sr=True)


def test_rht_preserves_dot_products_of_a_rotated_pair():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(8, 64, generator=g).to(torch.bfloat16).float()
    b = torch.randn(8, 64, generator=g).to(torch.bfloat16).float()
    r = rht_matrix().double()
    rot = lambda t: (t.double().view(8, 4, 16) @ r).view(8, 64)  # noqa: E731
    assert torch.allclose(rot(a) @ rot(b).T, a.double() @ b.double().T, rtol=0, atol=1e-12)
    # the bf16-rounded rotation TE performs stays within bf16 precision of the exact one
    assert torch.allclose(rht(a).double(), rot(a), rtol=2 ** -8, atol=0)


def test_rht_amax_is_of_the_rotated_tensor():
    x = torch.zeros(16, 16)
    x[0, 0] = 1.0
    q = quantize(x, rht=True)
    assert q.amax.item() == 0.25
    assert torch.equal(dequantize(q)[0], rht_matrix()[0])


@pytest.mark.parametrize("shape, tile", [((16, 20), (1, 16)), ((8, 32), (16, 16)),
                                         ((4, 4, 16), (1, 16))])
def test_bad_shapes_raise_clear_errors(shape, tile):
    with pytest.raises(ValueError, match="multiples of 16|2-D"):
        quantize(torch.ones(shape), tile=tile)


def test_bad_tile_and_integer_input_are_refused():
    with pytest.raises(ValueError, match="tile"):
        quantize(torch.ones(16, 16), tile=(2, 16))
    with pytest.raises(ValueError, match="floating"):
        quantize(torch.ones(16, 16, dtype=torch.int32))


def test_pack_puts_even_index_in_low_nibble():
    codes = torch.tensor([[1, 2, 15, 8]], dtype=torch.uint8)
    assert pack(codes).tolist() == [[0x21, 0x8F]]


@pytest.mark.parametrize("rht_on", [False, True])
def test_a_tensor_quantized_in_slices_with_its_amax_equals_the_whole(rht_on):
    """Chunked quantization (the conv wgrad does it per kernel tap) gives the same bits when each
    slice is given the whole tensor's amax (the rotated tensor's, with the RHT)."""
    x = _adversarial(5)
    whole = quantize(x, rht=rht_on)
    pieces = [quantize(part, rht=rht_on, amax=whole.amax) for part in x.split(16)]
    assert torch.equal(torch.cat([p.codes for p in pieces]), whole.codes)
    assert torch.equal(torch.cat([p.scales.view(torch.uint8) for p in pieces]),
                       whole.scales.view(torch.uint8))
    assert torch.equal(torch.cat([fake_quantize(part, rht=rht_on, amax=whole.amax)
                                  for part in x.split(16)]), dequantize(whole))


def test_rowwise_blocks_allow_any_row_count():
    x = _adversarial(6)[:21]
    assert torch.equal(fake_quantize(x), fake_quantize(torch.cat([x, torch.zeros(11, 96)]))[:21])


# ---------------------------------------------------------------------------------------------
# Kernels: the compiled kernels and the chunked eager path give the same bits
# ---------------------------------------------------------------------------------------------
BACKENDS = ["eager", "compiled", "native"]


@pytest.fixture
def without_native(monkeypatch):
    """A machine where the native kernels do not build (silently: no warning)."""
    monkeypatch.setattr(kernels.native, "_load_or_error", lambda: (None, "no C++ compiler"))
    monkeypatch.setitem(kernels._state, "native_warned", True)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tile", [(1, 16), (16, 16)])
@pytest.mark.parametrize("seed", range(2))
def test_backends_match_independent_reference_bit_for_bit(backend, tile, seed):
    x = _adversarial(seed)
    ours = fake_quantize(x, tile=tile, kernels=backend)
    ref = torch.from_numpy(_reference_fake_quantize(x.numpy(), tile[0]))
    assert torch.equal(_bits(ours), _bits(ref))


def _amaxes_where_reciprocal_times_2688_is_wrong(n: int = 4096) -> torch.Tensor:
    a = torch.rand(n, generator=torch.Generator().manual_seed(0)) * 100 + 1e-3
    return a[(2688.0 / a) != torch.full_like(a, 2688.0) / a]  # PyTorch's 2688 / t rounds twice


def test_global_encode_scale_is_one_true_division():
    g = torch.Generator().manual_seed(0)
    amax = torch.rand(20000, generator=g) * torch.exp2(torch.randint(-130, 128, (20000,),
                                                                     generator=g).float())
    amax = torch.cat([amax, _amaxes_where_reciprocal_times_2688_is_wrong(), torch.zeros(1),
                      torch.tensor([float("inf"), 1e-45])])
    a = amax.numpy()
    with np.errstate(divide="ignore", over="ignore"):
        ref = np.minimum(np.float32(2688.0) / a, np.finfo(np.float32).max).astype(np.float32)
    ref[(a == 0) | (ref == 0)] = 1.0
    assert torch.equal(_bits(nvfp4.global_encode_scale(amax)), _bits(torch.from_numpy(ref)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_amax_where_a_reciprocal_would_round_twice_matches_reference(backend):
    amax = _amaxes_where_reciprocal_times_2688_is_wrong()[:3]
    x = torch.randn(48, 64, generator=torch.Generator().manual_seed(1)).clamp(-3, 3)
    for value in amax.tolist():
        y = x * (value / 3.0)
        y[5, 7] = value  # the tensor's amax
        ours = fake_quantize(y, kernels=backend)
        ref = torch.from_numpy(_reference_fake_quantize(y.numpy(), 1))
        assert torch.equal(_bits(ours), _bits(ref))


def _e4m3_boundaries() -> torch.Tensor:
    """Every finite non-negative E4M3 value, every midpoint between neighbours, the fp32
    neighbours of both, fp32 subnormals and random values, clamped to [0, 448]."""
    values = torch.arange(0, 127, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    mids = (values[:-1] + values[1:]) / 2  # exact: at most 5 significant bits
    pts = torch.cat([values, mids])
    up = torch.nextafter(pts, torch.full_like(pts, float("inf")))
    down = torch.nextafter(pts, torch.zeros_like(pts))
    rand = torch.rand(2000, generator=torch.Generator().manual_seed(0)) * 448
    tiny = torch.tensor([1e-45, 1e-40, 1e-38, 2.0 ** -10, 2.0 ** -9.5])
    return torch.cat([pts, up, down, rand, tiny]).clamp(0, 448)


def test_e4m3_arithmetic_rounding_equals_the_fp8_cast():
    v = _e4m3_boundaries()
    assert torch.equal(_bits(nvfp4.e4m3_round(v.clone())), _bits(nvfp4.e4m3_cast(v)))


def test_compiled_block_scales_equal_eager_on_every_e4m3_boundary():
    """amax 448 gives S_enc = 6 and fl(S_enc * fl(1/6)) = 1, so each block's scale is the E4M3
    rounding of its bamax: the compiled kernel's arithmetic rounding meets every boundary."""
    v = _e4m3_boundaries()
    v = torch.cat([v, torch.zeros(-len(v) % 64)])
    x = torch.zeros(len(v) // 64, 64 * 16)
    x.view(-1, 16)[:, 0] = v  # one block per value
    x[0, 1] = 448.0
    ours = fake_quantize(x, kernels="compiled")
    ref = fake_quantize(x, kernels="eager")
    assert torch.equal(_bits(ours), _bits(ref))
    assert torch.equal(_bits(ours), _bits(torch.from_numpy(_reference_fake_quantize(x.numpy(), 1))))


@pytest.mark.parametrize("mode", ["hardware", "ideal"])
def test_compiled_sr_equals_eager_sr_for_the_same_generator_state(mode):
    x = _adversarial(2)
    out = {}
    for backend in BACKENDS:
        g = torch.Generator().manual_seed(3)
        out[backend] = [fake_quantize(x, sr=True, generator=g, sr_mode=mode, kernels=backend)
                        for _ in range(2)]
    for a, b in zip(out["eager"], out["compiled"]):
        assert torch.equal(_bits(a), _bits(b))
    assert not torch.equal(out["eager"][0], out["eager"][1])  # the generator advanced


@pytest.mark.parametrize("backend", BACKENDS)
def test_backends_agree_with_a_given_amax_and_rht(backend):
    x = _adversarial(5)
    whole = quantize(x, rht=True)
    parts = [fake_quantize(p, rht=True, amax=whole.amax, kernels=backend) for p in x.split(16)]
    assert torch.equal(_bits(torch.cat(parts)), _bits(dequantize(whole)))


@pytest.mark.parametrize("tile", [(1, 16), (16, 16)])
@pytest.mark.parametrize("sr", [False, True])
def test_chunked_eager_path_equals_one_chunk(monkeypatch, tile, sr):
    """Large CPU tensors go through the eager path in row chunks; force many small chunks."""
    x = _adversarial(3)
    kw = dict(tile=tile)
    whole = fake_quantize(x, **kw, sr=sr, generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(kernels, "EAGER_CHUNK", 1000)
    monkeypatch.setattr(kernels, "_chunked_eager", lambda: True)
    assert len(kernels._row_chunks(*x.shape, x.device)) > 3
    chunked = fake_quantize(x, **kw, sr=sr, generator=torch.Generator().manual_seed(0))
    assert torch.equal(_bits(chunked), _bits(whole))
    if not sr:
        ref = torch.from_numpy(_reference_fake_quantize(x.numpy(), tile[0]))
        assert torch.equal(_bits(chunked), _bits(ref))


def _transposed_padded(x: torch.Tensor) -> torch.Tensor:
    """(..., M, C) -> each matrix transposed, tokens zero-padded to a multiple of 16, stacked."""
    t = x.reshape(-1, *x.shape[-2:]).mT
    return torch.nn.functional.pad(t, (0, -t.shape[-1] % 16)).reshape(-1, t.shape[-1] + (
        -t.shape[-1] % 16))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch", [1, 3])
def test_columnwise_copy_is_fake_quantize_of_the_transposed_padded_copy(backend, batch):
    """Quantized in x's own layout and written transposed: the same bits as transposing first
    (RN against the NumPy reference), the same random draws with SR, the same given amax.
    x^T holds the adversarial rows; 90 or 28 tokens, so the copy is zero-padded."""
    x = _adversarial(7).mT[:84].reshape(3, 28, 64) if batch == 3 else _adversarial(7).mT[:90]
    t = _transposed_padded(x)
    assert torch.equal(nvfp4.columnwise_copy(x), t)
    ref = torch.from_numpy(_reference_fake_quantize(t.numpy(), 1))
    k = {"kernels": backend}
    assert torch.equal(_bits(kernels.fake_quantize_columnwise(x, **k)), _bits(ref))
    for mode in ("hardware", "ideal"):
        ours = kernels.fake_quantize_columnwise(x, sr=True, sr_mode=mode, **k,
                                                generator=torch.Generator().manual_seed(2))
        theirs = fake_quantize(t, sr=True, sr_mode=mode, **k,
                               generator=torch.Generator().manual_seed(2))
        assert torch.equal(_bits(ours), _bits(theirs))
    amax = torch.tensor(3e4)
    assert torch.equal(_bits(kernels.fake_quantize_columnwise(x, amax=amax, **k)),
                       _bits(fake_quantize(t, amax=amax, **k)))


def test_columnwise_copy_refuses_a_vector():
    with pytest.raises(ValueError, match=r"\(\.\.\., M, C\)"):
        kernels.fake_quantize_columnwise(torch.ones(32))


def test_auto_backend_falls_back_to_eager_with_one_warning(monkeypatch, without_native):
    def broken(*args):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(kernels, "_fake_quantize_compiled", broken)
    monkeypatch.setattr(kernels, "COMPILE_MIN_NUMEL", 0)
    monkeypatch.setitem(kernels._state, "compile_error", None)
    x = _adversarial(0)
    with pytest.raises(RuntimeError, match="no C"):
        fake_quantize(x, kernels="compiled")
    with pytest.warns(RuntimeWarning, match="torch.compile failed"):
        first = fake_quantize(x, kernels="auto")
    second = fake_quantize(x, kernels="auto")  # no second attempt, no second warning
    assert "no C++ compiler" in kernels._state["compile_error"]
    assert torch.equal(first, fake_quantize(x)) and torch.equal(second, first)


@pytest.mark.parametrize("backend", ["compiled", "auto"])
def test_a_kernel_at_the_recompile_limit_runs_that_call_eager(monkeypatch, without_native,
                                                              backend):
    class FailOnRecompileLimitHit(RuntimeError):  # dynamo's exception, matched by name
        pass

    def at_limit(*args):
        raise FailOnRecompileLimitHit("recompile_limit reached")

    monkeypatch.setattr(kernels, "_fake_quantize_compiled", at_limit)
    monkeypatch.setitem(kernels._state, "recompile_limit_warned", False)
    monkeypatch.setitem(kernels._state, "compile_error", None)
    x = _adversarial(1)
    with pytest.warns(RuntimeWarning, match="recompilation limit"):
        first = fake_quantize(x, kernels=backend)
    with warnings.catch_warnings(record=True) as later:
        warnings.simplefilter("always")
        second = fake_quantize(x, kernels=backend)
    assert not later  # one warning per process
    assert kernels._state["recompile_limit_warned"] and kernels._state["compile_error"] is None
    ref = torch.from_numpy(_reference_fake_quantize(x.numpy(), 1))
    assert torch.equal(_bits(first), _bits(ref)) and torch.equal(_bits(second), _bits(ref))


def test_auto_backend_never_compiles_small_tensors(monkeypatch):
    def must_not_run(*args):
        raise AssertionError("compiled path used")

    monkeypatch.setattr(kernels, "_fake_quantize_compiled", must_not_run)
    x = _adversarial(0)[:16]
    assert x.numel() < kernels.COMPILE_MIN_NUMEL
    fake_quantize(x, kernels="auto")  # native kernels where they build
    monkeypatch.setattr(kernels.native, "_load_or_error", lambda: (None, "no C++ compiler"))
    monkeypatch.setitem(kernels._state, "native_warned", True)
    fake_quantize(x, kernels="auto")  # eager


def test_auto_uses_the_native_kernels_where_they_build(monkeypatch):
    if not kernels.native.available():
        pytest.skip(f"native kernels unavailable: {kernels.native.unavailable_reason()}")
    calls = []
    real = kernels._fake_quantize_native
    monkeypatch.setattr(kernels, "_fake_quantize_native", lambda *a: calls.append(1) or real(*a))
    fake_quantize(_adversarial(0), kernels="auto")
    assert calls
    g = torch.Generator().manual_seed(0)
    monkeypatch.setitem(kernels.NATIVE_MAX_NUMEL, "sr", 1024)  # a large tensor for SR
    fake_quantize(_adversarial(0), sr=True, generator=g, kernels="auto")  # compiled kernels
    assert len(calls) == 1
    fake_quantize(_adversarial(0), kernels="auto")  # not large for RN
    assert len(calls) == 2


def test_without_native_kernels_auto_warns_once_and_native_says_why(monkeypatch):
    monkeypatch.setattr(kernels.native, "_load_or_error", lambda: (None, "no C++ compiler"))
    monkeypatch.setitem(kernels._state, "native_warned", False)
    x = _adversarial(0)
    with pytest.warns(RuntimeWarning, match="native kernels unavailable.*no C"):
        first = fake_quantize(x, kernels="auto")
    with warnings.catch_warnings(record=True) as later:
        warnings.simplefilter("always")
        fake_quantize(x, kernels="auto")
    assert not [w for w in later if "native" in str(w.message)]
    assert torch.equal(_bits(first), _bits(fake_quantize(x)))
    with pytest.raises(kernels.native.NativeUnavailable, match="no C"):
        fake_quantize(x, kernels="native")


def test_no_warning_where_native_kernels_are_not_built(monkeypatch):
    monkeypatch.setattr(kernels.native, "supported", lambda: False)  # e.g. macOS, arm64
    monkeypatch.setattr(kernels.native, "_load_or_error", lambda: (None, "not Linux x86-64"))
    monkeypatch.setitem(kernels._state, "native_warned", False)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        fake_quantize(_adversarial(0)[:16], kernels="auto")  # small: eager, nothing to say
    assert not seen


def test_native_kernels_are_kept_per_cpu(monkeypatch):
    here = kernels.native.module_name()
    monkeypatch.setattr(kernels.native, "_cpu_flags", lambda: "sse2 some_future_isa")
    assert kernels.native.module_name() != here


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_tracking_input_gives_the_same_bits_without_history(backend):
    x = _adversarial(0)
    out = fake_quantize(x.clone().requires_grad_(), kernels=backend)
    assert not out.requires_grad
    assert torch.equal(_bits(out), _bits(fake_quantize(x)))


def test_unknown_kernels_are_refused():
    with pytest.raises(ValueError, match="kernels must be one of"):
        fake_quantize(torch.ones(16, 16), kernels="triton")
    with pytest.raises(ValueError, match="kernels must be one of"):
        kernels.fake_quantize_columnwise(torch.ones(16, 16), kernels="triton")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("w_tile", [(1, 16), (16, 16)])
def test_the_forward_pair_equals_two_calls_and_the_reference(backend, w_tile):
    """``fake_quantize_pair`` (X and W in one compiled call) gives each operand the bits of its
    own call, each with its own tensor amax: x has rows of wildly different scales, w's amax
    is 1e3 times smaller."""
    x = _adversarial(0)[:48]
    w = _adversarial(1)[:32, :64] * 1e-3
    xq, wq = kernels.fake_quantize_pair(x, w, w_tile=w_tile, kernels=backend)
    assert torch.equal(_bits(xq), _bits(fake_quantize(x, kernels=backend)))
    assert torch.equal(_bits(wq), _bits(fake_quantize(w, tile=w_tile, kernels=backend)))
    ref = torch.from_numpy(_reference_fake_quantize(w.numpy(), w_tile[0]))
    assert torch.equal(_bits(wq), _bits(ref))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_compiled_rht_equals_the_reference_rht(dtype):
    """``kernels.apply_rht`` on compiled kernels keeps both bf16 roundings (ties to even, NaN,
    inf, subnormals), the same bits as ``nvfp4.rht``; inductor would drop a bf16 round trip
    without ``emulate_precision_casts``."""
    x = _adversarial(5)[:, :64].clone()
    x[4, :8] = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e-40, -0.0,
                             3.3895e38, 1.0 + 2.0 ** -8, 1.0 + 3 * 2.0 ** -8])  # two ties
    x[5] = 1.0 + 2.0 ** -8  # a row of ties: each rotated sum is exact, then rounded again
    x = x.to(dtype)
    ours = kernels.apply_rht(x, kernels="compiled")
    assert torch.equal(_bits(ours), _bits(rht(x)))


def test_auto_rotates_only_large_tensors_with_compiled_roundings(monkeypatch):
    calls = []
    real = kernels._rht_compiled
    monkeypatch.setattr(kernels, "_rht_compiled", lambda t: calls.append(t.numel()) or real(t))
    small = torch.randn(64, 512, generator=torch.Generator().manual_seed(0))
    large = torch.randn(kernels.RHT_COMPILE_MIN_NUMEL // 512, 512,
                        generator=torch.Generator().manual_seed(1))
    for x in (small, large):
        assert torch.equal(_bits(kernels.apply_rht(x, kernels="auto")), _bits(rht(x)))
    assert calls == [large.numel()]


def test_both_forms_of_the_e2m1_grid_step_agree_bit_for_bit():
    """``grid_steps_compare`` (compiled kernels) and ``grid_steps_bits`` (eager) give the same
    (step, 1 / step) on every binade edge of [-6, 6], its fp32 neighbours, +-0, subnormals and
    random values."""
    edges = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5, 4.0,
                          5.0, 6.0])
    up = torch.nextafter(edges, torch.full_like(edges, 7.0))
    down = torch.nextafter(edges, torch.zeros_like(edges))
    tiny = torch.tensor([1e-45, 1e-40, 1.1754942e-38, 1.17549435e-38])
    rand = torch.rand(4096, generator=torch.Generator().manual_seed(0)) * 6.0
    y = torch.cat([edges, up, down, tiny, rand])
    y = torch.cat([y, -y])
    for a, b in zip(nvfp4.grid_steps_compare(y), nvfp4.grid_steps_bits(y)):
        assert torch.equal(_bits(a), _bits(b))


@pytest.mark.parametrize("special", [float("nan"), float("inf"), -float("inf")])
def test_native_kernels_match_eager_bits_on_nan_and_inf(special):
    """One NaN or infinity in the tensor: the native kernels give eager's bits, NaN payloads
    included (a NaN amax makes every element NaN; an infinite amax makes S_enc 1)."""
    x = torch.randn(32, 64, generator=torch.Generator().manual_seed(4))
    x[3, 5] = special
    for tile in ((1, 16), (16, 16)):
        assert torch.equal(_bits(fake_quantize(x, tile=tile, kernels="native")),
                           _bits(fake_quantize(x, tile=tile)))
    cols = x.view(2, 16, 64)
    assert torch.equal(_bits(kernels.fake_quantize_columnwise(cols, kernels="native")),
                       _bits(kernels.fake_quantize_columnwise(cols)))
