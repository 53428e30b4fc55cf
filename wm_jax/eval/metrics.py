"""Evaluation metrics: pure functions of arrays (numpy), no I/O.

Frames are uint8 [..., H, W, C] on 0..255 and are compared on the [0, 1] scale unless
stated otherwise. Videos are [B, T, H, W, C] (clips, steps). Pixel coordinates follow
`data_pipelines.sources.procedural`: x to the right, y down, pixel (row i, column j)
covers [j, j+1) x [i, i+1), so its centre is (j + 0.5, i + 0.5); boxes are float
(x0, y0, x1, y1) in these coordinates, like the records' `entity_boxes`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from wm_jax.imaging import psnr  # the shared definition, also offered as metrics.psnr

# Wang, Bovik, Sheikh & Simoncelli 2004, "Image quality assessment: from error visibility
# to structural similarity", section III-C.
SSIM_WINDOW, SSIM_SIGMA, SSIM_K1, SSIM_K2 = 11, 1.5, 0.01, 0.03

AGENT_MIN_VALUE = 200  # procedural agent is (250, 250, 250); no entity has all channels >= 200
AGENT_TOLERANCE_PX = 1.5  # below the agent's step (2 px at S=32): ignoring an action misses
GENIE_HORIZON = 4  # Genie reports ΔtPSNR at t = 4 frames after the context


def _check_same_shape(a: np.ndarray, b: np.ndarray, names: tuple[str, str]) -> None:
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: {names[0]} {a.shape} vs {names[1]} {b.shape}")


def _check_video(x: np.ndarray, name: str) -> None:
    if x.ndim != 5:
        raise ValueError(f"{name} must be a video [B, T, H, W, C], got shape {x.shape}")


def _check_lead(x: np.ndarray, name: str, expected: tuple[int, ...], video: np.ndarray) -> None:
    """Raises unless x.shape == expected, naming the video shape it should match."""
    if x.shape != expected:
        raise ValueError(f"shape mismatch: {name} {x.shape} vs video {video.shape} (expected {name} {expected})")


def _masked_mean(x: np.ndarray, mask: np.ndarray) -> float:
    """Mean of x where mask holds; NaN when nothing is selected."""
    return float(x[mask].mean()) if mask.any() else float("nan")


# ---------------------------------------------------------------------------- PSNR, SSIM


def psnr_per_horizon(truth: np.ndarray, generated: np.ndarray) -> np.ndarray:
    """Mean PSNR at each horizon step: uint8 [B, H, h, w, C] pairs -> float [H] (mean over B)."""
    if truth.shape != generated.shape:
        raise ValueError(f"shape mismatch: truth {truth.shape} vs generated {generated.shape}")
    return psnr(truth, generated).mean(axis=0)


def _gaussian_valid_matrix(n: int, size: int, sigma: float) -> np.ndarray:
    """[n - size + 1, n]: row i holds the normalised Gaussian window over pixels i..i+size-1,
    so `matrix @ x` is a 'valid' 1-D Gaussian filter along an axis of length n."""
    taps = np.exp(-0.5 * ((np.arange(size) - (size - 1) / 2) / sigma) ** 2)
    rows = n - size + 1
    m = np.zeros((rows, n))
    m[np.arange(rows)[:, None], np.arange(rows)[:, None] + np.arange(size)] = taps / taps.sum()
    return m


def ssim(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Structural similarity (SSIM) per image between uint8 frames [..., H, W, C] -> float64 [...].

    Wang et al. 2004 with their constants: frames scaled to [0, 1] (dynamic range L = 1),
    C1 = (0.01 L)^2, C2 = (0.03 L)^2, local statistics under a Gaussian window of sigma
    1.5 and side 11 (Gaussian-weighted means, variances and covariance, no Bessel
    correction). Each colour channel is treated as a grey image; the SSIM map
        (2 mu_a mu_b + C1)(2 cov_ab + C2) / ((mu_a^2 + mu_b^2 + C1)(var_a + var_b + C2))
    is averaged over all 'valid' window positions (windows entirely inside the frame, no
    padding) and over channels. Frames smaller than 11 px use the largest odd window that
    fits (a 16x16 frame gives a 6x6 map). Identical frames score exactly 1; range [-1, 1].
    """
    a, b = np.asarray(a), np.asarray(b)
    _check_same_shape(a, b, ("a", "b"))
    if a.ndim < 3:
        raise ValueError(f"ssim expects frames [..., H, W, C], got shape {a.shape}")
    h, w = a.shape[-3:-1]
    size = min(SSIM_WINDOW, h, w)
    size -= 1 - size % 2  # odd, so the window has a centre pixel
    mh = _gaussian_valid_matrix(h, size, SSIM_SIGMA)
    mw = _gaussian_valid_matrix(w, size, SSIM_SIGMA)

    def local_mean(x: np.ndarray) -> np.ndarray:  # separable filter: rows, then columns
        return np.einsum("jw,...iwc->...ijc", mw, np.einsum("ih,...hwc->...iwc", mh, x))

    x, y = a.astype(np.float64) / 255.0, b.astype(np.float64) / 255.0
    mx, my = local_mean(x), local_mean(y)
    var_x, var_y = local_mean(x * x) - mx * mx, local_mean(y * y) - my * my
    cov = local_mean(x * y) - mx * my
    c1, c2 = SSIM_K1**2, SSIM_K2**2
    s = (2 * mx * my + c1) * (2 * cov + c2) / ((mx * mx + my * my + c1) * (var_x + var_y + c2))
    return s.mean(axis=(-3, -2, -1))


def ssim_per_horizon(truth: np.ndarray, generated: np.ndarray) -> np.ndarray:
    """Mean SSIM at each horizon step: uint8 [B, H, h, w, C] pairs -> float64 [H] (mean over B)."""
    truth, generated = np.asarray(truth), np.asarray(generated)
    _check_same_shape(truth, generated, ("truth", "generated"))
    _check_video(truth, "truth")
    return ssim(truth, generated).mean(axis=0)


def delta_psnr(psnr_true_actions: np.ndarray, psnr_random_actions: np.ndarray, horizon: int | None = None) -> float:
    """Genie's controllability metric ΔtPSNR (Bruce et al. 2024), in dB.

    ΔtPSNR = PSNR(x_t, x̂_t) - PSNR(x_t, x̂'_t): x_t the true frame t steps after the
    context, x̂_t the rollout driven by the true actions, x̂'_t the rollout from the same
    context driven by random actions. Positive means the actions steer the model.
    Inputs are PSNRs [..., H] in dB over horizon steps 1..H (e.g. `psnr_per_horizon` [H]
    or per-clip `psnr` [B, H]), averaged over leading axes. `horizon` (1-based) gives Δ at
    that step (Genie reports t = 4); None gives the mean over all steps, which equals
    mean(true) - mean(random).
    """
    true, rand = np.asarray(psnr_true_actions, np.float64), np.asarray(psnr_random_actions, np.float64)
    _check_same_shape(true, rand, ("psnr_true_actions", "psnr_random_actions"))
    diff = true - rand
    if horizon is None:
        return float(diff.mean())
    if not 1 <= horizon <= diff.shape[-1]:
        raise ValueError(f"horizon {horizon} outside 1..{diff.shape[-1]}")
    return float(diff[..., horizon - 1].mean())


def before_first_cut(cut: np.ndarray) -> np.ndarray:
    """bool [B, H]: the steps of cut bool [B, H] (shot starts) before each clip's first
    cut. The cut step itself is excluded: a new shot's framing is not predictable."""
    return ~np.logical_or.accumulate(np.asarray(cut, bool), axis=1)


def delta_psnr_summary(
    psnr_true_actions: np.ndarray, psnr_random_actions: np.ndarray, cut: np.ndarray | None = None
) -> dict[str, float | list[float] | int]:
    """Genie's ΔtPSNR from per-clip PSNRs float [B, H] (dB, each rollout against the
    factual truth at horizon steps 1..H) of the true- and random-action rollouts.

    Returns {"delta_psnr_t4": `delta_psnr` at t = GENIE_HORIZON (NaN when H is shorter),
    "delta_psnr_per_horizon": [H]} and, given `cut` bool [B, H] (shot starts among the
    generated frames), "delta_psnr_t4_before_cut": the same over the clips without a cut
    among the first GENIE_HORIZON generated frames (a cut reframes the view around the
    agent: where it will be is then unknowable, whatever the actions), with their count
    "num_clips_before_cut".
    """
    true, rand = np.asarray(psnr_true_actions, np.float64), np.asarray(psnr_random_actions, np.float64)
    _check_same_shape(true, rand, ("psnr_true_actions", "psnr_random_actions"))
    steps = true.shape[-1]

    def at_t4(keep: np.ndarray) -> float:  # over the clips where keep bool [B] holds
        if steps < GENIE_HORIZON or not keep.any():
            return float("nan")
        return delta_psnr(true[keep], rand[keep], GENIE_HORIZON)

    out = {
        "delta_psnr_t4": at_t4(np.ones(true.shape[0], bool)),
        "delta_psnr_per_horizon": [delta_psnr(true, rand, h) for h in range(1, steps + 1)],
    }
    if cut is not None:
        cut = np.asarray(cut, bool)
        _check_same_shape(true, cut, ("psnr_true_actions", "cut"))
        keep = ~cut[:, :GENIE_HORIZON].any(axis=1)
        out.update(delta_psnr_t4_before_cut=at_t4(keep), num_clips_before_cut=int(keep.sum()))
    return out


# ------------------------------------------------------------------------ camera following


def _grey(frames: np.ndarray) -> np.ndarray:
    """uint8 [..., H, W, C] -> float64 [..., H, W] on [0, 1], the mean of the channels."""
    return np.asarray(frames, np.float64).mean(axis=-1) / 255.0


def _wrap(index: np.ndarray, n: int) -> np.ndarray:
    """FFT bin index 0..n-1 -> signed displacement in [-n/2, n/2)."""
    return (index + n // 2) % n - n // 2


def _peak_offset(peak: np.ndarray, before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """Sub-pixel position of a phase-correlation peak relative to its sample, in [-0.5, 0.5].

    Foroosh, Zerubia & Berthod 2002: the peak of a pure translation by d is a sampled sinc,
    and with its larger neighbour r1 the offset is r1 / (r1 + r0), exactly."""
    side = np.where(after >= before, 1.0, -1.0)
    nb = np.maximum(before, after)
    return side * np.where(nb > 0, nb / np.maximum(nb + peak, 1e-12), 0.0)


def estimate_shift(prev: np.ndarray, next: np.ndarray, subpixel: bool = True) -> np.ndarray:  # noqa: A002
    """Image translation from `prev` to `next` by phase correlation -> float64 [..., 2] (dx, dy).

    Frames are uint8 [..., H, W, C] (any matching leading axes; each pair is independent).
    Sign convention: the content moved by (dx, dy) pixels, x right and y down, i.e.
    next[y, x] ≈ prev[y - dy, x - dx]; `np.roll(img, (dy, dx), axis=(0, 1))` gives exactly
    (dx, dy). Method: grey = channel mean, minus its mean, times a 2-D Hann window (so
    content entering at the borders does not dominate); the normalised cross-power spectrum
    F(next) conj(F(prev)) / |...| is inverted and its highest peak is the integer shift,
    in [-W/2, W/2) x [-H/2, H/2). With `subpixel`, each axis is refined from the peak's
    neighbours (Foroosh et al. 2002). Featureless frames give (0, 0). Reliable for shifts
    up to about a quarter of the frame side: the window fades what lies near the borders,
    so larger moves leave too little content in common.
    """
    p, n = np.asarray(prev), np.asarray(next)
    _check_same_shape(p, n, ("prev", "next"))
    if p.ndim < 3:
        raise ValueError(f"estimate_shift expects frames [..., H, W, C], got shape {p.shape}")
    h, w = p.shape[-3:-1]
    window = np.outer(np.hanning(h), np.hanning(w))

    def spectrum(frames: np.ndarray) -> np.ndarray:
        g = _grey(frames)
        return np.fft.fft2((g - g.mean(axis=(-2, -1), keepdims=True)) * window)

    cross = spectrum(n) * np.conj(spectrum(p))
    # The floor zeroes bins that only hold rounding noise (flat frames) instead of whitening them.
    corr = np.fft.ifft2(cross / np.maximum(np.abs(cross), 1e-9)).real
    flat = corr.reshape(*corr.shape[:-2], h * w)
    iy, ix = np.divmod(flat.argmax(axis=-1), w)
    shift = np.stack([_wrap(ix, w), _wrap(iy, h)], axis=-1).astype(np.float64)
    if subpixel:
        at = lambda y, x: np.take_along_axis(flat, ((y % h) * w + x % w)[..., None], axis=-1)[..., 0]
        peak = at(iy, ix)
        shift[..., 0] += _peak_offset(peak, at(iy, ix - 1), at(iy, ix + 1))
        shift[..., 1] += _peak_offset(peak, at(iy - 1, ix), at(iy + 1, ix))
    return shift


def box_mask(boxes: np.ndarray, height: int, width: int, grow: float = 1.0) -> np.ndarray:
    """bool [..., height, width]: pixels whose centre lies in any of the boxes float [..., E, 4]
    (x0, y0, x1, y1), each grown by `grow` px on every side (to cover anti-aliased or blurred edges)."""
    bx = np.asarray(boxes, np.float64)[..., None]  # [..., E, 4, 1]
    x, y = np.arange(width) + 0.5, np.arange(height) + 0.5
    in_x = (x >= bx[..., 0, :] - grow) & (x <= bx[..., 2, :] + grow)  # [..., E, W]
    in_y = (y >= bx[..., 1, :] - grow) & (y <= bx[..., 3, :] + grow)  # [..., E, H]
    return (in_y[..., :, None] & in_x[..., None, :]).any(axis=-3)


def fill_boxes(frames: np.ndarray, boxes: np.ndarray, grow: float = 1.0) -> np.ndarray:
    """Frames uint8 [..., H, W, C] with the pixels of `box_mask(boxes)` (boxes [..., E, 4]) set to
    the mean colour of the rest of the frame (uint8): removes objects that move on their own."""
    f = np.asarray(frames)
    mask = box_mask(boxes, f.shape[-3], f.shape[-2], grow)[..., None]  # [..., H, W, 1]
    rest = np.maximum((~mask).sum(axis=(-3, -2), keepdims=True), 1)
    mean = (f * ~mask).sum(axis=(-3, -2), keepdims=True) / rest
    return np.where(mask, np.round(mean), f).astype(f.dtype)


def camera_following(
    generated: np.ndarray, camera_xy: np.ndarray, cut: np.ndarray | None = None, boxes: np.ndarray | None = None
) -> dict[str, float]:
    """How well the generated view pans with the commanded camera.

    generated: uint8 [B, H, h, w, C]; camera_xy: float [B, H, 2], the camera position
    (x, y) in pixels at each generated frame (the records' `camera[..., :2]`; in the
    procedural world the view centre). A camera move by d makes the content move by -d,
    so for each consecutive pair the commanded shift is -(camera_xy[t+1] - camera_xy[t])
    and the estimated one is `estimate_shift(generated[t], generated[t+1])`. Pairs whose
    second frame starts a shot (`cut` bool [B, H], optional) are skipped: the camera jumps.
    `boxes` (float [B, H, E, 4], optional, the true `entity_boxes`) are filled before
    estimating (`fill_boxes`): objects that move on their own, above all an agent the camera
    follows, otherwise outweigh the background in the phase correlation (on true procedural
    video at S=32 about 15% of pairs agree without them, over 90% with them).
    Returns {"mean_abs_error_px": mean Euclidean distance between estimated and commanded
    shift (px), "within_1px": fraction of pairs with that distance below 1 px (a frozen
    video under a 1 px/step pan fails every pair), "num_pairs"}. NaN scores if no pair.
    """
    g, cam = np.asarray(generated), np.asarray(camera_xy, np.float64)
    _check_video(g, "generated")
    _check_lead(cam, "camera_xy", g.shape[:2] + (2,), g)
    if boxes is not None:
        boxes = np.asarray(boxes, np.float64)
        _check_lead(boxes, "boxes", g.shape[:2] + boxes.shape[2:3] + (4,), g)
        g = fill_boxes(g, boxes)
    commanded = -np.diff(cam, axis=1)  # [B, H-1, 2]
    error = np.linalg.norm(estimate_shift(g[:, :-1], g[:, 1:]) - commanded, axis=-1)
    keep = np.ones(error.shape, bool)
    if cut is not None:
        cut = np.asarray(cut, bool)
        _check_lead(cut, "cut", g.shape[:2], g)
        keep = ~cut[:, 1:]
    return {
        "mean_abs_error_px": _masked_mean(error, keep),
        "within_1px": _masked_mean(error < 1.0, keep),
        "num_pairs": int(keep.sum()),
    }


# ------------------------------------------------------------- identity, object permanence


def crop_boxes(frames: np.ndarray, boxes: np.ndarray, size: int = 8) -> np.ndarray:
    """Crops of each box resampled to size x size: -> float64 [..., E, size, size, C] on [0, 1].

    frames: uint8 [..., H, W, C]; boxes: float [..., E, 4] (x0, y0, x1, y1) in pixels, same
    leading axes. The crop samples the box on a size x size grid of cell centres with
    bilinear interpolation (so boxes of any size and sub-pixel position compare on one
    grid); samples outside the frame take the nearest edge pixel.
    """
    f, bx = np.asarray(frames, np.float64) / 255.0, np.asarray(boxes, np.float64)
    if f.ndim < 3 or bx.ndim != f.ndim - 1 or bx.shape[:-2] != f.shape[:-3] or bx.shape[-1] != 4:
        raise ValueError(
            f"shape mismatch: frames {f.shape} vs boxes {bx.shape} (expected boxes {f.shape[:-3]} + (E, 4))"
        )
    lead, (h, w, c), e = f.shape[:-3], f.shape[-3:], bx.shape[-2]
    f, bx = f.reshape(-1, h, w, c), bx.reshape(-1, e, 4)
    frac = (np.arange(size) + 0.5) / size
    xs = bx[..., 0:1] + frac * (bx[..., 2:3] - bx[..., 0:1])  # [N, E, size] sample x
    ys = bx[..., 1:2] + frac * (bx[..., 3:4] - bx[..., 1:2])

    def taps(u: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        u = u - 0.5  # pixel centres sit at index + 0.5
        i0 = np.floor(u)
        return np.clip(i0, 0, n - 1).astype(int), np.clip(i0 + 1, 0, n - 1).astype(int), u - i0

    x0, x1, tx = taps(xs, w)
    y0, y1, ty = taps(ys, h)
    img = np.arange(f.shape[0])[:, None, None, None]
    at = lambda yi, xi: f[img, yi[..., :, None], xi[..., None, :]]  # [N, E, size(y), size(x), C]
    tx, ty = tx[..., None, :, None], ty[..., :, None, None]
    top = at(y0, x0) * (1 - tx) + at(y0, x1) * tx
    bottom = at(y1, x0) * (1 - tx) + at(y1, x1) * tx
    return (top * (1 - ty) + bottom * ty).reshape(*lead, e, size, size, c)


def appearance_similarity(crop_a: np.ndarray, crop_b: np.ndarray) -> np.ndarray:
    """Appearance similarity of crops [..., s, s, C] on [0, 1] (from `crop_boxes`) -> float64 [...].

    Definition: the cosine similarity of the two crops' values over pixels x channels after
    subtracting mid-grey 0.5 from every value,
        sim = <a - 0.5, b - 0.5> / (|a - 0.5| |b - 0.5|)  in [-1, 1]  (0 for an all-grey crop).
    Why: raw pixel vectors are all positive, so their cosine is close to 1 for any pair (on
    procedural episodes the own-vs-best-other margin is ~0.08); centring each crop on its own
    mean (Pearson correlation) erases flat achromatic objects such as the white agent, whose
    crop is uniform. A fixed mid-grey centre keeps hue and brightness (distinct colours
    point in different directions: margin ~0.6, own > others in 96-99% of appearances at
    S=16 and 32), the pixel layout keeps the shape, and it degrades smoothly with blur
    (unlike hard colour-histogram bins). NaN in a crop propagates (marks "no crop").
    """
    a, b = np.asarray(crop_a, np.float64) - 0.5, np.asarray(crop_b, np.float64) - 0.5
    a, b = np.broadcast_arrays(a, b)
    if a.ndim < 3:
        raise ValueError(f"appearance_similarity expects crops [..., s, s, C], got {a.shape}")
    axes = (-3, -2, -1)
    norms = np.sqrt((a * a).sum(axis=axes) * (b * b).sum(axis=axes))
    grey = norms <= 1e-12  # False for NaN, so a missing crop stays NaN
    return np.where(grey, 0.0, (a * b).sum(axis=axes) / np.maximum(norms, 1e-12))


def identity_persistence(
    generated: np.ndarray, reference_crops: np.ndarray, boxes: np.ndarray, visible: np.ndarray, cut: np.ndarray
) -> dict[str, float]:
    """Do entities keep their look in generated video, in particular across shot cuts?

    generated: uint8 [B, T, h, w, C]; reference_crops: float [B, E, s, s, C], each entity's
    appearance from `crop_boxes` on a true frame before the generated ones (e.g. the last
    context frame where it is visible; all-NaN where an entity has none: it is skipped
    and is no competitor); boxes: float [B, T, E, 4] ground-truth boxes; visible: bool
    [B, T, E]; cut: bool [B, T] shot starts. At every visible step each entity's crop of
    the generated frame at its true box is compared with every reference by
    `appearance_similarity`. A step is "after cut" once a cut has occurred at or before it
    within the generated frames (the reference belongs to the context's shot).
    Returns {"before_cut", "after_cut": mean similarity to the entity's own reference,
    "swap_margin": mean over all counted steps of (own similarity - highest similarity to
    another entity's reference), negative when identities are swapped,
    "swap_margin_after_cut": the same after cuts, "num_before", "num_after"}. NaN if empty.
    """
    g, ref = np.asarray(generated), np.asarray(reference_crops, np.float64)
    bx, vis, cut = np.asarray(boxes, np.float64), np.asarray(visible, bool), np.asarray(cut, bool)
    _check_video(g, "generated")
    b, t, e = g.shape[0], g.shape[1], bx.shape[2] if bx.ndim == 4 else -1
    _check_lead(bx, "boxes", (b, t, e, 4), g)
    _check_lead(vis, "visible", (b, t, e), g)
    _check_lead(cut, "cut", (b, t), g)
    if ref.ndim != 5 or ref.shape[:2] != (b, e) or ref.shape[2] != ref.shape[3] or ref.shape[4] != g.shape[4]:
        raise ValueError(
            f"shape mismatch: reference_crops {ref.shape} vs boxes {bx.shape} (expected ({b}, {e}, s, s, {g.shape[4]}))"
        )
    crops = crop_boxes(g, bx, size=ref.shape[2])  # [B, T, E, s, s, C]
    sim = appearance_similarity(crops[:, :, :, None], ref[:, None, None, :])  # [B, T, E, E_ref]
    has_ref = ~np.isnan(ref).any(axis=(2, 3, 4))  # [B, E]
    own = np.diagonal(sim, axis1=2, axis2=3)  # [B, T, E]
    rivals = has_ref[:, None, None, :] & ~np.eye(e, dtype=bool)  # [B, 1, E, E_ref]
    best_rival = np.where(rivals, np.nan_to_num(sim, nan=-np.inf), -np.inf).max(axis=-1)
    margin = own - best_rival  # +inf where there is no rival
    counted = vis & has_ref[:, None, :]
    after = (np.cumsum(cut, axis=1) > 0)[:, :, None]
    with_rival = counted & np.isfinite(margin)
    return {
        "before_cut": _masked_mean(own, counted & ~after),
        "after_cut": _masked_mean(own, counted & after),
        "swap_margin": _masked_mean(margin, with_rival),
        "swap_margin_after_cut": _masked_mean(margin, with_rival & after),
        "num_before": int((counted & ~after).sum()),
        "num_after": int((counted & after).sum()),
    }


def on_screen(boxes: np.ndarray, height: int, width: int) -> np.ndarray:
    """bool [...]: whether the centres of boxes float [..., 4] (x0, y0, x1, y1) lie in the
    height x width view (stricter than overlap: a box that merely grazes the border may
    have no pixel on screen, and would pass for occluded)."""
    bx = np.asarray(boxes, np.float64)
    cx, cy = (bx[..., 0] + bx[..., 2]) / 2, (bx[..., 1] + bx[..., 3]) / 2
    return (cx >= 0) & (cx < width) & (cy >= 0) & (cy < height)


def reappearances(visible: np.ndarray, hidden: np.ndarray) -> np.ndarray:
    """bool [B, T, E]: steps at which an entity is visible after coming out of occlusion.

    An entity comes out of occlusion at step t if it is visible at t, was hidden at t-1 and
    was visible at some step before; it stays "reappeared" while it remains visible. An
    entity that re-enters from off-screen is not counted (nothing hid it)."""
    vis, hid = np.asarray(visible, bool), np.asarray(hidden, bool)
    out = np.zeros_like(vis)
    seen, emerged = np.zeros_like(vis[:, 0]), np.zeros_like(vis[:, 0])
    for t in range(vis.shape[1]):
        came_back = vis[:, t] & ~vis[:, t - 1] & hid[:, t - 1] & seen if t else np.zeros_like(seen)
        emerged = (emerged & vis[:, t]) | came_back
        out[:, t] = emerged
        seen |= vis[:, t]
    return out


def object_permanence(
    generated: np.ndarray,
    truth: np.ndarray,
    boxes: np.ndarray,
    visible: np.ndarray,
    hidden_mask: np.ndarray | None = None,
    start: int = 0,
    size: int = 8,
) -> dict[str, float]:
    """Does an entity come back, unchanged, after passing behind the occluder?

    generated, truth: uint8 [B, T, h, w, C] (the whole clip; steps before `start`, e.g. the
    context, only feed the occlusion history); boxes: float [B, T, E, 4] true boxes;
    visible: bool [B, T, E] (the records' `entity_visible`: some pixel on screen and not
    under the occluder). "Hidden" = on screen but not visible, i.e. occluded;
    `hidden_mask` bool [B, T, E] gives it directly, by default it is
    `on_screen(boxes) & ~visible` (box centre in view, yet no pixel visible). The reappearance steps are `reappearances(visible,
    hidden)` from `start` on. At those steps the generated crop at the true box is compared
    with the true crop (both `crop_boxes` at `size`).
    Returns {"reappear_psnr": mean crop PSNR in dB (100 = identical), "reappear_similarity":
    mean `appearance_similarity`, "visible_psnr": mean crop PSNR at the other visible
    steps from `start` (the baseline a permanent object should match), "num_reappearances"}.
    NaN scores where no step qualifies.
    """
    g, tr = np.asarray(generated), np.asarray(truth)
    _check_same_shape(tr, g, ("truth", "generated"))
    _check_video(g, "generated")
    bx, vis = np.asarray(boxes, np.float64), np.asarray(visible, bool)
    b, t, h, w = g.shape[:4]
    e = bx.shape[2] if bx.ndim == 4 else -1
    _check_lead(bx, "boxes", (b, t, e, 4), g)
    _check_lead(vis, "visible", (b, t, e), g)
    hidden = on_screen(bx, h, w) & ~vis if hidden_mask is None else np.asarray(hidden_mask, bool)
    _check_lead(hidden, "hidden_mask", (b, t, e), g)
    back = reappearances(vis, hidden)
    scored = np.arange(t)[None, :, None] >= start
    crop_g, crop_t = crop_boxes(g, bx, size), crop_boxes(tr, bx, size)
    crop_psnr = psnr(crop_g, crop_t, max_val=1.0)  # crops are on [0, 1]
    return {
        "reappear_psnr": _masked_mean(crop_psnr, back & scored),
        "reappear_similarity": _masked_mean(appearance_similarity(crop_g, crop_t), back & scored),
        "visible_psnr": _masked_mean(crop_psnr, vis & ~back & scored),
        "num_reappearances": int((back & scored).sum()),
    }


# ------------------------------------------------------------------------ action following


def agent_position(frames: np.ndarray, min_value: int = AGENT_MIN_VALUE) -> np.ndarray:
    """The procedural agent's centre in each frame: uint8 [..., H, W, C] -> float64 [..., 2] (x, y).

    The agent is the only near-white object (drawn (250, 250, 250), on top of everything):
    its position is the centroid of the pixel centres (j + 0.5, i + 0.5) whose channels are
    all >= `min_value`, in the coordinates of `entity_boxes` (so it equals the agent box
    centre when the agent is fully in view). NaN where no pixel qualifies.
    """
    f = np.asarray(frames)
    if f.ndim < 3:
        raise ValueError(f"agent_position expects frames [..., H, W, C], got shape {f.shape}")
    mask = (f >= min_value).all(axis=-1)  # [..., H, W]
    count = mask.sum(axis=(-2, -1))
    h, w = mask.shape[-2:]
    with np.errstate(invalid="ignore", divide="ignore"):
        x = (mask * (np.arange(w) + 0.5)).sum(axis=(-2, -1)) / count
        y = (mask * (np.arange(h) + 0.5)[:, None]).sum(axis=(-2, -1)) / count
    return np.stack([x, y], axis=-1)


def action_following(generated: np.ndarray, truth: np.ndarray, mask: np.ndarray | None = None) -> dict[str, float]:
    """Is the agent where the true actions put it? generated, truth: uint8 [B, T, h, w, C].

    Agent positions come from `agent_position` in both videos (screen pixels). Steps where
    the true frame shows no agent, or `mask` bool [B, T] (optional) is False, are ignored.
    Returns {"mean_distance_px": mean Euclidean distance between generated and true
    positions where both are found, "within_1.5px": fraction of steps whose distance is
    below 1.5 px (a generated frame without the agent counts as a miss), "agent_found":
    fraction of steps where the generated frame shows the agent, "num_steps", and
    "mean_distance_px_per_step" / "within_1.5px_per_step": the first two per step t of the
    video, lists [T] (how the agent drifts along a rollout)}. NaN scores if no step.
    """
    g, tr = np.asarray(generated), np.asarray(truth)
    _check_same_shape(tr, g, ("truth", "generated"))
    _check_video(g, "generated")
    pos_g, pos_t = agent_position(g), agent_position(tr)
    in_truth = ~np.isnan(pos_t).any(axis=-1)
    if mask is not None:
        mask = np.asarray(mask, bool)
        _check_lead(mask, "mask", g.shape[:2], g)
        in_truth &= mask
    found = ~np.isnan(pos_g).any(axis=-1) & in_truth
    dist = np.linalg.norm(pos_g - pos_t, axis=-1)
    within = found & (np.nan_to_num(dist, nan=np.inf) < AGENT_TOLERANCE_PX)
    per_step = lambda x, mask: [_masked_mean(x[:, t], mask[:, t]) for t in range(x.shape[1])]
    return {
        "mean_distance_px": _masked_mean(dist, found),
        "within_1.5px": _masked_mean(within, in_truth),
        "agent_found": _masked_mean(found, in_truth),
        "num_steps": int(in_truth.sum()),
        "mean_distance_px_per_step": per_step(dist, found),
        "within_1.5px_per_step": per_step(within, in_truth),
    }


# ------------------------------------------------------------------------ counterfactual


def psnr_margin(prediction: np.ndarray, counterfactual: np.ndarray, factual: np.ndarray) -> dict[str, float]:
    """Mean PSNR (dB) of prediction uint8 [B, H, h, w, C] against the counterfactual truth
    (what the actions it was given show) and against the factual one (the recorded frames),
    same shapes: {"psnr_vs_counterfactual", "psnr_vs_factual", "margin_db": their
    difference, > 0 when the prediction is closer to what its actions would have done}."""
    vs_cf, vs_fa = float(psnr(counterfactual, prediction).mean()), float(psnr(factual, prediction).mean())
    return {"psnr_vs_counterfactual": vs_cf, "psnr_vs_factual": vs_fa, "margin_db": vs_cf - vs_fa}


def counterfactual_following(
    generated: np.ndarray,
    counterfactual: np.ndarray,
    factual: np.ndarray,
    copy_last: np.ndarray,
    agent_steps: np.ndarray | None = None,
) -> dict[str, Any]:
    """Does the model show what the actions it was given would have done? All uint8 [B, H, h, w, C].

    generated: the model's rollout under counterfactual actions; counterfactual: the
    simulator's true frames under those same actions, from the same state; factual: the
    recorded frames (under the recorded actions); copy_last: the last context frame
    repeated (the frozen-video control). A model that follows its actions scores higher
    against the counterfactual truth than against the factual one; where the two truths
    coincide (the actions changed nothing on screen) the gap is 0 whatever the model does,
    hence `counterfactual_truth_differs_fraction` (share of clips whose counterfactual
    frames differ from the factual ones at some step). Returns per-horizon lists [H] of
    mean PSNR (dB) / SSIM over clips, that fraction, the `psnr_margin` scalars (means over
    horizons) of the model and of the two baselines beside it: "copy_last", and
    "action_blind", the factual frames as prediction (a perfect model that ignores the
    actions; its PSNR vs factual would be the 100 dB cap, so only vs counterfactual).

    agent_steps bool [B, H] (procedural worlds, optional): the steps where the agent's place
    is predictable (e.g. `before_first_cut`). Adds "agent_within_1.5px" (`action_following`
    against the counterfactual truth over those steps) for the model and each baseline,
    the model's per horizon ("agent_within_1.5px_per_step" [H]), and their count "num_agent_steps".
    """
    g, cf, fa, cl = (np.asarray(x) for x in (generated, counterfactual, factual, copy_last))
    for name, x in (("counterfactual", cf), ("factual", fa), ("copy_last", cl)):
        _check_same_shape(g, x, ("generated", name))
    _check_video(g, "generated")
    per_h = lambda v: [float(x) for x in v]
    out: dict[str, Any] = {
        "horizon": list(range(1, g.shape[1] + 1)),
        "psnr_vs_counterfactual_truth": per_h(psnr_per_horizon(cf, g)),
        "psnr_vs_factual_truth": per_h(psnr_per_horizon(fa, g)),
        "ssim_vs_counterfactual_truth": per_h(ssim_per_horizon(cf, g)),
        "copy_last_psnr_vs_counterfactual_truth": per_h(psnr_per_horizon(cf, cl)),
        "counterfactual_truth_differs_fraction": float((cf != fa).any(axis=(1, 2, 3, 4)).mean()),
        **psnr_margin(g, cf, fa),
        "copy_last": psnr_margin(cl, cf, fa),
        "action_blind": {"psnr_vs_counterfactual": float(psnr(cf, fa).mean())},
    }
    if agent_steps is not None:
        model = action_following(g, cf, agent_steps)
        out.update(
            {
                "agent_within_1.5px": model["within_1.5px"],
                "agent_within_1.5px_per_step": model["within_1.5px_per_step"],
                "num_agent_steps": model["num_steps"],
            }
        )
        for name, prediction in (("copy_last", cl), ("action_blind", fa)):
            out[name]["agent_within_1.5px"] = action_following(prediction, cf, agent_steps)["within_1.5px"]
    return out
