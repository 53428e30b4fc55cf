"""End to end on real components: grain → mesh → jit step → orbax → resume → eval."""

import json
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import PRESET, REPO, TINY_OVERRIDES, without_session_compile_cache
from multiproc import cpu_env, finish, free_port, start
from wm_jax import config as config_lib
from wm_jax.cli import main
from wm_jax.eval.evaluate import evaluate
from wm_jax.telemetry import read_metrics
from wm_jax.train.loop import train


def _cfg(overrides, *extra):
    return config_lib.load(PRESET, list(overrides) + list(extra))


def _leaves(state):
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(state.params))]


def test_train_checkpoint_resume_eval(tmp_path, tiny_overrides, tokenizer_run, dynamics_run):
    tok = tmp_path / "tok"
    shutil.copytree(tokenizer_run, tok)  # trained 4 steps (conftest)
    assert sorted(int(p.name) for p in (tok / "checkpoints").iterdir() if p.name.isdigit()) == [2, 4]
    assert (tok / "config.yaml").exists() and list((tok / "tb").iterdir())
    # Running again with more steps resumes at 4: only steps 5 and 6 are logged anew.
    assert train(_cfg(tiny_overrides, "train.steps=6"), tok) is not None
    rows = read_metrics(tok / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    # Throughput on every logged step; a CPU has no peak in the table, so no MFU is made up.
    for row in rows:
        assert row["tokens_per_s"] > 0 and row["tflops_per_device"] > 0 and 0 <= row["data_wait_fraction"] < 1
        assert "mfu" not in row

    out = tmp_path / "eval"  # the shared run stays as it is
    result = evaluate(dynamics_run, out_dir=out)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics == json.loads(json.dumps(result))
    assert metrics["step"] == 2 and len(metrics["dataset_hash"]) == 64
    for group in ("rollout", "baseline_copy_last"):
        assert metrics[group]["horizon"] == [1, 2, 3] and np.all(np.isfinite(metrics[group]["psnr"]))
    assert set(metrics["controllability"]) == {
        "psnr_true_actions",
        "psnr_random_actions",
        "delta_psnr",
        "delta_psnr_t4",
        "delta_psnr_per_horizon",
        "delta_psnr_t4_before_cut",
        "num_clips_before_cut",
    }
    assert len(metrics["rollout"]["ssim"]) == 3 and all(-1 <= v <= 1 for v in metrics["rollout"]["ssim"])
    assert set(metrics["action_following"]) == {"true_actions", "random_actions"}
    assert set(metrics["camera_following"]) == {"model", "baseline_copy_last", "truth"}
    assert metrics["camera_following"]["truth"]["within_1px"] > 0.5  # the metric sees the true pans
    assert {"before_cut", "swap_margin"} <= set(metrics["identity_persistence"])
    assert "reappear_psnr" in metrics["object_permanence"]
    assert np.isfinite(metrics["tokenizer"]["psnr"])
    for name in ("report.md", "psnr_vs_horizon.png", "rollout.gif"):
        assert (out / name).stat().st_size > 0


def test_resume_matches_uninterrupted_run(tmp_path, tiny_overrides):
    """Same params after 6 straight steps as after 3 + resume + 3 (state and data position restored)."""
    straight = train(_cfg(tiny_overrides, "train.steps=6", "checkpoint.every_steps=3"), tmp_path / "a")
    train(_cfg(tiny_overrides, "train.steps=6", "checkpoint.every_steps=3"), tmp_path / "b", stop_at=3)
    resumed = train(_cfg(tiny_overrides, "train.steps=6", "checkpoint.every_steps=3"), tmp_path / "b")
    for x, y in zip(_leaves(straight), _leaves(resumed)):
        np.testing.assert_array_equal(x, y)
    losses = lambda d: [r["loss"] for r in read_metrics(d / "metrics.jsonl")]
    assert losses(tmp_path / "a") == losses(tmp_path / "b")


def _run_cli(*args):
    return main([str(a) for a in args])


def test_missing_data_dir_exits_2(tmp_path, capsys):
    code = _run_cli(
        "train", "--config", PRESET, "--set", f"data.dir={tmp_path / 'nope'}", "--workdir", tmp_path / "run"
    )
    assert code == 2
    assert "nope" in capsys.readouterr().err


def test_corrupt_shard_exits_2(tmp_path, tiny_dataset, capsys):
    data = tmp_path / "data"
    shutil.copytree(tiny_dataset, data)
    shard = sorted((data / "train").glob("*.array_record"))[0]
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    shard.write_bytes(bytes(raw))
    args = sum((["--set", o] for o in TINY_OVERRIDES + [f"data.dir={data}", "train.steps=1"]), [])
    code = _run_cli("train", "--config", PRESET, *args, "--workdir", tmp_path / "run")
    assert code == 2
    err = capsys.readouterr().err
    assert shard.name in err and "sha256" in err


def test_incompatible_checkpoint_exits_2(tmp_path, tiny_overrides, tokenizer_run, capsys):
    run = tmp_path / "run"
    shutil.copytree(tokenizer_run, run)  # trained 4 steps
    args = sum((["--set", o] for o in tiny_overrides + ["train.steps=6", "model.tokenizer.embed_dim=48"]), [])
    assert _run_cli("train", "--config", PRESET, *args, "--workdir", run) == 2
    err = capsys.readouterr().err
    assert "model.tokenizer.embed_dim" in err and "32" in err and "48" in err
    # The same model, but a loader the saved data position does not fit (another window stride).
    args = sum((["--set", o] for o in tiny_overrides + ["train.steps=6", "data.window_stride=2"]), [])
    assert _run_cli("train", "--config", PRESET, *args, "--workdir", run) == 2
    assert "data position saved at step 4 does not fit this loader" in capsys.readouterr().err


def test_sigterm_saves_and_exits_42(tmp_path, tiny_overrides):
    run = tmp_path / "run"
    args = sum((["--set", o] for o in tiny_overrides + ["train.steps=100000", "checkpoint.every_steps=100000"]), [])
    proc = subprocess.Popen(
        [sys.executable, "-m", "wm_jax.cli", "train", "--config", str(PRESET), *args, "--workdir", str(run)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.time() + 300
        while not read_metrics(run / "metrics.jsonl") and time.time() < deadline and proc.poll() is None:
            time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 42, err[-2000:]
    saved = [int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit()]
    logged = read_metrics(run / "metrics.jsonl")[-1]["step"]
    assert len(saved) == 1 and saved[0] >= logged  # saved at the step it stopped, not before
    # ...and the run resumes from it (here told to stop two steps later)
    train(_cfg(tiny_overrides, f"train.steps={saved[0] + 2}"), run)
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")][-2:] == [saved[0] + 1, saved[0] + 2]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_sigterm_to_one_of_two_processes_stops_both_at_the_same_step(tmp_path, tiny_overrides):
    """Two real JAX processes (2 fake CPU devices each) train one model; only process 0 gets
    SIGTERM, yet both save the same step and exit 42."""
    port, run = free_port(), tmp_path / "run"
    args = sum((["--set", o] for o in tiny_overrides + ["train.steps=100000", "checkpoint.every_steps=100000"]), [])
    procs = start(
        lambda i: [
            "-m",
            "wm_jax.cli",
            "train",
            "--config",
            str(PRESET),
            *args,
            "--workdir",
            str(run),
            "--coordinator",
            f"127.0.0.1:{port}",
            "--num-processes",
            "2",
            "--process-id",
            str(i),
        ],
        2,
        env_of=lambda i: cpu_env(2),
        stdout=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 300
        while (
            not read_metrics(run / "metrics.jsonl") and time.time() < deadline and all(p.poll() is None for p in procs)
        ):
            time.sleep(0.5)
        procs[0].send_signal(signal.SIGTERM)
        errs = [err for _, err in finish(procs)]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [42, 42], [e[-1500:] for e in errs]
    saved = [int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit()]
    assert len(saved) == 1 and saved[0] >= read_metrics(run / "metrics.jsonl")[-1]["step"]


def test_a_restart_reads_its_compiled_step_from_the_run_compile_cache(tmp_path, tiny_overrides):
    """Issue 20: the run's compile_cache/ holds the compiled programs, a restarted process
    finds its train step there instead of compiling it, and each process reports its time
    to first step."""
    from multiproc import run_python

    script = (
        "import sys; from wm_jax import config as c; from wm_jax.train.loop import train; "
        "train(c.load(sys.argv[1], sys.argv[4:]), sys.argv[2], stop_at=int(sys.argv[3]))"
    )
    run = tmp_path / "run"
    own_cache = without_session_compile_cache()
    for stop_at in (2, 4):
        out = run_python(
            ["-c", script, str(PRESET), str(run), str(stop_at), *tiny_overrides, "train.steps=6"], env=own_cache
        )
        assert out.returncode == 0, out.stderr[-3000:]
        summary = json.loads((run / "train_summary.json").read_text())
        assert summary["time_to_first_step_s"] > 0 and summary["compile_cache_dir"] == str(run / "compile_cache")
        if stop_at == 2:
            steps = {p.name for p in (run / "compile_cache").glob("jit_train_step-*")}
    assert steps and {p.name for p in (run / "compile_cache").glob("jit_train_step-*")} == steps
