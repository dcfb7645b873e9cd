"""The README and docs/ as a reader follows them: the contents list every section in order, every
link inside the repository leads somewhere, and nothing points at files a clone does not have."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").rglob("*.md"))
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def headings(text: str, level: str = "#") -> list[str]:
    """Markdown headings outside code fences (`level` "#" for all, "## " for sections)."""
    out, fence = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            fence = not fence
        elif not fence and line.startswith(level):
            out.append(line)
    return out


def anchor(heading: str) -> str:
    """GitHub's anchor of a heading line: lower case, punctuation out, spaces to hyphens."""
    title = heading.lstrip("#").strip().lower()
    return re.sub(r"[^\w\- ]", "", title).replace(" ", "-")


def test_the_contents_list_every_section_in_order() -> None:
    text = README.read_text()
    sections = [h for h in headings(text, "## ") if h != "## Contents"]
    block = text.split("## Contents\n", 1)[1].split("\n\n", 1)[0]
    listed = re.findall(r"^- \[.*\]\(#([^)]+)\)$", block, re.MULTILINE)
    expected = [anchor(h) for h in sections]
    assert listed == expected, (
        "README.md: the '## Contents' list must name every '## ' section, in order: "
        f"add or move '- [Title](#anchor)' lines (missing: {sorted(set(expected) - set(listed))})"
    )


def test_links_inside_the_repository_lead_somewhere() -> None:
    for page in [README, *DOCS]:
        text = page.read_text()
        anchors = {anchor(h) for h in headings(text)}
        for target in LINK.findall(text):
            assert "/shared" not in target, f"{page.name}: {target} is not in a clone"
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            path, _, fragment = target.partition("#")
            if path:
                linked = (page.parent / path).resolve()
                assert linked.exists(), f"{page.name}: {target} does not exist"
                if fragment and linked.suffix == ".md":
                    theirs = {anchor(h) for h in headings(linked.read_text())}
                    assert fragment in theirs, f"{page.name}: no heading for {target}"
            else:
                assert fragment in anchors, f"{page.name}: no heading for #{fragment}"
