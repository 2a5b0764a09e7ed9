"""Micro-benchmarks: the NVFP4 quantizer against a plain copy, and training steps per recipe.

``python -m nvfp4bench.bench quant [--size 4096] [--device cpu|cuda] [--repeats N]
[--formats nvfp4,mxfp4,...] [--json]``
    times ``fake_quantize`` of a ``size x size`` fp32 tensor (RN 1x16, RN 16x16, SR 1x16,
    RHT + SR 1x16; "16" is the format's block, 32 for MX) on each of the quantizer's kernels
    (eager, compiled, native; ``--kernels``; formats other than nvfp4 run eager) and
    ``dst.copy_(x)`` of the same tensor into an existing one, and prints each median with its
    ratio to the copy, and the signal-to-quantization-noise ratio of each case,
    ``10 log10(sum x^2 / sum (x - x_hat)^2)`` in dB, on that Gaussian tensor and on a
    heavy-tailed one (Student's t, 3 degrees of freedom) of the same size (against the rotated
    tensor for the RHT case).

``python -m nvfp4bench.bench train --arch cnn --scale small --recipes baseline,nvfp4_full,2d_rht_sr
--image-size 128 --batch-size 8 --steps 5 [--formats nvfp4,mxfp4] [--device cuda] [--json]``
    times training steps (forward, BCE loss on random data, backward, AdamW step) for each recipe
    (in each format: ``<recipe>@<format>``),
    after warm-up steps, the recipes taking turns step by step, and prints the median step, its
    ratio to the unquantized baseline of the same compute dtype (recipe ``baseline``: fp32 on the CPU,
    bf16 autocast on CUDA), the peak memory of one step, and the seconds of training steps in one
    epoch of ``--epoch-slices`` slices (default 3,929, the slice count of the study's LGG set):
    median step x ceil(slices / batch), evaluation not included.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` minus the memory allocated before the
steps; on the CPU the growth of the process's resident peak (``VmHWM`` in ``/proc/self/status``,
reset through ``/proc/self/clear_refs`` and measured from the resident size after returning freed
heap to the OS with ``malloc_trim``), i.e. what the steps add to what was already resident (the
model, the optimizer state and the data). ``null`` where ``/proc`` is missing.

Timings are wall-clock medians; on a shared machine repeat them (``--repeats``, ``--steps``).
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import math
import os
import statistics
import sys
import time

import torch

from nvfp4bench import options
from nvfp4bench.config import MAX_IMAGE_SIZE
from nvfp4bench.models import ARCHS, build_model
from nvfp4bench.cell import variant_name
from nvfp4bench.quant import kernels, nvfp4
from nvfp4bench.quant.formats import DEFAULT_FORMAT, FORMATS, get_format
from nvfp4bench.quant.recipes import get_recipe
from nvfp4bench.quant.swap import quantize_model
from nvfp4bench.train.loop import synchronize
from nvfp4bench.train.setup import AUTOCAST_DTYPES, resolve_precision

EPOCH_SLICES = 3929  # slices per epoch for the epoch-time column (the LGG set's slice count)
BASELINE_RECIPE = "baseline"  # no NVFP4, the device's high precision (fp32 on CPU, bf16 on CUDA)
QUANT_CASES = ("copy", "rn_1x16", "rn_16x16", "sr_1x16", "rht_sr_1x16")



def _timed(fn, device: torch.device) -> float:
    """Milliseconds of one call of ``fn``."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return (time.perf_counter() - start) * 1e3


# --------------------------------------------------------------------------------------------
# quant
# --------------------------------------------------------------------------------------------
QUANT_KWARGS = {"rn_1x16": {}, "rn_16x16": {"tile": (16, 16)}, "sr_1x16": {"sr": True},
                "rht_sr_1x16": {"rht": True, "sr": True}}


def _quant_calls(x: torch.Tensor, choice: str, fmt: str = DEFAULT_FORMAT, seed: int = 0) -> dict:
    """case -> zero-argument callable running it on the kernels ``choice`` in format ``fmt``;
    ``copy`` is the yardstick."""
    dst = torch.empty_like(x)
    g = torch.Generator(x.device).manual_seed(seed)

    def on_kernels(kw):
        def call():
            return kernels.fake_quantize(x, **kw, kernels=choice, format=fmt,
                                         generator=g if kw.get("sr") else None)
        return call

    return {"copy": lambda: dst.copy_(x),
            **{case: on_kernels(kw) for case, kw in QUANT_KWARGS.items()}}


def sqnr_db(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """``10 log10(sum x^2 / sum (x - x_hat)^2)``, in float64."""
    x, x_hat = x.double(), x_hat.double()
    return 10 * math.log10(x.pow(2).sum().item() / (x - x_hat).pow(2).sum().item())


def _sqnr(x: torch.Tensor, case: str, fmt: str) -> float:
    kw = QUANT_KWARGS[case]
    reference = kernels.apply_rht(x) if kw.get("rht") else x
    g = torch.Generator(x.device).manual_seed(1) if kw.get("sr") else None
    return sqnr_db(reference, kernels.fake_quantize(x, **kw, format=fmt, generator=g))


def run_quant(size: int, device: str, repeats: int, kernel_choices: list[str],
              formats_: tuple[str, ...] = (DEFAULT_FORMAT,)) -> list[dict]:
    """One row per (kernels, format, case): median/min ms, first-call ms (compilation), ratio to
    copy, SQNR on a Gaussian and a heavy-tailed tensor. The repeats interleave the cases, so that
    slow phases of a shared machine hit all alike. A format other than nvfp4 runs once (eager)."""
    dev = torch.device(device)
    x = torch.randn(size, size, generator=torch.Generator().manual_seed(0)).to(dev)
    heavy = heavy_tailed(size, dev)
    calls = {}
    for fmt in formats_:
        choices = kernel_choices if get_format(fmt).is_nvfp4 else ["eager"]
        for choice in choices:
            for case, fn in _quant_calls(x, choice, fmt).items():
                if case != "copy" or not calls:
                    calls[(choice if case != "copy" else "-", fmt if case != "copy" else "-",
                           case)] = fn
    first = {key: _timed(fn, dev) for key, fn in calls.items()}
    times = {key: [] for key in calls}
    for _ in range(repeats):
        for key, fn in calls.items():
            times[key].append(_timed(fn, dev))
    copy_ms = statistics.median(times[("-", "-", "copy")])
    quality = {(fmt, case): (_sqnr(x, case, fmt), _sqnr(heavy, case, fmt))
               for _, fmt, case in calls if case != "copy"}
    return [{"case": case, "kernels": choice, "format": fmt, "size": size, "device": str(dev),
             "threads": torch.get_num_threads(), "median_ms": statistics.median(t),
             "min_ms": min(t), "first_call_ms": first[(choice, fmt, case)],
             "ratio_to_copy": statistics.median(t) / copy_ms, "repeats": repeats,
             "sqnr_gaussian_db": quality.get((fmt, case), (None, None))[0],
             "sqnr_student_t3_db": quality.get((fmt, case), (None, None))[1],
             "bits_per_element": get_format(fmt).bits_per_element if fmt != "-" else None}
            for (choice, fmt, case), t in times.items()]


def heavy_tailed(size: int, device) -> torch.Tensor:
    """A ``size x size`` fp32 tensor of Student's t with 3 degrees of freedom (seeded)."""
    g = torch.Generator().manual_seed(1)
    normal = torch.randn(size, size, generator=g)
    chi2 = torch.randn(3, size, size, generator=g).pow(2).sum(0)
    return (normal / torch.sqrt(chi2 / 3)).to(device)


def _print_quant(rows: list[dict]) -> None:
    r0 = rows[0]
    print(f"fake_quantize of a {r0['size']}x{r0['size']} fp32 tensor on {r0['device']}, "
          f"torch {torch.__version__}, {r0['threads']} threads, median of {r0['repeats']}"
          f"{', THP_MEM_ALLOC_ENABLE=1' if os.environ.get('THP_MEM_ALLOC_ENABLE') == '1' else ''}")
    print(f"{'case':<13}{'kernels':<10}{'format':<18}{'median ms':>10}{'min ms':>9}{'x copy':>8}"
          f"{'1st call ms':>13}{'bits':>6}{'SQNR dB':>9}{'t3 dB':>7}")
    for r in rows:
        db = ("" if r["sqnr_gaussian_db"] is None else
              f"{r['bits_per_element']:>6.2f}{r['sqnr_gaussian_db']:>9.2f}"
              f"{r['sqnr_student_t3_db']:>7.2f}")
        print(f"{r['case']:<13}{r['kernels']:<10}{r['format']:<18}{r['median_ms']:>10.1f}"
              f"{r['min_ms']:>9.1f}{r['ratio_to_copy']:>8.1f}{r['first_call_ms']:>13.0f}{db}")


# --------------------------------------------------------------------------------------------
# train
# --------------------------------------------------------------------------------------------
def _rss_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _release_heap() -> None:
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class PeakMemory:
    """Peak memory (MB) that a block adds: CUDA allocator peak, or the CPU resident peak."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak_mb: float | None = None

    def __enter__(self):
        _release_heap()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        else:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # reset VmHWM to the current resident size
                self.start = _rss_kib("VmRSS")
            except OSError:
                self.start = None
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_mb = (torch.cuda.max_memory_allocated(self.device) - self.start) / 2**20
        elif self.start is not None:
            peak = _rss_kib("VmHWM")
            self.peak_mb = None if peak is None else (peak - self.start) / 1024
        return False


def _training_step(model, images, targets, optimizer, loss_fn, autocast_dtype):
    optimizer.zero_grad(set_to_none=True)
    ctx = (torch.autocast(images.device.type, dtype=autocast_dtype) if autocast_dtype
           else contextlib.nullcontext())
    with ctx:
        logits = model(images)
    loss_fn(logits.float(), targets).backward()
    optimizer.step()


class TrainingCase:
    """One recipe's model, optimizer and random batch, ready to run training steps."""

    def __init__(self, arch: str, scale: str, recipe_name: str, *, image_size: int,
                 batch_size: int, device: str, seed: int = 0, quant_kernels: str = "eager",
                 format: str = DEFAULT_FORMAT):

        self.device = torch.device(device)
        self.recipe = recipe_name
        recipe = get_recipe(recipe_name)
        self.precision = resolve_precision("auto", recipe, self.device)
        self.autocast_dtype = AUTOCAST_DTYPES[self.precision]
        torch.manual_seed(seed)  # the same initial weights for every recipe
        self.model = build_model(arch, scale, image_size=image_size)
        quantize_model(self.model, recipe, kernels=quant_kernels, format=format,
                       generator=torch.Generator(self.device).manual_seed(seed))
        self.model.to(self.device).train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-3)
        g = torch.Generator().manual_seed(seed)
        in_channels = next(m for m in self.model.modules()
                           if isinstance(m, torch.nn.Conv2d)).in_channels
        self.images = torch.randn(batch_size, in_channels, image_size, image_size,
                                  generator=g).to(self.device)
        self.targets = (torch.rand(batch_size, 1, image_size, image_size, generator=g)
                        > 0.9).float().to(self.device)
        self.loss_fn = torch.nn.BCEWithLogitsLoss()

    def step(self) -> None:
        _training_step(self.model, self.images, self.targets, self.optimizer, self.loss_fn,
                       self.autocast_dtype)


def run_train(args) -> list[dict]:
    """Build every recipe's case, warm each up and measure its peak memory over one step, then
    time ``steps`` rounds in which every recipe runs one step (interleaved, so that the slow
    phases of a shared machine hit all recipes alike); medians per recipe."""
    recipes = [r for r in args.recipes.split(",") if r]
    if BASELINE_RECIPE not in recipes:
        recipes.insert(0, BASELINE_RECIPE)
    variants = [(name, fmt) for name in recipes
                for fmt in (args.formats.split(",") if get_recipe(name).quantized
                            else [DEFAULT_FORMAT])]
    cases, rows = [], []
    for name, fmt in variants:
        case = TrainingCase(args.arch, args.scale, name, image_size=args.image_size,
                            batch_size=args.batch_size, device=args.device,
                            quant_kernels=args.quant_kernels, format=fmt)
        warmup_ms = [_timed(case.step, case.device) for _ in range(args.warmup)]
        with PeakMemory(case.device) as mem:
            case.step()
        cases.append(case)
        rows.append({"arch": args.arch, "scale": args.scale, "recipe": variant_name(name, fmt),
                     "precision": case.precision, "image_size": args.image_size,
                     "batch_size": args.batch_size, "device": str(case.device),
                     "quant_kernels": args.quant_kernels, "threads": torch.get_num_threads(),
                     "steps": args.steps, "warmup_ms": warmup_ms, "peak_mb": mem.peak_mb,
                     "quantized_layers": len(case.model.quantized_layers)})
    times = [[] for _ in cases]
    for _ in range(args.steps):
        for case, t in zip(cases, times):
            t.append(_timed(case.step, case.device))
    base = statistics.median(times[0])
    steps_per_epoch = math.ceil(args.epoch_slices / args.batch_size)
    for row, t in zip(rows, times):
        row.update(step_ms=statistics.median(t), min_step_ms=min(t),
                   ratio=statistics.median(t) / base, epoch_slices=args.epoch_slices,
                   epoch_s=statistics.median(t) * steps_per_epoch / 1000)
    return rows


def _print_train(rows: list[dict]) -> None:
    r0 = rows[0]
    print(f"training steps: {r0['arch']} {r0['scale']}, {r0['image_size']} px, batch "
          f"{r0['batch_size']}, {r0['device']} ({r0['precision']} baseline), quantizer "
          f"{r0['quant_kernels']}, torch {torch.__version__}, {r0['threads']} threads, median of "
          f"{r0['steps']} steps; epoch s = training steps of one {r0['epoch_slices']}-slice epoch")
    width = max(12, *(len(r["recipe"]) + 1 for r in rows))
    print(f"{'recipe':<{width}}{'step ms':>9}{'min ms':>9}{'x base':>8}{'epoch s':>9}"
          f"{'peak MB':>9}{'warm-up ms':>14}")
    for r in rows:
        peak = "-" if r["peak_mb"] is None else f"{r['peak_mb']:.0f}"
        warm = "/".join(f"{t:.0f}" for t in r["warmup_ms"])
        print(f"{r['recipe']:<{width}}{r['step_ms']:>9.0f}{r['min_step_ms']:>9.0f}{r['ratio']:>8.2f}"
              f"{r['epoch_s']:>9.1f}{peak:>9}{warm:>14}")


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m nvfp4bench.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    q = sub.add_parser("quant", help="time fake_quantize against a plain copy")
    q.add_argument("--size", type=options.positive_int(65_536), default=4096, help="square tensor side (multiple of 16)")
    q.add_argument("--repeats", type=options.positive_int(10_000), default=10, help="timed calls per case (median)")
    q.add_argument("--kernels", default="eager,compiled",
                   help=f"comma-separated quantizer kernels, of {', '.join(kernels.KERNELS)}")
    t = sub.add_parser("train", help="time training steps per recipe")
    t.add_argument("--arch", default="cnn")
    t.add_argument("--scale", default="small")
    t.add_argument("--recipes", default="nvfp4_full,2d_rht_sr",
                   help=f"comma-separated; the baseline {BASELINE_RECIPE!r} is always added")
    t.add_argument("--image-size", type=options.positive_int(MAX_IMAGE_SIZE), default=128)
    t.add_argument("--batch-size", type=options.positive_int(options.MAX_BATCH), default=8)
    t.add_argument("--steps", type=options.positive_int(10_000), default=5, help="timed steps per recipe (median)")
    t.add_argument("--warmup", type=options.non_negative_int(10_000), default=2, help="untimed steps first (compilation)")
    t.add_argument("--epoch-slices", type=options.positive_int(10**9), default=EPOCH_SLICES,
                   help="slices per epoch for the 'epoch s' column (default: %(default)s)")
    t.add_argument("--quant-kernels", default="auto", choices=kernels.KERNELS,
                   help="the quantizer's kernels (kernels.KERNELS)")
    for p in (q, t):
        p.add_argument("--formats", default=DEFAULT_FORMAT,
                       help=f"comma-separated block formats, of {', '.join(FORMATS)} "
                            f"(default: %(default)s)")
        p.add_argument("--device", default="cpu", help="cpu or cuda")
        p.add_argument("--threads", type=options.positive_int(options.MAX_THREADS), default=None, help="torch.set_num_threads")
        p.add_argument("--json", action="store_true", help="one JSON object per line")
    return parser


def _check_args(args) -> None:
    for fmt in args.formats.split(","):
        get_format(fmt)  # a ValueError listing the valid names
    if args.device.split(":")[0] not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu or cuda, got {args.device!r}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: CUDA is not available on this machine")
    if args.command == "quant":  # the numbers' ranges are checked by their argparse types
        if args.size % nvfp4.BLOCK:
            raise ValueError(f"--size must be a positive multiple of {nvfp4.BLOCK}, "
                             f"got {args.size}")
        bad = [b for b in args.kernels.split(",") if b not in kernels.KERNELS]
        if bad or not args.kernels:
            raise ValueError(f"--kernels: unknown {bad}; choose from {kernels.KERNELS}")
    else:
        if args.arch not in ARCHS:
            raise ValueError(f"--arch must be one of {', '.join(ARCHS)}, got {args.arch!r}")
        if args.scale not in ARCHS[args.arch]:
            raise ValueError(f"--scale must be one of {', '.join(ARCHS[args.arch])}, "
                             f"got {args.scale!r}")
        for name in args.recipes.split(","):
            get_recipe(name)  # a ValueError listing the valid names


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        _check_args(args)
    except ValueError as err:
        print(f"nvfp4bench.bench: error: {err}", file=sys.stderr)
        return 2
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.command == "quant":
        rows = run_quant(args.size, args.device, args.repeats, args.kernels.split(","),
                         tuple(args.formats.split(",")))
        printer = _print_quant
    else:
        rows = run_train(args)
        printer = _print_train
    if args.json:
        for row in rows:
            print(json.dumps(row))
    else:
        printer(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
