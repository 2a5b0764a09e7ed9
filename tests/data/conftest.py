"""The small synthetic store the data tests share (built once per test session)."""
import pytest

from nvfp4bench.data import ensure_synthetic_store

N_PATIENTS = 10  # the fewest that make 5 folds with a val and a test patient each


@pytest.fixture(scope="session")
def store_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("syn") / "store"
    return ensure_synthetic_store(path, patients=N_PATIENTS, image_size=32, progress=False)
