"""What the compiled kernels keep between processes (``quant/compile_cache.py``) and how they are
traced (``kernels._static_floats``)."""
import os
import platform
import subprocess
import sys

import pytest
import torch

from nvfp4bench.quant import compile_cache, kernels

X86 = platform.machine() in ("x86_64", "AMD64")


def _python(code: str, env: dict) -> str:
    """Run ``code`` in a fresh interpreter with ``env`` over a copy of os.environ minus the
    inductor cache variable; its stdout."""
    full = {k: v for k, v in os.environ.items() if k != compile_cache.COMPILE_CACHE_ENV} | env
    done = subprocess.run([sys.executable, "-c", code], env=full, capture_output=True, text=True,
                          timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


# prints the options the kernels are compiled with, then compiles one
COMPILE_ONE = ("import torch; from nvfp4bench.quant.kernels import fake_quantize; "
               "from nvfp4bench.quant import compile_cache; "
               "print(compile_cache.vec_isa_options()); "
               "fake_quantize(torch.randn(64, 64), kernels='compiled')")


def test_compiled_kernels_are_cached_in_the_user_cache_folder(tmp_path):
    _python(COMPILE_ONE, {"XDG_CACHE_HOME": str(tmp_path)})
    folder = tmp_path / "nvfp4bench" / "inductor"
    assert any(p.is_file() for p in folder.rglob("*"))


def test_a_compile_cache_folder_the_user_chose_is_kept(tmp_path):
    out = _python("from nvfp4bench.quant import kernels; "
                  "print(kernels.persistent_compile_cache())",
                  {compile_cache.COMPILE_CACHE_ENV: str(tmp_path / "mine"),
                   "XDG_CACHE_HOME": str(tmp_path)})
    assert out.strip() == str(tmp_path / "mine")


@pytest.mark.skipif(not X86, reason="inductor probes vector ISAs this way on x86 only")
def test_the_vector_isa_probe_is_recorded_once_and_skipped_later(tmp_path):
    env = {"XDG_CACHE_HOME": str(tmp_path)}
    first = _python(COMPILE_ONE, env)
    markers = list((tmp_path / "nvfp4bench" / "inductor").glob("vec-isa-probe-*.ok"))
    assert first.strip() == "{}"  # the first process probed: nothing recorded before it
    assert len(markers) == 1
    # what inductor's probe found here, every candidate that /proc/cpuinfo lists
    assert markers[0].read_text().split() == " ".join(compile_cache._x86_candidates()).split()
    assert _python(COMPILE_ONE, env).strip() == "{'cpp.vec_isa_ok': True}"


def _fresh_marker(monkeypatch, tmp_path, candidates):
    monkeypatch.setattr(compile_cache, "_USER_COMPILE_CACHE", str(tmp_path))
    monkeypatch.setenv(compile_cache.COMPILE_CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(compile_cache, "_x86_candidates", lambda: candidates)
    compile_cache._probe_marker.cache_clear()
    return compile_cache._probe_marker()


@pytest.mark.skipif(not X86, reason="inductor probes vector ISAs this way on x86 only")
def test_a_failed_candidate_is_not_recorded_and_other_cpus_get_their_own_marker(
        monkeypatch, tmp_path):
    from torch._inductor import cpu_vec_isa

    try:
        here = compile_cache._x86_candidates()
        marker = _fresh_marker(monkeypatch, tmp_path, here)
        # a candidate that failed the probe: nothing recorded, the probe runs next time
        monkeypatch.setattr(cpu_vec_isa, "valid_vec_isa_list", lambda: [])
        compile_cache.record_vec_isa_probe()
        assert not marker.exists() and compile_cache.vec_isa_options() == {}
        # another CPU's flags: another file
        other = _fresh_marker(monkeypatch, tmp_path, here + ["avx512_future"])
        assert other != marker
    finally:
        compile_cache._probe_marker.cache_clear()


def test_no_marker_without_x86_candidates(monkeypatch, tmp_path):
    try:
        assert _fresh_marker(monkeypatch, tmp_path, None) is None
        assert compile_cache.vec_isa_options() == {}
        compile_cache.record_vec_isa_probe()  # nothing to record, nothing raised
        assert not list(tmp_path.iterdir())
    finally:
        compile_cache._probe_marker.cache_clear()


# --------------------------------------------------------------------------------------------
# Module floats traced as constants
# --------------------------------------------------------------------------------------------
SCALE = 448.0  # read from the module by the function below, as the arithmetic reads E4M3_MAX


def _scaled(x, rows: int):
    return torch.clamp(x * rows, max=SCALE)


def _float_inputs(graphs) -> list:
    """The inputs of the traced graphs that stand for a Python float: a symbolic float, or the
    0-d tensor dynamo turns one into (the test's x is 2-D)."""
    def is_float_input(value):
        return isinstance(value, torch.SymFloat) or (isinstance(value, torch.Tensor)
                                                      and value.dim() == 0)
    return [n for g in graphs for n in g.graph.nodes
            if n.op == "placeholder" and is_float_input(n.meta.get("example_value"))]


@pytest.mark.parametrize("static", [True, False])
def test_static_floats_trace_module_floats_as_constants(static):
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(_scaled, backend=backend, dynamic=True, fullgraph=True)
    fn = kernels._static_floats(compiled) if static else compiled
    x = torch.randn(8, 16)
    for rows in (1, 2, 3):  # 1 is a kind of its own (a size-1 specialisation), then 2 and 3
        assert torch.equal(fn(x, rows), torch.clamp(x * rows, max=SCALE))
    assert bool(_float_inputs(graphs)) is not static
    torch._dynamo.reset()
