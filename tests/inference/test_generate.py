"""`wm generate`: shot-script parsing and its errors (each naming the script's line), the
control sequence a script becomes, streaming decode, and end-to-end runs (a bundle of
freshly initialised models, fast; a trained tokenizer + dynamics run via the CLI, slow)
whose videos `wm verify` accepts."""

import hashlib
import json
import warnings
from pathlib import Path

import numpy as np
import pytest

from conftest import PRESET, REPO, TINY_OVERRIDES
from wm_jax.bench import watermark as bench_watermark
from wm_jax.cli import main
from wm_jax.inference.generate import output_paths
from wm_jax.inference.shot_script import (
    DEFAULT_POSE,
    ScriptError,
    load_script,
    parse_script,
    read_source,
    resolve_shots,
)

# Line numbers matter below: each error must name the line it is about.
THREE_SHOTS = """\
fps: 8
start: {split: test, episode: 0, t: 0, frames: 2}
shots:
  - name: pan right
    duration: 5
    camera: {pan: [1, 0]}
    actions: {policy: random, seed: 3}
  - name: elsewhere
    cut: true
    duration: 3
    camera: {start: {offset: [12, 6]}, pan: [0, 1]}
    actions: {repeat: 2}
  - name: back to shot 1
    cut: true
    timecodes: [1.0, 1.5]
    camera: {start: {shot: 1}, tilt: -1}
    actions: [4, 4, 4, 1]
"""


def _parse(text: str):
    return parse_script(text, "shots.yaml")


def _error(text: str, **resolve) -> str:
    with pytest.raises(ScriptError) as e:
        script = _parse(text)
        if resolve:
            resolve_shots(script, **resolve)
    return str(e.value)


# ------------------------------------------------------------------------ parsing


def test_script_becomes_one_control_sequence():
    script = _parse(THREE_SHOTS)
    assert script.fps == 8 and script.default_reference and len(script.shots) == 3
    last = (10, 20, 1, 1, 0, 0, 0)
    plan = resolve_shots(script, fps=8, num_actions=5, last_pose=last, samples=2)
    # timecodes [1.0, 1.5] s at 8 fps: 4 frames
    assert [s["frames"] for s in plan.shots] == [5, 3, 4] and [s["first_frame"] for s in plan.shots] == [0, 5, 8]
    assert plan.action.shape == (2, 12) and plan.poses.shape == (12, 7)
    np.testing.assert_array_equal(plan.cut, [0, 0, 0, 0, 0, 1, 0, 0, 1, 0, 0, 0])
    # Shot 1 pans on from the last context pose; shot 2 jumps by its offset, then pans
    # down; shot 3 returns to shot 1's first pose and tilts up. Rotation and z are kept.
    np.testing.assert_array_equal(plan.poses[:5, :2], [[11, 20], [12, 20], [13, 20], [14, 20], [15, 20]])
    np.testing.assert_array_equal(plan.poses[5:8, :2], [[27, 26], [27, 27], [27, 28]])
    np.testing.assert_array_equal(plan.poses[8:, :2], [[11, 20], [11, 19], [11, 18], [11, 17]])
    assert (plan.poses[:, 2:] == np.asarray(last[2:], np.float32)).all()
    assert plan.shots[2]["camera_start"] == plan.shots[0]["camera_start"]
    # Explicit and repeated actions are the same in every sample; a random policy is
    # seeded per sample, reproducibly.
    assert (plan.action[:, 5:8] == 2).all() and (plan.action[:, 8:] == [4, 4, 4, 1]).all()
    again = resolve_shots(script, fps=8, num_actions=5, last_pose=last, samples=2)
    np.testing.assert_array_equal(plan.action, again.action)
    assert (plan.action[0, :5] != plan.action[1, :5]).any() and plan.action.max() < 5
    assert [s["line"] for s in plan.shots] == [4, 8, 13]


def test_poses_and_default_random_actions():
    text = "shots:\n  - duration: 2\n    camera:\n      poses: [[1, 2, 3, 1, 0, 0, 0], [2, 2, 3, 1, 0, 0, 0]]\n"
    plan = resolve_shots(_parse(text), fps=10, num_actions=3, seed=7)
    np.testing.assert_array_equal(plan.poses[:, 0], [1, 2])
    assert plan.action.shape == (1, 2) and plan.action.max() < 3  # no actions given: a random policy
    np.testing.assert_array_equal(plan.action, resolve_shots(_parse(text), fps=10, num_actions=3, seed=7).action)
    # No camera: a static one, at the last context pose.
    plan = resolve_shots(_parse("shots:\n  - duration: 3\n"), fps=10, num_actions=3)
    assert (plan.poses == np.asarray(DEFAULT_POSE, np.float32)).all()


def test_unknown_keys_name_the_key_the_closest_valid_one_and_the_line():
    msg = _error("fps: 10\nshots:\n  - duration: 4\n    camra: {pan: [1, 0]}\n")
    assert "line 4" in msg and "'camra'" in msg and "did you mean 'camera'" in msg
    msg = _error("shots:\n  - duration: 4\n    camera:\n      pan: [1, 0]\n      dolyl: 2\n")
    assert "line 5" in msg and "'dolyl'" in msg and "did you mean 'dolly'" in msg
    msg = _error("fsp: 10\nshots:\n  - duration: 4\n")
    assert "line 1" in msg and "did you mean 'fps'" in msg
    msg = _error("start: {split: test, episod: 3}\nshots:\n  - duration: 4\n")
    assert "line 1" in msg and "did you mean 'episode'" in msg
    msg = _error("shots:\n  - duration: 4\n    actions: {policy: random, sed: 1}\n")
    assert "line 3" in msg and "did you mean 'seed'" in msg


def test_a_shot_without_duration_is_named_with_its_line():
    msg = _error("shots:\n  - duration: 4\n  - cut: true\n    camera: {pan: [0, 1]}\n")
    assert msg.startswith("shots.yaml line 3:") and "shot 2 has no duration" in msg and "timecodes" in msg
    assert "line 2" in _error("shots:\n  - timecodes: [2, 1]\n")
    assert "no 'shots'" in _error("fps: 10\n")


def test_action_ids_are_checked_against_the_models_num_actions():
    msg = _error("shots:\n  - duration: 3\n    actions:\n      - 1\n      - 7\n      - 0\n", fps=10, num_actions=5)
    assert "line 5" in msg and "action id 7" in msg and "num_actions=5" in msg
    msg = _error("shots:\n  - duration: 3\n    actions: {repeat: 9}\n", fps=10, num_actions=5)
    assert "line 3" in msg and "action id 9" in msg
    msg = _error("shots:\n  - duration: 3\n    actions: [1, 2]\n")
    assert "line 3" in msg and "2 actions for a shot of 3 frames" in msg
    assert "line 3" in _error("shots:\n  - duration: 2\n    actions: [1, -1]\n")
    assert "line 3" in _error("shots:\n  - duration: 2\n    actions: {policy: randm}\n")


def test_pose_lists_of_the_wrong_length_name_their_line():
    msg = _error(
        "shots:\n  - duration: 3\n    camera:\n      poses:\n        - [0, 0, 1, 1, 0, 0, 0]\n"
        "        - [1, 0, 1, 1, 0, 0]\n        - [2, 0, 1, 1, 0, 0, 0]\n"
    )
    assert "line 6" in msg and "7 numbers, got 6 values" in msg
    msg = _error("shots:\n  - duration: 3\n    camera:\n      poses: [[0, 0, 1, 1, 0, 0, 0]]\n")
    assert "line 4" in msg and "1 poses for a shot of 3 frames" in msg
    # With timecodes the duration is known only at the fps: checked when resolving.
    msg = _error(
        "shots:\n  - timecodes: [0, 1]\n    camera:\n      poses: [[0, 0, 1, 1, 0, 0, 0]]\n", fps=4, num_actions=5
    )
    assert "line 4" in msg and "1 poses for a shot of 4 frames" in msg
    assert "line 3" in _error("shots:\n  - duration: 3\n    camera: {pan: [1, 0, 2]}\n")
    msg = _error("shots:\n  - duration: 3\n    camera: {start: [4, 4], pan: [1, 0]}\n")
    assert "line 3" in msg and "needs `cut: true`" in msg
    msg = _error("shots:\n  - duration: 3\n    camera: {poses: [[0, 0, 1, 1, 0, 0, 0]], pan: [1, 0]}\n")
    assert "line 3" in msg and "cannot be combined with 'poses'" in msg


def test_yaml_syntax_errors_and_duplicate_keys_name_the_line():
    msg = _error("shots:\n  - duration: 3\n    camera: {pan: [1, 0}\n")
    assert "not valid YAML" in msg and "line 3" in msg
    msg = _error("shots:\n  - duration: 3\n    cut: true\n    duration: 4\n")
    assert msg.startswith("shots.yaml line 4:") and "duplicate key 'duration' (first given on line 2)" in msg


def test_dataset_episodes_that_do_not_exist_are_named(tiny_dataset):
    script = _parse(f"start: {{data: {tiny_dataset}, split: test,\n        episode: 5}}\nshots:\n  - duration: 2\n")
    kw = dict(default_data=None, default_split="test", default_frames=2, size=16)
    with pytest.raises(
        ScriptError, match=r"line 2: start.episode: split 'test' of .* has 2 episodes .*episode 5 does not exist"
    ):
        read_source(script, script.start, **kw)
    script = _parse("start: {split: tset}\nshots:\n  - duration: 2\n")
    with pytest.raises(ScriptError, match=r"line 1: start.split: .*no split 'tset'"):
        read_source(script, script.start, **{**kw, "default_data": str(tiny_dataset)})
    script = _parse("start: {t: 23, frames: 4}\nshots:\n  - duration: 2\n")
    with pytest.raises(ScriptError, match=r"line 1: start.t: episode 0 .* 24 steps"):
        read_source(script, script.start, **{**kw, "default_data": str(tiny_dataset)})
    script = _parse("shots:\n  - duration: 2\n")
    with pytest.raises(ScriptError, match="no dataset"):
        read_source(script, script.start, **kw)
    window = read_source(script, script.start, **{**kw, "default_data": str(tiny_dataset)})
    assert window["frame"].shape == (2, 16, 16, 3) and window["reference"].shape == (2, 16, 16, 3)
    assert window["info"]["split"] == "test" and window["fps"] > 0


def test_missing_run_or_checkpoint(tmp_path, capsys):
    script = tmp_path / "s.yaml"
    script.write_text("shots:\n  - duration: 2\n")
    code = main(
        ["generate", "--workdir", str(tmp_path / "nope"), "--script", str(script), "--out", str(tmp_path / "o.mp4")]
    )
    assert code == 2 and "not a run directory" in capsys.readouterr().err
    code = main(
        [
            "generate",
            "--workdir",
            str(tmp_path),
            "--script",
            str(tmp_path / "none.yaml"),
            "--out",
            str(tmp_path / "o.mp4"),
        ]
    )
    assert code == 2 and "none.yaml does not exist" in capsys.readouterr().err
    code = main(["generate", "--workdir", str(tmp_path), "--script", str(script), "--out", str(tmp_path / "o.gif")])
    assert code == 2 and "GIF" in capsys.readouterr().err


def test_output_paths_per_sample():
    assert output_paths(Path("a/out.mp4"), 1) == [Path("a/out.mp4")]
    assert output_paths(Path("a/out.mp4"), 2) == [Path("a/out_0.mp4"), Path("a/out_1.mp4")]


def test_demo_script_parses():
    script = load_script(REPO / "experiments" / "scripts" / "three_shots.yaml")
    plan = resolve_shots(script, fps=15, num_actions=5, last_pose=(24, 24, 1, 1, 0, 0, 0))
    assert len(plan.shots) == 3 and [s["cut"] for s in plan.shots] == [False, True, True]
    assert plan.shots[2]["camera_start"] == plan.shots[0]["camera_start"]
    assert plan.shots[1]["camera_start"] != plan.shots[0]["camera_end"]


# ------------------------------------------------------------------------ decoding


@pytest.mark.parametrize("spatial_rope", [False, True], ids=["absolute", "spatial_rope"])
def test_decode_stream_matches_decode_codes(spatial_rope):
    import jax
    import jax.numpy as jnp

    from wm_jax.config import ModelConfig, TokenizerConfig
    from wm_jax.models.tokenizer import VideoTokenizer
    from wm_jax.inference.rollout import decode_codes, decode_stream, encode_frames

    cfg = ModelConfig(
        image_size=8,
        tokenizer=TokenizerConfig(
            patch_size=4,
            embed_dim=16,
            num_layers=1,
            num_heads=2,
            mlp_dim=32,
            fsq_levels=(4, 3, 3),
            spatial_rope=spatial_rope,
        ),
    )
    tok = VideoTokenizer(cfg)
    frames = np.random.default_rng(0).integers(0, 256, (2, 7, 8, 8, 3), dtype=np.uint8)
    params = jax.jit(tok.init)(jax.random.key(0), jnp.zeros((2, 3, 8, 8, 3)))["params"]
    codes, _ = encode_frames(tok, params, frames, 3)
    chunks = list(decode_stream(tok, params, (codes[:, i] for i in range(7)), 3))
    assert [c.shape[1] for c in chunks] == [3, 3, 1]
    np.testing.assert_array_equal(np.concatenate(chunks, axis=1), decode_codes(tok, params, codes, 3))


# ------------------------------------------------------------------------ end to end


def _check_outputs(paths, script_text, frames, fps, capsys):
    import imageio.v2 as imageio

    for k, path in enumerate(paths):
        reader = imageio.get_reader(str(path))
        try:
            assert reader.get_meta_data()["fps"] == pytest.approx(fps)
            count = sum(1 for _ in reader)
        finally:
            reader.close()
        assert count == frames
        side = json.loads(Path(f"{path}.json").read_text())
        info = side["provenance"]
        assert info["frames"] == frames and info["fps"] == fps and info["sample"] == k
        assert info["script"]["text"] == script_text and info["seed"] == 0 and info["time"]
        assert (
            info["config"]["train"]["stage"] == "dynamics" and info["config"]["model"]["dynamics"]["use_identity_bank"]
        )
        assert len(info["checkpoint_sha256"]) == 64 and len(info["model"]["tokenizer"]["sha256"]) == 64
        shots = info["shots"]
        assert [s["cut"] for s in shots] == [False, True, True]
        assert shots[0]["first_frame"] == info["context_frames"]
        assert shots[-1]["last_frame"] == frames - 1
        assert shots[2]["camera_start"] == shots[0]["camera_start"]  # the returning framing
        assert info["reference"] is not None  # the start episode's, for the identity bank
        capsys.readouterr()
        assert main(["verify", str(path)]) == 0
        verdict = json.loads(capsys.readouterr().out)
        assert verdict["watermark_detected"] and verdict["manifest_ok"] and verdict["frames"] == frames


def _init_bundle(path: Path, cfg, stage: str) -> None:
    """An inference bundle (`wm export` layout) of freshly initialised parameters."""
    import orbax.checkpoint as ocp

    from wm_jax import config as config_lib
    from wm_jax import sharding
    from wm_jax.config import MeshConfig
    from wm_jax.run import BUNDLE_FORMAT
    from wm_jax.train.state import create_train_state, state_shardings

    mesh, rules = sharding.make_mesh(MeshConfig()), sharding.logical_rules(cfg.mesh)
    _, shardings = state_shardings(cfg, mesh, rules)
    params = create_train_state(cfg, mesh, rules, shardings).params
    path.mkdir(parents=True, exist_ok=True)  # (a dynamics bundle may hold its tokenizer's already)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(path.resolve() / "params", params)
    config_lib.dump(cfg, path / "config.yaml")
    (path / "bundle.json").write_text(
        json.dumps({"format": BUNDLE_FORMAT, "source": "test", "step": 0, "stage": stage})
    )


def test_generate_from_a_bundle_writes_verifiable_videos(tmp_path, tiny_overrides, capsys):
    from wm_jax import config as config_lib
    from wm_jax.checkpoint import file_digests

    base = tiny_overrides + ["model.dynamics.use_identity_bank=true"]
    bundle = tmp_path / "bundle"
    _init_bundle(bundle / "tokenizer", config_lib.load(PRESET, base), "tokenizer")
    _init_bundle(
        bundle, config_lib.load(PRESET, base + ["train.stage=dynamics", "train.tokenizer_workdir=/unused"]), "dynamics"
    )
    script = tmp_path / "shots.yaml"
    script.write_text(THREE_SHOTS)
    out = tmp_path / "videos" / "out.mp4"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code = main(["generate", "--workdir", str(bundle), "--script", str(script), "--out", str(out), "--batch", "2"])
    assert code == 0
    assert not [w for w in caught if "os.fork()" in str(w.message)]  # git and ffmpeg run by fork+exec: no noise
    paths = [tmp_path / "videos" / "out_0.mp4", tmp_path / "videos" / "out_1.mp4"]
    _check_outputs(paths, THREE_SHOTS, 2 + 5 + 3 + 4, 8, capsys)
    info = json.loads(Path(f"{paths[0]}.json").read_text())["provenance"]
    digests = file_digests(bundle / "params")
    assert info["checkpoint_sha256"] == hashlib.sha256(json.dumps(digests, sort_keys=True).encode()).hexdigest()
    # Different random-policy draws per sample; the explicit actions are shared.
    other = json.loads(Path(f"{paths[1]}.json").read_text())["provenance"]
    assert info["shots"][0]["actions"] != other["shots"][0]["actions"]
    assert info["shots"][2]["actions"] == other["shots"][2]["actions"] == [4, 4, 4, 1]

    bad = tmp_path / "bad.yaml"
    bad.write_text("shots:\n  - duration: 2\n    actions: [0, 5]\n")
    assert main(["generate", "--workdir", str(bundle), "--script", str(bad), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "bad.yaml line 3" in err and "action id 5" in err


@pytest.mark.slow
def test_generate_from_trained_runs(tmp_path, tiny_dataset, capsys):
    """Tokenizer and dynamics (identity bank on) trained for 2 steps each through the CLI,
    then `wm generate` on the 3-shot script and `wm verify` on its video."""
    sets = [a for o in TINY_OVERRIDES + [f"data.dir={tiny_dataset}", "train.steps=2"] for a in ("--set", o)]
    tok, dyn = tmp_path / "tok", tmp_path / "dyn"
    assert main(["train", "--config", str(PRESET), *sets, "--workdir", str(tok)]) == 0
    assert (
        main(
            [
                "train",
                "--config",
                str(PRESET),
                *sets,
                "--set",
                "train.stage=dynamics",
                "--set",
                f"train.tokenizer_workdir={tok}",
                "--set",
                "model.dynamics.use_identity_bank=true",
                "--workdir",
                str(dyn),
            ]
        )
        == 0
    )
    capsys.readouterr()
    script = tmp_path / "shots.yaml"
    script.write_text(THREE_SHOTS)
    out = tmp_path / "out.mp4"
    assert main(["generate", "--workdir", str(dyn), "--script", str(script), "--out", str(out)]) == 0
    capsys.readouterr()
    _check_outputs([out], THREE_SHOTS, 2 + 5 + 3 + 4, 8, capsys)
    info = json.loads(Path(f"{out}.json").read_text())["provenance"]
    assert info["model"]["step"] == 2 and info["model"]["checkpoint"].endswith("checkpoints/2/state")
    assert info["model"]["tokenizer"]["workdir"] == str(tok.resolve())

    # `wm bench watermark --workdir`: generated clips are marked, real ones (same size) not.
    result = bench_watermark.run_generated(dyn, script, clips=3)
    assert (result["frames"], result["frame_size"]) == (14, 128)
    assert result["detect_rate_marked"] == 1.0 and result["false_positive_rate"] == 0.0
    assert result["false_positive_rate_after_mp4"] == 0.0


# ------------------------------------------------------------------ bounds (issue #16, case 5)


def _config_only_run(tmp_path, tiny_overrides):
    """A dynamics run directory with its config alone: every check below happens before a
    checkpoint is read."""
    from wm_jax import config as config_lib

    run = tmp_path / "run"
    run.mkdir()
    config_lib.dump(config_lib.load(PRESET, tiny_overrides + ["train.stage=dynamics"]), run / "config.yaml")
    return run


def test_a_huge_duration_is_refused_by_line_before_any_allocation(tmp_path, tiny_overrides, capsys):
    run = _config_only_run(tmp_path, tiny_overrides)
    script = tmp_path / "huge.yaml"
    script.write_text(
        "start: {split: test, episode: 0, t: 0, frames: 2}\nshots:\n  - duration: 4\n  - duration: 1000000000\n"
    )
    args = ["generate", "--workdir", str(run), "--script", str(script), "--out", str(tmp_path / "o.mp4")]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "huge.yaml line 4: shots[1].duration: the video would reach 1000000006 frames" in err[0]
    assert "--max-memory-gib" in err[0]
    # The limit is the user's: a small one refuses the first shot already.
    assert main(args[:-2] + ["--out", str(tmp_path / "o.mp4"), "--max-memory-gib", "0.0001"]) == 2
    assert "huge.yaml line 3: shots[0].duration" in capsys.readouterr().err
    assert not (tmp_path / "o.mp4").exists()


def test_an_existing_out_is_refused(tmp_path, tiny_overrides, capsys):
    run = _config_only_run(tmp_path, tiny_overrides)
    script = tmp_path / "shots.yaml"
    script.write_text("start: {split: test, episode: 0, t: 0, frames: 2}\nshots:\n  - duration: 4\n")
    out = tmp_path / "o.mp4"
    out.write_bytes(b"a user's video")
    assert main(["generate", "--workdir", str(run), "--script", str(script), "--out", str(out)]) == 2
    assert f"{out} (or its sidecar) already exists" in capsys.readouterr().err
    assert out.read_bytes() == b"a user's video"


# ------------------------------------------------------------------ the carry render

CARRY_SCRIPT = "start: {split: test, episode: 0, t: 0, frames: 2}\nshots:\n  - duration: 10\n    actions: [1, 1, 0, 0, 3, 3, 0, 0, 0, 0]\n"


def _spied_generate(run, script, out, monkeypatch, render):
    """`generate(run, script, out, render=render)` (greedy) with its rollout, its decoder
    and its video writer spied on, not replaced -> uint8 [F, S, S, 3] frames: the video
    written (before upscaling) and the frames decoded; the codes streamed [1, F, N, L]
    (the context's, then each generated frame's); the sidecar's fields."""
    from wm_jax.inference import rollout, watermark
    from wm_jax.inference.generate import generate

    real_rollout, real_decode, real_write = rollout.rollout_frames, rollout.decode_stream, watermark.write_marked_video
    codes, chunks, written = [], [], []

    def rollout_frames(dynamics, params, context, *args, **kwargs):
        codes.extend(np.asarray(context)[:, t] for t in range(context.shape[1]))
        for frame in real_rollout(dynamics, params, context, *args, **kwargs):
            codes.append(np.asarray(frame))
            yield frame

    def decode_stream(*args, **kwargs):
        for chunk in real_decode(*args, **kwargs):
            chunks.append(chunk)
            yield chunk

    def write_marked_video(video, path, info, **kwargs):
        written.append((np.asarray(video)[:, :: info["scale"], :: info["scale"]], info))
        return real_write(video, path, info, **kwargs)

    monkeypatch.setattr(rollout, "rollout_frames", rollout_frames)
    monkeypatch.setattr(rollout, "decode_stream", decode_stream)
    monkeypatch.setattr(watermark, "write_marked_video", write_marked_video)
    generate(run, script, out, render=render)
    ((video, info),) = written
    return video, np.concatenate(chunks, axis=1)[0], np.stack(codes, axis=1), info


def test_generate_with_the_carry_render_carries_unchanged_patches(dynamics_run, tiny_dataset, tmp_path, monkeypatch):
    from wm_jax.inference.rollout import carry_unchanged

    script = tmp_path / "shots.yaml"
    script.write_text(CARRY_SCRIPT)
    video, _, codes, info = _spied_generate(dynamics_run, script, tmp_path / "decode.mp4", monkeypatch, "decode")
    carried, decoded, again, carry_info = _spied_generate(
        dynamics_run, script, tmp_path / "carry.mp4", monkeypatch, "carry"
    )
    assert (info["render"], carry_info["render"]) == ("decode", "carry")
    np.testing.assert_array_equal(codes, again)  # the same rollout (greedy)
    # The carry run decodes what the decode run writes, up to XLA's call-to-call float noise
    # (see tests/serve/test_serve_engine.py) ...
    assert np.abs(video.astype(int) - decoded).max() <= 2
    # ... and writes its decoded context, then `carry_unchanged` of its decoded frames from
    # the script's real last context frame.
    ctx, patch = 2, 4  # the script's context frames; tiny_cpu's model.tokenizer.patch_size
    script_ = load_script(script)
    last = read_source(
        script_, script_.start, default_data=str(tiny_dataset), default_split="test", default_frames=ctx, size=16
    )
    last = last["frame"][-1]
    np.testing.assert_array_equal(carried[:ctx], decoded[:ctx])
    np.testing.assert_array_equal(
        carried[ctx:], carry_unchanged(decoded[None, ctx:], codes[:, ctx - 1 :], last[None], patch)[0]
    )
    same = np.all(codes[0, ctx:] == codes[0, ctx - 1 : -1], axis=-1).reshape(-1, 4, 4)  # [H, S/p, S/p]
    assert same.any(), "precondition: some generated patch keeps its code"
    same = same.repeat(patch, axis=1).repeat(patch, axis=2)
    shown = np.concatenate([last[None], carried[ctx:]])
    assert (shown[1:][same] == shown[:-1][same]).all()  # unchanged patches hold the pixels shown before
    assert (carried[ctx:][same] != decoded[ctx:][same]).any()  # where they are not the decoded ones


def test_carry_render_needs_fsq_codes(tmp_path, tiny_dataset, capsys):
    from wm_jax import config as config_lib

    run = tmp_path / "run"
    run.mkdir()
    overrides = TINY_OVERRIDES + [f"data.dir={tiny_dataset}", "train.stage=dynamics"]
    config_lib.dump(config_lib.load(REPO / "wm_jax/presets/tiny_cpu_diffusion.yaml", overrides), run / "config.yaml")
    script = tmp_path / "shots.yaml"
    script.write_text(CARRY_SCRIPT)
    args = ["generate", "--workdir", str(run), "--script", str(script), "--out", str(tmp_path / "o.mp4")]
    assert main(args + ["--render", "carry"]) == 2
    err = capsys.readouterr().err
    assert "--render carry needs FSQ codes" in err and "'continuous' tokenizer" in err
