"""ViT segmenter: patch-16 tokens, CLS, learned position embedding, global attention.

    image (B, C, H, W) -> PatchEmbed -> [CLS; tokens] + pos  (B, 1 + T, D)
        -> depth x pre-norm Block (global multi-head attention) -> LayerNorm
        -> drop CLS -> TokenDecoder -> logits (B, 1, H, W)

The position embedding has 1 + (image_size / 16)^2 rows: it is sized from ``image_size`` when the
model is built, so one model serves one input size (32 px: a 2 x 2 grid, 5 tokens with CLS).

Scales (docs/protocol.md), width / depth / heads / MLP ratio, and parameters at 256 px with 3 channels:
tiny 64/10/2/3 (494,473), small 192/9/6/3 (3,634,921), base 448/8/14/2 (13,880,777).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from nvfp4bench.models.blocks import (INIT_STD, TRANSFORMER_ATTENTION_MATMULS,
                                      TRANSFORMER_QUANTIZED, Attention, Block, PatchEmbed,
                                      TokenDecoder, check_input, drop_path_rates, token_grid)


@dataclass(frozen=True)
class ViTConfig:
    dim: int
    depth: int
    heads: int
    mlp_ratio: float
    dropout: float = 0.1
    drop_path: float = 0.1


SCALES: dict[str, ViTConfig] = {
    "tiny": ViTConfig(dim=64, depth=10, heads=2, mlp_ratio=3),
    "small": ViTConfig(dim=192, depth=9, heads=6, mlp_ratio=3),
    "base": ViTConfig(dim=448, depth=8, heads=14, mlp_ratio=2),
}


class ViT(nn.Module):
    """Plain ViT encoder with the shared token decoder; ``forward(x) -> (B, 1, H, W)`` logits."""

    QUANTIZED = TRANSFORMER_QUANTIZED
    ATTENTION_MATMULS = TRANSFORMER_ATTENTION_MATMULS
    HEAD = "decoder.head"  # the one-logit layer (build_model's opt-in head_prior)

    def __init__(self, config: ViTConfig, *, image_size: int = 256, in_channels: int = 3):
        super().__init__()
        self.config, self.image_size, self.in_channels = config, image_size, in_channels
        self.grid = token_grid(image_size, who="vit")
        d = config.dim
        self.patch_embed = PatchEmbed(in_channels, d)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid ** 2, d))
        self.pos_drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(
            Block(d, Attention(d, config.heads, dropout=config.dropout),
                  mlp_ratio=config.mlp_ratio, dropout=config.dropout, drop_path=rate)
            for rate in drop_path_rates(config.depth, config.drop_path))
        self.norm = nn.LayerNorm(d)
        self.decoder = TokenDecoder(d)
        # the study's init: every layer at PyTorch's default, position embedding and CLS
        # truncated-normal(0.02)
        nn.init.trunc_normal_(self.pos_embed, std=INIT_STD)
        nn.init.trunc_normal_(self.cls_token, std=INIT_STD)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.image_size, self.in_channels, "vit")
        tokens = self.patch_embed(x)                                  # (B, T, D)
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)          # (B, 1, D)
        h = self.pos_drop(torch.cat([cls, tokens], dim=1) + self.pos_embed)  # (B, 1 + T, D)
        for block in self.blocks:
            h = block(h)
        h = self.norm(h)[:, 1:]                                       # (B, T, D), CLS dropped
        return self.decoder(h, (self.grid, self.grid))                # (B, 1, H, W)
