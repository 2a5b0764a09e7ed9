"""Data: raw MRI datasets -> one slice store; synthetic BraTS data; folds; augmentation; Dataset.

Files, one concept each:

- ``errors.py``      DataError (case, file, problem)
- ``nifti.py``       NIfTI reading, canonical reorientation, label checks
- ``sources.py``     readers of BraTS 2021/2023+, MSD Task01, Kaggle LGG (registry ``SOURCES``)
- ``preprocess.py``  per-volume normalisation, slice selection, resizing
- ``store.py``       the on-disk slice store (atomic writer, memory-mapped ``SliceStore``)
- ``synthetic.py``   BraTS-layout NIfTI simulated from the MNI152 template
- ``folds.py``       the study's patient-level splits, k-fold and hold-out (``folds.json``)
- ``augment.py``     the study's augmentations in torch
- ``dataset.py``     ``SliceDataset``, ``patient_volumes``
- ``prep.py``        the ``data_prep.py`` CLI and ``ensure_synthetic_store``
"""
from nvfp4bench.data.dataset import SliceDataset, patient_volumes
from nvfp4bench.data.errors import DataError
from nvfp4bench.data.folds import load_folds
from nvfp4bench.data.prep import DEFAULT_DATA_DIR, ensure_synthetic_store
from nvfp4bench.data.store import SliceStore

__all__ = ["DEFAULT_DATA_DIR", "DataError", "SliceDataset", "SliceStore", "ensure_synthetic_store",
           "load_folds", "patient_volumes"]
