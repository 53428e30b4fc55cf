"""`python -m wm_jax.cli ...`: what `wm launch` and `wm sweep` start in each process."""

import sys

from wm_jax.cli import main

sys.exit(main())
