"""The dynamics stage with the diffusion objective, end to end on a step: frames encoded by
a frozen continuous tokenizer, the loss and the action-sensitivity figure."""

import jax
import jax.numpy as jnp
import numpy as np

from wm_jax import config as config_lib
from wm_jax.stages.dynamics import DYNAMICS
from wm_jax.stages.tokenizer import TOKENIZER


def test_a_diffusion_step_reads_the_frozen_continuous_tokenizer_and_its_controls():
    cfg = config_lib.load(
        None,
        [
            "model.image_size=8",
            "model.tokenizer.patch_size=4",
            "model.tokenizer.bottleneck=continuous",
            "model.tokenizer.latent_dim=4",
            "model.tokenizer.embed_dim=16",
            "model.tokenizer.num_layers=1",
            "model.tokenizer.num_heads=2",
            "model.tokenizer.mlp_dim=32",
            "model.dynamics.embed_dim=16",
            "model.dynamics.num_layers=1",
            "model.dynamics.num_heads=2",
            "model.dynamics.mlp_dim=32",
            "model.dynamics.objective=diffusion",
            "model.dynamics.action_conditioning=adaln",
            "model.dynamics.action_dropout=0.2",
            "data.frames_per_clip=4",
            "data.batch_size=2",
            "train.stage=dynamics",
        ],
    )
    tok_params = jax.jit(TOKENIZER.model(cfg.model).init)(jax.random.key(0), *TOKENIZER.example_inputs(cfg))["params"]
    model = DYNAMICS.model(cfg.model)
    params = jax.jit(model.init)(jax.random.key(1), *DYNAMICS.example_inputs(cfg))["params"]
    rng = np.random.default_rng(0)
    batch = {
        "frame": jnp.asarray(rng.integers(0, 256, (2, 4, 8, 8, 3)), jnp.uint8),
        "action": jnp.asarray(rng.integers(0, 5, (2, 4)), jnp.int32),
    }
    frozen = {TOKENIZER.name: tok_params}
    step = jax.jit(lambda p, k: DYNAMICS.loss(cfg, model, p, batch, frozen, k))
    loss, metrics = step(params, jax.random.key(2))
    assert set(metrics) == {"loss", "x_mse", "flow_x_mse"} and np.isfinite(float(loss)) and float(loss) > 0
    assert float(step(params, jax.random.key(3))[0]) != float(loss)  # the levels and noise follow the step's rng
    sensitivity = DYNAMICS.make_log_metrics(cfg)(params, batch, frozen, jnp.int32(0))["action_sensitivity"]
    assert np.isfinite(float(sensitivity))
