import json
import os

import grain
import numpy as np
import pytest

from data_pipelines import loader, writer
from data_pipelines.schema import DatasetError
from data_pipelines.sources import mujoco as source

os.environ.setdefault("MUJOCO_GL", "egl")  # before mujoco's import, which picks the GL backend
try:
    # Imports mujoco and creates (and closes) an offscreen GL context; DatasetError if either
    # fails. Not pytest.importorskip: importing mujoco with a MUJOCO_GL whose library cannot
    # be loaded raises AttributeError (from PyOpenGL), which it would not skip.
    source.describe(**source.DEFAULT_PARAMS)
except DatasetError as e:
    pytest.skip(f"needs mujoco rendering offscreen (the mujoco extra, EGL or OSMesa): {e}", allow_module_level=True)

from wm_jax.cli import main  # noqa: E402  (after the skips: the module needs a renderer)
from wm_jax.eval.metrics import estimate_shift  # noqa: E402

S, EPISODES, FRAMES = 32, 4, 24
MOVE = {name: i for i, name in enumerate(source.MOVES)}


def _stack(records: list[dict]) -> dict[str, np.ndarray]:
    return {k: np.stack([r[k] for r in records]) for k in records[0]}


def _forward(quat: np.ndarray) -> np.ndarray:
    """float64 [..., 3]: the view direction (-z of the camera frame) of quaternions [..., 4] (w, x, y, z)."""
    w, x, y, z = np.moveaxis(np.asarray(quat, np.float64), -1, 0)
    return -np.stack([2 * (x * z + w * y), 2 * (y * z - w * x), 1 - 2 * (x * x + y * y)], axis=-1)


@pytest.fixture(scope="module")
def episodes() -> list[dict[str, np.ndarray]]:
    """Four 64-step episodes: every move occurs in some shot (checked below)."""
    return [_stack(source.generate_episode(0, i, 64, S, num_objects=5)) for i in range(4)]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("mujoco") / "scene32"
    assert (
        main(
            [
                "data",
                "make",
                "--source",
                "mujoco",
                "--out",
                str(out),
                "--episodes",
                str(EPISODES),
                "--frames",
                str(FRAMES),
                "--size",
                str(S),
                "--num-objects",
                "4",
            ]
        )
        == 0
    )
    return out


def test_generation_is_deterministic_per_episode():
    a, b = (_stack(source.generate_episode(3, 1, 12, 16, num_objects=3)) for _ in range(2))
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    other = _stack(source.generate_episode(3, 2, 12, 16, num_objects=3))
    assert not np.array_equal(a["frame"], other["frame"]) and not np.array_equal(a["camera"], other["camera"])


def test_records_follow_the_schema_and_shots(episodes):
    ep = episodes[0]
    assert ep["frame"].shape == (64, S, S, 3) and ep["frame"].dtype == np.uint8
    assert ep["camera"].shape == (64, 7) and ep["camera"].dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(ep["camera"][:, 3:], axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(ep["t"], np.arange(64))
    np.testing.assert_allclose(ep["timecode"], np.arange(64) / source.FPS, rtol=1e-6)
    assert ep["done"][-1] and not ep["done"][:-1].any()
    for ep in episodes:
        cut = ep["cut"]
        assert cut[0] and 64 / 16 <= cut.sum() <= 64 / 8 + 1
        # The shot id counts the cuts, the commanded move is constant within a shot.
        np.testing.assert_array_equal(np.diff(ep["shot_id"]), cut[1:].astype(int))
        assert ep["shot_id"][0] == 0 and (np.diff(ep["action"])[~cut[1:]] == 0).all()


def test_camera_moves_as_commanded(episodes):
    seen = set()
    for ep in episodes:
        pos, quat = ep["camera"][:, :3].astype(np.float64), ep["camera"][:, 3:].astype(np.float64)
        fwd = _forward(quat)
        yaw = np.arctan2(fwd[:, 1], fwd[:, 0])
        bearing = np.arctan2(pos[:, 1], pos[:, 0])  # of the camera, seen from the centre
        for t in np.flatnonzero(~ep["cut"][1:]):  # transitions t → t+1 within a shot
            move = source.MOVES[ep["action"][t]]
            seen.add(move)
            dp, turn = pos[t + 1] - pos[t], np.angle(np.exp(1j * (yaw[t + 1] - yaw[t])))
            if move in ("hold", "pan_left", "pan_right"):
                np.testing.assert_allclose(dp, 0, atol=1e-5)
            if move == "hold":
                assert abs(turn) < 1e-5
            elif move.startswith("pan"):
                assert np.degrees(turn) * (1 if move == "pan_left" else -1) > 1.0
                np.testing.assert_allclose(fwd[t + 1, 2], fwd[t, 2], atol=1e-5)  # no tilt
            elif move.startswith("dolly"):
                # Along the view direction, which stays the same.
                np.testing.assert_allclose(fwd[t + 1], fwd[t], atol=1e-5)
                step = np.dot(dp, fwd[t])
                np.testing.assert_allclose(dp, step * fwd[t], atol=1e-5)
                assert step * (1 if move == "dolly_in" else -1) > 0.03
            else:  # orbit: the same distance from the centre's vertical axis and height, turning with it
                np.testing.assert_allclose(np.linalg.norm(pos[t + 1, :2]), np.linalg.norm(pos[t, :2]), atol=1e-4)
                assert abs(dp[2]) < 1e-5 and np.linalg.norm(dp) > 0.05
                np.testing.assert_allclose(turn, np.angle(np.exp(1j * (bearing[t + 1] - bearing[t]))), atol=1e-4)
                # Orbit left: the camera travels to its own left (-x of its frame) and turns right.
                right = np.array([np.sin(yaw[t]), -np.cos(yaw[t]), 0.0])
                side = 1 if move == "orbit_right" else -1
                assert turn * side > 0 and np.dot(dp, right) * side > 0
    assert seen == set(source.MOVES)


def test_pans_shift_the_image_the_commanded_way(episodes):
    signs = {"pan_left": 1, "pan_right": -1}  # turning left moves the content right (dx > 0)
    checked = 0
    for ep in episodes:
        for t in np.flatnonzero(~ep["cut"][1:]):
            move = source.MOVES[ep["action"][t]]
            if move in signs:
                dx, dy = estimate_shift(ep["frame"][t], ep["frame"][t + 1])
                assert dx * signs[move] > 0.5 and abs(dy) < abs(dx), (move, dx, dy)
                checked += 1
    assert checked >= 8


def test_cli_make_and_inspect(dataset, capsys):
    manifest = writer.read_manifest(dataset)
    assert manifest["source"] == "mujoco" and manifest["fps"] == source.FPS
    assert set(manifest["fields"]) == set(source.FIELDS)
    params = manifest["source_params"]
    assert params["num_objects"] == 4 and params["actions"] == list(source.MOVES)
    assert params["num_actions"] == len(source.MOVES)
    capsys.readouterr()
    assert main(["data", "inspect", str(dataset)]) == 0
    stats = json.loads(capsys.readouterr().out)
    frames = sum(split["frames"] for split in stats["splits"].values())
    assert frames == EPISODES * FRAMES and stats["splits"]["train"]["cut_rate"] > 1 / FRAMES


def test_loader_batches_feed_the_dynamics_controls(dataset):
    from wm_jax.models.dynamics import make_controls

    batch = next(
        iter(
            loader.make_loader(
                dataset,
                split="train",
                frames_per_clip=8,
                batch_size=2,
                seed=0,
                shard_options=grain.sharding.NoSharding(),
            )
        )
    )
    assert batch["frame"].shape == (2, 8, S, S, 3) and batch["frame"].dtype == np.uint8
    assert batch["camera"].shape == (2, 8, 7) and batch["action"].shape == (2, 8) and batch["cut"].shape == (2, 8)
    controls = make_controls({k: batch[k] for k in ("action", "camera", "cut")})
    assert np.asarray(controls.camera_mask).all()  # every pose is known
    moved = batch["camera"][:, 1:, :3] - batch["camera"][:, :-1, :3]
    # Across a cut the change is the new shot's framing (the model reads it only when told to).
    np.testing.assert_allclose(controls.camera[..., :3], moved, atol=1e-6)
    np.testing.assert_allclose(controls.camera[..., 3:], batch["camera"][:, 1:, 3:])


def test_bad_parameters_are_refused(tmp_path):
    with pytest.raises(DatasetError, match="num_objects"):
        source.generate_episode(0, 0, 4, 16, num_objects=0)
    assert main(["data", "make", "--source", "mujoco", "--game", "Pong", "--out", str(tmp_path / "x")]) == 2
