"""The core needs ml_dtypes only for bf16/fp8 data, and recognises those dtypes without it."""

from __future__ import annotations

import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest

from modelpress.core import dtypes

# A float32 run of every stage but bf16/fp8 casts, in a fresh interpreter: prints
# whether ml_dtypes was imported.
_CORE_RUN = """
import sys
import numpy as np
from modelpress.core.estimate import element_bits
from modelpress.core.pipeline import Options, encode
from modelpress.core.recipe import Recipe
from modelpress.core.registry import stage_from_config
from modelpress.core.tensorinfo import TensorInfo

class Store:
    path, format, file_bytes = "mem", "safetensors", 0
    def __init__(self):
        w = np.random.default_rng(0).standard_normal((64, 128)).astype(np.float32)
        self.data = {"a.weight": w}
        self.tensors = {"a.weight": TensorInfo("a.weight", w.shape, w.dtype, True, 0, 1,
                                               None, "safetensors")}
    def read(self, name):
        return self.data[name]

for stages in ([{"id": "quantize", "bits": 8}], [{"id": "quantize", "bits": 4}],
               [{"id": "prune"}, {"id": "cluster"}],
               [{"id": "lowrank", "rank": 8}, {"id": "cast", "dtype": "fp16"}]):
    recipe = Recipe([stage_from_config(c) for c in stages])
    store = Store()
    assert encode(store, recipe, Options(min_elements=16)).tensors
    element_bits(store.tensors["a.weight"], list(recipe.stages), "safetensors", [])
print("ml_dtypes" in sys.modules)
"""


def test_core_imports_and_float32_runs_do_not_import_ml_dtypes() -> None:
    out = subprocess.run([sys.executable, "-c", _CORE_RUN], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("dtype, name", [
    (np.float64, "fp64"), (np.float32, "fp32"), (np.float16, "fp16"),
    (ml_dtypes.bfloat16, "bf16"), (ml_dtypes.float8_e4m3fn, "fp8-e4m3"),
    (ml_dtypes.float8_e5m2, "fp8-e5m2")])
def test_float_dtypes_by_name(dtype, name: str) -> None:
    assert dtypes.is_float(dtype) and dtypes.short_name(dtype) == name


@pytest.mark.parametrize("dtype", [np.int8, np.int64, np.uint16, np.bool_, "V2", ">f4"])
def test_other_dtypes_are_not_floats(dtype) -> None:
    assert not dtypes.is_float(dtype)


def test_lazy_constants_are_ml_dtypes() -> None:
    assert dtypes.BFLOAT16 == np.dtype(ml_dtypes.bfloat16)
    assert dtypes.FLOAT8_E4M3 == np.dtype(ml_dtypes.float8_e4m3fn)
    assert dtypes.FLOAT8_E5M2 == np.dtype(ml_dtypes.float8_e5m2)
    with pytest.raises(AttributeError):
        dtypes.FLOAT4  # noqa: B018


def test_own_float_and_scale_dtype() -> None:
    bf16 = np.dtype(ml_dtypes.bfloat16)
    assert dtypes.own_float(bf16) == bf16 and dtypes.scale_dtype_for(bf16) == bf16
    assert dtypes.own_float(np.float64) == np.float64
    assert dtypes.scale_dtype_for(np.float64) == np.float32
    assert dtypes.own_float(ml_dtypes.float8_e4m3fn) == np.float32
