"""Prove the NVFP4 emulator against Transformer Engine: ``python -m nvfp4bench.verify_te``.

For a user with a Blackwell GPU and TE >= 2.14. Three kinds of checks, each a row of the table:

1. Bit-exact quantization (docs/nvfp4.md sections 1-3, 5). TE's ``NVFP4Quantizer`` and
   ``nvfp4bench.quant.nvfp4.quantize`` quantize the same tensors, and the E2M1 codes, the E4M3 block
   scales (as bytes) and the fp32 amax (as bits) must be equal, for every copy TE makes:
   rowwise 1x16, rowwise 16x16 (2-D weights), columnwise 1x16, columnwise 16x16 (the weight's
   dgrad copy, the transpose of the tiles) and columnwise with the RHT (the wgrad copies).
   Inputs: random fp32 and bf16 (with outliers), zeros, tiny (fp32 subnormals and small
   normals), huge (up to FLT_MAX; up to 1e37 for the RHT copy, which would overflow bf16),
   values on every E2M1 tie, blocks whose E4M3 scale is subnormal or rounds to zero.
2. Stochastic rounding in distribution (docs/nvfp4.md section 4). Each side quantizes the same
   tensor ``draws`` times. Checked: the block scales and amax equal RN's (SR only touches the
   final cast); every SR value is one of the two grid neighbours of the scaled value
   ``y = fl(x * enc_b)`` with y's sign; the mean error of the two sides agrees (within 5
   standard errors plus step/256, the bias allowance of 8-bit hardware SR); the per-element
   round-up frequencies agree (a chi-square-like ratio, ~1 when both draw from the same law).
3. One forward and backward of a linear layer (``te.Linear`` through the te backend's
   ``TELinear`` vs the emulator's ``twins.quantized(nn.Linear)``), SR off, for every recipe TE
   can express without SR, and for each (recipe, format) of ``FORMAT_LAYER_CASES``: output,
   dX, dW and db agree to a relative RMS error of ``LAYER_REL_TOL``. Not bit-exact: the
   quantized operands are, but the GEMMs accumulate in a different order, and TE's dequantized
   backward rounds operands to bf16.

The other formats TE has get check 1 too (``FORMAT_SPECS``), for each copy its quantizers make:
``nvfp4_4over6`` and ``nvfp4_4over6_mse`` (TE's ``NVFP4Quantizer`` with ``nvfp4_use_4over6``,
E4M3 bound 256; rowwise and columnwise, 1x16 and 16x16) and ``mxfp8_te`` (TE's
``MXFP8Quantizer``: the E4M3 bytes and the E8M0 scale bytes; rowwise and columnwise, 1x32 and
32x32, on the inputs whose dimensions are multiples of 32; MX has no amax to compare).

The comparison logic is pure and takes two "quantizers" (``(x, QuantSpec) -> QuantOut``) and
two "layer runners" (``LayerCase -> dict of tensors``), so the tests run it with the emulator on
both sides, and with a perturbed emulator to show that a mismatch is caught.

Exit status: 0 when every check passes, 1 on any mismatch, 2 when TE cannot run here (the
refusal message is printed, no traceback).
"""
from __future__ import annotations

import argparse
import importlib
import math
import sys
from collections.abc import Callable, Mapping, Sequence

import torch

from nvfp4bench import options
from nvfp4bench.checks.te_cases import (BIT_EXACT_SPECS, BLOCK, FLT_MAX, FORMAT_LAYER_CASES,
                                        FORMAT_SPECS, LAYER_REL_TOL,
                                        SR_MEAN_SIGMAS, SR_RATIO_TOL, SR_SPECS, CheckResult,
                                        LayerCase, LayerRunner, Quantizer, QuantOut, QuantSpec,
                                        applicable, emulator_layer_runner, make_inputs,
                                        make_layer_cases, make_sr_inputs, spec_input,
                                        te_layer_runner)
from nvfp4bench.quant import formats, nvfp4
from nvfp4bench.quant.formats import FORMATS
from nvfp4bench.quant.te.runtime import TEUnavailable, check_te_available, import_te_pytorch


# --------------------------------------------------------------------------------------------
# Quantizers
# --------------------------------------------------------------------------------------------
def unpack_codes(packed: torch.Tensor) -> torch.Tensor:
    """uint8 (R, C/2) -> (R, C): the even element in the low nibble (docs/nvfp4.md section 1)."""
    packed = packed.to(torch.uint8)
    return torch.stack([packed & 0x0F, packed >> 4], dim=-1).flatten(-2)


def _format_out(operand: torch.Tensor, spec: QuantSpec) -> QuantOut:
    """A format other than nvfp4 through ``formats.quantize``: E2M1 codes or E4M3 bytes, the
    scale bytes, and the tensor amax (None for MX, which has none)."""
    q = formats.quantize(operand, format=spec.format, tile=spec.tile)
    if q.format.element.name == "e2m1":
        codes = nvfp4.e2m1_codes(q.values, operand.float())
    else:
        codes = q.values.to(torch.float8_e4m3fn).view(torch.uint8)
    amax = None if q.s_dec is None else operand.float().abs().amax()
    return QuantOut(codes=codes.cpu(), scales=q.scales.view(torch.uint8).cpu(),
                    amax=None if amax is None else amax.reshape(()).cpu())


def emulator_quantizer(seed: int = 0) -> Quantizer:
    """``nvfp4bench.quant.nvfp4.quantize`` (``formats.quantize`` for another format) as a
    quantizer; SR draws from one generator seeded ``seed``."""
    generators: dict[str, torch.Generator] = {}

    def quantize(x: torch.Tensor, spec: QuantSpec) -> QuantOut:
        operand = (x.t() if spec.columnwise else x).contiguous()
        if spec.format != "nvfp4":
            return _format_out(operand, spec)
        generator = None
        if spec.sr:
            key = str(x.device)
            if key not in generators:
                generators[key] = torch.Generator(device=x.device).manual_seed(seed)
            generator = generators[key]
        q = nvfp4.quantize(operand, tile=spec.tile, rht=spec.rht, sr=spec.sr,
                           generator=generator)
        return QuantOut(codes=q.codes.cpu(), scales=q.scales.view(torch.uint8).cpu(),
                        amax=q.amax.float().reshape(()).cpu())

    return quantize


def _te_class(te, module: str, name: str):
    """``te.<name>``, or ``<module>.<name>`` where this TE does not re-export it."""
    found = getattr(te, name, None)
    if found is None:
        found = getattr(importlib.import_module(module), name)  # TE: optional
    return found


def _no_swizzle(t) -> None:
    if getattr(t, "_with_gemm_swizzled_scales", False):
        raise RuntimeError("TE returned GEMM-swizzled scales; cannot compare them bytewise")


def te_quantizer() -> Quantizer:
    """TE's ``NVFP4Quantizer`` (and ``MXFP8Quantizer`` for mxfp8_te) as a quantizer (needs TE
    and a Blackwell GPU)."""
    te = import_te_pytorch()
    import transformer_engine_torch as tex  # Transformer Engine: optional, only with --te
    NVFP4Quantizer = _te_class(te, "transformer_engine.pytorch.tensor.nvfp4_tensor",
                               "NVFP4Quantizer")

    def quantize_mx(x: torch.Tensor, spec: QuantSpec) -> QuantOut:
        MXFP8Quantizer = _te_class(te, "transformer_engine.pytorch.tensor.mxfp8_tensor",
                                   "MXFP8Quantizer")
        quantizer = MXFP8Quantizer(tex.DType.kFloat8E4M3, rowwise=True,
                                   columnwise=spec.columnwise,
                                   with_2d_quantization=spec.tile == (BLOCK, BLOCK))
        t = quantizer(x.cuda().contiguous())
        _no_swizzle(t)
        m, k = x.shape
        block = FORMATS[spec.format].block
        # MXFP8 keeps both copies in x's (M, K) layout; the columnwise scales are (M/32, K)
        if spec.columnwise:
            codes = t._columnwise_data.view(torch.uint8)[:m, :k].t()
            scales = t._columnwise_scale_inv.view(torch.uint8)[:m // block, :k].t()
        else:
            codes = t._rowwise_data.view(torch.uint8)[:m, :k]
            scales = t._rowwise_scale_inv.view(torch.uint8)[:m, :k // block]  # padded (128, 4)
        return QuantOut(codes=codes.contiguous().cpu(), scales=scales.contiguous().cpu(),
                        amax=None)

    def quantize(x: torch.Tensor, spec: QuantSpec) -> QuantOut:
        fmt = FORMATS[spec.format]
        if fmt.scale == "e8m0":
            return quantize_mx(x, spec)
        four_over_six = ({} if fmt.four_over_six is None else
                         {"nvfp4_use_4over6": True, "nvfp4_e4m3_max": int(fmt.e4m3_bound),
                          "nvfp4_4over6_err_mode": fmt.four_over_six.upper()})
        quantizer = NVFP4Quantizer(
            fp4_dtype=tex.DType.kFloat4E2M1, rowwise=True, columnwise=spec.columnwise,
            with_amax_reduction=False, amax_reduction_group=None, with_rht=spec.rht,
            with_post_rht_amax=spec.rht, with_2d_quantization=spec.tile == (BLOCK, BLOCK),
            stochastic_rounding=spec.sr, **four_over_six)
        t = quantizer(x.cuda().contiguous())
        _no_swizzle(t)
        m, k = x.shape
        if spec.columnwise:
            # without the RHT both copies share one amax; TE may store it rowwise only
            amax = t._amax_columnwise if t._amax_columnwise is not None else t._amax_rowwise
            data, scales, rows, cols = t._columnwise_data, t._columnwise_scale_inv, k, m
        else:
            data, scales, amax, rows, cols = (t._rowwise_data, t._rowwise_scale_inv,
                                              t._amax_rowwise, m, k)
        codes = unpack_codes(data.view(torch.uint8))[:rows, :cols]
        scales = scales.view(torch.uint8)[:rows, :cols // BLOCK]  # TE pads to (128x, 4x)
        return QuantOut(codes=codes.cpu(), scales=scales.cpu(),
                        amax=amax.float().reshape(-1)[0].cpu())

    return quantize


# --------------------------------------------------------------------------------------------
# Bit-exact comparisons (pure)
# --------------------------------------------------------------------------------------------
def _first_difference(a: torch.Tensor, b: torch.Tensor, fmt: Callable[[int], str]) -> str:
    diff = a != b
    index = tuple(int(i) for i in torch.nonzero(diff)[0])
    return (f"{int(diff.sum())}/{diff.numel()} differ; first at {index}: "
            f"{fmt(int(a[index]))} vs {fmt(int(b[index]))}")


def compare_codes(case: str, a: QuantOut, b: QuantOut) -> CheckResult:
    """E2M1 codes equal element for element."""
    if a.codes.shape != b.codes.shape:
        return CheckResult("codes", case, False, f"shapes {tuple(a.codes.shape)} vs "
                                                 f"{tuple(b.codes.shape)}")
    if torch.equal(a.codes, b.codes):
        return CheckResult("codes", case, True, f"all {a.codes.numel()} equal")
    return CheckResult("codes", case, False, _first_difference(a.codes, b.codes, str))


def compare_scales(case: str, a: QuantOut, b: QuantOut) -> CheckResult:
    """E4M3 block scales equal byte for byte."""
    if a.scales.shape != b.scales.shape:
        return CheckResult("scales", case, False, f"shapes {tuple(a.scales.shape)} vs "
                                                  f"{tuple(b.scales.shape)}")
    if torch.equal(a.scales, b.scales):
        return CheckResult("scales", case, True, f"all {a.scales.numel()} equal")
    return CheckResult("scales", case, False,
                       _first_difference(a.scales, b.scales, lambda v: f"0x{v:02X}"))


def compare_amax(case: str, a: QuantOut, b: QuantOut) -> CheckResult:
    """fp32 amax equal bit for bit (both None: a format without one, MX)."""
    if a.amax is None or b.amax is None:
        passed = a.amax is None and b.amax is None
        return CheckResult("amax", case, passed, "no amax (MX)" if passed else
                           "one side has an amax, the other none")
    bits_a = a.amax.float().reshape(1).view(torch.int32)
    bits_b = b.amax.float().reshape(1).view(torch.int32)
    passed = bool(torch.equal(bits_a, bits_b))
    return CheckResult("amax", case, passed,
                       f"{float(a.amax):.9g}" + ("" if passed else f" vs {float(b.amax):.9g}"))


def _error_result(check: str, case: str, side: str, exc: Exception) -> CheckResult:
    return CheckResult(check, case, False, f"{side} raised {type(exc).__name__}: {exc}")


def _run_both(check: str, case: str, fa: Callable, fb: Callable):
    """(out_a, out_b, None) or (None, None, a failed CheckResult) when either side raises."""
    outs = []
    for side, f in (("side A", fa), ("side B", fb)):
        try:
            outs.append(f())
        except Exception as exc:  # a side's failure is a failed check, not a crash
            return None, None, _error_result(check, case, side, exc)
    return outs[0], outs[1], None


def compare_quantizers(quant_a: Quantizer, quant_b: Quantizer,
                       inputs: Mapping[str, torch.Tensor],
                       specs: Sequence[QuantSpec] = BIT_EXACT_SPECS) -> list[CheckResult]:
    """Codes, scales and amax of every input x spec, bit for bit."""
    results = []
    for input_name, x in inputs.items():
        for spec in specs:
            if not applicable(x, spec):
                continue
            case = f"{input_name} | {spec.name}"
            operand = spec_input(x, spec)
            a, b, error = _run_both("quantize", case, lambda: quant_a(operand, spec),
                                    lambda: quant_b(operand, spec))
            if error is not None:
                results.append(error)
                continue
            results += [compare_codes(case, a, b), compare_scales(case, a, b)]
            if not (a.amax is None and b.amax is None):
                results.append(compare_amax(case, a, b))
    return results


# --------------------------------------------------------------------------------------------
# Stochastic rounding in distribution (pure)
# --------------------------------------------------------------------------------------------
def reference_operand(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """The fp32 tensor whose blocks the quantizer scales: x, x^T, or rht(x^T) (bf16-rounded)."""
    operand = (x.t() if spec.columnwise else x).contiguous()
    return nvfp4.rht(operand) if spec.rht else operand.float()


def scaled_values(operand: torch.Tensor, scale_bits: torch.Tensor,
                  amax: torch.Tensor) -> torch.Tensor:
    """``y = fl(x * enc_b)`` with ``enc_b = min(fl(1 / fl(f32(s_b) * S_dec)), FLT_MAX)``."""
    r, c = operand.shape
    s_b = scale_bits.to(torch.uint8).view(torch.float8_e4m3fn).float()  # (R, C/16)
    s_dec = nvfp4.global_decode_scale(amax.float())
    encode = torch.clamp(torch.reciprocal(s_b * s_dec), max=FLT_MAX)
    return (operand.view(r, c // BLOCK, BLOCK) * encode.unsqueeze(-1)).view(r, c)


def grid_neighbours(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """E2M1 magnitudes ``lo <= min(|y|, 6) <= hi`` around each value (lo == hi on the grid)."""
    a = y.abs().clamp(max=nvfp4.E2M1_MAX)
    step = torch.where(a < 2, 0.5, torch.where(a < 4, 1.0, 2.0))
    lo = torch.floor(a / step) * step
    hi = torch.where(lo < a, lo + step, lo)
    return lo, hi


def _magnitudes(codes: torch.Tensor) -> torch.Tensor:
    return nvfp4.E2M1_VALUES[(codes & 7).long()]


def _sr_draws(quant: Quantizer, x: torch.Tensor, spec: QuantSpec, draws: int) -> list[QuantOut]:
    return [quant(x, spec) for _ in range(draws)]


def compare_sr_distribution(case: str, x: torch.Tensor, spec: QuantSpec, quant_a: Quantizer,
                            quant_b: Quantizer, draws: int = 128) -> list[CheckResult]:
    """SR of the two sides: same deterministic scales, neighbours only, same law (see module)."""
    x = spec_input(x, spec)
    outs_a, outs_b, error = _run_both("SR", case, lambda: _sr_draws(quant_a, x, spec, draws),
                                      lambda: _sr_draws(quant_b, x, spec, draws))
    if error is not None:
        return [error]
    results = [compare_scales(case, outs_a[0], outs_b[0]), compare_amax(case, outs_a[0],
                                                                        outs_b[0])]
    stable = all(torch.equal(o.scales, outs_a[0].scales) for o in outs_a + outs_b)
    results.append(CheckResult("SR scales fixed", case, stable,
                               "block scales identical in every draw" if stable
                               else "block scales change between draws"))
    y = scaled_values(reference_operand(x, spec), outs_a[0].scales, outs_a[0].amax)
    lo, hi = grid_neighbours(y)
    step = torch.where(hi > lo, hi - lo, torch.ones_like(hi))
    f = torch.where(hi > lo, (y.abs().clamp(max=nvfp4.E2M1_MAX) - lo) / step,
                    torch.zeros_like(lo))
    p = torch.floor(256 * f) / 256  # hardware-like round-up probability (docs/nvfp4.md section 4)
    up = {}
    for side, outs in (("A", outs_a), ("B", outs_b)):
        codes = torch.stack([o.codes for o in outs])  # (draws, R, C)
        mags = _magnitudes(codes)
        on_grid = (mags == lo) | (mags == hi)
        sign_ok = (mags == 0) | (((codes & 8) != 0) == torch.signbit(y))
        bad = int((~(on_grid & sign_ok)).sum())
        results.append(CheckResult(f"SR neighbours {side}", case, bad == 0,
                                   f"all {mags.numel()} values are neighbours" if bad == 0 else
                                   f"{bad}/{mags.numel()} values are not a neighbour of y"))
        up[side] = ((mags == hi) & (hi > lo)).float().mean(0)  # round-up frequency
    var = torch.clamp(p * (1 - p), min=(1 / 256) * (255 / 256)) / draws
    n = y.numel()
    # mean error: E|v| - |y| = step * (P(up) - f); the sides must agree on its average
    diff = float(((up["A"] - up["B"]) * step).mean())
    se = math.sqrt(float((2 * var * step ** 2).sum())) / n
    allowance = float(step.mean()) / 256
    mean_ok = abs(diff) <= SR_MEAN_SIGMAS * se + allowance
    err_a = float(((up["A"] - f) * step).mean())
    err_b = float(((up["B"] - f) * step).mean())
    results.append(CheckResult("SR mean error", case, mean_ok,
                               f"mean error A {err_a:+.2e}, B {err_b:+.2e} (scaled units); "
                               f"|A-B| {abs(diff):.2e} <= {SR_MEAN_SIGMAS * se + allowance:.2e}"
                               if mean_ok else
                               f"mean error A {err_a:+.2e}, B {err_b:+.2e}; |A-B| "
                               f"{abs(diff):.2e} > {SR_MEAN_SIGMAS * se + allowance:.2e}"))
    ratio = float(((up["A"] - up["B"]) ** 2).sum() / (2 * var).sum())
    ratio_ok = ratio <= SR_RATIO_TOL
    results.append(CheckResult("SR round-up law", case, ratio_ok,
                               f"frequency ratio {ratio:.3f} (1 = same law, limit "
                               f"{SR_RATIO_TOL})"))
    return results


def compare_close(case: str, name: str, a: torch.Tensor | None, b: torch.Tensor | None,
                  rel_tol: float = LAYER_REL_TOL) -> CheckResult:
    """Relative RMS error ``||a - b|| / ||b||`` within ``rel_tol``; reports bit-identical share."""
    check = f"layer {name}"
    if a is None or b is None:
        return CheckResult(check, case, a is None and b is None,
                           "absent on both sides" if a is None and b is None
                           else "present on one side only")
    a, b = a.detach().float().cpu(), b.detach().float().cpu()
    if a.shape != b.shape:
        return CheckResult(check, case, False, f"shapes {tuple(a.shape)} vs {tuple(b.shape)}")
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return CheckResult(check, case, False, "non-finite values")
    norm = float(b.norm())
    rel = float((a - b).norm()) / norm if norm > 0 else float((a - b).norm())
    same = float((a == b).float().mean())
    return CheckResult(check, case, rel <= rel_tol,
                       f"rel. RMS error {rel:.2e} (limit {rel_tol:.0e}); {same:.1%} identical")


def compare_layers(run_a: LayerRunner, run_b: LayerRunner, cases: Sequence[LayerCase],
                   rel_tol: float = LAYER_REL_TOL) -> list[CheckResult]:
    """Output and gradients of one step of the two layer runners, case by case."""
    results = []
    for case in cases:
        out_a, out_b, error = _run_both("layer", case.name, lambda: run_a(case),
                                        lambda: run_b(case))
        if error is not None:
            results.append(error)
            continue
        for key in ("y", "dx", "dw", "db"):
            results.append(compare_close(case.name, key, out_a.get(key), out_b.get(key),
                                         rel_tol))
    return results


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------
def format_table(results: Sequence[CheckResult], title: str = "") -> str:
    """A plain-text pass/fail table with a summary line."""
    header = ("check", "case", "result", "detail")
    rows = [(r.check, r.case, "PASS" if r.passed else "FAIL", r.detail) for r in results]
    widths = [max([len(header[i])] + [len(row[i]) for row in rows]) for i in range(3)]
    lines = [title] if title else []
    lines.append("  ".join(h.ljust(w) for h, w in zip(header[:3], widths)) + "  " + header[3])
    lines.append("  ".join("-" * w for w in widths) + "  " + "-" * 6)
    lines += ["  ".join(c.ljust(w) for c, w in zip(row[:3], widths)) + "  " + row[3]
              for row in rows]
    failed = sum(not r.passed for r in results)
    lines.append(f"{len(results)} checks, {failed} failed"
                 + ("" if results else " (no checks ran: treated as failure)"))
    return "\n".join(lines)


def exit_code(results: Sequence[CheckResult]) -> int:
    """0 when there are results and every one passed, 1 otherwise."""
    return 0 if results and all(r.passed for r in results) else 1


def run_verification(quant_a: Quantizer, quant_b: Quantizer, *,
                     layer_a: LayerRunner | None = None, layer_b: LayerRunner | None = None,
                     layer_cases: Sequence[LayerCase] = (), seed: int = 2026,
                     sr_draws: int = 128, inputs: Mapping[str, torch.Tensor] | None = None,
                     sr_inputs: Mapping[str, torch.Tensor] | None = None) -> list[CheckResult]:
    """Every check: bit-exact quantization, SR in distribution, and (given runners) layers."""
    inputs = make_inputs(seed) if inputs is None else inputs
    sr_inputs = make_sr_inputs(seed) if sr_inputs is None else sr_inputs
    results = compare_quantizers(quant_a, quant_b, inputs, BIT_EXACT_SPECS + FORMAT_SPECS)
    for input_name, x in sr_inputs.items():
        for spec in SR_SPECS:
            if spec.rht and x.dtype != torch.bfloat16:
                continue  # RHT takes bf16 input: the bf16 input covers it
            results += compare_sr_distribution(f"{input_name} | {spec.name}", x, spec, quant_a,
                                               quant_b, sr_draws)
    if layer_a is not None and layer_b is not None:
        results += compare_layers(layer_a, layer_b, layer_cases)
    return results


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m nvfp4bench.verify_te",
        description="Compare the NVFP4 emulator with Transformer Engine on this GPU "
                    "(needs TE >= 2.14 and a Blackwell GPU). Exit 0: all checks pass; "
                    "1: a mismatch; 2: TE cannot run here.")
    parser.add_argument("--seed", type=options.integer(0, options.SEED_MAX), default=2026, help="seed of the test tensors")
    parser.add_argument("--sr-draws", type=options.positive_int(100_000), default=128,
                        help="SR quantizations per side for the distribution checks")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.sr_draws < 8:
        print("verify_te: --sr-draws must be at least 8", file=sys.stderr)
        return 2
    try:
        info = check_te_available()
    except TEUnavailable as exc:
        print(f"verify_te: {exc}", file=sys.stderr)
        return 2
    torch.manual_seed(args.seed)
    torch.cuda.manual_seed(args.seed)  # TE's SR draws from the CUDA RNG
    results = run_verification(
        te_quantizer(), emulator_quantizer(args.seed), layer_a=te_layer_runner,
        layer_b=emulator_layer_runner,
        layer_cases=make_layer_cases(args.seed, "cuda", ragged=True,
                                     formats=FORMAT_LAYER_CASES), seed=args.seed,
        sr_draws=args.sr_draws)
    print(format_table(results, f"side A: Transformer Engine {info.version} on {info.device} "
                                f"(sm_{info.capability[0]}{info.capability[1]}); "
                                f"side B: nvfp4bench emulator"))
    return exit_code(results)


if __name__ == "__main__":
    sys.exit(main())
