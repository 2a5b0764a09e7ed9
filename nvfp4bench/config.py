"""The configuration of one cell (arch x scale x recipe x fold x seed) and the study's defaults.

``RunConfig`` is a frozen dataclass holding every command-line option. Options left at ``None``
take the study's value when the run starts (``RunConfig.resolved()``): the optimiser, learning rate
and weight decay come from ``ARMS`` (the study's four arms: a model family and its optimiser), the
image size from the data store.

Defaults (docs/protocol.md "Training"): batch 32, at most 100 epochs, ReduceLROnPlateau(mode "max",
factor 0.5, patience 10) stepped with minus the validation loss, gradient clipping at norm 1.0,
best checkpoint and early stopping on the validation loss (improvement > min delta 0.001,
patience 20, no stop at or before epoch 40: the study's warmup), seed 2026.

The embedded synthetic dataset (``--data`` not given) trains the study's schedule too: with the
study's initialisation, Swin tiny ``nvfp4_full`` needs most of the 100 epochs to lift its test
AUPRC above 10x the pixel prevalence there (40 epochs reached 3.6x; README "Training one cell").
What keeps that run CPU-sized is the store (40 patients at 64 px), not a shorter schedule.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from nvfp4bench.quant.formats import DEFAULT_FORMAT


@dataclass(frozen=True)
class OptimizerSpec:
    """The study's optimiser for one architecture family."""

    name: str  # a key of nvfp4bench.train.loop.OPTIMIZER_CLASSES
    lr: float
    weight_decay: float


@dataclass(frozen=True)
class Arm:
    """One arm of the study (its main.py ``ARCH_CONFIGS``): a model family and its optimiser.

    ``--arch`` names an arm; the result path and the report use that name, and the model is built
    from ``family`` (a key of ``nvfp4bench.models.FAMILIES``). The two ViT arms share their
    initial weights (``init_seed`` takes the family): they differ only in the optimiser.
    """

    family: str
    optimizer: OptimizerSpec


# The study's four arms (``--arch all``), in its order.
ARMS: dict[str, Arm] = {
    "cnn": Arm("cnn", OptimizerSpec("adamax", lr=5e-4, weight_decay=0.0)),
    "vit": Arm("vit", OptimizerSpec("adamw", lr=1e-4, weight_decay=1e-4)),
    "vit_adamax": Arm("vit", OptimizerSpec("adamax", lr=5e-4, weight_decay=0.0)),
    "swin": Arm("swin", OptimizerSpec("adamw", lr=1e-4, weight_decay=1e-4)),
}
OPTIMIZER_NAMES = ("adamax", "adamw", "adam")

# The version of what a cell computes for a given config: part of every config hash, so a result
# made before a change of the computation shows as outdated, never as complete. Bump it with any
# change that alters a cell's numbers without changing its options. History:
#   1  (implicit: hashes made before the version existed)
#   2  LGG channels in the study's BGR order; augmentation as albumentations 2.x (independent x
#      and y scales, brightness / contrast on uint8); ROC-AUC, ECE, logit and entropy metrics
PROTOCOL_VERSION = 2

DEFAULT_EPOCHS = 100  # the study's maximum
DEFAULT_SEED = 2026
# One CPU thread by default. Measured on the 2-core machine (README "Training one cell"): idle,
# two threads ran the default command in 1 min 36 s against 2 min 1 s; with the cores shared,
# two threads made a step 1.6x (one busy loop per core) to 15x (load average 8) slower, as
# OpenMP threads wait for each other. --threads 0 gives torch's default (one per core).
DEFAULT_THREADS = 1
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
SPLITS = ("kfold", "holdout")  # nvfp4bench.data.folds.PROTOCOLS
# Training image sizes: a multiple of the transformers' 16 px patch (the CNN pads to a multiple of
# 2^stages itself), so every arch of the grid can train on the same slices.
IMAGE_SIZE_STEP = 16
MAX_IMAGE_SIZE = 4096  # --image-size: far above the study's 256 px

# Options that never change the numbers a cell produces: left out of the config hash.
# (The CPU thread count can change float summation order; bit-identical reruns on CPU need the
# same --threads.)
# The quantizer's kernels (eager, native or torch.compile'd) give the same bits
# (tests/quant/test_nvfp4.py).
NON_RESULT_FIELDS = frozenset({"out", "resume", "workers", "threads", "progress",
                               "quant_kernels"})


@dataclass(frozen=True)
class RunConfig:
    """Every option of one cell. ``None`` means "the study's default" (see ``resolved``)."""

    # model
    arch: str
    scale: str
    image_size: int | None = None  # None: the data store's own size
    head_prior: float | None = None  # opt-in, not the study's: head bias starts at logit(p)
    # quantization
    recipe: str = "nvfp4_full"
    format: str = DEFAULT_FORMAT  # quant.formats.FORMATS: the block format of quantized operands
    backend: str = "emulator"
    quantize_attention: bool = False
    quant_kernels: str = "auto"  # quant.kernels.KERNELS: eager, compiled, native, auto
    # data
    data: str | None = None  # None: the embedded synthetic dataset (built on first use)
    split: str = "kfold"  # the study's protocols (data/folds.py): kfold (5-fold CV) or holdout
    fold: int = 0
    seed: int = DEFAULT_SEED
    augment: bool = True
    # training
    epochs: int = DEFAULT_EPOCHS
    batch_size: int = 32
    optimizer: str | None = None  # None: ARMS[arch].optimizer
    lr: float | None = None
    weight_decay: float | None = None
    grad_clip: float = 1.0
    drop_last_single: bool = False  # drop a 1-slice last training batch (the study keeps it)
    lr_factor: float = 0.5
    lr_patience: int = 10
    patience: int = 20
    min_delta: float = 1e-3
    min_epochs: int = 40
    device: str = "auto"
    precision: str = "auto"
    workers: int = 0
    threads: int | None = DEFAULT_THREADS  # CPU threads of torch ( 0 or None: torch's default)
    diagnostics: bool = True
    # output
    out: str = "results"
    resume: bool = False
    progress: bool = True

    def resolved(self) -> RunConfig:
        """This config with the study's per-architecture defaults filled in.

        The image size stays ``None`` (the store's size) until the store is opened.
        """
        spec = ARMS[self.arch].optimizer
        return dataclasses.replace(
            self,
            optimizer=self.optimizer if self.optimizer is not None else spec.name,
            lr=self.lr if self.lr is not None else spec.lr,
            weight_decay=self.weight_decay if self.weight_decay is not None
            else spec.weight_decay)

    @property
    def family(self) -> str:
        """The model family of the arm ``arch`` (``vit_adamax`` -> ``vit``)."""
        return ARMS[self.arch].family

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def check_image_size(size: int, where: str = "--image-size") -> int:
    """``size`` when every model can train on it, else ValueError naming the smallest valid one."""
    if size < IMAGE_SIZE_STEP or size % IMAGE_SIZE_STEP:
        raise ValueError(f"{where} {size}: the models need a multiple of {IMAGE_SIZE_STEP} px "
                         f"(the ViT / Swin patch); the smallest is {IMAGE_SIZE_STEP}, the study's "
                         f"is 256")
    return size
