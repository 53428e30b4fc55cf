"""Parameter accounting per module, against counts made by hand for a tiny config."""

import jax

from wm_jax import config as config_lib
from wm_jax.train.state import build_model, example_inputs, param_count, param_counts_by_module

HAND = config_lib.load(
    None,
    [
        "train.stage=dynamics",
        "data.frames_per_clip=4",
        "model.image_size=8",
        "model.tokenizer.patch_size=4",
        "model.tokenizer.fsq_levels=[4,3,3]",
        "model.dynamics.embed_dim=8",
        "model.dynamics.num_layers=1",
        "model.dynamics.num_heads=2",
        "model.dynamics.mlp_dim=16",
        "model.dynamics.head=joint",
    ],
)


def test_dynamics_parameters_per_module_by_hand():
    """D = 8, L = 3 code dims, N = 4 tokens, 5 actions, V = 36, one layer, MLP 16.

    Attention: 3 projections D·2·4 + output 2·4·D = 256; MLP (D·16 + 16) + (16·D + D) = 280;
    three norms of D: the block is 2·256 + 280 + 24 = 816.
    """
    params = jax.eval_shape(build_model(HAND).init, jax.random.key(0), *example_inputs(HAND))["params"]
    expected = {
        "transformer": 816,
        "logits": 8 * 36 + 36,
        "camera_embed": 8 + 7 * 8 + 8,  # "no camera" vector + 7 -> D projection
        "action_embed": 8 + 5 * 8,  # "no action" vector + table
        "code_embed": 3 * 8 + 8,
        "pos_embed": 4 * 8,
        "cut_embed": 8,
        "final_norm": 8,
    }
    assert param_counts_by_module(params) == expected
    assert param_count(params) == sum(expected.values()) == 1340
