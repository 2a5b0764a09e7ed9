"""The environment a cell ran in, for its result JSON: versions, device, git commit; this host's
name and whether a process of it is alive (the grid's locks, a store's leftover work folders)."""
from __future__ import annotations

import os
import platform
import socket
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import torch

import nvfp4bench

PACKAGE_ROOT = Path(nvfp4bench.__file__).resolve().parent.parent
HOST = socket.gethostname()


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (one owned by another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def git_commit(root: Path = PACKAGE_ROOT) -> dict:
    """{"commit": sha or None, "dirty": bool or None} of the checkout holding the package."""
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                                 timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    sha = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if sha else None
    return {"commit": sha, "dirty": None if status is None else bool(status)}


def cpu_model() -> str | None:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, else ``platform.processor()``), or
    None when neither says."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip() or None
    except OSError:
        pass
    return platform.processor() or None


def environment(device: torch.device) -> dict:
    """python, torch, device and GPU name, CUDA, the CPU (model, logical cores, intra-op
    threads), Transformer Engine, package version, git."""
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    te = _version("transformer_engine") or _version("transformer-engine")
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "numpy": _version("numpy"),
        "device": str(device),
        "gpu": gpu,
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "cpu_threads": torch.get_num_threads(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "transformer_engine": te,
        "nvfp4bench": nvfp4bench.__version__,
        "git": git_commit(),
        "argv": list(sys.argv),
    }
