"""Counterfactual truth from the procedural world: regenerated episodes (v2 and v3 datasets)."""

import numpy as np
import pytest

from conftest import PRESET, TINY_OVERRIDES
from data_pipelines import datasets, writer
from data_pipelines.schema import DatasetError
from data_pipelines.sources import procedural as P
from wm_jax import config as config_lib
from wm_jax.eval import metrics as M
from wm_jax.eval.clips import held_out_clips
from wm_jax.eval.evaluate import procedural_counterfactual_truth

S = 16


@pytest.fixture(scope="module")
def v2_dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "procedural16_v2"
    datasets.make_dataset("procedural", out, episodes=4, frames=24, size=S, seed=3, version=2)
    return out


def _pre_v3(params: dict) -> dict:
    """A manifest's source_params as written before world version 3 (no version, no persistence)."""
    return {k: v for k, v in params.items() if k not in ("version", "action_persistence")}


@pytest.mark.parametrize("which", ["v3", "v2", "v2_old_manifest"])
def test_replaying_the_recorded_actions_reproduces_every_record(which, tiny_dataset, v2_dataset):
    data = tiny_dataset if which == "v3" else v2_dataset
    manifest = writer.read_manifest(data)
    params = _pre_v3(manifest["source_params"]) if which == "v2_old_manifest" else manifest["source_params"]
    assert manifest["source_params"]["version"] == (3 if which == "v3" else 2)
    for episode_id in (0, manifest["source_params"]["episodes"] - 1):
        recorded = writer.read_episode(data, manifest, episode_id)
        replayed = P.replay(params, episode_id)
        for key, value in recorded.items():
            np.testing.assert_array_equal(replayed[key], value, err_msg=key)
        # The recorded actions themselves as the replaced window change nothing either.
        window = P.replay(params, episode_id, 5, recorded["action"][5:12])
        np.testing.assert_array_equal(window["frame"], recorded["frame"])


def test_other_actions_change_the_agent_only_until_the_next_cut(tiny_dataset):
    """v3: the camera pans as commanded and the world ignores the agent, so another action
    sequence moves the agent's pixels and nothing else until a cut reframes the view."""
    params = writer.read_manifest(tiny_dataset)["source_params"]
    factual = P.replay(params, 1)
    start = 4
    others = (factual["action"][start : start + 10] + 1) % P.NUM_ACTIONS  # every action different
    cf = P.replay(params, 1, start, others)
    next_cut = start + 1 + int(np.argmax(np.r_[factual["cut"][start + 1 :], True]))
    same = slice(0, start + 1)
    np.testing.assert_array_equal(cf["frame"][same], factual["frame"][same])
    shot = slice(start + 1, next_cut)
    assert next_cut > start + 2, "the test needs a shot going on after the branch"
    np.testing.assert_array_equal(cf["camera"][shot], factual["camera"][shot])
    np.testing.assert_array_equal(cf["entity_boxes"][shot, 1:], factual["entity_boxes"][shot, 1:])
    moved = P.agent_moves(S)[others[: next_cut - start - 1]]  # each step's commanded move
    true_moves = P.agent_moves(S)[factual["action"][start : next_cut - 1]]
    agent = lambda r: (r["entity_boxes"][shot, 0, :2] + r["entity_boxes"][shot, 0, 2:]) / 2
    np.testing.assert_allclose(agent(cf) - agent(factual), np.cumsum(moved - true_moves, axis=0), atol=1e-5)
    # Pixels differ only where either agent is drawn.
    agents = np.concatenate([cf["entity_boxes"][shot, :1], factual["entity_boxes"][shot, :1]], axis=1)  # [T, 2, 4]
    changed = (cf["frame"][shot] != factual["frame"][shot]).any(axis=-1)
    assert changed.any() and not (changed & ~M.box_mask(agents, S, S)).any()


def test_agent_moves_are_the_worlds_per_step_moves():
    np.testing.assert_array_equal(P.agent_moves(32), [[0, 0], [0, -2], [0, 2], [-2, 0], [2, 0]])
    assert np.abs(P.agent_moves(S)).max() == S / 16


def test_replay_rejects_a_window_past_the_episode(tiny_dataset):
    params = writer.read_manifest(tiny_dataset)["source_params"]
    with pytest.raises(ValueError, match="do not fit"):
        P.replay(params, 0, params["frames"] - 2, np.zeros(3, np.int32))


@pytest.mark.parametrize("which", ["v3", "v2"])
def test_counterfactual_truth_of_held_out_clips(which, tiny_dataset, v2_dataset):
    data = tiny_dataset if which == "v3" else v2_dataset
    cfg = config_lib.load(PRESET, TINY_OVERRIDES + [f"data.dir={data}"])
    ctx, horizon = cfg.eval.context_frames, cfg.eval.horizon
    clips = held_out_clips(str(data), cfg, ctx + horizon)
    params = writer.read_manifest(data)["source_params"]
    recorded = procedural_counterfactual_truth(params, clips, ctx, clips["action"])
    np.testing.assert_array_equal(recorded["frame"], clips["frame"][:, ctx:])
    np.testing.assert_array_equal(recorded["entity_boxes"], clips["entity_boxes"][:, ctx:])
    assert recorded["same_context"].all()
    random = clips["action"].copy()
    random[:, ctx - 1 :] = (random[:, ctx - 1 :] + 1 + np.arange(horizon + 1) % 4) % P.NUM_ACTIONS  # all differ
    cf = procedural_counterfactual_truth(params, clips, ctx, random)
    assert cf["frame"].shape == (len(random), horizon, S, S, 3) and cf["frame"].dtype == np.uint8
    assert (cf["frame"] != clips["frame"][:, ctx:]).any()
    if which == "v3":  # the branch never reaches back before it
        assert cf["same_context"].all()
    tampered = {**clips, "frame": clips["frame"].copy()}
    tampered["frame"][0, 0] ^= 1
    with pytest.raises(DatasetError, match="does not reproduce"):
        procedural_counterfactual_truth(params, tampered, ctx, random)
