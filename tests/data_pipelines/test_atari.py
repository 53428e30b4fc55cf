import json
import shutil

import numpy as np
import pytest

from conftest import PRESET, TINY_OVERRIDES
from data_pipelines import datasets, writer
from data_pipelines.schema import DatasetError
from data_pipelines.sources import atari

S, EPISODES, FRAMES = 32, 3, 24
PONG_ACTIONS = ["NOOP", "FIRE", "RIGHT", "LEFT", "RIGHTFIRE", "LEFTFIRE"]


@pytest.fixture(scope="module")
def pong(tmp_path_factory):
    out = tmp_path_factory.mktemp("atari") / "pong32"
    datasets.make_dataset("atari", out, episodes=EPISODES, frames=FRAMES, size=S, seed=0, game="Pong")
    return out


def test_dataset_is_verified_and_summarised(pong):
    manifest = writer.read_manifest(pong)
    assert set(manifest["fields"]) == set(atari.FIELDS)  # no camera/entity fields: unknown
    assert manifest["num_entities"] == 0 and manifest["fps"] == 15.0
    params = manifest["source_params"]
    assert params["rom"] == "pong" and params["action_set"] == PONG_ACTIONS and params["num_actions"] == 6
    assert [f["path"] for f in manifest["files"]] == [atari.replay_path(i) for i in range(EPISODES)]
    stats = datasets.dataset_stats(pong)
    assert stats["files_verified"] == EPISODES
    for split in stats["splits"].values():
        assert split["episodes"] == 1 and split["frames"] == FRAMES
        assert sum(split["action_histogram"].values()) == FRAMES
        assert set(split["action_histogram"]) <= set(range(len(PONG_ACTIONS)))
        assert split["cut_rate"] == 1 / FRAMES and "camera_x" not in split


def test_records(pong):
    ep = writer.read_episode(pong, writer.read_manifest(pong), 1)
    assert ep["frame"].shape == (FRAMES, S, S, 3) and ep["frame"].dtype == np.uint8
    np.testing.assert_array_equal(ep["t"], np.arange(FRAMES))
    np.testing.assert_allclose(ep["timecode"], np.arange(FRAMES) * 4 / 60, rtol=1e-6)
    assert ep["cut"][0] and not ep["cut"][1:].any() and not ep["shot_id"].any()
    assert ep["done"][-1] and not ep["done"][:-1].any()
    assert len({f.tobytes() for f in ep["frame"]}) > FRAMES // 2  # the screen changes


def test_generation_is_deterministic_per_episode():
    params = dict(atari.DEFAULT_PARAMS, game="Pong")
    a, b = (atari.generate_episode(0, 5, 8, 16, **params) for _ in range(2))
    for ra, rb in zip(a, b):
        for k in ra:
            np.testing.assert_array_equal(ra[k], rb[k])
    other = atari.generate_episode(0, 6, 8, 16, **params)
    assert [int(r["action"]) for r in a] != [int(r["action"]) for r in other]


def test_replay_reproduces_the_recorded_frames_bit_for_bit(pong):
    manifest = writer.read_manifest(pong)
    for episode_id in range(EPISODES):
        recorded = writer.read_episode(pong, manifest, episode_id)["frame"]
        np.testing.assert_array_equal(atari.replay_episode(pong, episode_id), recorded)


def test_counterfactual_replay_differs(pong):
    recorded = writer.read_episode(pong, writer.read_manifest(pong), 0)
    right = PONG_ACTIONS.index("RIGHT")
    other = np.where(recorded["action"] == right, PONG_ACTIONS.index("LEFT"), right)
    frames = atari.replay_episode(pong, 0, actions=other)
    assert frames.shape == recorded["frame"].shape
    np.testing.assert_array_equal(frames[0], recorded["frame"][0])  # same start
    assert (frames != recorded["frame"]).any(axis=(1, 2, 3)).sum() > 0
    with pytest.raises(ValueError, match=r"ints in \[0, 6\)"):
        atari.replay_episode(pong, 0, actions=[0, 6])


def test_emulator_at_a_step_shows_the_recorded_frame_and_continues_it(pong):
    recorded = writer.read_episode(pong, writer.read_manifest(pong), 1)
    for step in (0, 9, FRAMES - 1):
        ale, action_set, params = atari.emulator_at(pong, 1, step)
        np.testing.assert_array_equal(atari.resize_area(ale.getScreenRGB(), S), recorded["frame"][step])
        if step < FRAMES - 1:
            after = atari.frames_after(ale, action_set, recorded["action"][step:-1], params["frameskip"], S)
            np.testing.assert_array_equal(after, recorded["frame"][step + 1 :])
    with pytest.raises(ValueError, match=r"step 24 outside episode 1's 0..23"):
        atari.emulator_at(pong, 1, FRAMES)


def test_branches_start_from_one_state_and_counterfactuals_differ(pong):
    recorded = writer.read_episode(pong, writer.read_manifest(pong), 0)
    step, factual = 8, recorded["action"][8:-1]
    right = PONG_ACTIONS.index("RIGHT")
    other = np.where(factual == right, PONG_ACTIONS.index("LEFT"), right)
    branches = atari.branch_frames(pong, 0, step, [factual, other, factual])
    assert branches.shape == (3, FRAMES - 1 - step, S, S, 3) and branches.dtype == np.uint8
    np.testing.assert_array_equal(branches[0], recorded["frame"][step + 1 :])
    np.testing.assert_array_equal(branches[2], branches[0])  # the state is restored between branches
    assert (branches[1] != branches[0]).any()  # (the paddle soon pins at a wall: not every step)


def test_corrupt_replay_file_is_refused(pong, tmp_path):
    copy = tmp_path / "pong"
    shutil.copytree(pong, copy)
    path = copy / atari.replay_path(2)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(DatasetError, match="episode_000002.msgpack is corrupt"):
        atari.replay_episode(copy, 2)
    with pytest.raises(DatasetError, match="episode_000002.msgpack is corrupt"):
        datasets.dataset_stats(copy)
    path.unlink()
    with pytest.raises(DatasetError, match="episode_000002.msgpack is missing"):
        atari.replay_episode(copy, 2)
    with pytest.raises(DatasetError, match="episode 7 is not in the dataset"):
        atari.replay_episode(copy, 7)


def test_game_names(tmp_path):
    assert atari.rom_id("Pong") == "pong"
    assert atari.rom_id("MontezumaRevenge") == atari.rom_id("montezuma_revenge") == "montezuma_revenge"
    with pytest.raises(DatasetError, match=r"unknown Atari game 'Pongg'; did you mean Pong.*Breakout"):
        datasets.make_dataset("atari", tmp_path / "x", episodes=2, frames=2, size=S, game="Pongg")
    with pytest.raises(DatasetError, match=r"has no parameter\(s\) \['game'\]"):
        datasets.make_dataset("procedural", tmp_path / "y", episodes=2, frames=2, size=S, game="Pong")
    assert list(tmp_path.iterdir()) == []


def test_resize_is_an_area_mean():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(8, 6, 3)).astype(np.uint8)
    # 8 rows → 3 splits rows between outputs; area resampling keeps the mean.
    fractional = atari.resize_area(image, 3)
    assert fractional.shape == (3, 3, 3)
    assert abs(fractional.mean() - image.mean()) < 0.5
    block = image[:4, :4].astype(np.float64).reshape(2, 2, 2, 2, 3).mean(axis=(1, 3))
    np.testing.assert_array_equal(atari.resize_area(image[:4, :4], 2), np.rint(block))
    flat = np.full((210, 160, 3), 37, np.uint8)
    assert (atari.resize_area(flat, 32) == 37).all() and (atari.resize_area(flat, 300) == 37).all()


def test_sticky_policy_repeats_actions():
    rng = np.random.default_rng(0)
    sticky = atari.policy_actions(rng, 2000, 6, 0.75)
    uniform = atari.policy_actions(rng, 2000, 6, 0.0)
    repeats = lambda a: np.mean(a[1:] == a[:-1])  # noqa: E731
    assert repeats(sticky) > 0.75 and abs(repeats(uniform) - 1 / 6) < 0.05


def test_cli_make_and_inspect(tmp_path, capsys):
    from wm_jax.cli import main

    out = tmp_path / "breakout"
    assert (
        main(
            [
                "data",
                "make",
                "--source",
                "atari",
                "--game",
                "Breakout",
                "--episodes",
                "3",
                "--frames",
                "6",
                "--size",
                "16",
                "--policy",
                "random",
                "--frameskip",
                "2",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert main(["data", "inspect", str(out)]) == 0
    stats = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert stats["source_params"]["rom"] == "breakout" and stats["files_verified"] == 3
    assert stats["source_params"]["policy"] == "random" and stats["source_params"]["frameskip"] == 2
    assert main(["data", "make", "--source", "procedural", "--game", "Pong", "--out", str(tmp_path / "p")]) == 2


def test_atari_dataset_trains_the_tokenizer(pong, tmp_path):
    from wm_jax import config as config_lib
    from wm_jax.telemetry import read_metrics
    from wm_jax.train.loop import train

    # Pong's minimal action set has 6 actions: the dynamics stage would also need
    # model.dynamics.num_actions=6.
    cfg = config_lib.load(PRESET, TINY_OVERRIDES + [f"data.dir={pong}", f"model.image_size={S}", "train.steps=2"])
    train(cfg, tmp_path / "tok")
    rows = read_metrics(tmp_path / "tok" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2] and all(np.isfinite(r["loss"]) for r in rows)
