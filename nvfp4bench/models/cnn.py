"""U-Net-like CNN segmenter (pix2pix-style encoder-decoder with mirrored skips).

With ``n`` stages of ``c`` channels (docs/protocol.md)::

    encoder  stem        Conv2d(C_in -> c, k4 s2 p1) -> BN -> LeakyReLU(0.2) -> Dropout(0.5)  H/2
             down.i      Conv2d(c -> c,  k4 s2 p1) -> BN -> ReLU -> Dropout(0.5)   H/2^(i+2), i<n-2
             bottleneck  Conv2d(c -> c,  k4 s2 p1) -> BN -> ReLU -> Dropout(0.5)   H/2^n
    decoder  up.0        ConvT(c -> c,  k4 s2 p1) -> BN -> ReLU -> concat skip -> Dropout(0.5)
             up.j        ConvT(2c -> c, k4 s2 p1) -> BN -> ReLU -> concat skip -> Dropout(0.5)
             head        ConvT(2c -> 1, k4 s2 p1)                               one logit, H

``up.j`` is concatenated with the encoder output of the same resolution (the mirrored skip), so it
doubles the channels the next stage reads. Every convolution carries a bias; that reading of the
spec gives the study's counts at 256 px, 3 channels: tiny 4 x 64 -> 530,753; small 6 x 128 ->
3,684,481; base 7 x 224 -> 13,674,529 (study: ~531K, ~3.68M, ~13.67M).

Any input size works: ``n`` stride-2 stages need sides that are multiples of 2^n (and at least 2^n),
so a smaller or odd-sized input is zero-padded at the bottom / right to the next multiple and the
logits are cropped back to (B, 1, H, W). The base model (7 stages) at 32 px runs on a 128 px canvas.

Initialisation (the study's): every convolution, the head included, kaiming-normal for ReLU
(std = sqrt(2 / fan_in), fan_in = weight.shape[1] * kh * kw, PyTorch's convention also for a
ConvTranspose2d) with zero bias; BatchNorm weight 1, bias 0.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

KERNEL, STRIDE, PADDING = 4, 2, 1


@dataclass(frozen=True)
class CNNConfig:
    stages: int
    channels: int
    dropout: float = 0.5
    leaky_slope: float = 0.2


SCALES: dict[str, CNNConfig] = {
    "tiny": CNNConfig(stages=4, channels=64),
    "small": CNNConfig(stages=6, channels=128),
    "base": CNNConfig(stages=7, channels=224),
}


def down_stage(c_in: int, c_out: int, act: nn.Module, dropout: float) -> nn.Sequential:
    """Conv2d(k4, s2, p1) -> BN -> activation -> Dropout: halves the spatial size."""
    return nn.Sequential(OrderedDict(
        conv=nn.Conv2d(c_in, c_out, KERNEL, STRIDE, PADDING), norm=nn.BatchNorm2d(c_out),
        act=act, drop=nn.Dropout(dropout)))


class UpStage(nn.Module):
    """ConvT(k4, s2, p1) -> BN -> ReLU -> concat skip -> Dropout: doubles the spatial size."""

    def __init__(self, c_in: int, c_out: int, dropout: float):
        super().__init__()
        self.conv = nn.ConvTranspose2d(c_in, c_out, KERNEL, STRIDE, PADDING)
        self.norm = nn.BatchNorm2d(c_out)
        self.act = nn.ReLU()
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.act(self.norm(self.conv(x)))           # (B, c, 2h, 2w)
        return self.drop(torch.cat([x, skip], dim=1))   # (B, 2c, 2h, 2w)


def init_cnn_weights(module: nn.Module) -> None:
    """The study's CNN init: convolutions kaiming-normal (relu, fan_in) with zero bias; BN 1 / 0."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class UNet(nn.Module):
    """The CNN family; ``forward(x) -> (B, 1, H, W)`` logits for any H, W."""

    # Module-name patterns (fnmatch) of the layers every NVFP4 recipe quantizes: all convolutions
    # but the first encoder conv (stem), the bottleneck conv and the last decoder layer (head).
    QUANTIZED = ("down.*.conv", "up.*.conv")
    ATTENTION_MATMULS: tuple[str, ...] = ()
    HEAD = "head"  # the one-logit layer (build_model's opt-in head_prior)

    def __init__(self, config: CNNConfig, *, image_size: int = 256, in_channels: int = 3):
        super().__init__()
        if config.stages < 2:
            raise ValueError(f"cnn: need at least 2 stages, got {config.stages}")
        self.config, self.image_size, self.in_channels = config, image_size, in_channels
        c, p = config.channels, config.dropout
        self.stem = down_stage(in_channels, c, nn.LeakyReLU(config.leaky_slope), p)
        self.down = nn.ModuleList(down_stage(c, c, nn.ReLU(), p) for _ in range(config.stages - 2))
        self.bottleneck = down_stage(c, c, nn.ReLU(), p)
        self.up = nn.ModuleList(UpStage(c if j == 0 else 2 * c, c, p)
                                for j in range(config.stages - 1))
        self.head = nn.ConvTranspose2d(2 * c, 1, KERNEL, STRIDE, PADDING)
        self.apply(init_cnn_weights)

    @property
    def multiple(self) -> int:
        """Input sides are padded to a multiple of this (2^stages)."""
        return 2 ** self.config.stages

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"cnn: expected input (B, {self.in_channels}, H, W), "
                             f"got {tuple(x.shape)}")
        h, w = x.shape[-2:]
        m = self.multiple
        x = F.pad(x, (0, -w % m, 0, -h % m))  # zero-pad bottom / right to a multiple of 2^n
        skips = [self.stem(x)]                # (B, c, H/2, W/2)
        for stage in self.down:
            skips.append(stage(skips[-1]))    # (B, c, H/2^(i+2), ...)
        y = self.bottleneck(skips[-1])        # (B, c, H/2^n, W/2^n)
        for stage, skip in zip(self.up, reversed(skips)):
            y = stage(y, skip)                # (B, 2c, ...), twice the size
        return self.head(y)[..., :h, :w]      # (B, 1, H, W)
