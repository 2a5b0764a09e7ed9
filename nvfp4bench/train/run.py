"""Train one cell (arch x scale x recipe x fold x seed), evaluate it (docs/protocol.md "Training").

``run(config) -> dict`` does the whole job and returns the result JSON it wrote::

    store  = the slice store at --data (default: the embedded synthetic store, built on first use)
    folds  = load_folds(store, split)[fold]             the study's patient-level train / val / test
    model  = build_model(arch, scale) under a seed of (arch, scale, seed) only, so every recipe
             of one (arch, scale, seed) starts from the same weights (QAT from scratch);
             then quantize_model(model, recipe, generator=G_sr)
    each epoch:  train (BCE + Tversky, grad clip 1.0) -> validate (loss, AUPRC)
                 -> ReduceLROnPlateau(mode "max") stepped with minus the val loss
                 -> best checkpoint / early stopping (val loss) -> checkpoint
    at the end:  reload the best-val-loss weights, evaluate val and test with every metric of
                 docs/protocol.md, measure the diagnostics, write the JSON.

Randomness, all explicit and checkpointed: the model init (fork of the global RNG seeded by
(arch, scale, seed)), the dropout / drop-path draws (global RNG forked and seeded by (seed,
"train") for the duration of the run; its state is saved), the shuffling (a torch.Generator of the
DataLoader), stochastic rounding (a torch.Generator given to the quantized layers), augmentation
(a function of (seed, epoch, index) in SliceDataset). So a cell killed after epoch k and resumed
ends with the same weights and metrics as one run straight through (CPU, bit for bit).

A cell fails (JSON ``status: "failed"`` with the reason, no metrics) when a whole epoch's batches
have a non-finite loss, or when no epoch ever had a finite validation loss (no best checkpoint).

Checkpoints (results.checkpoint_paths) hold only tensors and plain containers and are read back
with ``torch.load(weights_only=True)``.

The parts: nvfp4bench.train.setup (seeds, device, precision, data, model, loaders),
nvfp4bench.train.loop (optimizer, scheduler, early stopping, one epoch of steps: the study's loop,
step by step), nvfp4bench.train.evaluate (validation, test metrics, diagnostics). This module is the
run: its epochs, checkpoints and result JSON.
"""
from __future__ import annotations

import math
import statistics
import time
import traceback
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from nvfp4bench import results
from nvfp4bench.atomic import save_torch_atomic
from nvfp4bench.cell import Cell
from nvfp4bench.config import PROTOCOL_VERSION, RunConfig
from nvfp4bench.data.store import store_dir_name
from nvfp4bench.env import environment
from nvfp4bench.locks import cell_lock
from nvfp4bench.train.evaluate import VAL_METRICS, evaluate, measure_diagnostics, validate
from nvfp4bench.train.loop import (EarlyStopping, NonFiniteError, make_optimizer, make_scheduler,
                                   train_one_epoch)
from nvfp4bench.train.losses import BCETverskyLoss
from nvfp4bench.train.setup import (CellRun, build_quantized_model, derive_seed, init_seed,
                                    make_loaders, setup)


CONVERGENCE_DICE = 0.5  # the study's target_dice: the convergence epoch reaches it
COLLAPSE_AUPRC_RATIO = 1.1  # collapsed: no positive pixel and AUPRC <= 1.1 x the prevalence

def collapsed(metrics: dict) -> bool:
    """Whether a model's metrics on a partition show a collapse: one constant probability for
    every pixel, or no positive pixel (no probability >= 0.5: tp + fp = 0) with a ranking no
    better than that: AUPRC at most ``COLLAPSE_AUPRC_RATIO`` x the prevalence (a constant output
    scores exactly the prevalence). Such a model still gets numbers (the study's soft Dice
    scores every empty slice 1), so a run records ``collapsed`` instead of passing for a result.

    No positive pixel alone is not a collapse: an under-confident model can rank tumour far
    above background below 0.5 (the embedded dataset's default cell after 100 epochs: no pixel
    above 0.5, AUPRC ~30x the prevalence). A partition without tumour pixels has no AUPRC; its
    model is judged only by a constant output."""
    if metrics.get("distinct_probabilities") == 1:
        return True
    auprc, prevalence = metrics.get("auprc"), metrics.get("prevalence")
    if auprc is None or not prevalence:
        return False
    return metrics["tp"] + metrics["fp"] == 0 and auprc <= COLLAPSE_AUPRC_RATIO * prevalence


def convergence_epoch(history: list[dict], target: float = CONVERGENCE_DICE) -> int | None:
    """The first epoch whose validation soft Dice (the study's) reaches ``target``, as the study's
    ``epochs_to_target`` (val_dice >= 0.5); None when no epoch did."""
    for record in history:
        dice = (record.get("val") or {}).get("dice")
        if dice is not None and dice >= target:
            return int(record["epoch"])
    return None


def _median(xs) -> float | None:
    xs = list(xs)
    return float(statistics.median(xs)) if xs else None


# --------------------------------------------------------------------------- checkpoints

def _rng_state(cell: CellRun, sr_gen: torch.Generator, loader_gen: torch.Generator) -> dict:
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(cell.device) if cell.device.type == "cuda" else None,
            "sr": sr_gen.get_state(), "loader": loader_gen.get_state()}


def _set_rng_state(state: dict, cell: CellRun, sr_gen, loader_gen) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and cell.device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], cell.device)
    sr_gen.set_state(state["sr"])
    loader_gen.set_state(state["loader"])


def _load_checkpoint(path: Path, cell: CellRun) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated or damaged (torch raises several kinds): one clear line
        raise ValueError(f"--resume: checkpoint {path} is unreadable ({type(e).__name__}); "
                         f"delete it to start the cell again, or run without --resume") from None
    if state.get("config_hash") != cell.config_hash:
        raise ValueError(f"--resume: checkpoint {path} belongs to another configuration "
                         f"(hash {state.get('config_hash')} != {cell.config_hash}); delete it or "
                         f"run without --resume")
    return state


# --------------------------------------------------------------------------- run

def _data_block(cell: CellRun) -> dict:
    s = cell.store
    return {"name": s.name, "synthetic": bool(s.synthetic), "fingerprint": s.fingerprint,
            "path": str(Path(s.path).resolve()), "results_dir": store_dir_name(s),
            "image_size": int(s.image_size), "channels": int(s.channels),
            "spacing": s.spacing, "split": cell.config.split, "fold": cell.config.fold,
            "patients": {p: list(cell.split[p]) for p in ("train", "val", "test")},
            "slices": {p: len(s.slice_indices(cell.split[p])) for p in ("train", "val", "test")}}


def run(config: RunConfig, *, on_epoch_end: Callable[[int, dict], None] | None = None) -> dict:
    """Train and evaluate one cell; write and return its result JSON (see module docstring).

    ``on_epoch_end(epoch, record)`` is called after each epoch's checkpoint is written (tests use
    it to kill a run). A NaN / inf loss returns a result with status "failed"; any other error
    writes a failed result and is raised again.
    """
    cell = setup(config)
    if config.resume and results.is_complete(cell.json_path, cell.config_hash):
        return results.read_result(cell.json_path)
    results.check_same_store(cell.json_path, cell.store.fingerprint)
    devices = [cell.device.index or 0] if cell.device.type == "cuda" else []
    threads = torch.get_num_threads()
    try:
        if config.threads:  # 0 / None: torch's default
            torch.set_num_threads(config.threads)
        # one cell, one runner: the grid's lock file, taken here when no grid holds it
        lock = results.sibling(cell.json_path, ".lock")
        with cell_lock(lock, Cell.of(cell.config).label):
            if config.resume and results.is_complete(cell.json_path, cell.config_hash):
                return results.read_result(cell.json_path)  # finished before our claim
            with torch.random.fork_rng(devices=devices):
                return _run(cell, on_epoch_end)
    finally:
        torch.set_num_threads(threads)


def _run(cell: CellRun, on_epoch_end) -> dict:

    c = cell.config
    started = time.perf_counter()
    torch.manual_seed(derive_seed("train", c.seed))
    sr_gen = torch.Generator(device=cell.device).manual_seed(derive_seed("sr", c.seed))
    loader_gen = torch.Generator().manual_seed(derive_seed("loader", c.seed))

    model = build_quantized_model(cell, sr_gen)
    train_set, train_loader, val_loader, test_loader = make_loaders(cell, loader_gen)
    loss_fn = BCETverskyLoss()
    optimizer = make_optimizer(c, model.parameters())
    scheduler = make_scheduler(optimizer, c)
    scaler = torch.amp.GradScaler(cell.device.type, enabled=cell.precision == "fp16")
    stopper = EarlyStopping(c.patience, c.min_delta, c.min_epochs)
    history: list[dict] = []
    step_ms: list[float] = []
    start_epoch = 0

    if c.resume and cell.ckpt_path.exists():
        state = _load_checkpoint(cell.ckpt_path, cell)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        stopper.load_state_dict(state["early_stopping"])
        _set_rng_state(state["rng"], cell, sr_gen, loader_gen)
        history, step_ms = list(state["history"]), state["step_ms"].tolist()
        start_epoch = int(state["epoch"])

    result = {
        "schema_version": results.SCHEMA_VERSION, "protocol_version": PROTOCOL_VERSION,
        "status": "running", "error": None,
        "config": c.to_dict(), "config_hash": cell.config_hash,
        "env": environment(cell.device), "data": _data_block(cell),
        "model": {"arch": c.arch, "scale": c.scale, "recipe": c.recipe, "format": c.format,
                  "parameters": sum(p.numel() for p in model.parameters()),
                  "family": c.family, "init_seed": init_seed(c.family, c.scale, c.seed),
                  "quantized_layers": list(getattr(model, "quantized_layers", [])),
                  "layer_backends": dict(getattr(model, "layer_backends", {}))},
        "history": history, "best_epoch": None, "best_val_loss": None,
        "convergence_epoch": None, "collapsed": None, "epochs_run": None,
        "stopped_early": None, "val": None, "test": None, "timing": None, "diagnostics": None,
        "checkpoints": {"last": str(cell.ckpt_path), "best": str(cell.best_path)},
    }

    try:
        epoch = start_epoch
        while epoch < c.epochs and not stopper.stopped:
            epoch += 1
            t0 = time.perf_counter()
            train_set.set_epoch(epoch)
            lr = float(optimizer.param_groups[0]["lr"])
            with tqdm(total=len(train_loader), desc=f"epoch {epoch}/{c.epochs}",
                      disable=not c.progress, leave=True, dynamic_ncols=True) as bar:
                tr = train_one_epoch(model, train_loader, loss_fn, optimizer, scaler, cell,
                                     epoch, bar)
                val = validate(model, val_loader, loss_fn, cell, epoch)
                auprc = "n/a" if val["auprc"] is None else f"{val['auprc']:.4f}"
                bar.set_postfix(loss=f"{tr['train_loss']:.4f}", val_loss=f"{val['loss']:.4f}",
                                val_auprc=auprc)
            scheduler.step(-val["loss"])
            if stopper.update(epoch, val["loss"]):
                save_torch_atomic({"model": model.state_dict(), "epoch": epoch,
                              "config_hash": cell.config_hash}, cell.best_path)
            step_ms.extend(tr["step_ms"])
            record = {"epoch": epoch, "train_loss": tr["train_loss"],
                      "val_loss": val["loss"] if math.isfinite(val["loss"]) else None,
                      "val": {k: val[k] for k in VAL_METRICS}, "lr": lr, "grad_norm": tr["grad_norm"],
                      "grad_norm_max": tr["grad_norm_max"], "skipped_steps": tr["skipped_steps"],
                      "nonfinite_grad_steps": tr["nonfinite_grad_steps"],
                      "step_ms_median": _median(tr["step_ms"]),
                      "seconds": time.perf_counter() - t0}
            history.append(record)
            save_torch_atomic({"config_hash": cell.config_hash, "epoch": epoch,
                          "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                          "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                          "early_stopping": stopper.state_dict(),
                          "rng": _rng_state(cell, sr_gen, loader_gen), "history": history,
                          "step_ms": torch.tensor(step_ms, dtype=torch.float64)},
                         cell.ckpt_path)
            if not c.progress:  # a plain line per epoch for logs
                print(f"epoch {epoch}/{c.epochs}: loss {tr['train_loss']:.4f}, val loss "
                      f"{val['loss']:.4f}, val AUPRC {auprc}, lr {lr:.3g}, "
                      f"{record['seconds']:.1f} s", flush=True)
            if on_epoch_end is not None:
                on_epoch_end(epoch, record)

        t_eval = time.perf_counter()
        if stopper.best_epoch is None:
            raise NonFiniteError(f"no epoch of {len(history)} had a finite validation loss: there "
                                 f"is no best checkpoint (recipe {cell.recipe.name})")
        best = torch.load(cell.best_path, map_location="cpu", weights_only=True)
        model.load_state_dict(best["model"])
        result["val"] = evaluate(model, val_loader, cell, "val")
        result["test"] = evaluate(model, test_loader, cell, "test")
        if c.diagnostics:
            result["diagnostics"] = measure_diagnostics(model, val_loader, loss_fn, cell)
        eval_s = time.perf_counter() - t_eval
        result.update(
            status="complete", best_epoch=stopper.best_epoch, best_val_loss=stopper.best_loss,
            convergence_epoch=convergence_epoch(history), collapsed=collapsed(result["val"]),
            epochs_run=len(history), stopped_early=stopper.stopped and len(history) < c.epochs,
            timing={"total_seconds": sum(h["seconds"] for h in history) + eval_s,
                    "train_seconds": sum(h["seconds"] for h in history),
                    "eval_seconds": eval_s,
                    "wall_seconds_this_process": time.perf_counter() - started,
                    "median_step_ms": _median(step_ms), "steps": len(step_ms),
                    "resumed_from_epoch": start_epoch or None})
    except NonFiniteError as e:
        result.update(status="failed", error=str(e), epochs_run=len(history))
        results.write_result(cell.json_path, result)
        return result
    except Exception as e:
        result.update(status="failed", epochs_run=len(history),
                      error=f"{type(e).__name__}: {e}\n{traceback.format_exc()}")
        results.write_result(cell.json_path, result)
        raise
    results.write_result(cell.json_path, result)
    return result
