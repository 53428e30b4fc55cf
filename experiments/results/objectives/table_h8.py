"""Steerability figures of the objectives study on 32 held-out clips (4 context + 8
generated frames; `wm eval --set eval.horizon=8 --out RUN/eval_h8`): per run, then
mean ± std (ddof=1) per arm.

.venv/bin/python experiments/results/objectives/table_h8.py runs/sweeps/objectives/runs > experiments/results/objectives/results_h8.md
"""

import json
import re
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

FIGURES = [
    ("rollout psnr t=1", lambda m: m["rollout"]["psnr"][0]),
    ("rollout psnr t=4", lambda m: m["rollout"]["psnr"][3]),
    ("rollout psnr t=8", lambda m: m["rollout"]["psnr"][7]),
    ("copy-last psnr t=4", lambda m: m["baseline_copy_last"]["psnr"][3]),
    ("ΔtPSNR t=4", lambda m: m["controllability"]["delta_psnr_t4"]),
    ("cf. within 1.5 px", lambda m: m["counterfactual"]["agent_within_1.5px"]),
    ("cf. margin dB", lambda m: m["counterfactual"]["margin_db"]),
    ("probe", lambda m: m["action_probe"]["fraction"]),
    ("after-cut similarity", lambda m: m["identity_persistence"]["after_cut"]),
]


def cell(v: float | None) -> str:
    return "–" if v is None else f"{v:+.3f}"


def main(root: str) -> None:
    arms = defaultdict(dict)
    for path in sorted(Path(root).glob("arm-*_seed-*/eval_h8/metrics.json")):
        arm, seed = re.fullmatch(r"arm-(.+)_seed-(\d+)", path.parent.parent.name).groups()
        m = json.loads(path.read_text())
        arms[arm][int(seed)] = [f(m) for _, f in FIGURES]
        clips = m["num_clips"]
    head = "| arm | seed | " + " | ".join(name for name, _ in FIGURES) + " |"
    sep = "|---" * (len(FIGURES) + 2) + "|"
    print(f"# Objectives study: {clips} held-out clips, 4 context + 8 generated frames\n")
    print("Per run\n\n" + head + "\n" + sep)
    for arm, runs in arms.items():
        for seed, vals in sorted(runs.items()):
            print(f"| {arm} | {seed} | " + " | ".join(cell(v) for v in vals) + " |")
    print("\nMean ± std over seeds (ddof=1; a missing figure, e.g. no agent found, is left out)\n")
    print(head.replace("| seed |", "| n |") + "\n" + sep)
    for arm, runs in arms.items():
        cells = []
        for i in range(len(FIGURES)):
            got = [v[i] for v in runs.values() if v[i] is not None]
            spread = f" ± {np.std(got, ddof=1):.3f}" if len(got) > 1 else ""
            cells.append(f"{np.mean(got):+.3f}{spread}" if got else "–")
        print(f"| {arm} | {len(runs)} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1])
