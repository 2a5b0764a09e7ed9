"""Swin segmenter: the ViT trunk with shifted-window attention, no CLS, no patch merging.

    image (B, C, H, W) -> PatchEmbed + pos  (B, T, D) on a g x g token grid (g = H / 16)
        -> depth x pre-norm Block (window attention; blocks 1, 3, 5, ... shift the windows)
        -> LayerNorm -> TokenDecoder -> logits (B, 1, H, W)

Window attention (Liu et al. 2021), per block, with window side w and N = w^2 tokens per window::

    x (B, g, g, D) -> roll by (-s, -s) when shifted -> windows (B, nW, N, D), nW = (g / w)^2
    logits = q k^T / sqrt(head_dim) + B_rel[index] + mask          # (B, nW, heads, N, N)
    B_rel: a learned ((2w - 1)^2, heads) table, indexed by the relative offset (dy, dx) of the pair
    mask:  -100 where the two tokens came from different regions of the rolled grid, 0 otherwise
    -> softmax, @ v, proj -> merge windows -> roll back by (+s, +s)

with shift s = w // 2 on every odd block, as the study's code does, also when one window covers the
whole grid: the base scale's window 16 at 256 px is global in its even blocks, and its odd blocks
attend within the four rolled 8 x 8 quadrants (the mask forbids 75 % of the token pairs). The
window is clipped to the token grid (an extension: the study runs 256 px only): at 64 px (g = 4) a
window of 8 or 16 becomes 4, shifted by 2 on odd blocks. The relative-position table is sized
from the clipped window.

Scales (docs/protocol.md): the ViT widths / depths / MLP ratios with heads 4 / 6 / 14 and windows
4 / 8 / 16 (16 = the whole grid at 256 px). Parameters at 256 px, 3 channels: tiny 496,305,
small 3,646,687, base 13,987,513.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from nvfp4bench.models.blocks import (INIT_STD, TRANSFORMER_ATTENTION_MATMULS,
                                      TRANSFORMER_QUANTIZED, Attention, Block, PatchEmbed,
                                      TokenDecoder, check_input, drop_path_rates,
                                      init_transformer_weights, token_grid)

MASK_VALUE = -100.0  # added to the logits of token pairs that the shifted window must not mix


@dataclass(frozen=True)
class SwinConfig:
    dim: int
    depth: int
    heads: int
    mlp_ratio: float
    window: int
    dropout: float = 0.1
    drop_path: float = 0.1


SCALES: dict[str, SwinConfig] = {
    "tiny": SwinConfig(dim=64, depth=10, heads=4, mlp_ratio=3, window=4),
    "small": SwinConfig(dim=192, depth=9, heads=6, mlp_ratio=3, window=8),
    "base": SwinConfig(dim=448, depth=8, heads=14, mlp_ratio=2, window=16),
}


def relative_position_index(window: int) -> torch.Tensor:
    """(N, N) index into the (2w-1)^2-row bias table: (dy + w - 1) * (2w - 1) + (dx + w - 1)."""
    # built on the CPU (also inside a ``torch.device("meta")`` block); .to(device) moves it
    ys, xs = torch.meshgrid(torch.arange(window, device="cpu"),
                            torch.arange(window, device="cpu"), indexing="ij")
    coords = torch.stack([ys.flatten(), xs.flatten()])        # (2, N)
    rel = coords[:, :, None] - coords[:, None, :] + window - 1  # (2, N, N), each in [0, 2w - 2]
    return rel[0] * (2 * window - 1) + rel[1]


def window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """(B, g, g, D) -> (B, nW, w*w, D), windows in row-major order."""
    b, g, _, d = x.shape
    n = g // window
    x = x.view(b, n, window, n, window, d).transpose(2, 3)  # (B, n, n, w, w, D)
    return x.reshape(b, n * n, window * window, d)


def window_merge(windows: torch.Tensor, grid: int) -> torch.Tensor:
    """Inverse of window_partition: (B, nW, w*w, D) -> (B, g, g, D)."""
    b, nw, nn_, d = windows.shape
    window = int(round(nn_ ** 0.5))
    n = grid // window
    x = windows.view(b, n, n, window, window, d).transpose(2, 3)  # (B, n, w, n, w, D)
    return x.reshape(b, grid, grid, d)


def shift_mask(grid: int, window: int, shift: int) -> torch.Tensor:
    """(nW, N, N) additive mask of a shifted-window layer: 0 within a region, MASK_VALUE across.

    After rolling the grid by -shift, the last window row / column holds tokens from the two ends
    of the image; label the three bands [0, g-w), [g-w, g-s), [g-s, g) per axis and forbid pairs
    whose labels differ.
    """
    labels = torch.zeros(grid, grid, device="cpu")
    bands = (slice(0, grid - window), slice(grid - window, grid - shift), slice(grid - shift, grid))
    label = 0
    for rows in bands:
        for cols in bands:
            labels[rows, cols] = label
            label += 1
    lw = window_partition(labels[None, :, :, None], window)[0, :, :, 0]  # (nW, N)
    differ = lw[:, :, None] != lw[:, None, :]                            # (nW, N, N)
    return torch.zeros(differ.shape, device="cpu").masked_fill(differ, MASK_VALUE)


class WindowAttention(Attention):
    """Attention within w x w windows of a g x g token grid, optionally shifted by w // 2.

    A shifted layer rolls and masks also when w = g (the study's rule): its window then holds the
    four rolled quadrants of the grid, and the mask keeps each token within its own quadrant.

    ``forward(x)``: x (B, T, D), T = g^2 -> (B, T, D). The parent's qkv / qk / av / proj do the
    work on (B, nW, N, D) windows; this class adds the relative position bias and the mask.
    """

    def __init__(self, dim: int, heads: int, *, grid: int, window: int, shifted: bool,
                 dropout: float = 0.0):
        super().__init__(dim, heads, dropout=dropout)
        if grid % window:
            raise ValueError(f"swin: the token grid {grid} is not divisible by the window "
                             f"{window}; use an image size whose grid (image_size / 16) is a "
                             f"multiple of the window, or at most the window")
        self.grid, self.window = grid, window
        self.shift = window // 2 if shifted else 0
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * window - 1) ** 2, heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=INIT_STD)
        self.register_buffer("relative_position_index", relative_position_index(window),
                             persistent=False)
        mask = shift_mask(grid, window, self.shift) if self.shift else None
        self.register_buffer("attn_mask", mask, persistent=False)

    def relative_bias(self) -> torch.Tensor:
        """(heads, N, N) learned bias of each head for each (query, key) offset in a window."""
        n = self.window ** 2
        bias = self.relative_position_bias_table[self.relative_position_index.flatten()]
        return bias.view(n, n, -1).permute(2, 0, 1)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        b, t, d = x.shape
        g, s = self.grid, self.shift
        x = x.view(b, g, g, d)
        if s:
            x = torch.roll(x, shifts=(-s, -s), dims=(1, 2))
        windows = window_partition(x, self.window)         # (B, nW, N, D)
        total = self.relative_bias()                        # (heads, N, N)
        if self.attn_mask is not None:
            total = total + self.attn_mask[:, None]         # (nW, heads, N, N)
        if bias is not None:
            total = total + bias
        out = super().forward(windows, total)               # (B, nW, N, D)
        x = window_merge(out, g)                            # (B, g, g, D)
        if s:
            x = torch.roll(x, shifts=(s, s), dims=(1, 2))
        return x.reshape(b, t, d)

    def extra_repr(self) -> str:
        return f"grid={self.grid}, window={self.window}, shift={self.shift}"


class Swin(nn.Module):
    """Isotropic Swin encoder with the shared token decoder; ``forward(x) -> (B, 1, H, W)``."""

    QUANTIZED = TRANSFORMER_QUANTIZED
    ATTENTION_MATMULS = TRANSFORMER_ATTENTION_MATMULS
    HEAD = "decoder.head"  # the one-logit layer (build_model's opt-in head_prior)

    def __init__(self, config: SwinConfig, *, image_size: int = 256, in_channels: int = 3):
        super().__init__()
        self.config, self.image_size, self.in_channels = config, image_size, in_channels
        self.grid = token_grid(image_size, who="swin")
        self.window = min(config.window, self.grid)  # clipped to the token grid
        d = config.dim
        self.patch_embed = PatchEmbed(in_channels, d)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid ** 2, d))
        self.pos_drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(
            Block(d, WindowAttention(d, config.heads, grid=self.grid, window=self.window,
                                     shifted=i % 2 == 1, dropout=config.dropout),
                  mlp_ratio=config.mlp_ratio, dropout=config.dropout, drop_path=rate)
            for i, rate in enumerate(drop_path_rates(config.depth, config.drop_path)))
        self.norm = nn.LayerNorm(d)
        self.decoder = TokenDecoder(d)
        # the study's init: linears truncated-normal(0.02) with zero bias, LayerNorm 1/0, the
        # position embedding and bias tables truncated-normal(0.02), convolutions at PyTorch's
        # default
        self.apply(init_transformer_weights)
        nn.init.trunc_normal_(self.pos_embed, std=INIT_STD)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.image_size, self.in_channels, "swin")
        h = self.pos_drop(self.patch_embed(x) + self.pos_embed)  # (B, T, D)
        for block in self.blocks:
            h = block(h)
        return self.decoder(self.norm(h), (self.grid, self.grid))  # (B, 1, H, W)
