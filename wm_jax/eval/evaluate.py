"""`wm eval`: restore a run's checkpoint, measure it on held-out episodes, write a report.

Outputs under `RUN/eval/` (or `--out`): `metrics.json` (names of DESIGN.md §8),
`report.md`, `psnr_vs_horizon.png` and a video grid `rollout.gif` (+ `.mp4` when
imageio-ffmpeg is installed) showing truth | generated | |difference|.

Besides PSNR/SSIM drift, the ground truth in the records measures what video metrics
miss (definitions in `wm_jax/eval/metrics.py`): action following (agent position vs the
simulator's, with true and with shuffled actions), camera following (image shift vs the
commanded pan), identity persistence (entity crops vs their look in the context) and
object permanence (entities reappearing from behind the occluder).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np

from data_pipelines.loader import make_loader
from wm_jax import checkpoint as ckpt
from wm_jax import sharding, telemetry
from wm_jax.config import Config, MeshConfig
from wm_jax.eval import metrics as M
from wm_jax.export import is_bundle, tokenizer_source
from wm_jax.models.dynamics import DynamicsModel, make_controls
from wm_jax.models.latent_actions import LatentActionModel
from wm_jax.models.tokenizer import VideoTokenizer
from wm_jax.rollout import decode_codes, encode_frames, rollout
from wm_jax.train.loop import check_dataset, load_run_config, restore_params
from wm_jax.train.step import infer_latent_actions


def held_out_clips(data_dir: str, cfg: Config, frames: int, split: str | None = None,
                   num_clips: int | None = None) -> dict[str, np.ndarray]:
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
    )
    clips = [b for _, b in zip(range(num_clips or cfg.eval.num_clips), loader)]
    if not clips:
        raise ValueError(f"split '{split}' of {data_dir} has no episode of {frames} frames")
    return {k: np.concatenate([c[k] for c in clips]) for k in EVAL_FIELDS if k in clips[0]}


# Record fields the evaluation reads (those a dataset has): frames and the controls the
# rollout is steered by, plus the ground truth of the controllability metrics (camera
# pose, entity boxes/visibility, shot cuts) and the identity bank's reference frame.
EVAL_FIELDS = ("frame", "action", "action_valid", "camera", "camera_valid", "cut", "reference",
               "entity_boxes", "entity_visible")
# Without these (e.g. Atari), the controllability groups are skipped.
GROUND_TRUTH = ("camera", "cut", "entity_boxes", "entity_visible")


def video_grid(truth: np.ndarray, generated: np.ndarray, scale: int = 4) -> np.ndarray:
    """uint8 [B,T,H,W,3] pairs -> frames [T, B*H*scale, 3*W*scale, 3]: truth | generated | |diff|."""
    diff = np.abs(truth.astype(np.int16) - generated.astype(np.int16)).astype(np.uint8)
    rows = np.concatenate([truth, generated, diff], axis=3)  # [B,T,H,3W,3]
    grid = np.concatenate(list(rows), axis=1)  # [T, B*H, 3W, 3]
    return grid.repeat(scale, axis=1).repeat(scale, axis=2)


def write_video(frames: np.ndarray, out: Path, fps: int = 4) -> list[str]:
    """Writes `out.gif` and, if an ffmpeg backend is available, `out.mp4`; returns the file names."""
    import imageio.v2 as imageio

    written = []
    imageio.mimsave(out.with_suffix(".gif"), list(frames), duration=1000 / fps, loop=0)
    written.append(out.with_suffix(".gif").name)
    try:
        imageio.mimsave(out.with_suffix(".mp4"), list(frames), fps=fps, macro_block_size=1)
        written.append(out.with_suffix(".mp4").name)
    except (ImportError, ValueError, RuntimeError) as e:  # no ffmpeg backend (extra `video`)
        telemetry.info(f"mp4 skipped ({type(e).__name__}: {e}); gif written")
    return written


def plot_drift(result: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    h = result["rollout"]["horizon"]
    ax.plot(h, result["rollout"]["psnr"], "o-", label="model, true actions")
    ax.plot(h, result["rollout_random_actions"]["psnr"], "s--", label="model, random actions")
    ax.plot(h, result["baseline_copy_last"]["psnr"], "^:", label="copy last frame")
    ax.axhline(result["tokenizer"]["psnr"], color="gray", lw=0.8, label="tokenizer reconstruction")
    ax.set_xlabel("horizon (frames after context)")
    ax.set_ylabel("PSNR (dB)")
    ax.set_title(f"rollout drift, step {result['step']}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def report_markdown(result: dict, files: dict[str, list[str]]) -> str:
    lines = [
        f"# Evaluation of `{result['workdir']}` at step {result['step']}",
        "",
        f"Dataset `{result['data_dir']}` split `{result['split']}` (content hash `{result['dataset_hash'][:16]}…`), "
        f"{result['num_clips']} held-out clips.",
        "",
        "| metric | value |",
        "|---|---|",
        f"| tokenizer reconstruction PSNR (dB) | {result['tokenizer']['psnr']:.2f} |",
    ]
    if "rollout" in result:
        c = result["controllability"]
        lines += [
            f"| rollout PSNR, mean over horizons 1–{len(result['rollout']['horizon'])} (dB) | {np.mean(result['rollout']['psnr']):.2f} |",
            f"| copy-last-frame baseline, same horizons (dB) | {np.mean(result['baseline_copy_last']['psnr']):.2f} |",
            f"| PSNR with true actions (dB) | {c['psnr_true_actions']:.2f} |",
            f"| PSNR with random actions (dB) | {c['psnr_random_actions']:.2f} |",
            f"| ΔPSNR true − random (dB) | {c['delta_psnr']:.3f} |",
            "",
            "## PSNR per horizon step",
            "",
            "| horizon | model | random actions | copy last |",
            "|---|---|---|---|",
        ]
        for i, h in enumerate(result["rollout"]["horizon"]):
            lines.append(
                f"| {h} | {result['rollout']['psnr'][i]:.2f} | {result['rollout_random_actions']['psnr'][i]:.2f} "
                f"| {result['baseline_copy_last']['psnr'][i]:.2f} |"
            )
        lines += ["", "![PSNR vs horizon](psnr_vs_horizon.png)", ""]
    if "action_following" in result:
        a, cam = result["action_following"], result["camera_following"]
        ip, op = result["identity_persistence"], result["object_permanence"]
        lines += [
            "## What video metrics miss",
            "",
            "| metric | model | control |",
            "|---|---|---|",
            f"| action following: agent within 1.5 px of the simulator's (true vs random actions) "
            f"| {a['true_actions']['within_1.5px']:.3f} | {a['random_actions']['within_1.5px']:.3f} |",
            f"| action following: mean agent distance, px | {a['true_actions']['mean_distance_px']:.2f} "
            f"| {a['random_actions']['mean_distance_px']:.2f} |",
            f"| camera following: steps within 1 px of the commanded pan (model vs copy-last; true video "
            f"{cam['truth']['within_1px']:.3f}) | {cam['model']['within_1px']:.3f} | {cam['baseline_copy_last']['within_1px']:.3f} |",
            f"| identity persistence: similarity to own reference / swap margin "
            f"| {ip['before_cut']:.3f} / {ip['swap_margin']:.3f} | |",
            f"| object permanence: crop PSNR on reappearing from occlusion vs other visible steps (dB, "
            f"{op['num_reappearances']} reappearances) | {op['reappear_psnr']:.2f} | {op['visible_psnr']:.2f} |",
            "",
        ]
    for name in files.get("video", []):
        lines.append(f"Video grid (rows: clips; columns: truth | generated | |difference|): [{name}]({name})")
    if files.get("video"):
        lines += ["", f"![rollout]({files['video'][0]})"]
    return "\n".join(lines) + "\n"


def json_safe(value: Any) -> Any:
    """NaN/inf (a metric with nothing to measure, e.g. no reappearance) -> None, so
    metrics.json is strict JSON (`null`) that any parser reads."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def ground_truth_metrics(clips: dict[str, np.ndarray], ctx: int, gen_true: np.ndarray, gen_random: np.ndarray,
                         copy_last: np.ndarray) -> dict[str, dict]:
    """The controllability groups of metrics.json on the generated steps (after `ctx`).

    clips: held-out records [B, C+H, ...]; gen_true / gen_random: uint8 [B, C+H, h, w, 3]
    rolled out with the true / random actions (context reconstructed); copy_last: uint8
    [B, H, h, w, 3]. Each model figure comes with a control: random actions for action
    following, a frozen frame (copy-last) for camera following.
    """
    frames, boxes, visible = clips["frame"], clips["entity_boxes"], clips["entity_visible"]
    truth, gen = frames[:, ctx:], gen_true[:, ctx:]
    camera_xy, cut = clips["camera"][:, ctx - 1 :, :2], clips["cut"][:, ctx - 1 :]
    # From the last context frame on, so the first generated step's move is scored too.
    follow = lambda video: M.camera_following(video, camera_xy, cut, boxes[:, ctx - 1 :])
    with_last = lambda g: np.concatenate([frames[:, ctx - 1 : ctx], g], axis=1)
    # Each entity's look: its crop in the last context frame where it is visible (NaN: none).
    crops = M.crop_boxes(frames[:, :ctx], boxes[:, :ctx])  # [B, C, E, s, s, 3]
    seen = visible[:, :ctx]
    last_seen = np.where(seen.any(axis=1), ctx - 1 - np.argmax(seen[:, ::-1], axis=1), -1)  # [B, E]
    reference = np.take_along_axis(crops, np.maximum(last_seen, 0)[:, None, :, None, None, None], axis=1)[:, 0]
    reference[last_seen < 0] = np.nan
    return {
        "action_following": {
            "true_actions": M.action_following(gen, truth),
            "random_actions": M.action_following(gen_random[:, ctx:], truth),
        },
        "camera_following": {
            "model": follow(with_last(gen)),
            "baseline_copy_last": follow(with_last(copy_last)),
            "truth": follow(frames[:, ctx - 1 :]),
        },
        "identity_persistence": M.identity_persistence(gen, reference, boxes[:, ctx:], visible[:, ctx:], clips["cut"][:, ctx:]),
        "object_permanence": M.object_permanence(gen_true, frames, boxes, visible, start=ctx),
    }


def with_inferred_actions(clips: dict[str, np.ndarray], cfg: Config, mesh: Any, rules: Any) -> dict[str, np.ndarray]:
    """The clips with `action` int32 [B,T] inferred from their frames by the latent action
    model the dynamics run was trained on (`train.latent_actions_workdir`), as in training:
    "true actions" are then the inferred ones (Genie's ΔtPSNR with inferred actions)."""
    lam_params, _, step = restore_params(cfg.train.latent_actions_workdir, mesh, rules)
    telemetry.info(f"actions: inferred by the latent action model {cfg.train.latent_actions_workdir} step {step}")
    infer = jax.jit(infer_latent_actions, static_argnums=0)
    lam, n = LatentActionModel(cfg.model), clips["frame"].shape[0]
    actions = np.concatenate([np.asarray(infer(lam, lam_params, clips["frame"][i : i + cfg.eval.batch_size]))
                              for i in range(0, n, cfg.eval.batch_size)])
    return {**clips, "action": actions, "action_valid": np.ones(actions.shape, bool)}


def evaluate(workdir: str | Path, *, step: int | None = None, data_dir: str | None = None, out_dir: str | Path | None = None) -> dict:
    """Restores `workdir`'s checkpoint and writes the eval report; returns the metrics dict."""
    workdir = Path(workdir)
    cfg = load_run_config(workdir)
    if cfg.train.stage == "latent_actions":  # no frames to generate: its evaluation is the probe
        from wm_jax.eval.latent_action_probe import evaluate_probe  # imports this module

        return evaluate_probe(workdir, step=step, data_dir=data_dir, out_dir=out_dir)
    data_dir = data_dir or cfg.data.dir
    manifest = check_dataset(cfg, data_dir, cfg.eval.split)
    out = Path(out_dir) if out_dir else workdir / "eval"
    mesh = sharding.make_mesh(MeshConfig())  # whatever devices are here
    rules = sharding.logical_rules(cfg.mesh)
    params, _, step = restore_params(workdir, mesh, rules, step)
    tokenizer = VideoTokenizer(cfg.model)
    chunk = cfg.data.frames_per_clip
    if cfg.train.stage == "tokenizer":
        tok_params, dyn_params = params, None
    else:
        tok_params, _, _ = restore_params(tokenizer_source(workdir, cfg), mesh, rules)
        dyn_params = params

    ctx, horizon = cfg.eval.context_frames, cfg.eval.horizon
    clips = held_out_clips(data_dir, cfg, ctx + horizon)
    if dyn_params is not None and cfg.train.latent_actions_workdir:
        clips = with_inferred_actions(clips, cfg, mesh, rules)
    frames, actions = clips["frame"], clips["action"]
    n = frames.shape[0]
    rng = np.random.default_rng(cfg.seed)
    random_actions = actions.copy()  # random from the first generated step on
    vocab = cfg.model.latent_actions.num_latent_actions if cfg.train.latent_actions_workdir else cfg.model.dynamics.num_actions
    random_actions[:, ctx - 1 :] = rng.integers(0, vocab, actions[:, ctx - 1 :].shape)
    dynamics = DynamicsModel(cfg.model)
    steering = [k for k in ("camera", "camera_valid", "cut", "action_valid") if k in clips]

    def generate(context: jax.Array, acts: np.ndarray, s: slice) -> np.ndarray:
        """Context codes [B,C,N,L] + actions (and the clips' camera, cuts, reference) ->
        uint8 frames [B,C+H,...] (context reconstructed)."""
        controls = make_controls({"action": acts, **{k: clips[k][s] for k in steering}})
        reference = None
        if "reference" in clips and cfg.model.dynamics.use_identity_bank:
            reference = encode_frames(tokenizer, tok_params, clips["reference"][s, :1], chunk)[0][:, 0]
        new, _ = rollout(dynamics, dyn_params, context, controls, horizon, reference)
        return decode_codes(tokenizer, tok_params, jnp.concatenate([context, new], axis=1), chunk)

    recon, gen_true, gen_random = [], [], []
    for i in range(0, n, cfg.eval.batch_size):
        s = slice(i, min(i + cfg.eval.batch_size, n))
        codes, _ = encode_frames(tokenizer, tok_params, frames[s], chunk)
        recon.append(decode_codes(tokenizer, tok_params, codes, chunk))
        if dyn_params is not None:
            gen_true.append(generate(codes[:, :ctx], actions[s], s))
            gen_random.append(generate(codes[:, :ctx], random_actions[s], s))
    recon = np.concatenate(recon)
    result: dict[str, Any] = {
        "step": step,
        "checkpoint": str(workdir) if is_bundle(workdir) else str(ckpt.checkpoint_dir(workdir) / str(step)),
        "dataset_hash": manifest["content_hash"],
        "workdir": str(workdir),
        "data_dir": str(data_dir),
        "split": cfg.eval.split,
        "num_clips": int(n),
        "tokenizer": {"psnr": float(M.psnr(frames, recon).mean())},
    }
    files: dict[str, list[str]] = {}
    out.mkdir(parents=True, exist_ok=True)
    shown = min(cfg.eval.video_clips, n)
    if dyn_params is not None:
        gen_true, gen_random = np.concatenate(gen_true), np.concatenate(gen_random)
        truth = frames[:, ctx:]
        copy_last = np.repeat(frames[:, ctx - 1 : ctx], horizon, axis=1)
        hs = list(range(1, horizon + 1))
        per_h = lambda g: [float(v) for v in M.psnr_per_horizon(truth, g)]
        per_h_ssim = lambda g: [float(v) for v in M.ssim_per_horizon(truth, g)]
        for name, video in (("rollout", gen_true[:, ctx:]), ("rollout_random_actions", gen_random[:, ctx:]),
                            ("baseline_copy_last", copy_last)):
            result[name] = {"horizon": hs, "psnr": per_h(video), "ssim": per_h_ssim(video)}
        true_psnr, random_psnr = result["rollout"]["psnr"], result["rollout_random_actions"]["psnr"]
        result["controllability"] = {
            "psnr_true_actions": float(np.mean(true_psnr)),
            "psnr_random_actions": float(np.mean(random_psnr)),
            "delta_psnr": M.delta_psnr(np.asarray(true_psnr), np.asarray(random_psnr)),
        }
        if all(k in clips for k in GROUND_TRUTH):
            result.update(ground_truth_metrics(clips, ctx, gen_true, gen_random, copy_last))
        else:
            telemetry.info(f"controllability metrics skipped: the dataset lacks {[k for k in GROUND_TRUTH if k not in clips]}")
        plot_drift(result, out / "psnr_vs_horizon.png")
        files["video"] = write_video(video_grid(frames[:shown], gen_true[:shown]), out / "rollout")
    else:
        files["video"] = write_video(video_grid(frames[:shown], recon[:shown]), out / "reconstruction")
    (out / "report.md").write_text(report_markdown(result, files))  # "nan" where nothing was measured
    result = json_safe(result)
    (out / "metrics.json").write_text(json.dumps(result, indent=2, allow_nan=False))
    return result
