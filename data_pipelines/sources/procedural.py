"""A deterministic 2D world: an agent, drifting entities, an occluder, a panning camera.

Built so that a small world model can learn it in CPU minutes: everything moves at
constant, pixel-scale velocities (the next frame is predictable from the past + action),
while the camera pans every step (copying the last frame is a poor predictor).

Coordinates are (x, y) in pixels, y pointing down. The world is a torus of
WORLD_SCALE·S pixels square (no edges: the camera never gets stuck against a wall),
seen through an S×S view whose *centre* is the camera position. The agent and camera
positions are unwrapped (the recorded camera pose is continuous); entities and the
occluder are drawn at their copy nearest the camera. Everything scales with S and stays
legible at S=32.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from data_pipelines import schema

SOURCE_NAME = "procedural"
GENERATOR_VERSION = "1.1"
FPS = 15.0
NUM_ACTIONS = 5  # 0 noop, 1 up, 2 down, 3 left, 4 right
ACTION_DELTAS = np.array([[0, 0], [0, -1], [0, 1], [-1, 0], [1, 0]], np.float64)

# A 2S world keeps the 3 entities on screen often (a 4S world shows each ~1/16 of the
# time), while still being larger than the view so the camera has room to pan.
WORLD_SCALE = 2
# The camera pans freely while the agent is within FOLLOW_ZONE·S of the view centre, and
# is dragged along when the agent walks past that, so the agent never leaves the view.
FOLLOW_ZONE = 0.125
SHOT_LENGTH_RANGE = (16, 40)  # inclusive, in steps
POLICY_PERSISTENCE = 0.75

# Muted background (two checker tones + a rarer landmark tone), a dark occluder, and
# saturated entity colours / a white agent, so objects never blend into the ground.
BACKGROUND = np.array([[70, 92, 62], [142, 132, 102], [74, 92, 140]], np.uint8)
LANDMARK_RATE = 0.15
OCCLUDER_COLOUR = np.array([22, 22, 28], np.uint8)
AGENT_COLOUR = np.array([250, 250, 250], np.uint8)
ENTITY_COLOURS = np.array(
    [[235, 45, 45], [40, 225, 235], [235, 60, 225], [70, 235, 60], [255, 160, 0],
     [60, 90, 255]], np.uint8)
ENTITY_SHAPES = ("circle", "triangle", "diamond", "cross")


@dataclasses.dataclass(frozen=True)
class World:
    """The static part of an episode (sizes in pixels)."""
    size: int                 # S, view side
    extent: int               # world side
    ground: np.ndarray        # uint8 [extent, extent, 3] pre-rendered tile background
    occluder: np.ndarray      # float64 [4] x0, y0, x1, y1 in world pixels
    num_entities: int         # N, excluding the agent
    agent_half: float         # half side of the agent square
    entity_radius: float
    agent_speed: float        # pixels per step per action
    pan_speed: float          # camera pixels per step along each moving axis


@dataclasses.dataclass(frozen=True)
class State:
    """The dynamic part (float64 world pixels)."""
    agent: np.ndarray         # [2] centre
    entity_pos: np.ndarray    # [N, 2] centres
    entity_vel: np.ndarray    # [N, 2] pixels per step
    camera: np.ndarray        # [2] view centre
    camera_vel: np.ndarray    # [2] pixels per step


def make_world(rng: np.random.Generator, size: int, num_entities: int) -> World:
    """Samples the static world: tile background and occluder placement."""
    extent = WORLD_SCALE * size
    tile = max(size // 4, 2)
    n_tiles = -(-extent // tile)
    ty, tx = np.indices((n_tiles, n_tiles))
    tilemap = (tx + ty) % 2
    tilemap[rng.random((n_tiles, n_tiles)) < LANDMARK_RATE] = 2
    pix_tile = np.arange(extent) // tile
    ground = BACKGROUND[tilemap[pix_tile[:, None], pix_tile[None, :]]]
    occ_w, occ_h = 0.55 * size, 0.45 * size
    x0 = rng.uniform(0.25 * extent, 0.75 * extent - occ_w)
    y0 = rng.uniform(0.25 * extent, 0.75 * extent - occ_h)
    return World(
        size=size, extent=extent, ground=ground,
        occluder=np.array([x0, y0, x0 + occ_w, y0 + occ_h]), num_entities=num_entities,
        agent_half=size / 12, entity_radius=0.11 * size, agent_speed=size / 16,
        pan_speed=max(1.0, size / 32))


def initial_bodies(rng: np.random.Generator, world: World) -> tuple[np.ndarray, ...]:
    """Agent centre [2], entity centres [N, 2] and velocities [N, 2] (float64)."""
    n, r, ext = world.num_entities, world.entity_radius, world.extent
    # Whole-pixel starts keep shapes crisp (all speeds are whole pixels at S >= 32).
    agent = np.round(rng.uniform(0, ext, size=2))
    pos = np.round(rng.uniform(0, ext, size=(n, 2)))
    # Integer multiples of S/32 px/step, never at rest, so motion is steady and crisp.
    vel = rng.integers(-2, 3, size=(n, 2)).astype(np.float64)
    still = ~vel.any(axis=1)
    vel[still, 0] = rng.choice([-1.0, 1.0], size=int(still.sum()))
    return agent, pos, vel * (world.size / 32)


def shot_cuts(rng: np.random.Generator, num_frames: int) -> np.ndarray:
    """bool [num_frames]: True on each shot's first step (always at t=0)."""
    cuts = np.zeros(num_frames, bool)
    t = 0
    while t < num_frames:
        cuts[t] = True
        t += int(rng.integers(SHOT_LENGTH_RANGE[0], SHOT_LENGTH_RANGE[1] + 1))
    return cuts


def new_shot(rng: np.random.Generator, world: World, agent: np.ndarray) -> tuple[np.ndarray, ...]:
    """Camera centre [2] near the agent (so it starts in view) and a nonzero pan [2]."""
    s = world.size
    zone = int(FOLLOW_ZONE * s)  # start inside the dead zone: no follow jump after the cut
    offset = rng.integers(-zone, zone + 1, size=2)
    centre = np.round(agent) + offset
    directions = np.array([(dx, dy) for dx in (-1, 0, 1) for dy in (-1, 0, 1) if dx or dy])
    vel = directions[rng.integers(len(directions))] * world.pan_speed
    return centre.astype(np.float64), vel.astype(np.float64)


def random_policy(rng: np.random.Generator, num_frames: int,
                  persistence: float = POLICY_PERSISTENCE) -> np.ndarray:
    """int32 [num_frames] actions: repeat the previous one with prob `persistence`."""
    fresh = rng.integers(0, NUM_ACTIONS, size=num_frames)
    keep = rng.random(num_frames) < persistence
    actions = np.empty(num_frames, np.int32)
    for t in range(num_frames):
        actions[t] = actions[t - 1] if (t and keep[t]) else fresh[t]
    return actions


def nearest_image(pos: np.ndarray, ref: np.ndarray, extent: float) -> np.ndarray:
    """The copy of torus position pos [..., 2] closest to ref [2] (unwrapped coordinates)."""
    return ref + (pos - ref + extent / 2) % extent - extent / 2


def follow(camera: np.ndarray, agent: np.ndarray, zone: float) -> np.ndarray:
    """Camera centre [2] moved just enough that the agent [2] lies within +-zone of it
    (a game-style dead zone: the agent stays on screen, and its actions also move the view)."""
    return np.clip(camera, agent - zone, agent + zone)


def step(world: World, state: State, action: int) -> State:
    """The state after applying `action` to `state` (agent clamped to the world)."""
    s, ext = world.size, world.extent
    agent = state.agent + ACTION_DELTAS[action] * world.agent_speed
    pos = (state.entity_pos + state.entity_vel) % ext
    panned = state.camera + state.camera_vel
    # Whole pixels: a sub-pixel camera would shimmer after rounding in `render`.
    cam = np.round(follow(panned, agent, FOLLOW_ZONE * s))
    # The pan reverses where the dead zone held it back, so the view keeps moving.
    cam_vel = np.where((cam - panned) * state.camera_vel < 0, -state.camera_vel, state.camera_vel)
    return State(agent=agent, entity_pos=pos, entity_vel=state.entity_vel, camera=cam, camera_vel=cam_vel)


def _shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    """bool [S, S] pixels inside `shape` of radius r, given offsets dx, dy from its centre."""
    if shape == "circle":
        return dx**2 + dy**2 <= r**2
    if shape == "triangle":  # apex up, base at dy = r
        return (dy <= r) & (np.abs(dx) <= (dy + r) / 2)
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= r
    if shape == "cross":
        arm = r / 2.5
        return ((np.abs(dx) <= arm) & (np.abs(dy) <= r)) | ((np.abs(dy) <= arm) & (np.abs(dx) <= r))
    if shape == "square":
        return (np.abs(dx) <= r) & (np.abs(dy) <= r)
    raise ValueError(f"unknown shape {shape!r}")


def render(world: World, state: State) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draws the view: background, entities, occluder over them, agent on top.

    Returns frame uint8 [S, S, 3], boxes float32 [E, 4] (x0, y0, x1, y1 screen pixels,
    agent first) and visible bool [E] (some pixel on screen and not under the occluder).
    """
    s = world.size
    top_left = state.camera - s / 2
    x0, y0 = np.floor(top_left).astype(int)
    rows, cols = (y0 + np.arange(s)) % world.extent, (x0 + np.arange(s)) % world.extent
    frame = world.ground[rows[:, None], cols[None, :]]
    bodies = np.concatenate([state.agent[None], state.entity_pos])  # [E, 2]
    centres = nearest_image(bodies, state.camera, world.extent) - top_left  # [E, 2]
    pix = np.arange(s) + 0.5
    dx = pix[None, None, :] - centres[:, 0, None, None]  # [E, 1, S]
    dy = pix[None, :, None] - centres[:, 1, None, None]  # [E, S, 1]
    occ_half = (world.occluder[2:] - world.occluder[:2]) / 2
    occ_centre = nearest_image(world.occluder[:2] + occ_half, state.camera, world.extent) - top_left
    ox0, oy0, ox1, oy1 = np.concatenate([occ_centre - occ_half, occ_centre + occ_half])
    occluded = ((pix[:, None] >= oy0) & (pix[:, None] < oy1)
                & (pix[None, :] >= ox0) & (pix[None, :] < ox1))  # [S, S]
    visible = np.zeros(1 + world.num_entities, bool)
    for i in range(world.num_entities):
        shape = ENTITY_SHAPES[i % len(ENTITY_SHAPES)]
        mask = _shape_mask(shape, dx[i + 1], dy[i + 1], world.entity_radius)
        frame[mask] = ENTITY_COLOURS[i % len(ENTITY_COLOURS)]
        visible[i + 1] = (mask & ~occluded).any()
    frame[occluded] = OCCLUDER_COLOUR
    agent_mask = _shape_mask("square", dx[0], dy[0], world.agent_half)
    frame[agent_mask] = AGENT_COLOUR
    visible[0] = agent_mask.any()
    half = np.array([world.agent_half] + [world.entity_radius] * world.num_entities)[:, None]
    boxes = np.concatenate([centres - half, centres + half], axis=1).astype(np.float32)
    return frame, boxes, visible


def touching(world: World, state: State) -> bool:
    """Whether the agent's square overlaps any entity's bounding box (the reward)."""
    reach = world.agent_half + world.entity_radius
    near = nearest_image(state.entity_pos, state.agent, world.extent)
    return bool((np.abs(near - state.agent).max(axis=1) < reach).any())


def episode_rngs(seed: int, episode_id: int) -> tuple[np.random.Generator, np.random.Generator]:
    """Independent (world, policy) generators, so caller-supplied actions leave the world,
    the entities and the shot timing of an episode unchanged."""
    world_ss, policy_ss = np.random.SeedSequence([seed, episode_id]).spawn(2)
    return np.random.default_rng(world_ss), np.random.default_rng(policy_ss)


def generate_episode(seed: int, episode_id: int, num_frames: int, size: int = 64,
                     num_entities: int = 3,
                     actions: np.ndarray | None = None) -> list[dict[str, np.ndarray]]:
    """Schema-v1 records for one episode, deterministic in (seed, episode_id).

    `actions` (int [num_frames] in [0, NUM_ACTIONS)) replaces the random policy;
    actions[t] takes frame t to frame t+1.
    """
    world_rng, policy_rng = episode_rngs(seed, episode_id)
    world = make_world(world_rng, size, num_entities)
    agent, pos, vel = initial_bodies(world_rng, world)
    cuts = shot_cuts(world_rng, num_frames)
    if actions is None:
        actions = random_policy(policy_rng, num_frames)
    actions = np.asarray(actions)
    if (actions.shape != (num_frames,) or actions.min(initial=0) < 0
            or actions.max(initial=0) >= NUM_ACTIONS):
        raise ValueError(f"actions must be ints in [0, {NUM_ACTIONS}) of shape ({num_frames},), "
                         f"got shape {actions.shape}")
    state = State(agent=agent, entity_pos=pos, entity_vel=vel,
                  camera=np.zeros(2), camera_vel=np.zeros(2))
    entity_ids = np.arange(1 + num_entities, dtype=np.int32)
    records, shot_id = [], -1
    for t in range(num_frames):
        if cuts[t]:
            shot_id += 1
            cam, cam_vel = new_shot(world_rng, world, state.agent)
            state = dataclasses.replace(state, camera=cam, camera_vel=cam_vel)
        frame, boxes, visible = render(world, state)
        records.append({
            "episode_id": np.asarray(episode_id, np.int64),
            "t": np.asarray(t, np.int32),
            "frame": frame,
            "action": np.asarray(actions[t], np.int32),
            "camera": np.array([*state.camera, 1.0, 1.0, 0.0, 0.0, 0.0], np.float32),
            "shot_id": np.asarray(shot_id, np.int32),
            "cut": np.asarray(cuts[t]),
            "timecode": np.asarray(t / FPS, np.float32),
            "entity_ids": entity_ids,
            "entity_boxes": boxes,
            "entity_visible": visible,
            "reward": np.asarray(float(touching(world, state)), np.float32),
            "done": np.asarray(t == num_frames - 1),
        })
        state = step(world, state, int(actions[t]))
    return records


def record_spec(size: int, num_entities: int) -> schema.Spec:
    """The schema spec of this source's records (E = 1 + num_entities: the agent is id 0)."""
    return schema.field_spec(size, 1 + num_entities)
