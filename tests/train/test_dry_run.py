"""`wm train --dry-run`: compile for the mesh without data, report parameters, FLOPs, memory."""

import json

import jax

from conftest import PRESET, TINY_OVERRIDES
from wm_jax import config as config_lib
from wm_jax.cli import main
from wm_jax.stages.dynamics import DYNAMICS
from wm_jax.train import dry_run
from wm_jax.train.state import build_model, example_inputs, param_count


def test_cli_dry_run_needs_no_data_and_prints_the_plan(tmp_path, capsys):
    overrides = TINY_OVERRIDES + [
        "train.stage=dynamics",
        "train.tokenizer_workdir=/nonexistent",
        "data.dir=/nonexistent",
    ]
    args = ["train", "--config", str(PRESET), "--workdir", str(tmp_path / "run"), "--dry-run"]
    assert main(args + [a for o in overrides for a in ("--set", o)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    report = json.loads(out[-1])
    cfg = config_lib.load(PRESET, overrides)
    variables = jax.eval_shape(build_model(cfg).init, jax.random.key(0), *example_inputs(cfg))
    assert report["parameters"] == param_count(variables["params"])
    assert report["flops_per_step"] == DYNAMICS.train_step_flops(cfg)
    assert report["peak_bytes"] > report["argument_bytes"] > 0
    assert any(line.startswith("per-device memory:") for line in out)
    assert not (tmp_path / "run").exists()  # nothing written, nothing trained


def test_fits_compares_peak_with_the_device_capacity():
    assert dry_run.fits({"peak_bytes": 10})  # capacity unknown (CPU): no verdict against it
    assert dry_run.fits({"peak_bytes": 10, "device_bytes_limit": 10})
    report = {"peak_bytes": 11, "device_bytes_limit": 10}
    assert not dry_run.fits(report)
