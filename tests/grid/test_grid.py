"""The grid runner (nvfp4bench/grid*.py, locks.py): cell list, done-ness, lock files, resume,
parallel workers.

Most tests drive the scheduler with a fake resolver and a fake cell runner (fast, no torch);
``test_real_tiny_grid_killed_and_restarted`` runs `python -m nvfp4bench.grid` through the real
training CLI on a tiny synthetic store, kills it mid-run and restarts it.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from nvfp4bench.cell import Cell
from nvfp4bench.grid import cells as grid_cells
from nvfp4bench.grid import cli as grid
from nvfp4bench import locks
from nvfp4bench.grid import slurm
from nvfp4bench.grid import process as grid_process
from nvfp4bench.grid import workers as grid_workers
from nvfp4bench.grid.cells import Target, build_cells, resolve
from nvfp4bench.locks import try_claim
from nvfp4bench.grid.workers import run_grid
from nvfp4bench.results import is_complete, read_result, write_result
from tests.helpers import well_formed_result

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable


# ------------------------------------------------------------------------------ helpers

def fake_resolver(out: Path):
    """A resolver that needs no training CLI: result under ``out``, hash from the options."""
    def resolve(cell: Cell, forward) -> Target:
        name = f"fold{cell.fold}_seed{cell.seed}.json"
        result = out / cell.arch / cell.scale / cell.recipe / name
        digest = hashlib.sha256("-".join(forward).encode()).hexdigest()[:16]
        return Target(cell, (*cell.argv(), *forward), result, digest)
    return resolve


def fake_targets(tmp_path: Path, n_recipes=2, n_folds=2, forward=()):
    cells = build_cells(["cnn"], ["tiny"], ["baseline", "nvfp4_full", "fwd_only", "2d_rht"][:n_recipes],
                        list(range(n_folds)), [2026])
    resolve = fake_resolver(tmp_path / "out")
    return [resolve(c, list(forward)) for c in cells]


class FakeRunner:
    """Writes a complete result (or a failed one for the labels in ``fail``); records calls."""

    def __init__(self, fail=()):
        self.calls: list[tuple[str, bool]] = []
        self.fail = set(fail)

    def __call__(self, target: Target, *, env: dict, resume: bool) -> int:
        self.calls.append((target.cell.label, resume))
        assert target.lock.exists(), "a cell must run while its lock is held"
        status = "failed" if target.cell.label in self.fail else "complete"
        c = target.cell
        write_result(target.result, well_formed_result(
            status, target.config_hash, arch=c.arch, scale=c.scale, recipe=c.recipe, fold=c.fold,
            seed=c.seed))
        return 0 if status == "complete" else 1


def grid_cmd(*args) -> list[str]:
    return [PY, "-m", "nvfp4bench.grid", *args]


def child_env() -> dict:
    env = dict(os.environ)
    pp = env.get("PYTHONPATH")
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + pp if pp else "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


# ------------------------------------------------------------------------------ the cell list

def test_dry_run_lists_the_360_cells_of_the_study(tmp_path, capsys):
    assert grid.main(["--dry-run", "--out", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == "360 cells"
    cells = [ln for ln in lines if ln.startswith("pending")]
    assert len(cells) == 360 == len(set(cells))
    assert sum("fold4 seed2026" in ln for ln in cells) == 72  # 3 archs x 3 scales x 8 recipes


def test_dry_run_narrowed_and_seeds(tmp_path, capsys):
    args = ["--dry-run", "--archs", "cnn,swin", "--scales", "tiny", "--recipes", "baseline,2d_rht_sr",
            "--folds", "0,1", "--seeds", "2026,2027", "--out", str(tmp_path), "--epochs", "1"]
    assert grid.main(args) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == "16 cells"
    assert {ln.split()[1] for ln in lines if ln.startswith("pending")} == {"cnn", "swin"}


@pytest.mark.parametrize("preset, n, archs, scales, recipe_ids, seeds, split", [
    ("holdout", 96, {"cnn", "vit", "vit_adamax", "swin"}, {"tiny", "small", "base"},
     set(range(8)), {2026}, "holdout"),
    ("multiseed", 480, {"cnn", "swin"}, {"tiny", "small", "base"}, set(range(8)),
     set(range(2026, 2036)), "holdout"),
    ("cv", 20, {"cnn", "swin"}, {"small"}, {0, 5}, {2026}, "kfold"),
])
def test_presets_are_the_studys_run_matrices(tmp_path, capsys, preset, n, archs, scales,
                                             recipe_ids, seeds, split):
    from nvfp4bench.quant.recipes import RECIPES
    ns, forward = grid.split_argv(["--preset", preset, "--out", str(tmp_path)])
    targets = grid.plan(ns, forward)
    cells = [t.cell for t in targets]
    assert len(cells) == len(set(cells)) == n
    assert {c.arch for c in cells} == archs and {c.scale for c in cells} == scales
    assert {RECIPES[c.recipe].study_id for c in cells} == recipe_ids
    assert {c.seed for c in cells} == seeds
    assert {t.config.split for t in targets} == {split}
    assert {c.fold for c in cells} == ({0} if split == "holdout" else set(range(5)))
    if split == "holdout":
        assert all(t.result.name == f"holdout_seed{t.cell.seed}.json" for t in targets)
        assert all(t.cell.label.endswith(f"/holdout/seed{t.cell.seed}") for t in targets)
    assert grid.main(["--dry-run", "--preset", preset, "--out", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"{n} cells"


def test_a_cell_made_before_the_protocol_version_is_outdated_not_complete(tmp_path, capsys):
    """A complete result whose config hash was made as before PROTOCOL_VERSION entered the hash
    (the same options, computed the old way) shows as outdated in --dry-run, and is not done."""
    import hashlib
    import json

    from nvfp4bench.config import NON_RESULT_FIELDS
    from nvfp4bench.results import data_identity
    args = ["--archs", "cnn", "--scales", "tiny", "--recipes", "baseline", "--folds", "0",
            "--out", str(tmp_path)]
    ns, forward = grid.split_argv(args)
    (target,) = grid.plan(ns, forward)
    old = {k: v for k, v in target.config.resolved().to_dict().items()
           if k not in NON_RESULT_FIELDS}
    old["data"] = data_identity(target.config.data)
    old_hash = hashlib.sha256(json.dumps(old, sort_keys=True, separators=(",", ":"))
                              .encode()).hexdigest()[:16]
    assert old_hash != target.config_hash
    write_result(target.result, well_formed_result("complete", old_hash))
    assert not grid_cells.is_done(target) and grid_cells.cell_state(target) == "outdated"
    assert grid.main(["--dry-run", *args]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("outdated") and "# 1 outdated" in out


def test_a_preset_is_narrowed_by_explicit_options_and_holdout_has_one_fold(tmp_path, capsys):
    ns, _ = grid.split_argv(["--preset", "multiseed", "--seeds", "2030", "--scales", "tiny"])
    assert len(build_cells(ns.archs, ns.scales, ns.recipes, ns.folds, ns.seeds)) == 16
    with pytest.raises(SystemExit) as e:
        grid.main(["--dry-run", "--split", "holdout", "--folds", "0,1", "--out", str(tmp_path)])
    assert e.value.code == 2 and "one partition" in capsys.readouterr().err


def test_build_cells_is_the_full_product_without_repeats():
    cells = build_cells(["cnn", "vit"], ["tiny", "base"], ["baseline", "sr_only", "fwd_rht"], [0, 3],
                        [1, 2])
    assert len(cells) == len(set(cells)) == 2 * 2 * 3 * 2 * 2
    assert cells[0].scale == "tiny" and cells[-1].scale == "base"  # cheapest first (per seed)


def test_formats_add_one_cell_per_quantized_recipe_cell_and_share_the_baseline(tmp_path, capsys):
    args = ["--dry-run", "--archs", "cnn", "--scales", "tiny", "--folds", "0", "--out",
            str(tmp_path)]
    assert grid.main(args) == 0
    study = capsys.readouterr().out.splitlines()[-1]
    assert grid.main([*args, "--formats", "nvfp4,mxfp4,nvfp4_4over6"]) == 0
    out = capsys.readouterr().out
    assert study == "8 cells" and out.splitlines()[-1] == "22 cells"  # 8 + 7 quantized x 2
    assert "/2d_rht_sr@mxfp4/fold0_seed2026.json" in out and "baseline@" not in out
    assert "2d_rht_sr@nvfp4_4over6" in out and "/2d_rht_sr/fold0_seed2026.json" in out


@pytest.mark.parametrize("args, message", [
    (["--archs", "cnn,resnet"], "unknown arch resnet"),
    (["--folds", "0,7"], "unknown fold 7"),
    (["--recipes", "baseline,baseline"], "repeated"),
    (["--arch", "cnn"], "--arch selects cells; use --archs"),
    (["--", "--format", "mxfp4"], "--format selects cells; use --formats"),
    (["--formats", "nvfp4,fp3"], "unknown format fp3"),
    (["--", "--fold", "1"], "--fold selects cells; use --folds"),
    (["--", "--split", "holdout"], "--split is the grid's own option"),
    (["--resume"], "the grid resumes interrupted cells itself"),
    (["--jobs", "0"], "argument --jobs: must be an integer from 1 to 256"),
    (["--slurm", "--gpus", "0,1"], "--gpus-per-task 1"),
    (["--partition", "gpu"], "--partition only apply with --slurm"),
    (["--epochs", "0"], "--epochs"),  # forwarded, refused by the cell CLI
])
def test_bad_options_exit_2_with_a_message(args, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        grid.main(["--dry-run", "--out", str(tmp_path), *args])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_forwarded_options_reach_the_cell_and_its_hash(tmp_path):
    ns, forward = grid.split_argv(["--archs", "cnn", "--epochs", "3", "--", "--lr", "0.01"])
    assert forward == ["--epochs", "3", "--lr", "0.01"]
    a = resolve(Cell("cnn", "tiny", "baseline", 0, 2026), forward + ["--out", str(tmp_path)])
    b = resolve(Cell("cnn", "tiny", "baseline", 0, 2026), ["--out", str(tmp_path)])
    assert a.argv[-6:] == ("--epochs", "3", "--lr", "0.01", "--out", str(tmp_path))
    assert a.result == b.result and a.config_hash != b.config_hash
    assert a.result.name == "fold0_seed2026.json" and a.lock.name == "fold0_seed2026.lock"
    assert a.log.name == "fold0_seed2026.log"


# ------------------------------------------------------------------------------ lock files

def _write_lock(path: Path, pid: int, host: str, age_s: float = 0.0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"pid": pid, "host": host, "token": "x", "started": "then"}))
    t = time.time() - age_s
    os.utime(path, (t, t))


def _dead_pid() -> int:
    p = subprocess.Popen([PY, "-c", "pass"])
    p.wait()
    return p.pid


def test_claim_is_exclusive_until_released(tmp_path):
    path = tmp_path / "c.lock"
    lock = try_claim(path)
    assert lock is not None and try_claim(path) is None
    info = json.loads(path.read_text())
    assert (info["pid"], info["host"]) == (os.getpid(), locks.HOST) and info["started"]
    lock.release()
    assert not path.exists()
    again = try_claim(path)
    assert again is not None
    lock.release()  # an old holder's release leaves the new holder's lock alone
    assert path.exists()


def test_lock_of_a_dead_pid_on_this_host_is_broken(tmp_path):
    path = tmp_path / "c.lock"
    _write_lock(path, _dead_pid(), locks.HOST)
    assert locks.lock_is_stale(path)[0]
    lock = try_claim(path)
    assert lock is not None and json.loads(path.read_text())["pid"] == os.getpid()


def test_live_lock_is_kept_and_old_heartbeat_is_broken(tmp_path):
    sleeper = subprocess.Popen([PY, "-c", "import time; time.sleep(60)"])
    try:
        live = tmp_path / "live.lock"
        _write_lock(live, sleeper.pid, locks.HOST)
        assert try_claim(live, stale_after=600) is None
        other = tmp_path / "other.lock"  # another host: only the heartbeat age can tell
        _write_lock(other, 1, "some-other-host", age_s=10)
        assert try_claim(other, stale_after=600) is None
        os.utime(other, (time.time() - 700, time.time() - 700))
        assert try_claim(other, stale_after=600) is not None
        _write_lock(live, sleeper.pid, locks.HOST, age_s=700)  # alive but silent: stale too
        assert try_claim(live, stale_after=600) is not None
    finally:
        sleeper.kill()
        sleeper.wait()


def test_half_written_lock_is_kept_briefly_then_broken(tmp_path):
    path = tmp_path / "c.lock"
    path.write_bytes(b"")
    assert try_claim(path) is None
    t = time.time() - locks.UNREADABLE_GRACE_S - 5
    os.utime(path, (t, t))
    assert try_claim(path) is not None


def test_breaking_leaves_a_lock_that_changed_since_it_was_judged(tmp_path):
    path = tmp_path / "c.lock"
    _write_lock(path, _dead_pid(), locks.HOST)
    seen = path.read_bytes()
    fresh = try_claim(tmp_path / "x.lock")  # stands for a worker that re-claimed meanwhile
    path.write_bytes((tmp_path / "x.lock").read_bytes())
    locks._break_stale(path, seen, "test")
    assert path.exists() and not path.with_name("c.lock.break").exists()
    locks._break_stale(path, path.read_bytes(), "test")  # the bytes judged: removed
    assert not path.exists()
    fresh.release()


def test_heartbeat_refreshes_held_locks(tmp_path):
    lock = try_claim(tmp_path / "c.lock")
    old = time.time() - 1000
    os.utime(lock.path, (old, old))
    beat = locks.Heartbeat(interval=0.05)
    beat.add(lock)
    deadline = time.time() + 10
    while lock.path.stat().st_mtime < old + 500 and time.time() < deadline:
        time.sleep(0.05)
    beat.stop()
    assert lock.path.stat().st_mtime > old + 500


# ------------------------------------------------------------------------------ scheduling

def test_grid_skips_done_cells_and_retries_failed_ones(tmp_path):
    targets = fake_targets(tmp_path)
    labels = [t.cell.label for t in targets]
    runner = FakeRunner(fail={labels[1]})
    s = run_grid(targets, [{}], runner=runner)
    assert (s.ran, s.already, s.failed) == (3, 0, [labels[1]])
    assert read_result(targets[1].result)["status"] == "failed"
    runner2 = FakeRunner()
    s2 = run_grid(targets, [{}, {}], runner=runner2)
    assert [c for c, _ in runner2.calls] == [labels[1]]
    assert (s2.ran, s2.already, s2.failed) == (1, 3, [])
    assert all(is_complete(t.result, t.config_hash) for t in targets)
    assert not any(t.lock.exists() for t in targets)


def test_a_changed_config_hash_reruns_the_cell(tmp_path):
    targets = fake_targets(tmp_path, n_recipes=1, n_folds=1)
    run_grid(targets, [{}], runner=FakeRunner())
    changed = fake_targets(tmp_path, n_recipes=1, n_folds=1, forward=["--epochs", "2"])
    runner = FakeRunner()
    run_grid(changed, [{}], runner=runner)
    assert len(runner.calls) == 1
    assert read_result(changed[0].result)["config_hash"] == changed[0].config_hash


def test_interrupted_cell_resumes_only_from_its_own_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setattr(grid_workers, "can_resume", lambda t: t.checkpoint.exists())
    targets = fake_targets(tmp_path, n_recipes=1, n_folds=2)
    targets[0].checkpoint.parent.mkdir(parents=True)
    targets[0].checkpoint.write_bytes(b"state")
    runner = FakeRunner()
    run_grid(targets, [{}], runner=runner)
    assert dict(runner.calls) == {targets[0].cell.label: True, targets[1].cell.label: False}


def test_can_resume_checks_the_checkpoints_config_hash(tmp_path):
    torch = pytest.importorskip("torch")
    t = fake_targets(tmp_path, n_recipes=1, n_folds=1)[0]
    assert not grid_cells.can_resume(t)
    t.checkpoint.parent.mkdir(parents=True)
    torch.save({"config_hash": t.config_hash, "epoch": 3}, t.checkpoint)
    assert grid_cells.can_resume(t)
    torch.save({"config_hash": "another", "epoch": 3}, t.checkpoint)
    assert not grid_cells.can_resume(t)
    t.checkpoint.write_bytes(b"garbage")
    assert not grid_cells.can_resume(t)


def test_cells_held_elsewhere_are_waited_for_then_taken_over(tmp_path):
    targets = fake_targets(tmp_path, n_recipes=1, n_folds=2)
    held = targets[0]
    _write_lock(held.lock, 1, "another-host", age_s=0)
    s = run_grid(targets, [{}], runner=FakeRunner(), wait=False)
    assert s.held == [held.cell.label] and s.ran == 1
    os.utime(held.lock, (time.time() - 100, time.time() - 100))  # its heartbeat stops
    runner = FakeRunner()
    s = run_grid(targets, [{}], runner=runner, stale_after=50, poll_s=0.05)
    assert runner.calls == [(held.cell.label, False)] and s.held == []


def test_worker_environments_pin_one_gpu_each():
    envs = grid_workers.worker_envs(["0", "3"], 2, base={"PATH": "/bin"})
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["0", "0", "3", "3"]
    assert all(str(grid_process.PACKAGE_PARENT) in e["PYTHONPATH"] for e in envs)
    assert all(e["OMP_NUM_THREADS"] == str(max(1, (os.cpu_count() or 1) // 4)) for e in envs)
    solo = grid_workers.worker_envs(None, 1, base={"PATH": "/bin"})
    assert len(solo) == 1 and "CUDA_VISIBLE_DEVICES" not in solo[0]


CONCURRENT_WORKER = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    sys.path.insert(0, sys.argv[1])
    from tests.grid.test_grid import fake_targets, FakeRunner
    from nvfp4bench.grid import workers as grid_workers
    tmp, record = Path(sys.argv[2]), Path(sys.argv[3])
    first = []

    class Runner(FakeRunner):
        def __call__(self, target, *, env, resume):
            with open(record, "a") as f:
                f.write(f"{target.cell.label} {os.getpid()}\\n")
            if not first:  # hold the first cell until the other worker has claimed one too
                first.append(1)
                (tmp / f"started-{os.getpid()}").touch()
                deadline = time.time() + 60
                while len(list(tmp.glob("started-*"))) < 2 and time.time() < deadline:
                    time.sleep(0.02)
            return super().__call__(target, env=env, resume=resume)

    s = grid_workers.run_grid(fake_targets(tmp, n_recipes=4, n_folds=2), [{}], runner=Runner(),
                              poll_s=0.1)
    sys.exit(0 if not s.failed and not s.held else 1)
""")


def test_two_concurrent_grid_processes_split_the_cells_without_overlap(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(CONCURRENT_WORKER)
    record = tmp_path / "record.txt"
    procs = [subprocess.Popen([PY, str(script), str(ROOT), str(tmp_path), str(record)],
                              env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    runs = [ln.split() for ln in record.read_text().splitlines()]
    labels = [label for label, _ in runs]
    assert len(labels) == len(set(labels)) == 8  # every cell once, none twice
    assert len({pid for _, pid in runs}) == 2  # both workers ran cells
    targets = fake_targets(tmp_path, n_recipes=4, n_folds=2)
    assert all(is_complete(t.result, t.config_hash) for t in targets)
    assert not list((tmp_path / "out").rglob("*.lock"))


SIGTERM_WORKER = textwrap.dedent("""
    import signal, subprocess, sys, time
    from pathlib import Path
    sys.path.insert(0, sys.argv[1])
    from nvfp4bench.grid import cli as grid, process as grid_process, workers as grid_workers
    from tests.grid.test_grid import fake_targets
    tmp = Path(sys.argv[2])

    def runner(target, *, env, resume):  # a long cell, registered like the real runner's
        p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        grid_process.PROCESSES.add(p)
        (tmp / "child.pid").write_text(str(p.pid))
        try:
            return p.wait()
        finally:
            grid_process.PROCESSES.discard(p)
            # A worker slow to wind down after its cell died (writing a log, say): this widens
            # the window in which an exiting main thread would lose the worker's lock, so the
            # race fails every time instead of now and then.
            time.sleep(float(sys.argv[3]))

    signal.signal(signal.SIGTERM, grid._raise_interrupt)
    # Ctrl-C as a terminal's foreground job gets it: Python's own handler, also where this test
    # runs as a background job, whose shell started it with SIGINT ignored (inherited here).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        grid_workers.run_grid(fake_targets(tmp), [{}], runner=runner)
    except KeyboardInterrupt:
        sys.exit(130)
""")


@pytest.mark.parametrize("sig,wind_down", [(signal.SIGTERM, 0.0), (signal.SIGTERM, 1.0),
                                            (signal.SIGINT, 1.0)])
def test_sigterm_stops_the_running_cell_and_releases_its_lock(tmp_path, sig, wind_down):
    script = tmp_path / "worker.py"
    script.write_text(SIGTERM_WORKER)
    p = subprocess.Popen([PY, str(script), str(ROOT), str(tmp_path), str(wind_down)],
                         env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True)
    pid_file = tmp_path / "child.pid"
    _wait_for(lambda: pid_file.exists() and pid_file.read_text(), 60, "the cell to start", p)
    child = int(pid_file.read_text())
    p.send_signal(sig)
    out = p.communicate(timeout=60)[0]
    assert p.returncode == 130, out
    assert "interrupted" in out
    status = Path(f"/proc/{child}/status")
    assert not status.exists() or "zombie" in status.read_text()
    assert not list((tmp_path / "out").rglob("*.lock"))
    assert not list((tmp_path / "out").rglob("*.json"))  # nothing counted as done


def test_report_runs_at_the_end_when_it_exists(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(grid.subprocess, "call", lambda cmd, **kw: calls.append(cmd) or 0)
    grid._run_report(tmp_path)
    assert calls == [[sys.executable, "-m", "nvfp4bench.report", str(tmp_path), "--eval-set",
                      "test"]]


def test_eval_set_goes_to_the_final_report_only(tmp_path, monkeypatch):
    """--eval-set val is the report's: never forwarded to a cell, never in a config hash."""
    base = ["--archs", "cnn", "--scales", "tiny", "--recipes", "baseline", "--folds", "0",
            "--out", str(tmp_path)]
    ns, forward = grid.split_argv([*base, "--eval-set", "val"])
    assert ns.eval_set == "val" and "--eval-set" not in forward and "val" not in forward
    plain_ns, plain_forward = grid.split_argv(base)
    assert plain_ns.eval_set == "test"
    (with_val,), (plain,) = grid.plan(ns, forward), grid.plan(plain_ns, plain_forward)
    assert with_val.argv == plain.argv and with_val.config_hash == plain.config_hash
    calls = []
    monkeypatch.setattr(grid.subprocess, "call", lambda cmd, **kw: calls.append(cmd) or 0)
    monkeypatch.setattr(grid, "run_grid", lambda *a, **k: grid_workers.Summary(total=1, already=1))
    assert grid.main([*base, "--eval-set", "val"]) == 0
    assert calls and calls[-1][-2:] == ["--eval-set", "val"]


# ------------------------------------------------------------------------------ Slurm pieces

def test_cell_list_round_trip_and_array_script(tmp_path):
    targets = fake_targets(tmp_path, forward=["--epochs", "1"])
    cells = slurm.write_cell_list(tmp_path / "cells.jsonl", targets)
    entry = slurm.read_cell(cells, 3)
    assert Cell(**entry["cell"]) == targets[3].cell and entry["forward"] == ["--epochs", "1"]
    with pytest.raises(ValueError, match="out of range"):
        slurm.read_cell(cells, 4)
    opts = slurm.SlurmOptions(partition="gpu", time="01:00:00", gpus_per_task=1, max_running=2,
                             extra=("--mem=8G",))
    script = slurm.sbatch_script(cells, 4, tmp_path, opts, tmp_path)
    for line in ("#SBATCH --array=0-3%2", "#SBATCH --partition=gpu", "#SBATCH --time=01:00:00",
                 "#SBATCH --gpus-per-task=1", "#SBATCH --mem=8G",
                 f"#SBATCH --output={tmp_path}/%A_%a.out"):
        assert line in script.splitlines()
    assert f"-m nvfp4bench.grid --slurm-task {cells}" in script


def test_slurm_task_runs_its_line_once(tmp_path):
    targets = fake_targets(tmp_path)
    cells = slurm.write_cell_list(tmp_path / "cells.jsonl", targets)
    runner = FakeRunner()
    resolver = fake_resolver(tmp_path / "out")
    assert slurm.slurm_task(cells, 2, runner=runner, resolver=resolver) == 0
    assert runner.calls == [(targets[2].cell.label, False)]
    assert slurm.slurm_task(cells, 2, runner=runner, resolver=resolver) == 0  # done: not rerun
    assert len(runner.calls) == 1
    failing = FakeRunner(fail={targets[0].cell.label})
    assert slurm.slurm_task(cells, 0, runner=failing, resolver=resolver) == 1
    assert not targets[0].lock.exists()


def test_slurm_task_waits_for_a_cell_held_elsewhere(tmp_path):
    targets = fake_targets(tmp_path)
    cells = slurm.write_cell_list(tmp_path / "cells.jsonl", targets)
    resolver = fake_resolver(tmp_path / "out")
    _write_lock(targets[1].lock, 1, "another-host")  # its heartbeat stops: stale after 0.5 s
    runner = FakeRunner()
    assert slurm.slurm_task(cells, 1, runner=runner, resolver=resolver, stale_after=0.5,
                           poll_s=0.05) == 0
    assert runner.calls == [(targets[1].cell.label, False)]
    _write_lock(targets[2].lock, 1, "another-host")  # the holder completes it meanwhile
    threading.Timer(0.3, lambda: write_result(
        targets[2].result, well_formed_result("complete", targets[2].config_hash))).start()
    assert slurm.slurm_task(cells, 2, runner=runner, resolver=resolver, stale_after=600,
                           poll_s=0.05) == 0
    assert len(runner.calls) == 1


INPROCESS = textwrap.dedent("""
    import os, sys
    from pathlib import Path
    sys.path.insert(0, sys.argv[1])
    from nvfp4bench.grid import process as grid_process
    from tests.grid.test_grid import fake_targets

    def fake_main(argv):
        print("cell stdout", *[a for a in argv if a == "--resume"])
        print("cell stderr", file=sys.stderr)
        os.write(1, b"cell fd 1\\n")
        if "--epochs" in argv:
            raise SystemExit(2)
        return 3

    grid_process.cell_main = fake_main
    t = fake_targets(Path(sys.argv[2]), n_recipes=1, n_folds=1)[0]
    rc = grid_process.run_cell_inprocess(t, resume=True)
    print("task stdout after", rc)
    t2 = fake_targets(Path(sys.argv[2]), n_recipes=1, n_folds=1, forward=["--epochs", "1"])[0]
    print("second", grid_process.run_cell_inprocess(t2, resume=False))
""")


def test_inprocess_runner_sends_the_cells_output_to_its_log(tmp_path):
    script = tmp_path / "task.py"
    script.write_text(INPROCESS)
    r = subprocess.run([PY, str(script), str(ROOT), str(tmp_path)], env=child_env(),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["task stdout after 3", "second 2"]
    log = fake_targets(tmp_path, n_recipes=1, n_folds=1)[0].log.read_text()
    for text in ("==== python -m nvfp4bench --arch cnn", "cell stdout --resume", "cell stderr",
                 "cell fd 1", "==== exit code 3", "==== exit code 2"):
        assert text in log
    assert "cell" not in r.stdout + r.stderr


def test_submit_writes_the_cell_list_and_prints_how_to_follow(tmp_path, capsys):
    sbatch = tmp_path / "sbatch"
    sbatch.write_text("#!/bin/sh\necho \"$@\" > \"$(dirname \"$0\")/sbatch.args\"\necho 4242\n")
    sbatch.chmod(0o755)
    targets = fake_targets(tmp_path)
    job = slurm.submit_slurm(targets, tmp_path / "out", slurm.SlurmOptions(), sbatch=str(sbatch))
    assert job == "4242"
    out = capsys.readouterr().out
    assert "squeue -j 4242" in out and "scancel 4242" in out
    args = (tmp_path / "sbatch.args").read_text().split()
    job_sh = Path(args[-1])
    assert args[0] == "--parsable" and job_sh.name == "job.sh"
    assert len((job_sh.parent / "cells.jsonl").read_text().splitlines()) == 4
    assert (job_sh.parent / "job_id").read_text().strip() == "4242"


def test_submit_reports_sbatch_errors(tmp_path):
    sbatch = tmp_path / "sbatch"
    sbatch.write_text("#!/bin/sh\necho 'sbatch: error: invalid partition' >&2\nexit 1\n")
    sbatch.chmod(0o755)
    with pytest.raises(SystemExit, match="invalid partition"):
        slurm.submit_slurm(fake_targets(tmp_path), tmp_path / "out", slurm.SlurmOptions(),
                          sbatch=str(sbatch))


# ------------------------------------------------------------------------------ the real CLI

def _processes_mentioning(text: str) -> list[int]:
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                if text in (d / "cmdline").read_bytes().replace(b"\0", b" ").decode():
                    pids.append(int(d.name))
            except OSError:
                pass
    return pids


def _wait_for(predicate, timeout: float, what: str, proc=None) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the grid exited ({proc.returncode}) before {what}")
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory):
    from nvfp4bench.data import ensure_synthetic_store
    # 10 patients: the fewest that make 5 folds with a validation and a test patient each
    return ensure_synthetic_store(tmp_path_factory.mktemp("store") / "synthetic", patients=10,
                                  image_size=32, progress=False)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc and PDEATHSIG")
def test_real_tiny_grid_killed_and_restarted(tmp_path, tiny_store):
    out = tmp_path / "results"
    args = grid_cmd("--archs", "cnn", "--scales", "tiny", "--recipes", "baseline,nvfp4_full",
                    "--folds", "0,1", "--epochs", "1", "--image-size", "32", "--batch-size", "32",
                    "--jobs", "2",
                    "--data", str(tiny_store), "--out", str(out), "--no-progress",
                    "--no-diagnostics", "--no-report")

    def results():
        return sorted(out.rglob("fold*_seed*.json"))

    def n_complete():
        return sum((read_result(p) or {}).get("status") == "complete" for p in results())

    first = subprocess.Popen(args, env=child_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        _wait_for(lambda: n_complete() >= 1, 300, "the first complete cell", first)
        os.kill(first.pid, signal.SIGKILL)  # the grid only: its cells must die with it
    finally:
        first.kill()
        first.communicate()
    _wait_for(lambda: not _processes_mentioning(str(out)), 30, "the orphaned cells to die")
    # Nothing changes any more: these are the cells the kill left complete.
    done_before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in results()
                   if read_result(p)["status"] == "complete"}
    assert 1 <= len(done_before) < 4

    second = subprocess.run(args, env=child_env(), capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout + second.stderr
    assert f"4 cells: {len(done_before)} complete, {4 - len(done_before)} to run" in second.stdout
    assert "4/4 complete" in second.stdout
    paths = results()
    assert len(paths) == 4 and n_complete() == 4
    for p in paths:
        r = read_result(p)
        assert r["status"] == "complete" and r["config"]["epochs"] == 1
    for p, (mtime, body) in done_before.items():  # finished cells were not run again
        assert (p.stat().st_mtime_ns, p.read_bytes()) == (mtime, body)
    for p in paths:  # one run per finished cell; a killed cell ran again once, to completion
        log = p.with_name(p.name[:-len(".json")] + ".log").read_text()
        runs = log.count("==== python -m nvfp4bench ")
        assert runs == 1 if p in done_before else (runs <= 2 and log.rstrip().endswith(
            "==== exit code 0")), log
    assert not list(out.rglob("*.lock"))
    third = subprocess.run(args + ["--dry-run"], env=child_env(), capture_output=True, text=True)
    assert third.stdout.count("complete ") == 4 and third.stdout.strip().endswith("4 cells")

    # A cell killed after its last checkpoint but before its result: it resumes, not restarts.
    lost = paths[0]
    lost.unlink()
    fourth = subprocess.run(args, env=child_env(), capture_output=True, text=True, timeout=600)
    assert fourth.returncode == 0, fourth.stdout + fourth.stderr
    assert "4 cells: 3 complete, 1 to run" in fourth.stdout and "start (resume)" in fourth.stdout
    log = lost.with_name(lost.name[:-len(".json")] + ".log").read_text()
    last_run = log.split("==== python -m nvfp4bench ")[-1]
    assert last_run.splitlines()[0].endswith("--resume") and "==== exit code 0" in last_run
    assert read_result(lost)["status"] == "complete"
    assert read_result(lost)["timing"]["resumed_from_epoch"] == 1


def test_a_data_directory_that_is_not_a_store_is_a_clear_error(tmp_path, capsys):
    from nvfp4bench.grid.cli import main
    assert main(["--dry-run", "--data", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert "missing" in err and "Traceback" not in err


def test_cell_logs_get_no_progress_bars_and_headers_on_their_own_line(tmp_path):
    (target,) = fake_targets(tmp_path)[:1]
    assert grid_process._cell_argv(target, resume=True)[-2:] == ["--resume", "--no-progress"]
    target.log.parent.mkdir(parents=True, exist_ok=True)
    assert grid_process._log_header(target.log, ["x"], {}).startswith(b"==== ")  # no log yet
    target.log.write_bytes(b"epoch 1/40: loss 0.3\nepoch 2/4")  # killed mid-line
    assert grid_process._log_header(target.log, ["x"], {}).startswith(b"\n==== ")
    target.log.write_bytes(b"epoch 1/40: loss 0.3\n")
    assert grid_process._log_header(target.log, ["x"], {}).startswith(b"==== ")
