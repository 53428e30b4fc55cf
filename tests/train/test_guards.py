"""Training guards on real runs: the numerics guard on the updated state (issue #16, case 2)
and Ctrl-C as a preemption signal (case 6)."""

import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from conftest import PRESET, REPO
from wm_jax import checkpoint as ckpt
from wm_jax import sharding
from wm_jax.cli import main
from wm_jax.config import MeshConfig
from wm_jax.run import restore_params
from wm_jax.telemetry import read_metrics
from wm_jax.train.lock import LOCK_FILE


def test_an_overflowing_update_is_rolled_back_and_never_checkpointed(tmp_path, tiny_overrides, capsys):
    """A learning rate of 1e39 is a finite config value but inf in float32: step 1's loss and
    gradient are finite, its update is not. Every update is rolled back, the third in a row
    stops the run (exit 3), and the checkpoint it names as last good is finite."""
    run = tmp_path / "run"
    sets = tiny_overrides + ["train.steps=20", "train.learning_rate=1e39", "train.warmup_steps=0"]
    assert main(["train", "--config", str(PRESET), *sum((["--set", o] for o in sets), []), "--workdir", str(run)]) == 3
    assert "last good checkpoint: 2" in capsys.readouterr().err
    assert [e["event"] for e in read_metrics(run / "events.jsonl")] == ["nonfinite"] * 3
    assert ckpt.finished_steps(run) == [2]
    params, _, step = restore_params(run, sharding.make_mesh(MeshConfig()), sharding.logical_rules(MeshConfig()))
    assert step == 2 and all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))


def _train(run, overrides):
    args = sum((["--set", o] for o in overrides), [])
    return subprocess.Popen(
        [sys.executable, "-m", "wm_jax.cli", "train", "--config", str(PRESET), *args, "--workdir", str(run)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def _stderr_lines(proc):
    """The process's stderr lines as they come (a list filled by a reader thread)."""
    lines = []
    threading.Thread(target=lambda: lines.extend(iter(proc.stderr.readline, "")), daemon=True).start()
    return lines


def _wait_for_first_step(proc, run) -> float:
    """Waits (at most 300 s) until the run has logged a step or exited; returns the deadline."""
    deadline = time.time() + 300
    while not read_metrics(run / "metrics.jsonl") and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    return deadline


def _interrupted_run(run, overrides):
    """A `wm train` stopped by one Ctrl-C (SIGINT) once it has logged a step: (exit code, stderr)."""
    proc = _train(run, overrides)
    lines = _stderr_lines(proc)
    try:
        _wait_for_first_step(proc, run)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=300)
    finally:
        proc.kill()
    time.sleep(0.2)  # the reader thread drains the pipe
    return proc.returncode, "".join(lines)


LONG = ["train.steps=100000", "checkpoint.every_steps=100000"]


def test_ctrl_c_saves_and_exits_42_without_a_traceback(tmp_path, tiny_overrides):
    run = tmp_path / "run"
    code, err = _interrupted_run(run, tiny_overrides + LONG)
    assert code == 42, err[-2000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    saved = ckpt.finished_steps(run)
    assert len(saved) == 1 and saved[0] >= read_metrics(run / "metrics.jsonl")[-1]["step"]
    assert read_metrics(run / "events.jsonl")[-1]["message"].startswith("SIGINT")


def test_ctrl_c_before_the_loop_exits_130_in_one_line(tmp_path, tiny_overrides):
    """Once the run is locked the step is still to be compiled: nothing to save, so Ctrl-C
    ends the process at once (not a KeyboardInterrupt, which a gc callback can swallow and
    whose interpreter shutdown can crash while XLA compiles)."""
    run = tmp_path / "run"
    proc = _train(run, tiny_overrides + LONG)
    try:
        deadline = time.time() + 300
        while not (run / LOCK_FILE).exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        err = proc.communicate(timeout=60)[1]
    finally:
        proc.kill()
    assert proc.returncode == 130, err[-2000:]
    lines = [line for line in err.strip().splitlines() if "os.fork()" not in line and "_fork_exec" not in line]
    assert lines[-1].startswith("interrupted: wm train stopped outside the training loop") and "Traceback" not in err
    assert not read_metrics(run / "metrics.jsonl")  # it stopped before the first step


@pytest.mark.slow
def test_a_second_ctrl_c_aborts_at_once_without_saving(tmp_path, tiny_overrides):
    run = tmp_path / "run"
    proc = _train(run, tiny_overrides + LONG)
    lines = _stderr_lines(proc)
    try:
        deadline = _wait_for_first_step(proc, run)
        proc.send_signal(signal.SIGINT)
        while not any("Ctrl-C again" in line for line in lines) and time.time() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=10)  # at once: not at the end of a step, not after a save
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGINT
    assert not (run / "checkpoints").exists() or not ckpt.latest_step(run)
