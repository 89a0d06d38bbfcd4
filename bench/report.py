"""Benchmark reports: number formats, Markdown tables, progress lines and the machine they ran on.

Percentiles are the service's own definition (callweaver.engine.metrics.nearest_rank)."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

from callweaver.engine.metrics import nearest_rank as percentile


def describe(exc: BaseException) -> str:
    """An error kind for the tables: the exception type and the start of its message."""
    text = str(exc).splitlines()[0][:90] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def fmt_ms(value: float | None, digits: int = 1) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    """A GitHub-flavoured Markdown table; cells are str()-ed as given."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def progress(message: str) -> None:
    """Progress goes to stderr so stdout holds only the tables."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def machine_summary() -> str:
    """Date, CPU count and model, Python version: the context every table needs."""
    import platform
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{time.strftime('%Y-%m-%d %H:%M %Z')}, {os.cpu_count()} CPUs ({model or platform.machine()}), "
            f"Python {platform.python_version()}, {platform.system()} {platform.release()}")




def median_round(values: list[float]) -> tuple[float, int]:
    """The median (the service's nearest rank, so a value that was measured) and the index of the round it is."""
    median = percentile(values, 50)
    return median, values.index(median)


def distribution_cells(values: list[float]) -> list[str]:
    return [fmt_ms(percentile(values, 50)), fmt_ms(percentile(values, 95)), fmt_ms(percentile(values, 99))]


def print_parts(first_header: str, column: str, spent: dict[str, float], total_label: str, digits: int = 2) -> None:
    """One checkout's table: a row per part (ms), then their sum."""
    print(f"| {first_header} | {column} |\n|---|---|")
    for name, ms in spent.items():
        print(f"| {name} | {ms:.{digits}f} |")
    print(f"| {total_label} | {sum(spent.values()):.{digits}f} |")


def compare_checkouts(bench_file: str, roots: list[str], calls: int, rounds: int, steps: tuple[str, ...],
                      unit: str, digits: int = 2) -> None:
    """Run `bench_file --child --calls N` against each checkout in its own process (that checkout's code first on
    the path), the roots alternating round by round, and print one row per checkout: each step's ms per call,
    one value per round. The child prints a JSON object {step: ms per call} as its last line."""
    import json
    import subprocess

    roots = [str(Path(root).resolve()) for root in roots]
    rows: dict[str, list[dict[str, float]]] = {root: [] for root in roots}
    for _ in range(rounds):
        for root in roots:
            out = subprocess.run([sys.executable, bench_file, "--child", "--calls", str(calls)], cwd=root,
                                 env={**os.environ, "PYTHONPATH": root}, check=True, capture_output=True,
                                 text=True).stdout
            rows[root].append(json.loads(out.strip().splitlines()[-1]))
    print(f"| checkout | {' | '.join(steps)} | all ({unit}) |")
    print("|---" * (len(steps) + 2) + "|")
    for root, runs in rows.items():
        cells = [" / ".join(f"{run[step]:.{digits}f}" for run in runs) for step in steps]
        total = " / ".join(f"{sum(run.values()):.{digits}f}" for run in runs)
        print(f"| {root} | {' | '.join(cells)} | {total} |")
