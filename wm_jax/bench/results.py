"""The flags every bench shares (`--config`, `--set`, `--results`), and results files: one
markdown table per bench, rows appended by each run.

A bench appends where `--results PATH` says. Without it, run from a checkout (where
`benchmarks/RESULTS.md` exists in the working directory) it appends to that file, as it
always has; anywhere else it only prints: an installed package never writes into its
own source tree.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
from pathlib import Path

from wm_jax import huge_pages

CHECKOUT_RESULTS = Path("benchmarks") / "RESULTS.md"  # relative to the working directory


def default_path() -> Path | None:
    """`benchmarks/RESULTS.md` of the working directory when that file exists, else None."""
    return CHECKOUT_RESULTS if CHECKOUT_RESULTS.is_file() else None


def add_flag(parser: argparse.ArgumentParser) -> None:
    """`--results PATH`, the markdown file a bench appends its rows to."""
    parser.add_argument(
        "--results",
        type=Path,
        default=default_path(),
        metavar="PATH",
        help=f"markdown file to append this run's rows to (default: ./{CHECKOUT_RESULTS} when "
        "that file exists, i.e. when run from the repository root; else none: the table and the "
        "JSON line are only printed)",
    )


def add_config_flags(parser: argparse.ArgumentParser, default: str | None = None) -> None:
    """`--config` (a preset name or YAML path; required unless `default`) and `--set KEY=VALUE`."""
    parser.add_argument(
        "--config",
        required=default is None,
        default=default,
        help="YAML file or preset name (wm_jax/presets)" + (f"; default {default}" if default else ""),
    )
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")


def machine(device: str) -> str:
    """Where a figure was measured: host, cores, accelerator name, and whether glibc was asked
    for huge pages (`wm_jax.huge_pages`: XLA:CPU steps run up to 1.5x faster with them)."""
    pages = ", huge pages" if huge_pages.requested(os.environ) else ""
    return f"{platform.node()} ({os.cpu_count()} cores, {device}{pages})"


def append_row(bench: str, columns: list[str], values: list[str], path: Path | None) -> str:
    """Appends a row under the `## bench` table of `path`, creating the file, the section
    or its header as needed; other sections are left as they are. With path None, writes
    nothing. Returns the row."""
    row = "| " + " | ".join([dt.datetime.now().isoformat(timespec="seconds"), *values]) + " |"
    if path is None:
        return row
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
