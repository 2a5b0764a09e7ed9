"""The native CPU kernels: ``native_nvfp4.cpp`` (NVFP4 ``fake_quantize`` in C++, the same bits
as the PyTorch code), built on first use with torch's C++-extension tools and loaded.

Why: a ``torch.compile`` kernel call costs ~40-60 us of dynamo and AOTAutograd wrappers in
Python whatever its size, about as much as the arithmetic of a transformer layer's operand; a
call into this module costs a few microseconds. It needs a C++ compiler (as inductor's CPU
kernels do) and ninja (``requirements-common.txt``), and is built with the compiler's ``-march=native``, so the shared object is
kept per CPU (its instruction-set flags are part of the module name) in
``$XDG_CACHE_HOME/nvfp4bench/native`` (``~/.cache/nvfp4bench/native``; the first build takes
~25 s, a later process loads it in ~0.1 s). Deleting the folder is safe.

``load()`` returns the module, or raises ``NativeUnavailable`` saying why (no compiler, a build
error, not Linux/x86); ``kernels.py`` decides what to do then.
"""
from __future__ import annotations

import functools
import hashlib
import platform
from pathlib import Path

from nvfp4bench.quant.compile_cache import user_cache_folder

SOURCE = Path(__file__).with_name("native_nvfp4.cpp")
# No fused multiply-add, no fast math: each fp32 operation rounds once, as PyTorch's do.
CFLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-fast-math", "-fno-trapping-math"]


class NativeUnavailable(RuntimeError):
    """The native kernels cannot be built or loaded here."""


def build_folder() -> Path:
    """``$XDG_CACHE_HOME/nvfp4bench/native`` (``~/.cache/nvfp4bench/native``)."""
    return user_cache_folder() / "native"


def _cpu_flags() -> str:
    """The CPU's instruction-set flags (``/proc/cpuinfo``), the machine name elsewhere."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def module_name() -> str:
    """One name per CPU flags, source and flags: a ``-march=native`` build never meets
    another CPU, even in a cache folder shared by several machines."""
    key = "\n".join([_cpu_flags(), " ".join(CFLAGS), SOURCE.read_text()])
    return "nvfp4bench_native_" + hashlib.blake2b(key.encode(), digest_size=8).hexdigest()


def supported() -> bool:
    """Whether this platform is one the native kernels are built for (Linux x86-64)."""
    return platform.system() == "Linux" and platform.machine() in ("x86_64", "AMD64")


@functools.lru_cache(maxsize=1)
def _load_or_error():
    """(module, None) or (None, the reason it is unavailable): tried once per process."""
    if not supported():
        return None, f"native kernels are built on Linux x86-64 only, not {platform.platform()}"
    try:
        from torch.utils import cpp_extension  # imported only where the kernels are built

        folder = build_folder() / module_name()
        folder.mkdir(parents=True, exist_ok=True)
        module = cpp_extension.load(name=module_name(), sources=[str(SOURCE)],
                                    extra_cflags=CFLAGS, build_directory=str(folder),
                                    verbose=False)
        return module, None
    except Exception as err:  # noqa: BLE001 - any build or load failure is reported, not raised
        return None, f"{type(err).__name__}: {str(err)[-500:]}"


def load():
    """The built module (``fake_quantize_rows``, ``fake_quantize_columns``)."""
    module, error = _load_or_error()
    if module is None:
        raise NativeUnavailable(error)
    return module


def available() -> bool:
    """Whether ``load()`` succeeds here (builds on the first call)."""
    return _load_or_error()[0] is not None


def unavailable_reason() -> str:
    """Why ``load()`` fails here ("" where it succeeds)."""
    return _load_or_error()[1] or ""
