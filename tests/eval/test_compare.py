"""`wm eval compare`: figures of several metrics.json side by side, absent groups as "–"."""

import json

from wm_jax.cli import main
from wm_jax.eval import compare


def _write(path, metrics):
    (path / "eval").mkdir(parents=True)
    (path / "eval" / "metrics.json").write_text(json.dumps(metrics))
    return path


def test_compare_prints_one_column_per_run(tmp_path, capsys):
    dyn = _write(
        tmp_path / "dyn",
        {
            "step": 800,
            "tokenizer": {"psnr": 23.0},
            "rollout": {"horizon": [1, 2], "psnr": [15.0, 14.0], "ssim": [0.5, 0.4]},
            "controllability": {"delta_psnr": 0.25, "delta_psnr_t4": 0.4},
            "counterfactual": {
                "psnr_vs_counterfactual_truth": [12.0, 11.0],
                "psnr_vs_factual_truth": [11.0, 11.0],
                "margin_db": 0.5,
                "agent_within_1.5px": 0.3,
            },
        },
    )
    tok = _write(tmp_path / "tok", {"step": 600, "tokenizer": {"psnr": 24.5}})
    table = compare.compare([dyn, tok])
    assert table["step"] == [800.0, 600.0] and "| step | 800 | 600 |" in compare.markdown_table([dyn, tok], table)
    assert table["rollout PSNR, mean over horizons (dB)"] == [14.5, None]
    assert table["ΔtPSNR true − random actions, mean over horizons (dB)"] == [0.25, None]
    assert table["ΔtPSNR at t=4 (dB)"] == [0.4, None]
    assert table["counterfactual margin (dB, > 0: follows actions)"] == [0.5, None]
    assert table["counterfactual: agent within 1.5 px"] == [0.3, None]
    assert table["action probe: fraction of the commanded move"] == [None, None]  # group absent
    out = tmp_path / "compare.md"
    assert main(["eval", "compare", str(dyn), str(tok), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| tokenizer PSNR (dB) | 23.000 | 24.500 |" in text and "| 14.500 | – |" in text
    assert out.read_text() in text


def test_compare_names_a_run_without_evaluation(tmp_path, capsys):
    assert main(["eval", "compare", str(tmp_path / "nothing")]) == 2
    assert "no evaluation found" in capsys.readouterr().err
    assert main(["eval", "comparre", str(tmp_path)]) == 2
    assert main(["eval"]) == 2
