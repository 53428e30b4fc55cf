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
from wm_jax.config import MeshConfig
from wm_jax.models.tokenizer import VideoTokenizer, has_codebook, indices_to_codes, latent_width, num_tokens
from wm_jax.inference.rollout import encode_frames
from wm_jax.run import restore_params, tokenizer_identity


def cache_encoder(workdir: str | os.PathLike) -> CacheEncoder:
    """The tokenizer run (or bundle) at `workdir` as a cache encoder: its parameters are
    restored onto whatever devices are here when the build calls `load()`. An FSQ
    tokenizer's encode gives token ids int32 [B, C, N]; a continuous one's, which has no
    ids, its latents float32 [B, C, N, latent_dim]."""
    run_cfg, identity = tokenizer_identity(workdir)
    model, window_frames = run_cfg.model, run_cfg.data.frames_per_clip
    codebook = has_codebook(model)

    def load() -> Callable[[np.ndarray], Any]:
        mesh = sharding.make_mesh(MeshConfig())
        params, _, _ = restore_params(workdir, mesh, sharding.logical_rules(run_cfg.mesh), identity.step)
        tokenizer = VideoTokenizer(model)
        part = 1 if codebook else 0  # encode_frames gives (codes, ids or None)
        return lambda clip: encode_frames(tokenizer, params, clip, window_frames)[part]

    return CacheEncoder(
        identity,
        load,
        image_size=model.image_size,
        window_frames=window_frames,
        tokens_per_frame=num_tokens(model),
        fsq_levels=tuple(model.tokenizer.fsq_levels) if codebook else (),
        dtype=model.dtype,
        latent_dim=0 if codebook else latent_width(model),
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
    """float32 [count, N, L] codes in [-1, 1] of the records `cache.read` returns: the FSQ
    codes of an "ids" cache's token ids, a "latents" cache's latents as stored."""
    values = cache.read(split, first, count)
    if cache.kind == "latents":
        return values
    return np.asarray(indices_to_codes(values, tuple(cache.manifest["fsq_levels"])), np.float32)
