"""Command line of one cell: ``python -m nvfp4bench --arch A --scale S --recipe R --fold K``.

Thin by design: ``build_parser`` declares the options (grouped: model, quantization, data,
training, output), ``parse_config(argv)`` turns them into a frozen ``RunConfig``, ``main(argv)``
runs ``nvfp4bench.train.run`` and prints a summary. Bad options are argparse errors (exit 2, no
traceback); a bad data directory or a failed cell exits 1 with a one-line message.
"""
from __future__ import annotations

import argparse
import shlex
import sys

from nvfp4bench import options
from nvfp4bench.config import (ARMS, DEFAULT_EPOCHS, DEFAULT_SEED, DEFAULT_THREADS,
                               MAX_IMAGE_SIZE, OPTIMIZER_NAMES, PRECISIONS, SPLITS, RunConfig,
                               check_image_size)
from nvfp4bench.data import DataError
from nvfp4bench.locks import CellBusy
from nvfp4bench.models import SCALE_NAMES
from nvfp4bench.quant import kernels
from nvfp4bench.quant.backends import BACKENDS
from nvfp4bench.quant.formats import DEFAULT_FORMAT, FORMATS
from nvfp4bench.quant.recipes import RECIPES
from nvfp4bench.results import result_path
from nvfp4bench.train.run import run



def _image_size(text: str) -> int:
    try:
        return check_image_size(options.integer(0, MAX_IMAGE_SIZE)(text), "")
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).strip()) from None


def build_parser() -> argparse.ArgumentParser:
    archs, scales = tuple(ARMS), SCALE_NAMES
    recipes = "\n".join(f"  {name:<11} {r.description}" for name, r in RECIPES.items())
    formats = "\n".join(f"  {name:<17} {f.description}" for name, f in FORMATS.items())
    optim = "\n".join(f"  {arch:<10} {arm.family} with {arm.optimizer.name} lr "
                      f"{arm.optimizer.lr:g}, weight decay {arm.optimizer.weight_decay:g}"
                      for arch, arm in ARMS.items())
    parser = argparse.ArgumentParser(
        prog="python -m nvfp4bench", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train and evaluate one cell (arch x scale x recipe x fold) of the grid and "
                    "write its result JSON.",
        epilog=f"architectures: {', '.join(archs)}\nscales: {', '.join(scales)}\n\n"
               f"recipes:\n{recipes}\n\nformats:\n{formats}\n\narms (model family and default optimiser):\n{optim}\n\n"
               f"example:\n  python -m nvfp4bench --arch swin --scale tiny "
               f"--recipe nvfp4_full --fold 0")

    g = parser.add_argument_group("model")
    g.add_argument("--arch", choices=archs, required=True,
                   help="the study's arm: an architecture with its optimiser (listed below)")
    g.add_argument("--scale", choices=scales, required=True, help="model scale")
    g.add_argument("--image-size", type=_image_size, default=None,
                   help="input size in pixels (default: the data store's own size)")
    g.add_argument("--head-prior", type=options.probability(), default=None, metavar="P",
                   help="start the one-logit head's bias at logit(P), e.g. 0.01 (a tumour "
                        "prior; a deviation from the study; default: off, the study's init)")

    g = parser.add_argument_group("quantization")
    g.add_argument("--recipe", choices=list(RECIPES), required=True, metavar="RECIPE",
                   help="QAT recipe (listed below)")
    g.add_argument("--backend", choices=list(BACKENDS), default="emulator",
                   help="NVFP4 implementation: the exact emulator, or Transformer Engine "
                        "(CUDA, optional) (default: %(default)s)")
    g.add_argument("--format", choices=list(FORMATS), default=DEFAULT_FORMAT, metavar="FORMAT",
                   help="the block format of every quantized operand (listed below; default: "
                        "%(default)s); a baseline recipe quantizes nothing, whatever the format")
    g.add_argument("--quantize-attention", action="store_true",
                   help="also quantize the two attention matmuls (an extension; off in the study)")
    g.add_argument("--quant-kernels", choices=kernels.KERNELS, default="auto",
                   help="the emulator's kernels: eager PyTorch, torch.compile'd, native C++ "
                        "(CPU), or auto (native on the CPU where it builds, else compiled for "
                        "large CPU tensors); the bits are the same (default: %(default)s)")

    g = parser.add_argument_group("data")
    g.add_argument("--data", default=None, metavar="DIR",
                   help="slice store built by data_prep.py (default: the embedded synthetic "
                        "dataset, built on first use)")
    g.add_argument("--split", choices=SPLITS, default="kfold",
                   help="the study's patient split: kfold = 5-fold cross-validation, holdout = "
                        "its main protocol (80/10/10, one partition: --fold 0); both are in the "
                        "store's folds.json (default: %(default)s)")
    g.add_argument("--fold", type=options.integer(0, 4), required=True, metavar="{0..4}",
                   help="cross-validation fold (0 with --split holdout)")
    g.add_argument("--seed", type=options.integer(0, options.SEED_MAX), default=DEFAULT_SEED,
                   help=f"0 to {options.SEED_MAX}: the seed of the initial weights, shuffling, "
                        f"dropout, augmentation and stochastic rounding (default: %(default)s)")
    g.add_argument("--no-augment", dest="augment", action="store_false",
                   help="train without the study's augmentation")

    g = parser.add_argument_group("training")
    g.add_argument("--epochs", type=options.positive_int(options.MAX_EPOCHS), default=DEFAULT_EPOCHS,
                   help="maximum epochs (default: %(default)s, the study's)")
    g.add_argument("--batch-size", type=options.positive_int(options.MAX_BATCH), default=32, help="(default: %(default)s)")
    g.add_argument("--optimizer", choices=OPTIMIZER_NAMES, default=None,
                   help="(default: per architecture, below)")
    g.add_argument("--lr", type=options.real(0, options.MAX_LR, low_open=True), default=None,
                   help="learning rate (default: per architecture)")
    g.add_argument("--weight-decay", type=options.real(0, options.MAX_LR), default=None,
                   help="(default: per architecture)")
    g.add_argument("--grad-clip", type=options.real(0, 1e6, low_open=True), default=1.0,
                   help="gradient-norm clipping (default: %(default)s)")
    g.add_argument("--drop-last-single", action="store_true",
                   help="drop the last training batch when it holds a single slice (BatchNorm "
                        "cannot train on one value per channel, e.g. a CNN whose bottleneck is "
                        "1x1 at small image sizes); off: the study keeps every batch")
    g.add_argument("--lr-factor", type=options.real(0, 1, low_open=True, high_open=True), default=0.5,
                   help="ReduceLROnPlateau factor (default: %(default)s)")
    g.add_argument("--lr-patience", type=options.non_negative_int(options.MAX_PATIENCE), default=10,
                   help="ReduceLROnPlateau patience (default: %(default)s)")
    g.add_argument("--patience", type=options.positive_int(options.MAX_PATIENCE), default=20,
                   help="early-stopping patience in epochs (default: %(default)s)")
    g.add_argument("--min-delta", type=options.real(0, 1e6), default=1e-3,
                   help="minimum improvement of the validation loss for a new best "
                        "checkpoint and the early-stopping counter (default: %(default)s)")
    g.add_argument("--min-epochs", type=options.non_negative_int(options.MAX_EPOCHS), default=40,
                   help="no early stop at or before this epoch, the study's warmup "
                        "(default: %(default)s)")
    g.add_argument("--device", default="auto",
                   help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    g.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="high-precision compute: auto = the study's fp16 autocast with a "
                        "GradScaler on CUDA (bf16 with --backend te), fp32 on CPU, or the "
                        "baseline recipe's own (default: %(default)s)")
    g.add_argument("--workers", type=options.non_negative_int(options.MAX_WORKERS), default=0,
                   help="DataLoader worker processes (default: %(default)s)")
    g.add_argument("--threads", type=options.non_negative_int(options.MAX_THREADS), default=DEFAULT_THREADS,
                   help=f"CPU threads for torch, 0 to {options.MAX_THREADS}; 0: torch's default, "
                        f"one per core (default: %(default)s, which stays fast when other jobs "
                        f"share the cores)")
    g.add_argument("--no-diagnostics", dest="diagnostics", action="store_false",
                   help="skip the attention / gradient-fidelity diagnostics at the end")

    g = parser.add_argument_group("output")
    g.add_argument("--out", default="results", metavar="DIR",
                   help="results directory (default: %(default)s)")
    g.add_argument("--resume", action="store_true",
                   help="continue from the cell's last checkpoint (or return its complete result)")
    g.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bars: one plain line per epoch (for logs)")
    return parser


def parse_config(argv: list[str] | None = None) -> RunConfig:
    """The RunConfig of a command line (argparse errors exit 2)."""
    args = build_parser().parse_args(argv)
    return RunConfig(**vars(args))


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _metrics_line(m: dict) -> str:
    """AUPRC first (with the chance level: the pixel prevalence), then the study's soft scores,
    then the per-patient ones beyond it."""
    auprc, prev = m.get("auprc"), m.get("prevalence")
    chance = (f" ({auprc / prev:.1f}x prevalence {prev:.4f})"
              if auprc is not None and prev else "")
    return (f"AUPRC {_fmt(auprc)}{chance}  soft Dice {_fmt(m.get('dice'))}  "
            f"soft recall {_fmt(m.get('recall'))}  F2 {_fmt(m.get('f2'))}  | patient Dice "
            f"{_fmt(m.get('patient_dice_mean'))}  lesion recall {_fmt(m.get('lesion_recall'))}")


def summary(result: dict) -> str:
    """A few lines for the terminal: the headline test metrics first, then val, training, time."""
    c = result["config"]
    head = f"{c['arch']}/{c['scale']}/{c['recipe']} fold {c['fold']} seed {c['seed']}"
    if c.get("split", "kfold") != "kfold":
        head = f"{c['arch']}/{c['scale']}/{c['recipe']} {c['split']} seed {c['seed']}"
    if result["status"] != "complete":
        return f"{head}: FAILED: {str(result['error']).splitlines()[0]}"
    test, val, t = result["test"] or {}, result["val"] or {}, result["timing"] or {}
    data = result["data"]
    skipped = sum(h.get("skipped_steps") or 0 for h in result["history"])
    lines = [f"{head}: complete (dataset {data['name']!r}"
             f"{', synthetic data' if data['synthetic'] else ''})",
             f"  test {_metrics_line(test)}",
             f"  val  {_metrics_line(val)}",
             f"  best epoch {result['best_epoch']} of {result['epochs_run']}"
             f"{' (early stop)' if result['stopped_early'] else ''}, "
             f"val loss {_fmt(result['best_val_loss'])}"
             f"{f', {skipped} steps skipped (non-finite loss)' if skipped else ''}",
             f"  {t.get('total_seconds', 0.0):.1f} s, median step "
             f"{_fmt(t.get('median_step_ms'))} ms"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Parse, run the cell, print a summary; 0 when complete, 1 when failed or bad input."""
    config = parse_config(argv)
    try:
        result = run(config)
    except (ValueError, OSError, ImportError, DataError, CellBusy) as e:  # not a bug
        print(f"python -m nvfp4bench: error: {e}", file=sys.stderr)
        return 1
    print(summary(result))
    print(f"  result: {_where(result, config)}")
    if result.get("collapsed"):
        print("python -m nvfp4bench: warning: the model collapsed: on the validation set its best "
              "checkpoint predicts no tumour pixel and ranks pixels no better than a constant "
              "output (recorded as collapsed: true)", file=sys.stderr)
    if result["status"] != "complete":
        print(f"python -m nvfp4bench: error: {result['error']}", file=sys.stderr)
        return 1
    return 0


def entry(argv: list[str] | None = None) -> int:
    """``python -m nvfp4bench``: ``main``, and Ctrl-C (or SIGTERM turned into it) exits 130 with
    one line that says how to resume. (The grid's in-process Slurm task calls ``main`` and
    handles the interrupt itself.)"""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return main(argv)
    except KeyboardInterrupt:
        again = [a for a in argv if a != "--resume"] + ["--resume"]
        print(f"\npython -m nvfp4bench: interrupted; the last finished epoch is checkpointed, "
              f"continue with: python -m nvfp4bench {shlex.join(again)}", file=sys.stderr)
        return 130


def _where(result: dict, config: RunConfig) -> str:
    return str(result_path(config))
