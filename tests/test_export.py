"""Runs that leave their directory: an inference bundle of a dynamics run (with its
tokenizer) evaluates like the run and stands alone; a run moved together with its
tokenizer run and dataset evaluates where it now is, and one moved alone names what is
missing and the fix."""

import json
import shutil

import pytest

from conftest import PRESET, TINY_OVERRIDES
from wm_jax import config as config_lib
from wm_jax.checkpoint import CheckpointError
from wm_jax.cli import main
from wm_jax.eval.evaluate import evaluate
from wm_jax.export import export_bundle
from wm_jax.run import read_bundle
from wm_jax.train.loop import train

GROUPS = ("tokenizer", "rollout", "baseline_copy_last", "controllability")


def _same_groups(a: dict, b: dict) -> bool:
    a, b = json.loads(json.dumps(a)), json.loads(json.dumps(b))
    return all(a[g] == b[g] for g in GROUPS)


def test_bundles_and_moved_runs_evaluate_like_the_run(tmp_path, tiny_dataset, monkeypatch, capsys):
    home = tmp_path / "home"
    shutil.copytree(tiny_dataset, home / "data")
    monkeypatch.chdir(home)  # relative paths, as typed at launch (`runs/demo/data`)
    cfg = lambda *extra: config_lib.load(PRESET, TINY_OVERRIDES + ["data.dir=data", "train.steps=2", *extra])
    train(cfg(), "tok")
    train(cfg("train.stage=dynamics", "train.tokenizer_workdir=tok"), "dyn")
    bundle = tmp_path / "bundle"
    info = export_bundle("dyn", bundle)
    assert info == read_bundle(bundle) and info["step"] == 2 and info["tokenizer"]["stage"] == "tokenizer"
    assert json.loads((bundle / "manifest.json").read_text())["run"]["dataset_hash"]
    from_run = evaluate("dyn", out_dir=tmp_path / "eval_run")
    monkeypatch.chdir(tmp_path)

    # Moved with its tokenizer run and dataset (the originals gone): found beside it.
    moved = tmp_path / "moved"
    shutil.move(home, moved)
    assert main(["eval", "--workdir", str(moved / "dyn"), "--out", str(tmp_path / "eval_moved")]) == 0
    assert _same_groups(json.loads((tmp_path / "eval_moved" / "metrics.json").read_text()), from_run)

    # Copied alone: the dataset, then the tokenizer run, named with the fix.
    alone = tmp_path / "alone" / "dyn"
    shutil.copytree(moved / "dyn", alone)
    shutil.rmtree(moved)
    capsys.readouterr()
    assert main(["eval", "--workdir", str(alone)]) == 2
    err = capsys.readouterr().err
    assert f"dataset directory {home / 'data'} does not exist" in err and "--data DIR" in err
    shutil.copytree(tiny_dataset, tmp_path / "data")
    assert main(["eval", "--workdir", str(alone), "--data", str(tmp_path / "data")]) == 2
    err = capsys.readouterr().err
    assert f"config key 'train.tokenizer_workdir' names {home / 'tok'}, which is not a run directory" in err
    assert "train.tokenizer_workdir=DIR" in err

    # The bundle carries its own tokenizer: nothing it came from is left.
    from_bundle = evaluate(bundle, data_dir=str(tmp_path / "data"), out_dir=tmp_path / "eval_bundle")
    assert _same_groups(from_bundle, from_run)
    with pytest.raises(CheckpointError, match="already exists"):
        export_bundle(bundle, bundle)
