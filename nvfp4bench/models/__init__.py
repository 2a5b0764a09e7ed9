"""The three architecture families, their scale tables, and NVFP4 quantization by module swap.

``build_model(arch, scale)`` builds a plain PyTorch model from two tables: ``FAMILIES`` (arch -> one
class) and ``ARCHS`` (arch -> scale -> frozen config). Each class declares which of its modules the
study quantizes, as module-name patterns (``fnmatch``), so the models never look at a recipe::

    UNet.QUANTIZED  = ("down.*.conv", "up.*.conv")   # not stem, bottleneck or head
    ViT.QUANTIZED   = ("blocks.*.attn.qkv", "blocks.*.attn.proj", "blocks.*.mlp.fc1",
                       "blocks.*.mlp.fc2")           # Swin: the same
    *.ATTENTION_MATMULS = ("blocks.*.attn.qk", "blocks.*.attn.av")   # opt-in

``quantize_model(model, recipe, backend)`` resolves those names (``quantizable_layers``) and hands
them to a backend from ``BACKENDS``, which swaps each module in place for its quantized twin. The
twin shares the original's Parameter objects, so an optimizer built before the swap still trains
the model, and every recipe of one (arch, scale, seed) starts from the same initial weights.
The replaced high-precision modules are kept (``high_precision(model)`` swaps them back for a
while: the diagnostics compare gradients with them).
"""
from __future__ import annotations

import contextlib
import fnmatch
from collections.abc import Callable, Iterator

import torch
from torch import nn

from nvfp4bench.models import cnn, swin, vit
from nvfp4bench.models.blocks import init_logit_prior
from nvfp4bench.recipes import Recipe, get_recipe

SCALES: tuple[str, ...] = ("tiny", "small", "base")

# arch -> the family's class; arch -> scale -> the family's frozen config
FAMILIES: dict[str, type[nn.Module]] = {"cnn": cnn.UNet, "vit": vit.ViT, "swin": swin.Swin}
ARCHS: dict[str, dict[str, object]] = {"cnn": cnn.SCALES, "vit": vit.SCALES, "swin": swin.SCALES}

# The study's models' exact parameter counts at 256 px with 3 input channels (protocol.md); ours
# equal them (tests/test_models.py).
STUDY_PARAMETERS: dict[str, dict[str, int]] = {
    "cnn": {"tiny": 530_753, "small": 3_684_481, "base": 13_674_529},
    "vit": {"tiny": 494_473, "small": 3_634_921, "base": 13_880_777},
    "swin": {"tiny": 496_305, "small": 3_646_687, "base": 13_987_513},
}

ORIGINALS_ATTR = "_nvfp4_originals"  # name -> the high-precision module a backend replaced


def build_model(arch: str, scale: str, *, image_size: int = 256, in_channels: int = 3,
                head_prior: float | None = None) -> nn.Module:
    """A fresh ``arch`` model at ``scale``; ``forward((B, in_channels, S, S)) -> (B, 1, S, S)``.

    Transformers are built for ``image_size`` (position embeddings, Swin windows); the CNN takes
    any size. Initialisation is the study's and draws from torch's global RNG: seed it
    (``torch.manual_seed``) first. ``head_prior`` (opt-in, a deviation from the study): start the
    one-logit layer's bias at logit(head_prior) (``blocks.init_logit_prior``); nothing else changes.
    """
    if arch not in FAMILIES:
        raise ValueError(f"unknown arch {arch!r}; choose one of: {', '.join(FAMILIES)}")
    if scale not in ARCHS[arch]:
        raise ValueError(f"unknown scale {scale!r} for {arch}; choose one of: "
                         f"{', '.join(ARCHS[arch])}")
    if not isinstance(in_channels, int) or in_channels < 1:
        raise ValueError(f"in_channels must be a positive int, got {in_channels!r}")
    if not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    model = FAMILIES[arch](ARCHS[arch][scale], image_size=image_size, in_channels=in_channels)
    if head_prior is not None:
        init_logit_prior(model.get_submodule(type(model).HEAD), head_prior)
    return model


def count_parameters(model: nn.Module) -> int:
    """Number of scalar parameters (each shared Parameter counted once)."""
    return sum(p.numel() for p in model.parameters())


def quantizable_layers(model: nn.Module, *, attention: bool = False) -> list[str]:
    """Names of the modules the study quantizes in ``model`` (its class's ``QUANTIZED`` patterns;
    with ``attention=True`` also ``ATTENTION_MATMULS``), in ``named_modules`` order."""
    patterns = getattr(type(model), "QUANTIZED", None)
    if patterns is None:
        raise ValueError(f"{type(model).__name__} declares no QUANTIZED name patterns; build it "
                         f"with nvfp4bench.models.build_model")
    if attention:
        patterns = tuple(patterns) + tuple(getattr(type(model), "ATTENTION_MATMULS", ()))
    return [name for name, _ in model.named_modules()
            if name and any(fnmatch.fnmatchcase(name, p) for p in patterns)]


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted ``name`` (e.g. ``blocks.3.attn.qkv``) by ``module``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


# A backend swaps the named modules of a model in place for their quantized twins.
Backend = Callable[..., None]  # backend(model, recipe, names, *, generator) -> None


def emulator_backend(model: nn.Module, recipe: Recipe, names: list[str], *,
                     generator: torch.Generator | None = None) -> None:
    """The NVFP4 emulator (``nvfp4bench.layers``): linears and convolutions through
    ``layers.quantized``, attention matmuls through ``layers.QuantizedMatmul``. Every twin is
    built (and checked) before the first swap, so a refused layer leaves the model untouched."""
    from nvfp4bench import layers

    twins = {}
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, layers.Matmul):
            twin = layers.QuantizedMatmul(recipe, generator=generator)
        else:
            twin = layers.quantized(module, recipe, generator=generator, name=name)
        twins[name] = twin.train(module.training)
    for name, twin in twins.items():
        set_submodule(model, name, twin)


def te_backend(model: nn.Module, recipe: Recipe, names: list[str], *,
               generator: torch.Generator | None = None) -> None:
    """Transformer Engine, imported only when asked for: ``nvfp4bench.backends.te``'s
    ``quantize_model(model, recipe, layer_names=names, generator=...)`` swaps the named modules
    in place (linears to TE, convolutions and attention matmuls to the emulator)."""
    try:
        from nvfp4bench.backends import te
    except ImportError as err:
        raise ImportError(f"backend 'te' is unavailable ({err}); it needs NVIDIA Transformer "
                          f"Engine and a CUDA GPU; use backend='emulator'") from err
    te.quantize_model(model, recipe, layer_names=names, generator=generator)


BACKENDS: dict[str, Backend] = {"emulator": emulator_backend, "te": te_backend}


def register_backend(name: str, backend: Backend) -> None:
    """Add a backend to ``BACKENDS`` (a callable with ``emulator_backend``'s signature)."""
    BACKENDS[name] = backend


def quantize_model(model: nn.Module, recipe: Recipe | str, backend: str = "emulator", *,
                   generator: torch.Generator | None = None,
                   quantize_attention: bool = False) -> nn.Module:
    """Swap, in place, the layers protocol.md quantizes for their NVFP4 twins; returns ``model``.

    Sets ``model.quantized_layers`` (module names, ``[]`` for a recipe with ``quantized=False``,
    which swaps nothing). ``generator`` feeds stochastic rounding; ``quantize_attention`` also
    swaps the two attention matmuls (an extension beyond the study).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of: {', '.join(BACKENDS)}")
    if isinstance(recipe, str):
        recipe = get_recipe(recipe)
    if getattr(model, "quantized_layers", None):
        raise ValueError(f"model is already quantized ({len(model.quantized_layers)} layers); "
                         f"quantize a fresh model")
    names = quantizable_layers(model, attention=quantize_attention) if recipe.quantized else []
    originals = {name: model.get_submodule(name) for name in names}
    if names:
        BACKENDS[backend](model, recipe, names, generator=generator)
    model.quantized_layers = names
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


__all__ = ["ARCHS", "BACKENDS", "FAMILIES", "SCALES", "STUDY_PARAMETERS", "build_model",
           "count_parameters", "emulator_backend", "high_precision", "quantizable_layers",
           "quantize_model", "register_backend", "set_submodule", "te_backend"]
