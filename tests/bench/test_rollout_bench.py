"""`wm bench rollout` on a tiny model: both engines really run; figures consistent.

No speed thresholds here (shared, noisy machines): the ≥10x / flatness targets are read
off the benchmark's own output (benchmarks/RESULTS.md).
"""

import json
import math

from wm_jax.bench import rollout as bench

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
