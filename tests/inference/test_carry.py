"""The "carry" render (`eval.render: carry`): patches whose code did not change keep the
previous rendered frame's pixels, starting from the last real frame."""

import json

import numpy as np
import pytest

from wm_jax import config as config_lib
from wm_jax.eval.evaluate import evaluate
from wm_jax.inference.rollout import carry_unchanged
from wm_jax.presets import preset_path

P = 2  # patch side: a 4x4 frame has 2x2 patches (N = 4)


def frames(values):
    """uint8 [B=1, T, 4, 4, 3] frames of constant value per frame."""
    return np.stack([np.full((4, 4, 3), v, np.uint8) for v in values])[None]


def test_an_unchanged_code_keeps_the_last_real_frame_and_a_changed_one_is_decoded():
    last = np.arange(48, dtype=np.uint8).reshape(1, 4, 4, 3)  # the real frame: every pixel distinct
    decoded = frames([100, 200, 250])
    codes = np.zeros((1, 4, 4, 2), np.float32)  # H + 1 = 4 frames of N = 4 codes of L = 2 digits
    codes[:, 1:, 3, 1] = 0.5  # t=1: the bottom-right patch's code changes, then stays so
    codes[:, 3, 0, 0] = -0.5  # t=3: the top-left patch's code changes
    out = carry_unchanged(decoded, codes, last, P)

    bottom_right, top_left = (slice(2, 4), slice(2, 4)), (slice(0, 2), slice(0, 2))
    expected = np.repeat(last, 3, axis=0)
    expected[0][bottom_right] = expected[1][bottom_right] = expected[2][bottom_right] = 100  # decoded at t=1, carried
    expected[2][top_left] = 250  # decoded at t=3
    np.testing.assert_array_equal(out[0], expected)


def test_every_code_unchanged_is_copy_last_and_every_code_changed_is_the_decode():
    last = frames([7])[:, 0]
    decoded = frames([1, 2])
    still = np.ones((1, 3, 4, 1), np.float32)
    np.testing.assert_array_equal(carry_unchanged(decoded, still, last, P), frames([7, 7]))
    moving = np.arange(12, dtype=np.float32).reshape(1, 3, 4, 1)
    np.testing.assert_array_equal(carry_unchanged(decoded, moving, last, P), decoded)


def test_eval_with_the_carry_render_scores_the_carried_frames(dynamics_run, tmp_path):
    few = ["eval.num_clips=4"]
    decode = evaluate(dynamics_run, out_dir=tmp_path / "decode", overrides=few)
    carry = evaluate(dynamics_run, out_dir=tmp_path / "carry", overrides=few + ["eval.render=carry"])
    assert carry["sampling"]["render"] == "carry" and decode["sampling"]["render"] == "decode"
    saved = json.loads((tmp_path / "carry" / "metrics.json").read_text())
    assert saved["sampling"]["render"] == "carry"
    assert carry["tokenizer"] == decode["tokenizer"]  # reconstruction is not a rollout: unchanged
    assert carry["rollout"]["psnr"] != decode["rollout"]["psnr"]


def test_carry_needs_fsq_codes():
    with pytest.raises(config_lib.ConfigError, match="eval.render"):
        config_lib.load(preset_path("tiny_cpu_continuous"), ["eval.render=carry"])
