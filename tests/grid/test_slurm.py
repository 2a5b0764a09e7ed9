"""The grid on Slurm, for real: a throwaway single-node cluster (tests/grid/slurm/start_cluster.sh).

Opt-in, because it installs Debian packages as root (apt-get slurmctld slurmd slurm-client
munge) and starts daemons: it runs when NVFP4BENCH_SLURM_TEST=1 or CI=true, and skips otherwise.
It also skips, with the script's reason, where the machine cannot run the daemons (not root, no
apt-get, a daemon that does not start). The daemons are stopped by PID at the end.

Three submissions of a tiny grid (CNN tiny, 2 recipes, 32 px, 1 epoch, 10 synthetic patients):
  1. 4 cells -> 4 complete results, a per-cell log beside each;
  2. the grid widened to 6 cells submits only the 2 missing ones; it runs one task at a time
     (--max-running 1) and is cancelled once its first cell is complete;
  3. a third submission holds exactly the cell still missing, and finishes it.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from nvfp4bench.results import read_result

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ROOT / "tests" / "grid" / "slurm"
OPT_IN = (os.environ.get("NVFP4BENCH_SLURM_TEST") == "1"
          or os.environ.get("CI", "").lower() == "true")

pytestmark = [
    pytest.mark.skipif(not OPT_IN, reason="the Slurm test installs packages as root and starts "
                       "daemons: set NVFP4BENCH_SLURM_TEST=1 (or CI=true) to run it"),
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Slurm daemons need Linux"),
]


@pytest.fixture(scope="module")
def cluster():
    """(environment with SLURM_CONF, cluster dir) of a running single-node cluster."""
    d = tempfile.mkdtemp(prefix="nvfp4-slurm-")  # short: the munge socket path must fit 108 bytes
    try:
        r = subprocess.run(["bash", str(SCRIPTS / "start_cluster.sh"), d], capture_output=True,
                           text=True, timeout=240)
        if r.returncode == 77:
            reason = [ln for ln in r.stderr.splitlines() if ln.startswith("SKIP: ")]
            pytest.skip(reason[-1][6:] if reason else r.stderr.strip())
        assert r.returncode == 0, f"start_cluster.sh failed:\n{r.stdout}\n{r.stderr}"
        env = dict(os.environ, SLURM_CONF=f"{d}/slurm.conf", OMP_NUM_THREADS="1",
                   PYTHON=sys.executable)  # run_all.sh and the array tasks use this Python
        env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"]
                                         if env.get("PYTHONPATH") else "")
        yield env, Path(d)
    finally:
        subprocess.run(["bash", str(SCRIPTS / "stop_cluster.sh"), d], timeout=60)
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory):
    from nvfp4bench.data import ensure_synthetic_store
    return ensure_synthetic_store(tmp_path_factory.mktemp("store") / "synthetic", patients=10,
                                  image_size=32, progress=False)


def _submit(env, args) -> tuple[str, int, Path]:
    """(job id, cells submitted, the job's directory) of `run_all.sh --slurm ARGS`."""
    r = subprocess.run(["bash", str(ROOT / "run_all.sh"), "--slurm", *args], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    m = re.search(r"submitted (\d+) cells as Slurm job array (\d+)", r.stdout)
    assert m, r.stdout
    cells = re.search(r"cell list:\s+(\S+)", r.stdout).group(1)
    return m.group(2), int(m.group(1)), Path(cells).parent


def _queued(env, job: str) -> bool:
    r = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], env=env, capture_output=True,
                       text=True)
    return r.returncode == 0 and bool(r.stdout.strip())


def _wait(predicate, timeout: float, what: str, dump=None) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}" + (f"\n{dump()}" if dump else ""))
        time.sleep(0.25)


def _complete(out: Path) -> list[Path]:
    return sorted(p for p in out.rglob("fold*_seed*.json")
                  if (read_result(p) or {}).get("status") == "complete")


def _dump(jobdir_parent: Path):
    def dump() -> str:
        return "\n".join(f"--- {p}\n{p.read_text()[-2000:]}"
                         for p in sorted(jobdir_parent.rglob("*.out")) + sorted(
                             jobdir_parent.parent.rglob("*.log")))
    return dump


def test_grid_as_slurm_job_arrays(cluster, tiny_store, tmp_path):
    env, _ = cluster
    out = tmp_path / "results"
    grid = ["--archs", "cnn", "--scales", "tiny", "--recipes", "baseline,nvfp4_full",
            "--epochs", "1", "--image-size", "32", "--batch-size", "32", "--data", str(tiny_store),
            "--out", str(out), "--no-progress", "--no-diagnostics"]
    dump = _dump(out / "slurm")

    # 1. four cells, one array task each
    job, n, jobdir = _submit(env, grid + ["--folds", "0,1"])
    assert n == 4 and len((jobdir / "cells.jsonl").read_text().splitlines()) == 4
    _wait(lambda: not _queued(env, job), 100, f"job {job}", dump)
    done = _complete(out)
    assert len(done) == 4, dump()
    for p in done:
        log = p.with_name(p.name[:-len(".json")] + ".log")
        assert "==== exit code 0" in log.read_text()
    assert len(list(jobdir.glob(f"{job}_*.out"))) == 4

    # 2. widened to 6 cells: only the 2 missing are submitted, one task at a time; cancelled
    #    once the first of them is complete
    job2, n2, _ = _submit(env, grid + ["--folds", "0,1,2", "--max-running", "1"])
    assert n2 == 2
    _wait(lambda: len(_complete(out)) >= 5, 100, f"a cell of job {job2}", dump)
    subprocess.run(["scancel", job2], env=env, check=True)
    _wait(lambda: not _queued(env, job2), 60, f"job {job2} to leave the queue", dump)
    partial = len(_complete(out))
    assert partial == 5, dump()

    # 3. resubmitted: exactly the cell still missing, and it finishes
    job3, n3, _ = _submit(env, grid + ["--folds", "0,1,2"])
    assert n3 == 1
    _wait(lambda: not _queued(env, job3), 100, f"job {job3}", dump)
    assert len(_complete(out)) == 6, dump()
    assert not list(out.rglob("*.lock"))
    r = subprocess.run(["bash", str(ROOT / "run_all.sh"), "--slurm", *grid, "--folds", "0,1,2"],
                       env=env, capture_output=True, text=True)
    assert r.returncode == 0 and "nothing to submit: all 6 cells are complete" in r.stdout
