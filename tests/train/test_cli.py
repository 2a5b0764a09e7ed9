"""The command line: --help, option errors, the RunConfig it builds, the config hash, results."""
import dataclasses
import json
import math

import numpy as np
import pytest

from nvfp4bench import results
from nvfp4bench.config import ARMS, RunConfig
from nvfp4bench.models import ARCHS, SCALE_NAMES
from nvfp4bench.quant.recipes import RECIPES
from nvfp4bench.train.cli import main, parse_config
from tests.helpers import well_formed_result

CELL = ["--arch", "swin", "--scale", "tiny", "--recipe", "nvfp4_full", "--fold", "0"]


def test_help_lists_recipes_architectures_and_scales(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for name, recipe in RECIPES.items():
        assert name in text and recipe.description in text
    for name in [*ARCHS, *SCALE_NAMES]:
        assert name in text
    for group in ("model:", "quantization:", "data:", "training:", "output:"):
        assert group in text


@pytest.mark.parametrize("argv", [
    CELL[:-2],                                   # --fold missing
    [*CELL[:5], "nvfp5", *CELL[6:]],             # unknown recipe
    [*CELL[:-1], "7"],                           # fold out of range
    ["--arch", "resnet", *CELL[2:]],             # unknown arch
    [*CELL, "--epochs", "0"],
    [*CELL, "--lr", "nan"],
    [*CELL, "--lr", "inf"],
    [*CELL, "--batch-size", "-4"],
    [*CELL, "--precision", "fp8"],
    [*CELL, "--backend", "cuda"],
])
def test_bad_options_exit_non_zero_with_a_usage_message(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "usage:" in err and "Traceback" not in err


def test_missing_data_directory_is_a_one_line_error(tmp_path, capsys):
    assert main([*CELL, "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "nowhere" in err and "no such directory" in err and len(err.splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_parse_config_defaults_are_the_studys():
    c = parse_config(CELL)
    assert isinstance(c, RunConfig)
    assert (c.batch_size, c.grad_clip, c.lr_factor, c.lr_patience) == (32, 1.0, 0.5, 10)
    assert (c.patience, c.min_delta, c.min_epochs, c.seed) == (20, 1e-3, 40, 2026)
    assert (c.backend, c.device, c.precision, c.workers, c.out) == (
        "emulator", "auto", "auto", 0, "results")
    assert c.threads == 1 and parse_config([*CELL, "--threads", "0"]).threads == 0
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.lr = 1.0
    r = c.resolved()
    assert (r.optimizer, r.lr, r.weight_decay) == ("adamw", 1e-4, 1e-4)
    cnn = parse_config(["--arch", "cnn", *CELL[2:]]).resolved()
    assert (cnn.optimizer, cnn.lr, cnn.weight_decay) == ("adamax", 5e-4, 0.0)
    assert parse_config([*CELL, "--data", "x"]).resolved().epochs == 100
    assert {arm.family for arm in ARMS.values()} == set(ARCHS)
    # the fourth arm: the ViT with the study's Adamax (main.py ARCH_CONFIGS "vit_adamax")
    va = parse_config(["--arch", "vit_adamax", *CELL[2:]])
    r = va.resolved()
    assert (va.family, r.optimizer, r.lr, r.weight_decay) == ("vit", "adamax", 5e-4, 0.0)
    assert results.result_path(va).parts[-4] == "vit_adamax"  # its own results, beside vit's
    assert c.head_prior is None  # the study's init; the tumour prior is opt-in


def test_head_prior_is_an_opt_in_recorded_option(capsys):
    c = parse_config([*CELL, "--head-prior", "0.01"])
    assert c.head_prior == 0.01 and c.to_dict()["head_prior"] == 0.01
    assert results.config_hash(c) != results.config_hash(parse_config(CELL))
    for bad in ("0", "1", "-0.5", "nan"):
        with pytest.raises(SystemExit):
            parse_config([*CELL, "--head-prior", bad])
    assert "--head-prior: must be a probability" in capsys.readouterr().err


def test_config_hash_follows_the_options_that_change_the_result():
    h = results.config_hash(parse_config(CELL))
    assert h == results.config_hash(parse_config(CELL))
    # execution details do not change it
    for extra in (["--out", "elsewhere"], ["--resume"], ["--workers", "2"], ["--no-progress"],
                  ["--threads", "2"], ["--threads", "0"], ["--lr", "1e-4"]):  # swin's lr
        assert results.config_hash(parse_config([*CELL, *extra])) == h, extra
    for extra in (["--lr", "3e-4"], ["--seed", "1"], ["--epochs", "5"], ["--no-augment"],
                  ["--precision", "bf16"], ["--quantize-attention"], ["--data", "/x"]):
        assert results.config_hash(parse_config([*CELL, *extra])) != h, extra
    assert results.config_hash(parse_config(["--arch", "swin", "--scale", "tiny", "--recipe",
                                             "2d_rht", "--fold", "0"])) != h


def test_result_path_layout_and_completeness(tmp_path):
    config = RunConfig(arch="vit", scale="small", recipe="2d_rht_sr", fold=3, seed=7,
                       out=str(tmp_path))
    p = results.result_path(config)  # the embedded store (not built here or built): "synthetic"
    assert p == tmp_path / "synthetic" / "vit" / "small" / "2d_rht_sr" / "fold3_seed7.json"
    last, best = results.checkpoint_paths(p)
    assert (last.name, best.name) == ("fold3_seed7.ckpt.pt", "fold3_seed7.best.pt")
    assert not results.is_complete(p, "abc") and results.read_result(p) is None
    h = "0123456789abcdef"
    results.write_result(p, well_formed_result("complete", h, x=np.float32(0.5), n=np.int64(3),
                                               none=None))
    on_disk = json.loads(p.read_text())
    assert (on_disk["x"], on_disk["n"], on_disk["none"]) == (0.5, 3, None)  # plain JSON types
    assert results.is_complete(p, h) and not results.is_complete(p, "0123456789abcdee")
    assert [f.name for f in p.parent.iterdir()] == [p.name]  # no temporary file left
    p.write_text("{truncated")
    assert results.read_result(p) is None and not results.is_complete(p, h)


def test_non_finite_values_are_never_written(tmp_path):
    p = tmp_path / "r.json"
    with pytest.raises(ValueError, match=r"result.test.auprc"):
        results.write_result(p, {"test": {"auprc": math.nan}})
    assert not p.exists() and list(tmp_path.iterdir()) == []


def test_precision_comes_from_the_option_the_recipe_or_the_device():
    import torch

    from nvfp4bench.quant.recipes import get_recipe
    from nvfp4bench.train.setup import resolve_device, resolve_precision
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_precision("auto", get_recipe("nvfp4_full"), cpu) == "fp32"
    # the study's default on CUDA: fp16 autocast + GradScaler, for every recipe and the baseline
    assert resolve_precision("auto", get_recipe("baseline"), cuda) == "fp16"
    assert resolve_precision("auto", get_recipe("2d_rht_sr"), cuda) == "fp16"
    # Transformer Engine's NVFP4 needs bf16: its default, and fp16 is refused there (te backend)
    assert resolve_precision("auto", get_recipe("2d_rht_sr"), cuda, "te") == "bf16"
    assert resolve_precision("auto", get_recipe("2d_rht_sr"), cpu, "te") == "fp32"
    assert resolve_precision("bf16", get_recipe("nvfp4_full"), cuda) == "bf16"
    assert resolve_precision("fp16", get_recipe("2d_rht"), cuda) == "fp16"
    assert resolve_precision("auto", get_recipe("fp16"), cpu) == "fp16"
    assert resolve_precision("fp32", get_recipe("fp32"), cuda) == "fp32"
    with pytest.raises(ValueError, match="contradicts"):
        resolve_precision("bf16", get_recipe("fp16"), cuda)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")
    with pytest.raises(ValueError, match="--device"):
        resolve_device("tpu")


def test_summary_puts_the_test_auprc_and_its_chance_level_first():
    from nvfp4bench.train.cli import summary
    result = {"config": {"arch": "cnn", "scale": "tiny", "recipe": "fwd_only", "fold": 2,
                         "seed": 2026, "split": "kfold"}, "status": "complete",
              "test": {"auprc": 0.5, "prevalence": 0.02, "dice": 0.3, "recall": 0.4, "f2": 0.35,
                       "patient_dice_mean": 0.6, "lesion_recall": None},
              "val": {"auprc": 0.4}, "timing": {"total_seconds": 3.0},
              "data": {"name": "synthetic", "synthetic": True}, "history": [{"skipped_steps": 2}],
              "best_epoch": 1, "epochs_run": 1, "stopped_early": False, "best_val_loss": 0.9}
    lines = summary(result).splitlines()
    assert lines[1].startswith("  test AUPRC 0.5000 (25.0x prevalence 0.0200)  soft Dice 0.3000")
    assert "lesion recall n/a" in lines[1] and lines[2].startswith("  val  AUPRC 0.4000")
    assert "2 steps skipped" in lines[3]
    holdout = dict(result, config=dict(result["config"], split="holdout", fold=0))
    assert summary(holdout).startswith("cnn/tiny/fwd_only holdout seed 2026: complete")


def test_bad_numbers_name_the_option_not_a_function(capsys):
    for opt, bad, says in (("--epochs", "abc", "not an integer: 'abc'"),
                           ("--lr", "fast", "not a number: 'fast'"),
                           ("--image-size", "7", "the smallest is 16")):
        with pytest.raises(SystemExit) as e:
            main([*CELL, opt, bad])
        err = capsys.readouterr().err
        assert e.value.code == 2 and f"argument {opt}: " in err and says in err, err
        assert "_positive" not in err and "_int" not in err


def test_ctrl_c_on_a_cell_exits_130_with_one_line_on_how_to_resume(monkeypatch, capsys):
    import nvfp4bench.train.cli
    from nvfp4bench.train.cli import entry

    def interrupted(config):
        raise KeyboardInterrupt
    monkeypatch.setattr(nvfp4bench.train.cli, "run", interrupted)
    assert entry([*CELL, "--epochs", "3"]) == 130
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.endswith("continue with: python -m nvfp4bench --arch swin --scale tiny --recipe "
                        "nvfp4_full --fold 0 --epochs 3 --resume")
