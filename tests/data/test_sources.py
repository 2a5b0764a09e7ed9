"""Readers and the data_prep CLI on tiny hand-written datasets (BraTS 2021/2023, MSD, LGG),
including every kind of bad input: each gives a message naming the case and file and exit 1."""
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from nvfp4bench.data import SliceStore
from nvfp4bench.data.prep import main

SHAPE = (12, 10, 8)  # canonical (x, y, z)
LPS = np.diag([-1.0, -1.0, 1.0, 1.0])  # BraTS' stored orientation


def brain_volume(seed, shape=SHAPE):
    """Positive intensities inside a box 'brain', 0 outside, canonical RAS order."""
    rng = np.random.default_rng(seed)
    v = np.zeros(shape, np.float32)
    v[2:-2, 2:-2, 1:-1] = rng.uniform(50, 500, (shape[0] - 4, shape[1] - 4, shape[2] - 2))
    return v


def save(path, ras, dtype=np.int16):
    """Write a RAS array in BraTS' LPS storage order (the reader must undo it)."""
    nib.save(nib.Nifti1Image(np.ascontiguousarray(ras[::-1, ::-1]).astype(dtype), LPS), str(path))


def write_brats2021(root, cid="BraTS2021_00001", seed=0, tumour=((5, 4, 3),), labels=(1, 2, 4),
                    ext=".nii.gz", level=""):
    folder = Path(root) / level / cid
    folder.mkdir(parents=True, exist_ok=True)
    for k, mod in enumerate(("flair", "t1", "t1ce", "t2")):
        save(folder / f"{cid}_{mod}{ext}", brain_volume(seed * 10 + k))
    seg = np.zeros(SHAPE, np.uint8)
    for (x, y, z), lab in zip(tumour, labels):
        seg[x, y, z] = lab
    save(folder / f"{cid}_seg{ext}", seg, np.uint8)
    return folder


def write_brats2023(root, cid="BraTS-GLI-00002-000", seed=1, label=3):
    folder = Path(root) / cid
    folder.mkdir(parents=True, exist_ok=True)
    for k, mod in enumerate(("t1n", "t1c", "t2w", "t2f")):
        save(folder / f"{cid}-{mod}.nii.gz", brain_volume(seed * 10 + k))
    seg = np.zeros(SHAPE, np.uint8)
    seg[6, 5, 4] = label
    save(folder / f"{cid}-seg.nii.gz", seg, np.uint8)
    return folder


def run_cli(args, capsys):
    rc = main([*args, "--no-progress"])
    err = capsys.readouterr().err
    return rc, err


def brats_args(inp, out, *extra):
    return ["--source", "brats", "--input", str(inp), "--output", str(out), "--image-size", "12",
            "--slice-mode", "all", *extra]


# ---------------------------------------------------------------- good inputs, known answers
def test_brats2021_orientation_mask_and_index(tmp_path, capsys):
    write_brats2021(tmp_path / "raw", tumour=((5, 7, 3),), labels=(4,), level="HGG")
    write_brats2023(tmp_path / "raw")
    rc, err = run_cli(brats_args(tmp_path / "raw", tmp_path / "store") +
                      ["--image-size", "10"], capsys)  # slices are (H=Y=10, W=X=12) -> 10
    assert rc == 0, err
    store = SliceStore(tmp_path / "store")
    assert store.patients == ["BraTS-GLI-00002-000", "BraTS2021_00001"]
    assert store.modalities == ("t1", "flair", "t1ce") and store.channels == 3
    assert not store.synthetic and store.name == "brats"
    # canonical (x=5, y=7, z=3) -> slice z=3, row Y-1-y = 2, col x = 5 (then W 12 -> 10 nearest)
    (i,) = [i for i in store.slice_indices(["BraTS2021_00001"]) if store.slice_position(i) == 3]
    rows, cols = np.nonzero(store.mask(i))
    assert list(rows) == [2] and abs(cols[0] - 5 * 10 / 12) < 1
    assert sum(store.mask(j).sum() for j in range(len(store))) == 2  # one voxel per case
    rec = store.record("BraTS2021_00001")
    assert rec["tumour_voxels"] == 1 and rec["depth"] == SHAPE[2]
    assert store.image(i).dtype == np.float32 and 0 <= store.image(i).min() <= store.image(i).max() <= 1


def test_brats_uncompressed_nii_and_modality_choice(tmp_path, capsys):
    write_brats2021(tmp_path / "raw", ext=".nii")
    rc, err = run_cli(brats_args(tmp_path / "raw", tmp_path / "s") + ["--modalities", "t2,flair"],
                      capsys)
    assert rc == 0, err
    store = SliceStore(tmp_path / "s")
    assert store.modalities == ("t2", "flair") and store.images.shape[1] == 2


def test_msd_channel_order_and_apple_files(tmp_path, capsys):
    task = tmp_path / "Task01_BrainTumour"
    (task / "imagesTr").mkdir(parents=True)
    (task / "labelsTr").mkdir()
    (task / "dataset.json").write_text(json.dumps(
        {"modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"}}))
    img = np.zeros((*SHAPE, 4), np.float32)
    for k in range(4):  # channel k is nonzero in slab x = 2k..2k+1 only: its fingerprint
        img[2 * k:2 * k + 2, 2:-2, 1:-1, k] = 100 + 10 * k
    nib.save(nib.Nifti1Image(img, np.eye(4)), str(task / "imagesTr" / "BRATS_001.nii.gz"))
    seg = np.zeros(SHAPE, np.uint8)
    seg[3, 3, 3] = 3
    nib.save(nib.Nifti1Image(seg, np.eye(4)), str(task / "labelsTr" / "BRATS_001.nii.gz"))
    (task / "imagesTr" / "._BRATS_001.nii.gz").write_bytes(b"\x00\x05\x16\x07 apple double")
    rc, err = run_cli(["--source", "msd", "--input", str(tmp_path), "--output",
                       str(tmp_path / "s"), "--image-size", "12", "--slice-mode", "all"], capsys)
    assert rc == 0, err
    store = SliceStore(tmp_path / "s")
    assert store.patients == ["BRATS_001"]
    # default modalities t1, flair, t1ce = MSD channels 1, 0, 2: their slabs are columns 2k..2k+1
    cols = [np.nonzero(store.images[3][c].any(axis=0))[0].tolist() for c in range(3)]
    assert cols == [[2, 3], [0, 1], [4, 5]]


def write_lgg(root, patient="TCGA_CS_0001_20000101", numbers=(1, 2, 10), bad_mask=False,
              drop_image=None):
    folder = Path(root) / "kaggle_3m" / patient
    folder.mkdir(parents=True, exist_ok=True)
    for n in numbers:
        img = np.zeros((16, 16, 3), np.uint8)
        img[4:12, 4:12] = (40 + n, 120, 200)  # channel values tell the channels apart
        mask = np.zeros((16, 16), np.uint8)
        mask[6:8, 6 + n % 5:8 + n % 5] = 255 if not bad_mask else 7
        if n != drop_image:
            Image.fromarray(img).save(folder / f"{patient}_{n}.tif")
        Image.fromarray(mask).save(folder / f"{patient}_{n}_mask.tif")
    return folder


def test_lgg_slice_order_channels_and_masks(tmp_path, capsys):
    write_lgg(tmp_path)
    rc, err = run_cli(["--source", "lgg", "--input", str(tmp_path), "--output",
                       str(tmp_path / "s"), "--image-size", "16"], capsys)
    assert rc == 0, err
    store = SliceStore(tmp_path / "s")
    assert len(store) == 3 and store.spacing is None
    assert [store.slice_position(i) for i in range(3)] == [0, 1, 2]
    # slice order by file number (1, 2, 10 - not "1, 10, 2"): mask column offset n % 5
    assert [int(np.nonzero(store.mask(i))[1].min()) for i in range(3)] == [7, 8, 6]
    assert store.mask(0).max() == 1
    # the study's 8-bit pixels are kept as they are (u = x / 255), no per-case z-score; the
    # channels in the study's order: cv2.imread's BGR, i.e. the .tif's RGB reversed (post-contrast,
    # FLAIR, pre-contrast), to which the ImageNet mean and std then apply in order
    assert [store.images[i, :, 8, 8].tolist() for i in range(3)] == [
        [200, 120, 41], [200, 120, 42], [200, 120, 50]]
    assert list(store.index["modalities"]) == ["t1ce", "flair", "t1"]
    assert "x / 255" in store.index["normalisation"]


def test_lgg_channels_are_stored_in_the_studys_cv2_order(tmp_path, capsys):
    """Every pixel of every channel equals what cv2.imread (BGR) reads from the .tif; asking for
    the .tif's RGB order by name gives it instead."""
    folder = write_lgg(tmp_path, numbers=(1,))
    rgb = np.asarray(Image.open(folder / "TCGA_CS_0001_20000101_1.tif"))
    bgr = rgb[..., ::-1]  # what cv2.imread returns for a 3-channel image
    rc, err = run_cli(["--source", "lgg", "--input", str(tmp_path), "--output",
                       str(tmp_path / "s"), "--image-size", "16"], capsys)
    assert rc == 0, err
    np.testing.assert_array_equal(SliceStore(tmp_path / "s").images[0], bgr.transpose(2, 0, 1))
    rc, err = run_cli(["--source", "lgg", "--input", str(tmp_path), "--output",
                       str(tmp_path / "rgb"), "--image-size", "16", "--modalities",
                       "t1,flair,t1ce"], capsys)
    assert rc == 0, err
    np.testing.assert_array_equal(SliceStore(tmp_path / "rgb").images[0], rgb.transpose(2, 0, 1))


# ---------------------------------------------------------------- bad inputs
def _case_files(folder):
    return {p.name.split("_")[-1].split(".")[0]: p for p in Path(folder).iterdir()}


BAD_CASES = {
    "truncated": "unreadable or truncated",
    "shape": "shapes differ",
    "labels": "label values 3 outside",
    "nan": "NaN",
    "empty": "empty volume",
    "missing": "missing modality t1ce",
}


def make_bad(kind, folder):
    files = _case_files(folder)
    if kind == "truncated":
        data = files["t1"].read_bytes()
        files["t1"].write_bytes(data[: len(data) // 2])
        return files["t1"]
    if kind == "shape":
        save(files["seg"], np.zeros((12, 10, 7), np.uint8), np.uint8)
        return files["seg"]
    if kind == "labels":
        seg = np.zeros(SHAPE, np.uint8)
        seg[4, 4, 4] = 3  # 3 is not a BraTS 2021 label
        save(files["seg"], seg, np.uint8)
        return files["seg"]
    if kind == "nan":
        v = brain_volume(3)
        v[5, 5, 5] = np.nan
        save(files["flair"], v, np.float32)
        return files["flair"]
    if kind == "empty":
        save(files["t1ce"], np.zeros(SHAPE))
        return files["t1ce"]
    if kind == "missing":
        files["t1ce"].unlink()
        return files["t1ce"].parent
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", BAD_CASES)
def test_bad_input_stops_with_case_file_and_problem(tmp_path, capsys, kind):
    write_brats2021(tmp_path / "raw", "BraTS2021_00001", seed=1)
    bad = make_bad(kind, write_brats2021(tmp_path / "raw", "BraTS2021_00002", seed=2))
    rc, err = run_cli(brats_args(tmp_path / "raw", tmp_path / "s"), capsys)
    assert rc == 1
    assert "BraTS2021_00002" in err and BAD_CASES[kind] in err
    assert str(bad) in err or bad.name in err
    assert "Traceback" not in err
    assert not (tmp_path / "s").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".s.tmp")]  # temp removed


def test_on_error_skip_lists_bad_cases_and_keeps_the_rest(tmp_path, capsys):
    write_brats2021(tmp_path / "raw", "BraTS2021_00001", seed=1)
    make_bad("labels", write_brats2021(tmp_path / "raw", "BraTS2021_00002", seed=2))
    make_bad("missing", write_brats2021(tmp_path / "raw", "BraTS2021_00003", seed=3))
    rc, err = run_cli(brats_args(tmp_path / "raw", tmp_path / "s", "--on-error", "skip"), capsys)
    assert rc == 0
    assert "skipped 2" in err and "BraTS2021_00002" in err and "BraTS2021_00003" in err
    store = SliceStore(tmp_path / "s")
    assert store.patients == ["BraTS2021_00001"] and len(store.index["skipped"]) == 2


def test_brats2023_rejects_label_4_and_lgg_bad_files(tmp_path, capsys):
    write_brats2023(tmp_path / "raw", label=4)
    rc, err = run_cli(brats_args(tmp_path / "raw", tmp_path / "s"), capsys)
    assert rc == 1 and "label values 4 outside the dataset's set [0, 1, 2, 3]" in err
    write_lgg(tmp_path / "lgg", bad_mask=True)
    rc, err = run_cli(["--source", "lgg", "--input", str(tmp_path / "lgg"), "--output",
                       str(tmp_path / "l")], capsys)
    assert rc == 1 and "label values 7" in err and "_mask.tif" in err
    write_lgg(tmp_path / "lgg2", drop_image=2)
    rc, err = run_cli(["--source", "lgg", "--input", str(tmp_path / "lgg2"), "--output",
                       str(tmp_path / "l")], capsys)
    assert rc == 1 and "slice 2 has no image file" in err
    rc, err = run_cli(["--source", "lgg", "--input", str(tmp_path / "lgg2"), "--output",
                       str(tmp_path / "l"), "--modalities", "t2"], capsys)
    assert rc == 1 and "missing modality t2" in err


def test_msd_missing_label_and_empty_input(tmp_path, capsys):
    task = tmp_path / "Task01_BrainTumour"
    (task / "imagesTr").mkdir(parents=True)
    (task / "labelsTr").mkdir()
    nib.save(nib.Nifti1Image(np.ones((*SHAPE, 4), np.float32), np.eye(4)),
             str(task / "imagesTr" / "BRATS_009.nii.gz"))
    rc, err = run_cli(["--source", "msd", "--input", str(task), "--output", str(tmp_path / "s")],
                      capsys)
    assert rc == 1 and "BRATS_009" in err and "missing label file" in err
    rc, err = run_cli(brats_args(tmp_path / "nothing", tmp_path / "s"), capsys)
    assert rc == 1 and "not a directory" in err
    (tmp_path / "nothing").mkdir()
    rc, err = run_cli(brats_args(tmp_path / "nothing", tmp_path / "s"), capsys)
    assert rc == 1 and "no BraTS cases found" in err


def test_existing_store_needs_overwrite(tmp_path, capsys):
    write_brats2021(tmp_path / "raw")
    assert run_cli(brats_args(tmp_path / "raw", tmp_path / "s"), capsys)[0] == 0
    fp = SliceStore(tmp_path / "s").fingerprint
    rc, err = run_cli(brats_args(tmp_path / "raw", tmp_path / "s"), capsys)
    assert rc == 1 and "already exists" in err and "--overwrite" in err
    rc, err = run_cli(brats_args(tmp_path / "raw", tmp_path / "s", "--overwrite",
                                 "--modalities", "t2"), capsys)
    assert rc == 0, err
    assert SliceStore(tmp_path / "s").fingerprint != fp
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw", "s"]  # no temp or old dirs left


def test_script_exits_nonzero_without_traceback(tmp_path):
    root = Path(__file__).resolve().parents[2]
    r = subprocess.run([sys.executable, str(root / "data_prep.py"), "--source", "brats", "--input",
                        str(tmp_path / "missing"), "--output", str(tmp_path / "s")],
                       capture_output=True, text=True, cwd=root, timeout=120)
    assert r.returncode == 1
    assert "not a directory" in r.stderr and "Traceback" not in r.stderr


def test_synthetic_cli_keeps_nifti_in_an_empty_input_only(tmp_path, capsys):
    args = ["--source", "synthetic", "--patients", "2", "--voxel-mm", "4", "--image-size", "16",
            "--input", str(tmp_path / "raw"), "--output", str(tmp_path / "s")]
    rc, err = run_cli(args, capsys)
    assert rc == 0, err
    store = SliceStore(tmp_path / "s")
    assert store.synthetic and store.name == "synthetic" and store.source == "brats"
    assert store.patients == ["BraTS2021_00000", "BraTS2021_00001"]
    assert len(list((tmp_path / "raw" / "BraTS2021_00001").glob("*.nii.gz"))) == 5
    rc, err = run_cli(args[:-2] + ["--output", str(tmp_path / "s2")], capsys)
    assert rc == 1 and "not empty" in err


def test_parallel_workers_give_the_same_store(tmp_path, capsys):
    for i in range(3):
        write_brats2021(tmp_path / "raw", f"BraTS2021_0000{i}", seed=i)
    make_bad("nan", write_brats2021(tmp_path / "raw", "BraTS2021_00009", seed=9))
    one = brats_args(tmp_path / "raw", tmp_path / "one", "--on-error", "skip")
    two = brats_args(tmp_path / "raw", tmp_path / "two", "--on-error", "skip", "--workers", "2")
    assert run_cli(one, capsys)[0] == 0
    rc, err = run_cli(two, capsys)
    assert rc == 0 and "BraTS2021_00009" in err and "NaN" in err  # errors cross the process line
    a, b = SliceStore(tmp_path / "one"), SliceStore(tmp_path / "two")
    assert a.patients == b.patients == [f"BraTS2021_0000{i}" for i in range(3)]
    assert a.fingerprint == b.fingerprint


# ---------------------------------------------------------------- --overwrite is safe

def test_overwrite_refuses_a_folder_that_is_not_a_store(tmp_path, capsys):
    write_brats2021(tmp_path / "raw")
    (tmp_path / "proj").mkdir()
    (tmp_path / "proj" / "thesis.tex").write_text("years of work")
    rc, err = run_cli(brats_args(tmp_path / "raw", tmp_path / "proj", "--overwrite"), capsys)
    assert rc == 1 and "not a slice store" in err and str(tmp_path / "proj") in err
    assert len(err.strip().splitlines()) == 1
    assert (tmp_path / "proj" / "thesis.tex").read_text() == "years of work"


def test_overwrite_refuses_the_input_and_a_folder_above_it(tmp_path, capsys):
    raw = tmp_path / "proj" / "raw"
    write_brats2021(raw)
    (tmp_path / "proj" / "thesis.tex").write_text("years of work")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    for out in (raw, tmp_path / "proj", tmp_path):
        rc, err = run_cli(brats_args(raw, out, "--overwrite"), capsys)
        assert rc == 1 and "is the input" in err and str(out) in err, err
        assert len(err.strip().splitlines()) == 1
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    # a store built from this input *is* replaceable, even one inside a folder above the input
    assert run_cli(brats_args(raw, tmp_path / "proj" / "store"), capsys)[0] == 0
    assert run_cli(brats_args(raw, tmp_path / "proj" / "store", "--overwrite"), capsys)[0] == 0


def test_overwrite_refuses_a_plain_file_and_leaves_nothing_behind(tmp_path, capsys):
    write_brats2021(tmp_path / "raw")
    (tmp_path / "notes.txt").write_text("keep me")
    rc, err = run_cli(brats_args(tmp_path / "raw", tmp_path / "notes.txt", "--overwrite"), capsys)
    assert rc == 1 and "not a folder" in err and "notes.txt" in err
    assert (tmp_path / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "raw"]


def test_a_killed_build_leaves_work_folders_that_the_next_build_removes(tmp_path, capsys):
    from nvfp4bench.data.store import leftover_prefix
    write_brats2021(tmp_path / "raw")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that is certainly dead
    stale = tmp_path / (leftover_prefix(tmp_path / "s", "nifti").replace(
        f"-{__import__('os').getpid()}-", f"-{dead.pid}-") + "x")
    (stale / "BraTS2021_00000").mkdir(parents=True)
    live = tmp_path / (leftover_prefix(tmp_path / "s", "tmp") + "y")  # ours: alive, kept
    live.mkdir()
    assert run_cli(brats_args(tmp_path / "raw", tmp_path / "s"), capsys)[0] == 0
    assert not stale.exists() and live.exists()


def test_skip_with_every_case_bad_lists_them(tmp_path, capsys):
    make_bad("labels", write_brats2021(tmp_path / "raw", "BraTS2021_00002", seed=2))
    make_bad("missing", write_brats2021(tmp_path / "raw", "BraTS2021_00003", seed=3))
    rc, err = run_cli(brats_args(tmp_path / "raw", tmp_path / "s", "--on-error", "skip"), capsys)
    assert rc == 1 and "all 2 case(s) were bad" in err
    assert "BraTS2021_00002" in err and "BraTS2021_00003" in err and "Traceback" not in err
    assert not (tmp_path / "s").exists()
