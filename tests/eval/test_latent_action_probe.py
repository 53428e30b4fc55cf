"""Latent action probe: the classifiers on hand-made transitions; on a trained LAM (slow)."""

import numpy as np
import pytest
from conftest import optimized_xla_env
from multiproc import run_python

from data_pipelines.datasets import make_dataset
from wm_jax.eval import latent_action_probe as probe
from wm_jax.eval.evaluate import evaluate
from wm_jax.telemetry import read_metrics

A, K = 5, 8


def _transitions(latent, action, feature=None):
    feature = np.eye(K, dtype=np.float32)[latent] if feature is None else feature
    return {"latent": np.asarray(latent), "action": np.asarray(action), "feature": feature}


def test_contingency_and_majority_map():
    latents = np.array([0, 0, 0, 1, 1, 3])
    actions = np.array([2, 2, 4, 1, 1, 2])
    table = probe.contingency(latents, actions, K, A)
    assert table.shape == (K, A) and table.sum() == len(latents)
    assert table[0].tolist() == [0, 0, 2, 0, 1]
    # Latents never seen (2, 4..7) map to the most frequent action overall (2).
    np.testing.assert_array_equal(probe.majority_map(table), [2, 1, 2, 2, 2, 2, 2, 2])


def test_chance_is_the_majority_class_rate():
    assert probe.chance_rate(np.array([0, 1, 1, 3]), A) == 0.5


def test_a_relabelled_action_is_recovered_and_noise_is_not():
    rng = np.random.default_rng(0)
    actions = rng.integers(0, A, 2000)
    perm = rng.permutation(K)[:A]  # action a shows up as latent perm[a]
    train, test = _transitions(perm[actions[:1000]], actions[:1000]), _transitions(perm[actions[1000:]], actions[1000:])
    scores = probe.probe_scores(train, test, K, A)
    assert scores["majority_map_accuracy"] == 1.0 and scores["linear_accuracy"] == 1.0
    assert scores["latents_used"] == A and scores["num_train"] == scores["num_test"] == 1000
    assert abs(scores["chance"] - 0.2) < 0.05

    noise = _transitions(rng.integers(0, K, 1000), actions[:1000])
    scores = probe.probe_scores(noise, _transitions(rng.integers(0, K, 1000), actions[1000:]), K, A)
    assert scores["majority_map_accuracy"] < scores["chance"] + 0.06
    assert scores["linear_accuracy"] < scores["chance"] + 0.06


def test_linear_probe_reads_features_the_latents_lose():
    """Two actions share a latent; the pre-quantization features still separate them."""
    rng = np.random.default_rng(1)
    actions = rng.integers(0, 2, 400)
    latent = np.zeros(400, np.int64)
    feature = np.stack([actions * 2.0 - 1.0, rng.normal(size=400)], axis=1).astype(np.float32)
    data = _transitions(latent, actions, feature)
    params = probe.fit_linear_probe(feature, actions, A)
    assert np.mean(probe.linear_predict(params, feature) == actions) == 1.0
    scores = probe.probe_scores(data, data, K, A)
    assert scores["linear_accuracy"] == 1.0 and scores["majority_map_accuracy"] == scores["chance"]


@pytest.mark.slow
def test_trained_latent_actions_predict_the_true_action(tmp_path):
    """The preset's 3000 steps (about 2.5 min on 2 cores): the loss falls and both probes
    beat chance on held-out episodes (measured: chance 0.228, majority map 0.340, linear 0.522)."""
    data = tmp_path / "proc32"
    # World v2, where these figures were measured: v3's independent camera leaves less of the
    # frame change to the action, and the preset's loss no longer halves in 3000 steps
    # (0.66 -> 0.44 on v3, 2026-12-02); the latent-action study has not been redone on v3.
    make_dataset("procedural", data, episodes=200, frames=32, size=32, seed=0, version=2)
    # Trained in a child at XLA's default optimisation: 3000 steps run ~1.5x slower at the
    # suite's -O0 (conftest), which only pays off for compile-bound tests.
    sets = ["--set", f"data.dir={data}", "--set", "checkpoint.every_steps=3000"]
    cmd = [
        "-m",
        "wm_jax.cli",
        "train",
        "--config",
        "tiny_cpu_latent_actions",
        "--workdir",
        str(tmp_path / "lam"),
        *sets,
    ]
    done = run_python(cmd, env=optimized_xla_env())
    assert done.returncode == 0, done.stderr[-3000:]
    rows = read_metrics(tmp_path / "lam" / "metrics.jsonl")
    mean = lambda key, part: np.mean([r[key] for r in part])
    assert mean("loss", rows[-5:]) < 0.5 * mean("loss", rows[:3])
    assert mean("psnr", rows[-5:]) > mean("psnr_copy_last", rows[-5:]) + 1.5

    scores = evaluate(tmp_path / "lam")["latent_actions"]
    assert scores["num_test"] > 300
    assert scores["linear_accuracy"] > scores["chance"] + 0.15
    assert scores["majority_map_accuracy"] > scores["chance"] + 0.05
