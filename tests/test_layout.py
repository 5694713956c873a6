"""The package's shape (issue 14): no import cycles, few and justified lazy imports,
short modules, private names kept private.

Product code is every module setuptools installs (pyproject.toml's packages, through
package-dir): cli/, compress_core/, formats/ and modelpress/. The layer contracts
themselves are import-linter's (pyproject.toml, run by .ci/run).
"""

from __future__ import annotations

import ast
import io
import json
import subprocess
import sys
import tokenize
from pathlib import Path

from import_tree import REPO, build, package_folders, tomllib

# Heavy or optional dependencies that may be imported inside a function, so that a run
# that does not need them does not pay for them (or does not need them installed).
LAZY_ALLOWED = {"onnxruntime", "onnx", "distributed", "matplotlib", "ml_dtypes", "yaml", "threadpoolctl", "rich",
                "fsspec"}
# A module of the ONNX subpackage imports onnx at its top: importing it lazily is how the
# rest of modelpress loads onnx only for ONNX files.
LAZY_SUBPACKAGES = {"modelpress.formats.onnx": "onnx",
                    # and the Dask executor imports distributed, an optional extra
                    "modelpress.app.batch.cluster": "distributed",
                    # and object storage imports fsspec, an optional extra
                    "modelpress.formats.objectstore": "fsspec"}
# `modelpress --help` and `--version` load no command (cli/entry.py): a command's module,
# read from this table, brings numpy, the stages and the formats (0.3 s) when one runs.
# Likewise `import modelpress` (the public API is resolved on first use, PEP 562).
LAZY_TABLES = {"COMMANDS[name].module": "numpy", "_EXPORTS[name]": "numpy"}
LAZY_ALLOWED = LAZY_ALLOWED | {"numpy"}
MAX_FUNCTION_IMPORTS = 20  # exclusive: fewer than this
MAX_MODULE_LINES = 400


def product_modules() -> dict[str, Path]:
    """Dotted module name -> source file, for every module the wheel installs."""
    modules = {}
    for package, folder in package_folders().items():
        for path in sorted(folder.glob("*.py")):
            name = package if path.stem == "__init__" else f"{package}.{path.stem}"
            modules[name] = path
    return modules


MODULES = product_modules()


def parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def where(path: Path, node: ast.AST) -> str:
    return f"{path.relative_to(REPO)}:{node.lineno}"


def is_import_module_call(node: ast.AST) -> bool:
    """`importlib.import_module(...)`: an import statement by another name."""
    return (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            and node.func.attr == "import_module" and isinstance(node.func.value, ast.Name)
            and node.func.value.id == "importlib")


def function_imports(tree: ast.Module) -> list[ast.AST]:
    """Imports anywhere inside a function body (at any depth of if/try/with/nested def),
    `importlib.import_module` calls included."""
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if in_function and (isinstance(child, (ast.Import, ast.ImportFrom))
                                or is_import_module_call(child)):
                found.append(child)
            inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            visit(child, inside)

    visit(tree, False)
    return found


def imported_roots(node: ast.AST) -> list[str]:
    """Top-level package names an import statement loads ('.' for a relative import)."""
    if isinstance(node, ast.Call):  # importlib.import_module(NAME): a literal, or a table's
        name = node.args[0]
        return [root_of(name.value)] if isinstance(name, ast.Constant) else \
            [LAZY_TABLES.get(ast.unparse(name), ast.unparse(name))]
    if isinstance(node, ast.ImportFrom):
        return ["."] if node.level else [root_of(node.module)]
    return [root_of(alias.name) for alias in node.names]


def root_of(module: str) -> str:
    """The dependency a module stands for: its top-level package, or what a subpackage in
    LAZY_SUBPACKAGES loads."""
    for package, dependency in LAZY_SUBPACKAGES.items():
        if module == package or module.startswith(package + "."):
            return dependency
    return module.split(".")[0]


def comment_lines(source: str) -> set[int]:
    tokens = tokenize.generate_tokens(io.StringIO(source).readline)
    return {tok.start[0] for tok in tokens if tok.type == tokenize.COMMENT}


def test_product_modules_found():
    # Guards the other tests against passing on an empty list if the layout moves.
    assert {"modelpress", "modelpress.cli.main", "modelpress.core.pipeline", "modelpress.app.api"} <= set(MODULES)
    assert any(name.startswith("modelpress.formats.onnx.") for name in MODULES)


def test_function_level_imports_are_few_and_lazy_load_heavy_dependencies():
    imports, problems = [], []
    for path in MODULES.values():
        source = path.read_text(encoding="utf-8")
        comments = comment_lines(source)
        for node in function_imports(parse(path)):
            imports.append(where(path, node))
            bad = [root for root in imported_roots(node) if root not in LAZY_ALLOWED]
            statement = f"{where(path, node)}: `{ast.unparse(node)}`"
            if bad:
                problems.append(f"{statement} inside a function (only {', '.join(sorted(LAZY_ALLOWED))} "
                                "may be loaded lazily)")
            if not comments & set(range(node.lineno - 1, node.end_lineno + 1)):
                problems.append(f"{statement} without a comment saying why (on its line or the line above)")
    report = "\n".join(problems + ["function-level imports:", *imports])
    assert not problems, report
    assert len(imports) < MAX_FUNCTION_IMPORTS, report


def test_no_module_over_400_lines():
    lengths = {name: len(path.read_text(encoding="utf-8").splitlines()) for name, path in MODULES.items()}
    long = sorted(f"{MODULES[name].relative_to(REPO)}: {n} lines" for name, n in lengths.items()
                  if n > MAX_MODULE_LINES)
    assert not long, "\n".join(long)


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def test_no_private_names_imported_across_modules():
    found = []
    for path in MODULES.values():
        for node in ast.walk(parse(path)):
            if isinstance(node, ast.ImportFrom) and node.module != "__future__":
                names = [alias.name for alias in node.names if is_private(alias.name)]
                if names:
                    found.append(f"{where(path, node)}: from {'.' * node.level}{node.module or ''} "
                                 f"import {', '.join(names)}")
    assert not found, "\n".join(found)


# grimp reads the package as a folder tree; run in a fresh process from a copy in
# import-name layout, so that it neither sees this process's editable modelpress
# nor walks only the modelpress/ folder.
# Type-checking imports count as lint-imports counts them (pyproject.toml's setting).
GRAPH_EDGES = """
import json, sys, grimp
graph = grimp.build_graph("modelpress", cache_dir=None, exclude_type_checking_imports=sys.argv[1] == "1")
print(json.dumps({m: sorted(graph.find_modules_directly_imported_by(m)) for m in graph.modules}))
"""


def strongly_connected(edges: dict[str, list[str]]) -> list[list[str]]:
    """Tarjan's components of more than one module (or a module importing itself)."""
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, []):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in edges.get(v, []):
                components.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(edges) + 100))
    for v in sorted(edges):
        if v not in index:
            connect(v)
    return sorted(components)


def one_cycle(component: list[str], edges: dict[str, list[str]]) -> list[str]:
    """A shortest cycle through the component's first module, for the message."""
    members, start = set(component), component[0]
    paths, frontier = {start: [start]}, [start]
    while frontier:
        step = []
        for v in frontier:
            for w in edges.get(v, []):
                if w == start:
                    return paths[v] + [start]
                if w in members and w not in paths:
                    paths[w] = paths[v] + [w]
                    step.append(w)
        frontier = step
    return component


def test_no_import_cycles(tmp_path):
    build(tmp_path)
    linter = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]
    exclude = "1" if linter.get("exclude_type_checking_imports", False) else "0"
    done = subprocess.run([sys.executable, "-c", GRAPH_EDGES, exclude], cwd=tmp_path,
                          capture_output=True, text=True)
    assert done.returncode == 0, f"grimp (pip install -e '.[dev]') could not build the graph:\n{done.stderr}"
    edges = json.loads(done.stdout)
    assert "modelpress.core.pipeline" in edges  # the tree, not only modelpress/
    components = strongly_connected(edges)
    message = "\n".join(f"{' -> '.join(one_cycle(c, edges))}  (one of the cycles among {len(c)} modules: "
                        f"{', '.join(c)})" for c in components)
    assert not components, f"import cycles among product modules:\n{message}"


def test_the_checks_themselves():
    # The checks above fail today; these show they pass on clean code and catch the faults.
    source = (
        "import onnx\n"
        "def f():\n"
        "    # onnx costs 0.8 s; only ONNX files need it\n"
        "    import onnx.helper\n"
        "    if True:\n"
        "        from modelpress.core import encoded\n"
        "    from x import _hidden, __version__\n"
        "class C:\n"
        "    def g(self):\n"
        "        import yaml  # recipe files only\n"
    )
    tree = ast.parse(source)
    found = function_imports(tree)
    assert [(n.lineno, imported_roots(n)) for n in found] == [
        (4, ["onnx"]), (6, ["modelpress"]), (7, ["x"]), (10, ["yaml"])]
    assert {3, 10} <= comment_lines(source) and 5 not in comment_lines(source)
    assert [is_private(a.name) for a in found[2].names] == [True, False]
    edges = {"a": ["b"], "b": ["c"], "c": ["a", "d"], "d": [], "e": ["e"]}
    assert strongly_connected(edges) == [["a", "b", "c"], ["e"]]
    assert one_cycle(["a", "b", "c"], edges) == ["a", "b", "c", "a"]
