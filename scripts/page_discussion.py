"""The hand-written discussion of docs/results.md: kept when the page is regenerated, stamped with
what it was written for, and checked against the generated sections.

Its opening marker records the runs it was written for (budget and the commit that made them); a
page regenerated for other runs gets a visible banner above it, and so does a discussion that cites
a number the generated sections do not hold (``missing_numbers``)."""

from __future__ import annotations

import re
from pathlib import Path

BEGIN = "<!-- discussion (written for: {stamp}); kept when the page is regenerated -->"
END = "<!-- end of discussion -->"
_BEGIN_RE = re.compile(r"<!-- discussion(?: \(written for: (?P<stamp>[^)]*)\))?[^>]*-->")
NOT_WRITTEN = "_(not written yet)_"


def kept_discussion(page: Path) -> tuple[str, str | None]:
    """The hand-written discussion of an existing page and the stamp it was written for."""
    text = page.read_text() if page.is_file() else ""
    match = _BEGIN_RE.search(text)
    if not match or END not in text[match.end() :]:
        return NOT_WRITTEN, None
    body = text[match.end() : text.index(END, match.end())].strip("\n")
    return body, match.group("stamp")


_NUMBER = re.compile(r"(?<![\w.])[-+−]?\d[\d,]*(?:\.\d+)?(?![\w])")


def _numbers(text: str) -> set[str]:
    return {n.lstrip("+-−").replace(",", "") for n in _NUMBER.findall(text)}


def missing_numbers(discussion: str, generated: str) -> list[str]:
    """Numbers the discussion cites (any with a decimal point, and integers of 100 or more) that
    the generated sections do not print, sign aside: a stale or mistyped citation."""
    cited = {n for n in _numbers(discussion) if "." in n or int(n) >= 100}
    return sorted(cited - _numbers(generated), key=lambda n: float(n))


def discussion_section(body: str, written_for: str | None, current: str, generated: str) -> str:
    """The discussion under its marker, with a banner when it was written for other runs or cites
    numbers the tables do not hold."""
    banners = []
    if body != NOT_WRITTEN and written_for != current:
        banners.append(
            f"> **Stale discussion:** written for {written_for or 'unrecorded runs'}; the numbers below are "
            f"for {current}. Read it against the tables, or rewrite it and update its marker."
        )
    missing = missing_numbers(body, generated) if body != NOT_WRITTEN else []
    if missing:
        banners.append(f"> **The discussion cites numbers the tables do not hold:** {', '.join(missing)}.")
    stamp_for = current if body == NOT_WRITTEN else written_for or "unrecorded runs"
    banner = "".join(f"{b}\n\n" for b in banners)
    return f"\n## Discussion\n\n{banner}{BEGIN.format(stamp=stamp_for)}\n{body}\n{END}\n"
