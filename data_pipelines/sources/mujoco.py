"""A small MuJoCo scene filmed by a camera moved along commanded trajectories.

Each episode is a static scene, deterministic in (seed, episode_id): a checkered ground
plane, `num_objects` coloured boxes, spheres and cylinders resting at seeded places near
the origin (the scene centre), a gradient sky and a light. It is filmed in shots of
SHOT_LENGTH_RANGE steps: at each cut the camera jumps to a seeded pose on a ring around
the centre, roughly facing it, and then makes one commanded move for the whole shot at a
seeded speed (MOVES): hold, pan (yaw about its own position), orbit (about the vertical
axis through the centre, so the centre keeps its place in view) or dolly (along the view
direction). `action` is that move's id, taking frame t to t+1.

`camera` is the true pose of each frame, read back from MuJoCo: position x, y, z (metres,
z up) and the rotation quaternion qw, qx, qy, qz of the camera frame (MuJoCo's: it looks
along its -z, image up is its +y), the convention of the video side files and of
`wm_jax.models.dynamics.make_controls`. The records carry no entity fields, so `wm eval`
skips its pixel-space camera-following metric (it reads `camera[..., :2]` as a 2-D view
centre in pixels, which these poses are not).

Frames are rendered offscreen with MUJOCO_GL (egl unless set; osmesa also works), so they
are bit-identical on one machine but may differ slightly across GL implementations; the
poses do not. mujoco (the `mujoco` extra) is imported on first use.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import numpy as np

from data_pipelines import schema
from data_pipelines.schema import DatasetError

if TYPE_CHECKING:
    import mujoco

SOURCE_NAME = "mujoco"
GENERATOR_VERSION = "1.0"
FPS = 15.0
DEFAULT_PARAMS = {"num_objects": 5}
MAX_OBJECTS = 16
FIELDS = ("episode_id", "t", "frame", "action", "camera", "shot_id", "cut", "timecode", "done")
# Move ids: `action`. "left"/"right" are as seen by the camera: a pan left turns it to
# its left (content moves right in the image), an orbit left carries it to its left.
MOVES = ("hold", "pan_left", "pan_right", "orbit_left", "orbit_right", "dolly_in", "dolly_out")
NUM_ACTIONS = len(MOVES)
SHOT_LENGTH_RANGE = (8, 16)  # inclusive, in steps
FOVY = 45.0  # vertical field of view, degrees (MuJoCo's default)
# Speeds per step. At FOVY 45 and S = 32 a pixel is ~1.4 degrees, so pans move the view
# by ~1-3 px/step: steady, and well within what `estimate_shift` measures.
PAN_RATE = np.radians((1.5, 4.0))  # rad/step
ORBIT_RATE = np.radians((1.5, 4.0))  # rad/step about the centre
DOLLY_SPEED = (0.04, 0.09)  # metres/step
# Shot openings: on a ring of these radii/heights around the centre, looking at it (up
# to YAW_JITTER off). The ring keeps a whole dolly-in shot above the ground and clear of
# the objects (at most 16 · 0.09 m of travel, pitched at most ~25 degrees down, ending
# over 2.5 m from the centre: beyond every object's reach of 1.8 + 0.4·√2 m).
RING_RADIUS = (3.8, 5.0)
CAMERA_HEIGHT = (1.0, 1.8)
YAW_JITTER = 0.3  # rad
OBJECT_RADIUS = 1.8  # objects stand within this distance of the centre
OBJECT_SIZE = (0.15, 0.4)  # half extent, metres
OBJECT_TYPES = ("box", "sphere", "cylinder")
OBJECT_COLOURS = np.array(
    [
        [0.9, 0.2, 0.2],
        [0.2, 0.85, 0.9],
        [0.9, 0.25, 0.85],
        [0.3, 0.9, 0.25],
        [1.0, 0.65, 0.0],
        [0.25, 0.35, 1.0],
        [0.95, 0.95, 0.95],
        [0.55, 0.3, 0.1],
    ]
)


def _mujoco():
    """The mujoco module, imported with MUJOCO_GL defaulting to egl (mujoco picks its GL
    backend on import); DatasetError saying how to install or configure it."""
    os.environ.setdefault("MUJOCO_GL", "egl")
    try:
        import mujoco
    except (ImportError, AttributeError, OSError) as e:  # AttributeError: PyOpenGL without the GL library
        raise DatasetError(
            f"the mujoco source needs mujoco and an offscreen GL (MUJOCO_GL="
            f"{os.environ['MUJOCO_GL']}): pip install -e '.[mujoco]' and set "
            f"MUJOCO_GL=egl or osmesa ({type(e).__name__}: {e})"
        ) from e
    return mujoco


def make_renderer(model: mujoco.MjModel, size: int) -> mujoco.Renderer:
    """An offscreen size×size renderer of `model` (close it after use); DatasetError if no
    GL context can be created."""
    mj = _mujoco()
    try:
        return mj.Renderer(model, size, size)
    except (mj.FatalError, RuntimeError, ImportError, AttributeError, OSError) as e:
        raise DatasetError(
            f"mujoco cannot render offscreen with MUJOCO_GL={os.environ['MUJOCO_GL']}: "
            f"set MUJOCO_GL=egl or osmesa and install that GL library "
            f"({type(e).__name__}: {e})"
        ) from e


def check_params(num_objects: int) -> None:
    """DatasetError unless num_objects is an integer in [1, MAX_OBJECTS]."""
    if int(num_objects) != num_objects or not 1 <= num_objects <= MAX_OBJECTS:
        raise DatasetError(f"num_objects must be an integer in [1, {MAX_OBJECTS}], got {num_objects}")


def episode_rngs(seed: int, episode_id: int) -> tuple[np.random.Generator, np.random.Generator]:
    """Independent (scene, camera) generators of (seed, episode_id)."""
    scene_ss, camera_ss = np.random.SeedSequence([seed, episode_id]).spawn(2)
    return np.random.default_rng(scene_ss), np.random.default_rng(camera_ss)


def scene_xml(rng: np.random.Generator, num_objects: int, size: int) -> str:
    """MJCF of an episode's scene: ground, sky, light, `num_objects` seeded objects and the
    camera "film" (fixed to the world; its pose is set per frame)."""
    objects = []
    colours = OBJECT_COLOURS[rng.permutation(len(OBJECT_COLOURS))[np.arange(num_objects) % len(OBJECT_COLOURS)]]
    for i, colour in enumerate(colours):
        kind = OBJECT_TYPES[rng.integers(len(OBJECT_TYPES))]
        r, angle = OBJECT_RADIUS * np.sqrt(rng.random()), rng.uniform(0, 2 * np.pi)
        half = rng.uniform(*OBJECT_SIZE, size=3)
        geom_size = {"box": half, "sphere": half[:1], "cylinder": half[:2]}[kind]
        height = half[0] if kind == "sphere" else half[-1]  # rests on the ground
        objects.append(
            f'<geom name="object{i}" type="{kind}" size="{" ".join(f"{v:.4f}" for v in geom_size)}" '
            f'pos="{r * np.cos(angle):.4f} {r * np.sin(angle):.4f} {height:.4f}" '
            f'euler="0 0 {rng.uniform(0, 360):.2f}" rgba="{" ".join(f"{c:.3f}" for c in colour)} 1"/>'
        )
    geoms = "\n    ".join(objects)
    return f"""<mujoco model="camera_scene">
  <compiler angle="degree"/>
  <visual><global offwidth="{size}" offheight="{size}"/></visual>
  <asset>
    <texture name="sky" type="skybox" builtin="gradient" rgb1=".45 .6 .85" rgb2=".95 .95 1" width="64" height="64"/>
    <texture name="checker" type="2d" builtin="checker" rgb1=".25 .3 .35" rgb2=".65 .62 .55"
             mark="edge" markrgb=".85 .85 .8" width="256" height="256"/>
    <material name="ground" texture="checker" texrepeat="1 1" texuniform="true"/>
  </asset>
  <worldbody>
    <!-- No shadows: they make software GL (llvmpipe) ~3x slower per frame. -->
    <light pos="2 -2 6" dir="-.3 .3 -1" diffuse=".8 .8 .8" castshadow="false"/>
    <!-- Grid spacing 1 m (size[2]): MuJoCo draws a plane as a grid of that spacing, and
         a finer one (e.g. 0.1) makes software GL ~8x slower per frame. -->
    <geom name="ground" type="plane" size="30 30 1" material="ground"/>
    {geoms}
    <camera name="film" mode="fixed" fovy="{FOVY}"/>
  </worldbody>
</mujoco>"""


def view_direction(yaw: float, pitch: float) -> np.ndarray:
    """float64 [3]: the unit vector the camera looks along (yaw from +x towards +y, pitch up)."""
    return np.array([np.cos(pitch) * np.cos(yaw), np.cos(pitch) * np.sin(yaw), np.sin(pitch)])


def camera_rotation(yaw: float, pitch: float) -> np.ndarray:
    """float64 [3, 3] whose columns are the camera frame's x (image right), y (image up)
    and z (backwards: MuJoCo cameras look along -z) axes in world coordinates; no roll."""
    z = -view_direction(yaw, pitch)
    x = np.array([np.sin(yaw), -np.cos(yaw), 0.0])
    return np.stack([x, np.cross(z, x), z], axis=1)


def move_pose(pose: np.ndarray, move: int, speed: float) -> np.ndarray:
    """The pose float64 [5] (x, y, z, yaw, pitch) after one step of MOVES[move] at `speed`
    (rad/step for pans and orbits, metres/step for dollies)."""
    name = MOVES[move]
    x, y, z, yaw, pitch = pose
    if name.startswith("pan"):
        return np.array([x, y, z, yaw + (speed if name == "pan_left" else -speed), pitch])
    if name.startswith("orbit"):
        # Moving to the camera's left around the centre is a clockwise turn seen from above.
        a = -speed if name == "orbit_left" else speed
        c, s = np.cos(a), np.sin(a)
        return np.array([c * x - s * y, s * x + c * y, z, yaw + a, pitch])
    if name.startswith("dolly"):
        step = (speed if name == "dolly_in" else -speed) * view_direction(yaw, pitch)
        return np.array([x + step[0], y + step[1], z + step[2], yaw, pitch])
    return pose.copy()


def opening_pose(rng: np.random.Generator) -> np.ndarray:
    """float64 [5]: a shot's first pose, on the ring around the centre, looking at it."""
    bearing = rng.uniform(0, 2 * np.pi)
    radius, height = rng.uniform(*RING_RADIUS), rng.uniform(*CAMERA_HEIGHT)
    yaw = bearing + np.pi + rng.uniform(-YAW_JITTER, YAW_JITTER)
    return np.array([radius * np.cos(bearing), radius * np.sin(bearing), height, yaw, -np.arctan2(height, radius)])


def move_speed(rng: np.random.Generator, move: int) -> float:
    """A seeded speed for MOVES[move] (0 for hold)."""
    kind = MOVES[move].split("_")[0]
    ranges = {"pan": PAN_RATE, "orbit": ORBIT_RATE, "dolly": DOLLY_SPEED}
    return float(rng.uniform(*ranges[kind])) if kind in ranges else 0.0


def camera_path(rng: np.random.Generator, num_frames: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The commanded trajectory: poses float64 [T, 5] (x, y, z, yaw, pitch), actions int32
    [T] (the move of each step, taking pose t to t+1) and cuts bool [T] (a shot's first
    step, always t = 0; the pose jumps there)."""
    poses = np.empty((num_frames, 5))
    actions = np.empty(num_frames, np.int32)
    cuts = np.zeros(num_frames, bool)
    t = 0
    while t < num_frames:
        length = int(rng.integers(SHOT_LENGTH_RANGE[0], SHOT_LENGTH_RANGE[1] + 1))
        pose, move = opening_pose(rng), int(rng.integers(NUM_ACTIONS))
        speed = move_speed(rng, move)
        cuts[t] = True
        for k in range(t, min(t + length, num_frames)):
            poses[k], actions[k] = pose, move
            pose = move_pose(pose, move, speed)
        t += length
    return poses, actions, cuts


def generate_episode(
    seed: int, episode_id: int, num_frames: int, size: int, *, num_objects: int
) -> list[dict[str, np.ndarray]]:
    """Schema records (fields `FIELDS`) of one episode, deterministic in (seed, episode_id):
    frame uint8 [S, S, 3], action int32 (MOVES id), camera float32 [7] (x, y, z, qw, qx,
    qy, qz: the pose MuJoCo rendered the frame from), shot_id/cut at each shot, timecode t/FPS."""
    check_params(num_objects)
    mj = _mujoco()
    scene_rng, camera_rng = episode_rngs(seed, episode_id)
    model = mj.MjModel.from_xml_string(scene_xml(scene_rng, num_objects, size))
    data = mj.MjData(model)
    poses, actions, cuts = camera_path(camera_rng, num_frames)
    shot_ids = np.cumsum(cuts) - 1
    quat = np.empty(4)
    records = []
    with make_renderer(model, size) as renderer:
        for t, (x, y, z, yaw, pitch) in enumerate(poses):
            model.cam_pos[0] = x, y, z
            mj.mju_mat2Quat(quat, camera_rotation(yaw, pitch).ravel())
            model.cam_quat[0] = quat
            mj.mj_forward(model, data)
            renderer.update_scene(data, camera=0)
            mj.mju_mat2Quat(quat, data.cam_xmat[0])  # the pose rendered, read back
            records.append(
                {
                    "episode_id": np.asarray(episode_id, np.int64),
                    "t": np.asarray(t, np.int32),
                    "frame": renderer.render(),
                    "action": np.asarray(actions[t], np.int32),
                    "camera": np.concatenate([data.cam_xpos[0], quat]).astype(np.float32),
                    "shot_id": np.asarray(shot_ids[t], np.int32),
                    "cut": np.asarray(cuts[t]),
                    "timecode": np.asarray(t / FPS, np.float32),
                    "done": np.asarray(t == num_frames - 1),
                }
            )
    return records


def record_spec(size: int, **_) -> schema.Spec:
    """The schema-v1 fields this source records (no entities, no reward)."""
    full = schema.field_spec(size, 0)
    return {name: full[name] for name in FIELDS}


def describe(*, num_objects: int) -> dict:
    """Validates the parameters and that mujoco renders offscreen (before anything is
    written); returns what the manifest's source params add: the move names (in action
    order), their count (`model.dynamics.num_actions`), the field of view and versions."""
    check_params(num_objects)
    mj = _mujoco()
    make_renderer(mj.MjModel.from_xml_string("<mujoco/>"), 8).close()
    return {
        "actions": list(MOVES),
        "num_actions": NUM_ACTIONS,
        "fovy_deg": FOVY,
        "mujoco_version": mj.__version__,
        "mujoco_gl": os.environ["MUJOCO_GL"],
    }
