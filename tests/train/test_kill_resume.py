"""kill -9 at random moments, restart each time: the run ends as if never interrupted."""

import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import PRESET, REPO
from wm_jax import config as config_lib
from wm_jax import sharding
from wm_jax.run import restore_params
from wm_jax.telemetry import read_metrics

STEPS = 16


def _command(run, overrides):
    args = sum((["--set", o] for o in overrides + [f"train.steps={STEPS}", "checkpoint.every_steps=2"]), [])
    return [sys.executable, "-m", "wm_jax.cli", "train", "--config", str(PRESET), *args, "--workdir", str(run)]


def _rows_logged(run):
    return len(read_metrics(run / "metrics.jsonl")) if (run / "metrics.jsonl").exists() else 0


def _final_params(run, overrides):
    cfg = config_lib.load(PRESET, overrides)
    mesh = sharding.make_mesh(cfg.mesh)
    params, _, step = restore_params(run, mesh, sharding.logical_rules(cfg.mesh))
    assert step == STEPS
    return [np.asarray(x) for x in jax.tree.leaves(params)]


@pytest.mark.slow
def test_sigkill_at_five_random_points_resumes_bit_identically(tmp_path, tiny_overrides):
    straight = tmp_path / "straight"
    subprocess.run(_command(straight, tiny_overrides), cwd=REPO, check=True, capture_output=True, timeout=600)
    reference = {r["step"]: r for r in read_metrics(straight / "metrics.jsonl")}
    assert sorted(reference) == list(range(1, STEPS + 1))

    run, rng, kills = tmp_path / "killed", random.Random(0), 0
    while kills < 5:
        proc = subprocess.Popen(
            _command(run, tiny_overrides), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        # Kill once this life has logged a random number of new steps, plus a random delay,
        # so kills land mid-step, mid-save and mid-write alike.
        target = min(_rows_logged(run) + rng.randint(1, 3), 10**9)
        deadline = time.time() + 300
        while _rows_logged(run) < target and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 0.4))
        if proc.poll() is not None:  # finished before we could kill it
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        kills += 1
    final = subprocess.run(_command(run, tiny_overrides), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert final.returncode == 0, final.stderr[-3000:]
    assert kills == 5

    rows = read_metrics(run / "metrics.jsonl")
    assert {r["step"] for r in rows} == set(reference)
    for r in rows:  # every logged step, including those replayed after a resume
        ref = reference[r["step"]]
        assert r["loss"] == ref["loss"], r["step"]
        assert r["batch_crc32"] == ref["batch_crc32"], r["step"]
    for a, b in zip(_final_params(straight, tiny_overrides), _final_params(run, tiny_overrides), strict=True):
        np.testing.assert_array_equal(a, b)
