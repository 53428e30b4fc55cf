"""Checkpoint integrity and restore-anywhere, on real orbax checkpoints on disk."""

import json
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorstore as ts

from conftest import PRESET
from multiproc import run_python
from wm_jax import checkpoint as ckpt
from wm_jax import config as config_lib
from wm_jax import sharding
from wm_jax.cli import main
from wm_jax.run import restore_params
from wm_jax.telemetry import read_metrics
from wm_jax.train.loop import train
from wm_jax.train.state import state_shardings


def _cfg(overrides, *extra):
    return config_lib.load(PRESET, list(overrides) + list(extra))


def _steps(run):
    return sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())


def _largest_file(directory):
    files = [p for p in directory.rglob("*") if p.is_file()]
    return max(files, key=lambda p: p.stat().st_size)


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_one_bit(path):
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    path.write_bytes(bytes(raw))


def _truncate_unsealed(path):
    """Truncates `path` in a step whose checksums are gone: only reading the step finds it."""
    step_dir = next(p for p in path.parents if p.parent.name == "checkpoints")
    (step_dir / ckpt.CHECKSUMS).unlink(missing_ok=True)
    _truncate(path)


def _copy(run, tmp_path):
    """A copy of a shared trained run, to change."""
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run"


@pytest.mark.parametrize(
    "damage, reported",
    [(_truncate, "/4"), (_flip_one_bit, "sha256 mismatch"), (_truncate_unsealed, "Error reading")],
    ids=["truncated", "altered", "truncated-unsealed"],
)
def test_damaged_checkpoint_falls_back_to_previous_step(tmp_path, tiny_overrides, tokenizer_run, damage, reported):
    run = _copy(tokenizer_run, tmp_path)  # trained 4 steps
    assert (run / "checkpoints" / "4" / ckpt.CHECKSUMS).exists()
    damage(_largest_file(run / "checkpoints" / "4" / "state"))
    train(_cfg(tiny_overrides, "train.steps=6"), run)
    events = read_metrics(run / "events.jsonl")
    assert [e["event"] for e in events] == ["damaged_checkpoint"] and reported in events[0]["message"]
    assert "\n" not in events[0]["message"] and "TensorStore(" not in events[0]["message"]  # one line, no spec dump
    assert list((run / "damaged_checkpoints").iterdir())  # moved aside, not deleted
    # resumed from step 2: steps 3 and 4 were trained (and logged) again
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2, 3, 4, 3, 4, 5, 6]


def test_half_written_checkpoint_directory_is_ignored(tmp_path, tiny_overrides, tokenizer_run):
    run = _copy(tokenizer_run, tmp_path)  # trained 4 steps
    partial = run / "checkpoints" / "6.orbax-checkpoint-tmp-1700000000000000"
    (partial / "state").mkdir(parents=True)
    (partial / "state" / "garbage").write_bytes(b"\0" * 100)
    assert ckpt.latest_step(run) == 4
    train(_cfg(tiny_overrides, "train.steps=6"), run)
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]


# Bytes of array chunks tensorstore decoded from the checkpoint's OCDBT files (process-wide).
_DECODED = "/tensorstore/internal/riegeli/noncontiguous_bytes"


def _decoded_bytes() -> int:
    found = [m for m in ts.experimental_collect_matching_metrics(_DECODED) if m["name"] == _DECODED]
    return sum(v["value"] for m in found for v in m["values"]) if found else -1


def test_params_only_restore_matches_full_restore_and_reads_no_optimizer_bytes(tiny_overrides, tokenizer_run):
    """Evaluators restore parameters alone (orbax partial restore of the `params` subtree):
    the same values as a full restore, and tensorstore decodes exactly the parameters'
    bytes, none of the optimizer state's (which is twice as large under Adam)."""
    run, cfg = tokenizer_run, _cfg(tiny_overrides, "train.steps=4")
    mesh = sharding.make_mesh(cfg.mesh)
    rules = sharding.logical_rules(cfg.mesh)
    before = _decoded_bytes()
    params, run_cfg, step = restore_params(run, mesh, rules)
    params_read = _decoded_bytes() - before
    abstract, _ = state_shardings(cfg, mesh, rules)
    manager = ckpt.make_manager(run, cfg.checkpoint, read_only=True)
    before = _decoded_bytes()
    full, _ = ckpt.restore(manager, 4, abstract)
    full_read = _decoded_bytes() - before
    manager.close()
    assert step == 4 and run_cfg == cfg
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(full.params), strict=True):
        np.testing.assert_array_equal(a, b)
    if before < 0:
        pytest.skip(f"this tensorstore has no metric {_DECODED}: bytes read not measured")
    param_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    state_bytes = sum(x.nbytes for x in jax.tree.leaves(full))
    assert state_bytes > 3 * param_bytes - 100  # params + Adam's mu and nu (+ step, counters)
    # Measured: exactly the array bytes (+1 byte in one run): the optimizer's 2x is absent.
    assert param_bytes <= params_read <= param_bytes + 64
    assert state_bytes <= full_read <= state_bytes + 64


def test_nonfinite_steps_stop_with_exit_3(tmp_path, tiny_overrides):
    """A learning rate of 1e30 blows the parameters up after one step: later losses are not
    finite, their updates are skipped, and the third in a row stops the run."""
    args = sum(
        (["--set", o] for o in tiny_overrides + ["train.steps=20", "train.learning_rate=1e30", "train.warmup_steps=0"]),
        [],
    )
    assert main(["train", "--config", str(PRESET), *args, "--workdir", str(tmp_path / "run")]) == 3
    events = [e["event"] for e in read_metrics(tmp_path / "run" / "events.jsonl")]
    assert events.count("nonfinite") == 3
    assert ckpt.latest_step(tmp_path / "run") is not None  # the last save is intact


_RESUME_SCRIPT = """
import sys
from wm_jax import config as config_lib
from wm_jax.train.loop import train
train(config_lib.load(sys.argv[1], sys.argv[4:]), sys.argv[2], stop_at=int(sys.argv[3]))
"""


def _train_on(devices, workdir, stop_at, overrides):
    out = run_python(["-c", _RESUME_SCRIPT, str(PRESET), str(workdir), str(stop_at), *overrides], devices, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_restore_8_to_4_to_1_devices_and_continue(tmp_path, tiny_overrides):
    """Saved sharded on 8 devices, resumed on 4, then on 1: training continues and the
    losses match a run that never changed devices."""
    run, ref = tmp_path / "run", tmp_path / "ref"
    common = tiny_overrides + ["train.steps=6", "checkpoint.every_steps=2"]
    _train_on(8, run, 2, common + ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"])
    _train_on(4, run, 4, common + ["mesh.fsdp=2", "mesh.tensor=2"])
    _train_on(1, run, 6, common)
    _train_on(1, ref, 6, common)
    assert _steps(run)[-1] == 6
    losses = lambda d: [r["loss"] for r in read_metrics(d / "metrics.jsonl")]
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose(losses(run), losses(ref), rtol=2e-4)


def test_preservation_keeps_the_newest_plus_every_kth(tmp_path, tiny_overrides):
    run = tmp_path / "run"
    train(_cfg(tiny_overrides, "train.steps=10", "checkpoint.max_to_keep=1", "checkpoint.keep_period=4"), run)
    assert _steps(run) == [4, 8, 10]
    manager = ckpt.make_manager(run, _cfg(tiny_overrides).checkpoint, read_only=True)
    manifest = manager.restore(10, args=ocp.args.Composite(manifest=ocp.args.JsonRestore()))["manifest"]
    manager.close()
    assert manifest["step"] == 10 and len(manifest["dataset_hash"]) == 64 and manifest["packages"]["jax"]


def test_minutes_policy_saves_between_step_saves(tmp_path, tiny_overrides):
    """`checkpoint.every_minutes` saves when that much wall time passed since the last save,
    whatever `every_steps` says: with a tiny interval, every step is saved."""
    run = tmp_path / "run"
    overrides = ["train.steps=3", "checkpoint.every_steps=1000", "checkpoint.max_to_keep=5"]
    train(_cfg(tiny_overrides, *overrides, "checkpoint.every_minutes=1e-9"), run)
    assert _steps(run) == [1, 2, 3]  # every_steps alone would have saved only the final step


# ---------------------------------------------------------------- readers (issue #16, case 4)


def _restore(run, step=None):
    cfg = config_lib.load(run / "config.yaml")
    return restore_params(run, sharding.make_mesh(cfg.mesh), sharding.logical_rules(cfg.mesh), step)


def test_eval_falls_back_past_a_damaged_newest_checkpoint_and_exits_2_when_none_is_left(
    tokenizer_run, tmp_path, capsys
):
    run = _copy(tokenizer_run, tmp_path)
    _truncate(_largest_file(run / "checkpoints" / "4" / "state"))
    assert main(["eval", "--workdir", str(run)]) == 0
    err = capsys.readouterr().err
    assert f"{run / 'checkpoints' / '4'} is damaged" in err and "sha256 mismatch" in err
    assert json.loads((run / "eval" / "metrics.json").read_text())["step"] == 2
    assert ckpt.finished_steps(run) == [2, 4]  # a reader moves nothing
    _largest_file(run / "checkpoints" / "2" / "state").unlink()  # partly deleted
    assert main(["eval", "--workdir", str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"error: no usable checkpoint in {run / 'checkpoints'}")
    assert "step 4" in err and "step 2" in err


def test_readers_name_an_unsealed_damaged_step_in_one_line(tokenizer_run, tmp_path, capsys):
    run = _copy(tokenizer_run, tmp_path)
    for path in (run / "checkpoints" / "4" / "state").rglob("*"):
        if path.parent.name == "d":  # every array's data, the parameters' included
            _truncate_unsealed(path)
    _, _, step = _restore(run)
    err = capsys.readouterr().err.strip()
    assert step == 2 and f"{run / 'checkpoints' / '4'} is damaged" in err and "Error reading" in err
    assert len(err.splitlines()) == 1 and "TensorStore(" not in err


def test_eval_of_a_run_whose_config_changed_names_the_key(tokenizer_run, tmp_path, capfd):
    """A config.yaml edited after training: exit 2 naming the differing key, as resume does;
    no step called damaged, no restore attempted (its failures print tracebacks from threads)."""
    run = _copy(tokenizer_run, tmp_path)
    config = run / "config.yaml"
    config.write_text(config.read_text().replace("embed_dim: 32", "embed_dim: 48"))
    assert main(["eval", "--workdir", str(run)]) == 2
    err = capfd.readouterr().err.strip()
    assert "model.tokenizer.embed_dim (checkpoint: 32, config: 48)" in err and str(config) in err
    assert len(err.splitlines()) == 1 and "damaged" not in err and "Traceback" not in err


def test_a_key_the_saved_config_lacks_counts_at_its_default(tiny_overrides):
    """A checkpoint written before a `model.*` key existed was written with its default."""
    cfg = _cfg(tiny_overrides)
    saved = config_lib.to_dict(cfg)
    del saved["model"]["dynamics"]["temporal_window"]
    assert ckpt.model_mismatch(saved, cfg) == []
    assert ckpt.model_mismatch(saved, config_lib.replace(cfg, ["model.dynamics.temporal_window=3"])) == [
        "model.dynamics.temporal_window (checkpoint: 0, config: 3)"
    ]


def test_garbage_checksums_are_named_and_the_step_set_aside_by_every_reader(tokenizer_run, tmp_path, capsys):
    run = _copy(tokenizer_run, tmp_path)
    checksums = run / "checkpoints" / "4" / ckpt.CHECKSUMS
    checksums.write_bytes(b"\x00garbage")
    _, _, step = _restore(run)
    assert step == 2 and f"checksum file {checksums}" in capsys.readouterr().err
    assert main(["export", "--workdir", str(run), "--step", "4", "--out", str(tmp_path / "bundle")]) == 2
    err = capsys.readouterr().err
    assert f"checkpoint {run / 'checkpoints' / '4'} is damaged: checksum file {checksums}" in err
    assert "Expecting value" not in err.split("(")[0]


def _step_4(run):
    """(config, abstract state, checkpoint manager, state, data state) of `run`'s step 4."""
    cfg = config_lib.load(run / "config.yaml")
    mesh = sharding.make_mesh(cfg.mesh)
    abstract, _ = state_shardings(cfg, mesh, sharding.logical_rules(cfg.mesh))
    manager = ckpt.make_manager(run, cfg.checkpoint)
    state, data = ckpt.restore(manager, 4, abstract)
    return cfg, abstract, manager, state, data


def test_the_loop_never_writes_a_non_finite_state(tokenizer_run, tmp_path):
    """`save_finite` (the training loop's save) refuses a NaN state and writes nothing; a
    finite one it saves."""
    run = _copy(tokenizer_run, tmp_path)
    cfg, abstract, manager, state, data = _step_4(run)
    poisoned = state.replace(params=jax.tree.map(lambda x: x.at[..., 0].set(np.inf), state.params))
    with pytest.raises(ckpt.CheckpointError, match="refused to save: the train state for .*6 holds non-finite"):
        ckpt.save_finite(manager, 6, poisoned, data, cfg, {"step": 6})
    assert ckpt.save_finite(manager, 8, state, data, cfg, {"step": 8})
    manager.wait_until_finished()
    manager.close()
    assert not (run / "checkpoints" / "6").exists() and ckpt.finished_steps(run) == [2, 4, 8]


def test_a_non_finite_checkpoint_is_never_good(tokenizer_run, tmp_path, capsys):
    """A NaN state on disk (written by code without the state guard) is skipped by readers
    and set aside by resume, like a damaged one."""
    run = _copy(tokenizer_run, tmp_path)
    cfg, abstract, manager, state, data = _step_4(run)
    poisoned = state.replace(params=jax.tree.map(lambda x: x * np.nan, state.params))
    ckpt.save(manager, 6, poisoned, data, cfg, {"step": 6})
    manager.wait_until_finished()
    ckpt.seal_finished(manager)
    _, _, step = _restore(run)
    assert step == 4 and "holds non-finite (NaN/inf) values" in capsys.readouterr().err
    warnings = []
    found = ckpt.restore_newest_good(manager, abstract, cfg, run, warn=warnings.append)
    manager.close()
    assert found[0] == 4 and "non-finite" in warnings[0] and ckpt.finished_steps(run) == [2, 4]
