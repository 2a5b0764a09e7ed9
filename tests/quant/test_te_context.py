"""The te backend end to end on the CPU, with a fake ``transformer_engine`` (TE cannot run here).

The fake module tree, installed into ``sys.modules`` by the fixture, records when its
``te.autocast`` is entered and left and every ``te.Linear`` forward; the capability checks (TE
version, GPU, device) are patched. A whole training run (train, validation, test evaluation,
diagnostics) must run every forward of a TE layer inside ``te.autocast`` with the recipe's
``NVFP4BlockScaling``, and its JSON must say which backend ran each quantized layer.
"""
import contextlib
import dataclasses
import enum
import importlib.util
import json
import sys
import types

import pytest
from torch import nn

from nvfp4bench.config import RunConfig
from nvfp4bench.quant.te import runtime as te
from nvfp4bench.results import result_path

TE_INSTALLED = importlib.util.find_spec("transformer_engine") is not None


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from nvfp4bench.data import ensure_synthetic_store
    return ensure_synthetic_store(tmp_path_factory.mktemp("store") / "synthetic", patients=10,
                                  image_size=32, progress=False)


@dataclasses.dataclass
class NVFP4BlockScaling:  # the fields the te backend passes (a TE without four over six)
    disable_rht: bool = False
    disable_stochastic_rounding: bool = False
    disable_2d_quantization: bool = False
    backward_override: str | None = None


@dataclasses.dataclass
class NVFP4BlockScaling4over6(NVFP4BlockScaling):  # a TE with four over six
    nvfp4_4over6: str = "none"
    nvfp4_4over6_e4m3_use_256: str = "all"
    nvfp4_4over6_err_mode: str = "MAE"


class Format(enum.Enum):
    E4M3 = "E4M3"
    HYBRID = "HYBRID"


@dataclasses.dataclass
class MXFP8BlockScaling:
    fp8_format: Format = Format.E4M3
    backward_override: str | None = None
    enable_2d_quantization: bool = False


@pytest.fixture
def fake_te(monkeypatch):
    """A fake TE whose state records the autocast depth, its recipes and every Linear call."""
    state = types.SimpleNamespace(depth=0, recipes=[], exits=0, calls=[], phase=None)

    @contextlib.contextmanager
    def autocast(enabled=True, recipe=None):
        state.depth += 1
        state.recipes.append(recipe)
        try:
            yield
        finally:
            state.depth -= 1
            state.exits += 1

    class Linear(nn.Linear):
        def __init__(self, in_features, out_features, bias=True, params_dtype=None,
                     device=None):
            super().__init__(in_features, out_features, bias=bias, dtype=params_dtype)

        def forward(self, x):
            state.calls.append((state.phase, state.depth > 0, self.training))
            return super().forward(x)

    manager = types.SimpleNamespace(is_fp8_enabled=lambda: state.depth > 0)
    tree = {
        "transformer_engine": types.ModuleType("transformer_engine"),
        "transformer_engine.pytorch": types.ModuleType("transformer_engine.pytorch"),
        "transformer_engine.pytorch.quantization":
            types.ModuleType("transformer_engine.pytorch.quantization"),
        "transformer_engine.common": types.ModuleType("transformer_engine.common"),
        "transformer_engine.common.recipe": types.ModuleType("transformer_engine.common.recipe"),
    }
    pt = tree["transformer_engine.pytorch"]
    pt.Linear, pt.autocast = Linear, autocast
    pt.is_nvfp4_available = lambda return_reason=False: (True, "")
    tree["transformer_engine.pytorch.quantization"].FP8GlobalStateManager = manager
    recipes = tree["transformer_engine.common.recipe"]
    recipes.NVFP4BlockScaling, recipes.MXFP8BlockScaling, recipes.Format = (
        NVFP4BlockScaling, MXFP8BlockScaling, Format)
    state.recipe_module = recipes
    for name, module in tree.items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(te, "te_version", lambda: "2.14.0")
    monkeypatch.setattr(te, "check_te_available",
                        lambda env=None: te.TEInfo("2.14.0", "fake", (10, 0)))
    monkeypatch.setattr(te, "check_device", lambda device: None)  # a CPU run stands in for CUDA
    return state


def _phased(state, phase, fn):
    def wrapper(*args, **kwargs):
        previous, state.phase = state.phase, phase
        try:
            return fn(*args, **kwargs)
        finally:
            state.phase = previous
    return wrapper


def test_every_te_forward_of_a_run_is_inside_te_autocast(fake_te, store, tmp_path, monkeypatch):
    import nvfp4bench.train.evaluate as evaluate
    import nvfp4bench.train.run as train
    for phase, module, fn in (("train", train, "train_one_epoch"), ("val", train, "validate"),
                              ("test", train, "evaluate"), ("diagnostics", evaluate, "measure")):
        monkeypatch.setattr(module, fn, _phased(fake_te, phase, getattr(module, fn)))
    config = RunConfig(arch="vit", scale="tiny", recipe="2d_rht", data=str(store),
                       out=str(tmp_path), epochs=1, batch_size=16, progress=False, threads=1,
                       backend="te", device="cpu", precision="bf16", quantize_attention=True)
    result = train.run(config)
    assert result["status"] == "complete", result["error"]
    assert not result["diagnostics"].get("error"), result["diagnostics"]

    calls = fake_te.calls
    assert {phase for phase, _, _ in calls} == {"train", "val", "test", "diagnostics"}
    outside = [c for c in calls if not c[1]]
    assert not outside, f"{len(outside)} of {len(calls)} te.Linear forwards ran outside te.autocast"
    assert all(training for phase, _, training in calls if phase == "train")
    assert not any(training for phase, _, training in calls if phase in ("val", "test"))
    assert fake_te.depth == 0 and fake_te.exits == len(fake_te.recipes) > 0
    assert all(r == NVFP4BlockScaling(disable_rht=False, disable_stochastic_rounding=True,
                                      disable_2d_quantization=False, backward_override=None)
               for r in fake_te.recipes)

    on_disk = json.loads(result_path(config).read_text())
    placement = on_disk["model"]["layer_backends"]
    assert list(placement) == on_disk["model"]["quantized_layers"]
    linears = [n for n in placement if n.rsplit(".", 1)[-1] in ("qkv", "proj", "fc1", "fc2")]
    matmuls = [n for n in placement if n.rsplit(".", 1)[-1] in ("qk", "av")]
    assert len(linears) == 40 and len(matmuls) == 20 and len(placement) == 60
    assert all(placement[n] == "te" for n in linears)
    assert all(placement[n] == "emulator" for n in matmuls)  # TE has no batched matmul


def test_a_te_cnn_runs_its_convolutions_on_the_emulator(fake_te, store, tmp_path):
    from nvfp4bench.train.run import run
    config = RunConfig(arch="cnn", scale="tiny", recipe="nvfp4_full", data=str(store),
                       out=str(tmp_path), epochs=1, batch_size=16, progress=False, threads=1,
                       backend="te", device="cpu", precision="bf16", diagnostics=False)
    result = run(config)
    assert result["status"] == "complete", result["error"]
    placement = result["model"]["layer_backends"]
    assert placement and set(placement.values()) == {"emulator"}
    assert fake_te.calls == []


def _format_run(store, tmp_path, arch, recipe, fmt):
    from nvfp4bench.train.run import run
    config = RunConfig(arch=arch, scale="tiny", recipe=recipe, format=fmt, data=str(store),
                       out=str(tmp_path), epochs=1, batch_size=16, progress=False, threads=1,
                       backend="te", device="cpu", precision="bf16", diagnostics=False,
                       quantize_attention=arch == "vit")
    return config, run(config)


def test_mxfp8_te_runs_under_mxfp8_block_scaling_with_emulator_matmuls_in_mxfp8(
        fake_te, store, tmp_path):
    config, result = _format_run(store, tmp_path, "vit", "fwd_rht", "mxfp8_te")
    assert result["status"] == "complete", result["error"]
    assert fake_te.recipes and all(
        r == MXFP8BlockScaling(fp8_format=Format.E4M3, backward_override="high_precision",
                               enable_2d_quantization=True) for r in fake_te.recipes)
    assert fake_te.calls and all(inside for _, inside, _ in fake_te.calls)
    assert result["config"]["format"] == "mxfp8_te" and "@mxfp8_te" in str(result_path(config))
    placement = result["model"]["layer_backends"]
    assert {placement[n] for n in placement if n.endswith((".qk", ".av"))} == {"emulator"}


def test_mxfp8_te_swaps_emulator_twins_in_the_format(fake_te, store):
    import torch
    from nvfp4bench.models import build_model
    from nvfp4bench.quant.swap import quantize_model
    model = build_model("vit", "tiny", image_size=32, in_channels=4)
    quantize_model(model, "nvfp4_full", backend="te", quantize_attention=True,
                   format="mxfp8_te", generator=torch.Generator().manual_seed(0))
    twins = [m for n, m in model.named_modules() if n.endswith((".qk", ".av"))]
    assert twins and {m.op.roles.format.name for m in twins} == {"mxfp8_te"}


def test_four_over_six_needs_a_te_that_has_it(fake_te, store, tmp_path):
    with pytest.raises(te.TEUnavailable, match="recipe lacks nvfp4_4over6"):
        _format_run(store, tmp_path, "vit", "fwd_only", "nvfp4_4over6")
    assert not any(tmp_path.iterdir())  # refused before anything was written
    fake_te.recipe_module.NVFP4BlockScaling = NVFP4BlockScaling4over6
    _, result = _format_run(store, tmp_path, "vit", "fwd_only", "nvfp4_4over6_mse")
    assert result["status"] == "complete", result["error"]
    assert all(r == NVFP4BlockScaling4over6(
        disable_rht=True, disable_stochastic_rounding=True, disable_2d_quantization=True,
        backward_override="high_precision", nvfp4_4over6="all", nvfp4_4over6_e4m3_use_256="all",
        nvfp4_4over6_err_mode="MSE") for r in fake_te.recipes)


def test_the_emulator_backend_records_its_layers(store, tmp_path):
    from nvfp4bench.train.run import run
    config = RunConfig(arch="cnn", scale="tiny", recipe="nvfp4_full", data=str(store),
                       out=str(tmp_path), epochs=1, batch_size=16, progress=False, threads=1,
                       diagnostics=False)
    model = run(config)["model"]
    assert model["layer_backends"] == {n: "emulator" for n in model["quantized_layers"]}


@pytest.mark.skipif(TE_INSTALLED, reason="TE is installed here: its absence cannot be tested")
@pytest.mark.parametrize("extra, message", [
    ([], "the te backend runs on a CUDA GPU"),  # the device first, whatever the precision
    (["--precision", "bf16"], "the te backend runs on a CUDA GPU")])
def test_backend_te_refuses_before_building_any_data(tmp_path, monkeypatch, capsys, extra,
                                                     message):
    import nvfp4bench.data as data
    from nvfp4bench.train.cli import main

    def must_not_run(*args, **kwargs):
        raise AssertionError("data was opened or built before the te backend's refusal")
    monkeypatch.setattr(data, "ensure_synthetic_store", must_not_run)
    monkeypatch.setattr(data, "SliceStore", must_not_run)
    base = ["--arch", "vit", "--scale", "tiny", "--recipe", "nvfp4_full", "--fold", "0",
            "--backend", "te", "--device", "cpu", "--out", str(tmp_path / "out"), *extra]
    for argv in (base, base + ["--data", str(tmp_path / "no-such-store")]):
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert message in err and "no such directory" not in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
