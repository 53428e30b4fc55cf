"""`benchmarks/RESULTS.md`: one markdown table per bench, rows appended by each run."""

from __future__ import annotations

import datetime as dt
import os
import platform
from pathlib import Path

RESULTS_PATH = Path(__file__).resolve().parent / "RESULTS.md"


def machine(device: str) -> str:
    """Where a figure was measured: host, cores and accelerator name."""
    return f"{platform.node()} ({os.cpu_count()} cores, {device})"


def append_row(bench: str, columns: list[str], values: list[str], path: Path = RESULTS_PATH) -> str:
    """Appends a row under the `## bench` table of `path`, creating the file, the section
    or its header as needed; other sections are left as they are. Returns the row."""
    row = "| " + " | ".join([dt.datetime.now().isoformat(timespec="seconds"), *values]) + " |"
    header = "| " + " | ".join(["date", *columns]) + " |"
    lines = path.read_text().splitlines() if path.exists() else ["# Benchmark results"]
    title = f"## {bench}"
    if title not in lines:
        lines += ["", title, "", header, "|" + "---|" * (len(columns) + 1)]
    start = lines.index(title)
    end = start + 1
    while end < len(lines) and not lines[end].startswith("## "):
        end += 1
    while lines[end - 1] == "":  # insert after the section's last table row
        end -= 1
    lines.insert(end, row)
    path.write_text("\n".join(lines) + "\n")
    return row
