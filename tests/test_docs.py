"""The documentation holds together: every relative link resolves (files and #anchors), the README stays a front door
(small, its two set-up commands first), and CI runs exactly the README's test command. Torch-free and fast."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = REPO / "docs"
README_LIMIT = 25_000  # bytes
MIN_DOC_PAGES = 5

FENCE = re.compile(r"^\s*(```|~~~)")
LINK = re.compile(r"(?<!\!)\[([^\]]*)\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
IMAGE = re.compile(r"!\[([^\]]*)\]\(([^)\s]+)\)")


def markdown_files() -> list[Path]:
    """README.md, DEVELOPERS.md, benchmarks/RESULTS.md and every page under docs/."""
    files = [README, REPO / "DEVELOPERS.md", REPO / "benchmarks" / "RESULTS.md", *sorted(DOCS.glob("*.md"))]
    return [f for f in files if f.is_file()]


def prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks, with inline code removed (links in code are not links; a code span may
    run over a line break)."""
    prose = "\n".join(prose_lines_keeping_code(text))
    return re.sub(r"`[^`]*`", lambda m: "\n" * m.group(0).count("\n"), prose).splitlines()


def anchor(heading: str) -> str:
    """GitHub's anchor for a heading: the rendered text, lowercased, punctuation dropped (letters, digits, '_', '-'
    and spaces kept), spaces to '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link: its text
    text = text.replace("`", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every anchor a markdown file's headings make (repeated headings get -1, -2, ... as on GitHub)."""
    seen: dict[str, int] = {}
    out = set()
    for line in prose_lines_keeping_code(path.read_text(encoding="utf-8")):
        m = re.match(r"^(#{1,6})\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        base = anchor(m.group(2))
        n = seen.get(base, 0)
        out.add(base if n == 0 else f"{base}-{n}")
        seen[base] = n + 1
    return out


def prose_lines_keeping_code(text: str) -> list[str]:
    """Lines outside fenced code blocks, inline code kept (headings keep their code spans' text)."""
    out, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            out.append(line)
    return out


def broken_links(path: Path, root: Path = REPO) -> list[str]:
    """Relative links in `path` whose file, folder or #anchor does not exist (or lies outside `root`), each as
    'file: target (why)'."""
    problems = []
    for line in prose_lines(path.read_text(encoding="utf-8")):
        for m in [*LINK.finditer(line), *IMAGE.finditer(line)]:
            target = m.group(2)
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:, ...
                continue
            where, _, fragment = target.partition("#")
            dest = (path.parent / where).resolve() if where else path
            name = f"{path.relative_to(root)}: {target}"
            if not dest.exists():
                problems.append(f"{name} (no such file or folder)")
            elif root.resolve() not in dest.parents and dest != root.resolve():
                problems.append(f"{name} (outside the repository)")
            elif fragment:
                if dest.suffix != ".md":
                    problems.append(f"{name} (an anchor into a file that is not markdown)")
                elif fragment not in anchors(dest):
                    problems.append(f"{name} (no heading with anchor #{fragment})")
    return problems


def code_blocks(text: str) -> list[list[str]]:
    """The fenced code blocks of a markdown text, as lists of lines."""
    blocks, current = [], None
    for line in text.splitlines():
        if FENCE.match(line):
            if current is None:
                current = []
            else:
                blocks.append(current)
                current = None
        elif current is not None:
            current.append(line)
    return blocks


def commands(block: list[str]) -> list[str]:
    """The commands of a shell block: its lines that are not blank or comments, trailing comments dropped."""
    out = []
    for line in block:
        line = line.strip()
        if line and not line.startswith("#"):
            out.append(re.sub(r"\s+#\s.*$", "", line))
    return out


def readme_commands() -> list[str]:
    blocks = code_blocks(README.read_text(encoding="utf-8"))
    assert blocks, "README.md has no code block"
    return commands(blocks[0])


# ------------------------------------------------------------------------------------------------------- the tests


def test_the_anchor_rule_is_githubs():
    assert anchor("Long runs and clusters") == "long-runs-and-clusters"
    assert anchor("2026-11-22: real DINOv2-S on CamVid") == "2026-11-22-real-dinov2-s-on-camvid"
    assert anchor("The weights' dtype") == "the-weights-dtype"
    assert anchor("`phreg estimate`") == "phreg-estimate"
    assert anchor("CLIP: dense heads and zero-shot segmentation") == "clip-dense-heads-and-zero-shot-segmentation"


@pytest.mark.parametrize("page", markdown_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(page):
    assert broken_links(page) == []


def test_the_link_check_sees_what_is_broken(tmp_path):
    """The checker itself can fail: a dead file link, a dead anchor and a link out of the tree are found; links in
    code are not links."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "other.md").write_text("# Other page\n\n## A section\n", encoding="utf-8")
    page = tmp_path / "docs" / "page.md"
    page.write_text("# Probe\n\n[gone](no_such_page.md) [bad](other.md#no-such-heading) [out](../../x.md)\n"
                    "[fine](other.md#a-section) [here](#probe) [up](../docs/)\n"
                    "`[in code](nowhere.md)`\n```\n[in a block](nowhere.md)\n```\n", encoding="utf-8")
    found = broken_links(page, tmp_path)
    assert len(found) == 3, found
    assert "no_such_page.md (no such file or folder)" in found[0]
    assert "(no heading with anchor #no-such-heading)" in found[1]
    assert "../../x.md" in found[2]


def test_readme_is_a_front_door():
    size = len(README.read_bytes())
    assert size <= README_LIMIT, f"README.md is {size:,} bytes; move detail to docs/ (limit {README_LIMIT:,})"


def test_docs_has_the_guides():
    pages = sorted(p.name for p in DOCS.glob("*.md"))
    assert len(pages) >= MIN_DOC_PAGES, pages
    for page in DOCS.glob("*.md"):
        first = next(line for line in page.read_text(encoding="utf-8").splitlines() if line.strip())
        assert first.startswith("# "), f"{page.name} starts with a title"


def test_readme_starts_with_its_two_commands():
    """The first code block's first two commands: the quickstart (the package alone) and the tests (with [test]),
    each doing all set-up on a fresh machine; the offline-weights and CPU-torch steps come before them."""
    quickstart, tests = readme_commands()[:2]
    assert quickstart.startswith("python3 -m venv .venv && .venv/bin/pip install")
    assert quickstart.endswith(".venv/bin/phreg distill recipes/quickstart.yaml")
    assert "[test]" not in quickstart, "the quickstart installs the package alone"
    assert tests.startswith("python3 -m venv .venv && .venv/bin/pip install")
    assert "'.[test]'" in tests and tests.endswith("-m pytest -q")
    before = README.read_text(encoding="utf-8").split("```", 1)[0]
    assert "checkpoints/vit_small_patch14_dinov2.safetensors" in before and "model.checkpoint=" in before
    assert "download.pytorch.org/whl/cpu" in before
    assert '-m pytest -q -m "not slow"' in README.read_text(encoding="utf-8")


def test_ci_runs_the_readme_test_command_verbatim():
    tests = readme_commands()[1]
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    run_lines = [line.strip() for line in ci.splitlines() if line.strip() and not line.strip().startswith("#")]
    assert tests in run_lines, f".ci/run does not run the README's test command:\n{tests}"


def test_docs_name_every_file_an_upload_can_hold():
    """docs/publishing.md's list of what `push` uploads names every file `stage` can write."""
    from phreg.hub.publish import FILES

    text = " ".join((DOCS / "publishing.md").read_text(encoding="utf-8").split("## Pushing to the Hub", 1)[1]
                    .split("\n## ", 1)[0].split())
    said = text.split("It holds", 1)[1].split("nothing else", 1)[0]
    for name in FILES:
        if name != "preprocessor_config.json":  # transformers' files: named in the --format paragraph after it
            assert f"`{name}`" in said, name
