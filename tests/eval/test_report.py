"""The eval report's plots on hand-made metrics (no model): bars per headline group."""

import numpy as np

from wm_jax.eval.evaluate import headline, metric_bar_groups, plot_metric_bars, report_markdown

PNG = b"\x89PNG\r\n\x1a\n"


def _result(**groups):
    return {
        "step": 7,
        "workdir": "runs/x",
        "data_dir": "data/x",
        "split": "test",
        "dataset_hash": "0" * 64,
        "num_clips": 2,
        "tokenizer": {"psnr": 25.0},
        **groups,
    }


def test_bars_skip_absent_and_null_groups(tmp_path):
    result = _result(
        rollout={"horizon": [1, 2], "psnr": [20.0, 18.0], "ssim": [0.8, 0.6]},
        rollout_random_actions={"horizon": [1, 2], "psnr": [19.0, 17.0], "ssim": [0.7, 0.5]},
        baseline_copy_last={"horizon": [1, 2], "psnr": [21.0, 15.0], "ssim": [0.9, 0.5]},
        object_permanence={"reappear_psnr": None, "visible_psnr": float("nan")},  # nothing reappeared
        identity_persistence={"before_cut": 0.9, "after_cut": None, "swap_margin": 0.2},
    )
    groups = dict(metric_bar_groups(result))
    assert list(groups) == [
        "tokenizer PSNR (dB)",
        "rollout PSNR, mean over horizon (dB)",
        "rollout SSIM, mean over horizon",
        "identity persistence",
    ]
    assert groups["rollout PSNR, mean over horizon (dB)"] == [
        ("model", 19.0),
        ("random actions", 18.0),
        ("copy last", 18.0),
    ]
    assert [label for label, _ in groups["identity persistence"]] == ["similarity before cut", "swap margin"]
    plot_metric_bars(result, tmp_path / "bars.png")
    assert (tmp_path / "bars.png").read_bytes()[:8] == PNG
    plot_metric_bars(_result(), tmp_path / "tokenizer_only.png")
    assert (tmp_path / "tokenizer_only.png").read_bytes()[:8] == PNG


def test_counterfactual_group_is_plotted_and_tabulated(tmp_path):
    cf = {
        "horizon": [1, 2],
        "psnr_vs_counterfactual_truth": [30.0, 28.0],
        "psnr_vs_factual_truth": [29.0, 27.0],
        "ssim_vs_counterfactual_truth": [0.9, 0.8],
        "copy_last_psnr_vs_counterfactual_truth": [31.0, 25.0],
        "counterfactual_truth_differs_fraction": 0.5,
    }
    result = _result(counterfactual=cf)
    bars = dict(metric_bar_groups(result))["counterfactual (random actions): PSNR, mean over horizon (dB)"]
    assert bars == [
        ("model vs counterfactual truth", 29.0),
        ("model vs factual truth", 28.0),
        ("copy last vs counterfactual truth", 28.0),
    ]
    plot_metric_bars(result, tmp_path / "bars.png")
    assert (tmp_path / "bars.png").read_bytes()[:8] == PNG
    report = report_markdown(result, {"bars": ["metrics_bars.png"]})
    assert "| 2 | 28.00 | 27.00 | 0.800 | 25.00 |" in report and "in 50% of the clips" in report
    assert "![metric bars](metrics_bars.png)" in report
    assert np.isfinite([v for _, v in bars]).all()


def test_headline_and_bars_of_the_controllability_figures(tmp_path):
    per_h = {"horizon": [1, 2, 3, 4], "psnr": [24.0, 22.0, 20.0, 18.0], "ssim": [0.9, 0.8, 0.7, 0.6]}
    cf = {
        "horizon": [1, 2, 3, 4],
        "psnr_vs_counterfactual_truth": [25.0] * 4,
        "psnr_vs_factual_truth": [24.0] * 4,
        "ssim_vs_counterfactual_truth": [0.9] * 4,
        "copy_last_psnr_vs_counterfactual_truth": [20.0] * 4,
        "counterfactual_truth_differs_fraction": 1.0,
        "psnr_vs_counterfactual": 25.0,
        "psnr_vs_factual": 24.0,
        "margin_db": 1.0,
        "agent_within_1.5px": 0.75,
        "num_agent_steps": 12,
        "num_clips": 2,
        "num_clips_reframed": 0,
        "copy_last": {
            "psnr_vs_counterfactual": 20.0,
            "psnr_vs_factual": 20.1,
            "margin_db": -0.1,
            "agent_within_1.5px": 0.25,
        },
        "action_blind": {"psnr_vs_counterfactual": 30.0, "agent_within_1.5px": 0.125},
    }
    result = _result(
        rollout=per_h,
        rollout_random_actions=per_h,
        baseline_copy_last={**per_h, "psnr": [23.0, 19.0, 17.0, 15.0]},
        controllability={
            "psnr_true_actions": 21.0,
            "psnr_random_actions": 20.0,
            "delta_psnr": 1.0,
            "delta_psnr_t4": 1.5,
            "delta_psnr_per_horizon": [0.5, 1.0, 1.2, 1.5],
            "delta_psnr_t4_before_cut": None,
            "num_clips_before_cut": 0,
        },
        counterfactual=cf,
        action_probe={
            "displacement_px": 1.5,
            "commanded_px": 2.0,
            "fraction": 0.75,
            "displacement_px_per_action": [1.0, 2.0, 1.5, None],
            "num_clips": 2,
            "num_pairs": 7,
        },
    )
    assert headline(result) == [
        ("tokenizer reconstruction PSNR (dB)", "25.00"),
        ("rollout PSNR, mean over horizons (dB): model / copy-last", "21.00 / 18.50"),
        ("ΔtPSNR at t=4, true − random actions (dB): all clips / no cut by t=4", "+1.50 / n/a"),
        ("counterfactual: agent within 1.5 px: model / copy-last / action-blind", "0.750 / 0.250 / 0.125"),
        ("counterfactual margin, PSNR vs counterfactual − vs factual (dB): model / copy-last", "+1.00 / -0.10"),
        ("action probe, agent move in one step (px): model / commanded (fraction)", "1.50 / 2.00 (0.75)"),
    ]
    groups = dict(metric_bar_groups(result))
    assert groups["ΔtPSNR at t=4, true − random actions (dB)"] == [("all clips", 1.5)]
    assert groups["counterfactual: agent within 1.5 px"] == [
        ("model", 0.75),
        ("copy last", 0.25),
        ("action blind", 0.125),
    ]
    assert groups["action probe: agent move in one step (px)"] == [("model", 1.5), ("commanded", 2.0)]
    report = report_markdown(result, {})
    assert report.index("## Headline") < report.index("## Details") and "| +1.50 / n/a |" in report
    assert (
        "| copy last | 20.00 | 20.10 | -0.10 | 0.250 |" in report
        and "| move (px) | +1.00 | +2.00 | +1.50 | n/a |" in report
    )
    plot_metric_bars(result, tmp_path / "bars.png")
    assert (tmp_path / "bars.png").read_bytes()[:8] == PNG
    assert headline(_result()) == [("tokenizer reconstruction PSNR (dB)", "25.00")]  # a tokenizer run
