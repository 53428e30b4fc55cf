"""One-step teacher-forced action probe: does the model move the agent as each action says?

From each held-out clip's context (its first C frames' codes) the dynamics model predicts
frame C once per action a, forced at position C-1 (the transition into frame C), in one
greedy pass: no rollout drift, no sampling, and everything but the action identical. The
tokenizer decodes each prediction and `metrics.agent_position` finds the agent. Its
displacement from the no-op prediction to each move action's, projected on that action's
direction, is what the action did in the model's world; the simulator's per-step move is
what it should have done: `fraction` near 1 for a model that follows its actions, near 0
for one that ignores them. Procedural datasets only (where the action→motion map is known,
`data_pipelines.sources.procedural.agent_moves`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from wm_jax.eval.metrics import agent_position
from wm_jax.models.dynamics import DynamicsModel, make_controls
from wm_jax.models.tokenizer import VideoTokenizer
from wm_jax.inference.rollout import decode_codes, rollout


def forced_actions(actions: np.ndarray, at: int, action: int) -> np.ndarray:
    """actions int [B, F] with column `at` set to `action` (a copy)."""
    forced = np.array(actions, copy=True)
    forced[:, at] = action
    return forced


def forced_next_frames(
    dynamics: DynamicsModel,
    params: Any,
    tokenizer: VideoTokenizer,
    tok_params: Any,
    context_codes: jax.Array,
    steps: dict[str, np.ndarray],
    num_actions: int,
    reference_codes: jax.Array | None,
    chunk: int,
) -> np.ndarray:
    """uint8 [A, B, H, W, 3]: frame C as the model predicts it under each action a < A.

    context_codes: float [B, C, N, L] (the tokenizer's codes of the context frames);
    steps: the clips' per-frame fields over C + 1 frames ("action" int [B, C+1] and the
    optional ones of `make_controls`: camera, cut, validity), whose action at C-1 is
    replaced by each a in turn; reference_codes: float [B, M, L] for an identity bank, or
    None. Each prediction is decoded after its context, as a rollout's frames are (the
    tokenizer's temporal attention sees the context).
    """
    c = context_codes.shape[1]
    frames = []
    for a in range(num_actions):
        controls = make_controls({**steps, "action": forced_actions(steps["action"], c - 1, a)})
        # One rollout step (greedy; a diffusion model's noise the same for every action).
        nxt = rollout(dynamics, params, context_codes, controls, 1, reference_codes)[0][:, 0]
        frames.append(
            decode_codes(tokenizer, tok_params, jnp.concatenate([context_codes, nxt[:, None]], axis=1), chunk)[:, c]
        )
    return np.stack(frames)


def probe_scores(frames: np.ndarray, moves: np.ndarray, scored: np.ndarray) -> dict[str, Any]:
    """Agent displacement per action from predicted frames (the probe's measurement).

    frames: uint8 [A, B, H, W, 3], frame C predicted under each action (`forced_next_frames`);
    moves: float [A, 2], each action's true agent move (x, y px per step), action 0 the
    no-op (moves[0] == 0); scored: bool [B], the clips to count (e.g. frame C not a cut).
    For each move action a and clip b where the agent is found under both the no-op and
    a, the displacement is (pos[a, b] - pos[0, b]) . moves[a] / |moves[a]| px.
    Returns {"displacement_px": its mean over those pairs, "commanded_px": the mean
    |moves[a]|, "fraction": displacement / commanded, "displacement_px_per_action": [A-1]
    means per move action (NaN where none), "num_clips": clips with at least one pair,
    "num_pairs"}. NaN scores if no pair.
    """
    frames, moves, scored = np.asarray(frames), np.asarray(moves, np.float64), np.asarray(scored, bool)
    if frames.shape[:2] != (len(moves), len(scored)) or moves.shape[1:] != (2,) or moves[0].any():
        raise ValueError(
            f"frames {frames.shape} must be [A, B, ...] for moves {moves.shape} [A, 2] (moves[0] the "
            f"no-op's, zero: {moves[0]}) and scored {scored.shape} [B]"
        )
    pos = agent_position(frames)  # [A, B, 2]
    found = ~np.isnan(pos).any(axis=-1)
    ok = found[1:] & found[:1] & scored  # [A-1, B]
    unit = moves[1:] / np.linalg.norm(moves[1:], axis=-1, keepdims=True)
    disp = np.einsum("abk,ak->ab", np.nan_to_num(pos[1:] - pos[:1]), unit)
    commanded = float(np.linalg.norm(moves[1:], axis=-1).mean())
    mean = float(disp[ok].mean()) if ok.any() else float("nan")
    per_action = [float(d[k].mean()) if k.any() else float("nan") for d, k in zip(disp, ok)]
    return {
        "displacement_px": mean,
        "commanded_px": commanded,
        "fraction": mean / commanded,
        "displacement_px_per_action": per_action,
        "num_clips": int(ok.any(axis=0).sum()),
        "num_pairs": int(ok.sum()),
    }
