"""The synthetic BraTS-layout generator (data/synthetic.py)."""
import numpy as np
import pytest

from nvfp4bench.data import synthetic


def test_synthetic_same_seed_same_bytes_other_seed_differs():
    a, seg_a, _ = synthetic.simulate_case(7, 3, voxel_mm=4.0)
    b, seg_b, _ = synthetic.simulate_case(7, 3, voxel_mm=4.0)
    c, seg_c, _ = synthetic.simulate_case(8, 3, voxel_mm=4.0)
    assert all(a[m].tobytes() == b[m].tobytes() for m in a) and seg_a.tobytes() == seg_b.tobytes()
    assert any(a[m].tobytes() != c[m].tobytes() for m in a)


def test_synthetic_case_is_brats_like():
    infos = []
    for i in range(12):
        images, seg, info = synthetic.simulate_case(2026, i, voxel_mm=4.0)
        assert seg.shape == synthetic.grid_shape(4.0) == (60, 60, 39)
        assert set(np.unique(seg).tolist()) <= {0, 1, 2, 4}
        brain = images["t1"] > 0
        assert all((images[m] > 0).sum() == brain.sum() for m in images)  # one skull-strip mask
        assert not (seg[~brain]).any()  # tumour inside the brain
        assert not info["procedural_template"]
        if (seg == 4).any():  # enhancing tumour is brighter on T1ce than on T1 (relative to WM)
            wm = (seg == 0) & brain
            def ratio(m):
                return images[m][seg == 4].mean() / images[m][wm].mean()
            assert ratio("t1ce") > ratio("t1")
        if (seg == 2).any():  # edema is bright on FLAIR
            assert images["flair"][seg == 2].mean() > images["flair"][(seg == 0) & brain].mean()
        infos.append(info)
    lesions = [i["lesions"] for i in infos]
    assert 0 in lesions and max(lesions) >= 2  # tumour-free patients and several lesions


def test_procedural_fallback_warns_only_without_the_template(monkeypatch):
    def clear():
        synthetic._template_1mm.cache_clear()
        synthetic.load_template.cache_clear()

    clear()
    monkeypatch.setattr(synthetic, "template_dir", lambda: None)
    try:
        with pytest.warns(UserWarning, match="procedural"):
            images, seg, info = synthetic.simulate_case(1, 0, voxel_mm=8.0)
        assert info["procedural_template"] and (images["t1"] > 0).mean() > 0.1
    finally:
        clear()


def test_template_is_found_without_importing_nilearn():
    import sys
    assert synthetic.template_dir() is not None
    assert "nilearn" not in sys.modules
