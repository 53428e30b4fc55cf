"""identity_persistence of two reference videos on a run's held-out clips: the true
frames (what a perfect model scores) and copy-last (the last context frame, frozen).

    .venv/bin/python experiments/results/identity_cuts/bounds.py runs/id_base_s0
"""

import json
import sys

import numpy as np

from wm_jax import config as config_lib
from wm_jax.eval import metrics as M
from wm_jax.eval.clips import held_out_clips


def main(workdir: str) -> None:
    cfg = config_lib.load(f"{workdir}/config.yaml")
    ctx, horizon = cfg.eval.context_frames, cfg.eval.horizon
    clips = held_out_clips(cfg.data.dir, cfg, ctx + horizon)
    frames, boxes, visible = clips["frame"], clips["entity_boxes"], clips["entity_visible"]
    # The evaluation's references: each entity's crop in the last context frame where it is visible.
    crops = M.crop_boxes(frames[:, :ctx], boxes[:, :ctx])
    seen = visible[:, :ctx]
    last_seen = np.where(seen.any(axis=1), ctx - 1 - np.argmax(seen[:, ::-1], axis=1), -1)
    reference = np.take_along_axis(crops, np.maximum(last_seen, 0)[:, None, :, None, None, None], axis=1)[:, 0]
    reference[last_seen < 0] = np.nan
    videos = {"truth": frames[:, ctx:], "copy_last": np.repeat(frames[:, ctx - 1 : ctx], horizon, axis=1)}
    out = {
        name: M.identity_persistence(v, reference, boxes[:, ctx:], visible[:, ctx:], clips["cut"][:, ctx:])
        for name, v in videos.items()
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main(sys.argv[1])
