"""nvfp4bench.gpu_check: the CPU rehearsal end to end, the stage runner (a failing or overrunning
stage reports FAIL and the next one runs), the projection arithmetic and the comparison helpers."""
import json
import math
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from nvfp4bench.checks import bench, gpu_check, gpu_check_bits, gpu_check_train
from nvfp4bench.quant import gemm, kernels, nvfp4

REHEARSAL = list(gpu_check.STAGES)


def test_quick_cpu_rehearsal_runs_every_stage(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "nvfp4bench.gpu_check", "--device", "cpu",
                           "--quick", "--out", str(out), "--store", str(tmp_path / "store"),
                           "--stages", ",".join(REHEARSAL)],
                          capture_output=True, text=True, timeout=600,
                          cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    stages = json.loads((out / "summary.json").read_text())["stages"]
    assert list(stages) == REHEARSAL
    status = {name: r["status"] for name, r in stages.items()}
    assert status == {"env": "INFO", "tests": "PASS", "ops": "PASS", "quantizer": "PASS",
                      "layers": "PASS",
                      "syncs": "SKIP", "bench_quant": "INFO", "store": "INFO", "train": "PASS",
                      "train_scales": "SKIP", "projection": "INFO", "compiled": "SKIP",
                      "verify_te": "SKIP"}
    train_rows = stages["train"]["rows"]
    assert {(r["arch"], r["recipe"]) for r in train_rows} == {
        (a, r) for a in gpu_check_train.ARCHS for r in gpu_check_train.TIMED_RECIPES}
    assert all(r["steps"] == 2 and r["epoch_s"] > 0 and r["ratio_to_baseline"] > 0
               for r in train_rows)
    assert {r["recipe"] for r in stages["layers"]["rows"]} == set(
        gpu_check_bits.quantized_recipes())
    cells = {k: v["cells"] for k, v in stages["projection"]["matrices"].items()}
    assert cells == {"hold-out": 96, "multi-seed": 480, "5-fold CV": 20, "full 5-fold grid": 360}
    md = (out / "summary.md").read_text()
    assert "| layers | PASS |" in md and "| run matrix |" in md and "GPU-hours" in md
    assert "[PASS] quantizer" in (out / "log.txt").read_text()


def _ctx(tmp_path, budget=60.0):
    return gpu_check.Context(torch.device("cpu"), gpu_check.QUICK, tmp_path,
                             time.monotonic() + budget, tmp_path / "store")


def test_the_tests_stage_is_skipped_without_a_checkouts_tests_folder(tmp_path):
    """An installed package has no tests/: the stage says how to point at a checkout's."""
    ctx = _ctx(tmp_path)
    res = gpu_check.stage_tests(ctx)
    assert res["status"] == "SKIP" and "--tests DIR" in res["line"]
    ctx.tests_dir = tmp_path / "nowhere"
    res = gpu_check.stage_tests(ctx)
    assert res["status"] == "SKIP" and str(tmp_path / "nowhere") in res["line"]
    assert not (tmp_path / "pytest.xml").exists()


def test_a_failing_or_overrunning_stage_reports_fail_and_the_next_runs(tmp_path, monkeypatch):
    def boom(ctx):
        raise RuntimeError("broken on purpose")

    def spin(ctx):
        while True:  # stopped by the stage's time cap
            pass

    monkeypatch.setitem(gpu_check.STAGES, "ops", (boom, 30))
    monkeypatch.setitem(gpu_check.STAGES, "quantizer", (spin, 0.5))
    code = gpu_check.main(["--device", "cpu", "--quick", "--out", str(tmp_path),
                           "--stages", "ops,quantizer,env"])
    stages = json.loads((tmp_path / "summary.json").read_text())["stages"]
    assert code == 1
    assert stages["ops"]["status"] == "FAIL" and "broken on purpose" in stages["ops"]["line"]
    assert stages["quantizer"]["status"] == "FAIL" and "timed out" in stages["quantizer"]["line"]
    assert stages["quantizer"]["seconds"] < 5
    assert stages["env"]["status"] == "INFO"


def test_unknown_stage_is_refused(capsys):
    assert gpu_check.main(["--out", "unused", "--stages", "nope"]) == 2
    assert "unknown stages ['nope']" in capsys.readouterr().err


def test_projection_hours_and_proxies():
    rows = [{"arch": a, "scale": "small", "recipe": r, "study_epoch_s": 36.0}
            for a in gpu_check_train.ARCHS for r in gpu_check_train.TIMED_RECIPES]
    proj = gpu_check_train.project(rows)  # 100 epochs x 36 s = 1 GPU-hour per run
    assert {k: v["gpu_hours"] for k, v in proj.items()} == pytest.approx(
        {"hold-out": 96, "multi-seed": 480, "5-fold CV": 20, "full 5-fold grid": 360})
    assert proj["hold-out"]["scales_assumed_as_middle"] == [       # vit_adamax timed as the vit
        f"{a}/{s}" for a in ("cnn", "swin", "vit", "vit_adamax") for s in ("base", "tiny")]
    rows.append({"arch": "cnn", "scale": "base", "recipe": "2d_rht_sr", "study_epoch_s": 72.0})
    with_base = gpu_check_train.project(rows)
    # 5-fold CV runs only the middle scale; the hold-out's cnn/base 2-D/RHT recipes (2d_rht,
    # 2d_rht_sr, fwd_rht) now take 2 h each instead of 1
    assert with_base["5-fold CV"]["gpu_hours"] == pytest.approx(20)
    assert with_base["hold-out"]["gpu_hours"] == pytest.approx(96 + 3)
    assert gpu_check_train.PROXY == {
        "baseline": "baseline", "nvfp4_full": "nvfp4_full", "fwd_only": "nvfp4_full",
        "chain_rule": "nvfp4_full", "sr_only": "nvfp4_full", "2d_rht": "2d_rht_sr",
        "2d_rht_sr": "2d_rht_sr", "fwd_rht": "2d_rht_sr"}
    assert "error" in gpu_check_train.project(rows[:1])


def test_capped_loader_stops_at_max_steps_and_deadline():
    loader = list(range(10))
    capped = gpu_check_train.CappedLoader(loader, time.monotonic() + 60, 3)
    assert list(capped) == [0, 1, 2] and capped.done == 3 and len(capped) == 10
    late = gpu_check_train.CappedLoader(loader, time.monotonic() - 1, None)
    assert list(late) == [0] and late.done == 1  # at least one batch, then the deadline


def test_bits_and_gemm_bound_catch_a_one_ulp_change():
    x = torch.randn(64, 64, generator=torch.Generator().manual_seed(0))
    y = x.clone()
    y[3, 4] = torch.nextafter(y[3, 4], torch.tensor(math.inf))
    assert gpu_check_bits.mismatches(x, x.clone()) == 0
    assert gpu_check_bits.mismatches(x, y) == 1
    assert gpu_check_bits.mismatches(x, x[:5]) > 0
    a, b = x, torch.randn(32, 64, generator=torch.Generator().manual_seed(1))
    c = a @ b.T
    reordered = (a.view(64, 4, 16).flip(1).reshape(64, 64) @ b.view(32, 4, 16).flip(1)
                 .reshape(32, 64).T)  # the same sums in another order
    assert gpu_check_bits.gemm_excess(a, b, reordered, a, b, c) <= 1.0
    assert gpu_check_bits.gemm_excess(a, b, c * (1 + 1e-4), a, b, c) > 1.0


@pytest.mark.parametrize("choice", ["eager", "compiled"])
def test_shared_noise_makes_sr_independent_of_the_generator(choice):
    x = gpu_check_bits.adversarial(0)
    draws, codes = {}, {}
    for seed in (1, 2):
        with gpu_check_bits.shared_noise(0):
            draws[seed] = kernels.fake_quantize(
                x, sr=True, generator=torch.Generator().manual_seed(seed), kernels=choice)
            codes[seed] = nvfp4.quantize(x, sr=True,
                                         generator=torch.Generator().manual_seed(seed)).codes
    assert torch.equal(draws[1], draws[2]) and torch.equal(codes[1], codes[2])
    own = kernels.fake_quantize(x, sr=True, generator=torch.Generator().manual_seed(2),
                                kernels=choice)
    assert not torch.equal(own, draws[2])
    bound = {m.__name__ for m, _ in gpu_check_bits.bindings(nvfp4.draw_noise)}
    assert {"nvfp4bench.quant.nvfp4", "nvfp4bench.quant.kernels"} <= bound
    assert kernels.draw_noise is nvfp4.draw_noise  # nothing is rebound: a documented hook
    assert nvfp4._SHARED_NOISE.get() is None       # and it is off again after the block
    with pytest.raises(ValueError, match="generator"), gpu_check_bits.shared_noise(0):
        kernels.fake_quantize(x, sr=True)  # the check that a generator is given still runs


def test_recording_sees_every_quantized_operand_and_gemm():
    """A Linear's fwd + bwd under nvfp4_full: 2 + 2 + 2 quantized operands (X and W, in one
    fake_quantize_pair call; dY and W along N; dY^T and X^T) and 3 GEMMs, each recorded once;
    the originals come back after."""
    made = gpu_check_bits.make_layer("linear_64x48_40tok", "nvfp4_full", torch.device("cpu"))
    log = []
    gpu_check_bits.run_layer(made, log)
    assert [e[0] for e in log].count("gemm") == 3
    assert [e[0] for e in log].count("q") == 6
    for _, a, b, c in (e for e in log if e[0] == "gemm"):
        assert torch.equal(c, a @ b.mT)
    assert all(getattr(m, n) is gemm.gemm for m, n in gpu_check_bits.bindings(gemm.gemm))
    assert kernels.fake_quantize.__name__ == "fake_quantize"  # not the recording wrapper
    assert kernels.fake_quantize_pair.__name__ == "fake_quantize_pair"
    with pytest.raises(LookupError), gpu_check_bits.rebound(lambda: None, None):
        pass


def test_cell_runner_reports_errors_skips_and_ratios(tmp_path, monkeypatch):
    """Stub cells: a failing cell is a FAIL row, cells past the budget are skipped (not failed)
    and fall back to the middle scale in the projection, ratios are to the same arch's baseline."""
    calls = []

    def fake_cell(arch, scale, recipe, ctx, seconds, max_steps):
        calls.append((arch, scale, recipe))
        if (arch, recipe) == ("vit", "nvfp4_full"):
            raise RuntimeError("out of memory")
        step = {bench.BASELINE_RECIPE: 0.1, "nvfp4_full": 0.3, "2d_rht_sr": 0.4}[recipe]
        return {"arch": arch, "scale": scale, "recipe": recipe, "step_s": step,
                "study_epoch_s": step * 100, "epoch_s": step * 10, "complete": True, "steps": 10,
                "steps_per_epoch": 10, "median_step_ms": step * 1e3, "peak_gb": None}

    monkeypatch.setattr(gpu_check_train, "train_cell", fake_cell)
    ctx = _ctx(tmp_path)
    ctx.stage_deadline = time.monotonic() + 60
    res = gpu_check_train.stage_train(ctx)
    assert res["status"] == "FAIL" and "vit/nvfp4_full: RuntimeError: out of memory" in res["line"]
    ratios = {(r["arch"], r["recipe"]): r.get("ratio_to_baseline") for r in res["rows"]}
    assert ratios[("cnn", "2d_rht_sr")] == pytest.approx(4.0)
    assert ratios[("vit", "nvfp4_full")] is None
    ctx.results["train"] = res
    ctx.stage_deadline = time.monotonic() + 1  # too little time for any cell
    scales = gpu_check_train.stage_train_scales(gpu_check.Context(
        ctx.device, gpu_check.Sizes(), tmp_path, ctx.deadline, ctx.store_dir, ctx.results,
        ctx.stage_deadline))
    assert scales["status"] == "SKIP" and "18 cells not reached" in scales["line"]
    assert len(calls) == 9  # none of the skipped cells ran
    ctx.results["train_scales"] = scales
    ctx.results["train"]["rows"] = [r for r in res["rows"] if r["arch"] != "vit"]
    proj = gpu_check.stage_projection(ctx)
    assert proj["status"] == "FAIL" and "vit" in proj["line"]  # no vit timing at all


def test_stages_past_the_budget_are_skipped(tmp_path):
    assert gpu_check.main(["--device", "cpu", "--quick", "--out", str(tmp_path),
                           "--stages", "env,ops", "--budget-s", "0.5"]) == 0
    stages = json.loads((tmp_path / "summary.json").read_text())["stages"]
    assert [r["status"] for r in stages.values()] == ["SKIP", "SKIP"]
    assert "budget" in stages["ops"]["line"]


def _fake_sync_mode(monkeypatch) -> list:
    """torch.cuda's sync-debug switch and synchronize, recorded instead (no CUDA here)."""
    modes = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)
    return modes


def test_sync_counting_counts_the_sync_warnings_of_one_call(monkeypatch):
    modes = _fake_sync_mode(monkeypatch)

    def two_syncs():
        assert modes == ["warn"]
        for message in ("called a synchronizing CUDA operation", "another thing",
                        "called a synchronizing CUDA operation"):
            warnings.warn(message)

    count, where = gpu_check_bits.syncs_of(two_syncs, torch.device("cpu"))
    assert count == 2 and len(where) == 1 and modes == ["warn", "default"]


def test_whole_training_steps_are_counted_per_arch_and_recipe(monkeypatch):
    modes = _fake_sync_mode(monkeypatch)
    rows = gpu_check_bits.count_step_syncs(torch.device("cpu"), archs=("vit",),
                                           recipes=("nvfp4_full", "fwd_only"), image_size=32)
    assert [(r["arch"], r["recipe"], r["syncs"]) for r in rows] == [
        ("vit", "nvfp4_full", 0), ("vit", "fwd_only", 0)]
    assert modes == ["warn", "default"] * 2
