"""``TELinear`` (a ``te.Linear`` sharing an ``nn.Linear``'s Parameters) and the te backend's swap.

Transformer Engine is imported only when a ``TELinear`` is built; the refusals and the run
context are in ``te.py`` (module docstring there).
"""
from __future__ import annotations

import importlib
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from nvfp4bench.quant.formats import Format, get_format
from nvfp4bench.quant.recipes import Recipe
from nvfp4bench.quant.te import runtime as te
from nvfp4bench.quant.twins import emulator_twin, set_submodule

BLOCK = te.BLOCK


# --------------------------------------------------------------------------------------------
# The layer
# --------------------------------------------------------------------------------------------
def _te_quantization_active() -> bool | None:
    """Whether a TE autocast with a recipe is active (None when this TE does not say)."""
    for module in ("transformer_engine.pytorch.quantization", "transformer_engine.pytorch.fp8"):
        try:
            manager = importlib.import_module(module).FP8GlobalStateManager
        except (ImportError, AttributeError):
            continue
        return bool(manager.is_fp8_enabled())
    return None


def _share_parameter(module: nn.Module, name: str, param: nn.Parameter) -> None:
    """Make ``module.<name>`` the Parameter ``param``, keeping attributes TE set on its own.

    TE stores metadata on its parameters (tensor-parallel attributes); they are copied onto the
    shared Parameter when it lacks them, so TE's code paths that read them keep working.
    """
    own = module._parameters.get(name)
    if own is not None:
        for attr, value in vars(own).items():
            if not hasattr(param, attr):
                setattr(param, attr, value)
    nn.Module.register_parameter(module, name, param)  # bypasses TE's init-metadata wrapper


class TELinear(nn.Module):
    """Twin of an ``nn.Linear`` that runs ``te.Linear`` (NVFP4 under ``autocast(recipe)``).

    It owns the original ``weight`` and ``bias`` Parameters (no copy: the same objects the
    ``nn.Linear`` had), so its state dict has exactly the ``nn.Linear`` keys; the ``te.Linear``
    is held unregistered and uses the same Parameters. It is created on the weight's CUDA
    device (the current one for a CPU weight); move the model with ``.to("cuda")`` (Parameters
    move in place, so the sharing holds).

    forward: ``x (..., K)`` is cast to the autocast dtype, flattened to ``(M, K)``, zero-padded
    to ``M`` a multiple of ``block`` (the format's block, 16 or 32: TE refuses other token
    counts; zero rows change neither amax nor GEMM), run through ``te.Linear`` and cut back to
    ``(..., N)``.
    """

    def __init__(self, linear: nn.Linear, name: str = "", block: int = BLOCK) -> None:
        super().__init__()
        te_pytorch = te.import_te_pytorch()
        te.check_linear_shapes({name or "linear": (linear.in_features, linear.out_features)},
                               block)
        self.in_features, self.out_features, self.layer_name = (
            linear.in_features, linear.out_features, name)
        self.block = block
        self.weight = linear.weight
        self.bias = linear.bias  # a Parameter or None
        device = linear.weight.device if linear.weight.is_cuda else torch.device("cuda")
        inner = te_pytorch.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None,
                          params_dtype=linear.weight.dtype, device=device)
        _share_parameter(inner, "weight", self.weight)
        if self.bias is not None:
            _share_parameter(inner, "bias", self.bias)
        object.__setattr__(self, "_te", inner)  # unregistered: state dict == nn.Linear's

    @property
    def te_module(self) -> nn.Module:
        return self._te

    def train(self, mode: bool = True) -> "TELinear":
        super().train(mode)
        self._te.train(mode)
        return self

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, backend=te")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _te_quantization_active() is False:
            raise RuntimeError(f"TELinear {self.layer_name!r} ran outside "
                               f"nvfp4bench.quant.te.runtime.autocast(recipe): te.Linear would run "
                               f"unquantized; wrap the forward (training and evaluation) in it")
        if torch.is_autocast_enabled(x.device.type):
            x = x.to(torch.get_autocast_dtype(x.device.type))
        lead = x.shape[:-1]
        x2d = x.reshape(-1, self.in_features)  # (M, K)
        m = x2d.shape[0]
        pad = (-m) % self.block
        if pad:
            x2d = F.pad(x2d, (0, 0, 0, pad))  # (M + pad, K), zero tokens
        y = self._te(x2d)  # (M + pad, N)
        if pad:
            y = y[:m]
        return y.reshape(*lead, self.out_features)


# --------------------------------------------------------------------------------------------
# Model swap
# --------------------------------------------------------------------------------------------

def swap(model: nn.Module, recipe: Recipe, names: Sequence[str], *,
         generator: torch.Generator | None = None, kernels: str = "eager",
         format: Format | None = None) -> dict[str, str]:
    """Swap, in place, the modules ``names`` for their te-backend twins; returns where each runs.

    ``nn.Linear`` -> ``TELinear`` (``"te"``); ``nn.Conv2d`` / ``nn.ConvTranspose2d`` and the
    attention ``Matmul`` modules -> the emulator's twins in the same ``format`` (``"emulator"``:
    TE has no convolution or batched-matmul module). Everything is checked before anything is
    swapped: a refusal (``TEUnavailable``) leaves the model untouched. A baseline recipe swaps
    nothing.
    """
    names = list(dict.fromkeys(names))
    format = get_format(format)
    if te.te_recipe_kwargs(recipe, format) is None:  # baseline; raises what TE cannot express
        return {}
    te.check_te_available()
    modules = {name: model.get_submodule(name) for name in names}
    linears = {n: m for n, m in modules.items() if isinstance(m, nn.Linear)}
    te.check_linear_shapes({n: (m.in_features, m.out_features) for n, m in linears.items()},
                           format.block)
    made = {n: (emulator_twin(m, recipe, generator, n, kernels, format) if n not in linears
                else TELinear(m, n, format.block)).train(m.training)
            for n, m in modules.items()}
    for name, twin in made.items():
        set_submodule(model, name, twin)
    return {n: "te" if n in linears else "emulator" for n in names}
