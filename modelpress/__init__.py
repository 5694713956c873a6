"""modelpress: compress ONNX models and safetensors weights with an ordered recipe of stages.

The Python API::

    import modelpress
    recipe = modelpress.Recipe([modelpress.Prune(sparsity=0.5), modelpress.Quantize(bits=8)])
    report = modelpress.compress("model.onnx", "small.onnx", recipe)
    print(report.ratio, report.weight_error.rel_l2)

Stages: Quantize ("quantize"), Cast ("cast"), Prune ("prune"), Factorize
("lowrank") and Cluster ("cluster"). Output error of ONNX models (onnxruntime)
and a side-by-side sweep::

    evaluation = modelpress.evaluate("model.onnx", "small.onnx", modelpress.EvalSettings(inputs="x.npz"))
    for row in modelpress.sweep("model.onnx").rows:
        print(row.name, row.ratio, row.output_error, row.on_front)

A size or error target (`compress --target-size/--target-error`): the search
returns the recipe that meets it, which `compress` then writes::

    target = modelpress.Target(size=modelpress.SizeTarget(fraction=0.2))
    found = modelpress.search_target("model.onnx", "small.onnx", None, target,
                                     inputs="calib.npz", calibration=True)
    modelpress.compress("model.onnx", "small.onnx", found.recipe, calibration="calib.npz")

Static int8 (weights and activations, QDQ that onnxruntime runs as integer kernels)::

    recipe = modelpress.Recipe([modelpress.Quantize(bits=8, activations="int8")])
    report = modelpress.compress_static("model.onnx", "int8.onnx", recipe, "calib.npz",
                                        target_error=0.01)
    print(report.static_int8["kernels"]["integer"], report.static_int8["search"]["error_written"])

The folders of the repository map to subpackages: `compress_core/` is
`modelpress.core` (stages, the encoded tree, recipe, pipeline, metrics; no file
I/O), `formats/` is `modelpress.formats` (ONNX and safetensors readers and
writers), `modelpress/app/` is `modelpress.app` (the API, batch runs, sweeps,
evaluation) and `cli/` is `modelpress.cli` (the command line).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# Public name -> the module that defines it. Resolved on first use (PEP 562), so that
# `modelpress --help` does not pay for numpy, onnx and the stages it does not need.
_EXPORTS = {
    "compress": "modelpress.app.api", "decompress": "modelpress.app.api",
    "inspect": "modelpress.app.api",
    "compress_static": "modelpress.app.static_int8",
    "search_target": "modelpress.app.budget", "Outcome": "modelpress.app.budget",
    "Target": "modelpress.core.budget", "SizeTarget": "modelpress.core.budget",
    "BudgetError": "modelpress.core.budget",
    "EvalSettings": "modelpress.app.evaluation", "evaluate": "modelpress.app.evaluation",
    "DEFAULT_SETTINGS": "modelpress.app.sweep", "Setting": "modelpress.app.sweep",
    "SweepReport": "modelpress.app.sweep", "sweep": "modelpress.app.sweep",
    "Cast": "modelpress.core.cast", "Cluster": "modelpress.core.cluster",
    "Factorize": "modelpress.core.lowrank", "Prune": "modelpress.core.prune",
    "Quantize": "modelpress.core.quantize.stage",
    "Dense": "modelpress.core.encoded", "Encoded": "modelpress.core.encoded",
    "LowRank": "modelpress.core.encoded", "Palettized": "modelpress.core.encoded",
    "Quantized": "modelpress.core.encoded", "Scaled": "modelpress.core.encoded",
    "Sparse": "modelpress.core.encoded",
    "ModelpressError": "modelpress.core.errors", "ModelReadError": "modelpress.core.errors",
    "ModelWriteError": "modelpress.core.errors", "RecipeError": "modelpress.core.errors",
    "UnsupportedTensorError": "modelpress.core.errors",
    "ErrorStats": "modelpress.core.metrics", "compare": "modelpress.core.metrics",
    "DEFAULT_MIN_ELEMENTS": "modelpress.core.pipeline", "Options": "modelpress.core.pipeline",
    "encode": "modelpress.core.pipeline",
    "OnnxTarget": "modelpress.formats.onnx.options",
    "OnnxWriteOptions": "modelpress.formats.onnx.options",
    "SafetensorsWriteOptions": "modelpress.formats.safetensors.options",
    "Recipe": "modelpress.core.recipe",
    "Report": "modelpress.core.report", "TensorRow": "modelpress.core.report",
    "REGISTRY": "modelpress.core.registry", "stage_class": "modelpress.core.registry",
    "stage_from_config": "modelpress.core.registry",
    "Skip": "modelpress.core.stage", "Stage": "modelpress.core.stage",
    "TensorInfo": "modelpress.core.tensorinfo",
    "Evaluation": "modelpress.core.evaluate", "Thresholds": "modelpress.core.thresholds",
}

__all__ = sorted([*_EXPORTS, "__version__"])


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'modelpress' has no attribute {name!r}")
    # numpy, the stages and the formats: loaded with the first public name used
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
