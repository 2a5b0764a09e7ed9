"""NVFP4 layers: equivalence with an explicit unfold + quantized-GEMM reference (bit for bit with
RN), SR determinism and unbiasedness, the backward of each recipe against autograd, and errors.

The reference is written here from docs/nvfp4.md sections 3 and 6 with ``nvfp4.quantize`` /
``dequantize``, ``F.unfold`` / ``F.fold`` and the full im2col matrices. It shares only
``gemm.gemm`` / ``gemm.bias_grad`` and the tap-by-tap summation order with the layers (see
``nvfp4bench/gemm.py``): fp32 products are reproducible only for identical BLAS calls, so the
bit-exact comparison checks the quantization roles (blocks, amax, tiles, RHT, padding).
"""
import itertools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from nvfp4bench.quant import formats, kernels, nvfp4, taps
from nvfp4bench.quant.gemm import axis_window, bias_grad, gemm
from nvfp4bench.quant.linear import QuantizedMatmul
from nvfp4bench.quant.matmul import Matmul
from nvfp4bench.quant.recipes import RECIPES, get_recipe
from nvfp4bench.quant.twins import quantized

QUANTIZED = [name for name, r in RECIPES.items() if r.quantized]
RN = [name for name in QUANTIZED if not RECIPES[name].stochastic_rounding]
SR = [name for name in QUANTIZED if RECIPES[name].stochastic_rounding]
FLT_MAX = torch.finfo(torch.float32).max


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: intra-op threads only add overhead (and spin on a shared CPU)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------
# The reference: operand roles of docs/nvfp4.md section 3, on explicit GEMM matrices
# ---------------------------------------------------------------------------------------------
def Q(x, *, tile=(1, 16), rht=False, sr=False, generator=None, amax=None, format="nvfp4"):
    """dequantize(quantize(x)) of a 2-D tensor in ``format``. ``amax`` imposes the tensor amax
    (of the rotated values with ``rht``): an extra row holding it raises S_enc's amax and changes
    no other row's blocks (1-D blocks lie within a row; MX formats have no tensor amax)."""
    if amax is None:
        return formats.dequantize(formats.quantize(x, format=format, tile=tile, rht=rht, sr=sr,
                                                   generator=generator))
    v = nvfp4.rht(x) if rht else x.float()
    extra = torch.zeros(1, v.shape[1])
    extra[0, 0] = amax
    q = formats.quantize(torch.cat([v, extra]), format=format, tile=tile, sr=sr,
                         generator=generator)
    return formats.dequantize(q)[:-1]


def expected_sr(x, *, rht=False, amax=None):
    """E[Q_sr(x)] exactly: block scales are deterministic, and hardware SR rounds |y| up from
    ``lo`` with probability floor(256 f) / 256 (docs/nvfp4.md section 4)."""
    v = nvfp4.rht(x) if rht else x.float()
    if amax is not None:
        v = torch.cat([v, torch.zeros(1, v.shape[1])])
        v[-1, 0] = amax
    q = nvfp4.quantize(v)
    s_b = q.scales.float().repeat_interleave(16, dim=1)
    s_dec = nvfp4.global_decode_scale(q.amax)
    enc = torch.clamp(torch.reciprocal(s_b * s_dec), max=FLT_MAX)
    y = (v * enc).abs().clamp(max=6.0)
    step = torch.where(y < 2, 0.5, torch.where(y < 4, 1.0, 2.0))
    lo = torch.floor(y / step) * step
    p_up = torch.floor(256 * (y - lo) / step) / 256
    e = torch.sign(v) * (lo + p_up * step) * s_b * s_dec
    return e[:-1] if amax is not None else e


def pad_tokens(t):
    """(C, M) -> (C, Mp): zero-pad tokens to a multiple of 16."""
    return F.pad(t.float(), (0, -t.shape[1] % 16))


class Reference:
    """B, D, A of each recipe (layers.py's docstring, written again from the spec's table)."""

    def __init__(self, recipe, generator=None, expectation=False, format="nvfp4"):
        self.r, self.g, self.expectation = get_recipe(recipe), generator, expectation
        self.format = format

    def Q(self, x, **kw):
        return Q(x, format=self.format, **kw)

    def _grad_q(self, x, rht=False, amax=None):
        if self.r.stochastic_rounding and self.expectation:
            return expected_sr(x, rht=rht, amax=amax)
        return self.Q(x, rht=rht, sr=self.r.stochastic_rounding, generator=self.g, amax=amax)

    def grad_rows(self, dy, amax=None):  # dgrad's dY, (M, N)
        return self._grad_q(dy, amax=amax) if self.r.backward_override is None else dy.float()

    def weight_t(self, w2d, wq):  # dgrad's W^T, (K, N)
        mode = self.r.backward_override
        if mode == "high_precision":
            return w2d.t().float()
        if mode == "dequantized" or self.r.weight_tile == (16, 16):
            return wq.t()
        return self.Q(w2d.t())

    def grad_cols(self, dyt, amax=None):  # wgrad's dY^T, (N, Mp)
        if self.r.backward_override is None:
            return self._grad_q(dyt, rht=self.r.rht, amax=None if self.r.rht else amax)
        return dyt  # unquantized: an RHT would cancel (fwd_rht)

    def act_cols(self, xt, xqt, amax=None):  # wgrad's X^T, (K, Mp)
        mode = self.r.backward_override
        if mode is None:
            return self.Q(xt, rht=self.r.rht, amax=None if self.r.rht else amax)
        return xqt if mode == "dequantized" else xt


def unfold_nhwc(x, conv):
    """im2col with K = (kh, kw, C) and C fastest: (N, C, H, W) -> (N * L, kh * kw * C)."""
    n, c = x.shape[:2]
    cols = F.unfold(x.float(), conv.kernel_size, conv.dilation, conv.padding, conv.stride)
    taps = conv.kernel_size[0] * conv.kernel_size[1]
    return cols.view(n, c, taps, -1).permute(0, 3, 2, 1).reshape(-1, taps * c)


def fold_nhwc(cols, n, size, conv):
    """The adjoint of ``unfold_nhwc``: (N * L, kh * kw * C) -> (N, C, *size), summing overlaps."""
    taps = conv.kernel_size[0] * conv.kernel_size[1]
    c = cols.shape[1] // taps
    cols = cols.view(n, -1, taps, c).permute(0, 3, 2, 1).reshape(n, c * taps, -1)
    return F.fold(cols, size, conv.kernel_size, conv.dilation, conv.padding, conv.stride)


def tap_sum(a, b, c):
    """sum_t gemm(a_t, b_t) over column blocks of width c, in tap order (gemm.py)."""
    y = gemm(a[:, :c], b[:, :c])
    for t in range(1, a.shape[1] // c):
        y = y + gemm(a[:, t * c:(t + 1) * c], b[:, t * c:(t + 1) * c])
    return y


def reference_linear(layer, x, dy, ref):
    w, b = layer.weight.detach(), layer.bias.detach()
    x2, dy2 = x.reshape(-1, x.shape[-1]).float(), dy.reshape(-1, dy.shape[-1]).float()
    xq, wq = ref.Q(x2), ref.Q(w, tile=ref.r.weight_tile)
    y = gemm(xq, wq) + b                                               # fprop
    dx = gemm(ref.grad_rows(dy2), ref.weight_t(w, wq))                  # dgrad
    dw = gemm(ref.grad_cols(pad_tokens(dy2.t())),                       # wgrad
              ref.act_cols(pad_tokens(x2.t()), pad_tokens(xq.t())))
    return y.view(dy.shape), dx.view(x.shape), dw, bias_grad(dy2)


def reference_conv2d(layer, x, dy, ref):
    w, b = layer.weight.detach(), layer.bias.detach()
    n, c, h, wd_ = x.shape
    cout, kh, kw = w.shape[0], *w.shape[2:]
    xcol = unfold_nhwc(x, layer)                                        # (M, K)
    amax_x = x.abs().max()  # the activation tensor's amax (some pixels may be in no tap)
    xq = ref.Q(xcol, amax=amax_x)
    w2d = w.permute(0, 2, 3, 1).reshape(cout, -1)                       # (C_out, K)
    wq = ref.Q(w2d, tile=ref.r.weight_tile)
    y = tap_sum(xq, wq, c) + b                                          # fprop
    dy2 = dy.permute(0, 2, 3, 1).reshape(-1, cout).float()              # (M, C_out)
    g, wd = ref.grad_rows(dy2), ref.weight_t(w2d, wq)                   # wd: (K, C_out)
    dcol = torch.cat([gemm(g, wd_t) for wd_t in wd.split(c, 0)], 1)     # (M, K)
    dx = fold_nhwc(dcol, n, (h, wd_), layer)                            # dgrad
    gt = ref.grad_cols(pad_tokens(dy2.t()))                             # (C_out, Mp)
    xt = ref.act_cols(pad_tokens(xcol.t()), pad_tokens(xq.t()), amax=amax_x)  # (K, Mp)
    dw = torch.cat([gemm(gt, xt_t) for xt_t in xt.split(c, 0)], 1)      # wgrad, tap by tap
    dw = dw.view(cout, kh, kw, c).permute(0, 3, 1, 2)                   # wgrad
    oh, ow = dy.shape[2:]
    return y.view(n, oh, ow, cout).permute(0, 3, 1, 2), dx, dw, bias_grad(dy2)


def reference_conv_transpose2d(layer, x, dy, ref):
    w, b = layer.weight.detach(), layer.bias.detach()
    n, cin, h, w_in = x.shape
    cout, kh, kw = w.shape[1], *w.shape[2:]
    oh, ow = dy.shape[2:]
    x2 = x.permute(0, 2, 3, 1).reshape(-1, cin).float()                 # (M, C_in)
    xq = ref.Q(x2)
    w2d = w.permute(2, 3, 1, 0).reshape(-1, cin)                        # (K', C_in), K' = T*C_out
    wq = ref.Q(w2d, tile=ref.r.weight_tile)
    ycol = torch.cat([gemm(xq, wq_t) for wq_t in wq.split(cout, 0)], 1)  # (M, K')
    y = fold_nhwc(ycol, n, (oh, ow), layer) + b.view(1, -1, 1, 1)       # fprop: a conv dgrad
    dycol = unfold_nhwc(dy, layer)                                      # (M, K')
    amax_dy = dy.abs().max()
    g = ref.grad_rows(dycol, amax=amax_dy)
    wd = ref.weight_t(w2d, wq)                                          # (C_in, K')
    dx = tap_sum(g, wd, cout)                                           # dgrad: a conv fprop
    gt = ref.grad_cols(pad_tokens(dycol.t()), amax=amax_dy)             # (K', Mp)
    xt = ref.act_cols(pad_tokens(x2.t()), pad_tokens(xq.t()))
    dw = torch.cat([gemm(gt_t, xt) for gt_t in gt.split(cout, 0)], 0)   # wgrad: (K', C_in)
    dw = dw.view(kh, kw, cout, cin).permute(3, 2, 0, 1)
    return y, dx.view(n, h, w_in, cin).permute(0, 3, 1, 2), dw, \
        bias_grad(dy.permute(0, 2, 3, 1).reshape(-1, cout))


# Layer cases: (id, module factory, input shape, reference). Odd shapes: batch 1, stride 2,
# padding, dilation, output_padding, token counts that are not multiples of 16, and a conv that
# skips input rows (kernel 2, stride 3), whose largest input value sits in a skipped row.
CASES = [
    ("linear", lambda: nn.Linear(32, 16), (3, 5, 32), reference_linear),
    ("conv_s2p1_batch1", lambda: nn.Conv2d(16, 32, 3, stride=2, padding=1), (1, 16, 5, 7),
     reference_conv2d),
    ("conv_dil2_pad2", lambda: nn.Conv2d(16, 16, 3, padding=2, dilation=2), (2, 16, 5, 7),
     reference_conv2d),
    ("conv_skips_rows", lambda: nn.Conv2d(32, 16, 2, stride=3, padding=(0, 1)), (1, 32, 8, 7),
     reference_conv2d),
    ("conv_rect", lambda: nn.Conv2d(16, 16, (3, 1), stride=(1, 2), padding=(1, 0)),
     (2, 16, 5, 7), reference_conv2d),
    ("convT_s2_outpad", lambda: nn.ConvTranspose2d(32, 16, 3, stride=2, padding=1,
                                                   output_padding=1), (1, 32, 3, 4),
     reference_conv_transpose2d),
    ("convT_dil2", lambda: nn.ConvTranspose2d(16, 16, 3, padding=1, dilation=2), (2, 16, 5, 7),
     reference_conv_transpose2d),
    # Output rows of 16 pixels: taps whose rows differ by whole strides share their 16-token
    # blocks, and the wgrad quantizes each block once (layers._planes). The CNN's k4 s2 p1
    # geometry; dilation with stride 2; and taps 4 rows apart with 2 output rows (gaps).
    ("conv_k4s2_shared", lambda: nn.Conv2d(16, 16, 4, stride=2, padding=1), (2, 16, 6, 32),
     reference_conv2d),
    ("conv_s2dil2_shared", lambda: nn.Conv2d(16, 16, 3, stride=2, padding=2, dilation=2),
     (1, 16, 5, 32), reference_conv2d),
    ("conv_gaps_shared", lambda: nn.Conv2d(16, 16, (3, 1), dilation=(4, 1)), (1, 16, 10, 16),
     reference_conv2d),
    ("convT_k4s2_shared", lambda: nn.ConvTranspose2d(16, 16, 4, stride=2, padding=1),
     (2, 16, 3, 16), reference_conv_transpose2d),
    # Taps that read their input whole (used without a gather): 1x1, and a centre tap
    ("conv_1x1", lambda: nn.Conv2d(16, 32, 1), (2, 16, 3, 5), reference_conv2d),
    ("convT_s1p1", lambda: nn.ConvTranspose2d(16, 16, 3, padding=1), (1, 16, 4, 5),
     reference_conv_transpose2d),
]


CASE = {c[0]: c for c in CASES}


def make_case(case, seed=0):
    _, factory, shape, _ = case
    torch.manual_seed(seed)
    layer = factory()
    x = torch.randn(shape)
    if case[0] == "conv_skips_rows":
        x[0, 3, 2, 4] = 40.0  # row 2 is read by no tap: amax(X) != amax(im2col(X))
    return layer, x


def run_layer(twin, x, dy):
    """(Y, dX, dW, db) of one forward and backward, with fresh parameter gradients."""
    for p in twin.parameters():
        p.grad = None
    x = x.clone().requires_grad_()
    y = twin(x)
    y.backward(dy)
    return y.detach(), x.grad, twin.weight.grad.clone(), twin.bias.grad.clone()


def output_grad(layer, x, seed=1):
    with torch.no_grad():
        y = layer(x)
    return torch.randn(y.shape, generator=torch.Generator().manual_seed(seed))


def assert_bits(actual, expected, what):
    assert actual.shape == expected.shape, what
    assert torch.equal(actual.float(), expected.float()), \
        f"{what}: max |diff| {(actual.float() - expected.float()).abs().max().item():.3g}"


# ---------------------------------------------------------------------------------------------
# Equivalence with the reference
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("recipe", RN)
def test_rn_recipes_equal_the_unfold_gemm_reference_bit_for_bit(recipe, case):
    layer, x = make_case(case)
    dy = output_grad(layer, x)
    twin = quantized(layer, recipe)
    y, dx, dw, db = run_layer(twin, x, dy)
    ry, rdx, rdw, rdb = case[3](layer, x, dy, Reference(recipe))
    for what, a, e in (("output", y, ry), ("input grad", dx, rdx), ("weight grad", dw, rdw),
                       ("bias grad", db, rdb)):
        assert_bits(a, e, f"{recipe} {case[0]} {what}")


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("recipe", SR)
def test_sr_recipes_forward_equals_reference_and_backward_is_seeded(recipe, case):
    layer, x = make_case(case)
    dy = output_grad(layer, x)
    runs = [run_layer(quantized(layer, recipe, generator=torch.Generator().manual_seed(s)),
                      x, dy) for s in (7, 7, 8)]
    ry = case[3](layer, x, dy, Reference(recipe, expectation=True))[0]
    assert_bits(runs[0][0], ry, f"{recipe} {case[0]} output")  # the forward has no SR
    for i, what in ((1, "input grad"), (2, "weight grad")):
        assert torch.equal(runs[0][i], runs[1][i]), f"same seed, different {what}"
        assert not torch.equal(runs[0][i], runs[2][i]), f"seed does not reach the {what}"
        assert runs[0][i].isfinite().all()


# Every format through the same reference. MX blocks are 32 long, so the convolutions have
# 32 channels (a block must not straddle two taps) and rows of 32 output pixels where taps share
# their token blocks; the Linear's 16 outputs make the dgrad's blocks along N zero-padded to 32.
FORMAT_CASES = [
    ("linear", lambda: nn.Linear(32, 16), (3, 5, 32), reference_linear),
    ("conv_s2p1_batch1", lambda: nn.Conv2d(32, 32, 3, stride=2, padding=1), (1, 32, 5, 7),
     reference_conv2d),
    ("conv_skips_rows", lambda: nn.Conv2d(32, 32, 2, stride=3, padding=(0, 1)), (1, 32, 8, 7),
     reference_conv2d),
    ("conv_k4s2_shared", lambda: nn.Conv2d(32, 32, 4, stride=2, padding=1), (1, 32, 4, 64),
     reference_conv2d),
    ("convT_k4s2_shared", lambda: nn.ConvTranspose2d(32, 32, 4, stride=2, padding=1),
     (1, 32, 3, 16), reference_conv_transpose2d),
]
OTHER_FORMATS = ["nvfp4_4over6", "nvfp4_4over6_mse", "mxfp4", "mxfp8_rceil"]


@pytest.mark.parametrize("case", FORMAT_CASES, ids=[c[0] for c in FORMAT_CASES])
@pytest.mark.parametrize("fmt", OTHER_FORMATS)
@pytest.mark.parametrize("recipe", RN)
def test_every_format_equals_the_unfold_gemm_reference_bit_for_bit(recipe, fmt, case):
    layer, x = make_case(case)
    dy = output_grad(layer, x)
    twin = quantized(layer, recipe, format=fmt)
    y, dx, dw, db = run_layer(twin, x, dy)
    ry, rdx, rdw, rdb = case[3](layer, x, dy, Reference(recipe, format=fmt))
    for what, a, e in (("output", y, ry), ("input grad", dx, rdx), ("weight grad", dw, rdw),
                       ("bias grad", db, rdb)):
        assert_bits(a, e, f"{recipe} {fmt} {case[0]} {what}")
    assert not torch.equal(y, case[3](layer, x, dy, Reference(recipe))[0]), \
        f"{fmt} gives the nvfp4 output"


@pytest.mark.parametrize("fmt", OTHER_FORMATS)
@pytest.mark.parametrize("recipe", SR)
def test_every_format_with_sr_is_seeded(recipe, fmt):
    layer, x = make_case(FORMAT_CASES[3])
    dy = output_grad(layer, x)
    runs = [run_layer(quantized(layer, recipe, format=fmt,
                                generator=torch.Generator().manual_seed(s)), x, dy)
            for s in (7, 7, 8)]
    reference = Reference(recipe, torch.Generator().manual_seed(0), format=fmt)
    assert_bits(runs[0][0], FORMAT_CASES[3][3](layer, x, dy, reference)[0],
                f"{recipe} {fmt} output")  # the forward has no SR
    for i, what in ((1, "input grad"), (2, "weight grad")):
        assert torch.equal(runs[0][i], runs[1][i]), f"same seed, different {what}"
        assert not torch.equal(runs[0][i], runs[2][i]), f"seed does not reach the {what}"
        assert runs[0][i].isfinite().all()


def test_mx_convolutions_need_channels_in_multiples_of_32():
    with pytest.raises(ValueError, match=r"mxfp4 needs channels counts that are multiples of 32"):
        quantized(nn.Conv2d(16, 32, 3), "nvfp4_full", format="mxfp4")
    quantized(nn.Linear(16, 48), "nvfp4_full", format="mxfp4")  # a Linear's blocks are padded


@pytest.mark.parametrize("kernels", ["compiled", "native"])
@pytest.mark.parametrize("recipe", ["nvfp4_full", "sr_only", "2d_rht_sr"])
def test_compiled_quantizer_gives_a_linear_the_same_bits_as_eager(recipe, kernels):
    """The compiled and the native kernels (the columnwise wgrad copies among them) inside a
    layer: Y, dX, dW and db equal the eager kernels', SR included for the same seed."""
    layer, x = make_case(CASE["linear"])  # 15 tokens: the wgrad copies are padded
    dy = output_grad(layer, x)
    runs = {}
    for backend in ("eager", kernels):
        gen = torch.Generator().manual_seed(3) if RECIPES[recipe].stochastic_rounding else None
        runs[backend] = run_layer(quantized(layer, recipe, generator=gen, kernels=backend), x, dy)
    for what, a, e in zip(("output", "input grad", "weight grad", "bias grad"),
                          runs[kernels], runs["eager"]):
        assert_bits(a, e, f"{recipe} {kernels} {what}")


@pytest.mark.parametrize("case", [CASE["linear"], CASE["conv_s2p1_batch1"],
                                  CASE["convT_s2_outpad"], CASE["convT_k4s2_shared"]],
                         ids=["linear", "conv", "convT", "convT_shared"])
@pytest.mark.parametrize("recipe", SR)
def test_sr_gradients_are_unbiased(recipe, case):
    """The mean of n SR draws of dX and dW approaches the gradient computed from E[Q_sr(dY)]
    (exact: GEMMs are linear in dY). Tolerance: 6 standard errors of the mean per element, the
    error estimated from the n = 160 draws (Student t, 159 dof: P(|t| > 6) ~ 1e-8 per element,
    < 1e-3 over the ~40k elements of these tests), plus 1e-5 of the largest value for fp32
    rounding (the mean of GEMMs is not bitwise the GEMM of the mean). A recipe that lost SR on
    either gradient copy fails by orders of magnitude (its draws all give the RN result)."""
    layer, x = make_case(case)
    dy = output_grad(layer, x)
    twin = quantized(layer, recipe, generator=torch.Generator().manual_seed(3))
    draws = {"dx": [], "dw": []}
    for _ in range(160):
        _, dx, dw, _ = run_layer(twin, x, dy)
        draws["dx"].append(dx)
        draws["dw"].append(dw)
    _, edx, edw, _ = case[3](layer, x, dy, Reference(recipe, expectation=True))
    for what, expected in (("dx", edx), ("dw", edw)):
        d = torch.stack(draws[what])
        mean, se = d.mean(0), d.std(0) / len(d) ** 0.5
        slack = 1e-5 * expected.abs().max()
        z = ((mean - expected).abs() - slack).clamp(min=0) / se.clamp(min=1e-30)
        assert ((mean - expected).abs() <= 6 * se + slack).all(), \
            f"{recipe} {case[0]} {what}: biased, max z {z.max().item():.1f}"


# ---------------------------------------------------------------------------------------------
# Each backward against autograd through the fake-quantized forward
# ---------------------------------------------------------------------------------------------
def fake_quantized_operands(layer, x, recipe):
    """(Q(X), Q_w(W)) as tensors of the module's own layout, for F.linear / F.conv*."""
    tile = get_recipe(recipe).weight_tile
    w = layer.weight.detach()
    if isinstance(layer, nn.Linear):
        return Q(x.reshape(-1, x.shape[-1])).view(x.shape), Q(w, tile=tile)
    xq = Q(x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])).view(
        x.shape[0], *x.shape[2:], x.shape[1]).permute(0, 3, 1, 2)
    if isinstance(layer, nn.ConvTranspose2d):
        cin, cout, kh, kw = w.shape
        wq = Q(w.permute(2, 3, 1, 0).reshape(-1, cin), tile=tile).view(kh, kw, cout, cin)
        return xq, wq.permute(3, 2, 0, 1)
    cout, cin, kh, kw = w.shape
    wq = Q(w.permute(0, 2, 3, 1).reshape(cout, -1), tile=tile).view(cout, kh, kw, cin)
    return xq, wq.permute(0, 3, 1, 2)


def functional(layer, x, w):
    if isinstance(layer, nn.Linear):
        return F.linear(x, w, layer.bias)
    if isinstance(layer, nn.ConvTranspose2d):
        return F.conv_transpose2d(x, w, layer.bias, layer.stride, layer.padding,
                                  layer.output_padding, 1, layer.dilation)
    return F.conv2d(x, w, layer.bias, layer.stride, layer.padding, layer.dilation)


def assert_close(a, e, what):
    torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5 * e.abs().max().item(), msg=what)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("recipe", ["fwd_only", "fwd_rht"])
def test_fwd_only_backward_is_the_high_precision_gradient(recipe, case):
    """fwd_only and fwd_rht (the study's forward-only recipes 2 and 7) = autograd of the
    straight-through view y = f(X, W) + (f(QX, QW) - f(X, W)): dX = dY W, dW = dY^T X to fp32
    rounding; QW in 1x16 blocks (fwd_only) or 16x16 tiles (fwd_rht)."""
    layer, x = make_case(case)
    dy = output_grad(layer, x)
    y, dx, dw, db = run_layer(quantized(layer, recipe), x, dy)
    layer.zero_grad()
    xq, wq = fake_quantized_operands(layer, x, recipe)
    xr = x.clone().requires_grad_()
    hp = functional(layer, xr, layer.weight)
    yr = hp + (functional(layer, xq, wq) - hp).detach()
    yr.backward(dy)
    for what, a, e in (("output", y, yr.detach()), ("input grad", dx, xr.grad),
                       ("weight grad", dw, layer.weight.grad), ("bias grad", db, layer.bias.grad)):
        assert_close(a, e, f"{recipe} {case[0]} {what}")


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_chain_rule_backward_is_autograd_through_the_dequantized_operands(case):
    layer, x = make_case(case)
    dy = output_grad(layer, x)
    y, dx, dw, db = run_layer(quantized(layer, "chain_rule"), x, dy)
    xq, wq = fake_quantized_operands(layer, x, "chain_rule")
    xq.requires_grad_(), wq.requires_grad_()
    layer.zero_grad()
    yr = functional(layer, xq, wq)
    yr.backward(dy)
    for what, a, e in (("output", y, yr.detach()), ("input grad", dx, xq.grad),
                       ("weight grad", dw, wq.grad), ("bias grad", db, layer.bias.grad)):
        assert_close(a, e, f"chain_rule {case[0]} {what}")


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_fwd_rht_is_fwd_only_with_16x16_weight_tiles_in_the_forward(case):
    """Recipe 7: its forward is 2d_rht's (16x16 weight tiles, RN; differs from fwd_only's 1x16),
    its backward fwd_only's bit for bit (the RHT of unquantized operands cancels: none is run)."""
    layer, x = make_case(case)
    dy = output_grad(layer, x)
    rht7, fwd2, rht4 = (run_layer(quantized(layer, r), x, dy)
                        for r in ("fwd_rht", "fwd_only", "2d_rht"))
    assert_bits(rht7[0], rht4[0], f"{case[0]} output = 2d_rht's")
    assert not torch.equal(rht7[0], fwd2[0]), f"{case[0]}: the weight tiles must matter"
    for i, what in ((1, "input grad"), (2, "weight grad"), (3, "bias grad")):
        assert_bits(rht7[i], fwd2[i], f"{case[0]} {what} = fwd_only's")


def test_forward_only_linear_gradients_are_dy_w_and_dyt_x():
    """The done-when of issue 15, spelled out on one Linear: dX = dY W and dW = dY^T X (fp32);
    chain_rule instead dX = dY Q(W), dW = dY^T Q(X)."""
    torch.manual_seed(3)
    layer, x, dy = nn.Linear(64, 32), torch.randn(48, 64), torch.randn(48, 32)
    w = layer.weight.detach()
    for recipe in ("fwd_only", "fwd_rht"):
        _, dx, dw, _ = run_layer(quantized(layer, recipe), x, dy)
        assert_close(dx, dy @ w, f"{recipe} dX")
        assert_close(dw, dy.t() @ x, f"{recipe} dW")
    _, dx, dw, _ = run_layer(quantized(layer, "chain_rule"), x, dy)
    assert_close(dx, dy @ Q(w), "chain_rule dX")
    assert_close(dw, dy.t() @ Q(x), "chain_rule dW")
    assert not torch.allclose(dx, dy @ w, rtol=1e-3)  # the two definitions do differ here


# ---------------------------------------------------------------------------------------------
# Attention matmul
# ---------------------------------------------------------------------------------------------
def reference_matmul(a, b, dy, ref):
    """a (B, M, K) @ b (B, K, N): the Linear with X = a, W = b^T, zero-padded K and N."""
    bsz, m, k = a.shape
    n = b.shape[-1]
    kp, np_ = k + (-k % 16), n + (-n % 16)
    a = F.pad(a, (0, kp - k))
    w = F.pad(b, (0, np_ - n, 0, kp - k)).mT  # (B, Np, Kp)
    dy = F.pad(dy, (0, np_ - n))
    xq = Q(a.reshape(-1, kp)).view(a.shape)
    wq = Q(w.reshape(-1, kp)).view(w.shape)
    y = gemm(xq, wq)
    g = ref.grad_rows(dy.reshape(-1, np_)).view(dy.shape)
    wd = ref.weight_t(w.reshape(-1, kp), wq.reshape(-1, kp))  # (Kp, B*Np): per batch below
    if ref.r.backward_override is None:
        wd = Q(w.mT.reshape(-1, np_)).view(bsz, kp, np_)
    elif ref.r.backward_override == "dequantized":
        wd = wq.mT
    else:
        wd = w.mT
    da = gemm(g, wd)
    gt = ref.grad_cols(pad_tokens(dy.mT.reshape(-1, m))).view(bsz, np_, -1)
    xt = ref.act_cols(pad_tokens(a.mT.reshape(-1, m)), pad_tokens(xq.mT.reshape(-1, m)))
    dw = gemm(gt, xt.view(bsz, kp, -1))  # (B, Np, Kp) = d(b^T)
    return y[..., :n], da[..., :k], dw.mT[:, :k, :n]


@pytest.mark.parametrize("recipe", RN)
def test_quantized_matmul_equals_reference_with_padded_257_like_dims(recipe):
    torch.manual_seed(0)
    a, b = torch.randn(2, 17, 20), torch.randn(2, 20, 17)  # K = 20, N = 17: zero-padded
    dy = torch.randn(2, 17, 17)
    ar, br = a.clone().requires_grad_(), b.clone().requires_grad_()
    y = QuantizedMatmul(recipe)(ar, br)
    y.backward(dy)
    ry, rda, rdb = reference_matmul(a, b, dy, Reference(recipe))
    for what, x, e in (("output", y, ry), ("a grad", ar.grad, rda), ("b grad", br.grad, rdb)):
        assert_bits(x.detach(), e, f"{recipe} matmul {what}")


@pytest.mark.parametrize("recipe", ["nvfp4_full", "2d_rht", "fwd_rht", "2d_rht_sr", "sr_only"])
@pytest.mark.parametrize("case", [CASE["conv_dil2_pad2"], CASE["convT_dil2"],
                                  CASE["conv_gaps_shared"], CASE["convT_k4s2_shared"]],
                         ids=["conv", "convT", "conv_shared", "convT_shared"])
def test_wgrad_unfolded_one_tap_at_a_time_gives_the_same_bits(recipe, case, monkeypatch):
    """A memory bound of one tap per chunk (the RHT amax then takes a first pass) changes no bit."""
    layer, x = make_case(case)
    dy = output_grad(layer, x)
    whole = run_layer(quantized(layer, recipe, generator=torch.Generator().manual_seed(3)), x, dy)
    monkeypatch.setattr(taps, "UNFOLD_CHUNK_BYTES", 1)
    chunked = run_layer(quantized(layer, recipe, generator=torch.Generator().manual_seed(3)), x,
                        dy)
    for a, e in zip(chunked, whole):
        assert torch.equal(a, e)


def test_the_unfolding_chunk_is_cache_sized_on_the_cpu_only(monkeypatch):
    assert taps.unfold_chunk_bytes(torch.device("cpu")) == taps.UNFOLD_CHUNK_BYTES_CPU
    assert taps.unfold_chunk_bytes(torch.device("cuda")) == taps.UNFOLD_CHUNK_BYTES
    assert taps.UNFOLD_CHUNK_BYTES_CPU < taps.UNFOLD_CHUNK_BYTES
    monkeypatch.setattr(taps, "UNFOLD_CHUNK_BYTES", 1)  # a bound below both holds everywhere
    assert taps.unfold_chunk_bytes(torch.device("cpu")) == 1


@pytest.mark.parametrize("case, recipe, shared, rotated", [
    ("conv_k4s2_shared", "nvfp4_full", True, False), ("conv_k4s2_shared", "sr_only", True, False),
    ("convT_k4s2_shared", "2d_rht", True, True), ("convT_k4s2_shared", "sr_only", False, False),
    ("convT_k4s2_shared", "2d_rht_sr", False, True)])
def test_k4s2_wgrad_quantizes_each_shared_block_once(case, recipe, shared, rotated,
                                                     monkeypatch):
    """With RN, the unfolded operand of a k4 s2 conv (4 x 4 taps, rows 2 apart; X of a Conv2d,
    dY of a ConvTranspose2d) is quantized as 8 planes of rows + 1 rows, not 16 taps of rows
    rows. With SR (a ConvTranspose2d's dY) every tap's copy draws its own bits, and only the
    RHT rotation is done once per plane."""
    layer, x = make_case(CASE[case])
    twin = quantized(layer, recipe, generator=torch.Generator().manual_seed(0))
    y = twin(x.clone().requires_grad_())
    sizes = {"fake_quantize": [0], "apply_rht": [0]}
    for fn, module in (("fake_quantize", kernels), ("apply_rht", kernels)):
        real = getattr(module, fn)
        monkeypatch.setattr(module, fn, lambda t, _real=real, _fn=fn, **kw:
                            sizes[_fn].append(t.numel()) or _real(t, **kw))
    y.backward(torch.ones_like(y))
    if case.startswith("convT"):  # im2col(dY) over the adjoint conv's output, x's pixels
        n, c, rows, cols = x.shape[0], y.shape[1], *x.shape[2:]
    else:
        n, c, rows, cols = x.shape[0], x.shape[1], *y.shape[2:]
    planes, taps = 8 * c * n * (rows + 1) * cols, 16 * c * n * rows * cols
    assert max(sizes["fake_quantize"]) == (planes if shared else taps)
    if rotated and not shared:  # layers.py rotates the planes itself, then quantizes the taps
        assert max(sizes["apply_rht"]) == planes


def test_quantized_matmul_broadcasts_and_plain_matmul_is_torch_matmul():
    torch.manual_seed(0)
    a = torch.randn(2, 3, 16, 32, requires_grad=True)
    b = torch.randn(32, 16, requires_grad=True)  # broadcast over (2, 3)
    y = QuantizedMatmul("nvfp4_full")(a, b)
    y.sum().backward()
    assert y.shape == (2, 3, 16, 16) and b.grad.shape == b.shape and a.grad.isfinite().all()
    rel = (y - a @ b).norm() / (a @ b).norm()
    assert 0 < rel < 0.2  # quantized, but close
    assert torch.equal(Matmul()(a, b), torch.matmul(a, b))


# ---------------------------------------------------------------------------------------------
# Module behaviour and errors
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("recipe", QUANTIZED)
def test_every_parameter_gets_a_finite_gradient_and_is_shared(recipe):
    gen = torch.Generator().manual_seed(0)
    for case in (CASE["linear"], CASE["conv_dil2_pad2"], CASE["convT_dil2"]):
        layer, x = make_case(case)
        twin = quantized(layer, recipe, generator=gen)
        assert twin.weight is layer.weight and twin.bias is layer.bias
        assert list(twin.state_dict()) == list(layer.state_dict())
        twin(x).square().mean().backward()
        for name, p in layer.named_parameters():
            assert p.grad is not None and p.grad.isfinite().all() and p.grad.abs().sum() > 0, name


def test_axis_window_is_the_set_of_outputs_that_read_real_input():
    """gemm.axis_window against brute force: outputs o with 0 <= o*s + offset - pad < n_in."""
    for off, s, pad, n_out, n_in in itertools.product(range(6), range(1, 4), range(4),
                                                       range(1, 7), range(1, 7)):
        out, inp = axis_window(off, s, pad, n_out, n_in)
        want = [o for o in range(n_out) if 0 <= o * s + off - pad < n_in]
        assert list(range(n_out))[out] == want
        assert list(range(n_in))[inp] == [o * s + off - pad for o in want]


def test_baseline_recipes_return_the_module_itself():
    layer = nn.Linear(32, 16)
    for name in ("baseline", "fp16", "fp32"):
        assert quantized(layer, name) is layer


@pytest.mark.parametrize("module, message", [
    (nn.Linear(20, 32), "in_features=20"),
    (nn.Linear(32, 24), "out_features=24"),
    (nn.Conv2d(16, 24, 3), "out_channels=24"),
    (nn.ConvTranspose2d(8, 16, 3), "in_channels=8"),
    (nn.Conv2d(16, 32, 3, groups=2), "groups=1"),
])
def test_channel_counts_that_are_not_multiples_of_16_raise(module, message):
    with pytest.raises(ValueError, match=message) as err:
        quantized(module, "nvfp4_full", name="encoder.conv3")
    assert "encoder.conv3" in str(err.value)


def test_sr_without_generator_and_unknown_layers_raise():
    with pytest.raises(ValueError, match="generator"):
        quantized(nn.Linear(32, 32), "2d_rht_sr")
    with pytest.raises(ValueError, match="generator"):
        QuantizedMatmul("sr_only")
    with pytest.raises(TypeError, match="Linear"):
        quantized(nn.Conv1d(16, 16, 3), "nvfp4_full")


def bf16_rounded(t):
    return t.detach().bfloat16().float()


@pytest.mark.parametrize("case", [CASE["linear"], CASE["conv_s2p1_batch1"],
                                  CASE["convT_s2_outpad"]], ids=["linear", "conv", "convT"])
@pytest.mark.parametrize("recipe", RN)
def test_autocast_quantizes_the_fp32_weight_and_bf16_activations(recipe, case):
    """Under (CPU) bf16 autocast, as Transformer Engine does: X, the bias and dY in bf16, but
    both NVFP4 copies of W (and fwd_only's high-precision W) from the fp32 parameter itself.
    Bit for bit against the reference run on bf16-rounded X, b, dY and the fp32 W; the output
    and dX come back in bf16, dW and db in the parameters' fp32."""
    layer, x = make_case(case)
    dy = bf16_rounded(output_grad(layer, x))
    twin = quantized(layer, recipe)
    xr = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = twin(xr)
    assert y.dtype == torch.bfloat16
    y.backward(dy.bfloat16())
    assert layer.weight.grad.dtype == torch.float32 and layer.bias.grad.dtype == torch.float32
    ref_layer = case[1]()
    ref_layer.load_state_dict(layer.state_dict())
    with torch.no_grad():
        ref_layer.bias.copy_(bf16_rounded(layer.bias))
    ry, rdx, rdw, rdb = case[3](ref_layer, bf16_rounded(x), dy, Reference(recipe))
    for what, a, e in (("output", y, bf16_rounded(ry)), ("input grad", xr.grad, bf16_rounded(rdx)),
                       ("weight grad", layer.weight.grad, rdw),
                       ("bias grad", layer.bias.grad, bf16_rounded(rdb))):
        assert_bits(a, e, f"autocast {recipe} {case[0]} {what}")


def test_autocast_weight_copy_is_not_the_bf16_rounded_weight():
    """The check above can fail: quantizing bf16(W) instead of W changes the output."""
    layer, x = make_case(CASE["conv_s2p1_batch1"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = quantized(layer, "nvfp4_full")(x)
    bf = nn.Conv2d(16, 32, 3, stride=2, padding=1).to(torch.bfloat16)
    bf.load_state_dict(layer.state_dict())
    y_bf16_weight = quantized(bf, "nvfp4_full")(x.bfloat16())
    assert torch.equal(y, quantized(layer, "nvfp4_full")(x.bfloat16()))  # no autocast, fp32 W
    assert not torch.equal(y, y_bf16_weight)


def test_conv_transpose_output_size_like_torch():
    layer, x = nn.ConvTranspose2d(16, 16, 3, stride=2, padding=1), torch.randn(1, 16, 4, 5)
    twin = quantized(layer, "nvfp4_full")
    for size in ((7, 9), (8, 10)):
        assert twin(x, output_size=size).shape == layer(x, output_size=size).shape
    with pytest.raises(ValueError, match="output_size"):
        twin(x, output_size=(9, 9))


def test_conv_keeps_channels_last_and_same_padding_works():
    torch.manual_seed(0)
    layer, explicit = nn.Conv2d(16, 16, 3, padding="same"), nn.Conv2d(16, 16, 3, padding=1)
    explicit.load_state_dict(layer.state_dict())
    x = torch.randn(2, 16, 5, 7).contiguous(memory_format=torch.channels_last)
    y = quantized(layer, "nvfp4_full")(x)
    assert y.shape == (2, 16, 5, 7) and y.is_contiguous(memory_format=torch.channels_last)
    ref = reference_conv2d(explicit, x, torch.zeros(y.shape), Reference("nvfp4_full"))[0]
    assert torch.equal(y.detach(), ref)


@pytest.mark.parametrize("case", [CASE["conv_k4s2_shared"], CASE["convT_k4s2_shared"]],
                         ids=["conv", "convT"])
@pytest.mark.parametrize("recipe", ["nvfp4_full", "2d_rht"])
def test_channels_last_gives_the_same_bits_and_keeps_its_format(recipe, case):
    """The layers read and write NHWC without copies when X (and dY) are channels_last; the
    values are those of the NCHW run, bit for bit, and Y and dX keep the input's format."""
    layer, x = make_case(case)
    dy = output_grad(layer, x)
    twin = quantized(layer, recipe)
    expected = run_layer(twin, x, dy)
    cl = torch.channels_last
    got = run_layer(twin, x.contiguous(memory_format=cl), dy.contiguous(memory_format=cl))
    for what, a, e in zip(("output", "input grad", "weight grad", "bias grad"), got, expected):
        assert_bits(a, e, f"channels_last {recipe} {case[0]} {what}")
    assert got[0].is_contiguous(memory_format=cl) and got[1].is_contiguous(memory_format=cl)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("recipe", ["2d_rht_sr", "nvfp4_full"])
def test_cuda_autocast_matches_the_cpu_layer(recipe):
    """On CUDA under bf16 autocast: a bf16 output, fp32 parameter gradients, and the forward of
    the same operands as on CPU (bf16 X, fp32 W; bf16 output rounding and GEMM order: a
    tolerance)."""
    layer, x = make_case(CASE["conv_s2p1_batch1"])
    ref = quantized(layer, recipe, generator=torch.Generator().manual_seed(0))(x.bfloat16())
    layer.cuda()
    twin = quantized(layer, recipe, generator=torch.Generator("cuda").manual_seed(0))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = twin(x.cuda())
    assert y.dtype == torch.bfloat16
    y.float().square().sum().backward()
    assert layer.weight.grad.dtype == torch.float32 and layer.weight.grad.isfinite().all()
    torch.testing.assert_close(y.float().cpu(), ref.detach().float(), rtol=1e-2, atol=1e-2)
