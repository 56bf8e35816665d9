"""Tables for terminals, drawn by rich (scripts use --json instead).

The same text on a terminal and in a pipe: columns of the widest cell, two spaces apart, upper-case
titles, no borders, nothing wrapped (a long cell is cut at ``max_width`` with "…"). On a terminal
the titles are bold; in a pipe there is no escape code at all, so ``grep`` and ``awk`` read it.
"""

import io
import re
import sys

from rich.console import Console
from rich.table import Table

_STYLED_PADDING = re.compile(r"(\x1b\[[0-9;]*m\s*\x1b\[0m)+$")  # a styled title's padding at a line's end


def table(rows: list[dict], columns: list[str], headers: dict | None = None, max_width: int = 60,
          styled: bool | None = None) -> str:
    """``rows`` as a table of ``columns`` (``headers`` renames titles); ``styled``: bold titles (default:
    when stdout is a terminal)."""
    headers = headers or {}
    styled = sys.stdout.isatty() if styled is None else styled
    grid = Table(box=None, pad_edge=False, padding=(0, 2, 0, 0), show_edge=False,
                 header_style="bold" if styled else "")
    for col in columns:
        grid.add_column(headers.get(col, col).upper(), no_wrap=True, overflow="ignore")
    for row in rows:
        grid.add_row(*(_cell(row.get(col), max_width) for col in columns))
    out = io.StringIO()
    console = Console(file=out, width=100_000, force_terminal=styled, color_system="standard" if styled else None,
                      highlight=False, markup=False, emoji=False, soft_wrap=False)
    console.print(grid)
    return "\n".join(_STYLED_PADDING.sub("", line.rstrip()).rstrip() for line in out.getvalue().rstrip("\n").splitlines())


def _cell(value, max_width: int) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.2f}"
    text = " ".join(str(value).split())
    return text if len(text) <= max_width else text[: max_width - 1] + "…"
