"""The layout: layers import one way (model <- rag <- integrations <- training/evaluation/cli), no
import cycle (function-level imports included), and no module over 450 lines."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SOURCES = {"lclm_rag": REPO / "lclm_rag", "lclm_rag.ingest": REPO / "ingest", "lclm_rag.integrations": REPO / "integrations"}
LAYERS = [  # (rank, module prefixes)
    (0, ["lclm_rag.errors", "lclm_rag.hub"]),
    (1, ["lclm_rag.config", "lclm_rag.projector", "lclm_rag.prompt", "lclm_rag.compressor", "lclm_rag.decoder",
         "lclm_rag.engine", "lclm_rag.serving", "lclm_rag.model", "lclm_rag.checkpoint", "lclm_rag.families",
         "lclm_rag.query_pooling"]),
    (1, ["lclm_rag.skim"]),
    (2, ["lclm_rag.chunking", "lclm_rag.embedding", "lclm_rag.store", "lclm_rag.ingest", "lclm_rag.planning", "lclm_rag.policies",
         "lclm_rag.query_config", "lclm_rag.rag", "lclm_rag.sidecar",
         "lclm_rag.data"]),
    (3, ["lclm_rag.integrations"]),
    (4, ["lclm_rag.evaluation"]),
    (5, ["lclm_rag.training", "lclm_rag.cli", "lclm_rag.cli_args", "lclm_rag.cli_query"]),
]


def _modules() -> dict[str, Path]:
    found = {}
    for package, root in SOURCES.items():
        for path in root.rglob("*.py"):
            if "checkpoints" in path.parts:
                continue
            rel = path.relative_to(root).with_suffix("").parts
            if package == "lclm_rag" and rel[0] in ("ingest", "integrations"):
                continue
            name = ".".join((package, *rel)).removesuffix(".__init__")
            found[name] = path
    return found


def _rank(module: str) -> int | None:
    for rank, prefixes in LAYERS:
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return rank
    return None if module == "lclm_rag" else -1


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        out.update(n for n in names if n in modules and n != "lclm_rag")
    return out


def test_layers_import_one_way_and_nothing_imports_in_a_cycle():
    modules = _modules()
    graph = {name: _imports(path, modules) for name, path in modules.items()}
    unplaced = [m for m in modules if _rank(m) == -1]
    assert not unplaced, f"modules in no layer: {unplaced}"
    upward = [(m, d) for m, deps in graph.items() if m != "lclm_rag" for d in deps
              if _rank(d) is not None and _rank(d) > _rank(m)]
    assert not upward, f"imports against the layers: {upward}"
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in graph[node]:
            dep_pkg = dep if dep in graph else dep.rsplit(".", 1)[0]
            if state.get(dep_pkg) == 1:
                raise AssertionError(f"import cycle: {' -> '.join(stack + [node, dep_pkg])}")
            if dep_pkg in graph and state.get(dep_pkg) is None:
                visit(dep_pkg, stack + [node])
        state[node] = 2

    for name in graph:
        if name != "lclm_rag" and state.get(name) is None:
            visit(name, [])


def test_no_module_is_over_450_lines():
    long = {name: n for name, path in _modules().items() if (n := len(path.read_text().splitlines())) > 450}
    assert not long, long
