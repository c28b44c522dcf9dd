"""The documentation: the README stays a front page, every relative link of the README and of
docs/ leads somewhere, and the repository cites its own docs/ pages, not outside notes."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
FRONT_PAGE_BYTES = 16_000
# written split, so that this file does not match itself
FORBIDDEN = ("DESIGN" + ".md", "PAPER" + ".md", "STYLE" + ".md", "DESIGN" + " §")
SCANNED = ("scalebio_core", "notebooks", "benchmarks", "tests", "docs")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def _prose(text: str) -> str:
    """Markdown without fenced code blocks and inline code (where brackets are not links)."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def _anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.S | re.M)
    return {_anchor(h) for h in re.findall(r"^#{1,6}\s+(.*)$", text, flags=re.M)}


def _links(path: Path) -> list[str]:
    return LINK.findall(_prose(path.read_text()))


def test_the_docs_exist_and_the_readme_links_every_page():
    names = {p.name for p in DOCS}
    assert {"architecture.md", "algorithm.md", "paper.md", "run-folder.md", "cli.md"} <= names
    assert "config.md" in names
    linked = {Path(t.split("#")[0]).name for t in _links(README) if t.startswith("docs/")}
    assert names <= linked, f"docs pages the README does not link: {sorted(names - linked)}"


def test_readme_is_a_front_page():
    size = len(README.read_bytes())
    assert size < FRONT_PAGE_BYTES, f"README.md is {size} bytes; move sections into docs/"


def test_every_relative_link_points_to_an_existing_file():
    broken = []
    for page in [README, *DOCS]:
        for target in _links(page):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
                continue
            file, _, anchor = target.partition("#")
            dest = (page.parent / file).resolve() if file else page
            if not dest.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_no_file_cites_notes_outside_the_repository():
    files = [README] + [
        p
        for d in SCANNED
        for p in sorted((ROOT / d).rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".png"
    ]
    found = []
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        found += [f"{path.relative_to(ROOT)}: {s}" for s in FORBIDDEN if s in text]
    assert len(files) > 50 and not found, "cite the docs/ page instead:\n" + "\n".join(found)
