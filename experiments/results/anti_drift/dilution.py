"""How much of ΔtPSNR's fall with the horizon is dilution, how much is the actions' effect fading?

ΔtPSNR_t = 10 log10((M_t + a_t) / M_t), with M_t the true-action rollout's mean squared
error (from its PSNR) and a_t the extra error the random actions add. If the actions'
effect on the frames stayed the same size (a_t = a_1), the background's growing error M_t
alone would shrink ΔtPSNR; `kept` = a_t / a_1 is how much of the effect really remains.

    python experiments/results/anti_drift/dilution.py RUN/eval/metrics.json ...
"""

import json
import math
import sys


def decompose(metrics: dict) -> dict[str, list[float]]:
    """metrics.json of `wm eval` -> per-horizon observed ΔtPSNR, ΔtPSNR if the effect were
    constant, and the share of the t=1 effect kept (lists over the horizon)."""
    psnr = metrics["rollout"]["psnr"]
    delta = metrics["controllability"]["delta_psnr_per_horizon"]
    mse = [10 ** (-p / 10) for p in psnr]
    effect = [m * (10 ** (d / 10) - 1) for m, d in zip(mse, delta)]
    return {
        "observed": delta,
        "if_constant": [10 * math.log10(1 + effect[0] / m) for m in mse],
        "kept": [e / effect[0] for e in effect],
    }


if __name__ == "__main__":
    for path in sys.argv[1:]:
        out = decompose(json.load(open(path)))
        print(path)
        for key, values in out.items():
            print(f"  {key:12s}", " ".join(f"{v:+.2f}" for v in values[:6]))
