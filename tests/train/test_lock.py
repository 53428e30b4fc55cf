"""One writer per run directory (issue #16, case 1): real processes contend for RUN/.lock."""

import socket
import subprocess
import sys
import time

import pytest

from conftest import PRESET, REPO
from wm_jax import config as config_lib
from wm_jax.cli import main
from wm_jax.telemetry import read_metrics
from wm_jax.train.lock import LOCK_FILE, RunLock

# Takes the run lock in a process of its own, says so, and holds it until killed.
_HOLD = """
import sys, time
from wm_jax.train.lock import RunLock
with RunLock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(600)
"""


def _train_command(run, overrides):
    args = sum((["--set", o] for o in overrides), [])
    return [sys.executable, "-m", "wm_jax.cli", "train", "--config", str(PRESET), *args, "--workdir", str(run)]


def test_second_writer_exits_2_naming_the_holder_then_a_stale_lock_is_taken_over(tmp_path, tiny_overrides):
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(run)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        second = subprocess.run(
            _train_command(run, tiny_overrides + ["train.steps=1"]),
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert second.returncode == 2, second.stderr[-2000:]
        assert f"pid {holder.pid} on host {socket.gethostname()}" in second.stderr
        assert "Traceback" not in second.stderr
        assert sorted(p.name for p in run.iterdir()) == [LOCK_FILE]  # refused before writing anything
    finally:
        holder.kill()  # SIGKILL: the kernel drops the lock, the holder's record stays
        holder.wait()
    with RunLock(run) as lock:  # (`train` logs these as events: the slow test below reads them)
        assert [kind for kind, _ in lock.events] == ["stale_lock"] and f"pid {holder.pid}" in lock.events[0][1]
    assert (run / LOCK_FILE).read_text() == ""  # released cleanly: the next holder finds no stale lock
    with RunLock(run) as lock:
        assert lock.events == []


def test_workdir_that_is_a_file_exits_2_in_one_line(tmp_path, capsys):
    """Issue #16, case 7."""
    not_a_dir = tmp_path / "run"
    not_a_dir.write_text("x")
    assert main(["train", "--config", str(PRESET), "--workdir", str(not_a_dir)]) == 2
    assert main(["train", "--config", str(PRESET), "--workdir", str(not_a_dir / "sub")]) == 2
    assert main(["eval", "--workdir", str(not_a_dir)]) == 2
    assert main(["export", "--workdir", str(not_a_dir), "--out", str(tmp_path / "bundle")]) == 2
    assert main(["data", "inspect", str(not_a_dir)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 5 and all(str(not_a_dir) in line for line in lines)
    assert lines[-1].endswith("is not a directory")


@pytest.mark.slow
def test_two_wm_train_one_second_apart_then_kill_9_and_restart(tmp_path, tiny_overrides):
    """The issue's repro: the same `wm train` twice on one workdir, one second apart, with
    different learning rates. One trains, the other exits 2 having written nothing. The
    trainer is then killed with SIGKILL: a restart takes its stale lock over (an event
    naming it) and finishes the run."""
    run = tmp_path / "run"
    common = tiny_overrides + ["train.steps=12", "checkpoint.every_steps=2"]
    rates = ["train.learning_rate=0.001", "train.learning_rate=0.002"]
    procs = []
    for rate in rates:
        procs.append(
            subprocess.Popen(
                _train_command(run, common + [rate]),
                cwd=REPO,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
        time.sleep(1)
    try:
        deadline = time.time() + 300
        while all(p.poll() is None for p in procs) and time.time() < deadline:
            time.sleep(0.2)
        loser = next(i for i, p in enumerate(procs) if p.poll() is not None)
        winner = procs[1 - loser]
        assert procs[loser].returncode == 2 and "is being trained by pid" in procs[loser].communicate()[1]
        while len(read_metrics(run / "metrics.jsonl")) < 3 and winner.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        winner.kill()
        winner.wait()
    finally:
        for p in procs:
            p.kill()
    restart = subprocess.run(
        _train_command(run, common + [rates[1 - loser]]), cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert restart.returncode == 0, restart.stderr[-2000:]
    events = read_metrics(run / "events.jsonl")
    assert [e["event"] for e in events] == ["stale_lock"] and f"pid {winner.pid}" in events[0]["message"]
    assert config_lib.load(run / "config.yaml").train.learning_rate == [0.001, 0.002][1 - loser]
    assert {r["step"] for r in read_metrics(run / "metrics.jsonl")} == set(range(1, 13))
