"""Transformer Engine backend: real NVFP4 GEMMs on Blackwell GPUs.

What it does
------------
The study's recipes are switches named like TE's ``NVFP4BlockScaling`` (docs/nvfp4.md section 7),
so a recipe maps onto TE one field at a time (``te_recipe_kwargs``)::

    recipe field                 NVFP4BlockScaling kwarg
    disable_rht                  disable_rht
    disable_stochastic_rounding  disable_stochastic_rounding
    disable_2d_quantization      disable_2d_quantization
    backward_override            backward_override   (None | "dequantized" | "high_precision")

``te_linear.swap`` swaps the ``nn.Linear`` layers that docs/protocol.md quantizes for ``TELinear``
(a ``te.Linear`` sharing the very same weight and bias ``Parameter`` objects, so the optimizer,
the state dict and the emulator twin all see one tensor), and the model runs inside
``autocast(recipe)`` = ``torch.autocast("cuda", bf16)`` + ``te.autocast(recipe=NVFP4BlockScaling(...))``.
TE has no convolution or batched-matmul modules: ``Conv2d``, ``ConvTranspose2d`` and the optional
attention matmuls stay on the emulator (``nvfp4bench.quant.twins``), and ``model.layer_backends``
records which layer ran where. This module holds the recipe mapping, the refusals and the run
context; ``te_linear.py`` the layer and the swap; ``backends.py`` the backend object.

Formats (``te_recipe_kwargs(recipe, format)``)
---------------------------------------------
- ``nvfp4``: every recipe, as above.
- ``nvfp4_4over6`` / ``nvfp4_4over6_mse``: ``NVFP4BlockScaling(nvfp4_4over6="all",
  nvfp4_4over6_e4m3_use_256="all", nvfp4_4over6_err_mode="MAE" | "MSE")``. TE applies four over
  six to activations and weights only (its gradients stay plain NVFP4) and refuses it with the
  RHT or SR; nvfp4bench's format quantizes gradients with it too. The two agree only where no
  gradient is quantized, so the te backend runs these formats for the recipes with a
  ``backward_override`` (``fwd_only``, ``chain_rule``, ``fwd_rht``), with ``disable_rht=True``
  (the RHT would touch only the columnwise copies, which a backward override never makes).
- ``mxfp8_te``: ``MXFP8BlockScaling(fp8_format=E4M3, enable_2d_quantization=...)``, whose
  E8M0 arithmetic is the ``te`` scale rule (``mx.py``). TE's MXFP8 has no RHT and no SR: recipes
  that use either on a quantized gradient (``2d_rht``, ``2d_rht_sr``, ``sr_only``) are refused.
  The other MXFP8 rules are refused with a pointer to ``mxfp8_te``.
- Every other format (``mxfp4*``) is refused: TE has no recipe for it.
The convolutions and attention matmuls that stay on the emulator run in the same format.

What TE cannot express (refused, never approximated)
----------------------------------------------------
- Nothing in the registry. ``fwd_rht`` is ``NVFP4BlockScaling(backward_override=
  "high_precision", disable_2d_quantization=False, disable_rht=False)``: the high-precision
  backward with 16x16 weight tiles in the forward. With a ``backward_override`` TE makes no
  columnwise copy (``columnwise=backward_needs_input and backward_override is None`` in
  ``te.Linear``'s forward), so its RHT never runs; nvfp4bench defines it that way too (the RHT of
  two unquantized wgrad operands would cancel, R R^T = I), so both backends agree.
- Baselines (``quantized=False``) need no TE recipe: nothing is swapped (``te_recipe_kwargs``
  returns None).

Known differences from the emulator (documented, not refused)
-------------------------------------------------------------
- ``chain_rule`` backward: TE dequantizes the saved operands to the activation dtype (bf16)
  before the backward GEMMs; the emulator keeps them in fp32 (docs/nvfp4.md section 2): one extra
  bf16 rounding of W and X in dgrad / wgrad, measured by ``verify_te``'s layer check.
  ``fwd_only`` dequantizes nothing: both use the saved high-precision input and parameter.
- SR randomness comes from TE's own CUDA RNG (seed it with ``torch.cuda.manual_seed``), not
  from the ``generator`` argument, which only feeds the emulator layers. SR agrees in
  distribution only (docs/nvfp4.md section 4), and ``verify_te`` checks that.
- GEMM accumulation order differs (tensor cores vs an fp32 matmul of dequantized operands): the
  quantized operands are bit-identical, the GEMM outputs agree to fp32 rounding before the bf16
  output cast.
- Token counts that are not multiples of 16 are zero-padded by ``TELinear`` (TE refuses them;
  zero rows change neither an amax nor a GEMM), as the emulator does (docs/nvfp4.md section 5).

Refusals
--------
Every refusal is a ``TEUnavailable`` (a ValueError) with a message that says what to do; the
CLI prints it and exits non-zero without a traceback. Each decision is a pure function of plain
inputs so that it is tested on machines without TE: ``check_te_version``, ``check_cuda``,
``check_env``, ``check_precision``, ``check_linear_shapes``; ``check_te_available`` gathers the
real facts and calls them, and ``preflight(recipe, dtype)`` runs every check that needs no model
(call it before a run writes anything).
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.metadata
import importlib.util
import inspect
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch

from nvfp4bench.quant.formats import Format, get_format
from nvfp4bench.quant.recipes import Recipe

# The block-scale arithmetic of docs/nvfp4.md section 2 (TE 2.8-2.13 round differently).
TE_MIN_VERSION = (2, 14)
MIN_CAPABILITY = (10, 0)  # Blackwell: NVFP4 tensor cores
BLOCK = 16  # TE's NVFP4 quantizer needs both GEMM dimensions to be multiples of 16
INSTALL_HINT = "pip install -r requirements-te.txt (transformer-engine[pytorch]>=2.14)"
# Environment variables that change TE's NVFP4 numerics and that a recipe kwarg cannot override.
FAST_MATH_ENV = "NVTE_USE_FAST_MATH"
# NVFP4BlockScaling fields read from NVTE_* environment variables at construction; pinned to the
# values of docs/nvfp4.md whenever the installed TE has them: the environment cannot change a run.
PINNED_FIELDS: dict[str, Any] = {"nvfp4_4over6": "none", "row_scaled_activation": False}
# The formats the te backend runs, and the TE recipe class of each.
TE_RECIPE_CLASSES = {"nvfp4": "NVFP4BlockScaling", "nvfp4_4over6": "NVFP4BlockScaling",
                     "nvfp4_4over6_mse": "NVFP4BlockScaling", "mxfp8_te": "MXFP8BlockScaling"}
_TE_DISTRIBUTIONS = ("transformer_engine", "transformer-engine", "transformer_engine_torch")


class TEUnavailable(ValueError):
    """Transformer Engine cannot run this request here; the message says why and what to do.

    A ValueError (a request this machine or TE cannot serve), so a CLI that reports bad input
    cleanly reports it too."""


@dataclasses.dataclass(frozen=True)
class TEInfo:
    """What ``check_te_available`` found: for the result JSON's ``env``."""

    version: str
    device: str
    capability: tuple[int, int]


# --------------------------------------------------------------------------------------------
# Recipe mapping (pure)
# --------------------------------------------------------------------------------------------
def te_recipe_kwargs(recipe: Recipe, format: Format | None = None) -> dict[str, Any] | None:
    """Keyword arguments of ``te_recipe_class(format)`` for ``recipe`` in ``format`` (default
    nvfp4; module docstring), after ``check_te_format``'s refusals.

    Returns None for a baseline (``quantized=False``: no layer is swapped, no TE recipe needed).
    """
    if not recipe.quantized:
        return None
    format = get_format(format)
    check_te_format(format, recipe)
    if format.scale == "e8m0":
        return {"fp8_format": "E4M3", "backward_override": recipe.backward_override,
                "enable_2d_quantization": not recipe.disable_2d_quantization}
    kwargs = {
        "disable_rht": recipe.disable_rht,
        "disable_stochastic_rounding": recipe.disable_stochastic_rounding,
        "disable_2d_quantization": recipe.disable_2d_quantization,
        "backward_override": recipe.backward_override,
    }
    if format.four_over_six is not None:
        kwargs.update(disable_rht=True, nvfp4_4over6="all",
                      nvfp4_4over6_e4m3_use_256="all" if format.e4m3_bound == 256 else "none",
                      nvfp4_4over6_err_mode=format.four_over_six.upper())
    return kwargs


def te_recipe_class(format: Format | None = None) -> str:
    """The name of the ``transformer_engine.common.recipe`` class for ``format``."""
    format = get_format(format)
    check_te_format(format)
    return TE_RECIPE_CLASSES[format.name]


def te_constructor_kwargs(kwargs: Mapping[str, Any], available: Iterable[str]) -> dict[str, Any]:
    """The kwargs to pass to the installed TE recipe class, whose fields are ``available``.

    Adds ``PINNED_FIELDS`` the installed TE has and ``kwargs`` does not set (they default to
    NVTE_* environment variables); a field ``kwargs`` sets that TE lacks is refused (a TE without
    four over six cannot run ``nvfp4_4over6``).
    ``backward_override`` is always passed when TE has it (its default reads
    NVTE_BACKWARD_OVERRIDE); a TE without it can run only recipes with backward_override None.
    """
    available = set(available)
    out = {k: v for k, v in kwargs.items() if k != "backward_override"}
    missing = sorted(k for k in out if k not in available)
    if missing:
        raise TEUnavailable(f"the installed Transformer Engine's recipe lacks "
                            f"{', '.join(missing)}; {INSTALL_HINT}")
    override = kwargs.get("backward_override")
    if "backward_override" in available:
        out["backward_override"] = override
    elif override is not None:
        raise TEUnavailable(f"the installed Transformer Engine's recipe has no "
                            f"backward_override (needed for backward_override={override!r}); "
                            f"{INSTALL_HINT}")
    out.update({k: v for k, v in PINNED_FIELDS.items() if k in available and k not in out})
    return out


# --------------------------------------------------------------------------------------------
# Refusal checks (pure)
# --------------------------------------------------------------------------------------------
def parse_version(version: str) -> tuple[int, ...]:
    """Leading numeric components of a version string: '2.14.0.dev0+abc' -> (2, 14, 0)."""
    match = re.match(r"^\s*v?(\d+(?:\.\d+)*)", version)
    if not match:
        raise ValueError(f"cannot parse version {version!r}")
    return tuple(int(p) for p in match.group(1).split("."))


def check_te_version(version: str | None) -> None:
    """Refuse a missing, unparsable or too old TE (2.8-2.13 compute block scales differently)."""
    if version is None:
        raise TEUnavailable(f"Transformer Engine is not installed; the te backend needs it "
                            f"({INSTALL_HINT}), or use --backend emulator")
    try:
        parsed = parse_version(version)
    except ValueError:
        raise TEUnavailable(f"cannot read the Transformer Engine version {version!r}; "
                            f"{INSTALL_HINT}") from None
    if parsed[:2] < TE_MIN_VERSION:
        floor = ".".join(map(str, TE_MIN_VERSION))
        raise TEUnavailable(f"Transformer Engine {version} is older than {floor}: before {floor} "
                            f"its NVFP4 block scales round differently from docs/nvfp4.md "
                            f"(bamax/6*S_enc instead of bamax*(S_enc/6)); {INSTALL_HINT}")


def check_cuda(cuda_available: bool, capability: tuple[int, int] | None) -> None:
    """Refuse without CUDA, or on a GPU without NVFP4 tensor cores (capability < 10.0)."""
    if not cuda_available:
        raise TEUnavailable("the te backend needs a CUDA GPU (Blackwell, compute capability "
                            ">= 10.0) and none is available; use --backend emulator")
    if capability is None or tuple(capability) < MIN_CAPABILITY:
        cap = "unknown" if capability is None else f"{capability[0]}.{capability[1]}"
        raise TEUnavailable(f"the te backend needs a Blackwell GPU (compute capability >= "
                            f"{MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]}, NVFP4 tensor cores); this "
                            f"GPU has {cap}; use --backend emulator")


def check_env(env: Mapping[str, str]) -> None:
    """Refuse NVTE_USE_FAST_MATH: TE's fast-math NVFP4 kernels skip the exact rounding order."""
    value = env.get(FAST_MATH_ENV, "")
    if value.strip().lower() not in ("", "0", "false", "off", "no"):
        raise TEUnavailable(f"{FAST_MATH_ENV}={value} is set: TE's fast-math NVFP4 kernels do "
                            f"not follow docs/nvfp4.md's rounding order; unset it "
                            f"(or set {FAST_MATH_ENV}=0) to use the te backend")


def check_device(device: torch.device) -> None:
    """Refuse a run on anything but a CUDA device (TE's NVFP4 kernels are CUDA only)."""
    if torch.device(device).type != "cuda":
        raise TEUnavailable(f"the te backend runs on a CUDA GPU; the run's device is {device}: "
                            f"use --device cuda, or --backend emulator")


def check_precision(dtype: torch.dtype | None) -> None:
    """Refuse a compute dtype other than bf16: TE's RHT kernels take bf16 activations only, and
    docs/nvfp4.md's RHT rounds to bf16."""
    if dtype != torch.bfloat16:
        raise TEUnavailable(f"the te backend computes in bf16 (TE's NVFP4 RHT kernels take bf16 "
                            f"input); compute dtype {dtype} is not supported: use "
                            f"--precision bf16 (or auto), or --backend emulator")


def check_linear_shapes(shapes: Mapping[str, tuple[int, int]], block: int = BLOCK) -> None:
    """Refuse linear layers whose (in_features, out_features) are not multiples of ``block``
    (the format's block: 16 for NVFP4, 32 for MXFP8)."""
    bad = [f"{name!r} (in_features={i}, out_features={o})" for name, (i, o) in shapes.items()
           if i % block or o % block]
    if bad:
        raise TEUnavailable(f"TE's block scaling needs in_features and out_features to be "
                            f"multiples of {block}; these layers are not: {', '.join(bad)}. Use "
                            f"--backend emulator, or widths that are multiples of {block}")


# --------------------------------------------------------------------------------------------
# Gathering the real facts
# --------------------------------------------------------------------------------------------
def te_version() -> str | None:
    """The installed TE version, or None when TE is not installed. Does not import TE."""
    if importlib.util.find_spec("transformer_engine") is None:
        return None
    for dist in _TE_DISTRIBUTIONS:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "unknown"


def import_te_pytorch():
    """``transformer_engine.pytorch``, or TEUnavailable when it fails to import."""
    try:
        return importlib.import_module("transformer_engine.pytorch")
    except Exception as exc:  # a broken install raises anything (ImportError, OSError, ...)
        raise TEUnavailable(f"Transformer Engine is installed but fails to import "
                            f"({type(exc).__name__}: {exc}); {INSTALL_HINT}") from None


def check_te_available(env: Mapping[str, str] | None = None) -> TEInfo:
    """Gather the facts (TE version, CUDA, capability, environment) and refuse or return them."""
    version = te_version()
    check_te_version(version)
    cuda = torch.cuda.is_available()
    capability = tuple(torch.cuda.get_device_capability()) if cuda else None
    check_cuda(cuda, capability)
    check_env(os.environ if env is None else env)
    te = import_te_pytorch()
    available, reason = te.is_nvfp4_available(return_reason=True)
    if not available:
        raise TEUnavailable(f"Transformer Engine reports NVFP4 unavailable: {reason}")
    return TEInfo(version=str(version), device=torch.cuda.get_device_name(),
                  capability=(int(capability[0]), int(capability[1])))


def check_te_format(format: Format, recipe: Recipe | None = None) -> None:
    """Refuse a format TE has no recipe for, or a recipe TE cannot run in it (module
    docstring); ``recipe`` None checks the format alone."""
    name = format.name
    if name not in TE_RECIPE_CLASSES:
        hint = ("TE's MXFP8 computes its E8M0 scales by the te rule: use --format mxfp8_te, or "
                if format.scale == "e8m0" and format.element.name == "e4m3" else "")
        raise TEUnavailable(f"Transformer Engine has no recipe for the {name} format; {hint}use "
                            f"--backend emulator for --format {name}")
    if recipe is None or name == "nvfp4":
        return
    gradients_quantized = recipe.backward_override is None
    if format.four_over_six is not None and gradients_quantized:
        raise TEUnavailable(f"TE applies four over six to activations and weights only, but "
                            f"{recipe.name} quantizes gradients too (in {name}, as nvfp4bench "
                            f"defines it); on --backend te, {name} runs the recipes without "
                            f"quantized gradients (fwd_only, chain_rule, fwd_rht); use --backend "
                            f"emulator for {recipe.name}")
    if format.scale == "e8m0" and gradients_quantized and not (
            recipe.disable_rht and recipe.disable_stochastic_rounding):
        raise TEUnavailable(f"TE's MXFP8BlockScaling has no RHT and no stochastic rounding, "
                            f"which {recipe.name} uses on its gradients; use --backend emulator "
                            f"for {recipe.name} in {name}")


def preflight(recipe: Recipe, dtype: torch.dtype | None = torch.bfloat16,
              device: torch.device | str = "cuda", format: Format | None = None) -> TEInfo | None:
    """Every refusal that does not need the model, before a run starts (call it before building
    or writing anything): the recipe and format, the compute dtype, the device, TE, CUDA, the
    GPU and the environment (the device before the dtype). None for a baseline (which runs in
    plain PyTorch and needs no TE)."""
    if te_recipe_kwargs(recipe, format) is None:
        return None
    check_device(device)  # first: on a machine without a GPU, the precision is beside the point
    check_precision(dtype)
    info = check_te_available()
    make_te_recipe(recipe, format)  # a TE without a field the recipe needs (4over6) is refused
    return info


def _recipe_fields(cls) -> set[str]:
    if dataclasses.is_dataclass(cls):
        return {f.name for f in dataclasses.fields(cls)}
    return set(inspect.signature(cls).parameters)


def make_te_recipe(recipe: Recipe, format: Format | None = None):
    """The TE recipe object (``NVFP4BlockScaling`` or ``MXFP8BlockScaling``) for ``recipe`` in
    ``format`` (None for a baseline)."""
    kwargs = te_recipe_kwargs(recipe, format)
    if kwargs is None:
        return None
    check_te_version(te_version())
    class_name = te_recipe_class(format)
    try:
        te_recipes = importlib.import_module("transformer_engine.common.recipe")  # TE: optional
        cls = getattr(te_recipes, class_name)
    except Exception as exc:
        raise TEUnavailable(f"cannot import transformer_engine.common.recipe.{class_name} "
                            f"({type(exc).__name__}: {exc}); {INSTALL_HINT}") from None
    if "fp8_format" in kwargs:
        kwargs = {**kwargs, "fp8_format": getattr(te_recipes.Format, kwargs["fp8_format"])}
    return cls(**te_constructor_kwargs(kwargs, _recipe_fields(cls)))


def _te_autocast(te, te_recipe):
    """``te.autocast(recipe=...)`` (TE >= 2.8 name), else the older ``te.fp8_autocast``."""
    if hasattr(te, "autocast"):
        return te.autocast(enabled=True, recipe=te_recipe)
    return te.fp8_autocast(enabled=True, fp8_recipe=te_recipe)


@contextlib.contextmanager
def autocast(recipe: Recipe, *, dtype: torch.dtype | None = torch.bfloat16,
             device_type: str = "cuda", format: Format | None = None) -> Iterator[None]:
    """The context the train loop runs a te-backend model's forward in.

    ``torch.autocast(device_type, dtype)`` (skipped for ``dtype`` None or fp32: baselines only) and,
    for a quantized recipe, ``te.autocast(recipe=make_te_recipe(recipe, format))`` (quantized
    recipes need ``dtype`` bf16). The forward must run inside it; the backward may
    run after the block (TE stores the recipe with the forward's saved tensors, and TE's own
    examples call ``loss.backward()`` outside ``te.autocast``).
    """
    te_recipe = make_te_recipe(recipe, format)
    if te_recipe is not None:
        check_precision(dtype)
    with contextlib.ExitStack() as stack:
        if dtype is not None and dtype != torch.float32:
            stack.enter_context(torch.autocast(device_type, dtype=dtype))
        if te_recipe is not None:
            stack.enter_context(_te_autocast(import_te_pytorch(), te_recipe))
        yield
