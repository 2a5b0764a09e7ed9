"""Building blocks shared by the ViT and the Swin segmenters.

Both transformer families are one isotropic trunk (docs/protocol.md, "Architectures and scales")::

    image (B, C, H, W)
      -> PatchEmbed: Conv2d(k16, s16) -> flatten -> LayerNorm        tokens (B, T, D), T = (H/16)^2
      -> [+ CLS and learned position embedding: the family decides]
      -> depth x Block:  x = x + drop_path(attn(LN(x)));  x = x + drop_path(mlp(LN(x)))
      -> LayerNorm
      -> TokenDecoder: tokens -> (B, D, H/16, W/16)
           -> 4 x [ConvTranspose2d(k2, s2) -> GroupNorm -> GELU], channels max(8, D / 2^i)
           -> Conv2d(1x1) -> one logit per pixel (B, 1, H, W)

Attention is written out so that it can be instrumented or quantized by a module swap::

    q, k, v = split(qkv(x))                        # (..., heads, T, head_dim) each
    logits  = qk(q * head_dim**-0.5, k^T) + bias   # (..., heads, T, T)
    p       = dropout(softmax(logits))             # rows sum to 1 (before the dropout)
    out     = proj(av(p, v))                       # (..., T, D)

``qk`` and ``av`` are ``nvfp4bench.quant.matmul.Matmul`` modules (plain ``torch.matmul``);
quantization with ``quantize_attention=True`` swaps them for ``QuantizedMatmul``. The leading
dimensions ``...`` are free, so a windowed attention passes ``(B, windows, N, D)`` and a bias of
shape ``(windows, heads, N, N)`` that broadcasts over the batch.

Dropout 0.1 (the study's) drops the attention probabilities (train mode only; ``av`` receives the
dropped, rescaled probabilities) and follows the position embedding, the attention projection and
both MLP linears; drop-path (stochastic depth) grows linearly from 0 at the first block to 0.1 at
the last.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from nvfp4bench.quant.matmul import Matmul

PATCH = 16            # patch size: a 256 px image is a 16 x 16 token grid
DECODER_STAGES = 4    # log2(PATCH) upsampling stages of the token decoder
DECODER_GROUPS = 8    # GroupNorm groups in the decoder (fewer when the channels need it)
DECODER_MIN_CHANNELS = 8  # no decoder stage is narrower (the study's max(8, D / 2^i))
INIT_STD = 0.02       # truncated-normal std: position embeddings, CLS, Swin's linears and bias table
# Module-name patterns (fnmatch) of the layers every NVFP4 recipe quantizes in ViT and Swin
# (docs/protocol.md), and of the attention matmuls, quantized only with quantize_attention=True.
TRANSFORMER_QUANTIZED = ("blocks.*.attn.qkv", "blocks.*.attn.proj", "blocks.*.mlp.fc1",
                         "blocks.*.mlp.fc2")
TRANSFORMER_ATTENTION_MATMULS = ("blocks.*.attn.qk", "blocks.*.attn.av")
TUMOUR_PRIOR = 0.01   # the opt-in head prior's usual value (see init_logit_prior)


class DropPath(nn.Module):
    """Stochastic depth: zero a sample's residual branch with probability ``p``, scale by 1/(1-p).

    ``y = x * m / (1 - p)`` with ``m ~ Bernoulli(1 - p)`` drawn once per sample; identity in eval.
    """

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Attention(nn.Module):
    """Multi-head self-attention over the last-but-one dimension, any leading dimensions.

    ``forward(x, bias=None)``: x (..., T, D); bias broadcastable to (..., heads, T, T), added to the
    scaled logits before the softmax (relative position bias, shifted-window mask).
    """

    def __init__(self, dim: int, heads: int, *, dropout: float = 0.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"Attention: width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.head_dim = dim // heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.qk = Matmul()
        self.av = Matmul()
        self.attn_drop = nn.Dropout(dropout)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        qkv = self.qkv(x).unflatten(-1, (3, self.heads, self.head_dim))  # (..., T, 3, h, d)
        q, k, v = qkv.movedim(-3, 0).transpose(-3, -2).unbind(0)        # (..., h, T, d) each
        logits = self.qk(q * self.scale, k.transpose(-2, -1))            # (..., h, T, T)
        if bias is not None:
            logits = logits + bias
        probs = self.attn_drop(logits.softmax(dim=-1))                   # (..., h, T, T)
        out = self.av(probs, v)                                          # (..., h, T, d)
        out = out.transpose(-3, -2).flatten(-2)                          # (..., T, D)
        return self.proj_drop(self.proj(out))


class Mlp(nn.Module):
    """fc1 -> GELU -> dropout -> fc2 -> dropout, hidden width ``mlp_ratio * dim``."""

    def __init__(self, dim: int, hidden: int, *, dropout: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop2 = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class Block(nn.Module):
    """Pre-norm transformer block; the attention module is passed in (global or windowed)."""

    def __init__(self, dim: int, attn: nn.Module, *, mlp_ratio: float, dropout: float,
                 drop_path: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = attn
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(round(mlp_ratio * dim)), dropout=dropout)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, T, D)
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    """Conv2d(k=s=16) patch embedding followed by LayerNorm: (B, C, H, W) -> (B, T, D)."""

    def __init__(self, in_channels: int, dim: int, patch: int = PATCH):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch, stride=patch)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)                               # (B, D, H/16, W/16)
        return self.norm(x.flatten(2).transpose(1, 2))  # (B, T, D)


def decoder_groups(channels: int, max_groups: int = DECODER_GROUPS) -> int:
    """GroupNorm groups of a decoder stage: the largest divisor of ``channels`` that is at most
    ``max_groups`` (the study's rule; 12 channels -> 6 groups, 28 -> 7, 8 -> 8)."""
    return next(g for g in range(min(max_groups, channels), 0, -1) if channels % g == 0)


def decoder_channels(dim: int, stages: int = DECODER_STAGES) -> list[int]:
    """Output channels of each decoder stage: ``max(8, dim // 2^i)`` for i = 1..stages (the
    study's; tiny, D = 64: 32, 16, 8, 8)."""
    return [max(DECODER_MIN_CHANNELS, dim // 2 ** i) for i in range(1, stages + 1)]


class TokenDecoder(nn.Module):
    """Token grid -> per-pixel logits: 4 x [ConvT(k2, s2) -> GroupNorm -> GELU], then a 1x1 conv.

    Channels halve at every stage but never go below 8 (``decoder_channels``: D -> max(8, D/2)
    -> ... -> max(8, D/16)); GroupNorm takes ``decoder_groups`` groups. The spatial size doubles,
    so a g x g token grid becomes a 16g x 16g map: (B, D, g, g) -> (B, 1, 16g, 16g).
    """

    def __init__(self, dim: int, stages: int = DECODER_STAGES):
        super().__init__()
        layers: list[nn.Module] = []
        ch = dim
        for out in decoder_channels(dim, stages):
            layers += [nn.ConvTranspose2d(ch, out, kernel_size=2, stride=2),
                       nn.GroupNorm(decoder_groups(out), out), nn.GELU()]
            ch = out
        self.up = nn.Sequential(*layers)
        self.head = nn.Conv2d(ch, 1, kernel_size=1)  # PyTorch's default init, as the study's

    def forward(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        # tokens: (B, T, D) with T = gh * gw
        fmap = tokens.transpose(1, 2).unflatten(2, grid)  # (B, D, gh, gw)
        return self.head(self.up(fmap))                   # (B, 1, 16 gh, 16 gw)


def drop_path_rates(depth: int, max_rate: float) -> list[float]:
    """Stochastic-depth rates growing linearly: 0 at the first block, ``max_rate`` at the last."""
    if depth == 1:
        return [0.0]
    return [max_rate * i / (depth - 1) for i in range(depth)]


def init_logit_prior(head: nn.Module, prior: float = TUMOUR_PRIOR) -> None:
    """Start the one-logit head at a prior probability: bias = log(prior / (1 - prior)).

    Opt-in, off by default (``build_model(head_prior=...)``, ``--head-prior``; the study starts
    the CNN's head bias at 0 and the transformers' classifier at PyTorch's default). Tumour pixels
    are ~1 % of a slice; with the study's init the model starts near probability 0.5 everywhere,
    and at the study's learning rates the transformers spend many steps only lowering that level
    (RetinaNet's prior initialisation; it adds no parameter, draws nothing from the RNG and leaves
    every other weight as it is).
    """
    if not 0.0 < prior < 1.0:
        raise ValueError(f"head prior must be a probability in (0, 1), got {prior!r}")
    nn.init.constant_(head.bias, math.log(prior / (1.0 - prior)))


def init_transformer_weights(module: nn.Module) -> None:
    """The study's Swin init: linears truncated-normal(0.02) (bounds +-2, i.e. +-100 std) with zero
    bias; LayerNorm 1/0. (Its ViT leaves the linears at PyTorch's default.)"""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=INIT_STD)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def token_grid(image_size: int, patch: int = PATCH, *, who: str) -> int:
    """Side of the token grid, image_size / patch; a ValueError when it does not divide."""
    if image_size < patch or image_size % patch:
        raise ValueError(f"{who}: image_size must be a positive multiple of the patch size "
                         f"{patch}, got {image_size}")
    return image_size // patch


def check_input(x: torch.Tensor, image_size: int, in_channels: int, who: str) -> None:
    """Transformers are built for one image size (the position embedding): check the input."""
    if x.dim() != 4 or x.shape[1] != in_channels or x.shape[-2:] != (image_size, image_size):
        raise ValueError(f"{who}: expected input (B, {in_channels}, {image_size}, {image_size}), "
                         f"got {tuple(x.shape)}; build the model with image_size matching the data")
