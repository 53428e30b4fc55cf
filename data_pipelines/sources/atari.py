"""Atari 2600 games on the Arcade Learning Environment (ale-py), recorded for world models.

Step t records the screen shown before action t, area-resized to S×S; the action, an
index into the game's minimal action set; the reward summed over the `frameskip`
emulator frames the action is held for; and `done`, true on the last step (game over, or
the last of `num_frames`). ALE's own sticky actions are off (repeat_action_probability
0), so an episode is a deterministic function of its start state and its actions: the
dataset stores each episode's emulator start state (`replay/episode_XXXXXX.msgpack`,
sha256 in the manifest), and `replay_episode` re-runs the emulator from it under the
recorded or any other actions; `branch_frames` does so from any recorded step
(counterfactual ground truth for `wm eval`).

The records carry no camera or entity fields: absent from the spec, they are unknown for
every frame. ale-py (the `envs` extra) is imported on first use, so the other sources
work without it.
"""

from __future__ import annotations

import difflib
import functools
import os
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import msgpack
import numpy as np

from data_pipelines import schema, writer
from data_pipelines.schema import DatasetError

if TYPE_CHECKING:
    import ale_py

SOURCE_NAME = "atari"
GENERATOR_VERSION = "1.0"
EMULATOR_FPS = 60.0  # NTSC frames per second
POLICIES = ("random", "sticky")
DEFAULT_PARAMS = {"game": "Pong", "policy": "sticky", "frameskip": 4, "sticky_prob": 0.25}
FIELDS = ("episode_id", "t", "frame", "action", "shot_id", "cut", "timecode", "reward", "done")
REPLAY_VERSION = 1
EXAMPLE_GAMES = ("pong", "breakout", "space_invaders", "ms_pacman", "montezuma_revenge")


def _ale_py():
    """The ale_py module; DatasetError saying how to install it when it is missing."""
    try:
        import ale_py
        import ale_py.roms  # a submodule ale_py does not import itself
    except ImportError as e:
        raise DatasetError("the atari source needs ale-py: pip install -e '.[envs]'") from e
    return ale_py


def _normalise(name: str) -> str:
    return "".join(c for c in name.lower() if c.isalnum())


def display_name(rom: str) -> str:
    """ "montezuma_revenge" → "MontezumaRevenge" (the usual Gym-style game name)."""
    return "".join(part.capitalize() for part in rom.split("_"))


@functools.cache
def _roms_by_key() -> dict[str, str]:
    return {_normalise(rom): rom for rom in _ale_py().roms.get_all_rom_ids()}


def rom_id(game: str) -> str:
    """The ALE ROM id of `game`, ignoring case and underscores ("Pong", "MontezumaRevenge",
    "montezuma_revenge"); DatasetError naming close matches and a few valid names."""
    roms = _roms_by_key()
    key = _normalise(game)
    if key in roms:
        return roms[key]
    close = [display_name(roms[k]) for k in difflib.get_close_matches(key, roms, n=3)]
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise DatasetError(
        f"unknown Atari game {game!r}; {hint}valid names include "
        f"{', '.join(display_name(r) for r in EXAMPLE_GAMES)} ({len(roms)} games in all, "
        f"see ale_py.roms.get_all_rom_ids())"
    )


def check_params(game: str, policy: str, frameskip: int, sticky_prob: float) -> str:
    """Validates the source parameters; returns the game's ROM id."""
    if policy not in POLICIES:
        raise DatasetError(f"unknown atari policy {policy!r}; choose one of {list(POLICIES)}")
    if int(frameskip) != frameskip or frameskip < 1:
        raise DatasetError(f"frameskip must be an integer >= 1, got {frameskip}")
    if not 0.0 <= sticky_prob < 1.0:
        raise DatasetError(f"sticky_prob must be in [0, 1), got {sticky_prob}")
    return rom_id(game)


def make_emulator(rom: str, ale_seed: int) -> ale_py.ALEInterface:
    """A fresh emulator at the start of `rom`'s game (loading a ROM takes ~0.2 s)."""
    ale_py = _ale_py()
    ale_py.ALEInterface.setLoggerMode(ale_py.LoggerMode.Error)  # else a banner per ROM load
    ale = ale_py.ALEInterface()
    ale.setInt("random_seed", ale_seed)
    ale.setFloat("repeat_action_probability", 0.0)  # ALE's sticky actions would break replay
    ale.loadROM(str(ale_py.roms.get_rom_path(rom)))
    return ale


def episode_seeds(seed: int, episode_id: int) -> tuple[int, np.random.Generator]:
    """(ALE random seed in [0, 2**31), policy generator): independent streams of (seed, episode_id)."""
    ale_ss, policy_ss = np.random.SeedSequence([seed, episode_id]).spawn(2)
    return int(ale_ss.generate_state(1)[0] >> 1), np.random.default_rng(policy_ss)


def policy_actions(rng: np.random.Generator, num_frames: int, num_actions: int, repeat_prob: float) -> np.ndarray:
    """int32 [num_frames] uniform actions, each repeating the previous one with prob repeat_prob."""
    fresh = rng.integers(0, num_actions, size=num_frames)
    keep = rng.random(num_frames) < repeat_prob
    actions = np.empty(num_frames, np.int32)
    for t in range(num_frames):
        actions[t] = actions[t - 1] if (t and keep[t]) else fresh[t]
    return actions


def _box_rows(x: np.ndarray, n_out: int) -> np.ndarray:
    """float64 [n_in, ...] → [n_out, ...]: each output row is the mean of the input rows it
    covers, the edge rows weighted by their overlap (area resampling along axis 0)."""
    n_in = len(x)
    cum = np.concatenate([np.zeros_like(x[:1]), np.cumsum(x, axis=0)])  # [n_in + 1, ...]
    edges = np.arange(n_out + 1) * (n_in / n_out)
    i = np.minimum(edges.astype(np.int64), n_in - 1)
    frac = (edges - i).reshape(-1, *[1] * (x.ndim - 1))
    # The integral up to each (fractional) edge; it is linear within an input row.
    at = cum[i] + frac * (cum[i + 1] - cum[i])
    return np.diff(at, axis=0) * (n_out / n_in)


def resize_area(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 [H, W, 3] → uint8 [size, size, 3] by area averaging (box filter), rounded.

    Integral-image differences rather than weight-matrix products: ~15× faster at
    210×160 → 32×32, and deterministic (no BLAS)."""
    rows = _box_rows(image.astype(np.float64), size)  # [S, W, 3]
    out = _box_rows(rows.swapaxes(0, 1), size).swapaxes(0, 1)  # [S, S, 3]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def check_actions(actions: Sequence[int] | np.ndarray, num_actions: int) -> np.ndarray:
    """int32 [T] (T >= 1) indices into the minimal action set; ValueError otherwise."""
    actions = np.asarray(actions)
    if (
        actions.ndim != 1
        or not len(actions)
        or not np.issubdtype(actions.dtype, np.integer)
        or actions.min() < 0
        or actions.max() >= num_actions
    ):
        raise ValueError(
            f"actions must be a non-empty 1-D array of ints in [0, {num_actions}), "
            f"got {actions.dtype} of shape {actions.shape}"
        )
    return actions.astype(np.int32)


def play(
    ale: ale_py.ALEInterface, action_set: list, actions: np.ndarray, frameskip: int, size: int
) -> Iterator[tuple[np.ndarray, float, bool]]:
    """Per action: (frame uint8 [S, S, 3] shown before it, reward summed over the `frameskip`
    emulator frames it is held for, whether the game is over after them)."""
    for a in actions:
        frame = resize_area(ale.getScreenRGB(), size)
        reward = sum(ale.act(action_set[a]) for _ in range(frameskip))
        yield frame, float(reward), ale.game_over()


def generate_episode(
    seed: int,
    episode_id: int,
    num_frames: int,
    size: int,
    *,
    game: str,
    policy: str,
    frameskip: int,
    sticky_prob: float,
    actions: np.ndarray | None = None,
) -> list[dict[str, np.ndarray]]:
    """Schema records (fields `FIELDS`) of one episode, deterministic in (seed, episode_id):
    at most `num_frames` steps, fewer if the game ends first.

    `policy` "random" draws uniform actions, "sticky" repeats the previous one with prob
    `sticky_prob`; `actions` (int [num_frames] indices into the minimal action set)
    replaces the policy. Timecodes count emulator time: t·frameskip/60 s.
    """
    rom = check_params(game, policy, frameskip, sticky_prob)
    ale_seed, rng = episode_seeds(seed, episode_id)
    ale = make_emulator(rom, ale_seed)
    action_set = ale.getMinimalActionSet()
    if actions is None:
        repeat = sticky_prob if policy == "sticky" else 0.0
        actions = policy_actions(rng, num_frames, len(action_set), repeat)
    actions = check_actions(actions, len(action_set))
    if len(actions) != num_frames:
        raise ValueError(f"got {len(actions)} actions for {num_frames} frames")
    records = []
    for t, (frame, reward, over) in enumerate(play(ale, action_set, actions, frameskip, size)):
        records.append(
            {
                "episode_id": np.asarray(episode_id, np.int64),
                "t": np.asarray(t, np.int32),
                "frame": frame,
                "action": np.asarray(actions[t], np.int32),
                "shot_id": np.asarray(0, np.int32),  # one fixed view: a single shot
                "cut": np.asarray(t == 0),
                "timecode": np.asarray(t * frameskip / EMULATOR_FPS, np.float32),
                "reward": np.asarray(reward, np.float32),
                "done": np.asarray(over or t == num_frames - 1),
            }
        )
        if over:
            break
    return records


def record_spec(size: int, **_) -> schema.Spec:
    """The schema-v1 fields this source records (no camera, no entities)."""
    full = schema.field_spec(size, 0)
    return {name: full[name] for name in FIELDS}


def fps(*, frameskip: int, **_) -> float:
    """Recorded steps per second of emulator time."""
    return EMULATOR_FPS / frameskip


def describe(*, game: str, policy: str, frameskip: int, sticky_prob: float) -> dict:
    """Validates the parameters; returns what the manifest's source params add: the ROM
    id, the minimal action set (names, in action-index order) and its size (what
    `model.dynamics.num_actions` must be), and the ale-py version."""
    rom = check_params(game, policy, frameskip, sticky_prob)
    action_set = make_emulator(rom, 0).getMinimalActionSet()
    return {
        "rom": rom,
        "action_set": [a.name for a in action_set],
        "num_actions": len(action_set),
        "ale_py_version": _ale_py().__version__,
    }


def replay_path(episode_id: int) -> str:
    """Where an episode's start state is stored, relative to the dataset directory."""
    return f"replay/episode_{episode_id:06d}.msgpack"


def episode_files(seed: int, episode_id: int, *, game: str, **_) -> dict[str, bytes]:
    """{replay_path: msgpack {"v", "ale_seed", "state"}}: the ALE seed and the serialised
    emulator state (RNG included) that `generate_episode` starts the episode from."""
    ale_seed, _ = episode_seeds(seed, episode_id)
    state = make_emulator(rom_id(game), ale_seed).cloneState(include_rng=True).serialize()
    replay = {"v": REPLAY_VERSION, "ale_seed": ale_seed, "state": state}
    return {replay_path(episode_id): msgpack.packb(replay, use_bin_type=True)}


def _decode_replay(data: bytes, where: str) -> tuple[int, bytes]:
    """(ALE seed, serialised state) of a replay file's bytes."""
    try:
        replay = msgpack.unpackb(data, raw=False)
        version, ale_seed, state = replay["v"], int(replay["ale_seed"]), bytes(replay["state"])
    except (ValueError, TypeError, KeyError, msgpack.UnpackException) as e:
        raise DatasetError(f"{where} is not a replay file: {type(e).__name__}: {e}") from e
    if version != REPLAY_VERSION:
        raise DatasetError(f"{where}: replay version {version} != {REPLAY_VERSION}")
    return ale_seed, state


def _start_emulator(data_dir: str | os.PathLike, episode_id: int) -> tuple[ale_py.ALEInterface, list, dict, dict]:
    """(emulator restored to the episode's stored start state, its minimal action set, the
    manifest's source params, the manifest). DatasetError if the dataset is not Atari, the
    episode unknown, its replay file missing or corrupt, or the action set changed."""
    manifest = writer.read_manifest(data_dir)
    if manifest["source"] != SOURCE_NAME:
        raise DatasetError(f"{data_dir} holds a {manifest['source']!r} dataset, not {SOURCE_NAME!r}")
    params = manifest["source_params"]
    rel = replay_path(episode_id)
    writer.find_episode(manifest, episode_id)  # a clear error for an unknown episode
    ale_seed, state = _decode_replay(writer.read_file(data_dir, manifest, rel), rel)
    ale = make_emulator(params["rom"], ale_seed)
    ale.restoreState(_ale_py().ALEState(state))
    action_set = ale.getMinimalActionSet()
    if [a.name for a in action_set] != params["action_set"]:
        raise DatasetError(
            f"this ale-py's minimal action set for {params['rom']} differs from the dataset's {params['action_set']}"
        )
    return ale, action_set, params, manifest


def replay_episode(
    data_dir: str | os.PathLike, episode_id: int, actions: Sequence[int] | np.ndarray | None = None
) -> np.ndarray:
    """uint8 [T, S, S, 3]: the frames the emulator shows, restored from the episode's stored
    start state, before each of `actions` (int [T] minimal-action-set indices; default the
    recorded ones, which reproduces the recorded frames bit for bit). Every action is
    played, also past a game over. DatasetError if the replay file is missing or corrupt.
    """
    ale, action_set, params, manifest = _start_emulator(data_dir, episode_id)
    if actions is None:
        actions = writer.read_episode(data_dir, manifest, episode_id)["action"]
    actions = check_actions(actions, len(action_set))
    return np.stack([frame for frame, _, _ in play(ale, action_set, actions, params["frameskip"], params["size"])])


def emulator_at(data_dir: str | os.PathLike, episode_id: int, step: int) -> tuple[ale_py.ALEInterface, list, dict]:
    """(emulator, minimal action set, source params) of episode `episode_id` after its first
    `step` recorded actions, i.e. showing recorded frame `step` (0 <= step < length).

    Replays from the stored start state and checks that every frame passed, frame `step`
    included, equals the recorded one bit for bit (DatasetError otherwise: a replay that
    drifted would make any counterfactual from here meaningless)."""
    ale, action_set, params, manifest = _start_emulator(data_dir, episode_id)
    recorded = writer.read_episode(data_dir, manifest, episode_id)
    if not 0 <= step < len(recorded["frame"]):
        raise ValueError(f"step {step} outside episode {episode_id}'s 0..{len(recorded['frame']) - 1}")
    size = params["size"]
    passed = [frame for frame, _, _ in play(ale, action_set, recorded["action"][:step], params["frameskip"], size)]
    passed.append(resize_area(ale.getScreenRGB(), size))
    if not np.array_equal(np.stack(passed), recorded["frame"][: step + 1]):
        raise DatasetError(
            f"replaying episode {episode_id} of {data_dir} to step {step} does not "
            "reproduce its recorded frames (another ale-py or ROM?)"
        )
    return ale, action_set, params


def frames_after(
    ale: ale_py.ALEInterface, action_set: list, actions: np.ndarray, frameskip: int, size: int
) -> np.ndarray:
    """uint8 [T, S, S, 3]: the frame shown after each of `actions` (int [T] minimal-action-set
    indices), each held `frameskip` emulator frames; what a record's action leads to."""
    out = []
    for a in check_actions(actions, len(action_set)):
        for _ in range(frameskip):
            ale.act(action_set[a])
        out.append(resize_area(ale.getScreenRGB(), size))
    return np.stack(out)


def branch_frames(
    data_dir: str | os.PathLike, episode_id: int, step: int, branches: Sequence[Sequence[int] | np.ndarray]
) -> np.ndarray:
    """uint8 [K, T, S, S, 3]: from episode `episode_id` at recorded frame `step` (see
    `emulator_at`), the frames after each action of each of the K branches (int [T] action
    sequences), every branch starting from the same emulator state (RNG included): the
    recorded actions give the recorded frames step+1.., other actions the counterfactual
    ground truth."""
    ale, action_set, params = emulator_at(data_dir, episode_id, step)
    start = ale.cloneState(include_rng=True)
    out = []
    for actions in branches:
        ale.restoreState(start)
        out.append(frames_after(ale, action_set, np.asarray(actions), params["frameskip"], params["size"]))
    return np.stack(out)
