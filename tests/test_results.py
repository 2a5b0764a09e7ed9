"""Result identity: two stores never share a result path; another store's result is never
replaced; the embedded store keeps ``synthetic``; one atomic write."""
import json
import os

import numpy as np
import pytest

from nvfp4bench import atomic, results
from nvfp4bench.cell import Cell
from nvfp4bench.config import RunConfig
from nvfp4bench.data import DEFAULT_DATA_DIR, SliceStore
from nvfp4bench.data.preprocess import CaseSlices
from nvfp4bench.data.store import StoreWriter


def _store(path, name, seed):
    rng = np.random.default_rng(seed)
    case = CaseSlices("p0", rng.integers(0, 255, (2, 1, 8, 8), dtype=np.uint8),
                      rng.integers(0, 2, (2, 8, 8), dtype=np.uint8), np.arange(2, dtype=np.int32),
                      5, None, 2, (8, 8), None)
    with StoreWriter(path, image_size=8, modalities=("t1",)) as w:
        w.add(case)
        w.finalize({"name": name, "synthetic": False})
    return path


def _config(data, out, **kw):
    return RunConfig(arch="cnn", scale="tiny", recipe="bf16", fold=0, data=str(data),
                     out=str(out), **kw)


def test_two_stores_with_one_name_never_share_a_result_path(tmp_path):
    # the README's examples: data/brats2021 and data/brats2023 are both named "brats"
    a = _store(tmp_path / "data" / "brats2021", "brats", seed=1)
    b = _store(tmp_path / "data" / "brats2023", "brats", seed=2)
    pa, pb = results.result_path(_config(a, tmp_path)), results.result_path(_config(b, tmp_path))
    assert pa != pb
    fa, fb = SliceStore(a).fingerprint, SliceStore(b).fingerprint
    assert pa == tmp_path / f"brats-{fa[:8]}" / "cnn" / "tiny" / "bf16" / "fold0_seed2026.json"
    assert pb.parts[-5] == f"brats-{fb[:8]}"
    # the same store moved keeps its path (content, not location); a name is made path-safe
    os.rename(a, tmp_path / "moved")
    assert results.result_path(_config(tmp_path / "moved", tmp_path)) == pa
    c = _store(tmp_path / "odd", "../../etc", seed=3)
    assert results.dataset_dir(str(c)).startswith("_.._etc-")


def test_the_embedded_store_keeps_a_stable_path(tmp_path):
    config = RunConfig(arch="cnn", scale="tiny", recipe="bf16", fold=0, out=str(tmp_path))
    assert results.result_path(config).parts[-5] == "synthetic"
    if (DEFAULT_DATA_DIR / "index.json").exists():  # also when given by its path
        assert results.dataset_dir(str(DEFAULT_DATA_DIR)) == "synthetic"


def test_a_result_of_another_store_is_never_replaced(tmp_path):
    p = tmp_path / "r.json"
    results.check_same_store(p, "a" * 32)  # nothing there: fine
    results.write_result(p, {"status": "complete", "data": {"fingerprint": "a" * 32}})
    results.check_same_store(p, "a" * 32)  # the same store: fine (a rerun replaces it)
    with pytest.raises(ValueError, match="another data store") as e:
        results.check_same_store(p, "b" * 32)
    assert str(p) in str(e.value) and "\n" not in str(e.value)


def test_cell_names_its_files():
    cell = Cell("vit", "small", "2d_rht_sr", 3, 7)
    assert cell.stem == "fold3_seed7" and cell.label == "vit/small/2d_rht_sr/fold3/seed7"
    assert Cell.of(RunConfig(arch="vit", scale="small", recipe="2d_rht_sr", fold=3, seed=7)) == cell
    p = results.result_path(RunConfig(arch="vit", scale="small", recipe="2d_rht_sr", fold=3,
                                      seed=7, out="o"))
    assert [results.sibling(p, s).name for s in (".lock", ".log")] == \
        ["fold3_seed7.lock", "fold3_seed7.log"]


def test_atomic_writes_leave_no_temporary_and_are_readable(tmp_path):
    p = atomic.write_json_atomic(tmp_path / "a" / "x.json", {"a": 1})
    assert json.loads(p.read_text()) == {"a": 1} and p.stat().st_mode & 0o777 == 0o644
    with pytest.raises(ValueError):
        atomic.write_json_atomic(p, {"a": float("nan")})
    assert json.loads(p.read_text()) == {"a": 1}  # the old content survives a failed write

    def boom(tmp):
        tmp.write_text("half")
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        atomic.write_atomic(p, boom)
    assert json.loads(p.read_text()) == {"a": 1}
    assert [f.name for f in p.parent.iterdir()] == ["x.json"]
