"""Inference bundles: export a dynamics run (with its tokenizer) and evaluate the bundle."""

import json
import shutil

import pytest

from conftest import PRESET
from wm_jax import config as config_lib
from wm_jax.checkpoint import CheckpointError
from wm_jax.eval.evaluate import evaluate
from wm_jax.export import export_bundle, read_bundle
from wm_jax.train.loop import train


def test_bundle_evaluates_like_the_run_and_stands_alone(tmp_path, tiny_overrides):
    cfg = lambda *extra: config_lib.load(PRESET, tiny_overrides + list(extra))
    tok, dyn = tmp_path / "tok", tmp_path / "dyn"
    train(cfg("train.steps=2"), tok)
    train(cfg("train.steps=2", "train.stage=dynamics", f"train.tokenizer_workdir={tok}"), dyn)
    bundle = tmp_path / "bundle"
    info = export_bundle(dyn, bundle)
    assert info == read_bundle(bundle) and info["step"] == 2 and info["tokenizer"]["stage"] == "tokenizer"
    assert json.loads((bundle / "manifest.json").read_text())["run"]["dataset_hash"]

    from_run = evaluate(dyn, out_dir=tmp_path / "eval_run")
    shutil.rmtree(tok)  # the bundle carries its own tokenizer
    shutil.rmtree(dyn)
    from_bundle = evaluate(bundle, out_dir=tmp_path / "eval_bundle")
    for group in ("tokenizer", "rollout", "baseline_copy_last", "controllability"):
        assert from_bundle[group] == from_run[group]

    with pytest.raises(CheckpointError, match="already exists"):
        export_bundle(bundle, bundle)
