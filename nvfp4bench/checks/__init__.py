"""Checks and micro-benchmarks of an installation: ``python -m nvfp4bench.bench``,
``python -m nvfp4bench.verify_te``, ``python -m nvfp4bench.gpu_check``.

    bench.py            the quantizer against a copy; training steps per recipe
    verify_te.py        the emulator against Transformer Engine, bit for bit
    te_cases.py         the cases verify_te runs
    gpu_check.py        one command for a GPU machine: exactness on CUDA, timings, GPU-hours
    gpu_check_bits.py   its CUDA-against-CPU comparisons
    gpu_check_train.py  its timed training epochs and the study's projected cost
"""
