"""Quantization roles and backward policies: what each GEMM operand of a quantized layer is.

The emulator's layers (``linear.py``, ``conv.py``) share everything in this module.

How a quantized layer trains
----------------------------
A linear layer with X (M x K, M tokens), W (N x K) and dY (M x N) runs three GEMMs. Each operand
is fake-quantized (quantize, then dequantize to fp32, ``nvfp4.fake_quantize``) in the role it has
in that GEMM, and the GEMM itself runs in fp32 on the dequantized operands (``gemm.gemm``); its
output goes back to the compute dtype and is never re-quantized (docs/nvfp4.md section 3)::

    fprop  Y  = Q(X) Q_w(W)^T       Q: 1x16 blocks along the contraction dim, RN
    dgrad  dX = B(dY) D(W)          contraction over N;  Q_w: 1x16 along K, or 16x16 tiles (2-D)
    wgrad  dW = B(dY^T) A(X^T)^T    contraction over the M tokens: copies run along M

``recipe.backward_override`` picks B, D, A (the registry ``BACKWARDS``; H is the RHT along the
tokens, in 16-token tiles, when ``recipe.rht``):

    None (quantized gradients: nvfp4_full, 2d_rht, 2d_rht_sr, sr_only)
        B(dY) = Q_sr(dY)            1x16 along N; SR when recipe.stochastic_rounding
        D(W)  = Q_w(W)              2-D: the forward's 16x16 copy itself (its exact transpose)
              = Q_N(W)              1-D: a fresh copy of the high-precision W, 1x16 along N
        B(dY^T) = Q_sr(dY^T H),  A(X^T) = Q(X^T H)       (H H^T = I cancels in the GEMM)
    "dequantized" (chain_rule)
        B = identity (high-precision dY), D(W) = Q_w(W) the forward's copy, A(X^T) = Q(X)^T
    "high_precision" (fwd_only; fwd_rht, whose forward uses 16x16 weight tiles)
        B, D, A = identity: dY times the original W and X (straight-through estimator)
    With an override no wgrad operand is quantized, so the RHT is not applied: rotating both
    unquantized operands by H would cancel in the GEMM (H H^T = I).

Each weight is quantized once per forward: the fprop copy is saved for dgrad (2-D and chain
rule); a 1-D recipe's dgrad needs its own copy along N, made in backward from W. The forward's
dequantized X is saved only when the wgrad reads it (chain rule). Bias gradients are
``sum_tokens dY`` from the high-precision dY.

Padding: a columnwise (wgrad) copy zero-pads the token count M to a multiple of 16 (the RHT
tiles need it; zeros change neither an amax nor a GEMM). K and N of a Linear / the channel counts
of a convolution must be multiples of 16 (``quantized`` raises ValueError naming the layer).
``QuantizedMatmul`` zero-pads its contraction and output dims instead (257 tokens with a CLS).

Choices made here
-----------------
- A baseline recipe (``quantized=False``): ``quantized(module, recipe)`` returns ``module`` itself,
  the baseline's twin being the high-precision layer.
- Stochastic rounding draws from the ``generator`` given to ``quantized`` / ``QuantizedMatmul``
  (on the layer's device); a recipe with SR and no generator raises ValueError (no hidden seed).
- Compute dtype: under autocast the input and the bias are cast to the autocast dtype, as
  torch's own layers cast them (TE, too, receives bf16 activations and casts the bias to the
  activation dtype); without autocast the bias is cast to the input's dtype. The forward output
  and dX come back in that dtype, dW in the parameter's dtype.
- Weights under autocast: the weight is never cast. Its NVFP4 copies (the fprop copy, and the
  dgrad copy of a 1-D recipe) are quantized from the parameter in its own dtype (the fp32
  master weight), because that is what Transformer Engine quantizes: its weight quantizer reads
  the fp32 parameter directly. Rounding W to bf16 first would change about 0.5-0.8 % of the
  E2M1 codes and 1.6-2.3 % of the block scales (measured against TE's source by the te helper).
  The high-precision parts of the backward follow the same rule, as TE does:
  fwd_only's and fwd_rht's dgrad multiplies the parameter itself (fp32; TE's high_precision dgrad
  reads the saved parameter) and their wgrad the layer's input in the compute dtype (TE saves the
  original bf16 input); chain_rule multiplies the forward's dequantized copies, kept in fp32 as
  docs/nvfp4.md section 2 says (TE dequantizes them to bf16: a documented difference, see the te
  backend). dY is used in the dtype it arrives in (bf16 under autocast).
- Convolution outputs and input gradients keep the input's memory format (channels_last or NCHW).
- Tensor amax of the attention matmul operands: one amax over the whole batched tensor.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from nvfp4bench.quant import kernels, nvfp4
from nvfp4bench.quant.formats import DEFAULT_FORMAT, FORMATS, Format
from nvfp4bench.quant.gemm import ConvGeometry
from nvfp4bench.quant.nvfp4 import BLOCK, padded_tokens
from nvfp4bench.quant.recipes import Recipe

ROW_BLOCK = (1, BLOCK)
TILE_2D = (BLOCK, BLOCK)


# --------------------------------------------------------------------------------------------
# Quantization roles (pure functions of the recipe and one generator)
# --------------------------------------------------------------------------------------------
def _rowwise(x: torch.Tensor, **kw) -> torch.Tensor:
    """fake_quantize with blocks along the last dim of an (..., R, C) tensor, one tensor amax."""
    return kernels.fake_quantize(x.reshape(-1, x.shape[-1]), **kw).view(x.shape)


def token_buffer(rows: int, m: int, device) -> torch.Tensor:
    """fp32 (rows, Mp) whose padding columns are zero; the caller fills ``[:, :m]``."""
    buf = torch.empty(rows, padded_tokens(m), device=device)
    buf[:, m:].zero_()
    return buf


def tokens_last_cnhw(src_cnhw: torch.Tensor) -> torch.Tensor:
    """The columnwise copy of a (C, N, H, W) view (an NCHW tensor permuted), tokens (N, H, W):
    fp32 (C, Mp), one copy."""
    c, n, h, w = src_cnhw.shape
    buf = token_buffer(c, n * h * w, src_cnhw.device)
    buf[:, :n * h * w].view(c, n, h, w).copy_(src_cnhw)
    return buf


@dataclass(frozen=True)
class Columnwise:
    """How a wgrad operand is made from its high-precision tokens-last copy (C, Mp).

    quantize: NVFP4, 1x16 blocks along the tokens (rotated first by the RHT when ``rht``; SR
    when ``sr``); otherwise the high-precision values.
    """

    quantize: bool = False
    rht: bool = False
    sr: bool = False
    kernels: str = "eager"  # how fake_quantize runs (kernels.KERNELS): the same bits
    format: Format = FORMATS[DEFAULT_FORMAT]  # the block format (formats.FORMATS)

    @property
    def deterministic_blocks(self) -> bool:
        """A quantized block is a function of its 16 values and the tensor amax alone (RN):
        a block that appears in several taps of an unfolded tensor may be quantized once."""
        return self.quantize and not self.sr

    @property
    def block(self) -> int:
        """Elements per scale block along the tokens."""
        return self.format.block

    def apply(self, buf: torch.Tensor, generator=None, amax=None) -> torch.Tensor:
        """The operand from the tokens-last fp32 ``buf`` (one chunk of it: ``amax`` is then the
        whole tensor's, of the rotated tensor with the RHT; None: the chunk's own)."""
        if not self.quantize:
            return buf
        return kernels.fake_quantize(buf, rht=self.rht, sr=self.sr, amax=amax,
                                     generator=generator if self.sr else None,
                                     kernels=self.kernels, format=self.format)

    def of_tokens(self, t: torch.Tensor, generator=None) -> torch.Tensor:
        """``apply(nvfp4.columnwise_copy(t))`` for an (..., M, C) tensor; with
        ``kernels.fake_quantize_columnwise`` (no copy first with compiled kernels) when no RHT
        comes first."""
        if self.quantize and not self.rht:
            return kernels.fake_quantize_columnwise(t, sr=self.sr, kernels=self.kernels,
                                                    generator=generator if self.sr else None,
                                                    format=self.format)
        return self.apply(nvfp4.columnwise_copy(t), generator)


HIGH_PRECISION = Columnwise()


@dataclass(frozen=True)
class Roles:
    """How each GEMM operand is quantized under one recipe (docs/nvfp4.md section 3).

    weight_tile: (16, 16) for a 2-D recipe's weights; (1, 16) otherwise and for the second
    operand of an attention matmul, which is an activation. kernels: how every fake_quantize
    of the layer runs (``kernels.KERNELS``; speed only, the same bits). format: the block format
    every operand is quantized to (``formats.FORMATS``; a 2-D weight tile is then that format's
    block x block).
    """

    recipe: Recipe
    generator: torch.Generator | None = None
    weight_tile: tuple[int, int] = ROW_BLOCK
    kernels: str = "eager"
    format: Format = FORMATS[DEFAULT_FORMAT]

    def __post_init__(self) -> None:
        kernels.check_kernels(self.kernels)

    @property
    def rht(self) -> bool:
        return self.recipe.rht

    @property
    def sr(self) -> bool:
        return self.recipe.stochastic_rounding

    # fprop: X rowwise RN, W in its tiles RN
    def activation(self, x: torch.Tensor) -> torch.Tensor:
        return _rowwise(x, kernels=self.kernels, format=self.format)

    def weight(self, w: torch.Tensor) -> torch.Tensor:
        return _rowwise(w, tile=self.weight_tile, kernels=self.kernels, format=self.format)

    def forward_operands(self, x: torch.Tensor,
                         w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(activation(x), weight(w))`` for a 2-D w, in one kernel call."""
        xq, wq = kernels.fake_quantize_pair(x.reshape(-1, x.shape[-1]), w,
                                            w_tile=self.weight_tile, kernels=self.kernels,
                                            format=self.format)
        return xq.view(x.shape), wq

    # dgrad: dY rowwise along N (SR), W^T along N
    def gradient(self, dy: torch.Tensor) -> torch.Tensor:
        return _rowwise(dy, sr=self.sr, generator=self.generator, kernels=self.kernels,
                        format=self.format)

    def weight_t(self, w: torch.Tensor | None, wq: torch.Tensor | None) -> torch.Tensor:
        if self.weight_tile == TILE_2D:
            return wq.mT  # the forward's 16x16 tiles, transposed: one W in both passes
        return _rowwise(w.mT, kernels=self.kernels, format=self.format)  # a fresh copy along N

    # wgrad: tokens-last copies along M, RHT when on; the gradient with SR
    @property
    def gradient_columns(self) -> Columnwise:
        return Columnwise(quantize=True, rht=self.rht, sr=self.sr, kernels=self.kernels,
                          format=self.format)

    @property
    def activation_columns(self) -> Columnwise:
        return Columnwise(quantize=True, rht=self.rht, kernels=self.kernels, format=self.format)


# --------------------------------------------------------------------------------------------
# What the backward multiplies: one policy per recipe.backward_override
# --------------------------------------------------------------------------------------------
class QuantizedGradients:
    """``backward_override=None``: dgrad Q_sr(dY) D(W); wgrad Q_sr(dY^T H) Q(X^T H)^T."""

    def reads_forward_x(self, roles: Roles) -> bool:
        return False

    def reads_forward_w(self, roles: Roles) -> bool:
        return roles.weight_tile == TILE_2D

    def dgrad_operands(self, roles, dy, w, wq):
        return roles.gradient(dy), roles.weight_t(w, wq)

    def wgrad_columns(self, roles) -> tuple[Columnwise, Columnwise]:
        """(gradient, activation): how the wgrad's dY^T and X^T are made."""
        return roles.gradient_columns, roles.activation_columns


class ChainRule:
    """``"dequantized"``: dY in high precision times the forward's dequantized W and X."""

    def reads_forward_x(self, roles):
        return True

    def reads_forward_w(self, roles):
        return True

    def dgrad_operands(self, roles, dy, w, wq):
        return dy.float(), wq.mT

    def wgrad_columns(self, roles):
        return HIGH_PRECISION, HIGH_PRECISION  # X^T: the forward's Q(X), read from ctx


class StraightThrough:
    """``"high_precision"``: the original W and X (the straight-through estimator); fwd_only,
    and fwd_rht, whose forward differs only by its 16x16 weight tiles."""

    def reads_forward_x(self, roles):
        return False

    def reads_forward_w(self, roles):
        return False

    def dgrad_operands(self, roles, dy, w, wq):
        return dy.float(), w.mT.float()

    def wgrad_columns(self, roles):
        return HIGH_PRECISION, HIGH_PRECISION


BACKWARDS = {None: QuantizedGradients(), "dequantized": ChainRule(),
             "high_precision": StraightThrough()}


@dataclass(frozen=True)
class Op:
    """Everything a quantized op's autograd function needs besides tensors."""

    roles: Roles
    name: str
    geometry: ConvGeometry | None = None

    @property
    def policy(self):
        """What the backward GEMMs multiply: ``BACKWARDS[recipe.backward_override]``."""
        return BACKWARDS[self.roles.recipe.backward_override]
