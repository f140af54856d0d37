"""The import rules of the layout, checked by walking every module's imports.

- Serving code (``builder/runtime`` and the ``model.py`` files) imports nothing build-side: a
  repository must run where the builder is not installed.
- A stage imports only earlier stages (source -> export -> quantize -> compile -> repository ->
  targets -> serve/bench; a target's backends compose the stages' primitives, so no stage may name a target);
  shared modules (components, families, runtime, spec, compare, cache, errors) may be used by any, and only the CLI
  runs the build (``builder.build``): no stage is a second orchestrator.

Imports under ``if TYPE_CHECKING:`` are annotations only and do not count.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "builder"
STAGES = ["source", "export", "quantize", "compile", "repository", "targets", "serve", "bench"]


def builder_imports(path: Path, modules: set[str] = frozenset()) -> set[str]:
    """Dotted ``builder.*`` modules imported by ``path`` at run time (anywhere, also inside functions); with
    ``modules`` (every module's name), ``from package import submodule`` names the submodule instead."""
    tree = ast.parse(path.read_text())
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(child) for statement in node.body for child in ast.walk(statement))
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("builder"):
            names = {f"{node.module}.{alias.name}" for alias in node.names}
            found |= names & modules if names <= modules else {node.module, *(names & modules)}
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("builder"))
    return found


def area(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def modules(*areas: str) -> list[Path]:
    return sorted(p for a in areas for p in (PACKAGE / a).rglob("*.py"))


@pytest.mark.parametrize("path", modules("runtime", "repository/python_models"), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_serving_code_imports_nothing_of_the_builder(path: Path) -> None:
    """The runtime imports itself relatively (it is copied into the repository under another name);
    model.py files import that copy, ``mmtb_runtime``."""
    found = builder_imports(path)
    assert not found, f"{path.relative_to(PACKAGE)} imports {sorted(found)}: serving code runs where the builder is not installed"


@pytest.mark.parametrize("path", modules(*STAGES), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_stages_import_only_earlier_stages(path: Path) -> None:
    own = STAGES.index(path.relative_to(PACKAGE).parts[0])
    later = {m for m in builder_imports(path) if area(m) in STAGES and STAGES.index(area(m)) > own}
    assert not later, f"{path.relative_to(PACKAGE)} ({STAGES[own]}) imports a later stage: {sorted(later)}"


@pytest.mark.parametrize("path", modules(*STAGES, "families", "runtime"), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_only_the_cli_runs_the_build(path: Path) -> None:
    orchestrators = builder_imports(path) & {"builder.build", "builder.cli"}
    assert not orchestrators, f"{path.relative_to(PACKAGE)} imports {sorted(orchestrators)}"


def test_the_walk_sees_imports() -> None:
    """Guards the test itself: a known import is found, an annotation-only one is not."""
    assert "builder.runtime.model_facts" in builder_imports(PACKAGE / "build.py")
    assert "builder.spec" not in builder_imports(PACKAGE / "runtime" / "preprocess.py")


def test_no_import_circle_among_builder_modules() -> None:
    """Imports that run (module level or in functions, not ``TYPE_CHECKING``) form no circle: a stage or family
    module can be read, and imported, on its own. ``from builder.x import name`` counts as importing ``builder.x``."""
    paths = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph = {module: builder_imports(path, set(paths)) & paths.keys() for module, path in paths.items()}
    circles: list[list[str]] = []
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            circles.append(path[path.index(module):] + [module])
        elif module not in done:
            for imported in sorted(graph[module]):
                visit(imported, [*path, module])
            done.add(module)

    for module in sorted(graph):
        visit(module, [])
    assert not circles, "import circles: " + "; ".join(" -> ".join(circle) for circle in circles)


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)



def test_every_cache_entry_is_a_stage_entry() -> None:
    """Keys and entries come from ``builder.cache.Stage`` (its name, upstream key, settings, code and tool versions):
    a key built by hand elsewhere would miss one of them and serve a stale entry."""
    by_hand = [str(path.relative_to(PACKAGE)) for path in PACKAGE.rglob("*.py")
               if path.name != "cache.py" and any(call in path.read_text() for call in ("make_key(", ".writer(", "code_fingerprint("))]
    assert not by_hand, f"cache keys or entries made outside builder.cache.Stage: {by_hand}"
