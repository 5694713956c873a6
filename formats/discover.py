"""Finding the models in a tree of files: what is a model, what belongs to one, what is copied.

A model is an `.onnx` file, a `.safetensors` file, or a sharded safetensors
checkpoint (a `*.safetensors.index.json` with the shards it names: one model).
The files a model needs travel with it: an ONNX model's external-data files
and a checkpoint's shards are never models or copies of their own. A folder's
config.json belongs to its safetensors model (the output gets the
compressed-tensors `quantization_config`). Every other file is copied.

Hidden files and folders (names starting with '.') are ignored; symbolic links
are refused, never followed; the output folder is skipped when it lies inside
the input tree. A tree in object storage is a URL prefix: its objects are
listed (storage has no links), and the rest is the same.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath

from modelpress.core.errors import ModelReadError

from modelpress.formats.location import (AnyPath, ObjectPath, exists, file_size, is_dir, is_file,
                                         storage)
from modelpress.formats.outputs import onnx_files
from modelpress.formats.safetensors.sharded import INDEX_SUFFIX, is_index, shard_files

MODEL_SUFFIXES = (".onnx", ".safetensors")


@dataclass(frozen=True)
class ModelEntry:
    """One model of the tree: its main file and every input file it is made of."""

    rel: PurePosixPath          # main file (.onnx, .safetensors or index), relative to the base
    kind: str                   # "onnx", "safetensors" or "sharded"
    src: AnyPath
    parts: tuple[AnyPath, ...] = ()   # external-data files or shards
    config: AnyPath | None = None     # the config.json this model owns
    problem: str = ""              # why it must not be processed (a part is a link)

    @property
    def files(self) -> list[AnyPath]:
        """Every input file: main file, parts, config."""
        return [self.src, *self.parts] + ([self.config] if self.config else [])

    @property
    def nbytes(self) -> int:
        """Bytes of the model on disk (config excluded)."""
        return sum(_size(p) for p in (self.src, *self.parts))


@dataclass(frozen=True)
class OtherFile:
    """A file that is not part of any model: copied unchanged."""

    rel: PurePosixPath
    src: AnyPath


@dataclass(frozen=True)
class Refused:
    """A path that is not processed, and why."""

    rel: PurePosixPath
    reason: str


@dataclass
class Discovery:
    """Everything found under the inputs."""

    base: AnyPath
    models: list[ModelEntry] = field(default_factory=list)
    others: list[OtherFile] = field(default_factory=list)
    refused: list[Refused] = field(default_factory=list)


def base_of(inputs: list[AnyPath]) -> AnyPath:
    """The folder the output tree mirrors: a single folder input itself, else the
    deepest folder holding every input."""
    if any(isinstance(p, ObjectPath) for p in inputs):
        return _object_base(inputs)
    absolute = [Path(os.path.abspath(p)) for p in inputs]
    if len(absolute) == 1 and absolute[0].is_dir():
        return absolute[0]
    return Path(os.path.commonpath([str(p.parent) for p in absolute]))


def discover(inputs: list[AnyPath], exclude: AnyPath | None = None) -> Discovery:
    """Walk the inputs and sort their files into models, copies and refusals.

    Paths named on the command line may be links; links found while walking
    are refused. `exclude` (the output folder) is never walked.
    """
    base = base_of(inputs)
    found = Discovery(base)
    files: dict[PurePosixPath, AnyPath] = {}
    explicit: set[PurePosixPath] = set()
    if isinstance(base, ObjectPath):
        _list_objects(inputs, base, exclude, files, explicit, found.refused)
        _classify(files, explicit, found)
        return found
    skip = os.path.realpath(exclude) if isinstance(exclude, Path) else None
    for given in inputs:
        path = Path(os.path.abspath(given))
        if not path.exists():
            raise ModelReadError(f"{given}: no such file or folder")
        rel = _rel(path, base)
        if path.is_dir():
            _walk(path, base, skip, files, found.refused)
        elif path.name.startswith("."):
            found.refused.append(Refused(rel, "hidden file; name it without a leading '.'"))
        else:
            files[rel] = path
            explicit.add(rel)
    _classify(files, explicit, found)
    return found


def _rel(path: AnyPath, base: AnyPath) -> PurePosixPath:
    if isinstance(path, ObjectPath) and isinstance(base, ObjectPath):
        return path.relative_to(base) if path != base else PurePosixPath(".")
    return PurePosixPath(Path(os.path.relpath(path, base)).as_posix())


def _object_base(inputs: list[AnyPath]) -> ObjectPath:
    objects = [p for p in inputs if isinstance(p, ObjectPath)]
    if len(objects) != len(inputs) or len({p.protocol for p in objects}) > 1:
        raise ModelReadError(f"{inputs[0]}: give the inputs all as local paths or all as URLs "
                             "of one store, not a mix")
    if len(objects) == 1 and is_dir(objects[0]):
        return objects[0]
    common: list[str] = []
    for parts in zip(*(p.parent.key.split("/") for p in objects)):
        if len(set(parts)) > 1:
            break
        common.append(parts[0])
    if not common:
        raise ModelReadError(f"{objects[0]}: the inputs share no bucket; give inputs of one "
                             "bucket (or run once per bucket)")
    return ObjectPath(f"{objects[0].protocol}://{'/'.join(common)}")


def _list_objects(inputs: list[AnyPath], base: ObjectPath, exclude: AnyPath | None,
                  files: dict[PurePosixPath, AnyPath], explicit: set[PurePosixPath],
                  refused: list[Refused]) -> None:
    """The objects under URL prefixes (or named one by one), hidden ones left out."""
    for given in inputs:
        assert isinstance(given, ObjectPath)
        if is_file(given):
            rel = _rel(given, base)
            if given.name.startswith("."):
                refused.append(Refused(rel, "hidden file; name it without a leading '.'"))
            else:
                files[rel] = given
                explicit.add(rel)
            continue
        if not exists(given):
            raise ModelReadError(f"{given}: no such object or prefix")
        for found in storage().walk(given):
            if isinstance(exclude, ObjectPath) and found.is_relative_to(exclude):
                continue
            rel = _rel(found, base)
            if not any(part.startswith(".") for part in rel.parts):
                files[rel] = found


# Why a link inside a tree is refused, and what to do instead.
_NO_LINKS = ("; modelpress does not follow links inside a tree (copy the target in, or name it "
             "on the command line)")


def _walk(top: Path, base: Path, skip: str | None, files: dict[PurePosixPath, Path],
          refused: list[Refused]) -> None:
    for folder, dirs, names in os.walk(top, followlinks=False):
        here = Path(folder)
        keep = []
        for d in sorted(dirs):
            path = here / d
            if d.startswith("."):
                continue
            if path.is_symlink():
                refused.append(Refused(_rel(path, base), "symbolic link to a folder" + _NO_LINKS))
            elif skip is None or os.path.realpath(path) != skip:
                keep.append(d)
        dirs[:] = keep
        for name in sorted(names):
            path = here / name
            if name.startswith("."):
                continue
            if path.is_symlink():
                refused.append(Refused(_rel(path, base), "symbolic link" + _NO_LINKS))
            elif path.is_file():
                files[_rel(path, base)] = path
            else:
                refused.append(Refused(_rel(path, base), "not a regular file"))


def _classify(files: dict[PurePosixPath, AnyPath], explicit: set[PurePosixPath],
              found: Discovery) -> None:
    claimed: set[PurePosixPath] = set()
    models: list[ModelEntry] = []
    for rel in sorted(files):
        if is_index(rel):
            names = _index_shards(files, rel)
            parts, problem = _parts(files[rel], names, "shard")
            claimed.update(_rel(p, found.base) for p in parts)
            models.append(ModelEntry(rel, "sharded", files[rel], parts, problem=problem))
    others = {r for r in files if not r.name.endswith(MODEL_SUFFIXES) and not is_index(r)}
    for rel in sorted(files):
        if rel.suffix.lower() == ".onnx":
            names = _external_files(files, rel, others, rel in explicit)
            parts, problem = _parts(files[rel], names, "external-data file")
            claimed.update(_rel(p, found.base) for p in parts)
            models.append(ModelEntry(rel, "onnx", files[rel], parts, problem=problem))
    for rel in sorted(files):
        if rel.suffix.lower() == ".safetensors" and rel not in claimed:
            models.append(ModelEntry(rel, "safetensors", files[rel]))
    models = _assign_configs(models, files, claimed)
    found.models = sorted(models, key=lambda m: str(m.rel))
    found.others = [OtherFile(r, files[r]) for r in sorted(files, key=str)
                    if r not in claimed and r.suffix.lower() not in MODEL_SUFFIXES
                    and not is_index(r)]


def _parts(main: AnyPath, names: list[str], what: str) -> tuple[tuple[AnyPath, ...], str]:
    """The existing files `names` (relative to the main file's folder), and a problem if one
    of them is a symbolic link (links are never followed inside a tree)."""
    folder = main.parent
    if isinstance(folder, ObjectPath):
        objects = [folder / n for n in names]
        return tuple(p for p in objects if is_file(p)), ""
    paths = [Path(os.path.normpath(folder / n)) for n in names]
    links = [p for p in paths if p.is_symlink()]
    problem = (f"{what} {links[0].name} is a symbolic link; modelpress does not follow links "
               "inside a tree (copy the target in)") if links else ""
    return tuple(p for p in paths if p.is_file() and not p.is_symlink()), problem


def _index_shards(files: dict[PurePosixPath, AnyPath], index: PurePosixPath) -> list[str]:
    """The shard names an index lists; for an unreadable index, the files named like shards.

    An unreadable index is still one model (it fails with the read error),
    and its shards must not be compressed one by one as separate models.
    """
    try:
        return shard_files(files[index])
    except ModelReadError:
        prefix = index.name[: -len(INDEX_SUFFIX)] + "-"
        return sorted(r.name for r in files if r.parent == index.parent
                      and r.name.startswith(prefix) and r.suffix == ".safetensors")


def _external_files(files: dict[PurePosixPath, AnyPath], model: PurePosixPath,
                    others: set[PurePosixPath], explicit: bool) -> list[str]:
    """External-data locations of an ONNX model that stay inside its folder.

    A model found in a tree is parsed (without its data) only when a file
    that could hold external data lies in its folder or below; a model named
    on the command line always is. A model that cannot be parsed claims
    nothing (it fails later with the read error).
    """
    folder = model.parent
    if not explicit and not any(_inside(o, folder) for o in others):
        return []
    return onnx_files().relative_locations(files[model]) or []


def _inside(path: PurePosixPath, folder: PurePosixPath) -> bool:
    return str(folder) == "." or folder in path.parents


def _assign_configs(models: list[ModelEntry], files: dict[PurePosixPath, AnyPath],
                    claimed: set[PurePosixPath]) -> list[ModelEntry]:
    """Give each folder's config.json to its safetensors model.

    The owner is `model.safetensors.index.json` or `model.safetensors` when
    present, else the folder's only safetensors model; with none, or several
    and neither standard name, config.json is copied unchanged.
    """
    result = list(models)
    for rel in sorted(files):
        if rel.name != "config.json":
            continue
        local = [m for m in result if m.kind != "onnx" and m.rel.parent == rel.parent]
        standard = [m for m in local if m.rel.name in ("model" + INDEX_SUFFIX, "model.safetensors")]
        owner = standard[0] if standard else (local[0] if len(local) == 1 else None)
        if owner is not None:
            result[result.index(owner)] = replace(owner, config=files[rel])
            claimed.add(rel)
    return result


def _size(path: AnyPath) -> int:
    try:
        return file_size(path)
    except (OSError, ModelReadError):
        return 0
