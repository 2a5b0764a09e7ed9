"""Data throughput benchmark (a script, not a test): ``python -m benchmarks.bench_data``.

Measures, on synthetic BraTS-2021-layout cases at full size (240 x 240 x 155, 1 mm):

- ``simulate_s_per_case``: seconds to simulate and write one case (5 .nii.gz files), wall and CPU;
- ``prep_cases_per_s``: data_prep's conversion of those cases into a store (``--source brats``,
  default options: 256 px, brain slices), per worker count asked for;
- ``dataset_slices_per_s``: SliceDataset items per second from that store, with and without
  augmentation (single process, no DataLoader), and the same on the embedded default store.

Prints one JSON object. Wall-clock timings depend on the machine's load (the 1-minute load average
is recorded); the CPU times (``*_cpu_*``, this process only) much less.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from nvfp4bench.data import synthetic
from nvfp4bench.data.dataset import SliceDataset
from nvfp4bench.data.prep import PrepConfig, convert, ensure_synthetic_store
from nvfp4bench.data.store import SliceStore


def dataset_rate(store: SliceStore, augment: bool, max_items: int) -> float:
    ds = SliceDataset(store, store.patients, augment=augment)
    n = min(len(ds), max_items)
    t = time.perf_counter()
    for k in range(n):
        ds[k]
    return n / (time.perf_counter() - t)


def run(cases: int = 4, workers=(1,), image_size: int = 256, max_items: int = 2000) -> dict:
    out: dict = {"cases": cases, "image_size": image_size, "loadavg_1min_before": os.getloadavg()[0],
                 "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory(prefix="nvfp4bench-bench-") as tmp:
        raw = Path(tmp) / "raw"
        synthetic.load_template(1.0)  # one-off template load, not counted
        t, c = time.perf_counter(), time.process_time()
        for i in range(cases):
            synthetic.write_case(raw, 2026, i)
        out["simulate_s_per_case"] = (time.perf_counter() - t) / cases
        out["simulate_cpu_s_per_case"] = (time.process_time() - c) / cases
        out["prep_cases_per_s"] = {}
        for w in workers:
            dest = Path(tmp) / f"store-w{w}"
            c = time.process_time()
            s = convert(PrepConfig(source="brats", input=raw, output=dest, image_size=image_size,
                                   workers=w, progress=False))
            out["prep_cases_per_s"][str(w)] = s["cases"] / s["seconds"]
            if w == 1:  # CPU time is only meaningful in-process
                out["prep_cpu_s_per_case_1_worker"] = (time.process_time() - c) / s["cases"]
            out["slices_per_case"] = s["slices"] / s["cases"]
        store = SliceStore(Path(tmp) / f"store-w{workers[0]}")
        out["dataset_slices_per_s"] = {
            f"{image_size}px": {"plain": dataset_rate(store, False, max_items),
                                "augment": dataset_rate(store, True, max_items)}}
        default = SliceStore(ensure_synthetic_store(progress=False))
        out["dataset_slices_per_s"][f"default {default.image_size}px"] = {
            "plain": dataset_rate(default, False, max_items),
            "augment": dataset_rate(default, True, max_items)}
        shutil.rmtree(raw, ignore_errors=True)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_data", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", type=int, default=4)
    p.add_argument("--workers", type=int, nargs="+", default=[1])
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--max-items", type=int, default=2000)
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1, as in a "
                   "DataLoader worker)")
    a = p.parse_args(argv)
    import torch
    torch.set_num_threads(a.threads)
    print(json.dumps(run(a.cases, tuple(a.workers), a.image_size, a.max_items), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
