"""Building a latent cache from a trained tokenizer run (`wm data cache`).

The cache's format, writing and reading live in `data_pipelines.latent_cache`, which
takes the encoder as a function; this module restores a tokenizer run (or bundle) into
one. The run's identity the cache records and checks is `run.tokenizer_identity`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from data_pipelines import latent_cache as cache_format
from data_pipelines.latent_cache import CacheEncoder, LatentCache
from wm_jax import sharding
from wm_jax.config import ConfigError, MeshConfig
from wm_jax.models.tokenizer import VideoTokenizer, has_codebook, indices_to_codes, num_tokens
from wm_jax.inference.rollout import encode_frames
from wm_jax.run import restore_params, tokenizer_identity


def cache_encoder(workdir: str | os.PathLike) -> CacheEncoder:
    """The tokenizer run (or bundle) at `workdir` as a cache encoder: its parameters are
    restored onto whatever devices are here when the build calls `load()`."""
    run_cfg, identity = tokenizer_identity(workdir)
    model, window_frames = run_cfg.model, run_cfg.data.frames_per_clip
    if not has_codebook(model):
        raise ConfigError(
            f"{workdir}: a latent cache holds FSQ token ids; this tokenizer's bottleneck is "
            f"'{model.tokenizer.bottleneck}'"
        )

    def load() -> Callable[[np.ndarray], Any]:
        mesh = sharding.make_mesh(MeshConfig())
        params, _, _ = restore_params(workdir, mesh, sharding.logical_rules(run_cfg.mesh), identity.step)
        tokenizer = VideoTokenizer(model)
        return lambda clip: encode_frames(tokenizer, params, clip, window_frames)[1]

    return CacheEncoder(
        identity,
        load,
        image_size=model.image_size,
        window_frames=window_frames,
        tokens_per_frame=num_tokens(model),
        fsq_levels=tuple(model.tokenizer.fsq_levels),
        dtype=model.dtype,
    )


def build_cache(
    data_dir: str | os.PathLike,
    tokenizer_workdir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    splits: Iterable[str] | None = None,
    batch_size: int = 32,
    chunk_records: int = 256,
    log: Callable[[str], None] = print,
    progress: Callable[[str, int, int], None] | None = None,
) -> dict:
    """Encodes the dataset at data_dir with the tokenizer run (or bundle) at
    tokenizer_workdir into a latent cache at out_dir (`data_pipelines.latent_cache.write_cache`:
    arguments, resuming and errors); returns its manifest. CheckpointError/ConfigError for
    a bad tokenizer run."""
    return cache_format.write_cache(
        data_dir,
        cache_encoder(tokenizer_workdir),
        out_dir,
        splits=splits,
        batch_size=batch_size,
        chunk_records=chunk_records,
        log=log,
        progress=progress,
    )


def read_codes(cache: LatentCache, split: str, first: int, count: int) -> np.ndarray:
    """float32 [count, N, L] FSQ codes in [-1, 1] of the records `cache.read` returns."""
    return np.asarray(
        indices_to_codes(cache.read(split, first, count), tuple(cache.manifest["fsq_levels"])), np.float32
    )
