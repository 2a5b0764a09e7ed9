"""The training loop's parts: optimizer, LR scheduler, early stopping, one epoch of steps.

nvfp4bench.train runs them once per epoch (train -> validate -> scheduler -> early stopping ->
checkpoint). The study's loop (common/utils.py of its release), step by step:

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
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass

import torch
from torch import nn

from nvfp4bench.config import RunConfig
from nvfp4bench.train.setup import CellRun

OPTIMIZER_CLASSES: dict[str, type[torch.optim.Optimizer]] = {
    "adamax": torch.optim.Adamax,
    "adamw": torch.optim.AdamW,
    "adam": torch.optim.Adam,
}


class NonFiniteError(RuntimeError):
    """Every training batch of an epoch had a non-finite loss, or no epoch had a finite
    validation loss: the cell stops and is marked failed."""


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


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); nothing on the CPU. For wall-clock timings."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
        with cell.run_context():
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
        synchronize(cell.device)
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

