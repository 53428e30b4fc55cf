"""`wm bench serve`: aggregate frames/s and step latency of `wm serve`'s engine by session
count (`wm_jax.serve.bench`)."""

from wm_jax.serve.bench import main

if __name__ == "__main__":
    raise SystemExit(main())
