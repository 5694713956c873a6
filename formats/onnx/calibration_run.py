"""The original model run on a calibration .npz with inner tensors as outputs: the pieces
that `calibrate` (weight input statistics) and `activation_stats` (activation histograms)
share: the samples a few at a time, a session exposing the wanted tensors, and one-line
errors naming the calibration file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import onnx

from modelpress.core.errors import InputDataError, ModelRunError
from modelpress.core.evaluate import shared_samples
from modelpress.formats.onnx.run import first_line, input_specs
from modelpress.formats.onnx.sessions import expose, graph_of, model_session, onnxruntime_module

SAMPLES_PER_RUN = 8
"""Calibration samples run at once (bounds the activations held in memory)."""


def chunks(feeds: dict[str, np.ndarray], calibration: Path, graph: onnx.ModelProto,
           per_run: int = SAMPLES_PER_RUN) -> Iterator[dict[str, np.ndarray]]:
    """The feeds a few samples at a time along axis 0 (as many as a fixed batch dimension
    of the model's inputs says, else `per_run`), or whole when the inputs do not share a
    first axis."""
    count = shared_samples(feeds.values())
    if count is None:
        yield feeds
        return
    if count == 0:
        raise InputDataError(f"{calibration}: the arrays hold no samples")
    fixed = {s.dims[0] for s in input_specs(graph) if s.dims and isinstance(s.dims[0], int)
             and s.dims[0] > 0}
    if len(fixed) == 1:
        per_run = fixed.pop()
        if count % per_run:
            raise InputDataError(f"{calibration}: the model takes batches of exactly {per_run} "
                                 f"samples; give a multiple of {per_run} (the file has {count})")
    for start in range(0, count, per_run):
        yield {k: v[start:start + per_run] for k, v in feeds.items()}


def exposing_session(path: Path, names: list[str]):
    """An onnxruntime session (CPU, default options) of the model at `path` with the inner
    tensors `names` added to its outputs; external data is read from the model's folder."""
    onnxruntime_module()  # a missing onnxruntime is said before a bad model
    model = graph_of(path)
    expose(model, sorted(names))
    return model_session(model, path)


def run_exposed(session, names: list[str], chunk: dict[str, np.ndarray], path: Path,
                calibration: Path) -> list[np.ndarray]:
    """`names` computed by `session` on one chunk of the calibration feeds."""
    try:
        return session.run(names, chunk)
    except Exception as exc:
        raise ModelRunError(f"--calibration {calibration}: onnxruntime cannot run "
                            f"{path}: {first_line(exc)}") from None
