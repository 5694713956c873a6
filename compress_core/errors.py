"""Exceptions the library raises; the CLI turns each into one line and an exit code."""

from __future__ import annotations


class ModelpressError(Exception):
    """A problem the user can fix; the message is one line naming file, tensor and fix."""


class RecipeError(ModelpressError):
    """A recipe, stage or option is invalid."""


class ModelReadError(ModelpressError):
    """A model file cannot be read: missing, empty, corrupt or of an unknown format."""


class ModelWriteError(ModelpressError):
    """A compressed model cannot be written in the requested form."""


class UnsupportedTensorError(ModelpressError):
    """A stage cannot be applied to a tensor it was asked to change."""


class OrderError(UnsupportedTensorError):
    """A stage cannot follow the stage before it on the same tensor (see core.compose)."""


class InputDataError(ModelpressError):
    """Evaluation inputs or labels that do not fit the model (file, array and fix named)."""


class ModelRunError(ModelpressError):
    """onnxruntime is missing or cannot run a model; evaluation reports it as a note."""
