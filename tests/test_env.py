import os
from pathlib import Path

import pytest
import torch

from nvfp4bench import env


def test_the_environment_names_the_cpu_and_its_cores():
    info = env.environment(torch.device("cpu"))
    assert info["cpu_count"] == os.cpu_count()
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        pytest.skip("no /proc/cpuinfo here")
    names = [ln.split(":", 1)[1].strip() for ln in cpuinfo.read_text().splitlines()
             if ln.startswith("model name")]
    if not names:
        pytest.skip("/proc/cpuinfo names no model here")
    assert info["cpu_model"] == names[0]
