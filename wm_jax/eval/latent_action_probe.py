"""Latent action probe: how much of the true action a trained LAM's latent actions carry.

The LAM never sees action labels. Where a dataset has them, two small classifiers are
fitted on the transitions of one split (the LAM's training split) and scored on held-out
clips (`eval.split`):
- majority map: each latent action -> the true action it co-occurs with most (a
  contingency table);
- linear probe: softmax regression on the LAM's pre-quantization latents (optax, full batch).
Chance is the held-out majority-class rate, the best any constant guess scores.
Transitions into a shot cut are left out: the next frame is a new view, not the action's effect.

`wm eval --workdir RUN` on a `latent_actions` run writes the result as the
`latent_actions` group of `eval/metrics.json`, plus `eval/report.md`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from wm_jax import checkpoint as ckpt
from wm_jax import sharding
from wm_jax.config import MeshConfig
from wm_jax.eval.clips import held_out_clips
from wm_jax.models.latent_actions import LatentActionModel
from wm_jax.run import check_dataset, is_bundle, load_run_config, restore_params
from wm_jax.stages.base import frames_to_float

Transitions = dict[str, np.ndarray]  # latent int [M], feature float32 [M, D], action int [M]


def contingency(latents: np.ndarray, actions: np.ndarray, num_latents: int, num_actions: int) -> np.ndarray:
    """latents int [M], actions int [M] -> counts int64 [num_latents, num_actions]."""
    table = np.zeros((num_latents, num_actions), np.int64)
    np.add.at(table, (latents, actions), 1)
    return table


def majority_map(table: np.ndarray) -> np.ndarray:
    """counts [K, A] -> int64 [K]: each latent's most frequent action; a latent never seen
    maps to the most frequent action overall."""
    return np.where(table.sum(axis=1) > 0, table.argmax(axis=1), table.sum(axis=0).argmax())


def chance_rate(actions: np.ndarray, num_actions: int) -> float:
    """Majority-class rate of actions int [M]: the accuracy of the best constant guess."""
    return float(np.bincount(actions, minlength=num_actions).max() / max(len(actions), 1))


def fit_linear_probe(
    features: np.ndarray,
    actions: np.ndarray,
    num_actions: int,
    *,
    steps: int = 300,
    learning_rate: float = 0.05,
    weight_decay: float = 1e-3,
) -> dict[str, jax.Array]:
    """Softmax regression features float [M, D] -> actions int [M]: {"w": [D, A], "b": [A]}.

    Full-batch AdamW from zero weights: deterministic, and convex so it needs no tuning.
    """
    x, y = jnp.asarray(features, jnp.float32), jnp.asarray(actions, jnp.int32)
    params = {"w": jnp.zeros((x.shape[1], num_actions)), "b": jnp.zeros((num_actions,))}
    tx = optax.adamw(learning_rate, weight_decay=weight_decay)

    def loss(p: dict[str, jax.Array]) -> jax.Array:
        return optax.softmax_cross_entropy_with_integer_labels(x @ p["w"] + p["b"], y).mean()

    def update(_: int, carry: tuple) -> tuple:
        p, opt_state = carry
        updates, opt_state = tx.update(jax.grad(loss)(p), opt_state, p)
        return optax.apply_updates(p, updates), opt_state

    params, _ = jax.jit(lambda c: jax.lax.fori_loop(0, steps, update, c))((params, tx.init(params)))
    return params


def linear_predict(params: dict[str, jax.Array], features: np.ndarray) -> np.ndarray:
    """features float [M, D] -> predicted actions int [M]."""
    return np.asarray(jnp.argmax(jnp.asarray(features, jnp.float32) @ params["w"] + params["b"], axis=-1))


def probe_scores(train: Transitions, test: Transitions, num_latents: int, num_actions: int) -> dict[str, Any]:
    """Fits both probes on `train`, scores them on `test` against chance (see module doc)."""
    table = contingency(train["latent"], train["action"], num_latents, num_actions)
    mapping = majority_map(table)
    linear = fit_linear_probe(train["feature"], train["action"], num_actions)
    return {
        "chance": chance_rate(test["action"], num_actions),
        "majority_map_accuracy": float(np.mean(mapping[test["latent"]] == test["action"])),
        "linear_accuracy": float(np.mean(linear_predict(linear, test["feature"]) == test["action"])),
        "latents_used": int((table.sum(axis=1) > 0).sum()),
        "num_train": int(len(train["action"])),
        "num_test": int(len(test["action"])),
        "latent_to_action": mapping.tolist(),
        "contingency_train": table.tolist(),
    }


def transitions(model: LatentActionModel, params: Any, clips: dict[str, np.ndarray], batch_size: int) -> Transitions:
    """Latent actions, pre-quantization latents and true actions of every transition of
    clips (frame uint8 [B,T,S,S,3], action int [B,T], cut bool [B,T]), flattened to [M]
    and without the transitions into a cut."""
    encode = jax.jit(lambda p, f: model.apply({"params": p}, frames_to_float(f), method=model.encode))
    latents, features = [], []
    for i in range(0, len(clips["frame"]), batch_size):
        z, quantized = encode(params, clips["frame"][i : i + batch_size])
        features.append(np.asarray(z))
        latents.append(np.asarray(quantized.indices))
    keep = ~clips["cut"][:, 1:]
    return {
        "latent": np.concatenate(latents)[keep],
        "feature": np.concatenate(features)[keep],
        "action": np.asarray(clips["action"][:, :-1])[keep],
    }


def report_markdown(result: dict[str, Any]) -> str:
    """The probe's figures and its train-split contingency table as Markdown."""
    p = result["latent_actions"]
    lines = [
        f"# Latent action probe of `{result['workdir']}` at step {result['step']}",
        "",
        f"Probes fitted on {p['num_train']} transitions of split `{p['train_split']}`, scored on "
        f"{p['num_test']} of split `{p['test_split']}`; dataset `{result['data_dir']}` "
        f"(content hash `{result['dataset_hash'][:16]}…`).",
        "",
        "| metric | held-out accuracy |",
        "|---|---|",
        f"| chance (majority-class rate) | {p['chance']:.3f} |",
        f"| majority map latent → action | {p['majority_map_accuracy']:.3f} |",
        f"| linear probe on pre-quantization latents | {p['linear_accuracy']:.3f} |",
        "",
        f"Latent actions used on the train split: {p['latents_used']}. Contingency (rows: latent, "
        "columns: true action, train split):",
        "",
        "| latent | " + " | ".join(f"a{a}" for a in range(len(p["contingency_train"][0]))) + " | mapped to |",
        "|---" * (len(p["contingency_train"][0]) + 2) + "|",
    ]
    for k, row in enumerate(p["contingency_train"]):
        lines.append(f"| {k} | " + " | ".join(str(c) for c in row) + f" | a{p['latent_to_action'][k]} |")
    return "\n".join(lines) + "\n"


def evaluate_probe(
    workdir: str | Path,
    *,
    step: int | None = None,
    data_dir: str | None = None,
    out_dir: str | Path | None = None,
    train_clips: int = 256,
) -> dict[str, Any]:
    """Restores a `latent_actions` run, fits the probes on up to `train_clips` clips of its
    training split, scores them on `eval.num_clips` clips of `eval.split`; writes
    `metrics.json` and `report.md` under `out_dir` (default RUN/eval) and returns the metrics."""
    workdir = Path(workdir)
    cfg = load_run_config(workdir)
    data_dir = data_dir or cfg.data.dir
    manifest = check_dataset(cfg, data_dir, cfg.eval.split)  # the loader names a missing train split
    mesh = sharding.make_mesh(MeshConfig())  # whatever devices are here
    params, _, step = restore_params(workdir, mesh, sharding.logical_rules(cfg.mesh), step)
    model = LatentActionModel(cfg.model)
    t = cfg.data.frames_per_clip
    split_transitions = {
        split: transitions(
            model, params, held_out_clips(data_dir, cfg, t, split=split, num_clips=n), cfg.eval.batch_size
        )
        for split, n in ((cfg.data.split, train_clips), (cfg.eval.split, cfg.eval.num_clips))
    }
    lc = cfg.model.latent_actions
    scores = probe_scores(
        split_transitions[cfg.data.split],
        split_transitions[cfg.eval.split],
        lc.num_latent_actions,
        cfg.model.dynamics.num_actions,
    )
    result = {
        "step": step,
        "checkpoint": str(workdir) if is_bundle(workdir) else str(ckpt.checkpoint_dir(workdir) / str(step)),
        "dataset_hash": manifest["content_hash"],
        "workdir": str(workdir),
        "data_dir": str(data_dir),
        "latent_actions": {"train_split": cfg.data.split, "test_split": cfg.eval.split, **scores},
    }
    out = Path(out_dir) if out_dir else workdir / "eval"
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(report_markdown(result))
    (out / "metrics.json").write_text(json.dumps(result, indent=2))
    return result
