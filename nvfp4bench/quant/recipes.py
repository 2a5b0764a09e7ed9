"""The registry of QAT recipes: which GEMM operands are NVFP4, and how.

A recipe is a set of switches named like Transformer Engine's
``NVFP4BlockScaling(disable_rht=..., disable_stochastic_rounding=...,
disable_2d_quantization=..., backward_override=...)``, plus whether anything is quantized at all.
Every linear layer runs three GEMMs (docs/nvfp4.md section 3)::

    fprop  Y  = X  @ W^T     X rowwise 1x16, W 1x16 or 16x16 tiles, RN
    dgrad  dX = dY @ W       what the backward uses is set by ``backward_override``
    wgrad  dW = dY^T @ X     RHT on both operands when ``disable_rht`` is False

``backward_override`` picks what the backward GEMMs multiply:

- ``None``: quantized gradients. dY is quantized (SR when ``disable_stochastic_rounding`` is
  False); W^T is the forward's 16x16 copy transposed (2-D) or a fresh 1x16 copy along N (1-D);
  X^T is a fresh columnwise copy of the high-precision X.
- ``"dequantized"``: the chain rule through the fake-quantized forward. dY stays in high
  precision; dgrad uses the forward's dequantized W, wgrad the forward's dequantized X.
- ``"high_precision"``: the original high-precision W and X (a straight-through estimator).

The study's code sets, per recipe id: ``forward_only = id in [2, 7]``, ``chain_rule = id == 3``,
2-D weights and RHT for 4, 5 and 7, SR for 5 and 6. So ``fwd_rht`` [7] is ``fwd_only`` [2] with
16x16 weight tiles in the forward: its backward is the high-precision dX = dY W, dW = dY^T X
(``backward_override="high_precision"``), and it quantizes no gradient. Its RHT flag is on, as
the study sets it, but the RHT acts on quantized wgrad operands only: rotating two unquantized
operands by the same orthogonal R changes nothing, dY^T R (X^T R)^T = dY^T R R^T X = dY^T X
(R R^T = I), so in any recipe with a ``backward_override`` the RHT flag is a no-op (in the
emulator and in TE alike, neither of which rotates there).

Switch combinations that would be silently ignored are refused: SR with a backward that does not
quantize gradients, and any switch on a baseline.
"""
from __future__ import annotations

from dataclasses import dataclass

BACKWARD_OVERRIDES = (None, "dequantized", "high_precision")
COMPUTE_DTYPES = (None, "bf16", "fp16", "fp32")


@dataclass(frozen=True)
class Recipe:
    """One QAT recipe. Field names follow TE's ``NVFP4BlockScaling`` switches."""

    name: str
    study_id: int | None  # the id in the study's tables; None for recipes it did not run
    description: str
    quantized: bool = True  # False: a high-precision baseline, no layer is swapped
    backward_override: str | None = None
    disable_2d_quantization: bool = True
    disable_rht: bool = True
    disable_stochastic_rounding: bool = True
    # High-precision compute dtype of a baseline; None: the run's own (``--precision``).
    compute_dtype: str | None = None

    def __post_init__(self) -> None:
        if self.backward_override not in BACKWARD_OVERRIDES:
            raise ValueError(f"recipe {self.name!r}: backward_override must be one of "
                             f"{BACKWARD_OVERRIDES}, got {self.backward_override!r}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"recipe {self.name!r}: compute_dtype must be one of "
                             f"{COMPUTE_DTYPES}, got {self.compute_dtype!r}")
        switches = (self.backward_override is not None or not self.disable_2d_quantization
                    or not self.disable_rht or not self.disable_stochastic_rounding)
        if not self.quantized and switches:
            raise ValueError(f"recipe {self.name!r}: a baseline (quantized=False) takes no NVFP4 "
                             f"switches")
        if self.backward_override is not None and not self.disable_stochastic_rounding:
            raise ValueError(f"recipe {self.name!r}: stochastic rounding applies to quantized "
                             f"gradients only; backward_override={self.backward_override!r} "
                             f"keeps them in high precision")

    @property
    def quantizes_gradients(self) -> bool:
        """True when dgrad and wgrad run on NVFP4 gradients (the study's recipes 1, 4, 5, 6)."""
        return self.quantized and self.backward_override is None

    @property
    def weight_tile(self) -> tuple[int, int]:
        """Block shape of the weight's quantization: 1x16 along K, or 16x16 tiles."""
        return (1, 16) if self.disable_2d_quantization else (16, 16)

    @property
    def rht(self) -> bool:
        """The RHT flag; it rotates quantized wgrad operands only (a no-op with an override)."""
        return self.quantized and not self.disable_rht

    @property
    def stochastic_rounding(self) -> bool:
        return self.quantizes_gradients and not self.disable_stochastic_rounding


def _baseline(name: str, dtype: str | None, description: str, study_id: int | None) -> Recipe:
    return Recipe(name, study_id, description, quantized=False, compute_dtype=dtype)


RECIPES: dict[str, Recipe] = {r.name: r for r in (
    # The study's baseline [0] runs in the run's own high precision (--precision), so its name
    # claims none; fp16 and fp32 are extras that pin one.
    _baseline("baseline", None, "no NVFP4, in the run's high precision (--precision: fp32 on "
              "the CPU, the run's autocast on CUDA)", 0),
    _baseline("fp16", "fp16", "baseline, no NVFP4, fp16 autocast (an extra)", None),
    _baseline("fp32", "fp32", "baseline, no NVFP4, fp32 (an extra)", None),
    Recipe("nvfp4_full", 1, "NVFP4 fwd + bwd, quantized gradients, 1-D weights, RN, no RHT"),
    Recipe("fwd_only", 2, "NVFP4 fwd; bwd on the original high-precision operands (STE)",
           backward_override="high_precision"),
    Recipe("chain_rule", 3, "NVFP4 fwd; bwd on the forward's dequantized operands",
           backward_override="dequantized"),
    Recipe("2d_rht", 4, "NVFP4 fwd + bwd, 16x16 weight tiles, RHT on wgrad, RN",
           disable_2d_quantization=False, disable_rht=False),
    Recipe("2d_rht_sr", 5, "NVFP4 fwd + bwd, 16x16 weights, RHT on wgrad, SR on gradients "
           "(TE's default)",
           disable_2d_quantization=False, disable_rht=False, disable_stochastic_rounding=False),
    Recipe("sr_only", 6, "NVFP4 fwd + bwd, quantized gradients with SR, 1-D weights, no RHT",
           disable_stochastic_rounding=False),
    # RHT on as the study sets it; with unquantized wgrad operands it cancels (R R^T = I)
    Recipe("fwd_rht", 7, "NVFP4 fwd with 16x16 weights; bwd on the original high-precision "
           "operands, as fwd_only (its RHT cancels)", backward_override="high_precision",
           disable_2d_quantization=False, disable_rht=False),
)}

# The eight recipes of the study, in its order: the grid's default.
STUDY_RECIPES: tuple[str, ...] = tuple(
    name for name, r in sorted(RECIPES.items(), key=lambda kv: (kv[1].study_id is None,
                                                                 kv[1].study_id or 0))
    if r.study_id is not None)


def get_recipe(name: str) -> Recipe:
    """The recipe called ``name``; a ValueError listing the valid names otherwise."""
    try:
        return RECIPES[name]
    except KeyError:
        raise ValueError(f"unknown recipe {name!r}; choose one of: {', '.join(RECIPES)}") from None
