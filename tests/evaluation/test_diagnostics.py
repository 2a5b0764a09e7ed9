"""Diagnostics: attention measures (known answers, collapse vs uniform), gradient fidelity, SQNR,
and measure() on tiny quantized models (finite, JSON-ready, leaves the model as it was)."""
import json
import math

import pytest
import torch
from torch import nn

from nvfp4bench.evaluation.diagnostics import (attention_diagnostics, attention_stats,
                                               gradient_agreement, input_operand, measure,
                                               operand_sqnr, sqnr_db, weight_operand)
from nvfp4bench.models import build_model
from nvfp4bench.quant import kernels
from nvfp4bench.quant.swap import quantize_model

bce = nn.functional.binary_cross_entropy_with_logits


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def _batch(size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, size, size, generator=g)
    return x, (x[:, :1] > 0.5).float()


def _tiny(arch, size=32, seed=0):
    torch.manual_seed(seed)
    return build_model(arch, "tiny", image_size=size)


# ------------------------------------------------------------------------------------------------
# attention
# ------------------------------------------------------------------------------------------------
def test_attention_stats_of_a_uniform_row():
    s = attention_stats(torch.full((3, 8), 1 / 8))
    assert math.isclose(s["entropy"], math.log(8), rel_tol=1e-6)
    assert math.isclose(s["normalized_entropy"], 1.0, rel_tol=1e-6)
    assert s["collapsed_share"] == 0.0
    assert s["distinct_values"] == 1.0
    assert math.isclose(s["max_weight"], 1 / 8, rel_tol=1e-6)


def test_attention_stats_of_one_hot_and_mixed_rows():
    probs = torch.tensor([[1.0, 0, 0, 0],       # collapsed: 2 distinct values (1 and 0)
                          [0.91, 0.09, 0, 0],   # collapsed: 3 distinct values
                          [0.4, 0.3, 0.2, 0.1]])  # spread: 4 distinct values
    s = attention_stats(probs)
    assert math.isclose(s["collapsed_share"], 2 / 3)
    assert math.isclose(s["distinct_values"], 3.0)
    h = -(0.91 * math.log(0.91) + 0.09 * math.log(0.09)) - sum(p * math.log(p)
                                                               for p in (0.4, 0.3, 0.2, 0.1))
    assert math.isclose(s["entropy"], h / 3, rel_tol=1e-5)


def test_distinct_values_merge_values_closer_than_the_resolution():
    probs = torch.tensor([[0.25, 0.2502, 0.2498, 0.25]])
    assert attention_stats(probs)["distinct_values"] == 1.0
    assert attention_stats(probs, resolution=1e-5)["distinct_values"] == 3.0


def _scale_queries(model, factor):
    with torch.no_grad():
        for block in model.blocks:
            d = block.attn.qkv.out_features // 3
            block.attn.qkv.weight[:d] *= factor   # q = W_q x + b_q: the logits scale with it
            block.attn.qkv.bias[:d] *= factor


@pytest.mark.parametrize("arch, size", [("vit", 64), ("swin", 64)])
def test_scaled_up_logits_collapse_and_uniform_attention_does_not(arch, size):
    x, _ = _batch(size)
    sharp = _tiny(arch, size)
    with torch.no_grad():
        for block in sharp.blocks:  # keys of very different directions, then big logits
            nn.init.normal_(block.attn.qkv.weight, std=1.0)
    _scale_queries(sharp, 100.0)
    flat = _tiny(arch, size)
    _scale_queries(flat, 0.0)      # q = 0: every logit equal (Swin: and no relative bias,
    #                                and no shift mask: at 64 px the window covers the grid)
    if arch == "swin":
        for block in flat.blocks:
            nn.init.zeros_(block.attn.relative_position_bias_table)
            if block.attn.attn_mask is not None:
                block.attn.attn_mask.zero_()
    collapsed = attention_diagnostics(sharp, x)
    uniform = attention_diagnostics(flat, x)
    assert len(collapsed) == len(sharp.blocks)
    for block in collapsed:
        assert collapsed[block]["collapsed_share"] > 0.9, block
        assert collapsed[block]["normalized_entropy"] < 0.1, block
        assert uniform[block]["collapsed_share"] == 0.0, block
        assert uniform[block]["normalized_entropy"] > 0.999, block


# ------------------------------------------------------------------------------------------------
# gradient agreement and SQNR: known answers
# ------------------------------------------------------------------------------------------------
def test_gradient_agreement_known_answers():
    g = torch.tensor([3.0, 4.0])
    assert gradient_agreement(g, g) == {"cosine": 1.0, "relative_error": 0.0}
    assert gradient_agreement(-g, g) == {"cosine": -1.0, "relative_error": 2.0}
    assert gradient_agreement(torch.tensor([4.0, -3.0]), g)["cosine"] == 0.0
    assert gradient_agreement(g, torch.zeros(2)) == {"cosine": None, "relative_error": None}
    assert gradient_agreement(None, g) == {"cosine": None, "relative_error": None}


def test_sqnr_known_answers():
    x = torch.tensor([1.0, 1.0])
    assert math.isclose(sqnr_db(x, torch.tensor([1.0, 0.9])), 10 * math.log10(2 / 0.01),
                        rel_tol=1e-6)  # 0.9 is not exact in fp32
    assert sqnr_db(x, x) is None                 # no error: unbounded, reported as undefined
    assert sqnr_db(torch.zeros(2), x) is None


def test_operand_sqnr_is_exactly_that_of_the_fake_quantized_operand():
    x = torch.randn(32, 64, generator=torch.Generator().manual_seed(0))
    for tile in ((1, 16), (16, 16)):
        assert operand_sqnr(x, tile) == sqnr_db(x, kernels.fake_quantize(x, tile=tile))
    # rows that are not a multiple of 16 are zero-padded, which changes no 1x16 block; with the
    # tensor's amax in the first 5 rows, those rows quantize alone as they do within all 32
    x[0, 0] = 100.0
    assert operand_sqnr(x[:5], (1, 16)) == sqnr_db(x[:5], kernels.fake_quantize(x, tile=(1, 16))[:5])


def test_conv_operands_follow_the_implicit_gemm_layout():
    conv = nn.Conv2d(3, 2, kernel_size=2, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.arange(24.0).view(2, 3, 2, 2))
    w = weight_operand(conv)                      # (C_out, (kh, kw, C_in)), C_in fastest
    assert w.shape == (2, 12)
    assert w[1, (1 * 2 + 0) * 3 + 2] == conv.weight[1, 2, 1, 0]
    convt = nn.ConvTranspose2d(3, 2, kernel_size=2, bias=False)   # weight (C_in, C_out, kh, kw)
    with torch.no_grad():
        convt.weight.copy_(torch.arange(24.0).view(3, 2, 2, 2))
    wt = weight_operand(convt)                    # (C_out, (kh, kw, C_in))
    assert wt.shape == (2, 12)
    assert wt[1, (0 * 2 + 1) * 3 + 2] == convt.weight[2, 1, 0, 1]
    x = torch.arange(2 * 3 * 2 * 2.0).view(2, 3, 2, 2)
    rows = input_operand(conv, x)                 # one row per pixel, channels along the row
    assert rows.shape == (8, 3)
    assert torch.equal(rows[5], x[1, :, 0, 1])


# ------------------------------------------------------------------------------------------------
# measure() on tiny quantized models
# ------------------------------------------------------------------------------------------------
def _floats(obj):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _floats(v)
    elif isinstance(obj, float):
        yield obj


@pytest.mark.parametrize("arch, recipe", [("vit", "nvfp4_full"), ("cnn", "2d_rht_sr"),
                                          ("swin", "fwd_only")])
def test_measure_is_finite_json_ready_and_leaves_the_model_as_it_was(arch, recipe):
    model = quantize_model(_tiny(arch), recipe, generator=torch.Generator().manual_seed(5)).train()
    x, y = _batch()
    modules = dict(model.named_modules())
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    out = measure(model, x, y, bce, recipe)
    json.dumps(out, allow_nan=False)
    assert model.training and all(m.training for m in model.modules())
    assert all(m is modules[n] for n, m in model.named_modules())
    assert all(torch.equal(p, params[n]) for n, p in model.named_parameters())
    assert all(p.grad is None for p in model.parameters())

    names = model.quantized_layers
    assert list(out["gradients"]) == names and list(out["sqnr"]) == names
    for name in names:
        g, s = out["gradients"][name], out["sqnr"][name]
        assert 0.5 < g["cosine"] <= 1.0 + 1e-9, name
        assert g["relative_error"] > 0.0, name    # the quantized path really differs
        assert 10.0 < s["weight_db"] < 40.0 and 10.0 < s["input_db"] < 40.0, name
    assert len(out["attention"]) == (0 if arch == "cnn" else len(model.blocks))
    summary = out["summary"]
    expected_none = {k for k in summary if k.startswith("attention_")} if arch == "cnn" else set()
    assert {k for k, v in summary.items() if v is None} == expected_none
    assert all(math.isfinite(v) for v in _floats(out))


def test_measure_of_a_baseline_has_no_gradients_but_the_sqnr_nvfp4_would_have():
    model = quantize_model(_tiny("vit"), "baseline")
    x, y = _batch()
    out = measure(model, x, y, bce, "baseline")
    assert out["gradients"] == {} and out["summary"]["gradient_cosine"] is None
    assert len(out["sqnr"]) == 4 * len(model.blocks)
    assert all(v["input_db"] > 10 for v in out["sqnr"].values())


def test_measure_does_not_advance_the_stochastic_rounding_generator():
    g = torch.Generator().manual_seed(11)
    model = quantize_model(_tiny("vit"), "sr_only", generator=g)
    state = g.get_state()
    x, y = _batch()
    first = measure(model, x, y, bce, "sr_only")
    assert torch.equal(g.get_state(), state)
    assert measure(model, x, y, bce, "sr_only") == first   # and so it is deterministic
