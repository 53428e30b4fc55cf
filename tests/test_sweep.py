"""`wm sweep`: spec validation, stable run names, cluster renders, and a real miniature
sweep (train, report, skip finished runs, resume an interrupted one)."""

import csv
import json
from pathlib import Path

import pytest
import yaml

from conftest import REPO, TINY_OVERRIDES
from wm_jax.ops import sweep
from wm_jax.cli import main
from wm_jax.config import ConfigError


def _wm(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def _spec(tmp_path: Path, **fields) -> Path:
    """A tokenizer-stage spec file with a fake data dir (validation never reads it)."""
    spec = {
        "name": "t",
        "base": "tiny_cpu",
        "set": ["data.dir=/nowhere"],
        "grid": {"train.learning_rate": [0.001, 0.002]},
        "out": str(tmp_path / "sweep"),
        **fields,
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


# ------------------------------------------------------------------------ validation


def test_unknown_config_key_names_the_closest_match(tmp_path, capsys):
    path = _spec(tmp_path, grid={"model.dynamics.use_action": [True, False]})
    with pytest.raises(ConfigError, match=r"model.dynamics.use_action'.*did you mean 'model.dynamics.use_actions'"):
        sweep.plan(path)
    code, _, err = _wm(capsys, "sweep", path, "--dry-run")
    assert code == 2 and "model.dynamics.use_actions" in err


def test_unknown_key_in_set_and_random_are_caught(tmp_path):
    with pytest.raises(ConfigError, match="train.stepz.*did you mean 'train.steps'"):
        sweep.plan(_spec(tmp_path, set=["data.dir=/x", "train.stepz=3"]))
    random = {"samples": 2, "seed": 0, "keys": {"train.learnin_rate": {"loguniform": [1e-4, 1e-2]}}}
    with pytest.raises(ConfigError, match="did you mean 'train.learning_rate'"):
        sweep.plan(_spec(tmp_path, random=random))


def test_arms_are_named_override_sets_crossed_with_grid_and_seeds(tmp_path):
    arms = {
        "plain": {"model.dynamics.use_camera": False, "model.dynamics.use_actions": False},
        "camera": {"model.dynamics.use_camera": True},
    }
    p = sweep.plan(_spec(tmp_path, arms=arms, grid={}, seeds=[0, 1]))
    assert [r.name for r in p.runs] == [
        "arm-plain_seed-0",
        "arm-plain_seed-1",
        "arm-camera_seed-0",
        "arm-camera_seed-1",
    ]
    plain, camera = p.runs[0].config.model.dynamics, p.runs[2].config.model.dynamics
    assert (plain.use_camera, plain.use_actions) == (False, False) and (camera.use_camera, camera.use_actions) == (
        True,
        True,
    )
    assert p.runs[3].varied == {"arm": "camera", "seed": 1} and p.runs[3].config.seed == 1


def test_bad_arms_are_rejected_naming_the_key(tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'model.dynamics.use_camera'"):
        sweep.plan(_spec(tmp_path, arms={"a": {"model.dynamics.use_camra": False}}))
    with pytest.raises(ConfigError, match="'train.learning_rate' is set by arm 'a' and swept"):
        sweep.plan(_spec(tmp_path, arms={"a": {"train.learning_rate": 0.1}}))
    with pytest.raises(ConfigError, match="'arms' must map arm names"):
        sweep.plan(_spec(tmp_path, arms={}))


def test_empty_grid_list_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="grid key 'train.steps' has an empty list"):
        sweep.plan(_spec(tmp_path, grid={"train.steps": []}))


def test_value_of_the_wrong_type_names_the_key(tmp_path, capsys):
    path = _spec(tmp_path, grid={"train.steps": [2, "many"]})
    with pytest.raises(ConfigError, match="'train.steps' must be an int"):
        sweep.plan(path)
    code, _, err = _wm(capsys, "sweep", path)
    assert code == 2 and "train.steps" in err


def test_unknown_spec_field_and_metric_group(tmp_path):
    with pytest.raises(ConfigError, match="unknown sweep spec field 'seed'.*did you mean 'seeds'"):
        sweep.plan(_spec(tmp_path, seed=[0]))
    with pytest.raises(ConfigError, match="unknown group 'controlability'.*did you mean 'controllability'"):
        sweep.plan(_spec(tmp_path, eval=True, metrics=["controlability.delta_psnr"]))
    with pytest.raises(ConfigError, match="set 'eval: true'"):
        sweep.plan(_spec(tmp_path, metrics=["controllability.delta_psnr"]))
    with pytest.raises(ConfigError, match="random.keys.train.learning_rate.loguniform"):
        sweep.plan(_spec(tmp_path, random={"samples": 1, "keys": {"train.learning_rate": {"loguniform": [0, 1]}}}))


def test_dynamics_sweep_needs_a_tokenizer(tmp_path, capsys):
    path = _spec(tmp_path, base="tiny_cpu_dynamics")
    code, _, err = _wm(capsys, "sweep", path, "--dry-run")
    assert code == 2 and "train.tokenizer_workdir" in err
    code, out, _ = _wm(capsys, "sweep", path, "--dry-run", "--set", "train.tokenizer_workdir=/tok")
    assert code == 0 and len(out.strip().splitlines()) == 2


def test_shipped_specs_expand():
    ablation = sweep.plan(
        REPO / "experiments/sweeps/actions_ablation.yaml", ["data.dir=/d", "train.tokenizer_workdir=/tok"]
    )
    assert [r.name for r in ablation.runs] == [
        "use_actions-true_seed-0",
        "use_actions-true_seed-1",
        "use_actions-false_seed-0",
        "use_actions-false_seed-1",
    ]
    assert all(r.config.train.stage == "dynamics" for r in ablation.runs)
    assert ablation.runs[3].config.model.dynamics.use_actions is False and ablation.runs[3].config.seed == 1
    mini = sweep.plan(REPO / "experiments/sweeps/mini_ci.yaml", ["data.dir=/d"])
    assert len(mini.runs) == 2 and mini.runs[0].config.train.steps == 2


# ----------------------------------------------------------------------------- names


def test_run_names_are_stable_and_ignore_grid_key_order(tmp_path):
    grid = {"model.dynamics.use_actions": [True, False], "train.learning_rate": [0.001, 0.003]}
    a = sweep.plan(_spec(tmp_path, grid=grid, seeds=[0, 1]))
    b = sweep.plan(_spec(tmp_path, grid=dict(reversed(list(grid.items()))), seeds=[0, 1]))
    assert [r.name for r in a.runs] == [r.name for r in b.runs]
    assert [r.name for r in a.runs] == [r.name for r in sweep.plan(_spec(tmp_path, grid=grid, seeds=[0, 1])).runs]
    assert "use_actions-false_learning_rate-0.003_seed-1" in [r.name for r in a.runs]
    assert all(r.workdir == str(tmp_path / "sweep" / "runs" / r.name) for r in a.runs)


def test_run_names_stay_unique_and_filesystem_safe():
    combos = [
        {"model.tokenizer.embed_dim": 32, "model.dynamics.embed_dim": 32, "data.dir": "a/b c"},
        {"model.tokenizer.embed_dim": 32, "model.dynamics.embed_dim": 64, "data.dir": "a/b c"},
        {"model.tokenizer.fsq_levels": [5, 5, 5]},
        {"model.tokenizer.fsq_levels": [8, 5, 5, 5]},
    ]
    names = sweep.run_names(combos)
    assert len(set(names)) == 4
    assert all(sweep.SAFE_NAME.match(n) for n in names)
    assert "tokenizer-embed_dim-32" in names[0] and "dynamics-embed_dim-64" in names[1]
    # Long values are cut and made unique with a hash.
    long = sweep.run_names([{"data.dir": "x" * 200}, {"data.dir": "x" * 199 + "y"}])
    assert len(set(long)) == 2 and all(len(n) <= sweep.NAME_MAX + 7 for n in long)


def test_random_samples_are_reproducible(tmp_path):
    random = {
        "samples": 3,
        "seed": 7,
        "keys": {
            "train.learning_rate": {"loguniform": [1e-4, 1e-2]},
            "model.dynamics.head": {"choice": ["factorized", "joint"]},
        },
    }
    a, b = sweep.plan(_spec(tmp_path, random=random)), sweep.plan(_spec(tmp_path, random=random))
    assert len(a.runs) == 6 and [r.overrides for r in a.runs] == [r.overrides for r in b.runs]
    assert all(1e-4 <= r.config.train.learning_rate <= 1e-2 for r in a.runs)


# -------------------------------------------------------------------------- clusters


def test_slurm_dry_run_is_an_array_job(tmp_path, capsys):
    path = _spec(tmp_path, seeds=[0, 1, 2])
    code, out, _ = _wm(capsys, "sweep", path, "--launcher", "slurm", "--dry-run", "--set", "train.steps=5")
    assert code == 0
    assert "#SBATCH --array=0-5" in out
    assert f'sweep run-one {path.resolve()} --index "$SLURM_ARRAY_TASK_ID" --set train.steps=5' in out
    assert not (tmp_path / "sweep").exists()  # a dry run writes nothing


def test_k8s_dry_run_renders_one_job_per_run(tmp_path, capsys):
    code, out, _ = _wm(capsys, "sweep", _spec(tmp_path), "--launcher", "k8s", "--dry-run")
    assert code == 0
    docs = [d for d in yaml.safe_load_all(out) if d]
    jobs = [d for d in docs if d["kind"] == "Job"]
    assert [j["metadata"]["name"] for j in jobs] == ["wm-t-0", "wm-t-1"]
    configs = [yaml.safe_load(d["data"]["config.yaml"]) for d in docs if d["kind"] == "ConfigMap"]
    assert [c["train"]["learning_rate"] for c in configs] == [0.001, 0.002]
    command = jobs[1]["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[command.index("--workdir") + 1] == str(tmp_path / "sweep" / "runs" / "learning_rate-0.002")


# ------------------------------------------------------------------- end to end


def test_failed_runs_are_reported_and_the_others_go_on(tmp_path, tiny_dataset, capsys):
    # Frame sizes that do not match the dataset: each run fails fast in train's dataset
    # check, here in `wm sweep run-one` subprocesses (--parallel 2).
    fixed = [o for o in TINY_OVERRIDES if not o.startswith("model.image_size=")] + [f"data.dir={tiny_dataset}"]
    path = _spec(tmp_path, set=fixed, grid={"model.image_size": [8, 12]})
    code, out, _ = _wm(capsys, "sweep", path, "--parallel", "2")
    assert code == 1
    assert out.count("failed (exit 2)") == 2
    for name in ("image_size-8", "image_size-12"):
        error = (tmp_path / "sweep" / "runs" / name / "error.txt").read_text()
        assert "exit code 2" in error and "model.image_size" in error
    # In this process the same failures give the same report.
    code, out, _ = _wm(capsys, "sweep", path)
    assert code == 1 and out.count("failed (exit 2)") == 2
    assert "model.image_size" in (tmp_path / "sweep" / "runs" / "image_size-8" / "error.txt").read_text()


@pytest.mark.slow
def test_miniature_sweep_end_to_end(tmp_path, tiny_dataset, capsys):
    fixed = TINY_OVERRIDES + ["train.steps=2", f"data.dir={tiny_dataset}"]
    path = _spec(tmp_path, set=fixed, grid={"train.learning_rate": [0.001, 0.003]}, seeds=[0], metrics=["train.loss"])
    out_dir = tmp_path / "sweep"
    code, out, _ = _wm(capsys, "sweep", path)  # one after another, in this process
    assert code == 0, out
    names = ["learning_rate-0.001", "learning_rate-0.003"]
    assert out.split() == [names[0], "ran", names[1], "ran"]
    record = json.loads((out_dir / "sweep.json").read_text())
    assert [r["name"] for r in record["runs"]] == names and record["runs"][1]["varied"] == {
        "train.learning_rate": 0.003
    }
    runs = out_dir / "runs"
    logged = {n: (runs / n / "metrics.jsonl").read_text() for n in names}
    assert all(json.loads((runs / n / "train_summary.json").read_text())["step"] == 2 for n in names)
    assert all((runs / n / "tb").is_dir() for n in names)

    code, _, _ = _wm(capsys, "sweep", "report", path)
    assert code == 0
    rows = list(csv.DictReader(open(out_dir / "results.csv")))
    assert [r["run"] for r in rows] == names and all(float(r["train.loss"]) > 0 for r in rows)
    assert [r["train.learning_rate"] for r in rows] == ["0.001", "0.003"]
    md = (out_dir / "results.md").read_text()
    assert md.count("| learning_rate-0.00") == 2 and "train.learning_rate=0.003" in md
    for png in ("loss_curves.png", "train.loss_vs_learning_rate.png"):
        assert (out_dir / png).stat().st_size > 1000

    code, out, _ = _wm(capsys, "sweep", path)  # everything finished: nothing retrained
    assert code == 0 and out.split() == [names[0], "skipped", names[1], "skipped"]
    assert {n: (runs / n / "metrics.jsonl").read_text() for n in names} == logged

    (runs / names[1] / "train_summary.json").unlink()  # as if interrupted before the end
    code, out, _ = _wm(capsys, "sweep", path)
    assert code == 0 and out.split() == [names[0], "skipped", names[1], "ran"]
    assert (runs / names[1] / "train_summary.json").is_file()
    assert (runs / names[0] / "metrics.jsonl").read_text() == logged[names[0]]


def test_report_shows_missing_runs(tmp_path, capsys):
    path = _spec(tmp_path, seeds=[0, 1], metrics=["train.loss"])
    code, _, _ = _wm(capsys, "sweep", "report", path)
    assert code == 0
    rows = list(csv.DictReader(open(tmp_path / "sweep" / "results.csv")))
    assert len(rows) == 4 and {r["status"] for r in rows} == {"missing"} and {r["train.loss"] for r in rows} == {""}
    md = (tmp_path / "sweep" / "results.md").read_text()
    assert "missing (0/2)" in md
    assert (tmp_path / "sweep" / "train.loss_vs_learning_rate.png").is_file()


def test_report_tabulates_and_plots_per_step_metrics(tmp_path, capsys):
    # Hand-written eval outputs (the report reads them; what wrote them does not matter):
    # PSNR per horizon step of different lengths, one run without an evaluation.
    path = _spec(tmp_path, seeds=[0, 1], eval=True, metrics=["rollout.psnr", "tokenizer.psnr"])
    assert _wm(capsys, "sweep", "report", path)[0] == 0
    names = [r["run"] for r in csv.DictReader(open(tmp_path / "sweep" / "results.csv"))]
    series = {
        "learning_rate-0.001_seed-0": [20.0, 18.0, 16.0, 15.0],
        "learning_rate-0.001_seed-1": [22.0, 20.0, 18.0, 17.0],
        "learning_rate-0.002_seed-0": [19.0, 17.0],
    }
    assert set(series) < set(names)
    for name, psnr in series.items():
        (tmp_path / "sweep" / "runs" / name / "eval").mkdir(parents=True)
        # Equal tokenizer PSNRs up to float rounding (one ulp apart)
        metrics = {"rollout": {"psnr": psnr}, "tokenizer": {"psnr": 25.0 if name.endswith("0") else 25.000000000000004}}
        (tmp_path / "sweep" / "runs" / name / "eval" / "metrics.json").write_text(json.dumps(metrics))
    assert _wm(capsys, "sweep", "report", path)[0] == 0
    md = (tmp_path / "sweep" / "results.md").read_text()
    table = md[md.index("## `rollout.psnr` per step") :]
    assert "| setting | step 1 | step 2 | step 4 |" in table  # steps 1, 2, 4 and none past the last
    assert "| train.learning_rate=0.001 | 21 ± 1.4 (2/2) | 19 ± 1.4 (2/2) | 16 ± 1.4 (2/2) |" in table
    assert "| train.learning_rate=0.002 | 19 (1/2) | 17 (1/2) | missing (0/2) |" in table
    assert "tokenizer.psnr` per step" not in md  # a scalar has no per-step table
    assert "| 25 ± 0 (2/2) |" in md  # equal values: std 0, not rounding noise
    assert (tmp_path / "sweep" / "rollout.psnr_per_step.png").stat().st_size > 1000
    assert "![rollout.psnr_per_step.png](rollout.psnr_per_step.png)" in md
