"""The layering rules of docs/design.md, checked on the imports of every module (static, also inside functions)."""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1] / "zq_plugin"

#: Packages below every feature (a plan, hooks, run keys, the math, the quantizers).
NEUTRAL = {
    "zq_plugin.errors", "zq_plugin.qparams", "zq_plugin._compat", "zq_plugin._utils", "zq_plugin.data",
    "zq_plugin.runs", "zq_plugin.hooks", "zq_plugin.fake_quant", "zq_plugin.nonuniform", "zq_plugin.plan",
    "zq_plugin.evaluation", "zq_plugin.datasets", "zq_plugin.calibration",
}  # fmt: skip
#: package -> the packages it must never import.
FORBIDDEN = {
    "zq_plugin.plan": {"zq_plugin.backends", "zq_plugin.mixed_precision", "zq_plugin.synth", "zq_plugin.pipeline"},
    "zq_plugin.backends": {
        "zq_plugin.synth", "zq_plugin.finetuning", "zq_plugin.reconstruct", "zq_plugin.mixed_precision",
        "zq_plugin.pipeline", "zq_plugin.recipe", "zq_plugin.report", "zq_plugin.cli", "zq_plugin.demo",
    },
    "zq_plugin.synth": {
        "zq_plugin.observers", "zq_plugin.backends", "zq_plugin.finetuning", "zq_plugin.reconstruct",
        "zq_plugin.pipeline", "zq_plugin.recipe",
    },
    "zq_plugin.observers": {"zq_plugin.backends", "zq_plugin.synth", "zq_plugin.pipeline"},
    "zq_plugin.mixed_precision": {"zq_plugin.pipeline", "zq_plugin.recipe", "zq_plugin.synth"},
    "zq_plugin.reconstruct": {"zq_plugin.pipeline", "zq_plugin.recipe", "zq_plugin.synth", "zq_plugin.finetuning"},
    "zq_plugin.finetuning": {"zq_plugin.pipeline", "zq_plugin.recipe"},
    "zq_plugin.pipeline": {"zq_plugin.recipe", "zq_plugin.cli", "zq_plugin.demo"},
}  # fmt: skip
#: Who may compose stages with backends: the pipeline alone (recipe, CLI and demo call it).
PIPELINE_USERS = {"zq_plugin", "zq_plugin.recipe", "zq_plugin.cli", "zq_plugin.demo"}


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """``module -> zq_plugin modules it imports`` (``from zq_plugin import x`` counts as ``zq_plugin.x``)."""
    found: dict[str, set[str]] = {}
    for path in ROOT.rglob("*.py"):
        module = _module_name(path)
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                if node.module == "zq_plugin":
                    targets.update(f"zq_plugin.{alias.name}" for alias in node.names)
                elif node.module.startswith("zq_plugin."):
                    targets.add(node.module)
            elif isinstance(node, ast.Import):
                targets.update(a.name for a in node.names if a.name.startswith("zq_plugin"))
        found[module] = targets
    return found


def _package(module: str) -> str:
    return ".".join(module.split(".")[:2])


def _package_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for module, targets in _imports().items():
        source = _package(module)
        if source == "zq_plugin":
            continue  # the top-level package re-exports the public names
        graph.setdefault(source, set()).update(
            _package(t) for t in targets if _package(t) != source and t != "zq_plugin"
        )
    return graph


def test_no_package_cycle():
    graph = _package_graph()
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        for nxt in sorted(graph.get(node, ())):
            if nxt in path:
                cycles.append([*path[path.index(nxt) :], nxt])
            elif len(path) < 12:
                visit(nxt, [*path, nxt])

    for start in sorted(graph):
        visit(start, [start])
    assert not cycles, f"package cycles: {sorted({' -> '.join(c) for c in cycles})}"


def test_forbidden_imports():
    broken = []
    for module, targets in _imports().items():
        for package, forbidden in FORBIDDEN.items():
            if _package(module) == package:
                broken += [f"{module} imports {t}" for t in targets if _package(t) in forbidden]
    assert not broken, "\n".join(sorted(broken))


def test_neutral_modules_import_only_neutral_ones():
    broken = []
    for module, targets in _imports().items():
        if module in NEUTRAL:
            broken += [f"{module} imports {t}" for t in targets if t not in NEUTRAL and t != "zq_plugin"]
    assert not broken, "\n".join(sorted(broken))


def test_only_the_pipeline_composes_stages_with_backends():
    users = {m for m, targets in _imports().items() if any(_package(t) == "zq_plugin.pipeline" for t in targets)}
    assert users - {"zq_plugin.pipeline"} <= PIPELINE_USERS, users


def test_no_backend_module_over_about_500_lines():
    long = {p.name: n for p in (ROOT / "backends").rglob("*.py") if (n := len(p.read_text().splitlines())) > 550}
    assert not long, long
