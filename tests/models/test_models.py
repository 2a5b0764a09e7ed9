"""Models: shapes at every size, parameter counts, the quantized-layer lists, a smoke test over
every arch x recipe, shared parameters, Swin window machinery, the study's initialisation."""
import math

import pytest
import torch
from torch import nn

from nvfp4bench.models import (ARCHS, FAMILIES, SCALE_NAMES, STUDY_PARAMETERS, build_model,
                               count_parameters)
from nvfp4bench.models.blocks import Attention, DropPath
from nvfp4bench.models.swin import (MASK_VALUE, WindowAttention, relative_position_index,
                                    shift_mask, window_merge, window_partition)
from nvfp4bench.quant import linear
from nvfp4bench.quant.recipes import RECIPES
from nvfp4bench.quant.swap import (BACKENDS, high_precision, quantizable_layers, quantize_model,
                                   register_backend)

SIZES = (32, 64, 128, 256)


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def _images(batch, size, seed=0, channels=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, channels, size, size, generator=g)


def _tiny(arch, size=32, seed=0):
    torch.manual_seed(seed)
    return build_model(arch, "tiny", image_size=size)


# ------------------------------------------------------------------------------------------------
# registry and shapes
# ------------------------------------------------------------------------------------------------
def test_registry_has_every_scale_of_every_family():
    assert set(FAMILIES) == set(ARCHS) == {"cnn", "vit", "swin"}
    for arch, scales in ARCHS.items():
        assert tuple(scales) == SCALE_NAMES, arch


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("scale", SCALE_NAMES)
def test_forward_shape_every_arch_and_scale_at_32px(arch, scale):
    model = build_model(arch, scale, image_size=32).eval()
    with torch.no_grad():
        y = model(_images(2, 32))
    assert y.shape == (2, 1, 32, 32)
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("arch", list(ARCHS))
def test_tiny_models_run_at_every_size(arch):
    for size in SIZES:
        model = build_model(arch, "tiny", image_size=size, in_channels=4).eval()
        with torch.no_grad():
            y = model(_images(1, size, channels=4))
        assert y.shape == (1, 1, size, size), size


def test_cnn_pads_sizes_that_are_not_a_multiple_of_its_stride_product():
    model = build_model("cnn", "base").eval()  # 7 stages: needs multiples of 128
    with torch.no_grad():
        assert model(_images(1, 40)).shape == (1, 1, 40, 40)


def test_transformers_refuse_an_input_of_another_size():
    with pytest.raises(ValueError, match="image_size"):
        build_model("vit", "tiny", image_size=64)(_images(1, 32))


@pytest.mark.parametrize("kwargs, match", [
    (dict(arch="resnet", scale="tiny"), "cnn, vit, swin"),
    (dict(arch="vit", scale="huge"), "tiny, small, base"),
    (dict(arch="vit", scale="tiny", image_size=40), "multiple of the patch size"),
    (dict(arch="cnn", scale="tiny", in_channels=0), "in_channels"),
])
def test_bad_build_arguments_are_refused_with_the_valid_choices(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_model(**kwargs)


# ------------------------------------------------------------------------------------------------
# parameter counts (known answers derived by hand from docs/protocol.md, and the study's numbers)
# ------------------------------------------------------------------------------------------------
def _cnn_count(stages, c, cin=3, k=16):
    """Conv + bias everywhere, BN (2c) after every conv but the head."""
    encoder = (cin * c * k + c) + (stages - 1) * (c * c * k + c)
    decoder = (c * c * k + c) + (stages - 2) * (2 * c * c * k + c) + (2 * c * k + 1)
    return encoder + decoder + (2 * stages - 1) * 2 * c


def _trunk_count(d, depth, hidden, tokens, cin=3, patch=16):
    block = 4 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * hidden + hidden) + (hidden * d + d)
    decoder, ch = 0, d
    for i in range(1, 5):  # ConvT(k2) with bias + GroupNorm(2 per channel), never below 8
        out = max(8, d // 2 ** i)
        decoder += ch * out * 4 + out + 2 * out
        ch = out
    decoder += ch + 1  # 1x1 conv
    embed = cin * d * patch * patch + d + 2 * d  # patch conv + LayerNorm
    return embed + tokens * d + depth * block + 2 * d + decoder


def _expected_count(arch, scale):
    cfg = ARCHS[arch][scale]
    if arch == "cnn":
        return _cnn_count(cfg.stages, cfg.channels)
    hidden = int(cfg.mlp_ratio * cfg.dim)
    if arch == "vit":  # CLS + 257 position rows
        return _trunk_count(cfg.dim, cfg.depth, hidden, 257) + cfg.dim
    # swin: 256 position rows, a (2w-1)^2 x heads relative-position table per block
    return (_trunk_count(cfg.dim, cfg.depth, hidden, 256)
            + cfg.depth * (2 * cfg.window - 1) ** 2 * cfg.heads)


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("scale", SCALE_NAMES)
def test_parameter_counts_at_256px_match_the_spec_and_the_study(arch, scale):
    with torch.device("meta"):  # counting needs no memory and no initialisation
        model = build_model(arch, scale)
    n = count_parameters(model)
    assert n == _expected_count(arch, scale)
    assert n == STUDY_PARAMETERS[arch][scale]


def test_parameter_counts_are_the_studys_exact_numbers():
    assert STUDY_PARAMETERS == {
        "cnn": {"tiny": 530_753, "small": 3_684_481, "base": 13_674_529},
        "vit": {"tiny": 494_473, "small": 3_634_921, "base": 13_880_777},
        "swin": {"tiny": 496_305, "small": 3_646_687, "base": 13_987_513}}


@pytest.mark.parametrize("arch, scale, channels, groups", [
    ("vit", "tiny", [32, 16, 8, 8], [8, 8, 8, 8]),        # D = 64: the last stage max(8, 4)
    ("swin", "tiny", [32, 16, 8, 8], [8, 8, 8, 8]),
    ("vit", "small", [96, 48, 24, 12], [8, 8, 8, 6]),     # 12: largest divisor <= 8 is 6
    ("swin", "small", [96, 48, 24, 12], [8, 8, 8, 6]),
    ("vit", "base", [224, 112, 56, 28], [8, 8, 8, 7]),    # 28 -> 7 (gcd(28, 8) would be 4)
    ("swin", "base", [224, 112, 56, 28], [8, 8, 8, 7]),
])
def test_decoder_channels_and_groupnorm_groups_are_the_studys(arch, scale, channels, groups):
    with torch.device("meta"):
        model = build_model(arch, scale)
    convs = [m for m in model.decoder.up if isinstance(m, nn.ConvTranspose2d)]
    norms = [m for m in model.decoder.up if isinstance(m, nn.GroupNorm)]
    assert [c.out_channels for c in convs] == channels
    assert [c.in_channels for c in convs] == [ARCHS[arch][scale].dim] + channels[:-1]
    assert [(c.kernel_size, c.stride) for c in convs] == [((2, 2), (2, 2))] * 4
    assert [n.num_groups for n in norms] == groups
    assert [n.num_channels for n in norms] == channels
    assert model.decoder.head.in_channels == channels[-1]
    assert (model.decoder.head.out_channels, model.decoder.head.kernel_size) == (1, (1, 1))


def test_decoder_groups_is_the_largest_divisor_at_most_8():
    from nvfp4bench.models.blocks import decoder_groups
    for c in range(1, 200):
        g = decoder_groups(c)
        assert c % g == 0 and g <= 8
        assert not any(c % h == 0 for h in range(g + 1, min(8, c) + 1)), c


# ------------------------------------------------------------------------------------------------
# which layers are quantized
# ------------------------------------------------------------------------------------------------
def _conv_execution_order(model, size=32):
    order = []
    hooks = [m.register_forward_hook(lambda m, a, o, n=n: order.append((n, type(m))))
             for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    with torch.no_grad():
        model.eval()(_images(2, size))
    for h in hooks:
        h.remove()
    return order


@pytest.mark.parametrize("scale", SCALE_NAMES)
def test_cnn_quantizes_every_conv_but_first_encoder_bottleneck_and_last_decoder(scale):
    model = build_model("cnn", scale, image_size=32)
    order = _conv_execution_order(model)
    encoder = [n for n, t in order if t is nn.Conv2d]
    decoder = [n for n, t in order if t is nn.ConvTranspose2d]
    assert len(encoder) == ARCHS["cnn"][scale].stages == len(decoder)
    expected = encoder[1:-1] + decoder[:-1]
    assert quantizable_layers(model) == expected
    quantize_model(model, "nvfp4_full")
    assert model.quantized_layers == expected
    for name, kind in order:
        swapped = type(model.get_submodule(name)) is not kind
        assert swapped == (name in expected), name


@pytest.mark.parametrize("arch", ["vit", "swin"])
@pytest.mark.parametrize("attention", [False, True])
def test_transformers_quantize_qkv_proj_fc1_fc2_of_every_block(arch, attention):
    model = _tiny(arch)
    depth = ARCHS[arch]["tiny"].depth
    per_block = (["attn.qkv", "attn.qk", "attn.av", "attn.proj"] if attention
                 else ["attn.qkv", "attn.proj"]) + ["mlp.fc1", "mlp.fc2"]
    expected = [f"blocks.{i}.{leaf}" for i in range(depth) for leaf in per_block]
    def outside_twins(m):  # module names, leaving out whatever a quantized twin holds inside
        return {n: mod for n, mod in m.named_modules()
                if not any(n.startswith(e + ".") for e in expected)}

    before = outside_twins(model)
    quantize_model(model, "2d_rht_sr", generator=torch.Generator().manual_seed(0),
                   quantize_attention=attention)
    assert model.quantized_layers == expected
    after = outside_twins(model)
    assert before.keys() == after.keys()
    changed = [n for n in before if after[n] is not before[n]]
    assert changed == expected  # nothing else (patch embed, norms, decoder) was touched
    for name in expected:
        if name.endswith(("qk", "av")):
            assert isinstance(after[name], linear.QuantizedMatmul)


@pytest.mark.parametrize("recipe", [n for n, r in RECIPES.items() if not r.quantized])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_baseline_recipes_swap_nothing(arch, recipe):
    model = _tiny(arch)
    before = dict(model.named_modules())
    assert quantize_model(model, recipe, quantize_attention=True) is model
    assert model.quantized_layers == []
    assert all(m is before[n] for n, m in model.named_modules())


@pytest.mark.parametrize("arch", list(ARCHS))
def test_quantized_model_shares_the_parameters_of_the_original(arch):
    model = _tiny(arch)
    before = list(model.named_parameters())
    quantize_model(model, "nvfp4_full")
    after = list(model.named_parameters())
    assert [n for n, _ in after] == [n for n, _ in before]
    assert all(p is q for (_, p), (_, q) in zip(after, before))
    with high_precision(model):  # the originals hold the very same Parameter objects
        assert all(p is q for (_, p), (_, q) in zip(model.named_parameters(), before))


def test_high_precision_swaps_the_originals_in_and_back():
    model = _tiny("vit")
    original = model.blocks[0].attn.qkv
    quantize_model(model, "fwd_only")
    twin = model.blocks[0].attn.qkv
    assert twin is not original
    with high_precision(model):
        assert model.blocks[0].attn.qkv is original
    assert model.blocks[0].attn.qkv is twin


def test_unknown_backend_lists_the_registered_names():
    with pytest.raises(ValueError, match="emulator"):
        quantize_model(_tiny("cnn"), "nvfp4_full", backend="tpu")


def test_quantizing_twice_is_refused():
    model = quantize_model(_tiny("cnn"), "nvfp4_full")
    with pytest.raises(ValueError, match="already quantized"):
        quantize_model(model, "nvfp4_full")


def test_a_registered_backend_receives_the_layer_names_recipe_and_generator():
    calls = []

    class Fake:
        name = "fake"

        def swap(self, model, recipe, names, *, generator=None, kernels="eager"):
            calls.append((recipe.name, list(names), generator))
            return {}

    g = torch.Generator().manual_seed(1)
    register_backend("fake", Fake())
    try:
        model = quantize_model(_tiny("swin"), "sr_only", backend="fake", generator=g)
    finally:
        del BACKENDS["fake"]
    assert calls == [("sr_only", quantizable_layers(model), g)]
    assert model.quantized_layers == quantizable_layers(model)
    assert set(model.layer_backends.values()) == {"fake"}


# ------------------------------------------------------------------------------------------------
# smoke test: every arch x every recipe of the registry
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("recipe", list(RECIPES))
@pytest.mark.parametrize("arch", list(ARCHS))
def test_every_parameter_gets_a_finite_gradient_under_every_recipe(arch, recipe):
    model = _tiny(arch).train()
    quantize_model(model, recipe, generator=torch.Generator().manual_seed(7))
    x = _images(2, 32)
    y = model(x)
    assert y.shape == (2, 1, 32, 32) and torch.isfinite(y).all()
    target = (x[:, :1] > 0).float()
    nn.functional.binary_cross_entropy_with_logits(y, target).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{arch}/{recipe}: {name} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{arch}/{recipe}: {name} has a non-finite gradient"
    assert any(p.grad.abs().sum() > 0 for p in model.parameters())


@pytest.mark.parametrize("arch, size", [("swin", 32), ("vit", 32)])
def test_quantized_attention_trains(arch, size):
    model = _tiny(arch, size).train()
    quantize_model(model, "nvfp4_full", quantize_attention=True)
    y = model(_images(2, size))
    y.square().mean().backward()
    assert torch.isfinite(y).all()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


# ------------------------------------------------------------------------------------------------
# Swin machinery
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scale, size, window, shifts", [
    ("tiny", 256, 4, (0, 2)),     # 16 x 16 grid, 4 x 4 windows, odd blocks shifted by 2
    ("small", 256, 8, (0, 4)),
    ("base", 256, 16, (0, 8)),    # one window covers the grid: odd blocks still shift (study)
    ("small", 64, 4, (0, 2)),     # window 8 clipped to the 4 x 4 grid
    ("tiny", 32, 2, (0, 1)),      # 2 x 2 grid
])
def test_swin_windows_are_clipped_to_the_grid_and_shift_on_odd_blocks(scale, size, window,
                                                                      shifts):
    with torch.device("meta"):
        model = build_model("swin", scale, image_size=size)
    attns = [b.attn for b in model.blocks]
    assert {a.window for a in attns} == {window}
    assert [a.shift for a in attns] == [shifts[i % 2] for i in range(len(attns))]
    assert all(a.relative_position_bias_table.shape == ((2 * window - 1) ** 2, a.heads)
               for a in attns)


def test_relative_position_index_known_answer_window_2():
    # tokens (0,0) (0,1) (1,0) (1,1); index = (dy + 1) * 3 + (dx + 1)
    assert relative_position_index(2).tolist() == [[4, 3, 1, 0], [5, 4, 2, 1],
                                                   [7, 6, 4, 3], [8, 7, 5, 4]]


def test_shift_mask_known_answer_grid_4_window_2_shift_1():
    mask = shift_mask(4, 2, 1)                       # (nW = 4, N = 4, N = 4)
    assert mask.shape == (4, 4, 4)
    assert (mask[0] == 0).all()                      # top-left window: one region
    # bottom-right window after the roll: 4 tokens from 4 regions, only the diagonal is allowed
    assert (mask[3] == MASK_VALUE * (1 - torch.eye(4))).all()
    # top-right window: its two columns come from two regions (the image's middle and its edge)
    same = torch.tensor([[1, 0, 1, 0], [0, 1, 0, 1], [1, 0, 1, 0], [0, 1, 0, 1]])
    assert (mask[1] == MASK_VALUE * (1 - same)).all()


def test_window_partition_and_merge_are_inverse():
    x = torch.arange(2 * 8 * 8 * 3, dtype=torch.float32).view(2, 8, 8, 3)
    w = window_partition(x, 4)
    assert w.shape == (2, 4, 16, 3)
    assert torch.equal(w[0, 1, 0], x[0, 0, 4])       # window 1 starts at column 4
    assert torch.equal(window_merge(w, 8), x)


def test_window_attention_covering_the_grid_equals_global_attention_with_its_bias():
    torch.manual_seed(0)
    win = WindowAttention(32, 2, grid=4, window=4, shifted=False).eval()
    assert win.shift == 0
    ref = Attention(32, 2).eval()
    ref.load_state_dict(win.state_dict(), strict=False)
    x = torch.randn(3, 16, 32)
    assert torch.allclose(win(x), ref(x, win.relative_bias()), atol=1e-6)


def _study_allowed_pairs(grid, window, shift):
    """(T, T) bool, in image token order: may query q attend to key k? From the study's definition,
    written independently of swin.py: unshifted, q and k share a w x w window; shifted, the
    grid is cut at s, s + w, s + 2w, ... on each axis (the first s rows / columns, which the roll
    wraps to the far end, forming their own band), and q and k must share a band on both axes."""
    r = torch.arange(grid)
    band = (r // window) if shift == 0 else torch.where(r < shift, -1, (r - shift) // window)
    rows, cols = band.repeat_interleave(grid), band.repeat(grid)   # token t = (t // g, t % g)
    return (rows[:, None] == rows[None, :]) & (cols[:, None] == cols[None, :])


def _model_allowed_pairs(attn):
    """(T, T) bool from a WindowAttention's windows, roll and mask, in image token order."""
    g, w, s = attn.grid, attn.window, attn.shift
    n = g // w
    allowed = torch.zeros(g * g, g * g, dtype=torch.bool)
    mask = attn.attn_mask if attn.attn_mask is not None else torch.zeros(n * n, w * w, w * w)
    for win in range(n * n):
        i, j = torch.arange(w * w) // w, torch.arange(w * w) % w    # position in the window
        r = ((win // n) * w + i + s) % g                            # rolled by -s: undo it
        c = ((win % n) * w + j + s) % g
        t = r * g + c
        allowed[t[:, None], t[None, :]] = mask[win] == 0
    assert set(mask.unique().tolist()) <= {0.0, MASK_VALUE}
    return allowed


@pytest.mark.parametrize("scale", SCALE_NAMES)
@pytest.mark.parametrize("size", [256, 128, 64, 32])
def test_swin_masks_exactly_the_studys_token_pairs_in_every_block(scale, size):
    """Every block of every scale: even blocks attend within their windows, odd blocks within
    the shifted bands, also where one window covers the grid (base at 256 px: 4 quadrants)."""
    with torch.device("meta"):
        model = build_model("swin", scale, image_size=size)
    for i, block in enumerate(model.blocks):
        a = block.attn
        expected = _study_allowed_pairs(a.grid, a.window, a.window // 2 if i % 2 else 0)
        assert torch.equal(_model_allowed_pairs(a), expected), (scale, size, i)


def test_swin_base_at_256px_odd_blocks_attend_within_rolled_8x8_quadrants():
    with torch.device("meta"):
        model = build_model("swin", "base")
    even, odd = model.blocks[0].attn, model.blocks[1].attn
    assert (even.window, even.shift, even.attn_mask) == (16, 0, None)  # global
    assert (odd.window, odd.shift) == (16, 8)
    allowed = _model_allowed_pairs(odd)
    assert allowed.float().mean().item() == 0.25                      # 75 % masked
    quadrant = lambda t: (t // 16 < 8, t % 16 < 8)                      # noqa: E731
    t = torch.arange(256)
    for q in (0, 7, 8 * 16 + 8, 255):
        same = [(quadrant(k) == quadrant(q)) for k in t.tolist()]
        assert allowed[q].tolist() == same


def test_shifted_window_over_the_whole_grid_mixes_only_within_a_quadrant():
    """Functional: perturbing key token k changes query q's output iff the study allows (q, k)."""
    torch.manual_seed(0)
    attn = WindowAttention(32, 2, grid=4, window=4, shifted=True).eval()
    assert attn.shift == 2
    x = torch.randn(1, 16, 32)
    expected = _study_allowed_pairs(4, 4, 2)
    with torch.no_grad():
        base = attn(x)
        for k in range(16):
            xp = x.clone()
            xp[0, k] += 1.0
            changed = (attn(xp) - base)[0].abs().amax(-1) > 1e-6          # (T,) per query
            assert changed.tolist() == expected[:, k].tolist(), k


def test_shifted_window_attention_gives_no_weight_across_regions():
    torch.manual_seed(0)
    attn = WindowAttention(32, 2, grid=4, window=2, shifted=True).eval()
    seen = []
    attn.av.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    attn(torch.randn(1, 16, 32))
    probs = seen[0]                                   # (B, nW, heads, N, N)
    masked = (shift_mask(4, 2, 1) != 0)[None, :, None].expand_as(probs)
    assert probs[masked].max() < 1e-30
    assert torch.allclose(probs.sum(-1), torch.ones(()))


def test_drop_path_drops_whole_samples_and_is_identity_in_eval():
    torch.manual_seed(0)
    dp = DropPath(0.5)
    x = torch.ones(64, 3, 5)
    y = dp(x)
    per_sample = y.flatten(1)
    assert set(per_sample.unique().tolist()) <= {0.0, 2.0}
    assert (per_sample == per_sample[:, :1]).all()
    assert torch.equal(dp.eval()(x), x)


def test_attention_runs_its_matmuls_through_the_injected_modules():
    torch.manual_seed(0)
    attn = Attention(32, 2)
    calls = []
    for name in ("qk", "av"):
        getattr(attn, name).register_forward_hook(
            lambda m, a, o, n=name: calls.append((n, tuple(a[0].shape), tuple(a[1].shape))))
    attn(torch.randn(2, 3, 5, 32))  # any leading dimensions
    assert calls == [("qk", (2, 3, 2, 5, 16), (2, 3, 2, 16, 5)),
                     ("av", (2, 3, 2, 5, 5), (2, 3, 2, 5, 16))]


def test_initialisation_is_seeded_by_the_global_rng():
    a, b = _tiny("swin", seed=3), _tiny("swin", seed=3)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    c = _tiny("swin", seed=4)
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters()))


def test_te_backend_calls_the_te_modules_swap_with_the_layer_names():
    import inspect

    from nvfp4bench.quant.te import linear as te_linear
    model = _tiny("vit")
    names = quantizable_layers(model, attention=True)
    # the call the te backend makes binds to the real signature (no TE needed to check that)
    inspect.signature(te_linear.swap).bind(model, RECIPES["nvfp4_full"], names, generator=None)


def test_same_seeds_give_the_same_bits_under_a_stochastic_rounding_recipe():
    def grads(seed):
        model = quantize_model(_tiny("vit"), "2d_rht_sr",
                               generator=torch.Generator().manual_seed(seed)).train()
        torch.manual_seed(1)  # dropout / drop-path
        model(_images(2, 32)).square().mean().backward()
        return [p.grad for p in model.parameters()]

    a, b, c = grads(3), grads(3), grads(4)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))  # the SR draws do matter


@pytest.mark.parametrize("arch", ["cnn", "vit", "swin"])
def test_opt_in_head_prior_starts_the_output_at_the_tumour_prior_and_changes_nothing_else(arch):
    """head_prior=p sets the head's bias to logit(p), shifting every output logit by logit(p) -
    bias; every other parameter is the default init's, bit for bit, for the same seed."""
    from nvfp4bench.models.blocks import TUMOUR_PRIOR
    torch.manual_seed(0)
    plain = build_model(arch, "tiny", image_size=32).eval()
    torch.manual_seed(0)
    model = build_model(arch, "tiny", image_size=32, head_prior=TUMOUR_PRIOR).eval()
    head = model.get_submodule(type(model).HEAD)
    assert (head.bias == math.log(0.01 / 0.99)).all() and head.bias.numel() == 1
    for (name, p), (_, q) in zip(model.named_parameters(), plain.named_parameters()):
        assert torch.equal(p, q) or p is head.bias, name
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        shift = model(x) - plain(x) + plain.get_submodule(type(plain).HEAD).bias
    assert torch.allclose(shift, torch.full_like(shift, math.log(0.01 / 0.99)), atol=1e-4)
    with pytest.raises(ValueError, match="probability"):
        build_model(arch, "tiny", image_size=32, head_prior=1.0)


# ------------------------------------------------------------------------------------------------
# initialisation: the study's, per layer type
# ------------------------------------------------------------------------------------------------
def _fan_in(w):
    """PyTorch's fan_in: weight.shape[1] x receptive field (also for a ConvTranspose2d)."""
    return w.shape[1] * (w[0, 0].numel() if w.dim() > 2 else 1)


def _kurtosis(t):
    z = (t.flatten().double() - t.mean()) / t.std()
    return (z ** 4).mean().item()


@pytest.mark.parametrize("scale", SCALE_NAMES)
def test_cnn_init_is_kaiming_normal_relu_zero_bias_and_batchnorm_1_0(scale):
    torch.manual_seed(0)
    model = build_model("cnn", scale)
    convs = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(convs) == 2 * ARCHS["cnn"][scale].stages and len(norms) == len(convs) - 1
    for m in convs:
        assert (m.bias == 0).all()
        expected = math.sqrt(2.0 / _fan_in(m.weight))             # kaiming normal, gain sqrt(2)
        assert abs(m.weight.std().item() / expected - 1) < 0.1, m
        assert abs(m.weight.mean().item()) < 0.1 * expected
    # normal, not uniform (PyTorch's default is uniform with std 1/sqrt(3 fan_in))
    assert 2.8 < _kurtosis(torch.cat([m.weight.flatten() / math.sqrt(2.0 / _fan_in(m.weight))
                                      for m in convs])) < 3.2
    assert model.head.weight.shape == (2 * ARCHS["cnn"][scale].channels, 1, 4, 4)
    assert (model.head.bias == 0).all()                          # the CNN head starts at 0
    for m in norms:
        assert (m.weight == 1).all() and (m.bias == 0).all()


def _default_bound(m):
    """PyTorch's default init of Linear / Conv: kaiming_uniform(a=sqrt 5) -> U(+-1/sqrt(fan_in)),
    the bias U(+-1/sqrt(fan_in)) too."""
    return 1.0 / math.sqrt(_fan_in(m.weight))


def _check_pytorch_default(mods):
    for m in mods:
        b = _default_bound(m)
        assert m.weight.abs().max() <= b and m.bias.abs().max() <= b, m
        assert m.bias.abs().max() > 0, m
    pooled = torch.cat([m.weight.flatten() / _default_bound(m) for m in mods])
    assert abs(pooled.std().item() - 1 / math.sqrt(3)) < 0.02     # U(-1, 1): std 1/sqrt(3)
    assert 1.7 < _kurtosis(pooled) < 1.9                           # uniform: 1.8


def _check_trunc_normal_002(tensors):
    pooled = torch.cat([t.flatten() for t in tensors])
    assert abs(pooled.std().item() / 0.02 - 1) < 0.05
    assert pooled.abs().max() <= 2.0                               # trunc_normal_'s bounds +-2
    assert 2.8 < _kurtosis(pooled) < 3.2                            # normal (bounds at 100 std)


def _transformer_layers(model):
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    convs = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    norms = [m for m in model.modules() if isinstance(m, (nn.LayerNorm, nn.GroupNorm))]
    assert len(linears) == 4 * len(model.blocks) and len(convs) == 6   # patch, 4 ConvT, head
    return linears, convs, norms


def test_vit_init_linears_and_convs_at_pytorch_default_pos_and_cls_trunc_normal():
    torch.manual_seed(0)
    model = build_model("vit", "tiny", image_size=64)
    linears, convs, norms = _transformer_layers(model)
    _check_pytorch_default(linears)
    _check_pytorch_default(convs)
    _check_trunc_normal_002([model.pos_embed, model.cls_token])
    for m in norms:
        assert (m.weight == 1).all() and (m.bias == 0).all()


def test_swin_init_linears_trunc_normal_zero_bias_convs_at_pytorch_default():
    torch.manual_seed(0)
    model = build_model("swin", "tiny", image_size=64)
    linears, convs, norms = _transformer_layers(model)
    _check_trunc_normal_002([m.weight for m in linears])
    assert all((m.bias == 0).all() for m in linears)
    _check_trunc_normal_002([model.pos_embed])
    _check_trunc_normal_002([b.attn.relative_position_bias_table for b in model.blocks])
    _check_pytorch_default(convs)
    for m in norms:
        assert (m.weight == 1).all() and (m.bias == 0).all()


@pytest.mark.parametrize("arch", ["vit", "swin"])
def test_transformer_classifier_is_at_pytorch_default_not_a_tumour_prior(arch):
    torch.manual_seed(0)
    head = build_model(arch, "tiny", image_size=32).decoder.head
    assert head.weight.shape == (1, 8, 1, 1)
    assert 0 < head.bias.abs().item() <= 1 / math.sqrt(8)          # U(+-1/sqrt(fan_in))


def test_a_refused_layer_leaves_the_model_untouched():
    """The last quantized layer is refused (200 input features): no layer is swapped."""
    model = build_model("vit", "tiny", image_size=32)
    model.blocks[-1].mlp.fc2 = nn.Linear(200, 64)
    before = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(ValueError, match="200"):
        quantize_model(model, "nvfp4_full")
    assert {n: type(m) for n, m in model.named_modules()} == before


# ------------------------------------------------------------------------------------------------
# attention dropout (the study's p 0.1 on the softmax probabilities)
# ------------------------------------------------------------------------------------------------
def _probs_seen_by_av(model, x):
    seen = []
    hooks = [b.attn.av.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
             for b in model.blocks]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize("arch", ["vit", "swin"])
def test_attention_probabilities_are_dropped_in_train_mode_only(arch):
    model = _tiny(arch, 64)
    assert all(b.attn.attn_drop.p == 0.1 for b in model.blocks)
    x = _images(2, 64)
    torch.manual_seed(5)
    train = _probs_seen_by_av(model.train(), x)
    zeros = torch.cat([p.flatten() == 0 for p in train]).float().mean().item()
    assert 0.07 < zeros < 0.13                         # ~10 % of the probabilities dropped
    for p in _probs_seen_by_av(model.eval(), x):        # eval: the softmax itself
        assert (p > 0).all() and torch.allclose(p.sum(-1), torch.ones(()), atol=1e-5)
    # train: the kept ones are rescaled by 1 / 0.9, so a row sums to 1 only on average
    rows = torch.cat([p.sum(-1).flatten() for p in train])
    assert abs(rows.mean().item() - 1.0) < 0.05 and rows.std().item() > 0.01
