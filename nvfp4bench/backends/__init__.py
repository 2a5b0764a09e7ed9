"""Backends that run the quantized GEMMs: the NVFP4 emulator (everywhere) or Transformer Engine.

========  ===================================================================================
backend   what runs the quantized layers
========  ===================================================================================
emulator  ``nvfp4bench.layers``: plain PyTorch, bit-exact with TE's round-to-nearest path
          (nvfp4.md); CPU or any GPU. The reference, and what the tests use.
te        ``nvfp4bench.backends.te``: Transformer Engine's ``te.Linear`` with
          ``NVFP4BlockScaling`` on Blackwell GPUs (compute capability >= 10.0), real FP4 GEMMs.
          Convolutions (which TE cannot quantize) and the optional attention matmuls stay on the
          emulator. Needs ``pip install -r requirements-te.txt``.
========  ===================================================================================

Nothing here imports Transformer Engine: ``nvfp4bench.backends.te`` imports it inside the
functions that need it, so the package imports (and its tests run) on machines without TE.
"""
from __future__ import annotations

import importlib
from types import ModuleType

BACKENDS: dict[str, str] = {
    "emulator": "nvfp4bench.layers",
    "te": "nvfp4bench.backends.te",
}


def check_backend(name: str) -> str:
    """``name`` if it is a registered backend; a ValueError listing the valid names otherwise."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of: {', '.join(BACKENDS)}")
    return name


def load_backend(name: str) -> ModuleType:
    """The module implementing backend ``name``, imported on first use."""
    return importlib.import_module(BACKENDS[check_backend(name)])
