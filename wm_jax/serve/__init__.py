"""Interactive serving of a dynamics run: `wm serve` (an HTTP API) and `wm play` (a page).

- engine.py: `Engine`, many sessions advanced together by one batched, KV-cached
  rollout step (a sliding window of the cache per session) and decoded as they go.
- app.py: the starlette app, which gathers concurrent step requests into engine steps.
- commands.py: the `wm serve` / `wm play` entry functions (argparse in, exit code out).
- bench.py: `bench_serve`, aggregate frames/s and step latency by session count.
- static/play.html: the page `wm play` serves at `/`.

See docs/serve.md.
"""
