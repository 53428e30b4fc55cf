"""Mixtures: windows drawn from several datasets in proportion to weights.

`make_mixture_loader([(dir, weight), ...], ...)` is `make_loader` over a mixture. Each
dataset's windows are shuffled (afresh each pass) and repeated forever; grain's
`MapDataset.mix` interleaves them so that dataset i fills weight_i / sum(weights) of the
positions of the stream, in a fixed pattern; a shuffle within windows of MIX_WINDOW
positions breaks that pattern, so that every stretch of the stream, and so every batch
(B consecutive positions; one of P processes reads every P-th batch), holds the datasets
in about their proportions. Element k of the stream is a pure function of k and the
seed, so the DataLoader's iterator state (how far each worker has read) resumes it
exactly, as for one dataset, and processes read disjoint positions.

The datasets must have the same frame size; batches hold only the fields that every one
of them has, with the same dtype and shape (`common_fields`).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence

import grain
import numpy as np

from data_pipelines import loader, writer
from data_pipelines.schema import DatasetError

# Positions of the mixed stream shuffled together: each such window holds every dataset
# in its exact proportion (to within one element).
MIX_WINDOW = 4096


def common_fields(specs: Sequence[dict]) -> tuple[list[str], list[str]]:
    """(kept, dropped) field names of datasets with these manifest field specs
    ({name: {"dtype", "shape"}}): kept are in every spec with equal dtype and shape (in
    the first spec's order); dropped are the others, sorted."""
    names = set().union(*specs)
    kept = [name for name in specs[0] if all(spec.get(name) == specs[0][name] for spec in specs)]
    return kept, sorted(names - set(kept))


def mixture_hash(content_hashes: Sequence[str], weights: Sequence[float]) -> str:
    """sha256 naming a mixture by its datasets' content hashes and weights, in order."""
    digest = hashlib.sha256()
    for content_hash, weight in zip(content_hashes, weights):
        digest.update(f"{content_hash}:{float(weight)!r};".encode())
    return digest.hexdigest()


def _component_seed(seed: int, index: int) -> int:
    """A 32-bit shuffle seed for dataset `index` of a mixture (distinct per dataset)."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


class MixtureSource(grain.sources.RandomAccessDataSource):
    """Infinite random-access stream: position k ↦ a window of one of `sources`, dataset
    i taking weights[i] / sum(weights) of the positions (see the module docstring)."""

    def __init__(
        self, sources: Sequence[loader.WindowSource], weights: Sequence[float], *, seed: int, shuffle: bool = True
    ):
        if len(sources) != len(weights) or not sources:
            raise DatasetError(
                f"a mixture needs one weight per dataset; got {len(sources)} datasets, {len(weights)} weights"
            )
        if min(weights) <= 0:
            raise DatasetError(f"mixture weights must be > 0; got {list(weights)}")
        parts = []
        for i, source in enumerate(sources):
            part = grain.MapDataset.source(source)
            parts.append((part.shuffle(seed=_component_seed(seed, i)) if shuffle else part).repeat())
        mixed = grain.MapDataset.mix(parts, [float(w) for w in weights])
        if shuffle:
            mixed = grain.experimental.WindowShuffleMapDataset(mixed, window_size=MIX_WINDOW, seed=seed)
        self._mixed, self._sources = mixed, list(sources)
        # Checked when an iterator state is restored, like WindowSource's: by content.
        self._repr = (
            f"MixtureSource(sources=[{', '.join(map(repr, sources))}], "
            f"weights={[float(w) for w in weights]}, seed={seed}, shuffle={shuffle})"
        )

    def __len__(self) -> int:
        return len(self._mixed)  # sys.maxsize: the stream never ends

    def __repr__(self) -> str:
        return self._repr

    def __getitem__(self, k: int) -> dict[str, np.ndarray]:
        return self._mixed[k]

    def window_bytes(self) -> int:
        """Bytes of one window (the sources load the same fields: one size)."""
        return self._sources[0].window_bytes()

    def batch(self, ks: Sequence[int]) -> dict[str, np.ndarray]:
        """Positions ks stacked to [B, T, ...] (`loader.BatchSource` reads batches so)."""
        return loader.stack_windows([self[k] for k in ks])


def make_mixture_loader(
    mixture: Sequence[tuple[str | os.PathLike, float]],
    *,
    split: str,
    frames_per_clip: int,
    batch_size: int,
    seed: int,
    window_stride: int = 1,
    shuffle: bool = True,
    worker_count: int = 0,
    shard_options: grain.sharding.ShardOptions | None = None,
    read_options: grain.ReadOptions | None = None,
    skip_bad_records: bool = False,
    fields: Iterable[str] | None = None,
) -> loader.Loader:
    """A loader over the mixture of (dataset dir, weight) pairs: batches as
    `make_loader`'s, of the fields common to every dataset (or those of them in
    `fields`), forever. Resumes from `iter(loader).get_state()` exactly."""
    manifests = [writer.read_manifest(data_dir) for data_dir, _ in mixture]  # names a missing one
    sizes = {str(d): m["frame_size"] for (d, _), m in zip(mixture, manifests)}
    if len(set(sizes.values())) > 1:
        raise DatasetError(f"the datasets of a mixture must have one frame size; got {sizes}")
    kept, _ = common_fields([m["fields"] for m in manifests])
    wanted = kept if fields is None else [name for name in kept if name in set(fields)]
    sources = [
        loader.WindowSource(data_dir, split, frames_per_clip, window_stride, skip_bad_records, wanted)
        for data_dir, _ in mixture
    ]
    source = MixtureSource(sources, [w for _, w in mixture], seed=seed, shuffle=shuffle)
    # Shuffling happens in the source: batches read the stream in order.
    batches = loader.BatchSource(
        source,
        loader.WindowOrder(len(source), shuffle=False, seed=None),
        batch_size=batch_size,
        num_elements=None,
        drop_remainder=True,
        shard=shard_options,
    )
    return loader.data_loader(batches, worker_count=worker_count, read_options=read_options)
