"""The held-out clips an evaluation reads: deterministic windows of one split.

Shared by the generic evaluator (`evaluate.py`) and the latent action probe
(`latent_action_probe.py`), which `evaluate` hands a latent action run to.
"""

from __future__ import annotations

import grain
import numpy as np

from data_pipelines.loader import make_loader
from wm_jax.config import Config

# Record fields the evaluation reads (those a dataset has): frames and the controls the
# rollout is steered by, plus the ground truth of the controllability metrics (camera
# pose, entity boxes/visibility, shot cuts), the identity bank's reference frame, and
# where each clip comes from (to replay an Atari episode to it).
EVAL_FIELDS = (
    "frame",
    "action",
    "action_valid",
    "camera",
    "camera_valid",
    "cut",
    "reference",
    "entity_boxes",
    "entity_visible",
    "episode_id",
    "t",
)


def held_out_clips(
    data_dir: str, cfg: Config, frames: int, split: str | None = None, num_clips: int | None = None
) -> dict[str, np.ndarray]:
    """Up to `num_clips` (default `eval.num_clips`) windows of `frames` steps from `split`
    (default the eval split), deterministic.

    Windows do not overlap (stride = length), so clips come from distinct stretches."""
    split = split or cfg.eval.split
    loader = make_loader(
        data_dir,
        split=split,
        frames_per_clip=frames,
        batch_size=1,
        seed=cfg.seed,
        window_stride=frames,
        shuffle=True,
        num_epochs=1,
        shard_options=grain.sharding.NoSharding(),
        batches_per_element=1,  # read no more clips than are taken (the clips are the same for any grouping)
    )
    clips = [b for _, b in zip(range(num_clips or cfg.eval.num_clips), loader)]
    if not clips:
        raise ValueError(f"split '{split}' of {data_dir} has no episode of {frames} frames")
    return {k: np.concatenate([c[k] for c in clips]) for k in EVAL_FIELDS if k in clips[0]}
