"""Training guards: stop signals (preemption, Ctrl-C) and the numerics check of a state."""

from __future__ import annotations

import signal
import sys
from typing import Any

import jax
import jax.numpy as jnp

# Signals that mean "save at the next step boundary, then exit 42": a cluster's preemption
# notice (SIGTERM, SIGUSR1 under SLURM) and Ctrl-C, which deserves the same care.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class StopFlag:
    """Records a stop signal so the loop can save at the next step boundary.

    The first Ctrl-C hands SIGINT back to the kernel's default action, so a second one
    ends the process at once, even inside a long compile or step where a Python handler
    would not run: no save, as after kill -9, which resume is built to survive."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopFlag":
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.signal = signum
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            print(
                "interrupt: saving at the end of this step, then exiting 42; Ctrl-C again aborts without saving",
                file=sys.stderr,
                flush=True,
            )

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def all_finite(tree: Any) -> jax.Array:
    """bool [] : every floating-point value of `tree` is finite (integer leaves, such as
    step counters, cannot be otherwise). Traceable: inside a jitted step it costs one
    reduction per leaf and no host transfer."""
    flags = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.stack(flags).all() if flags else jnp.asarray(True)
