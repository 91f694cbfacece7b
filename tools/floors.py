"""The declared lowest versions: `name==floor` for every direct requirement of pyproject.toml.

    python tools/floors.py > floors.txt          pip constraints: pip install -c floors.txt -e ".[test]"
    python tools/floors.py --requirements --except onnxruntime-genai torch > floors.txt
        requirement lines, extras kept (ray[serve]==2.52): pip install -r floors.txt && pip install --no-deps -e .

Reads `[project] dependencies` and every `[project.optional-dependencies]` extra (the package's own extras, such as
`road-export[export]`, are expanded through those lists), so the floors CI installs are the ones users are promised
and cannot drift from them. Every requirement must state a floor (`>=X`); one without fails here, naming it, and
exits 1. Extras of a requirement (`ray[serve]`) are dropped, as pip constraints take none. The transitive
dependencies are left to pip: this is `--resolution lowest-direct` for the direct ones.
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?\s*(.*?)\s*(;.*)?$")


def requirements(pyproject: dict) -> list[str]:
    """Every direct requirement string of the base dependencies and all extras, the package's own extras left out."""
    project = pyproject["project"]
    own = project["name"]
    found = list(project.get("dependencies", []))
    for extra in project.get("optional-dependencies", {}).values():
        found += [r for r in extra if _canonical(REQUIREMENT.match(r).group(1)) != _canonical(own)]
    return found


def floors(pyproject: dict) -> dict[str, tuple[str, str]]:
    """{canonical name: (its extras such as "[serve]" or "", the version of its `>=` specifier)}; ValueError naming
    each requirement without one, or with two different floors for the same package."""
    out: dict[str, tuple[str, str]] = {}
    problems = []
    for requirement in requirements(pyproject):
        match = REQUIREMENT.match(requirement)
        name, extras, specifiers = _canonical(match.group(1)), match.group(2) or "", match.group(3)
        lows = [s.strip()[2:].strip() for s in specifiers.split(",") if s.strip().startswith(">=")]
        if len(lows) != 1:
            problems.append(f"{requirement!r}: state exactly one floor (>=X), the version CI installs")
        elif out.setdefault(name, (extras, lows[0]))[1] != lows[0]:
            problems.append(f"{requirement!r}: a second floor for {name} ({out[name][1]} elsewhere)")
    if problems:
        raise ValueError("; ".join(problems))
    return out


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requirements", action="store_true", help="requirement lines with extras, not constraints")
    parser.add_argument("--except", dest="skip", nargs="*", default=[], metavar="NAME", help="leave these out")
    parser.add_argument("--pyproject", type=Path, default=ROOT / "pyproject.toml")
    args = parser.parse_args(argv)
    try:
        pins = floors(tomllib.loads(args.pyproject.read_text()))
    except ValueError as e:
        print(f"{args.pyproject}: {e}", file=sys.stderr)
        return 1
    unknown = {_canonical(n) for n in args.skip} - set(pins)
    if unknown:
        print(f"--except {' '.join(sorted(unknown))}: not a direct requirement of {args.pyproject}", file=sys.stderr)
        return 1
    skip = {_canonical(n) for n in args.skip}
    print("\n".join(f"{name}{extras if args.requirements else ''}=={version}"
                    for name, (extras, version) in sorted(pins.items()) if name not in skip))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
