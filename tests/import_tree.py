"""The `modelpress` namespace as one folder tree, the shape a wheel installs.

setuptools' package-dir maps the repo's folders into the namespace (`cli/` is
`modelpress.cli`, `compress_core/` is `modelpress.core`), so no folder of the
checkout holds the whole package. grimp, and so import-linter, finds a
package's modules by walking the folder of its `__init__.py`: run on the
checkout or on an editable install it sees only `modelpress/`. This copies each
package listed in pyproject.toml into `DIR/modelpress/...`, where grimp sees
them all; run lint-imports from DIR (it puts the working directory first on
sys.path).

    python tests/import_tree.py DIR
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest depends on tomli there
    import tomli as tomllib

REPO = Path(__file__).resolve().parent.parent


def package_folders(repo: Path = REPO) -> dict[str, Path]:
    """Each package setuptools installs -> the repo folder that holds its modules."""
    setuptools = tomllib.loads((repo / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapping = setuptools.get("package-dir", {})
    folders = {}
    for package in setuptools["packages"]:
        parts = package.split(".")
        # The longest mapped prefix decides, as in setuptools.
        for cut in range(len(parts), 0, -1):
            prefix = ".".join(parts[:cut])
            if prefix in mapping:
                folders[package] = repo / mapping[prefix] / Path(*parts[cut:])
                break
        else:
            folders[package] = repo / Path(*parts)
    return folders


def build(dest: Path, repo: Path = REPO) -> Path:
    """Copy every package's modules into dest in import-name layout; return dest."""
    for package, folder in package_folders(repo).items():
        target = dest / Path(*package.split("."))
        target.mkdir(parents=True, exist_ok=True)
        for module in folder.glob("*.py"):
            shutil.copy2(module, target / module.name)
    return dest


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python tests/import_tree.py DIR")
    build(Path(sys.argv[1]))
