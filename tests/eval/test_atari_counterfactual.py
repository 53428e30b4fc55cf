"""`wm eval` on an Atari run: counterfactual ground truth from the real emulator (ale-py)."""

import json

import numpy as np
import pytest

from conftest import PRESET, TINY_OVERRIDES
from data_pipelines import datasets
from data_pipelines.schema import DatasetError
from wm_jax import config as config_lib
from wm_jax.eval.clips import held_out_clips
from wm_jax.eval.evaluate import atari_counterfactual_truth, evaluate
from wm_jax.train.loop import train

S = 16
PONG_NUM_ACTIONS = 6


@pytest.fixture(scope="module")
def pong16(tmp_path_factory):
    out = tmp_path_factory.mktemp("atari") / "pong16"
    datasets.make_dataset("atari", out, episodes=3, frames=24, size=S, seed=0, game="Pong")
    return out


def test_counterfactual_truth_of_held_out_clips(pong16):
    cfg = config_lib.load(PRESET, TINY_OVERRIDES + [f"data.dir={pong16}"])
    ctx, horizon = cfg.eval.context_frames, cfg.eval.horizon
    clips = held_out_clips(str(pong16), cfg, ctx + horizon)
    assert len(clips["frame"]) == 4 and (clips["t"][:, 1:] == clips["t"][:, :1] + np.arange(1, ctx + horizon)).all()
    # The recorded actions replay to the recorded frames (also checked inside).
    recorded = atari_counterfactual_truth(str(pong16), clips, ctx, clips["action"])
    np.testing.assert_array_equal(recorded, clips["frame"][:, ctx:])
    random = clips["action"].copy()
    random[:, ctx - 1 :] = np.random.default_rng(0).integers(0, PONG_NUM_ACTIONS, random[:, ctx - 1 :].shape)
    counterfactual = atari_counterfactual_truth(str(pong16), clips, ctx, random)
    assert counterfactual.shape == (4, horizon, S, S, 3) and counterfactual.dtype == np.uint8
    assert (counterfactual != clips["frame"][:, ctx:]).any()
    tampered = {**clips, "frame": clips["frame"].copy()}
    tampered["frame"][0, -1] ^= 1
    with pytest.raises(DatasetError, match="does not reproduce"):
        atari_counterfactual_truth(str(pong16), tampered, ctx, random)


@pytest.mark.slow  # ~80 s on a loaded 2-core CPU: two tiny trainings and an eval
def test_eval_of_an_atari_run_scores_against_the_counterfactual_truth(pong16, tmp_path):
    overrides = TINY_OVERRIDES + [
        f"data.dir={pong16}",
        f"model.image_size={S}",
        "train.steps=2",
        f"model.dynamics.num_actions={PONG_NUM_ACTIONS}",
    ]
    tok, dyn = tmp_path / "tok", tmp_path / "dyn"
    train(config_lib.load(PRESET, overrides), tok)
    train(config_lib.load(PRESET, overrides + ["train.stage=dynamics", f"train.tokenizer_workdir={tok}"]), dyn)
    evaluate(dyn)
    metrics = json.loads((dyn / "eval" / "metrics.json").read_text())
    cf = metrics["counterfactual"]
    assert cf["horizon"] == [1, 2, 3]
    for key in (
        "psnr_vs_counterfactual_truth",
        "psnr_vs_factual_truth",
        "ssim_vs_counterfactual_truth",
        "copy_last_psnr_vs_counterfactual_truth",
    ):
        assert len(cf[key]) == 3 and np.all(np.isfinite(cf[key])), key
    assert 0 <= cf["counterfactual_truth_differs_fraction"] <= 1
    for group in (cf, cf["copy_last"]):
        assert group["margin_db"] == group["psnr_vs_counterfactual"] - group["psnr_vs_factual"]
    assert np.isfinite(cf["action_blind"]["psnr_vs_counterfactual"]) and cf["num_clips"] == 4
    assert "agent_within_1.5px" not in cf and "action_probe" not in metrics  # no agent to find in Pong
    assert np.isfinite(metrics["controllability"]["delta_psnr_per_horizon"]).all()
    assert "action_following" not in metrics  # no simulator ground truth in Atari records
    report = (dyn / "eval" / "report.md").read_text()
    assert "Counterfactual action following" in report and "](metrics_bars.png)" in report
    assert (dyn / "eval" / "metrics_bars.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
