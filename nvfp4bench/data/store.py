"""The slice store: one directory that training reads fast, written atomically.

Layout (every array a plain ``.npy``, opened with ``mmap_mode="r"`` so nothing is loaded whole)::

    STORE/index.json      what is in it: name, source, synthetic, image_size, modalities,
                          patients (id, first slice, slice count, tumour burden, spacing, ...),
                          the slice rule, the normalisation rule and a content fingerprint
    STORE/images.npy      uint8 (N, C, H, W)   round(255 * u), u in [0, 1] (preprocess.py)
    STORE/masks.npy       uint8 (N, H, W)      whole tumour, {0, 1}
    STORE/positions.npy   int32 (N,)           axial index z of each slice in its volume
    STORE/patient.npy     int32 (N,)           index into index.json's patients
    STORE/folds.json      the splits, written by data_prep after the store (folds.py; not part
                          of the fingerprint)

A patient's slices are contiguous and in increasing z. The writer builds everything in a hidden
temporary directory beside the target (``.NAME.tmp-HOST-PID-XXXX``) and renames it into place only
after ``index.json`` (written last) is complete, so an interrupted run never leaves a directory
that opens as a store; ``SliceStore`` also checks the arrays against the index. The next build
of the same target removes the work folders of builds killed on this host (``sweep_leftovers``).
``--overwrite`` replaces only a folder that is a store of this format, and never the input or a
folder above it (``check_replaceable``).

fingerprint = BLAKE2b-128 over (modalities, image size, then per case in order: id, images,
masks, positions), hex.

Integrity: ``index.json`` also records ``checksums``, the BLAKE2b-128 of each ``.npy`` file as
written. ``SliceStore.verify()`` recomputes them (a store built before checksums were recorded:
its fingerprint) and refuses a store whose bytes changed, naming the file. Training verifies the
store it opens; a process verifies each store once and remembers it by the files' sizes and
modification times (``_VERIFIED``), so a changed file is hashed again. ``data_prep.py --verify
STORE`` checks one on demand.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np

from nvfp4bench.env import HOST, pid_alive
from nvfp4bench.data.errors import DataError
from nvfp4bench.data.preprocess import CaseSlices

FORMAT = "nvfp4bench-slice-store"
VERSION = 1
INDEX = "index.json"
ARRAYS = {"images": np.uint8, "masks": np.uint8, "positions": np.int32, "patient": np.int32}
_COPY_CHUNK = 64 << 20
_HASH_CHUNK = 16 << 20
# (store path, (file, size, mtime_ns) of its arrays and index) already verified by this process
_VERIFIED: set[tuple] = set()
# The embedded default dataset's store (built on first use by prep.ensure_synthetic_store), and the
# results folder of a store (results.py): ``synthetic`` for it, else <name>-<fingerprint[:8]>.
DEFAULT_DATA_DIR = Path(__file__).resolve().parents[2] / "data" / "synthetic"
SYNTHETIC_NAME = "synthetic"
FINGERPRINT_DIGITS = 8


def is_store(path: str | Path) -> bool:
    """True when ``path`` holds a finished store (its index.json exists)."""
    return (Path(path) / INDEX).is_file()


def written_by_us(path: str | Path) -> bool:
    """True when ``path`` is a directory whose index.json says it is a store of this format."""
    try:
        index = json.loads((Path(path) / INDEX).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(index, dict) and index.get("format") == FORMAT


def check_replaceable(target: str | Path, protect=()) -> None:
    """Refuse (DataError, one line naming the folder) to replace ``target`` unless it is a store.

    ``--overwrite`` replaces only a folder that is a store this tool wrote: never a plain file, a
    folder of anything else, or a folder that is or contains one of ``protect`` (the input).
    """
    target = Path(target).absolute()
    for p in protect:
        p = Path(p).absolute()
        if target.resolve() == p.resolve() or target.resolve() in p.resolve().parents:
            raise DataError(f"--output {target} is the input {p} or a folder above it; "
                            "choose another --output")
    if not target.exists() and not target.is_symlink():
        return
    if not target.is_dir() or target.is_symlink():
        raise DataError(f"--output {target} is not a folder; not replacing it (remove it yourself "
                        "or choose another --output)")
    if not written_by_us(target):
        raise DataError(f"--output {target} is a folder but not a slice store written by "
                        "data_prep.py; --overwrite replaces only such stores (choose another "
                        "--output)")


def leftover_prefix(target: Path, kind: str) -> str:
    """Name prefix of a hidden work folder beside ``target``: ``.NAME.KIND-HOST-PID-``.

    Host and pid let a later run tell the folder of a killed build from one still in use.
    """
    return f".{target.name}.{kind}-{HOST}-{os.getpid()}-"



def sweep_leftovers(target: str | Path) -> list[Path]:
    """Remove the hidden work folders beside ``target`` left by builds killed on this host.

    A build killed with SIGKILL cannot clean up; the next build of the same target does, for
    folders whose host is this one and whose pid is dead. -> the folders removed.
    """
    target = Path(target).absolute()
    pattern = re.compile(rf"^\.{re.escape(target.name)}\.(tmp|old|nifti)-"
                         rf"{re.escape(HOST)}-(\d+)-")
    removed = []
    try:
        entries = list(target.parent.iterdir())
    except FileNotFoundError:
        return removed
    for p in entries:
        m = pattern.match(p.name)
        if m and p.is_dir() and not p.is_symlink() and not pid_alive(int(m.group(2))):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


class StoreWriter:
    """Append cases, then ``finalize(meta)``; any exit without finalize removes the temp dir.

    >>> with StoreWriter(out, image_size=64, modalities=("t1", "flair", "t1ce")) as w:
    ...     for cs in cases: w.add(cs)
    ...     w.finalize({"name": "brats", ...})
    """

    def __init__(self, target: str | Path, *, image_size: int, modalities, overwrite: bool = False,
                 protect=()):
        self.target = Path(target).absolute()
        if self.target.exists() and not overwrite:
            raise DataError(f"{self.target} already exists; pass --overwrite (overwrite=True) "
                            "to replace it")
        self.protect = tuple(protect)
        check_replaceable(self.target, self.protect)
        self.target.parent.mkdir(parents=True, exist_ok=True)
        sweep_leftovers(self.target)
        self.tmp = Path(tempfile.mkdtemp(prefix=leftover_prefix(self.target, "tmp"),
                                         dir=self.target.parent))
        self.image_size, self.modalities = int(image_size), tuple(modalities)
        self.overwrite = overwrite
        self._raw = {k: open(self.tmp / f"{k}.raw", "wb") for k in ARRAYS}
        self._hash = hashlib.blake2b(digest_size=16)
        self._hash.update(json.dumps([self.modalities, self.image_size]).encode())
        self.records: list[dict] = []
        self.n_slices = 0
        self.done = False

    def __enter__(self) -> "StoreWriter":
        return self

    def __exit__(self, *exc) -> None:
        if not self.done:
            self.abort()

    def add(self, cs: CaseSlices) -> None:
        """Append one case's slices (cases keep the order they are added in)."""
        s, c = len(cs.images), len(self.modalities)
        want = (s, c, self.image_size, self.image_size)
        if cs.images.shape != want or cs.masks.shape != (s, *want[2:]):
            raise ValueError(f"case {cs.case_id}: images {cs.images.shape} / masks "
                             f"{cs.masks.shape} do not match the store's {want}")
        arrays = {"images": cs.images, "masks": cs.masks, "positions": cs.positions,
                  "patient": np.full(s, len(self.records))}
        self._hash.update(cs.case_id.encode() + b"\0")
        for k, a in arrays.items():
            a = np.ascontiguousarray(a, dtype=ARRAYS[k])
            if k != "patient":
                self._hash.update(a.tobytes())
            self._raw[k].write(a.tobytes())
        self.records.append({
            "id": cs.case_id, "start": self.n_slices, "slices": s,
            "tumour_slices": int((cs.masks.reshape(s, -1).max(axis=1) > 0).sum()),
            "tumour_voxels": cs.tumour_voxels, "tumour_ml": cs.tumour_ml, "depth": cs.depth,
            "shape": list(cs.shape), "spacing": None if cs.spacing is None else list(cs.spacing),
            "voxel_spacing": None if cs.voxel_spacing is None else list(cs.voxel_spacing),
            "slice_gap": cs.slice_gap, "uniform_gap": cs.uniform_gap})
        self.n_slices += s

    def _to_npy(self, key: str, tail: tuple) -> None:
        raw = self.tmp / f"{key}.raw"
        out = np.lib.format.open_memmap(self.tmp / f"{key}.npy", mode="w+", dtype=ARRAYS[key],
                                        shape=(self.n_slices, *tail))
        flat = out.reshape(-1).view(np.uint8)
        with open(raw, "rb") as f:
            pos = 0
            while chunk := f.read(_COPY_CHUNK):
                flat[pos:pos + len(chunk)] = np.frombuffer(chunk, np.uint8)
                pos += len(chunk)
        out.flush()
        del out, flat
        raw.unlink()

    def finalize(self, meta: dict) -> Path:
        """Write the arrays and index.json, then rename the temp dir to the target. -> target."""
        for f in self._raw.values():
            f.close()
        if not self.records:
            raise DataError("no case could be converted; nothing to write")
        size, c = self.image_size, len(self.modalities)
        tails = {"images": (c, size, size), "masks": (size, size), "positions": (), "patient": ()}
        for k, tail in tails.items():
            self._to_npy(k, tail)
        index = {"format": FORMAT, "version": VERSION, **meta, "image_size": size,
                 "modalities": list(self.modalities), "channels": len(self.modalities),
                 "n_slices": self.n_slices,
                 "fingerprint": self._hash.hexdigest(),
                 "checksums": {f"{k}.npy": file_checksum(self.tmp / f"{k}.npy") for k in ARRAYS},
                 "patients": self.records}
        tmp_index = self.tmp / (INDEX + ".part")
        tmp_index.write_text(json.dumps(index, indent=1))
        os.replace(tmp_index, self.tmp / INDEX)  # index last: a store without it is no store
        self.tmp.chmod(0o755)  # mkdtemp made it private
        trash = None
        if self.target.exists():
            if not self.overwrite:
                raise DataError(f"{self.target} appeared while building; not overwriting it")
            check_replaceable(self.target, self.protect)  # it may have changed meanwhile
            trash = Path(tempfile.mkdtemp(prefix=leftover_prefix(self.target, "old"),
                                          dir=self.target.parent)) / self.target.name
            os.replace(self.target, trash)
        os.replace(self.tmp, self.target)
        self.done = True
        if trash is not None:
            shutil.rmtree(trash.parent, ignore_errors=True)
        return self.target

    def abort(self) -> None:
        """Drop everything written so far."""
        for f in self._raw.values():
            f.close()
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.done = True


class SliceStore:
    """Read-only view of a store (see the module docstring); arrays are memory-mapped.

    ``channels`` is the channel count (the model's ``in_channels``), ``modalities`` their names.
    ``spacing`` is the in-plane (row_mm, col_mm) when every patient shares it, else None;
    ``record(p)["spacing"]`` is (slice, row, col) mm of p's contiguously re-stacked slices.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        index_file = self.path / INDEX
        if not index_file.is_file():
            raise FileNotFoundError(f"{self.path} is not a slice store (no {INDEX}); build one "
                                    "with data_prep.py")
        try:
            self.index = json.loads(index_file.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{index_file}: not valid JSON ({e})") from None
        if self.index.get("format") != FORMAT or self.index.get("version") != VERSION:
            raise ValueError(f"{index_file}: not a {FORMAT} v{VERSION} index")
        n, size, c = self.index["n_slices"], self.index["image_size"], len(self.index["modalities"])
        want = {"images": (n, c, size, size), "masks": (n, size, size), "positions": (n,),
                "patient": (n,)}
        self._arrays = {}
        for k, shape in want.items():
            try:
                a = np.load(self.path / f"{k}.npy", mmap_mode="r")
            except (OSError, ValueError) as e:
                raise ValueError(f"{self.path / (k + '.npy')}: unreadable ({e})") from None
            if a.shape != shape or a.dtype != ARRAYS[k]:
                raise ValueError(f"{self.path / (k + '.npy')}: shape {a.shape} {a.dtype}, index "
                                 f"says {shape} {np.dtype(ARRAYS[k])}; the store is damaged")
            self._arrays[k] = a
        self._patient = np.asarray(self._arrays["patient"])
        self._positions = np.asarray(self._arrays["positions"])
        self._records = {r["id"]: r for r in self.index["patients"]}

    def verify(self) -> None:
        """Refuse (ValueError naming the file) a store whose arrays changed since it was built:
        their checksums, or for a store without recorded checksums its content fingerprint.
        Each store is hashed once per process while its files keep their sizes and times."""
        key = (str(self.path.resolve()), tuple(
            (name, st.st_size, st.st_mtime_ns)
            for name in (INDEX, *(f"{k}.npy" for k in ARRAYS))
            for st in [(self.path / name).stat()]))
        if key in _VERIFIED:
            return
        recorded = self.index.get("checksums")
        if isinstance(recorded, dict):
            for name in (f"{k}.npy" for k in ARRAYS):
                if recorded.get(name) != file_checksum(self.path / name):
                    raise ValueError(f"{self.path / name}: its bytes changed since the store was "
                                     f"built (checksum mismatch); the store is damaged, build it "
                                     f"again with data_prep.py")
        elif self._content_fingerprint() != self.fingerprint:
            raise ValueError(f"{self.path}: images.npy, masks.npy or positions.npy changed since "
                             f"the store was built (its content does not match its "
                             f"fingerprint); build it again with data_prep.py")
        _VERIFIED.add(key)

    def _content_fingerprint(self) -> str:
        """The fingerprint recomputed from the arrays, as the writer made it."""
        h = hashlib.blake2b(digest_size=16)
        h.update(json.dumps([list(self.modalities), self.image_size]).encode())
        for r in self.index["patients"]:
            part = slice(r["start"], r["start"] + r["slices"])
            h.update(r["id"].encode() + b"\0")
            for k in ("images", "masks", "positions"):
                h.update(np.ascontiguousarray(self._arrays[k][part]).tobytes())
        return h.hexdigest()

    def __getstate__(self) -> dict:  # DataLoader workers reopen the memmaps, never copy them
        return {"path": str(self.path)}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"])

    name = property(lambda self: self.index["name"])
    source = property(lambda self: self.index.get("source"))
    synthetic = property(lambda self: bool(self.index["synthetic"]))
    fingerprint = property(lambda self: self.index["fingerprint"])
    image_size = property(lambda self: int(self.index["image_size"]))
    modalities = property(lambda self: tuple(self.index["modalities"]))
    channels = property(lambda self: len(self.index["modalities"]))
    patients = property(lambda self: [r["id"] for r in self.index["patients"]])
    images = property(lambda self: self._arrays["images"])  # uint8 memmap (N, C, H, W)
    masks = property(lambda self: self._arrays["masks"])  # uint8 memmap (N, H, W)

    @property
    def spacing(self) -> tuple[float, float] | None:
        found = {tuple(r["spacing"][1:]) if r["spacing"] else None for r in self.index["patients"]}
        return found.pop() if len(found) == 1 else None

    def __len__(self) -> int:
        return int(self.index["n_slices"])

    def __repr__(self) -> str:
        return (f"SliceStore({str(self.path)!r}, name={self.name!r}, patients="
                f"{len(self.patients)}, slices={len(self)}, size={self.image_size})")

    def record(self, patient: str) -> dict:
        """The index entry of one patient (start, slices, tumour_voxels, spacing, ...)."""
        try:
            return self._records[patient]
        except KeyError:
            raise KeyError(f"patient {patient!r} is not in store {self.path}") from None

    def burden(self, patient: str) -> int:
        """Whole-tumour voxels of the patient's full volume (the stratification variable)."""
        return int(self.record(patient)["tumour_voxels"])

    def slice_indices(self, patients) -> list[int]:
        """Store indices of the slices of ``patients`` (in the order given, z increasing)."""
        out: list[int] = []
        for p in patients:
            r = self.record(p)
            out.extend(range(r["start"], r["start"] + r["slices"]))
        return out

    def patient_of(self, i: int) -> str:
        return self.index["patients"][int(self._patient[i])]["id"]

    def slice_position(self, i: int) -> int:
        """Axial index z of slice ``i`` in its patient's canonical volume."""
        return int(self._positions[i])

    def image(self, i: int) -> np.ndarray:
        """float32 (C, H, W) in [0, 1]."""
        return self._arrays["images"][i].astype(np.float32) / 255.0

    def mask(self, i: int) -> np.ndarray:
        """uint8 (H, W) in {0, 1}."""
        return np.asarray(self._arrays["masks"][i])


def store_dir_name(store) -> str:
    """The ``<dataset>`` folder of an open SliceStore: ``synthetic`` for the embedded store,
    else ``<name>-<fingerprint[:8]>`` (the name made safe as one path component)."""
    if Path(store.path).resolve() == Path(DEFAULT_DATA_DIR).resolve():
        return SYNTHETIC_NAME
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", str(store.name)).strip(".") or "data"
    return f"{name}-{store.fingerprint[:FINGERPRINT_DIGITS]}"


def file_checksum(path: Path) -> str:
    """BLAKE2b-128 of a file's bytes, hex, read in 16 MiB chunks."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()
