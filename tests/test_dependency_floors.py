"""The dependency floors CI tests are the ones pyproject.toml declares: tools/floors.py turns every direct requirement
into `name==floor`, refuses one without a floor, and .ci/run's floor job installs its output."""

from __future__ import annotations

import importlib.util
import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("floors", ROOT / "tools" / "floors.py")
floors = importlib.util.module_from_spec(spec)
spec.loader.exec_module(floors)


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_every_direct_requirement_has_one_floor():
    project = pyproject()["project"]
    names = {floors._canonical(re.match(r"[A-Za-z0-9._-]+", r).group(0))
             for r in [*project["dependencies"], *sum(project["optional-dependencies"].values(), [])]}
    pins = floors.floors(pyproject())
    assert set(pins) == names - {"road-export"}
    assert pins["ray"] == ("[serve]", "2.52") and pins["onnx-ir"][1] == "1.1"


def test_torch_floor_is_the_version_ci_installs():
    torch_floor = floors.floors(pyproject())["torch"][1]
    ci = (ROOT / ".ci" / "run").read_text()
    assert f"pip install -q torch=={torch_floor}.0" in ci
    assert "tools/floors.py --requirements --except torch onnxruntime-genai" in ci


@pytest.mark.parametrize("requirement, says", [
    ("numpy", "state exactly one floor"),  # no floor at all
    ("numpy<3", "state exactly one floor"),  # a cap only
    ("numpy>=1.26,>=2", "state exactly one floor"),  # two floors
])
def test_a_requirement_without_one_floor_is_refused(requirement, says):
    planted = {"project": {"name": "x", "dependencies": ["onnx>=1.23", requirement]}}
    with pytest.raises(ValueError, match=says):
        floors.floors(planted)


def test_two_floors_for_one_package_are_refused_and_own_extras_are_skipped():
    planted = {"project": {"name": "road-export", "dependencies": ["onnx>=1.23"],
                           "optional-dependencies": {"a": ["road-export[b]", "ONNX>=1.20"]}}}
    with pytest.raises(ValueError, match="a second floor for onnx"):
        floors.floors(planted)
    planted["project"]["optional-dependencies"]["a"] = ["road_export[b]", "peft>=0.18,<0.22"]
    assert floors.floors(planted) == {"onnx": ("", "1.23"), "peft": ("", "0.18")}


def test_the_command_prints_pins_and_fails_on_an_unknown_name(capsys, tmp_path):
    assert floors.main(["--requirements", "--except", "torch"]) == 0
    lines = capsys.readouterr().out.split()
    assert "ray[serve]==2.52" in lines and not any(line.startswith("torch==") for line in lines)
    assert floors.main(["--except", "nothing-like-it"]) == 1
    assert "not a direct requirement" in capsys.readouterr().err
    bad = tmp_path / "pyproject.toml"
    bad.write_text('[project]\nname = "x"\ndependencies = ["numpy"]\n')
    assert floors.main(["--pyproject", str(bad)]) == 1
    assert "state exactly one floor" in capsys.readouterr().err
