import dataclasses

import pytest

from nvfp4bench.quant.recipes import RECIPES, STUDY_RECIPES, get_recipe


def test_study_recipes_in_study_order():
    assert STUDY_RECIPES == ("baseline", "nvfp4_full", "fwd_only", "chain_rule", "2d_rht",
                             "2d_rht_sr", "sr_only", "fwd_rht")


@pytest.mark.parametrize("name, quantizes_gradients", [
    ("baseline", False), ("nvfp4_full", True), ("fwd_only", False), ("chain_rule", False),
    ("2d_rht", True), ("2d_rht_sr", True), ("sr_only", True), ("fwd_rht", False)])
def test_gradient_quantizing_recipes_are_the_studys_1_4_5_6(name, quantizes_gradients):
    assert get_recipe(name).quantizes_gradients is quantizes_gradients


def test_te_default_recipe_is_2d_rht_sr():
    r = get_recipe("2d_rht_sr")
    assert (r.weight_tile, r.rht, r.stochastic_rounding) == ((16, 16), True, True)


def test_unknown_recipe_lists_the_valid_names():
    with pytest.raises(ValueError, match="nvfp4_full"):
        get_recipe("nvfp5")


def test_recipes_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        RECIPES["baseline"].quantized = True


def test_bad_backward_override_is_refused():
    with pytest.raises(ValueError, match="backward_override"):
        dataclasses.replace(RECIPES["nvfp4_full"], backward_override="straight_through")


@pytest.mark.parametrize("base, change", [
    ("chain_rule", {"disable_stochastic_rounding": False}),
    ("fwd_only", {"disable_stochastic_rounding": False}),
    ("baseline", {"disable_2d_quantization": False}),
])
def test_switches_that_would_be_silently_ignored_are_refused(base, change):
    with pytest.raises(ValueError, match=base):
        dataclasses.replace(RECIPES[base], **change)


# The study's NVFPQuantizer flags, by recipe id (its cnn/vit/swin *_qat.py): written out here.
STUDY_FLAGS = {
    "forward_only": {2, 7}, "chain_rule": {3}, "rht": {4, 5, 7}, "sr": {5, 6}, "2d": {4, 5, 7}}


@pytest.mark.parametrize("name", STUDY_RECIPES[1:])
def test_each_study_recipe_has_the_studys_flags(name):
    r = get_recipe(name)
    i = r.study_id
    expected_override = ("high_precision" if i in STUDY_FLAGS["forward_only"]
                         else "dequantized" if i in STUDY_FLAGS["chain_rule"] else None)
    assert r.quantized and r.backward_override == expected_override
    assert r.rht is (i in STUDY_FLAGS["rht"])
    assert (not r.disable_stochastic_rounding) is (i in STUDY_FLAGS["sr"])
    assert r.weight_tile == ((16, 16) if i in STUDY_FLAGS["2d"] else (1, 16))
    assert r.quantizes_gradients is (i in {1, 4, 5, 6})


def test_fwd_rht_is_fwd_only_with_2d_weights_and_the_rht_flag():
    """Recipe 7: forward-only (high-precision backward), 16x16 weight tiles, RHT flag on (the
    study's; with unquantized wgrad operands the rotation cancels), no SR."""
    r, base = get_recipe("fwd_rht"), get_recipe("fwd_only")
    assert r == dataclasses.replace(base, name="fwd_rht", study_id=7, description=r.description,
                                    disable_2d_quantization=False, disable_rht=False)
    assert not r.quantizes_gradients and not r.stochastic_rounding
    assert "cancel" in r.description
