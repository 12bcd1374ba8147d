"""The README and docs/ link to files and headings that exist (GitHub's heading anchors), say
nothing of issues or of figures still to come, and hold the memory model's table as it prints it."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "infra" / "README.md"]


def anchors(page: Path) -> set[str]:
    """GitHub's anchors of a page's headings: lower case, punctuation dropped, spaces to dashes."""
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
            for h in re.findall(r"^#{1,6} (.+)$", text, flags=re.M)}


def test_every_link_reaches_a_file_and_heading():
    broken = []
    for page in PAGES:
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+://", target):
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and file.suffix == ".md" and anchor not in anchors(file):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert broken == []


def test_no_text_refers_to_issues_or_promises_figures():
    stale = [f"{page.relative_to(ROOT)}: {line.strip()}" for page in PAGES for line in page.read_text().splitlines()
             if re.search(r"\bthe issue\b|\bissue \d+|figures go here|until the planned", line, flags=re.I)]
    assert stale == []


def test_readme_memory_table_is_the_memory_models():
    """The README's parameters and bf16 memory per stage are generated, never typed: the table as the
    stage memory model prints it now (`python -m kandinsky_engine.memory_table`), every family's stages."""
    from kandinsky_engine.families import FAMILIES
    from kandinsky_engine.memory_table import table

    printed = table()
    assert printed in (ROOT / "README.md").read_text(), "regenerate it: python -m kandinsky_engine.memory_table"
    for family in FAMILIES.values():
        assert f"| {family.title} (" in printed
