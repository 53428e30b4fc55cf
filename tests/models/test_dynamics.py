"""Dynamics: shapes, exact temporal causality, action conditioning, partition metadata."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

from wm_jax.config import DynamicsConfig, ModelConfig, TokenizerConfig
from wm_jax.models import tokenizer as tk
from wm_jax.models.dynamics import DynamicsModel, code_targets, logits_shape, make_controls, predict_codes, token_loss

CFG = ModelConfig(
    image_size=8,
    tokenizer=TokenizerConfig(patch_size=4, fsq_levels=(4, 3, 3)),
    dynamics=DynamicsConfig(embed_dim=32, num_layers=1, num_heads=2, mlp_dim=64, num_actions=5, head="joint"),
)
B, T, N, L, V = 2, 6, 4, 3, 36


def _inputs(seed=0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    indices = jax.random.randint(k1, (B, T, N), 0, V)
    actions = jax.random.randint(k2, (B, T), 0, CFG.dynamics.num_actions)
    return tk.indices_to_codes(indices, CFG.tokenizer.fsq_levels), actions, jnp.ones((B, T), bool)


def _controls(actions, mask=None):
    """Controls of T positions from T actions (the step fields of T + 1 frames)."""
    steps = {"action": jnp.pad(actions, ((0, 0), (0, 1)))}
    if mask is not None:
        steps["action_valid"] = jnp.pad(mask, ((0, 0), (0, 1)))
    return make_controls(steps)


def _model(use_actions=True):
    cfg = dataclasses.replace(CFG, dynamics=dataclasses.replace(CFG.dynamics, use_actions=use_actions))
    return DynamicsModel(cfg)


@pytest.fixture(scope="module")
def with_actions():
    model = _model()
    return jax.jit(model.apply), jax.jit(model.init)(jax.random.key(1), _inputs()[0], _controls(_inputs()[1]))


def test_output_shape_and_dtype(with_actions):
    apply, variables = with_actions
    codes, actions, mask = _inputs()
    logits = apply(variables, codes, _controls(actions, mask))
    assert logits.shape == (B, T, N, V) and logits.dtype == jnp.float32
    assert tk.vocab_size(CFG) == V and tk.num_tokens(CFG) == N


@pytest.mark.parametrize("t", [0, 3])
def test_causality_frames_and_actions(with_actions, t):
    apply, variables = with_actions
    codes, actions, mask = _inputs()
    base = apply(variables, codes, _controls(actions, mask))
    codes2, actions2, _ = _inputs(seed=7)
    # Replace everything after time t with other frames and actions.
    codes_p = codes.at[:, t + 1 :].set(codes2[:, t + 1 :])
    actions_p = actions.at[:, t + 1 :].set((actions[:, t + 1 :] + 1) % CFG.dynamics.num_actions)
    out = apply(variables, codes_p, _controls(actions_p, mask))
    np.testing.assert_array_equal(out[:, : t + 1], base[:, : t + 1])
    assert np.all(np.abs(np.asarray(out[:, t + 1 :] - base[:, t + 1 :])).max(axis=(2, 3)) > 1e-4)


def test_actions_change_the_prediction(with_actions):
    apply, variables = with_actions
    codes, actions, mask = _inputs()
    base = apply(variables, codes, _controls(actions, mask))
    other = apply(variables, codes, _controls(actions.at[:, 2].set((actions[:, 2] + 1) % 5), mask))
    np.testing.assert_array_equal(other[:, :2], base[:, :2])
    assert np.abs(np.asarray(other[:, 2:] - base[:, 2:])).max() > 1e-4


def test_action_mask_hides_the_action(with_actions):
    apply, variables = with_actions
    codes, actions, mask = _inputs()
    mask = mask.at[:, 2].set(False)
    base = apply(variables, codes, _controls(actions, mask))
    other = apply(variables, codes, _controls(actions.at[:, 2].set((actions[:, 2] + 1) % 5), mask))
    np.testing.assert_array_equal(other, base)
    unmasked = apply(variables, codes, _controls(actions, jnp.ones_like(mask)))
    assert np.abs(np.asarray(unmasked[:, 2:] - base[:, 2:])).max() > 1e-4


def test_use_actions_false_ignores_actions(with_actions):
    model = _model(use_actions=False)
    codes, actions, mask = _inputs()
    shapes = jax.eval_shape(model.init, jax.random.key(1), codes, _controls(actions, mask))
    assert "table" not in shapes["params"]["action_embed"]
    # The same weights minus the action table (saves a second init compile).
    _, variables = with_actions
    params = dict(variables["params"], action_embed={"no_action": variables["params"]["action_embed"]["no_action"]})
    apply = jax.jit(model.apply)
    base = apply({"params": params}, codes, _controls(actions, mask))
    other = apply({"params": params}, codes, _controls((actions + 1) % 5, jnp.zeros_like(mask)))
    np.testing.assert_array_equal(other, base)


def test_params_carry_logical_axes(with_actions):
    _, variables = with_actions
    specs = nn.get_partition_spec(variables)
    leaves = jax.tree.leaves(specs, is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec))
    assert len(leaves) == len(jax.tree.leaves(nn.unbox(variables)))
    assert all(isinstance(s, jax.sharding.PartitionSpec) and any(s) for s in leaves)
    assert specs["params"]["logits"]["kernel"] == jax.sharding.PartitionSpec("embed", "vocab")


FACTORIZED = dataclasses.replace(CFG, dynamics=dataclasses.replace(CFG.dynamics, head="factorized"))


def test_factorized_head_shape_masks_missing_digits_and_stays_causal():
    model = DynamicsModel(FACTORIZED)
    codes, actions, mask = _inputs()
    variables = jax.jit(model.init)(jax.random.key(1), codes, _controls(actions))
    logits = jax.jit(model.apply)(variables, codes, _controls(actions))
    assert logits_shape(FACTORIZED) == (L, 4) and logits.shape == (B, T, N, L, 4)
    # levels (4, 3, 3): the 4th slot exists only for the first dimension
    assert np.isfinite(logits[..., 0, :]).all() and np.isneginf(logits[..., 1:, 3]).all()
    codes2, _, _ = _inputs(seed=7)
    out = jax.jit(model.apply)(variables, codes.at[:, 3:].set(codes2[:, 3:]), _controls(actions))
    np.testing.assert_array_equal(out[:, :3], logits[:, :3])


@pytest.mark.parametrize("cfg", [CFG, FACTORIZED], ids=["joint", "factorized"])
def test_targets_predictions_and_loss_agree(cfg):
    codes, _, _ = _inputs()
    targets = code_targets(codes, cfg)
    width = logits_shape(cfg)[-1]
    perfect = jnp.where(jax.nn.one_hot(targets, width) > 0, 30.0, -30.0)  # confident and right
    np.testing.assert_array_equal(predict_codes(perfect, cfg), codes)
    loss, accuracy = token_loss(perfect, codes, cfg)
    assert float(accuracy) == 1.0 and float(loss) < 1e-6
    wrong = jnp.roll(perfect, 1, axis=-1)
    _, accuracy = token_loss(wrong, codes, cfg)
    assert float(accuracy) == 0.0


# --- conditioning: camera, cuts, identity bank, temporal window -------------------------

STEERED = dataclasses.replace(
    CFG, dynamics=dataclasses.replace(CFG.dynamics, use_camera=True, use_cuts=True, use_identity_bank=True)
)


def _steps(seed=0, cut_at=None):
    """Per-frame fields of T + 1 frames: actions, a panning camera, an optional cut."""
    rng = np.random.default_rng(seed)
    camera = np.zeros((B, T + 1, 7), np.float32)
    camera[..., :2] = np.cumsum(rng.integers(-2, 3, (B, T + 1, 2)), axis=1)
    camera[..., 3] = 1.0
    cut = np.zeros((B, T + 1), bool)
    if cut_at is not None:
        cut[:, cut_at] = True
    return {"action": rng.integers(0, 5, (B, T + 1)).astype(np.int32), "camera": camera, "cut": cut}


@pytest.fixture(scope="module")
def steered():
    model = DynamicsModel(STEERED)
    codes = _inputs()[0]
    reference = _inputs(seed=3)[0][:, 0]
    variables = jax.jit(model.init)(jax.random.key(2), codes, make_controls(_steps()), reference, jnp.ones(B, bool))
    return jax.jit(model.apply), variables, codes, reference


def _changed(a, b):
    """Per input position: does any logit differ? bool [T]."""
    return np.abs(np.asarray(a - b)).reshape(B, T, -1).max(axis=(0, 2)) > 1e-5


def test_make_controls_aligns_each_transition():
    steps = _steps(cut_at=3)
    c = make_controls(steps)
    assert c.action.shape == (B, T) and c.camera.shape == (B, T, 7)
    np.testing.assert_array_equal(c.action, steps["action"][:, :-1])
    # Every transition's position delta, the cut's included: there it is the new framing.
    np.testing.assert_allclose(c.camera[:, :, :3], steps["camera"][:, 1:, :3] - steps["camera"][:, :-1, :3])
    np.testing.assert_array_equal(c.next_cut[0], [False, False, True, False, False, False])
    np.testing.assert_array_equal(c.segment[0], [0, 0, 0, 1, 1, 1])  # frame 3 starts shot 1
    assert bool(c.camera_mask.all()) and bool(c.action_mask.all())
    without = make_controls({"action": steps["action"]})  # a dataset with no camera / cuts
    assert not bool(without.camera_mask.any()) and not bool(without.next_cut.any())
    assert not bool(without.segment.any())


def test_camera_changes_the_prediction_and_is_ignored_when_masked(steered):
    apply, variables, codes, reference = steered
    steps = _steps()
    moved = dict(steps, camera=steps["camera"].copy())
    moved["camera"][:, 3:, 0] += 5.0  # a different move from frame 2 to 3
    base = apply(variables, codes, make_controls(steps), reference)
    other = apply(variables, codes, make_controls(moved), reference)
    # Causal: the move into frame 3 changes predictions from position 2 on, not before.
    np.testing.assert_array_equal(_changed(base, other), [False, False, True, True, True, True])
    hidden = dict(steps, camera_valid=np.zeros((B, T + 1), bool))
    hidden_moved = dict(moved, camera_valid=hidden["camera_valid"])
    a = apply(variables, codes, make_controls(hidden), reference)
    np.testing.assert_array_equal(a, apply(variables, codes, make_controls(hidden_moved), reference))
    assert _changed(a, base).any()


def test_use_camera_false_ignores_the_camera():
    cfg = dataclasses.replace(STEERED, dynamics=dataclasses.replace(STEERED.dynamics, use_camera=False))
    model = DynamicsModel(cfg)
    codes, steps = _inputs()[0], _steps()
    moved = dict(steps, camera=steps["camera"] * 3)
    variables = jax.jit(model.init)(jax.random.key(2), codes, make_controls(steps))
    apply = jax.jit(model.apply)
    np.testing.assert_array_equal(
        apply(variables, codes, make_controls(steps)), apply(variables, codes, make_controls(moved))
    )


def test_a_cut_resets_scene_context_but_not_identities(steered):
    apply, variables, codes, reference = steered
    steps = _steps(cut_at=3)  # frames 3.. are a new shot
    base = apply(variables, codes, make_controls(steps), reference)
    # Other frames before the cut change nothing after it ...
    earlier = codes.at[:, :3].set(_inputs(seed=9)[0][:, :3])
    np.testing.assert_array_equal(
        _changed(base, apply(variables, earlier, make_controls(steps), reference)),
        [True, True, True, False, False, False],
    )
    # ... while the identity bank still steers every frame, after the cut included.
    other_ref = _inputs(seed=5)[0][:, 0]
    assert _changed(base, apply(variables, codes, make_controls(steps), other_ref)).all()
    # Without the cut, the past is visible again.
    uncut = apply(variables, earlier, make_controls(_steps()), reference)
    assert _changed(apply(variables, codes, make_controls(_steps()), reference), uncut)[3:].all()


def test_make_controls_gives_a_cut_its_framing():
    # One clip, 4 frames: a pan of +1 px in x, then a cut at frame 2 framed 10 px right
    # and 4 px up of the previous shot's last frame, then the new shot pans on.
    camera = np.zeros((1, 4, 7), np.float32)
    camera[0, :, :2] = [[0, 0], [1, 0], [11, -4], [12, -4]]
    camera[..., 3] = 1.0
    c = make_controls({"action": np.zeros((1, 4), np.int32), "camera": camera, "cut": np.array([[1, 0, 1, 0]], bool)})
    np.testing.assert_array_equal(c.next_cut[0], [False, True, False])
    np.testing.assert_allclose(c.camera[0, :, :3], [[1, 0, 0], [10, -4, 0], [1, 0, 0]])


@pytest.mark.parametrize("embed, shift", [(True, False), (False, True), (False, False)])
def test_a_cut_framing_steers_the_first_frame_of_its_shot_only(embed, shift):
    cfg = dataclasses.replace(
        STEERED, dynamics=dataclasses.replace(STEERED.dynamics, cut_framing=embed, cut_framing_shift=shift)
    )
    framing = embed or shift
    model = DynamicsModel(cfg)
    codes, steps = _inputs()[0], _steps(cut_at=3)  # position 2 predicts frame 3, the cut
    reframed = dict(steps, camera=steps["camera"].copy())
    reframed["camera"][:, 3:, :2] += [7.0, -3.0]  # the new shot framed elsewhere, the same pans
    variables = jax.jit(model.init)(jax.random.key(2), codes, make_controls(steps))
    apply = jax.jit(model.apply)
    changed = _changed(apply(variables, codes, make_controls(steps)), apply(variables, codes, make_controls(reframed)))
    # With the framing, the cut frame's prediction follows it, and nothing else does (later
    # positions see the new shot only); without, a cut carries no position.
    np.testing.assert_array_equal(changed, [False, False, framing, False, False, False])
    assert ("framing_embed" in variables["params"]) == embed and ("unseen_embed" in variables["params"]) == shift


@pytest.mark.parametrize("residual", [False, True])
def test_the_jump_a_shift_leaves_reaches_the_model_as_the_cuts_pan(residual):
    """With 4-px patches, jumps of 4 and 5 px both shift the tokens one patch; only with
    `cut_framing_residual` does the 1 px left over reach the model (as the cut step's pan)."""
    from wm_jax.models.dynamics import residual_jump

    np.testing.assert_allclose(
        residual_jump(jnp.array([[5.0, -6.0, 0.5], [4.0, 2.0, 0.0]]), 4),
        [[1, 2, 0.5], [0, 2, 0]],  # halves round to even, as in shift_tokens
    )
    dynamics = dataclasses.replace(STEERED.dynamics, cut_framing_shift=True, cut_framing_residual=residual)
    model = DynamicsModel(dataclasses.replace(STEERED, dynamics=dynamics))
    codes, steps = _inputs()[0], _steps(cut_at=3)
    jumps = []
    for jump in (4.0, 5.0):
        camera = steps["camera"].copy()
        camera[:, 3:, 0] += jump - (camera[:, 3, 0] - camera[:, 2, 0])[:, None]  # the cut's x jump, later pans kept
        jumps.append(dict(steps, camera=camera))
    variables = jax.jit(model.init)(jax.random.key(2), codes, make_controls(jumps[0]))
    apply = jax.jit(model.apply)
    changed = _changed(
        apply(variables, codes, make_controls(jumps[0])), apply(variables, codes, make_controls(jumps[1]))
    )
    np.testing.assert_array_equal(changed, [False, False, residual, False, False, False])


def test_shift_tokens_moves_the_view_with_the_camera():
    from wm_jax.models.dynamics import shift_tokens

    x = jnp.arange(16.0).reshape(1, 1, 16, 1)  # a 4 x 4 grid of 4-px patches, row-major
    shifted, in_view = shift_tokens(x, jnp.array([[[4.0, -5.0]]]), grid=4, patch=4)  # 1 patch right, 1 up
    # What was at (row, col) is now at (row + 1, col - 1); the new top row and right column were unseen.
    np.testing.assert_array_equal(
        np.asarray(shifted)[0, 0, :, 0].reshape(4, 4)[1:, :3], [[1, 2, 3], [5, 6, 7], [9, 10, 11]]
    )
    np.testing.assert_array_equal(
        np.asarray(in_view)[0, 0].reshape(4, 4), [[0, 0, 0, 0], [1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 0]]
    )


def test_identity_bank_is_ignored_when_masked(steered):
    apply, variables, codes, reference = steered
    controls = make_controls(_steps())
    off = jnp.zeros(B, bool)
    a = apply(variables, codes, controls, reference, off)
    np.testing.assert_array_equal(a, apply(variables, codes, controls, _inputs(seed=5)[0][:, 0], off))
    np.testing.assert_array_equal(a, apply(variables, codes, controls))  # no reference at all
    assert _changed(a, apply(variables, codes, controls, reference)).all()


def test_temporal_window_limits_what_a_frame_sees(steered):
    cfg = dataclasses.replace(STEERED, dynamics=dataclasses.replace(STEERED.dynamics, temporal_window=2))
    apply, variables, codes, reference = steered
    controls = make_controls(_steps())
    windowed = jax.jit(DynamicsModel(cfg).apply)
    base = windowed(variables, codes, controls, reference)
    other = windowed(variables, codes.at[:, 1].set(_inputs(seed=9)[0][:, 1]), controls, reference)
    # Frame 1 reaches position 1 and, one frame back, position 2; further positions see it
    # only through position 2's tokens at deeper layers (1 layer here: not at all).
    np.testing.assert_array_equal(_changed(base, other), [False, True, True, False, False, False])


# --- MaskGIT objective ---------------------------------------------------------------

from wm_jax.models.dynamics import maskgit_schedule, maskgit_update, sample_maskgit_mask  # noqa: E402

MASKGIT = dataclasses.replace(STEERED, dynamics=dataclasses.replace(STEERED.dynamics, objective="maskgit"))
# Tokens 0 and 1 of frame t+1 masked at every position, 2 and 3 known.
HALF = jnp.broadcast_to(jnp.arange(N) < 2, (B, T, N))


def _clip(seed=0):
    """Codes of T + 1 frames: (inputs [B,T,N,L], next frames [B,T,N,L])."""
    idx = jax.random.randint(jax.random.key(seed), (B, T + 1, N), 0, V)
    codes = tk.indices_to_codes(idx, CFG.tokenizer.fsq_levels)
    return codes[:, :-1], codes[:, 1:]


@pytest.fixture(scope="module")
def maskgit():
    model = DynamicsModel(MASKGIT)
    codes, nxt = _clip()
    reference = _inputs(seed=3)[0][:, 0]
    variables = jax.jit(model.init)(jax.random.key(2), codes, make_controls(_steps()), reference, jnp.ones(B, bool))
    apply = jax.jit(lambda v, c, n, m, steps, ref: model.apply(v, c, make_controls(steps), ref, None, None, n, m))
    return apply, variables, codes, nxt, reference


@pytest.mark.parametrize("head", ["joint", "factorized"])
def test_maskgit_logits_shape_and_params(head):
    cfg = dataclasses.replace(MASKGIT, dynamics=dataclasses.replace(MASKGIT.dynamics, head=head))
    model = DynamicsModel(cfg)
    codes, nxt = _clip()
    controls = make_controls(_steps())
    params = jax.eval_shape(model.init, jax.random.key(0), codes, controls)["params"]
    assert {"next_embed", "mask_embed"} <= set(params)
    assert "mask_embed" not in jax.eval_shape(DynamicsModel(STEERED).init, jax.random.key(0), codes, controls)["params"]
    logits = jax.eval_shape(lambda p: model.apply(p, codes, controls, None, None, None, nxt, HALF), {"params": params})
    assert logits.shape == (B, T, N) + logits_shape(cfg) and logits.dtype == jnp.float32


def test_maskgit_masked_tokens_do_not_leak(maskgit):
    apply, variables, codes, nxt, reference = maskgit
    base = apply(variables, codes, nxt, HALF, _steps(), reference)
    other = jnp.where(HALF[..., None], _clip(seed=4)[1], nxt)  # other tokens where masked
    assert (np.asarray(other) != np.asarray(nxt)).any()
    np.testing.assert_array_equal(apply(variables, codes, other, HALF, _steps(), reference), base)


def test_maskgit_known_tokens_inform_their_own_position_only(maskgit):
    apply, variables, codes, nxt, reference = maskgit
    base = apply(variables, codes, nxt, HALF, _steps(), reference)
    # Another known token of frame 3 at position 2 changes position 2's prediction ...
    other = nxt.at[:, 2, 3].set(_clip(seed=4)[1][:, 2, 3])
    assert (np.asarray(other) != np.asarray(nxt)).any()
    np.testing.assert_array_equal(
        _changed(base, apply(variables, codes, other, HALF, _steps(), reference)),
        [False, False, True, False, False, False],
    )
    # ... and so does revealing one more token; no other position sees either (the past
    # is the context stream, whose next frame is always all masked).
    revealed = HALF.at[:, 2, 0].set(False)
    np.testing.assert_array_equal(
        _changed(base, apply(variables, codes, nxt, revealed, _steps(), reference)),
        [False, False, True, False, False, False],
    )
    # All masked is the context stream: the default without next codes.
    all_masked = apply(variables, codes, nxt, jnp.ones_like(HALF), _steps(), reference)
    np.testing.assert_array_equal(
        all_masked, apply(variables, codes, _clip(seed=4)[1], jnp.ones_like(HALF), _steps(), reference)
    )


@pytest.mark.parametrize("t", [0, 3])
def test_maskgit_causal_in_time(maskgit, t):
    apply, variables, codes, nxt, reference = maskgit
    base = apply(variables, codes, nxt, HALF, _steps(), reference)
    # Other frames after t + 1: inputs from position t + 2 on, next frames from t + 1 on.
    codes2, nxt2 = _clip(seed=7)
    codes_p, nxt_p = codes.at[:, t + 2 :].set(codes2[:, t + 2 :]), nxt.at[:, t + 1 :].set(nxt2[:, t + 1 :])
    changed = _changed(base, apply(variables, codes_p, nxt_p, HALF, _steps(), reference))
    np.testing.assert_array_equal(changed, np.arange(T) > t)


def test_maskgit_keeps_cuts_and_identity_bank(maskgit):
    apply, variables, codes, nxt, reference = maskgit
    steps = _steps(cut_at=3)
    base = apply(variables, codes, nxt, HALF, steps, reference)
    earlier = codes.at[:, :3].set(_inputs(seed=9)[0][:, :3])
    np.testing.assert_array_equal(
        _changed(base, apply(variables, earlier, nxt, HALF, steps, reference)), [True, True, True, False, False, False]
    )
    assert _changed(base, apply(variables, codes, nxt, HALF, steps, _inputs(seed=5)[0][:, 0])).all()


def test_maskgit_cosine_schedule():
    np.testing.assert_array_equal(maskgit_schedule(16, 3), [14, 8, 0])  # ceil(16 cos 30°), 16 cos 60°, 0
    np.testing.assert_array_equal(maskgit_schedule(7, 1), [0])
    for n, k in [(4, 8), (16, 8), (64, 12), (256, 25)]:
        s = maskgit_schedule(n, k)
        exact = n * np.cos(np.pi / 2 * np.arange(1, k + 1) / k)
        assert s.shape == (k,) and s[-1] == 0 and s[0] <= n and (np.diff(s) <= 0).all()
        assert (s[:-1] >= exact[:-1] - 1e-6).all() and (s[:-1] < exact[:-1] + 1).all()
    # Training masks: at least one token, the cosine schedule's share on average.
    mask = sample_maskgit_mask(jax.random.key(0), (64, 64, 16))
    counts = np.asarray(mask.sum(-1))
    assert counts.min() >= 1 and counts.max() <= 16
    expected = np.mean(np.ceil(16 * np.cos(np.pi / 2 * (1 - np.random.default_rng(0).random(100_000))))) / 16
    assert abs(float(mask.mean()) - expected) < 0.02
    assert (np.asarray(sample_maskgit_mask(jax.random.key(1), (64, 64, 16))) != np.asarray(mask)).any()


@pytest.mark.parametrize("cfg", [CFG, FACTORIZED], ids=["joint", "factorized"])
def test_maskgit_update_keeps_the_most_confident(cfg):
    codes = _inputs()[0][:, 0]  # [B, N, L]
    width = logits_shape(cfg)[-1]
    one_hot = jax.nn.one_hot(code_targets(codes, cfg), width) > 0
    scale = jnp.asarray([1.0, 4.0, 2.0, 3.0])  # confidence order of the tokens: 1, 3, 2, 0
    scale = scale.reshape((1, N) + (1,) * (one_hot.ndim - 2))
    logits = jnp.where(one_hot, scale, 0.0)
    masked = jnp.ones((B, N), bool)
    guess, masked = maskgit_update(logits, jnp.zeros_like(codes), masked, 2, cfg)
    np.testing.assert_array_equal(masked, np.broadcast_to([True, False, True, False], (B, N)))
    np.testing.assert_array_equal(guess[:, [1, 3]], codes[:, [1, 3]])
    # Decided tokens stay, however confident the next pass is about something else.
    flipped = jnp.where(one_hot, 0.0, 9.0)
    guess2, masked2 = maskgit_update(flipped, guess, masked, 1, cfg)
    np.testing.assert_array_equal(guess2[:, [1, 3]], codes[:, [1, 3]])
    assert int(masked2.sum()) == B and not bool((masked2 & ~masked).any())
    # Noise on the confidences reorders them.
    noise = jnp.asarray([[10.0, 0.0, 0.0, 0.0]] * B)
    _, noisy = maskgit_update(logits, jnp.zeros_like(codes), jnp.ones((B, N), bool), 2, cfg, noise)
    np.testing.assert_array_equal(noisy, np.broadcast_to([False, False, True, True], (B, N)))


def test_token_loss_over_masked_tokens_only():
    codes, _, _ = _inputs()
    perfect = jnp.where(jax.nn.one_hot(code_targets(codes, CFG), V) > 0, 30.0, -30.0)
    mask = jnp.broadcast_to(jnp.arange(N) < 2, (B, T, N))
    logits = jnp.where(mask[..., None], jnp.roll(perfect, 1, axis=-1), perfect)  # wrong where masked
    loss, accuracy = token_loss(logits, codes, CFG, mask)
    assert float(accuracy) == 0.0 and float(loss) > 10
    loss, accuracy = token_loss(logits, codes, CFG, ~mask)
    assert float(accuracy) == 1.0 and float(loss) < 1e-6


def test_token_loss_weights_each_token_and_leaves_the_accuracy_unweighted():
    codes, _, _ = _inputs()
    perfect = jnp.where(jax.nn.one_hot(code_targets(codes, CFG), V) > 0, 30.0, -30.0)
    wrong = jnp.broadcast_to(jnp.arange(N) == 0, (B, T, N))
    logits = jnp.where(wrong[..., None], jnp.roll(perfect, 1, axis=-1), perfect)
    per_token = optax.softmax_cross_entropy_with_integer_labels(logits, code_targets(codes, CFG))
    weights = jnp.where(wrong, 3.0, 1.0)
    loss, accuracy = token_loss(logits, codes, CFG, weights=weights)
    np.testing.assert_allclose(float(loss), float((weights * per_token).sum() / weights.sum()), rtol=1e-6)
    assert float(accuracy) == 1 - 1 / N
    # With a mask: the weighted mean over the masked tokens; weights of unmasked ones ignored.
    keep = jnp.broadcast_to(jnp.arange(N) < 2, (B, T, N))
    loss, accuracy = token_loss(logits, codes, CFG, keep, weights)
    np.testing.assert_allclose(float(loss), float(per_token[..., 0].mean() * 3 / 4), rtol=1e-6)
    assert float(accuracy) == 0.5
    np.testing.assert_allclose(
        float(token_loss(logits, codes, CFG, keep, jnp.ones((B, T, N)))[0]), float(per_token[..., :2].mean()), rtol=1e-6
    )


def test_motion_weights_follow_each_patchs_pixel_change():
    from wm_jax.models.dynamics import motion_weights

    frames = np.zeros((1, 3, 8, 8, 3), np.uint8)  # 2x2 patches of 4 px, row-major
    frames[0, 1, :4, :4] = 255  # t=1: top-left patch turns white
    frames[0, 1, :4, 4:6] = 255  # and half of the top-right one
    frames[0, 2] = frames[0, 1]  # t=2: nothing moves
    w = np.asarray(motion_weights(jnp.asarray(frames), 4, 2.0))
    assert w.shape == (1, 2, 4)
    change = np.array([[1.0, 0.5, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])  # per target patch
    np.testing.assert_allclose(w[0], 1 + 2.0 * change / change.mean(), rtol=1e-5)
    # A static clip weighs every token 1.
    np.testing.assert_allclose(np.asarray(motion_weights(jnp.asarray(frames[:, 1:]), 4, 2.0)), 1.0)


def test_motion_weight_weighs_the_loss_by_the_frames_change(with_actions):
    from wm_jax.models.dynamics import motion_weights
    from wm_jax.stages.dynamics import dynamics_loss

    _, variables = with_actions
    codes, actions, _ = _inputs()
    codes = jnp.concatenate([codes, codes[:, :1]], axis=1)  # T + 1 frames
    frames = jax.random.randint(jax.random.key(9), (B, T + 1, 8, 8, 3), 0, 256).astype(jnp.uint8)
    batch = {"action": jnp.pad(actions, ((0, 0), (0, 1))), "frame": frames}
    cfg = dataclasses.replace(CFG, dynamics=dataclasses.replace(CFG.dynamics, motion_weight=2.0))
    logits = DynamicsModel(cfg).apply(variables, codes[:, :-1], make_controls(batch))
    expected, _ = token_loss(logits, codes[:, 1:], cfg, weights=motion_weights(frames, 4, 2.0))
    loss, _ = dynamics_loss(variables["params"], DynamicsModel(cfg), batch, codes)
    np.testing.assert_allclose(float(loss), float(expected), rtol=1e-6)
    plain, _ = dynamics_loss(variables["params"], _model(), batch, codes)
    assert float(loss) != float(plain)


@pytest.mark.parametrize(
    "objective, head, conditioning",
    [
        ("causal", "joint", "add"),
        ("maskgit", "factorized", "add"),
        ("causal", "joint", "adaln"),
        ("causal", "joint", "token"),
    ],
)
def test_both_objectives_train(objective, head, conditioning):
    """A procedural next-frame problem: each step the frame's tokens shift one place when
    the action is 1 and stay when it is 0. One compiled program: init + 120 Adam steps.
    The trained model reads its actions: shuffling them raises the loss (action_sensitivity)."""
    import optax

    from wm_jax.stages.dynamics import action_sensitivity, dynamics_loss

    cfg = dataclasses.replace(
        CFG,
        dynamics=dataclasses.replace(CFG.dynamics, objective=objective, head=head, action_conditioning=conditioning),
    )
    model, tx, frames = DynamicsModel(cfg), optax.adam(1e-2), 5

    def batch(key):
        k1, k2 = jax.random.split(key)
        actions = jax.random.randint(k2, (16, frames), 0, 2)
        idx = [jax.random.randint(k1, (16, N), 0, V)]
        for t in range(frames - 1):
            idx.append(jnp.where(actions[:, t, None] == 1, jnp.roll(idx[-1], 1, axis=1), idx[-1]))
        return {"action": actions}, tk.indices_to_codes(jnp.stack(idx, 1), cfg.tokenizer.fsq_levels)

    @jax.jit
    def run(key):
        steps, codes = batch(key)
        params = model.init(jax.random.key(1), codes[:, :-1], make_controls(steps))["params"]

        def step(carry, i):
            params, opt = carry
            steps, codes = batch(jax.random.fold_in(key, i))
            rng = jax.random.fold_in(jax.random.key(3), i)  # as make_train_step: from the step
            (loss, _), grads = jax.value_and_grad(dynamics_loss, has_aux=True)(
                params, model, steps, codes, (None, None), rng
            )
            updates, opt = tx.update(grads, opt, params)
            return (optax.apply_updates(params, updates), opt), loss

        (params, _), losses = jax.lax.scan(step, (params, tx.init(params)), jnp.arange(120))
        steps, codes = batch(jax.random.key(99))
        return losses, action_sensitivity(params, model, steps, codes, (None, None), jax.random.key(4))

    losses, sensitivity = run(jax.random.key(0))
    losses = np.asarray(losses)
    assert np.isfinite(losses).all()
    assert losses[-20:].mean() < 0.6 * losses[:5].mean(), losses
    assert float(sensitivity) > 0.1 * losses[-20:].mean(), (float(sensitivity), losses[-20:].mean())


def test_action_sensitivity_is_zero_for_a_model_without_actions(with_actions):
    from wm_jax.stages.dynamics import action_sensitivity

    codes, actions, _ = _inputs()
    blind = _model(use_actions=False)
    _, variables = with_actions
    params = dict(variables["params"], action_embed={"no_action": variables["params"]["action_embed"]["no_action"]})
    steps = {"action": jnp.pad(actions, ((0, 0), (0, 1)))}
    frames = jnp.concatenate([codes, codes[:, :1]], axis=1)
    assert float(action_sensitivity(params, blind, steps, frames)) == 0.0
    # The same weights with the action table: shuffled actions change the loss.
    assert float(action_sensitivity(variables["params"], _model(), steps, frames)) != 0.0


def test_the_first_frame_of_a_new_shot_is_left_out_of_the_loss(with_actions):
    from wm_jax.stages.dynamics import dynamics_loss

    _, variables = with_actions
    codes, actions, _ = _inputs()
    frames = jnp.concatenate([codes, codes[:, :1]], axis=1)  # T + 1 frames
    cut = jnp.zeros((B, T + 1), bool).at[:, 3].set(True)  # frame 3 opens a shot: position 2's target
    steps = {"action": jnp.pad(actions, ((0, 0), (0, 1))), "cut": cut}
    model = _model()
    logits = model.apply(variables, frames[:, :-1], make_controls(steps))
    kept = jnp.broadcast_to((jnp.arange(T) != 2)[None, :, None], (B, T, N))
    expected, _ = token_loss(logits, frames[:, 1:], CFG, kept)
    loss, _ = dynamics_loss(variables["params"], model, steps, frames)
    np.testing.assert_allclose(float(loss), float(expected), rtol=1e-6)
    unmasked = DynamicsModel(dataclasses.replace(CFG, dynamics=dataclasses.replace(CFG.dynamics, mask_cut_loss=False)))
    everything, _ = token_loss(logits, frames[:, 1:], CFG)
    np.testing.assert_allclose(
        float(dynamics_loss(variables["params"], unmasked, steps, frames)[0]), float(everything), rtol=1e-6
    )


def test_a_cut_with_a_framing_stays_in_the_loss():
    from wm_jax.stages.dynamics import dynamics_loss

    cfg = dataclasses.replace(STEERED, dynamics=dataclasses.replace(STEERED.dynamics, cut_framing=True))
    model, codes, steps = DynamicsModel(cfg), _inputs()[0], _steps(cut_at=3)
    frames = jnp.concatenate([codes, codes[:, :1]], axis=1)  # T + 1 frames
    variables = model.init(jax.random.key(2), codes, make_controls(steps))
    logits = model.apply(variables, frames[:, :-1], make_controls(steps))
    everything, _ = token_loss(logits, frames[:, 1:], cfg)
    np.testing.assert_allclose(
        float(dynamics_loss(variables["params"], model, steps, frames)[0]), float(everything), rtol=1e-6
    )
    # Where the camera is unknown the model is told no framing: the cut is left out again.
    blind = dict(steps, camera_valid=np.zeros((B, T + 1), bool))
    logits = model.apply(variables, frames[:, :-1], make_controls(blind))
    kept = jnp.broadcast_to((jnp.arange(T) != 2)[None, :, None], (B, T, N))
    np.testing.assert_allclose(
        float(dynamics_loss(variables["params"], model, blind, frames)[0]),
        float(token_loss(logits, frames[:, 1:], cfg, kept)[0]),
        rtol=1e-6,
    )


@pytest.mark.parametrize("conditioning", ["adaln", "token"])
def test_each_conditioning_mode_is_causal_and_reads_its_actions(conditioning, t=2):
    cfg = dataclasses.replace(CFG, dynamics=dataclasses.replace(CFG.dynamics, action_conditioning=conditioning))
    model = DynamicsModel(cfg)
    codes, actions, mask = _inputs()
    params = model.init(jax.random.key(1), codes, _controls(actions))["params"]
    # adaLN starts at zero (controls do nothing yet): move every parameter off its init.
    leaves, tree = jax.tree.flatten(params)
    params = jax.tree.unflatten(
        tree, [x + 0.1 * jax.random.normal(jax.random.key(i), x.shape) for i, x in enumerate(leaves)]
    )
    apply = jax.jit(lambda c, a: model.apply({"params": params}, c, _controls(a, mask)))
    base = apply(codes, actions)
    assert base.shape == (B, T, N, V)
    codes2, _, _ = _inputs(seed=7)
    out = apply(codes.at[:, t + 1 :].set(codes2[:, t + 1 :]), actions.at[:, t + 1 :].set((actions[:, t + 1 :] + 1) % 5))
    np.testing.assert_array_equal(out[:, : t + 1], base[:, : t + 1])
    assert np.all(np.abs(np.asarray(out[:, t + 1 :] - base[:, t + 1 :])).max(axis=(2, 3)) > 1e-4)
    # An action alone moves its own position's prediction.
    moved = apply(codes, actions.at[:, t].set((actions[:, t] + 1) % 5))
    assert np.abs(np.asarray(moved[:, t] - base[:, t])).max() > 1e-4


def test_scheduled_sampling_feeds_the_models_own_predictions_of_the_past_only(with_actions):
    from wm_jax.stages.dynamics import dynamics_loss, with_own_predictions

    _, variables = with_actions
    codes, actions, _ = _inputs()
    controls, params, model = _controls(actions), variables["params"], _model()

    def own(c, rate, key=jax.random.key(4)):
        ctrl = _controls(jnp.tile(actions, (c.shape[0] // B, 1)))
        return with_own_predictions(params, model, c, ctrl, (None, None), key, rate)

    np.testing.assert_array_equal(own(codes, 0.0), codes)
    # Rate 1: every frame after the first is the greedy prediction from the clean frames before it.
    predicted = predict_codes(model.apply(variables, codes, controls), CFG)
    replaced = own(codes, 1.0)
    np.testing.assert_array_equal(replaced[:, 0], codes[:, 0])
    np.testing.assert_array_equal(replaced[:, 1:], predicted[:, :-1])
    # Causal: a change to true frame k changes no input frame <= k (frame k's is predicted
    # from frames < k), so no position ever sees the frame it is scored on.
    for k in range(1, T):
        other = codes.at[:, k].set(-codes[:, k])
        np.testing.assert_array_equal(own(other, 1.0)[:, : k + 1], replaced[:, : k + 1])
    # A rate between: whole frames are replaced, per (clip, frame), about that often.
    half = own(jnp.tile(codes, (64, 1, 1, 1)), 0.5, jax.random.key(5))
    swapped = np.asarray(jnp.any(half != jnp.tile(codes, (64, 1, 1, 1)), axis=(2, 3)))[:, 1:]
    assert 0.35 < swapped.mean() < 0.55, swapped.mean()  # a prediction may equal the truth
    # In the loss: the targets stay clean, the inputs are the mixed frames, and it needs an rng.
    frames = jnp.concatenate([codes, codes[:, :1]], axis=1)  # T + 1 frames
    steps = {"action": jnp.pad(actions, ((0, 0), (0, 1)))}
    cfg = dataclasses.replace(CFG, dynamics=dataclasses.replace(CFG.dynamics, scheduled_sampling=0.5))
    sampled_model, rng = DynamicsModel(cfg), jax.random.key(3)
    with pytest.raises(ValueError, match="scheduled_sampling needs an rng"):
        dynamics_loss(params, sampled_model, steps, frames)
    inputs = with_own_predictions(
        params, sampled_model, frames[:, :-1], make_controls(steps), (None, None), jax.random.fold_in(rng, 3), 0.5
    )
    expected, _ = token_loss(sampled_model.apply(variables, inputs, make_controls(steps)), frames[:, 1:], cfg)
    loss, _ = dynamics_loss(params, sampled_model, steps, frames, rng=rng)
    np.testing.assert_allclose(float(loss), float(expected), rtol=1e-6)


def test_corrupt_codes_replaces_a_per_frame_share_with_valid_codes():
    from wm_jax.models.dynamics import corrupt_codes

    levels = CFG.tokenizer.fsq_levels
    codes = tk.indices_to_codes(jax.random.randint(jax.random.key(0), (64, 6, 32), 0, tk.vocab_size(CFG)), levels)
    np.testing.assert_array_equal(corrupt_codes(codes, jax.random.key(1), 0.0, levels), codes)
    noisy = corrupt_codes(codes, jax.random.key(1), 0.8, levels)
    # Every output token is a codebook entry, and the codes round-trip through indices.
    np.testing.assert_array_equal(tk.indices_to_codes(tk.codes_to_indices(noisy, levels), levels), noisy)
    changed = np.asarray(jnp.any(noisy != codes, axis=-1)).mean(axis=-1)  # [B, T] share per frame
    # The rate is drawn per frame from U(0, 0.8): mean 0.4, frames spread over the range.
    assert 0.35 < changed.mean() < 0.45, changed.mean()
    assert changed.min() < 0.1 and changed.max() > 0.65, (changed.min(), changed.max())


def test_context_corruption_noises_the_inputs_not_the_targets(with_actions):
    from wm_jax.models.dynamics import corrupt_codes
    from wm_jax.stages.dynamics import dynamics_loss

    _, variables = with_actions
    codes, actions, _ = _inputs()
    frames = jnp.concatenate([codes, codes[:, :1]], axis=1)  # T + 1 frames
    steps = {"action": jnp.pad(actions, ((0, 0), (0, 1)))}
    cfg = dataclasses.replace(CFG, dynamics=dataclasses.replace(CFG.dynamics, context_corruption=0.5))
    model, rng = DynamicsModel(cfg), jax.random.key(3)
    with pytest.raises(ValueError, match="context_corruption needs an rng"):
        dynamics_loss(variables["params"], model, steps, frames)
    context = corrupt_codes(frames[:, :-1], jax.random.fold_in(rng, 2), 0.5, CFG.tokenizer.fsq_levels)
    assert bool(jnp.any(context != frames[:, :-1]))
    expected, _ = token_loss(model.apply(variables, context, make_controls(steps)), frames[:, 1:], cfg)
    loss, _ = dynamics_loss(variables["params"], model, steps, frames, rng=rng)
    np.testing.assert_allclose(float(loss), float(expected), rtol=1e-6)
    clean, _ = dynamics_loss(variables["params"], _model(), steps, frames, rng=rng)
    assert float(loss) != float(clean)
