"""nvfp4bench: a benchmark of NVFP4 quantization-aware training for tumour segmentation."""
__version__ = "0.1.0"
