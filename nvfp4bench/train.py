"""Train one cell (arch x scale x recipe x fold x seed) and evaluate it (protocol.md "Training").

``run(config) -> dict`` does the whole job and returns the result JSON it wrote::

    store  = the slice store at --data (default: the embedded synthetic store, built on first use)
    folds  = load_folds(store)[fold]                    patient-level train / val / test
    model  = build_model(arch, scale) under a seed of (arch, scale, seed) only, so every recipe
             of one (arch, scale, seed) starts from the same weights (QAT from scratch);
             then quantize_model(model, recipe, generator=G_sr)
    each epoch:  train (BCE + Tversky, grad clip 1.0) -> validate (loss, AUPRC)
                 -> ReduceLROnPlateau(val loss) -> early stopping (val loss) -> checkpoint
    at the end:  reload the best-val-loss weights, evaluate val and test with every metric of
                 protocol.md, measure the diagnostics, write the JSON.

Best checkpoint and early stopping, both on the validation loss L_e of epoch e (1-based):
the best weights are those of the lowest L_e (strictly lower replaces); the stopping counter resets
when L_e < best_stop - min_delta (best_stop then becomes L_e) and training stops after epoch e when
the counter reaches ``patience`` and e >= ``min_epochs``.

Randomness, all explicit and checkpointed: the model init (fork of the global RNG seeded by
(arch, scale, seed)), the dropout / drop-path draws (global RNG forked and seeded by (seed,
"train") for the duration of the run; its state is saved), the shuffling (a torch.Generator of the
DataLoader), stochastic rounding (a torch.Generator given to the quantized layers), augmentation
(a function of (seed, epoch, index) in SliceDataset). So a cell killed after epoch k and resumed
ends with the same weights and metrics as one run straight through (CPU, bit for bit).

A non-finite training or validation loss (or gradient norm without a GradScaler) stops the cell:
its JSON gets ``status: "failed"`` and the error, no metrics.

Checkpoints (results.checkpoint_paths) hold only tensors and plain containers and are read back
with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import statistics
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader

from nvfp4bench import nvfp4, results
from nvfp4bench.atomic import save_torch_atomic
from nvfp4bench.config import RunConfig, check_image_size
from nvfp4bench.env import environment
from nvfp4bench.losses import BCETverskyLoss
from nvfp4bench.recipes import Recipe, get_recipe

OPTIMIZER_CLASSES: dict[str, type[torch.optim.Optimizer]] = {
    "adamax": torch.optim.Adamax,
    "adamw": torch.optim.AdamW,
    "adam": torch.optim.Adam,
}
# --precision name -> autocast dtype (None: no autocast, fp32 everywhere)
AUTOCAST_DTYPES: dict[str, torch.dtype | None] = {
    "fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# high-precision compute when neither --precision nor the recipe sets it
DEVICE_PRECISION: dict[str, str] = {"cpu": "fp32", "cuda": "bf16"}
# pooled pixel metrics recorded every epoch (SegmentationMeter keys)
VAL_METRICS = ("auprc", "dice", "recall", "precision", "f2", "iou")


class NonFiniteError(RuntimeError):
    """A loss or gradient norm became NaN or infinite: the cell stops and is marked failed."""


# --------------------------------------------------------------------------- small pure helpers

def derive_seed(*parts) -> int:
    """A 63-bit seed from any printable parts: sha256 of their '/'-joined text."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def init_seed(arch: str, scale: str, seed: int) -> int:
    """Seed of the model's initial weights: (arch, scale, seed) only, never the recipe."""
    return derive_seed("init", arch, scale, seed)


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda when available, else cpu; anything else as torch.device, checked."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"--device {name!r}: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name!r}: CUDA is not available on this machine")
    if device.type not in DEVICE_PRECISION:
        raise ValueError(f"--device {name!r}: only cpu and cuda are supported")
    return device


def resolve_precision(precision: str, recipe: Recipe, device: torch.device) -> str:
    """The high-precision compute dtype: --precision, else the recipe's, else the device's.

    A baseline recipe that fixes its dtype (fp16, fp32) cannot be run at another precision.
    """
    if recipe.compute_dtype is not None:
        if precision not in ("auto", recipe.compute_dtype):
            raise ValueError(f"recipe {recipe.name!r} computes in {recipe.compute_dtype}; "
                             f"--precision {precision} contradicts it (drop --precision)")
        return recipe.compute_dtype
    if precision != "auto":
        return precision
    return DEVICE_PRECISION[device.type]


def make_optimizer(config: RunConfig, params) -> torch.optim.Optimizer:
    cls = OPTIMIZER_CLASSES[config.optimizer]
    return cls(params, lr=config.lr, weight_decay=config.weight_decay)


@dataclass
class EarlyStopping:
    """Early stopping and best-checkpoint bookkeeping on the validation loss (module docstring)."""

    patience: int
    min_delta: float
    min_epochs: int
    best_loss: float = math.inf  # lowest validation loss: the kept checkpoint
    best_epoch: int | None = None
    stop_loss: float = math.inf  # reference of the patience counter
    bad_epochs: int = 0
    stopped: bool = False

    def update(self, epoch: int, val_loss: float) -> bool:
        """Record epoch ``epoch`` (1-based); True when its weights are the new best."""
        improved = val_loss < self.best_loss
        if improved:
            self.best_loss, self.best_epoch = val_loss, epoch
        if val_loss < self.stop_loss - self.min_delta:
            self.stop_loss, self.bad_epochs = val_loss, 0
        else:
            self.bad_epochs += 1
        self.stopped = epoch >= self.min_epochs and self.bad_epochs >= self.patience
        return improved

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            setattr(self, k, v)


def _median(xs) -> float | None:
    xs = list(xs)
    return float(statistics.median(xs)) if xs else None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------- the cell

@dataclass
class CellRun:
    """Everything ``run`` sets up before the first epoch (the cell itself: nvfp4bench.cell)."""

    config: RunConfig  # resolved (image size and epochs filled in)
    config_hash: str
    recipe: Recipe
    device: torch.device
    precision: str
    store: object
    split: dict
    json_path: Path
    ckpt_path: Path
    best_path: Path


def setup(config: RunConfig) -> CellRun:
    """Open the data and the fold, resolve every default, check the options."""
    from nvfp4bench.data import SliceStore, ensure_synthetic_store, load_folds

    recipe = get_recipe(config.recipe)
    device = resolve_device(config.device)
    precision = resolve_precision(config.precision, recipe, device)
    if config.data is None:
        store_dir = Path(ensure_synthetic_store(progress=config.progress))
    else:
        store_dir = Path(config.data)
        if not store_dir.is_dir():
            raise ValueError(f"--data {config.data}: no such directory (build a store with "
                             f"data_prep.py, or leave --data out for the synthetic one)")
    store = SliceStore(store_dir)
    folds = load_folds(store_dir)
    if not 0 <= config.fold < len(folds):
        raise ValueError(f"--fold {config.fold}: the store has folds 0..{len(folds) - 1}")
    split = folds[config.fold]
    resolved = config.resolved()
    image_size = resolved.image_size or check_image_size(int(store.image_size),
                                                         f"the store {store_dir}'s image size")
    resolved = dataclasses.replace(resolved, image_size=image_size, precision=precision,
                                   device=str(device))
    json_path = results.result_path(config, store)
    ckpt_path, best_path = results.checkpoint_paths(json_path)
    return CellRun(resolved, results.config_hash(config), recipe, device, precision, store, split,
                json_path, ckpt_path, best_path)


def build_quantized_model(cell: CellRun, sr_generator: torch.Generator) -> nn.Module:
    """The model of (arch, scale) initialised from (arch, scale, seed), then quantized."""
    from nvfp4bench.models import build_model, quantize_model
    c = cell.config
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed(c.arch, c.scale, c.seed))
        model = build_model(c.arch, c.scale, image_size=c.image_size,
                            in_channels=int(cell.store.channels))
    model = model.to(cell.device)
    model = quantize_model(model, cell.recipe, c.backend, generator=sr_generator,
                           quantize_attention=c.quantize_attention)
    return model


def make_loaders(cell: CellRun, loader_generator: torch.Generator):
    """Train (shuffled by ``loader_generator``, augmented), val and test DataLoaders."""
    from nvfp4bench.data import SliceDataset
    c = cell.config
    sets = {part: SliceDataset(cell.store, cell.split[part], image_size=c.image_size,
                               augment=c.augment and part == "train", seed=c.seed)
            for part in ("train", "val", "test")}
    for part, ds in sets.items():
        if len(ds) == 0:
            raise ValueError(f"fold {c.fold}: the {part} partition has no slices")
    pin = cell.device.type == "cuda"
    # A last batch of one slice breaks BatchNorm in training: drop it (only then).
    train = DataLoader(sets["train"], batch_size=c.batch_size, shuffle=True,
                       generator=loader_generator, num_workers=c.workers, pin_memory=pin,
                       drop_last=len(sets["train"]) % c.batch_size == 1)
    val, test = (DataLoader(sets[p], batch_size=c.batch_size, shuffle=False,
                            num_workers=c.workers, pin_memory=pin) for p in ("val", "test"))
    return sets["train"], train, val, test


def _autocast(cell: CellRun):
    dtype = AUTOCAST_DTYPES[cell.precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=cell.device.type, dtype=dtype)


def _probs(logits: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(logits.float().clamp(-20.0, 20.0))


def train_one_epoch(model, loader, loss_fn, optimizer, scaler, cell: CellRun, epoch: int,
                    bar) -> dict:
    """One pass over the training slices; mean loss, gradient norms (before clipping), step times."""
    model.train()
    total, count, norms, step_ms = 0.0, 0, [], []
    for step, (images, masks, _) in enumerate(loader):
        t0 = time.perf_counter()
        images = images.to(cell.device, non_blocking=True)
        masks = masks.to(cell.device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        with _autocast(cell):
            logits = model(images)
        loss = loss_fn(logits.float(), masks)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise NonFiniteError(f"epoch {epoch} step {step + 1}: training loss is {value} "
                                 f"(recipe {cell.recipe.name}, lr {cell.config.lr})")
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        norm = float(nn.utils.clip_grad_norm_(model.parameters(), cell.config.grad_clip))
        if not math.isfinite(norm) and not scaler.is_enabled():
            raise NonFiniteError(f"epoch {epoch} step {step + 1}: gradient norm is {norm} "
                                 f"(recipe {cell.recipe.name})")
        scaler.step(optimizer)
        scaler.update()
        _sync(cell.device)
        step_ms.append((time.perf_counter() - t0) * 1e3)
        n = images.shape[0]
        total += value * n
        count += n
        if math.isfinite(norm):
            norms.append(norm)
        bar.update(1)
        bar.set_postfix(loss=f"{value:.4f}")
    return {"train_loss": total / count, "grad_norm": sum(norms) / len(norms) if norms else None,
            "grad_norm_max": max(norms) if norms else None, "step_ms": step_ms}


@torch.no_grad()
def _predict(model, loader, meter, cell: CellRun, loss_fn=None) -> float | None:
    """Feed every batch's probabilities to ``meter``; the mean loss over slices when asked."""
    model.eval()
    total, count = 0.0, 0
    for images, masks, index in loader:
        images = images.to(cell.device)
        with _autocast(cell):
            logits = model(images)
        if loss_fn is not None:
            total += float(loss_fn(logits.float(), masks.to(cell.device))) * images.shape[0]
            count += images.shape[0]
        meter.update(_probs(logits).cpu(), masks, index)
    return total / count if loss_fn is not None else None


def validate(model, loader, loss_fn, cell: CellRun, epoch: int) -> dict:
    """The per-epoch validation: loss (mean over slices) and the pooled pixel metrics
    (AUPRC, soft recall / precision / F2 / IoU, soft Dice per image), no per-patient ones."""
    from nvfp4bench.metrics import SegmentationMeter
    meter = SegmentationMeter(patient_metrics=False)
    loss = _predict(model, loader, meter, cell, loss_fn)
    if not math.isfinite(loss):
        raise NonFiniteError(f"epoch {epoch}: validation loss is {loss} "
                             f"(recipe {cell.recipe.name})")
    m = meter.compute()
    return {"loss": loss, **{k: m[k] for k in VAL_METRICS}}


def voxel_spacing(cell: CellRun, patients) -> tuple[float, float, float] | None:
    """(slice, row, col) mm of the evaluated volumes when all ``patients`` share one spacing in
    the store, in-plane scaled by --image-size; None otherwise (HD95 is then in voxels)."""
    found = {tuple(cell.store.record(p).get("spacing") or ()) for p in patients}
    if len(found) != 1 or len(next(iter(found))) != 3:
        return None
    sz, sy, sx = (float(v) for v in found.pop())
    factor = float(cell.store.image_size) / float(cell.config.image_size)
    return (sz, sy * factor, sx * factor)


def evaluate(model, loader, cell: CellRun, part: str) -> dict:
    """Every metric of protocol.md on one partition (nvfp4bench.metrics.SegmentationMeter),
    plus the per-patient rows and the spacing HD95 is measured in."""
    from nvfp4bench.metrics import SegmentationMeter
    spacing = voxel_spacing(cell, cell.split[part])
    meter = SegmentationMeter(store=cell.store, spacing=spacing)
    _predict(model, loader, meter, cell)
    rows = meter.per_patient()
    return {**meter.compute(rows), "hd95_unit": "voxel" if spacing is None else "mm",
            "spacing": spacing, "per_patient": rows}


def measure_diagnostics(model, loader, loss_fn, cell: CellRun) -> dict | None:
    """diagnostics.measure on the first validation batch with tumour; None if not available."""
    from nvfp4bench.diagnostics import measure
    images, masks = None, None
    for x, y, _ in loader:
        if images is None or y.any():
            images, masks = x, y
        if y.any():
            break
    try:
        with _autocast(cell):
            out = measure(model, images.to(cell.device), masks.to(cell.device), loss_fn,
                          cell.recipe)
        return _finite_or_none(out)
    except Exception as e:  # a diagnostic must not sink a trained cell: record why it is missing
        return {"error": f"{type(e).__name__}: {e}"}


def _finite_or_none(obj):
    """Diagnostics with NaN / inf replaced by None (a ratio of zeros is 'undefined', not 0)."""
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_none(v) for v in obj]
    if isinstance(obj, torch.Tensor) and obj.numel() == 1:
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


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
            "path": str(Path(s.path).resolve()), "results_dir": results.store_dir_name(s),
            "image_size": int(s.image_size), "channels": int(s.channels),
            "spacing": s.spacing, "fold": cell.config.fold,
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
        with torch.random.fork_rng(devices=devices), nvfp4.use_backend(config.quant_kernels):
            return _run(cell, on_epoch_end)
    finally:
        torch.set_num_threads(threads)


def _run(cell: CellRun, on_epoch_end) -> dict:
    from tqdm import tqdm

    c = cell.config
    started = time.perf_counter()
    torch.manual_seed(derive_seed("train", c.seed))
    sr_gen = torch.Generator(device=cell.device).manual_seed(derive_seed("sr", c.seed))
    loader_gen = torch.Generator().manual_seed(derive_seed("loader", c.seed))

    model = build_quantized_model(cell, sr_gen)
    train_set, train_loader, val_loader, test_loader = make_loaders(cell, loader_gen)
    loss_fn = BCETverskyLoss()
    optimizer = make_optimizer(c, model.parameters())
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="min", factor=c.lr_factor, patience=c.lr_patience)
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
        "schema_version": results.SCHEMA_VERSION, "status": "running", "error": None,
        "config": c.to_dict(), "config_hash": cell.config_hash,
        "env": environment(cell.device), "data": _data_block(cell),
        "model": {"arch": c.arch, "scale": c.scale, "recipe": c.recipe,
                  "parameters": sum(p.numel() for p in model.parameters()),
                  "init_seed": init_seed(c.arch, c.scale, c.seed),
                  "quantized_layers": list(getattr(model, "quantized_layers", []))},
        "history": history, "best_epoch": None, "best_val_loss": None, "epochs_run": None,
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
            scheduler.step(val["loss"])
            if stopper.update(epoch, val["loss"]):
                save_torch_atomic({"model": model.state_dict(), "epoch": epoch,
                              "config_hash": cell.config_hash}, cell.best_path)
            step_ms.extend(tr["step_ms"])
            record = {"epoch": epoch, "train_loss": tr["train_loss"], "val_loss": val["loss"],
                      "val": {k: val[k] for k in VAL_METRICS}, "lr": lr, "grad_norm": tr["grad_norm"],
                      "grad_norm_max": tr["grad_norm_max"],
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
        best = torch.load(cell.best_path, map_location="cpu", weights_only=True)
        model.load_state_dict(best["model"])
        result["val"] = evaluate(model, val_loader, cell, "val")
        result["test"] = evaluate(model, test_loader, cell, "test")
        if c.diagnostics:
            result["diagnostics"] = measure_diagnostics(model, val_loader, loss_fn, cell)
        eval_s = time.perf_counter() - t_eval
        result.update(
            status="complete", best_epoch=stopper.best_epoch, best_val_loss=stopper.best_loss,
            epochs_run=len(history), stopped_early=stopper.stopped and len(history) < c.epochs,
            timing={"total_seconds": sum(h["seconds"] for h in history) + eval_s,
                    "train_seconds": sum(h["seconds"] for h in history),
                    "eval_seconds": eval_s,
                    "wall_seconds_this_process": time.perf_counter() - started,
                    "median_step_ms": _median(step_ms), "steps": len(step_ms),
                    "resumed_from_epoch": start_epoch or None})
    except NonFiniteError as e:
        result.update(status="failed", error=str(e), epochs_run=len(history))
        results.write_json_atomic(cell.json_path, result)
        return result
    except Exception as e:
        result.update(status="failed", epochs_run=len(history),
                      error=f"{type(e).__name__}: {e}\n{traceback.format_exc()}")
        results.write_json_atomic(cell.json_path, result)
        raise
    results.write_json_atomic(cell.json_path, result)
    return result
