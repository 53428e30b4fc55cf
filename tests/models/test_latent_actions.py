"""Latent action model: VQ, shapes, what each output depends on, metadata, FLOPs, the stage end to end."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from conftest import PRESET
from data_pipelines.loader import make_loader
from wm_jax import config as config_lib
from wm_jax.cli import main
from wm_jax.config import LatentActionConfig, ModelConfig
from wm_jax.models import flops
from wm_jax.models.latent_actions import LatentActionModel, l2_normalize, vector_quantize
from wm_jax.telemetry import read_metrics
from wm_jax.train.state import TrainState, build_model, example_inputs, make_optimizer, param_count
from wm_jax.stages.dynamics import dynamics_loss, encode_codes
from wm_jax.stages.latent_actions import LATENT_ACTIONS, infer_latent_actions, latent_action_loss
from wm_jax.train.step import make_train_step

CFG = ModelConfig(
    image_size=8,
    latent_actions=LatentActionConfig(
        patch_size=4, embed_dim=32, num_layers=1, num_heads=2, mlp_dim=64, num_latent_actions=4, latent_dim=8
    ),
)
B, T, K = 2, 5, 4
LAM_OVERRIDES = [
    "train.stage=latent_actions",
    "model.latent_actions.embed_dim=32",
    "model.latent_actions.num_layers=1",
    "model.latent_actions.num_heads=2",
    "model.latent_actions.mlp_dim=64",
]


def _frames(seed=0):
    return jax.random.uniform(jax.random.key(seed), (B, T, 8, 8, 3), minval=-1.0, maxval=1.0)


@pytest.fixture(scope="module")
def lam():
    model = LatentActionModel(CFG)
    return model, jax.jit(model.init)(jax.random.key(1), _frames())


def test_vector_quantize_picks_the_most_similar_code_and_passes_gradients_straight_through():
    codebook = jnp.array([[2.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    z = jnp.array([[2.0, 0.1], [-1.0, 0.2], [0.1, 3.0]])
    q = vector_quantize(z, codebook)
    np.testing.assert_array_equal(q.indices, [0, 2, 1])
    np.testing.assert_allclose(q.codes, [[1, 0], [-1, 0], [0, 1]], atol=1e-6)
    dist = np.mean(np.sum(np.square(np.asarray(q.codes) - np.asarray(l2_normalize(z))), axis=-1))
    np.testing.assert_allclose([q.codebook_loss, q.commitment_loss], [dist, dist], rtol=1e-5)
    w = jnp.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    straight = jax.grad(lambda z: jnp.sum(vector_quantize(z, codebook).codes * w))(z)
    np.testing.assert_allclose(straight, jax.grad(lambda z: jnp.sum(l2_normalize(z) * w))(z), rtol=1e-5)


def test_shapes_and_dtypes(lam):
    model, variables = lam
    pred, q = model.apply(variables, _frames())
    assert pred.shape == (B, T - 1, 8, 8, 3) and pred.dtype == jnp.float32
    assert q.indices.shape == (B, T - 1) and q.indices.dtype == jnp.int32
    assert np.all((np.asarray(q.indices) >= 0) & (np.asarray(q.indices) < K))
    z, _ = model.apply(variables, _frames(), method=model.encode)
    assert z.shape == q.codes.shape == (B, T - 1, 8)
    np.testing.assert_allclose(np.linalg.norm(z, axis=-1), 1.0, rtol=1e-5)


def test_a_transition_depends_on_its_two_frames_only(lam):
    model, variables = lam
    frames = _frames()
    z, _ = model.apply(variables, frames, method=model.encode)
    z2, _ = model.apply(variables, frames.at[:, 2].set(_frames(5)[:, 2]), method=model.encode)
    changed = np.abs(np.asarray(z2 - z)).max(axis=(0, 2)) > 1e-6
    np.testing.assert_array_equal(changed, [False, True, True, False])  # pairs (1,2) and (2,3)


@pytest.mark.parametrize("k", [1, 3])
def test_decoder_is_causal(lam, k):
    """Position t predicts frame t+1 from frames <= t (and its code): later frames do not leak."""
    model, variables = lam
    frames = _frames()
    codes = jax.random.normal(jax.random.key(3), (B, T - 1, 8))
    pred = model.apply(variables, frames, codes, method=model.decode)
    other = model.apply(variables, frames.at[:, k].set(_frames(9)[:, k]), codes, method=model.decode)
    np.testing.assert_array_equal(other[:, :k], pred[:, :k])
    assert np.abs(np.asarray(other[:, k] - pred[:, k])).max() > 1e-4


def test_infer_latent_actions_pads_the_last_step(lam):
    model, variables = lam
    frames = jax.random.randint(jax.random.key(4), (B, T, 8, 8, 3), 0, 256).astype(jnp.uint8)
    actions = jax.jit(infer_latent_actions, static_argnums=0)(model, variables["params"], frames)
    assert actions.shape == (B, T) and actions.dtype == jnp.int32
    _, q = model.apply(variables, frames.astype(jnp.float32) / 127.5 - 1.0, method=model.encode)
    np.testing.assert_array_equal(actions[:, :-1], q.indices)
    np.testing.assert_array_equal(actions[:, -1], 0)


def test_parameters_carry_logical_axes():
    boxed = jax.eval_shape(LatentActionModel(CFG).init, jax.random.key(0), _frames())["params"]
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert leaves and all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
    assert all(len(x.names) == len(x.value.shape) for x in leaves)


def test_bfloat16_activations_give_float32_outputs():
    model = LatentActionModel(dataclasses.replace(CFG, dtype="bfloat16"))
    variables = model.init(jax.random.key(0), _frames())
    pred, q = model.apply(variables, _frames())
    assert pred.dtype == jnp.float32 and np.all(np.isfinite(pred)) and q.codes.dtype == jnp.float32
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nn.meta.unbox(variables)))


def test_forward_flops_match_xla():
    cfg = dataclasses.replace(
        CFG,
        image_size=16,
        latent_actions=dataclasses.replace(CFG.latent_actions, embed_dim=128, mlp_dim=512, num_heads=4),
    )
    model, frames = LatentActionModel(cfg), jnp.zeros((1, 6, 16, 16, 3))
    params = jax.eval_shape(model.init, jax.random.key(0), frames)
    xla = lambda fn: jax.jit(fn).lower(params).compile().cost_analysis()["flops"]
    assert flops.latent_action_forward_flops(cfg, 6) == pytest.approx(xla(lambda p: model.apply(p, frames)), rel=0.05)
    encode = xla(lambda p: model.apply(p, frames, method=model.encode))
    assert flops.latent_action_encode_flops(cfg, 6) == pytest.approx(encode, rel=0.05)


def test_loss_drops_on_a_fixed_batch(tiny_dataset):
    cfg = config_lib.load(
        None,
        [
            *LAM_OVERRIDES,
            "model.image_size=16",
            "data.frames_per_clip=4",
            "data.batch_size=4",
            "train.warmup_steps=1",
            "train.steps=40",
            "train.learning_rate=0.01",
        ],
    )
    loader = make_loader(tiny_dataset, split="train", frames_per_clip=4, batch_size=4, seed=0)
    batch = {"frame": jnp.asarray(next(iter(loader))["frame"])}
    model = build_model(cfg)
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), *example_inputs(cfg))["params"])
    _, metrics = jax.jit(latent_action_loss, static_argnums=1)(params, model, batch)
    assert set(metrics) == {"loss", "psnr", "psnr_copy_last", "vq_distance", "code_usage"}
    state = TrainState.create(params, make_optimizer(cfg.train))
    step = jax.jit(make_train_step(cfg))
    losses = []
    for _ in range(40):  # v3 batches (independent camera) take ~40 steps to halve the loss
        state, metrics = step(state, batch, None)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < 0.75 * losses[0]


def test_stage_trains_resumes_evaluates_and_dry_runs(tmp_path, tiny_overrides, tokenizer_run, capsys):
    """`wm train` on the latent_actions stage: checkpoints, resume, `wm eval` (the probe), --dry-run."""
    run = tmp_path / "lam"
    overrides = [*tiny_overrides, *LAM_OVERRIDES]
    args = lambda *extra: (
        ["train", "--config", str(PRESET), "--workdir", str(run)]
        + [a for o in [*overrides, *extra] for a in ("--set", o)]
    )
    assert main(args("train.steps=4")) == 0
    assert sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == [2, 4]
    assert main(args("train.steps=6")) == 0
    rows = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert all(r["stage"] == "latent_actions" and np.isfinite(r["loss"]) for r in rows)

    assert main(["eval", "--workdir", str(run)]) == 0
    probe = json.loads((run / "eval" / "metrics.json").read_text())["latent_actions"]
    assert probe["num_test"] > 0 and 0 <= probe["majority_map_accuracy"] <= 1 and 0 < probe["chance"] <= 1
    assert "| majority map latent → action |" in (run / "eval" / "report.md").read_text()

    capsys.readouterr()
    assert main(args("data.dir=/nonexistent") + ["--dry-run"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    cfg = config_lib.load(PRESET, [*overrides, "data.dir=/nonexistent"])
    variables = jax.eval_shape(build_model(cfg).init, jax.random.key(0), *example_inputs(cfg))
    assert report["stage"] == "latent_actions" and report["parameters"] == param_count(variables["params"])
    assert report["flops_per_step"] == LATENT_ACTIONS.train_step_flops(cfg) > 0

    # The LAM's actions drive a dynamics run (as on video without labels), and its eval; the
    # frozen tokenizer is the shared tiny run (conftest), which a dynamics run only reads.
    dyn = tmp_path / "dyn"
    dynamics = [
        *overrides,
        "train.stage=dynamics",
        f"train.tokenizer_workdir={tokenizer_run}",
        f"train.latent_actions_workdir={run}",
        "model.dynamics.num_actions=8",
    ]
    dyn_args = lambda *extra: (
        ["train", "--config", str(PRESET), "--workdir", str(dyn)]
        + [a for o in [*dynamics, *extra] for a in ("--set", o)]
    )
    capsys.readouterr()
    assert main(dyn_args("train.steps=2", "model.latent_actions.mlp_dim=32")) == 2
    assert "'model.latent_actions'" in capsys.readouterr().err  # not the LAM that run trained
    assert main(dyn_args("train.steps=2")) == 0
    assert [r["stage"] for r in read_metrics(dyn / "metrics.jsonl")] == ["dynamics", "dynamics"]
    assert main(["eval", "--workdir", str(dyn)]) == 0
    assert np.isfinite(json.loads((dyn / "eval" / "metrics.json").read_text())["controllability"]["delta_psnr"])
    assert main(dyn_args("data.dir=/nonexistent") + ["--dry-run"]) == 0


def test_dynamics_step_uses_the_inferred_actions(lam):
    """With a frozen LAM the step's loss is the dynamics loss under the LAM's actions, whatever
    the batch's own actions say."""
    cfg = config_lib.load(
        None,
        [
            "train.stage=dynamics",
            "train.latent_actions_workdir=lam",
            "model.image_size=8",
            "model.tokenizer.patch_size=4",
            "model.tokenizer.embed_dim=16",
            "model.tokenizer.num_layers=1",
            "model.tokenizer.num_heads=2",
            "model.tokenizer.mlp_dim=32",
            "model.dynamics.embed_dim=16",
            "model.dynamics.num_layers=1",
            "model.dynamics.num_heads=2",
            "model.dynamics.mlp_dim=32",
            "model.dynamics.num_actions=4",
            f"data.frames_per_clip={T}",
            *(
                f"model.latent_actions.{f.name}={getattr(CFG.latent_actions, f.name)}"
                for f in dataclasses.fields(CFG.latent_actions)
            ),
        ],
    )
    model, tokenizer = build_model(cfg), build_model(cfg, "tokenizer")
    init = lambda m, stage: nn.meta.unbox(jax.jit(m.init)(jax.random.key(2), *example_inputs(cfg, stage))["params"])
    frozen = {"tokenizer": init(tokenizer, "tokenizer"), "latent_actions": lam[1]["params"]}
    params = init(model, "dynamics")
    frames = ((np.asarray(_frames(3)) + 1) * 127.5).astype(np.uint8)
    own = {
        "frame": frames,
        "action": np.tile(np.arange(T) % K, (B, 1)).astype(np.int32),
        "action_valid": np.ones((B, T), bool),
    }
    step = jax.jit(make_train_step(cfg))
    state = TrainState.create(params, make_optimizer(cfg.train))
    _, from_step = step(state, own, frozen)
    _, shuffled = step(state, {**own, "action": own["action"][:, ::-1]}, frozen)
    # (jitted: the same programs, without compiling each op of the eager forward passes)
    inferred = jax.jit(infer_latent_actions, static_argnums=0)(lam[0], lam[1]["params"], jnp.asarray(frames))
    codes = jax.jit(encode_codes, static_argnums=0)(tokenizer, frozen["tokenizer"], jnp.asarray(frames))
    loss = jax.jit(lambda batch: dynamics_loss(params, model, batch, codes)[0])
    expect, with_own = loss({**own, "action": inferred}), loss(own)
    assert float(from_step["loss"]) == float(shuffled["loss"])
    np.testing.assert_allclose(float(from_step["loss"]), float(expect), rtol=1e-6)
    assert abs(float(with_own) - float(expect)) > 1e-6
