"""Dynamic int8 quantisation of an exported scorer with ONNX Runtime.

``onnxruntime.quantization.quantize_dynamic`` stores weights as 8-bit integers with a scale
and quantises activations on the fly. For the device model the weight bytes are the item
tables (``Gather``), which shrink about 4x; the small dense layers export as ``Gemm``, which
dynamic quantisation leaves in float32.

Weights are unsigned 8-bit (``QUInt8``): on CPUs without VNNI the default signed weights
saturate inside the integer matrix product and lose about 10x more accuracy, and unsigned
weights keep the full 8 bits where ``reduce_range`` would keep 7.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import onnx

from coevo.export.onnx import ExportError


def load_model(onnx_bytes: bytes, field: str = "onnx_bytes") -> onnx.ModelProto:
    """Parse and check serialised ONNX; a clear ``ExportError`` when it is not a model."""
    if not isinstance(onnx_bytes, bytes | bytearray | memoryview):
        raise ExportError(f"{field}: expected bytes, got {type(onnx_bytes).__name__}")
    if len(onnx_bytes) == 0:
        raise ExportError(f"{field}: empty; expected a serialised ONNX model")
    try:
        model = onnx.load_model_from_string(bytes(onnx_bytes))
        onnx.checker.check_model(model)
    except Exception as error:
        raise ExportError(
            f"{field}: not a valid ONNX model ({len(onnx_bytes)} bytes): {error}"
        ) from None
    if not model.graph.node:
        raise ExportError(f"{field}: not a valid ONNX model ({len(onnx_bytes)} bytes): no graph")
    return model


def quantize_int8(onnx_bytes: bytes) -> bytes:
    """An int8 copy of a float32 ONNX model (dynamic quantisation, unsigned 8-bit weights).

    The ONNX Runtime tools work on files, so they run in a temporary folder that is removed
    before this returns.
    """
    from onnxruntime.quantization import QuantType, quant_pre_process, quantize_dynamic

    model = load_model(onnx_bytes)
    with tempfile.TemporaryDirectory(prefix="coevo-int8-") as folder:
        prepared, quantized = Path(folder) / "prepared.onnx", Path(folder) / "int8.onnx"
        quant_pre_process(model, prepared)
        quantize_dynamic(prepared, quantized, weight_type=QuantType.QUInt8)
        return quantized.read_bytes()
