"""What the commands print: two consoles (messages on stderr, results on stdout), the progress
bar that library loops add tasks to, and the table of retrieval metrics."""
from __future__ import annotations

from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

console = Console(stderr=True)
out_console = Console()


@contextmanager
def progress_bar():
    """A rich progress display that library loops add tasks to."""
    with Progress(
        TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=False,
    ) as p:
        yield p


def results_table(title: str, results: dict) -> Table:
    """One line per (row, direction): R@1, R@5, R@10 (percent), MdR, MnR; Rsum per row."""
    table = Table(title=title)
    for col in ("row", "dir", "R@1", "R@5", "R@10", "MdR", "MnR", "Rsum"):
        table.add_column(col, justify="left" if col in ("row", "dir") else "right", no_wrap=True)
    for row, r in results.items():
        for d in ("t2v", "v2t"):
            cells = [f"{r[d][m]:.1f}" for m in ("R@1", "R@5", "R@10", "MdR", "MnR")]
            table.add_row(row if d == "t2v" else "", d, *cells, f"{r['Rsum']:.1f}" if d == "t2v" else "")
    return table
