"""Run one peer tool on one model the way its users call it: the process the benchmark times.

    python -m benchmarks.peerbench.driver TOOL SRC DST OPTIONS_JSON

TOOL is ort_dynamic, ort_nbits, nncf or gguf. Only the tool's own modules are imported, so the
measured wall time and peak RSS are the tool's (plus the interpreter and onnx/numpy it needs).
"""

from __future__ import annotations

import json
import sys


def ort_dynamic(src: str, dst: str, options: dict) -> None:
    """onnxruntime.quantization.quantize_dynamic (MatMulInteger/ConvInteger/Gather int8)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(src, dst, per_channel=options.get("per_channel", True),
                     weight_type=getattr(QuantType, options.get("weight_type", "QInt8")))


def ort_nbits(src: str, dst: str, options: dict) -> None:
    """onnxruntime's MatMulNBitsQuantizer (com.microsoft.MatMulNBits, MatMul weights only)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(src, **options)
    quantizer.process()
    quantizer.model.save_model_to_file(dst, use_external_data_format=False)


def nncf_compress(src: str, dst: str, options: dict) -> None:
    """NNCF compress_weights on the ONNX ModelProto (data-free)."""
    import nncf
    import onnx

    options = dict(options)
    mode = getattr(nncf.CompressWeightsMode, options.pop("mode"))
    model = nncf.compress_weights(onnx.load(src), mode=mode, **options)
    onnx.save(model, dst)


def gguf_quantize(src: str, dst: str, options: dict) -> None:
    """gguf-py's numpy quantizer on every weight, written as a GGUF file."""
    from benchmarks.peerbench import gguf_io

    if src.endswith(".onnx"):
        gguf_io.quantize_onnx(src, dst, options["type"])
    else:
        gguf_io.quantize_safetensors(src, dst, options["type"])


TOOLS = {"ort_dynamic": ort_dynamic, "ort_nbits": ort_nbits, "nncf": nncf_compress,
         "gguf": gguf_quantize}


def main(argv: list[str]) -> int:
    """Entry point: TOOL SRC DST OPTIONS_JSON."""
    tool, src, dst, options = argv
    TOOLS[tool](src, dst, json.loads(options))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
