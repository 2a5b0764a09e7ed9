"""Cost of the NVFP4 emulator's layers on the CPU: whole QAT steps and single layers.

    python -m benchmarks.bench_layers steps   [--archs cnn vit swin] [--scale small]
                                              [--size 128] [--batch 8] [--reps 5]
                                              [--channels-last] [--threads N]
                                              [--quant-kernels eager|compiled|auto]
                                              [--recipes fp32 nvfp4_full 2d_rht_sr]
    python -m benchmarks.bench_layers layers  [--reps 5] [--recipes ...]
    python -m benchmarks.bench_layers profile [--arch cnn] [--recipe 2d_rht_sr] [--top 25]

``steps`` times one training step (forward, BCE-with-logits loss, backward, AdamW step) of each
model with its layers quantized by each recipe (``fp32`` is the unquantized step) and prints the
median time and its ratio to the unquantized step. ``layers`` times forward + backward of single
layers shaped like the models' (CNN k4 s2 p1 convolutions, transformer linears). ``profile``
prints torch.profiler's table (self CPU time) of a few steps of one model and recipe.

Timings are medians of ``--reps`` rounds after one warm-up, the recipes taking turns within
each round (so that the load of a shared machine hits them alike); a ratio is the median over
rounds of the recipe's time over the first recipe's (the baseline) in the same round. Compare numbers taken in one run. Threads: torch's default unless
``--threads``.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn as nn

from nvfp4bench.checks.bench import TrainingCase
from nvfp4bench.quant import kernels, twins
from nvfp4bench.quant.recipes import get_recipe

DEFAULT_RECIPES = ("fp32", "nvfp4_full", "2d_rht_sr")


def _generator(recipe: str):
    return torch.Generator().manual_seed(0) if get_recipe(recipe).stochastic_rounding else None


def model_step(arch: str, scale: str, recipe: str, size: int, batch: int,
               channels_last: bool = False, quant_kernels: str = "eager"):
    """A closure running one QAT step of ``arch`` under ``recipe`` on a fixed random batch: the
    training case of ``python -m nvfp4bench.bench train`` (model and batch in the channels_last
    memory format when asked)."""
    case = TrainingCase(arch, scale, recipe, image_size=size, batch_size=batch, device="cpu",
                        quant_kernels=quant_kernels)
    if channels_last:
        case.model.to(memory_format=torch.channels_last)
        case.images = case.images.contiguous(memory_format=torch.channels_last)
    return case.step


def interleaved_medians(fns: dict, reps: int) -> tuple[dict, dict]:
    """Median wall time (s) of each closure over ``reps`` rounds after one warm-up each, and
    the median over rounds of each closure's time divided by the first closure's in the same
    round. The closures take turns within a round, so that the load of a shared machine hits
    them alike; the per-round ratio is the robust number when the load drifts."""
    for fn in fns.values():
        fn()
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    base = times[next(iter(fns))]
    ratios = {k: statistics.median(t / b for t, b in zip(v, base)) for k, v in times.items()}
    return {k: statistics.median(v) for k, v in times.items()}, ratios


def bench_steps(args) -> None:
    print(f"# QAT step, scale {args.scale}, {args.size} px, batch {args.batch}, "
          f"{torch.get_num_threads()} threads, median of {args.reps} (interleaved)"
          + (", channels_last" if args.channels_last else ""))
    print("| arch | " + " | ".join(args.recipes) + " |")
    print("|---|" + "---|" * len(args.recipes))
    for arch in args.archs:
        steps = {r: model_step(arch, args.scale, r, args.size, args.batch, args.channels_last,
                               args.quant_kernels) for r in args.recipes}
        t, ratio = interleaved_medians(steps, args.reps)
        cells = [f"{t[r] * 1e3:.0f} ms" + ("" if r == args.recipes[0] else
                                           f" ({ratio[r]:.2f}x)") for r in args.recipes]
        print(f"| {arch} | " + " | ".join(cells) + " |", flush=True)


# (label, module factory, input shape): shaped like the small models' layers at 128 px, batch 8
LAYER_CASES = [
    ("Conv2d k4s2p1 128->128, x (8,128,32,32)",
     lambda: nn.Conv2d(128, 128, 4, 2, 1), (8, 128, 32, 32)),
    ("ConvT k4s2p1 256->128, x (8,256,16,16)",
     lambda: nn.ConvTranspose2d(256, 128, 4, 2, 1), (8, 256, 16, 16)),
    ("Linear 192->576, x (8,64,192)", lambda: nn.Linear(192, 576), (8, 64, 192)),
    ("Linear 576->192, x (8,64,576)", lambda: nn.Linear(576, 192), (8, 64, 576)),
]


def bench_layers(args) -> None:
    print(f"# forward + backward of one layer, {torch.get_num_threads()} threads, "
          f"median of {args.reps} (interleaved)")
    print("| layer | " + " | ".join(args.recipes) + " |")
    print("|---|" + "---|" * len(args.recipes))
    for label, factory, shape in LAYER_CASES:
        torch.manual_seed(0)
        module, x = factory(), torch.randn(shape, requires_grad=True)

        def closure(layer):
            def run():
                module.zero_grad(set_to_none=True)
                x.grad = None
                layer(x).square().mean().backward()
            return run
        fns = {r: closure(twins.quantized(module, r, generator=_generator(r),
                                          kernels=args.quant_kernels))
               for r in args.recipes}
        t, ratio = interleaved_medians(fns, args.reps)
        cells = [f"{t[r] * 1e3:.1f} ms" + ("" if r == args.recipes[0] else
                                             f" ({ratio[r]:.2f}x)") for r in args.recipes]
        print(f"| {label} | " + " | ".join(cells) + " |", flush=True)


def profile(args) -> None:
    step = model_step(args.arch, args.scale, args.recipe, args.size, args.batch,
                      args.channels_last, args.quant_kernels)
    step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(args.reps):
            step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=("steps", "layers", "profile"))
    parser.add_argument("--archs", nargs="+", default=["cnn", "vit", "swin"])
    parser.add_argument("--arch", default="cnn")
    parser.add_argument("--scale", default="small")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--recipes", nargs="+", default=list(DEFAULT_RECIPES))
    parser.add_argument("--recipe", default="2d_rht_sr")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--quant-kernels", default="eager", choices=kernels.KERNELS,
                        help="how the quantizer runs (kernels.KERNELS; default: eager)")
    parser.add_argument("--channels-last", action="store_true",
                        help="model and batch in torch.channels_last (steps, profile)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# quantizer kernels: {args.quant_kernels}")
    {"steps": bench_steps, "layers": bench_layers, "profile": profile}[args.what](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
