"""Peak-FLOP table lookup and the per-step throughput / MFU figures."""

import pytest

from wm_jax import telemetry


@pytest.mark.parametrize(
    "kind, dtype, peak",
    [
        ("NVIDIA H100 80GB HBM3", "bfloat16", 989.4),
        ("NVIDIA H100 PCIe", "bfloat16", 756.0),  # the specific name wins over "H100"
        ("NVIDIA H200", "float32", 494.7),
        ("NVIDIA A100-SXM4-80GB", "bfloat16", 312.0),
        ("TPU v5 lite", "bfloat16", 197.0),  # v5e, not v5p
        ("TPU v5", "bfloat16", 459.0),
    ],
)
def test_peak_tflops_table(kind, dtype, peak):
    assert telemetry.peak_tflops(kind, dtype) == peak


def test_unknown_device_has_no_peak_unless_overridden():
    assert telemetry.peak_tflops("cpu", "float32") is None
    assert telemetry.peak_tflops("cpu", "float32", override=2.5) == 2.5
    assert telemetry.peak_tflops("NVIDIA H100 80GB HBM3", "bfloat16", override=500.0) == 500.0


def test_throughput_figures():
    rates = telemetry.throughput(
        step_s=0.5, flops_per_step=4e12, tokens_per_step=1000, frames_per_step=10, num_devices=2, peak=8.0
    )
    assert rates["tokens_per_s"] == 2000 and rates["frames_per_s"] == 20
    assert rates["tflops_per_device"] == pytest.approx(4.0)  # 4e12 / 0.5 s / 2 devices
    assert rates["mfu"] == pytest.approx(0.5)
    assert "mfu" not in telemetry.throughput(0.5, 4e12, 1000, 10, 2, None)
