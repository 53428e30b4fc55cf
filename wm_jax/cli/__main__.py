"""`python -m wm_jax.cli ...`: what `wm launch` and `wm sweep` start in each process."""

from wm_jax.cli import run

run()
