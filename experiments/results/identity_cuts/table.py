"""Per-run figures and mean ± std per arm from runs/id_<arm>_s<seed>/eval/metrics.json.

.venv/bin/python experiments/results/identity_cuts/table.py runs > experiments/results/identity_cuts/results.md
"""

import json
import re
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

FIGURES = [
    ("identity_persistence", "before_cut"),
    ("identity_persistence", "after_cut"),
    ("identity_persistence", "swap_margin"),
    ("identity_persistence", "swap_margin_after_cut"),
    ("controllability", "delta_psnr_t4"),
    ("counterfactual", "agent_within_1.5px"),
]


def main(root: str) -> None:
    arms = defaultdict(dict)
    for path in sorted(Path(root).glob("id_*_s*/eval/metrics.json")):
        arm, seed = re.fullmatch(r"id_(.+)_s(\d+)", path.parent.parent.name).groups()
        m = json.loads(path.read_text())
        arms[arm][int(seed)] = [m[g][k] for g, k in FIGURES]
    head = "| arm | seed | " + " | ".join(f"{g.split('_')[0]}.{k}" for g, k in FIGURES) + " |"
    sep = "|---" * (len(FIGURES) + 2) + "|"
    print("Per run\n\n" + head + "\n" + sep)
    for arm, runs in arms.items():
        for seed, vals in sorted(runs.items()):
            print(f"| {arm} | {seed} | " + " | ".join(f"{v:+.3f}" for v in vals) + " |")
    print("\nMean ± std over seeds (std with ddof=1; n = seeds)\n\n" + head.replace("| seed |", "| n |") + "\n" + sep)
    for arm, runs in arms.items():
        a = np.array(list(runs.values()))
        spread = [f" ± {s:.3f}" for s in a.std(axis=0, ddof=1)] if len(a) > 1 else [" (one seed)"] * a.shape[1]
        print(f"| {arm} | {len(a)} | " + " | ".join(f"{m:+.3f}{s}" for m, s in zip(a.mean(axis=0), spread)) + " |")


if __name__ == "__main__":
    main(sys.argv[1])
