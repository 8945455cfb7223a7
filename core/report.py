"""What every stage's reports share: Markdown tables and PNG figures, written atomically.

matplotlib is imported only by the figure functions, and always with its file-only backend (Agg): reports are made
on headless GPU hosts and in tests.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Sequence
from typing import Any

from core.io import atomic_write_bytes


def markdown_table(
    header: Sequence[str], rows: Iterable[Sequence[Any]], align: Sequence[str] | None = None
) -> list[str]:
    """A Markdown table as lines: the header, its rule, one line per row (cells as ``str``).

    ``align`` gives each column's alignment, ``l`` or ``r`` (default: all left); a row must have a cell per column.
    """
    align = align or ["l"] * len(header)
    if len(align) != len(header):
        raise ValueError(f"{len(header)} columns but {len(align)} alignments")
    lines = [
        "| " + " | ".join(map(str, header)) + " |",
        "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|",
    ]
    for row in rows:
        if len(row) != len(header):
            raise ValueError(f"a row of {len(row)} cells in a table of {len(header)} columns: {row!r}")
        lines.append("| " + " | ".join(map(str, row)) + " |")
    return lines


def subplots(*args: Any, **kwargs: Any):
    """``matplotlib.pyplot.subplots`` on the Agg backend: (figure, axes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(*args, **kwargs)


def figure_png(fig, dpi: int = 100, **savefig: Any) -> bytes:
    """The figure as PNG bytes; the figure is closed (matplotlib keeps open figures alive)."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=dpi, **savefig)
    finally:
        plt.close(fig)
    return buf.getvalue()


def save_figure(fig, path: str | os.PathLike, dpi: int = 100, **savefig: Any) -> None:
    """Write the figure as a PNG atomically and close it."""
    atomic_write_bytes(path, figure_png(fig, dpi, **savefig))
