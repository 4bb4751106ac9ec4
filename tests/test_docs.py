"""The README is the user's guide; derivations and the verification log live in docs/ (issue 17, item 8).

Checked on the text: every relative link of README.md and docs/*.md names a file of the repository (and a
heading of it, for a ``#anchor``); the README links the two documents that took its derivations and its
verification log, and holds neither itself.
"""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#+\s+(.*?)\s*$", markdown, flags=re.M)
    return {re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-") for heading in headings}


def _relative_links(path: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)  # code blocks hold no links
    return [target for target in LINK.findall(text) if not re.match(r"^[a-z]+:", target)]


def test_every_relative_link_of_the_docs_names_a_file_and_heading_that_exist():
    documents = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    broken, checked = [], 0
    for document in documents:
        for target in _relative_links(document):
            checked += 1
            file_part, _, anchor = target.partition("#")
            linked = (document.parent / file_part).resolve() if file_part else document
            if not linked.exists():
                broken.append(f"{document.name}: {target} (no such file)")
            elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked.read_text(encoding="utf-8")):
                broken.append(f"{document.name}: {target} (no such heading)")
    assert checked >= 10 and broken == []


def test_the_readme_links_the_derivations_and_the_verification_log_instead_of_holding_them():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "(docs/WAN.md" in readme and "(docs/VERIFICATION.md)" in readme
    wan = (ROOT / "docs" / "WAN.md").read_text(encoding="utf-8")
    assert "## The update under flow matching" in wan and "## UniPC's corrector and guided edits" in wan
    # The derivation's own formulas and the log's "Verified here" paragraphs stay out of the guide.
    for text in ("x_t = (1 - sigma) x_0 + sigma eps", "alpha^2 + beta^2 = 1", "**Verified here**", "Verified here:"):
        assert text not in readme, text
    assert "x_t = (1 - sigma) x_0 + sigma eps" in wan
