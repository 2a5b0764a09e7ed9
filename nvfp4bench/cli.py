"""Command line of one cell: ``python -m nvfp4bench --arch A --scale S --recipe R --fold K``.

Thin by design: ``build_parser`` declares the options (grouped: model, quantization, data,
training, output), ``parse_config(argv)`` turns them into a frozen ``RunConfig``, ``main(argv)``
runs ``nvfp4bench.train.run`` and prints a summary. Bad options are argparse errors (exit 2, no
traceback); a bad data directory or a failed cell exits 1 with a one-line message.
"""
from __future__ import annotations

import argparse
import math
import sys

from nvfp4bench.config import (BACKENDS, DEFAULT_EPOCHS, DEFAULT_SEED, DEFAULT_THREADS,
                               OPTIMIZER_NAMES, OPTIMIZERS, PRECISIONS, SYNTHETIC_EPOCHS,
                               RunConfig)
from nvfp4bench import nvfp4
from nvfp4bench.recipes import RECIPES


def _registry():
    """(architectures, scales) from the model registry."""
    from nvfp4bench.models import ARCHS, SCALES
    return tuple(ARCHS), tuple(SCALES)


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def _positive_int(text: str) -> int:
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _image_size(text: str) -> int:
    from nvfp4bench.config import check_image_size
    try:
        return check_image_size(_int(text), "")
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).strip()) from None


def _non_negative_int(text: str) -> int:
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = _float(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    value = _float(text)
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    archs, scales = _registry()
    recipes = "\n".join(f"  {name:<11} {r.description}" for name, r in RECIPES.items())
    optim = "\n".join(f"  {arch:<5} {s.name} lr {s.lr:g}, weight decay {s.weight_decay:g}"
                      for arch, s in OPTIMIZERS.items())
    parser = argparse.ArgumentParser(
        prog="python -m nvfp4bench", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train and evaluate one cell (arch x scale x recipe x fold) of the grid and "
                    "write its result JSON.",
        epilog=f"architectures: {', '.join(archs)}\nscales: {', '.join(scales)}\n\n"
               f"recipes:\n{recipes}\n\ndefault optimisers:\n{optim}\n\n"
               f"example:\n  python -m nvfp4bench --arch swin --scale tiny "
               f"--recipe nvfp4_full --fold 0")

    g = parser.add_argument_group("model")
    g.add_argument("--arch", choices=archs, required=True, help="architecture family")
    g.add_argument("--scale", choices=scales, required=True, help="model scale")
    g.add_argument("--image-size", type=_image_size, default=None,
                   help="input size in pixels (default: the data store's own size)")

    g = parser.add_argument_group("quantization")
    g.add_argument("--recipe", choices=list(RECIPES), required=True, metavar="RECIPE",
                   help="QAT recipe (listed below)")
    g.add_argument("--backend", choices=BACKENDS, default="emulator",
                   help="NVFP4 implementation: the exact emulator, or Transformer Engine "
                        "(CUDA, optional) (default: %(default)s)")
    g.add_argument("--quantize-attention", action="store_true",
                   help="also quantize the two attention matmuls (an extension; off in the study)")
    g.add_argument("--quant-kernels", choices=nvfp4.BACKENDS, default="auto",
                   help="the emulator's kernels: eager PyTorch, torch.compile'd, or auto "
                        "(compile large CPU tensors); the bits are the same (default: "
                        "%(default)s)")

    g = parser.add_argument_group("data")
    g.add_argument("--data", default=None, metavar="DIR",
                   help="slice store built by data_prep.py (default: the embedded synthetic "
                        "dataset, built on first use)")
    g.add_argument("--fold", type=_int, choices=range(5), required=True, metavar="{0..4}",
                   help="cross-validation fold")
    g.add_argument("--seed", type=_int, default=DEFAULT_SEED,
                   help="seed of the initial weights, shuffling, dropout, augmentation and "
                        "stochastic rounding (default: %(default)s)")
    g.add_argument("--no-augment", dest="augment", action="store_false",
                   help="train without the study's augmentation")

    g = parser.add_argument_group("training")
    g.add_argument("--epochs", type=_positive_int, default=None,
                   help=f"maximum epochs (default: {DEFAULT_EPOCHS}; {SYNTHETIC_EPOCHS} on the "
                        f"embedded synthetic dataset)")
    g.add_argument("--batch-size", type=_positive_int, default=32, help="(default: %(default)s)")
    g.add_argument("--optimizer", choices=OPTIMIZER_NAMES, default=None,
                   help="(default: per architecture, below)")
    g.add_argument("--lr", type=_positive_float, default=None,
                   help="learning rate (default: per architecture)")
    g.add_argument("--weight-decay", type=_non_negative_float, default=None,
                   help="(default: per architecture)")
    g.add_argument("--grad-clip", type=_positive_float, default=1.0,
                   help="gradient-norm clipping (default: %(default)s)")
    g.add_argument("--lr-factor", type=_positive_float, default=0.5,
                   help="ReduceLROnPlateau factor (default: %(default)s)")
    g.add_argument("--lr-patience", type=_non_negative_int, default=10,
                   help="ReduceLROnPlateau patience (default: %(default)s)")
    g.add_argument("--patience", type=_positive_int, default=20,
                   help="early-stopping patience in epochs (default: %(default)s)")
    g.add_argument("--min-delta", type=_non_negative_float, default=1e-3,
                   help="early-stopping minimum improvement of the validation loss "
                        "(default: %(default)s)")
    g.add_argument("--min-epochs", type=_non_negative_int, default=40,
                   help="no early stop before this epoch (default: %(default)s)")
    g.add_argument("--device", default="auto",
                   help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    g.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="high-precision compute: auto = fp32 on CPU, bf16 autocast on CUDA, or "
                        "the baseline recipe's own; fp16 uses a GradScaler (default: %(default)s)")
    g.add_argument("--workers", type=_non_negative_int, default=0,
                   help="DataLoader worker processes (default: %(default)s)")
    g.add_argument("--threads", type=_non_negative_int, default=DEFAULT_THREADS,
                   help="CPU threads for torch; 0: torch's default, one per core (default: "
                        "%(default)s, which stays fast when other jobs share the cores)")
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


def summary(result: dict) -> str:
    """A few lines for the terminal: where the JSON went and the headline numbers."""
    c = result["config"]
    head = f"{c['arch']}/{c['scale']}/{c['recipe']} fold {c['fold']} seed {c['seed']}"
    if result["status"] != "complete":
        return f"{head}: FAILED: {str(result['error']).splitlines()[0]}"
    test, val, t = result["test"] or {}, result["val"] or {}, result["timing"] or {}
    data = result["data"]
    lines = [f"{head}: complete (dataset {data['name']!r}"
             f"{', synthetic data' if data['synthetic'] else ''})",
             f"  best epoch {result['best_epoch']} of {result['epochs_run']}"
             f"{' (early stop)' if result['stopped_early'] else ''}, "
             f"val loss {_fmt(result['best_val_loss'])}",
             f"  val  AUPRC {_fmt(val.get('auprc'))}",
             # the primary metric, then what says whether tumours were found at all: soft recall
             # and precision, Dice and lesion recall per patient (a soft per-image Dice is high
             # on tumour-free slices even when every tumour is missed)
             f"  test AUPRC {_fmt(test.get('auprc'))}  recall {_fmt(test.get('recall'))}  "
             f"precision {_fmt(test.get('precision'))}",
             f"  test per patient: Dice {_fmt(test.get('patient_dice_mean'))}  lesion recall "
             f"{_fmt(test.get('lesion_recall'))}  HD95 {_fmt(test.get('hd95_mean'))}",
             f"  {t.get('total_seconds', 0.0):.1f} s, median step "
             f"{_fmt(t.get('median_step_ms'))} ms"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Parse, run the cell, print a summary; 0 when complete, 1 when failed or bad input."""
    config = parse_config(argv)
    from nvfp4bench.data import DataError
    from nvfp4bench.train import run
    try:
        result = run(config)
    except (ValueError, OSError, ImportError, DataError) as e:  # bad input, not a bug
        print(f"python -m nvfp4bench: error: {e}", file=sys.stderr)
        return 1
    print(summary(result))
    print(f"  result: {_where(result, config)}")
    if result["status"] != "complete":
        print(f"python -m nvfp4bench: error: {result['error']}", file=sys.stderr)
        return 1
    return 0


def entry(argv: list[str] | None = None) -> int:
    """``python -m nvfp4bench``: ``main``, and Ctrl-C (or SIGTERM turned into it) exits 130 with
    one line that says how to resume. (The grid's in-process Slurm task calls ``main`` and
    handles the interrupt itself.)"""
    import shlex
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return main(argv)
    except KeyboardInterrupt:
        again = [a for a in argv if a != "--resume"] + ["--resume"]
        print(f"\npython -m nvfp4bench: interrupted; the last finished epoch is checkpointed, "
              f"continue with: python -m nvfp4bench {shlex.join(again)}", file=sys.stderr)
        return 130


def _where(result: dict, config: RunConfig) -> str:
    from nvfp4bench.results import result_path
    return str(result_path(config))
