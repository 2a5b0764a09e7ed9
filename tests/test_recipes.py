import dataclasses

import pytest

from nvfp4bench.quant.recipes import RECIPES, STUDY_RECIPES, get_recipe


def test_study_recipes_in_study_order():
    assert STUDY_RECIPES == ("bf16", "nvfp4_full", "fwd_only", "chain_rule", "2d_rht",
                             "2d_rht_sr", "sr_only", "fwd_rht")


@pytest.mark.parametrize("name, quantizes_gradients", [
    ("bf16", False), ("nvfp4_full", True), ("fwd_only", False), ("chain_rule", False),
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
        RECIPES["bf16"].quantized = True


def test_bad_backward_override_is_refused():
    with pytest.raises(ValueError, match="backward_override"):
        dataclasses.replace(RECIPES["nvfp4_full"], backward_override="straight_through")


@pytest.mark.parametrize("base, change", [
    ("chain_rule", {"disable_stochastic_rounding": False}),
    ("fwd_only", {"disable_rht": False}),
    ("bf16", {"disable_2d_quantization": False}),
])
def test_switches_that_would_be_silently_ignored_are_refused(base, change):
    with pytest.raises(ValueError, match=base):
        dataclasses.replace(RECIPES[base], **change)
