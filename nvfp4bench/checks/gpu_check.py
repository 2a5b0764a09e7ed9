"""One command for a GPU machine: is the emulator exact on CUDA, how fast is QAT, what does the
study cost on this GPU?

``python -m nvfp4bench.gpu_check --out DIR [--device cuda] [--quick] [--budget-s 1800]``
(``bash benchmarks/gpu_check.sh`` adds a hard timeout, e.g. for a batch job). Stages, each with
a time cap; a stage that fails or runs out of time reports FAIL and the next one runs:

  env          torch / CUDA / GPU / capability, TF32 flags, which quantizer kernels the checks
               and the trainer run on the device
  tests        pytest: tests/quant/test_nvfp4_device.py (exactness tests on the device, the
               other block formats against the CPU among them) and the
               CUDA-only tests of tests/quant/test_layers.py, from a checkout's tests/ folder
               (``--tests DIR``; skipped where the package was installed without one)
  ops          elementwise arithmetic of the quantizer, device vs CPU, bit for bit
  quantizer    quantize / fake_quantize codes, scales, amax, values; device vs CPU, bit for bit
  layers       Linear, Conv2d x2, ConvTranspose2d fwd+bwd, every quantized recipe: quantized
               operands bit for bit, GEMMs to fp32 rounding
  compiled     the compiled quantizer kernels (kernels="compiled") vs eager on the device
               (CUDA only)
  syncs        host-device synchronisations per layer fwd+bwd and per whole training step
               (forward, loss, backward, AdamW) of each arch x recipe (CUDA only)
  bench_quant  fake_quantize vs a plain copy (nvfp4bench.bench quant), eager kernels
  store        a synthetic slice store at the training image size (data_prep --source synthetic)
  train        one training epoch + one validation pass per arch x recipe (baseline, nvfp4_full,
               2d_rht_sr) at the middle scale, study precision; capped epochs are extrapolated
  train_scales a few steps at the other scales (for the projection)
  projection   GPU-hours of the study's run matrices from the measured epochs
  verify_te    python -m nvfp4bench.verify_te, only on compute capability >= 10.0

Everything lands in ``--out``: ``summary.md``, ``summary.json`` (every stage's rows), ``log.txt``
(the printed output) and ``pytest.xml``.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch

# The project's modules (the only place this file names them).
from nvfp4bench import options
from nvfp4bench.atomic import write_text_atomic
from nvfp4bench.checks import bench, gpu_check_bits, gpu_check_train
from nvfp4bench.env import PACKAGE_ROOT, git_commit

DEFAULT_TESTS = PACKAGE_ROOT / "tests"  # a checkout's tests/, beside the package

STATUSES = ("PASS", "FAIL", "SKIP", "INFO")


@dataclass(frozen=True)
class Sizes:
    """Problem sizes of a full run (GPU) or of the ``--quick`` rehearsal."""

    op_n: int = 100_000
    quant_size: int = 512
    compiled_size: int = 256
    bench_size: int = 8192
    bench_repeats: int = 20
    image_size: int = 256
    batch_size: int = 32
    patients: int = 20
    scale: str = "small"
    other_scales: tuple[str, ...] = ("base", "tiny")  # the costlier first
    max_steps: int | None = None  # per training epoch (None: the whole epoch, time permitting)
    scale_steps: int = 3  # steps per cell in train_scales


QUICK = Sizes(op_n=2000, quant_size=64, compiled_size=64, bench_size=256, bench_repeats=2,
              image_size=32, batch_size=2, patients=10, scale="tiny", other_scales=(),
              max_steps=2, scale_steps=2)


@dataclass
class Context:
    device: torch.device
    sizes: Sizes
    out: Path
    deadline: float  # time.monotonic() by which every stage must be done
    store_dir: Path
    results: dict = field(default_factory=dict)  # stage name -> its result dict
    stage_deadline: float = 0.0  # the running stage's cap, as a time.monotonic() value
    tests_dir: Path | None = None  # a checkout's tests/ (None: the tests stage is skipped)

    def left(self) -> float:
        """Seconds left to the running stage (its cap or the overall budget, the earlier)."""
        return min(self.deadline, self.stage_deadline or self.deadline) - time.monotonic()


class StageTimeout(Exception):
    """A stage ran past its time cap."""


@contextlib.contextmanager
def time_cap(seconds: float):
    """Raise StageTimeout after ``seconds`` (SIGALRM: call it from the main thread)."""
    if seconds <= 0:
        raise StageTimeout("no time left")

    def handler(signum, frame):
        raise StageTimeout(f"timed out after {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def result(status: str, line: str, **details) -> dict:
    assert status in STATUSES
    return {"status": status, "line": line, **details}


# --------------------------------------------------------------------------------------------
# Stages: each takes the Context and returns result(...)
# --------------------------------------------------------------------------------------------
def stage_env(ctx: Context) -> dict:
    dev = ctx.device
    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": str(dev),
            "python": sys.version.split()[0], "threads": torch.get_num_threads(),
            "float32_matmul_precision": torch.get_float32_matmul_precision(),
            "cuda_matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
            "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
            "check_kernels": gpu_check_bits.CHECK_KERNELS,
            "train_kernels": gpu_check_train.TRAIN_KERNELS,
            "kernels_on_device": _kernels_on(dev)}
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        info.update(gpu=props.name, capability=list(torch.cuda.get_device_capability(dev)),
                    gpu_memory_gb=round(props.total_memory / 2**30, 1))
    tf32 = info["cuda_matmul_allow_tf32"] or info["float32_matmul_precision"] != "highest"
    line = (f"{info.get('gpu', 'CPU')} cc {info.get('capability', '-')}, torch {info['torch']}, "
            f"CUDA {info['cuda']}; fp32 matmul {'TF32 (!)' if tf32 else 'IEEE fp32'}; "
            f"quantizer kernels on {dev.type}: {info['kernels_on_device']}")
    return result("FAIL" if tf32 else "INFO", line, **info)


def _kernels_on(dev: torch.device) -> str:
    """Which quantizer kernels the exactness checks and the timed training cells run on ``dev``
    (the trainer's ``--quant-kernels``; ``auto`` uses the native or compiled kernels on CPU
    tensors only, so on CUDA it runs eager)."""
    train = gpu_check_train.TRAIN_KERNELS
    if train == "auto":
        train = "native, or compiled from large tensors" if dev.type == "cpu" else "eager"
    return (f"{gpu_check_bits.CHECK_KERNELS} in the checks, {train} in training "
            f"(--quant-kernels {gpu_check_train.TRAIN_KERNELS})")


def stage_tests(ctx: Context) -> dict:
    import subprocess  # noqa: I001 - only this stage and verify_te start processes
    import xml.etree.ElementTree as ET  # only this stage reads pytest's report
    if ctx.tests_dir is None or not (ctx.tests_dir / "quant" / "test_nvfp4_device.py").is_file():
        where = f"at {ctx.tests_dir}" if ctx.tests_dir else "beside the installed package"
        return result("SKIP", f"no tests folder {where}: pass --tests DIR, the tests/ folder "
                              f"of a nvfp4bench checkout")
    xml = ctx.out / "pytest.xml"
    device_tests = str(ctx.tests_dir / "quant" / "test_nvfp4_device.py")
    if ctx.device.type == "cuda":
        args = [device_tests, str(ctx.tests_dir / "quant" / "test_layers.py"), "-k", "cuda"]
    else:  # the rehearsal: the same file on the CPU
        args = [device_tests, "-k", "cpu"]
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
           f"--junitxml={xml}", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=max(ctx.left() - 5, 1),
                          cwd=ctx.tests_dir.parent)
    (ctx.out / "pytest.txt").write_text(proc.stdout + proc.stderr)
    suite = ET.parse(xml).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    n = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    passed = n["tests"] - n["failures"] - n["errors"] - n["skipped"]
    ok = proc.returncode == 0 and passed > 0
    line = (f"{passed} passed, {n['failures']} failed, {n['errors']} errors, {n['skipped']} "
            f"skipped: {' '.join(args)}")
    return result("PASS" if ok else "FAIL", line, counts=n, command=" ".join(cmd))


def stage_ops(ctx: Context) -> dict:
    rows = gpu_check_bits.check_ops(ctx.device, ctx.sizes.op_n)
    bad = [f"{r['op']} ({r['mismatches']}/{r['n']})" for r in rows if r["mismatches"]]
    line = (f"{len(rows)} ops bit-identical to CPU" if not bad else
            f"differ from CPU: {', '.join(bad)}")
    return result("FAIL" if bad else "PASS", line, rows=rows)


def stage_quantizer(ctx: Context) -> dict:
    rows = gpu_check_bits.check_quantizer(ctx.device, ctx.sizes.quant_size)
    bad = [f"{r['input']}/{r['case']}" for r in rows if not gpu_check_bits.quantizer_ok(r)]
    line = (f"{len(rows)} (input, case) pairs: codes, scales, amax, fake_quantize bit-identical"
            if not bad else f"{len(bad)}/{len(rows)} differ: {', '.join(bad[:8])}")
    return result("FAIL" if bad else "PASS", line, rows=rows)


def stage_layers(ctx: Context) -> dict:
    rows = []
    for recipe in gpu_check_bits.quantized_recipes():
        for case in gpu_check_bits.LAYER_CASES:
            rows.append(gpu_check_bits.check_layer(case, recipe, ctx.device))
    bad = [f"{r['recipe']}/{r['case']}" for r in rows if not r["ok"]]
    worst = max(r["gemm_max_excess"] for r in rows)
    n_q, n_g = sum(r["quantized"] for r in rows), sum(r["gemms"] for r in rows)
    line = (f"{len(rows)} layer x recipe: {n_q} quantized operands bit-identical, {n_g} GEMMs "
            f"within fp32 rounding (worst {worst:.2f} of the bound)" if not bad else
            f"{len(bad)}/{len(rows)} differ: {', '.join(bad[:8])}")
    return result("FAIL" if bad else "PASS", line, rows=rows)


def stage_compiled(ctx: Context) -> dict:
    if ctx.device.type != "cuda":
        return result("SKIP", "CPU: the compiled kernels are checked by tests/quant/test_nvfp4.py")
    rows = []
    for case in gpu_check_bits.COMPILED_CASES:
        if ctx.left() < 15:  # a compilation takes seconds: keep what is done
            rows.append({"case": case, "mismatches": None, "note": "not reached (time)"})
            continue
        try:
            rows.append(gpu_check_bits.check_compiled(ctx.device, ctx.sizes.compiled_size, case))
        except Exception as err:  # noqa: BLE001 - a compiler error is a result here
            if isinstance(err, StageTimeout):
                raise
            rows.append({"case": case, "mismatches": None,
                         "error": f"{type(err).__name__}: {str(err)[:300]}"})
    bad = [r["case"] for r in rows if r["mismatches"] or "error" in r]
    done = [r for r in rows if r["mismatches"] is not None]
    line = (f"compiled == eager on CUDA for {len(done)}/{len(rows)} cases (kernels auto "
            f"still runs eager on CUDA)" if not bad else
            f"compiled differs from eager (or fails) on CUDA: {', '.join(bad)}")
    return result("FAIL" if bad else "PASS" if done else "SKIP", line, rows=rows)


def stage_syncs(ctx: Context) -> dict:
    if ctx.device.type != "cuda":
        return result("SKIP", "CPU: no host-device synchronisation to count")
    rows = gpu_check_bits.count_syncs(ctx.device)
    steps = gpu_check_bits.count_step_syncs(ctx.device)
    total, in_steps = sum(r["syncs"] for r in rows), sum(r["syncs"] for r in steps)
    where = sorted({w for r in rows + steps for w in r["where"]})
    line = (f"{total} synchronisations in {len(rows)} layer fwd+bwd, {in_steps} in "
            f"{len(steps)} whole training steps (arch x recipe)"
            + (f" at {', '.join(where[:4])}" if where else ""))
    return result("PASS" if total + in_steps == 0 else "INFO", line, rows=rows, steps=steps)


def stage_bench_quant(ctx: Context) -> dict:
    s = ctx.sizes
    rows = bench.run_quant(s.bench_size, str(ctx.device), s.bench_repeats,
                           [gpu_check_bits.CHECK_KERNELS])
    ratios = {r["case"]: r["ratio_to_copy"] for r in rows if r["case"] != "copy"}
    copy_ms = next(r["median_ms"] for r in rows if r["case"] == "copy")
    line = (f"{s.bench_size}^2 fp32, {gpu_check_bits.CHECK_KERNELS} kernels, copy "
            f"{copy_ms:.3f} ms; x copy: "
            + ", ".join(f"{k} {v:.1f}" for k, v in ratios.items()))
    return result("INFO", line, rows=rows)


def stage_store(ctx: Context) -> dict:
    info = gpu_check_train.make_store(ctx.store_dir, ctx.sizes.patients, ctx.sizes.image_size)
    return result("INFO", f"{info['slices']} slices at {info['image_size']} px, "
                          f"{info['patients']} patients, {info['seconds']:.0f} s", **info)


def stage_train(ctx: Context) -> dict:
    return gpu_check_train.stage_train(ctx)


def stage_train_scales(ctx: Context) -> dict:
    return gpu_check_train.stage_train_scales(ctx)


def stage_projection(ctx: Context) -> dict:
    return gpu_check_train.stage_projection(ctx)


def stage_verify_te(ctx: Context) -> dict:
    import subprocess  # only this stage and the tests stage start processes
    if ctx.device.type != "cuda":
        return result("SKIP", "no CUDA device")
    cap = torch.cuda.get_device_capability(ctx.device)
    if cap < (10, 0):
        return result("SKIP", f"compute capability {cap[0]}.{cap[1]} < 10.0: no NVFP4 tensor "
                              f"cores, Transformer Engine cannot quantize to NVFP4 here")
    proc = subprocess.run([sys.executable, "-m", "nvfp4bench.verify_te"], capture_output=True,
                          text=True, timeout=max(ctx.left() - 5, 1))
    (ctx.out / "verify_te.txt").write_text(proc.stdout + proc.stderr)
    last = (proc.stdout.strip().splitlines() or proc.stderr.strip().splitlines() or [""])[-1]
    status = {0: "PASS", 2: "SKIP"}.get(proc.returncode, "FAIL")
    return result(status, f"exit {proc.returncode}: {last[:150]}", returncode=proc.returncode)


# name -> (function, time cap in seconds), in the order they run: the exactness checks first,
# then the timings, then the optional extras
STAGES: dict[str, tuple] = {
    "env": (stage_env, 30), "tests": (stage_tests, 300), "ops": (stage_ops, 60),
    "quantizer": (stage_quantizer, 120), "layers": (stage_layers, 180),
    "syncs": (stage_syncs, 180), "bench_quant": (stage_bench_quant, 120),
    "store": (stage_store, 300), "train": (stage_train, 600),
    "train_scales": (stage_train_scales, 300), "projection": (stage_projection, 30),
    "compiled": (stage_compiled, 180), "verify_te": (stage_verify_te, 300),
}


# --------------------------------------------------------------------------------------------
# Running and reporting
# --------------------------------------------------------------------------------------------
def run_stage(name: str, ctx: Context, log) -> dict:
    fn, cap = STAGES[name]
    t0 = time.monotonic()
    ctx.stage_deadline = min(t0 + cap, ctx.deadline)
    try:
        if ctx.deadline - t0 < 1:
            res = result("SKIP", "not run: the --budget-s is spent")
        else:
            with time_cap(ctx.left()):
                res = fn(ctx)
    except Exception as err:  # noqa: BLE001 - a failing stage reports and the next one runs
        tb = traceback.format_exc()
        log(tb)
        res = result("FAIL", f"{type(err).__name__}: {str(err)[:200]}", traceback=tb)
    res["seconds"] = round(time.monotonic() - t0, 1)
    ctx.results[name] = res
    log(f"[{res['status']:>4}] {name:<13}{res['seconds']:>6.1f} s  {res['line']}")
    return res


def summary_markdown(ctx: Context, total_s: float) -> str:
    env = ctx.results.get("env", {})
    lines = [f"# gpu_check: {env.get('gpu', 'CPU')} ({ctx.device}), "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, commit {_commit()}",
             "", f"Total {total_s:.0f} s. Command: `python -m nvfp4bench.gpu_check "
             f"{' '.join(sys.argv[1:])}`", "",
             "| stage | status | s | result |", "|---|---|---:|---|"]
    for name, r in ctx.results.items():
        lines.append(f"| {name} | {r['status']} | {r['seconds']:.0f} | "
                     f"{r['line'].replace('|', '/')} |")
    for extra in gpu_check_train.markdown_tables(ctx.results):
        lines += ["", *extra]
    return "\n".join(lines) + "\n"


def _commit() -> str:
    """The checkout's commit, or why there is none (an installed package)."""
    git = git_commit()
    if git["commit"] is None:
        return "unknown (not a git checkout)"
    return git["commit"][:7] + (" (with uncommitted changes)" if git["dirty"] else "")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m nvfp4bench.gpu_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder (created; files are replaced)")
    p.add_argument("--device", default="auto", help="cuda, cpu or auto (cuda when available)")
    p.add_argument("--quick", action="store_true", help="tiny sizes: the CPU rehearsal")
    p.add_argument("--budget-s", type=options.real(0, 1e6, low_open=True), default=1800.0,
                   help="wall-clock budget of all stages (default %(default)s)")
    p.add_argument("--stages", default=",".join(STAGES),
                   help="comma-separated subset of: %(default)s")
    p.add_argument("--tests", default=str(DEFAULT_TESTS) if DEFAULT_TESTS.is_dir() else None,
                   help="a nvfp4bench checkout's tests/ folder for the tests stage (default: the "
                        "one beside the package, if any: %(default)s)")
    p.add_argument("--store", default=None,
                   help="synthetic store folder (default: a temporary one, deleted at the end)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else "cpu" if args.device == "auto" else args.device)
    stages = [s for s in args.stages.split(",") if s]
    bad = [s for s in stages if s not in STAGES]
    if bad or (device.type == "cuda" and not torch.cuda.is_available()):
        why = f"unknown stages {bad}" if bad else "CUDA is not available on this machine"
        print(f"nvfp4bench.gpu_check: error: {why}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    logfile = open(out / "log.txt", "w")

    def log(msg: str) -> None:
        print(msg, flush=True)
        logfile.write(msg + "\n")
        logfile.flush()

    t0 = time.monotonic()
    with contextlib.ExitStack() as stack:
        store = Path(args.store) if args.store else Path(stack.enter_context(
            tempfile.TemporaryDirectory(prefix="gpu_check_store_"))) / "store"
        ctx = Context(device, QUICK if args.quick else Sizes(), out, t0 + args.budget_s, store,
                      tests_dir=Path(args.tests) if args.tests else None)
        for name in stages:
            run_stage(name, ctx, log)
            write_text_atomic(out / "summary.json", json.dumps(
                {"device": str(device), "quick": args.quick, "stages": ctx.results},
                indent=1, default=str))
    md = summary_markdown(ctx, time.monotonic() - t0)
    write_text_atomic(out / "summary.md", md)
    log("\n" + md)
    logfile.close()
    return 1 if any(r["status"] == "FAIL" for r in ctx.results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
