"""`wm eval` on a tiny procedural run: Genie's ΔtPSNR, counterfactual truth, action probe, headline."""

import json

import numpy as np
import pytest

from conftest import PRESET
from wm_jax import config as config_lib
from wm_jax.eval.evaluate import evaluate, headline
from wm_jax.train.loop import train


@pytest.mark.slow  # ~50 s on a loaded 2-core CPU: two tiny trainings and an eval
def test_eval_of_a_procedural_run_has_the_controllability_headline(tmp_path, tiny_overrides):
    overrides = tiny_overrides + ["train.steps=2", "eval.horizon=4"]  # t = 4 is Genie's horizon
    tok, dyn = tmp_path / "tok", tmp_path / "dyn"
    train(config_lib.load(PRESET, overrides), tok)
    train(config_lib.load(PRESET, overrides + ["train.stage=dynamics", f"train.tokenizer_workdir={tok}"]), dyn)
    result = evaluate(dyn)
    metrics = json.loads((dyn / "eval" / "metrics.json").read_text())
    assert metrics == json.loads(json.dumps(result))

    c = metrics["controllability"]
    assert len(c["delta_psnr_per_horizon"]) == 4 and c["delta_psnr_t4"] == c["delta_psnr_per_horizon"][3]
    assert c["num_clips_before_cut"] <= metrics["num_clips"]
    cf = metrics["counterfactual"]
    for key in ("psnr_vs_counterfactual", "psnr_vs_factual", "margin_db"):
        assert np.isfinite(cf[key]) and np.isfinite(cf["copy_last"][key]), key
    assert cf["margin_db"] == cf["psnr_vs_counterfactual"] - cf["psnr_vs_factual"]
    assert np.isfinite(cf["action_blind"]["psnr_vs_counterfactual"])
    assert cf["num_clips"] == metrics["num_clips"] and cf["num_clips_reframed"] == 0  # world v3: causal
    for within in (
        cf["agent_within_1.5px"],
        cf["copy_last"]["agent_within_1.5px"],
        cf["action_blind"]["agent_within_1.5px"],
    ):
        assert within is None or 0 <= within <= 1  # None: every generated step after a cut
    probe = metrics["action_probe"]
    assert probe["commanded_px"] == 1.0  # S = 16: S/16 px a step
    assert probe["num_clips"] <= metrics["num_clips"] and len(probe["displacement_px_per_action"]) == 4

    rows = dict(headline(metrics))
    assert rows["tokenizer reconstruction PSNR (dB)"] == f"{metrics['tokenizer']['psnr']:.2f}"
    assert any(label.startswith("action probe") for label in rows) and len(rows) == 6
    report = (dyn / "eval" / "report.md").read_text()
    assert report.index("## Headline") < report.index("## Details")
    assert "Counterfactual action following" in report and "Action probe" in report
