"""Evaluation metrics on inputs whose right answer is known (pure numpy, fast)."""

import numpy as np
import pytest

from data_pipelines.sources import procedural as P
from wm_jax.eval import metrics as M

S = 32


def _episode(episode_id: int = 0, frames: int = 64, size: int = S) -> dict[str, np.ndarray]:
    """Stacked fields of one procedural episode (seed 0): frame [T, S, S, 3], camera, boxes..."""
    records = P.generate_episode(0, episode_id, frames, size=size)
    keys = ("frame", "camera", "cut", "entity_boxes", "entity_visible")
    return {k: np.stack([r[k] for r in records]) for k in keys}


def _texture(seed: int = 0, size: int = S) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def _moved(img: np.ndarray, dx: int, dy: int) -> np.ndarray:
    """img with its content moved by (dx, dy) pixels (x right, y down), circularly."""
    return np.roll(img, (dy, dx), axis=(0, 1))


# ---------------------------------------------------------------------------- PSNR, SSIM


def test_identical_videos_cap_psnr_and_give_ssim_one():
    video = np.random.default_rng(0).integers(0, 256, (2, 3, 16, 16, 3), dtype=np.uint8)
    np.testing.assert_array_equal(M.psnr_per_horizon(video, video), np.full(3, 100.0))
    np.testing.assert_array_equal(M.ssim_per_horizon(video, video), np.ones(3))
    np.testing.assert_array_equal(M.ssim(video[0, 0], video[0, 0]), 1.0)


@pytest.mark.parametrize("size", [8, 16, 32])
def test_ssim_falls_monotonically_with_noise(size):
    clean = _episode(size=size, frames=1)["frame"][0]
    unit = np.random.default_rng(1).standard_normal(clean.shape)
    noisy = np.stack([np.clip(clean + s * unit, 0, 255).astype(np.uint8) for s in (0, 4, 16, 48, 96)])
    scores = M.ssim(np.broadcast_to(clean, noisy.shape), noisy)
    assert scores[0] == 1.0 and np.all(np.diff(scores) < 0), scores
    # per horizon: noise growing with the horizon step gives a falling curve
    per_h = M.ssim_per_horizon(np.broadcast_to(clean, (2,) + noisy.shape), np.stack([noisy, noisy]))
    np.testing.assert_allclose(per_h, scores)


def test_ssim_of_flat_frames_matches_the_closed_form():
    # No variance: SSIM is the luminance term (2 mu_a mu_b + C1) / (mu_a^2 + mu_b^2 + C1).
    a, b = np.full((2, 16, 16, 3), 51, np.uint8), np.full((2, 16, 16, 3), 153, np.uint8)
    c1 = (0.01 * 1.0) ** 2
    expected = (2 * 0.2 * 0.6 + c1) / (0.2**2 + 0.6**2 + c1)
    np.testing.assert_allclose(M.ssim(a, b), [expected, expected], rtol=1e-12)


def test_delta_psnr_at_a_horizon_and_averaged():
    true, rand = np.array([30.0, 28.0, 26.0, 24.0]), np.array([30.0, 27.0, 24.0, 21.0])
    assert M.delta_psnr(true, rand, horizon=4) == pytest.approx(3.0)
    assert M.delta_psnr(true, rand) == pytest.approx(1.5)
    per_clip = np.stack([true, true + 2.0])  # [B, H]: averaged over clips
    assert M.delta_psnr(per_clip, np.stack([rand, rand]), horizon=2) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="horizon 5"):
        M.delta_psnr(true, rand, horizon=5)


# ------------------------------------------------------------------------ camera following


@pytest.mark.parametrize("dx, dy", [(3, -2), (-5, 7), (0, 0), (8, -8)])
def test_estimate_shift_recovers_a_circular_shift_of_a_random_texture(dx, dy):
    img = _texture()
    np.testing.assert_array_equal(M.estimate_shift(img, _moved(img, dx, dy), subpixel=False), [dx, dy])
    np.testing.assert_allclose(M.estimate_shift(img, _moved(img, dx, dy)), [dx, dy], atol=0.1)


def test_estimate_shift_recovers_a_circular_shift_of_a_procedural_frame():
    frames = _episode(frames=8)["frame"]
    moved = np.stack([_moved(f, 3, -2) for f in frames])
    np.testing.assert_array_equal(M.estimate_shift(frames, moved, subpixel=False), np.tile([3, -2], (8, 1)))
    np.testing.assert_allclose(M.estimate_shift(frames, moved), np.tile([3, -2], (8, 1)), atol=0.1)


def test_estimate_shift_finds_sub_pixel_shifts():
    n = S
    k = np.fft.fftfreq(n)
    smooth = np.fft.fft2(np.random.default_rng(2).standard_normal((n, n))) * np.exp(-(k[:, None] ** 2 + k**2) / 0.045)

    def image(dx: float, dy: float) -> np.ndarray:  # band-limited, so a fractional shift is exact
        g = np.fft.ifft2(smooth * np.exp(-2j * np.pi * (k * dx + k[:, None] * dy))).real
        return np.repeat(np.clip(128 + 40 * g / g.std(), 0, 255).astype(np.uint8)[..., None], 3, axis=-1)

    for d in [(0.5, 0.0), (1.25, -0.75), (-0.3, 0.3)]:
        np.testing.assert_allclose(M.estimate_shift(image(0, 0), image(*d)), d, atol=0.15)


def test_camera_following_scores_a_rolled_sequence_perfectly_and_a_static_one_badly():
    frame = _episode(frames=1)["frame"][0]
    moves = np.array([[0, 0], [1, 0], [1, 1], [0, -2], [-1, 0], [2, 1], [-1, -1]])
    camera = np.cumsum(moves, axis=0)[None].astype(np.float32)  # [1, H, 2]
    panned = np.stack([_moved(frame, -x, -y) for x, y in camera[0].astype(int)])[None]  # content opposite
    good = M.camera_following(panned, camera)
    assert good["within_1px"] == 1.0 and good["mean_abs_error_px"] < 0.1 and good["num_pairs"] == 6
    static = M.camera_following(np.repeat(panned[:, :1], 7, axis=1), camera)
    assert static["within_1px"] == 0.0 and static["mean_abs_error_px"] >= 1.0
    # a cut skips the pair that crosses it, even when the camera jumps there
    jumped = camera.copy()
    jumped[0, 4:] += 9
    cut = np.zeros((1, 7), bool)
    cut[0, 4] = True
    skipped = M.camera_following(panned, jumped, cut)
    assert skipped["within_1px"] == 1.0 and skipped["num_pairs"] == 5


def test_camera_following_on_true_procedural_video_needs_the_entity_boxes():
    ep = _episode(frames=120)
    args = ep["frame"][None], ep["camera"][None, :, :2], ep["cut"][None]
    with_boxes = M.camera_following(*args, boxes=ep["entity_boxes"][None])
    assert with_boxes["within_1px"] > 0.9 and with_boxes["mean_abs_error_px"] < 0.5
    # Unmasked, the white agent that the camera follows outweighs the background.
    assert M.camera_following(*args)["within_1px"] < 0.5


# ------------------------------------------------------------- identity, object permanence


def test_crop_boxes_resamples_each_box_to_a_fixed_grid():
    frames = np.random.default_rng(4).integers(0, 256, (2, 3, 16, 16, 3), dtype=np.uint8)
    boxes = np.zeros((2, 3, 2, 4), np.float32)
    boxes[..., 0, :] = (3, 5, 11, 13)  # 8x8 px: the samples fall on pixel centres
    boxes[..., 1, :] = (0, 0, 16, 16)  # 16x16 px: the samples fall between 2x2 blocks
    crops = M.crop_boxes(frames, boxes, size=8)
    assert crops.shape == (2, 3, 2, 8, 8, 3)
    np.testing.assert_allclose(crops[..., 0, :, :, :], frames[..., 5:13, 3:11, :] / 255.0)
    blocks = frames.reshape(2, 3, 8, 2, 8, 2, 3).mean(axis=(3, 5)) / 255.0
    np.testing.assert_allclose(crops[..., 1, :, :, :], blocks)


def _tiles(offset: tuple[int, int], size: int = S) -> np.ndarray:
    """Procedural-style checker ground (8 px tiles) seen with the view's corner at `offset`."""
    y, x = np.indices((size, size))
    return P.BACKGROUND[((x + offset[0]) // 8 + (y + offset[1]) // 8) % 2].copy()


def _draw(frame: np.ndarray, looks: list[tuple], boxes: np.ndarray) -> np.ndarray:
    """Draws each look (colour, "disc"|"square") in its integer box (x0, y0, x1, y1)."""
    y, x = np.indices(frame.shape[:2]) + 0.5
    for (colour, shape), (x0, y0, x1, y1) in zip(looks, boxes):
        cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2
        inside = (np.abs(x - cx) <= r) & (np.abs(y - cy) <= r)
        if shape == "disc":
            inside = (x - cx) ** 2 + (y - cy) ** 2 <= r**2
        frame[inside] = colour
    return frame


LOOKS = [(P.ENTITY_COLOURS[i], shape) for i, shape in enumerate(["disc", "square", "disc"])]


def _shots(looks_after_cut: list[tuple]) -> dict[str, np.ndarray]:
    """A context frame, then 8 generated frames of 3 moving entities (`LOOKS`, non-overlapping
    boxes); the camera cuts to another place at generated step 4, after which the entities
    are drawn with `looks_after_cut`."""
    looks = LOOKS
    frames, boxes = [], []
    for t in range(-1, 8):
        offset, after = ((3 + t, 1), False) if t < 4 else ((21 - t, 13), True)
        bx = np.array([[2 + t, 4, 10 + t, 12], [18, 2 + t, 26, 10 + t], [22 - t, 20, 30 - t, 28]], float)
        frames.append(_draw(_tiles(offset), looks_after_cut if after else looks, bx))
        boxes.append(bx)
    frames, boxes = np.stack(frames)[None], np.stack(boxes)[None]
    cut = np.zeros((1, 8), bool)
    cut[0, 4] = True
    reference = M.crop_boxes(frames[:, 0], boxes[:, 0])  # [1, E, 8, 8, 3] from the context frame
    return dict(
        generated=frames[:, 1:],
        reference_crops=reference,
        boxes=boxes[:, 1:],
        visible=np.ones((1, 8, 3), bool),
        cut=cut,
    )


def test_identity_persistence_detects_identities_swapped_after_a_cut():
    looks = LOOKS
    correct = M.identity_persistence(**_shots(looks))
    swapped = M.identity_persistence(**_shots([looks[1], looks[0], looks[2]]))  # 0 and 1 exchanged
    assert correct["num_before"] == correct["num_after"] == 12
    assert correct["before_cut"] > 0.9 and correct["after_cut"] > 0.9
    assert correct["swap_margin"] > 0.3 and correct["swap_margin_after_cut"] > 0.3
    assert swapped["before_cut"] == pytest.approx(correct["before_cut"])
    assert swapped["after_cut"] < correct["after_cut"] - 0.3
    assert swapped["swap_margin_after_cut"] < 0 < correct["swap_margin_after_cut"]
    all_swapped = _shots([looks[1], looks[0], looks[2]])
    all_swapped["cut"][:] = [[True] + [False] * 7]  # the whole generated clip is a new shot
    assert M.identity_persistence(**all_swapped)["swap_margin"] < 0


def test_identity_persistence_skips_entities_without_a_reference():
    inputs = _shots(LOOKS)
    inputs["reference_crops"][:, 2] = np.nan
    result = M.identity_persistence(**inputs)
    assert result["num_before"] == result["num_after"] == 8 and np.isfinite(result["swap_margin"])


def test_reappearances_count_only_a_return_from_occlusion():
    # one clip, steps 0..5; entity 0: seen, hidden, back; 1: seen, off-screen, back;
    # 2: hidden from the start, then visible (never seen before)
    visible = np.array([[1, 1, 0], [0, 0, 0], [1, 1, 1], [1, 1, 1], [0, 1, 1], [1, 1, 1]], bool)[None]
    hidden = np.array([[0, 0, 1], [1, 0, 1], [0, 0, 0], [0, 0, 0], [0, 0, 0], [0, 0, 0]], bool)[None]
    expected = np.zeros_like(visible)
    expected[0, 2:4, 0] = True  # until it leaves the view at step 4
    np.testing.assert_array_equal(M.reappearances(visible, hidden), expected)


def _find_reappearance() -> dict[str, np.ndarray]:
    """The first procedural episode (S=32, 64 steps) where an entity comes out from behind the occluder."""
    for episode_id in range(30):
        ep = _episode(episode_id)
        hidden = M.on_screen(ep["entity_boxes"], S, S) & ~ep["entity_visible"]
        if M.reappearances(ep["entity_visible"][None], hidden[None]).any():
            return ep
    raise AssertionError("no procedural episode with a reappearance")


def test_object_permanence_scores_a_vanished_object_worse():
    ep = _find_reappearance()
    truth, boxes, visible = ep["frame"][None], ep["entity_boxes"][None], ep["entity_visible"][None]
    back = M.reappearances(visible, M.on_screen(boxes, S, S) & ~visible)
    vanished = truth.copy()
    for b, t, e in zip(*np.nonzero(back)):  # paint the entity over with the frame's mean ground colour
        vanished[b, t] = M.fill_boxes(vanished[b, t], boxes[b, t, e : e + 1])
    intact = M.object_permanence(truth, truth, boxes, visible)
    gone = M.object_permanence(vanished, truth, boxes, visible)
    assert intact["num_reappearances"] == gone["num_reappearances"] == back.sum() > 0
    assert intact["reappear_psnr"] == 100.0 and intact["reappear_similarity"] == pytest.approx(1.0)
    assert gone["reappear_psnr"] < 25.0 and gone["reappear_similarity"] < 0.9
    late = M.object_permanence(truth, truth, boxes, visible, start=truth.shape[1])
    assert late["num_reappearances"] == 0 and np.isnan(late["reappear_psnr"])


# ------------------------------------------------------------------------ action following


def _agent_video(positions: np.ndarray, size: int = S) -> np.ndarray:
    """uint8 [B, T, S, S, 3]: dark noise with a 5x5 white square whose top-left is each (x, y)."""
    video = np.random.default_rng(3).integers(0, 150, positions.shape[:2] + (size, size, 3), dtype=np.uint8)
    for idx in np.ndindex(positions.shape[:2]):
        x, y = positions[idx]
        video[idx][y : y + 5, x : x + 5] = P.AGENT_COLOUR
    return video


def test_agent_position_finds_the_centre_of_a_white_square():
    video = _agent_video(np.array([[[20, 10], [3, 25]]]))
    np.testing.assert_array_equal(M.agent_position(video), [[[22.5, 12.5], [5.5, 27.5]]])
    assert np.isnan(M.agent_position(np.zeros((S, S, 3), np.uint8))).all()


def test_agent_position_is_the_agent_box_centre_on_procedural_frames():
    ep = _episode(frames=40)
    box = ep["entity_boxes"][:, 0]
    in_view = (box[:, :2] >= 0).all(axis=1) & (box[:, 2:] <= S).all(axis=1)
    assert in_view.sum() > 20
    np.testing.assert_allclose(
        M.agent_position(ep["frame"][in_view]), (box[in_view, :2] + box[in_view, 2:]) / 2, atol=1e-4
    )


def test_action_following_is_zero_for_identical_videos_and_grows_with_displacement():
    path = np.array([[[4 + 2 * t, 10 + t] for t in range(6)]])  # [B=1, T=6, 2]
    truth = _agent_video(path)
    same = M.action_following(truth, truth)
    assert same == {
        "mean_distance_px": 0.0,
        "within_1.5px": 1.0,
        "agent_found": 1.0,
        "num_steps": 6,
        "mean_distance_px_per_step": [0.0] * 6,
        "within_1.5px_per_step": [1.0] * 6,
    }
    distances = []
    for d in (1, 2, 4):
        off = M.action_following(_agent_video(path + [d, 0]), truth)
        assert off["mean_distance_px"] == pytest.approx(d)
        assert off["within_1.5px"] == (1.0 if d < 1.5 else 0.0)
        distances.append(off["mean_distance_px"])
    assert distances == sorted(distances)
    lost = truth.copy()
    lost[0, :3] = 0  # no agent in the first half: those steps are misses
    partial = M.action_following(lost, truth)
    assert partial["agent_found"] == 0.5 and partial["within_1.5px"] == 0.5 and partial["mean_distance_px"] == 0.0
    assert partial["within_1.5px_per_step"] == [0.0] * 3 + [1.0] * 3
    assert np.isnan(partial["mean_distance_px_per_step"][:3]).all()  # no agent: no distance
    drifting = M.action_following(_agent_video(path + np.array([[[t, 0] for t in range(6)]])), truth)
    assert drifting["mean_distance_px_per_step"] == pytest.approx(list(range(6)))
    assert drifting["within_1.5px_per_step"] == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]


# ------------------------------------------------------------------------------- errors

V = np.zeros((2, 4, 16, 16, 3), np.uint8)
W = np.zeros((2, 3, 16, 16, 3), np.uint8)
BOXES = np.zeros((2, 4, 3, 4), np.float32)
VIS = np.ones((2, 4, 3), bool)


@pytest.mark.parametrize(
    "call, first, second",
    [
        (lambda: M.psnr_per_horizon(V, W), V.shape, W.shape),
        (lambda: M.ssim(V, W), V.shape, W.shape),
        (lambda: M.ssim_per_horizon(V, W), V.shape, W.shape),
        (lambda: M.delta_psnr(np.zeros(4), np.zeros(3)), (4,), (3,)),
        (lambda: M.estimate_shift(V[0, 0], W[0, 0, :8]), (16, 16, 3), (8, 16, 3)),
        (lambda: M.camera_following(V, np.zeros((2, 3, 2))), (2, 3, 2), V.shape),
        (lambda: M.crop_boxes(V, BOXES[:, :3]), V.shape, (2, 3, 3, 4)),
        (
            lambda: M.identity_persistence(V, np.zeros((2, 3, 8, 8, 3)), BOXES, VIS[:, :3], np.zeros((2, 4), bool)),
            (2, 3, 3),
            V.shape,
        ),
        (lambda: M.object_permanence(V, W, BOXES, VIS), W.shape, V.shape),
        (lambda: M.action_following(V, W), W.shape, V.shape),
    ],
)
def test_shape_mismatches_raise_value_errors_naming_both_shapes(call, first, second):
    with pytest.raises(ValueError) as err:
        call()
    assert str(first) in str(err.value) and str(second) in str(err.value), err.value


def test_videos_must_be_five_dimensional():
    with pytest.raises(ValueError, match=r"\[B, T, H, W, C\]"):
        M.ssim_per_horizon(V[0], V[0])


# ------------------------------------------------------------------------ counterfactual


def test_counterfactual_following_scores_the_model_against_both_truths():
    rng = np.random.default_rng(0)
    factual = rng.integers(0, 256, (3, 2, 16, 16, 3), dtype=np.uint8)
    counterfactual = factual.copy()
    counterfactual[:2, 1, :4] = 255 - counterfactual[:2, 1, :4]  # clip 2: the actions changed nothing
    copy_last = np.repeat(factual[:, :1], 2, axis=1)
    r = M.counterfactual_following(counterfactual, counterfactual, factual, copy_last)  # a perfect model
    assert r["horizon"] == [1, 2] and r["counterfactual_truth_differs_fraction"] == pytest.approx(2 / 3)
    assert r["psnr_vs_counterfactual_truth"] == [100.0, 100.0] and r["ssim_vs_counterfactual_truth"] == [1.0, 1.0]
    assert r["psnr_vs_factual_truth"][0] == 100.0 and r["psnr_vs_factual_truth"][1] < 100.0
    assert r["copy_last_psnr_vs_counterfactual_truth"][0] == 100.0
    with pytest.raises(ValueError, match="shape mismatch"):
        M.counterfactual_following(counterfactual, counterfactual[:, :1], factual, copy_last)


def test_counterfactual_following_scalars_and_baselines_on_agent_videos():
    """Context ends with the agent at (10, 10); the recorded actions move it right, the
    counterfactual ones down, 2 px a step. A model that follows the actions it was given
    is the counterfactual truth itself; one that ignores them shows the factual frames."""
    steps = np.arange(1, 4)[None, :, None]  # horizons 1..3, two clips
    start = np.full((2, 1, 2), 10)
    factual = _agent_video(start + steps * [2, 0])
    counterfactual = _agent_video(start + steps * [0, 2])
    copy_last = np.repeat(_agent_video(start), 3, axis=1)
    cut = np.array([[False, False, True], [False, False, False]])  # clip 0 is reframed at step 3
    agent_steps = M.before_first_cut(cut)
    r = M.counterfactual_following(counterfactual, counterfactual, factual, copy_last, agent_steps)
    assert r["psnr_vs_counterfactual"] == 100.0 and r["psnr_vs_factual"] < 100.0
    assert r["margin_db"] == pytest.approx(r["psnr_vs_counterfactual"] - r["psnr_vs_factual"]) and r["margin_db"] > 0
    assert r["agent_within_1.5px"] == 1.0 and r["num_agent_steps"] == 5
    assert r["agent_within_1.5px_per_step"] == [1.0, 1.0, 1.0]
    assert r["copy_last"]["agent_within_1.5px"] == 0.0 and r["action_blind"]["agent_within_1.5px"] == 0.0
    assert r["copy_last"]["psnr_vs_counterfactual"] == pytest.approx(M.psnr(counterfactual, copy_last).mean())
    assert r["action_blind"]["psnr_vs_counterfactual"] == pytest.approx(M.psnr(counterfactual, factual).mean())
    assert r["copy_last"]["psnr_vs_counterfactual"] == pytest.approx(
        np.mean(r["copy_last_psnr_vs_counterfactual_truth"])
    )
    blind = M.counterfactual_following(factual, counterfactual, factual, copy_last, agent_steps)  # ignores the actions
    assert blind["margin_db"] < 0 and blind["agent_within_1.5px"] == 0.0
    assert "agent_within_1.5px" not in M.counterfactual_following(factual, counterfactual, factual, copy_last)


def test_before_first_cut_and_masked_action_following():
    cut = np.array([[False, True, False], [False, False, False], [True, False, False]])
    np.testing.assert_array_equal(M.before_first_cut(cut), [[1, 0, 0], [1, 1, 1], [0, 0, 0]])
    path = np.array([[[4 + 2 * t, 10] for t in range(3)]])
    truth, off = _agent_video(path), _agent_video(path + [0, 3])
    off[0, 0] = truth[0, 0]  # only the first step is right
    scored = M.action_following(off, truth, mask=np.array([[True, False, False]]))
    assert scored["within_1.5px"] == 1.0 and scored["num_steps"] == 1
    assert M.action_following(off, truth)["within_1.5px"] == pytest.approx(1 / 3)


def test_delta_psnr_summary_at_t4_and_before_a_cut():
    true = np.array([[30.0, 28.0, 26.0, 24.0, 22.0], [30.0, 29.0, 28.0, 27.0, 26.0]])
    rand = np.array([[30.0, 27.0, 24.0, 21.0, 20.0], [30.0, 29.0, 28.0, 26.0, 26.0]])
    cut = np.zeros((2, 5), bool)
    cut[1, 2] = True  # clip 1: a cut among the first 4 generated frames
    r = M.delta_psnr_summary(true, rand, cut)
    assert r["delta_psnr_t4"] == pytest.approx(2.0)  # (3 + 1) / 2
    assert r["delta_psnr_per_horizon"] == pytest.approx([0.0, 0.5, 1.0, 2.0, 1.0])
    assert r["delta_psnr_t4_before_cut"] == pytest.approx(3.0) and r["num_clips_before_cut"] == 1
    cut[1, 2], cut[1, 4] = False, True  # a cut after t=4 does not count
    assert M.delta_psnr_summary(true, rand, cut)["num_clips_before_cut"] == 2
    short = M.delta_psnr_summary(true[:, :3], rand[:, :3])  # horizon 3 < 4: nothing to measure
    assert np.isnan(short["delta_psnr_t4"]) and "delta_psnr_t4_before_cut" not in short
