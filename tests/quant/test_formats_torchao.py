"""MXFP4 and MXFP8 against torchao 0.18's ``to_mx`` and its dequantization, bit for bit: element
values and E8M0 scale bytes, every scale mode torchao has, on adversarial inputs (all-zero and
subnormal blocks, amax on and around every E8M0 boundary, huge outliers, ties of the element
grid), fp32 and bf16 inputs; fp16 (which torchao refuses) as its exact fp32 value.

The one difference, pinned block by block: torchao's eager RCEIL takes ``ceil(log2(q))`` of the
fp32 quotient ``q = amax / max`` with an fp32 ``log2``, which rounds to an integer for some
``q`` just above a power of two; nvfp4bench's ``rceil`` is the exact ceiling (``mx.py``).
"""
import pytest
import torch

from nvfp4bench.quant import formats, kernels

mx_tensor = pytest.importorskip("torchao.prototype.mx_formats.mx_tensor")
from torchao.prototype.mx_formats.config import ScaleCalculationMode  # noqa: E402
from torchao.prototype.mx_formats.kernels import f4_unpacked_to_f32, unpack_uint4  # noqa: E402

ELEMENTS = {"mxfp4": (torch.float4_e2m1fn_x2, 6.0), "mxfp8": (torch.float8_e4m3fn, 448.0)}
MODES = {"floor": ScaleCalculationMode.FLOOR, "ceil": ScaleCalculationMode.CEIL,
         "even": ScaleCalculationMode.EVEN, "rceil": ScaleCalculationMode.RCEIL}
CASES = [(base, rule) for base in ELEMENTS for rule in MODES]


def format_name(base, rule):
    return base if rule == "floor" else f"{base}_{rule}"


def adversarial(element_max: float) -> torch.Tensor:
    """Blocks of 32 (one per row of a (rows, 64) tensor, the second block of each row random).

    Each block's amax is 2**e times a mantissa on or next to a boundary of some scale rule
    (a power of two, one ulp either side, the EVEN rounding point of 1 and 3 mantissa bits, the
    element max and its neighbours), for every binade from subnormal to the largest; its other
    elements are the amax times ratios that land on ties of the E2M1 and E4M3 grids."""
    ulp = 2.0 ** -23
    top = element_max / 2 ** (2 if element_max == 6.0 else 8)  # amax / max is a power of two
    mantissas = [1.0, 1.0 + ulp, 2.0 - ulp, 1.5, 1.5 - ulp, 1.75, 1.75 - ulp, 1.0625,
                 1.0625 - ulp, 1.875, *(top * (1 + k * ulp) for k in range(-2, 5))]
    ratios = torch.tensor([1.0, 0.25 / 6, 0.75 / 6, 1.25 / 6, 1.75 / 6, 2.5 / 6, 3.5 / 6, 5 / 6,
                           -5 / 6, 17 / 448, 9.5 / 448, 0.5 ** 12, -0.3, 0.0])
    rows = []
    for e in range(-149, 128, 3):
        for m in mantissas:
            amax = torch.tensor(m, dtype=torch.float64) * 2.0 ** e
            if not torch.isfinite(amax.float()) or amax.float() == 0:
                continue
            block = torch.zeros(32, dtype=torch.float64)
            block[:len(ratios)] = amax * ratios.double()
            block[len(ratios):] = amax * torch.linspace(-0.99, 0.99, 32 - len(ratios)).double()
            rows.append(block.float())
    blocks = torch.stack(rows)
    blocks = torch.cat([blocks, torch.zeros(2, 32)])  # all-zero blocks
    blocks[-1, 3] = 2.0 ** -149  # the smallest subnormal alone
    blocks[-3, 7] = torch.finfo(torch.float32).max  # a huge outlier
    other = torch.randn(blocks.shape[0], 32, generator=torch.Generator().manual_seed(0))
    return torch.cat([blocks, other * 1e3], dim=1)


def torchao_mx(x, base, rule):
    """(elements as fp32, scale bytes, dequantized in x's dtype) from torchao."""
    elem, _ = ELEMENTS[base]
    scale, data = mx_tensor.to_mx(x.contiguous(), elem, 32, MODES[rule])
    values = (f4_unpacked_to_f32(unpack_uint4(data)) if base == "mxfp4" else data.float())
    dq = mx_tensor.to_dtype(data, scale, elem, 32, x.dtype)
    return values.view(x.shape), scale.view(torch.uint8), dq


def log2_rounds_up_to_integer(x, element_max):
    """Blocks where ``2 ** ceil(log2(q))`` with fp32 ``log2`` is below the quotient
    ``q = amax / max`` (fp32 log2 rounded q's logarithm down onto an integer), so that torchao's
    code is one less than the exact ceiling's; only where no clamp at 2**-127 hides it."""
    q = x.float().abs().view(x.shape[0], -1, 32).amax(-1) / element_max
    k = torch.ceil(torch.log2(q))
    finite = torch.isfinite(q) & (k >= -127)
    return finite & (q > torch.ldexp(torch.ones_like(q), k.clamp(-127, 127).int()))


def same(a, b):
    return (a == b) | (a.isnan() & b.isnan())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("base, rule", CASES)
def test_mx_equals_torchao_bit_for_bit(base, rule, dtype):
    x = adversarial(ELEMENTS[base][1]).to(dtype)
    values, codes, dq = torchao_mx(x, base, rule)
    q = formats.quantize(x, format=format_name(base, rule))
    ours = kernels.fake_quantize(x, format=format_name(base, rule))
    assert torch.equal(ours, formats.dequantize(q))
    assert ours.dtype == torch.float32
    differs = torch.zeros_like(codes, dtype=torch.bool)
    if rule == "rceil":
        differs = log2_rounds_up_to_integer(x, ELEMENTS[base][1])
        if dtype == torch.float32:  # a bf16 amax is never that close to a power of two
            assert differs.sum() >= 20, "the adversarial set misses torchao's log2 rounding"
        assert torch.equal(q.scales[differs].int(), codes[differs].int() + 1)
    keep = ~differs.repeat_interleave(32, dim=1)
    assert torch.equal(q.scales[~differs], codes[~differs])
    assert torch.equal(same(q.values, values)[keep], torch.ones_like(keep)[keep])
    assert same(ours.to(dtype), dq)[keep].all()
    assert (codes == 0).any() and (codes >= 245).any(), "scale bytes at both ends"


@pytest.mark.parametrize("base, rule", [("mxfp4", "floor"), ("mxfp8", "even"),
                                        ("mxfp4", "rceil")])
def test_fp16_inputs_are_their_exact_fp32_values(base, rule):
    """torchao refuses fp16: an fp16 tensor is quantized as its (exact) fp32 value."""
    x = (torch.randn(64, 96, generator=torch.Generator().manual_seed(3)) * 100).half()
    x[0, :32] = 6e-8  # fp16 subnormals
    name = format_name(base, rule)
    ours = kernels.fake_quantize(x, format=name)
    assert torch.equal(ours, kernels.fake_quantize(x.float(), format=name))
    assert torch.equal(ours, torchao_mx(x.float(), base, rule)[2])


def test_nan_and_inf_blocks_decode_as_torchao_does():
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(1))
    x[0, 3], x[1, 40], x[2, 0] = float("nan"), float("inf"), -float("inf")
    for base, rule in CASES:
        dq = torchao_mx(x, base, rule)[2]
        assert same(kernels.fake_quantize(x, format=format_name(base, rule)), dq).all(), \
            format_name(base, rule)
