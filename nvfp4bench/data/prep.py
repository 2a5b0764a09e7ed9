"""``data_prep.py``: raw dataset -> slice store, and the embedded synthetic default dataset.

    python data_prep.py --source {brats,msd,lgg} --input RAW --output DATA_DIR [options]
    python data_prep.py --source synthetic --patients N --output DATA_DIR [--input NIFTI_DIR]

Cases are read one at a time (``--workers N`` processes in parallel, results written in case
order), so memory stays flat however many cases there are. ``--source synthetic`` first writes a
BraTS-2021-layout NIfTI dataset (into ``--input`` when given and kept, else a temporary folder)
and then converts it with the ``brats`` reader: the synthetic set exercises the real loader.

Bad input never passes silently: a case whose file is unreadable or truncated, whose image and
mask shapes differ, whose labels fall outside the dataset's set, that holds NaN or an empty
volume, or that lacks a modality stops the run with a one-line message naming the case, the file
and the problem (exit 1, no traceback, nothing written), or with ``--on-error skip`` is left out
and listed at the end (and in index.json's ``skipped``).
"""
from __future__ import annotations

import argparse
import multiprocessing
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from tqdm import tqdm

from nvfp4bench import options
from nvfp4bench.data import synthetic
from nvfp4bench.data.errors import DataError
from nvfp4bench.data.folds import write_folds
from nvfp4bench.data.preprocess import INTENSITY_RULES, SLICE_MODES, SliceRule, process_volume
from nvfp4bench.data.sources import MODALITIES, SOURCES, default_modalities, get_source
from nvfp4bench.data.store import (DEFAULT_DATA_DIR, SliceStore, StoreWriter, check_replaceable,
                                   is_store, leftover_prefix, store_dir_name, sweep_leftovers)

# The embedded default dataset (small enough for a CPU training run; see the data notes).
DEFAULT_PATIENTS = 40
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 8, 4096  # store slice sizes
DEFAULT_IMAGE_SIZE = 64
DEFAULT_SEED = 2026
DEFAULT_VOXEL_MM = 2.0  # simulate at 2 mm (120 x 120 x 78): 8x fewer voxels than BraTS' 1 mm
DEFAULT_SLICE_RULE = SliceRule(mode="brain", min_brain=0.25, stride=4)  # ~13-15 slices / patient
ON_ERROR = ("stop", "skip")


@dataclass(frozen=True)
class PrepConfig:
    """Every option of one conversion (the CLI's, resolved)."""

    source: str
    output: Path
    input: Path | None = None
    image_size: int = 256
    modalities: tuple[str, ...] | None = None  # None: sources.default_modalities(source)
    rule: SliceRule | None = None  # None: the source's default mode with default thresholds
    workers: int = 1
    on_error: str = "stop"
    overwrite: bool = False
    name: str | None = None
    limit: int | None = None
    progress: bool = True
    # synthetic only
    patients: int = DEFAULT_PATIENTS
    seed: int = DEFAULT_SEED
    voxel_mm: float = 1.0
    compress: bool = True
    extra_meta: dict = field(default_factory=dict, hash=False)


def _process(job):
    """Worker: load and process one case -> ("ok", CaseSlices) or ("error", DataError)."""
    source_name, case, modalities, size, rule = job
    try:
        source = get_source(source_name)
        vol = source.load(case, modalities)
        return "ok", process_volume(vol, size=size, rule=rule, intensity=source.intensity)
    except DataError as e:
        if e.case is None:
            e.case = case.case_id
        return "error", e


def _results(jobs, workers: int):
    if workers <= 1:
        yield from map(_process, jobs)
        return
    # spawn, not fork: a forked child of a process that already ran torch/OpenMP can hang
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        yield from pool.imap(_process, jobs, chunksize=1)


def _write_synthetic(config: PrepConfig, root: Path) -> None:
    jobs = [(root, config.seed, i, config.voxel_mm, config.compress) for i in range(config.patients)]
    bar = tqdm(total=len(jobs), desc="simulate", unit="case", disable=not config.progress)
    if config.workers <= 1:
        for job in jobs:
            _simulate(job)
            bar.update()
    else:
        with multiprocessing.get_context("spawn").Pool(config.workers) as pool:
            for _ in pool.imap_unordered(_simulate, jobs):
                bar.update()
    bar.close()


def _simulate(job) -> None:
    root, seed, i, voxel_mm, compress = job
    synthetic.write_case(root, seed, i, voxel_mm=voxel_mm, compress=compress)


def convert(config: PrepConfig) -> dict:
    """Build the store of ``config``; -> summary dict (path, cases, slices, skipped, seconds).

    Raises DataError on the first bad case (on_error="stop") or when nothing can be converted.
    """
    t0 = time.perf_counter()
    if config.modalities is None:
        config = replace(config, modalities=default_modalities(config.source))
    if config.on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {config.on_error!r}")
    if not MIN_IMAGE_SIZE <= config.image_size <= MAX_IMAGE_SIZE:
        raise DataError(f"--image-size must be from {MIN_IMAGE_SIZE} to {MAX_IMAGE_SIZE}, got "
                        f"{config.image_size}")
    if config.workers < 1:
        raise DataError(f"--workers must be >= 1, got {config.workers}")
    bad = [m for m in config.modalities if m not in MODALITIES]
    if bad or not config.modalities:
        raise DataError(f"unknown modality {', '.join(bad) or '(none given)'}; valid: "
                        f"{', '.join(MODALITIES)}")
    if config.output.exists() and not config.overwrite:  # fail before any work
        raise DataError(f"{config.output} already exists; pass --overwrite to replace it")
    protect = [config.input] if config.input is not None else []
    check_replaceable(config.output, protect)
    if config.source == "synthetic":
        return _convert_synthetic(config, t0)
    if config.input is None or not config.input.is_dir():
        raise DataError(f"--input {config.input}: not a directory")
    source = get_source(config.source)
    rule = config.rule or SliceRule(mode=source.default_slice_mode)
    cases = source.discover(config.input)[:config.limit]
    jobs = [(config.source, c, tuple(config.modalities), config.image_size, rule) for c in cases]
    skipped: list[str] = []
    with StoreWriter(config.output, image_size=config.image_size, modalities=config.modalities,
                     overwrite=config.overwrite, protect=protect) as writer:
        bar = tqdm(total=len(jobs), desc=f"{config.source} -> store", unit="case",
                   disable=not config.progress)
        for status, result in _results(jobs, config.workers):
            bar.update()
            if status == "ok":
                writer.add(result)
            elif config.on_error == "skip":
                skipped.append(str(result))
            else:
                raise result
        bar.close()
        if skipped and not writer.records:
            raise DataError(f"all {len(skipped)} case(s) were bad, nothing written: "
                            + "; ".join(skipped))
        meta = {"name": config.name or config.source, "source": config.source,
                "synthetic": config.source == "synthetic" or bool(config.extra_meta.get("synthetic")),
                "input": str(config.input), "slice_rule": asdict(rule),
                "normalisation": INTENSITY_RULES[source.intensity][1],
                "resize": "bilinear+antialias (images), nearest-exact (masks)",
                "skipped": skipped, **config.extra_meta}
        path = writer.finalize(meta)
        n_slices, n_cases = writer.n_slices, len(writer.records)
    write_folds(path)  # the study's splits, readable before any training (folds.py)
    return {"path": str(path), "cases": n_cases, "slices": n_slices, "skipped": skipped,
            "seconds": time.perf_counter() - t0}


def _convert_synthetic(config: PrepConfig, t0: float) -> dict:
    if config.patients < 1:
        raise DataError(f"--patients must be >= 1, got {config.patients}")
    keep = config.input is not None
    if keep and config.input.exists() and any(config.input.iterdir()):
        raise DataError(f"--input {config.input}: not empty; --source synthetic writes its NIfTI "
                        "there, give an empty or new folder (or none: a temporary one)")
    config.output.absolute().parent.mkdir(parents=True, exist_ok=True)
    sweep_leftovers(config.output)
    root = config.input if keep else Path(tempfile.mkdtemp(
        prefix=leftover_prefix(config.output.absolute(), "nifti"),
        dir=config.output.absolute().parent))
    try:
        root.mkdir(parents=True, exist_ok=True)
        _write_synthetic(config, root)
        tmpl = synthetic.load_template(config.voxel_mm)
        meta = {"synthetic": True, "input": str(root) if keep else None, "synthetic_params": {
            "patients": config.patients, "seed": config.seed, "voxel_mm": config.voxel_mm,
            "image_size": config.image_size,
            "template": "procedural" if tmpl["procedural"] else "MNI152 2009c sym (nilearn)"}}
        inner = replace(config, source="brats", input=root, name=config.name or "synthetic",
                        extra_meta={**meta, **config.extra_meta})
        summary = convert(inner)
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)
    summary["seconds"] = time.perf_counter() - t0
    return summary


def default_synthetic_path(patients: int, image_size: int, seed: int) -> Path:
    if (patients, image_size, seed) == (DEFAULT_PATIENTS, DEFAULT_IMAGE_SIZE, DEFAULT_SEED):
        return DEFAULT_DATA_DIR
    return DEFAULT_DATA_DIR.with_name(f"synthetic-p{patients}-s{image_size}-seed{seed}")


def ensure_synthetic_store(path: str | Path | None = None, *, patients: int = DEFAULT_PATIENTS,
                           image_size: int = DEFAULT_IMAGE_SIZE, seed: int = DEFAULT_SEED,
                           progress: bool = True) -> Path:
    """Path of a ready synthetic store, built on first use (atomically) -> the embedded default.

    path None: ``DEFAULT_DATA_DIR`` (``data/synthetic``) for the default parameters, else a sibling
    named after them. An existing store built with other parameters raises ValueError.
    """
    path = Path(path) if path is not None else default_synthetic_path(patients, image_size, seed)
    want = {"patients": patients, "seed": seed, "voxel_mm": DEFAULT_VOXEL_MM,
            "image_size": image_size}

    def check() -> Path:
        got = SliceStore(path).index.get("synthetic_params") or {}
        if {k: got.get(k) for k in want} != want:
            raise ValueError(f"{path} holds a store built with {got or 'other data'}, not {want}; "
                             "delete it or pass another path")
        return path

    if is_store(path):
        return check()
    config = PrepConfig(source="synthetic", output=path, image_size=image_size, patients=patients,
                        seed=seed, voxel_mm=DEFAULT_VOXEL_MM, rule=DEFAULT_SLICE_RULE,
                        compress=False, progress=progress)
    try:
        convert(config)
    except DataError:
        if is_store(path):  # another process finished the same build first
            return check()
        raise
    return path


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="data_prep.py", description="Convert a raw brain-tumour MRI dataset (or simulate a "
        "synthetic one) into the slice store that nvfp4bench trains on.",
        epilog="sources: brats (BraTS 2021 / 2023+ NIfTI), msd (Task01_BrainTumour), lgg (Kaggle "
        "kaggle_3m .tif), synthetic (BraTS-layout NIfTI simulated from the MNI152 template)")
    g = p.add_argument_group("input / output")
    g.add_argument("--source", choices=[*SOURCES, "synthetic"],
                   help="the raw dataset's kind (required unless --verify)")
    g.add_argument("--input", type=Path, help="raw dataset folder (synthetic: where to write and "
                   "keep the NIfTI; default a temporary folder)")
    g.add_argument("--output", type=Path, help="store directory to create (required unless "
                   "--verify)")
    g.add_argument("--verify", type=Path, metavar="STORE",
                   help="only check that STORE's arrays are the bytes it was built with "
                        "(checksums); exit 0 if so, 1 naming the changed file if not")
    g.add_argument("--name", help="dataset name in results (default: the source name)")
    g.add_argument("--overwrite", action="store_true", help="replace an existing store")
    g = p.add_argument_group("preprocessing")
    g.add_argument("--image-size", type=options.integer(MIN_IMAGE_SIZE, MAX_IMAGE_SIZE), default=256,
                   help=f"slice size in pixels, {MIN_IMAGE_SIZE} to {MAX_IMAGE_SIZE} (default 256)")
    g.add_argument("--modalities", default=None,
                   help=f"comma-separated channels in order, from {','.join(MODALITIES)} "
                        f"(default: lgg {','.join(default_modalities('lgg'))}, the study's "
                        f"cv2 BGR order; the others {','.join(default_modalities('brats'))})")
    g.add_argument("--slice-mode", choices=SLICE_MODES, help="brain: slices whose brain area >= "
                   "--min-brain x the largest; tumour: tumour slices + --free-ratio x as many "
                   "tumour-free brain slices; all (default: brain; lgg: all)")
    g.add_argument("--min-brain", type=options.fraction(), default=0.25,
                   help="brain-area fraction of the patient's largest slice (default 0.25)")
    g.add_argument("--slice-stride", type=options.positive_int(10_000), default=1,
                   help="keep every k-th brain slice")
    g.add_argument("--free-ratio", type=options.real(0, 1e4), default=0.5,
                   help="tumour-free slices per tumour slice in tumour mode (default 0.5)")
    g = p.add_argument_group("synthetic")
    g.add_argument("--patients", type=options.positive_int(100_000), default=DEFAULT_PATIENTS,
                   help=f"number of simulated patients (default {DEFAULT_PATIENTS})")
    g.add_argument("--seed", type=options.integer(0, options.SEED_MAX), default=DEFAULT_SEED,
                   help="generator seed (default 2026)")
    g.add_argument("--voxel-mm", type=options.real(0.25, 10), default=1.0,
                   help="0.25 to 10; 1 mm: BraTS' 240x240x155 grid")
    g = p.add_argument_group("run")
    g.add_argument("--workers", type=options.positive_int(options.MAX_WORKERS), default=1,
                   help="parallel processes (default 1)")
    g.add_argument("--on-error", choices=ON_ERROR, default="stop",
                   help="stop (default: exit 1, write nothing) or skip bad cases and list them")
    g.add_argument("--limit", type=options.positive_int(10**9), help="convert only the first N cases")
    g.add_argument("--no-progress", action="store_true")
    return p


def parse_config(argv=None) -> PrepConfig:
    parser = build_parser()
    a = parser.parse_args(argv)
    missing = [name for name, value in (("--source", a.source), ("--output", a.output))
               if value is None]
    if missing:
        parser.error(f"the following arguments are required: {', '.join(missing)} (or --verify "
                     f"STORE)")
    mods = (None if a.modalities is None
            else tuple(m.strip().lower() for m in a.modalities.split(",") if m.strip()))
    rule = None
    if a.slice_mode or a.slice_stride != 1 or a.min_brain != 0.25 or a.free_ratio != 0.5:
        mode = a.slice_mode or ("all" if a.source == "lgg" else "brain")
        rule = SliceRule(mode=mode, min_brain=a.min_brain, stride=a.slice_stride,
                         free_ratio=a.free_ratio)
    return PrepConfig(source=a.source, output=a.output, input=a.input, image_size=a.image_size,
                      modalities=mods, rule=rule, workers=a.workers, on_error=a.on_error,
                      overwrite=a.overwrite, name=a.name, limit=a.limit,
                      progress=not a.no_progress, patients=a.patients, seed=a.seed,
                      voxel_mm=a.voxel_mm)


def verify_store(path: Path) -> None:
    """``data_prep.py --verify STORE``: open the store and check its checksums (ValueError or
    FileNotFoundError naming what is wrong)."""
    SliceStore(path).verify()


def main(argv=None) -> int:
    """CLI entry: 0 on success, 1 on bad input (one message, no traceback), 130 on Ctrl-C."""
    argv = list(sys.argv[1:] if argv is None else argv)
    verify = build_parser().parse_known_args(argv)[0].verify
    if verify is not None:
        try:
            verify_store(verify)
        except (ValueError, OSError) as e:
            print(f"data_prep: error: {e}", file=sys.stderr)
            return 1
        print(f"data_prep: {verify}: the arrays are the bytes the store was built with")
        return 0
    try:
        config = parse_config(argv)
        summary = convert(config)
    except (DataError, ValueError, OSError) as e:
        print(f"data_prep: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("data_prep: interrupted; nothing was written", file=sys.stderr)
        return 130
    print(f"data_prep: wrote {summary['path']}: {summary['cases']} cases, {summary['slices']} "
          f"slices in {summary['seconds']:.1f} s")
    print(f"data_prep: its results go to OUT/{store_dir_name(SliceStore(summary['path']))}/ "
          f"(the store's name and content fingerprint; use it with --data {config.output})")
    if summary["skipped"]:
        print(f"data_prep: skipped {len(summary['skipped'])} bad case(s):", file=sys.stderr)
        for msg in summary["skipped"]:
            print(f"  {msg}", file=sys.stderr)
    return 0
