"""`python -m wm_jax.serve {serve,play,bench} ...`."""

import sys

from wm_jax.serve.commands import main

sys.exit(main())
