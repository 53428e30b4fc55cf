"""Summarises the Atari steerability sweep per game: counterfactual margin (mean ± std over
seeds) and rollout PSNR vs copy-last at every horizon.

    python experiments/results/atari_steerability/summarize.py runs/sweeps/atari_steerability/runs [EVAL]

Each run directory is `arm-GAME_seed-S` with `EVAL/metrics.json` (`wm eval`'s output;
EVAL defaults to `eval`, the sweep's own; e.g. `eval_carry` for a `wm eval --out
RUN/eval_carry --set eval.render=carry`). Prints a markdown table per game; nothing is
written.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np


def load_runs(root: Path, eval_dir: str = "eval") -> dict[str, list[dict]]:
    """Game name -> the eval metrics (`eval_dir`/metrics.json) of each of its seeds (runs
    without metrics skipped)."""
    games: dict[str, list[dict]] = defaultdict(list)
    for run in sorted(root.iterdir()):
        metrics = run / eval_dir / "metrics.json"
        if run.name.startswith("arm-") and metrics.exists():
            games[run.name[len("arm-") :].split("_seed-")[0]].append(json.loads(metrics.read_text()))
    return games


def spread(values: list[float]) -> str:
    """'mean ± std (min … max)' of per-seed values (sample std, as `wm sweep report`)."""
    v = np.asarray(values, float)
    return f"{v.mean():+.3f} ± {v.std(ddof=1):.3f} ({v.min():+.3f} … {v.max():+.3f})"


def game_table(name: str, runs: list[dict]) -> str:
    """Markdown: the headline figures, then model vs copy-last PSNR per horizon."""
    cf = [r["counterfactual"] for r in runs]
    lines = [
        f"### {name} ({len(runs)} seeds)",
        "",
        "| figure | mean ± std (min … max) over seeds |",
        "|---|---|",
        f"| counterfactual margin, model (dB) | {spread([c['margin_db'] for c in cf])} |",
        f"| counterfactual margin, copy-last (dB) | {spread([c['copy_last']['margin_db'] for c in cf])} |",
        f"| clips whose counterfactual truth differs | {spread([c['counterfactual_truth_differs_fraction'] for c in cf])} |",
        f"| ΔtPSNR t=4 (dB) | {spread([r['controllability']['delta_psnr_t4'] for r in runs])} |",
        f"| tokenizer PSNR (dB) | {spread([r['tokenizer']['psnr'] for r in runs])} |",
        "",
        "| horizon | model PSNR (dB) | copy-last PSNR (dB) | model − copy-last (dB) | seeds where model wins |",
        "|---|---|---|---|---|",
    ]
    model = np.array([r["rollout"]["psnr"] for r in runs])
    copy = np.array([r["baseline_copy_last"]["psnr"] for r in runs])
    for h, (m, c) in enumerate(zip(model.T, copy.T), start=1):
        lines.append(
            f"| {h} | {m.mean():.2f} ± {m.std(ddof=1):.2f} | {c.mean():.2f} ± {c.std(ddof=1):.2f} "
            f"| {(m - c).mean():+.2f} ± {(m - c).std(ddof=1):.2f} | {(m > c).sum()}/{len(runs)} |"
        )
    return "\n".join(lines)


def main(root: str, eval_dir: str = "eval") -> None:
    for name, runs in load_runs(Path(root), eval_dir).items():
        print(game_table(name, runs), end="\n\n")


if __name__ == "__main__":
    main(*sys.argv[1:3])
