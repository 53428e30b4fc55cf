"""`wm bench train --matmul-reference N`: the step measured against XLA's own matmul in the
same process (issue 20). Real compiles and real products on the CPU, no timing thresholds."""

import json
import math

import pytest

from conftest import TINY_OVERRIDES
from wm_jax.bench import train as bench


def test_matmul_tflops_is_a_positive_rate():
    rate = bench.matmul_tflops(64, "float32", repeats=2)
    assert math.isfinite(rate) and rate > 0
    assert bench.matmul_tflops(64, "bfloat16", repeats=1) > 0
    with pytest.raises(ValueError):
        bench.matmul_tflops(0, "float32")


def test_main_reports_the_step_as_a_fraction_of_the_matmul(tmp_path, capsys):
    results = tmp_path / "RESULTS.md"
    # The same step as test_train_bench's dynamics case: compiled once per test session.
    overrides = TINY_OVERRIDES + ["train.stage=dynamics", "train.peak_tflops_per_device=0.5"]
    args = [
        "--config",
        "tiny_cpu",
        "--steps",
        "2",
        "--warmup",
        "1",
        "--matmul-reference",
        "128",
        "--results",
        str(results),
    ]
    assert bench.main(args + [a for o in overrides for a in ("--set", o)]) == 0
    out = capsys.readouterr().out
    result = json.loads(out.strip().splitlines()[-1])
    assert result["matmul_n"] == 128 and math.isfinite(result["matmul_tflops"]) and result["matmul_tflops"] > 0
    assert result["fraction_of_matmul"] == pytest.approx(result["tflops_per_device"] / result["matmul_tflops"])
    assert "step / matmul" in out
    # Its own table, header and row of the same width; the plain `## train` table untouched.
    lines = results.read_text().splitlines()
    assert "## train" not in lines and "## train vs matmul" in lines
    header, row = lines[lines.index("## train vs matmul") + 2], lines[-1]
    assert "step / matmul" in header and "--matmul-reference 128" in row
    assert header.count(" | ") == row.count(" | ")


def test_a_negative_size_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--config", "tiny_cpu", "--matmul-reference", "-1"])
    assert exit_info.value.code == 2
    assert "--matmul-reference" in capsys.readouterr().err
