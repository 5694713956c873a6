"""Loading a model's graph and making an onnxruntime session of a changed copy of it: what the
calibration runs and the work estimate share (imports nothing of the run module, which uses
the estimate)."""

from __future__ import annotations

from pathlib import Path

import onnx

from modelpress.core.errors import ModelRunError
from modelpress.formats.onnx.feeds import first_line

INSTALL_HINT = "pip install 'modelpress[run]'"


def graph_of(path: Path) -> onnx.ModelProto:
    """The model at `path` without its external data (a session reads that in place)."""
    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise ModelRunError(f"{path}: not a valid ONNX model ({first_line(exc)})") from None


def expose(model: onnx.ModelProto, names) -> None:
    """Add `names` (in order) to `model`'s outputs where they are not outputs or inputs."""
    present = {o.name for o in model.graph.output} | {i.name for i in model.graph.input}
    for name in dict.fromkeys(names):
        if name not in present:
            model.graph.output.append(onnx.ValueInfoProto(name=name))


def model_session(model: onnx.ModelProto, path: Path):
    """An onnxruntime session (CPU, default options) of `model`, a changed copy of the one at
    `path` whose external data it reads from that model's folder."""
    ort = onnxruntime_module()
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                     str(Path(path).resolve().parent))
    try:
        return ort.InferenceSession(model.SerializeToString(), options,
                                    providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ModelRunError(f"--calibration: onnxruntime cannot load {path}: "
                            f"{first_line(exc)}") from None


def onnxruntime_module():
    """onnxruntime, imported when a model runs; ModelRunError naming the install if missing."""
    try:
        import onnxruntime as ort  # heavy and optional: only for --calibration
    except ImportError:
        raise ModelRunError(f"--calibration needs onnxruntime ({INSTALL_HINT})") from None
    return ort
