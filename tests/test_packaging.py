"""pyproject.toml builds a wheel with every module of the package and the console scripts.

The wheel is built from a copy of the sources (no build/ or egg-info in the checkout), with the
installed setuptools (no network, no build isolation).
"""
import configparser
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = {
    "nvfp4bench": "nvfp4bench.train.cli:entry",
    "nvfp4bench-prep": "nvfp4bench.data.prep:main",
    "nvfp4bench-grid": "nvfp4bench.grid.cli:main",
    "nvfp4bench-report": "nvfp4bench.report.cli:main",
    "nvfp4bench-verify-te": "nvfp4bench.checks.verify_te:main",
    "nvfp4bench-bench": "nvfp4bench.checks.bench:main",
}


def _name(requirement: str) -> str:
    """The normalised project name of a requirement line: 'Pillow>=10' -> 'pillow'."""
    return re.split(r"[\s\[<>=!~;@]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "nvfp4bench", src / "nvfp4bench",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    out = tmp_path_factory.mktemp("wheel")
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                             "--no-build-isolation", "--no-index", "-w", str(out), str(src)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    (path,) = out.glob("nvfp4bench-*.whl")
    return path


def test_the_wheel_holds_every_module_of_the_package(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {p.relative_to(REPO).as_posix() for p in (REPO / "nvfp4bench").rglob("*.py")}
    assert modules and modules <= names, sorted(modules - names)
    assert not any(n.startswith(("tests/", "benchmarks/")) for n in names)


def test_the_wheel_declares_the_console_scripts_and_runtime_deps(wheel):
    with zipfile.ZipFile(wheel) as z:
        (entry,) = [n for n in z.namelist() if n.endswith(".dist-info/entry_points.txt")]
        (meta,) = [n for n in z.namelist() if n.endswith(".dist-info/METADATA")]
        parser = configparser.ConfigParser()
        parser.read_string(z.read(entry).decode())
        metadata = z.read(meta).decode()
    assert dict(parser["console_scripts"]) == SCRIPTS
    requires = [line.split(": ", 1)[1] for line in metadata.splitlines()
                if line.startswith("Requires-Dist: ")]
    runtime = {_name(r) for r in requires if "extra ==" not in r}
    listed = {line.split("#")[0].strip() for line in
              (REPO / "requirements.txt").read_text().splitlines()}
    listed = {_name(r) for r in listed if r and not r.startswith("-")}
    assert listed and listed <= runtime  # pyproject keeps requirements.txt's packages
    assert "torch==2.13.0" in {r.replace(" ", "") for r in requires}
    assert any("transformer-engine" in r and 'extra == "te"' in r for r in requires)
    assert any(r.startswith("matplotlib") and "extra" not in r for r in requires)  # figures by default
    assert any("pytest" in r and 'extra == "dev"' in r for r in requires)


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_each_console_script_target_is_a_main_that_prints_help(script, capsys):
    module, _, attr = SCRIPTS[script].partition(":")
    main = getattr(__import__(module, fromlist=[attr]), attr)
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    assert "usage:" in capsys.readouterr().out
