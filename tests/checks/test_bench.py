"""The benchmark CLI: it runs, prints what it promises, and refuses bad arguments cleanly."""
import json

import pytest
import torch

from nvfp4bench.checks import bench
from nvfp4bench.quant import kernels


def test_quant_prints_every_case_with_its_ratio_to_the_copy(capsys):
    assert bench.main(["quant", "--size", "64", "--repeats", "2", "--kernels", "eager",
                       "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["case"] for r in rows] == list(bench.QUANT_CASES)
    copy = rows[0]
    assert copy["ratio_to_copy"] == 1.0
    for r in rows:
        assert r["median_ms"] > 0 and r["ratio_to_copy"] == pytest.approx(
            r["median_ms"] / copy["median_ms"])


def test_quant_formats_report_bits_and_sqnr(capsys):
    assert bench.main(["quant", "--size", "64", "--repeats", "1", "--kernels", "eager",
                       "--formats", "nvfp4,mxfp8", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["format"], r["case"]) for r in rows][:2] == [("-", "copy"), ("nvfp4", "rn_1x16")]
    by = {(r["format"], r["case"]): r for r in rows}
    assert len(by) == 1 + 2 * (len(bench.QUANT_CASES) - 1)
    assert by[("mxfp8", "rn_1x16")]["bits_per_element"] == 8.25
    x = torch.randn(64, 64, generator=torch.Generator().manual_seed(0))
    expected = bench.sqnr_db(x, kernels.fake_quantize(x, format="mxfp8"))
    assert by[("mxfp8", "rn_1x16")]["sqnr_gaussian_db"] == pytest.approx(expected)
    assert by[("mxfp8", "rn_1x16")]["sqnr_gaussian_db"] > by[("nvfp4", "rn_1x16")][
        "sqnr_gaussian_db"] + 6  # four more bits: about 6 dB each


def test_train_times_each_recipe_against_the_baseline(capsys):
    assert bench.main(["train", "--arch", "cnn", "--scale", "tiny", "--recipes", "nvfp4_full",
                       "--image-size", "32", "--batch-size", "2", "--steps", "1",
                       "--warmup", "0", "--quant-kernels", "eager", "--epoch-slices", "5",
                       "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["recipe"] for r in rows] == [bench.BASELINE_RECIPE, "nvfp4_full"]
    assert rows[0]["ratio"] == 1.0 and rows[0]["quantized_layers"] == 0
    assert rows[1]["quantized_layers"] > 0 and rows[1]["step_ms"] > 0
    assert all(set(r) >= {"recipe", "step_ms", "ratio", "peak_mb", "epoch_s"} for r in rows)
    for r in rows:  # 5 slices in batches of 2: three steps per epoch
        assert r["epoch_s"] == pytest.approx(3 * r["step_ms"] / 1000)


@pytest.mark.parametrize("argv, message", [
    (["quant", "--size", "40"], "multiple of 16"),
    (["quant", "--kernels", "eager,fast"], "--kernels"),
    (["quant", "--device", "tpu"], "cpu or cuda"),
    (["train", "--recipes", "nvfp4_fast"], "unknown recipe"),
    (["train", "--formats", "nvfp4,fp5"], "unknown format"),
    (["train", "--arch", "mlp"], "--arch"),
    (["train", "--steps", "0"], "--steps"),
    (["train", "--epoch-slices", "0"], "--epoch-slices"),
])
def test_bad_arguments_exit_2_without_a_traceback(argv, message, capsys):
    try:
        code = bench.main(argv)
    except SystemExit as e:  # refused by argparse (a number out of its range)
        code = e.code
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def _bench_layers_module():
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_layers.py"
    spec = importlib.util.spec_from_file_location("bench_layers", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_layer_benchmark_prints_a_step_ratio_per_recipe(capsys):
    bench_layers = _bench_layers_module()
    assert bench_layers.main(["steps", "--archs", "cnn", "--scale", "tiny", "--size", "32",
                              "--batch", "2", "--reps", "1", "--quant-kernels", "eager",
                              "--recipes", "fp32", "nvfp4_full"]) == 0
    row = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| cnn |")]
    assert len(row) == 1
    cells = [c.strip() for c in row[0].strip("|").split("|")]
    assert cells[1].endswith(" ms") and cells[2].endswith("x)")  # fp32 ms; nvfp4_full ms (ratio)


def test_the_e8m0_rule_comparison_counts_the_amaxes_whose_codes_differ():
    from benchmarks.e8m0_rules import differing_codes
    one = 0x3F800000  # the bits of 1.0: 1.0 itself, then 999 amaxes just above it
    found = differing_codes("floor", "ceil", chunk_bits=8, first=one, end=one + 1000,
                            progress=False)
    assert {name: f["differ"] for name, f in found.items()} == {"e2m1": 999, "e4m3": 999}
    assert found["e2m1"]["examples"][0] == 1.0 + 2.0 ** -23
    same = differing_codes("te", "rceil", chunk_bits=12, first=one - 50_000, end=one + 50_000,
                           progress=False)
    assert {name: f["differ"] for name, f in same.items()} == {"e2m1": 0, "e4m3": 0}
