"""docs/: every reference to a docs page, from code, tests, help texts and READMEs, names a page and a
section that exist, and every relative link in the project's Markdown resolves inside the project."""

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS_REFERENCE = re.compile(r"docs/([a-z_]+\.md)(?:#([a-z0-9-]+))?")
MARKDOWN_LINK = re.compile(r"\]\(([^)\s]+)\)")
# Folders of a source copy that are not sources: environments, caches, outputs (.gitignore's).
NOT_SOURCES = {".venv", "__pycache__", ".pytest_cache", "logs", ".cache", "synthetic", "fineweb10B"}


def git_files(*patterns):
    """What git tracks, or would track, of the project's files matching the patterns."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", *patterns],
                            cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    return sorted(ROOT / name for name in listed if (ROOT / name).is_file())


def walked_files(*patterns):
    """The files matching the patterns outside the folders that hold no sources."""
    return sorted(path for pattern in patterns for path in ROOT.rglob(pattern)
                  if path.is_file() and not NOT_SOURCES.intersection(path.relative_to(ROOT).parts))


def project_files(*patterns):
    """git's list where there is one; a copy of the sources without .git is walked."""
    return git_files(*patterns) if (ROOT / ".git").exists() else walked_files(*patterns)


def heading_anchors(page):
    """The anchors GitHub gives the page's headings: lower case, punctuation dropped, spaces to '-'."""
    anchors = set()
    for line in page.read_text(encoding="utf-8").splitlines():
        match = re.match(r"#+\s+(.*)", line)
        if match:
            title = re.sub(r"[^\w\- ]", "", match.group(1).strip().lower())
            anchors.add(title.replace(" ", "-"))
    return anchors


def test_every_docs_reference_names_an_existing_section():
    references = []
    for path in project_files("*.py", "*.md", "*.sh"):
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            references += [(path, number, page, anchor) for page, anchor in DOCS_REFERENCE.findall(line)]
    assert len(references) > 50  # the code points at its docs all over
    anchors = {page.name: heading_anchors(page) for page in (ROOT / "docs").glob("*.md")}
    broken = [f"{path.relative_to(ROOT)}:{number}: docs/{page}#{anchor}" for path, number, page, anchor in references
              if page not in anchors or (anchor and anchor not in anchors[page])]
    assert not broken, broken


def test_relative_markdown_links_resolve_inside_the_project():
    broken = []
    for path in project_files("*.md"):
        for target in MARKDOWN_LINK.findall(path.read_text(encoding="utf-8")):
            if re.match(r"[a-z]+:", target):
                continue  # a web address
            file_part, _, anchor = target.partition("#")
            resolved = (path.parent / file_part).resolve() if file_part else path
            inside = resolved.is_relative_to(ROOT) and resolved.exists()
            if not inside or (anchor and resolved.suffix == ".md" and anchor not in heading_anchors(resolved)):
                broken.append(f"{path.relative_to(ROOT)}: {target}")
    assert not broken, broken


@pytest.mark.skipif(not (ROOT / ".git").exists(), reason="a source copy without .git has only the walk")
def test_walking_a_source_copy_finds_what_git_lists():
    assert walked_files("*.py", "*.md", "*.sh") == git_files("*.py", "*.md", "*.sh")


def test_the_docs_pages_have_the_sections_the_code_links():
    assert {"rules-and-statistics", "data", "model", "initialization", "training-loop",
            "log-format"} <= heading_anchors(ROOT / "docs" / "benchmark.md")
    assert {"polar-factor", "muon", "normuon", "aurora", "variants"} <= heading_anchors(ROOT / "docs" / "recipes.md")
    assert {"neuron-death", "leverage"} <= heading_anchors(ROOT / "docs" / "diagnostics.md")


def test_every_test_the_refusals_page_names_exists():
    """docs/refusals.md names the test of each refusal; a test renamed or removed would leave a row that
    points nowhere."""
    named = set(re.findall(r"\b(test_[a-z0-9_]+)\b(?!\.py)", (ROOT / "docs" / "refusals.md").read_text(encoding="utf-8")))
    defined = {name for path in (ROOT / "tests").glob("test_*.py")
               for name in re.findall(r"^def (test_[a-z0-9_]+)", path.read_text(encoding="utf-8"), re.M)}
    assert len(named) > 100 and not named - defined, sorted(named - defined)
