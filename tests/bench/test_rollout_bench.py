"""`wm bench rollout` on a tiny model: both engines really run; figures consistent; the
diffusion rows: the sampler at K steps per frame, timed beside the token engine on the same
transformer.

No speed thresholds here (shared, noisy machines): the ≥10x / flatness targets are read
off the benchmark's own output (benchmarks/RESULTS.md), and that K = 4 does more work than
K = 1 is checked by counting the model passes the sampler runs, not by its time.
"""

import collections
import json
import math

import jax
import pytest

from wm_jax import config as config_lib
from wm_jax.bench import rollout as bench
from wm_jax.models.diffusion import DiffusionDynamics
from wm_jax.models.tokenizer import num_tokens
from wm_jax.presets import preset_path

TINY = [
    "model.image_size=8",
    "model.dynamics.embed_dim=16",
    "model.dynamics.num_layers=2",
    "model.dynamics.num_heads=2",
    "model.dynamics.mlp_dim=32",
    "model.dynamics.temporal_window=3",
]


def test_main_reports_both_engines_per_horizon(tmp_path, capsys):
    results = tmp_path / "RESULTS.md"
    args = ["--horizons", "2,6", "--batch", "2", "--diffusion-steps", "none", "--results", str(results)]
    args += [a for o in TINY for a in ("--set", o)]
    assert bench.main(args) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["bench"] == "rollout" and result["temporal_window"] == 3 and result["layers"] == 2
    assert [r["horizon"] for r in result["rows"]] == [2, 6]
    for r in result["rows"]:
        assert r["cached_frames_per_s"] == 2 * r["horizon"] / r["cached_s"]
        assert math.isclose(r["speedup"], r["uncached_s"] / r["cached_s"])
    last = result["rows"][-1]
    assert result["speedup_at_6"] == last["speedup"]
    assert math.isclose(result["flatness_2_to_6"], (last["cached_s"] / 6) / (result["rows"][0]["cached_s"] / 2))
    text = results.read_text()
    assert "## rollout" in text and text.count("wm bench rollout --config rollout_bench") == 2


def test_the_diffusion_sampler_is_timed_at_its_steps_per_frame(tmp_path, capsys):
    diffusion = TINY + [
        "model.dynamics.objective=diffusion",
        "model.tokenizer.bottleneck=continuous",
        "model.tokenizer.latent_dim=4",
        "model.dynamics.sampling_steps=2",
    ]
    args = ["--horizons", "3", "--results", str(tmp_path / "RESULTS.md")] + [a for o in diffusion for a in ("--set", o)]
    assert bench.main(args) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [r["horizon"] for r in result["rows"]] == [3] and result["rows"][0]["cached_frames_per_s"] > 0
    assert result["objective"] == "diffusion" and result["diffusion"] == []  # no token engine to compare with


PASSES: collections.Counter = collections.Counter()  # sampling_steps -> model passes run (on the device)


class CountedDiffusion(DiffusionDynamics):
    """`DiffusionDynamics` whose cached pass (`decode_step`) counts itself each time it runs,
    under `PASSES[sampling_steps]` (a host callback: inside the sampler's loop it fires
    once per iteration, not once per trace)."""

    def decode_step(self, *args, **kwargs):  # type: ignore[override]
        steps = self.cfg.dynamics.sampling_steps
        jax.debug.callback(lambda: PASSES.update([steps]))
        return super().decode_step(*args, **kwargs)


def tiny_config(*overrides: str) -> config_lib.Config:
    return config_lib.load(preset_path("rollout_bench"), TINY + list(overrides))


def test_main_times_the_sampler_at_1_2_4_steps_beside_the_token_engine(tmp_path, capsys):
    results = tmp_path / "RESULTS.md"
    assert bench.main(["--horizons", "3", "--results", str(results)] + [a for o in TINY for a in ("--set", o)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    token = result["rows"][0]
    assert result["objective"] == "causal" and [r["steps"] for r in result["diffusion"]] == [1, 2, 4]
    for r in result["diffusion"]:
        assert r["horizon"] == 3 and r["frames_per_s"] > 0 and r["frames_per_s"] == 3 / r["seconds"]
        assert math.isclose(r["ratio_to_cached"], r["frames_per_s"] / token["cached_frames_per_s"])
        assert result[f"diffusion_k{r['steps']}_ratio_at_3"] == r["ratio_to_cached"]
    (row,) = [line for line in results.read_text().splitlines() if "wm bench rollout" in line]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert len(cells) == len(bench.COLUMNS) + 1  # the date first
    assert cells[-3].startswith("K1 ") and ", K2 " in cells[-3] and ", K4 " in cells[-3]
    assert cells[-2] == ", ".join(f"K{r['steps']} {r['ratio_to_cached']:.2f}" for r in result["diffusion"])


def test_four_steps_run_more_model_passes_than_one(monkeypatch):
    monkeypatch.setattr("wm_jax.inference.rollout.DiffusionDynamics", CountedDiffusion)
    PASSES.clear()
    token_row = {"horizon": 3, "cached_s": 1.0}  # (`time_token_engines`' row; only the ratio reads it)
    rows = bench.time_diffusion(tiny_config(), [token_row], (1, 4), batch=1, context=1, repeats=1)
    assert [r["steps"] for r in rows] == [1, 4] and all(r["frames_per_s"] > 0 for r in rows)
    # Per frame: K sampling passes and one cache write; each rollout runs twice (compile, timed).
    assert PASSES[1] >= 2 * 3 and PASSES[4] >= 2 * 4 * 3
    assert PASSES[4] > 2 * PASSES[1]


def test_the_diffusion_model_keeps_the_token_models_transformer():
    # The token settings diffusion refuses (the demo preset has both) are dropped, not an error.
    cfg = tiny_config("model.dynamics.cut_framing_shift=true", "model.dynamics.motion_weight=2")
    for k in (1, 2, 4):
        diff = bench.diffusion_config(cfg, k)
        dc, tc = diff.model.dynamics, cfg.model.dynamics
        assert (dc.objective, diff.model.tokenizer.bottleneck, dc.sampling_steps) == ("diffusion", "continuous", k)
        assert (dc.embed_dim, dc.num_layers, dc.num_heads, dc.mlp_dim, dc.temporal_window) == (
            tc.embed_dim,
            tc.num_layers,
            tc.num_heads,
            tc.mlp_dim,
            tc.temporal_window,
        )
        assert num_tokens(diff.model) == num_tokens(cfg.model) and diff.seed == cfg.seed


@pytest.mark.parametrize(
    "args",
    [
        ["--diffusion-steps", "3"],
        ["--diffusion-steps", "1,x"],
        ["--repeats", "0"],
        [
            "--diffusion-steps",
            "2",
            "--set",
            "model.dynamics.objective=diffusion",
            "--set",
            "model.tokenizer.bottleneck=continuous",
        ],
    ],
)
def test_bad_diffusion_options_are_refused_before_anything_runs(args, tmp_path):
    with pytest.raises(SystemExit) as e:
        bench.main(args + ["--results", str(tmp_path / "RESULTS.md")])
    assert e.value.code != 0 and not (tmp_path / "RESULTS.md").exists()
