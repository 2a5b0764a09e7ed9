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
from nvfp4bench.train import EarlyStopping, build_quantized_model, init_seed, run, setup

TOP_KEYS = {"schema_version", "status", "config", "config_hash", "env", "data", "model", "history",
            "best_epoch", "val", "test", "timing", "diagnostics"}
EPOCH_KEYS = {"epoch", "train_loss", "val_loss", "val", "lr", "grad_norm", "seconds"}


@pytest.fixture(scope="session")
def store(tmp_path_factory):
    from nvfp4bench.data import ensure_synthetic_store
    return ensure_synthetic_store(tmp_path_factory.mktemp("store") / "synthetic", patients=10,
                                  image_size=32, progress=False)


def _config(store, out, **kw) -> RunConfig:
    base = dict(arch="cnn", scale="tiny", recipe="nvfp4_full", data=str(store), out=str(out),
                fold=0, epochs=1, batch_size=16, progress=False, diagnostics=False, threads=1)
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
    assert path == tmp_path / dataset / arch / "tiny" / recipe / "fold0_seed2026.json"
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
    for recipe in ("bf16", "nvfp4_full", "2d_rht_sr"):
        cell = setup(_config(store, tmp_path, arch="swin", recipe=recipe))
        model = build_quantized_model(cell, torch.Generator().manual_seed(0))
        weights[recipe] = [p.detach().clone() for p in model.parameters()]
    assert len(weights["bf16"]) == len(weights["2d_rht_sr"])
    for a, b, c in zip(weights["bf16"], weights["nvfp4_full"], weights["2d_rht_sr"]):
        assert torch.equal(a, b) and torch.equal(a, c)
    assert init_seed("swin", "tiny", 2026) != init_seed("swin", "small", 2026)


@pytest.fixture
def nan_at_third_step(monkeypatch):
    """Inject a NaN training loss at the third loss evaluation of a run."""
    import nvfp4bench.train as train
    calls = {"n": 0}

    class NanLoss(train.BCETverskyLoss):
        def forward(self, logits, targets):
            calls["n"] += 1
            loss = super().forward(logits, targets)
            return loss * math.nan if calls["n"] == 3 else loss

    monkeypatch.setattr(train, "BCETverskyLoss", NanLoss)


def test_non_finite_loss_fails_the_cell_without_metrics(store, tmp_path, nan_at_third_step):
    config = _config(store, tmp_path, batch_size=8)
    result = run(config)
    assert result["status"] == "failed"
    assert "epoch 1 step 3: training loss is nan" in result["error"]
    on_disk = json.loads(results.result_path(config).read_text())
    assert on_disk["status"] == "failed" and on_disk["error"] == result["error"]
    assert on_disk["val"] is None and on_disk["test"] is None and on_disk["history"] == []
    assert not results.is_complete(results.result_path(config), results.config_hash(config))


def test_failing_cell_exits_non_zero_from_the_command_line(store, tmp_path, capsys,
                                                           nan_at_third_step):
    from nvfp4bench.cli import main
    code = main(["--arch", "cnn", "--scale", "tiny", "--recipe", "fwd_only", "--fold", "1",
                 "--data", str(store), "--out", str(tmp_path), "--epochs", "1",
                 "--batch-size", "8", "--no-progress", "--no-diagnostics", "--threads", "1"])
    assert code == 1
    err = capsys.readouterr().err
    assert "training loss is nan" in err and "Traceback" not in err


def test_early_stopping_waits_for_min_epochs_and_keeps_the_lowest_loss():
    s = EarlyStopping(patience=2, min_delta=0.1, min_epochs=5)
    losses = [1.0, 0.95, 0.96, 0.94, 0.93, 0.92, 0.91]
    best = [s.update(e, l) for e, l in enumerate(losses, start=1)]
    # 0.95 beats 1.0 for the checkpoint but not by min_delta for the patience counter
    assert best == [True, True, False, True, True, True, True]
    assert s.best_epoch == 7 and s.best_loss == 0.91
    # bad epochs from epoch 2 on; patience 2 is reached at epoch 3 but min_epochs is 5
    assert s.stopped and s.bad_epochs == 6
    s2 = EarlyStopping(patience=2, min_delta=0.1, min_epochs=5)
    for e, l in enumerate(losses[:4], start=1):
        s2.update(e, l)
    assert not s2.stopped
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


def test_a_truncated_checkpoint_gives_one_line_on_resume(store, tmp_path, capsys):
    from nvfp4bench.cli import main
    config = _config(store, tmp_path)
    ckpt = results.checkpoint_paths(results.result_path(config))[0]
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"PK\x03\x04 truncated")
    argv = ["--arch", "cnn", "--scale", "tiny", "--recipe", "nvfp4_full", "--fold", "0",
            "--data", str(store), "--out", str(tmp_path), "--epochs", "1", "--resume",
            "--no-progress", "--no-diagnostics"]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert f"checkpoint {ckpt} is unreadable" in err and "delete it" in err
