"""A deterministic 2D world: an agent, drifting entities, occluders, a panning camera, shots.

Built so that a small world model can learn it in CPU minutes: within a shot everything
moves at constant, pixel-scale velocities (the next frame is predictable from the past +
action), while the camera pans every step (copying the last frame is a poor predictor).
Episodes are cut into short shots so that 8-16 frame clips exercise what a world model
must remember across time:

* identity across cuts: at each cut the camera jumps to a view that shows again at least
  one entity seen in the previous shot (a *returning* identity);
* object permanence: at each cut every entity is re-aimed to pass behind an occluder
  within a few steps, and the camera prefers framings that show one hidden and back;
* a per-episode `reference` frame, a sprite sheet of every entity slot on its own
  (`render_reference`), for identity memory.

Coordinates are (x, y) in pixels, y pointing down. The world is a torus of
WORLD_SCALE·S pixels square (no edges: the camera never gets stuck against a wall),
seen through an S×S view whose *centre* is the camera position. The agent and camera
positions are unwrapped (the recorded camera pose is continuous); entities and
occluders are drawn at their copy nearest the camera. Everything scales with S and stays
legible at S=32. Entity motion and shot timing come from the world generator only, so
caller-supplied actions change the agent (and, in v2, the camera), never the rest of the world.

World versions (source parameter `version`):

* **3** (default): controls are the user's, never the outcome. The policy draws a fresh
  action each step except with probability `action_persistence` (default 0.2), and the
  camera moves exactly as commanded: one pan per shot, independent of the agent, and at a
  cut a framing that shows the agent on the side the pan moves away from, so the agent
  crosses the view instead of leaving it. The recorded camera pose is thus the integral
  of the commanded moves, and it carries no information about the actions.
* **2**: the camera follows the agent with a dead zone (its realised pose, fed to a model
  as a control, leaks the actions) and the policy repeats its action with probability
  0.75. Kept so that v2 datasets can be regenerated and replayed (counterfactuals).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from data_pipelines import schema

SOURCE_NAME = "procedural"
GENERATOR_VERSION = "3.0"
WORLD_VERSIONS = (2, 3)
DEFAULT_PARAMS = {"num_entities": 3, "version": 3, "action_persistence": None}
FPS = 15.0
NUM_ACTIONS = 5  # 0 noop, 1 up, 2 down, 3 left, 4 right
ACTION_DELTAS = np.array([[0, 0], [0, -1], [0, 1], [-1, 0], [1, 0]], np.float64)

# A 1.5S world keeps the 3 entities on screen often (the view is 44% of it; in a 2S
# world a cut finds a returning entity after ~65% of cuts instead of ~91%, and windows
# show an occlusion about half as often), while still being larger than the view so the
# camera has room to pan. It must exceed S + any object's side, so that no object shows
# twice in one view.
WORLD_SCALE = 1.5
# The camera pans freely while the agent is within FOLLOW_ZONE·S of the view centre, and
# is dragged along when the agent walks past that, so the agent never leaves the view.
FOLLOW_ZONE = 0.125
# Short shots: every 16-frame clip contains a cut, and about 2 in 3 8-frame clips do.
SHOT_LENGTH_RANGE = (6, 14)  # inclusive, in steps
# Probability that the random policy repeats its previous action, by world version (v3:
# low, so each step's action carries fresh information a model must read).
POLICY_PERSISTENCE = {2: 0.75, 3: 0.2}
# At a cut the camera is re-framed: of CAMERA_CANDIDATES centres drawn within
# +-CUT_FRAMING·S of the agent (x and y; the agent stays in view, with a margin for one
# step of drift, and `follow` glides back to the dead zone), the first is taken that
# shows a returning entity within RETURN_STEPS steps, preferring one that will show an
# occlusion and then a jump of at least MIN_CUT_JUMP·S (so the cut visibly changes the view).
CAMERA_CANDIDATES = 32
CUT_FRAMING = 0.34
MIN_CUT_JUMP = 0.125
RETURN_STEPS = 3
# Two occluders, one in each diagonal quadrant of the world (jittered within it), so
# most views contain or border one; each can hide an entity wholly (side > diameter).
OCCLUDER_QUADRANTS = ((0, 0), (1, 1))
OCCLUDER_SIZE = (0.4, 0.35)  # width, height in units of S
# At each cut every entity is re-aimed to pass behind an occluder within AIM_STEPS steps
# (`aim_at_occluder`), so a shot often shows one hidden and coming back out.
AIM_STEPS = (2, 8)  # inclusive
AIM_VELOCITIES = np.array(
    [(vx, vy) for vx in range(-2, 3) for vy in range(-2, 3) if vx or vy], np.float64
)  # [24, 2] in units of S/32 px/step
PAN_DIRECTIONS = np.array([(dx, dy) for dx in (-1, 0, 1) for dy in (-1, 0, 1) if dx or dy], np.float64)  # [8, 2]

# Muted background (two checker tones + a rarer landmark tone), dark occluders, and
# saturated entity colours / a white agent, so objects never blend into the ground.
BACKGROUND = np.array([[70, 92, 62], [142, 132, 102], [74, 92, 140]], np.uint8)
LANDMARK_RATE = 0.15
OCCLUDER_COLOUR = np.array([22, 22, 28], np.uint8)
AGENT_COLOUR = np.array([250, 250, 250], np.uint8)
ENTITY_COLOURS = np.array(
    [[235, 45, 45], [40, 225, 235], [235, 60, 225], [70, 235, 60], [255, 160, 0], [60, 90, 255]], np.uint8
)
ENTITY_SHAPES = ("circle", "triangle", "diamond", "cross")
# Mid-grey: unlike any ground, occluder or body colour, and 0 after the metrics' mid-grey
# centring (`appearance_similarity`), so a reference crop is dominated by its sprite.
REFERENCE_BACKGROUND = np.array([128, 128, 128], np.uint8)


@dataclasses.dataclass(frozen=True)
class World:
    """The static part of an episode (sizes in pixels)."""

    size: int  # S, view side
    extent: int  # world side
    ground: np.ndarray  # uint8 [extent + S, extent + S, 3] tile background, wrapped
    # by S so that any view is one contiguous slice
    occluders: np.ndarray  # float64 [K, 4] x0, y0, x1, y1 in world pixels
    num_entities: int  # N, excluding the agent
    entity_shapes: tuple[str, ...]  # [N] each entity's shape, and
    entity_colours: np.ndarray  # uint8 [N, 3] colour: its look for the whole episode
    agent_half: float  # half side of the agent square
    entity_radius: float
    agent_speed: float  # pixels per step per action
    pan_speed: float  # camera pixels per step along each moving axis


@dataclasses.dataclass(frozen=True)
class State:
    """The dynamic part (float64 world pixels)."""

    agent: np.ndarray  # [2] centre
    entity_pos: np.ndarray  # [N, 2] centres
    entity_vel: np.ndarray  # [N, 2] pixels per step
    camera: np.ndarray  # [2] view centre
    camera_vel: np.ndarray  # [2] pixels per step


def make_world(rng: np.random.Generator, size: int, num_entities: int) -> World:
    """Samples the static world: tile background, occluder placement and entity looks.

    Looks are drawn per episode (distinct shapes for up to 4 entities, distinct colours
    for up to 6, a distinct pair for up to 12), so which entity looks how is learnt from
    the episode (its frames, its `reference`), not memorised per slot.
    """
    extent = int(round(WORLD_SCALE * size))
    tile = max(size // 4, 2)
    n_tiles = -(-extent // tile)
    ty, tx = np.indices((n_tiles, n_tiles))
    tilemap = (tx + ty) % 2
    tilemap[rng.random((n_tiles, n_tiles)) < LANDMARK_RATE] = 2
    pix_tile = np.arange(extent) // tile
    ground = BACKGROUND[tilemap[pix_tile[:, None], pix_tile[None, :]]]
    occ_size = np.array(OCCLUDER_SIZE) * size
    quadrant = extent / 2
    corner = np.array(OCCLUDER_QUADRANTS, np.float64) * quadrant + rng.uniform(
        0, quadrant - occ_size, size=(len(OCCLUDER_QUADRANTS), 2)
    )
    slots = np.arange(num_entities)
    shapes = rng.permutation(len(ENTITY_SHAPES))[slots % len(ENTITY_SHAPES)]
    colours = rng.permutation(len(ENTITY_COLOURS))[slots % len(ENTITY_COLOURS)]
    return World(
        size=size,
        extent=extent,
        ground=np.pad(ground, ((0, size), (0, size), (0, 0)), "wrap"),
        occluders=np.concatenate([corner, corner + occ_size], axis=1),
        num_entities=num_entities,
        entity_shapes=tuple(ENTITY_SHAPES[i] for i in shapes),
        entity_colours=ENTITY_COLOURS[colours],
        agent_half=size / 12,
        entity_radius=0.11 * size,
        agent_speed=size / 16,
        pan_speed=max(1.0, size / 32),
    )


def initial_bodies(rng: np.random.Generator, world: World) -> tuple[np.ndarray, ...]:
    """Agent centre [2], entity centres [N, 2] and velocities [N, 2] (float64)."""
    n, ext = world.num_entities, world.extent
    # Whole-pixel starts keep shapes crisp (all speeds are whole pixels at S >= 32).
    agent = np.round(rng.uniform(0, ext, size=2))
    pos = np.round(rng.uniform(0, ext, size=(n, 2)))
    # Integer multiples of S/32 px/step, never at rest, so motion is steady and crisp.
    vel = AIM_VELOCITIES[rng.integers(len(AIM_VELOCITIES), size=n)]
    return agent, pos, vel * (world.size / 32)


def shot_cuts(rng: np.random.Generator, num_frames: int) -> np.ndarray:
    """bool [num_frames]: True on each shot's first step (always at t=0)."""
    cuts = np.zeros(num_frames, bool)
    t = 0
    while t < num_frames:
        cuts[t] = True
        t += int(rng.integers(SHOT_LENGTH_RANGE[0], SHOT_LENGTH_RANGE[1] + 1))
    return cuts


def nearest_image(pos: np.ndarray, ref: np.ndarray, extent: float) -> np.ndarray:
    """The copy of torus position pos [..., 2] closest to ref [..., 2] (unwrapped coordinates)."""
    return ref + (pos - ref + extent / 2) % extent - extent / 2


def under_occluder(world: World, pos: np.ndarray, margin: float = 0.0) -> np.ndarray:
    """bool [...]: whether each point pos [..., 2] lies inside some occluder shrunk by
    `margin` px on every side (margin = entity radius: a body there is wholly hidden)."""
    half = (world.occluders[:, 2:] - world.occluders[:, :2]) / 2  # [K, 2]
    centre = world.occluders[:, :2] + half
    d = nearest_image(pos[..., None, :], centre, world.extent) - centre  # [..., K, 2]
    return (np.abs(d) < half - margin).all(axis=-1).any(axis=-1)


def random_policy(rng: np.random.Generator, num_frames: int, persistence: float = POLICY_PERSISTENCE[2]) -> np.ndarray:
    """int32 [num_frames] actions: repeat the previous one with prob `persistence`."""
    fresh = rng.integers(0, NUM_ACTIONS, size=num_frames)
    keep = rng.random(num_frames) < persistence
    actions = np.empty(num_frames, np.int32)
    for t in range(num_frames):
        actions[t] = actions[t - 1] if (t and keep[t]) else fresh[t]
    return actions


def follow(camera: np.ndarray, panned: np.ndarray, agent: np.ndarray, zone: float, max_move: float) -> np.ndarray:
    """The next camera centre [..., 2]: `panned` moved just enough that the agent [..., 2]
    lies within +-zone of it (a game-style dead zone: the agent stays on screen, and its
    actions also move the view), at most max_move px per axis from `camera` [..., 2].
    Inside the dead zone the limit never binds; after a cut that framed the agent
    off-centre, it makes the camera glide back instead of jumping."""
    target = np.clip(panned, agent - zone, agent + zone)
    return camera + np.clip(target - camera, -max_move, max_move)


def camera_step(
    world: World, camera: np.ndarray, camera_vel: np.ndarray, agent: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Camera centre and pan [..., 2] one step on, given the agent's new centre [..., 2]."""
    panned = camera + camera_vel
    # Whole pixels: a sub-pixel camera would shimmer after rounding in `render`.
    cam = np.round(follow(camera, panned, agent, FOLLOW_ZONE * world.size, world.agent_speed + world.pan_speed))
    # The pan reverses where the dead zone held it back, so the view keeps moving.
    return cam, np.where((cam - panned) * camera_vel < 0, -camera_vel, camera_vel)


def step(world: World, state: State, action: int, follow_agent: bool = True) -> State:
    """The state after applying `action` to `state` (the agent is unwrapped: never clamped).
    follow_agent: the v2 dead-zone camera; False (v3) pans exactly as commanded."""
    agent = state.agent + ACTION_DELTAS[action] * world.agent_speed
    pos = (state.entity_pos + state.entity_vel) % world.extent
    if follow_agent:
        cam, cam_vel = camera_step(world, state.camera, state.camera_vel, agent)
    else:
        cam, cam_vel = state.camera + state.camera_vel, state.camera_vel
    return State(agent=agent, entity_pos=pos, entity_vel=state.entity_vel, camera=cam, camera_vel=cam_vel)


def agent_path(world: World, agent: np.ndarray, actions: np.ndarray) -> np.ndarray:
    """float64 [len(actions) + 1, 2]: the agent's centre, from agent [2], after each action."""
    return agent + world.agent_speed * np.cumsum(ACTION_DELTAS[np.r_[0, actions]], axis=0)


def aim_at_occluder(world: World, pos: np.ndarray, vel: np.ndarray) -> np.ndarray:
    """float64 [2]: a new velocity (px/step) for an entity at pos [2] moving at vel [2]:
    of AIM_VELOCITIES, the one that hides it wholly behind an occluder soonest within
    AIM_STEPS steps (turning by over 90 degrees only if no other does, so that entities
    travel on rather than shuttle), else the one passing closest to an occluder centre."""
    steps = np.arange(AIM_STEPS[0], AIM_STEPS[1] + 1)
    options = AIM_VELOCITIES * (world.size / 32)  # [V, 2]
    reach = pos + options[:, None] * steps[:, None]  # [V, A, 2]
    hides = under_occluder(world, reach, margin=world.entity_radius)  # [V, A]
    centres = (world.occluders[:, :2] + world.occluders[:, 2:]) / 2
    centres = nearest_image(centres, pos, world.extent)  # [K, 2]
    closest = np.linalg.norm(reach[:, :, None] - centres, axis=-1).min(axis=(1, 2))  # [V]
    # One ranking: the hiding step (+A for a sharp turn), then 2A + a fraction below 1.
    rank = np.where(
        hides.any(axis=1),
        hides.argmax(axis=1) + len(steps) * (options @ vel < 0),
        2 * len(steps) + closest / (closest.max() + 1),
    )
    return options[np.argmin(rank)]


def camera_paths(
    world: World, cameras: np.ndarray, pan: np.ndarray, agent_path: np.ndarray, follow_agent: bool = True
) -> np.ndarray:
    """float64 [C, H, 2]: the camera centre at each step of a shot that opens at each of
    cameras [C, 2] with pan [2], while the agent walks agent_path [H, 2] (H >= 1; without
    `follow_agent` only its length matters: the camera pans as commanded)."""
    if not follow_agent:
        return cameras[:, None] + np.arange(len(agent_path))[:, None] * pan
    cam, vel = cameras, np.broadcast_to(pan, cameras.shape)
    path = [cam]
    for agent in agent_path[1:]:
        cam, vel = camera_step(world, cam, vel, agent)
        path.append(cam)
    return np.stack(path, axis=1)


def views_ahead(world: World, state: State, cameras: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """bool [C, H, N] twice, for camera paths cameras [C, H, 2] (`camera_paths`) over the
    coming steps h = 0..H-1: entity n clearly visible (wholly in view and centre clear of
    the occluders, so `render` marks it visible), and hidden (centre in view, whole body
    behind an occluder). Entities move at state.entity_vel."""
    h = np.arange(cameras.shape[1])[:, None, None]
    future = (state.entity_pos + h * state.entity_vel) % world.extent  # [H, N, 2]
    cam = cameras[:, :, None]  # [C, H, 1, 2]
    offset = np.abs(nearest_image(future[None], cam, world.extent) - cam)  # [C, H, N, 2]
    inside = (offset <= world.size / 2 - world.entity_radius).all(axis=-1)
    on_screen = (offset < world.size / 2).all(axis=-1)
    return (
        inside & ~under_occluder(world, future),
        on_screen & under_occluder(world, future, margin=world.entity_radius),
    )


def new_shot(
    rng: np.random.Generator,
    world: World,
    state: State,
    returning: np.ndarray,
    agent_path: np.ndarray,
    version: int = 2,
) -> tuple[np.ndarray, np.ndarray]:
    """Camera centre and nonzero pan [2] (float64) for a shot opening in `state`.

    Candidate framings (see CUT_FRAMING) rank by: shows an entity flagged in `returning`
    bool [N] within RETURN_STEPS steps; then shows, over the shot, an entity seen, hidden
    by an occluder and seen again; then jumps by MIN_CUT_JUMP·S or more. The first of the
    best wins. agent_path [H, 2] is the agent's centre over the H steps of the shot (the
    actions are known in advance, so the camera's path is too). The generator draws the
    same numbers whatever the state, so the world's own randomness stays action-free.

    Version 3: the camera then pans as commanded (no following), so the framings put the
    agent on the side the pan moves away from: it crosses the view during the shot.
    """
    reach = int(CUT_FRAMING * world.size)
    offsets = rng.integers(-reach, reach + 1, size=(CAMERA_CANDIDATES, 2))
    pan = PAN_DIRECTIONS[rng.integers(len(PAN_DIRECTIONS))] * world.pan_speed
    follow_agent = version == 2
    if not follow_agent:
        offsets = np.where(pan != 0, -np.abs(offsets) * np.sign(pan), offsets)
    cameras = np.round(state.agent) + offsets
    paths = camera_paths(world, cameras, pan, agent_path, follow_agent)
    visible, hidden = views_ahead(world, state, paths)
    shows = (visible[:, :RETURN_STEPS] & returning).any(axis=(1, 2))
    hidden_after_seen = hidden & np.logical_or.accumulate(visible, axis=1)
    back = visible[:, 1:] & np.logical_or.accumulate(hidden_after_seen, axis=1)[:, :-1]
    jumps = np.abs(cameras - state.camera).max(axis=1) >= MIN_CUT_JUMP * world.size
    return cameras[np.argmax(4 * shows + 2 * back.any(axis=(1, 2)) + jumps)], pan


def _shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    """bool: the pixels inside `shape` of radius r, given offsets dx, dy (broadcasting
    float arrays, e.g. [1, w] and [h, 1]) of their centres from the shape's centre."""
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


def bodies(world: World) -> list[tuple[str, float, np.ndarray]]:
    """(shape, radius in px, colour uint8 [3]) of each entity slot: the agent's white
    square, then the entities' looks."""
    return [("square", world.agent_half, AGENT_COLOUR)] + [
        (shape, world.entity_radius, colour) for shape, colour in zip(world.entity_shapes, world.entity_colours)
    ]


def sprite(shape: str, radius: float, centre: np.ndarray, size: int) -> tuple[slice, slice, np.ndarray]:
    """Where a body drawn at screen point centre [2] (x, y) covers a size×size image:
    rows, columns and bool mask [h, w] over its bounding window clipped to the image (a
    pixel is covered when its centre is). Drawing windows, not whole frames, keeps
    `render` fast."""
    # Python scalars: this runs for every body of every frame, where numpy calls cost most.
    cx, cy = float(centre[0]), float(centre[1])
    x0, x1 = (min(max(math.floor(cx - radius), 0), size), min(max(math.ceil(cx + radius), 0), size))
    y0, y1 = (min(max(math.floor(cy - radius), 0), size), min(max(math.ceil(cy + radius), 0), size))
    dx = np.arange(x0, x1) + (0.5 - cx)
    dy = np.arange(y0, y1) + (0.5 - cy)
    return slice(y0, y1), slice(x0, x1), _shape_mask(shape, dx[None, :], dy[:, None], radius)


def render(world: World, state: State) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draws the view: background, entities, occluders over them, agent on top.

    Returns frame uint8 [S, S, 3], boxes float32 [E, 4] (x0, y0, x1, y1 screen pixels,
    agent first; they track the true position also where a body is hidden or off screen)
    and visible bool [E] (some pixel on screen and not under an occluder).
    """
    s, ext = world.size, world.extent
    top_left = state.camera - s / 2
    x0, y0 = np.floor(top_left).astype(int) % ext
    frame = world.ground[y0 : y0 + s, x0 : x0 + s].copy()
    occ_half = (world.occluders[:, 2:] - world.occluders[:, :2]) / 2  # [K, 2]
    occ_centre = nearest_image(world.occluders[:, :2] + occ_half, state.camera, ext) - top_left
    # Pixel j is under an occluder when its centre j + 0.5 lies in [lo, hi).
    occ_lo = np.clip(np.ceil(occ_centre - occ_half - 0.5), 0, s).astype(int).tolist()  # [K, 2]
    occ_hi = np.clip(np.ceil(occ_centre + occ_half - 0.5), 0, s).astype(int).tolist()
    occluded = np.zeros((s, s), bool)
    for (ox0, oy0), (ox1, oy1) in zip(occ_lo, occ_hi):
        occluded[oy0:oy1, ox0:ox1] = True
    centres = (
        nearest_image(np.concatenate([state.agent[None], state.entity_pos]), state.camera, ext) - top_left
    )  # [E, 2]
    visible = np.zeros(len(centres), bool)
    agent, *entities = [(sprite(shape, r, c, s), colour) for (shape, r, colour), c in zip(bodies(world), centres)]
    for i, ((rows, cols, mask), colour) in enumerate(entities, start=1):
        frame[rows, cols][mask] = colour
        visible[i] = (mask & ~occluded[rows, cols]).any()
    for (ox0, oy0), (ox1, oy1) in zip(occ_lo, occ_hi):  # slices: faster than frame[occluded]
        frame[oy0:oy1, ox0:ox1] = OCCLUDER_COLOUR
    (rows, cols, mask), colour = agent
    frame[rows, cols][mask] = colour
    visible[0] = mask.any()  # the agent is drawn over the occluders
    half = np.array([world.agent_half] + [world.entity_radius] * world.num_entities)[:, None]
    boxes = np.concatenate([centres - half, centres + half], axis=1).astype(np.float32)
    return frame, boxes, visible


def reference_cells(size: int, num_entities: int) -> np.ndarray:
    """float32 [E, 4]: the cell (x0, y0, x1, y1, pixels) of each entity slot in the
    reference frame: a g×g grid, g = ceil(sqrt(E)), filled row by row (slot 0, the agent,
    top left; then slots in `entity_ids` order). E counts the agent. Each sprite sits at
    its cell's centre at its in-frame size (so its tight box is that centre +- the half
    size in `entity_boxes`), and fits its cell for E <= 16."""
    g = int(np.ceil(np.sqrt(num_entities)))
    cell = size / g
    row, col = np.divmod(np.arange(num_entities), g)
    return np.stack([col, row, col + 1, row + 1], axis=1).astype(np.float32) * np.float32(cell)


def render_reference(world: World) -> np.ndarray:
    """uint8 [S, S, 3]: the episode's sprite sheet, each body drawn alone at its in-frame
    size, centred in its `reference_cells` cell on a REFERENCE_BACKGROUND ground."""
    cells = reference_cells(world.size, 1 + world.num_entities).astype(np.float64)
    frame = np.broadcast_to(REFERENCE_BACKGROUND, (world.size, world.size, 3)).copy()
    for (shape, r, colour), centre in zip(bodies(world), (cells[:, :2] + cells[:, 2:]) / 2):
        rows, cols, mask = sprite(shape, r, centre, world.size)
        frame[rows, cols][mask] = colour
    return frame


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


def describe(num_entities: int, version: int, action_persistence: float | None) -> dict:
    """Validates the source parameters; the manifest records the persistence in effect."""
    if version not in WORLD_VERSIONS:
        raise schema.DatasetError(f"procedural world version {version!r} unknown; known: {WORLD_VERSIONS}")
    persistence = POLICY_PERSISTENCE[version] if action_persistence is None else action_persistence
    if not 0.0 <= persistence <= 1.0:
        raise schema.DatasetError(f"action_persistence must be in [0, 1], got {persistence}")
    return {"action_persistence": float(persistence)}


def generate_episode(
    seed: int,
    episode_id: int,
    num_frames: int,
    size: int = 64,
    num_entities: int = 3,
    actions: np.ndarray | None = None,
    version: int = 3,
    action_persistence: float | None = None,
) -> list[dict[str, np.ndarray]]:
    """Schema-v1 records for one episode, deterministic in (seed, episode_id) and the
    world `version` (2 or 3, see the module docstring).

    `actions` (int [num_frames] in [0, NUM_ACTIONS)) replaces the random policy, whose
    repeat probability is `action_persistence` (None: the version's default); actions[t]
    takes frame t to frame t+1. Given the recorded actions, this reproduces an episode
    bit for bit; given others, it shows what they would have done (the counterfactual).
    Every record holds the same read-only `reference` array (`render_reference`).
    """
    persistence = describe(num_entities, version, action_persistence)["action_persistence"]
    world_rng, policy_rng = episode_rngs(seed, episode_id)
    world = make_world(world_rng, size, num_entities)
    agent, pos, vel = initial_bodies(world_rng, world)
    cuts = shot_cuts(world_rng, num_frames)
    if actions is None:
        actions = random_policy(policy_rng, num_frames, persistence)
    actions = np.asarray(actions)
    if actions.shape != (num_frames,) or actions.min(initial=0) < 0 or actions.max(initial=0) >= NUM_ACTIONS:
        raise ValueError(
            f"actions must be ints in [0, {NUM_ACTIONS}) of shape ({num_frames},), got shape {actions.shape}"
        )
    state = State(agent=agent, entity_pos=pos, entity_vel=vel, camera=np.zeros(2), camera_vel=np.zeros(2))
    entity_ids = np.arange(1 + num_entities, dtype=np.int32)
    reference = render_reference(world)
    reference.flags.writeable = False
    seen = np.zeros(num_entities, bool)  # entities visible in the current shot
    records, shot_id = [], -1
    for t in range(num_frames):
        if cuts[t]:
            shot_id += 1
            vel = np.stack([aim_at_occluder(world, p, v) for p, v in zip(state.entity_pos, state.entity_vel)])
            state = dataclasses.replace(state, entity_vel=vel)
            shot_end = t + 1 + int(np.argmax(np.r_[cuts[t + 1 :], True]))
            path = agent_path(world, state.agent, actions[t : shot_end - 1])
            # The first shot, or one after a shot without entities, may open on any entity.
            cam, cam_vel = new_shot(world_rng, world, state, seen if seen.any() else ~seen, path, version)
            state = dataclasses.replace(state, camera=cam, camera_vel=cam_vel)
            seen = np.zeros(num_entities, bool)
        frame, boxes, visible = render(world, state)
        seen |= visible[1:]
        records.append(
            {
                "episode_id": np.asarray(episode_id, np.int64),
                "t": np.asarray(t, np.int32),
                "frame": frame,
                "reference": reference,
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
            }
        )
        state = step(world, state, int(actions[t]), follow_agent=version == 2)
    return records


def record_spec(size: int, num_entities: int, **_: object) -> schema.Spec:
    """The schema spec of this source's records (E = 1 + num_entities: the agent is id 0)."""
    return schema.field_spec(size, 1 + num_entities)


def replay(
    source_params: Mapping[str, Any], episode_id: int, start_t: int = 0, actions: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """Episode `episode_id` of a procedural dataset, regenerated from its manifest's
    `source_params` (seed, size, frames, num_entities; version and action_persistence
    where recorded: datasets made before world version 3 lack them and are version 2).

    The recorded actions (the policy's, drawn as `generate_episode` draws them) are played,
    except that `actions` int [K] replace those of steps start_t..start_t+K-1 (actions[k]
    takes frame start_t+k to start_t+k+1). Returns every record field stacked over the
    episode's steps, e.g. frame uint8 [T, S, S, 3], entity_boxes float32 [T, E, 4],
    entity_visible bool [T, E], action int32 [T]. Unreplaced, this reproduces the
    dataset's records bit for bit; replaced, it shows what the other actions would have
    done (the counterfactual). Steps up to start_t stay as recorded in world version 3; in
    version 2 a cut frames its shot by looking ahead at the agent's path through it, so
    other actions can also reframe the steps of their shot before start_t.
    """
    p = source_params
    num_frames, version = int(p["frames"]), int(p.get("version", 2))
    persistence = describe(int(p["num_entities"]), version, p.get("action_persistence"))["action_persistence"]
    played = random_policy(episode_rngs(int(p["seed"]), episode_id)[1], num_frames, persistence)
    if actions is not None:
        actions = np.asarray(actions)
        if actions.ndim != 1 or not 0 <= start_t <= start_t + len(actions) <= num_frames:
            raise ValueError(
                f"actions of shape {actions.shape} from step {start_t} do not fit an episode of {num_frames} steps"
            )
        played[start_t : start_t + len(actions)] = actions
    records = generate_episode(
        int(p["seed"]),
        episode_id,
        num_frames,
        size=int(p["size"]),
        num_entities=int(p["num_entities"]),
        actions=played,
        version=version,
        action_persistence=persistence,
    )
    return {k: np.stack([r[k] for r in records]) for k in records[0]}


def agent_moves(size: int) -> np.ndarray:
    """float64 [NUM_ACTIONS, 2]: the agent's move (x, y px) per step under each action at
    view size S (ACTION_DELTAS times the world's agent speed; the no-op's is zero)."""
    return ACTION_DELTAS * make_world(np.random.default_rng(0), size, 1).agent_speed
