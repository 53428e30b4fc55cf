"""`wm eval compare RUN_A RUN_B ...`: the headline figures of several evaluations side by side.

Reads each run's `eval/metrics.json` (or a metrics.json path given directly) and builds one
row per figure, one column per run; a figure a run lacks (e.g. a tokenizer-only run has no
rollout) shows as "–".
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import numpy as np

from wm_jax.checkpoint import CheckpointError

# (row label, how to read it from metrics.json); higher is better unless the label says so.
FIGURES: tuple[tuple[str, Callable[[dict], float]], ...] = (
    ("step", lambda m: m["step"]),
    ("tokenizer PSNR (dB)", lambda m: m["tokenizer"]["psnr"]),
    ("rollout PSNR, mean over horizons (dB)", lambda m: np.mean(m["rollout"]["psnr"])),
    ("rollout SSIM, mean over horizons", lambda m: np.mean(m["rollout"]["ssim"])),
    ("copy-last baseline PSNR (dB)", lambda m: np.mean(m["baseline_copy_last"]["psnr"])),
    ("ΔtPSNR true − random actions, mean over horizons (dB)", lambda m: m["controllability"]["delta_psnr"]),
    ("ΔtPSNR at t=4 (dB)", lambda m: m["controllability"]["delta_psnr_t4"]),
    ("action following: within 1.5 px", lambda m: m["action_following"]["true_actions"]["within_1.5px"]),
    (
        "action following, random actions: within 1.5 px",
        lambda m: m["action_following"]["random_actions"]["within_1.5px"],
    ),
    ("camera following: within 1 px", lambda m: m["camera_following"]["model"]["within_1px"]),
    ("identity persistence: similarity after a cut", lambda m: m["identity_persistence"]["after_cut"]),
    ("identity persistence: swap margin", lambda m: m["identity_persistence"]["swap_margin"]),
    ("object permanence: reappearance PSNR (dB)", lambda m: m["object_permanence"]["reappear_psnr"]),
    (
        "counterfactual: PSNR vs the simulator's counterfactual (dB)",
        lambda m: np.mean(m["counterfactual"]["psnr_vs_counterfactual_truth"]),
    ),
    ("counterfactual margin (dB, > 0: follows actions)", lambda m: m["counterfactual"]["margin_db"]),
    ("counterfactual: agent within 1.5 px", lambda m: m["counterfactual"]["agent_within_1.5px"]),
    ("action probe: fraction of the commanded move", lambda m: m["action_probe"]["fraction"]),
)


def metrics_path(run: str | Path) -> Path:
    """RUN/eval/metrics.json, or `run` itself when it names a metrics file."""
    run = Path(run)
    path = run if run.suffix == ".json" else run / "eval" / "metrics.json"
    if not path.is_file():
        raise CheckpointError(f"{run}: no evaluation found at {path} (run `wm eval --workdir {run}` first)")
    return path


def figure(metrics: dict, read: Callable[[dict], Any]) -> float | None:
    """One figure of a metrics dict, or None when that group is absent."""
    try:
        return float(read(metrics))
    except (KeyError, TypeError):
        return None


def compare(runs: list[str | Path]) -> dict[str, list[float | None]]:
    """{figure label: [value per run]} in the order of `runs`."""
    loaded = [json.loads(metrics_path(r).read_text()) for r in runs]
    return {label: [figure(m, read) for m in loaded] for label, read in FIGURES}


def markdown_table(runs: list[str | Path], table: dict[str, list[float | None]]) -> str:
    """A markdown table: one row per figure, one column per run."""

    def cell(label: str, v: float | None) -> str:
        if v is None or not np.isfinite(v):
            return "–"
        return f"{v:.0f}" if label == "step" else f"{v:.3f}"

    lines = ["| figure | " + " | ".join(f"`{r}`" for r in runs) + " |", "|---" * (len(runs) + 1) + "|"]
    lines += [f"| {label} | " + " | ".join(cell(label, v) for v in values) + " |" for label, values in table.items()]
    return "\n".join(lines) + "\n"
