"""`python -m benchmarks [topic ...] [--flag value ...]`: run benchmarks/bench_<topic>.py (all by default) and print one
table per topic.

Each bench module exposes `run() -> list[dict]` (one dict per row, columns as keys). Peers (SAELens,
dictionary_learning, sparsify) appear as rows of the same table, measured in the same run on the same
machine; a peer that cannot run here has a row that says why.
"""

from __future__ import annotations

import importlib
import os
import platform
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table


def topics() -> list[str]:
    """Names of the bench modules beside this file (bench_load.py -> load)."""
    return sorted(p.stem.removeprefix("bench_") for p in Path(__file__).parent.glob("bench_*.py"))


def render(topic: str, rows: list[dict], seconds: float) -> Table:
    """A rich table of a topic's rows, columns in first-seen order."""
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    table = Table(title=f"{topic} ({seconds:.0f} s)", title_justify="left")
    for c in columns:
        table.add_column(c)
    for row in rows:
        table.add_row(*(_cell(row.get(c)) for c in columns))
    return table


def _cell(v: object) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


FLAGS = {"--quick"}
"""The bench modules' options that take no value."""


def _topic_args(argv: list[str]) -> list[str]:
    """The topics named in argv; `--flag value` pairs are the bench modules' own options (read from sys.argv)."""
    names, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg.startswith("--"):
            skip = "=" not in arg and arg not in FLAGS       # the next arg is this option's value
        else:
            names.append(arg)
    return names


def main(argv: list[str]) -> int:
    import torch

    # COLUMNS widens the table in a file as on a terminal (rich alone reads it only on a terminal)
    columns = os.environ.get("COLUMNS", "")
    console = Console(width=int(columns) if columns.isdigit() else None if sys.stdout.isatty() else 200)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    console.print(f"python {platform.python_version()}, torch {torch.__version__}, {device}, "
                  f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    failed = 0
    for topic in _topic_args(argv) or topics():
        start = time.perf_counter()
        try:
            rows = importlib.import_module(f"benchmarks.bench_{topic}").run()
        except Exception as exc:  # one broken benchmark must not hide the others' tables
            console.print(f"[red]{topic}: failed: {type(exc).__name__}: {exc}[/]")
            failed += 1
            continue
        console.print(render(topic, rows, time.perf_counter() - start))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
