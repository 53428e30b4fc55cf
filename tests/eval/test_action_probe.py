"""The one-step action probe's measurement on frames whose answer is known (no model)."""

import numpy as np
import pytest

from data_pipelines.sources import procedural as P
from wm_jax.eval import action_probe

S = 32
MOVES = P.agent_moves(S)  # [5, 2]: noop, up, down, left, right; 2 px at S = 32


def _frames_at(agent_xy: np.ndarray) -> np.ndarray:
    """uint8 [A, B, S, S, 3]: a dark ground with a 4x4 white agent whose top-left is agent_xy [A, B, 2]."""
    frames = np.full(agent_xy.shape[:2] + (S, S, 3), 40, np.uint8)
    for a, b in np.ndindex(agent_xy.shape[:2]):
        x, y = agent_xy[a, b].astype(int)
        frames[a, b, y : y + 4, x : x + 4] = P.AGENT_COLOUR
    return frames


@pytest.mark.parametrize("scale, fraction", [(1.0, 1.0), (0.0, 0.0), (0.5, 0.5), (-1.0, -1.0)])
def test_moves_by_a_share_of_the_commanded_distance_score_that_share(scale, fraction):
    start = np.array([[10, 12], [20, 6]])  # two clips
    frames = _frames_at(start[None] + scale * MOVES[:, None])
    r = action_probe.probe_scores(frames, MOVES, np.ones(2, bool))
    assert r["commanded_px"] == 2.0 and r["num_clips"] == 2 and r["num_pairs"] == 8
    assert r["displacement_px"] == pytest.approx(2.0 * scale) and r["fraction"] == pytest.approx(fraction)
    np.testing.assert_allclose(r["displacement_px_per_action"], [2.0 * scale] * 4)


def test_only_the_move_along_the_actions_direction_counts():
    # Every action moves the agent 2 px to the right: only "right" did what it says, "left" the opposite.
    frames = _frames_at(np.array([[[10, 10]]] + [[[12, 10]]] * 4))
    r = action_probe.probe_scores(frames, MOVES, np.ones(1, bool))
    np.testing.assert_allclose(r["displacement_px_per_action"], [0.0, 0.0, -2.0, 2.0])
    assert r["displacement_px"] == 0.0


def test_clips_not_scored_or_without_an_agent_are_left_out():
    start = np.array([[10, 12], [20, 6], [4, 4]])
    frames = _frames_at(start[None] + MOVES[:, None])
    frames[3, 1] = 40  # clip 1 under "left": no agent
    frames[0, 2] = 40  # clip 2 under the no-op: nothing to compare with
    r = action_probe.probe_scores(frames, MOVES, np.array([True, True, True]))
    assert r["num_clips"] == 2 and r["num_pairs"] == 7 and r["fraction"] == 1.0
    r = action_probe.probe_scores(frames, MOVES, np.array([False, True, True]))  # e.g. frame C a cut
    assert r["num_clips"] == 1 and r["num_pairs"] == 3
    nothing = action_probe.probe_scores(frames, MOVES, np.zeros(3, bool))
    assert nothing["num_clips"] == 0 and np.isnan(nothing["displacement_px"]) and np.isnan(nothing["fraction"])
    with pytest.raises(ValueError, match="no-op"):
        action_probe.probe_scores(frames[1:], MOVES[1:], np.ones(3, bool))


def test_the_worlds_own_next_frames_score_fraction_one():
    """Frame t+1 of a real episode regenerated under each action at t: the simulator is the
    perfect model (the agent fully in view, t+1 not a cut)."""
    params = {"seed": 0, "size": S, "frames": 40, "num_entities": 3, "version": 3}
    factual = P.replay(params, 2)
    box = factual["entity_boxes"][:, 0]
    inside = (box[:, :2] >= 2).all(axis=1) & (box[:, 2:] <= S - 2).all(axis=1)  # room for a step
    ts = [t for t in range(len(box) - 1) if inside[t] and not factual["cut"][t + 1]][:3]
    assert ts, "the episode needs a step with the agent in view"
    frames = np.stack(
        [np.stack([P.replay(params, 2, t, [a])["frame"][t + 1] for t in ts]) for a in range(P.NUM_ACTIONS)]
    )  # [A, B, S, S, 3]
    r = action_probe.probe_scores(frames, MOVES, np.ones(len(ts), bool))
    assert r["num_clips"] == len(ts) and r["fraction"] == pytest.approx(1.0)


def test_forced_actions_replace_one_column():
    actions = np.array([[1, 2, 3], [4, 0, 1]])
    np.testing.assert_array_equal(action_probe.forced_actions(actions, 1, 0), [[1, 0, 3], [4, 0, 1]])
    assert actions[0, 1] == 2  # a copy
