"""What ``verify_te`` compares: the copies to make (``QuantSpec``), the inputs (random and
adversarial tensors), the linear-layer cases and how each side runs one, and the result records.

See ``verify_te.py`` for the checks themselves and the command line.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from nvfp4bench.quant import nvfp4, twins
from nvfp4bench.quant.backends import get_backend
from nvfp4bench.quant.formats import FORMATS
from nvfp4bench.quant.recipes import get_recipe
from nvfp4bench.quant.te.linear import TELinear

BLOCK = nvfp4.BLOCK
FLT_MAX = torch.finfo(torch.float32).max
LAYER_REL_TOL = 4e-3  # relative RMS error of a layer output or gradient (GEMM order, bf16 ops)
SR_RATIO_TOL = 1.25  # chi-square-like ratio of round-up frequencies (1 under the same law)
SR_MEAN_SIGMAS = 5.0  # mean-error agreement, in standard errors
LAYER_RECIPES = ("nvfp4_full", "fwd_only", "chain_rule", "2d_rht")  # TE-expressible, SR off


@dataclass(frozen=True)
class QuantSpec:
    """Which copy of a 2-D tensor x (M, K) to make, as TE's quantizer makes it.

    columnwise: quantize x^T (K, M), blocks along M (the wgrad / dgrad copies); rht: rotate the
    blocks of x^T by the RHT first (needs bf16 input on TE); sr: stochastic rounding; format:
    the block format (``formats.FORMATS``); ``tile`` (BLOCK, BLOCK) means 2-D tiles of the
    format's own block (32x32 for MX).
    """

    name: str
    tile: tuple[int, int] = (1, BLOCK)
    columnwise: bool = False
    rht: bool = False
    sr: bool = False
    format: str = "nvfp4"


@dataclass(frozen=True)
class QuantOut:
    """One quantized copy, on the CPU: codes uint8 (R, C) 0..15, scales uint8 (R, C/16) (the
    E4M3 bytes), amax fp32 0-d. (R, C) = (M, K) rowwise, (K, M) columnwise. In another format:
    codes are the E2M1 codes or the E4M3 bytes, scales (R, C/block) the scale bytes (E4M3 or
    E8M0), amax None for MX (no tensor scale)."""

    codes: torch.Tensor
    scales: torch.Tensor
    amax: torch.Tensor | None


@dataclass(frozen=True)
class CheckResult:
    check: str
    case: str
    passed: bool
    detail: str


@dataclass(frozen=True)
class LayerCase:
    """One linear layer step: x (M, K), weight (N, K) fp32, bias (N,) or None, dy (M, N), in
    ``format``."""

    name: str
    recipe: str
    x: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    dy: torch.Tensor
    format: str = "nvfp4"


Quantizer = Callable[[torch.Tensor, QuantSpec], QuantOut]
LayerRunner = Callable[[LayerCase], dict[str, torch.Tensor]]

BIT_EXACT_SPECS = (
    QuantSpec("rowwise 1x16"),
    QuantSpec("rowwise 16x16", tile=(BLOCK, BLOCK)),
    QuantSpec("columnwise 1x16", columnwise=True),
    QuantSpec("columnwise 16x16", tile=(BLOCK, BLOCK), columnwise=True),
    QuantSpec("columnwise RHT 1x16", columnwise=True, rht=True),
)
# The other formats TE has (``quant.te.runtime.TE_RECIPE_CLASSES``): every copy its quantizers
# make (four over six: no RHT, no SR; MXFP8: 1x32 and 32x32, no RHT, no SR).
FORMAT_SPECS = tuple(
    QuantSpec(f"{fmt} {side} {size}", tile=tile, columnwise=side == "columnwise", format=fmt)
    for fmt, block in (("nvfp4_4over6", BLOCK), ("nvfp4_4over6_mse", BLOCK), ("mxfp8_te", 32))
    for side in ("rowwise", "columnwise")
    for size, tile in ((f"1x{block}", (1, BLOCK)), (f"{block}x{block}", (BLOCK, BLOCK))))
# (recipe, format) of the layer checks in the other formats: the recipes TE runs in each.
FORMAT_LAYER_CASES = (("fwd_only", "nvfp4_4over6"), ("chain_rule", "nvfp4_4over6_mse"),
                      ("nvfp4_full", "mxfp8_te"), ("fwd_rht", "mxfp8_te"))
SR_SPECS = (
    QuantSpec("rowwise 1x16 SR", sr=True),
    QuantSpec("columnwise RHT 1x16 SR", columnwise=True, rht=True, sr=True),
)


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------
def e2m1_tie_tensor() -> torch.Tensor:
    """(16, 32) fp32: every row's first block holds E2M1 values and ties (with signs), and one
    element 2688 makes amax 2688, S_enc = 1 and (for bamax 6) s_b = 1, enc_b = 1 exactly, so
    the ties reach the E2M1 cast unchanged (docs/nvfp4.md section 8)."""
    ties = torch.tensor([0, .25, .5, .75, 1, 1.25, 1.5, 1.75, 2, 2.5, 3, 3.5, 4, 5, 6, 6.0])
    rows = []
    for r in range(16):
        block = ties.roll(r)
        signs = torch.where(torch.arange(16) % 2 == r % 2, 1.0, -1.0)
        second = torch.full((16,), 0.0)
        second[r] = 6.0 if r else 2688.0
        rows.append(torch.cat([block * signs, second]))
    out = torch.stack(rows)
    out[1, 0] = -6.0  # a negative extreme in a block
    return out


def subnormal_scale_tensor(generator: torch.Generator) -> torch.Tensor:
    """(16, 64) fp32 with amax 2688 (S_enc = 1, so s_b = bamax / 6) and blocks whose bamax runs
    from 1e-5 to 10: their E4M3 scales are normal, subnormal (< 2^-6) or round to 0."""
    m, k = 16, 64
    bamax = torch.logspace(-5, 1, m * k // BLOCK).view(m, k // BLOCK, 1)
    x = (torch.rand(m, k // BLOCK, BLOCK, generator=generator) * 2 - 1) * bamax
    x[:, :, 0] = bamax[:, :, 0]  # each block reaches its bamax
    x = x.view(m, k)
    x[0, 1] = 2688.0
    return x


def make_inputs(seed: int = 2026) -> dict[str, torch.Tensor]:
    """The adversarial and random inputs of the bit-exact checks (CPU; sides move them)."""
    g = torch.Generator().manual_seed(seed)
    outliers = torch.randn(48, 80, generator=g)
    outliers[::7, ::11] *= 100.0
    huge = torch.randn(32, 64, generator=g) * 1e36
    huge_extremes = huge.clone()
    huge_extremes[3, 5] = FLT_MAX
    huge_extremes[7, 9] = -FLT_MAX / 3
    return {
        "random fp32": torch.randn(64, 128, generator=g) * 2.5,
        "random bf16": torch.randn(64, 128, generator=g).to(torch.bfloat16),
        "bf16 with outliers": outliers.to(torch.bfloat16),
        "zeros": torch.zeros(32, 64),
        "tiny subnormal fp32": torch.randn(32, 64, generator=g) * 1e-41,
        "tiny normal": torch.randn(32, 64, generator=g) * 1e-20,
        "huge": huge,
        "huge up to FLT_MAX": huge_extremes,
        "E2M1 ties": e2m1_tie_tensor(),
        "subnormal block scales": subnormal_scale_tensor(g),
    }


def make_sr_inputs(seed: int = 2026) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed + 1)
    return {"random fp32": torch.randn(64, 128, generator=g) * 3.0,
            "random bf16": (torch.randn(64, 128, generator=g) * 3.0).to(torch.bfloat16)}


def applicable(x: torch.Tensor, spec: QuantSpec) -> bool:
    """Whether the (input, copy) pair is compared. The RHT can grow a value by up to 4x
    (a 16-vector's energy can gather in one element): inputs above bf16's max / 4 may overflow
    to inf in the rotation, where neither TE nor docs/nvfp4.md defines the result. TE's MXFP8
    quantizes tensors whose dimensions are multiples of 32 only."""
    if FORMATS[spec.format].block > BLOCK and any(d % FORMATS[spec.format].block
                                                  for d in x.shape):
        return False
    if not spec.rht or x.numel() == 0:
        return True
    return float(x.float().abs().max()) <= torch.finfo(torch.bfloat16).max / 4


def spec_input(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """TE's RHT needs bf16 input: RHT specs get x rounded to bf16 (on both sides)."""
    return x.to(torch.bfloat16) if spec.rht else x



# --------------------------------------------------------------------------------------------
# Linear layer cases, and how each side runs one
# --------------------------------------------------------------------------------------------
def make_layer_cases(seed: int = 2026, device: str | torch.device = "cpu",
                     recipes: Sequence[str] = LAYER_RECIPES, tokens: int = 48,
                     ragged: bool = False,
                     formats: Sequence[tuple[str, str]] = ()) -> list[LayerCase]:
    """One (x bf16, weight fp32, bias, dy bf16) step per recipe in nvfp4, then one per
    (recipe, format) of ``formats``; ``ragged`` adds a case whose token count (40) is not a
    multiple of 16 (TELinear zero-pads it)."""
    g = torch.Generator().manual_seed(seed)
    k, n = 64, 32
    shapes = [(recipe, tokens, "nvfp4") for recipe in recipes]
    if ragged:
        shapes.append((recipes[0], 40, "nvfp4"))
    shapes += [(recipe, tokens, fmt) for recipe, fmt in formats]
    cases = []
    for recipe, m, fmt in shapes:
        x = torch.randn(m, k, generator=g).to(torch.bfloat16)
        w = torch.randn(n, k, generator=g) / math.sqrt(k)
        b = torch.randn(n, generator=g) * 0.1
        dy = torch.randn(m, n, generator=g).to(torch.bfloat16)
        label = f"{recipe} M={m}" if fmt == "nvfp4" else f"{recipe} {fmt} M={m}"
        cases.append(LayerCase(label, recipe, x.to(device), w.to(device), b.to(device),
                               dy.to(device), fmt))
    return cases



def _compute_context(device: torch.device):
    """bf16 autocast on CUDA (as the train loop runs), nothing on the CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _linear_for(case: LayerCase) -> nn.Linear:
    n, k = case.weight.shape
    linear = nn.Linear(k, n, bias=case.bias is not None, device=case.weight.device,
                       dtype=case.weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(case.weight)
        if case.bias is not None:
            linear.bias.copy_(case.bias)
    return linear


def _step(layer: nn.Module, linear: nn.Linear, case: LayerCase, context) -> dict:
    x = case.x.detach().clone().requires_grad_(True)
    with context:
        y = layer(x)
        y.backward(case.dy.to(y.dtype))
    return {"y": y.detach().float(), "dx": x.grad.float(), "dw": linear.weight.grad.float(),
            "db": None if linear.bias is None else linear.bias.grad.float()}


def emulator_layer_runner(case: LayerCase) -> dict[str, torch.Tensor]:
    """One step of ``twins.quantized(nn.Linear)`` (SR off, so the generator is never drawn)."""
    linear = _linear_for(case)
    generator = torch.Generator(device=case.x.device).manual_seed(0)
    layer = twins.quantized(linear, get_recipe(case.recipe), generator=generator,
                            format=case.format)
    return _step(layer, linear, case, _compute_context(case.x.device))


def te_layer_runner(case: LayerCase) -> dict[str, torch.Tensor]:
    """One step of the te backend's ``TELinear`` in the backend's run context."""
    linear = _linear_for(case)
    fmt = FORMATS[case.format]
    layer = TELinear(linear, f"verify[{case.name}]", fmt.block)
    context = get_backend("te").context(get_recipe(case.recipe), case.x.device, torch.bfloat16,
                                        fmt)
    return _step(layer, linear, case, context)
