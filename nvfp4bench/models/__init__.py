"""The three architecture families and their scale tables.

``build_model(arch, scale)`` builds a plain PyTorch model from two tables: ``FAMILIES`` (arch -> one
class) and ``ARCHS`` (arch -> scale -> frozen config). Each class declares which of its modules the
study quantizes, as module-name patterns (``fnmatch``), so the models never look at a recipe::

    UNet.QUANTIZED  = ("down.*.conv", "up.*.conv")   # not stem, bottleneck or head
    ViT.QUANTIZED   = ("blocks.*.attn.qkv", "blocks.*.attn.proj", "blocks.*.mlp.fc1",
                       "blocks.*.mlp.fc2")           # Swin: the same
    *.ATTENTION_MATMULS = ("blocks.*.attn.qk", "blocks.*.attn.av")   # opt-in

Quantization is not done here: ``nvfp4bench.quant.quantize_model`` reads those patterns and swaps
the modules (nothing in ``models`` imports the swap).
"""
from __future__ import annotations

from torch import nn

from nvfp4bench.models import cnn, swin, vit
from nvfp4bench.models.blocks import init_logit_prior

# The scale names, in order; each family module has its scale table, SCALES: name -> config.
SCALE_NAMES: tuple[str, ...] = ("tiny", "small", "base")

# arch -> the family's class; arch -> scale -> the family's frozen config
FAMILIES: dict[str, type[nn.Module]] = {"cnn": cnn.UNet, "vit": vit.ViT, "swin": swin.Swin}
ARCHS: dict[str, dict[str, object]] = {"cnn": cnn.SCALES, "vit": vit.SCALES, "swin": swin.SCALES}

# The study's models' exact parameter counts at 256 px with 3 input channels (docs/protocol.md); ours
# equal them (tests/models/test_models.py).
STUDY_PARAMETERS: dict[str, dict[str, int]] = {
    "cnn": {"tiny": 530_753, "small": 3_684_481, "base": 13_674_529},
    "vit": {"tiny": 494_473, "small": 3_634_921, "base": 13_880_777},
    "swin": {"tiny": 496_305, "small": 3_646_687, "base": 13_987_513},
}


def build_model(arch: str, scale: str, *, image_size: int = 256, in_channels: int = 3,
                head_prior: float | None = None) -> nn.Module:
    """A fresh ``arch`` model at ``scale``; ``forward((B, in_channels, S, S)) -> (B, 1, S, S)``.

    Transformers are built for ``image_size`` (position embeddings, Swin windows); the CNN takes
    any size. Initialisation is the study's and draws from torch's global RNG: seed it
    (``torch.manual_seed``) first. ``head_prior`` (opt-in, a deviation from the study): start the
    one-logit layer's bias at logit(head_prior) (``blocks.init_logit_prior``); nothing else changes.
    """
    if arch not in FAMILIES:
        raise ValueError(f"unknown arch {arch!r}; choose one of: {', '.join(FAMILIES)}")
    if scale not in ARCHS[arch]:
        raise ValueError(f"unknown scale {scale!r} for {arch}; choose one of: "
                         f"{', '.join(ARCHS[arch])}")
    if not isinstance(in_channels, int) or in_channels < 1:
        raise ValueError(f"in_channels must be a positive int, got {in_channels!r}")
    if not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    model = FAMILIES[arch](ARCHS[arch][scale], image_size=image_size, in_channels=in_channels)
    if head_prior is not None:
        init_logit_prior(model.get_submodule(type(model).HEAD), head_prior)
    return model


def count_parameters(model: nn.Module) -> int:
    """Number of scalar parameters (each shared Parameter counted once)."""
    return sum(p.numel() for p in model.parameters())


__all__ = ["ARCHS", "FAMILIES", "SCALE_NAMES", "STUDY_PARAMETERS", "build_model",
           "count_parameters"]
