"""The docs a user navigates stay navigable: every relative link in README.md and docs/*.md reaches an existing file
(and, for a Markdown file, an existing heading), every docs file opens with a table of contents of its headings and
is linked from the README, and the README's example commands use options their command has."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

LINK = re.compile(r"(?<!!)\[([^\]]*)\]\(([^)\s]+)\)")
FENCE = re.compile(r"^(```|~~~)")


def _prose_lines(text: str, blank_code: bool = True) -> list[tuple[int, str]]:
    """(line number, line) outside fenced code blocks, inline code spans blanked (a link in code is no link)."""
    lines, fenced = [], False
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line.lstrip()):
            fenced = not fenced
            continue
        if not fenced:
            lines.append((number, re.sub(r"`[^`]*`", lambda m: " " * len(m.group(0)), line) if blank_code else line))
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation but `-` and `_` dropped, spaces to `-`."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "").strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def headings(path: Path) -> list[tuple[int, str]]:
    """(level, text) of every ATX heading outside code blocks."""
    found = []
    for _, line in _prose_lines(path.read_text(), blank_code=False):
        match = re.match(r"(#{1,6}) +(.*?)\s*#*\s*$", line)
        if match:
            found.append((len(match.group(1)), match.group(2)))
    return found


def anchors(path: Path) -> set[str]:
    """The anchors GitHub gives a Markdown file's headings (a repeated one gets -1, -2, ...)."""
    seen: dict[str, int] = {}
    result = set()
    for _, text in headings(path):
        base = slug(text)
        count = seen.get(base, 0)
        seen[base] = count + 1
        result.add(base if count == 0 else f"{base}-{count}")
    return result


def _links(text: str) -> list[tuple[int, str]]:
    """(line, target) of every inline link; a link's text may wrap onto the next line."""
    lines = _prose_lines(text)
    joined = "\n".join(line for _, line in lines)
    starts = []
    offset = 0
    for number, line in lines:
        starts.append((offset, number))
        offset += len(line) + 1
    found = []
    for match in LINK.finditer(joined):
        line = max(n for o, n in starts if o <= match.start(2))
        found.append((line, match.group(2)))
    return found


def doc_files(root: Path) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def broken_links(root: Path) -> list[str]:
    """'file:line: target: why' for each relative link of README.md and docs/*.md that does not resolve."""
    problems = []
    for path in doc_files(root):
        for line, target in _links(path.read_text()):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:, ...: not ours to check offline
                continue
            where = f"{path.relative_to(root)}:{line}: {target}"
            file_part, _, anchor = target.partition("#")
            linked = (path.parent / file_part).resolve() if file_part else path
            if not linked.exists():
                problems.append(f"{where}: no such file")
            elif root.resolve() not in linked.resolve().parents:
                problems.append(f"{where}: outside the repository")
            elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
                problems.append(f"{where}: no heading with that anchor")
    return problems


def contents_problems(root: Path) -> list[str]:
    """Each docs file starts with '# Title', then its contents: a link to each ## and ### heading, in order."""
    problems = []
    for path in sorted((root / "docs").glob("*.md")):
        name = path.relative_to(root)
        text = path.read_text()
        if not text.startswith("# "):
            problems.append(f"{name}: does not start with a '# ' title")
        sections = [(level, title) for level, title in headings(path) if level in (2, 3)]
        if "**Contents**" not in text:
            problems.append(f"{name}: no **Contents**")
            continue
        block = text.split("**Contents**", 1)[1].lstrip("\n").split("\n\n", 1)[0]
        listed = re.findall(r"^( *)- \[[^\]]*\]\(#([^)]+)\)$", block, flags=re.M)
        wanted = [(2 + len(indent) // 2, anchor) for indent, anchor in listed]
        if wanted != [(level, slug(title)) for level, title in sections]:
            problems.append(f"{name}: its contents list {[a for _, a in wanted]}, its headings are "
                            f"{[slug(t) for _, t in sections]}")
        if sections and text.index("**Contents**") > text.index("\n## "):
            problems.append(f"{name}: the contents come after the first section")
    return problems


def unlinked_docs(root: Path) -> list[str]:
    """docs/*.md files the README does not link to."""
    linked = {(root / t.partition("#")[0]).resolve() for _, t in _links((root / "README.md").read_text())}
    return [str(p.relative_to(root)) for p in sorted((root / "docs").glob("*.md")) if p.resolve() not in linked]


def _help(command: str) -> str:
    from road_export.app.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        try:
            code = main(["help", command])
        except SystemExit as exit_:
            code = exit_.code
    assert code == 0, f"road-export help {command}: exit {code}"
    return out.getvalue()


COMMANDS = ("export", "verify", "inspect", "optimize", "adapter", "attach", "merge-checkpoint", "kernels", "serve")


def unknown_options(text: str) -> list[str]:
    """'road-export ... --x' lines of the text's bash blocks whose command has no option --x (its help lacks it)."""
    problems = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.splitlines():
            words = line.split("#", 1)[0].split()
            if not words or words[0] != "road-export":
                continue
            command = words[1] if len(words) > 1 and words[1] in COMMANDS else "export"
            helped = _help(command)
            for option in (w.split("=", 1)[0] for w in words if w.startswith("--")):
                if not re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", helped):
                    problems.append(f"{line.strip()}: road-export {command} has no {option}")
    return problems


def test_every_relative_link_resolves():
    assert broken_links(ROOT) == []


def test_a_planted_broken_link_is_caught(tmp_path):
    root = tmp_path / "repo"
    (root / "docs").mkdir(parents=True)
    (root / "docs" / "a.md").write_text("# A\n\n## Real `heading`: here\n\n[back](../README.md#set-up)\n"
                                        "[self](#real-heading-here) [gone](#gone)\n")
    (root / "README.md").write_text(
        "# R\n\n## Set-up\n\n[ok](docs/a.md#real-heading-here) [file](docs/missing.md)\n"
        "[anchor](docs/a.md#no-such) [wrapped\ntext](docs/b.md) [web](https://example.com/x.md)\n"
        "`[code](docs/none.md)`\n\n```\n[block](docs/none.md)\n```\n[up](../outside.md)\n")
    (tmp_path / "outside.md").write_text("x")
    assert broken_links(root) == [
        "README.md:5: docs/missing.md: no such file",
        "README.md:6: docs/a.md#no-such: no heading with that anchor",
        "README.md:7: docs/b.md: no such file",
        "README.md:13: ../outside.md: outside the repository",
        "docs/a.md:6: #gone: no heading with that anchor",
    ]


def test_repeated_headings_get_numbered_anchors(tmp_path):
    page = tmp_path / "p.md"
    page.write_text("# P\n\n## Notes\n\n## Notes\n\n```\n## not a heading\n```\n")
    assert anchors(page) == {"p", "notes", "notes-1"}


def test_each_docs_file_starts_with_its_contents():
    assert contents_problems(ROOT) == []


def test_a_heading_missing_from_the_contents_is_caught(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# A\n\n**Contents**\n\n- [One](#one)\n\n## One\n\n## Two\n")
    (tmp_path / "docs" / "b.md").write_text("## B without a title\n")
    problems = contents_problems(tmp_path)
    assert len(problems) == 3 and "a.md: its contents list ['one']" in problems[0], problems
    assert problems[1] == "docs/b.md: does not start with a '# ' title" and problems[2] == "docs/b.md: no **Contents**"


def test_the_readme_links_every_docs_file(tmp_path):
    assert unlinked_docs(ROOT) == []
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# A\n")
    (tmp_path / "docs" / "b.md").write_text("# B\n")
    (tmp_path / "README.md").write_text("[a](docs/a.md#x)\n")
    assert unlinked_docs(tmp_path) == ["docs/b.md"]


@pytest.mark.parametrize("name", ["README.md", *(f"docs/{p.name}" for p in sorted((ROOT / "docs").glob("*.md")))])
def test_example_commands_use_real_options(name):
    assert unknown_options((ROOT / name).read_text()) == []


def test_an_unknown_option_in_an_example_is_caught():
    text = ("```bash\nroad-export --base ./b --no-such-flag model.onnx   # --quiet in a comment is no option\n"
            "road-export serve ./d --port 8000 --fold\nroad-export verify m.onnx --against t.onnx\n```\n")
    assert unknown_options(text) == ["road-export --base ./b --no-such-flag model.onnx   # --quiet in a comment is "
                                     "no option: road-export export has no --no-such-flag",
                                     "road-export serve ./d --port 8000 --fold: road-export serve has no --fold"]
