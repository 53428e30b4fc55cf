"""Preset configs shipped with the package (`wm train --config NAME`).

The YAML files beside this module are package data, so a preset is found by name in an
installed copy as well as in the source checkout.
"""

from __future__ import annotations

from pathlib import Path

PRESETS_DIR = Path(__file__).resolve().parent


def preset_path(name_or_path: str | Path) -> Path:
    """The config file `name_or_path` names: an existing file or anything ending in .yaml
    or .yml is a path (a missing one is reported when loaded); any other name is the
    preset `PRESETS_DIR/<name>.yaml`."""
    path = Path(name_or_path)
    if path.exists() or path.suffix in (".yaml", ".yml"):
        return path
    return PRESETS_DIR / f"{path}.yaml"


def preset_name(path: Path) -> str | None:
    """The preset name of `path` when it is a shipped preset, else None."""
    path = Path(path).resolve()
    return path.stem if path.parent == PRESETS_DIR and path.suffix == ".yaml" else None
