"""Evaluation metrics: pure functions of arrays (numpy or jax), no I/O.

Frames are compared on the [0, 1] scale unless stated otherwise.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def psnr_from_mse(mse: jnp.ndarray, max_val: float = 1.0) -> jnp.ndarray:
    """Peak signal-to-noise ratio in dB: 10 log10(max_val^2 / mse), capped at 100 dB for mse 0."""
    return 10.0 * jnp.log10(max_val**2 / jnp.maximum(mse, 1e-10))


def psnr(a: np.ndarray, b: np.ndarray, axes: tuple[int, ...] = (-3, -2, -1)) -> np.ndarray:
    """PSNR per image between uint8 frames [..., H, W, C]; reduces over `axes` (dB, float64)."""
    a = np.asarray(a, np.float64) / 255.0
    b = np.asarray(b, np.float64) / 255.0
    mse = np.mean(np.square(a - b), axis=axes)
    return 10.0 * np.log10(1.0 / np.maximum(mse, 1e-10))


def psnr_per_horizon(truth: np.ndarray, generated: np.ndarray) -> np.ndarray:
    """Mean PSNR at each horizon step: uint8 [B, H, h, w, C] pairs -> float [H] (mean over B)."""
    if truth.shape != generated.shape:
        raise ValueError(f"shape mismatch: truth {truth.shape} vs generated {generated.shape}")
    return psnr(truth, generated).mean(axis=0)
