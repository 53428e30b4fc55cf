"""`wm demo`: data → tokenizer → dynamics → eval on CPU, in one command."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from wm_jax import config as config_lib
from wm_jax.cli.common import print_headline
from wm_jax.presets import preset_path

# The demo dataset: enough episodes that held-out clips are unseen worlds, small enough
# to write in seconds.
DEMO_EPISODES = 96
DEMO_FRAMES = 64


def run_demo(out: str | Path, config: str = "tiny_cpu", overrides: list[str] = ()) -> dict:
    """data → tokenizer → dynamics → eval with the presets `config` and `config`_dynamics;
    returns the eval metrics."""
    from data_pipelines.datasets import make_dataset
    from wm_jax import telemetry
    from wm_jax.eval.evaluate import evaluate
    from wm_jax.train.loop import train

    out = Path(out)
    tok_cfg = config_lib.load(preset_path(config), overrides)
    data_dir = Path(tok_cfg.data.dir) if tok_cfg.data.dir else out / "data"
    t0 = time.time()
    if not (data_dir / "manifest.json").exists():
        telemetry.info(f"[1/4] procedural dataset → {data_dir}")
        make_dataset(
            "procedural",
            str(data_dir),
            episodes=DEMO_EPISODES,
            frames=DEMO_FRAMES,
            size=tok_cfg.model.image_size,
            seed=tok_cfg.seed,
        )
    tok_cfg = config_lib.replace(tok_cfg, [f"data.dir={data_dir}"])
    telemetry.info(f"[2/4] tokenizer → {out / 'tokenizer'}")
    train(tok_cfg, out / "tokenizer")
    dyn_overrides = list(overrides) + [f"data.dir={data_dir}", f"train.tokenizer_workdir={out / 'tokenizer'}"]
    dyn_cfg = config_lib.load(preset_path(f"{config}_dynamics"), dyn_overrides)
    telemetry.info(f"[3/4] dynamics → {out / 'dynamics'}")
    train(dyn_cfg, out / "dynamics")
    telemetry.info(f"[4/4] eval → {out / 'dynamics' / 'eval'}")
    result = evaluate(out / "dynamics")
    telemetry.info(f"demo finished in {time.time() - t0:.0f} s")
    return result


def cmd_demo(args: argparse.Namespace) -> int:
    result = run_demo(args.out, args.config, args.set)
    report = Path(args.out) / "dynamics" / "eval" / "report.md"
    print_headline(result)
    print(f"report: {report}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    demo = sub.add_parser("demo", help="data → tokenizer → dynamics → eval on CPU")
    demo.add_argument("--out", default="runs/demo")
    demo.add_argument("--config", default="tiny_cpu")
    demo.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    demo.set_defaults(fn=cmd_demo)
