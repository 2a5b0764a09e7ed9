"""The emulator's twins: ``quantized(module, recipe)``, the layer-type registry ``TWINS``, and the
in-place replacement of a submodule that every backend's swap uses."""
from __future__ import annotations

import torch
import torch.nn as nn

from nvfp4bench.quant.autograd import resolve_recipe
from nvfp4bench.quant.formats import Format, get_format
from nvfp4bench.quant.conv import QuantizedConv2d, QuantizedConvTranspose2d, conv_geometry
from nvfp4bench.quant.linear import QuantizedLinear, QuantizedMatmul
from nvfp4bench.quant.matmul import Matmul
from nvfp4bench.quant.nvfp4 import BLOCK
from nvfp4bench.quant.recipes import Recipe
from nvfp4bench.quant.roles import Roles


def _check_channels(name: str, what: str, cin: int, cout: int, multiple: int = BLOCK,
                    format_name: str = "NVFP4") -> None:
    bad = [f"{label}={v}" for label, v in ((f"in_{what}", cin), (f"out_{what}", cout))
           if v % multiple]
    if bad:
        raise ValueError(f"{name}: {format_name} needs {what} counts that are multiples of "
                         f"{multiple}, got {', '.join(bad)} (in_{what}={cin}, out_{what}={cout}); "
                         f"keep this layer in high precision or change its width")


def _twin_linear(module, roles, name):
    _check_channels(name, "features", module.in_features, module.out_features)
    return QuantizedLinear(module, roles, name)


def _check_conv_channels(module, roles, name) -> None:
    """Channels are multiples of 16 and of the format's block: a block of an implicit-GEMM
    operand must not straddle two taps (a Linear's last block is zero-padded instead)."""
    multiple = max(BLOCK, roles.format.block)
    label = "NVFP4" if multiple == BLOCK else roles.format.name
    _check_channels(name, "channels", module.in_channels, module.out_channels, multiple, label)


def _twin_conv2d(module, roles, name):
    _check_conv_channels(module, roles, name)
    return QuantizedConv2d(module, roles, name, conv_geometry(module, name))


def _twin_conv_transpose2d(module, roles, name):
    _check_conv_channels(module, roles, name)
    return QuantizedConvTranspose2d(module, roles, name, conv_geometry(module, name))


# Layer type -> constructor of its quantized twin.
TWINS = {nn.Linear: _twin_linear, nn.Conv2d: _twin_conv2d,
         nn.ConvTranspose2d: _twin_conv_transpose2d}



def quantized(module: nn.Module, recipe: Recipe | str, *,
              generator: torch.Generator | None = None, name: str | None = None,
              kernels: str = "eager", format: str | Format | None = None) -> nn.Module:
    """The NVFP4 twin of ``module`` (nn.Linear, nn.Conv2d or nn.ConvTranspose2d) under ``recipe``.

    The twin shares ``weight`` and ``bias`` (the same Parameters). A baseline recipe
    (``quantized=False``) returns ``module`` itself. ``generator`` feeds stochastic rounding
    (required when the recipe has SR). ``name`` labels errors (default: the module's repr).
    ``kernels`` picks how its fake_quantize calls run (``kernels.KERNELS``; the same bits).
    ``format``: the block format of its operands (``formats.FORMATS``; default ``nvfp4``).
    """
    fmt = get_format(format)
    name = name or repr(module)
    recipe = resolve_recipe(recipe, generator, name)
    if not recipe.quantized:
        return module
    for kind, twin in TWINS.items():
        if isinstance(module, kind):
            tile = recipe.weight_tile
            return twin(module, Roles(recipe, generator, tile, kernels, fmt), name)
    raise TypeError(f"{name}: no NVFP4 twin for {type(module).__name__}; supported: "
                    f"{', '.join(k.__name__ for k in TWINS)}")


def emulator_twin(module: nn.Module, recipe: Recipe, generator: torch.Generator | None,
                  name: str, kernels: str = "eager",
                  format: str | Format | None = None) -> nn.Module:
    """The emulator's twin of any quantizable module: ``quantized`` for a Linear or a
    convolution, ``QuantizedMatmul`` for an attention ``Matmul``."""
    if isinstance(module, Matmul):
        return QuantizedMatmul(recipe, generator=generator, kernels=kernels, format=format)
    return quantized(module, recipe, generator=generator, name=name, kernels=kernels,
                     format=format)


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted ``name`` (e.g. ``blocks.3.attn.qkv``) by ``module``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)
