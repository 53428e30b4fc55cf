"""A sweep spec and its runs: read and check the spec, expand it into runs with validated
configs (`plan`), record them (`sweep.json`) and read a run's state from its directory.

A spec is YAML (read with `yaml.safe_load`):

    name: actions_ablation
    base: tiny_cpu_dynamics            # preset name or config path (relative: to the spec)
    set: ["train.steps=200"]           # fixed overrides (a list, or a mapping key: value)
    grid: {model.dynamics.use_actions: [true, false]}   # cross product
    arms: {plain: {model.dynamics.use_camera: false}, camera: {}}   # named override sets
    random: {samples: 4, seed: 0, keys: {train.learning_rate: {loguniform: [1e-4, 1e-2]}}}
    seeds: [0, 1]                      # each run gets seed=<s>
    eval: true                         # `evaluate` after training
    metrics: [controllability.delta_psnr, rollout.psnr, train.loss]
    out: runs/sweeps/actions_ablation  # the default: runs/sweeps/<name>

Runs are arm x grid point x random sample x seed (an arm is a named set of overrides, for
settings that are not a cross product, e.g. "actions", "actions + camera"). Every run's
config is built (and so checked against the schema) before anything starts; a bad spec
raises `SweepError`, a `ConfigError`, so the CLI exits 2 naming the key. A run lives in
`<out>/runs/<name>` (its `tb/` too, so `tensorboard --logdir <out>/runs` overlays them) and
`<out>/sweep.json` records the expanded runs. The sweep trains the base config's stage
(`train.stage`); a dynamics sweep needs `train.tokenizer_workdir`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from wm_jax import config as config_lib
from wm_jax.config import Config, ConfigError, closest
from wm_jax.presets import preset_path

SPEC_FIELDS = ("name", "description", "base", "set", "arms", "grid", "random", "seeds", "eval", "metrics", "out")
RANDOM_FIELDS = ("samples", "seed", "keys")
DISTRIBUTIONS = ("choice", "uniform", "loguniform")
# Top-level groups of eval/metrics.json (wm_jax/eval/evaluate.py) a metric path may start
# with; `train.<column>` is the last logged value of a metrics.jsonl column.
EVAL_GROUPS = (
    "step",
    "num_clips",
    "tokenizer",
    "rollout",
    "rollout_random_actions",
    "baseline_copy_last",
    "controllability",
    "action_following",
    "camera_following",
    "identity_persistence",
    "object_permanence",
    "counterfactual",
    "action_probe",
    "sampling",
)
NAME_MAX = 80  # run names longer than this are cut and made unique with a hash
SAFE_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


class SweepError(ConfigError):
    """A bad sweep spec or flag; exits 2 like a bad config."""


@dataclasses.dataclass(frozen=True)
class Run:
    index: int
    name: str
    workdir: str
    varied: dict[str, Any]  # the overrides of this run that differ between runs (seed included)
    overrides: list[str]  # grid + random + seed overrides, as `key=value`
    config: Config


@dataclasses.dataclass(frozen=True)
class Plan:
    spec: dict[str, Any]
    spec_path: str
    base_config: str  # the resolved base config file
    fixed: list[str]  # spec `set` + command-line `--set`
    out: Path
    runs: list[Run]

    @property
    def varied_keys(self) -> list[str]:
        """Keys that differ between runs, sorted, `seed` last."""
        keys = sorted({k for r in self.runs for k in r.varied} - {"seed"})
        return keys + (["seed"] if any("seed" in r.varied for r in self.runs) else [])


def read_spec(path: str | Path) -> dict[str, Any]:
    """The spec file's mapping, with its fields checked (types and names)."""
    path = Path(path)
    if not path.is_file():
        raise SweepError(f"sweep spec not found: {path}")
    try:
        spec = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise SweepError(f"sweep spec {path} is not valid YAML: {e}") from e
    if not isinstance(spec, dict):
        raise SweepError(f"sweep spec {path} must hold a mapping at top level")
    check_spec(spec)
    return spec


def _need(cond: bool, message: str) -> None:
    if not cond:
        raise SweepError(message)


def check_spec(spec: dict[str, Any]) -> None:
    """Field-level checks; config keys and value types are checked when runs are built."""
    for field in spec:
        _need(field in SPEC_FIELDS, f"unknown sweep spec field '{field}'" + closest(str(field), list(SPEC_FIELDS)))
    for field in ("name", "base"):
        _need(field in spec, f"sweep spec field '{field}' is required")
    name = spec["name"]
    _need(
        isinstance(name, str) and bool(SAFE_NAME.match(name)),
        f"sweep spec field 'name' must be letters, digits and _.- ; got {name!r}",
    )
    _need(
        isinstance(spec["base"], str) and bool(spec["base"]),
        f"sweep spec field 'base' must be a preset name or config path; got {spec['base']!r}",
    )
    fixed = spec.get("set", [])
    _need(
        isinstance(fixed, (list, dict)),
        f"sweep spec field 'set' must be a list of key=value or a mapping; got {fixed!r}",
    )
    if isinstance(fixed, list):
        for item in fixed:
            _need(
                isinstance(item, str) and "=" in item, f"sweep spec field 'set': item {item!r} must look like key=value"
            )
    grid = spec.get("grid", {})
    _need(isinstance(grid, dict), f"sweep spec field 'grid' must map config keys to lists of values; got {grid!r}")
    for key, values in grid.items():
        _need(isinstance(values, list), f"sweep grid key '{key}' must be a list of values; got {values!r}")
        _need(len(values) > 0, f"sweep grid key '{key}' has an empty list of values")
    if "arms" in spec:
        check_arms(spec["arms"])
    if "random" in spec:
        check_random(spec["random"])
    seeds = spec.get("seeds")
    if seeds is not None:
        _need(
            isinstance(seeds, list) and len(seeds) > 0,
            f"sweep spec field 'seeds' must be a non-empty list of ints; got {seeds!r}",
        )
        for s in seeds:
            _need(isinstance(s, int) and not isinstance(s, bool), f"sweep spec field 'seeds': {s!r} is not an int")
        _need(len(set(seeds)) == len(seeds), f"sweep spec field 'seeds' repeats a seed: {seeds}")
    _need(
        isinstance(spec.get("eval", False), bool),
        f"sweep spec field 'eval' must be true or false; got {spec.get('eval')!r}",
    )
    _need(isinstance(spec.get("out", ""), str), f"sweep spec field 'out' must be a path; got {spec.get('out')!r}")
    metrics = spec.get("metrics", [])
    _need(isinstance(metrics, list), f"sweep spec field 'metrics' must be a list of dotted paths; got {metrics!r}")
    for m in metrics:
        check_metric(m, bool(spec.get("eval", False)))


def check_arms(arms: Any) -> None:
    """`arms: {name: {key: value, ...}, ...}`: named override sets (an arm may be empty: the base)."""
    _need(
        isinstance(arms, dict) and len(arms) > 0,
        f"sweep spec field 'arms' must map arm names to overrides; got {arms!r}",
    )
    for name, overrides in arms.items():
        _need(
            isinstance(name, str) and bool(SAFE_NAME.match(name)),
            f"sweep spec field 'arms': arm name {name!r} must be letters, digits and _.-",
        )
        _need(
            isinstance(overrides, dict),
            f"sweep spec field 'arms.{name}' must map config keys to values; got {overrides!r}",
        )


def arm_overrides(spec: dict[str, Any], arm: str | None) -> list[str]:
    """The `key=value` overrides of arm `arm` (none without arms)."""
    return [_as_override(k, v) for k, v in spec["arms"][arm].items()] if arm is not None else []


def check_random(random: Any) -> None:
    """`random: {samples: N, seed: S, keys: {key: {choice|uniform|loguniform: ...}}}`."""
    _need(isinstance(random, dict), f"sweep spec field 'random' must be a mapping; got {random!r}")
    for field in random:
        _need(field in RANDOM_FIELDS, f"unknown field 'random.{field}'" + closest(str(field), list(RANDOM_FIELDS)))
    samples = random.get("samples")
    _need(
        isinstance(samples, int) and not isinstance(samples, bool) and samples > 0,
        f"sweep spec field 'random.samples' must be an int > 0; got {samples!r}",
    )
    seed = random.get("seed", 0)
    _need(
        isinstance(seed, int) and not isinstance(seed, bool),
        f"sweep spec field 'random.seed' must be an int; got {seed!r}",
    )
    keys = random.get("keys")
    _need(
        isinstance(keys, dict) and len(keys) > 0,
        f"sweep spec field 'random.keys' must map config keys to distributions; got {keys!r}",
    )
    for key, dist in keys.items():
        where = f"random.keys.{key}"
        _need(
            isinstance(dist, dict) and len(dist) == 1,
            f"sweep spec field '{where}' must be one of {{choice: [...]}}, {{uniform: [lo, hi]}}, {{loguniform: [lo, hi]}}; got {dist!r}",
        )
        ((kind, args),) = dist.items()
        _need(
            kind in DISTRIBUTIONS,
            f"sweep spec field '{where}': unknown distribution '{kind}'" + closest(str(kind), list(DISTRIBUTIONS)),
        )
        if kind == "choice":
            _need(
                isinstance(args, list) and len(args) > 0,
                f"sweep spec field '{where}.choice' must be a non-empty list; got {args!r}",
            )
            continue
        numbers = (
            isinstance(args, list)
            and len(args) == 2
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in args)
        )
        _need(
            numbers and args[0] < args[1],
            f"sweep spec field '{where}.{kind}' must be [lo, hi] with lo < hi; got {args!r}",
        )
        _need(kind != "loguniform" or args[0] > 0, f"sweep spec field '{where}.loguniform' needs lo > 0; got {args!r}")


def check_metric(path: Any, with_eval: bool) -> None:
    """A metric is `train.<column>` or a path into eval/metrics.json (which needs eval: true)."""
    _need(
        isinstance(path, str) and bool(path),
        f"sweep metric {path!r} must be a dotted path, e.g. controllability.delta_psnr",
    )
    group = path.split(".", 1)[0]
    if group == "train":
        _need(
            "." in path and bool(path.split(".", 1)[1]),
            f"sweep metric '{path}': name the metrics.jsonl column, e.g. train.loss",
        )
        return
    _need(
        group in EVAL_GROUPS,
        f"sweep metric '{path}': unknown group '{group}'" + closest(group, ["train", *EVAL_GROUPS]),
    )
    _need(with_eval, f"sweep metric '{path}' is read from eval/metrics.json: set 'eval: true' in the spec")


def _as_override(key: str, value: Any) -> str:
    """`key=value` whose value parses back (as YAML) to `value`: JSON is valid YAML."""
    return f"{key}={json.dumps(value)}"


def fixed_overrides(spec: dict[str, Any], extra: list[str] = ()) -> list[str]:
    """The spec's `set` (a list or a mapping) followed by command-line `--set` overrides."""
    fixed = spec.get("set", [])
    items = [_as_override(k, v) for k, v in fixed.items()] if isinstance(fixed, dict) else list(fixed)
    return items + list(extra)


def sample_random(random: dict[str, Any]) -> list[dict[str, Any]]:
    """`random.samples` draws of every key, reproducible from `random.seed`."""
    rng = np.random.default_rng(random.get("seed", 0))
    draws = []
    for _ in range(random["samples"]):
        draw = {}
        for key in sorted(random["keys"]):  # sorted: the order in the file does not change the draws
            ((kind, args),) = random["keys"][key].items()
            if kind == "choice":
                draw[key] = args[int(rng.integers(len(args)))]
            elif kind == "uniform":
                draw[key] = float(rng.uniform(args[0], args[1]))
            else:
                draw[key] = float(math.exp(rng.uniform(math.log(args[0]), math.log(args[1]))))
        draws.append(draw)
    return draws


def combinations(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """Each run's swept values (arm x grid point x random sample x seed), in a stable order;
    the arm's name is the value of the pseudo-key `arm`."""
    grid = spec.get("grid", {})
    keys = sorted(grid)  # stable whatever the order of keys in the file
    points = [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]
    draws = sample_random(spec["random"]) if "random" in spec else [{}]
    seeds = [{"seed": s} for s in spec["seeds"]] if spec.get("seeds") is not None else [{}]
    arms = [{"arm": a} for a in spec["arms"]] if "arms" in spec else [{}]
    return [{**a, **p, **d, **s} for a, p, d, s in itertools.product(arms, points, draws, seeds)]


def _fmt_value(value: Any) -> str:
    """A short, filesystem-safe rendering of a swept value."""
    if isinstance(value, bool):
        text = str(value).lower()
    elif isinstance(value, float):
        text = f"{value:.4g}"
    elif isinstance(value, (list, tuple)):
        text = "x".join(_fmt_value(v) for v in value)
    else:
        text = str(value)
    return re.sub(r"[^A-Za-z0-9.+-]+", "-", text).strip("-") or "empty"


def short_keys(keys: list[str]) -> dict[str, str]:
    """Dotted key -> its shortest distinct suffix (`model.dynamics.use_actions` -> `use_actions`)."""
    short = {}
    for key in keys:
        parts = key.split(".")
        for n in range(1, len(parts) + 1):
            suffix = ".".join(parts[-n:])
            if not any(other != key and (other == suffix or other.endswith("." + suffix)) for other in keys):
                break
        short[key] = suffix.replace(".", "-")
    return short


def _digest(values: dict[str, Any]) -> str:
    return hashlib.sha1(json.dumps(values, sort_keys=True).encode()).hexdigest()[:6]


def run_names(combos: list[dict[str, Any]]) -> list[str]:
    """Stable, readable names from the values that differ between runs: `use_actions-false_seed-1`.

    A short hash of the run's values is appended where names would collide or grow long."""
    varying = _varying_keys(combos)
    varying = [k for k in varying if k != "seed"] + (["seed"] if "seed" in varying else [])
    short = short_keys(varying)
    names = ["_".join(f"{short[k]}-{_fmt_value(c.get(k))}" for k in varying) or "run" for c in combos]
    counts = {n: names.count(n) for n in names}
    out = []
    for name, combo in zip(names, combos):
        if counts[name] > 1 or len(name) > NAME_MAX:
            name = f"{name[:NAME_MAX]}_{_digest(combo)}"
        out.append(name)
    return out


def resolve_base(base: str, spec_path: str | Path) -> Path:
    """A preset name, a path relative to the spec file, or a path from the current directory."""
    beside = Path(spec_path).parent / base
    if Path(base).suffix in (".yaml", ".yml") and beside.is_file():
        return beside
    path = preset_path(base)
    if not path.is_file():
        raise SweepError(f"sweep spec field 'base': config not found: {base} (looked for {path})")
    return path


def check_runnable(run: Run) -> None:
    """Paths a run needs that the schema cannot check: a dataset, and the runs of the frozen
    stages its stage reads (for dynamics, a tokenizer)."""
    from wm_jax.stages import frozen_workdirs, get_stage  # JAX: not for the parser (`plan` has imported it)

    if not run.config.data.dir and not run.config.data.mixture:
        raise SweepError(
            f"run {run.name}: config key 'data.dir' is empty: set it in the spec or with --set data.dir=DIR"
        )
    for stage, path in frozen_workdirs(run.config).items():
        key = get_stage(stage).workdir_key
        if not path:
            raise SweepError(
                f"run {run.name}: config key '{key}' is empty: a {run.config.train.stage} sweep needs a "
                f"trained {stage} run (--set {key}=RUN)"
            )


def plan(spec_path: str | Path, extra_set: list[str] = (), *, runnable: bool = True) -> Plan:
    """Reads and expands a spec; builds (validates) every run's config before anything runs.

    `runnable` also requires the paths training needs (data, tokenizer), not needed by `report`."""
    spec = read_spec(spec_path)
    base = resolve_base(spec["base"], spec_path)
    fixed = fixed_overrides(spec, list(extra_set))
    fixed_keys = {".".join(config_lib.parse_override(o)[0]) for o in fixed}
    swept = [*spec.get("grid", {}), *spec.get("random", {}).get("keys", {})]
    for arm, overrides in spec.get("arms", {}).items():
        for key in overrides:
            _need(key not in swept, f"config key '{key}' is set by arm '{arm}' and swept: keep one")
    for key in [*swept, *{k for o in spec.get("arms", {}).values() for k in o}]:
        _need(key not in fixed_keys, f"config key '{key}' is both swept and fixed (set/--set): keep one")
        _need(
            key != "seed" or spec.get("seeds") is None, "config key 'seed' is swept: use the spec field 'seeds' alone"
        )
    try:
        base_cfg = config_lib.load(base, fixed)
    except ConfigError as e:
        raise SweepError(f"sweep {spec['name']}: {e}") from None
    combos = combinations(spec)
    out = Path(spec.get("out") or f"runs/sweeps/{spec['name']}")
    runs = []
    for i, (name, combo) in enumerate(zip(run_names(combos), combos)):
        overrides = arm_overrides(spec, combo.get("arm")) + [_as_override(k, v) for k, v in combo.items() if k != "arm"]
        try:
            cfg = config_lib.replace(base_cfg, overrides)
        except ConfigError as e:
            raise SweepError(f"sweep {spec['name']}: {e}") from None
        runs.append(Run(i, name, str(out / "runs" / name), combo, overrides, cfg))
    # `varied` keeps only what differs between runs (what names and tables show).
    varying = set(_varying_keys(combos))
    runs = [dataclasses.replace(r, varied={k: v for k, v in r.varied.items() if k in varying}) for r in runs]
    result = Plan(spec, str(spec_path), str(base), fixed, out, runs)
    if runnable:
        for run in runs:
            check_runnable(run)
    return result


def _varying_keys(combos: list[dict[str, Any]]) -> list[str]:
    keys = sorted({k for c in combos for k in c})
    return [k for k in keys if len({json.dumps(c.get(k), sort_keys=True) for c in combos}) > 1]


def sweep_record(p: Plan) -> dict[str, Any]:
    """What `<out>/sweep.json` holds: the spec, the base config and overrides, and every run."""
    return {
        "spec": p.spec,
        "spec_path": p.spec_path,
        "base_config": p.base_config,
        "set": p.fixed,
        "varied_keys": p.varied_keys,
        "runs": [
            {"index": r.index, "name": r.name, "workdir": r.workdir, "varied": r.varied, "overrides": r.overrides}
            for r in p.runs
        ],
    }


def write_record(p: Plan) -> Path:
    """Writes `<out>/sweep.json` (`sweep_record`); returns its path."""
    p.out.mkdir(parents=True, exist_ok=True)
    path = p.out / "sweep.json"
    path.write_text(json.dumps(sweep_record(p), indent=2))
    return path


# ------------------------------------------------------------------------ run state


def train_done(run: Run) -> bool:
    """`train_summary.json` exists and reached the configured last step."""
    summary = Path(run.workdir) / "train_summary.json"
    try:
        return json.loads(summary.read_text()).get("step") == run.config.train.steps
    except (OSError, ValueError):
        return False


def eval_done(run: Run) -> bool:
    """The run's `eval/metrics.json` exists."""
    return (Path(run.workdir) / "eval" / "metrics.json").is_file()


def finished(run: Run, with_eval: bool) -> bool:
    """Trained to the last step, and evaluated when the sweep evaluates."""
    return train_done(run) and (eval_done(run) or not with_eval)


def run_one_argv(spec_path: str, index: int | str, extra_set: list[str]) -> list[str]:
    """`python -m wm_jax.cli sweep run-one SPEC --index I --set ...`."""
    argv = [sys.executable, "-m", "wm_jax.cli", "sweep", "run-one", spec_path, "--index", str(index)]
    for override in extra_set:
        argv += ["--set", override]
    return argv
