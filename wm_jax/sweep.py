"""`wm sweep`: run a grid/random set of config variations, then tabulate and plot them.

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
settings that are not a cross product, e.g. "actions", "actions + camera"). Every run's config is built (and so checked
against the schema) before anything starts; a bad spec raises `SweepError`, a
`ConfigError`, so the CLI exits 2 naming the key. A run lives in `<out>/runs/<name>`
(its `tb/` too, so `tensorboard --logdir <out>/runs` overlays them) and `<out>/sweep.json`
records the expanded runs. The sweep trains the base config's stage (`train.stage`); a
dynamics sweep needs `train.tokenizer_workdir`.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import itertools
import json
import math
import os
import re
import shlex
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from wm_jax import config as config_lib
from wm_jax import launch
from wm_jax.config import Config, ConfigError, closest
from wm_jax.presets import preset_path

SPEC_FIELDS = ("name", "description", "base", "set", "arms", "grid", "random", "seeds", "eval", "metrics", "out")
RANDOM_FIELDS = ("samples", "seed", "keys")
DISTRIBUTIONS = ("choice", "uniform", "loguniform")
# Top-level groups of eval/metrics.json (wm_jax/eval/evaluate.py) a metric path may start
# with; `train.<column>` is the last logged value of a metrics.jsonl column.
EVAL_GROUPS = (
    "step", "num_clips", "tokenizer", "rollout", "rollout_random_actions", "baseline_copy_last",
    "controllability", "action_following", "camera_following", "identity_persistence", "object_permanence",
    "counterfactual", "action_probe", "sampling",
)
NAME_MAX = 80  # run names longer than this are cut and made unique with a hash
ERROR_TAIL_LINES = 30
EXIT_PREEMPTED = 42  # as wm_jax.train.loop's, without importing JAX to parse a spec
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


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


# ----------------------------------------------------------------------------- spec


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
    _need(isinstance(name, str) and bool(_SAFE_NAME.match(name)),
          f"sweep spec field 'name' must be letters, digits and _.- ; got {name!r}")
    _need(isinstance(spec["base"], str) and bool(spec["base"]),
          f"sweep spec field 'base' must be a preset name or config path; got {spec['base']!r}")
    fixed = spec.get("set", [])
    _need(isinstance(fixed, (list, dict)), f"sweep spec field 'set' must be a list of key=value or a mapping; got {fixed!r}")
    if isinstance(fixed, list):
        for item in fixed:
            _need(isinstance(item, str) and "=" in item, f"sweep spec field 'set': item {item!r} must look like key=value")
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
        _need(isinstance(seeds, list) and len(seeds) > 0, f"sweep spec field 'seeds' must be a non-empty list of ints; got {seeds!r}")
        for s in seeds:
            _need(isinstance(s, int) and not isinstance(s, bool), f"sweep spec field 'seeds': {s!r} is not an int")
        _need(len(set(seeds)) == len(seeds), f"sweep spec field 'seeds' repeats a seed: {seeds}")
    _need(isinstance(spec.get("eval", False), bool), f"sweep spec field 'eval' must be true or false; got {spec.get('eval')!r}")
    _need(isinstance(spec.get("out", ""), str), f"sweep spec field 'out' must be a path; got {spec.get('out')!r}")
    metrics = spec.get("metrics", [])
    _need(isinstance(metrics, list), f"sweep spec field 'metrics' must be a list of dotted paths; got {metrics!r}")
    for m in metrics:
        check_metric(m, bool(spec.get("eval", False)))


def check_arms(arms: Any) -> None:
    """`arms: {name: {key: value, ...}, ...}`: named override sets (an arm may be empty: the base)."""
    _need(isinstance(arms, dict) and len(arms) > 0, f"sweep spec field 'arms' must map arm names to overrides; got {arms!r}")
    for name, overrides in arms.items():
        _need(isinstance(name, str) and bool(_SAFE_NAME.match(name)),
              f"sweep spec field 'arms': arm name {name!r} must be letters, digits and _.-")
        _need(isinstance(overrides, dict), f"sweep spec field 'arms.{name}' must map config keys to values; got {overrides!r}")


def arm_overrides(spec: dict[str, Any], arm: str | None) -> list[str]:
    """The `key=value` overrides of arm `arm` (none without arms)."""
    return [_as_override(k, v) for k, v in spec["arms"][arm].items()] if arm is not None else []


def check_random(random: Any) -> None:
    """`random: {samples: N, seed: S, keys: {key: {choice|uniform|loguniform: ...}}}`."""
    _need(isinstance(random, dict), f"sweep spec field 'random' must be a mapping; got {random!r}")
    for field in random:
        _need(field in RANDOM_FIELDS, f"unknown field 'random.{field}'" + closest(str(field), list(RANDOM_FIELDS)))
    samples = random.get("samples")
    _need(isinstance(samples, int) and not isinstance(samples, bool) and samples > 0,
          f"sweep spec field 'random.samples' must be an int > 0; got {samples!r}")
    seed = random.get("seed", 0)
    _need(isinstance(seed, int) and not isinstance(seed, bool), f"sweep spec field 'random.seed' must be an int; got {seed!r}")
    keys = random.get("keys")
    _need(isinstance(keys, dict) and len(keys) > 0, f"sweep spec field 'random.keys' must map config keys to distributions; got {keys!r}")
    for key, dist in keys.items():
        where = f"random.keys.{key}"
        _need(isinstance(dist, dict) and len(dist) == 1,
              f"sweep spec field '{where}' must be one of {{choice: [...]}}, {{uniform: [lo, hi]}}, {{loguniform: [lo, hi]}}; got {dist!r}")
        (kind, args), = dist.items()
        _need(kind in DISTRIBUTIONS, f"sweep spec field '{where}': unknown distribution '{kind}'" + closest(str(kind), list(DISTRIBUTIONS)))
        if kind == "choice":
            _need(isinstance(args, list) and len(args) > 0, f"sweep spec field '{where}.choice' must be a non-empty list; got {args!r}")
            continue
        numbers = isinstance(args, list) and len(args) == 2 and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in args)
        _need(numbers and args[0] < args[1], f"sweep spec field '{where}.{kind}' must be [lo, hi] with lo < hi; got {args!r}")
        _need(kind != "loguniform" or args[0] > 0, f"sweep spec field '{where}.loguniform' needs lo > 0; got {args!r}")


def check_metric(path: Any, with_eval: bool) -> None:
    """A metric is `train.<column>` or a path into eval/metrics.json (which needs eval: true)."""
    _need(isinstance(path, str) and bool(path), f"sweep metric {path!r} must be a dotted path, e.g. controllability.delta_psnr")
    group = path.split(".", 1)[0]
    if group == "train":
        _need("." in path and bool(path.split(".", 1)[1]), f"sweep metric '{path}': name the metrics.jsonl column, e.g. train.loss")
        return
    _need(group in EVAL_GROUPS, f"sweep metric '{path}': unknown group '{group}'" + closest(group, ["train", *EVAL_GROUPS]))
    _need(with_eval, f"sweep metric '{path}' is read from eval/metrics.json: set 'eval: true' in the spec")


# ---------------------------------------------------------------------------- runs


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
            (kind, args), = random["keys"][key].items()
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
        raise SweepError(f"run {run.name}: config key 'data.dir' is empty: set it in the spec or with --set data.dir=DIR")
    for stage, path in frozen_workdirs(run.config).items():
        key = get_stage(stage).workdir_key
        if not path:
            raise SweepError(f"run {run.name}: config key '{key}' is empty: a {run.config.train.stage} sweep needs a "
                             f"trained {stage} run (--set {key}=RUN)")


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
        _need(key != "seed" or spec.get("seeds") is None, "config key 'seed' is swept: use the spec field 'seeds' alone")
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
    p.out.mkdir(parents=True, exist_ok=True)
    path = p.out / "sweep.json"
    path.write_text(json.dumps(sweep_record(p), indent=2))
    return path


# ---------------------------------------------------------------------------- local


def train_done(run: Run) -> bool:
    """`train_summary.json` exists and reached the configured last step."""
    summary = Path(run.workdir) / "train_summary.json"
    try:
        return json.loads(summary.read_text()).get("step") == run.config.train.steps
    except (OSError, ValueError):
        return False


def eval_done(run: Run) -> bool:
    return (Path(run.workdir) / "eval" / "metrics.json").is_file()


def finished(run: Run, with_eval: bool) -> bool:
    return train_done(run) and (eval_done(run) or not with_eval)


def _write_error(run: Run, code: int, lines: list[str]) -> None:
    workdir = Path(run.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    tail = "".join(line if line.endswith("\n") else line + "\n" for line in lines[-ERROR_TAIL_LINES:])
    (workdir / "error.txt").write_text(f"run {run.name} failed with exit code {code}\n\n{tail}")


def _exit_code_of(exc: Exception) -> int:
    """The exit code `wm train` would give for this exception (DESIGN.md §6)."""
    from data_pipelines.writer import DatasetError
    from wm_jax.checkpoint import CheckpointError
    from wm_jax.train.loop import EXIT_PREEMPTED, Preempted

    if isinstance(exc, Preempted):
        return EXIT_PREEMPTED
    if isinstance(exc, FloatingPointError):
        return 3
    if isinstance(exc, (ConfigError, DatasetError, CheckpointError)):
        return 2
    return 1


def execute(run: Run, with_eval: bool) -> int:
    """Trains (resuming) and evaluates one run in this process; 0, or the failure's exit code
    with `error.txt` written. A finished part is not redone."""
    from wm_jax.eval.evaluate import evaluate
    from wm_jax.train.loop import train

    error = Path(run.workdir) / "error.txt"
    try:
        if not train_done(run):
            train(run.config, run.workdir)
        if with_eval and not eval_done(run):
            evaluate(run.workdir)
    except Exception as e:  # noqa: BLE001 - one failed run must not stop the others
        code = _exit_code_of(e)
        lines = traceback.format_exception(e)
        print("".join(lines), file=sys.stderr)
        _write_error(run, code, "".join(lines).splitlines())
        return code
    error.unlink(missing_ok=True)
    return 0


def run_one_argv(spec_path: str, index: int | str, extra_set: list[str]) -> list[str]:
    """`python -m wm_jax.cli sweep run-one SPEC --index I --set ...`."""
    argv = [sys.executable, "-m", "wm_jax.cli", "sweep", "run-one", spec_path, "--index", str(index)]
    for override in extra_set:
        argv += ["--set", override]
    return argv


def _tail(path: Path, n: int = ERROR_TAIL_LINES) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()[-n:]
    except OSError:
        return []


def run_parallel(p: Plan, todo: list[Run], parallel: int, extra_set: list[str]) -> dict[str, int]:
    """Runs `todo` as `wm sweep run-one` subprocesses, `parallel` at a time; output goes
    to each run's `sweep.log`. Returns run name -> exit code."""
    codes: dict[str, int] = {}
    pending, running = list(todo), []
    try:
        while pending or running:
            while pending and len(running) < parallel:
                run = pending.pop(0)
                Path(run.workdir).mkdir(parents=True, exist_ok=True)
                log = open(Path(run.workdir) / "sweep.log", "w")
                argv = run_one_argv(str(Path(p.spec_path).resolve()), run.index, extra_set)
                proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
                running.append((run, proc, log))
                print(f"sweep: started {run.name} (pid {proc.pid})", file=sys.stderr)
            for item in [x for x in running if x[1].poll() is not None]:
                run, proc, log = item
                log.close()
                running.remove(item)
                codes[run.name] = proc.returncode if proc.returncode >= 0 else 128 - proc.returncode
                if codes[run.name]:
                    _write_error(run, codes[run.name], _tail(Path(run.workdir) / "sweep.log"))
                print(f"sweep: {run.name} exited {codes[run.name]}", file=sys.stderr)
            time.sleep(0.2)
    finally:
        for _, proc, log in running:  # only on an interrupt or an error here
            proc.terminate()
            proc.wait()
            log.close()
    return codes


def run_local(p: Plan, parallel: int = 1, extra_set: list[str] = ()) -> dict[str, str]:
    """Runs every unfinished run (one at a time in this process, or `parallel` subprocesses);
    returns run name -> 'skipped' | 'ran' | 'failed (exit N)'."""
    with_eval = bool(p.spec.get("eval", False))
    write_record(p)
    status = {r.name: "skipped" for r in p.runs if finished(r, with_eval)}
    todo = [r for r in p.runs if r.name not in status]
    if parallel > 1:
        codes = run_parallel(p, todo, parallel, list(extra_set))
    else:
        codes = {}
        for run in todo:
            print(f"sweep: run {run.index + 1}/{len(p.runs)} {run.name}", file=sys.stderr)
            codes[run.name] = execute(run, with_eval)
            if codes[run.name] == EXIT_PREEMPTED:  # this machine is going away: start no other run
                break
    for name, code in codes.items():
        status[name] = "ran" if code == 0 else f"failed (exit {code})"
    return {r.name: status.get(r.name, "not started") for r in p.runs}


# ----------------------------------------------------------------------- clusters


def render_slurm_array(
    p: Plan, extra_set: list[str], *, gpus_per_node: int, time_limit: str, partition: str | None = None,
    account: str | None = None, chdir: str | None = None, python: str | None = None,
) -> str:
    """An sbatch array job from the `wm launch slurm` template: task i runs `wm sweep
    run-one SPEC --index i` (requeued on exit 42 like a single run)."""
    chdir = chdir or os.getcwd()
    allowed = "only letters, digits and _.,+@=- can go in an #SBATCH line"
    paths = "must be a path of letters, digits and _./+,@=- (it goes in an #SBATCH line)"
    job_name = launch.default_job_name(p.spec["name"])
    launch.check_flag(launch.SLURM_TIME, time_limit, "--time", "expected [days-]hours[:minutes[:seconds]], e.g. 24:00:00")
    launch.check_flag(launch.SBATCH_PATH, str(p.out), "sweep out", paths)
    launch.check_flag(launch.SBATCH_PATH, chdir, "the current directory", paths)
    extra = [f"#SBATCH --array=0-{len(p.runs) - 1}"]
    for flag, value in (("partition", partition), ("account", account)):
        if value:
            extra.append(f"#SBATCH --{flag}={launch.check_flag(launch.SBATCH_WORD, value, f'--{flag}', allowed)}")
    argv = run_one_argv(str(Path(p.spec_path).resolve()), "INDEX", extra_set)
    if python:
        argv[0] = python
    # The index is bash's to expand in each array task, so it stays outside the quoting.
    command = shlex.join(argv).replace(" INDEX", ' "$SLURM_ARRAY_TASK_ID"')
    return launch.render(
        "slurm.sbatch", job_name=job_name, nodes=1, gpus_per_node=gpus_per_node, time=time_limit, chdir=chdir,
        workdir=str(p.out), extra_directives="\n".join(extra), train_command=command,
    )


def render_k8s_jobs(p: Plan, *, namespace: str, gpus_per_node: int, image: str, pvc: str | None = None) -> str:
    """One ConfigMap + Service + Job (the `wm launch k8s` manifest) per run, as one YAML stream.
    The Jobs train only: run `wm sweep SPEC` afterwards for the evaluations (training is skipped)."""
    prefix = launch.default_job_name(p.spec["name"])[:40].rstrip("-")
    docs = [
        launch.render_k8s(run.config, run.workdir, name=f"{prefix}-{run.index}", namespace=namespace, nodes=1,
                          gpus_per_node=gpus_per_node, image=image, pvc=pvc)
        for run in p.runs
    ]
    return "---\n".join(docs)


# -------------------------------------------------------------------------- report


def lookup(tree: Any, path: str) -> Any:
    """A dotted path into nested dicts; keys may contain dots themselves (`within_1.5px`)."""
    parts = path.split(".")
    node = tree
    while parts:
        if not isinstance(node, dict):
            return None
        for n in range(len(parts), 0, -1):  # the longest key that matches wins
            key = ".".join(parts[:n])
            if key in node:
                node, parts = node[key], parts[n:]
                break
        else:
            return None
    return node


def _number(value: Any) -> float | None:
    """A finite float; a list of numbers becomes its mean (e.g. PSNR per horizon)."""
    if isinstance(value, list):
        numbers = [_number(v) for v in value]
        return float(np.mean(numbers)) if numbers and None not in numbers else None
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def collect(run: Run, metrics: list[str]) -> dict[str, float | None]:
    """Each metric of a run: `train.<col>` from metrics.jsonl (last logged value), others from
    eval/metrics.json. None: missing."""
    from wm_jax import telemetry

    workdir = Path(run.workdir)
    rows = telemetry.read_metrics(workdir / "metrics.jsonl")
    try:
        evaluation = json.loads((workdir / "eval" / "metrics.json").read_text())
    except (OSError, ValueError):
        evaluation = None
    values = {}
    for m in metrics:
        if m.startswith("train."):
            column = m.split(".", 1)[1]
            logged = [r[column] for r in rows if _number(r.get(column)) is not None]
            values[m] = float(logged[-1]) if logged else None
        else:
            values[m] = _number(lookup(evaluation, m)) if evaluation is not None else None
    return values


def _run_status(run: Run, with_eval: bool) -> str:
    if (Path(run.workdir) / "error.txt").is_file():
        return "failed"
    if finished(run, with_eval):
        return "finished"
    return "unfinished" if Path(run.workdir).exists() else "missing"


def _cell(value: Any) -> str:
    if value is None:
        return "missing"
    if isinstance(value, float):
        return f"{value:.4g}"
    return json.dumps(value) if isinstance(value, (list, dict, bool)) else str(value)


def summarize(values: list[float | None]) -> str:
    """`mean ± std (n/N)` over seeds; std is the sample std and needs two values."""
    present = [v for v in values if v is not None]
    if not present:
        return f"missing (0/{len(values)})"
    text = f"{np.mean(present):.4g}"
    if len(present) > 1:
        text += f" ± {np.std(present, ddof=1):.2g}"
    return text + (f" ({len(present)}/{len(values)})" if len(present) < len(values) or len(values) > 1 else "")


def _groups(p: Plan) -> dict[str, list[Run]]:
    """Runs keyed by their non-seed varied values (the seeds of one setting together)."""
    keys = [k for k in p.varied_keys if k != "seed"]
    groups: dict[str, list[Run]] = {}
    for run in p.runs:
        label = ", ".join(f"{k}={_cell(run.varied.get(k))}" for k in keys) or "all runs"
        groups.setdefault(label, []).append(run)
    return groups


def results_markdown(p: Plan, rows: list[dict[str, Any]], metrics: list[str]) -> str:
    keys = p.varied_keys
    header = ["run", "status", *keys, *metrics]
    lines = [f"# Sweep `{p.spec['name']}`", "", f"Base config `{p.base_config}`, {len(p.runs)} runs in `{p.out / 'runs'}`.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row[h]) if h in keys or h in metrics else str(row[h]) for h in header) + " |")
    groups = _groups(p)
    by_name = {row["run"]: row for row in rows}
    lines += ["", "## Summary: mean ± std across seeds (present/runs)", "",
              "| setting | " + " | ".join(metrics) + " |", "|" + "---|" * (len(metrics) + 1)]
    for label, runs in groups.items():
        cells = [summarize([by_name[r.name][m] for r in runs]) for m in metrics]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    plots = ["loss_curves.png", *[f for m in metrics for f in _metric_plot_names(p, m).values()]]
    lines += [""] + [f"![{f}]({f})" for f in plots]
    return "\n".join(lines) + "\n"


def _metric_plot_names(p: Plan, metric: str) -> dict[str, str]:
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", metric)
    short = short_keys([k for k in p.varied_keys if k != "seed"])
    return {k: f"{safe}_vs_{s}.png" for k, s in short.items()}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_loss_curves(p: Plan, out: Path) -> None:
    """Train loss vs step, one line per run (runs without a metrics.jsonl are listed as missing)."""
    from wm_jax import telemetry

    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    missing = []
    for run in p.runs:
        rows = [r for r in telemetry.read_metrics(Path(run.workdir) / "metrics.jsonl") if _number(r.get("loss")) is not None]
        if rows:
            ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label=run.name)
        else:
            missing.append(run.name)
    ax.set_xlabel("step")
    ax.set_ylabel("train loss")
    ax.set_title(f"{p.spec['name']}" + (f" (no loss yet: {', '.join(missing)})" if missing else ""), fontsize=9)
    ax.grid(alpha=0.3)
    if len(missing) < len(p.runs):
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def plot_metric(p: Plan, rows: list[dict[str, Any]], metric: str, key: str, out: Path) -> None:
    """`metric` vs the swept values of `key`: mean over seeds with their std as error bars,
    one line per setting of the other swept keys; a missing point is marked on the axis."""
    plt = _plt()
    others = [k for k in p.varied_keys if k not in ("seed", key)]
    values = sorted({json.dumps(r[key], sort_keys=True) for r in rows})
    decoded = [json.loads(v) for v in values]
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in decoded)
    if numeric:
        order = sorted(range(len(decoded)), key=lambda i: decoded[i])
        values, decoded = [values[i] for i in order], [decoded[i] for i in order]
    xs = decoded if numeric else list(range(len(decoded)))
    fig, ax = plt.subplots(figsize=(6, 4))
    series: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        series.setdefault(", ".join(f"{k}={_cell(row[k])}" for k in others), []).append(row)
    for label, members in series.items():
        means, stds, missing_x = [], [], []
        for x, v in zip(xs, values):
            got = [r[metric] for r in members if json.dumps(r[key], sort_keys=True) == v and r[metric] is not None]
            means.append(float(np.mean(got)) if got else np.nan)
            stds.append(float(np.std(got, ddof=1)) if len(got) > 1 else 0.0)
            if not got:
                missing_x.append(x)
        ax.errorbar(xs, means, yerr=stds, fmt="o-", capsize=4, label=label or None)
        if missing_x:
            ax.plot(missing_x, [0] * len(missing_x), "x", color="red", transform=ax.get_xaxis_transform(),
                    clip_on=False, label="missing")
    ax.set_xticks(xs, [_cell(v) for v in decoded])  # ticks at the swept values only
    ax.set_xlabel(key)
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} vs {key}\n(mean ± std over seeds)", fontsize=9)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def report(p: Plan) -> dict[str, Any]:
    """Writes results.csv, results.md, loss_curves.png and `<metric>_vs_<key>.png` under the
    sweep directory; returns {'rows': [...], 'files': [...]}."""
    metrics = list(p.spec.get("metrics", []))
    with_eval = bool(p.spec.get("eval", False))
    keys = p.varied_keys
    rows = []
    for run in p.runs:
        rows.append({"run": run.name, "status": _run_status(run, with_eval), **{k: run.varied.get(k) for k in keys},
                     **collect(run, metrics)})
    p.out.mkdir(parents=True, exist_ok=True)
    with open(p.out / "results.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["run", "status", *keys, *metrics])
        for row in rows:  # an empty cell is a missing value
            writer.writerow([row["run"], row["status"], *[_cell(row[k]) for k in keys],
                             *["" if row[m] is None else repr(row[m]) for m in metrics]])
    (p.out / "results.md").write_text(results_markdown(p, rows, metrics))
    files = ["results.csv", "results.md", "loss_curves.png"]
    plot_loss_curves(p, p.out / "loss_curves.png")
    for m in metrics:
        for key, name in _metric_plot_names(p, m).items():
            plot_metric(p, rows, m, key, p.out / name)
            files.append(name)
    return {"rows": rows, "files": files}


# ---------------------------------------------------------------------------- CLI


def cmd_sweep(args: argparse.Namespace) -> int:
    """`wm sweep SPEC`, `wm sweep report SPEC`, `wm sweep run-one SPEC --index I`."""
    words = args.words
    if words[0] in ("report", "run-one"):
        if len(words) != 2:
            raise SweepError(f"usage: wm sweep {words[0]} SPEC.yaml" + (" --index I" if words[0] == "run-one" else ""))
        return cmd_report(words[1], args) if words[0] == "report" else cmd_run_one(words[1], args)
    if len(words) != 1:
        raise SweepError(f"wm sweep: unexpected arguments {words[1:]}; usage: wm sweep SPEC.yaml [--launcher ...]")
    p = plan(words[0], args.set)
    if args.launcher == "local":
        return cmd_local(p, args)
    if args.launcher == "slurm":
        return cmd_slurm(p, args)
    return cmd_k8s(p, args)


def cmd_local(p: Plan, args: argparse.Namespace) -> int:
    with_eval = bool(p.spec.get("eval", False))
    if args.dry_run:
        for run in p.runs:
            state = "finished, skip" if finished(run, with_eval) else "to run"
            print(f"{run.index}\t{run.name}\t{state}\t{' '.join(run.overrides)}")
        print(f"# dry run: {len(p.runs)} runs under {p.out / 'runs'}", file=sys.stderr)
        return 0
    status = run_local(p, args.parallel, args.set)
    for name, state in status.items():
        print(f"{name}\t{state}")
    failed = [n for n, s in status.items() if s.startswith("failed")]
    if failed:
        print(f"sweep: {len(failed)} of {len(status)} runs failed (see <run>/error.txt): {', '.join(failed)}", file=sys.stderr)
    if any(s == f"failed (exit {EXIT_PREEMPTED})" for s in status.values()):
        return EXIT_PREEMPTED  # saved; run the same command again to resume
    return 1 if failed else 0


def cmd_slurm(p: Plan, args: argparse.Namespace) -> int:
    script = render_slurm_array(p, args.set, gpus_per_node=args.gpus_per_node, time_limit=args.time,
                                partition=args.partition, account=args.account)
    target = p.out / "slurm.sbatch"
    if args.dry_run:
        print(script, end="")
        print(f"# dry run: would write {p.out / 'sweep.json'}, {target} and run `sbatch {target}`", file=sys.stderr)
        return 0
    sbatch = launch.require_tool("sbatch", "run this on a SLURM login node")
    write_record(p)
    target.write_text(script)
    return subprocess.run([sbatch, str(target)]).returncode


def cmd_k8s(p: Plan, args: argparse.Namespace) -> int:
    if not args.image and not args.dry_run:
        raise SweepError("--image is required: the container image with wm_jax installed")
    manifest = render_k8s_jobs(p, namespace=args.namespace, gpus_per_node=args.gpus_per_node,
                               image=args.image or launch.K8S_PLACEHOLDER_IMAGE, pvc=args.pvc)
    if args.dry_run:
        print(manifest, end="")
        print(f"# dry run: {len(p.runs)} Jobs; would write {p.out / 'sweep.json'} and `kubectl apply` them", file=sys.stderr)
        return 0
    kubectl = launch.require_tool("kubectl", "install it and point it at the cluster")
    write_record(p)
    return subprocess.run([kubectl, "apply", "-f", "-"], input=manifest, text=True).returncode


def cmd_run_one(spec: str, args: argparse.Namespace) -> int:
    """One run of the sweep (a SLURM array task): checks that sweep.json, when present,
    lists the same run at this index (the spec may have changed since submission)."""
    p = plan(spec, args.set)
    if args.index is None or not 0 <= args.index < len(p.runs):
        raise SweepError(f"--index must be in [0, {len(p.runs) - 1}]; got {args.index}")
    run = p.runs[args.index]
    record = p.out / "sweep.json"
    if record.is_file():
        listed = json.loads(record.read_text())["runs"]
        if args.index >= len(listed) or listed[args.index]["name"] != run.name:
            raise SweepError(f"{record} lists another run at index {args.index} than {spec} does now: rerun `wm sweep`")
    with_eval = bool(p.spec.get("eval", False))
    if finished(run, with_eval):
        print(f"sweep: {run.name} already finished")
        return 0
    return execute(run, with_eval)


def cmd_report(spec: str, args: argparse.Namespace) -> int:
    p = plan(spec, args.set, runnable=False)
    result = report(p)
    print(Path(p.out / "results.md").read_text(), end="")
    missing = sum(1 for row in result["rows"] if row["status"] != "finished")
    if missing:
        print(f"sweep report: {missing} of {len(p.runs)} runs not finished (shown as such)", file=sys.stderr)
    print(f"wrote {', '.join(str(p.out / f) for f in result['files'])}", file=sys.stderr)
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Registers `wm sweep` on the `wm` parser's subcommands."""
    sw = subparsers.add_parser(
        "sweep", help="run a grid/random sweep of config overrides; `wm sweep report SPEC` tabulates and plots it",
        description="wm sweep SPEC.yaml [--launcher local|slurm|k8s] | wm sweep report SPEC.yaml | "
                    "wm sweep run-one SPEC.yaml --index I",
    )
    sw.add_argument("words", nargs="+", metavar="[report|run-one] SPEC", help="the sweep spec (YAML), after report or run-one if given")
    sw.add_argument("--launcher", choices=["local", "slurm", "k8s"], default="local")
    sw.add_argument("--parallel", type=launch.positive_int, default=1, help="local: runs at a time (subprocesses when > 1)")
    sw.add_argument("--dry-run", action="store_true", help="print the runs, sbatch script or manifests, and exit 0")
    sw.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a fixed override for every run")
    sw.add_argument("--index", type=int, help="run-one: the run's index in sweep.json")
    sw.add_argument("--gpus-per-node", type=launch.non_negative_int, default=8, help="slurm/k8s: GPUs per run")
    sw.add_argument("--time", default="24:00:00", help="slurm: time limit per run")
    sw.add_argument("--partition", help="slurm")
    sw.add_argument("--account", help="slurm")
    sw.add_argument("--image", help="k8s: container image with wm_jax installed (required unless --dry-run)")
    sw.add_argument("--namespace", default="default", help="k8s")
    sw.add_argument("--pvc", metavar="CLAIM:/PATH", help="k8s: mount this PersistentVolumeClaim (for runs and data)")
    sw.set_defaults(fn=cmd_sweep)
