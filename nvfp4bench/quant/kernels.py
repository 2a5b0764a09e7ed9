"""How ``fake_quantize``, the QAT hot path, runs: eager PyTorch, native C++ or compiled kernels.

The arithmetic is ``nvfp4bench.quant.nvfp4``'s; this module only executes it. The other block
formats (``format=``: MXFP4, MXFP8, four over six) run ``formats.fake_quantize_prepared``, in
eager PyTorch whatever the kernels.

Kernels (speed only; the bits are the same)
-------------------------------------------
``fake_quantize`` makes two passes over the tensor: the block amax, then the elementwise
``x -> x_hat`` (scale, E2M1 cast, dequantize), with the scale math on the small (M, K/16) block
tensors in between. They run as

- ``"eager"`` (the default): PyTorch operations; on a one-thread CPU in row chunks of
  ``EAGER_CHUNK`` elements so that the temporaries stay in cache;
- ``"native"``: ``native_nvfp4.cpp``, the same arithmetic in C++ (CPU only; built on first use
  by ``native.py``, ~25 s once per machine), one call of a few microseconds' overhead;
- ``"compiled"``: one graph made by ``torch.compile`` per call (inductor's C++ on the CPU,
  Triton on CUDA), ~40-60 us of dynamo overhead per call;
- ``"auto"``: native for CPU tensors below ``NATIVE_MAX_NUMEL`` elements (2^23 for RN, 2^20
  for SR) where the native kernels build, else compiled for CPU tensors of at least
  ``COMPILE_MIN_NUMEL`` elements (eager, with one warning, when compiling fails); eager on CUDA.

Pick one with the ``kernels=`` argument (the quantized layers carry it in their ``Roles``;
``quantize_model(..., kernels=...)`` sets it for a model). All run the same operations in the
same order (``dequantize_blocks``, ``block_scales_f32``); the only difference is the E4M3
rounding of the block scales, the FP8 cast in eager and exact fp32 arithmetic in the kernels
(tested equal on every rounding boundary). Every fp32 operation on x is a product, a scaling by
a power of two, a round/floor or a comparison: no sum that contraction (FMA) or reassociation
could change, and both C++ builds keep ``-ffp-contract=off`` and no fast math anyway. The tests
check every kernel against the NumPy reference, bit for bit. SR draws its random bits eagerly
from the caller's ``torch.Generator``, so all kernels consume the same bits.

A compiled call costs tens of microseconds of dynamo overhead whatever its size, which matters
for a transformer's small layers: ``fake_quantize_pair`` quantizes a layer's forward X and W in
one call (one thread, fwd + bwd of a stack of eight 192 x 192 quantized Linears on 512 tokens:
24.2 -> 22.6 ms; ``benchmarks/bench_layers.py layers``, Linear 576->192: 6.15 -> 5.85 ms).
Fusing a Linear's four backward quantizations into one graph was measured slower on the same
stack (23.4 -> 26.9 ms), and again on a whole vit tiny ``nvfp4_full`` step (1.65x -> 1.69x the
fp32 step, 128 px, batch 8, one thread), so the backward makes one call per operand.
"""
from __future__ import annotations

import functools
import math
import warnings

import torch

from nvfp4bench.quant import native
from nvfp4bench.quant.compile_cache import (persistent_compile_cache,
                                            record_vec_isa_probe, vec_isa_options)
from nvfp4bench.quant.formats import Format, fake_quantize_prepared, get_format
from nvfp4bench.quant.nvfp4 import (BLOCK, block_amax, block_scales_f32, check_2d, check_sr,
                                    check_tokens_first, columnwise_copy, dequantize_blocks,
                                    device_rht_matrix, draw_noise, e4m3_cast, e4m3_round,
                                    grid_steps_compare, padded_tokens, prepare_operand,
                                    row_blocks, tile_amax)
from nvfp4bench.quant.nvfp4 import rht as nvfp4_rht

KERNELS = ("eager", "compiled", "native", "auto")  # how fake_quantize runs: the same bits
# "auto" compiles tensors with at least this many elements. One compiled call costs ~40 us of
# dynamo overhead; it still beat eager from 192 elements up (1 thread: 60 vs 100 us), so the bound
# only keeps tiny tensors (and their size-1 recompilations) eager.
COMPILE_MIN_NUMEL = 1 << 12

# "auto" quantizes CPU tensors below this many elements with the native kernels, larger ones
# with the compiled kernels, per rounding. Measured, one thread, fp32, median per call, native /
# compiled: (520, 192) RN 68 / 138 us, SR 253 / 316 us; 1024^2 RN 0.9 / 1.3 ms, SR 2.4 / 2.5
# ms; 2048^2 RN 7.3 / 10.1 ms, SR 12.3 / 10.2 ms; 4096^2 RN 70 / 56 ms.
NATIVE_MAX_NUMEL = {"rn": 1 << 23, "sr": 1 << 20}

EAGER_CHUNK = 1 << 18  # elements per chunk of the eager CPU path: its temporaries stay in cache


# Compiled kernels: each is one torch.compile graph (one call, one set of guards: the per-call
# overhead, not the arithmetic, dominates the small tensors of a transformer's layers), one
# function per rounding (dynamo's recompilation limit counts per function). The per-block scales
# and the tensor's S_dec are returned as well: an output is computed once (S_dec once per call, the
# scales vectorised over blocks), where an intermediate would be inlined into the elementwise loop
# and recomputed there (scalar code with three divisions per block; measured on (520, 192): 121 us
# per call against 146 us; S_dec an output: 4096^2 RN 74 -> 60 ms, one thread). The E2M1 cast
# finds its grid step by comparisons (``grid_steps_compare``), which the C++ code vectorises, not
# from the exponent bits (an int32 <-> fp32 bit cast goes through memory there: 99 -> 74 ms).
def _fake_quantize_graph(x3, tile_rows: int, amax, noise, mode: str):
    """Block amax, tile max, tensor amax (unless given), scales and x_hat of (M, K/16, 16) x3."""
    bamax = tile_amax(block_amax(x3), tile_rows)
    if amax is None:
        amax = bamax.amax()
    scale, encode, s_dec = block_scales_f32(bamax, amax, e4m3_round)  # FP8 rounding in fp32
    out = dequantize_blocks(x3, scale, encode, s_dec, noise, mode, grid_steps=grid_steps_compare)
    return out, scale, encode, s_dec


def _pair_kernel(x3, w3, w_tile_rows: int):
    """The fprop's two operands in one graph (one call per layer forward, not two): x along its
    rows in 1x16 blocks, w in its tiles; each RN with its own tensor amax."""
    return (_fake_quantize_graph(x3, 1, None, None, "rn")[0],
            _fake_quantize_graph(w3, w_tile_rows, None, None, "rn")[0])


def _rn_kernel(x3, tile_rows: int, amax):
    return _fake_quantize_graph(x3, tile_rows, amax, None, "rn")


def _sr_kernel(x3, tile_rows: int, amax, noise, mode: str):
    return _fake_quantize_graph(x3, tile_rows, amax, noise, mode)


def _fake_quantize_compiled(x: torch.Tensor, tile_rows: int, amax, noise, mode: str):
    """The compiled path: one kernel call on 1x16 blocks (M, K/16, 16), whatever the tile;
    reshaping outside it keeps every view a view (inside, dynamic shapes would make
    ``view(M, K)`` a copy)."""
    x3 = _plain(row_blocks(x))
    if noise is None:
        out = _compiled(_rn_kernel)(x3, tile_rows, amax)[0]
    else:
        out = _compiled(_sr_kernel)(x3, tile_rows, amax, _plain(noise.view(x3.shape)), mode)[0]
    return out.view(x.shape)


def _plain(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a tensor that is not a view (``detach`` drops ``_base``; same data): dynamo
    guards a view's base layout too, and each new base layout would cost a recompilation."""
    return t.detach()


def _columns_graph(x3, mp: int, amax, noise, mode: str):
    """fake_quantize of each ``x3[b]^T`` (C, Mp) computed in x's own (B, M, C) layout, where a
    block is 16 consecutive rows of one column (read along the contiguous C, no transposed copy
    first); returns (B, C, Mp / 16, 16), the transposed layout, written once."""
    b, m, c = x3.shape
    blocks = torch.constant_pad_nd(x3, (0, 0, 0, mp - m)).view(b, mp // BLOCK, BLOCK, c)
    bamax = blocks.abs().amax(dim=2, keepdim=True)  # (B, Mp/16, 1, C)
    if amax is None:
        amax = bamax.amax()
    scale, encode, s_dec = block_scales_f32(bamax, amax, e4m3_round)
    if noise is not None:  # drawn for the (B * C, Mp) result: element [b, c, t] for token t
        noise = noise.view(b, c, mp // BLOCK, BLOCK).permute(0, 2, 3, 1)
    out = dequantize_blocks(blocks, scale, encode, s_dec, noise, mode,
                            grid_steps=grid_steps_compare)
    return out.permute(0, 3, 1, 2).contiguous(), scale, encode, s_dec


def _columns_rn_kernel(x3, mp: int, amax):
    return _columns_graph(x3, mp, amax, None, "rn")


def _columns_sr_kernel(x3, mp: int, amax, noise, mode: str):
    return _columns_graph(x3, mp, amax, noise, mode)


def _fake_quantize_columns_compiled(x: torch.Tensor, amax, noise, mode: str):
    """(..., M, C) x -> (prod(...) * C, Mp), as one (B, M, C) kernel call."""
    m, c = x.shape[-2:]
    x3, mp = _plain(x.reshape(-1, m, c)), padded_tokens(m)
    if noise is None:
        out = _compiled(_columns_rn_kernel)(x3, mp, amax)[0]
    else:
        out = _compiled(_columns_sr_kernel)(x3, mp, amax, _plain(noise), mode)[0]
    return out.view(-1, mp)


def _fake_quantize_columns_eager(x: torch.Tensor, amax, noise, mode: str):
    """Eager: the copy first, then the (chunked) eager path; faster in eager PyTorch than
    ``_columns_graph`` on large CPU tensors (about 2x on 4096 x 1024, one thread)."""
    return _fake_quantize_eager(columnwise_copy(x), 1, amax, noise, mode)


_NATIVE_MODES = {"rn": 0, "hardware": 1, "ideal": 2}  # native_nvfp4.cpp's Mode


def _fake_quantize_native(x: torch.Tensor, tile_rows: int, amax, noise, mode: str):
    """The C++ kernel (``native.py``): one call, no Python between its two passes."""
    return native.load().fake_quantize_rows(x, tile_rows, amax, noise, _NATIVE_MODES[mode])


def _fake_quantize_columns_native(x: torch.Tensor, amax, noise, mode: str):
    """(..., M, C) x -> (prod(...) * C, Mp) by the C++ kernel, which reads the blocks in x's
    layout and writes them transposed."""
    m, c = x.shape[-2:]
    return native.load().fake_quantize_columns(x.reshape(-1, m, c), padded_tokens(m), amax,
                                               noise, _NATIVE_MODES[mode])


def _chunked_eager() -> bool:
    """Chunk the eager CPU path only on one intra-op thread. Measured on 4096 x 4096 on a shared
    2-core machine: one thread, 2**18-element chunks are 3.5x faster than whole tensors; two
    threads, every op of every chunk is a parallel region whose wake-ups, when the machine is
    oversubscribed, cost more than the cache saves (medians 0.5-2.3x slower, 10x outliers)."""
    return torch.get_num_threads() == 1


def _row_chunks(rows: int, row_numel: int, device) -> list:
    """Slices of the rows of about ``EAGER_CHUNK`` elements each (one slice on a GPU, or when
    ``_chunked_eager()`` says no)."""
    if device.type != "cpu" or rows * row_numel <= EAGER_CHUNK or not _chunked_eager():
        return [slice(0, rows)]
    step = max(1, EAGER_CHUNK // row_numel)
    return [slice(i, i + step) for i in range(0, rows, step)]


def _fake_quantize_eager(x: torch.Tensor, tile_rows: int, amax, noise, mode: str):
    """The eager path: the same functions, chunk by chunk on the CPU so that every temporary is
    small and stays in cache; the output is the only full-size new tensor."""
    x3 = row_blocks(x)
    chunks = _row_chunks(x.shape[0], x.shape[1], x.device)
    bamax = x3.new_empty((x3.shape[0], x3.shape[1], 1))
    for c in chunks:
        torch.amax(x3[c].abs(), dim=-1, keepdim=True, out=bamax[c])
    bamax = tile_amax(bamax, tile_rows)
    if amax is None:
        amax = bamax.amax()
    scale, encode, s_dec = block_scales_f32(bamax, amax, e4m3_cast)
    noise = None if noise is None else noise.view(x3.shape)
    out = torch.empty_like(x3)
    for c in chunks:
        dequantize_blocks(x3[c], scale[c], encode[c], s_dec, None if noise is None else noise[c], mode,
                     out=out[c])
    return out.view(x.shape)


# --------------------------------------------------------------------------------------------
# Backends
# --------------------------------------------------------------------------------------------
# What happened to compilation in this process (a cache of outcomes, not a choice): after a
# failed compilation "auto" stays eager.
_state = {"compile_error": None, "recompile_limit_warned": False, "vec_isa_recorded": False,
          "native_warned": False}
_compiled_kernels: dict = {}


def check_kernels(kernels: str) -> str:
    """``kernels`` if it is one of ``KERNELS``; a ValueError listing them otherwise."""
    if kernels not in KERNELS:
        raise ValueError(f"kernels must be one of {KERNELS}, got {kernels!r}")
    return kernels


def _use_compiled(x: torch.Tensor, kernels: str) -> bool:
    """Whether a torch.compile kernel runs on x: under ``"compiled"``, and under ``"auto"`` for
    CPU tensors of at least ``COMPILE_MIN_NUMEL`` elements while compiling works."""
    if check_kernels(kernels) in ("eager", "native") or x.numel() == 0:
        return False
    if kernels == "compiled":
        return True
    # auto: CPU only. On CUDA inductor emits Triton, whose fp32 division and reciprocal need not
    # be IEEE-rounded (the scale math divides); untested there, and eager is fast on a GPU.
    return (x.device.type == "cpu" and _state["compile_error"] is None
            and x.numel() >= COMPILE_MIN_NUMEL)


def _choose(x: torch.Tensor, kernels: str, sr: bool = False) -> str:
    """Which kernels quantize x (with SR when ``sr``): ``"native"`` (the C++ kernels,
    ``native.py``), ``"compiled"`` or ``"eager"``. ``"auto"`` takes the native kernels for CPU
    tensors of fewer than ``NATIVE_MAX_NUMEL`` elements (per rounding) where they build, else
    what ``_use_compiled`` says; on CUDA it stays eager."""
    if check_kernels(kernels) == "native" and x.numel():
        if x.device.type != "cpu":
            raise ValueError(f"kernels='native' runs CPU tensors only, got one on {x.device}")
        native.load()  # NativeUnavailable, saying why, where they cannot be built
        return "native"
    limit = NATIVE_MAX_NUMEL["sr" if sr else "rn"]
    if (kernels == "auto" and 0 < x.numel() < limit and x.device.type == "cpu"
            and _native_available()):
        return "native"
    return "compiled" if _use_compiled(x, kernels) else "eager"


def _native_available() -> bool:
    """``native.available()``; the first time it is not on a platform they are built for, one
    warning says why (``"auto"`` then uses the compiled kernels or eager PyTorch: the same
    bits, slower)."""
    if native.available():
        return True
    if native.supported() and not _state["native_warned"]:
        _state["native_warned"] = True
        warnings.warn(f"nvfp4: native kernels unavailable, using torch.compile or eager ones "
                      f"({native.unavailable_reason()[:300]})", RuntimeWarning, stacklevel=4)
    return False


def _compiled(kernel):
    """``torch.compile(kernel)``, made on first use, with dynamic shapes: one compilation serves
    every shape (a new one for a size-1 dimension, the other tile, SR mode or a given amax: at
    most 2 per function over every model and recipe in ``benchmarks/bench_layers.py steps``),
    cached on disk in ``persistent_compile_cache()``, without inductor's vector-ISA probe where
    an earlier process recorded its outcome (``compile_cache``). The arithmetic's Python float
    constants (``E4M3_MAX``, ...) are traced as the constants they are (``_static_floats``)."""
    fn = _compiled_kernels.get(kernel.__name__)
    if fn is None:
        persistent_compile_cache()
        options = _ieee_inductor_options() | vec_isa_options()
        compiled = torch.compile(kernel, dynamic=True, fullgraph=True, options=options)
        fn = _compiled_kernels[kernel.__name__] = _static_floats(compiled)
    return fn


def _static_floats(compiled):
    """``compiled`` tracing the Python floats it reads from modules (``E4M3_MAX``, ...) as the
    constants they are. Under ``dynamic=True`` dynamo first traces such a float as a symbolic
    input, finds that it must be a constant and traces the kernel again: ~1.4 s more on the
    first call of a process, for the same graph. The setting is patched in only for the first
    call of each kind (its non-tensor arguments, and which arguments are tensors): patching it
    costs ~10 us, as much as a tenth of a small kernel's call, and a kind seen before is traced
    already."""
    import torch._dynamo.config as dynamo_config  # after persistent_compile_cache(): see there

    traced = set()

    def call(*args):
        kind = tuple(torch.Tensor if isinstance(a, torch.Tensor) else a for a in args)
        if kind in traced:
            return compiled(*args)
        with dynamo_config.patch(specialize_float=True):
            out = compiled(*args)
        traced.add(kind)
        return out

    return call


EMULATED_CASTS = "emulate_precision_casts"  # inductor: keep a cast to bf16 and back a rounding


def _ieee_inductor_options() -> dict:
    """Inductor options that make its code round as eager PyTorch does: fp32 ``x / y`` and
    ``1 / x`` as IEEE divisions (``div_rn``; Triton's default ``div.full`` is approximate) and no
    flushing of subnormals to zero (GPU code only); and a cast to bf16 and back kept as the
    rounding it is (``EMULATED_CASTS``; without it inductor drops the round trip, on the CPU
    too). Only the options this torch version knows."""
    known = _known_inductor_options()
    wanted = {"eager_numerics.division_rounding": True, "eager_numerics.disable_ftz": True,
              EMULATED_CASTS: True}
    return {k: v for k, v in wanted.items() if k in known}


@functools.lru_cache(maxsize=1)
def _known_inductor_options() -> frozenset:
    """The names of this torch's inductor options, read once (a copy of its config: ~0.2 ms)."""
    import torch._inductor.config as inductor_config  # after persistent_compile_cache(): see there

    return frozenset(inductor_config.get_config_copy())


def _is_recompile_limit(err: Exception) -> bool:
    """dynamo's ``FailOnRecompileLimitHit`` (by name: ``torch._dynamo.exc`` is private)."""
    return any(c.__name__ == "FailOnRecompileLimitHit" for c in type(err).__mro__)


def _run_compiled(kernels: str, compiled, eager, *args):
    """``compiled(*args)``; under ``"auto"`` a failed compilation warns once and falls back to
    ``eager(*args)`` from then on; under ``"compiled"`` it raises. A kernel that has reached
    dynamo's recompilation limit (``torch._dynamo.config.recompile_limit`` variants: shapes
    with a size-1 dimension, tiles, SR modes, ...) runs its further variants eager, either
    way, with one warning: the same bits, and the compiled variants stay in use."""
    try:
        out = compiled(*args)
    except Exception as err:  # noqa: BLE001 - any compiler failure: report once, then go eager
        if _is_recompile_limit(err):
            if not _state["recompile_limit_warned"]:
                _state["recompile_limit_warned"] = True
                warnings.warn("nvfp4: a compiled kernel reached dynamo's recompilation limit; "
                              "its new shape variants run eager (same bits)", RuntimeWarning,
                              stacklevel=3)
            return eager(*args)
        if kernels == "compiled":
            raise
        _state["compile_error"] = f"{type(err).__name__}: {err}"
        warnings.warn(f"nvfp4: torch.compile failed, using eager kernels from now on "
                      f"({_state['compile_error'][:300]})", RuntimeWarning, stacklevel=3)
        return eager(*args)
    if not _state["vec_isa_recorded"]:
        _state["vec_isa_recorded"] = True
        record_vec_isa_probe()
    return out


# "auto" rotates tensors of at least this many elements with compiled roundings. Measured, one
# thread, (R, 512) fp32: eager / compiled 0.13 / 0.46 ms at 98 K elements, 0.56 / 0.87 ms at
# 393 K, 6.0 / 2.2 ms at 1.6 M.
RHT_COMPILE_MIN_NUMEL = 1 << 20


def _bf16_round_kernel(x):
    """``x.to(bfloat16).float()``: one of the RHT's two bf16 roundings (``nvfp4.rht``)."""
    return x.to(torch.bfloat16).float()


def _rht_compiled(x: torch.Tensor) -> torch.Tensor:
    """``nvfp4.rht(x)`` with its two bf16 roundings as compiled passes; the rotation between them
    is the same ``torch.matmul`` call on the same (M, K/16, 16) fp32 tiles (the same bits)."""
    m, k = x.shape
    tiles = _compiled(_bf16_round_kernel)(_plain(x.reshape(m, k // BLOCK, BLOCK)))
    rotated = torch.matmul(tiles, device_rht_matrix(x.device))
    return _compiled(_bf16_round_kernel)(rotated).view(m, k)


def apply_rht(x: torch.Tensor, kernels: str = "eager") -> torch.Tensor:
    """``nvfp4.rht(x)``, the same bits, on ``kernels``: compiled, its bf16 roundings take one
    pass each instead of two (4096^2: 158 -> ~100 ms, one thread). Under ``"auto"`` only from
    ``RHT_COMPILE_MIN_NUMEL`` elements up (below, the two compiled calls cost more than they
    save), and never where this torch's inductor cannot keep a bf16 round trip
    (``EMULATED_CASTS``)."""
    small = kernels == "auto" and x.numel() < RHT_COMPILE_MIN_NUMEL
    if small or not _use_compiled(x, kernels) or EMULATED_CASTS not in _ieee_inductor_options():
        return nvfp4_rht(x)
    check_2d(x, "rht")
    return _run_compiled(kernels, _rht_compiled, nvfp4_rht, x)


def _fake_quantize_2d(x: torch.Tensor, tile, sr: bool, generator, sr_mode: str,
                      amax, kernels: str) -> torch.Tensor:
    """fake_quantize of a prepared (fp32, contiguous, checked) 2-D tensor."""
    if amax is not None:
        amax = torch.as_tensor(amax, dtype=torch.float32, device=x.device)
    if x.numel() == 0:
        return x.clone()
    noise = draw_noise(x.shape, generator, sr_mode, x.device) if sr else None
    args = (x, tile[0], amax, noise, sr_mode if sr else "rn")
    chosen = _choose(x, kernels, sr)
    if chosen == "native":
        return _fake_quantize_native(*args)
    if chosen == "compiled":
        return _run_compiled(kernels, _fake_quantize_compiled, _fake_quantize_eager, *args)
    return _fake_quantize_eager(*args)


def fake_quantize(x: torch.Tensor, *, tile=(1, BLOCK), rht: bool = False, sr: bool = False,
                  generator: torch.Generator | None = None,
                  sr_mode: str = "hardware", amax: torch.Tensor | None = None,
                  kernels: str = "eager", format: str | Format | None = None) -> torch.Tensor:
    """``dequantize(quantize(x, ...))`` in fp32, without materialising codes: the QAT hot path.

    Runs on ``kernels`` (``KERNELS``: eager, compiled, native or auto); SR draws its random bits
    from ``generator`` in eager PyTorch either way, so all kernels give the same bits for the
    same generator state. The result carries no autograd history. ``format``: a block format of
    ``formats.FORMATS`` (default ``nvfp4``); ``tile`` (16, 16) means the format's 2-D tiles.
    The formats other than ``nvfp4`` run eager whatever ``kernels`` says.
    """
    check_kernels(kernels)
    fmt = get_format(format)
    if sr:  # refuse a bad SR call before any work
        check_sr(generator, sr_mode)
    with torch.no_grad():  # no autograd history: the QAT layers define their own backward
        x, tile = prepare_operand(x.detach(), tile, rht, "fake_quantize",
                                  rotate=lambda t: apply_rht(t, kernels=kernels))
        if not fmt.is_nvfp4:
            return _fake_quantize_format(x, fmt, tile, sr, generator, sr_mode, amax)
        return _fake_quantize_2d(x, tile, sr, generator, sr_mode, amax, kernels)


def _fake_quantize_format(x: torch.Tensor, fmt: Format, tile, sr: bool, generator,
                          sr_mode: str, amax) -> torch.Tensor:
    """fake_quantize of a prepared 2-D tensor in a format other than plain NVFP4 (eager)."""
    if amax is not None:
        amax = torch.as_tensor(amax, dtype=torch.float32, device=x.device)
    if x.numel() == 0:
        return x.clone()
    noise = draw_noise(x.shape, generator, sr_mode, x.device) if sr else None
    return fake_quantize_prepared(x, fmt, tile[0] > 1, noise, sr_mode if sr else "rn", amax)


def _fake_quantize_pair_compiled(x: torch.Tensor, w: torch.Tensor, w_tile_rows: int):
    xq, wq = _compiled(_pair_kernel)(_plain(row_blocks(x)), _plain(row_blocks(w)), w_tile_rows)
    return xq.view(x.shape), wq.view(w.shape)


def _fake_quantize_pair_eager(x: torch.Tensor, w: torch.Tensor, w_tile_rows: int):
    return (_fake_quantize_eager(x, 1, None, None, "rn"),
            _fake_quantize_eager(w, w_tile_rows, None, None, "rn"))


def fake_quantize_pair(x: torch.Tensor, w: torch.Tensor, *, w_tile=(1, BLOCK),
                       kernels: str = "eager",
                       format: str | Format | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(fake_quantize(x), fake_quantize(w, tile=w_tile))``, both RN, each with its own tensor
    amax: the same bits as the two calls, in one compiled call (the forward's X and W).
    ``x`` and ``w`` are 2-D, blocks along their last dimension."""
    check_kernels(kernels)
    if not get_format(format).is_nvfp4:
        return (fake_quantize(x, kernels=kernels, format=format),
                fake_quantize(w, tile=w_tile, kernels=kernels, format=format))
    with torch.no_grad():
        x, _ = prepare_operand(x.detach(), (1, BLOCK), False, "fake_quantize_pair")
        w, w_tile = prepare_operand(w.detach(), w_tile, False, "fake_quantize_pair")
        if x.numel() == 0 or w.numel() == 0 or _choose(x, kernels) != "compiled":
            return (_fake_quantize_2d(x, (1, BLOCK), False, None, "hardware", None, kernels),
                    _fake_quantize_2d(w, w_tile, False, None, "hardware", None, kernels))
        return _run_compiled(kernels, _fake_quantize_pair_compiled, _fake_quantize_pair_eager,
                             x, w, w_tile[0])


def fake_quantize_columnwise(x: torch.Tensor, *, sr: bool = False,
                             generator: torch.Generator | None = None, sr_mode: str = "hardware",
                             amax: torch.Tensor | None = None,
                             kernels: str = "eager",
                             format: str | Format | None = None) -> torch.Tensor:
    """``fake_quantize(columnwise_copy(x), ...)``: the same bits, random draws and amax (one over
    all matrices). The compiled kernels make no copy first: it reads the blocks (16
    consecutive rows of one column) in x's layout and writes the result transposed. No RHT
    (for that: ``fake_quantize(columnwise_copy(x), rht=True)``).
    """
    check_kernels(kernels)
    if not get_format(format).is_nvfp4:
        check_tokens_first(x, "fake_quantize_columnwise")
        return fake_quantize(columnwise_copy(x.detach()), sr=sr, generator=generator,
                             sr_mode=sr_mode, amax=amax, kernels=kernels, format=format)
    if sr:
        check_sr(generator, sr_mode)
    check_tokens_first(x, "fake_quantize_columnwise")
    with torch.no_grad():
        x = x.detach().float().contiguous()
        if amax is not None:
            amax = torch.as_tensor(amax, dtype=torch.float32, device=x.device)
        shape = (math.prod(x.shape[:-2]) * x.shape[-1], padded_tokens(x.shape[-2]))
        if x.numel() == 0:
            return x.new_zeros(shape)
        noise = draw_noise(shape, generator, sr_mode, x.device) if sr else None
        args = (x, amax, noise, sr_mode if sr else "rn")
        chosen = _choose(x, kernels, sr)
        if chosen == "native":
            return _fake_quantize_columns_native(*args)
        if chosen == "compiled":
            return _run_compiled(kernels, _fake_quantize_columns_compiled,
                                 _fake_quantize_columns_eager, *args)
        return _fake_quantize_columns_eager(*args)
