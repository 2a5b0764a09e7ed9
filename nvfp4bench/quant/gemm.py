"""The fp32 GEMM every emulated NVFP4 GEMM runs, and the implicit-GEMM geometry of a convolution.

Why a module of its own: an fp32 matrix product is bit-reproducible only for the same call (the
same shapes, memory layouts and operand order pick the same BLAS kernel and summation order).
``nvfp4bench.quant``'s layers and the reference that its tests build from ``nvfp4.quantize`` /
``dequantize`` both call :func:`gemm`, and a convolution's implicit GEMM is always summed tap by
tap in the order of :meth:`ConvGeometry.taps`, so that the tests can demand bit-for-bit equality
and thereby check the quantization roles, not BLAS.

The GEMM formulation (the emulator's definition, docs/nvfp4.md sections 3 and 6)::

    gemm(a, b) = a @ b^T        a (..., M, K), b (..., N, K), fp32 in and out, contiguous
    conv fprop   Y  = sum_t gemm(A_t, B_t)        t = 0 .. kh*kw - 1 in order, Y starts at 0
    conv dgrad   dX = sum_t col2im_t(gemm(G, B_t))  scatter-added in tap order into zeros
    conv wgrad   dW_t = gemm(G^T, A_t^T)           one GEMM per tap, contraction over tokens

where ``A_t`` is tap t of im2col(X) (K = (kh, kw, C_in), C_in fastest, so a tap is a contiguous
run of C_in columns) and ``B_t`` the weight's columns of that tap. Wgrad operands are stored
tokens-last, ``(C, Mp)``, with the token count M zero-padded to ``Mp``, a multiple of 16 (zeros
change neither an amax nor a product).

The layers never materialise the zero-padded input: ``ConvGeometry.window`` (``axis_window`` per
axis) gives, for tap t, the output pixels that read real input pixels and those input pixels;
the others read padding zeros, which quantize to zeros and add nothing.

fp32 means fp32: the products run at torch's float32 matmul precision, which must stay at its
default ("highest"; no TF32) for the emulator to mean what docs/nvfp4.md says. Nothing here
changes it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def gemm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``a @ b^T`` in fp32: a (..., M, K), b (..., N, K) -> (..., M, N).

    Both operands are made fp32 and contiguous first, so the BLAS call (and its summation order)
    depends only on values and shapes, never on the strides of the views passed in. ``out``
    (contiguous fp32, the result's shape) is written instead of a new tensor: the same kernel
    (a product with beta = 0), the same bits; it saves a large allocation per convolution tap.
    """
    a, b = a.float().contiguous(), b.float().contiguous().transpose(-1, -2)
    if out is None:
        return torch.matmul(a, b)
    return torch.matmul(a, b, out=out)


def bias_grad(dy_tokens: torch.Tensor) -> torch.Tensor:
    """``db = sum over tokens of dY``: dy_tokens (M, N) -> (N,), fp32, high-precision dY."""
    return dy_tokens.float().contiguous().sum(0)


def axis_window(offset: int, stride: int, pad: int, n_out: int, n_in: int) -> tuple[slice, slice]:
    """Along one axis, the outputs ``o`` in [0, n_out) that read input ``o * stride + offset -
    pad`` inside [0, n_in), as a slice of outputs and the slice (step ``stride``) of inputs they
    read; empty slices when there are none. Outputs outside the slice read zero padding."""
    lo = max(0, -((offset - pad) // stride))  # ceil((pad - offset) / stride)
    hi = min(n_out, (n_in - 1 + pad - offset) // stride + 1)
    if hi <= lo:
        return slice(0, 0), slice(0, 0)
    start = lo * stride + offset - pad
    return slice(lo, hi), slice(start, start + (hi - lo - 1) * stride + 1, stride)


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


@dataclass(frozen=True)
class ConvGeometry:
    """Kernel, stride, padding and dilation of a 2-D convolution, as implicit-GEMM taps.

    Tap ``t = i * kw + j`` reads, for output pixel (oh, ow), the zero-padded input pixel
    ``(oh * stride_h + i * dil_h, ow * stride_w + j * dil_w)``. ConvTranspose2d uses the geometry
    of the Conv2d it is the adjoint of (input and output swapped).
    """

    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]

    @classmethod
    def of(cls, kernel, stride, padding, dilation) -> "ConvGeometry":
        return cls(_pair(kernel), _pair(stride), _pair(padding), _pair(dilation))

    @property
    def taps(self) -> int:
        return self.kernel[0] * self.kernel[1]

    def out_size(self, h: int, w: int) -> tuple[int, int]:
        """Conv2d output size for an (h, w) input (PyTorch's formula)."""
        return tuple((n + 2 * p - d * (k - 1) - 1) // s + 1 for n, p, d, k, s in zip(
            (h, w), self.padding, self.dilation, self.kernel, self.stride))

    def offset(self, t: int) -> tuple[int, int]:
        """(row, column) offset of tap t in the zero-padded input: ``(i * dil_h, j * dil_w)``."""
        i, j = divmod(t, self.kernel[1])
        return i * self.dilation[0], j * self.dilation[1]

    def window(self, t: int, out_h: int, out_w: int, in_h: int, in_w: int):
        """Tap t without the padding: ``((out_rows, out_cols), (in_rows, in_cols))``, the output
        pixels whose input pixel lies inside the (unpadded) input, and those input pixels."""
        (oi, oj), (sh, sw), (ph, pw) = self.offset(t), self.stride, self.padding
        rows = axis_window(oi, sh, ph, out_h, in_h)
        cols = axis_window(oj, sw, pw, out_w, in_w)
        return (rows[0], cols[0]), (rows[1], cols[1])
