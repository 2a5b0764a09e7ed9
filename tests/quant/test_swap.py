"""quantize_model on a model built outside nvfp4bench: layers chosen by name pattern or
predicate, one training step per recipe (the README's example), and the refusals."""
import pytest
import torch
from torch import nn

from nvfp4bench.quant import STUDY_RECIPES, get_recipe, high_precision, quantize_model
from nvfp4bench.quant.conv import QuantizedConv2d
from nvfp4bench.quant.linear import QuantizedLinear


class TinyNet(nn.Module):  # plain torch layers, declares nothing
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(16, 32, 3, padding=1)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(32 * 8 * 8, 64), nn.ReLU(),
                                  nn.Linear(64, 10))

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)))


def _batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 16, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g)


@pytest.mark.parametrize("recipe", STUDY_RECIPES)
def test_any_model_trains_one_step_under_every_recipe(recipe):
    torch.manual_seed(0)
    model = quantize_model(TinyNet(), recipe, layers=["conv", "head.1"],
                           generator=torch.Generator().manual_seed(0))
    quantized = get_recipe(recipe).quantized
    assert model.quantized_layers == (["conv", "head.1"] if quantized else [])
    assert model.layer_backends == {n: "emulator" for n in model.quantized_layers}
    if quantized:
        assert isinstance(model.conv, QuantizedConv2d)
        assert isinstance(model.head[1], QuantizedLinear)
        assert type(model.head[3]) is nn.Linear  # not selected
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = _batch()
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_a_predicate_selects_layers_and_high_precision_restores_them():
    torch.manual_seed(0)
    plain = TinyNet()
    model = quantize_model(TinyNet(), "nvfp4_full",
                           layers=lambda name, m: isinstance(m, nn.Linear) and m.out_features >= 64)
    model.load_state_dict(plain.state_dict())
    assert model.quantized_layers == ["head.1"]
    x, _ = _batch()
    with high_precision(model):
        assert type(model.head[1]) is nn.Linear
        assert torch.equal(model(x), plain(x))
    assert isinstance(model.head[1], QuantizedLinear)
    assert not torch.equal(model(x), plain(x))  # the NVFP4 forward differs


def test_a_model_without_declared_layers_needs_layers_and_bad_layers_are_refused():
    with pytest.raises(ValueError, match="declares no QUANTIZED"):
        quantize_model(TinyNet(), "nvfp4_full")
    model = TinyNet()
    with pytest.raises(TypeError, match="no NVFP4 twin for ReLU"):
        quantize_model(model, "nvfp4_full", layers=["conv", "head.2"])
    assert type(model.conv) is nn.Conv2d  # checked before anything was swapped
    with pytest.raises(ValueError, match="multiples of 16"):
        quantize_model(TinyNet(), "nvfp4_full", layers=["head.3"])  # 10 outputs
    with pytest.raises(ValueError, match="kernels must be one of"):
        quantize_model(TinyNet(), "nvfp4_full", layers=["conv"], kernels="fast")
