"""modelpress core: stages, the encoded-tensor tree, metrics, recipes and the pipeline.

Python API::

    from compress_core import Recipe, Quantize, Prune, compress
    report = compress("model.onnx", "small.onnx", Recipe([Quantize(bits=8), Prune(sparsity=0.5)]))
    print(report.ratio, report.weight_error.rel_l2)
"""

from __future__ import annotations

__version__ = "0.1.0"

from .api import compress, decompress, inspect
from .encoded import Dense, Encoded, Quantized, Sparse
from .errors import (ModelpressError, ModelReadError, ModelWriteError, RecipeError,
                     UnsupportedTensorError)
from .metrics import ErrorStats, compare
from .pipeline import DEFAULT_MIN_ELEMENTS, Options, encode
from .prune import Prune
from .quantize import Quantize
from .recipe import Recipe
from .report import Report, TensorRow
from .stage import REGISTRY, Stage, stage_class
from .tensorinfo import TensorInfo

__all__ = [
    "DEFAULT_MIN_ELEMENTS", "Dense", "Encoded", "ErrorStats", "ModelReadError", "ModelWriteError",
    "ModelpressError", "Options", "Prune", "Quantize", "Quantized", "REGISTRY", "Recipe",
    "RecipeError", "Report", "Sparse", "Stage", "TensorInfo", "TensorRow",
    "UnsupportedTensorError", "__version__", "compare", "compress", "decompress", "encode",
    "inspect", "stage_class",
]
