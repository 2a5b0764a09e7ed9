"""The exactness checks of ``nvfp4bench.gpu_check``: the emulator on a device against the CPU.

Each check runs the same computation on ``device`` and on the CPU and compares the results:

- ``ops``: the arithmetic the quantizer is made of (true division, reciprocal, the FP8 E4M3
  cast and its fp32-arithmetic twin, the E2M1 roundings, bf16 rounding, max reductions, the RHT),
  elementwise, bit for bit, on inputs that sit on every rounding boundary;
- ``quantizer``: ``quantize`` (E2M1 codes, E4M3 scale bytes, amax bits) and ``fake_quantize``
  (bits) for RN 1x16, RN 16x16, SR (both modes), RHT, RHT + SR, a given amax and the columnwise
  copy, on adversarial inputs (zero blocks, underflowing scales, ties, one huge value, fp16/bf16);
- ``layers``: a Linear, two Conv2d and a ConvTranspose2d, forward and backward under every
  quantized recipe: every quantized operand (each ``fake_quantize`` output) bit for bit, and
  every fp32 GEMM within the error bound of fp32 summation in any order::

      |C_dev - C_cpu| <= 2 * gamma_K * (|A| @ |B|^T) + |dA| @ |B|^T + |A| @ |dB|^T,
      gamma_K = K u / (1 - K u),  u = 2 ** -24

  (``dA``, ``dB``: operand differences, nonzero only for fwd_rht's fp32-rotated dY);
- ``compiled``: the compiled quantizer kernels (``kernels="compiled"``) against the eager ones
  on ``device``.

The exactness checks run the eager kernels (``CHECK_KERNELS``), the quantized layers' default;
the kernel choice is an argument (``fake_quantize(..., kernels=)``, ``quantized(...,
kernels=)``), never a global.

Stochastic rounding: a ``torch.Generator`` on CUDA draws other numbers than one on the CPU, so
``shared_noise`` uses the quantizer's documented hook, ``nvfp4.shared_noise``: within it every
SR draw comes from a single CPU generator (same shape, dtype and count) and is moved to the
tensor's device. Both runs then take the same SR bits, which tests the arithmetic, not the RNG;
the generator check still runs. Recording the layers' operands (``recording``) wraps the public
``fake_quantize``, ``fake_quantize_columnwise``, ``fake_quantize_pair`` and ``gemm`` the same way
(``rebound``).
"""
from __future__ import annotations

import contextlib
import sys
import warnings
from unittest import mock

import torch
from torch import nn

# The project's modules (the only place this file names them).
from nvfp4bench.checks.bench import TrainingCase
from nvfp4bench.quant import STUDY_RECIPES, gemm, get_recipe, kernels, nvfp4, quantized, taps

U32 = 2.0 ** -24  # fp32 unit roundoff
CHECK_KERNELS = "eager"  # the quantizer kernels of the exactness checks (``compiled``: both)


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of a float tensor, on the CPU (for exact comparison, NaN and -0 included)."""
    t = t.detach().cpu().contiguous()
    return t.view({4: torch.int32, 2: torch.int16, 1: torch.uint8}[t.element_size()])


def mismatches(a: torch.Tensor, b: torch.Tensor) -> int:
    """Elements whose bits differ (all of them when the shapes differ)."""
    a, b = bits(a), bits(b)
    if a.shape != b.shape:
        return max(a.numel(), b.numel(), 1)
    return int((a != b).sum())


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------
def adversarial(seed: int, rows: int = 64, cols: int = 96) -> torch.Tensor:
    """Heavy-tailed rows, an all-zero row, a block whose scale underflows, E2M1 ties after
    scaling, one huge value, and tiny (subnormal) values."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g) * torch.exp(4 * torch.randn(rows, 1, generator=g))
    x[0] = 0.0
    x[1, :16] = 1e-30
    x[2, :16] = torch.tensor([0, .25, .5, .75, 1, 1.25, 1.5, 1.75, 2, 2.5, 3, 3.5, 4, 5, 6, -6.])
    x[3, 5] = 1e4
    x[4, :16] = torch.randn(16, generator=g) * 1e-40  # fp32 subnormals (gradients can be tiny)
    return x


def e4m3_boundaries() -> torch.Tensor:
    """Every finite E4M3 value, the midpoints, their fp32 neighbours, random values, tiny ones."""
    values = torch.arange(0, 127, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    pts = torch.cat([values, (values[:-1] + values[1:]) / 2])
    up = torch.nextafter(pts, torch.full_like(pts, float("inf")))
    down = torch.nextafter(pts, torch.zeros_like(pts))
    rand = torch.rand(4000, generator=torch.Generator().manual_seed(0)) * 448
    tiny = torch.tensor([1e-45, 1e-40, 1e-38, 2.0 ** -10, 2.0 ** -9.5])
    return torch.cat([pts, up, down, rand, tiny]).clamp(0, 448)


def wide_floats(n: int, seed: int = 0) -> torch.Tensor:
    """Positive fp32 values over the whole exponent range, zero, inf and the smallest ones."""
    g = torch.Generator().manual_seed(seed)
    v = torch.rand(n, generator=g) * torch.exp2(torch.randint(-149, 128, (n,), generator=g).float())
    return torch.cat([v, torch.tensor([0.0, float("inf"), 1e-45, 3e38, 2688.0])])


# --------------------------------------------------------------------------------------------
# Shared SR noise, recorded operands
# --------------------------------------------------------------------------------------------
QUANT_PACKAGE = "nvfp4bench.quant"


def bindings(fn) -> list[tuple[object, str]]:
    """Every (module, name) of the loaded ``nvfp4bench.quant`` modules that binds ``fn`` (a
    function imported by name is bound in each importing module as well as in its own)."""
    modules = [m for name, m in list(sys.modules.items())
               if m is not None and (name == QUANT_PACKAGE or name.startswith(QUANT_PACKAGE + "."))]
    return [(m, name) for m in modules for name, value in list(vars(m).items()) if value is fn]


@contextlib.contextmanager
def rebound(fn, replacement):
    """Within the block ``replacement`` stands for ``fn`` at each of its ``bindings``."""
    found = bindings(fn)
    if not found:
        raise LookupError(f"{fn.__qualname__} is bound nowhere in {QUANT_PACKAGE}")
    with contextlib.ExitStack() as stack:
        for module, name in found:
            stack.enter_context(mock.patch.object(module, name, replacement))
        yield


@contextlib.contextmanager
def shared_noise(seed: int = 0):
    """Within the block every SR draw of the quantizer comes from one CPU generator seeded with
    ``seed`` and is then moved to the tensor's device (``nvfp4.shared_noise``): the same bits on
    every device (module docstring). The caller's generator is still checked, never drawn
    from."""
    with nvfp4.shared_noise(torch.Generator().manual_seed(seed)):
        yield


# --------------------------------------------------------------------------------------------
# ops
# --------------------------------------------------------------------------------------------
def _op_cases(n: int):
    """name -> (function of a tensor on some device, CPU input)."""
    amax = wide_floats(n)
    grid = torch.linspace(-7, 7, 14 * 64 + 1)  # every E2M1 tie and step, both signs
    scaled = torch.cat([grid, torch.nextafter(grid, grid + 1), torch.nextafter(grid, grid - 1)])
    mags = torch.rand(n, generator=torch.Generator().manual_seed(1)) * 6
    noise8 = torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(2)).to(torch.uint8)
    noisef = torch.rand(n, generator=torch.Generator().manual_seed(3))
    randn = adversarial(4, 128, 256)
    return {
        "true division 2688/amax": (lambda a: torch.full_like(a, 2688.0).div_(a), amax),
        "reciprocal": (torch.reciprocal, amax),
        "global_encode_scale": (nvfp4.global_encode_scale, amax),
        "block scales (bamax, amax)": (
            lambda b: torch.cat(nvfp4.block_scales_f32(b, b.max())[:2]), amax[amax < 1e30]),
        "fp8 e4m3 cast": (nvfp4.e4m3_cast, e4m3_boundaries()),
        "e4m3 fp32 rounding": (nvfp4.e4m3_round, e4m3_boundaries()),
        "e2m1 RN": (nvfp4.round_e2m1_rn, scaled),
        "e2m1 SR hardware": (lambda m: nvfp4.round_sr_abs(m, noise8.to(m.device), "hardware"),
                             mags),
        "e2m1 SR ideal": (lambda m: nvfp4.round_sr_abs(m, noisef.to(m.device), "ideal"), mags),
        "bf16 rounding": (lambda x: x.to(torch.bfloat16).float(), randn.flatten()),
        "block amax": (lambda x: nvfp4.block_amax(x.view(x.shape[0], -1, 16)), randn),
        "tensor amax (aminmax)": (lambda x: taps.abs_max(x).view(1), randn),
        "RHT (bf16 in, fp32 matmul, bf16 out)": (nvfp4.rht, randn),
    }


def check_ops(device: torch.device, n: int) -> list[dict]:
    """One row per op: elements compared, elements whose bits differ between device and CPU."""
    rows = []
    for name, (fn, x) in _op_cases(n).items():
        with torch.no_grad():
            want, got = fn(x.clone()), fn(x.to(device))
        rows.append({"op": name, "n": want.numel(), "mismatches": mismatches(got, want)})
    return rows


# --------------------------------------------------------------------------------------------
# quantizer
# --------------------------------------------------------------------------------------------
QUANT_CASES = {  # name -> quantize / fake_quantize keyword arguments (SR gets a generator)
    "rn_1x16": {}, "rn_16x16": {"tile": (16, 16)},
    "sr_1x16": {"sr": True}, "sr_ideal_1x16": {"sr": True, "sr_mode": "ideal"},
    "rht_rn_1x16": {"rht": True}, "rht_sr_1x16": {"rht": True, "sr": True},
    "given_amax_1x16": {"amax": 1e5},
}


def _quant_inputs(size: int) -> dict:
    big = adversarial(9, size, size)
    return {"adversarial": adversarial(1), "adversarial_bf16": adversarial(2).clamp(-3e38, 3e38)
            .to(torch.bfloat16), "adversarial_fp16": adversarial(3).clamp(-6e4, 6e4).half(),
            "e4m3_boundaries": _boundary_blocks(), f"random_{size}": big}


def _boundary_blocks() -> torch.Tensor:
    """One block per E4M3 boundary value: with amax 448 each block's scale is that value's
    E4M3 rounding (S_enc = 6, fl(S_enc * fl(1/6)) = 1)."""
    v = e4m3_boundaries()
    v = torch.cat([v, torch.zeros(-len(v) % 64)])
    x = torch.zeros(len(v) // 64, 64 * 16)
    x.view(-1, 16)[:, 0] = v
    x[0, 1] = 448.0
    return x


def _quantize_both(x: torch.Tensor, kw: dict, device: torch.device) -> dict:
    out = {}
    for where in ("cpu", device):
        kwd = dict(kw)
        if kwd.get("sr"):
            kwd["generator"] = torch.Generator(where).manual_seed(0)
        if "amax" in kwd:
            kwd["amax"] = torch.tensor(kwd["amax"], device=where)
        with shared_noise(0):
            q = nvfp4.quantize(x.to(where), **kwd)
        with shared_noise(0):
            fq = kernels.fake_quantize(x.to(where), **kwd, kernels=CHECK_KERNELS)
        out[str(where)] = (q.codes, q.scales.view(torch.uint8), q.amax, fq)
    return out


def check_quantizer(device: torch.device, size: int) -> list[dict]:
    """One row per (input, case): mismatching codes, scale bytes, amax bits, fake_quantize bits."""
    rows = []
    for iname, x in _quant_inputs(size).items():
        for case, kw in QUANT_CASES.items():
            if kw.get("tile") == (16, 16) and x.shape[0] % 16:
                continue
            res = _quantize_both(x, kw, device)
            cpu, dev = res["cpu"], res[str(device)]
            rows.append({"input": iname, "case": case, "n": x.numel(),
                         **{k: mismatches(d, c) for k, d, c in
                            zip(("codes", "scales", "amax", "fake_quantize"), dev, cpu)}})
        for sr in (False, True):  # the columnwise (wgrad) copy of a batched (B, M, C) tensor
            x3 = x.float()[: (x.shape[0] // 3) * 3].reshape(3, -1, x.shape[1])
            got = {}
            for where in ("cpu", device):
                gen = torch.Generator(where).manual_seed(0) if sr else None
                with shared_noise(0):
                    got[str(where)] = kernels.fake_quantize_columnwise(
                        x3.to(where), sr=sr, generator=gen, kernels=CHECK_KERNELS)
            rows.append({"input": iname, "case": f"columnwise_{'sr' if sr else 'rn'}",
                         "n": x3.numel(), "codes": None, "scales": None, "amax": None,
                         "fake_quantize": mismatches(got[str(device)], got["cpu"])})
    return rows


def quantizer_ok(row: dict) -> bool:
    return all(not row[k] for k in ("codes", "scales", "amax", "fake_quantize"))


# --------------------------------------------------------------------------------------------
# layers
# --------------------------------------------------------------------------------------------
LAYER_CASES = {  # name -> (module factory, input shape)
    "linear_64x48_40tok": (lambda: nn.Linear(64, 48), (2, 20, 64)),
    "conv_k3s1p1": (lambda: nn.Conv2d(32, 16, 3, 1, 1), (2, 32, 12, 12)),
    "conv_k4s2p1": (lambda: nn.Conv2d(16, 32, 4, 2, 1), (2, 16, 32, 32)),
    "convT_k4s2p1": (lambda: nn.ConvTranspose2d(32, 16, 4, 2, 1), (2, 32, 8, 8)),
}


@contextlib.contextmanager
def recording(log: list):
    """Append ("q", output) for every fake_quantize / fake_quantize_columnwise call (one per
    output of fake_quantize_pair) and ("gemm", a, b, output) for every GEMM of the layers, all
    copied to the CPU; SR draws shared."""
    fq, fqc, mm = kernels.fake_quantize, kernels.fake_quantize_columnwise, gemm.gemm
    pair = kernels.fake_quantize_pair

    def rec_q(fn):
        def wrapper(*args, **kwargs):
            out = fn(*args, **kwargs)
            for t in out if isinstance(out, tuple) else (out,):
                log.append(("q", t.detach().cpu().clone()))
            return out
        return wrapper

    def rec_gemm(a, b, out=None):
        r = mm(a, b, out=out)
        log.append(("gemm", a.detach().float().cpu(), b.detach().float().cpu(), r.cpu().clone()))
        return r

    with shared_noise(0), rebound(fq, rec_q(fq)), rebound(fqc, rec_q(fqc)), \
            rebound(pair, rec_q(pair)), rebound(mm, rec_gemm):
        yield


def make_layer(case: str, recipe: str, device: torch.device, kernels: str = CHECK_KERNELS):
    """(module, its quantized twin on ``kernels``, input x, dY) of one layer case, fixed seeds,
    on ``device``."""
    factory, shape = LAYER_CASES[case]
    torch.manual_seed(0)
    layer = factory()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=g)
    with torch.no_grad():
        dy = torch.randn(layer(x).shape, generator=g)
    layer = layer.to(device)
    twin = quantized(layer, recipe, generator=torch.Generator(device).manual_seed(0),
                     kernels=kernels)
    return layer, twin, x.to(device).requires_grad_(), dy.to(device)


def run_layer(made, log: list | None = None) -> dict:
    """Forward and backward (fp32) of a ``make_layer`` case; every tensor stays on its device."""
    layer, twin, x, dy = made
    layer.zero_grad(set_to_none=True)
    x.grad = None
    with recording(log) if log is not None else contextlib.nullcontext():
        y = twin(x)
        y.backward(dy)
    return {"y": y.detach(), "dx": x.grad, "dw": layer.weight.grad, "db": layer.bias.grad}


def gemm_excess(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, a0: torch.Tensor,
                b0: torch.Tensor, c0: torch.Tensor) -> float:
    """max(|c - c0| / bound) for two fp32 GEMMs c = a @ b^T, c0 = a0 @ b0^T (module docstring);
    <= 1 when they agree to fp32 rounding."""
    k = a0.shape[-1]
    gamma = k * U32 / (1 - k * U32)
    a64, b64, a064, b064 = (t.double() for t in (a, b, a0, b0))
    bound = 2 * gamma * (a064.abs() @ b064.abs().mT)
    bound += (a64 - a064).abs() @ b064.abs().mT + a064.abs() @ (b64 - b064).abs().mT
    bound += 2.0 ** -149 * k  # subnormal products
    diff = (c.double() - c0.double()).abs()
    return float((diff / bound).max()) if diff.numel() else 0.0


def check_layer(case: str, recipe: str, device: torch.device) -> dict:
    """Quantized operands bit for bit, GEMMs to fp32 rounding, outputs compared (max rel.)."""
    logs = {"cpu": [], "dev": []}
    out_cpu = run_layer(make_layer(case, recipe, torch.device("cpu")), logs["cpu"])
    out_dev = run_layer(make_layer(case, recipe, device), logs["dev"])
    row = {"case": case, "recipe": recipe, "quantized": 0, "quantized_mismatches": 0,
           "gemms": 0, "gemm_max_excess": 0.0, "gemm_operands_differ": 0, "structure_ok": True}
    if [e[0] for e in logs["cpu"]] != [e[0] for e in logs["dev"]]:
        row["structure_ok"] = False
    for ec, ed in zip(logs["cpu"], logs["dev"]):
        if ec[0] != ed[0]:
            continue
        if ec[0] == "q":
            row["quantized"] += 1
            row["quantized_mismatches"] += mismatches(ed[1], ec[1])
        else:
            row["gemms"] += 1
            row["gemm_operands_differ"] += int(mismatches(ed[1], ec[1]) + mismatches(ed[2], ec[2])
                                               > 0)
            row["gemm_max_excess"] = max(row["gemm_max_excess"], gemm_excess(*ed[1:], *ec[1:]))
    for k, ref in out_cpu.items():
        got = out_dev[k].cpu()
        scale = float(ref.abs().max()) or 1.0
        row[f"{k}_max_rel"] = float((got - ref).abs().max()) / scale
    row["ok"] = (row["structure_ok"] and row["quantized_mismatches"] == 0
                 and row["gemm_max_excess"] <= 1.0)
    return row


def quantized_recipes() -> list[str]:
    return [r for r in STUDY_RECIPES if get_recipe(r).quantized]


# --------------------------------------------------------------------------------------------
# compiled kernels and host-device synchronisation
# --------------------------------------------------------------------------------------------
COMPILED_CASES = ("rn_1x16", "rn_16x16", "sr_1x16", "rht_sr_1x16", "columnwise_rn")


def check_compiled(device: torch.device, size: int, case: str) -> dict:
    """The compiled kernels against eager on ``device`` for one of ``COMPILED_CASES``, SR from
    the same shared draws: elements whose bits differ."""
    x = adversarial(11, size, size)
    outs = {}
    for choice in ("eager", "compiled"):
        with shared_noise(0), torch.no_grad():
            xd = x.to(device)
            if case == "columnwise_rn":
                outs[choice] = kernels.fake_quantize_columnwise(xd.view(4, -1, size),
                                                                kernels=choice)
                continue
            kw = dict(QUANT_CASES[case])
            if kw.get("sr"):
                kw["generator"] = torch.Generator(device).manual_seed(0)
            outs[choice] = kernels.fake_quantize(xd, **kw, kernels=choice)
    return {"case": case, "n": x.numel(), "mismatches": mismatches(outs["compiled"], outs["eager"])}


def syncs_of(fn, device: torch.device) -> tuple[int, list[str]]:
    """How many host-device synchronisations one call of ``fn`` makes on ``device`` (after the
    device is idle), and where each was called from: ``torch.cuda.set_sync_debug_mode("warn")``
    turns each into a warning."""
    torch.cuda.synchronize(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
    return len(syncs), sorted({f"{w.filename}:{w.lineno}" for w in syncs})


def count_syncs(device: torch.device) -> list[dict]:
    """Host-device synchronisations of one forward + backward of each layer case per quantized
    recipe (after a warm-up call): the count and where each was called from."""
    rows = []
    for recipe in quantized_recipes():
        for case in LAYER_CASES:
            made = make_layer(case, recipe, device)
            run_layer(made)
            count, where = syncs_of(lambda: run_layer(made), device)
            rows.append({"recipe": recipe, "case": case, "syncs": count, "where": where})
    return rows


STEP_ARCHS = ("cnn", "vit", "swin")


def count_step_syncs(device: torch.device, archs=STEP_ARCHS, recipes=None,
                     image_size: int = 64, batch_size: int = 2) -> list[dict]:
    """Host-device synchronisations of one whole training step (forward, loss, backward, AdamW;
    ``bench.TrainingCase`` at the tiny scale, after a warm-up step) per arch and quantized
    recipe (default: every one): a step that synchronises stalls the GPU's queue once per
    step."""
    rows = []
    for arch in archs:
        for recipe in recipes or quantized_recipes():
            case = TrainingCase(arch, "tiny", recipe, image_size=image_size,
                                batch_size=batch_size, device=str(device))
            case.step()
            count, where = syncs_of(case.step, device)
            rows.append({"arch": arch, "recipe": recipe, "syncs": count, "where": where})
    return rows
