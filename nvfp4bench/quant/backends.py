"""Quantization backends: who runs a model's quantized layers, and in which run context.

A backend is an object with four methods; a training run resolves it once (``get_backend``)
and calls them in this order::

    default_precision(device)          its compute precision when neither --precision nor the
                                       recipe sets one (None: the device's default)
    preflight(recipe, device, dtype, format)  every refusal that needs no model or data (first)
    swap(model, recipe, names, generator=..., kernels=..., format=...) -> {name: backend}
    context(recipe, device, dtype, format)  the context every forward runs in (training
                                       steps, evaluation, diagnostics)

========  ===================================================================================
backend   what runs the quantized layers
========  ===================================================================================
emulator  the NVFP4 emulator (``twins.py``): plain PyTorch, bit-exact with TE's
          round-to-nearest path (docs/nvfp4.md); CPU or any GPU. Its context is
          ``torch.autocast`` at the run's compute dtype (none for fp32).
te        Transformer Engine (``te/runtime.py``, ``te/linear.py``): ``te.Linear`` with
          ``NVFP4BlockScaling`` on Blackwell GPUs; convolutions and attention matmuls stay on the
          emulator. Its context is ``torch.autocast`` (bf16) plus
          ``te.autocast(recipe=NVFP4BlockScaling(...))`` (``MXFP8BlockScaling`` for mxfp8_te).
========  ===================================================================================

The ``format`` argument (``formats.FORMATS``) is passed to ``preflight``, ``swap`` and
``context`` only for a block format other than the default nvfp4 (``format_kwargs``), so a
backend written before formats existed keeps working for nvfp4.

Nothing here imports Transformer Engine: ``te/runtime.py`` imports it inside the functions that
need it.
"""
from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import ContextManager, Protocol

import torch
from torch import nn

from nvfp4bench.quant.formats import DEFAULT_FORMAT, FORMATS, Format
from nvfp4bench.quant.recipes import Recipe
from nvfp4bench.quant.te import linear as te_linear
from nvfp4bench.quant.te import runtime as te
from nvfp4bench.quant.twins import emulator_twin, set_submodule


class Backend(Protocol):
    name: str

    def default_precision(self, device: torch.device) -> str | None: ...

    def preflight(self, recipe: Recipe, device: torch.device, dtype: torch.dtype | None,
                  format: Format = FORMATS[DEFAULT_FORMAT]) -> object | None: ...

    def swap(self, model: nn.Module, recipe: Recipe, names: Sequence[str], *,
             generator: torch.Generator | None = None, kernels: str = "eager",
             format: Format = FORMATS[DEFAULT_FORMAT]) -> dict[str, str]: ...

    def context(self, recipe: Recipe, device: torch.device, dtype: torch.dtype | None,
                format: Format = FORMATS[DEFAULT_FORMAT]) -> ContextManager: ...


def format_kwargs(format: Format) -> dict:
    """``{"format": format}`` for a format other than nvfp4, else nothing (module docstring)."""
    return {} if format.name == DEFAULT_FORMAT else {"format": format}


def compute_context(device: torch.device, dtype: torch.dtype | None) -> ContextManager:
    """``torch.autocast(device.type, dtype)``, or nothing for fp32 (``dtype`` None)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


class Emulator:
    """The NVFP4 emulator: runs anywhere, every layer kind."""

    name = "emulator"

    def default_precision(self, device):
        """None: the device's default (fp16 autocast on CUDA, fp32 on the CPU)."""
        return None

    def preflight(self, recipe, device, dtype, format=FORMATS[DEFAULT_FORMAT]):
        return None

    def swap(self, model, recipe, names, *, generator=None, kernels="eager",
             format=FORMATS[DEFAULT_FORMAT]):
        """Every twin is built (and checked) before the first swap, so a refused layer leaves
        the model untouched."""
        modules = {name: model.get_submodule(name) for name in names}
        made = {name: emulator_twin(m, recipe, generator, name, kernels, format).train(m.training)
                for name, m in modules.items()}
        for name, twin in made.items():
            set_submodule(model, name, twin)
        return {name: self.name for name in names}

    def context(self, recipe, device, dtype, format=FORMATS[DEFAULT_FORMAT]):
        return compute_context(device, dtype)


class TransformerEngine:
    """Transformer Engine on a Blackwell GPU for the linears; the emulator for the rest."""

    name = "te"

    def default_precision(self, device):
        """bf16 on CUDA: Transformer Engine's NVFP4 runs under bf16 only."""
        return "bf16" if torch.device(device).type == "cuda" else None

    def preflight(self, recipe, device, dtype, format=FORMATS[DEFAULT_FORMAT]):
        return te.preflight(recipe, dtype, device, format)

    def swap(self, model, recipe, names, *, generator=None, kernels="eager",
             format=FORMATS[DEFAULT_FORMAT]):
        return te_linear.swap(model, recipe, names, generator=generator, kernels=kernels,
                              format=format)

    def context(self, recipe, device, dtype, format=FORMATS[DEFAULT_FORMAT]):
        return te.autocast(recipe, dtype=dtype, device_type=torch.device(device).type,
                           format=format)


BACKENDS: dict[str, Backend] = {"emulator": Emulator(), "te": TransformerEngine()}


def get_backend(name: str | Backend) -> Backend:
    """The backend called ``name`` (a backend object passes through); a ValueError listing the
    valid names otherwise."""
    if not isinstance(name, str):
        return name
    try:
        return BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown backend {name!r}; choose one of: {', '.join(BACKENDS)}") from None
