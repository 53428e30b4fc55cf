"""Benchmarks behind `wm bench NAME`, one module per bench; rows go where `--results` says
(`wm_jax.bench.results`)."""
