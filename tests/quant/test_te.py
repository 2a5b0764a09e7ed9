"""The Transformer Engine backend and verify_te, on machines without TE (CPU only).

What runs here: the recipe -> NVFP4BlockScaling mapping for every recipe, every refusal (TE
absent for real; version, CUDA, capability, environment and shapes through the pure checks),
and verify_te's comparison logic with the emulator on both sides (identical -> pass, exit 0;
perturbed -> fail, exit 1), plus ``python -m nvfp4bench.verify_te`` refusing cleanly.
"""
from __future__ import annotations

import copy
import dataclasses
import importlib.util
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from nvfp4bench.checks import te_cases
from nvfp4bench.checks import verify_te as v
from nvfp4bench.quant import nvfp4
from nvfp4bench.quant.formats import FORMATS
from nvfp4bench.quant.recipes import RECIPES, get_recipe
from nvfp4bench.quant.swap import BACKENDS, quantize_model
from nvfp4bench.quant.te import linear as te_linear
from nvfp4bench.quant.te import runtime as te_backend
from nvfp4bench.quant.te.runtime import TEUnavailable

REPO = Path(__file__).resolve().parents[2]
TE_INSTALLED = importlib.util.find_spec("transformer_engine") is not None
needs_no_te = pytest.mark.skipif(TE_INSTALLED, reason="TE is installed here: the absent-TE path "
                                                      "cannot be exercised")


def _te_nvfp4_unavailable_reason() -> str | None:
    try:
        te_backend.check_te_available()
    except TEUnavailable as refusal:
        return str(refusal)
    return None


def test_verify_te_passes_against_real_transformer_engine():
    """Where TE imports and reports NVFP4 support (a Blackwell GPU): the emulator equals TE."""
    reason = _te_nvfp4_unavailable_reason()
    if reason is not None:
        pytest.skip(f"Transformer Engine with NVFP4 support is not available here: {reason}")
    assert v.main([]) == 0


# --------------------------------------------------------------------------------------------
# Recipe mapping
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(RECIPES))
def test_recipe_mapping_every_recipe(name):
    recipe = get_recipe(name)
    if not recipe.quantized:
        assert te_backend.te_recipe_kwargs(recipe) is None
        return
    kwargs = te_backend.te_recipe_kwargs(recipe)
    assert kwargs == {"disable_rht": recipe.disable_rht,
                      "disable_stochastic_rounding": recipe.disable_stochastic_rounding,
                      "disable_2d_quantization": recipe.disable_2d_quantization,
                      "backward_override": recipe.backward_override}


def test_recipe_mapping_known_answers():
    full = te_backend.te_recipe_kwargs(get_recipe("nvfp4_full"))
    assert full == {"disable_rht": True, "disable_stochastic_rounding": True,
                    "disable_2d_quantization": True, "backward_override": None}
    default = te_backend.te_recipe_kwargs(get_recipe("2d_rht_sr"))  # TE's default recipe
    assert default == {"disable_rht": False, "disable_stochastic_rounding": False,
                       "disable_2d_quantization": False, "backward_override": None}
    assert te_backend.te_recipe_kwargs(get_recipe("chain_rule"))["backward_override"] == \
        "dequantized"
    assert te_backend.te_recipe_kwargs(get_recipe("fwd_only"))["backward_override"] == \
        "high_precision"
    # recipe 7: the high-precision backward override with 2-D weights (its RHT flag cancels)
    assert te_backend.te_recipe_kwargs(get_recipe("fwd_rht")) == {
        "disable_rht": False, "disable_stochastic_rounding": True,
        "disable_2d_quantization": False, "backward_override": "high_precision"}


def test_constructor_kwargs_pin_environment_defaults():
    kwargs = te_backend.te_recipe_kwargs(get_recipe("nvfp4_full"))
    fields = set(kwargs) | {"nvfp4_4over6", "row_scaled_activation", "fp8_dpa"}
    out = te_backend.te_constructor_kwargs(kwargs, fields)
    # backward_override None is passed explicitly (its default reads NVTE_BACKWARD_OVERRIDE)
    assert out["backward_override"] is None
    assert out["nvfp4_4over6"] == "none" and out["row_scaled_activation"] is False
    older = te_backend.te_constructor_kwargs(kwargs, set(kwargs) - {"backward_override"})
    assert "backward_override" not in older and "nvfp4_4over6" not in older
    chain = te_backend.te_recipe_kwargs(get_recipe("chain_rule"))
    with pytest.raises(TEUnavailable, match="backward_override"):
        te_backend.te_constructor_kwargs(chain, set(chain) - {"backward_override"})
    with pytest.raises(TEUnavailable, match="disable_2d_quantization"):
        te_backend.te_constructor_kwargs(kwargs, {"disable_rht", "disable_stochastic_rounding"})


# --------------------------------------------------------------------------------------------
# Refusals
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, parsed", [("2.14.0", (2, 14, 0)), ("2.15.0.dev0+abc1", (2, 15, 0)),
                                          ("v3.1", (3, 1)), ("2.9", (2, 9))])
def test_parse_version(text, parsed):
    assert te_backend.parse_version(text) == parsed


# --------------------------------------------------------------------------------------------
# Formats on TE
# --------------------------------------------------------------------------------------------
NO_GRADIENT_RECIPES = ("fwd_only", "chain_rule", "fwd_rht")
MXFP8_HINT = "TE's MXFP8 computes its E8M0 scales by the te rule: use --format mxfp8_te, or "


@pytest.mark.parametrize("name, mode, tensors_256", [("nvfp4_4over6", "MAE", "all"),
                                                     ("nvfp4_4over6_mse", "MSE", "all")])
def test_four_over_six_maps_onto_nvfp4_block_scaling_for_recipes_without_quantized_gradients(
        name, mode, tensors_256):
    for recipe_name in NO_GRADIENT_RECIPES:
        recipe = get_recipe(recipe_name)
        assert te_backend.te_recipe_kwargs(recipe, FORMATS[name]) == {
            "disable_rht": True, "disable_stochastic_rounding": recipe.disable_stochastic_rounding,
            "disable_2d_quantization": recipe.disable_2d_quantization,
            "backward_override": recipe.backward_override, "nvfp4_4over6": "all",
            "nvfp4_4over6_e4m3_use_256": tensors_256, "nvfp4_4over6_err_mode": mode}
    assert te_backend.te_recipe_class(FORMATS[name]) == "NVFP4BlockScaling"
    bound_448 = dataclasses.replace(FORMATS[name], name="nvfp4_4over6", e4m3_bound=448.0)
    kwargs = te_backend.te_recipe_kwargs(get_recipe("fwd_only"), bound_448)
    assert kwargs["nvfp4_4over6_e4m3_use_256"] == "none"
    # the pinned "none" does not override the format's choice; a TE without 4over6 is refused
    out = te_backend.te_constructor_kwargs(kwargs, set(kwargs) | {"row_scaled_activation"})
    assert out["nvfp4_4over6"] == "all" and out["row_scaled_activation"] is False
    with pytest.raises(TEUnavailable, match="lacks nvfp4_4over6"):
        te_backend.te_constructor_kwargs(kwargs, set(kwargs) - {"nvfp4_4over6",
                                                                "nvfp4_4over6_err_mode",
                                                                "nvfp4_4over6_e4m3_use_256"})


@pytest.mark.parametrize("recipe_name", ["nvfp4_full", "2d_rht", "2d_rht_sr", "sr_only"])
def test_four_over_six_with_quantized_gradients_is_refused_on_te(recipe_name):
    with pytest.raises(TEUnavailable, match=f"four over six to activations and weights only, "
                                            f"but {recipe_name} quantizes gradients too"):
        te_backend.te_recipe_kwargs(get_recipe(recipe_name), FORMATS["nvfp4_4over6"])


def test_mxfp8_te_maps_onto_mxfp8_block_scaling():
    expected = {"nvfp4_full": (None, False), "fwd_only": ("high_precision", False),
                "chain_rule": ("dequantized", False), "fwd_rht": ("high_precision", True)}
    for recipe_name, (override, two_d) in expected.items():
        assert te_backend.te_recipe_kwargs(get_recipe(recipe_name), FORMATS["mxfp8_te"]) == {
            "fp8_format": "E4M3", "backward_override": override,
            "enable_2d_quantization": two_d}
    assert te_backend.te_recipe_class(FORMATS["mxfp8_te"]) == "MXFP8BlockScaling"
    for recipe_name in ("2d_rht", "2d_rht_sr", "sr_only"):
        with pytest.raises(TEUnavailable, match=f"no RHT and no stochastic rounding, which "
                                                f"{recipe_name} uses on its gradients"):
            te_backend.te_recipe_kwargs(get_recipe(recipe_name), FORMATS["mxfp8_te"])


@pytest.mark.parametrize("name, hint", [("mxfp4", ""), ("mxfp4_rceil", ""),
                                        ("mxfp8", MXFP8_HINT), ("mxfp8_rceil", MXFP8_HINT)])
def test_formats_te_has_no_recipe_for_are_refused_before_anything_else(name, hint):
    from nvfp4bench.quant.backends import get_backend
    te = get_backend("te")
    message = (f"Transformer Engine has no recipe for the {name} format; {hint}use --backend "
               f"emulator for --format {name}")
    with pytest.raises(TEUnavailable, match=re.escape(message)):
        te.preflight(get_recipe("nvfp4_full"), torch.device("cpu"), None, FORMATS[name])
    assert te.preflight(get_recipe("baseline"), torch.device("cpu"), None,
                        FORMATS[name]) is None  # a baseline quantizes nothing


def test_te_formats_reach_the_device_check_and_mx_linears_need_multiples_of_32():
    from nvfp4bench.quant.backends import get_backend
    for name, recipe in (("mxfp8_te", "nvfp4_full"), ("nvfp4_4over6", "fwd_only")):
        with pytest.raises(TEUnavailable, match="runs on a CUDA GPU"):
            get_backend("te").preflight(get_recipe(recipe), torch.device("cpu"), None,
                                        FORMATS[name])
    te_backend.check_linear_shapes({"fc": (64, 96)}, 32)
    with pytest.raises(TEUnavailable, match="multiples of 32; these layers are not: 'fc' "
                                            r"\(in_features=48, out_features=96\)"):
        te_backend.check_linear_shapes({"fc": (48, 96)}, 32)


def test_version_refusals():
    with pytest.raises(TEUnavailable, match="not installed"):
        te_backend.check_te_version(None)
    with pytest.raises(TEUnavailable, match="2.14"):
        te_backend.check_te_version("2.13.1")
    with pytest.raises(TEUnavailable, match="2.14"):
        te_backend.check_te_version("1.99")
    with pytest.raises(TEUnavailable, match="cannot read"):
        te_backend.check_te_version("unknown")
    for ok in ("2.14.0", "2.14.0rc1", "2.17.0+cu13", "3.0"):
        te_backend.check_te_version(ok)


def test_cuda_and_capability_refusals():
    with pytest.raises(TEUnavailable, match="CUDA"):
        te_backend.check_cuda(False, None)
    with pytest.raises(TEUnavailable, match="9.0"):
        te_backend.check_cuda(True, (9, 0))  # Hopper: no NVFP4 tensor cores
    with pytest.raises(TEUnavailable, match="8.9"):
        te_backend.check_cuda(True, (8, 9))
    te_backend.check_cuda(True, (10, 0))
    te_backend.check_cuda(True, (12, 0))


def test_fast_math_refusal():
    with pytest.raises(TEUnavailable, match="NVTE_USE_FAST_MATH"):
        te_backend.check_env({"NVTE_USE_FAST_MATH": "1"})
    for ok in ({}, {"NVTE_USE_FAST_MATH": "0"}, {"NVTE_USE_FAST_MATH": ""},
               {"NVTE_NVFP4_DISABLE_RHT": "1"}):
        te_backend.check_env(ok)


def test_shape_refusal_names_the_layer():
    te_backend.check_linear_shapes({"blocks.0.mlp.fc1": (64, 192)})
    with pytest.raises(TEUnavailable, match=r"'blocks\.3\.attn\.qkv'.*in_features=40"):
        te_backend.check_linear_shapes({"ok": (64, 64), "blocks.3.attn.qkv": (40, 120)})
    with pytest.raises(TEUnavailable, match="out_features=24"):
        te_backend.check_linear_shapes({"head": (64, 24)})


def test_precision_refusal_and_preflight_order():
    assert issubclass(TEUnavailable, ValueError)  # the CLI reports bad input cleanly
    te_backend.check_precision(torch.bfloat16)
    for dtype in (torch.float16, torch.float32, None):
        with pytest.raises(TEUnavailable, match="bf16"):
            te_backend.check_precision(dtype)
    assert te_backend.preflight(get_recipe("fp32"), None) is None  # baselines need no TE
    with pytest.raises(TEUnavailable, match="bf16"):  # checked before looking for TE
        te_backend.preflight(get_recipe("nvfp4_full"), torch.float16)
    with pytest.raises(TEUnavailable, match="CUDA GPU"):  # the device before the dtype
        te_backend.preflight(get_recipe("nvfp4_full"), torch.float16, "cpu")


@needs_no_te
def test_te_absent_for_real():
    assert te_backend.te_version() is None
    with pytest.raises(TEUnavailable, match="not installed"):
        te_backend.check_te_available()
    with pytest.raises(TEUnavailable, match="not installed"):
        te_backend.make_te_recipe(get_recipe("nvfp4_full"))
    with pytest.raises(TEUnavailable, match="not installed"):
        with te_backend.autocast(get_recipe("2d_rht_sr"), dtype=None):
            pass


def test_backend_registry():
    assert set(BACKENDS) == {"emulator", "te"}
    with pytest.raises(ValueError, match="emulator, te"):
        quantize_model(_TwoLinears(), "nvfp4_full", backend="cuda")


class _TwoLinears(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(32, 64), nn.Linear(64, 16)


def test_quantize_model_baseline_and_refusals_leave_model_untouched():
    model = _TwoLinears()
    assert te_linear.swap(model, get_recipe("baseline"), ["fc1", "fc2"]) == {}
    assert type(model.fc1) is nn.Linear
    assert type(model.fc1) is nn.Linear and type(model.fc2) is nn.Linear


@needs_no_te
def test_quantize_model_refuses_without_te():
    model = _TwoLinears()
    weight = model.fc1.weight
    with pytest.raises(TEUnavailable, match="not installed"):
        te_linear.swap(model, get_recipe("nvfp4_full"), ["fc1", "fc2"])
    assert type(model.fc1) is nn.Linear and model.fc1.weight is weight
    assert not hasattr(model, "layer_backends")
    with pytest.raises(TEUnavailable, match="not installed"):
        te_backend.preflight(get_recipe("2d_rht_sr"))


@needs_no_te
def test_models_registry_hands_te_its_layer_names():
    from nvfp4bench import models
    from nvfp4bench.quant import swap
    model = models.build_model("vit", "tiny", image_size=32)
    names = swap.quantizable_layers(model)
    assert names and all(isinstance(model.get_submodule(n), nn.Linear) for n in names)
    with pytest.raises(TEUnavailable, match="not installed"):
        swap.quantize_model(model, "nvfp4_full", backend="te")
    assert all(type(model.get_submodule(n)) is nn.Linear for n in names)
    base = swap.quantize_model(models.build_model("vit", "tiny", image_size=32), "baseline",
                               backend="te")
    assert base.quantized_layers == []


@needs_no_te
def test_verify_te_module_refuses_cleanly_and_imports_no_te():
    # one interpreter (torch imports are slow): importing the backend and verify_te must not
    # import TE; then `python -m nvfp4bench.verify_te` must refuse with exit 2, no traceback
    code = ("import runpy, sys, nvfp4bench.quant.te.runtime, nvfp4bench.verify_te\n"
            "assert not any(m.startswith('transformer_engine') for m in sys.modules)\n"
            "sys.argv = ['verify_te']\n"
            "runpy.run_module('nvfp4bench.verify_te', run_name='__main__')\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "verify_te: Transformer Engine is not installed" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


# --------------------------------------------------------------------------------------------
# The swap plumbing, with a stand-in for te.Linear (TE itself cannot run here)
# --------------------------------------------------------------------------------------------
class _StandInTELinear(nn.Linear):
    """What the swap relies on from te.Linear: the constructor, Parameters named weight/bias
    (TE sets attributes on them), a forward that sees 2-D (M, K) inputs."""

    seen: list = []

    def __init__(self, in_features, out_features, bias=True, params_dtype=None, device=None):
        super().__init__(in_features, out_features, bias=bias, dtype=params_dtype)
        self.weight.partition_dim = 1  # like TE's tensor-parallel attributes

    def forward(self, x):
        assert x.dim() == 2 and x.shape[0] % 16 == 0, x.shape
        _StandInTELinear.seen.append(tuple(x.shape))
        return super().forward(x)


@pytest.fixture
def stand_in_te(monkeypatch):
    fake = SimpleNamespace(Linear=_StandInTELinear)
    monkeypatch.setattr(te_backend, "import_te_pytorch", lambda: fake)
    monkeypatch.setattr(te_backend, "check_te_available",
                        lambda env=None: te_backend.TEInfo("2.14.0", "stand-in", (10, 0)))
    _StandInTELinear.seen = []
    return fake


def test_swap_shares_parameters_and_pads_tokens(stand_in_te):
    torch.manual_seed(0)
    model = _TwoLinears()
    reference = copy.deepcopy(model)
    weight, bias = model.fc1.weight, model.fc1.bias
    keys = set(model.state_dict())
    placement = te_linear.swap(model, get_recipe("nvfp4_full"), ["fc1", "fc2"])
    assert placement == {"fc1": "te", "fc2": "te"}
    assert isinstance(model.fc1, te_linear.TELinear)
    assert model.fc1.weight is weight and model.fc1.te_module.weight is weight
    assert model.fc1.bias is bias and model.fc1.te_module.bias is bias
    assert weight.partition_dim == 1  # TE's attributes travel to the shared Parameter
    assert set(model.state_dict()) == keys  # the checkpoint keys of the plain model
    assert {id(p) for p in model.parameters()} == {id(p) for p in
                                                   [weight, bias, model.fc2.weight,
                                                    model.fc2.bias]}
    x = torch.randn(3, 5, 32)  # 15 tokens: padded to 16 for TE, cut back after
    y = model.fc2(model.fc1(x))
    assert _StandInTELinear.seen == [(16, 32), (16, 64)]
    assert torch.allclose(y, reference.fc2(reference.fc1(x)), atol=1e-6)
    y.sum().backward()
    assert weight.grad is not None and weight.grad.abs().sum() > 0
    model.eval()
    assert not model.fc1.te_module.training


def test_swap_refuses_bad_shapes_and_modules_before_touching_the_model(stand_in_te):
    model = nn.Sequential(nn.Linear(32, 40), nn.LayerNorm(40), nn.Linear(40, 16))
    with pytest.raises(TEUnavailable, match=r"'0' \(in_features=32, out_features=40\)"):
        te_linear.swap(model, get_recipe("2d_rht"), ["0", "2"])
    with pytest.raises(TypeError, match=r"1: no NVFP4 twin for LayerNorm"):
        te_linear.swap(model, get_recipe("2d_rht"), ["1"])
    assert [type(m) for m in model] == [nn.Linear, nn.LayerNorm, nn.Linear]


# --------------------------------------------------------------------------------------------
# verify_te comparison logic, emulator on both sides
# --------------------------------------------------------------------------------------------
def _small_inputs():
    full = v.make_inputs(7)
    return {k: full[k] for k in ("random fp32", "bf16 with outliers", "zeros", "E2M1 ties",
                                 "subnormal block scales", "huge up to FLT_MAX")}


def _sr_inputs():
    g = torch.Generator().manual_seed(3)
    return {"random bf16": (torch.randn(32, 64, generator=g) * 3).to(torch.bfloat16)}


def _perturbed(quantizer, field, when=lambda spec: True):
    """A quantizer whose output differs in one element of ``field`` for matching specs."""
    def quantize(x, spec):
        out = quantizer(x, spec)
        if not when(spec):
            return out
        if field == "codes":
            codes = out.codes.clone()
            codes[0, 0] ^= 1
            return dataclasses.replace(out, codes=codes)
        if field == "scales":
            scales = out.scales.clone()
            scales[-1, -1] += 1
            return dataclasses.replace(out, scales=scales)
        amax = out.amax.reshape(1).view(torch.int32) + 1
        return dataclasses.replace(out, amax=amax.view(torch.float32).reshape(()))
    return quantize


def test_identical_emulators_pass_and_exit_zero():
    results = v.run_verification(v.emulator_quantizer(1), v.emulator_quantizer(2),
                                 inputs=_small_inputs(), sr_inputs=_sr_inputs(), sr_draws=24)
    table = v.format_table(results)
    assert all(r.passed for r in results), table
    checks = {r.check for r in results}
    assert {"codes", "scales", "amax", "SR neighbours A", "SR mean error",
            "SR round-up law"} <= checks
    specs = {r.case.split(" | ")[1] for r in results}
    assert {s.name for s in v.BIT_EXACT_SPECS + v.SR_SPECS + v.FORMAT_SPECS} <= specs
    assert not any(r.check == "amax" and "mxfp8" in r.case for r in results)  # MX: no amax
    assert "FAIL" not in table and table.endswith(f"{len(results)} checks, 0 failed")
    assert v.exit_code(results) == 0


@pytest.mark.parametrize("field", ["codes", "scales", "amax"])
def test_perturbed_emulator_is_caught(field):
    only_rht = lambda spec: spec.rht  # noqa: E731 - perturb just one copy kind
    specs = (v.BIT_EXACT_SPECS[0], v.BIT_EXACT_SPECS[-1])  # rowwise 1x16, columnwise RHT
    assert specs[1].rht and not specs[0].rht
    results = v.compare_quantizers(v.emulator_quantizer(), _perturbed(v.emulator_quantizer(),
                                                                      field, only_rht),
                                   _small_inputs(), specs)
    failed = [r for r in results if not r.passed]
    assert failed and {r.check for r in failed} == {field}
    assert all("columnwise RHT" in r.case for r in failed)
    assert v.exit_code(results) == 1
    assert "FAIL" in v.format_table(results)


def test_format_copies_decode_to_the_formats_fake_quantize():
    """The emulator side of a format spec: codes and scale bytes in TE's layout (columnwise:
    the copy of x^T) that decode to ``fake_quantize`` of that copy (four over six: up to its
    one fp32 tensor decode scale)."""
    from nvfp4bench.quant import kernels, mx
    x = torch.randn(64, 96, generator=torch.Generator().manual_seed(4)) * 5
    quant = v.emulator_quantizer()
    for spec in v.FORMAT_SPECS:
        out = quant(x, spec)
        operand = x.t() if spec.columnwise else x
        fmt = FORMATS[spec.format]
        expected = kernels.fake_quantize(operand, format=fmt.name, tile=spec.tile)
        rows, cols = operand.shape
        assert out.codes.shape == (rows, cols) and out.scales.shape == (rows, cols // fmt.block)
        if fmt.scale == "e8m0":
            assert out.amax is None
            values = out.codes.view(torch.float8_e4m3fn).float()
            scales = mx.e8m0_values(out.scales.int())
        else:
            assert out.amax.item() == operand.abs().max().item()
            magnitude = nvfp4.E2M1_VALUES[(out.codes & 7).long()]
            values = torch.where((out.codes & 8) > 0, -magnitude, magnitude)
            scales = out.scales.view(torch.float8_e4m3fn).float()
        decoded = (values.view(rows, -1, fmt.block) * scales.unsqueeze(-1)).view(rows, cols)
        if fmt.scale == "e8m0":
            assert torch.equal(decoded, expected), spec.name
        else:
            nonzero = decoded != 0
            assert torch.equal(nonzero, expected != 0), spec.name
            ratio = expected[nonzero] / decoded[nonzero]
            assert torch.allclose(ratio, ratio[0].expand_as(ratio), rtol=2 ** -23), spec.name


@pytest.mark.parametrize("field", ["codes", "scales"])
def test_a_perturbed_format_copy_is_caught(field):
    x = {"random": torch.randn(64, 96, generator=torch.Generator().manual_seed(5))}
    mx_only = lambda spec: spec.format == "mxfp8_te"  # noqa: E731
    results = v.compare_quantizers(v.emulator_quantizer(),
                                   _perturbed(v.emulator_quantizer(), field, mx_only), x,
                                   v.FORMAT_SPECS)
    failed = {r.case for r in results if not r.passed}
    assert failed == {f"random | {s.name}" for s in v.FORMAT_SPECS if mx_only(s)}


def test_layer_cases_in_the_other_formats():
    cases = v.make_layer_cases(11, "cpu", recipes=(), tokens=32, formats=v.FORMAT_LAYER_CASES)
    assert [(c.recipe, c.format) for c in cases] == list(v.FORMAT_LAYER_CASES)
    same = v.compare_layers(v.emulator_layer_runner, v.emulator_layer_runner, cases)
    assert same and all(r.passed for r in same), v.format_table(same)

    def plain_nvfp4(case):  # the plumbing error the check exists for: the format dropped
        return v.emulator_layer_runner(dataclasses.replace(case, format="nvfp4"))
    caught = v.compare_layers(v.emulator_layer_runner, plain_nvfp4, cases)
    assert {r.case for r in caught if not r.passed} >= {c.name for c in cases
                                                        if c.format == "mxfp8_te"}


def test_first_difference_is_reported():
    a = v.QuantOut(torch.zeros(2, 16, dtype=torch.uint8), torch.zeros(2, 1, dtype=torch.uint8),
                   torch.tensor(1.0))
    codes = a.codes.clone()
    codes[1, 3] = 7
    result = v.compare_codes("case", a, dataclasses.replace(a, codes=codes))
    assert not result.passed and "1/32 differ" in result.detail and "(1, 3): 0 vs 7" in \
        result.detail
    scales = a.scales.clone()
    scales[0, 0] = 0x38
    result = v.compare_scales("case", dataclasses.replace(a, scales=scales), a)
    assert not result.passed and "0x38 vs 0x00" in result.detail


def _rn_pretending_sr(x, spec):
    return v.emulator_quantizer()(x, dataclasses.replace(spec, sr=False))


def _round_down_sr(x, spec):
    out = v.emulator_quantizer()(x, dataclasses.replace(spec, sr=False))
    y = v.scaled_values(v.reference_operand(x, spec), out.scales, out.amax)
    lo, _ = v.grid_neighbours(y)
    index = torch.round(lo * 2).long()  # magnitude -> code: 0 .5 1 1.5 2 3 4 6
    lut = torch.tensor([0, 1, 2, 3, 4, 0, 5, 0, 6, 0, 0, 0, 7], dtype=torch.uint8)
    codes = lut[index] | (torch.signbit(y).to(torch.uint8) << 3)
    return dataclasses.replace(out, codes=codes)


@pytest.mark.parametrize("bad, failing", [(_rn_pretending_sr, "SR round-up law"),
                                          (_round_down_sr, "SR mean error")])
def test_sr_distribution_catches_a_wrong_law(bad, failing):
    x = _sr_inputs()["random bf16"]
    for spec in v.SR_SPECS:
        results = v.compare_sr_distribution("sr", x, spec, v.emulator_quantizer(5), bad, 24)
        by_check = {r.check: r for r in results}
        assert by_check["SR neighbours A"].passed and by_check["SR neighbours B"].passed
        assert not by_check[failing].passed, v.format_table(results)
        assert v.exit_code(results) == 1


def test_sr_neighbour_check_catches_a_far_value():
    def far(x, spec):
        out = v.emulator_quantizer(9)(x, spec)
        codes = out.codes.clone()
        codes[0, :] = 7  # magnitude 6: not a neighbour of most values
        return dataclasses.replace(out, codes=codes)
    results = v.compare_sr_distribution("sr", _sr_inputs()["random bf16"], v.SR_SPECS[0],
                                        v.emulator_quantizer(5), far, 16)
    by_check = {r.check: r for r in results}
    assert by_check["SR neighbours A"].passed and not by_check["SR neighbours B"].passed


def test_a_raising_side_is_a_failed_check_not_a_crash():
    def broken(x, spec):
        raise RuntimeError("kernel exploded")
    results = v.compare_quantizers(v.emulator_quantizer(), broken, {"zeros": torch.zeros(16, 32)},
                                   v.BIT_EXACT_SPECS[:1])
    assert len(results) == 1 and not results[0].passed
    assert "side B raised RuntimeError: kernel exploded" in results[0].detail
    assert v.exit_code([]) == 1  # nothing ran is not a pass


def test_unpack_inverts_pack():
    codes = torch.randint(0, 16, (16, 32), generator=torch.Generator().manual_seed(0),
                          dtype=torch.uint8)
    assert torch.equal(v.unpack_codes(nvfp4.pack(codes)), codes)


def test_tie_input_reaches_the_cast_unscaled():
    # S_enc = 1 and s_b = 1 for the tie blocks: docs/nvfp4.md section 8's golden codes
    q = nvfp4.quantize(te_cases.e2m1_tie_tensor())
    assert q.amax.item() == 2688.0 and q.scales[0, 0].float().item() == 1.0
    ties = torch.tensor([0, .25, .5, .75, 1, 1.25, 1.5, 1.75, 2, 2.5, 3, 3.5, 4, 5, 6, 6])
    expected = torch.tensor([0, 0, 1, 2, 2, 2, 3, 4, 4, 4, 5, 6, 6, 6, 7, 7], dtype=torch.uint8)
    row = te_cases.e2m1_tie_tensor()[0, :16]
    assert torch.equal(row.abs(), ties)
    assert torch.equal(q.codes[0, :16] & 7, expected)  # magnitudes: ties to the even code
    assert torch.equal((q.codes[0, :16] & 8) != 0, torch.signbit(row))  # -0.25 -> code 8


def test_compare_close():
    b = torch.randn(32, 16, generator=torch.Generator().manual_seed(1))
    assert v.compare_close("c", "y", b.clone(), b).passed
    assert v.compare_close("c", "db", None, None).passed
    assert not v.compare_close("c", "db", b, None).passed
    assert not v.compare_close("c", "y", b * 1.02, b).passed
    assert not v.compare_close("c", "y", b[:4], b).passed
    nan = b.clone()
    nan[0, 0] = float("nan")
    assert not v.compare_close("c", "y", nan, b).passed


def test_layer_comparison_with_the_emulator_layer():
    cases = v.make_layer_cases(11, "cpu", recipes=("nvfp4_full", "chain_rule"), tokens=32)
    same = v.compare_layers(v.emulator_layer_runner, v.emulator_layer_runner, cases)
    assert same and all(r.passed for r in same), v.format_table(same)

    def wrong_recipe(case):  # the plumbing error the check exists for: another recipe's backward
        swapped = "fwd_only" if case.recipe != "fwd_only" else "nvfp4_full"
        return v.emulator_layer_runner(dataclasses.replace(case, recipe=swapped))
    caught = v.compare_layers(v.emulator_layer_runner, wrong_recipe, cases[:1])
    assert not all(r.passed for r in caught) and v.exit_code(caught) == 1
