"""modelpress core: stages, the encoded-tensor tree, metrics, recipes and the pipeline.

Python API::

    from compress_core import Recipe, Quantize, Prune, compress
    report = compress("model.onnx", "small.onnx", Recipe([Prune(sparsity=0.5), Quantize(bits=8)]))
    print(report.ratio, report.weight_error.rel_l2)

Stages: Quantize ("quantize"), Cast ("cast"), Prune ("prune"), Factorize
("lowrank") and Cluster ("cluster").

Output error of ONNX models (onnxruntime) and a side-by-side sweep::

    from compress_core import EvalSettings, evaluate, sweep
    evaluation = evaluate("model.onnx", "small.onnx", EvalSettings(inputs="x.npz"))
    print(evaluation.output_error, evaluation.latency.ratio)
    for row in sweep("model.onnx").rows:
        print(row.name, row.ratio, row.output_error, row.on_front)
"""

from __future__ import annotations

__version__ = "0.1.0"

from .api import compress, decompress, inspect
from .cast import Cast
from .cluster import Cluster
from .encoded import Dense, Encoded, LowRank, Palettized, Quantized, Scaled, Sparse
from .errors import (ModelpressError, ModelReadError, ModelWriteError, RecipeError,
                     UnsupportedTensorError)
from .metrics import ErrorStats, compare
from .pipeline import DEFAULT_MIN_ELEMENTS, Options, encode
from .lowrank import Factorize
from .prune import Prune
from .quantize import Quantize
from .recipe import Recipe
from .report import Report, TensorRow
from .stage import REGISTRY, Skip, Stage, stage_class
from .tensorinfo import TensorInfo

__all__ = [
    "Cast", "Cluster", "DEFAULT_MIN_ELEMENTS", "Dense", "Encoded", "ErrorStats", "Factorize",
    "LowRank", "ModelReadError", "ModelWriteError", "ModelpressError", "Options", "Palettized",
    "Prune", "Quantize", "Quantized", "REGISTRY", "Recipe", "RecipeError", "Report", "Scaled",
    "Skip", "Sparse", "Stage", "TensorInfo", "TensorRow",
    "UnsupportedTensorError", "__version__", "compare", "compress", "decompress", "encode",
    "inspect", "stage_class",
]

# Output evaluation, CI thresholds and sweeps (kept apart so stage exports merge cleanly).
from .evaluate import Evaluation  # noqa: E402
from .model_eval import EvalSettings, evaluate  # noqa: E402
from .sweep import DEFAULT_SETTINGS, Setting, SweepReport, sweep  # noqa: E402
from .thresholds import Thresholds  # noqa: E402

__all__ += ["DEFAULT_SETTINGS", "EvalSettings", "Evaluation", "Setting", "SweepReport",
            "Thresholds", "evaluate", "sweep"]
