"""The wheel: built from the sources, it holds the package and the model configs (no tests), and `road-export
model.onnx` works from it in a directory that has nothing of the repository."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("road_export", "models"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    dist = tmp_path_factory.mktemp("dist")
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                           str(src), "-w", str(dist)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (found,) = dist.glob("road_export-*.whl")
    return found


def test_wheel_contents(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert "road_export/models/default/config.json" in names
    assert "road_export/models/default/adapter_config.json" in names
    assert {"road_export/graph/native/road_ort.cc", "road_export/graph/native/ort_abi.h",
            "road_export/py.typed"} <= set(names)
    assert {"road_export/graph/ops.py", "road_export/graph/files.py", "road_export/passes/pipeline.py",
            "road_export/app/parity/torch_reference.py"} <= set(names)
    packages = {str(p.relative_to(ROOT)) for p in (ROOT / "road_export").rglob("__init__.py")}
    assert packages <= set(names), sorted(packages - set(names))  # every subpackage: pyproject's list kept whole
    shipped_tests = [n for n in names if n.endswith("_test.py") or "/test_" in n or "testutil" in n
                     or n.startswith("tests/")]
    assert shipped_tests == []
    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("METADATA"))).decode()
    required = [line for line in metadata.splitlines() if line.startswith("Requires-Dist:") and "extra ==" not in line]
    assert not any(pkg in line for line in required for pkg in ("torch", "transformers", "peft")), required
    assert 'Provides-Extra: export' in metadata


def test_default_export_runs_from_the_wheel_anywhere(wheel, tmp_path):
    site = tmp_path / "site"
    done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site),
                           str(wheel)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "ROAD_EXPORT_MODELS")}
    env.update(PYTHONPATH=str(site), ROAD_EXPORT_CACHE=str(tmp_path / "cache"), HF_HUB_OFFLINE="1")
    where = subprocess.run([sys.executable, "-c", "import road_export.export.zoo as z; print(z.models_dir())"],
                           cwd=work, env=env, capture_output=True, text=True, timeout=120)
    assert where.stdout.strip() == str(site / "road_export" / "models"), where.stderr[-2000:]
    done = subprocess.run([str(site / "bin" / "road-export"), "model.onnx"], cwd=work, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert "parity PASSED" in done.stdout and (work / "model.onnx").stat().st_size > 0
