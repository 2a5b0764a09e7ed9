"""End-to-end cells on a tiny synthetic store: result JSON, resume, determinism, failures.

One store (10 patients, the fewest that make 5 folds with a val and a test patient each, 32 px) is
built per session; every cell is a tiny model, 1-2 epochs, one CPU thread.
"""
import dataclasses
import json
import math

import pytest
import torch

from nvfp4bench import results
from nvfp4bench.config import RunConfig
from nvfp4bench.data import SliceStore
from nvfp4bench.train.loop import EarlyStopping
from nvfp4bench.train.run import convergence_epoch, run
from nvfp4bench.train.setup import build_quantized_model, init_seed, setup

TOP_KEYS = {"schema_version", "protocol_version", "status", "config", "config_hash", "env", "data",
            "model", "history", "best_epoch", "convergence_epoch", "val", "test", "timing",
            "diagnostics"}
EPOCH_KEYS = {"epoch", "train_loss", "val_loss", "val", "lr", "grad_norm", "seconds"}


@pytest.fixture(scope="session")
def store(tmp_path_factory):
    from nvfp4bench.data import ensure_synthetic_store
    return ensure_synthetic_store(tmp_path_factory.mktemp("store") / "synthetic", patients=10,
                                  image_size=32, progress=False)


# fold 1 of this store has a tumour patient in both val and test (fold 0's test patient is
# tumour-free, so its test AUPRC does not exist)
def _config(store, out, **kw) -> RunConfig:
    base = dict(arch="cnn", scale="tiny", recipe="nvfp4_full", data=str(store), out=str(out),
                fold=1, epochs=1, batch_size=16, progress=False, diagnostics=False, threads=1)
    return RunConfig(**{**base, **kw})


def _without_timing(result: dict) -> dict:
    """The result minus what legitimately differs between two runs (clocks, argv, paths)."""
    r = json.loads(json.dumps(result))
    for key in ("timing", "env", "checkpoints"):
        r.pop(key, None)
    r["config"].pop("out")
    r["config"].pop("resume")
    for h in r["history"]:
        h.pop("seconds")
        h.pop("step_ms_median")
    return r


@pytest.mark.parametrize("arch, recipe", [("cnn", "nvfp4_full"), ("vit", "2d_rht_sr"),
                                          ("swin", "fwd_rht")])
def test_one_cell_writes_the_result_json(store, tmp_path, arch, recipe):
    config = _config(store, tmp_path, arch=arch, recipe=recipe, diagnostics=arch == "swin")
    result = run(config)
    assert result["status"] == "complete", result["error"]
    path = results.result_path(config)
    dataset = f"synthetic-{SliceStore(store).fingerprint[:8]}"  # a store other than data/synthetic
    assert path == tmp_path / dataset / arch / "tiny" / recipe / "fold1_seed2026.json"
    on_disk = json.loads(path.read_text())
    assert on_disk == json.loads(json.dumps(result))
    assert TOP_KEYS <= set(on_disk)
    assert results.is_complete(path, results.config_hash(config))
    # data: the synthetic label, disjoint partitions
    d = on_disk["data"]
    assert d["synthetic"] is True and d["name"] == "synthetic" and d["fingerprint"]
    assert d["results_dir"] == dataset
    parts = [set(d["patients"][p]) for p in ("train", "val", "test")]
    assert all(parts) and not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    # model: quantized layers of a quantized recipe
    assert on_disk["model"]["quantized_layers"] and on_disk["model"]["parameters"] > 0
    # history: one epoch, finite numbers
    (h,) = on_disk["history"]
    assert EPOCH_KEYS <= set(h) and math.isfinite(h["train_loss"]) and h["lr"] == config.resolved().lr
    assert on_disk["best_epoch"] == 1
    for part in ("val", "test"):
        m = on_disk[part]
        assert isinstance(m["auprc"], float) and 0.0 <= m["auprc"] <= 1.0
        assert 0.0 <= m["roc_auc"] <= 1.0 and 0.0 <= m["ece"] <= 1.0
        assert m["logit_std"] >= 0 and 0.0 <= m["prob_entropy"] <= math.log(2)
        assert m["n_patients"] == len(d["patients"][part]) and m["per_patient"]
    assert on_disk["timing"]["median_step_ms"] > 0
    if config.diagnostics:
        assert on_disk["diagnostics"] and "error" not in on_disk["diagnostics"]
    # checkpoints beside the JSON load with weights_only=True
    last, best = results.checkpoint_paths(path)
    assert torch.load(last, weights_only=True)["epoch"] == 1
    assert "model" in torch.load(best, weights_only=True)


class Killed(BaseException):
    """Stands in for SIGKILL: not an Exception, so no failed JSON is written."""


def test_killed_and_resumed_cell_equals_an_uninterrupted_one(store, tmp_path):
    # 2d_rht_sr: stochastic rounding, so the SR generator's state must survive the restart too
    kw = dict(recipe="2d_rht_sr", epochs=2, min_epochs=0, batch_size=8)
    straight = run(_config(store, tmp_path / "a", **kw))

    def kill(epoch, record):
        if epoch == 1:
            raise Killed

    with pytest.raises(Killed):
        run(_config(store, tmp_path / "b", **kw), on_epoch_end=kill)
    path_b = results.result_path(_config(store, tmp_path / "b", **kw))
    assert not path_b.exists()  # a killed cell leaves only its checkpoint
    resumed = run(_config(store, tmp_path / "b", resume=True, **kw))
    assert resumed["timing"]["resumed_from_epoch"] == 1
    assert _without_timing(resumed) == _without_timing(straight)
    wa = torch.load(results.checkpoint_paths(results.result_path(_config(store, tmp_path / "a", **kw)))[0],
                    weights_only=True)
    wb = torch.load(results.checkpoint_paths(path_b)[0], weights_only=True)
    for k, v in wa["model"].items():
        assert torch.equal(v, wb["model"][k]), k
    # resuming a complete cell returns it without training again
    again = run(_config(store, tmp_path / "b", resume=True, **kw))
    assert again["timing"] == resumed["timing"]


def test_same_config_and_seed_give_identical_metrics(store, tmp_path):
    a = run(_config(store, tmp_path / "a", arch="vit", recipe="sr_only"))
    b = run(_config(store, tmp_path / "b", arch="vit", recipe="sr_only"))
    assert _without_timing(a) == _without_timing(b)
    c = run(_config(store, tmp_path / "c", arch="vit", recipe="sr_only", seed=7))
    assert c["history"][0]["train_loss"] != a["history"][0]["train_loss"]


def test_every_recipe_starts_from_the_same_weights(store, tmp_path):
    weights = {}
    for recipe in ("baseline", "nvfp4_full", "2d_rht_sr"):
        cell = setup(_config(store, tmp_path, arch="swin", recipe=recipe))
        model = build_quantized_model(cell, torch.Generator().manual_seed(0))
        weights[recipe] = [p.detach().clone() for p in model.parameters()]
    assert len(weights["baseline"]) == len(weights["2d_rht_sr"])
    for a, b, c in zip(weights["baseline"], weights["nvfp4_full"], weights["2d_rht_sr"]):
        assert torch.equal(a, b) and torch.equal(a, c)
    assert init_seed("swin", "tiny", 2026) != init_seed("swin", "small", 2026)


def _nan_loss(monkeypatch, when):
    """Make the loss NaN at the loss evaluations (1-based count over the run) where when(n)."""
    import nvfp4bench.train.run as train
    calls = {"n": 0}

    class NanLoss(train.BCETverskyLoss):
        def forward(self, logits, targets):
            calls["n"] += 1
            loss = super().forward(logits, targets)
            return loss * math.nan if when(calls["n"]) else loss

    monkeypatch.setattr(train, "BCETverskyLoss", NanLoss)


@pytest.fixture
def nan_at_third_step(monkeypatch):
    """Inject a NaN training loss at the third loss evaluation of a run (a training step)."""
    _nan_loss(monkeypatch, lambda n: n == 3)


@pytest.fixture
def nan_always(monkeypatch):
    _nan_loss(monkeypatch, lambda n: True)


def test_a_non_finite_loss_skips_its_batch_and_is_counted(store, tmp_path, nan_at_third_step):
    result = run(_config(store, tmp_path, batch_size=8))
    assert result["status"] == "complete", result["error"]
    h = result["history"][0]
    assert h["skipped_steps"] == 1 and h["nonfinite_grad_steps"] == 0
    assert math.isfinite(h["train_loss"]) and result["test"]["n_pixels"] > 0


def test_an_epoch_whose_every_loss_is_non_finite_fails_the_cell(store, tmp_path, nan_always):
    config = _config(store, tmp_path, batch_size=8)
    result = run(config)
    assert result["status"] == "failed"
    assert "epoch 1: the loss was NaN or infinite in every one of its" in result["error"]
    on_disk = json.loads(results.result_path(config).read_text())
    assert on_disk["status"] == "failed" and on_disk["error"] == result["error"]
    assert on_disk["val"] is None and on_disk["test"] is None and on_disk["history"] == []
    assert not results.is_complete(results.result_path(config), results.config_hash(config))


def test_failing_cell_exits_non_zero_from_the_command_line(store, tmp_path, capsys, nan_always):
    from nvfp4bench.train.cli import main
    code = main(["--arch", "cnn", "--scale", "tiny", "--recipe", "fwd_only", "--fold", "1",
                 "--data", str(store), "--out", str(tmp_path), "--epochs", "1",
                 "--batch-size", "8", "--no-progress", "--no-diagnostics", "--threads", "1"])
    assert code == 1
    err = capsys.readouterr().err
    assert "NaN or infinite in every one" in err and "Traceback" not in err


class _Bar:
    def update(self, n):
        pass

    def set_postfix(self, **kw):
        pass


def _toy(precision="fp32"):
    """A linear 'segmenter' on 2x2 images, a loader of three batches and a Cell-like namespace."""
    from types import SimpleNamespace

    from nvfp4bench.quant.backends import compute_context
    from nvfp4bench.train.setup import AUTOCAST_DTYPES
    torch.manual_seed(0)
    model = torch.nn.Conv2d(1, 1, 1)
    batches = [(torch.randn(4, 1, 2, 2), (torch.rand(4, 1, 2, 2) > 0.5).float(),
                torch.arange(4)) for _ in range(3)]
    cell = SimpleNamespace(device=torch.device("cpu"), precision=precision,
                           config=SimpleNamespace(grad_clip=1.0, lr=0.1, backend="emulator"),
                           recipe=SimpleNamespace(name="toy"),
                           run_context=lambda: compute_context(torch.device("cpu"),
                                                               AUTOCAST_DTYPES[precision]))
    return model, batches, cell


def test_a_skipped_batch_takes_no_step():
    """Loss NaN on batches 2 and 3: the epoch's weights are those after batch 1's step alone."""
    from nvfp4bench.train.loop import train_one_epoch
    from nvfp4bench.train.losses import BCETverskyLoss
    model, batches, cell = _toy()
    n = {"k": 0}

    def loss_fn(logits, masks):
        n["k"] += 1
        loss = BCETverskyLoss()(logits, masks)
        return loss if n["k"] == 1 else loss * math.inf

    ref = torch.nn.Conv2d(1, 1, 1)
    ref.load_state_dict(model.state_dict())
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    out = train_one_epoch(model, batches, loss_fn, opt, scaler, cell, 1, _Bar())
    assert out["skipped_steps"] == 2 and len(out["step_ms"]) == 1
    ref_opt = torch.optim.Adam(ref.parameters(), lr=0.1)
    train_one_epoch(ref, batches[:1], BCETverskyLoss(), ref_opt, scaler, cell, 1, _Bar())
    for a, b in zip(model.parameters(), ref.parameters()):
        assert torch.equal(a, b)


def test_fp16_grad_scaler_skips_an_overflowing_step_on_cpu():
    """The study's fp16 autocast + GradScaler path, on the CPU: an infinite gradient is not
    applied, the scale halves, and the step is counted."""
    from nvfp4bench.train.loop import train_one_epoch
    from nvfp4bench.train.losses import BCETverskyLoss
    model, batches, cell = _toy("fp16")
    before = [p.detach().clone() for p in model.parameters()]

    def loss_fn(logits, masks):  # a finite loss whose scaled gradient overflows
        assert logits.dtype == torch.float32
        return BCETverskyLoss()(logits, masks) + (model.bias * 1e36).sum()

    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", enabled=True)
    out = train_one_epoch(model, batches[:1], loss_fn, opt, scaler, cell, 1, _Bar())
    assert out["nonfinite_grad_steps"] == 1 and out["skipped_steps"] == 0
    assert scaler.get_scale() == 65536.0 / 2
    for a, b in zip(model.parameters(), before):
        assert torch.equal(a, b)


def test_validation_loss_is_the_mean_of_batch_means():
    """The study's average: a 1-slice last batch weighs as much as a 4-slice one."""
    from nvfp4bench.evaluation.meter import SegmentationMeter
    from nvfp4bench.train.evaluate import _predict
    from nvfp4bench.train.losses import BCETverskyLoss
    model, batches, cell = _toy()
    batches = batches[:2] + [tuple(t[:1] for t in batches[2])]
    loss, finite = _predict(model, batches, SegmentationMeter(patient_metrics=False), cell,
                            BCETverskyLoss())
    with torch.no_grad():
        per_batch = [float(BCETverskyLoss()(model(x), y)) for x, y, _ in batches]
    assert finite and loss == pytest.approx(sum(per_batch) / 3, rel=1e-12)
    per_slice = sum(v * len(b[0]) for v, b in zip(per_batch, batches)) / 9
    assert abs(loss - per_slice) > 1e-6  # the two averages differ here


def test_scheduler_is_the_studys_max_mode_on_minus_the_loss():
    """ReduceLROnPlateau(mode max) stepped with -L: a loss 0.5e-4 relatively worse still counts as
    better (threshold on a negative best), where mode min on L would count it as bad."""
    from nvfp4bench.train.loop import make_scheduler
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = make_scheduler(opt, _config("x", "y", lr_patience=1))
    sched.step(-1.0)
    sched.step(-1.00005)
    assert sched.num_bad_epochs == 0
    sched.step(-2.0)
    assert sched.num_bad_epochs == 1 and opt.param_groups[0]["lr"] == 1.0
    sched.step(-2.0)  # a second bad epoch > patience 1: halve
    assert opt.param_groups[0]["lr"] == 0.5
    mode_min = torch.optim.lr_scheduler.ReduceLROnPlateau(
        torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), mode="min")
    mode_min.step(1.0)
    mode_min.step(1.00005)
    assert mode_min.num_bad_epochs == 1  # what the study's choice differs from


def test_best_checkpoint_and_early_stopping_are_the_studys():
    s = EarlyStopping(patience=2, min_delta=0.1, min_epochs=5)
    losses = [1.0, 0.95, 0.96, 0.85, 0.84, 0.83, 0.82, math.nan]
    best = [s.update(e, loss) for e, loss in enumerate(losses, start=1)]
    # improving needs L < best - min_delta, for the checkpoint as for the counter
    assert best == [True, False, False, True, False, False, False, False]
    assert s.best_epoch == 4 and s.best_loss == 0.85
    # patience 2 is reached at epoch 6, and epoch 6 > min_epochs 5
    assert s.stopped and s.bad_epochs == 4
    s2 = EarlyStopping(patience=2, min_delta=0.1, min_epochs=3)
    for e, loss in enumerate([1.0, 1.0, 1.0], start=1):
        s2.update(e, loss)
    assert s2.bad_epochs == 2 and not s2.stopped  # epoch 3 is not > min_epochs 3
    s2.update(4, 1.0)
    assert s2.stopped
    s3 = EarlyStopping(patience=2, min_delta=0.0, min_epochs=0)
    s3.load_state_dict(dataclasses.asdict(s))
    assert s3 == s


def test_config_hash_follows_the_store_content_not_its_path(store, tmp_path):
    """A moved store keeps its cells complete; a store rebuilt in place makes them pending."""
    import shutil
    moved = tmp_path / "moved"
    shutil.copytree(store, moved)
    here, there = (results.config_hash(_config(s, tmp_path)) for s in (store, moved))
    assert here == there
    index = json.loads((moved / "index.json").read_text())
    index["fingerprint"] = "0" * 32  # as if rebuilt from other data
    (moved / "index.json").write_text(json.dumps(index))
    assert results.config_hash(_config(moved, tmp_path)) != here


def test_results_and_checkpoints_are_readable_by_others(store, tmp_path):
    config = _config(store, tmp_path)
    run(config)
    path = results.result_path(config)
    for p in (path, *results.checkpoint_paths(path)):
        assert p.stat().st_mode & 0o777 == 0o644, p


def test_a_last_batch_of_one_slice_is_kept_unless_asked(store, tmp_path):
    """The study keeps every training batch; --drop-last-single drops a 1-slice last batch."""
    from nvfp4bench.train.setup import make_loaders
    n = len(make_loaders(setup(_config(store, tmp_path)), torch.Generator())[0])
    for drop, batches in ((False, 2), (True, 1)):
        cell = setup(_config(store, tmp_path, batch_size=n - 1, drop_last_single=drop))
        _, train, _, _ = make_loaders(cell, torch.Generator())
        assert len(train) == batches


def test_a_truncated_checkpoint_gives_one_line_on_resume(store, tmp_path, capsys):
    from nvfp4bench.train.cli import main
    config = _config(store, tmp_path)
    ckpt = results.checkpoint_paths(results.result_path(config))[0]
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"PK\x03\x04 truncated")
    argv = ["--arch", "cnn", "--scale", "tiny", "--recipe", "nvfp4_full", "--fold", "1",
            "--data", str(store), "--out", str(tmp_path), "--epochs", "1", "--resume",
            "--no-progress", "--no-diagnostics"]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert f"checkpoint {ckpt} is unreadable" in err and "delete it" in err


def test_convergence_epoch_is_the_first_whose_validation_dice_reaches_one_half():
    history = [{"epoch": 1, "val": {"dice": 0.2}}, {"epoch": 2, "val": {"dice": None}},
               {"epoch": 3, "val": {"dice": 0.5}}, {"epoch": 4, "val": {"dice": 0.7}}]
    assert convergence_epoch(history) == 3
    assert convergence_epoch(history[:2]) is None                       # never reached: null
    assert convergence_epoch([{"epoch": 1, "val": {"dice": 0.4999}}]) is None
    assert convergence_epoch([]) is None


def test_a_collapsed_cell_is_recorded_warned_and_listed_by_the_report(store, tmp_path, capsys):
    """lr 1e4 drives the model to one constant output: the cell completes with collapsed: true,
    the command line warns in one line, and the report lists the cell."""
    from nvfp4bench.report.build import build_report
    from nvfp4bench.train.cli import main
    argv = ["--arch", "vit", "--scale", "tiny", "--recipe", "baseline", "--fold", "0",
            "--data", str(store), "--out", str(tmp_path), "--epochs", "2", "--lr", "1e4",
            "--no-progress", "--no-diagnostics"]
    assert main(argv) == 0
    warnings = [ln for ln in capsys.readouterr().err.splitlines() if "warning" in ln]
    assert len(warnings) == 1 and "collapsed" in warnings[0]
    (path,) = tmp_path.rglob("fold0_seed2026.json")
    result = json.loads(path.read_text())
    assert result["status"] == "complete" and result["collapsed"] is True
    assert result["val"]["tp"] + result["val"]["fp"] == 0
    assert result["val"]["auprc"] == pytest.approx(result["val"]["prevalence"])
    out = build_report(tmp_path, tmp_path / "report", figures=False, eval_set="val")
    assert [c.collapsed for c in out["cells"]] == [True]
    text = (tmp_path / "report" / "report.md").read_text()
    assert "| vit | tiny | baseline | 1 | 1 | fold 0 seed 2026 |" in text
    assert "an empty prediction scores 1 on an empty (tumour-free) slice" in text


def test_a_trained_cell_is_not_collapsed(store, tmp_path):
    result = run(_config(store, tmp_path, recipe="baseline", epochs=2))
    assert result["collapsed"] is False and result["val"]["tp"] + result["val"]["fp"] > 0


HOLD_AFTER_EPOCH_1 = """
import sys, time
from pathlib import Path
from nvfp4bench.train.cli import parse_config
from nvfp4bench.train.run import run
ready, go = Path(sys.argv[1]), Path(sys.argv[2])
def hold(epoch, record):
    ready.touch()
    while not go.exists():  # the test lets this run go on after the second start is refused
        time.sleep(0.05)
run(parse_config(sys.argv[3:]), on_epoch_end=hold)
"""


def test_the_same_cell_started_twice_trains_once(store, tmp_path):
    """A runs the cell and is held after its first epoch; B, the same cell, refuses at once with
    one line naming A's pid, trains nothing, and A then finishes and releases the lock."""
    import subprocess
    import sys
    import time

    from nvfp4bench.grid.process import child_env
    cell = ["--arch", "cnn", "--scale", "tiny", "--recipe", "baseline", "--fold", "1",
            "--data", str(store), "--out", str(tmp_path / "out"), "--epochs", "2",
            "--no-progress", "--no-diagnostics"]
    script = tmp_path / "hold.py"
    script.write_text(HOLD_AFTER_EPOCH_1)
    ready, go = tmp_path / "ready", tmp_path / "go"
    a = subprocess.Popen([sys.executable, str(script), str(ready), str(go), *cell],
                         env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    try:
        deadline = time.monotonic() + 300
        while not ready.exists():
            assert a.poll() is None, a.communicate()
            assert time.monotonic() < deadline, "the first run never finished an epoch"
            time.sleep(0.05)
        b = subprocess.run([sys.executable, "-m", "nvfp4bench", *cell], env=child_env(),
                           capture_output=True, text=True, timeout=300)
        assert b.returncode == 1, b.stdout + b.stderr
        err = [ln for ln in b.stderr.splitlines() if ln.strip()]
        assert len(err) == 1 and f"pid {a.pid}" in err[0] and "in progress" in err[0], err
        assert "epoch" not in b.stdout                                   # B trained nothing
    finally:
        go.touch()
        out, err_a = a.communicate(timeout=300)
    assert a.returncode == 0, err_a
    (result,) = (tmp_path / "out").rglob("fold1_seed2026.json")
    assert json.loads(result.read_text())["status"] == "complete"
    assert not list((tmp_path / "out").rglob("*.lock"))                  # released


@pytest.mark.parametrize("metrics, expected", [
    ({"tp": 0, "fp": 0, "auprc": 0.02, "prevalence": 0.02, "distinct_probabilities": 5}, True),
    ({"tp": 0, "fp": 0, "auprc": 0.35, "prevalence": 0.012, "distinct_probabilities": 9e4},
     False),                                        # under-confident but ranks well: not collapsed
    ({"tp": 3, "fp": 9, "auprc": 0.02, "prevalence": 0.02, "distinct_probabilities": 50}, False),
    ({"tp": 0, "fp": 0, "auprc": None, "prevalence": 0.0, "distinct_probabilities": 40}, False),
    ({"tp": 0, "fp": 0, "auprc": None, "prevalence": 0.0, "distinct_probabilities": 1}, True),
    ({"tp": 5, "fp": 0, "auprc": 0.9, "prevalence": 0.02, "distinct_probabilities": 1}, True),
])
def test_collapse_is_no_positive_pixel_at_chance_or_a_constant_output(metrics, expected):
    from nvfp4bench.train.run import collapsed
    assert collapsed(metrics) is expected


def test_a_cell_in_another_format_trains_records_it_and_has_its_own_folder(store, tmp_path):
    from nvfp4bench.train.cli import main
    base = ["--arch", "cnn", "--scale", "tiny", "--recipe", "2d_rht_sr", "--fold", "1",
            "--epochs", "1", "--batch-size", "16", "--data", str(store), "--out", str(tmp_path),
            "--no-progress", "--no-diagnostics"]
    assert main([*base, "--format", "mxfp4"]) == 0
    nvfp4 = results.result_path(_config(store, tmp_path, recipe="2d_rht_sr"))
    path = nvfp4.parent.parent / "2d_rht_sr@mxfp4" / nvfp4.name
    on_disk = json.loads(path.read_text())
    assert on_disk["status"] == "complete" and on_disk["config"]["format"] == "mxfp4"
    assert on_disk["model"]["format"] == "mxfp4" and on_disk["model"]["quantized_layers"]
    assert on_disk["config_hash"] != results.config_hash(
        _config(store, tmp_path, recipe="2d_rht_sr"))
    assert not nvfp4.exists()


# config_hash and result_path of nvfp4 cells as the commit before formats existed (ecc63fd)
# computed them, with the data identity fixed: finished nvfp4 results stay complete.
HASHES_BEFORE_FORMATS = {
    "--arch cnn --scale tiny --recipe nvfp4_full --fold 0": "cf4497e99a7874ff",
    "--arch swin --scale tiny --recipe 2d_rht_sr --fold 0 --split holdout --seed 2027":
        "abdc2a8c05379934",
    "--arch vit_adamax --scale small --recipe baseline --fold 3 --epochs 5 --image-size 128":
        "739218dd6e17c91c",
    "--arch vit --scale base --recipe fwd_rht --fold 1 --quantize-attention --precision bf16":
        "bb79159548f9a376",
}


@pytest.mark.parametrize("argv", list(HASHES_BEFORE_FORMATS))
def test_nvfp4_cells_keep_their_config_hash_and_path(argv, monkeypatch):
    from nvfp4bench.train.cli import parse_config
    monkeypatch.setattr(results, "data_identity", lambda data: "fingerprint:0123456789abcdef")
    monkeypatch.setattr(results, "dataset_dir", lambda data: "synthetic")
    for extra in ([], ["--format", "nvfp4"]):
        config = parse_config([*argv.split(), "--out", "OUT", *extra])
        assert results.config_hash(config) == HASHES_BEFORE_FORMATS[argv]
        recipe = argv.split()[5]
        assert results.result_path(config).parent.name == recipe
    other = parse_config([*argv.split(), "--out", "OUT", "--format", "nvfp4_4over6"])
    assert results.config_hash(other) != HASHES_BEFORE_FORMATS[argv]
