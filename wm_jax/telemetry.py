"""Training telemetry: rich progress bar, `metrics.jsonl`, TensorBoard, throughput and MFU.

Only process 0 writes; other processes get a logger whose methods do nothing, so callers
never branch on the process index.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import jax
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

console = Console(stderr=True)

# Dense peak TFLOP/s per device from the vendors' data sheets (no sparsity), for the
# activation dtype: bfloat16 on the tensor cores; float32 matmuls run as TF32 on NVIDIA
# GPUs and as bf16 passes on TPUs at JAX's default precision. The first substring of
# `device.device_kind` that matches wins, so the specific names come first.
PEAK_TFLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H100 PCIe", {"bfloat16": 756.0, "float32": 378.0}),
    ("H100 NVL", {"bfloat16": 835.0, "float32": 417.5}),
    ("H100", {"bfloat16": 989.4, "float32": 494.7}),  # SXM: "NVIDIA H100 80GB HBM3"
    ("H200", {"bfloat16": 989.4, "float32": 494.7}),
    ("B200", {"bfloat16": 2250.0, "float32": 1100.0}),
    ("A100", {"bfloat16": 312.0, "float32": 156.0}),
    ("NVIDIA L4", {"bfloat16": 121.0, "float32": 60.0}),
    ("TPU v4", {"bfloat16": 275.0, "float32": 275.0}),
    ("TPU v5 lite", {"bfloat16": 197.0, "float32": 197.0}),
    ("TPU v5", {"bfloat16": 459.0, "float32": 459.0}),  # v5p
    ("TPU v6 lite", {"bfloat16": 918.0, "float32": 918.0}),
)


def peak_tflops(device_kind: str, dtype: str, override: float = 0.0) -> float | None:
    """Peak TFLOP/s of one device: `override` when > 0, else the table; None when unknown
    (CPUs: their peak depends on cores, clocks and vector width, so MFU is not guessed)."""
    if override > 0:
        return override
    for name, peaks in PEAK_TFLOPS:
        if name in device_kind:
            return peaks[dtype]
    return None


def throughput(
    step_s: float,
    flops_per_step: float,
    tokens_per_step: int,
    frames_per_step: int,
    num_devices: int,
    peak: float | None,
) -> dict[str, float]:
    """Per-step rates: tokens/s, frames/s, TFLOP/s per device and MFU (absent without a peak)."""
    tflops = flops_per_step / step_s / num_devices / 1e12
    rates = {
        "tokens_per_s": tokens_per_step / step_s,
        "frames_per_s": frames_per_step / step_s,
        "tflops_per_device": tflops,
    }
    if peak:
        rates["mfu"] = tflops / peak
    return rates


def _fmt(metrics: dict[str, float]) -> str:
    return "  ".join(f"{k}={v:.4g}" for k, v in metrics.items())


class RunLogger:
    """Writes step metrics to the console, `metrics.jsonl` and `tb/` under a run directory."""

    def __init__(self, workdir: str | Path, total_steps: int, start_step: int, stage: str):
        self.enabled = jax.process_index() == 0
        self.stage = stage
        if not self.enabled:
            return
        from tensorboardX import SummaryWriter  # heavy import; process 0 only

        workdir = Path(workdir)
        repair_jsonl(workdir / "metrics.jsonl")
        repair_jsonl(workdir / "events.jsonl")
        self._jsonl = open(workdir / "metrics.jsonl", "a", buffering=1)
        self._events = open(workdir / "events.jsonl", "a", buffering=1)
        self._tb = SummaryWriter(str(workdir / "tb"))
        self._progress = Progress(
            TextColumn(f"[bold]{stage}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"),
            console=console,
            transient=False,
        )
        self._task = self._progress.add_task(stage, total=total_steps, completed=start_step, info="")
        self._progress.start()

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        row = {"step": step, "stage": self.stage, "time": time.time(), **metrics}
        self._jsonl.write(json.dumps(row) + "\n")
        for k, v in metrics.items():
            self._tb.add_scalar(f"{self.stage}/{k}", v, step)
        self._progress.update(self._task, completed=step, info=_fmt(metrics))

    def event(self, step: int, kind: str, message: str, **fields: Any) -> None:
        """A notable moment (skipped step, loss spike, damaged checkpoint, preemption):
        printed and appended to `events.jsonl`."""
        if not self.enabled:
            return
        self._progress.console.print(f"[yellow]step {step}: {message}")
        row = {"step": step, "event": kind, "message": message, "time": time.time(), **fields}
        self._events.write(json.dumps(row) + "\n")

    def close(self) -> None:
        if not self.enabled:
            return
        self._progress.stop()
        self._jsonl.close()
        self._events.close()
        self._tb.close()


def info(message: str) -> None:
    """A console line from process 0."""
    if jax.process_index() == 0:
        console.print(message)


def warn(message: str) -> None:
    """A warning line from process 0 (stderr, like every console line)."""
    if jax.process_index() == 0:
        # One line whatever the width, and no markup: messages hold paths and "[Errno ...]".
        console.print(f"warning: {message}", style="yellow", markup=False, highlight=False, soft_wrap=True)


def repair_jsonl(path: Path) -> None:
    """Drops a partial last line (a process killed mid-write) so appends stay valid JSONL."""
    if not path.exists():
        return
    raw = path.read_bytes()
    if raw and not raw.endswith(b"\n"):
        path.write_bytes(raw[: raw.rfind(b"\n") + 1])


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a `metrics.jsonl`, for reports and tests."""
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
