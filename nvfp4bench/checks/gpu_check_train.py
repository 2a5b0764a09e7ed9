"""Training timings and the study's cost, for ``nvfp4bench.gpu_check``.

``train``: per arch, the baseline, nvfp4_full and 2d_rht_sr each train one epoch on a synthetic
store through the trainer's own loop (``setup.setup`` -> ``CellRun``, ``loop.train_one_epoch``:
data loading, the backend's autocast context, GradScaler, clipping, optimizer), then run one
validation pass (``evaluate.validate``), at the study's precision (``setup.DEVICE_PRECISION``: fp16
autocast + GradScaler on CUDA, fp32 on the CPU) and the trainer's default quantizer kernels
(``RunConfig.quant_kernels``, ``TRAIN_KERNELS``). An epoch that would overrun its share of the
time cap stops early and is extrapolated (``complete: false``).

Projection (``projection`` stage) of one cell of the study::

    step_s  = (train wall - first step) / (steps - 1)      the first step warms up (cuDNN, caches)
    epoch_s = step_s * ceil(TRAIN_SLICES / 32) + val_batch_s * ceil(VAL_SLICES / 32)
    cell_h  = EPOCHS * epoch_s / 3600

with the LGG set's 3,929 slices split 80 / 10 / 10 % (train / val / test, hold-out and every CV
fold alike) and EPOCHS = 100, the study's maximum (early stopping may end a cell from epoch 40
on: the hours are an upper bound). The eight recipes are timed by proxy: the 1-D recipes
(nvfp4_full, fwd_only, chain_rule, sr_only) as nvfp4_full, the 2-D / RHT ones (2d_rht,
2d_rht_sr, fwd_rht) as 2d_rht_sr; an arm by its model family (vit_adamax as vit: the optimiser's
step is a small part of it). Scales without a measurement use the middle scale's time.
"""
from __future__ import annotations

import math
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

# The project's modules (the only place this file names them).
from nvfp4bench.checks import bench
from nvfp4bench.config import ARMS, RunConfig
from nvfp4bench.data import SliceStore, ensure_synthetic_store
from nvfp4bench.quant.recipes import RECIPES, STUDY_RECIPES
from nvfp4bench.train.evaluate import validate
from nvfp4bench.train.loop import make_optimizer, synchronize, train_one_epoch
from nvfp4bench.train.losses import BCETverskyLoss
from nvfp4bench.train.setup import DEVICE_PRECISION, build_quantized_model, make_loaders, setup

ARCHS = ("cnn", "vit", "swin")
SCALES = ("tiny", "small", "base")
MIDDLE_SCALE = "small"
TIMED_RECIPES = (bench.BASELINE_RECIPE, "nvfp4_full", "2d_rht_sr")
PRECISION = DEVICE_PRECISION  # the study's: fp16 autocast + GradScaler on CUDA
TRAIN_KERNELS = RunConfig.quant_kernels  # the trainer's default --quant-kernels
STUDY_SLICES = 3929
TRAIN_SLICES, VAL_SLICES = round(0.8 * STUDY_SLICES), round(0.1 * STUDY_SLICES)
EPOCHS = 100
PROXY = {r: (bench.BASELINE_RECIPE if not RECIPES[r].quantized else
             "2d_rht_sr" if RECIPES[r].rht or RECIPES[r].weight_tile == (16, 16) else "nvfp4_full")
         for r in STUDY_RECIPES}


def study_recipe(study_id: int) -> str:
    return next(r for r in STUDY_RECIPES if RECIPES[r].study_id == study_id)


# name -> (arms, scales, recipes, runs per cell: seeds or folds)
MATRICES = {
    "hold-out": (tuple(ARMS), SCALES, STUDY_RECIPES, 1),
    "multi-seed": (("swin", "cnn"), SCALES, STUDY_RECIPES, 10),
    "5-fold CV": (("swin", "cnn"), (MIDDLE_SCALE,), (study_recipe(0), study_recipe(5)), 5),
    "full 5-fold grid": (ARCHS, SCALES, STUDY_RECIPES, 5),
}


def _result(status: str, line: str, **details) -> dict:
    return {"status": status, "line": line, **details}


class _NullBar:
    def update(self, n=1):
        pass

    def set_postfix(self, **kw):
        pass


class CappedLoader:
    """Iterate ``loader`` until ``max_steps`` batches or ``deadline`` (time.monotonic())."""

    def __init__(self, loader, deadline: float, max_steps: int | None):
        self.loader, self.deadline, self.max_steps = loader, deadline, max_steps
        self.full = len(loader)
        self.done = 0

    def __len__(self) -> int:
        return self.full

    def __iter__(self):
        self.done = 0
        for batch in self.loader:
            yield batch
            self.done += 1
            if (self.max_steps is not None and self.done >= self.max_steps) \
                    or time.monotonic() > self.deadline:
                return


def make_store(path: Path, patients: int, image_size: int) -> dict:
    """A synthetic slice store (``data_prep.py --source synthetic``), built unless present."""
    t0 = time.perf_counter()
    store = SliceStore(ensure_synthetic_store(path, patients=patients, image_size=image_size,
                                              progress=False))
    return {"path": str(path), "slices": int(store.index["n_slices"]), "patients": patients,
            "image_size": int(store.image_size), "seconds": time.perf_counter() - t0}



def loader_workers(device: torch.device) -> int:
    """DataLoader workers: none on the CPU (the cores train); on a GPU host up to 4, when
    /dev/shm can hold their batches (a container's default 64 MB cannot: workers would die)."""
    if device.type != "cuda":
        return 0
    try:
        shm_free = shutil.disk_usage("/dev/shm").free
    except OSError:
        return 0
    return min(4, (os.cpu_count() or 1) // 2) if shm_free > 2 * 2**30 else 0


def train_cell(arch: str, scale: str, recipe: str, ctx, seconds: float,
               max_steps: int | None) -> dict:
    """One (capped) training epoch and validation pass of a cell; timings and peak memory."""
    dev, s = ctx.device, ctx.sizes
    workers = loader_workers(dev)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = RunConfig(arch=arch, scale=scale, recipe=recipe, data=str(ctx.store_dir),
                        device=str(dev), precision=PRECISION[dev.type],
                        quant_kernels=TRAIN_KERNELS, batch_size=s.batch_size,
                        image_size=s.image_size, workers=workers, progress=False,
                        diagnostics=False, out=tmp)
        cell = setup(cfg)  # a CellRun
        model = build_quantized_model(cell, torch.Generator(dev).manual_seed(0))
        train_set, train_loader, val_loader, _ = make_loaders(
            cell, torch.Generator().manual_seed(0))
        loss_fn = BCETverskyLoss()
        optimizer = make_optimizer(cell.config, model.parameters())
        scaler = torch.amp.GradScaler(dev.type, enabled=cell.precision == "fp16")
        train_set.set_epoch(1)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        deadline = time.monotonic() + 0.85 * seconds
        capped = CappedLoader(train_loader, deadline, max_steps)
        synchronize(dev)
        t0 = time.perf_counter()
        tr = train_one_epoch(model, capped, loss_fn, optimizer, scaler, cell, 1, _NullBar())
        synchronize(dev)
        train_s = time.perf_counter() - t0
        vcap = CappedLoader(val_loader, max(deadline, time.monotonic() + 1), max_steps)
        t0 = time.perf_counter()
        validate(model, vcap, loss_fn, cell, 1)
        synchronize(dev)
        val_s = time.perf_counter() - t0
    steps, step_ms = capped.done, tr["step_ms"]
    step_s = ((train_s - step_ms[0] / 1e3) / (steps - 1)) if steps > 1 else train_s
    val_batch_s = val_s / max(vcap.done, 1)
    epoch_s = train_s if steps == capped.full else (step_ms[0] / 1e3 + step_s * (capped.full - 1))
    peak = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None
    return {"arch": arch, "scale": scale, "recipe": recipe, "precision": cell.precision,
            "image_size": s.image_size, "batch_size": s.batch_size, "workers": workers,
            "quant_kernels": cell.config.quant_kernels, "skipped_steps": tr["skipped_steps"],
            "steps": steps, "steps_per_epoch": capped.full, "complete": steps == capped.full,
            "epoch_s": epoch_s, "train_wall_s": train_s, "val_s": val_s,
            "val_batches": vcap.done, "step_s": step_s, "val_batch_s": val_batch_s,
            "median_step_ms": statistics.median(step_ms[1:] or step_ms),
            "first_step_ms": step_ms[0], "peak_gb": peak,
            "study_epoch_s": step_s * math.ceil(TRAIN_SLICES / s.batch_size)
            + val_batch_s * math.ceil(VAL_SLICES / s.batch_size)}


def _run_cells(ctx, scales, max_steps, budget_s: float) -> list[dict]:
    cells = [(a, sc, r) for sc in scales for a in ARCHS for r in TIMED_RECIPES]
    rows, t_end = [], time.monotonic() + budget_s
    for i, (arch, scale, recipe) in enumerate(cells):
        share = (t_end - time.monotonic()) / (len(cells) - i)
        if share < 2:
            rows.append({"arch": arch, "scale": scale, "recipe": recipe, "skipped": "no time left"})
            continue
        try:
            rows.append(train_cell(arch, scale, recipe, ctx, share, max_steps))
        except Exception as err:  # noqa: BLE001 - one failing cell must not hide the others
            if type(err).__name__ == "StageTimeout":
                raise
            rows.append({"arch": arch, "scale": scale, "recipe": recipe,
                         "error": f"{type(err).__name__}: {str(err)[:200]}"})
        finally:
            if ctx.device.type == "cuda":
                torch.cuda.empty_cache()
    for row in rows:
        base = next((r for r in rows if r["arch"] == row["arch"] and r["scale"] == row["scale"]
                     and r["recipe"] == bench.BASELINE_RECIPE and "step_s" in r), None)
        if "step_s" in row and base:
            row["ratio_to_baseline"] = row["step_s"] / base["step_s"]
    return rows


def stage_train(ctx) -> dict:
    rows = _run_cells(ctx, (ctx.sizes.scale,), ctx.sizes.max_steps, 0.9 * ctx.left())
    ok = [r for r in rows if "step_s" in r]
    bad = [f"{r['arch']}/{r['recipe']}: {r.get('error') or r['skipped']}" for r in rows
           if "step_s" not in r]
    parts = [f"{r['arch']}/{r['recipe']} {r['epoch_s']:.1f} s/ep "
             f"x{r.get('ratio_to_baseline', 0):.1f}"
             + ("" if r["complete"] else f" ({r['steps']}/{r['steps_per_epoch']} steps)")
             for r in ok]
    line = "; ".join(parts) + (f"; FAILED {'; '.join(bad)}" if bad else "")
    line = line if len(line) <= 600 else line[:597] + "..."
    return _result("FAIL" if bad else "PASS", line, rows=rows)


def stage_train_scales(ctx) -> dict:
    scales = ctx.sizes.other_scales
    if not scales:
        return _result("SKIP", "--quick: the projection uses the measured scale for all scales")
    rows = _run_cells(ctx, scales, ctx.sizes.scale_steps, 0.9 * ctx.left())
    ok = [r for r in rows if "step_s" in r]
    errors = [f"{r['arch']}/{r['scale']}/{r['recipe']}: {r['error']}" for r in rows
              if "error" in r]
    line = "; ".join(f"{r['arch']}/{r['scale']}/{r['recipe']} {r['median_step_ms']:.0f} ms/step"
                     for r in ok) or "no cell measured"
    skipped = sum("skipped" in r for r in rows)
    line += (f"; {skipped} cells not reached (time)" if skipped else "") + (
        f"; FAILED {'; '.join(errors)}" if errors else "")
    return _result("FAIL" if errors else "PASS" if ok else "SKIP", line[:600], rows=rows)


def project(rows: list[dict], middle_scale: str = MIDDLE_SCALE) -> dict:
    """GPU-hours of each run matrix (module docstring) from measured cell rows."""
    timed = {(r["arch"], r["scale"], r["recipe"]): r["study_epoch_s"]
             for r in rows if "study_epoch_s" in r}
    out = {}
    for name, (archs, scales, recipes, runs) in MATRICES.items():
        hours, assumed = 0.0, set()
        for a in archs:
            for sc in scales:
                for r in recipes:
                    family = ARMS[a].family
                    key = (family, sc, PROXY[r])
                    if key not in timed:
                        key = (family, middle_scale, PROXY[r])
                        assumed.add(f"{a}/{sc}")
                    if key not in timed:
                        return {"error": f"no timing for {key}"}
                    hours += runs * EPOCHS * timed[key] / 3600
        out[name] = {"cells": len(archs) * len(scales) * len(recipes) * runs,
                     "gpu_hours": hours, "scales_assumed_as_middle": sorted(assumed)}
    return out


def stage_projection(ctx) -> dict:
    rows = [r for st in ("train", "train_scales") for r in ctx.results.get(st, {}).get("rows", [])]
    proj = project(rows, ctx.sizes.scale)
    if "error" in proj:
        return _result("FAIL", proj["error"])
    line = "; ".join(f"{k} {v['cells']} runs {v['gpu_hours']:.0f} GPU-h" for k, v in proj.items())
    return _result("INFO", line + f" (<= {EPOCHS} epochs each)", matrices=proj,
                   assumptions=__doc__.split("Projection")[1].strip())


def markdown_tables(results: dict) -> list[list[str]]:
    """The training and projection tables of the summary (when those stages ran)."""
    tables = []
    rows = [r for st in ("train", "train_scales") for r in results.get(st, {}).get("rows", [])
            if "step_s" in r]
    if rows:
        t = ["| arch | scale | recipe | s/epoch (synthetic) | steps | ms/step | x baseline | "
             "peak GB | study epoch s |", "|---|---|---|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            peak = "-" if r["peak_gb"] is None else f"{r['peak_gb']:.1f}"
            t.append(f"| {r['arch']} | {r['scale']} | {r['recipe']} | {r['epoch_s']:.1f}"
                     f"{'' if r['complete'] else ' (proj.)'} | {r['steps']}/"
                     f"{r['steps_per_epoch']} | {r['median_step_ms']:.0f} | "
                     f"{r.get('ratio_to_baseline', float('nan')):.2f} | {peak} | "
                     f"{r['study_epoch_s']:.0f} |")
        tables.append(t)
    proj = results.get("projection", {}).get("matrices")
    if proj:
        t = ["| run matrix | runs | GPU-hours (<= 100 epochs) | scales taken as the middle |",
             "|---|---:|---:|---|"]
        for name, v in proj.items():
            t.append(f"| {name} | {v['cells']} | {v['gpu_hours']:.1f} | "
                     f"{', '.join(v['scales_assumed_as_middle']) or '-'} |")
        tables.append(t)
    return tables
