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

The study's loop (common/utils.py of its release), step by step:

* validation loss L_e of epoch e (1-based) = the mean over validation batches of each batch's mean
  loss (the study's average: a smaller last batch weighs as much as a full one);
* ReduceLROnPlateau(mode="max", factor 0.5, patience 10, its default relative threshold 1e-4)
  stepped with -L_e (in mode "max" on negative values the threshold makes an epoch count as better
  when L_e < best * (1 + 1e-4), not the "min" mode's L_e < best * (1 - 1e-4));
* epoch e improves when L_e < best - min_delta (best = the last improving epoch's loss, inf before
  epoch 1): it becomes the best checkpoint and resets the patience counter; any other epoch (a NaN
  loss included) increments it. Training stops after epoch e when e > ``min_epochs`` (the study's
  warmup) and the counter >= ``patience``;
* a training batch whose loss is NaN or infinite is skipped (no backward, no step) and counted in
  the epoch's ``skipped_steps``; the epoch's training loss is the mean of the per-batch losses of
  the other batches. Only an epoch with every batch skipped fails the cell (the study's loop would
  go on to the next epoch without validating). A step whose gradient norm is not finite is left to
  the GradScaler (fp16, which skips it); without a scaler (fp32, bf16) it is skipped here the same
  way; both are counted in ``nonfinite_grad_steps``.

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
"""
from __future__ import annotations

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

from nvfp4bench import results
from nvfp4bench.atomic import save_torch_atomic
from nvfp4bench.config import RunConfig, check_image_size
from nvfp4bench.quant.backends import get_backend
from nvfp4bench.env import environment
from nvfp4bench.losses import BCETverskyLoss
from nvfp4bench.quant.recipes import Recipe, get_recipe

OPTIMIZER_CLASSES: dict[str, type[torch.optim.Optimizer]] = {
    "adamax": torch.optim.Adamax,
    "adamw": torch.optim.AdamW,
    "adam": torch.optim.Adam,
}
# --precision name -> autocast dtype (None: no autocast, fp32 everywhere)
AUTOCAST_DTYPES: dict[str, torch.dtype | None] = {
    "fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# high-precision compute when neither --precision nor the recipe sets it: the study's fp16 autocast
# with a GradScaler on CUDA (its "Baseline (FP16)"), fp32 on the CPU
DEVICE_PRECISION: dict[str, str] = {"cpu": "fp32", "cuda": "fp16"}
# backends that need their own default (Transformer Engine's NVFP4 runs under bf16 only)
BACKEND_PRECISION: dict[str, str] = {"te": "bf16"}
# pooled pixel metrics recorded every epoch (SegmentationMeter keys)
VAL_METRICS = ("auprc", "dice", "recall", "precision", "f2", "iou")


class NonFiniteError(RuntimeError):
    """Every training batch of an epoch had a non-finite loss, or no epoch had a finite
    validation loss: the cell stops and is marked failed."""


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


def resolve_precision(precision: str, recipe: Recipe, device: torch.device,
                      backend: str = "emulator") -> str:
    """The high-precision compute dtype: --precision, else the recipe's, else the backend's (te:
    bf16), else the device's (fp16 autocast + GradScaler on CUDA, fp32 on CPU).

    A baseline recipe that fixes its dtype (fp16, fp32) cannot be run at another precision.
    """
    if recipe.compute_dtype is not None:
        if precision not in ("auto", recipe.compute_dtype):
            raise ValueError(f"recipe {recipe.name!r} computes in {recipe.compute_dtype}; "
                             f"--precision {precision} contradicts it (drop --precision)")
        return recipe.compute_dtype
    if precision != "auto":
        return precision
    if device.type == "cuda" and backend in BACKEND_PRECISION:
        return BACKEND_PRECISION[backend]
    return DEVICE_PRECISION[device.type]


def make_optimizer(config: RunConfig, params) -> torch.optim.Optimizer:
    cls = OPTIMIZER_CLASSES[config.optimizer]
    return cls(params, lr=config.lr, weight_decay=config.weight_decay)


def make_scheduler(optimizer, config: RunConfig):
    """The study's ReduceLROnPlateau: mode "max", stepped with minus the validation loss."""
    return torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="max", factor=config.lr_factor, patience=config.lr_patience)


@dataclass
class EarlyStopping:
    """The study's best checkpoint and early stopping on the validation loss (module docstring):
    improved = L_e < best - min_delta; stop after epoch e when e > min_epochs and the epochs
    without improvement reach ``patience``."""

    patience: int
    min_delta: float
    min_epochs: int
    best_loss: float = math.inf  # the last improving epoch's validation loss: the kept checkpoint
    best_epoch: int | None = None
    bad_epochs: int = 0
    stopped: bool = False

    def update(self, epoch: int, val_loss: float) -> bool:
        """Record epoch ``epoch`` (1-based); True when it improves (its weights are the new best).
        A NaN loss never improves."""
        improved = val_loss < self.best_loss - self.min_delta
        if improved:
            self.best_loss, self.best_epoch, self.bad_epochs = val_loss, epoch, 0
        else:
            self.bad_epochs += 1
        self.stopped = epoch > self.min_epochs and self.bad_epochs >= self.patience
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
    precision = resolve_precision(config.precision, recipe, device, config.backend)
    # the backend's refusals come first: before any data or model is built
    get_backend(config.backend).preflight(recipe, device, AUTOCAST_DTYPES[precision])
    if config.data is None:
        store_dir = Path(ensure_synthetic_store(progress=config.progress))
    else:
        store_dir = Path(config.data)
        if not store_dir.is_dir():
            raise ValueError(f"--data {config.data}: no such directory (build a store with "
                             f"data_prep.py, or leave --data out for the synthetic one)")
    store = SliceStore(store_dir)
    folds = load_folds(store_dir, split=config.split)
    if not 0 <= config.fold < len(folds):
        raise ValueError(f"--fold {config.fold}: the {config.split} split of the store has "
                         f"fold{'s 0..' if len(folds) > 1 else ' '}{len(folds) - 1}")
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
    from nvfp4bench.models import build_model
    from nvfp4bench.quant.swap import quantize_model
    c = cell.config
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed(c.arch, c.scale, c.seed))
        model = build_model(c.arch, c.scale, image_size=c.image_size,
                            in_channels=int(cell.store.channels), head_prior=c.head_prior)
    model = model.to(cell.device)
    model = quantize_model(model, cell.recipe, c.backend, generator=sr_generator,
                           quantize_attention=c.quantize_attention, kernels=c.quant_kernels)
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
    # The study keeps every batch; --drop-last-single drops a last batch of one slice (BatchNorm
    # cannot train on one value per channel).
    train = DataLoader(sets["train"], batch_size=c.batch_size, shuffle=True,
                       generator=loader_generator, num_workers=c.workers, pin_memory=pin,
                       drop_last=c.drop_last_single and len(sets["train"]) % c.batch_size == 1)
    val, test = (DataLoader(sets[p], batch_size=c.batch_size, shuffle=False,
                            num_workers=c.workers, pin_memory=pin) for p in ("val", "test"))
    return sets["train"], train, val, test


def _autocast(cell: CellRun):
    """The backend's run context (autocast; for TE also te.autocast): every forward runs in it."""
    return get_backend(cell.config.backend).context(cell.recipe, cell.device,
                                                    AUTOCAST_DTYPES[cell.precision])


def _probs(logits: torch.Tensor) -> torch.Tensor:
    """sigmoid of the fp32 logits, unclamped as the study's evaluation (its soft Dice sees them)."""
    return torch.sigmoid(logits.float())


def train_one_epoch(model, loader, loss_fn, optimizer, scaler, cell: CellRun, epoch: int,
                    bar) -> dict:
    """One pass over the training slices (the study's loop, module docstring): mean per-batch loss,
    gradient norms (before clipping), step times, skipped_steps (non-finite loss) and
    nonfinite_grad_steps. Raises NonFiniteError when every batch had a non-finite loss."""
    model.train()
    losses, norms, step_ms = [], [], []
    skipped, bad_grads, steps = 0, 0, 0
    for step, (images, masks, _) in enumerate(loader):
        t0 = time.perf_counter()
        steps += 1
        images = images.to(cell.device, non_blocking=True)
        masks = masks.to(cell.device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        with _autocast(cell):
            logits = model(images)
        loss = loss_fn(logits.float(), masks)
        value = float(loss.detach())
        bar.update(1)
        if not math.isfinite(value):  # the study skips the batch: no backward, no step
            skipped += 1
            continue
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        norm = float(nn.utils.clip_grad_norm_(model.parameters(), cell.config.grad_clip))
        if math.isfinite(norm):
            norms.append(norm)
        else:
            bad_grads += 1
        if math.isfinite(norm) or scaler.is_enabled():  # a GradScaler skips a non-finite step
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.zero_grad(set_to_none=True)
        _sync(cell.device)
        step_ms.append((time.perf_counter() - t0) * 1e3)
        losses.append(value)
        bar.set_postfix(loss=f"{value:.4f}")
    if not losses:
        raise NonFiniteError(f"epoch {epoch}: the loss was NaN or infinite in every one of its "
                             f"{steps} training steps (recipe {cell.recipe.name}, lr "
                             f"{cell.config.lr}); nothing was learned")
    return {"train_loss": sum(losses) / len(losses),
            "grad_norm": sum(norms) / len(norms) if norms else None,
            "grad_norm_max": max(norms) if norms else None, "step_ms": step_ms,
            "skipped_steps": skipped, "nonfinite_grad_steps": bad_grads}


@torch.no_grad()
def _predict(model, loader, meter, cell: CellRun, loss_fn=None) -> tuple[float | None, bool]:
    """Feed every batch's probabilities to ``meter`` -> (the mean over batches of each batch's
    mean loss when asked (the study's average), whether every output was finite). A batch with
    non-finite outputs is not metered: its loss is NaN, so the caller knows."""
    model.eval()
    batch_losses, finite = [], True
    for images, masks, index in loader:
        images = images.to(cell.device)
        with _autocast(cell):
            logits = model(images)
        if loss_fn is not None:
            batch_losses.append(float(loss_fn(logits.float(), masks.to(cell.device))))
        probs = _probs(logits).cpu()
        if not torch.isfinite(probs).all():
            finite = False
            continue
        meter.update(probs, masks, index)
    loss = sum(batch_losses) / len(batch_losses) if loss_fn is not None else None
    return loss, finite


def validate(model, loader, loss_fn, cell: CellRun, epoch: int) -> dict:
    """The per-epoch validation: loss (the study's mean of per-batch means) and the pooled pixel
    metrics (AUPRC, soft recall / precision / F2 / IoU, soft Dice per image), no per-patient ones.
    A non-finite loss is NaN here (the epoch does not improve, as in the study) and its metrics
    are None."""
    from nvfp4bench.meter import SegmentationMeter
    meter = SegmentationMeter(patient_metrics=False)
    loss, finite = _predict(model, loader, meter, cell, loss_fn)
    if not (finite and math.isfinite(loss)):
        return {"loss": math.nan, **{k: None for k in VAL_METRICS}}
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
    """Every metric of docs/protocol.md on one partition (nvfp4bench.meter.SegmentationMeter),
    plus the per-patient rows and the spacing HD95 is measured in."""
    from nvfp4bench.meter import SegmentationMeter
    spacing = voxel_spacing(cell, cell.split[part])
    meter = SegmentationMeter(store=cell.store, spacing=spacing)
    _, finite = _predict(model, loader, meter, cell)
    if not finite:
        raise NonFiniteError(f"the best checkpoint's outputs on the {part} set are not finite")
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
        with torch.random.fork_rng(devices=devices):
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
        "schema_version": results.SCHEMA_VERSION, "status": "running", "error": None,
        "config": c.to_dict(), "config_hash": cell.config_hash,
        "env": environment(cell.device), "data": _data_block(cell),
        "model": {"arch": c.arch, "scale": c.scale, "recipe": c.recipe,
                  "parameters": sum(p.numel() for p in model.parameters()),
                  "init_seed": init_seed(c.arch, c.scale, c.seed),
                  "quantized_layers": list(getattr(model, "quantized_layers", [])),
                  "layer_backends": dict(getattr(model, "layer_backends", {}))},
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
