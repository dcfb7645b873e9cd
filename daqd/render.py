"""Plain-text rendering shared by `daqctl` and `daqd demo`: tables, sizes, durations, counts.

Standard library only (daqctl imports it on every call and must answer in well under 250 ms).
"""

from __future__ import annotations

from collections.abc import Sequence

_SIZE_UNITS = ("B", "kB", "MB", "GB", "TB")


def size(n: float) -> str:
    """Bytes in decimal units: `512 B`, `1.5 kB`, `12.0 MB` (TB and beyond in TB)."""
    for unit in _SIZE_UNITS:
        if abs(n) < 1000 or unit == _SIZE_UNITS[-1]:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")  # the last unit always returns


def duration(seconds: float) -> str:
    """Whole seconds as the two or three largest units: `42s`, `3m 5s`, `2h 0m 7s`, `1d 3h 0m`."""
    rest = max(int(seconds), 0)
    d, rest = divmod(rest, 86400)
    h, rest = divmod(rest, 3600)
    m, s = divmod(rest, 60)
    if d:
        return f"{d}d {h}h {m}m"
    if h:
        return f"{h}h {m}m {s}s"
    if m:
        return f"{m}m {s}s"
    return f"{s}s"


def table(rows: Sequence[Sequence[str]], right: Sequence[int] = (), indent: str = "") -> list[str]:
    """Rows (the first is the header) as aligned lines, two spaces between columns; the column
    indexes in `right` are right-aligned (numbers). Trailing blanks are cut."""
    if not rows:
        return []
    columns = max(len(r) for r in rows)
    cells = [[*r, *([""] * (columns - len(r)))] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(columns)]
    lines = []
    for r in cells:
        parts = [
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        ]
        lines.append((indent + "  ".join(parts)).rstrip())
    return lines


def reasons(counts: object) -> str:
    """A {reason: n} map as `total (a=1,b=2)`; `0` when there is nothing."""
    if not isinstance(counts, dict) or not counts:
        return "0"
    total = sum(v for v in counts.values() if isinstance(v, int))
    detail = ",".join(f"{k}={v}" for k, v in sorted(counts.items()) if v)
    return f"{total} ({detail})" if detail else str(total)
