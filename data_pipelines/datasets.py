"""Dataset making and inspection by source name (what `wm data make|inspect` call)."""
from __future__ import annotations

import os
from types import ModuleType

import grain
import numpy as np

from data_pipelines import schema, writer
from data_pipelines.schema import DatasetError
from data_pipelines.sources import procedural

# A source module provides SOURCE_NAME, GENERATOR_VERSION, FPS, record_spec(size, n)
# and generate_episode(seed, episode_id, num_frames, size, num_entities).
SOURCES: dict[str, ModuleType] = {procedural.SOURCE_NAME: procedural}


def split_sizes(episodes: int, val_fraction: float, test_fraction: float) -> dict[str, int]:
    """Episodes per split; a nonzero fraction gets at least one episode."""
    def count(fraction: float) -> int:
        return max(1, round(episodes * fraction)) if fraction > 0 else 0

    sizes = {"train": 0, "val": count(val_fraction), "test": count(test_fraction)}
    sizes["train"] = episodes - sizes["val"] - sizes["test"]
    if sizes["train"] < 1:
        raise DatasetError(f"{episodes} episodes leave none for train after val={sizes['val']}"
                           f" and test={sizes['test']}; make more episodes")
    return {k: v for k, v in sizes.items() if v}


def make_dataset(source: str, out: str | os.PathLike, *, episodes: int, frames: int, size: int,
                 seed: int = 0, num_entities: int = 3, val_fraction: float = 0.1,
                 test_fraction: float = 0.1, records_per_shard: int = 4096) -> dict:
    """Generates `episodes` episodes of `frames` steps at size×size and writes them to out
    (split by episode: train first, then val, then test ids); returns the manifest."""
    if source not in SOURCES:
        raise DatasetError(f"unknown source {source!r}; known sources: {sorted(SOURCES)}")
    mod = SOURCES[source]
    sizes = split_sizes(episodes, val_fraction, test_fraction)
    bounds = np.cumsum([0, *sizes.values()])

    def episodes_of(lo: int, hi: int):
        for episode_id in range(lo, hi):
            yield mod.generate_episode(seed, episode_id, frames, size=size,
                                       num_entities=num_entities)

    splits = {name: episodes_of(int(bounds[i]), int(bounds[i + 1]))
              for i, name in enumerate(sizes)}
    slots = mod.record_spec(size, num_entities)["entity_ids"][1][0]
    params = {"episodes": episodes, "frames": frames, "size": size, "seed": seed,
              "num_entities": num_entities, "val_fraction": val_fraction,
              "test_fraction": test_fraction}
    return writer.write_dataset(out, splits, source=source, source_params=params,
                                generator_version=mod.GENERATOR_VERSION, frame_size=size,
                                num_entities=int(slots), fps=mod.FPS,
                                records_per_shard=records_per_shard)


def _split_stats(paths: list[str], num_episodes: int) -> dict:
    # ArrayRecordDataSource refuses an empty path list (a split written with no episodes).
    source = grain.sources.ArrayRecordDataSource(paths) if paths else []
    actions, cuts, cams = [], [], []
    for data in source:
        rec = schema.decode_record(data)
        actions.append(int(rec["action"]))
        cuts.append(bool(rec["cut"]))
        cams.append(rec["camera"][:2])
    cams = np.asarray(cams).reshape(-1, 2)
    values, counts = np.unique(np.asarray(actions, np.int64), return_counts=True)
    return {
        "episodes": num_episodes,
        "frames": len(source),
        "action_histogram": {int(v): int(c) for v, c in zip(values, counts)},
        "cut_rate": float(np.mean(cuts)) if cuts else 0.0,
        "camera_x": [float(cams[:, 0].min()), float(cams[:, 0].max())] if len(cams) else None,
        "camera_y": [float(cams[:, 1].min()), float(cams[:, 1].max())] if len(cams) else None,
    }


def dataset_stats(data_dir: str | os.PathLike) -> dict:
    """Verifies the dataset (hashes included), then summarises each split: episodes,
    frames, action histogram, cut rate, camera x/y range."""
    manifest = writer.verify_dataset(data_dir, check_hashes=True)
    return {
        "source": manifest["source"],
        "frame_size": manifest["frame_size"],
        "num_entities": manifest["num_entities"],
        "content_hash": manifest["content_hash"],
        "splits": {split: _split_stats(writer.shard_paths(data_dir, manifest, split),
                                       len(entry["episodes"]))
                   for split, entry in manifest["splits"].items()},
    }
