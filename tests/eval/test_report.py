"""The eval report's plots on hand-made metrics (no model): bars per headline group."""

import numpy as np

from wm_jax.eval.evaluate import metric_bar_groups, plot_metric_bars, report_markdown

PNG = b"\x89PNG\r\n\x1a\n"


def _result(**groups):
    return {"step": 7, "workdir": "runs/x", "data_dir": "data/x", "split": "test", "dataset_hash": "0" * 64,
            "num_clips": 2, "tokenizer": {"psnr": 25.0}, **groups}


def test_bars_skip_absent_and_null_groups(tmp_path):
    result = _result(
        rollout={"horizon": [1, 2], "psnr": [20.0, 18.0], "ssim": [0.8, 0.6]},
        rollout_random_actions={"horizon": [1, 2], "psnr": [19.0, 17.0], "ssim": [0.7, 0.5]},
        baseline_copy_last={"horizon": [1, 2], "psnr": [21.0, 15.0], "ssim": [0.9, 0.5]},
        object_permanence={"reappear_psnr": None, "visible_psnr": float("nan")},  # nothing reappeared
        identity_persistence={"before_cut": 0.9, "after_cut": None, "swap_margin": 0.2},
    )
    groups = dict(metric_bar_groups(result))
    assert list(groups) == ["tokenizer PSNR (dB)", "rollout PSNR, mean over horizon (dB)",
                            "rollout SSIM, mean over horizon", "identity persistence"]
    assert groups["rollout PSNR, mean over horizon (dB)"] == [("model", 19.0), ("random actions", 18.0),
                                                              ("copy last", 18.0)]
    assert [label for label, _ in groups["identity persistence"]] == ["similarity before cut", "swap margin"]
    plot_metric_bars(result, tmp_path / "bars.png")
    assert (tmp_path / "bars.png").read_bytes()[:8] == PNG
    plot_metric_bars(_result(), tmp_path / "tokenizer_only.png")
    assert (tmp_path / "tokenizer_only.png").read_bytes()[:8] == PNG


def test_counterfactual_group_is_plotted_and_tabulated(tmp_path):
    cf = {"horizon": [1, 2], "psnr_vs_counterfactual_truth": [30.0, 28.0], "psnr_vs_factual_truth": [29.0, 27.0],
          "ssim_vs_counterfactual_truth": [0.9, 0.8], "copy_last_psnr_vs_counterfactual_truth": [31.0, 25.0],
          "counterfactual_truth_differs_fraction": 0.5}
    result = _result(counterfactual=cf)
    bars = dict(metric_bar_groups(result))["counterfactual (random actions): PSNR, mean over horizon (dB)"]
    assert bars == [("model vs counterfactual truth", 29.0), ("model vs factual truth", 28.0),
                    ("copy last vs counterfactual truth", 28.0)]
    plot_metric_bars(result, tmp_path / "bars.png")
    assert (tmp_path / "bars.png").read_bytes()[:8] == PNG
    report = report_markdown(result, {"bars": ["metrics_bars.png"]})
    assert "| 2 | 28.00 | 27.00 | 0.800 | 25.00 |" in report and "in 50% of the clips" in report
    assert "![metric bars](metrics_bars.png)" in report
    assert np.isfinite([v for _, v in bars]).all()
