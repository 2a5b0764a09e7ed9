"""Quantization by module swap: ``quantize_model(model, recipe, backend)`` and ``high_precision``.

A model declares which of its modules the study quantizes, as module-name patterns
(``fnmatch``) on its class, so the models never look at a recipe::

    UNet.QUANTIZED  = ("down.*.conv", "up.*.conv")   # not stem, bottleneck or head
    ViT.QUANTIZED   = ("blocks.*.attn.qkv", "blocks.*.attn.proj", "blocks.*.mlp.fc1",
                       "blocks.*.mlp.fc2")           # Swin: the same
    *.ATTENTION_MATMULS = ("blocks.*.attn.qk", "blocks.*.attn.av")   # opt-in

``quantize_model(model, recipe, backend)`` resolves those names (``quantizable_layers``; any other
model passes ``layers=`` patterns or a predicate) and hands them to a backend from ``BACKENDS``
(``backends.py``), which swaps each module in place for its quantized twin. The
twin shares the original's Parameter objects, so an optimizer built before the swap still trains
the model, and every recipe of one (arch, scale, seed) starts from the same initial weights.
The replaced high-precision modules are kept (``high_precision(model)`` swaps them back for a
while: the diagnostics compare gradients with them).
"""
from __future__ import annotations

import contextlib
import fnmatch
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

from nvfp4bench.quant.backends import BACKENDS, Backend, format_kwargs, get_backend
from nvfp4bench.quant.formats import Format, get_format
from nvfp4bench.quant.recipes import Recipe, get_recipe
from nvfp4bench.quant.twins import set_submodule

ORIGINALS_ATTR = "_nvfp4_originals"  # name -> the high-precision module a backend replaced


# Which modules to quantize: module-name patterns (fnmatch), or a predicate (name, module) -> bool.
LayerSelection = Sequence[str] | Callable[[str, nn.Module], bool]


def quantizable_layers(model: nn.Module, *, attention: bool = False,
                       layers: LayerSelection | None = None) -> list[str]:
    """Names of the modules to quantize in ``model``, in ``named_modules`` order.

    ``layers``: module-name patterns (``fnmatch``, e.g. ``"encoder.*.fc?"``) or a predicate
    ``(name, module) -> bool``; by default the patterns the model's class declares
    (``QUANTIZED``; with ``attention=True`` also ``ATTENTION_MATMULS``).
    """
    if layers is None:
        layers = getattr(type(model), "QUANTIZED", None)
        if layers is None:
            raise ValueError(f"{type(model).__name__} declares no QUANTIZED name patterns; pass "
                             f"layers=[...] (module-name patterns) or a predicate")
        if attention:
            layers = tuple(layers) + tuple(getattr(type(model), "ATTENTION_MATMULS", ()))
    if callable(layers):
        return [name for name, m in model.named_modules() if name and layers(name, m)]
    if isinstance(layers, str):
        layers = (layers,)
    return [name for name, _ in model.named_modules()
            if name and any(fnmatch.fnmatchcase(name, p) for p in layers)]


def register_backend(name: str, backend: Backend) -> None:
    """Add a backend to ``BACKENDS`` (an object with ``backends.Backend``'s methods)."""
    BACKENDS[name] = backend


def quantize_model(model: nn.Module, recipe: Recipe | str, backend: str | Backend = "emulator", *,
                   generator: torch.Generator | None = None, quantize_attention: bool = False,
                   layers: LayerSelection | None = None, kernels: str = "eager",
                   format: str | Format | None = None) -> nn.Module:
    """Swap, in place, the layers to quantize for their NVFP4 twins; returns ``model``.

    Any ``nn.Module`` works: ``layers`` selects its Linear / Conv2d / ConvTranspose2d / Matmul
    modules by name pattern or predicate (``quantizable_layers``); by default the ones the
    model's class declares (the study's selection for nvfp4bench's models). Sets
    ``model.quantized_layers`` (module names, ``[]`` for a recipe with ``quantized=False``,
    which swaps nothing) and ``model.layer_backends`` (name -> the backend that runs it).
    ``generator`` feeds stochastic rounding; ``quantize_attention`` also swaps the two attention
    matmuls (an extension beyond the study). ``kernels`` picks how the emulator's layers run
    fake_quantize (``kernels.KERNELS``: eager, compiled, native or auto; the same bits).
    ``format``: the block format of every quantized operand (``formats.FORMATS``; default
    ``nvfp4``). Run the model's forwards inside ``get_backend(backend).context(recipe, device,
    dtype)``. ``recipe`` and ``backend`` may be names or the resolved objects (a training run
    resolves them once and passes the objects).
    """
    chosen = get_backend(backend)
    if isinstance(recipe, str):
        recipe = get_recipe(recipe)
    if getattr(model, "quantized_layers", None):
        raise ValueError(f"model is already quantized ({len(model.quantized_layers)} layers); "
                         f"quantize a fresh model")
    names = (quantizable_layers(model, attention=quantize_attention, layers=layers)
             if recipe.quantized else [])
    originals = {name: model.get_submodule(name) for name in names}
    fmt = get_format(format)
    placement = (chosen.swap(model, recipe, names, generator=generator, kernels=kernels,
                             **format_kwargs(fmt)) if names else {})
    model.quantized_layers = names
    model.layer_backends = {name: placement.get(name, chosen.name) for name in names}
    setattr(model, ORIGINALS_ATTR, originals)  # a plain dict: not registered as submodules
    return model


@contextlib.contextmanager
def high_precision(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, ``model`` runs its original high-precision layers (same Parameters).

    The quantized twins are put back on exit, also on error. A model that was never quantized
    is left as it is.
    """
    originals: dict[str, nn.Module] = getattr(model, ORIGINALS_ATTR, {}) or {}
    twins = {name: model.get_submodule(name) for name in originals}
    for name, original in originals.items():
        shared = {id(p) for p in twins[name].parameters()}
        if any(id(p) not in shared for p in original.parameters()):
            raise ValueError(f"high_precision: the quantized {name!r} does not share its "
                             f"parameters with the original layer; its backend cannot be "
                             f"compared with high precision")
        set_submodule(model, name, original.train(model.training))
    try:
        yield model
    finally:
        for name, twin in twins.items():
            set_submodule(model, name, twin)
