"""FP4 diagnostics on one fixed batch: attention discretization, gradient fidelity, SQNR.

Three questions from the study, each answered with plain floats (JSON-ready; ``None`` where a value
is undefined, never a silent 0):

1. Does FP4 discretize softmax attention? For every attention block, on the probabilities ``P``
   (rows of length T that sum to 1) the block feeds its ``av`` matmul::

       entropy            H = -sum_j P_ij log P_ij                 (nats; mean over rows and heads)
       normalized_entropy H / log T                              (1 = uniform, 0 = one-hot)
       collapsed_share    share of rows with max_j P_ij >= 0.9   (mass collapses on one key)
       distinct_values    mean number of distinct values per row, values rounded to 1e-3
       max_weight         mean of max_j P_ij

   Captured by a forward pre-hook on each ``Attention.av`` module (plain or quantized), so no
   model code changes. In Swin, T is the window (masked keys count as keys of weight ~0).

2. How faithful are the recipe's weight gradients? For every quantized layer with weight W, on the
   same batch and weights, in eval mode (no dropout, BN running statistics)::

       g_q = dL/dW through the quantized model      g_h = dL/dW with the layers swapped back
       cosine          <g_q, g_h> / (|g_q| |g_h|)
       relative_error  |g_q - g_h| / |g_h|

3. How much signal survives the forward quantization? For every quantized layer, with the GEMM
   operands laid out as the emulator's implicit GEMM (docs/nvfp4.md sections 3, 6; rows zero-padded
   to multiples of 16, which changes neither amax nor any block)::

       SQNR = 10 log10( sum x^2 / sum (x - Q(x))^2 )  dB
       weight: W as (N, K), K = (kh, kw, C_in) with C_in fastest, the recipe's weight tile
       input:  X as (tokens or pixels, C_in), 1x16 blocks, round to nearest

   For a baseline recipe (nothing quantized) the SQNR is reported for the layers the study would
   quantize, with 1x16 weights: what NVFP4 would do to that model. Gradients are then empty.

``measure(model, images, targets, loss_fn, recipe)`` runs all three and adds a ``summary`` of means.
It restores the model's train/eval mode and the state of every ``torch.Generator`` its layers hold
(stochastic rounding), so measuring in the middle of training does not change the training run.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from nvfp4bench.models.blocks import Attention
from nvfp4bench.quant import kernels, nvfp4
from nvfp4bench.quant.recipes import Recipe, get_recipe
from nvfp4bench.quant.swap import ORIGINALS_ATTR, high_precision, quantizable_layers

COLLAPSE_THRESHOLD = 0.9     # a row whose largest weight reaches this has collapsed onto one key
DISTINCT_RESOLUTION = 1e-3   # attention values closer than this count as one value
ACTIVATION_TILE = (1, nvfp4.BLOCK)

ATTENTION_KEYS = ("entropy", "normalized_entropy", "collapsed_share", "distinct_values",
                  "max_weight")


# ------------------------------------------------------------------------------------------------
# 1. Attention
# ------------------------------------------------------------------------------------------------
def attention_sums(probs: torch.Tensor, *, threshold: float = COLLAPSE_THRESHOLD,
                   resolution: float = DISTINCT_RESOLUTION) -> dict[str, float]:
    """Per-row sums of the attention measures over ``probs`` (..., T): ``rows`` and one sum per key
    of ``ATTENTION_KEYS`` (so that batches and heads can be pooled before dividing)."""
    p = probs.detach().float().reshape(-1, probs.shape[-1])       # (rows, T)
    t = p.shape[-1]
    entropy = -torch.xlogy(p, p).sum(-1)                          # (rows,)
    top = p.max(-1).values                                        # (rows,)
    levels = torch.round(p / resolution).sort(-1).values           # (rows, T)
    distinct = 1 + (levels.diff(dim=-1) != 0).sum(-1)             # (rows,)
    log_t = math.log(t) if t > 1 else float("nan")
    return {"rows": float(p.shape[0]),
            "entropy": entropy.sum().item(),
            "normalized_entropy": (entropy.sum() / log_t).item(),
            "collapsed_share": (top >= threshold).sum().item(),
            "distinct_values": distinct.sum().item(),
            "max_weight": top.sum().item()}


def attention_stats(probs: torch.Tensor, **kwargs) -> dict[str, float]:
    """The attention measures of ``probs`` (..., T), averaged over all rows (module docstring)."""
    return _finish_attention(attention_sums(probs, **kwargs))


def _finish_attention(sums: dict[str, float]) -> dict[str, float | None]:
    rows = sums["rows"]
    return {k: (_finite(sums[k] / rows) if rows else None) for k in ATTENTION_KEYS}


def attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    """name -> the ``av`` matmul module of every attention block (plain or quantized)."""
    return {name: m.av for name, m in model.named_modules() if isinstance(m, Attention)}


@contextlib.contextmanager
def record_attention(model: nn.Module) -> Iterator[dict[str, dict[str, float]]]:
    """Within the block, every forward adds to ``stats[block_name]`` (running sums); read them with
    ``attention_report(stats)``."""
    stats: dict[str, dict[str, float]] = {}
    handles = []

    def hook_for(name: str) -> Callable:
        def hook(module, args):
            sums = attention_sums(args[0])  # args = (probs (..., h, T, T), v)
            acc = stats.setdefault(name, dict.fromkeys(sums, 0.0))
            for k, v in sums.items():
                acc[k] += v
        return hook

    for name, av in attention_modules(model).items():
        handles.append(av.register_forward_pre_hook(hook_for(name)))
    try:
        yield stats
    finally:
        for h in handles:
            h.remove()


def attention_report(stats: dict[str, dict[str, float]]) -> dict[str, dict[str, float | None]]:
    return {name: _finish_attention(sums) for name, sums in stats.items()}


def attention_diagnostics(model: nn.Module, images: torch.Tensor
                          ) -> dict[str, dict[str, float | None]]:
    """Attention measures of every block on ``images`` (eval mode, no gradients)."""
    with _eval(model), torch.no_grad(), record_attention(model) as stats:
        model(images)
    return attention_report(stats)


# ------------------------------------------------------------------------------------------------
# 2. Gradient fidelity
# ------------------------------------------------------------------------------------------------
def gradient_fidelity(model: nn.Module, images: torch.Tensor, targets: torch.Tensor,
                      loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
                      ) -> dict[str, dict[str, float | None]]:
    """Per quantized layer with a weight: cosine and relative error of the recipe's dL/dW against
    the high-precision dL/dW on the same weights and batch (eval mode)."""
    names = [n for n in getattr(model, "quantized_layers", [])
             if isinstance(getattr(model.get_submodule(n), "weight", None), torch.Tensor)]
    if not names:
        return {}
    weights = [model.get_submodule(n).weight for n in names]
    with _eval(model), _keep_generators(model):
        g_q = torch.autograd.grad(loss_fn(model(images), targets), weights, allow_unused=True)
        with high_precision(model):
            g_h = torch.autograd.grad(loss_fn(model(images), targets), weights, allow_unused=True)
    return {n: gradient_agreement(q, h) for n, q, h in zip(names, g_q, g_h)}


def gradient_agreement(g: torch.Tensor | None, reference: torch.Tensor | None
                       ) -> dict[str, float | None]:
    """``cosine`` and ``relative_error`` of ``g`` against ``reference``; None where undefined
    (a missing or all-zero gradient)."""
    if g is None or reference is None:
        return {"cosine": None, "relative_error": None}
    g, r = g.detach().double().flatten(), reference.detach().double().flatten()
    ng, nr = g.norm().item(), r.norm().item()
    cosine = (g @ r).item() / (ng * nr) if ng > 0 and nr > 0 else None
    rel = (g - r).norm().item() / nr if nr > 0 else None
    return {"cosine": _finite(cosine), "relative_error": _finite(rel)}


# ------------------------------------------------------------------------------------------------
# 3. Quantization error (SQNR)
# ------------------------------------------------------------------------------------------------
def sqnr_db(x: torch.Tensor, x_hat: torch.Tensor) -> float | None:
    """10 log10(sum x^2 / sum (x - x_hat)^2) in dB; None when x or the error is all zero."""
    x, x_hat = x.detach().double(), x_hat.detach().double()
    signal, noise = x.square().sum().item(), (x - x_hat).square().sum().item()
    if signal == 0 or noise == 0:
        return None
    return _finite(10 * math.log10(signal / noise))


def weight_operand(module: nn.Module) -> torch.Tensor:
    """The fprop weight operand (N, K) of a Linear / Conv2d / ConvTranspose2d, K along blocks.

    Conv2d weight (C_out, C_in, kh, kw) -> (C_out, kh*kw*C_in); ConvTranspose2d weight
    (C_in, C_out, kh, kw) -> (C_out, kh*kw*C_in): its forward is a Conv2d dgrad, contracting over
    its C_in per tap (docs/nvfp4.md section 6).
    """
    w = module.weight.detach()
    if isinstance(module, nn.Linear):
        return w
    if isinstance(module, nn.ConvTranspose2d):
        return w.permute(1, 2, 3, 0).reshape(w.shape[1], -1)
    if isinstance(module, nn.Conv2d):
        return w.permute(0, 2, 3, 1).reshape(w.shape[0], -1)
    raise ValueError(f"weight_operand: unsupported layer type {type(module).__name__}")


def input_operand(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The fprop activation operand (rows, C_in): one row per token or pixel, blocks along C_in."""
    x = x.detach()
    if isinstance(module, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])  # NHWC pixels
    raise ValueError(f"input_operand: unsupported layer type {type(module).__name__}")


def operand_sqnr(x: torch.Tensor, tile: tuple[int, int]) -> float | None:
    """SQNR of a 2-D operand under NVFP4 round-to-nearest with ``tile`` blocks (zero-padded)."""
    m, k = x.shape
    padded = F.pad(x.float(), (0, -k % nvfp4.BLOCK, 0, -m % nvfp4.BLOCK))
    return sqnr_db(padded, kernels.fake_quantize(padded, tile=tile))


def quantization_error(model: nn.Module, images: torch.Tensor, recipe: Recipe | str
                       ) -> dict[str, dict[str, float | None]]:
    """Per quantized layer (or, for a baseline, per layer the study quantizes): SQNR in dB of its
    weight (the recipe's weight tile) and of its input on ``images`` (1x16)."""
    recipe = get_recipe(recipe) if isinstance(recipe, str) else recipe
    layers = _high_precision_layers(model)
    out: dict[str, dict[str, float | None]] = {}
    handles = []

    def hook_for(name: str, layer: nn.Module) -> Callable:
        def hook(module, args):
            out[name]["input_db"] = operand_sqnr(input_operand(layer, args[0]), ACTIVATION_TILE)
        return hook

    for name, layer in layers.items():
        out[name] = {"weight_db": operand_sqnr(weight_operand(layer), recipe.weight_tile),
                     "input_db": None}
        handles.append(model.get_submodule(name).register_forward_pre_hook(hook_for(name, layer)))
    try:
        with _eval(model), torch.no_grad():
            model(images)
    finally:
        for h in handles:
            h.remove()
    return out


def _high_precision_layers(model: nn.Module) -> dict[str, nn.Module]:
    """name -> high-precision module (the original for swapped layers) of the weighted layers that
    are quantized, or that the study would quantize when nothing is."""
    originals = getattr(model, ORIGINALS_ATTR, {}) or {}
    names = getattr(model, "quantized_layers", None) or quantizable_layers(model)
    layers = {n: originals.get(n, model.get_submodule(n)) for n in names}
    return {n: m for n, m in layers.items() if isinstance(m, (nn.Linear, nn.Conv2d,
                                                              nn.ConvTranspose2d))}


# ------------------------------------------------------------------------------------------------
# All together
# ------------------------------------------------------------------------------------------------
def measure(model: nn.Module, images: torch.Tensor, targets: torch.Tensor,
            loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
            recipe: Recipe | str) -> dict:
    """Attention, gradient fidelity and SQNR of ``model`` on one batch, with summary means::

        {"recipe": name, "attention": {block: {...}}, "gradients": {layer: {...}},
         "sqnr": {layer: {"weight_db", "input_db"}}, "summary": {...}}
    """
    recipe = get_recipe(recipe) if isinstance(recipe, str) else recipe
    with _keep_generators(model):
        attention = attention_diagnostics(model, images)
        gradients = gradient_fidelity(model, images, targets, loss_fn)
        sqnr = quantization_error(model, images, recipe)
    summary = {f"attention_{k}": _mean(v[k] for v in attention.values()) for k in ATTENTION_KEYS}
    summary |= {f"gradient_{k}": _mean(v[k] for v in gradients.values())
                for k in ("cosine", "relative_error")}
    summary |= {f"sqnr_{k}": _mean(v[k] for v in sqnr.values()) for k in ("weight_db", "input_db")}
    return {"recipe": recipe.name, "attention": attention, "gradients": gradients, "sqnr": sqnr,
            "summary": summary}


# ------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------
def _finite(v: float | None) -> float | None:
    return float(v) if v is not None and math.isfinite(v) else None


def _mean(values) -> float | None:
    vals = [v for v in values if v is not None]
    return float(sum(vals) / len(vals)) if vals else None


@contextlib.contextmanager
def _eval(model: nn.Module) -> Iterator[None]:
    """Eval mode inside the block; the previous train/eval flags of every module are restored."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for m, training in modes.items():
            m.training = training


def _generators(obj, depth: int = 3) -> Iterator[torch.Generator]:
    """torch.Generators held by ``obj``'s attributes, looking into dataclasses (a layer's
    ``op.roles.generator``) down to ``depth`` levels."""
    if isinstance(obj, torch.Generator):
        yield obj
    elif depth > 0 and (isinstance(obj, nn.Module) or dataclasses.is_dataclass(obj)):
        values = (vars(obj).values() if isinstance(obj, nn.Module)
                  else (getattr(obj, f.name) for f in dataclasses.fields(obj)))
        for v in values:
            if not isinstance(v, nn.Module):  # submodules are visited by model.modules()
                yield from _generators(v, depth - 1)


@contextlib.contextmanager
def _keep_generators(model: nn.Module) -> Iterator[None]:
    """Restore the state of every torch.Generator a module of ``model`` holds (SR draws)."""
    gens = {id(g): g for m in model.modules() for g in _generators(m)}
    states = {k: g.get_state() for k, g in gens.items()}
    try:
        yield
    finally:
        for k, g in gens.items():
            g.set_state(states[k])
