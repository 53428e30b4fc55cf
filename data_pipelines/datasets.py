"""Dataset making and inspection by source name (what `wm data make|inspect` call)."""

from __future__ import annotations

import itertools
import os
from types import ModuleType

import numpy as np

from data_pipelines import loader, schema, writer
from data_pipelines.schema import DatasetError
from data_pipelines.sources import atari, mujoco, procedural, video_files

# A source module provides SOURCE_NAME, GENERATOR_VERSION, record_spec(size, **params),
# generate_episode(seed, episode_id, num_frames, size=size, **params), and FPS or
# fps(**params) (steps per second); params are its own parameters, SOURCE_PARAMS[name]
# (name → default). Optional: describe(**params) validates them and returns entries for
# the manifest's source params; episode_files(seed, episode_id, **params) returns files
# ({relative path: bytes}) stored with the episode and listed in the manifest.
# A source that reads inputs (video files) provides, instead of generate_episode,
# inputs(**params): the list the splits divide (e.g. video files), INPUT_UNIT (what to
# call them, e.g. "videos"), and input_episodes(item, episode_ids, num_frames, size,
# **params): an item's episodes, each numbered with next(episode_ids).
SOURCES: dict[str, ModuleType] = {
    procedural.SOURCE_NAME: procedural,
    atari.SOURCE_NAME: atari,
    video_files.SOURCE_NAME: video_files,
    mujoco.SOURCE_NAME: mujoco,
}
SOURCE_PARAMS: dict[str, dict] = {
    procedural.SOURCE_NAME: procedural.DEFAULT_PARAMS,
    atari.SOURCE_NAME: atari.DEFAULT_PARAMS,
    video_files.SOURCE_NAME: video_files.DEFAULT_PARAMS,
    mujoco.SOURCE_NAME: mujoco.DEFAULT_PARAMS,
}
DEFAULT_EPISODES = DEFAULT_FRAMES = 64  # of a generating source


def split_sizes(episodes: int, val_fraction: float, test_fraction: float, unit: str = "episodes") -> dict[str, int]:
    """Episodes (or other `unit`s, e.g. videos) per split; a nonzero fraction gets at least one."""

    def count(fraction: float) -> int:
        return max(1, round(episodes * fraction)) if fraction > 0 else 0

    sizes = {"train": 0, "val": count(val_fraction), "test": count(test_fraction)}
    sizes["train"] = episodes - sizes["val"] - sizes["test"]
    if sizes["train"] < 1:
        raise DatasetError(
            f"{episodes} {unit} leave none for train after val={sizes['val']}"
            f" and test={sizes['test']}; give more {unit} or lower the val/test fractions"
        )
    return {k: v for k, v in sizes.items() if v}


def source_params(source: str, given: dict) -> dict:
    """The source's parameters: its defaults updated with `given`; DatasetError for an
    unknown source or parameter."""
    if source not in SOURCES:
        raise DatasetError(f"unknown source {source!r}; known sources: {sorted(SOURCES)}")
    defaults = SOURCE_PARAMS[source]
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise DatasetError(f"source {source!r} has no parameter(s) {unknown}; it takes {sorted(defaults)}")
    return {**defaults, **given}


def make_dataset(
    source: str,
    out: str | os.PathLike,
    *,
    size: int,
    episodes: int | None = None,
    frames: int | None = None,
    seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    records_per_shard: int = 4096,
    **params,
) -> dict:
    """Generates `episodes` episodes (default 64) of (at most) `frames` steps (default 64)
    at size×size and writes them to out (split by episode: train first, then val, then
    test ids); returns the manifest. A source with inputs (video) takes no `episodes`: its
    splits divide the inputs, each giving episodes of at most `frames` steps (None: whole).
    `params` are the source's own (SOURCE_PARAMS), e.g. num_entities for procedural,
    game/policy/frameskip/sticky_prob for atari, videos/stride/cut_ratio for video,
    num_objects for mujoco."""
    params = source_params(source, params)
    mod = SOURCES[source]
    # Validate before anything is generated or written.
    described = mod.describe(**params) if hasattr(mod, "describe") else {}
    if hasattr(mod, "inputs"):
        if episodes is not None:
            raise DatasetError(f"source {source!r} makes its episodes from its inputs; it takes no episode count")
        items = mod.inputs(**params)
        sizes = split_sizes(len(items), val_fraction, test_fraction, unit=mod.INPUT_UNIT)
        ids = itertools.count()  # the writer reads the splits in order: ids count up train → val → test

        def episodes_of(lo: int, hi: int):
            for item in items[lo:hi]:
                yield from mod.input_episodes(item, ids, frames, size=size, **params)
    else:
        episodes = DEFAULT_EPISODES if episodes is None else episodes
        frames = DEFAULT_FRAMES if frames is None else frames
        sizes = split_sizes(episodes, val_fraction, test_fraction)

        def episodes_of(lo: int, hi: int):
            for episode_id in range(lo, hi):
                yield mod.generate_episode(seed, episode_id, frames, size=size, **params)

    bounds = np.cumsum([0, *sizes.values()])

    def files():
        for episode_id in range(episodes):
            yield from mod.episode_files(seed, episode_id, **params).items()

    splits = {name: episodes_of(int(bounds[i]), int(bounds[i + 1])) for i, name in enumerate(sizes)}
    manifest_params = {
        **({"episodes": episodes} if episodes is not None else {}),
        "frames": frames,
        "size": size,
        "seed": seed,
        **params,
        "val_fraction": val_fraction,
        "test_fraction": test_fraction,
        **described,
    }
    return writer.write_dataset(
        out,
        splits,
        source=source,
        source_params=manifest_params,
        generator_version=mod.GENERATOR_VERSION,
        frame_size=size,
        fps=mod.fps(**params) if hasattr(mod, "fps") else mod.FPS,
        spec=mod.record_spec(size, **params),
        files=files() if hasattr(mod, "episode_files") else (),
        records_per_shard=records_per_shard,
    )


def _records(paths: list[str], spec: schema.Spec):
    """Every record of the shards in order, decoded and checked against `spec`;
    DatasetError naming the shard, the record's index in it and (for a check) the field."""
    for path in paths:
        source = loader.open_shards([path])
        for index in range(len(source)):
            try:
                record = schema.decode_record(source[index])
                schema.validate_record(record, spec)
            except (schema.RecordError, *loader.READ_ERRORS) as e:
                raise loader.bad_record(path, index, e) from e
            yield record


def _split_stats(paths: list[str], num_episodes: int, fields: dict) -> dict:
    """Episodes and frames, plus action histogram, cut rate, reward sum and camera x/y
    range for the fields the dataset has (`fields`: the manifest's field spec), of the
    steps where they are known (`<name>_valid`, if present; its share is reported)."""
    summarised = [k for k in ("action", "cut", "reward", "camera", "action_valid", "camera_valid") if k in fields]
    values = {k: [] for k in summarised}
    frames = 0
    for rec in _records(paths, schema.spec_from_json(fields)):
        frames += 1
        for k in summarised:
            values[k].append(rec[k])
    stats = {"episodes": num_episodes, "frames": frames}
    known = {}
    for k in ("action", "camera"):
        if f"{k}_valid" in values:
            known[k] = np.asarray(values[f"{k}_valid"], bool).reshape(-1)
            stats[f"{k}_valid_fraction"] = float(known[k].mean()) if frames else 0.0
    if "action" in values:
        actions = np.asarray(values["action"], np.int64).reshape(-1)[known.get("action", slice(None))]
        actions, counts = np.unique(actions, return_counts=True)
        stats["action_histogram"] = {int(v): int(c) for v, c in zip(actions, counts)}
    if "cut" in values:
        stats["cut_rate"] = float(np.mean(values["cut"])) if values["cut"] else 0.0
    if "reward" in values:
        stats["reward_sum"] = float(np.sum(values["reward"], dtype=np.float64))
    if "camera" in values:
        cams = np.asarray(values["camera"]).reshape(-1, fields["camera"]["shape"][0])[known.get("camera", slice(None))]
        for axis, name in enumerate(("camera_x", "camera_y")):
            stats[name] = [float(cams[:, axis].min()), float(cams[:, axis].max())] if len(cams) else None
    return stats


def dataset_stats(data_dir: str | os.PathLike) -> dict:
    """Verifies the dataset (hashes included, of shards and listed files, and every
    record against the manifest's fields), then summarises each split: episodes, frames
    and, where the fields exist, action histogram, cut rate, reward sum, camera x/y range
    (of known steps), and the share of steps with a known action/camera."""
    manifest = writer.verify_dataset(data_dir, check_hashes=True)
    with writer.malformed_as_dataset_error(data_dir):
        return {
            "source": manifest["source"],
            "source_params": manifest["source_params"],
            "frame_size": manifest["frame_size"],
            "num_entities": manifest["num_entities"],
            "files_verified": len(manifest.get("files", [])),
            "content_hash": manifest["content_hash"],
            "splits": {
                split: _split_stats(
                    writer.shard_paths(data_dir, manifest, split), len(entry["episodes"]), manifest["fields"]
                )
                for split, entry in manifest["splits"].items()
            },
        }
