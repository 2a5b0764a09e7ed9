"""Everything a cell sets up before its first epoch: seeds, device, precision, data, model, loaders.

``setup(config) -> CellRun`` resolves the options (device; precision: --precision, else the
recipe's, else the backend's, else the device's), runs the backend's refusals before anything is
built, opens the slice store and the fold, and fills in the image size and the result and
checkpoint paths. ``build_quantized_model`` builds the model of (arch, scale) under a seed of
(arch, scale, seed) only (``init_seed``: every recipe starts from the same weights), then swaps
in the recipe's quantized layers; ``make_loaders`` gives the train (shuffled, augmented), val and
test DataLoaders; ``CellRun.run_context()`` is the backend's context every forward runs in. The
recipe and the backend are resolved once, here, and passed down as objects. Seeds are
``derive_seed(*parts)``: sha256 of the '/'-joined parts, 63 bits.
"""
from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from nvfp4bench import results
from nvfp4bench.config import RunConfig, check_image_size
from nvfp4bench.data import SliceDataset, SliceStore, ensure_synthetic_store, load_folds
from nvfp4bench.models import build_model
from nvfp4bench.quant.backends import Backend, format_kwargs, get_backend
from nvfp4bench.quant.formats import get_format
from nvfp4bench.quant.recipes import Recipe, get_recipe
from nvfp4bench.quant.swap import quantize_model

# --precision name -> autocast dtype (None: no autocast, fp32 everywhere)
AUTOCAST_DTYPES: dict[str, torch.dtype | None] = {
    "fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# high-precision compute when neither --precision, the recipe nor the backend sets it: the study's
# fp16 autocast with a GradScaler on CUDA (its "Baseline (FP16)"), fp32 on the CPU
DEVICE_PRECISION: dict[str, str] = {"cpu": "fp32", "cuda": "fp16"}


def derive_seed(*parts) -> int:
    """A 63-bit seed from any printable parts: sha256 of their '/'-joined text."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def init_seed(family: str, scale: str, seed: int) -> int:
    """Seed of the model's initial weights: (model family, scale, seed) only, never the recipe
    or the optimiser (the two ViT arms start from the same weights)."""
    return derive_seed("init", family, scale, seed)


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
                      backend: str | Backend = "emulator") -> str:
    """The high-precision compute dtype: --precision, else the recipe's, else the backend's
    (``Backend.default_precision``; te: bf16 on CUDA), else the device's (fp16 autocast +
    GradScaler on CUDA, fp32 on CPU).

    A baseline recipe that fixes its dtype (fp16, fp32) cannot be run at another precision.
    """
    if recipe.compute_dtype is not None:
        if precision not in ("auto", recipe.compute_dtype):
            raise ValueError(f"recipe {recipe.name!r} computes in {recipe.compute_dtype}; "
                             f"--precision {precision} contradicts it (drop --precision)")
        return recipe.compute_dtype
    if precision != "auto":
        return precision
    return get_backend(backend).default_precision(device) or DEVICE_PRECISION[device.type]


@dataclass
class CellRun:
    """Everything ``run`` sets up before the first epoch (the cell itself: nvfp4bench.cell)."""

    config: RunConfig  # resolved (image size and epochs filled in)
    config_hash: str
    recipe: Recipe
    backend: Backend
    device: torch.device
    precision: str
    store: object
    split: dict
    json_path: Path
    ckpt_path: Path
    best_path: Path

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """The autocast dtype of ``precision`` (None: fp32, no autocast)."""
        return AUTOCAST_DTYPES[self.precision]

    def run_context(self):
        """The backend's run context (autocast; for TE also te.autocast): every forward of the
        run (training steps, evaluation, diagnostics) runs in it."""
        return self.backend.context(self.recipe, self.device, self.autocast_dtype,
                                    **format_kwargs(get_format(self.config.format)))


def setup(config: RunConfig) -> CellRun:
    """Open the data and the fold, resolve every default, check the options."""

    recipe = get_recipe(config.recipe)
    backend = get_backend(config.backend)
    device = resolve_device(config.device)
    precision = resolve_precision(config.precision, recipe, device, backend)
    # the backend's refusals come first: before any data or model is built
    fmt = get_format(config.format)
    backend.preflight(recipe, device, AUTOCAST_DTYPES[precision], **format_kwargs(fmt))
    if config.data is None:
        store_dir = Path(ensure_synthetic_store(progress=config.progress))
    else:
        store_dir = Path(config.data)
        if not store_dir.is_dir():
            raise ValueError(f"--data {config.data}: no such directory (build a store with "
                             f"data_prep.py, or leave --data out for the synthetic one)")
    store = SliceStore(store_dir)
    store.verify()  # bytes changed since the build: refused, naming the file (once per process)
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
    return CellRun(resolved, results.config_hash(config), recipe, backend, device, precision,
                   store, split, json_path, ckpt_path, best_path)


def build_quantized_model(cell: CellRun, sr_generator: torch.Generator) -> nn.Module:
    """The model of (arch, scale) initialised from (arch, scale, seed), then quantized."""
    c = cell.config
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed(c.family, c.scale, c.seed))
        model = build_model(c.family, c.scale, image_size=c.image_size,
                            in_channels=int(cell.store.channels), head_prior=c.head_prior)
    model = model.to(cell.device)
    model = quantize_model(model, cell.recipe, cell.backend, generator=sr_generator,
                           quantize_attention=c.quantize_attention, kernels=c.quant_kernels,
                           format=c.format)
    return model


def make_loaders(cell: CellRun, loader_generator: torch.Generator):
    """Train (shuffled by ``loader_generator``, augmented), val and test DataLoaders."""
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
