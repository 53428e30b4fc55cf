"""Does a model read a cut's framing? Teacher-forced, one step: the token accuracy of the
predicted first frame of each new shot in held-out clips, with the true framing and with
the framing of another clip (the batch rolled by one), all else equal.

    .venv/bin/python experiments/results/identity_cuts/cut_probe.py runs/id_framebank_s0
"""

import json
import sys

import jax
import numpy as np

from wm_jax import sharding
from wm_jax.config import MeshConfig
from wm_jax.eval.clips import held_out_clips
from wm_jax.models.dynamics import DynamicsModel, make_controls, predict_codes
from wm_jax.models.tokenizer import VideoTokenizer
from wm_jax.inference.rollout import encode_frames
from wm_jax.run import load_run_config, restore_params, tokenizer_source


def main(workdir: str) -> None:
    cfg = load_run_config(workdir)
    mesh, rules = sharding.make_mesh(MeshConfig()), sharding.logical_rules(cfg.mesh)
    params, _, _ = restore_params(workdir, mesh, rules)
    tok_params, _, _ = restore_params(tokenizer_source(workdir, cfg), mesh, rules)
    tokenizer, model = VideoTokenizer(cfg.model), DynamicsModel(cfg.model)
    clips = held_out_clips(cfg.data.dir, cfg, cfg.data.frames_per_clip)
    codes, _ = encode_frames(tokenizer, tok_params, clips["frame"], cfg.data.frames_per_clip)
    ref = None
    if cfg.model.dynamics.use_identity_bank:
        ref = encode_frames(tokenizer, tok_params, clips["reference"][:, :1], 1)[0][:, 0]
    steps = {k: clips[k] for k in ("action", "camera", "cut")}
    # Another clip's poses from each cut on: the same pans, the other clip's framing jump.
    other = np.roll(steps["camera"], 1, axis=0)
    jump_other = other[:, 1:, :2] - other[:, :-1, :2]
    swapped = steps["camera"].copy()
    for b, t in zip(*np.nonzero(steps["cut"][:, 1:])):
        swapped[b, t + 1 :, :2] += jump_other[b, t] - (steps["camera"][b, t + 1, :2] - steps["camera"][b, t, :2])
    apply = jax.jit(model.apply)
    out = {}
    for name, cam in (("true_framing", steps["camera"]), ("other_clip_framing", swapped)):
        controls = make_controls({**steps, "camera": cam})
        logits = apply({"params": params}, codes[:, :-1], controls, ref)
        hit = np.asarray(predict_codes(logits, cfg.model) == codes[:, 1:]).all(axis=-1)  # [B, T-1, N]
        cut = np.asarray(controls.next_cut)
        out[name] = {
            "cut_frame_token_accuracy": float(hit[cut].mean()),
            "other_frames_token_accuracy": float(hit[~cut].mean()),
            "num_cuts": int(cut.sum()),
        }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main(sys.argv[1])
