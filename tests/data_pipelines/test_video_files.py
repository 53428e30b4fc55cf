import json

import grain
import imageio.v2 as imageio
import numpy as np
import pytest

from data_pipelines import datasets, loader, writer
from data_pipelines.schema import DatasetError
from data_pipelines.sources import procedural
from data_pipelines.sources import video_files as vf
from wm_jax.cli import main
from wm_jax.models.dynamics import make_controls

S, FPS = 32, 15


def _write_video(path, frames, fps=FPS):
    # macro_block_size=1: keep odd sizes as they are (imageio would pad to 16).
    imageio.mimsave(path, list(frames), fps=fps, macro_block_size=1)
    return path


def _shots(lengths, h=48, w=64, seed=0):
    """uint8 [sum(lengths), h, w, 3]: per shot a random smooth pattern (two sinusoids per
    channel, about a cycle across the frame) panning half a pixel per frame in a random
    direction, plus pixel noise; a cut at each shot's first frame."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:h, :w].astype(np.float64)
    frames = []
    for n in lengths:
        # [wave, channel, (y, x)] radians per pixel: 0.5 to 1.5 cycles across the frame
        freq = rng.uniform(0.5, 1.5, (2, 3, 2)) * rng.choice([-1, 1], (2, 3, 2)) * 2 * np.pi / w
        phase, (dy, dx) = rng.uniform(0, 2 * np.pi, (2, 3)), rng.choice([-0.5, 0.5], 2)
        for t in range(n):
            waves = [
                np.sin(f[..., 0, None, None] * (y + dy * t) + f[..., 1, None, None] * (x + dx * t) + p[:, None, None])
                for f, p in zip(freq, phase)
            ]
            frame = 128 + 60 * sum(waves) + rng.normal(0, 3, (3, h, w))
            frames.append(np.clip(frame, 0, 255).astype(np.uint8).transpose(1, 2, 0))
    return np.stack(frames)


def _cut_frames(lengths):
    return list(np.cumsum([0, *lengths[:-1]]))


def test_detector_on_score_streams():
    def detect(scores):
        return [i for i, cut in enumerate(map(vf.CutDetector(3.0), scores)) if cut]

    assert detect([5.0] * 10 + [60.0] + [5.0] * 5) == [10]
    assert detect([80.0, 90.0, 5.0, 5.0]) == []  # the first two scores have nothing to compare to
    assert detect([0.2] * 10 + [8.0]) == []  # under ratio × floor: noise on a still shot
    # The median follows steady motion (scores ~12), so only the jump counts.
    assert detect([12.0, 13.0, 11.0] * 5 + [50.0, 12.0, 48.0]) == [15, 17]


def test_cuts_of_a_synthetic_video_are_found_exactly(tmp_path):
    lengths = [12, 9, 15, 10]
    path = _write_video(tmp_path / "shots.mp4", _shots(lengths))
    steps = list(vf.video_steps(path, S, stride=1, cut_ratio=3.0))
    assert len(steps) == sum(lengths)
    assert [i for i, s in enumerate(steps) if s["cut"]] == _cut_frames(lengths)
    np.testing.assert_array_equal([s["shot_id"] for s in steps], np.repeat(np.arange(4), lengths))
    np.testing.assert_allclose([s["timecode"] for s in steps], np.arange(sum(lengths)) / FPS)
    # Stride 3: every third frame; a cut between kept frames is still a cut.
    kept = list(vf.video_steps(path, S, stride=3, cut_ratio=3.0))
    assert len(kept) == -(-sum(lengths) // 3)
    assert [i for i, s in enumerate(kept) if s["cut"]] == [-(-c // 3) for c in _cut_frames(lengths)]


def test_square_resize_crops_the_centre():
    frame = np.zeros((40, 60, 3), np.uint8)
    frame[:, 10:50] = 200  # the centre 40×40 square
    out = vf.square_resize(frame, 8)
    assert out.shape == (8, 8, 3) and out.dtype == np.uint8 and (out == 200).all()


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """A directory with two videos: procedural frames (64×80: cropped) with a cut into an
    inverted second episode at frame 20, and the synthetic shots."""
    root = tmp_path_factory.mktemp("videos")
    first = [r["frame"] for r in procedural.generate_episode(0, 0, 20, size=64)]
    second = [255 - r["frame"] for r in procedural.generate_episode(0, 1, 20, size=64)]
    frames = np.pad(np.stack(first + second), ((0, 0), (0, 0), (8, 8), (0, 0)))
    _write_video(root / "a_procedural.mp4", frames)
    _write_video(root / "b_shots.mov", _shots([10, 14]))
    (root / "notes.txt").write_text("not a video")
    return root


@pytest.fixture(scope="module")
def video_dataset(videos):
    out = videos.parent / "ds"
    code = main(
        [
            "data",
            "make",
            "--source",
            "video",
            "--videos",
            str(videos),
            "--size",
            str(S),
            "--frames",
            "16",
            "--val-fraction",
            "0.5",
            "--test-fraction",
            "0",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    return out


def test_cli_make_and_inspect(video_dataset, videos, capsys):
    out = video_dataset
    manifest = writer.read_manifest(out)
    assert set(manifest["fields"]) == set(vf.record_spec(S))
    assert manifest["source"] == "video" and manifest["fps"] == FPS
    entries = manifest["source_params"]["videos"]
    assert [e["path"] for e in entries] == [str(videos / "a_procedural.mp4"), str(videos / "b_shots.mov")]
    assert entries[0]["side_file"] is None and len(entries[0]["sha256"]) == 64
    assert manifest["source_params"]["num_actions"] == 0
    # Split by video: 40 frames → episodes of 16, 16, 8 in train; 24 → 16, 8 in val.
    lengths = {s: [e["length"] for e in v["episodes"]] for s, v in manifest["splits"].items()}
    assert lengths == {"train": [16, 16, 8], "val": [16, 8]}
    assert [e["episode_id"] for e in manifest["splits"]["val"]["episodes"]] == [3, 4]

    ep = writer.read_episode(out, manifest, 1)  # frames 16..31 of the procedural video
    assert ep["frame"].shape == (16, S, S, 3) and ep["frame"].dtype == np.uint8
    assert ep["cut"][0] and ep["cut"][20 - 16]  # the episode start, and the detected cut
    assert ep["shot_id"][20 - 16] == ep["shot_id"][20 - 16 - 1] + 1
    assert not ep["action_valid"].any() and not ep["camera_valid"].any()
    assert not ep["action"].any() and not ep["camera"].any()
    np.testing.assert_allclose(ep["timecode"], np.arange(16) / FPS, rtol=1e-6)

    capsys.readouterr()
    assert main(["data", "inspect", str(out)]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["splits"]["train"]["frames"] == 40 and stats["splits"]["val"]["frames"] == 24
    assert stats["splits"]["train"]["action_valid_fraction"] == 0.0
    assert stats["splits"]["train"]["action_histogram"] == {} and stats["splits"]["train"]["camera_x"] is None


def test_batches_feed_the_dynamics_controls_masked(video_dataset):
    batch = next(
        iter(
            loader.make_loader(
                video_dataset,
                split="train",
                frames_per_clip=6,
                batch_size=2,
                seed=0,
                shard_options=grain.sharding.NoSharding(),
            )
        )
    )
    assert batch["action_valid"].shape == (2, 6) and batch["camera"].shape == (2, 6, 7)
    controls = make_controls({k: batch[k] for k in ("action", "action_valid", "camera", "camera_valid", "cut")})
    assert not np.asarray(controls.action_mask).any() and not np.asarray(controls.camera_mask).any()
    np.testing.assert_array_equal(controls.next_cut, batch["cut"][:, 1:])


def test_side_file_gives_actions_cameras_shots_and_timecodes(tmp_path):
    n = 12
    path = _write_video(tmp_path / "clip.mp4", _shots([n]))
    rows = [
        {"action": i % 3, "camera": [i, 0, 0, 1, 0, 0, 0], "shot_id": 7 + i // 5, "timecode": 100 + i / 10}
        for i in range(n)
    ]
    rows[4] = {"shot_id": 7, "timecode": 100.4, "action": None}  # action and camera unknown here
    vf.side_path(path).write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
    out = tmp_path / "ds"
    datasets.make_dataset("video", out, size=16, frames=None, val_fraction=0, test_fraction=0, videos=[path], stride=2)
    manifest = writer.read_manifest(out)
    side = manifest["source_params"]["videos"][0]["side_file"]
    assert side["path"] == str(vf.side_path(path)) and side["rows"] == n
    assert manifest["source_params"]["num_actions"] == 3
    assert manifest["fps"] == FPS / 2
    ep = writer.read_episode(out, manifest, 0)
    kept = range(0, n, 2)
    np.testing.assert_array_equal(ep["action_valid"], [i != 4 for i in kept])
    np.testing.assert_array_equal(ep["camera_valid"], [i != 4 for i in kept])
    np.testing.assert_array_equal(ep["action"], [0 if i == 4 else i % 3 for i in kept])
    np.testing.assert_array_equal(ep["camera"][:, 0], [0 if i == 4 else i for i in kept])
    np.testing.assert_array_equal(ep["shot_id"], [7 + i // 5 for i in kept])
    np.testing.assert_array_equal(ep["cut"], [i in (0, 6, 10) for i in kept])  # shot ids 7 | 8 | 9
    np.testing.assert_allclose(ep["timecode"], [i / 10 for i in kept], atol=1e-5)


@pytest.mark.parametrize("rows", [10, 13])
def test_side_file_rows_must_match_the_frames(tmp_path, rows):
    path = _write_video(tmp_path / "clip.mp4", _shots([12]))
    vf.side_path(path).write_text('{"action": 1}\n' * rows)
    message = f"side file .*clip.mp4.jsonl has {rows} rows but video .*clip.mp4 has 12 frames"
    with pytest.raises(DatasetError, match=message):
        datasets.make_dataset("video", tmp_path / "ds", size=16, val_fraction=0, test_fraction=0, videos=[path])
    assert not (tmp_path / "ds").exists()


@pytest.mark.parametrize(
    "line, words",
    [
        ('{"action": 1', "line 2.*not JSON"),
        ('{"camera": [1, 2, 3]}', "line 2.*'camera' must be 7 numbers"),
        ('{"action": -1}', "line 2.*'action' must be an int >= 0"),
        ('{"act": 1}', r"line 2.*unknown key\(s\) \['act'\]"),
        ('{"shot_id": 3}', "'shot_id' must be in every row or in none \\(row 1 lacks it\\)"),
    ],
)
def test_bad_side_file_rows_are_named(tmp_path, line, words):
    side = tmp_path / "clip.mp4.jsonl"
    side.write_text('{"action": 1}\n' + line + "\n")
    with pytest.raises(DatasetError, match=words.replace("line 2", f"{side}:2")):
        vf.read_side_file(side)


def test_undecodable_and_missing_videos_are_named(tmp_path):
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"\x00not a video" * 64)
    with pytest.raises(DatasetError, match=f"cannot decode video {bad}"):
        datasets.make_dataset("video", tmp_path / "ds", size=16, val_fraction=0, test_fraction=0, videos=[bad])
    with pytest.raises(DatasetError, match="video .*missing.mp4 does not exist"):
        datasets.make_dataset("video", tmp_path / "ds", size=16, videos=[tmp_path / "missing.mp4"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no video files"):
        datasets.make_dataset("video", tmp_path / "ds", size=16, videos=[tmp_path / "empty"])
    assert not (tmp_path / "ds").exists()


def test_video_source_refuses_an_episode_count_and_too_few_videos(videos, tmp_path):
    with pytest.raises(DatasetError, match="takes no episode count"):
        datasets.make_dataset("video", tmp_path / "ds", size=16, episodes=3, videos=[videos])
    with pytest.raises(DatasetError, match="2 videos leave none for train"):
        datasets.make_dataset("video", tmp_path / "ds", size=16, videos=[videos])
