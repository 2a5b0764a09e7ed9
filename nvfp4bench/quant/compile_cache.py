"""What the compiled quantizer kernels keep between processes, so that a later process (the
grid's next cell) starts training in about a second instead of several.

Two things are kept, both in the folder ``persistent_compile_cache()`` names:

- **inductor's own caches** (generated C++, its shared objects, the FX-graph and AOTAutograd
  caches): inductor's cache folder is moved there from its default under the temporary folder,
  which a reboot empties.
- **the vector-ISA probe's outcome.** Before its first C++ kernel, inductor checks which of the
  vector instruction sets that ``/proc/cpuinfo`` lists its compiler can build and load, by
  starting one Python process per candidate (about 1 s on a 2-core machine, in every process).
  ``vec_isa_options()`` returns ``{"cpp.vec_isa_ok": True}`` (skip the probe) only where an
  earlier process on the same CPU flags, compiler and torch probed every candidate and all of
  them passed (``record_vec_isa_probe``): the same answer the probe would give. Anywhere else
  (another CPU, compiler or torch; a candidate that failed; not x86) inductor probes as usual.

Deleting the folder is always safe: the next process compiles and probes again.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import platform
import tempfile
from pathlib import Path

import torch


COMPILE_CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"  # inductor's own variable for its cache folder
# The user's choice, read before inductor is imported: importing it sets the variable to its
# default folder (so this module imports inductor only where it needs it).
_USER_COMPILE_CACHE = os.environ.get(COMPILE_CACHE_ENV)


def user_cache_folder() -> Path:
    """nvfp4bench's folder in the user's cache: ``$XDG_CACHE_HOME/nvfp4bench``
    (``~/.cache/nvfp4bench``)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "nvfp4bench"


def persistent_compile_cache() -> Path:
    """The folder where inductor keeps the compiled kernels between processes, set for this
    process before the first compilation: ``$TORCHINDUCTOR_CACHE_DIR`` when the user set it,
    else ``$XDG_CACHE_HOME/nvfp4bench/inductor`` (``~/.cache/nvfp4bench/inductor``), which,
    unlike inductor's default under the temporary folder, survives a reboot. A later process
    (the grid's next cell) then loads the kernels instead of generating and compiling their C++
    code; it still traces them (about a second on the first step). Deleting the folder is
    safe."""
    chosen = _USER_COMPILE_CACHE or str(user_cache_folder() / "inductor")
    os.environ[COMPILE_CACHE_ENV] = chosen
    return Path(chosen)


def _x86_candidates() -> list[str] | None:
    """The vector ISAs inductor would probe on this machine (its candidates whose flags
    ``/proc/cpuinfo`` lists), by name; None where inductor does not probe this way (not x86) or
    this torch lays its probe out differently."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return None
    try:
        from torch._inductor import cpu_vec_isa  # after persistent_compile_cache(): see there

        flags = cpu_vec_isa.x86_isa_checker()
        return [str(isa) for isa in cpu_vec_isa.supported_vec_isa_list
                if all(flag in flags for flag in str(isa).split())]
    except (ImportError, AttributeError):
        return None


@functools.lru_cache(maxsize=1)
def _probe_marker() -> Path | None:
    """The file that says "every candidate passed" for this CPU's flags, compiler and torch
    (one name per combination, so a cache folder shared by different machines stays right);
    None where there is nothing to key it by. Computed once per process (it asks the compiler
    for its version)."""
    candidates = _x86_candidates()
    if not candidates:
        return None
    try:
        from torch._inductor import cpp_builder  # after persistent_compile_cache(): see there

        compiler = cpp_builder.get_cpp_compiler()
        version = cpp_builder.get_compiler_version_info(compiler)
    except (ImportError, AttributeError, RuntimeError, OSError):
        return None
    key = "\n".join([torch.__version__, compiler, version, *candidates])
    digest = hashlib.blake2b(key.encode(), digest_size=12).hexdigest()
    return persistent_compile_cache() / f"vec-isa-probe-{digest}.ok"


def vec_isa_options() -> dict:
    """Inductor options that skip the vector-ISA probe where an earlier process recorded that
    every candidate passed it here (module docstring); ``{}`` otherwise."""
    marker = _probe_marker()
    return {"cpp.vec_isa_ok": True} if marker is not None and marker.is_file() else {}


def record_vec_isa_probe() -> None:
    """After a compilation that ran inductor's probe: record, for later processes, that every
    candidate passed it (nothing is recorded when one failed)."""
    marker = _probe_marker()
    if marker is None or marker.is_file():
        return
    try:
        from torch._inductor import cpu_vec_isa  # after persistent_compile_cache(): see there

        passed = [str(isa) for isa in cpu_vec_isa.valid_vec_isa_list()]
    except (ImportError, AttributeError):
        return
    if passed == _x86_candidates():
        with contextlib.suppress(OSError):  # a read-only cache folder: probe again next time
            _write_marker(marker, "\n".join(passed) + "\n")


def _write_marker(path: Path, text: str) -> None:
    """``text`` into ``path`` through a temporary file beside it, renamed over it: another
    process sees no marker or a whole one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
