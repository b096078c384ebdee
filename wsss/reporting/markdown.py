"""Cell formatting and GitHub-flavoured Markdown tables for the report."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

DASH = "—"  # a number that was not run (or has no paper value)


def pct(value: float | None, digits: int = 2) -> str:
    """A fraction in [0, 1] as a percentage, or "—"."""
    return DASH if value is None else f"{100 * value:.{digits}f}"


def _paper(value: float | None) -> str:
    return DASH if value is None else f"{value:.2f}"


def cell(ours: float | None, paper: float | None) -> str:
    """``ours (paper)``: ours a fraction (shown in %), the paper's already in %."""
    return f"{pct(ours)} ({_paper(paper)})"


def md_table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A GitHub-flavoured Markdown table (``|`` inside cells escaped)."""
    def esc(text: object) -> str:
        return str(text).replace("|", "\\|")

    lines = ["| " + " | ".join(esc(h) for h in headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
