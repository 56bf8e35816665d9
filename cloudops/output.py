"""Plain-text tables for terminals (scripts use --json instead)."""


def table(rows: list[dict], columns: list[str], headers: dict | None = None, max_width: int = 60) -> str:
    headers = headers or {}
    cells = [[_cell(row.get(col), max_width) for col in columns] for row in rows]
    titles = [headers.get(col, col).upper() for col in columns]
    widths = [max([len(t)] + [len(r[i]) for r in cells]) for i, t in enumerate(titles)]
    lines = ["  ".join(t.ljust(w) for t, w in zip(titles, widths)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    return "\n".join(lines)


def _cell(value, max_width: int) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.2f}"
    text = " ".join(str(value).split())
    return text if len(text) <= max_width else text[: max_width - 1] + "…"
