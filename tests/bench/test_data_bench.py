"""`wm bench data` on a tiny procedural dataset and config: real reads, loader and train steps.

No timing thresholds: the figures must be present, positive and consistent with each other.
"""

import json
import statistics

import pytest

from conftest import TINY_OVERRIDES
from data_pipelines import datasets
from wm_jax import config as config_lib
from wm_jax.bench import data as bench
from wm_jax.cli import main as wm_main
from wm_jax.config import ConfigError


def test_main_reports_consistent_figures(tmp_path, capsys):
    results = tmp_path / "RESULTS.md"
    args = [
        "--config",
        "tiny_cpu",
        "--episodes",
        "4",
        "--frames",
        "12",
        "--clips",
        "32",
        "--repeats",
        "2",
        "--warmup-batches",
        "1",
        "--train-steps",
        "1",
        "--workers",
        "0",
        "--results",
        str(results),
    ]
    args += [a for o in TINY_OVERRIDES for a in ("--set", o)]
    assert wm_main(["bench", "data", *args]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["bench"] == "data" and result["clips"] == 32 and result["repeats"] == 2
    assert len(result["raw_clips_per_s"]) == len(result["loader_clips_per_s"]) == 2
    assert min(result["raw_clips_per_s"] + result["loader_clips_per_s"]) > 0
    ratios = [lo / ra for lo, ra in zip(result["loader_clips_per_s"], result["raw_clips_per_s"])]
    assert result["loader_vs_raw"] == pytest.approx(statistics.median(ratios))
    assert result["train_clips_per_s"] == pytest.approx(8 / result["train_step_s"])  # data.batch_size=8
    assert result["loader_vs_train"] == pytest.approx(
        statistics.median(result["loader_clips_per_s"]) / result["train_clips_per_s"]
    )
    assert result["fields"] == ["frame", "action"]  # what the tokenizer stage's training loads
    assert "## data" in results.read_text() and "wm bench data --config tiny_cpu" in results.read_text()


def test_a_dataset_of_another_frame_size_is_refused(tmp_path):
    datasets.make_dataset("procedural", tmp_path / "ds", episodes=3, frames=10, size=8)
    cfg = config_lib.load(None, ["model.image_size=16"])
    with pytest.raises(ConfigError, match="--set model.image_size=8"):
        bench.run(tmp_path / "ds", cfg)
