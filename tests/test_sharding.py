"""Mesh layouts, DCN (multi-slice) device order, divisibility errors, and the headline
check: every layout trains like one device."""

import json

import numpy as np
import pytest

from conftest import PRESET
from multiproc import run_python
from wm_jax import config as config_lib
from wm_jax import sharding
from wm_jax.config import ConfigError, MeshConfig


def test_slice_shapes_resolve_minus_one_inside_a_slice():
    assert sharding.slice_shapes(MeshConfig(data=-1, tensor=2), 8) == ((4, 1, 2, 1), (1, 1, 1, 1))
    cfg = MeshConfig(data=-1, fsdp=2, dcn_data=2)
    assert sharding.slice_shapes(cfg, 8) == ((2, 2, 1, 1), (2, 1, 1, 1))
    assert sharding.mesh_shape(cfg, 8) == (4, 2, 1, 1)


@pytest.mark.parametrize(
    "cfg, devices, message",
    [
        (MeshConfig(data=2, fsdp=2), 8, "multiply to 4 but there are the 8 devices"),
        (MeshConfig(data=-1, tensor=3), 8, "fixed axes multiply to 3"),
        (MeshConfig(data=-1, dcn_data=3), 8, "make 3 slices"),
        (MeshConfig(data=-1, fsdp=-1), 8, "at most one axis may be -1"),
    ],
)
def test_bad_mesh_sizes_name_the_keys(cfg, devices, message):
    with pytest.raises(ConfigError, match=message):
        sharding.slice_shapes(cfg, devices)


class _Dev:
    """A stand-in device: only its id and slice matter to the arrangement."""

    device_kind = platform = "cpu"

    def __init__(self, id_: int, granule: int):
        self.id, self.granule = id_, granule

    def __repr__(self) -> str:
        return f"d{self.id}"


def test_hybrid_array_keeps_slices_contiguous_inside_each_axis():
    devices = [_Dev(i, i // 4) for i in range(8)]  # two slices of four
    ici, dcn = (2, 2, 1, 1), (2, 1, 1, 1)
    arr = sharding.hybrid_device_array(ici, dcn, devices, granule_of=lambda d: d.granule)
    assert arr.shape == (4, 2, 1, 1)
    granule = np.vectorize(lambda d: d.granule)(arr)[:, :, 0, 0]
    # data axis: first two rows are slice 0, last two slice 1; fsdp stays inside a slice
    np.testing.assert_array_equal(granule, [[0, 0], [0, 0], [1, 1], [1, 1]])
    assert sorted(d.id for d in arr.ravel()) == list(range(8))
    with pytest.raises(ConfigError, match="ask for 4 slices but the devices form 2"):
        sharding.hybrid_device_array((2, 1, 1, 1), (4, 1, 1, 1), devices, granule_of=lambda d: d.granule)


def test_rules_must_not_share_logical_names():
    with pytest.raises(ConfigError, match="both name \\['embed'\\]"):
        config_lib.load(None, ["mesh.activation_rules=[[batch, [data]], [embed, [fsdp]]]"])
    with pytest.raises(ConfigError, match="unknown mesh axis 'tensr'.*tensor"):
        config_lib.load(None, ["mesh.param_rules=[[mlp, [tensr]]]"])


def test_indivisible_parameter_is_named_with_shape_and_axes():
    code = (
        "import jax\nfrom wm_jax import config as c, sharding as s\nfrom wm_jax.train.state import state_shardings\n"
        f"cfg = c.load({str(PRESET)!r}, ['model.dynamics.embed_dim=60', 'model.dynamics.num_heads=4', "
        "'train.stage=dynamics', 'mesh.data=1', 'mesh.fsdp=8'])\n"
        "state_shardings(cfg, s.make_mesh(cfg.mesh), s.logical_rules(cfg.mesh))\n"
    )
    out = run_python(["-c", code], devices=8)
    assert out.returncode != 0
    assert "ConfigError: parameter action_embed/no_action of shape (60,): dimension 0 (60)" in out.stderr
    assert "('fsdp',) (8 shards)" in out.stderr


# Trains 5 steps of one config on real loader batches under each layout (one process,
# 8 fake CPU devices) and prints losses and the parameter specs per layout.
_LAYOUT_SCRIPT = """
import json, sys
import jax, numpy as np
from flax import linen as nn
from data_pipelines.loader import make_loader
from wm_jax import config as config_lib, sharding
from wm_jax.train.state import create_train_state, state_shardings
from wm_jax.train.step import batch_fields, jit_train_step

base = config_lib.load(sys.argv[1], json.loads(sys.argv[2]))
loader = make_loader(base.data.dir, split="train", frames_per_clip=base.data.frames_per_clip,
                     batch_size=base.data.batch_size, seed=0)
it = iter(loader)
batches = [{k: b[k] for k in batch_fields(base, b)} for b in (next(it) for _ in range(5))]
out = {}
for layout in json.loads(sys.argv[3]):
    sizes = dict(zip(sharding.MESH_AXES, layout))
    cfg = config_lib.replace(base, [f"mesh.{k}={v}" for k, v in sizes.items()])
    devices = jax.devices()[: int(np.prod(layout))]
    mesh = sharding.make_mesh(cfg.mesh, devices)
    rules = sharding.logical_rules(cfg.mesh)
    _, shardings = state_shardings(cfg, mesh, rules)
    state = create_train_state(cfg, mesh, rules, shardings)
    tok = None
    if cfg.train.stage == "dynamics":
        tok_shardings = state_shardings(cfg, mesh, rules, stage="tokenizer")[1]
        tok = {"tokenizer": create_train_state(cfg, mesh, rules, tok_shardings, stage="tokenizer").params}
    step_fn = jit_train_step(cfg, mesh, rules, shardings, None if tok is None else jax.tree.map(lambda x: x.sharding, tok),
                             batch_fields(cfg, batches[0]))
    losses = []
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        for b in batches:
            state, metrics = step_fn(state, sharding.shard_batch(b, mesh, rules), tok)
            losses.append(float(metrics["loss"]))
    specs = {jax.tree_util.keystr(p): [list(a) if isinstance(a, tuple) else a for a in x.sharding.spec]
             for p, x in jax.tree_util.tree_leaves_with_path(state.params)}
    out[json.dumps(layout)] = {"losses": losses, "specs": specs}
print(json.dumps(out))
"""

LAYOUTS = [(1, 1, 1, 1), (8, 1, 1, 1), (1, 8, 1, 1), (2, 2, 2, 1), (2, 1, 2, 2)]


def _layout_results(overrides: list[str], layouts: list[tuple]) -> dict:
    out = run_python(["-c", _LAYOUT_SCRIPT, str(PRESET), json.dumps(overrides), json.dumps(layouts)], devices=8)
    assert out.returncode == 0, out.stderr[-4000:]
    return {tuple(json.loads(k)): v for k, v in json.loads(out.stdout.strip().splitlines()[-1]).items()}


def _expected_spec(logical_axes: tuple) -> list:
    """What the default param rules say a parameter's PartitionSpec is."""
    rules = dict(MeshConfig().param_rules)
    return [(rules[n][0] if len(rules[n]) == 1 else list(rules[n]) or None) for n in logical_axes]


def _mesh_spec(spec: list, rank: int) -> list:
    """A JSON'd PartitionSpec padded to `rank`, one-axis tuples read as the axis."""
    norm = [(s[0] if isinstance(s, list) and len(s) == 1 else s) for s in spec]
    return norm + [None] * (rank - len(norm))


@pytest.mark.multiprocess
@pytest.mark.parametrize("stage", ["tokenizer", pytest.param("dynamics", marks=pytest.mark.slow)])
def test_every_layout_trains_like_one_device(stage, tiny_overrides):
    # 4-level FSQ: the factorized head's 3x4 logits split over tensor=2.
    # The dynamics stage (slow; CI runs it) checks the layout using every kind of split.
    layouts = LAYOUTS if stage == "tokenizer" else [LAYOUTS[0], (2, 1, 2, 2)]
    results = _layout_results(
        tiny_overrides + [f"train.stage={stage}", "model.tokenizer.fsq_levels=[4, 4, 4]"], layouts
    )
    reference = results[LAYOUTS[0]]["losses"]
    assert len(reference) == 5 and np.all(np.isfinite(reference))
    # Sharded float32 sums are reassociated: the tokenizer agrees to ~1e-5. The dynamics
    # stage's targets are FSQ codes, rounded from the tokenizer's output, so a 1e-7 change
    # can flip one of its 384 target tokens (~5e-4 of the mean loss); a sharding bug (a
    # leak across the causal mask, a wrong reduction) moves the loss by far more.
    rtol = 1e-4 if stage == "tokenizer" else 2e-3
    for layout in layouts[1:]:
        np.testing.assert_allclose(results[layout]["losses"], reference, rtol=rtol, err_msg=str(layout))
        specs = results[layout]["specs"]
        mlp_in = next(v for k, v in specs.items() if k.endswith("['mlp']['wi']['kernel']"))
        attn_q = next(v for k, v in specs.items() if k.endswith("['spatial_attn']['query']"))
        assert _mesh_spec(mlp_in, 2) == _expected_spec(("embed", "mlp")), (layout, mlp_in)
        assert _mesh_spec(attn_q, 3) == _expected_spec(("embed", "heads", "kv")), (layout, attn_q)
