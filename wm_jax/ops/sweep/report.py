"""A sweep's results: each run's metrics (`train.<column>` from metrics.jsonl, others from
eval/metrics.json) as results.csv, a markdown table with mean ± std across seeds, the loss
curves, each metric against each swept key, and each per-step metric (a list, e.g. PSNR per
horizon step) against its step (`write_report`)."""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np

from wm_jax import telemetry
from wm_jax.ops.sweep.spec import Plan, Run, finished, short_keys

SERIES_TABLE_STEPS = (1, 2, 4, 8, 16, 32)  # the steps a per-step metric's table shows


def lookup(tree: Any, path: str) -> Any:
    """A dotted path into nested dicts; keys may contain dots themselves (`within_1.5px`)."""
    parts = path.split(".")
    node = tree
    while parts:
        if not isinstance(node, dict):
            return None
        for n in range(len(parts), 0, -1):  # the longest key that matches wins
            key = ".".join(parts[:n])
            if key in node:
                node, parts = node[key], parts[n:]
                break
        else:
            return None
    return node


def _number(value: Any) -> float | None:
    """A finite float; a list of numbers becomes its mean (e.g. PSNR per horizon)."""
    if isinstance(value, list):
        numbers = [_number(v) for v in value]
        return float(np.mean(numbers)) if numbers and None not in numbers else None
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def _evaluation(run: Run) -> dict | None:
    """The run's eval/metrics.json, or None where it is missing or unreadable."""
    try:
        return json.loads((Path(run.workdir) / "eval" / "metrics.json").read_text())
    except (OSError, ValueError):
        return None


def collect(run: Run, metrics: list[str], evaluation: dict | None) -> dict[str, float | None]:
    """Each metric of a run: `train.<col>` from metrics.jsonl (last logged value), others from
    its `evaluation` (eval/metrics.json, `_evaluation`). None: missing."""
    rows = telemetry.read_metrics(Path(run.workdir) / "metrics.jsonl")
    values = {}
    for m in metrics:
        if m.startswith("train."):
            column = m.split(".", 1)[1]
            logged = [r[column] for r in rows if _number(r.get(column)) is not None]
            values[m] = float(logged[-1]) if logged else None
        else:
            values[m] = _number(lookup(evaluation, m)) if evaluation is not None else None
    return values


def collect_series(evaluation: dict | None, metric: str) -> list[float] | None:
    """A per-step eval metric of a run's `evaluation` (a list of numbers in eval/metrics.json,
    e.g. PSNR per horizon step), or None where it is missing or not a list."""
    value = lookup(evaluation, metric) if evaluation is not None else None
    if not isinstance(value, list) or not value:
        return None
    numbers = [_number(v) for v in value]
    return None if None in numbers else numbers


def _run_status(run: Run, with_eval: bool) -> str:
    if (Path(run.workdir) / "error.txt").is_file():
        return "failed"
    if finished(run, with_eval):
        return "finished"
    return "unfinished" if Path(run.workdir).exists() else "missing"


def _cell(value: Any) -> str:
    if value is None:
        return "missing"
    if isinstance(value, float):
        return f"{value:.4g}"
    return json.dumps(value) if isinstance(value, (list, dict, bool)) else str(value)


def summarize(values: list[float | None]) -> str:
    """`mean ± std (n/N)` over seeds; std is the sample std and needs two values."""
    present = [v for v in values if v is not None]
    if not present:
        return f"missing (0/{len(values)})"
    mean = float(np.mean(present))
    text = f"{mean:.4g}"
    if len(present) > 1:
        std = float(np.std(present, ddof=1))
        text += f" ± {0.0 if std <= 1e-9 * max(1.0, abs(mean)) else std:.2g}"  # equal values: 0, not rounding noise
    return text + (f" ({len(present)}/{len(values)})" if len(present) < len(values) or len(values) > 1 else "")


def _groups(p: Plan) -> dict[str, list[Run]]:
    """Runs keyed by their non-seed varied values (the seeds of one setting together)."""
    keys = [k for k in p.varied_keys if k != "seed"]
    groups: dict[str, list[Run]] = {}
    for run in p.runs:
        label = ", ".join(f"{k}={_cell(run.varied.get(k))}" for k in keys) or "all runs"
        groups.setdefault(label, []).append(run)
    return groups


def results_markdown(
    p: Plan, rows: list[dict[str, Any]], metrics: list[str], per_step: dict[str, dict[str, list[list[float] | None]]]
) -> str:
    """The per-run table, the mean ± std summary per setting, the per-step tables of the
    metrics in `per_step` (`series_groups`) and links to the plots."""
    keys = p.varied_keys
    header = ["run", "status", *keys, *metrics]
    lines = [
        f"# Sweep `{p.spec['name']}`",
        "",
        f"Base config `{p.base_config}`, {len(p.runs)} runs in `{p.out / 'runs'}`.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for row in rows:
        lines.append(
            "| " + " | ".join(_cell(row[h]) if h in keys or h in metrics else str(row[h]) for h in header) + " |"
        )
    groups = _groups(p)
    by_name = {row["run"]: row for row in rows}
    lines += [
        "",
        "## Summary: mean ± std across seeds (present/runs)",
        "",
        "| setting | " + " | ".join(metrics) + " |",
        "|" + "---|" * (len(metrics) + 1),
    ]
    for label, runs in groups.items():
        cells = [summarize([by_name[r.name][m] for r in runs]) for m in metrics]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    for metric, groups in per_step.items():
        lines += ["", *series_markdown(metric, groups)]
    plots = ["loss_curves.png", *[f for m in metrics for f in _metric_plot_names(p, m).values()]]
    plots += [_series_plot_name(m) for m in per_step]
    lines += [""] + [f"![{f}]({f})" for f in plots]
    return "\n".join(lines) + "\n"


def series_groups(p: Plan, metric: str, evaluations: dict[str, dict | None]) -> dict[str, list[list[float] | None]]:
    """Per setting (`_groups`), the per-step values of `metric` of each of its runs
    (`collect_series` of `evaluations`, by run name; None where missing); settings where no
    run has it are left out."""
    grouped = {label: [collect_series(evaluations[r.name], metric) for r in runs] for label, runs in _groups(p).items()}
    return {label: found for label, found in grouped.items() if any(found)}


def _at_step(runs: list[list[float] | None], k: int) -> list[float | None]:
    """Each run's value at step k (1-based), None where it has none."""
    return [s[k - 1] if s is not None and len(s) >= k else None for s in runs]


def series_markdown(metric: str, groups: dict[str, list[list[float] | None]]) -> list[str]:
    """Lines of a table of `metric` at steps SERIES_TABLE_STEPS (and the last step): mean ±
    std over each setting's runs that reached the step (present/runs)."""
    last = max(len(s) for runs in groups.values() for s in runs if s is not None)
    steps = sorted({k for k in SERIES_TABLE_STEPS if k <= last} | {last})
    lines = [
        f"## `{metric}` per step: mean ± std across seeds",
        "",
        "| setting | " + " | ".join(f"step {k}" for k in steps) + " |",
        "|" + "---|" * (len(steps) + 1),
    ]
    for label, runs in groups.items():
        cells = [summarize(_at_step(runs, k)) for k in steps]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def _safe_name(metric: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", metric)


def _series_plot_name(metric: str) -> str:
    return f"{_safe_name(metric)}_per_step.png"


def _metric_plot_names(p: Plan, metric: str) -> dict[str, str]:
    safe = _safe_name(metric)
    short = short_keys([k for k in p.varied_keys if k != "seed"])
    return {k: f"{safe}_vs_{s}.png" for k, s in short.items()}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_loss_curves(p: Plan, out: Path) -> None:
    """Train loss vs step, one line per run (runs without a metrics.jsonl are listed as missing)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    missing = []
    for run in p.runs:
        rows = [
            r for r in telemetry.read_metrics(Path(run.workdir) / "metrics.jsonl") if _number(r.get("loss")) is not None
        ]
        if rows:
            ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label=run.name)
        else:
            missing.append(run.name)
    ax.set_xlabel("step")
    ax.set_ylabel("train loss")
    ax.set_title(f"{p.spec['name']}" + (f" (no loss yet: {', '.join(missing)})" if missing else ""), fontsize=9)
    ax.grid(alpha=0.3)
    if len(missing) < len(p.runs):
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def plot_metric(p: Plan, rows: list[dict[str, Any]], metric: str, key: str, out: Path) -> None:
    """`metric` vs the swept values of `key`: mean over seeds with their std as error bars,
    one line per setting of the other swept keys; a missing point is marked on the axis."""
    plt = _plt()
    others = [k for k in p.varied_keys if k not in ("seed", key)]
    values = sorted({json.dumps(r[key], sort_keys=True) for r in rows})
    decoded = [json.loads(v) for v in values]
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in decoded)
    if numeric:
        order = sorted(range(len(decoded)), key=lambda i: decoded[i])
        values, decoded = [values[i] for i in order], [decoded[i] for i in order]
    xs = decoded if numeric else list(range(len(decoded)))
    fig, ax = plt.subplots(figsize=(6, 4))
    series: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        series.setdefault(", ".join(f"{k}={_cell(row[k])}" for k in others), []).append(row)
    for label, members in series.items():
        means, stds, missing_x = [], [], []
        for x, v in zip(xs, values):
            got = [r[metric] for r in members if json.dumps(r[key], sort_keys=True) == v and r[metric] is not None]
            means.append(float(np.mean(got)) if got else np.nan)
            stds.append(float(np.std(got, ddof=1)) if len(got) > 1 else 0.0)
            if not got:
                missing_x.append(x)
        ax.errorbar(xs, means, yerr=stds, fmt="o-", capsize=4, label=label or None)
        if missing_x:
            ax.plot(
                missing_x,
                [0] * len(missing_x),
                "x",
                color="red",
                transform=ax.get_xaxis_transform(),
                clip_on=False,
                label="missing",
            )
    ax.set_xticks(xs, [_cell(v) for v in decoded])  # ticks at the swept values only
    ax.set_xlabel(key)
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} vs {key}\n(mean ± std over seeds)", fontsize=9)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def plot_series(metric: str, groups: dict[str, list[list[float] | None]], out: Path) -> None:
    """`metric` against its step (1-based), one line per setting: the mean over its runs,
    shaded ± their std where two or more runs reached the step."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, runs in groups.items():
        steps = np.arange(1, max(len(s) for s in runs if s is not None) + 1)
        at = [[v for v in _at_step(runs, k) if v is not None] for k in steps]
        mean = np.array([np.mean(v) for v in at])
        std = np.array([np.std(v, ddof=1) if len(v) > 1 else 0.0 for v in at])
        n = sum(s is not None for s in runs)
        (line,) = ax.plot(steps, mean, "o-", markersize=3, label=f"{label} (n={n})")
        ax.fill_between(steps, mean - std, mean + std, color=line.get_color(), alpha=0.2)
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} per step\n(mean ± std over seeds)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def write_report(p: Plan) -> dict[str, Any]:
    """Writes results.csv, results.md, loss_curves.png and `<metric>_vs_<key>.png` under the
    sweep directory; returns {'rows': [...], 'files': [...]}."""
    metrics = list(p.spec.get("metrics", []))
    with_eval = bool(p.spec.get("eval", False))
    keys = p.varied_keys
    evaluations = {run.name: _evaluation(run) for run in p.runs}  # read once, for every metric
    rows = []
    for run in p.runs:
        rows.append(
            {
                "run": run.name,
                "status": _run_status(run, with_eval),
                **{k: run.varied.get(k) for k in keys},
                **collect(run, metrics, evaluations[run.name]),
            }
        )
    p.out.mkdir(parents=True, exist_ok=True)
    with open(p.out / "results.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["run", "status", *keys, *metrics])
        for row in rows:  # an empty cell is a missing value
            writer.writerow(
                [
                    row["run"],
                    row["status"],
                    *[_cell(row[k]) for k in keys],
                    *["" if row[m] is None else repr(row[m]) for m in metrics],
                ]
            )
    per_step = {m: g for m in metrics if not m.startswith("train.") and (g := series_groups(p, m, evaluations))}
    (p.out / "results.md").write_text(results_markdown(p, rows, metrics, per_step))
    files = ["results.csv", "results.md", "loss_curves.png"]
    for m, groups in per_step.items():
        plot_series(m, groups, p.out / _series_plot_name(m))
        files.append(_series_plot_name(m))
    plot_loss_curves(p, p.out / "loss_curves.png")
    for m in metrics:
        for key, name in _metric_plot_names(p, m).items():
            plot_metric(p, rows, m, key, p.out / name)
            files.append(name)
    return {"rows": rows, "files": files}
