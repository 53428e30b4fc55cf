"""PSNR, the one definition that evaluation, training and the watermark share.

NumPy only (no JAX import): the watermark and its bench stay light; `psnr_from_mse`
takes the array module, so the train step runs the same formula under `jax.jit`.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np

PSNR_CAP_MSE = 1e-10  # mse floor: identical images score 100 dB instead of inf


def psnr_from_mse(mse: Any, max_val: float = 1.0, xp: ModuleType = np) -> Any:
    """Peak signal-to-noise ratio in dB: 10 log10(max_val^2 / mse), capped at 100 dB for
    mse 0 (at max_val 1). `xp`: the array module of `mse` (numpy, or jax.numpy)."""
    return 10.0 * xp.log10(max_val**2 / xp.maximum(mse, PSNR_CAP_MSE))


def psnr(a: Any, b: Any, axes: tuple[int, ...] | None = (-3, -2, -1), max_val: float = 255.0) -> np.ndarray:
    """PSNR in dB (float64) between arrays of one shape on 0..max_val: per image of frames
    [..., H, W, C] by default, or over the whole arrays with axes=None. Pixels are compared
    on the [0, 1] scale, so identical images score 100 dB whatever max_val."""
    a = np.asarray(a, np.float64) / max_val
    b = np.asarray(b, np.float64) / max_val
    if a.shape != b.shape:
        raise ValueError(f"PSNR needs arrays of one shape, got {a.shape} and {b.shape}")
    return psnr_from_mse(np.mean(np.square(a - b), axis=axes))
