"""`wm eval`: restore a run's checkpoint, measure it on held-out episodes, write a report.

Outputs under `RUN/eval/` (or `--out`): `metrics.json` (names of DESIGN.md §8),
`report.md`, `psnr_vs_horizon.png`, `metrics_bars.png` (each headline figure beside its
controls) and a video grid `rollout.gif` (+ `.mp4` when imageio-ffmpeg is installed)
showing truth | generated | |difference|.

Besides PSNR/SSIM drift, the ground truth in the records measures what video metrics
miss (definitions in `wm_jax/eval/metrics.py`): action following (agent position vs the
simulator's, with true and with shuffled actions), camera following (image shift vs the
commanded pan), identity persistence (entity crops vs their look in the context) and
object permanence (entities reappearing from behind the occluder). Genie's protocol
(ΔtPSNR at t = 4, true vs random actions) comes with counterfactual truth: on an Atari or
procedural dataset the simulator, replayed to each clip's last context frame, renders what
the random actions would truly have shown, and the model's random-action rollout is scored
against it (counterfactual action following). On procedural data a one-step probe also
measures how far each action moves the agent in the model's prediction
(`wm_jax/eval/action_probe.py`). `headline(metrics)` lists the figures that sum a run up.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from data_pipelines.schema import DatasetError
from data_pipelines.sources import atari, procedural
from wm_jax import checkpoint as ckpt
from wm_jax import sharding, telemetry
from wm_jax import config as config_lib
from wm_jax.config import Config, MeshConfig
from wm_jax.eval import action_probe
from wm_jax.eval import metrics as M
from wm_jax.eval.clips import held_out_clips
from wm_jax.eval.latent_action_probe import evaluate_probe
from wm_jax.models.dynamics import DynamicsModel, make_controls
from wm_jax.models.latent_actions import LatentActionModel
from wm_jax.models.tokenizer import VideoTokenizer
from wm_jax.inference.rollout import carry_unchanged, decode_codes, encode_frames, rollout
from wm_jax.run import check_dataset, is_bundle, load_run_config, restore_params, tokenizer_source, with_tokenizer_run
from wm_jax.stages import Role, get_stage
from wm_jax.stages.latent_actions import infer_latent_actions


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
    if "counterfactual" in result:  # same rollout as "random actions", scored against the simulator's frames
        ax.plot(
            h,
            result["counterfactual"]["psnr_vs_counterfactual_truth"],
            "d-.",
            label="model, random actions, vs simulator's counterfactual",
        )
    ax.axhline(result["tokenizer"]["psnr"], color="gray", lw=0.8, label="tokenizer reconstruction")
    ax.set_xlabel("horizon (frames after context)")
    ax.set_ylabel("PSNR (dB)")
    ax.set_title(f"rollout drift, step {result['step']}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def _lookup(result: dict, *path: str) -> Any:
    """result[path[0]][path[1]]...; None where a key is absent."""
    for key in path:
        if not isinstance(result, dict) or key not in result:
            return None
        result = result[key]
    return result


def _finite_mean(values: Any) -> float | None:
    """Mean of the finite entries of a number or list (None/NaN entries skipped); None if none."""
    if values is None:
        return None
    x = np.asarray(values if isinstance(values, list) else [values], dtype=np.float64)  # None -> NaN
    x = x[np.isfinite(x)]
    return float(x.mean()) if x.size else None


# The report's bar panels: (title, [(bar label, path of the metric in a metrics dict), ...]),
# the model's figure first and its controls after it.
METRIC_PANELS: list[tuple[str, list[tuple[str, tuple[str, ...]]]]] = [
    ("tokenizer PSNR (dB)", [("reconstruction", ("tokenizer", "psnr"))]),
    (
        "rollout PSNR, mean over horizon (dB)",
        [
            ("model", ("rollout", "psnr")),
            ("random actions", ("rollout_random_actions", "psnr")),
            ("copy last", ("baseline_copy_last", "psnr")),
        ],
    ),
    (
        "rollout SSIM, mean over horizon",
        [
            ("model", ("rollout", "ssim")),
            ("random actions", ("rollout_random_actions", "ssim")),
            ("copy last", ("baseline_copy_last", "ssim")),
        ],
    ),
    (
        "action following: agent within 1.5 px",
        [
            ("true actions", ("action_following", "true_actions", "within_1.5px")),
            ("random actions", ("action_following", "random_actions", "within_1.5px")),
        ],
    ),
    (
        "camera following: within 1 px",
        [
            ("model", ("camera_following", "model", "within_1px")),
            ("copy last", ("camera_following", "baseline_copy_last", "within_1px")),
            ("truth", ("camera_following", "truth", "within_1px")),
        ],
    ),
    (
        "identity persistence",
        [
            ("similarity before cut", ("identity_persistence", "before_cut")),
            ("similarity after cut", ("identity_persistence", "after_cut")),
            ("swap margin", ("identity_persistence", "swap_margin")),
        ],
    ),
    (
        "object permanence: crop PSNR (dB)",
        [
            ("reappearing", ("object_permanence", "reappear_psnr")),
            ("other visible steps", ("object_permanence", "visible_psnr")),
        ],
    ),
    (
        "counterfactual (random actions): PSNR, mean over horizon (dB)",
        [
            ("model vs counterfactual truth", ("counterfactual", "psnr_vs_counterfactual_truth")),
            ("model vs factual truth", ("counterfactual", "psnr_vs_factual_truth")),
            ("copy last vs counterfactual truth", ("counterfactual", "copy_last_psnr_vs_counterfactual_truth")),
        ],
    ),
    (
        "ΔtPSNR at t=4, true − random actions (dB)",
        [
            ("all clips", ("controllability", "delta_psnr_t4")),
            ("no cut by t=4", ("controllability", "delta_psnr_t4_before_cut")),
        ],
    ),
    (
        "counterfactual: agent within 1.5 px",
        [
            ("model", ("counterfactual", "agent_within_1.5px")),
            ("copy last", ("counterfactual", "copy_last", "agent_within_1.5px")),
            ("action blind", ("counterfactual", "action_blind", "agent_within_1.5px")),
        ],
    ),
    (
        "counterfactual margin: PSNR vs counterfactual − vs factual (dB)",
        [("model", ("counterfactual", "margin_db")), ("copy last", ("counterfactual", "copy_last", "margin_db"))],
    ),
    (
        "action probe: agent move in one step (px)",
        [("model", ("action_probe", "displacement_px")), ("commanded", ("action_probe", "commanded_px"))],
    ),
]


def metric_bar_groups(result: dict) -> list[tuple[str, list[tuple[str, float]]]]:
    """[(panel title, [(bar label, value), ...]), ...]: each headline metric group of
    `result` (a metrics dict, before or after `json_safe`) in `METRIC_PANELS`; per-horizon
    lists are averaged over the horizon. Bars without a value (absent group, None or NaN)
    are dropped, then panels left without a bar."""
    values = [
        (title, [(label, _finite_mean(_lookup(result, *path))) for label, path in bars])
        for title, bars in METRIC_PANELS
    ]
    kept = [(title, [(label, v) for label, v in bars if v is not None]) for title, bars in values]
    return [(title, bars) for title, bars in kept if bars]


def _figures(values: list[float | None], spec: str) -> str:
    """Values formatted with `spec` and joined by " / " ("n/a" for a missing one)."""
    return " / ".join("n/a" if v is None else format(v, spec) for v in values)


def headline(result: dict) -> list[tuple[str, str]]:
    """[(label, formatted value), ...]: the figures that sum an evaluation up, from `result`
    (a metrics dict, before or after `json_safe`), for the report's first table and for a
    printout. Rows of absent groups are left out; "n/a" marks a figure with nothing to
    measure (e.g. ΔtPSNR at t=4 when the horizon is shorter)."""
    mean = lambda *path: _finite_mean(_lookup(result, *path))
    rows = [("tokenizer reconstruction PSNR (dB)", _figures([mean("tokenizer", "psnr")], ".2f"))]
    if "rollout" in result:
        rows += [
            (
                "rollout PSNR, mean over horizons (dB): model / copy-last",
                _figures([mean("rollout", "psnr"), mean("baseline_copy_last", "psnr")], ".2f"),
            ),
            (
                "ΔtPSNR at t=4, true − random actions (dB): all clips / no cut by t=4",
                _figures(
                    [mean("controllability", "delta_psnr_t4"), mean("controllability", "delta_psnr_t4_before_cut")],
                    "+.2f",
                ),
            ),
        ]
    if "agent_within_1.5px" in result.get("counterfactual", {}):
        within = [mean("counterfactual", *k, "agent_within_1.5px") for k in ((), ("copy_last",), ("action_blind",))]
        rows.append(("counterfactual: agent within 1.5 px: model / copy-last / action-blind", _figures(within, ".3f")))
    if "margin_db" in result.get("counterfactual", {}):
        rows.append(
            (
                "counterfactual margin, PSNR vs counterfactual − vs factual (dB): model / copy-last",
                _figures(
                    [mean("counterfactual", "margin_db"), mean("counterfactual", "copy_last", "margin_db")], "+.2f"
                ),
            )
        )
    if "action_probe" in result:
        rows.append(
            (
                "action probe, agent move in one step (px): model / commanded (fraction)",
                _figures([mean("action_probe", "displacement_px"), mean("action_probe", "commanded_px")], ".2f")
                + f" ({_figures([mean('action_probe', 'fraction')], '.2f')})",
            )
        )
    return rows


def plot_metric_bars(result: dict, out: Path) -> None:
    """Writes a PNG of `metric_bar_groups(result)`: one bar chart per group, model first."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = metric_bar_groups(result)
    cols = max(min(len(groups), 4), 1)
    rows = -(-len(groups) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 3.4 * rows), squeeze=False)
    for ax, (title, bars) in zip(axes.flat, groups):
        labels, values = zip(*bars)
        ax.bar(range(len(bars)), values, color=["C0"] + ["C7"] * (len(bars) - 1))  # model vs controls
        ax.bar_label(ax.containers[0], fmt="%.3g", fontsize=7)
        ax.set_xticks(range(len(bars)), labels, rotation=25, ha="right", fontsize=7)
        ax.set_title(title, fontsize=8, wrap=True)
        ax.margins(y=0.15)
    for ax in axes.flat[len(groups) :]:
        ax.axis("off")
    fig.suptitle(f"headline metrics, step {result['step']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def counterfactual_markdown(cf: dict) -> list[str]:
    """Report lines of the counterfactual group (`M.counterfactual_following` + clip counts)."""
    lines = [
        "## Counterfactual action following",
        "",
        "The rollout with random actions, scored against the frames the simulator shows under those "
        "same actions from the clip's last context frame (counterfactual truth) and against the "
        "recorded frames (factual truth): a model that follows its actions is closer to the first "
        "(margin > 0). Action-blind: the factual frames as prediction, what a perfect model that "
        "ignores its actions would score. The counterfactual frames differ from the factual ones in "
        f"{cf['counterfactual_truth_differs_fraction']:.0%} of the clips.",
        "",
    ]
    if "margin_db" in cf:
        blind = cf["action_blind"]
        lines += [
            "| prediction | PSNR vs counterfactual (dB) | PSNR vs factual (dB) | margin (dB) | agent within 1.5 px |",
            "|---|---|---|---|---|",
            *(
                f"| {name} | {g['psnr_vs_counterfactual']:.2f} | {g['psnr_vs_factual']:.2f} | {g['margin_db']:+.2f} "
                f"| {_figures([_finite_mean(g.get('agent_within_1.5px'))], '.3f')} |"
                for name, g in (("model", cf), ("copy last", cf["copy_last"]))
            ),
            f"| action blind | {blind['psnr_vs_counterfactual']:.2f} | (100, capped) | | "
            f"{_figures([_finite_mean(blind.get('agent_within_1.5px'))], '.3f')} |",
            "",
        ]
    if "num_agent_steps" in cf:
        lines += [
            f"The agent is scored on {cf['num_agent_steps']} generated steps before any shot cut (a cut "
            "reframes the view around the agent).",
            "",
        ]
    if cf.get("num_clips_reframed"):
        lines += [
            f"{cf['num_clips_reframed']} clips left out: the random actions reframed their context (a world "
            "v2 cut frames its shot by looking ahead at the agent's path).",
            "",
        ]
    lines += [
        "| horizon | PSNR vs counterfactual truth | PSNR vs factual truth | SSIM vs counterfactual truth "
        "| copy last: PSNR vs counterfactual truth |",
        "|---|---|---|---|---|",
    ]
    for i, h in enumerate(cf["horizon"]):
        lines.append(
            f"| {h} | {cf['psnr_vs_counterfactual_truth'][i]:.2f} | {cf['psnr_vs_factual_truth'][i]:.2f} "
            f"| {cf['ssim_vs_counterfactual_truth'][i]:.3f} | {cf['copy_last_psnr_vs_counterfactual_truth'][i]:.2f} |"
        )
    return lines + [""]


def probe_markdown(probe: dict) -> list[str]:
    """Report lines of the action_probe group (`action_probe.probe_scores`)."""
    per_action = probe["displacement_px_per_action"]
    names = [f"a{a}" for a in range(1, len(per_action) + 1)]
    return [
        "## Action probe (one step, teacher-forced)",
        "",
        "Frame C predicted from the true context once per action forced into it; the agent's move from "
        "the no-op prediction to each move action's, along that action's direction, vs the world's "
        f"per-step move ({probe['commanded_px']:.2f} px), over {probe['num_clips']} clips "
        "(frame C not a cut, the agent found in both predictions). Procedural actions: a1 up, a2 down, "
        "a3 left, a4 right.",
        "",
        "| action | " + " | ".join(names) + " | mean | fraction of commanded |",
        "|---" * (len(names) + 3) + "|",
        "| move (px) | "
        + " | ".join(_figures([_finite_mean(d)], "+.2f") for d in per_action)
        + f" | {_figures([_finite_mean(probe['displacement_px'])], '+.2f')} "
        f"| {_figures([_finite_mean(probe['fraction'])], '.2f')} |",
        "",
    ]


def report_markdown(result: dict, files: dict[str, list[str]]) -> str:
    lines = [
        f"# Evaluation of `{result['workdir']}` at step {result['step']}",
        "",
        f"Dataset `{result['data_dir']}` split `{result['split']}` (content hash `{result['dataset_hash'][:16]}…`), "
        f"{result['num_clips']} held-out clips.",
        "",
        "## Headline",
        "",
        "| figure | value |",
        "|---|---|",
        *(f"| {label} | {value} |" for label, value in headline(result)),
        "",
    ]
    if "rollout" in result:
        lines += [
            'ΔtPSNR "no cut by t=4": the clips without a shot cut among the first 4 generated frames (a '
            "cut reframes the view, so where the agent will be is then unknowable, whatever the actions).",
            "",
        ]
    lines += [
        "## Details",
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
            "| horizon | model | random actions | copy last | ΔtPSNR (per clip, mean) |",
            "|---|---|---|---|---|",
        ]
        for i, h in enumerate(result["rollout"]["horizon"]):
            lines.append(
                f"| {h} | {result['rollout']['psnr'][i]:.2f} | {result['rollout_random_actions']['psnr'][i]:.2f} "
                f"| {result['baseline_copy_last']['psnr'][i]:.2f} | {c['delta_psnr_per_horizon'][i]:+.3f} |"
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
    if "counterfactual" in result:
        lines += counterfactual_markdown(result["counterfactual"])
    if "action_probe" in result:
        lines += probe_markdown(result["action_probe"])
    for name in files.get("bars", []):
        lines += ["Each headline metric beside its controls:", "", f"![metric bars]({name})", ""]
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


def atari_counterfactual_truth(
    data_dir: str, clips: dict[str, np.ndarray], ctx: int, actions: np.ndarray
) -> np.ndarray:
    """uint8 [B, H, S, S, 3]: the frames the emulator shows when, from each clip's last
    context frame, it plays `actions` int [B, C+H] (indices ctx-1.. drive the H generated
    steps, as in the rollout) instead of the recorded ones.

    clips: held-out records of an Atari dataset, with "episode_id", "t", "action" int
    [B, C+H] and "frame" uint8 [B, C+H, S, S, 3]. The recorded actions are played from the
    same emulator state too: DatasetError unless they reproduce the recorded frames, the
    proof that the counterfactual starts from the true state."""
    frames = clips["frame"]
    steps = slice(ctx - 1, frames.shape[1] - 1)  # the actions taking frame ctx-1 to ctx, ..., to the last
    branches = [
        atari.branch_frames(
            data_dir,
            int(clips["episode_id"][b, 0]),
            int(clips["t"][b, ctx - 1]),
            [clips["action"][b, steps], actions[b, steps]],
        )
        for b in range(len(frames))
    ]
    factual, counterfactual = np.stack(branches, axis=1)  # [2, B, H, S, S, 3] -> two [B, H, ...]
    if not np.array_equal(factual, frames[:, ctx:]):
        raise DatasetError(f"replaying the recorded actions of {data_dir} does not reproduce its held-out frames")
    return counterfactual


def procedural_counterfactual_truth(
    source_params: dict, clips: dict[str, np.ndarray], ctx: int, actions: np.ndarray
) -> dict[str, np.ndarray]:
    """What the procedural world shows when, from each clip's last context frame, it plays
    `actions` int [B, C+H] (indices ctx-1.. drive the H generated steps, as in the rollout)
    instead of the recorded ones: "frame" uint8 [B, H, S, S, 3], "entity_boxes" float32
    [B, H, E, 4], "entity_visible" bool [B, H, E], and "same_context" bool [B]: whether the
    clip's context frames stay as recorded (always in world version 3; a version-2 cut
    frames its shot by looking ahead at the agent's path, so later actions can reframe it).

    clips: held-out records with "episode_id", "t" and "frame" [B, C+H, ...]; source_params:
    the dataset manifest's. Each episode is first regenerated with its recorded actions:
    DatasetError unless that reproduces the clip's frames bit for bit."""
    frames, branches = clips["frame"], []
    for b in range(len(frames)):
        episode, t0 = int(clips["episode_id"][b, 0]), int(clips["t"][b, 0])
        span = slice(t0, t0 + frames.shape[1])
        if not np.array_equal(procedural.replay(source_params, episode)["frame"][span], frames[b]):
            raise DatasetError(
                f"regenerating episode {episode} from the manifest's source_params does not reproduce "
                "its held-out frames"
            )
        branch = procedural.replay(source_params, episode, t0 + ctx - 1, actions[b, ctx - 1 : -1])
        branches.append({k: branch[k][span] for k in ("frame", "entity_boxes", "entity_visible")})
    out = {k: np.stack([br[k] for br in branches]) for k in branches[0]}
    same = (out["frame"][:, :ctx] == frames[:, :ctx]).all(axis=(1, 2, 3, 4))
    return {"same_context": same, **{k: v[:, ctx:] for k, v in out.items()}}


def counterfactual_metrics(
    manifest: dict,
    data_dir: str,
    clips: dict[str, np.ndarray],
    ctx: int,
    actions: np.ndarray,
    generated: np.ndarray,
    copy_last: np.ndarray,
) -> dict | None:
    """The counterfactual group: `M.counterfactual_following` of the rollout generated uint8
    [B, H, ...] under `actions` int [B, C+H] (copy_last [B, H, ...] the frozen control)
    against the simulator's frames under those actions (Atari's emulator or the procedural
    world). Procedural: the agent is scored at the generated steps before any cut (a cut
    reframes the view around the agent), on the clips whose context the branch leaves
    as recorded; None if there is none."""
    factual = clips["frame"][:, ctx:]
    if manifest["source"] == atari.SOURCE_NAME:
        truth = atari_counterfactual_truth(data_dir, clips, ctx, actions)
        return {**M.counterfactual_following(generated, truth, factual, copy_last), "num_clips": len(factual)}
    branch = procedural_counterfactual_truth(manifest["source_params"], clips, ctx, actions)
    keep = branch["same_context"]
    if not keep.any():
        telemetry.info("counterfactual metrics skipped: the random actions reframe every clip's context")
        return None
    agent_steps = M.before_first_cut(clips["cut"][keep, ctx:])
    scores = M.counterfactual_following(
        generated[keep], branch["frame"][keep], factual[keep], copy_last[keep], agent_steps
    )
    return {**scores, "num_clips": int(keep.sum()), "num_clips_reframed": int((~keep).sum())}


def rollout_metrics(
    clips: dict[str, np.ndarray], ctx: int, gen_true: np.ndarray, gen_random: np.ndarray, copy_last: np.ndarray
) -> dict[str, dict]:
    """The rollout, rollout_random_actions, baseline_copy_last (PSNR/SSIM per horizon step)
    and controllability (Genie's ΔtPSNR) groups. gen_true / gen_random / copy_last: uint8
    [B, H, h, w, 3], the generated steps only; clips: records [B, C+H, ...]."""
    truth = clips["frame"][:, ctx:]
    hs = list(range(1, truth.shape[1] + 1))
    out = {
        name: {
            "horizon": hs,
            "psnr": [float(v) for v in M.psnr_per_horizon(truth, video)],
            "ssim": [float(v) for v in M.ssim_per_horizon(truth, video)],
        }
        for name, video in (
            ("rollout", gen_true),
            ("rollout_random_actions", gen_random),
            ("baseline_copy_last", copy_last),
        )
    }
    true_psnr, random_psnr = out["rollout"]["psnr"], out["rollout_random_actions"]["psnr"]
    cut = clips["cut"][:, ctx:] if "cut" in clips else None
    out["controllability"] = {
        "psnr_true_actions": float(np.mean(true_psnr)),
        "psnr_random_actions": float(np.mean(random_psnr)),
        "delta_psnr": M.delta_psnr(np.asarray(true_psnr), np.asarray(random_psnr)),
        **M.delta_psnr_summary(M.psnr(truth, gen_true), M.psnr(truth, gen_random), cut),
    }
    return out


def ground_truth_metrics(
    clips: dict[str, np.ndarray], ctx: int, gen_true: np.ndarray, gen_random: np.ndarray, copy_last: np.ndarray
) -> dict[str, dict]:
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
        "identity_persistence": M.identity_persistence(
            gen, reference, boxes[:, ctx:], visible[:, ctx:], clips["cut"][:, ctx:]
        ),
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
    actions = np.concatenate(
        [
            np.asarray(infer(lam, lam_params, clips["frame"][i : i + cfg.eval.batch_size]))
            for i in range(0, n, cfg.eval.batch_size)
        ]
    )
    return {**clips, "action": actions, "action_valid": np.ones(actions.shape, bool)}


def draw_random_actions(cfg: Config, manifest: dict, actions: np.ndarray, ctx: int) -> tuple[np.ndarray, bool]:
    """actions int [B, C+H] with those from index ctx-1 on (the one into the first generated
    frame onwards) drawn at random (seed `cfg.seed`), and whether the dataset's simulator
    can replay them (counterfactual truth: Atari's emulator, the procedural world). A
    simulator replays only its own actions: they are drawn from those where it can, from
    the latent actions for a run on inferred ones, else from the model's action vocabulary."""
    vocab = cfg.model.dynamics.num_actions
    world_actions = {
        atari.SOURCE_NAME: manifest["source_params"].get("num_actions"),
        procedural.SOURCE_NAME: procedural.NUM_ACTIONS,
    }.get(manifest["source"])
    replayable = world_actions is not None and not cfg.train.latent_actions_workdir
    if replayable:
        vocab = min(vocab, world_actions)
    elif cfg.train.latent_actions_workdir:
        vocab = cfg.model.latent_actions.num_latent_actions
        if world_actions is not None:
            telemetry.info("counterfactual metrics skipped: random latent actions are no simulator actions")
    random_actions = actions.copy()
    random_actions[:, ctx - 1 :] = np.random.default_rng(cfg.seed).integers(0, vocab, actions[:, ctx - 1 :].shape)
    return random_actions, replayable


@dataclass(frozen=True)
class _Models:
    """A restored run's networks: the tokenizer and the dynamics model (dyn_params None for a tokenizer run)."""

    step: int
    tokenizer: VideoTokenizer
    tok_params: Any
    dynamics: DynamicsModel
    dyn_params: Any
    chunk: int  # frames the tokenizer encodes at a time (data.frames_per_clip)


@dataclass(frozen=True)
class _Generated:
    """What the models made from the clips: uint8 videos [B, C+H, h, w, 3] (context
    reconstructed) and the action probe's frames."""

    recon: np.ndarray  # the tokenizer's reconstruction
    true_actions: np.ndarray | None  # rollout with the clips' actions (None: no dynamics model)
    random_actions: np.ndarray | None  # rollout with `draw_random_actions`' actions
    probed: np.ndarray | None  # the action probe's forced next frames (None: probe not run)


def _run_config(workdir: Path, overrides: list[str], tokenizer_workdir: str | None = None) -> Config:
    """The run's config with `overrides` applied (ConfigError for any but `eval.*` keys),
    reading its tokenizer from `tokenizer_workdir` when given (`run.with_tokenizer_run`)."""
    cfg = load_run_config(workdir)
    if any(not o.startswith("eval.") for o in overrides):
        raise config_lib.ConfigError(f"wm eval takes eval.* overrides only; got {list(overrides)}")
    cfg = config_lib.replace(cfg, list(overrides))
    if tokenizer_workdir is None:
        return cfg
    if is_bundle(workdir):
        raise config_lib.ConfigError(f"{workdir} is a bundle: it carries its own tokenizer")
    return with_tokenizer_run(cfg, tokenizer_workdir)


def _restore_models(workdir: Path, cfg: Config, step: int | None, mesh: Any, rules: Any) -> _Models:
    """`workdir`'s checkpoint at `step` (None: the latest) and, for a dynamics run, its tokenizer's."""
    params, _, step = restore_params(workdir, mesh, rules, step)
    if get_stage(cfg.train.stage).role is Role.TOKENIZER:
        tok_params, dyn_params = params, None
    else:
        tok_params, _, _ = restore_params(tokenizer_source(workdir, cfg), mesh, rules)
        dyn_params = params
    return _Models(
        step, VideoTokenizer(cfg.model), tok_params, DynamicsModel(cfg.model), dyn_params, cfg.data.frames_per_clip
    )


def _eval_clips(cfg: Config, data_dir: str, models: _Models, mesh: Any, rules: Any) -> dict[str, np.ndarray]:
    """The held-out clips of C+H frames; a dynamics run on latent actions gets its actions inferred."""
    clips = held_out_clips(data_dir, cfg, cfg.eval.context_frames + cfg.eval.horizon)
    if models.dyn_params is not None and cfg.train.latent_actions_workdir:
        clips = with_inferred_actions(clips, cfg, mesh, rules)
    return clips


def _probe_moves(manifest: dict, replayable: bool, has_dynamics: bool) -> np.ndarray | None:
    """The action probe's action -> agent move map (`procedural.agent_moves`); None: no probe."""
    # The probe needs the world's action -> motion map: the procedural world's, with its actions.
    moves = (
        procedural.agent_moves(manifest["source_params"]["size"])
        if replayable and manifest["source"] == procedural.SOURCE_NAME
        else None
    )
    if moves is None and has_dynamics:
        telemetry.info("action probe skipped: it needs the procedural world's actions (a known action -> motion map)")
    return moves


def _generate(
    cfg: Config,
    models: _Models,
    clips: dict[str, np.ndarray],
    random_actions: np.ndarray,
    probe_moves: np.ndarray | None,
) -> _Generated:
    """Batch by batch: the clips' reconstruction and, with a dynamics model, its rollouts
    with the true and the random actions and the action probe's frames (with `probe_moves`)."""
    ctx, horizon, chunk = cfg.eval.context_frames, cfg.eval.horizon, models.chunk
    tokenizer, tok_params = models.tokenizer, models.tok_params
    dynamics, dyn_params = models.dynamics, models.dyn_params
    frames, actions = clips["frame"], clips["action"]
    n = frames.shape[0]
    steering = [k for k in ("camera", "camera_valid", "cut", "action_valid") if k in clips]

    def reference(s: slice) -> jax.Array | None:
        """The identity bank's reference codes [B, N, L] of clips s (None: no bank)."""
        if "reference" in clips and cfg.model.dynamics.use_identity_bank:
            return encode_frames(tokenizer, tok_params, clips["reference"][s, :1], chunk)[0][:, 0]
        return None

    def generate(context: jax.Array, acts: np.ndarray, s: slice, ref: jax.Array | None) -> np.ndarray:
        """Context codes [B,C,N,L] + actions (and the clips' camera, cuts, reference) ->
        uint8 frames [B,C+H,...] (context reconstructed)."""
        controls = make_controls({"action": acts, **{k: clips[k][s] for k in steering}})
        key = jax.random.fold_in(jax.random.key(cfg.seed), s.start)  # the same draws for true and random actions
        new, _ = rollout(
            dynamics,
            dyn_params,
            context,
            controls,
            horizon,
            ref,
            key=key,
            temperature=cfg.eval.temperature,
            top_k=cfg.eval.top_k,
            guidance=cfg.eval.guidance,
        )
        video = decode_codes(tokenizer, tok_params, jnp.concatenate([context, new], axis=1), chunk)
        if cfg.eval.render == "carry":  # static patches keep the last real frame's pixels
            codes = jnp.concatenate([context[:, -1:], new], axis=1)
            video[:, ctx:] = carry_unchanged(video[:, ctx:], codes, frames[s, ctx - 1], cfg.model.tokenizer.patch_size)
        return video

    recon, gen_true, gen_random, probed = [], [], [], []
    for i in range(0, n, cfg.eval.batch_size):
        s = slice(i, min(i + cfg.eval.batch_size, n))
        codes, _ = encode_frames(tokenizer, tok_params, frames[s], chunk)
        recon.append(decode_codes(tokenizer, tok_params, codes, chunk))
        if dyn_params is not None:
            ref = reference(s)
            gen_true.append(generate(codes[:, :ctx], actions[s], s, ref))
            gen_random.append(generate(codes[:, :ctx], random_actions[s], s, ref))
        if dyn_params is not None and probe_moves is not None:
            steps = {k: clips[k][s, : ctx + 1] for k in ["action", *steering]}
            probed.append(
                action_probe.forced_next_frames(
                    dynamics, dyn_params, tokenizer, tok_params, codes[:, :ctx], steps, len(probe_moves), ref, chunk
                )
            )
    joined = lambda videos, axis=0: np.concatenate(videos, axis=axis) if videos else None
    return _Generated(joined(recon), joined(gen_true), joined(gen_random), joined(probed, axis=1))


def _result_header(
    workdir: Path, step: int, cfg: Config, manifest: dict, data_dir: str, num_clips: int
) -> dict[str, Any]:
    """The metrics dict's opening keys: what was evaluated (checkpoint, data, sampling)."""
    return {
        "step": step,
        "checkpoint": str(workdir) if is_bundle(workdir) else str(ckpt.checkpoint_dir(workdir) / str(step)),
        "dataset_hash": manifest["content_hash"],
        "workdir": str(workdir),
        "data_dir": str(data_dir),
        "split": cfg.eval.split,
        "num_clips": int(num_clips),
        "sampling": {
            "temperature": cfg.eval.temperature,
            "top_k": cfg.eval.top_k,
            "guidance": cfg.eval.guidance,
            "render": cfg.eval.render,
        },
    }


def _dynamics_metrics(
    cfg: Config,
    manifest: dict,
    data_dir: str,
    clips: dict[str, np.ndarray],
    gen: _Generated,
    random_actions: np.ndarray,
    counterfactual: bool,
    probe_moves: np.ndarray | None,
) -> dict:
    """The rollout groups, and the controllability, counterfactual and action-probe groups
    where the dataset allows them (each skip logged)."""
    ctx, horizon = cfg.eval.context_frames, cfg.eval.horizon
    frames = clips["frame"]
    copy_last = np.repeat(frames[:, ctx - 1 : ctx], horizon, axis=1)
    result = rollout_metrics(clips, ctx, gen.true_actions[:, ctx:], gen.random_actions[:, ctx:], copy_last)
    if all(k in clips for k in GROUND_TRUTH):
        result.update(ground_truth_metrics(clips, ctx, gen.true_actions, gen.random_actions, copy_last))
    else:
        telemetry.info(
            f"controllability metrics skipped: the dataset lacks {[k for k in GROUND_TRUTH if k not in clips]}"
        )
    if counterfactual:
        cf = counterfactual_metrics(
            manifest, data_dir, clips, ctx, random_actions, gen.random_actions[:, ctx:], copy_last
        )
        if cf is not None:
            result["counterfactual"] = cf
    if gen.probed is not None:
        result["action_probe"] = action_probe.probe_scores(gen.probed, probe_moves, ~clips["cut"][:, ctx])
    return result


def _write_outputs(result: dict, out: Path, frames: np.ndarray, gen: _Generated, video_clips: int) -> dict:
    """Writes the plots, the video grid of the first `video_clips` clips, report.md and
    metrics.json under `out`; returns the JSON-safe metrics."""
    files: dict[str, list[str]] = {}
    out.mkdir(parents=True, exist_ok=True)
    shown = min(video_clips, len(frames))
    if gen.true_actions is not None:
        plot_drift(result, out / "psnr_vs_horizon.png")
        files["video"] = write_video(video_grid(frames[:shown], gen.true_actions[:shown]), out / "rollout")
    else:
        files["video"] = write_video(video_grid(frames[:shown], gen.recon[:shown]), out / "reconstruction")
    plot_metric_bars(result, out / "metrics_bars.png")
    files["bars"] = ["metrics_bars.png"]
    (out / "report.md").write_text(report_markdown(result, files))  # "nan" where nothing was measured
    result = json_safe(result)
    (out / "metrics.json").write_text(json.dumps(result, indent=2, allow_nan=False))
    return result


def evaluate(
    workdir: str | Path,
    *,
    step: int | None = None,
    data_dir: str | None = None,
    out_dir: str | Path | None = None,
    overrides: list[str] = (),
    tokenizer_workdir: str | None = None,
) -> dict:
    """Restores `workdir`'s checkpoint and writes the eval report; returns the metrics dict.
    overrides: `eval.*` config keys (KEY=VALUE) for this evaluation, e.g. eval.guidance=2;
    tokenizer_workdir: the tokenizer run of a dynamics run moved without it, in place of
    its `train.tokenizer_workdir` (as `data_dir` replaces its `data.dir`)."""
    workdir = Path(workdir)
    cfg = _run_config(workdir, overrides, tokenizer_workdir)
    if get_stage(cfg.train.stage).role is Role.ACTION_LABELER:  # no frames to generate: its evaluation is the probe
        return evaluate_probe(workdir, step=step, data_dir=data_dir, out_dir=out_dir)
    data_dir = data_dir or cfg.data.dir
    manifest = check_dataset(cfg, data_dir, cfg.eval.split)
    mesh = sharding.make_mesh(MeshConfig())  # whatever devices are here
    rules = sharding.logical_rules(cfg.mesh)
    models = _restore_models(workdir, cfg, step, mesh, rules)
    clips = _eval_clips(cfg, data_dir, models, mesh, rules)
    random_actions, counterfactual = draw_random_actions(cfg, manifest, clips["action"], cfg.eval.context_frames)
    probe_moves = _probe_moves(manifest, counterfactual, models.dyn_params is not None)
    gen = _generate(cfg, models, clips, random_actions, probe_moves)
    result = {
        **_result_header(workdir, models.step, cfg, manifest, data_dir, len(clips["frame"])),
        "tokenizer": {"psnr": float(M.psnr(clips["frame"], gen.recon).mean())},
    }
    if models.dyn_params is not None:
        result.update(
            _dynamics_metrics(cfg, manifest, data_dir, clips, gen, random_actions, counterfactual, probe_moves)
        )
    return _write_outputs(
        result, Path(out_dir) if out_dir else workdir / "eval", clips["frame"], gen, cfg.eval.video_clips
    )
