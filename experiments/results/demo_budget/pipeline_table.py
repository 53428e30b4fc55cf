"""Mean ± std per budget of whole `wm demo` pipelines (data, tokenizer and dynamics seeded
alike), from the eval metrics saved as `steps<N>_seed-<S>.json`:

    python experiments/results/demo_budget/pipeline_table.py experiments/results/demo_budget/pipeline

Prints a markdown table; nothing is written.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

FIGURES = {  # row label -> the figure of one run's metrics
    "tokenizer PSNR (dB)": lambda m: m["tokenizer"]["psnr"],
    "ΔtPSNR(t=4) (dB)": lambda m: m["controllability"]["delta_psnr_t4"],
    "counterfactual agent within 1.5 px": lambda m: m["counterfactual"]["agent_within_1.5px"],
    "… copy-last": lambda m: m["counterfactual"]["copy_last"]["agent_within_1.5px"],
    "counterfactual margin (dB)": lambda m: m["counterfactual"]["margin_db"],
    "one-step probe": lambda m: m["action_probe"]["fraction"],
    "rollout PSNR, mean of t=1-8 (dB)": lambda m: float(np.mean(m["rollout"]["psnr"])),
    "identity before a cut": lambda m: m["identity_persistence"]["before_cut"],
    "identity after a cut": lambda m: m["identity_persistence"]["after_cut"],
    "identity after ÷ before": lambda m: (
        m["identity_persistence"]["after_cut"] / m["identity_persistence"]["before_cut"]
    ),
    "identity swap margin after a cut": lambda m: m["identity_persistence"]["swap_margin_after_cut"],
}


def main(root: str) -> None:
    runs: dict[str, list[dict]] = defaultdict(list)
    for path in sorted(Path(root).glob("steps*_seed-*.json")):
        runs[path.name.split("_seed-")[0]].append(json.loads(path.read_text()))
    budgets = sorted(runs, key=lambda b: -int(b[len("steps") :]))
    print(
        "| figure | "
        + " | ".join(
            f"{b[len('steps') :]} + {b[len('steps') :]} steps ({len(runs[b])} seed{'s' * (len(runs[b]) > 1)})"
            for b in budgets
        )
        + " |"
    )
    print("|---" * (len(budgets) + 1) + "|")
    for label, figure in FIGURES.items():
        cells = []
        for b in budgets:
            v = np.array([figure(m) for m in runs[b]])
            cells.append(f"{v.mean():.3f} ± {v.std(ddof=1):.3f}" if len(v) > 1 else f"{v[0]:.3f}")
        print(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1])
