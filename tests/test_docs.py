"""The documentation's links and the commands other files rely on (plain text checks: no JAX, well under a second).

* Every relative link in README.md, docs/, benchmarks/ and benchmarks/results/ points at a file or folder that
  exists, and a `#fragment` at a heading of that Markdown file (GitHub's anchor rules); links inside code are
  not links.
* The README's test command is the one `.ci/run` runs.
* docs/export.md shows the README's deployment snippet (the one tests/test_export.py runs) unchanged.
"""

from __future__ import annotations

import pathlib
import re
import urllib.parse

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
DOCS = sorted([REPO / "README.md", *(REPO / "docs").glob("*.md"), *(REPO / "benchmarks").glob("*.md"),
               *(REPO / "benchmarks" / "results").glob("*.md")])
FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.M | re.S)
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def prose(text: str) -> str:
    """The text without fenced code blocks and inline code spans."""
    text = FENCE.sub("", text)
    return re.sub(r"(`+)(?:(?!\1).)+?\1", "", text, flags=re.S)


def slug(heading: str) -> str:
    """GitHub's heading anchor: lower case, markup and punctuation dropped (letters, digits, '_', '-' and spaces
    kept), spaces to '-'."""
    text = re.sub(r"`([^`]*)`", r"\1", heading.strip())
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)     # a link in a heading keeps its text
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


def anchors(path: pathlib.Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in FENCE.sub("", path.read_text()).splitlines():
        m = re.match(r" {0,3}#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            s = slug(m.group(1))
            n = seen.get(s, 0)
            seen[s] = n + 1
            out.add(s if n == 0 else f"{s}-{n}")
    return out


def relative_links(path: pathlib.Path) -> list[str]:
    links = LINK.findall(prose(path.read_text()))
    return [t for t in links if not re.match(r"[a-z][a-z0-9+.-]*:", t, re.I)]  # http:, https:, mailto: ...


def test_the_docs_exist():
    names = {p.relative_to(REPO).as_posix() for p in DOCS}
    assert {"README.md", "benchmarks/RESULTS.md", "docs/training.md", "docs/data.md", "docs/devices.md",
            "docs/export.md", "docs/weights.md", "docs/performance.md", "docs/development.md"} <= names


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.relative_to(REPO).as_posix())
def test_relative_links_resolve(doc):
    broken = []
    for target in relative_links(doc):
        raw_path, _, fragment = target.partition("#")
        dest = (doc.parent / urllib.parse.unquote(raw_path)).resolve() if raw_path else doc
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif REPO not in dest.parents and dest != REPO:
            broken.append(f"{target}: outside the repository")
        elif fragment and dest.suffix == ".md" and urllib.parse.unquote(fragment) not in anchors(dest):
            broken.append(f"{target}: no heading with that anchor in {dest.relative_to(REPO)}")
    assert not broken, f"{doc.relative_to(REPO)}: " + "; ".join(broken)


def test_the_link_checker_sees_links():
    """The checks above would pass vacuously if the regexes found nothing."""
    readme = relative_links(REPO / "README.md")
    assert "docs/training.md" in readme and "benchmarks/RESULTS.md" in readme
    assert slug("2026-12-01 02:00–02:12 UTC: one process × 4 devices, `--freeze 6`") == \
        "2026-12-01-02000212-utc-one-process--4-devices---freeze-6"


def bash_blocks(text: str) -> list[str]:
    return [b.strip() for b in re.findall(r"^```bash\n(.*?)^```", text, re.M | re.S)]


def test_readme_test_command_is_what_ci_runs():
    ci = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()
          if line.strip() and not line.startswith("#")]
    command = ci[-1]
    assert "pytest" in command
    assert command in bash_blocks((REPO / "README.md").read_text())


def python_block_with(text: str, marker: str) -> str:
    (block,) = [b for b in re.findall(r"^```python\n(.*?)^```", text, re.M | re.S) if marker in b]
    return block


def test_export_doc_shows_the_tested_snippet():
    marker = 'EvalTransform(**meta["preprocess"])'
    readme = (REPO / "README.md").read_text()
    assert python_block_with(readme[readme.index("## Export and deployment"):], marker) == \
        python_block_with((REPO / "docs" / "export.md").read_text(), marker)
