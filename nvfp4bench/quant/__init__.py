"""NVFP4 quantization-aware training for any PyTorch model: the arithmetic, the layers, the swap
(and the same in MXFP4, MXFP8 and NVFP4 four over six: ``formats.py``).

The package sits at the bottom of nvfp4bench's import graph (it imports nothing else from
nvfp4bench). Its modules, from the bottom up::

    recipes.py   the eight QAT recipes (+ baselines): TE-named switches
    nvfp4.py     the reference NVFP4 arithmetic: scales, E2M1 cast, RHT, quantize / dequantize
    mx.py        MX block scaling: E8M0 scale rules, the E2M1 / E4M3 element casts
    four_over_six.py  NVFP4 four over six: the per-block choice of the scale to 4 or to 6
    formats.py   the block formats (nvfp4, nvfp4_4over6, mxfp4, mxfp8, ...); quantize /
                 dequantize in any of them
    kernels.py   fake_quantize (the QAT hot path) as eager PyTorch or compiled kernels
    gemm.py      the fp32 GEMM and a convolution's implicit-GEMM geometry
    roles.py     how each GEMM operand is quantized, per recipe (fprop, dgrad, wgrad)
    autograd.py  what the quantized autograd functions share (fp32 region, dtypes, saving)
    matmul.py    Matmul: the plain attention-matmul layer the models use
    linear.py    QuantizedLinearFunction / QuantizedLinear, QuantizedMatmul
    taps.py      im2col / col2im one tap at a time, the unfolded wgrad operand
    conv.py      Quantized(Conv2d|ConvTranspose2d)Function and their modules
    twins.py     quantized(module, recipe): a layer's NVFP4 twin
    swap.py      quantize_model / high_precision: swapping a model's layers
    backends.py  BACKENDS: who runs the quantized layers, in which run context
    te/          the Transformer Engine backend (TE imported only when used)
"""
from nvfp4bench.quant.formats import (FORMATS, BlockScaledTensor, Format, dequantize, get_format,
                                      quantize)
from nvfp4bench.quant.kernels import fake_quantize
from nvfp4bench.quant.nvfp4 import NVFP4Tensor, pack
from nvfp4bench.quant.recipes import RECIPES, STUDY_RECIPES, Recipe, get_recipe
from nvfp4bench.quant.swap import high_precision, quantizable_layers, quantize_model
from nvfp4bench.quant.twins import quantized

__all__ = ["BlockScaledTensor", "FORMATS", "Format", "NVFP4Tensor", "RECIPES", "STUDY_RECIPES",
           "Recipe", "dequantize", "fake_quantize", "get_format", "get_recipe", "high_precision",
           "pack", "quantizable_layers", "quantize", "quantize_model", "quantized"]
