"""Layering of the package, read from the source with `ast` (imports inside functions too).

- No `_private` name of one first-party module is used by another: a helper others need
  is public, so renaming a private one never breaks a caller elsewhere.
- `wm_jax.models` imports nothing from training, evaluation, the CLI or the data pipelines.
- `data_pipelines` imports nothing from `wm_jax`: the data layer sits below the library.
- No library module imports the CLI (the `wm_jax.cli` package); the CLI imports the library.
- No import cycle among first-party modules, imports inside functions included: a
  function-level import that closes a cycle only hides it (the CLI's deferred imports
  of JAX modules close none). `make lint` checks the same layering with import-linter.
- Loading and validating a config imports no JAX (a fresh interpreter, every preset).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("wm_jax", "data_pipelines")


@dataclass(frozen=True)
class Use:
    """One first-party import (or private attribute use) found in a module."""

    module: str  # the importing module, dotted
    line: int
    target: str  # the imported module, dotted
    name: str | None = None  # the name taken from it, if any


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def source_modules() -> dict[str, ast.Module]:
    """Every first-party module, parsed, by dotted name."""
    return {
        module_name(p): ast.parse(p.read_text(), str(p))
        for package in PACKAGES
        for p in sorted((REPO / package).rglob("*.py"))
    }


def is_first_party(target: str) -> bool:
    return target.split(".")[0] in PACKAGES


def resolve(module: str, node: ast.ImportFrom, is_package: bool) -> str:
    """The absolute module of a (possibly relative) `from ... import`."""
    if not node.level:
        return node.module or ""
    base = module.split(".")
    base = base[: len(base) - node.level + (1 if is_package else 0)]
    return ".".join(base + ([node.module] if node.module else []))


def uses(module: str, tree: ast.Module, packages: set[str]) -> list[Use]:
    """First-party imports of `module`, and attribute reads `alias._name` / `pkg.mod._name`
    on the modules it imported."""
    found, aliases = [], {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if is_first_party(a.name):
                    found.append(Use(module, node.lineno, a.name))
                    root = a.name.split(".")[0]  # `import a.b` binds `a`; `import a.b as c` binds a.b
                    aliases[a.asname or root] = a.name if a.asname else root
        elif isinstance(node, ast.ImportFrom):
            target = resolve(module, node, module in packages)
            if not is_first_party(target):
                continue
            for a in node.names:
                submodule = f"{target}.{a.name}"
                if submodule in packages or submodule in MODULES:
                    found.append(Use(module, node.lineno, submodule))
                    aliases[a.asname or a.name] = submodule
                else:
                    found.append(Use(module, node.lineno, target, a.name))
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            dotted = dotted_name(node.value)
            if dotted and dotted.split(".")[0] in aliases:
                root, _, rest = dotted.partition(".")
                target = ".".join(filter(None, [aliases[root], rest]))
                if target in MODULES:
                    found.append(Use(module, node.lineno, target, node.attr))
    return found


def dotted_name(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        inner = dotted_name(node.value)
        return inner and f"{inner}.{node.attr}"
    return None


TREES = source_modules()
MODULES = set(TREES)
PACKAGE_NAMES = {m for m in TREES if (REPO / m.replace(".", "/") / "__init__.py").exists()}
USES = [u for m, tree in TREES.items() for u in uses(m, tree, PACKAGE_NAMES)]


def check(rule) -> None:
    """Fails listing every use that breaks `rule`, as `module:line -> target[.name]`."""
    bad = sorted(f"{u.module}:{u.line} -> {u.target}{'.' + u.name if u.name else ''}" for u in USES if rule(u))
    assert not bad, "\n" + "\n".join(bad)


def within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def test_the_scan_sees_the_package():
    assert {"wm_jax.cli", "wm_jax.models.dynamics", "data_pipelines.loader"} <= MODULES
    assert any(within(u.module, "wm_jax.cli") and within(u.target, "wm_jax.train") for u in USES)


def test_no_private_name_is_used_across_modules():
    def private_elsewhere(u: Use) -> bool:
        return bool(u.name) and u.name.startswith("_") and not u.name.startswith("__") and u.target != u.module

    check(private_elsewhere)


def test_models_import_no_training_evaluation_cli_or_data():
    banned = ("wm_jax.train", "wm_jax.eval", "wm_jax.cli", "data_pipelines")
    check(lambda u: within(u.module, "wm_jax.models") and any(within(u.target, b) for b in banned))


def test_data_pipelines_import_nothing_from_wm_jax():
    check(lambda u: within(u.module, "data_pipelines") and within(u.target, "wm_jax"))


def test_no_library_module_imports_the_cli():
    check(lambda u: not within(u.module, "wm_jax.cli") and within(u.target, "wm_jax.cli"))


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The modules of `graph` (module -> modules it imports) that reach themselves, grouped
    by mutual reachability: each group one cycle (or a knot of cycles), sorted."""

    def reachable(start: str) -> set[str]:
        seen, stack = set(), [start]
        while stack:
            for nxt in graph.get(stack.pop(), ()):
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append(nxt)
        return seen

    reach = {m: reachable(m) for m in graph}
    return sorted({tuple(sorted(n for n in reach[m] if m in reach.get(n, ()))) for m in graph if m in reach[m]})


def test_import_cycles_are_found():
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [("a", "b", "c")]
    assert import_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle():
    graph: dict[str, set[str]] = {}
    for u in USES:
        if u.target in MODULES and u.target != u.module:
            graph.setdefault(u.module, set()).add(u.target)
    assert import_cycles(graph) == []


JAX_MODULES = ("jax", "jaxlib", "flax", "optax", "orbax")


def test_loading_and_validating_a_config_imports_no_jax():
    """The config and the stages' config checks (`wm_jax.stage_checks`) sit below everything
    that needs JAX: a fresh interpreter loads and validates every preset (each stage's checks
    run) without importing it, so `wm launch --dry-run` and other config-only commands
    start fast."""
    code = (
        "import sys\n"
        "from wm_jax import config\n"
        "from wm_jax.presets import PRESETS_DIR\n"
        "for path in sorted(PRESETS_DIR.glob('*.yaml')):\n"
        "    config.validate(config.load(path))\n"
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {JAX_MODULES!r}))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", f"imported by wm_jax.config: {done.stdout}"
