"""A recipe: the ordered list of stages, as Python objects, YAML or JSON."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from modelpress.core.errors import RecipeError
from modelpress.core.registry import stage_from_config
from modelpress.core.stage import Stage

RECIPE_VERSION = 1


@dataclass(frozen=True)
class Recipe:
    """Stages applied in order to each tensor they select."""

    stages: tuple[Stage, ...]

    def __init__(self, stages: Iterable[Stage]) -> None:
        object.__setattr__(self, "stages", tuple(stages))

    def get_config(self) -> dict[str, Any]:
        """The recipe as a JSON/YAML-safe mapping."""
        return {"version": RECIPE_VERSION, "stages": [s.get_config() for s in self.stages]}

    @classmethod
    def from_config(cls, config: Any, source: str = "recipe") -> Recipe:
        """Build a recipe from a mapping {version, stages: [{id, ...options}]}."""
        if not isinstance(config, dict):
            raise RecipeError(f"{source}: expected a mapping with 'version' and 'stages'")
        unknown = set(config) - {"version", "stages"}
        if unknown:
            raise RecipeError(f"{source}: unknown key {sorted(unknown)[0]!r}; "
                              "allowed: version, stages")
        version = config.get("version", RECIPE_VERSION)
        if version != RECIPE_VERSION:
            raise RecipeError(f"{source}: version {version!r} is not supported "
                              f"(this modelpress reads version {RECIPE_VERSION})")
        stages = config.get("stages")
        if not isinstance(stages, list) or not stages:
            raise RecipeError(f"{source}: 'stages' must be a non-empty list of {{id: ..., options}}")
        built = []
        for i, entry in enumerate(stages, 1):
            if not isinstance(entry, dict) or "id" not in entry:
                raise RecipeError(f"{source}: stage {i} must be a mapping with an 'id'")
            try:
                built.append(stage_from_config(entry))
            except RecipeError as exc:
                raise RecipeError(f"{source}: stage {i}: {exc}") from None
        return cls(built)

    @classmethod
    def load(cls, path: str | Path) -> Recipe:
        """Read a recipe from a .yaml/.yml or .json file."""
        return cls.from_config(read_document(path), source=str(path))

    def to_yaml(self) -> str:
        """The recipe as YAML text, in the schema `load` reads."""
        return _yaml().safe_dump(self.get_config(), sort_keys=False)


def read_document(path: str | Path) -> Any:
    """The parsed content of a .json file, or of a YAML file for any other suffix."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise RecipeError(f"{path}: cannot read recipe ({exc.strerror or exc})") from None
    except UnicodeDecodeError as exc:
        raise RecipeError(f"{path}: not UTF-8 text (byte {exc.object[exc.start]:#04x} at "
                          f"offset {exc.start}); save the recipe as UTF-8") from None
    kind = "JSON" if path.suffix.lower() == ".json" else "YAML"
    try:
        if kind == "JSON":
            return json.loads(text, object_pairs_hook=_unique_keys)
        return _load_yaml(text)
    except RecursionError:
        raise RecipeError(f"{path}: not valid {kind} (nested too deeply)") from None
    except RecipeError as exc:
        raise RecipeError(f"{path}: {exc}") from None
    except ValueError as exc:
        raise RecipeError(f"{path}: not valid JSON ({exc})") from None
    except Exception as exc:  # yaml.YAMLError and its subclasses
        raise RecipeError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None


def _yaml() -> Any:
    import yaml  # lazy: PyYAML is needed only for YAML recipes
    return yaml


def _unique_keys(pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
    """A mapping from key-value pairs; a key given twice is refused (json keeps the last)."""
    found: dict[Any, Any] = {}
    for key, value in pairs:
        if key in found:
            raise RecipeError(f"key {key!r} appears twice in one mapping; keep one")
        found[key] = value
    return found


def _load_yaml(text: str) -> Any:
    """yaml.safe_load, refusing a key given twice in one mapping (PyYAML keeps the last)."""
    yaml = _yaml()

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node: Any, deep: bool = False) -> dict[Any, Any]:
            if isinstance(node, yaml.MappingNode):
                self.flatten_mapping(node)
                keys = [self.construct_object(k, deep=deep) for k, _ in node.value]
                try:
                    _unique_keys([(k, None) for k in keys])
                except TypeError:  # an unhashable key: SafeLoader's own error follows
                    pass
            return super().construct_mapping(node, deep=deep)

    return yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
