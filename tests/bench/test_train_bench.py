"""`wm bench train` on a tiny config: a real compile and real steps on the CPU.

No timing thresholds: the figures must be present, finite and consistent with each other.
"""

import json
import math

import pytest

from conftest import TINY_OVERRIDES
from wm_jax.bench import train as bench


@pytest.mark.parametrize("stage, peak", [pytest.param("tokenizer", 0.0, marks=pytest.mark.slow), ("dynamics", 0.5)])
def test_main_reports_consistent_figures(stage, peak, tmp_path, capsys):
    results = tmp_path / "RESULTS.md"
    overrides = TINY_OVERRIDES + [f"train.stage={stage}", f"train.peak_tflops_per_device={peak}"]
    args = ["--config", "tiny_cpu", "--steps", "2", "--warmup", "1", "--results", str(results)]
    args += [a for o in overrides for a in ("--set", o)]
    assert bench.main(args) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["bench"] == "train" and result["stage"] == stage
    for key in ("step_s", "tokens_per_s", "tflops_per_device", "loss"):
        assert math.isfinite(result[key]) and result[key] > 0, key
    assert result["tokens_per_s"] == pytest.approx(result["tokens_per_step"] / result["step_s"])
    assert result["tflops_per_device"] == pytest.approx(result["flops_per_step"] / result["step_s"] / 1e12)
    if peak:
        assert result["mfu"] == pytest.approx(result["tflops_per_device"] / peak)
    else:  # a CPU has no entry in the peak table: no MFU is made up
        assert result["mfu"] is None
    # Without --matmul-reference its figures are null, like an MFU without a peak.
    assert result["matmul_tflops"] is None and result["fraction_of_matmul"] is None
    assert "## train" in results.read_text() and "wm bench train --config tiny_cpu" in results.read_text()
