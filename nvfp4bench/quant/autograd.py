"""What every quantized layer's autograd function shares: the fp32 GEMM region, the compute
dtype, what forward saves for backward, the layer module both share, and the recipe check.

The three GEMMs and their operands' roles are in ``roles.py``; ``linear.py`` and ``conv.py``
build their autograd functions and modules from the pieces here (module docstring of
``roles.py``: "Compute dtype" and "Weights under autocast" say why each cast is where it is).
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

from nvfp4bench.quant.gemm import ConvGeometry
from nvfp4bench.quant.recipes import Recipe, get_recipe
from nvfp4bench.quant.roles import Op, Roles


@contextlib.contextmanager
def fp32_region(device: torch.device):
    """Autocast off: the emulated GEMMs run in fp32 on dequantized operands."""
    with torch.autocast(device.type, enabled=False):
        yield


def check_generator(op: Op, device: torch.device) -> None:
    """Refuse stochastic rounding whose generator lives on another device than the gradients."""
    g = op.roles.generator
    if op.roles.sr and g.device.type != device.type:
        raise ValueError(f"{op.name}: stochastic rounding on {device} needs a torch.Generator on "
                         f"that device, got one on {g.device}")


def save_operands(ctx, op: Op, x, xq, w, wq) -> None:
    """Save for backward the X and W its GEMMs read: the forward's quantized copies where the
    recipe's backward policy reads them (``reads_forward_x`` / ``_w``), else the originals."""
    policy = op.policy
    ctx.save_for_backward(xq if policy.reads_forward_x(op.roles) else x,
                          wq if policy.reads_forward_w(op.roles) else w)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype activations are computed in: the autocast dtype of x's device when autocast is
    on (as torch's own layers cast), else x's own (floating) dtype."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype if x.is_floating_point() else torch.get_default_dtype()


def in_compute_dtype(x: torch.Tensor, *others):
    """x and ``others`` (activations, a bias; None passes) cast to ``compute_dtype(x)``. A
    layer's weight is not among them: its NVFP4 copies are quantized from the parameter itself
    (``roles.py`` docstring, "Weights under autocast")."""
    dtype = compute_dtype(x)
    return tuple(None if t is None else t.to(dtype) for t in (x, *others))


class QuantizedLayer(nn.Module):
    """Shares ``weight`` and ``bias`` (the same Parameter objects) with the layer it twins."""

    def __init__(self, module: nn.Module, roles: Roles, name: str,
                 geometry: ConvGeometry | None = None):
        super().__init__()
        self.weight = module.weight
        self.bias = module.bias
        self.op = Op(roles, name, geometry)

    @property
    def recipe(self) -> Recipe:
        return self.op.roles.recipe

    def extra_repr(self) -> str:
        fmt = self.op.roles.format
        return f"{self.op.name}, recipe={self.recipe.name}" + (
            "" if fmt.is_nvfp4 else f", format={fmt.name}")


def resolve_recipe(recipe: Recipe | str, generator, what: str) -> Recipe:
    """``recipe`` as a Recipe (a name is looked up); an SR recipe without a torch.Generator is
    refused, naming ``what`` (no hidden seed)."""
    recipe = get_recipe(recipe) if isinstance(recipe, str) else recipe
    if recipe.stochastic_rounding and not isinstance(generator, torch.Generator):
        raise ValueError(f"{what}: recipe {recipe.name!r} uses stochastic rounding; pass "
                         f"generator=torch.Generator(device).manual_seed(seed)")
    return recipe
